//! End-to-end scenarios: the CAPI-faithful driver against the real `capd-inplace serve` process
//! over HTTPS, on simulated CAPD clusters (real systemd containers). Each scenario has its own
//! cluster and its own extension process, and ends by checking every node: versions, cordon
//! state, journal, identity.
//!
//! Needs the `capd-inplace` and `simnode` binaries (`cargo test --workspace` or `make e2e` builds
//! them) and a Docker Engine.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use capd_inplace_e2e::driver::{
    self, Change, Decision, Driver, Event, ExtensionConfig, Hook, Pacing, RuntimeClient, Workload,
};
use capd_inplace_e2e::extension::{Error, ExtensionProcess, ServeOptions, sample};
use capd_inplace_e2e::sim::{Fault, SimCluster};
use capd_inplace_e2e::sim_artifacts;
use serde_json::{Value, json};

const FROM: &str = "v1.31.4";

struct Env {
    cluster: SimCluster,
    extension: ExtensionProcess,
    driver: Driver,
    /// Container IDs at the start, to prove identity is kept.
    ids: BTreeMap<String, String>,
}

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn client(
    extension: &ExtensionProcess,
    endpoints: Vec<String>,
    settings: &[(&str, &str)],
) -> RuntimeClient {
    RuntimeClient::discover(ExtensionConfig::capd_inplace(
        endpoints,
        extension.ca_pem().unwrap(),
        settings.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    ))
    .await
    .unwrap()
}

async fn env(name: &str, cps: usize, workers: usize, settings: &[(&str, &str)]) -> Env {
    env_with(name, cps, workers, settings, Pacing::default()).await
}

async fn env_with(
    name: &str,
    cps: usize,
    workers: usize,
    settings: &[(&str, &str)],
    pacing: Pacing,
) -> Env {
    init();
    let cluster = SimCluster::up(name, cps, workers, FROM).await.unwrap();
    let extension = ExtensionProcess::start(&cluster.mirror().host_url)
        .await
        .unwrap();
    let client = client(&extension, vec![extension.url()], settings).await;
    let driver = Driver::new(client, Workload::from_sim(&cluster, FROM), pacing);
    let ids = cluster
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), n.id.clone()))
        .collect();
    Env {
        cluster,
        extension,
        driver,
        ids,
    }
}

async fn stdout(cluster: &SimCluster, node: &str, argv: &[&str]) -> String {
    let out = cluster.exec_ok(node, argv).await.unwrap();
    out.stdout.trim().to_string()
}

async fn exists(cluster: &SimCluster, node: &str, path: &str) -> bool {
    cluster
        .exec(node, &["test", "-e", path])
        .await
        .unwrap()
        .success()
}

