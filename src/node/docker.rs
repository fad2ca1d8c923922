//! The Docker Engine client and [`DockerNode`], the [`NodeExec`] of a CAPD node container.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{
    DownloadFromContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::{Instrument, debug, info_span, warn};

use super::archive::{self, ARCHIVE_OVERHEAD, SingleFile};
use super::command::{
    Command, ERROR_TAIL, EXEC_MARKER_VAR, ExecOutput, TailBuffer, find_marked_argv,
    parse_marked_pids, timed_out_in_node,
};
use super::provider_id::validate_cluster_name;
use super::{
    CLUSTER_LABEL, Error, NodeExec, NodeState, ROLE_LABEL, Result, Role, UploadFile,
    validate_container_name,
};

/// Bound on one small Engine call (inspect, list, exec create and start).
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// bollard's own timeout applies to every request, uploads included; ours are tighter and per
/// call, so bollard's is only a backstop.
const ENGINE_BACKSTOP: Duration = Duration::from_secs(3600);
/// Transfers are bounded by a fixed allowance plus one second per MiB, that is, they fail when
/// slower than 1 MiB/s, which even twenty parallel uploads on a loaded machine beat by far.
const TRANSFER_BASE: Duration = Duration::from_secs(60);
const TRANSFER_BYTES_PER_SECOND: u64 = 1024 * 1024;
/// How long the client-side kill of a runaway exec may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the Engine to report an exec's exit code.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// The Docker Engine, reached through its API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Docker {
    client: bollard::Docker,
}

impl Docker {
    /// Connects as `DOCKER_HOST` says (default: the local unix socket) and negotiates the API
    /// version with the Engine.
    pub async fn connect() -> Result<Docker> {
        let client = bollard::Docker::connect_with_defaults()
            .map_err(|source| Error::Connect { source })?
            .with_timeout(ENGINE_BACKSTOP);
        let client = tokio::time::timeout(API_TIMEOUT, client.negotiate_version())
            .await
            .map_err(|_| Error::Connect {
                source: bollard::errors::Error::RequestTimeoutError,
            })?
            .map_err(|source| Error::Connect { source })?;
        Ok(Docker { client })
    }

    /// The underlying bollard client, for what this layer does not cover (tests create
    /// containers with it).
    pub fn client(&self) -> &bollard::Docker {
        &self.client
    }

    /// Finds `container`, checks that it is a running node of `cluster`, and returns it.
    ///
    /// Refuses a container whose `io.x-k8s.kind.cluster` label is missing or names another
    /// cluster, and one that is not a node (the load balancer, or no role label).
    pub async fn locate(&self, cluster: &str, container: &str) -> Result<DockerNode> {
        validate_cluster_name(cluster)?;
        validate_container_name(container)?;
        let inspected = inspect(&self.client, container, container)
            .await?
            .ok_or_else(|| Error::NotFound {
                container: container.to_string(),
            })?;
        // Docker also resolves a name as an id prefix; only the container of that exact name
        // is the Machine's.
        if inspected.name.as_deref().map(|n| n.trim_start_matches('/')) != Some(container) {
            return Err(Error::NotFound {
                container: container.to_string(),
            });
        }
        let labels = inspected
            .config
            .as_ref()
            .and_then(|config| config.labels.as_ref());
        let label = |key: &str| labels.and_then(|labels| labels.get(key)).cloned();
        let found_cluster = label(CLUSTER_LABEL);
        if found_cluster.as_deref() != Some(cluster) {
            return Err(Error::NotInCluster {
                container: container.to_string(),
                cluster: cluster.to_string(),
                found: found_cluster,
            });
        }
        let role_label = label(ROLE_LABEL);
        let role = role_label
            .as_deref()
            .and_then(Role::from_label)
            .ok_or_else(|| Error::NotANode {
                container: container.to_string(),
                role: role_label.clone(),
            })?;
        state_of(&inspected).ensure_running(container)?;
        let id = inspected.id.ok_or_else(|| Error::NotFound {
            container: container.to_string(),
        })?;
        Ok(DockerNode {
            client: self.client.clone(),
            id,
            name: container.to_string(),
            cluster: cluster.to_string(),
            role,
        })
    }

