//! The upgrade engine against simulated CAPD clusters: real systemd containers, the real Docker
//! Engine API, the stand-in kubeadm/kubelet/kubectl and a real artifact mirror.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capd_inplace::artifacts::{
    ArtifactCache, ArtifactCaches, ArtifactSource, CacheServer, FetchConfig,
};
use capd_inplace::hooks::settings::Settings;
use capd_inplace::hooks::types::{HookRequest, ResponseStatus, UpdateMachineRequest};
use capd_inplace::hooks::update_machine::{EngineHandler, UpdateMachineHandler};
use capd_inplace::node::Docker;
use capd_inplace::telemetry::{EventSink, metrics::Metrics};
use capd_inplace::upgrade::cluster::{self, NodeOutcome};
use capd_inplace::upgrade::jobs::Progress;
use capd_inplace::upgrade::journal::{LEASE_FILE, LOCK_FILE};
use capd_inplace::upgrade::{Engine, NodeTarget, Options, Outcome, Source, Step, Timeouts};
use capd_inplace_e2e::bench::ExecCounter;
use capd_inplace_e2e::sim::{Fault, SimCluster, worker_name};
use tokio::sync::watch;

struct Fixture {
    cluster: SimCluster,
    engine: Engine,
    options: Options,
    _cache: tempfile::TempDir,
}

async fn fixture(name: &str, control_planes: usize, workers: usize, version: &str) -> Fixture {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::up(name, control_planes, workers, version)
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let source = ArtifactSource::parse(&cluster.mirror().host_url).unwrap();
    let artifacts = ArtifactCache::open(cache.path(), source, FetchConfig::default())
        .await
        .unwrap();
    Fixture {
        cluster,
        engine: engine_with_lease(Timeouts::default().lease).await,
        options: Options::new(Source::Upload(artifacts)),
        _cache: cache,
    }
}

fn target(f: &Fixture, node: &str, version: &str) -> NodeTarget {
    NodeTarget {
        cluster: f.cluster.name().to_string(),
        container: node.to_string(),
        version: version.parse().unwrap(),
        machine: Some(format!("default/{node}")),
    }
}

async fn stdout(f: &Fixture, node: &str, argv: &[&str]) -> String {
    let out = f.cluster.exec_ok(node, argv).await.unwrap();
    out.stdout.trim().to_string()
}

/// An engine whose node leases last `lease` (renewed every third of it).
async fn engine_with_lease(lease: Duration) -> Engine {
    Engine::new(
        Docker::connect().await.unwrap(),
        Timeouts {
            node_ready: Duration::from_secs(60),
            lease,
            ..Timeouts::default()
        },
    )
}

/// Polls `argv` in `node` until its output satisfies `done`; after 120 s, fails the test saying
/// that `expected` did not happen.
async fn wait_for_output(
    f: &Fixture,
    node: &str,
    argv: &[&str],
    done: impl Fn(&str) -> bool,
    expected: &str,
) {
    let waited = async {
        while !done(&stdout(f, node, argv).await) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), waited)
        .await
        .expect(expected);
}

/// A fault that holds a simulated command for `time` before it runs.
fn delay(time: Duration) -> Fault {
    Fault {
        delay_ms: Some(time.as_millis() as u64),
        ..Fault::default()
    }
}

/// The lease another upgrader holds once it took `node`'s over (see [`take_lease_over`]).
const OTHER_LEASE: &str = "other-upgrader 4102444800";

/// Takes `node`'s lease over for another upgrader, under the lease lock as upgraders do, and
/// then runs `and_then` (shell) under the same lock.
async fn take_lease_over(f: &Fixture, node: &str, and_then: &str) {
    let script = format!("printf '{OTHER_LEASE}\\n' > {LEASE_FILE} && {and_then}");
    stdout(f, node, &["flock", LOCK_FILE, "-c", &script]).await;
}