async fn container_id(cluster: &SimCluster, name: &str) -> String {
    cluster
        .docker()
        .inspect_container(
            name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .unwrap()
        .id
        .unwrap()
}

/// What each node's journal must look like at the end.
#[derive(Clone, Copy)]
enum Journal {
    /// Upgraded: `done`, `cordonedByUs=false`, old binaries kept in `prev`.
    Done,
    /// Never touched: no `/var/lib/capd-inplace` at all.
    Untouched,
    /// An upgrade to this version was attempted and failed before installing anything: no
    /// completed journal, no replaced binaries, the node lease released.
    NothingInstalled(&'static str),
}

/// Checks every node of the cluster: binaries, `/kind/version`, Node version, Ready, not
/// cordoned, journal, container identity, Machine identity in the driver's model.
async fn assert_nodes(env: &Env, version: &str, journal: Journal) {
    let cluster = &env.cluster;
    let nodes = cluster.nodes_json().await.unwrap();
    let items = nodes["items"].as_array().unwrap();
    for node in cluster.nodes() {
        let name = node.name.as_str();
        assert_eq!(
            stdout(cluster, name, &["kubeadm", "version", "-o", "short"]).await,
            version,
            "{name} kubeadm"
        );
        assert_eq!(
            stdout(cluster, name, &["kubelet", "--version"]).await,
            format!("Kubernetes {version}"),
            "{name} kubelet"
        );
        assert_eq!(
            stdout(cluster, name, &["cat", "/kind/version"]).await,
            version,
            "{name} /kind/version"
        );
        let object = items
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Node {name}"));
        assert_eq!(
            object["status"]["nodeInfo"]["kubeletVersion"], version,
            "{name} Node version"
        );
        assert_ne!(
            object["spec"]["unschedulable"], true,
            "{name} left cordoned"
        );
        let ready = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{name} not Ready");
        assert_eq!(
            object["spec"]["providerID"],
            format!("docker:////{name}"),
            "{name} providerID"
        );
        assert_eq!(
            container_id(cluster, name).await,
            env.ids[name],
            "{name} container replaced"
        );
        match journal {
            Journal::Done => {
                let text = stdout(
                    cluster,
                    name,
                    &[
                        "cat",
                        &format!("/var/lib/capd-inplace/{version}/journal.json"),
                    ],
                )
                .await;
                let journal: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(journal["done"], true, "{name} journal: {text}");
                assert_eq!(journal["cordonedByUs"], false, "{name} journal: {text}");
                assert_eq!(journal["target"], version, "{name} journal: {text}");
                // The binaries replaced were the old ones: no install step ran twice.
                assert_eq!(
                    stdout(
                        cluster,
                        name,
                        &[
                            &format!("/var/lib/capd-inplace/{version}/prev/kubelet"),
                            "--version"
                        ]
                    )
                    .await,
                    format!("Kubernetes {FROM}"),
                    "{name} prev kubelet"
                );
            }
            Journal::Untouched => {
                assert!(
                    !exists(cluster, name, "/var/lib/capd-inplace").await,
                    "{name} was touched"
                );
            }
            Journal::NothingInstalled(target) => {
                let dir = format!("/var/lib/capd-inplace/{target}");
                assert!(
                    !exists(cluster, name, &format!("{dir}/prev")).await,
                    "{name}"
                );
                let journal = cluster
                    .exec(name, &["cat", &format!("{dir}/journal.json")])
                    .await
                    .unwrap();
                if journal.success() {
                    let journal: Value = serde_json::from_str(&journal.stdout).unwrap();
                    assert_ne!(journal["done"], true, "{name}");
                    assert_eq!(journal["cordonedByUs"], false, "{name}");
                }
                assert!(
                    !exists(cluster, name, "/var/lib/capd-inplace/lease").await,
                    "{name}: lease not released"
                );
            }
        }
    }
    // Every node's Machine is still there under its name, pointing at the same container.
    let workload = env.driver.workload();
    for node in cluster.nodes() {
        let machine = workload
            .machine(&node.name)
            .unwrap_or_else(|| panic!("Machine {} is gone", node.name));
        assert_eq!(machine.provider_id(), node.provider_id(), "{}", node.name);
        // A failed update stays pending: CAPI keeps calling UpdateMachine.
        let failed = matches!(journal, Journal::NothingInstalled(_));
        assert_eq!(machine.is_update_in_progress(), failed, "{}", node.name);
    }
}

/// Control-plane nodes ran `kubeadm upgrade` exactly once (one manifest backup each).
async fn assert_kubeadm_upgraded_once(env: &Env) {
    for node in env.cluster.nodes() {
        if node.role != capd_inplace_e2e::sim::Role::ControlPlane {
            continue;
        }
        let listing = stdout(&env.cluster, &node.name, &["ls", "/etc/kubernetes/tmp"]).await;
        let backups = listing
            .split_whitespace()
            .filter(|e| e.starts_with("kubeadm-backup-manifests-"))
            .count();
        assert_eq!(backups, 1, "{}: {listing}", node.name);
    }
}

fn completed(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Completed { machine, .. } => Some(machine.clone()),
            _ => None,
        })
        .collect()
}