    /// The nodes of `cluster` by label, control planes first, then by name. Stopped containers
    /// are included (see [`NodeExec::state`]); the load balancer is not.
    pub async fn cluster_nodes(&self, cluster: &str) -> Result<Vec<DockerNode>> {
        validate_cluster_name(cluster)?;
        let filters = HashMap::from([("label", vec![format!("{CLUSTER_LABEL}={cluster}")])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = bounded(
            cluster,
            "list containers",
            API_TIMEOUT,
            self.client.list_containers(Some(options)),
        )
        .await?;
        let mut nodes: Vec<DockerNode> = containers
            .into_iter()
            .filter_map(|summary| {
                let labels = summary.labels?;
                // The filter already matched; checking again costs nothing and keeps this
                // function correct on its own.
                if labels.get(CLUSTER_LABEL).map(String::as_str) != Some(cluster) {
                    return None;
                }
                let role = Role::from_label(labels.get(ROLE_LABEL)?)?;
                let name = summary.names?.first()?.trim_start_matches('/').to_string();
                Some(DockerNode {
                    client: self.client.clone(),
                    id: summary.id?,
                    name,
                    cluster: cluster.to_string(),
                    role,
                })
            })
            .collect();
        nodes.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
        Ok(nodes)
    }
}

/// A node container of a cluster, addressed by the id seen when its labels were checked.
#[derive(Debug, Clone)]
pub struct DockerNode {
    client: bollard::Docker,
    id: String,
    name: String,
    cluster: String,
    role: Role,
}

impl DockerNode {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Creates, starts and follows one exec to its end, without the client-side deadline.
    async fn run_exec(&self, command: &Command, marker: &str) -> Result<ExecOutput> {
        let mut env: Vec<String> = command
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(marker.to_string());
        let config = CreateExecOptions {
            attach_stdin: Some(command.stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(env),
            cmd: Some(command.node_argv()),
            ..Default::default()
        };
        let created = match self
            .call(
                "exec create",
                API_TIMEOUT,
                self.client.create_exec(&self.id, config),
            )
            .await
        {
            Err(Error::Docker { source, .. }) if status_of(&source) == Some(409) => {
                // Docker refuses an exec in a container that is not running.
                self.state().await?.ensure_running(&self.name)?;
                return Err(self.docker_error("exec create", source));
            }
            other => other?,
        };
        let start = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let started = self
            .call(
                "exec start",
                API_TIMEOUT,
                self.client.start_exec(&created.id, Some(start)),
            )
            .await?;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            // Only a detached start returns Detached, and this one is attached.
            return Err(self.docker_error(
                "exec start",
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 500,
                    message: "exec started detached".into(),
                },
            ));
        };

        let feed_stdin = async {
            if let Some(stdin) = &command.stdin {
                // A command may exit without reading its input; that is its business.
                if let Err(error) = input.write_all(stdin).await {
                    debug!(%error, "stdin not fully written");
                }
                if let Err(error) = input.shutdown().await {
                    debug!(%error, "stdin not closed cleanly");
                }
            }
        };
        let collect_output = async {
            let mut stdout = TailBuffer::new(command.output_limit);
            let mut stderr = TailBuffer::new(command.output_limit);
            let mut tail = TailBuffer::new(ERROR_TAIL);
            while let Some(frame) = output.next().await {
                match frame.map_err(|source| self.docker_error("exec output", source))? {
                    LogOutput::StdOut { message } => {
                        stdout.push(&message);
                        tail.push(&message);
                    }
                    LogOutput::StdErr { message } => {
                        stderr.push(&message);
                        tail.push(&message);
                    }
                    LogOutput::StdIn { .. } | LogOutput::Console { .. } => {}
                }
            }
            Ok::<_, Error>((stdout, stderr, tail))
        };
        let ((), collected) = tokio::join!(feed_stdin, collect_output);
        let (stdout, stderr, tail) = collected?;

        // The output ends when the streams close; the exit code is known only once the Engine
        // has seen the process exit, which can lag a little.
        let exit_code = loop {
            let inspected = self
                .call(
                    "exec inspect",
                    API_TIMEOUT,
                    self.client.inspect_exec(&created.id),
                )
                .await?;
            match (inspected.running, inspected.exit_code) {
                (Some(false), Some(code)) => break code,
                _ => tokio::time::sleep(EXIT_POLL).await,
            }
        };
        Ok(ExecOutput {
            argv: command.argv.clone(),
            exit_code,
            truncated: stdout.dropped() || stderr.dropped(),
            stdout: stdout.into_vec(),
            stderr: stderr.into_vec(),
            output_tail: tail.into_vec(),
        })
    }

    /// Kills every process of the exec marked `marker`, from inside the node: the Engine cannot
    /// kill an exec, and the pid it reports is in the host's pid namespace, not the node's.
    /// Best effort; failures are logged.
    async fn kill_marked(&self, marker: &str) {
        let helper_marker = format!("{EXEC_MARKER_VAR}={}", unique_token());
        let find = Command::new(find_marked_argv(marker)).timeout(KILL_TIMEOUT);
        let found =
            match tokio::time::timeout(KILL_TIMEOUT, self.run_exec(&find, &helper_marker)).await {
                Ok(Ok(output)) => output,
                Ok(Err(error)) => {
                    warn!(%error, "could not list the processes of a timed-out exec");
                    return;
                }
                Err(_) => {
                    warn!("listing the processes of a timed-out exec timed out");
                    return;
                }
            };
        let pids = parse_marked_pids(&String::from_utf8_lossy(&found.stdout));
        if pids.is_empty() {
            debug!("no process of the timed-out exec is left");
            return;
        }
        let kill = Command::new(["kill", "-s", "KILL", "--"])
            .args(pids.iter().map(u32::to_string))
            .timeout(KILL_TIMEOUT);
        match tokio::time::timeout(KILL_TIMEOUT, self.run_exec(&kill, &helper_marker)).await {
            Ok(Ok(output)) if output.exit_code == 0 => debug!(?pids, "killed a timed-out exec"),
            // kill exits non-zero when some process ended by itself meanwhile.
            Ok(Ok(output)) => debug!(
                ?pids,
                exit_code = output.exit_code,
                "killed a timed-out exec, some processes were already gone"
            ),
            Ok(Err(error)) => warn!(%error, ?pids, "could not kill a timed-out exec"),
            Err(_) => warn!(?pids, "killing a timed-out exec timed out"),
        }
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        after: Duration,
        request: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T> {
        bounded(&self.name, operation, after, request).await
    }

    fn docker_error(&self, operation: &'static str, source: bollard::errors::Error) -> Error {
        classify(&self.name, operation, source)
    }

    /// On a 404 from the archive API: the container is gone, or else the path is missing.
    async fn missing(&self, path: &str) -> Error {
        match self.state().await {
            Ok(NodeState::Gone) => Error::NotFound {
                container: self.name.clone(),
            },
            Ok(_) => Error::FileNotFound {
                container: self.name.clone(),
                path: path.to_string(),
            },
            Err(error) => error,
        }
    }

    async fn download(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(path)
            .build();
        let mut stream = self.client.download_from_container(&self.id, Some(options));
        let too_large = || Error::FileTooLarge {
            container: self.name.clone(),
            path: path.to_string(),
            limit,
        };
        let mut archive = Vec::new();
        let mut header_checked = false;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) if status_of(&source) == Some(404) => {
                    return Err(self.missing(path).await);
                }
                Err(source) => return Err(self.docker_error("archive download", source)),
            };
            archive.extend_from_slice(&chunk);
            if !header_checked && archive.len() >= 512 {
                header_checked = true;
                match archive::early_verdict(&archive[..512], limit) {
                    Some(SingleFile::TooLarge) => return Err(too_large()),
                    Some(SingleFile::NotAFile) => return Err(self.not_a_file(path)),
                    _ => {}
                }
            }
            if archive.len() as u64 > limit.saturating_add(ARCHIVE_OVERHEAD) {
                return Err(too_large());
            }
        }
        Ok(archive)
    }

    fn not_a_file(&self, path: &str) -> Error {
        Error::NotAFile {
            container: self.name.clone(),
            path: path.to_string(),
        }
    }
}