/// A systemd property as `systemctl show` prints it: of `unit`, or of systemd itself.
async fn systemd_property(f: &Fixture, node: &str, property: &str, unit: Option<&str>) -> String {
    let property = format!("--property={property}");
    let mut argv = vec!["systemctl", "show", &property, "--value"];
    argv.extend(unit);
    stdout(f, node, &argv).await
}

/// `yes` when a kubelet unit file changed on disk since systemd last read it.
async fn kubelet_needs_reload(f: &Fixture, node: &str) -> String {
    systemd_property(f, node, "NeedDaemonReload", Some("kubelet")).await
}

/// When systemd last loaded its units: at boot, and again at every `daemon-reload`.
async fn units_loaded_at(f: &Fixture, node: &str) -> String {
    systemd_property(f, node, "UnitsLoadTimestampMonotonic", None).await
}

/// The Node object named `name`, as the simulated API server holds it.
async fn node_object(f: &Fixture, name: &str) -> serde_json::Value {
    let nodes = f.cluster.nodes_json().await.unwrap();
    let items = nodes["items"].as_array().unwrap();
    let node = items
        .iter()
        .find(|n| n["metadata"]["name"] == name)
        .unwrap();
    node.clone()
}

/// Asserts everything a finished upgrade must leave behind on `node`.
async fn assert_upgraded(f: &Fixture, node: &str, version: &str, control_plane: bool) {
    assert_eq!(
        stdout(f, node, &["kubeadm", "version", "-o", "short"]).await,
        version
    );
    assert_eq!(
        stdout(f, node, &["kubelet", "--version"]).await,
        format!("Kubernetes {version}")
    );
    let kubectl = stdout(f, node, &["kubectl", "version", "--client", "-o", "json"]).await;
    assert!(
        kubectl.contains(&format!("\"gitVersion\": \"{version}\""))
            || kubectl.contains(&format!("\"gitVersion\":\"{version}\"")),
        "{kubectl}"
    );
    assert_eq!(stdout(f, node, &["cat", "/kind/version"]).await, version);
    assert_eq!(
        stdout(f, node, &["systemctl", "is-active", "kubelet"]).await,
        "active"
    );
    if control_plane {
        for component in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            let manifest = stdout(
                f,
                node,
                &[
                    "cat",
                    &format!("/etc/kubernetes/manifests/{component}.yaml"),
                ],
            )
            .await;
            assert!(
                manifest.contains(&format!("{component}:{version}")),
                "{component} manifest not at {version}"
            );
        }
    }
    let object = node_object(f, node).await;
    assert_eq!(object["status"]["nodeInfo"]["kubeletVersion"], version);
    assert_ne!(
        object["spec"]["unschedulable"], true,
        "{node} left cordoned"
    );
    let ready = object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(ready, "{node} not Ready");
    let journal: serde_json::Value = serde_json::from_str(
        &stdout(
            f,
            node,
            &[
                "cat",
                &format!("/var/lib/capd-inplace/{version}/journal.json"),
            ],
        )
        .await,
    )
    .unwrap();
    assert_eq!(journal["done"], true);
    assert_eq!(journal["cordonedByUs"], false);
    // The replaced binaries are kept for a manual rollback.
    let prev = stdout(
        f,
        node,
        &["ls", &format!("/var/lib/capd-inplace/{version}/prev")],
    )
    .await;
    assert_eq!(
        prev.split_whitespace().collect::<Vec<_>>(),
        ["kubeadm", "kubectl", "kubelet"]
    );
}

