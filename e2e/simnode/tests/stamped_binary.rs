//! The real executable: stamped copies know their version and tool, unstamped ones refuse, and
//! faults from the state directory apply. (Also makes `cargo test --workspace` build
//! `target/<profile>/simnode`, which the e2e launcher uses.)

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use capd_inplace_simnode::stamp::trailer;
use capd_inplace_simnode::version::Version;

fn publish(dir: &Path, name: &str, version: &str, tool: Option<&str>) -> std::path::PathBuf {
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_simnode")).unwrap();
    if let Some(tool) = tool {
        // Padding between the binary and the trailer, as in the mirror's padded artifacts.
        bytes.extend([0u8; 64]);
        bytes.extend(trailer(&Version::parse(version).unwrap(), Some(tool)));
    }
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

/// Runs `bin`. The tests run in parallel threads, and a child forked by one can still hold the
/// descriptor another used to write its binary, until the child's own exec closes it: running that
/// binary meanwhile fails with "text file busy", so that is tried again.
fn run(bin: &Path, args: &[&str], state: &Path) -> std::process::Output {
    let mut attempts = 0;
    loop {
        let output = Command::new(bin)
            .args(args)
            .env("SIMNODE_STATE_DIR", state)
            .env("SIMNODE_NODE_NAME", "n0")
            .env("SIMNODE_NO_SYSTEMD", "1")
            .env_remove("SIMNODE_VERSION")
            .output();
        match output {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            output => return output.unwrap(),
        }
    }
}

#[test]
fn stamped_copies_know_their_version_and_tool() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let kubeadm = publish(dir.path(), "kubeadm", "v1.31.4", Some("kubeadm"));
    let out = run(&kubeadm, &["version", "-o", "short"], &state);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1.31.4\n");
    // Renamed, a kubelet stays a kubelet.
    let renamed = publish(dir.path(), "kubelet-1.32", "v1.32.3", Some("kubelet"));
    let out = run(&renamed, &["--version"], &state);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Kubernetes v1.32.3\n");
    // Unstamped and called kubectl: no version to report.
    let plain = publish(dir.path(), "kubectl", "", None);
    let out = run(&plain, &["version", "--client"], &state);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no version stamp"));
}

#[test]
fn an_injected_fault_fails_once_then_passes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("faults/n0")).unwrap();
    std::fs::write(
        state.join("faults/n0/kubeadm-version.json"),
        r#"{"fail_times":1,"message":"boom","exit_code":7}"#,
    )
    .unwrap();
    let kubeadm = publish(dir.path(), "kubeadm", "v1.30.6", Some("kubeadm"));
    let first = run(&kubeadm, &["version", "-o", "short"], &state);
    assert_eq!(first.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&first.stderr), "boom\n");
    let second = run(&kubeadm, &["version", "-o", "short"], &state);
    assert_eq!(second.status.code(), Some(0));
}
