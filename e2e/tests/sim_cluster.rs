//! Integration tests of the simulated CAPD/kind cluster on real containers (needs a Docker
//! Engine: scripts/ensure-docker.sh). Two clusters run in parallel to keep the wall time down.

use std::time::{Duration, Instant};

use capd_inplace_e2e::sim::{ArtifactSizes, ExecOutput, Fault, Options, SimCluster, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id() % 100_000)
}

fn assert_ok(out: &ExecOutput, what: &str) {
    assert!(
        out.success(),
        "{what} exited {}:\n{}{}",
        out.exit_code,
        out.stdout,
        out.stderr
    );
}

fn pods_on(pods: &serde_json::Value, node: &str) -> Vec<String> {
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["spec"]["nodeName"] == node && p["metadata"]["labels"]["k8s-app"] == "kube-dns"
        })
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_comes_up_and_kubectl_restart_and_mirror_behave() {
    let cluster = SimCluster::up(&unique("simt-a"), 1, 1, "v1.31.4")
        .await
        .unwrap();
    let cp = cluster.control_plane().name.clone();
    let worker = cluster.nodes()[1].name.clone();

    // Every Node Ready at the version, shaped like a real v1.Node.
    let list = cluster.nodes_json().await.unwrap();
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        assert_eq!(item["kind"], "Node");
        assert_eq!(item["status"]["nodeInfo"]["kubeletVersion"], "v1.31.4");
        assert!(
            item["status"]["nodeInfo"]["containerRuntimeVersion"]
                .as_str()
                .unwrap()
                .starts_with("containerd://")
        );
        let name = item["metadata"]["name"].as_str().unwrap();
        assert_eq!(item["spec"]["providerID"], format!("docker:////{name}"));
    }
    let cp_node = items
        .iter()
        .find(|i| i["metadata"]["name"] == cp.as_str())
        .unwrap();
    assert_eq!(
        cp_node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
        ""
    );
    assert_eq!(
        cluster.cluster_version().await.unwrap().to_string(),
        "v1.31.4"
    );
    let inspect = cluster
        .docker()
        .inspect_container(&worker, None)
        .await
        .unwrap();
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["io.x-k8s.kind.cluster"], cluster.name());
    assert_eq!(labels["io.x-k8s.kind.role"], "worker");
    let kind_version = cluster
        .exec(&worker, &["cat", "/kind/version"])
        .await
        .unwrap();
    assert_eq!(kind_version.stdout.trim(), "v1.31.4");

    // Workers have no admin.conf, and kubectl refuses to run without a kubeconfig.
    let no_conf = cluster
        .exec(
            &worker,
            &[
                "kubectl",
                "--kubeconfig",
                "/etc/kubernetes/admin.conf",
                "get",
                "nodes",
            ],
        )
        .await
        .unwrap();
    assert_eq!(no_conf.exit_code, 1);
    assert!(
        no_conf.stderr.contains("stat /etc/kubernetes/admin.conf"),
        "{}",
        no_conf.stderr
    );

    // cordon / uncordon / drain round trip. Draining the control plane moves CoreDNS away.
    assert_eq!(
        cluster.kubectl(&["cordon", &worker]).await.unwrap().stdout,
        format!("node/{worker} cordoned\n")
    );
    let table = cluster.kubectl(&["get", "nodes"]).await.unwrap().stdout;
    assert!(table.contains("Ready,SchedulingDisabled"), "{table}");
    assert_eq!(
        cluster
            .kubectl(&["uncordon", &worker])
            .await
            .unwrap()
            .stdout,
        format!("node/{worker} uncordoned\n")
    );
    let refused = cluster.kubectl(&["drain", &cp]).await.unwrap();
    assert_eq!(refused.exit_code, 1);
    assert!(
        refused.stderr.contains("use --ignore-daemonsets"),
        "{}",
        refused.stderr
    );
    let drained = cluster
        .kubectl(&[
            "drain",
            &cp,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=60s",
        ])
        .await
        .unwrap();
    assert_ok(&drained, "drain");
    assert!(
        drained.stdout.contains("evicting pod kube-system/coredns-"),
        "{}",
        drained.stdout
    );
    assert!(drained.stdout.ends_with(&format!("node/{cp} drained\n")));
    let pods: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl(&["get", "pods", "-A", "-o", "json"])
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(pods_on(&pods, &cp).is_empty());
    assert_eq!(pods_on(&pods, &worker).len(), 2);
    let node: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl(&["get", "node", &cp, "-o", "json"])
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    assert_ok(
        &cluster.kubectl(&["uncordon", &cp]).await.unwrap(),
        "uncordon",
    );

    // The mirror is reachable from inside the nodes and from the host, and can be slowed down.
    let sha_url = format!(
        "{}/v1.32.3/bin/linux/amd64/kubelet.sha256",
        cluster.mirror().network_url
    );
    let inside = cluster
        .exec(&worker, &["curl", "-fsS", &sha_url])
        .await
        .unwrap();
    assert_ok(&inside, "curl in node");
    cluster
        .set_mirror_delay(Duration::from_millis(1200))
        .await
        .unwrap();
    let start = Instant::now();
    let from_host = http_get(
        &cluster.mirror().host_url,
        "/v1.32.3/bin/linux/amd64/kubelet.sha256",
    )
    .await;
    assert!(start.elapsed() >= Duration::from_millis(1200));
    assert!(from_host.starts_with("HTTP/1.1 200 OK"), "{from_host}");
    assert!(from_host.ends_with(inside.stdout.as_str()));
    cluster.set_mirror_delay(Duration::ZERO).await.unwrap();

    // docker restart: systemd boots again and the kubelet comes back Ready.
    cluster.restart_node(&worker).await.unwrap();
    let active = cluster
        .exec(&worker, &["systemctl", "is-active", "kubelet"])
        .await
        .unwrap();
    assert_eq!(active.stdout.trim(), "active");
    let waited = cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("node/{worker}"),
            "--timeout=30s",
        ])
        .await
        .unwrap();
    assert_ok(&waited, "kubectl wait");
    cluster
        .wait_nodes_ready(&Version::parse("v1.31.4").unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    cluster.down().await.unwrap();
}

