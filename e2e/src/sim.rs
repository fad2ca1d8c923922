//! The simulated CAPD/kind cluster launcher: real systemd containers named, labelled and started
//! the way CAPD starts kind nodes, a shared state volume standing in for the API server, the
//! stand-in binaries from `capd-inplace-simnode`, and an artifact mirror container.
//!
//! ```no_run
//! # async fn demo() -> capd_inplace_e2e::sim::Result<()> {
//! use capd_inplace_e2e::sim::SimCluster;
//! let cluster = SimCluster::up("demo", 1, 1, "v1.31.4").await?;
//! let out = cluster.kubectl(&["get", "nodes", "-o", "json"]).await?;
//! cluster.down().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::exec::StartExecResults;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, ExecConfig, HostConfig, NetworkCreateRequest,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    RemoveVolumeOptions, UploadToContainerOptions,
};
pub use capd_inplace_simnode::mirror::Served;
pub use capd_inplace_simnode::state::Fault;
pub use capd_inplace_simnode::version::Version;
use futures::StreamExt;
use serde_json::Value;

pub use crate::sim_artifacts::ArtifactSizes;
use crate::sim_artifacts::{self, append, tail};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("docker: {what}: {source}")]
    Docker {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("`{argv}` on {node} exited with {exit_code}")]
    Exec {
        node: String,
        argv: String,
        exit_code: i64,
        output: String,
    },
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
    #[error("simulated node artifacts: {0}")]
    Artifacts(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unexpected output from {what}: {detail}")]
    Output { what: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn docker(what: impl Into<String>, source: bollard::errors::Error) -> Self {
        Error::Docker {
            what: what.into(),
            source,
        }
    }
}

/// kind's labels, which CAPD sets and the upgrader checks.
pub const CLUSTER_LABEL: &str = "io.x-k8s.kind.cluster";
pub const ROLE_LABEL: &str = "io.x-k8s.kind.role";
/// Marks every resource the launcher creates (nodes, mirror, volume) for cleanup.
pub const SIM_LABEL: &str = "io.x-k8s.capd-inplace.simcluster";
/// The Docker network kind and CAPD put nodes on.
pub const NETWORK: &str = "kind";
/// Where the shared state volume is mounted in every node.
pub const STATE_DIR: &str = "/var/lib/simcluster";
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
const MIRROR_PORT: &str = "8080/tcp";
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ControlPlane,
    Worker,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimNode {
    /// Container name = hostname = Node name, e.g. `demo-cp-0`, `demo-md-0-0`.
    pub name: String,
    pub id: String,
    pub role: Role,
    /// The container's address on the `kind` network.
    pub ip: String,
}

impl SimNode {
    /// The CAPI Machine `spec.providerID` CAPD sets for this container.
    pub fn provider_id(&self) -> String {
        format!("docker:////{}", self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub container: String,
    /// Base URL reachable from the host, like `https://dl.k8s.io/release`:
    /// `http://127.0.0.1:<port>/release`.
    pub host_url: String,
    /// Base URL reachable from inside the nodes: `http://<cluster>-mirror:8080/release`.
    pub network_url: String,
}

/// A running simulated cluster. Dropping it removes its containers and volume unless
/// [`SimCluster::detach`] was called.
pub struct SimCluster {
    docker: Docker,
    name: String,
    nodes: Vec<SimNode>,
    mirror: Mirror,
    detached: bool,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "cluster name {name:?} must be 1-40 characters of lowercase letters, digits and '-'"
        )))
    }
}

pub fn control_plane_name(cluster: &str, index: usize) -> String {
    format!("{cluster}-cp-{index}")
}

pub fn worker_name(cluster: &str, index: usize) -> String {
    format!("{cluster}-md-0-{index}")
}

fn volume_name(cluster: &str) -> String {
    format!("{cluster}-simstate")
}

pub async fn connect() -> Result<Docker> {
    let docker = Docker::connect_with_local_defaults().map_err(|e| Error::docker("connect", e))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| Error::docker("negotiate API version", e))
}

/// Launcher choices beyond the cluster's shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// What the mirror publishes. The nodes' own binaries are always the plain ones.
    pub artifact_sizes: ArtifactSizes,
}