/// A dry run of a cluster with two control planes: the first would run `kubeadm upgrade apply`,
/// the second `kubeadm upgrade node` after it (the cluster's version stays old in a dry run, so
/// each previews apply by itself), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_of_two_control_planes_applies_once() {
    let f = fixture("eng-ha-dry", 2, 1, "v1.31.4").await;
    let results = cluster::upgrade(
        &f.engine,
        f.cluster.name(),
        "v1.32.3".parse().unwrap(),
        &f.options,
        1,
        true,
        Arc::new(|_: &str, _: &Progress| {}),
    )
    .await
    .unwrap();
    let modes: Vec<&str> = results
        .iter()
        .map(|result| match &result.outcome {
            NodeOutcome::WouldUpgrade { mode, .. } => mode.as_str(),
            other => panic!("{}: {other:?}", result.node),
        })
        .collect();
    assert_eq!(
        modes,
        [
            "kubeadm upgrade apply",
            "kubeadm upgrade node after the first control plane",
            "kubeadm upgrade node after the control plane",
        ]
    );
    assert_eq!(
        f.cluster.cluster_version().await.unwrap().to_string(),
        "v1.31.4"
    );
    f.cluster.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minor_upgrade_of_a_control_plane_and_a_worker() {
    let f = fixture("eng-minor", 1, 1, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    let worker = worker_name(f.cluster.name(), 0);
    let ids_before: Vec<String> = f.cluster.nodes().iter().map(|n| n.id.clone()).collect();
    // A kubelet drop-in changed on the worker and never reloaded: the restart step must re-read
    // the units there (systemd says one changed), though it skips the reload where none did.
    f.cluster
        .exec_ok(
            &worker,
            &[
                "sh",
                "-c",
                "printf '[Service]\\nEnvironment=CAPD_INPLACE_TEST=reloaded\\n' \
                 > /etc/systemd/system/kubelet.service.d/99-test.conf",
            ],
        )
        .await
        .unwrap();
    assert_eq!(kubelet_needs_reload(&f, &worker).await, "yes");
    let cp_units_loaded = units_loaded_at(&f, &cp).await;
    let worker_units_loaded = units_loaded_at(&f, &worker).await;

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        Arc::new(move |node: &str, progress: &Progress| {
            seen.lock()
                .unwrap()
                .push((node.to_string(), progress.clone()))
        })
    };
    let results = cluster::upgrade(
        &f.engine,
        f.cluster.name(),
        "v1.32.3".parse().unwrap(),
        &f.options,
        2,
        false,
        record,
    )
    .await
    .unwrap();
    for result in &results {
        assert_eq!(result.outcome, NodeOutcome::Upgraded, "{}", result.node);
    }
    assert_upgraded(&f, &cp, "v1.32.3", true).await;
    assert_upgraded(&f, &worker, "v1.32.3", false).await;
    let environment = stdout(
        &f,
        &worker,
        &["systemctl", "show", "--property=Environment", "kubelet"],
    )
    .await;
    assert!(
        environment.contains("CAPD_INPLACE_TEST=reloaded"),
        "{environment}"
    );
    for node in [&cp, &worker] {
        assert_eq!(kubelet_needs_reload(&f, node).await, "no");
    }
    // The worker's units were reloaded; the control plane's, where no unit changed, were not.
    assert_ne!(units_loaded_at(&f, &worker).await, worker_units_loaded);
    assert_eq!(units_loaded_at(&f, &cp).await, cp_units_loaded);
    assert_eq!(
        f.cluster.cluster_version().await.unwrap().to_string(),
        "v1.32.3"
    );

    // Same containers: upgraded in place, not replaced.
    let docker = Docker::connect().await.unwrap();
    for (node, id) in f.cluster.nodes().iter().zip(&ids_before) {
        assert_eq!(
            docker
                .locate(f.cluster.name(), &node.name)
                .await
                .unwrap()
                .id(),
            id
        );
    }
    // Every step was reported, in order, for each node.
    let seen = seen.lock().unwrap().clone();
    for node in [&cp, &worker] {
        let steps: Vec<Step> = seen
            .iter()
            .filter(|(n, _)| n == node)
            .filter_map(|(_, p)| match p {
                Progress::Running(step) => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(steps, Step::ALL.to_vec(), "{node}");
    }

    // A second run finds nothing to do and changes nothing.
    let (tx, _rx) = watch::channel(Progress::Queued);
    let again = f
        .engine
        .upgrade(&target(&f, &worker, "v1.32.3"), &f.options, &tx)
        .await
        .unwrap();
    assert_eq!(again, Outcome::AlreadyAtTarget);
    f.cluster.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_upgrade_with_binaries_fetched_inside_the_node() {
    let f = fixture("eng-patch", 1, 0, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    let options = Options::new(Source::FetchInNode {
        base_url: f.cluster.mirror().network_url.clone(),
    });
    let (tx, _rx) = watch::channel(Progress::Queued);
    let outcome = f
        .engine
        .upgrade(&target(&f, &cp, "v1.31.9"), &options, &tx)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Upgraded);
    assert_upgraded(&f, &cp, "v1.31.9", true).await;
    f.cluster.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeadm_failure_reports_the_step_and_the_next_attempt_resumes() {
    let f = fixture("eng-fault", 1, 0, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    f.cluster
        .inject_fault(
            &cp,
            "kubeadm-upgrade-apply",
            &serde_json::from_str::<Fault>(r#"{"fail_times":1,"message":"etcd is unhappy"}"#)
                .unwrap(),
        )
        .await
        .unwrap();
    let (tx, _rx) = watch::channel(Progress::Queued);
    let error = f
        .engine
        .upgrade(&target(&f, &cp, "v1.32.3"), &f.options, &tx)
        .await
        .unwrap_err();
    assert_eq!(error.step, Step::KubeadmUpgrade);
    assert!(
        error.to_string().starts_with(
            "step 4/10 kubeadm upgrade failed on eng-fault-cp-0: `kubeadm upgrade apply"
        ),
        "{error}"
    );
    // kubeadm was installed, the rest not: the node is consistent, at the old kubelet.
    assert_eq!(
        stdout(&f, &cp, &["kubeadm", "version", "-o", "short"]).await,
        "v1.32.3"
    );
    assert_eq!(
        stdout(&f, &cp, &["kubelet", "--version"]).await,
        "Kubernetes v1.31.4"
    );
    let journal = stdout(
        &f,
        &cp,
        &["cat", "/var/lib/capd-inplace/v1.32.3/journal.json"],
    )
    .await;
    assert!(
        journal.contains("\"step\": \"kubeadm-upgrade\""),
        "{journal}"
    );

    let outcome = f
        .engine
        .upgrade(&target(&f, &cp, "v1.32.3"), &f.options, &tx)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Upgraded);
    assert_upgraded(&f, &cp, "v1.32.3", true).await;
    f.cluster.down().await.unwrap();
}

/// An upgrader whose lease passed to another (its renewals stalled past the lease's time, say)
/// stops at its next step, and leaves the new holder's lease and journal as it found them: the
/// failure it records would otherwise overwrite that journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_lost_its_lease_stops_and_leaves_the_new_holders_journal() {
    let mut f = fixture("eng-lease", 1, 0, "v1.31.4").await;
    // Renewed every second, so the loss is seen while kubeadm runs.
    f.engine = engine_with_lease(Duration::from_secs(3)).await;
    let cp = f.cluster.control_plane().name.clone();
    f.cluster
        .inject_fault(&cp, "kubeadm-upgrade-apply", &delay(Duration::from_secs(5)))
        .await
        .unwrap();
    let (tx, _rx) = watch::channel(Progress::Queued);
    let target = target(&f, &cp, "v1.32.3");
    let upgrade = f.engine.upgrade(&target, &f.options, &tx);
    let take_over = async {
        // The journal exists once the upgrade has changed the node; then another upgrader takes
        // the lease over, under the lease lock as upgraders do, and writes its own journal.
        let journal = "/var/lib/capd-inplace/v1.32.3/journal.json";
        let read_journal = ["sh", "-c", &format!("cat {journal} || true")];
        let written = |journal: &str| !journal.is_empty();
        wait_for_output(
            &f,
            &cp,
            &read_journal,
            written,
            "the upgrade writes its journal",
        )
        .await;
        take_lease_over(&f, &cp, &format!("printf other > {journal}")).await;
    };
    let (outcome, ()) = tokio::join!(upgrade, take_over);

    let error = outcome.unwrap_err();
    assert!(
        matches!(error.source, capd_inplace::upgrade::Error::LeaseLost),
        "{error}"
    );
    assert_eq!(
        stdout(
            &f,
            &cp,
            &["cat", "/var/lib/capd-inplace/v1.32.3/journal.json"]
        )
        .await,
        "other"
    );
    assert_eq!(stdout(&f, &cp, &["cat", LEASE_FILE]).await, OTHER_LEASE);
    f.cluster.down().await.unwrap();
}

/// A worker's cordon is lifted by kubectl in the control plane, so the node's own exec cannot
/// guard it as it guards every change in the node. An upgrader whose lease passed to another
/// while it waited for the worker's Node must still not uncordon that worker: the new holder may
/// be draining it. (The lease here is long enough that no renewal notices the loss in time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrader_that_lost_a_workers_lease_leaves_it_cordoned() {
    let mut f = fixture("eng-lease-worker", 1, 1, "v1.31.4").await;
    f.engine = engine_with_lease(Duration::from_secs(600)).await;
    let cp = f.cluster.control_plane().name.clone();
    let worker = worker_name(f.cluster.name(), 0);
    let (tx, _rx) = watch::channel(Progress::Queued);
    let outcome = f
        .engine
        .upgrade(&target(&f, &cp, "v1.31.9"), &f.options, &tx)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Upgraded);
    // The restarted kubelet takes 8 s to come up, so the upgrader waits that long for the Node
    // after its last change in the worker (the restart, whose exec checks the lease first); the
    // lease passes to another as soon as systemd has started the new kubelet.
    f.cluster
        .inject_fault(&worker, "kubelet", &delay(Duration::from_secs(8)))
        .await
        .unwrap();
    let kubelet_run = [
        "systemctl",
        "show",
        "--property=InvocationID",
        "--value",
        "kubelet",
    ];
    let first_run = stdout(&f, &worker, &kubelet_run).await;
    let worker_target = target(&f, &worker, "v1.31.9");
    let upgrade = f.engine.upgrade(&worker_target, &f.options, &tx);
    let take_over = async {
        let restarted = |run: &str| run != first_run;
        wait_for_output(
            &f,
            &worker,
            &kubelet_run,
            restarted,
            "the upgrade restarts the kubelet",
        )
        .await;
        take_lease_over(&f, &worker, "true").await;
    };
    let (outcome, ()) = tokio::join!(upgrade, take_over);

    let error = outcome.unwrap_err();
    assert!(
        matches!(error.source, capd_inplace::upgrade::Error::LeaseLost),
        "{error}"
    );
    assert_eq!(error.step, Step::Uncordon, "{error}");
    let node = node_object(&f, &worker).await;
    assert_eq!(
        node["spec"]["unschedulable"], true,
        "{worker} was uncordoned"
    );
    assert_eq!(stdout(&f, &worker, &["cat", LEASE_FILE]).await, OTHER_LEASE);
    f.cluster.down().await.unwrap();
}

/// A cache server on the gateway of `node`'s Docker network, which is this host: where the CLI's
/// `--serve-cache` listens.
async fn cache_server_at_gateway(f: &Fixture, node: &str) -> CacheServer {
    let docker = Docker::connect().await.unwrap();
    let located = docker.locate(f.cluster.name(), node).await.unwrap();
    let gateway = located.network_gateway().await.unwrap();
    CacheServer::bind(SocketAddr::new(gateway, 0))
        .await
        .unwrap()
}

/// An UpdateMachine handler with its own cache of `f`'s mirror, and its metrics.
async fn update_machine_handler(
    f: &Fixture,
    cache: &tempfile::TempDir,
    cache_server: Option<CacheServer>,
) -> (Arc<EngineHandler>, Metrics) {
    let source = ArtifactSource::parse(&f.cluster.mirror().host_url).unwrap();
    let caches = ArtifactCaches::open(cache.path(), source, FetchConfig::default())
        .await
        .unwrap();
    let metrics = Metrics::new();
    let handler = Arc::new(EngineHandler::new(
        f.engine.clone(),
        caches,
        cache_server,
        metrics.clone(),
        EventSink::disabled(),
        4,
    ));
    (handler, metrics)
}

/// The testdata UpdateMachine request, for `node` of `f`'s cluster going to `version`, with
/// `settings` added.
fn update_machine_request(
    f: &Fixture,
    node: &str,
    version: &str,
    settings: &[(&str, &str)],
) -> UpdateMachineRequest {
    let mut request: serde_json::Value = serde_json::from_str(include_str!(
        "../testdata/hooks/update-machine.request.json"
    ))
    .unwrap();
    let machine = &mut request["desired"]["machine"];
    machine["metadata"]["name"] = node.into();
    machine["spec"]["clusterName"] = f.cluster.name().into();
    machine["spec"]["version"] = version.into();
    machine["spec"]["providerID"] = format!("docker:////{node}").into();
    for (name, value) in settings {
        request["settings"][name] = (*value).into();
    }
    UpdateMachineRequest::read(&serde_json::to_vec(&request).unwrap()).unwrap()
}

/// Polls as CAPI does until the handler answers done, which must be within two minutes.
async fn poll_until_done(handler: &EngineHandler, request: &UpdateMachineRequest, version: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let response = handler.update_machine(request.clone()).await;
        assert_eq!(
            response.status,
            ResponseStatus::Success,
            "{}",
            response.message
        );
        if response.retry_after_seconds == 0 {
            assert_eq!(response.message, format!("upgraded to {version}"));
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {}",
            response.message
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// UpdateMachine as CAPI drives it, straight on the handler: 50 concurrent duplicate calls start
/// exactly one upgrade, and polling then reaches done with the node verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_update_machine_calls_join_one_job() {
    let f = fixture("eng-dup", 1, 0, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    let cache = tempfile::tempdir().unwrap();
    let (handler, metrics) = update_machine_handler(&f, &cache, None).await;
    let request = update_machine_request(&f, &cp, "v1.32.3", &[]);

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (handler, request) = (handler.clone(), request.clone());
            tokio::spawn(async move { handler.update_machine(request).await })
        })
        .collect();
    for call in calls {
        let response = call.await.unwrap();
        assert_eq!(
            response.status,
            ResponseStatus::Success,
            "{}",
            response.message
        );
        assert!(response.retry_after_seconds > 0, "{}", response.message);
    }
    poll_until_done(&handler, &request, "v1.32.3").await;
    let text = metrics.encode();
    assert!(
        text.contains("capd_inplace_upgrades_started_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("capd_inplace_upgrades_succeeded_total 1\n"),
        "{text}"
    );
    assert_upgraded(&f, &cp, "v1.32.3", true).await;
    f.cluster.down().await.unwrap();
}

/// The serveCache setting: refused by an extension without a cache server, and the node then
/// untouched; with one, the node downloads from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_machine_with_the_serve_cache_setting() {
    let f = fixture("eng-serve", 1, 0, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    let request = update_machine_request(&f, &cp, "v1.32.3", &[("serveCache", "true")]);

    let cache = tempfile::tempdir().unwrap();
    let (without_server, _) = update_machine_handler(&f, &cache, None).await;
    let settings = Settings::from_map(&request.settings).unwrap();
    let refusal = without_server
        .refuses(&settings)
        .expect("refused without a server");
    assert!(refusal.contains("--cache-server-address"), "{refusal}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let response = without_server.update_machine(request.clone()).await;
        if response.status == ResponseStatus::Failure {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "{}", response.message);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        refused.message, refusal,
        "UpdateMachine and CanUpdate say the same"
    );
    assert_eq!(
        stdout(&f, &cp, &["kubeadm", "version", "-o", "short"]).await,
        "v1.31.4"
    );
    drop(without_server);

    let server = cache_server_at_gateway(&f, &cp).await;
    let cache = tempfile::tempdir().unwrap();
    let (handler, _) = update_machine_handler(&f, &cache, Some(server.clone())).await;
    assert_eq!(handler.refuses(&settings), None);
    poll_until_done(&handler, &request, "v1.32.3").await;
    assert_eq!(server.served(), 3, "the node downloaded the three binaries");
    assert_upgraded(&f, &cp, "v1.32.3", true).await;
    f.cluster.down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_served_from_the_cache_reach_the_node_through_its_gateway() {
    let f = fixture("eng-served", 1, 0, "v1.31.4").await;
    let cp = f.cluster.control_plane().name.clone();
    let Source::Upload(cache) = f.options.source.clone() else {
        unreachable!("the fixture uploads from its cache")
    };
    let staged = "/var/lib/capd-inplace/v1.31.9/bin";

    // This host's loopback, which the node cannot reach: the stage step fails, says which
    // download it was, and leaves nothing staged, not even a partial file.
    let loopback = CacheServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let options = Options::new(Source::Serve {
        cache: cache.clone(),
        server: loopback.clone(),
    });
    let (tx, _rx) = watch::channel(Progress::Queued);
    let error = f
        .engine
        .upgrade(&target(&f, &cp, "v1.31.9"), &options, &tx)
        .await
        .unwrap_err();
    assert_eq!(error.step, Step::Stage, "{error}");
    match &error.source {
        capd_inplace::upgrade::Error::Download { url, said } => {
            assert!(
                url.starts_with(&format!("{}/sha256/", loopback.url())),
                "{url}"
            );
            assert!(said.starts_with("curl: (7)"), "{said}");
        }
        other => panic!("not a failed download: {other}"),
    }
    assert_eq!(stdout(&f, &cp, &["ls", "-A", staged]).await, "");
    assert_eq!(
        stdout(&f, &cp, &["kubelet", "--version"]).await,
        "Kubernetes v1.31.4"
    );

    // The gateway of the node's Docker network is this host: the node downloads from the
    // cache there, and the attempt resumes at the stage step.
    let server = cache_server_at_gateway(&f, &cp).await;
    let downloaded = cache.stats().bytes_downloaded;
    let options = Options::new(Source::Serve {
        cache,
        server: server.clone(),
    });
    let outcome = f
        .engine
        .upgrade(&target(&f, &cp, "v1.31.9"), &options, &tx)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Upgraded);
    assert_upgraded(&f, &cp, "v1.31.9", true).await;
    let Source::Serve { cache, .. } = &options.source else {
        unreachable!()
    };
    assert_eq!(
        cache.stats().bytes_downloaded,
        downloaded,
        "the first attempt cached everything"
    );
    assert_eq!(server.served(), 3, "the node downloaded the three binaries");

    // Staging alone, served and then uploaded: two execs each, the one that takes the lease
    // and the one that stages and verifies, which also releases the lease.
    let uploaded = f.options.clone();
    for (version, options) in [("v1.32.3", &options), ("v1.33.0", &uploaded)] {
        let execs = ExecCounter::start(&f.cluster).await.unwrap();
        f.engine
            .stage(&target(&f, &cp, version), options)
            .await
            .unwrap();
        // The Engine's events arrive a moment after the execs they report.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            execs.stop().get(&cp).copied(),
            Some(2),
            "{version}: execs of a stage"
        );
        assert_eq!(
            stdout(
                &f,
                &cp,
                &["ls", &format!("/var/lib/capd-inplace/{version}/bin")]
            )
            .await,
            "kubeadm\nkubectl\nkubelet"
        );
        let root = stdout(&f, &cp, &["ls", "-A", "/var/lib/capd-inplace"]).await;
        assert!(!root.contains("lease"), "{root}");
    }
    f.cluster.down().await.unwrap();
}