/// The mirror's padded artifacts have the real sizes, still run as the tool and version they
/// were published as, match their `.sha256`, and every byte served is in the mirror's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_size_artifacts_run_and_the_mirror_counts_what_it_served() {
    let options = Options {
        artifact_sizes: ArtifactSizes::REAL,
    };
    let cluster = SimCluster::up_with(&unique("simt-p"), 1, 0, "v1.31.4", options)
        .await
        .unwrap();
    let node = cluster.control_plane().name.clone();
    let served_before = cluster.mirror_served().await.unwrap().len();
    let url = format!(
        "{}/v1.32.3/bin/linux/amd64/kubelet",
        cluster.mirror().network_url
    );
    let path = "/var/tmp/kubelet"; // /tmp is a noexec tmpfs, as in kind
    assert_ok(
        &cluster
            .exec(&node, &["curl", "-fsS", "-o", path, &url])
            .await
            .unwrap(),
        "curl kubelet",
    );
    let published = cluster
        .exec(&node, &["curl", "-fsS", &format!("{url}.sha256")])
        .await
        .unwrap()
        .stdout;
    let size = cluster
        .exec(&node, &["stat", "-c", "%s", path])
        .await
        .unwrap()
        .stdout;
    assert_eq!(size.trim(), "80000000");
    let sum = cluster
        .exec(&node, &["sha256sum", path])
        .await
        .unwrap()
        .stdout;
    assert_eq!(sum.split_whitespace().next(), Some(published.trim()));
    assert_ok(
        &cluster.exec(&node, &["chmod", "0755", path]).await.unwrap(),
        "chmod",
    );
    let version = cluster.exec(&node, &[path, "--version"]).await.unwrap();
    assert_eq!(version.stdout, "Kubernetes v1.32.3\n");

    let served = cluster.mirror_served().await.unwrap();
    let new: Vec<(&str, u16, u64)> = served[served_before..]
        .iter()
        .map(|s| (s.target.as_str(), s.status, s.body_bytes))
        .collect();
    assert_eq!(
        new,
        [
            ("/release/v1.32.3/bin/linux/amd64/kubelet", 200, 80_000_000),
            ("/release/v1.32.3/bin/linux/amd64/kubelet.sha256", 200, 64),
        ]
    );
    cluster.down().await.unwrap();
}