fn position(events: &[Event], wanted: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(wanted)
        .unwrap_or_else(|| panic!("event not found in {events:#?}"))
}

fn all_in_place(decisions: &[Decision]) -> bool {
    decisions
        .iter()
        .all(|d| matches!(d, Decision::InPlace { .. }))
}

fn would_replace(decisions: &[Decision]) -> Vec<String> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::WouldReplace { machine, .. } => Some(machine.clone()),
            Decision::InPlace { .. } => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minor_upgrade_of_three_control_planes_and_two_workers_in_place() {
    let env = env("e2e-big", 3, 2, &[]).await;
    let before = env.extension.metrics().await.unwrap();
    // Held in `kubeadm upgrade node` for longer than two of the driver's polls, so the progress
    // the Machine controller sees is observed whatever the speed of the rest of the upgrade.
    let held = env.cluster.nodes()[3].name.clone();
    let delay: Fault = serde_json::from_str(r#"{"delay_ms":6000}"#).unwrap();
    env.cluster
        .inject_fault(&held, "kubeadm-upgrade-node", &delay)
        .await
        .unwrap();

    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert_eq!(cp.len(), 3);
    assert!(all_in_place(&cp), "{cp:?}");
    let md = env
        .driver
        .upgrade_machine_deployment(&Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert_eq!(md.len(), 2);
    assert!(all_in_place(&md), "{md:?}");

    let events = env.driver.events();
    let names: Vec<String> = env.cluster.nodes().iter().map(|n| n.name.clone()).collect();
    assert_eq!(completed(&events), names);
    // One control-plane Machine at a time; workers in batches of maxUnavailable = 1.
    for pair in names.windows(2) {
        let done = position(
            &events,
            |e| matches!(e, Event::Completed { machine, .. } if *machine == pair[0]),
        );
        let next = position(
            &events,
            |e| matches!(e, Event::StartedInPlaceUpdate { machine } if *machine == pair[1]),
        );
        assert!(
            done < next,
            "{} started before {} completed",
            pair[1],
            pair[0]
        );
    }
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Updating { machine, message }
                if *machine == held && message.starts_with("step 4/10: kubeadm upgrade")
        )),
        "{events:#?}"
    );
    // Bookkeeping cleared on every Machine.
    for machine in env.driver.workload().machines {
        assert!(!machine.is_update_in_progress(), "{}", machine.name());
        assert_eq!(machine.version(), "v1.32.3");
        assert_eq!(machine.custom_image(), "kindest/node:v1.32.3");
    }

    env.cluster
        .wait_nodes_ready(
            &capd_inplace_e2e::sim::Version::parse("v1.32.3").unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
    assert_kubeadm_upgraded_once(&env).await;
    assert_eq!(
        env.cluster.cluster_version().await.unwrap().to_string(),
        "v1.32.3"
    );

    let after = env.extension.metrics().await.unwrap();
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(moved("capd_inplace_upgrades_started_total"), 5.0, "{after}");
    assert_eq!(
        moved("capd_inplace_upgrades_succeeded_total"),
        5.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"capd_inplace_hook_requests_total{hook="can-update-machine",result="success"}"#),
        3.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"capd_inplace_hook_requests_total{hook="can-update-machineset",result="success"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"capd_inplace_hook_requests_total{hook="update-machine",result="done"}"#),
        5.0,
        "{after}"
    );
    assert!(
        moved(r#"capd_inplace_hook_requests_total{hook="update-machine",result="in-progress"}"#)
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_upgrade_in_place() {
    let env = env("e2e-patch", 1, 1, &[]).await;
    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.31.9"))
        .await
        .unwrap();
    let md = env
        .driver
        .upgrade_machine_deployment(&Change::upgrade("v1.31.9"))
        .await
        .unwrap();
    assert!(all_in_place(&cp) && all_in_place(&md), "{cp:?} {md:?}");
    assert_nodes(&env, "v1.31.9", Journal::Done).await;
    assert_kubeadm_upgraded_once(&env).await;
}

/// A non-version change (KubeadmConfig `files`) and a non-kind image: CAPI would roll out, and
/// no node is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_version_changes_fall_back_to_rollout() {
    let env = env("e2e-fallback", 1, 1, &[]).await;
    let files = json!([{"path": "/etc/motd", "owner": "root:root", "permissions": "0644", "content": "hello\n"}]);
    let change = Change {
        files: Some(files),
        ..Change::upgrade(FROM)
    };
    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &change)
        .await
        .unwrap();
    let md = env
        .driver
        .upgrade_machine_deployment(&change)
        .await
        .unwrap();
    assert_eq!(would_replace(&cp), [env.cluster.nodes()[0].name.clone()]);
    assert_eq!(would_replace(&md), [env.cluster.nodes()[1].name.clone()]);

    // A fresh model: the version bump with an image that is not kind's.
    let client = client(&env.extension, vec![env.extension.url()], &[]).await;
    let driver = Driver::new(
        client,
        Workload::from_sim(&env.cluster, FROM),
        Pacing::default(),
    );
    let change = Change {
        custom_image: "registry.example/custom-node:v1.32.3".into(),
        ..Change::upgrade("v1.32.3")
    };
    let cp = driver
        .upgrade_control_plane(&env.cluster, &change)
        .await
        .unwrap();
    let md = driver.upgrade_machine_deployment(&change).await.unwrap();
    assert_eq!(would_replace(&cp).len(), 1, "{cp:?}");
    assert_eq!(would_replace(&md).len(), 1, "{md:?}");
    for events in [env.driver.events(), driver.events()] {
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::StartedInPlaceUpdate { .. })),
            "{events:?}"
        );
    }
    assert_nodes(&env, FROM, Journal::Untouched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_in_place_updates_falls_back_to_rollout() {
    let env = env("e2e-disabled", 1, 1, &[("disableInPlaceUpdates", "true")]).await;
    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    let md = env
        .driver
        .upgrade_machine_deployment(&Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert_eq!(would_replace(&cp).len(), 1, "{cp:?}");
    assert_eq!(would_replace(&md).len(), 1, "{md:?}");
    let declined = env.driver.events().iter().any(|e| matches!(e, Event::Decided { in_place: false, message, .. } if message.contains("disableInPlaceUpdates")));
    assert!(declined, "{:?}", env.driver.events());
    assert_nodes(&env, FROM, Journal::Untouched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_and_two_minor_skip_fall_back_to_rollout() {
    let env = env("e2e-skew", 1, 1, &[]).await;
    for target in ["v1.30.10", "v1.33.5"] {
        let client = client(&env.extension, vec![env.extension.url()], &[]).await;
        let driver = Driver::new(
            client,
            Workload::from_sim(&env.cluster, FROM),
            Pacing::default(),
        );
        let cp = driver
            .upgrade_control_plane(&env.cluster, &Change::upgrade(target))
            .await
            .unwrap();
        let md = driver
            .upgrade_machine_deployment(&Change::upgrade(target))
            .await
            .unwrap();
        assert_eq!(would_replace(&cp).len(), 1, "{target}: {cp:?}");
        assert_eq!(would_replace(&md).len(), 1, "{target}: {md:?}");
    }
    assert_nodes(&env, FROM, Journal::Untouched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeadm_failure_on_the_second_control_plane_then_completion() {
    let env = env("e2e-kfail", 2, 0, &[]).await;
    let second = env.cluster.nodes()[1].name.clone();
    let fault: Fault =
        serde_json::from_str(r#"{"fail_times":1,"message":"injected: etcd is unhappy"}"#).unwrap();
    env.cluster
        .inject_fault(&second, "kubeadm-upgrade-node", &fault)
        .await
        .unwrap();
    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert!(all_in_place(&cp), "{cp:?}");
    let events = env.driver.events();
    let failure = events.iter().find_map(|e| match e {
        Event::UpdateFailed { machine, message } if *machine == second => Some(message.clone()),
        _ => None,
    });
    let failure = failure.unwrap_or_else(|| panic!("no Failure for {second}: {events:#?}"));
    assert!(
        failure.starts_with(&format!("step 4/10 kubeadm upgrade failed on {second}")),
        "{failure}"
    );
    let failed_at = position(
        &events,
        |e| matches!(e, Event::UpdateFailed { machine, .. } if *machine == second),
    );
    let done_at = position(
        &events,
        |e| matches!(e, Event::Completed { machine, .. } if *machine == second),
    );
    assert!(failed_at < done_at);
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
    assert_kubeadm_upgraded_once(&env).await;
}

/// SIGKILL of the extension once the second control plane has finished `kubeadm upgrade`, then a
/// restart on the same port and cert dir: the driver sees transport errors (policy Fail), then
/// the new process resumes from the node's journal once the dead process's lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_killed_mid_cluster_and_restarted() {
    let mut env = env("e2e-kill", 2, 0, &[]).await;
    let second = env.cluster.nodes()[1].name.clone();
    let journal = "/var/lib/capd-inplace/v1.32.3/journal.json".to_string();
    let (upgrade, killed) = {
        let driver = &env.driver;
        let cluster = &env.cluster;
        let extension = &mut env.extension;
        let change = Change::upgrade("v1.32.3");
        let upgrade = driver.upgrade_control_plane(&env.cluster, &change);
        let killer = async {
            let start = Instant::now();
            loop {
                assert!(
                    start.elapsed() < Duration::from_secs(240),
                    "never reached kubeadm upgrade on {second}"
                );
                let out = cluster.exec(&second, &["cat", &journal]).await.unwrap();
                if out.success()
                    && out.stdout.contains("\"kubeadm-upgrade\"")
                    && !out.stdout.contains("\"done\": true")
                {
                    let completed: Value = serde_json::from_str(&out.stdout).unwrap();
                    if completed["completed"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s == "kubeadm-upgrade")
                    {
                        extension.kill();
                        // Down until the driver's next poll has failed: a fixed pause could fall
                        // between two polls, and the rest of the upgrade takes only seconds.
                        let down = Instant::now();
                        while !driver.events().iter().any(|e| {
                            matches!(e, Event::TransportError { machine, .. } if *machine == second)
                        }) {
                            assert!(
                                down.elapsed() < Duration::from_secs(60),
                                "no poll reached the killed extension"
                            );
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        extension.restart().await.unwrap();
                        return out.stdout;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::join!(upgrade, killer)
    };
    let decisions = upgrade.unwrap_or_else(|e| panic!("{e}\n{}", env.extension.log_tail()));
    assert!(all_in_place(&decisions), "{decisions:?}");
    assert!(
        !killed.contains("\"done\": true"),
        "killed after completion: {killed}"
    );
    let events = env.driver.events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::TransportError { machine, .. } if *machine == second)),
        "the kill went unnoticed: {events:#?}"
    );
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
    assert_kubeadm_upgraded_once(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_container_restarted_mid_upgrade() {
    let env = env("e2e-restart", 1, 1, &[]).await;
    env.driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    let worker = env.cluster.nodes()[1].name.clone();
    let journal = "/var/lib/capd-inplace/v1.32.3/journal.json".to_string();
    let change = Change::upgrade("v1.32.3");
    let (md, ()) = tokio::join!(env.driver.upgrade_machine_deployment(&change), async {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "worker upgrade never started"
            );
            let out = env.cluster.exec(&worker, &["cat", &journal]).await.unwrap();
            if out.success() && out.stdout.contains("\"stage\"") {
                env.cluster.restart_node(&worker).await.unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let md = md.unwrap_or_else(|e| panic!("{e}\n{}", env.extension.log_tail()));
    assert!(all_in_place(&md), "{md:?}");
    env.cluster
        .wait_nodes_ready(
            &capd_inplace_e2e::sim::Version::parse("v1.32.3").unwrap(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
}

/// Copies the mirror's files for `version` into a local tree and breaks one published digest.
fn mirror_copy_with_bad_checksum(version: &str) -> tempfile::TempDir {
    let simnode = sim_artifacts::simnode_binary().unwrap();
    let tree = sim_artifacts::ensure_mirror_tree(&simnode).unwrap();
    let copy = tempfile::tempdir().unwrap();
    let rel = format!("release/{version}/bin/linux/amd64");
    std::fs::create_dir_all(copy.path().join(&rel)).unwrap();
    for entry in std::fs::read_dir(tree.join(&rel)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(&rel).join(entry.file_name())).unwrap();
    }
    std::fs::write(
        copy.path().join(&rel).join("kubelet.sha256"),
        "0".repeat(64),
    )
    .unwrap();
    copy
}

fn fail_fast() -> Pacing {
    Pacing {
        machine_deadline: Duration::from_secs(20),
        ..Pacing::default()
    }
}

/// The last Failure the driver saw for a Machine whose update never completed.
fn last_failure(driver: &Driver, machine: &str) -> String {
    driver
        .events()
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::UpdateFailed {
                machine: m,
                message,
            } if m == machine => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Failure for {machine}: {:#?}", driver.events()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_mismatch_in_the_mirror_is_a_failure_and_installs_nothing() {
    let copy = mirror_copy_with_bad_checksum("v1.32.3");
    let url = format!("file://{}/release", copy.path().display());
    let env = env_with("e2e-sum", 1, 0, &[("artifactURL", &url)], fail_fast()).await;
    let cp = env.cluster.nodes()[0].name.clone();
    let error = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap_err();
    assert!(matches!(error, driver::Error::Timeout { .. }), "{error}");
    let failure = last_failure(&env.driver, &cp);
    assert!(
        failure.to_lowercase().contains("checksum") || failure.contains("sha256"),
        "{failure}"
    );
    assert_nodes(&env, FROM, Journal::NothingInstalled("v1.32.3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mirror_is_a_failure_and_installs_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("http://127.0.0.1:{port}/release");
    let env = env_with("e2e-unreach", 1, 0, &[("artifactURL", &url)], fail_fast()).await;
    let cp = env.cluster.nodes()[0].name.clone();
    let error = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap_err();
    assert!(matches!(error, driver::Error::Timeout { .. }), "{error}");
    let failure = last_failure(&env.driver, &cp);
    assert!(failure.contains("step 2/10"), "{failure}");
    assert_nodes(&env, FROM, Journal::NothingInstalled("v1.32.3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_mirror_still_completes() {
    let env = env("e2e-slow", 1, 0, &[]).await;
    env.cluster
        .set_mirror_delay(Duration::from_millis(1500))
        .await
        .unwrap();
    let cp = env
        .driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert!(all_in_place(&cp), "{cp:?}");
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
}

/// Two extension replicas behind one Service: polls alternate between them. The node lease lets
/// only one of them work on a node; the other answers in-progress or a lease-held Failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_extension_processes_never_work_on_a_node_at_once() {
    let mut env = env("e2e-two", 2, 0, &[]).await;
    let second = ExtensionProcess::start(&env.cluster.mirror().host_url)
        .await
        .unwrap();
    // Each replica made its own dev CA; the caBundle holds both.
    let endpoints = vec![env.extension.url(), second.url()];
    let ca = format!(
        "{}{}",
        env.extension.ca_pem().unwrap(),
        second.ca_pem().unwrap()
    );
    let client = RuntimeClient::discover(ExtensionConfig {
        name: "capd-inplace".into(),
        endpoints,
        ca_pem: ca,
        settings: BTreeMap::new(),
    })
    .await
    .unwrap();
    let driver = Driver::new(
        client,
        Workload::from_sim(&env.cluster, FROM),
        Pacing::default(),
    );
    let cp = driver
        .upgrade_control_plane(&env.cluster, &Change::upgrade("v1.32.3"))
        .await
        .unwrap();
    assert!(all_in_place(&cp), "{cp:?}");
    let calls = driver.client().calls();
    let used: std::collections::BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.hook == "UpdateMachine")
        .map(|c| c.endpoint.as_str())
        .collect();
    assert_eq!(used.len(), 2, "{calls:#?}");
    // Every answer was in progress, done, or a lease-held Failure: never a parallel run.
    for event in driver.events() {
        if let Event::UpdateFailed { message, .. } = &event {
            assert!(message.contains("another upgrader"), "{message}");
        }
    }
    env.driver = driver;
    assert_nodes(&env, "v1.32.3", Journal::Done).await;
    assert_kubeadm_upgraded_once(&env).await;
}

/// A container that is not a kind node: no labels, just a process.
struct PlainContainer {
    docker: bollard::Docker,
    name: String,
}

impl PlainContainer {
    async fn start(cluster: &SimCluster, name: &str) -> PlainContainer {
        let docker = cluster.docker().clone();
        let image = docker
            .inspect_container(
                &cluster.nodes()[0].name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .unwrap()
            .config
            .unwrap()
            .image
            .unwrap();
        let _ = docker
            .remove_container(
                name,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(name).build()),
                ContainerCreateBody {
                    image: Some(image),
                    entrypoint: Some(vec!["sleep".into(), "3600".into()]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .unwrap();
        PlainContainer {
            docker,
            name: name.to_string(),
        }
    }
}

impl Drop for PlainContainer {
    fn drop(&mut self) {
        let (docker, name) = (self.docker.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = docker
                    .remove_container(
                        &name,
                        Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                    )
                    .await;
            });
        })
        .join();
    }
}

/// Polls UpdateMachine for a Machine until it answers Failure (the first answer may be "queued").
async fn failure_of(driver: &Driver, machine: &str) -> String {
    let start = Instant::now();
    loop {
        match driver.call_update_machine(machine).await {
            Err(driver::Error::Failure { message, .. }) => return message,
            Ok(response) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no Failure for {machine}: {response}"
                );
                assert_ne!(
                    response["retryAfterSeconds"], 0,
                    "{machine} reported done: {response}"
                );
            }
            Err(other) => panic!("{machine}: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_containers_injection_and_garbage_change_nothing() {
    let env = env("e2e-sec", 1, 0, &[]).await;
    let other = SimCluster::up("e2e-foreign", 1, 0, FROM).await.unwrap();
    let plain = PlainContainer::start(&env.cluster, "e2e-sec-plain").await;
    let workload = env.driver.workload();
    let other_cp = other.nodes()[0].name.clone();

    // providerID of another cluster's node, and of a plain unlabelled container.
    for (machine, target) in [
        ("e2e-sec-thief", other_cp.as_str()),
        ("e2e-sec-plainer", plain.name.as_str()),
    ] {
        env.driver.put_machine(workload.machine_for(
            machine,
            &format!("docker:////{target}"),
            true,
            false,
        ));
        env.driver
            .force_in_place_update(machine, "v1.32.3")
            .unwrap();
        let message = failure_of(&env.driver, machine).await;
        assert!(message.contains(target), "{message}");
    }
    assert!(
        !exists(&other, &other_cp, "/var/lib/capd-inplace").await,
        "another cluster's node was touched"
    );
    let plain_check = capd_inplace_e2e::sim::exec_in(
        env.cluster.docker(),
        &plain.name,
        &["test", "-e", "/var/lib/capd-inplace"],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(!plain_check.success(), "the plain container was touched");
    assert_eq!(
        stdout(&other, &other_cp, &["kubelet", "--version"]).await,
        format!("Kubernetes {FROM}")
    );

    // Injection in the version and the names is refused before anything runs.
    let cp = env.cluster.nodes()[0].name.clone();
    let base = driver::update_machine_request(env.driver.workload().machine(&cp).unwrap());
    let mut bad_requests = Vec::new();
    for version in [
        "v1.32.3; touch /pwned",
        "v1.32.3$(touch /pwned)",
        "v1.32.3\n-rf",
    ] {
        let mut request = base.clone();
        request["desired"]["machine"]["spec"]["version"] = version.into();
        bad_requests.push(request);
    }
    for provider_id in [
        "docker:////e2e-sec-cp-0;touch /pwned",
        "docker:////../../e2e-sec-cp-0",
        "docker:////$(id)",
    ] {
        let mut request = base.clone();
        request["desired"]["machine"]["spec"]["providerID"] = provider_id.into();
        bad_requests.push(request);
    }
    for name in ["../../etc/passwd", "x;touch /pwned"] {
        let mut request = base.clone();
        request["desired"]["machine"]["metadata"]["name"] = name.into();
        bad_requests.push(request);
    }
    {
        let mut request = base.clone();
        request["desired"]["machine"]["spec"]["clusterName"] = "e2e-sec;touch /pwned".into();
        request["desired"]["machine"]["spec"]["version"] = "v1.32.3".into();
        bad_requests.push(request);
    }
    for mut request in bad_requests {
        let response = env
            .driver
            .client()
            .call(Hook::UpdateMachine, &mut request)
            .await;
        match response {
            Err(driver::Error::Failure { message, .. }) => {
                assert!(!message.contains("pwned"), "{message}")
            }
            // A clusterName that cannot match any container's label fails in the background job.
            Ok(answer) => {
                assert_ne!(answer["retryAfterSeconds"], 0, "{request}: {answer}");
                let machine = request["desired"]["machine"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let mut again = request.clone();
                let start = Instant::now();
                loop {
                    match env
                        .driver
                        .client()
                        .call(Hook::UpdateMachine, &mut again)
                        .await
                    {
                        Err(driver::Error::Failure { .. }) => break,
                        Ok(_) if start.elapsed() < Duration::from_secs(30) => {
                            tokio::time::sleep(Duration::from_millis(300)).await
                        }
                        other => panic!("{machine}: {other:?}"),
                    }
                }
            }
            Err(other) => panic!("{request}: {other}"),
        }
    }

    // Garbage and oversized bodies: HTTP 200 and a Failure on every hook.
    let oversized = {
        let mut body = b"{\"kind\":\"".to_vec();
        body.resize(21 * 1024 * 1024, b'a');
        body
    };
    for hook in [
        Hook::CanUpdateMachine,
        Hook::CanUpdateMachineSet,
        Hook::UpdateMachine,
    ] {
        for body in [
            b"not json".to_vec(),
            b"{\"kind\":".to_vec(),
            b"[]".to_vec(),
            b"\x00\xff".to_vec(),
            oversized.clone(),
        ] {
            let (status, answer) = env.driver.client().post_raw(hook, body).await.unwrap();
            assert_eq!(status, 200, "{hook:?}");
            assert_eq!(answer["status"], "Failure", "{hook:?}: {answer}");
        }
    }

    for node in [&cp] {
        assert!(!exists(&env.cluster, node, "/pwned").await);
    }
    assert!(!exists(&other, &other_cp, "/pwned").await);
    assert_nodes(&env, FROM, Journal::Untouched).await;
    drop(plain);
}

/// A process that exits while starting (here on a flag it does not know; in a run, on a port
/// taken between finding it free and binding it) is reported as soon as it exits, after the
/// harness has started it again on other ports, with its error above any backtrace.
#[tokio::test]
async fn an_extension_that_cannot_start_says_why_at_once() {
    init();
    let options = ServeOptions {
        extra_args: vec!["--no-such-flag".into()],
        ..Default::default()
    };
    let error = ExtensionProcess::start_with("http://127.0.0.1:9", options)
        .await
        .err()
        .expect("it cannot start");
    assert!(matches!(error, Error::Exited { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("--no-such-flag"), "{text}");
    assert_eq!(text.matches("--- start").count(), 3, "{text}");
}
