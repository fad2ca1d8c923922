//! The standalone CLI (`capd-inplace upgrade`, `stage` and `status`) as a user runs it, against a
//! simulated CAPD cluster.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;

use capd_inplace_e2e::sim::SimCluster;
use serde_json::Value;

fn capd_inplace(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_capd-inplace"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn status(cluster: &str) -> Vec<Value> {
    let out = capd_inplace(&["status", "--cluster", cluster, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_a_cluster_from_the_command_line() {
    let cluster = SimCluster::up("cli", 1, 2, "v1.31.4").await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let mirror = cluster.mirror().host_url.clone();

    let before = status("cli");
    assert_eq!(before.len(), 3);
    assert_eq!(before[0]["node"], "cli-cp-0");
    assert_eq!(before[0]["role"], "control-plane");
    assert!(
        before
            .iter()
            .all(|n| n["kubeletVersion"] == "v1.31.4" && n["upgrade"].is_null())
    );

    // Bad input changes nothing and says why.
    let bad = capd_inplace(&["upgrade", "--cluster", "cli", "--to", "v1.32"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--to must be a vMAJOR.MINOR.PATCH version"),
        "{}",
        text(&bad.stderr)
    );
    // Flags are checked before any node is touched: an artifact URL the nodes would fetch
    // themselves is checked as any other (and never echoes a password), the drain timeout is
    // bounded as the drainTimeout setting is.
    for (args, refusal) in [
        (
            &["--fetch-in-node", "--artifact-url", "file:///srv/release"][..],
            "--fetch-in-node needs an http(s) --artifact-url",
        ),
        (
            &[
                "--fetch-in-node",
                "--artifact-url",
                "https://user:secret@mirror/release",
            ][..],
            "carries credentials",
        ),
        (
            &[
                "--fetch-in-node",
                "--artifact-url",
                "https://mirror/release?x=1",
            ][..],
            "has a query or fragment",
        ),
        (&["--drain-timeout-seconds", "0"][..], "not in 1..=7200"),
        (
            &["--drain-timeout-seconds", "18446744073709551615"][..],
            "not in 1..=7200",
        ),
    ] {
        let mut command = vec!["upgrade", "--cluster", "cli", "--to", "v1.32.3"];
        command.extend(args);
        let refused = capd_inplace(&command);
        let stderr = text(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}");
        assert!(stderr.contains(refusal), "{args:?}: {stderr}");
        assert!(!stderr.contains("secret"), "{args:?}: {stderr}");
    }
    let skip = capd_inplace(&[
        "upgrade",
        "--cluster",
        "cli",
        "--to",
        "v1.33.2",
        "--artifact-url",
        &mirror,
        "--artifact-cache-dir",
        cache_dir,
    ]);
    assert!(!skip.status.success());
    assert!(
        text(&skip.stdout).contains("skips a minor version"),
        "{}",
        text(&skip.stdout)
    );
    assert!(
        status("cli")
            .iter()
            .all(|n| n["kubeletVersion"] == "v1.31.4" && n["upgrade"].is_null())
    );

    let dry = capd_inplace(&[
        "upgrade",
        "--cluster",
        "cli",
        "--to",
        "v1.32.3",
        "--dry-run",
        "--output",
        "json",
        "--artifact-url",
        &mirror,
        "--artifact-cache-dir",
        cache_dir,
    ]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let plan: Vec<Value> = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan[0]["outcome"]["result"], "wouldUpgrade");
    assert_eq!(plan[0]["outcome"]["mode"], "kubeadm upgrade apply");
    assert_eq!(plan[0]["outcome"]["from"], "v1.31.4");
    assert_eq!(plan[1]["outcome"]["result"], "wouldUpgrade");
    assert_eq!(
        plan[1]["outcome"]["mode"],
        "kubeadm upgrade node after the control plane"
    );
    assert!(
        status("cli").iter().all(|n| n["upgrade"].is_null()),
        "a dry run changes nothing"
    );

    // Staging ahead of time: every node gets the verified binaries and nothing that runs changes.
    let stage = |version: &str| {
        capd_inplace(&[
            "stage",
            "--cluster",
            "cli",
            "--to",
            version,
            "--artifact-url",
            &mirror,
            "--artifact-cache-dir",
            cache_dir,
        ])
    };
    let missing = stage("v1.32.99");
    assert!(!missing.status.success());
    assert_eq!(
        text(&missing.stdout).matches("FAILED").count(),
        3,
        "{}",
        text(&missing.stdout)
    );
    let staged = stage("v1.32.3");
    assert!(staged.status.success(), "{}", text(&staged.stderr));
    assert_eq!(text(&staged.stdout).matches("staged").count(), 3);
    assert!(
        status("cli")
            .iter()
            .all(|n| n["kubeletVersion"] == "v1.31.4" && n["upgrade"].is_null()),
        "staging changes nothing that runs"
    );
    let identity = |node: &str| {
        let cluster = &cluster;
        let node = node.to_string();
        async move {
            let out = cluster
                .exec_ok(
                    &node,
                    &[
                        "sh",
                        "-c",
                        "ls /var/lib/capd-inplace; cd /var/lib/capd-inplace/v1.32.3/bin && stat -c '%n %i' kubeadm kubelet kubectl && sha256sum kubeadm kubelet kubectl",
                    ],
                )
                .await
                .unwrap();
            out.stdout
        }
    };
    let staged_before = identity("cli-md-0-1").await;
    assert!(
        !staged_before.contains("v1.32.99"),
        "a failed stage leaves nothing behind: {staged_before}"
    );
    assert!(
        !staged_before.contains("lease"),
        "stage released the node's lease: {staged_before}"
    );
    let network_mirror = cluster.mirror().network_url.clone();
    for binary in ["kubeadm", "kubelet", "kubectl"] {
        let url = format!("{network_mirror}/v1.32.3/bin/linux/amd64/{binary}.sha256");
        let published = cluster
            .exec_ok("cli-md-0-1", &["curl", "-fsS", url.as_str()])
            .await
            .unwrap()
            .stdout;
        assert!(
            staged_before.contains(&format!("{}  {binary}", published.trim())),
            "{binary}: {staged_before}"
        );
    }

    // Damage a cached blob's file status cannot show (bit rot), simulated: the blob rewritten
    // with the same size and its verification record forged to match. The node's hash of the
    // upload catches it; the next run hashes the blobs again and fetches the damaged one anew.
    let kubelet_digest = cluster
        .exec_ok(
            "cli-md-0-1",
            &[
                "curl",
                "-fsS",
                &format!("{network_mirror}/v1.32.3/bin/linux/amd64/kubelet.sha256"),
            ],
        )
        .await
        .unwrap()
        .stdout
        .trim()
        .to_string();
    // One cache directory per artifact source; this run used one source.
    let source_cache = std::fs::read_dir(cache_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|dir| dir.join("sha256").join(&kubelet_digest).exists())
        .unwrap();
    let blob = source_cache.join("sha256").join(&kubelet_digest);
    let size = std::fs::metadata(&blob).unwrap().len() as usize;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, vec![0u8; size]).unwrap();
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o555)).unwrap();
    let forged = std::fs::metadata(&blob).unwrap();
    std::fs::write(
        source_cache.join("verified").join(&kubelet_digest),
        format!(
            "{} {} {} {} {}\n",
            forged.size(),
            forged.ino(),
            forged.mode(),
            i128::from(forged.ctime()) * 1_000_000_000 + i128::from(forged.ctime_nsec()),
            i128::from(forged.mtime()) * 1_000_000_000 + i128::from(forged.mtime_nsec()),
        ),
    )
    .unwrap();
    cluster
        .exec_ok(
            "cli-md-0-0",
            &["rm", "-rf", "/var/lib/capd-inplace/v1.32.3"],
        )
        .await
        .unwrap();
    let damaged = stage("v1.32.3");
    assert!(!damaged.status.success());
    let damaged = text(&damaged.stdout);
    assert_eq!(damaged.matches("FAILED").count(), 1, "{damaged}");
    assert!(damaged.contains("cli-md-0-0"), "{damaged}");
    let healed = stage("v1.32.3");
    assert!(healed.status.success(), "{}", text(&healed.stderr));
    let healed_bytes = std::fs::read(&blob).unwrap();
    assert_eq!(healed_bytes.len(), size);
    assert_ne!(healed_bytes, vec![0u8; size]);
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&healed_bytes)),
        kubelet_digest,
        "the damaged blob was fetched again"
    );

    let run = capd_inplace(&[
        "upgrade",
        "--cluster",
        "cli",
        "--to",
        "v1.32.3",
        "--workers-parallel",
        "2",
        "--artifact-url",
        &mirror,
        "--artifact-cache-dir",
        cache_dir,
    ]);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{stdout}\n{stderr}");
    // Not a terminal: one plain progress line per step and node.
    for node in ["cli-cp-0", "cli-md-0-0", "cli-md-0-1"] {
        assert!(
            stderr.contains(&format!("{node}: step 4/10: kubeadm upgrade")),
            "{stderr}"
        );
        assert!(stderr.contains(&format!("{node}: done")), "{stderr}");
    }
    assert!(stdout.starts_with("NODE"), "{stdout}");
    assert_eq!(stdout.matches("upgraded").count(), 3, "{stdout}");
    assert_eq!(
        identity("cli-md-0-1").await,
        staged_before,
        "the upgrade used the staged files instead of uploading them again"
    );

    for node in status("cli") {
        assert_eq!(node["kubeletVersion"], "v1.32.3", "{node}");
        assert_eq!(node["kubeadmVersion"], "v1.32.3", "{node}");
        assert_eq!(node["ready"], true, "{node}");
        assert_eq!(node["cordoned"], false, "{node}");
        assert_eq!(node["upgrade"]["target"], "v1.32.3", "{node}");
        assert_eq!(node["upgrade"]["step"], "done", "{node}");
    }
    let table = capd_inplace(&["status", "--cluster", "cli"]);
    assert!(text(&table.stdout).starts_with("NODE"));

    // Staging the next version makes its directory, without a journal: status still shows the
    // upgrade that ran.
    let next = stage("v1.33.2");
    assert!(next.status.success(), "{}", text(&next.stderr));
    for node in status("cli") {
        assert_eq!(node["upgrade"]["target"], "v1.32.3", "{node}");
        assert_eq!(node["upgrade"]["step"], "done", "{node}");
    }

    // Running it again resumes nothing and changes nothing.
    let again = capd_inplace(&[
        "upgrade",
        "--cluster",
        "cli",
        "--to",
        "v1.32.3",
        "--artifact-url",
        &mirror,
        "--artifact-cache-dir",
        cache_dir,
    ]);
    assert!(again.status.success());
    assert_eq!(
        text(&again.stdout).matches("already at target").count(),
        3,
        "{}",
        text(&again.stdout)
    );

    let unknown = capd_inplace(&["status", "--cluster", "no-such-cluster"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("io.x-k8s.kind.cluster=no-such-cluster"));
    cluster.down().await.unwrap();
}