async fn http_get(base: &str, path: &str) -> String {
    let rest = base.strip_prefix("http://").unwrap();
    let (addr, prefix) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /{prefix}{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Downloads `tool` at `version` from the mirror inside the node, verifies its .sha256 and
/// installs it by an atomic rename, as an upgrader would.
async fn stage(cluster: &SimCluster, node: &str, tool: &str, version: &str, dest: &str) {
    let url = format!(
        "{}/{version}/bin/linux/amd64/{tool}",
        cluster.mirror().network_url
    );
    let part = format!("/var/tmp/{tool}-{version}"); // /tmp is a noexec tmpfs, as in kind
    assert_ok(
        &cluster
            .exec(node, &["curl", "-fsSL", "-o", &part, &url])
            .await
            .unwrap(),
        "curl binary",
    );
    let want = cluster
        .exec(node, &["curl", "-fsSL", &format!("{url}.sha256")])
        .await
        .unwrap()
        .stdout;
    let got = cluster
        .exec(node, &["sha256sum", &part])
        .await
        .unwrap()
        .stdout;
    assert_eq!(
        got.split_whitespace().next().unwrap(),
        want.trim(),
        "sha256 of {tool} {version}"
    );
    assert_ok(
        &cluster.exec(node, &["chmod", "0755", &part]).await.unwrap(),
        "chmod",
    );
    assert_ok(
        &cluster
            .exec(node, &["mv", "-f", &part, dest])
            .await
            .unwrap(),
        "install",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_upgrade_through_the_stand_ins_with_skew_refusals_and_a_fault() {
    let cluster = SimCluster::up(&unique("simt-b"), 1, 1, "v1.30.6")
        .await
        .unwrap();
    let cp = cluster.control_plane().name.clone();
    let worker = cluster.nodes()[1].name.clone();
    let ignore = "--ignore-preflight-errors=SystemVerification,Swap,FileContent--proc-sys-net-bridge-bridge-nf-call-iptables";

    // A kubelet newer than the API server refuses to start.
    stage(
        &cluster,
        &worker,
        "kubelet",
        "v1.31.4",
        "/usr/local/bin/kubelet-new",
    )
    .await;
    let newer = cluster
        .exec(
            &worker,
            &[
                "timeout",
                "10",
                "/usr/local/bin/kubelet-new",
                "--kubeconfig=/etc/kubernetes/kubelet.conf",
                "--config=/var/lib/kubelet/config.yaml",
            ],
        )
        .await
        .unwrap();
    assert_eq!(newer.exit_code, 1, "{newer:?}");
    assert!(
        newer
            .stderr
            .contains("newer than the oldest kube-apiserver v1.30.6"),
        "{}",
        newer.stderr
    );

    // Skipping a minor is refused, and so is a kubeadm older than the requested version.
    stage(
        &cluster,
        &cp,
        "kubeadm",
        "v1.32.3",
        "/usr/local/bin/kubeadm-1.32",
    )
    .await;
    let skip = cluster
        .exec(
            &cp,
            &[
                "/usr/local/bin/kubeadm-1.32",
                "upgrade",
                "apply",
                "v1.32.3",
                "--yes",
                ignore,
            ],
        )
        .await
        .unwrap();
    assert_eq!(skip.exit_code, 1);
    assert!(
        skip.stderr
            .contains("kubeadm can upgrade only 1 minor version at a time"),
        "{}",
        skip.stderr
    );
    let old = cluster
        .exec(&cp, &["kubeadm", "upgrade", "apply", "v1.31.4", "--yes"])
        .await
        .unwrap();
    assert!(
        old.stderr
            .contains("is higher than the kubeadm version \"v1.30.6\""),
        "{}",
        old.stderr
    );
    assert_eq!(
        cluster.cluster_version().await.unwrap().to_string(),
        "v1.30.6"
    );

    // The upgrade by hand: kubeadm, apply on the control plane.
    stage(&cluster, &cp, "kubeadm", "v1.31.4", "/usr/bin/kubeadm").await;
    assert_eq!(
        cluster
            .exec(&cp, &["kubeadm", "version", "-o", "short"])
            .await
            .unwrap()
            .stdout,
        "v1.31.4\n"
    );
    let apply = cluster
        .exec(
            &cp,
            &[
                "kubeadm", "upgrade", "apply", "v1.31.4", "--yes", ignore, "--v=5",
            ],
        )
        .await
        .unwrap();
    assert_ok(&apply, "kubeadm upgrade apply");
    assert!(
        apply
            .stdout
            .contains("SUCCESS! Your cluster was upgraded to \"v1.31.4\"")
    );
    let manifest = cluster
        .exec(
            &cp,
            &["cat", "/etc/kubernetes/manifests/kube-apiserver.yaml"],
        )
        .await
        .unwrap()
        .stdout;
    assert!(
        manifest.contains("image: registry.k8s.io/kube-apiserver:v1.31.4"),
        "{manifest}"
    );
    assert_eq!(
        cluster.cluster_version().await.unwrap().to_string(),
        "v1.31.4"
    );

    // The worker: an injected fault fails `kubeadm upgrade node` once, then it passes.
    stage(&cluster, &worker, "kubeadm", "v1.31.4", "/usr/bin/kubeadm").await;
    let fault = Fault {
        fail_times: 1,
        message: Some("injected: etcd is unhappy".into()),
        exit_code: Some(3),
        ..Fault::default()
    };
    cluster
        .inject_fault(&worker, "kubeadm-upgrade-node", &fault)
        .await
        .unwrap();
    let first = cluster
        .exec(&worker, &["kubeadm", "upgrade", "node", ignore])
        .await
        .unwrap();
    assert_eq!(first.exit_code, 3);
    assert_eq!(first.stderr.trim(), "injected: etcd is unhappy");
    let second = cluster
        .exec(&worker, &["kubeadm", "upgrade", "node", ignore])
        .await
        .unwrap();
    assert_ok(&second, "kubeadm upgrade node after the fault");
    assert!(
        second
            .stdout
            .contains("Skipping prepull. Not a control plane node.")
    );
    cluster.clear_faults().await.unwrap();

    // Drain, swap kubelet and kubectl, restart the kubelet, uncordon: the Nodes report v1.31.4.
    for node in [&cp, &worker] {
        assert_ok(
            &cluster
                .kubectl(&[
                    "drain",
                    node,
                    "--ignore-daemonsets",
                    "--delete-emptydir-data",
                    "--force",
                ])
                .await
                .unwrap(),
            "drain",
        );
        stage(&cluster, node, "kubelet", "v1.31.4", "/usr/bin/kubelet").await;
        stage(&cluster, node, "kubectl", "v1.31.4", "/usr/bin/kubectl").await;
        assert_ok(
            &cluster
                .exec(node, &["systemctl", "daemon-reload"])
                .await
                .unwrap(),
            "daemon-reload",
        );
        assert_ok(
            &cluster
                .exec(node, &["systemctl", "restart", "kubelet"])
                .await
                .unwrap(),
            "restart kubelet",
        );
        assert_eq!(
            cluster
                .exec(node, &["kubelet", "--version"])
                .await
                .unwrap()
                .stdout,
            "Kubernetes v1.31.4\n"
        );
        assert_ok(
            &cluster.kubectl(&["uncordon", node]).await.unwrap(),
            "uncordon",
        );
    }
    cluster
        .wait_nodes_ready(&Version::parse("v1.31.4").unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    let client: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl(&["version", "--client", "-o", "json"])
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(client["clientVersion"]["gitVersion"], "v1.31.4");
    cluster.down().await.unwrap();
}
