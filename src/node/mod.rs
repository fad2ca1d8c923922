//! Access to CAPD and kind node containers through the Docker Engine API.
//!
//! A node is something you run a command on ([`NodeExec`]), in the spirit of kind's
//! `nodes.Node`. [`DockerNode`] implements it with bollard. Every node is reached only after
//! [`Docker::locate`] checked that the container carries the cluster's label, and every later
//! call addresses the container by the id seen at that check, so a container that was replaced
//! under the same name is reported as gone instead of being touched.
//!
//! Commands are argv, never shell strings. Each one is bounded twice: by coreutils `timeout`
//! inside the node (the Engine API cannot stop an exec) and by a client-side deadline, after
//! which every process the exec started is killed.

mod archive;
mod batch;
mod command;
mod docker;
mod provider_id;

use std::fmt;
use std::time::Duration;

pub use archive::{FileSource, UploadFile};
pub use batch::Batch;
pub use command::{Command, ExecOutput};
pub use docker::{Docker, DockerNode};
pub use provider_id::{ProviderId, validate_container_name};

/// The label CAPD and kind put on every container of a cluster, valued with the cluster name.
pub const CLUSTER_LABEL: &str = "io.x-k8s.kind.cluster";
/// The label that tells a node's role (`control-plane`, `worker`) from the load balancer.
pub const ROLE_LABEL: &str = "io.x-k8s.kind.role";