impl SimCluster {
    /// Creates and boots a cluster of `control_planes` + `workers` nodes at `version`, inits and
    /// joins it through the stand-ins, and waits until every Node is Ready at that version.
    pub async fn up(
        name: &str,
        control_planes: usize,
        workers: usize,
        version: &str,
    ) -> Result<SimCluster> {
        Self::up_with(name, control_planes, workers, version, Options::default()).await
    }

    /// [`SimCluster::up`] with [`Options`].
    pub async fn up_with(
        name: &str,
        control_planes: usize,
        workers: usize,
        version: &str,
        options: Options,
    ) -> Result<SimCluster> {
        validate_name(name)?;
        if control_planes == 0 {
            return Err(Error::InvalidArgument(
                "a cluster needs at least one control-plane node".into(),
            ));
        }
        let version = Version::parse(version).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let docker = connect().await?;
        let simnode = sim_artifacts::simnode_binary()?;
        let tree = {
            let simnode = simnode.clone();
            tokio::task::spawn_blocking(move || {
                sim_artifacts::ensure_sized_mirror_tree(&simnode, options.artifact_sizes)
            })
            .await
            .map_err(|e| Error::Artifacts(format!("mirror tree task: {e}")))??
        };
        let image = sim_artifacts::node_image(&docker, &simnode, &version).await?;
        let layout = sim_artifacts::layout_image().await?;
        ensure_network(&docker).await?;
        // A leftover of a previous run with the same name would make every create fail.
        remove_cluster(&docker, name).await?;
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume_name(name)),
                labels: Some(HashMap::from([(SIM_LABEL.to_string(), name.to_string())])),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::docker("create state volume", e))?;

        let mut cluster = SimCluster {
            docker: docker.clone(),
            name: name.to_string(),
            nodes: Vec::new(),
            mirror: Mirror {
                container: String::new(),
                host_url: String::new(),
                network_url: String::new(),
            },
            detached: false,
        };
        cluster.mirror = start_mirror(&docker, name, &layout, &simnode, &tree).await?;

        let mut specs: Vec<(String, Role)> = (0..control_planes)
            .map(|i| (control_plane_name(name, i), Role::ControlPlane))
            .collect();
        specs.extend((0..workers).map(|i| (worker_name(name, i), Role::Worker)));
        // Each node boots and gets its kubeadm config as soon as it exists, so the first nodes'
        // systemd boots while the Engine is still creating the last ones.
        let booted = futures::future::join_all(specs.iter().map(|(node, role)| {
            let (docker, image, version) = (&docker, &image, &version);
            async move {
                let node = create_node(docker, name, node, *role, image).await?;
                wait_for_systemd(docker, &node.name).await?;
                let config = kubeadm_config(name, &node, version);
                upload_file(
                    docker,
                    &node.name,
                    "/kind",
                    "kubeadm.conf",
                    config.as_bytes(),
                    0o644,
                )
                .await?;
                Ok::<_, Error>(node)
            }
        }))
        .await;
        for result in booted {
            cluster.nodes.push(result?);
        }
        let first = cluster.nodes[0].name.clone();
        cluster
            .exec_ok(
                &first,
                &[
                    "kubeadm",
                    "init",
                    "--config=/kind/kubeadm.conf",
                    "--skip-token-print",
                    "--v=6",
                ],
            )
            .await?;
        let join = [
            "kubeadm",
            "join",
            "--config",
            "/kind/kubeadm.conf",
            "--skip-phases=preflight",
            "--ignore-preflight-errors=all",
            "--v=6",
        ];
        // kind joins secondary control planes one by one, workers all at once.
        for node in cluster
            .nodes
            .iter()
            .filter(|n| n.role == Role::ControlPlane)
            .skip(1)
        {
            cluster.exec_ok(&node.name, &join).await?;
        }
        let workers: Vec<&SimNode> = cluster
            .nodes
            .iter()
            .filter(|n| n.role == Role::Worker)
            .collect();
        futures::future::try_join_all(workers.iter().map(|n| cluster.exec_ok(&n.name, &join)))
            .await?;
        cluster.wait_nodes_ready(&version, READY_TIMEOUT).await?;
        tracing::info!(cluster = name, %version, nodes = cluster.nodes.len(), "simulated cluster is up");
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&SimNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The first control-plane node, where init ran and admin.conf lives.
    pub fn control_plane(&self) -> &SimNode {
        &self.nodes[0]
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Keeps the containers after this value is dropped (for the `simcluster` CLI).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Runs argv in a node (no shell) and returns its output, whatever the exit code.
    pub async fn exec(&self, node: &str, argv: &[&str]) -> Result<ExecOutput> {
        exec_in(&self.docker, node, argv, EXEC_TIMEOUT).await
    }

    pub async fn exec_with_timeout(
        &self,
        node: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        exec_in(&self.docker, node, argv, timeout).await
    }

    /// Like [`SimCluster::exec`], but a non-zero exit is an [`Error::Exec`].
    pub async fn exec_ok(&self, node: &str, argv: &[&str]) -> Result<ExecOutput> {
        let out = self.exec(node, argv).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(Error::Exec {
                node: node.to_string(),
                argv: argv.join(" "),
                exit_code: out.exit_code,
                output: tail(&format!("{}{}", out.stdout, out.stderr)),
            })
        }
    }

    /// `kubectl --kubeconfig /etc/kubernetes/admin.conf <args>` on the first control plane.
    pub async fn kubectl(&self, args: &[&str]) -> Result<ExecOutput> {
        let mut argv = vec!["kubectl", "--kubeconfig", ADMIN_CONF];
        argv.extend_from_slice(args);
        self.exec(&self.control_plane().name, &argv).await
    }

    /// The v1 List of Nodes, as `kubectl get nodes -o json` prints it.
    pub async fn nodes_json(&self) -> Result<Value> {
        let out = self.kubectl(&["get", "nodes", "-o", "json"]).await?;
        if !out.success() {
            return Err(Error::Output {
                what: "kubectl get nodes".into(),
                detail: out.stderr,
            });
        }
        serde_json::from_str(&out.stdout).map_err(|e| Error::Output {
            what: "kubectl get nodes -o json".into(),
            detail: e.to_string(),
        })
    }

    /// `kubernetesVersion` of the kubeadm-config ConfigMap.
    pub async fn cluster_version(&self) -> Result<Version> {
        let out = self
            .kubectl(&[
                "-n",
                "kube-system",
                "get",
                "configmap",
                "kubeadm-config",
                "-o",
                "jsonpath={.data.ClusterConfiguration}",
            ])
            .await?;
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("kubernetesVersion:"))
            .map(str::trim);
        line.and_then(|v| Version::parse(v).ok())
            .ok_or_else(|| Error::Output {
                what: "kubeadm-config".into(),
                detail: format!("no kubernetesVersion in {:?} {}", out.stdout, out.stderr),
            })
    }

    /// Raises `kubernetesVersion` in the kubeadm-config ConfigMap, as KubeadmControlPlane's
    /// `UpdateClusterConfiguration` does before it touches any Machine. Done under the state lock
    /// with `sed` on the ConfigMap's JSON (argv only; the version is parsed first).
    pub async fn update_cluster_configuration(&self, version: &Version) -> Result<()> {
        let expression =
            format!("s/kubernetesVersion: v[0-9]+\\.[0-9]+\\.[0-9]+/kubernetesVersion: {version}/");
        let file = format!("{STATE_DIR}/configmaps/kube-system/kubeadm-config.json");
        let lock = format!("{STATE_DIR}/.lock");
        self.exec_ok(
            &self.control_plane().name,
            &["flock", &lock, "sed", "-i", "-E", &expression, &file],
        )
        .await?;
        let now = self.cluster_version().await?;
        if now == *version {
            Ok(())
        } else {
            Err(Error::Output {
                what: "kubeadm-config".into(),
                detail: format!("kubernetesVersion is {now} after setting {version}"),
            })
        }
    }

    /// Waits until every node of this cluster is a Ready Node with `kubeletVersion == version`.
    pub async fn wait_nodes_ready(&self, version: &Version, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let want = version.to_string();
        let mut last;
        loop {
            match self.nodes_json().await {
                Ok(list) => {
                    let items = list["items"].as_array().cloned().unwrap_or_default();
                    let pending: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| {
                            !items.iter().any(|i| {
                                i["metadata"]["name"] == n.name.as_str()
                                    && i["status"]["nodeInfo"]["kubeletVersion"] == want.as_str()
                                    && i["status"]["conditions"].as_array().is_some_and(|cs| {
                                        cs.iter()
                                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                                    })
                            })
                        })
                        .map(|n| n.name.clone())
                        .collect();
                    if pending.is_empty() {
                        return Ok(());
                    }
                    last = format!("not Ready at {want}: {}", pending.join(", "));
                }
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: format!("cluster {}: {last}", self.name),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Arms a fault for `command` (e.g. `kubeadm-upgrade-node`, `kubelet`, `kubectl-drain`) on `node`.
    pub async fn inject_fault(&self, node: &str, command: &str, fault: &Fault) -> Result<()> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !valid(node) || !valid(command) {
            return Err(Error::InvalidArgument(format!(
                "fault node {node:?} and command {command:?} must be plain names"
            )));
        }
        let body = serde_json::to_vec(fault).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let dir = format!("{STATE_DIR}/faults/{node}");
        self.exec_ok(&self.control_plane().name, &["mkdir", "-p", &dir])
            .await?;
        upload_file(
            &self.docker,
            &self.control_plane().name,
            &dir,
            &format!("{command}.json"),
            &body,
            0o644,
        )
        .await
    }

    /// Disarms every fault in the cluster.
    pub async fn clear_faults(&self) -> Result<()> {
        let dir = format!("{STATE_DIR}/faults");
        self.exec_ok(&self.control_plane().name, &["rm", "-rf", &dir])
            .await
            .map(|_| ())
    }

    /// Makes the mirror sleep this long before every response (0 = no delay).
    pub async fn set_mirror_delay(&self, delay: Duration) -> Result<()> {
        let ms = delay.as_millis().to_string();
        upload_file(
            &self.docker,
            &self.mirror.container,
            "/srv/mirror",
            ".delay_ms",
            ms.as_bytes(),
            0o644,
        )
        .await
    }

    /// Every answer the mirror gave so far, oldest first, from the line it logs per response.
    /// A line is written just after its response and the Engine collects logs asynchronously,
    /// so the log is read until two reads a moment apart agree (for at most about 5 s: a mirror
    /// still serving never settles).
    pub async fn mirror_served(&self) -> Result<Vec<Served>> {
        let mut last = self.mirror_log().await?;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.mirror_log().await?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(last)
    }

    async fn mirror_log(&self) -> Result<Vec<Served>> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut logs = self.docker.logs(&self.mirror.container, Some(options));
        let mut text = Vec::new();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk
                .map_err(|e| Error::docker(format!("logs of {}", self.mirror.container), e))?;
            text.extend_from_slice(&chunk.into_bytes());
        }
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(Served::parse)
            .collect())
    }

    /// `docker restart` of one node (systemd halts and boots again; the kubelet comes back).
    pub async fn restart_node(&self, node: &str) -> Result<()> {
        self.docker
            .restart_container(
                node,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .map_err(|e| Error::docker(format!("restart {node}"), e))?;
        wait_for_systemd(&self.docker, node).await
    }

    /// Removes the cluster's containers and volume.
    pub async fn down(mut self) -> Result<()> {
        self.detached = true;
        remove_cluster(&self.docker, &self.name).await
    }

    /// Removes whatever is left of a cluster by name (for the CLI).
    pub async fn down_by_name(name: &str) -> Result<()> {
        validate_name(name)?;
        let docker = connect().await?;
        remove_cluster(&docker, name).await
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let name = self.name.clone();
        // Drop cannot await; a short-lived thread with its own runtime does the cleanup even
        // when the test's runtime is shutting down.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(docker) = connect().await
                    && let Err(e) = remove_cluster(&docker, &name).await
                {
                    tracing::warn!(cluster = name, error = %e, "cleanup of simulated cluster failed");
                }
            });
        });
        let _ = handle.join();
    }
}

