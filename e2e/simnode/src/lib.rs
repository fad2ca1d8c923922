//! Stand-in `kubeadm`, `kubelet` and `kubectl` for the simulated kind node, a declared test
//! double (see README.md for the fidelity contract), plus the artifact mirror server.
//!
//! One binary serves every tool: it reads its version (and tool) from a trailer appended to its
//! own file ([`stamp`]) and dispatches on that tool or on `argv[0]`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod flags;
pub mod jsonpath;
pub mod kubeadm;
pub mod kubectl;
pub mod kubelet;
pub mod mirror;
pub mod stamp;
pub mod state;
pub mod version;

use std::path::{Path, PathBuf};

use state::State;
use version::Version;

/// A failed run of a stand-in: what it prints on stderr and its exit code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<state::Error> for Failure {
    fn from(e: state::Error) -> Self {
        Failure::new(format!("error: {e}"))
    }
}

pub type Outcome = Result<(), Failure>;

/// Everything a stand-in needs to know about where it runs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The version this binary is stamped with.
    pub version: Version,
    /// The node's filesystem root: `/` in a node, a temp dir in unit tests (`SIMNODE_ROOT`).
    pub root: PathBuf,
    pub state: State,
    /// The node name, which is the container hostname (`SIMNODE_NODE_NAME` overrides).
    pub node: String,
    /// Whether to drive systemd (`systemctl restart kubelet`) and wait for the kubelet;
    /// `SIMNODE_NO_SYSTEMD=1` turns it off for unit tests.
    pub systemd: bool,
}

impl Ctx {
    /// Builds the context from the environment of a node.
    pub fn from_env(version: Version) -> Self {
        let root = std::env::var_os("SIMNODE_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/".into());
        let state_dir = std::env::var_os("SIMNODE_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| state::DEFAULT_DIR.into());
        let node = std::env::var("SIMNODE_NODE_NAME").ok().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        });
        let systemd = std::env::var("SIMNODE_NO_SYSTEMD")
            .map(|v| v != "1")
            .unwrap_or(true);
        Ctx {
            version,
            root,
            state: State::new(state_dir),
            node,
            systemd,
        }
    }

    /// Maps an absolute in-node path under [`Ctx::root`].
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn exists(&self, abs: &str) -> bool {
        self.path(abs).exists()
    }

    pub fn read(&self, abs: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.path(abs))
    }

    /// Writes a file the way kubeadm does: create parents, replace atomically.
    pub fn write(&self, abs: &str, content: &str) -> Outcome {
        write_atomic(&self.path(abs), content.as_bytes())
            .map_err(|e| Failure::new(format!("failed to write {abs}: {e}")))
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("simnode-tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// A fake but stable 40-hex-digit commit for a version, for `gitCommit` fields.
pub fn git_commit(version: &Version) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::new();
    for round in 0..3u64 {
        for b in version.to_string().bytes().chain(round.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out.truncate(40);
    out
}

/// The `version.Info` every Kubernetes binary reports.
pub fn version_info(version: &Version) -> serde_json::Value {
    serde_json::json!({
        "major": version.major.to_string(),
        "minor": version.minor.to_string(),
        "gitVersion": version.to_string(),
        "gitCommit": git_commit(version),
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}