/// Failures of the node access layer. Messages name the container and what to do; raw Docker
/// text stays in the `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid providerID {provider_id:?}: {reason}; expected docker:////<container-name>")]
    InvalidProviderId {
        provider_id: String,
        reason: &'static str,
    },
    #[error("invalid container name {name:?}: {reason}")]
    InvalidContainerName { name: String, reason: &'static str },
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidClusterName { name: String, reason: &'static str },
    #[error(
        "cannot reach the Docker Engine; check that its socket is mounted and DOCKER_HOST is right"
    )]
    Connect {
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "container {container} does not exist; the node is gone (was the Machine deleted or replaced?)"
    )]
    NotFound { container: String },
    #[error(
        "container {container} is not part of cluster {cluster} (label {CLUSTER_LABEL} is {}); refusing to touch it",
        found.as_deref().map_or_else(|| "missing".to_string(), |v| format!("{v:?}"))
    )]
    NotInCluster {
        container: String,
        cluster: String,
        found: Option<String>,
    },
    #[error(
        "container {container} is not a Kubernetes node (label {ROLE_LABEL} is {}); refusing to touch it",
        role.as_deref().map_or_else(|| "missing".to_string(), |v| format!("{v:?}"))
    )]
    NotANode {
        container: String,
        role: Option<String>,
    },
    #[error("container {container} is stopped ({status}); start it and retry")]
    Stopped { container: String, status: String },
    #[error(
        "container {container} has no network with a gateway, through which it would reach this \
         host; give an address of this host it reaches, or stage by upload"
    )]
    NoGateway { container: String },
    #[error("container {container} is paused; unpause it and retry")]
    Paused { container: String },
    #[error("container {container} is restarting; wait until it runs and retry")]
    Restarting { container: String },
    #[error("invalid command {argv:?}: {reason}")]
    InvalidCommand {
        argv: Vec<String>,
        reason: &'static str,
    },
    #[error(
        "`{}` failed on container {container} with exit code {exit_code}",
        quote(argv)
    )]
    Exec {
        container: String,
        argv: Vec<String>,
        exit_code: i64,
        /// The last bytes of the combined stdout and stderr, for logs and diagnosis.
        output_tail: String,
    },
    #[error("`{}` did not finish on container {container} within {}s and was killed", quote(argv), after.as_secs())]
    Timeout {
        container: String,
        argv: Vec<String>,
        after: Duration,
    },
    #[error("the Docker Engine did not answer {operation} for container {container} within {}s", after.as_secs())]
    DockerTimeout {
        container: String,
        operation: &'static str,
        after: Duration,
    },
    #[error("Docker Engine request {operation} failed for container {container}")]
    Docker {
        container: String,
        operation: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("invalid file name {name:?} for upload: {reason}")]
    InvalidFileName { name: String, reason: &'static str },
    #[error("cannot read local file {} for upload to container {container}", path.display())]
    LocalFile {
        container: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file {path} does not exist on container {container}")]
    FileNotFound { container: String, path: String },
    #[error("{path} on container {container} is not a regular file")]
    NotAFile { container: String, path: String },
    #[error("file {path} on container {container} is larger than the {limit} byte limit")]
    FileTooLarge {
        container: String,
        path: String,
        limit: u64,
    },
    #[error("the batched commands on container {container} answered malformed output: {reason}")]
    Batch { container: String, reason: String },
    #[error("the archive of {path} from container {container} is malformed")]
    Archive {
        container: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Renders an argv for messages: words joined by spaces, quoted when they need it.
fn quote(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if is_plain(arg) {
                arg.clone()
            } else {
                format!("{arg:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A word that reads the same unquoted in a message: no spaces, quotes or shell syntax.
fn is_plain(arg: &str) -> bool {
    !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
}

/// A node's role, from the [`ROLE_LABEL`] label. Serialized as the label value.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ControlPlane,
    Worker,
}

impl Role {
    /// The role for a label value; `None` for the load balancer and anything unknown, which
    /// are not nodes.
    pub fn from_label(value: &str) -> Option<Role> {
        match value {
            "control-plane" => Some(Role::ControlPlane),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }

    pub fn as_label(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// What a container is doing right now, as far as the upgrader cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    Running,
    Paused,
    Restarting,
    /// Created, exited, dead or being removed; `status` is Docker's word for it.
    Stopped {
        status: String,
    },
    /// The container no longer exists, or was replaced by another one under the same name.
    Gone,
}

impl NodeState {
    pub fn is_running(&self) -> bool {
        matches!(self, NodeState::Running)
    }

    /// `Ok` when running, else the error that reports this state for `container`.
    pub fn ensure_running(&self, container: &str) -> Result<()> {
        let container = container.to_string();
        match self {
            NodeState::Running => Ok(()),
            NodeState::Paused => Err(Error::Paused { container }),
            NodeState::Restarting => Err(Error::Restarting { container }),
            NodeState::Stopped { status } => Err(Error::Stopped {
                container,
                status: status.clone(),
            }),
            NodeState::Gone => Err(Error::NotFound { container }),
        }
    }
}

/// A node: something you run commands on, upload files to and read files from.
///
/// Implemented by [`DockerNode`]; tests of the layers above use a fake.
pub trait NodeExec: Send + Sync {
    /// The container name, for messages.
    fn name(&self) -> &str;

    /// Runs `command` and returns its exit code and output, whatever the exit code. Errors are
    /// for what kept the command from completing: timeout, node not running, Docker failures.
    fn exec(&self, command: Command) -> impl Future<Output = Result<ExecOutput>> + Send;

    /// Writes `files` into the directory `dir`, creating missing directories (root, 0755).
    /// Existing files of the same name are replaced.
    fn upload(&self, dir: &str, files: Vec<UploadFile>) -> impl Future<Output = Result<()>> + Send;

    /// Reads the regular file at `path`, refusing files larger than `limit` bytes.
    fn read_file(&self, path: &str, limit: u64) -> impl Future<Output = Result<Vec<u8>>> + Send;

    /// Inspects the container again.
    fn state(&self) -> impl Future<Output = Result<NodeState>> + Send;

    /// Like [`exec`](NodeExec::exec), but a non-zero exit code becomes [`Error::Exec`].
    fn exec_checked(&self, command: Command) -> impl Future<Output = Result<ExecOutput>> + Send {
        async move {
            let output = self.exec(command).await?;
            if output.exit_code == 0 {
                Ok(output)
            } else {
                Err(output.into_error(self.name()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn role_from_label() {
        let cases = [
            ("control-plane", Some(Role::ControlPlane)),
            ("worker", Some(Role::Worker)),
            ("external-load-balancer", None),
            ("", None),
            ("Worker", None),
        ];
        for (label, want) in cases {
            assert_eq!(Role::from_label(label), want, "label {label:?}");
        }
        for role in [Role::ControlPlane, Role::Worker] {
            assert_eq!(Role::from_label(role.as_label()), Some(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_label()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
    }

    #[test]
    fn ensure_running_maps_each_state_to_its_error() {
        assert!(NodeState::Running.ensure_running("c").is_ok());
        assert!(matches!(
            NodeState::Paused.ensure_running("c"),
            Err(Error::Paused { .. })
        ));
        assert!(matches!(
            NodeState::Restarting.ensure_running("c"),
            Err(Error::Restarting { .. })
        ));
        assert!(matches!(
            NodeState::Stopped { status: "exited".into() }.ensure_running("c"),
            Err(Error::Stopped { status, .. }) if status == "exited"
        ));
        assert!(matches!(
            NodeState::Gone.ensure_running("c"),
            Err(Error::NotFound { container }) if container == "c"
        ));
    }

    #[test]
    fn messages_are_short_and_deterministic() {
        let exec = Error::Exec {
            container: "demo-md-0-abc".into(),
            argv: vec!["kubeadm".into(), "upgrade".into(), "node".into()],
            exit_code: 1,
            output_tail: "a long output\nthat must not be in the message".into(),
        };
        assert_eq!(
            exec.to_string(),
            "`kubeadm upgrade node` failed on container demo-md-0-abc with exit code 1"
        );
        let timeout = Error::Timeout {
            container: "c".into(),
            argv: vec!["sleep".into(), "a b".into()],
            after: Duration::from_secs(30),
        };
        assert_eq!(
            timeout.to_string(),
            "`sleep \"a b\"` did not finish on container c within 30s and was killed"
        );
        let missing = Error::NotInCluster {
            container: "c".into(),
            cluster: "demo".into(),
            found: None,
        };
        assert_eq!(
            missing.to_string(),
            "container c is not part of cluster demo (label io.x-k8s.kind.cluster is missing); refusing to touch it"
        );
        let other = Error::NotInCluster {
            container: "c".into(),
            cluster: "demo".into(),
            found: Some("prod".into()),
        };
        assert!(other.to_string().contains("is \"prod\""));
    }
}