async fn ensure_network(docker: &Docker) -> Result<()> {
    if docker
        .inspect_network(
            NETWORK,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .is_ok()
    {
        return Ok(());
    }
    let created = docker
        .create_network(NetworkCreateRequest {
            name: NETWORK.into(),
            driver: Some("bridge".into()),
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => Ok(()),
        // Another test created it first.
        Err(_)
            if docker
                .inspect_network(
                    NETWORK,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .is_ok() =>
        {
            Ok(())
        }
        Err(e) => Err(Error::docker("create network kind", e)),
    }
}

async fn remove_cluster(docker: &Docker, name: &str) -> Result<()> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{SIM_LABEL}={name}")])]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::docker("list containers", e))?;
    let removals = containers
        .iter()
        .filter_map(|c| c.id.clone())
        .map(|id| async move {
            docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| Error::docker(format!("remove container {id}"), e))
        });
    futures::future::try_join_all(removals).await?;
    match docker
        .remove_volume(
            &volume_name(name),
            Some(RemoveVolumeOptions { force: true }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(Error::docker(
            format!("remove volume {}", volume_name(name)),
            e,
        )),
    }
}

async fn create_node(
    docker: &Docker,
    cluster: &str,
    name: &str,
    role: Role,
    image: &str,
) -> Result<SimNode> {
    let labels = HashMap::from([
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
        (ROLE_LABEL.to_string(), role.label().to_string()),
        (SIM_LABEL.to_string(), cluster.to_string()),
    ]);
    let tmpfs = HashMap::from([
        ("/run".to_string(), String::new()),
        ("/run/lock".to_string(), String::new()),
        ("/tmp".to_string(), String::new()),
    ]);
    let host_config = HostConfig {
        // Not --privileged: the capabilities that run systemd as PID 1 on this engine.
        cap_add: Some(vec!["SYS_ADMIN".into(), "NET_ADMIN".into()]),
        security_opt: Some(vec!["seccomp=unconfined".into()]),
        tmpfs: Some(tmpfs),
        binds: Some(vec![
            "/sys/fs/cgroup:/sys/fs/cgroup:rw".into(),
            format!("{}:{STATE_DIR}", volume_name(cluster)),
        ]),
        // kind's policy: `docker restart` works, and a crashed node is restarted once.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::ON_FAILURE),
            maximum_retry_count: Some(1),
        }),
        network_mode: Some(NETWORK.into()),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(image.into()),
        hostname: Some(name.into()),
        labels: Some(labels),
        env: Some(vec!["container=docker".into()]),
        // kind keeps /var on an anonymous volume, so it survives `docker restart`.
        volumes: Some(vec!["/var".into()]),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                NETWORK.to_string(),
                EndpointSettings::default(),
            )])),
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.into()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| Error::docker(format!("create {name}"), e))?;
    docker
        .start_container(
            name,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| Error::docker(format!("start {name}"), e))?;
    let inspect = docker
        .inspect_container(
            name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .map_err(|e| Error::docker(format!("inspect {name}"), e))?;
    let ip = inspect
        .network_settings
        .and_then(|s| s.networks)
        .and_then(|n| n.get(NETWORK).and_then(|e| e.ip_address.clone()))
        .unwrap_or_default();
    Ok(SimNode {
        name: name.into(),
        id: created.id,
        role,
        ip,
    })
}