impl NodeExec for DockerNode {
    fn name(&self) -> &str {
        &self.name
    }

    async fn exec(&self, command: Command) -> Result<ExecOutput> {
        command.validate()?;
        let span = info_span!("exec", container = %self.name, command = %command.argv[0]);
        async {
            debug!(argv = ?command.argv, timeout_s = command.timeout.as_secs_f64(), "exec");
            let marker = format!("{EXEC_MARKER_VAR}={}", unique_token());
            let started = Instant::now();
            let timeout_error = || Error::Timeout {
                container: self.name.clone(),
                argv: command.argv.clone(),
                after: command.timeout,
            };
            match tokio::time::timeout(command.client_deadline(), self.run_exec(&command, &marker))
                .await
            {
                Ok(Ok(output)) => {
                    let elapsed = started.elapsed();
                    debug!(
                        exit_code = output.exit_code,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "exec finished"
                    );
                    if timed_out_in_node(output.exit_code, elapsed, command.timeout) {
                        warn!(
                            elapsed_ms = elapsed.as_millis() as u64,
                            "exec timed out in the node"
                        );
                        // The in-node timeout kills the command's process group; a process that
                        // left the group may still run.
                        self.kill_marked(&marker).await;
                        return Err(timeout_error());
                    }
                    Ok(output)
                }
                Ok(Err(error)) => Err(error),
                Err(_) => {
                    warn!("exec outlived its deadline; killing its processes");
                    self.kill_marked(&marker).await;
                    Err(timeout_error())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn upload(&self, dir: &str, files: Vec<UploadFile>) -> Result<()> {
        archive::validate_node_path(dir)?;
        for file in &files {
            archive::validate_file_name(&file.name)?;
        }
        let span = info_span!("upload", container = %self.name, dir, files = files.len());
        async {
            let (container, target) = (self.name.clone(), dir.to_string());
            let prepared =
                tokio::task::spawn_blocking(move || archive::prepare(&container, &target, files))
                    .await
                    .map_err(|join| self.archive_error(dir, std::io::Error::other(join)))??;
            let total: u64 = prepared.iter().map(archive::PreparedFile::size).sum();
            debug!(bytes = total, "uploading");
            let (tx, body) = archive::body_channel();
            let producer = tokio::task::spawn_blocking(move || archive::produce(prepared, tx));
            // Extracted at `/` with entries named by their full path, so the Engine creates
            // missing directories and the target directory need not exist.
            let options = UploadToContainerOptionsBuilder::new().path("/").build();
            let sent = self
                .call(
                    "archive upload",
                    transfer_timeout(total),
                    self.client.upload_to_container(
                        &self.id,
                        Some(options),
                        bollard::body_try_stream(body),
                    ),
                )
                .await;
            let produced = producer
                .await
                .map_err(|join| self.archive_error(dir, std::io::Error::other(join)))?;
            match (sent, produced) {
                (
                    _,
                    Err(archive::ProduceError {
                        path: Some(path),
                        source,
                    }),
                ) => Err(Error::LocalFile {
                    container: self.name.clone(),
                    path,
                    source,
                }),
                (Err(error), _) => Err(error),
                (Ok(()), Err(error)) => Err(self.archive_error(dir, error.source)),
                (Ok(()), Ok(())) => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        archive::validate_node_path(path)?;
        let span = info_span!("read_file", container = %self.name, path);
        async {
            let after = transfer_timeout(limit);
            let archive = tokio::time::timeout(after, self.download(path, limit))
                .await
                .map_err(|_| Error::DockerTimeout {
                    container: self.name.clone(),
                    operation: "archive download",
                    after,
                })??;
            match archive::single_file(&archive, limit) {
                Ok(SingleFile::Contents(contents)) => Ok(contents),
                Ok(SingleFile::TooLarge) => Err(Error::FileTooLarge {
                    container: self.name.clone(),
                    path: path.to_string(),
                    limit,
                }),
                Ok(SingleFile::NotAFile) => Err(self.not_a_file(path)),
                Err(source) => Err(self.archive_error(path, source)),
            }
        }
        .instrument(span)
        .await
    }

    async fn state(&self) -> Result<NodeState> {
        Ok(inspect(&self.client, &self.name, &self.id)
            .await?
            .map_or(NodeState::Gone, |inspected| state_of(&inspected)))
    }
}

impl DockerNode {
    /// The gateway of the container's Docker network: the address at which the node reaches
    /// the host the Engine runs on. With several networks, the first by name that has one (a
    /// kind or CAPD node has one network, `kind`).
    pub async fn network_gateway(&self) -> Result<IpAddr> {
        let inspected = inspect(&self.client, &self.name, &self.id)
            .await?
            .ok_or_else(|| Error::NotFound {
                container: self.name.clone(),
            })?;
        let networks = inspected
            .network_settings
            .and_then(|settings| settings.networks)
            .unwrap_or_default();
        let mut by_name: Vec<_> = networks.into_iter().collect();
        by_name.sort_by(|a, b| a.0.cmp(&b.0));
        by_name
            .into_iter()
            .find_map(|(_, endpoint)| endpoint.gateway?.parse().ok())
            .ok_or_else(|| Error::NoGateway {
                container: self.name.clone(),
            })
    }

    fn archive_error(&self, path: &str, source: std::io::Error) -> Error {
        Error::Archive {
            container: self.name.clone(),
            path: path.to_string(),
            source,
        }
    }
}

/// Inspects `reference` (a name or an id); `None` when it does not exist.
async fn inspect(
    client: &bollard::Docker,
    container: &str,
    reference: &str,
) -> Result<Option<ContainerInspectResponse>> {
    match bounded(
        container,
        "inspect",
        API_TIMEOUT,
        client.inspect_container(reference, None::<InspectContainerOptions>),
    )
    .await
    {
        Ok(inspected) => Ok(Some(inspected)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

fn state_of(inspected: &ContainerInspectResponse) -> NodeState {
    let status = inspected.state.as_ref().and_then(|state| state.status);
    match status {
        Some(ContainerStateStatusEnum::RUNNING) => NodeState::Running,
        Some(ContainerStateStatusEnum::PAUSED) => NodeState::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => NodeState::Restarting,
        Some(other) => NodeState::Stopped {
            status: other.to_string(),
        },
        None => NodeState::Stopped {
            status: "unknown".to_string(),
        },
    }
}

/// Runs one Engine request under `after`, classifying its failure.
async fn bounded<T>(
    container: &str,
    operation: &'static str,
    after: Duration,
    request: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T> {
    match tokio::time::timeout(after, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(classify(container, operation, source)),
        Err(_) => Err(Error::DockerTimeout {
            container: container.to_string(),
            operation,
            after,
        }),
    }
}

fn classify(container: &str, operation: &'static str, source: bollard::errors::Error) -> Error {
    if status_of(&source) == Some(404) {
        Error::NotFound {
            container: container.to_string(),
        }
    } else {
        Error::Docker {
            container: container.to_string(),
            operation,
            source,
        }
    }
}

fn status_of(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn transfer_timeout(bytes: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(bytes / TRANSFER_BYTES_PER_SECOND)
}

/// A token no other exec of this or another upgrader process shares.
fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use bollard::models::ContainerState;

    fn inspected(status: Option<ContainerStateStatusEnum>) -> ContainerInspectResponse {
        ContainerInspectResponse {
            state: Some(ContainerState {
                status,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn states_from_inspect() {
        use ContainerStateStatusEnum::*;
        let cases = [
            (Some(RUNNING), NodeState::Running),
            (Some(PAUSED), NodeState::Paused),
            (Some(RESTARTING), NodeState::Restarting),
            (
                Some(EXITED),
                NodeState::Stopped {
                    status: "exited".into(),
                },
            ),
            (
                Some(CREATED),
                NodeState::Stopped {
                    status: "created".into(),
                },
            ),
            (
                Some(DEAD),
                NodeState::Stopped {
                    status: "dead".into(),
                },
            ),
            (
                None,
                NodeState::Stopped {
                    status: "unknown".into(),
                },
            ),
        ];
        for (status, want) in cases {
            assert_eq!(state_of(&inspected(status)), want, "{status:?}");
        }
    }

    #[test]
    fn not_found_is_classified() {
        let gone = bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message: "No such container: x".into(),
        };
        assert!(
            matches!(classify("x", "inspect", gone), Error::NotFound { container } if container == "x")
        );
        let other = bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "boom".into(),
        };
        let error = classify("x", "inspect", other);
        assert!(matches!(error, Error::Docker { .. }));
        // Raw Docker text stays out of the message.
        assert!(!error.to_string().contains("boom"));
    }

    #[test]
    fn tokens_are_unique() {
        assert_ne!(unique_token(), unique_token());
    }

    #[test]
    fn transfer_timeouts_grow_with_size() {
        assert_eq!(transfer_timeout(0), Duration::from_secs(60));
        assert_eq!(
            transfer_timeout(100 * 1024 * 1024),
            Duration::from_secs(160)
        );
    }
}