async fn start_mirror(
    docker: &Docker,
    cluster: &str,
    image: &str,
    simnode: &std::path::Path,
    tree: &std::path::Path,
) -> Result<Mirror> {
    let name = format!("{cluster}-mirror");
    let host_config = HostConfig {
        binds: Some(vec![
            format!("{}:/usr/local/bin/simnode:ro", simnode.display()),
            format!("{}:/srv/mirror/release:ro", tree.join("release").display()),
        ]),
        port_bindings: Some(HashMap::from([(
            MIRROR_PORT.to_string(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(String::new()),
            }]),
        )])),
        network_mode: Some(NETWORK.into()),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(image.into()),
        entrypoint: Some(vec!["/usr/local/bin/simnode".into()]),
        cmd: Some(vec![
            "mirror".into(),
            "--root".into(),
            "/srv/mirror".into(),
            "--listen".into(),
            "0.0.0.0:8080".into(),
        ]),
        labels: Some(HashMap::from([(
            SIM_LABEL.to_string(),
            cluster.to_string(),
        )])),
        exposed_ports: Some(vec![MIRROR_PORT.into()]),
        host_config: Some(host_config),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| Error::docker(format!("create {name}"), e))?;
    docker
        .start_container(
            &name,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| Error::docker(format!("start {name}"), e))?;
    let inspect = docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .map_err(|e| Error::docker(format!("inspect {name}"), e))?;
    let port = inspect
        .network_settings
        .and_then(|s| s.ports)
        .and_then(|p| p.get(MIRROR_PORT).cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .ok_or_else(|| Error::Output {
            what: format!("inspect {name}"),
            detail: "no published port".into(),
        })?;
    let start = Instant::now();
    while tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(Error::Timeout {
                what: format!("mirror {name} to listen"),
                after: Duration::from_secs(20),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Mirror {
        container: name.clone(),
        host_url: format!("http://127.0.0.1:{port}/release"),
        network_url: format!("http://{name}:8080/release"),
    })
}

/// Waits until systemd in `node` has finished booting. One blocking `is-system-running --wait`
/// per attempt instead of a poll every few hundred milliseconds: with tens of nodes booting at
/// once on a small machine, the polling execs took the CPU the boots needed.
pub async fn wait_for_systemd(docker: &Docker, node: &str) -> Result<()> {
    // A single boot takes about a second; twenty at once on two busy cores took over a minute.
    let timeout = Duration::from_secs(180);
    let start = Instant::now();
    loop {
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        // Fails at once while the container's systemd is not reachable yet; then retried.
        if let Ok(out) = exec_in(
            docker,
            node,
            &["systemctl", "is-system-running", "--wait"],
            left,
        )
        .await
        {
            let state = out.stdout.trim();
            if state == "running" || state == "degraded" {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("systemd in {node} to boot"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs argv in a container and reads its exit code after the output ends. The Engine API
/// cannot kill an exec, so on timeout the process is left running; callers that may hang put
/// `timeout` in the argv.
pub async fn exec_in(
    docker: &Docker,
    container: &str,
    argv: &[&str],
    timeout: Duration,
) -> Result<ExecOutput> {
    let config = ExecConfig {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(argv.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    let what = || format!("exec `{}` in {container}", argv.join(" "));
    let created = docker
        .create_exec(container, config)
        .await
        .map_err(|e| Error::docker(what(), e))?;
    let run = async {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| Error::docker(what(), e))?
        {
            while let Some(chunk) = output.next().await {
                match chunk.map_err(|e| Error::docker(what(), e))? {
                    bollard::container::LogOutput::StdErr { message } => {
                        stderr.extend_from_slice(&message)
                    }
                    other => stdout.extend_from_slice(&other.into_bytes()),
                }
            }
        }
        Ok::<_, Error>((stdout, stderr))
    };
    let (stdout, stderr) =
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| Error::Timeout {
                what: what(),
                after: timeout,
            })??;
    let inspect = docker
        .inspect_exec(&created.id)
        .await
        .map_err(|e| Error::docker(what(), e))?;
    Ok(ExecOutput {
        exit_code: inspect.exit_code.unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Writes one file into a container through the archive API.
pub async fn upload_file(
    docker: &Docker,
    container: &str,
    dir: &str,
    file: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<()> {
    let mut archive = tar::Builder::new(Vec::new());
    append(&mut archive, file, bytes, mode)?;
    let body = archive
        .into_inner()
        .map_err(|e| Error::Artifacts(format!("tar: {e}")))?;
    docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: dir.to_string(),
                ..Default::default()
            }),
            bollard::body_full(body.into()),
        )
        .await
        .map_err(|e| Error::docker(format!("upload {dir}/{file} to {container}"), e))
}

/// kind's multi-document kubeadm config for one node (v1beta3 below v1.31, v1beta4 from it),
/// with CAPD's kubelet flags.
pub fn kubeadm_config(cluster: &str, node: &SimNode, version: &Version) -> String {
    let v1beta4 = version.minor >= 31;
    let api = if v1beta4 {
        "kubeadm.k8s.io/v1beta4"
    } else {
        "kubeadm.k8s.io/v1beta3"
    };
    let endpoint = format!("{}:6443", control_plane_name(cluster, 0));
    let mut args = vec![
        ("fail-swap-on", "false".to_string()),
        ("node-ip", node.ip.clone()),
        ("node-labels", String::new()),
        ("provider-id", node.provider_id()),
    ];
    args.retain(|(_, v)| !v.is_empty() || v1beta4);
    let extra: String = if v1beta4 {
        args.iter()
            .map(|(k, v)| format!("  - name: {k}\n    value: \"{v}\"\n"))
            .collect()
    } else {
        args.iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect()
    };
    let registration = format!(
        "nodeRegistration:\n  criSocket: unix:///run/containerd/containerd.sock\n  kubeletExtraArgs:\n{extra}"
    );
    let control_plane = if node.role == Role::ControlPlane {
        "controlPlane: {}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: {api}\nkind: ClusterConfiguration\nclusterName: {cluster}\nkubernetesVersion: {version}\ncontrolPlaneEndpoint: {endpoint}\nnetworking:\n  podSubnet: 10.244.0.0/16\n  serviceSubnet: 10.96.0.0/16\n---\napiVersion: {api}\nkind: InitConfiguration\n{registration}---\napiVersion: {api}\nkind: JoinConfiguration\n{control_plane}discovery:\n  bootstrapToken:\n    apiServerEndpoint: {endpoint}\n    token: abcdef.0123456789abcdef\n    unsafeSkipCAVerification: true\n{registration}---\napiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: systemd\ncgroupRoot: /kubelet\nfailSwapOn: false\nimageGCHighThresholdPercent: 100\nevictionHard:\n  imagefs.available: \"0%\"\n  nodefs.available: \"0%\"\n  nodefs.inodesFree: \"0%\"\n---\napiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  maxPerCore: 0\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(role: Role) -> SimNode {
        SimNode {
            name: "demo-cp-0".into(),
            id: "x".into(),
            role,
            ip: "172.18.0.2".into(),
        }
    }

    #[test]
    fn names_follow_capd_shape() {
        assert_eq!(control_plane_name("demo", 0), "demo-cp-0");
        assert_eq!(worker_name("demo", 1), "demo-md-0-1");
        assert_eq!(node(Role::Worker).provider_id(), "docker:////demo-cp-0");
        assert!(validate_name("demo-1").is_ok());
        for bad in ["", "Demo", "a_b", "-a", "a-", "x".repeat(41).as_str()] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kubeadm_config_parses_and_follows_the_minor() {
        for (version, api) in [
            ("v1.30.6", "kubeadm.k8s.io/v1beta3"),
            ("v1.31.4", "kubeadm.k8s.io/v1beta4"),
        ] {
            let text = kubeadm_config(
                "demo",
                &node(Role::ControlPlane),
                &Version::parse(version).unwrap(),
            );
            let docs: Vec<serde_json::Value> = text
                .split("---\n")
                .map(|d| {
                    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(d).unwrap())
                        .unwrap()
                })
                .collect();
            assert_eq!(docs.len(), 5);
            assert_eq!(docs[0]["apiVersion"], api);
            assert_eq!(docs[0]["kubernetesVersion"], version);
            assert!(docs[2]["controlPlane"].is_object());
            let args = &docs[1]["nodeRegistration"]["kubeletExtraArgs"];
            let provider = if api.ends_with("v1beta4") {
                args.as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["name"] == "provider-id")
                    .unwrap()["value"]
                    .clone()
            } else {
                args["provider-id"].clone()
            };
            assert_eq!(provider, "docker:////demo-cp-0");
        }
        let worker = kubeadm_config(
            "demo",
            &node(Role::Worker),
            &Version::parse("v1.31.4").unwrap(),
        );
        assert!(!worker.contains("controlPlane: {}"));
    }
}
