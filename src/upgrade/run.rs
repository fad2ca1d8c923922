//! Executes the upgrade of one node: preflight, then every [`Step`] as check → act → verify.
//!
//! Each attempt re-derives where the node stands from what the node shows (binary versions,
//! manifest image tags, the Node object) plus the journal for what the node cannot show, so an
//! attempt after a crash, a restart of the extension, or a restart of the node container simply
//! skips what is already done. Only one upgrader works on a node at a time, enforced by a lease
//! kept inside the node (see [`journal`](super::journal)).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::facts::{self, NodeStatus};
use super::jobs::Progress;
use super::journal::{self, FromVersions, Journal, Paths, RecordedError};
use super::plan::{self, Facts, KubeadmMode, Plan, Policy};
use super::step::Step;
use super::{Error, Result, StepError};
use crate::artifacts::{Arch, ArtifactCache, Binary};
use crate::node::{Command, Docker, DockerNode, NodeExec, Role, UploadFile};
use crate::version::KubeVersion;

const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
const APISERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
const CONTROL_PLANE_MANIFESTS: [&str; 3] = [
    "/etc/kubernetes/manifests/kube-apiserver.yaml",
    "/etc/kubernetes/manifests/kube-controller-manager.yaml",
    "/etc/kubernetes/manifests/kube-scheduler.yaml",
];
const KIND_VERSION_FILE: &str = "/kind/version";
/// The preflight errors CAPD and kinder ignore inside node containers, which lack a real kernel
/// configuration and run with swap.
const IGNORE_PREFLIGHT_ERRORS: &str =
    "SystemVerification,Swap,FileContent--proc-sys-net-bridge-bridge-nf-call-iptables";

/// Where the new binaries come from.
#[derive(Clone)]
pub enum Source {
    /// The extension downloads and verifies them into this cache, then uploads them through the
    /// Docker archive API. The node needs no network.
    Upload(ArtifactCache),
    /// The node fetches them with curl from a base URL laid out like dl.k8s.io/release, and
    /// verifies each against its published `.sha256` before it is used.
    FetchInNode { base_url: String },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Upload(cache) => write!(f, "Upload({})", cache.source()),
            Source::FetchInNode { base_url } => write!(f, "FetchInNode({base_url})"),
        }
    }
}

/// Per-upgrade choices, from ExtensionConfig settings or CLI flags.
#[derive(Debug, Clone)]
pub struct Options {
    pub drain: bool,
    pub drain_timeout: Duration,
    pub source: Source,
    pub policy: Policy,
}

impl Options {
    /// kubeadm's documented defaults: drain with a 5 minute limit, one minor at a time.
    pub fn new(source: Source) -> Self {
        Options {
            drain: true,
            drain_timeout: Duration::from_secs(300),
            source,
            policy: Policy::default(),
        }
    }
}

/// Time limits for commands run in nodes.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub command: Duration,
    pub kubeadm: Duration,
    pub node_ready: Duration,
    pub lease: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(60),
            kubeadm: Duration::from_secs(15 * 60),
            node_ready: Duration::from_secs(180),
            // Renewed every third of this while held, so a live holder never loses it, and a
            // crashed one blocks the node for at most this long.
            lease: Duration::from_secs(30),
        }
    }
}

/// Which node to upgrade to which version.
#[derive(Debug, Clone)]
pub struct NodeTarget {
    pub cluster: String,
    pub container: String,
    pub version: KubeVersion,
    /// `namespace/name` of the Machine, recorded in the journal.
    pub machine: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node already ran the target version; nothing was changed.
    AlreadyAtTarget,
    Upgraded,
}

/// The engine: shared by every job, cheap to clone.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    timeouts: Timeouts,
    /// Identifies this process in node leases.
    owner: Arc<str>,
}

impl Engine {
    pub fn new(docker: Docker, timeouts: Timeouts) -> Self {
        Engine {
            docker,
            timeouts,
            owner: lease_owner().into(),
        }
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Upgrades one node, publishing the current step on `progress`.
    pub async fn upgrade(
        &self,
        target: &NodeTarget,
        options: &Options,
        progress: &watch::Sender<Progress>,
    ) -> std::result::Result<Outcome, StepError> {
        let span = info_span!("node", container = %target.container, to_version = %target.version);
        async {
            let step_error = |step: Step, source: Error| StepError {
                step,
                container: target.container.clone(),
                source,
            };
            progress.send_replace(Progress::Running(Step::Preflight));
            // The label check happens here, before any exec in any container.
            let node = self
                .docker
                .locate(&target.cluster, &target.container)
                .await
                .map_err(|e| step_error(Step::Preflight, e.into()))?;
            let lease = Lease::acquire(&node, &self.owner, self.timeouts.lease)
                .await
                .map_err(|e| step_error(Step::Preflight, e))?;
            let mut session = match Session::open(self, node, target, options).await {
                Ok(session) => session,
                Err(e) => {
                    // A refusal must not hold the node: the next caller may be right.
                    lease.release().await;
                    return Err(step_error(Step::Preflight, e));
                }
            };
            let outcome = session.run(progress, &lease).await;
            if let Err(error) = &outcome {
                session.journal.last_error = Some(RecordedError {
                    step: error.step,
                    message: error.source.to_string(),
                });
                if let Err(e) = session.save_journal().await {
                    warn!(error = %e, "could not record the failure in the journal");
                }
            }
            lease.release().await;
            outcome
        }
        .instrument(span)
        .await
    }
}

/// What an upgrade of one node would do, from a read-only preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub role: Role,
    pub mode: KubeadmMode,
    pub from: String,
    pub already_at_target: bool,
}

impl Engine {
    /// Runs preflight only: reads the node and its cluster and applies the skew rules, changing
    /// nothing (no lease, no journal). Used by `upgrade --dry-run`.
    pub async fn preview(
        &self,
        target: &NodeTarget,
        options: &Options,
    ) -> std::result::Result<Preview, StepError> {
        let step_error = |source: Error| StepError {
            step: Step::Preflight,
            container: target.container.clone(),
            source,
        };
        let node = self
            .docker
            .locate(&target.cluster, &target.container)
            .await
            .map_err(|e| step_error(e.into()))?;
        let session = Session::open(self, node, target, options)
            .await
            .map_err(step_error)?;
        Ok(Preview {
            role: session.plan.role,
            mode: session.plan.mode,
            from: session
                .journal
                .from
                .as_ref()
                .map(|f| f.kubelet.clone())
                .unwrap_or_default(),
            already_at_target: session.already_at_target,
        })
    }
}

impl Drop for Lease {
    /// Stops renewing however the attempt ends (including cancellation); an unreleased lease
    /// then expires by itself.
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// `<hostname>-<pid>-<start nanos>`: unique per process, and only `[A-Za-z0-9.-]` so it is one
/// word in the lease file.
fn lease_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(63)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
        if host.is_empty() {
            "capd-inplace"
        } else {
            &host
        },
        std::process::id()
    )
}

/// The node's upgrade lease, renewed in the background while held.
struct Lease {
    node: DockerNode,
    owner: Arc<str>,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    async fn acquire(node: &DockerNode, owner: &Arc<str>, ttl: Duration) -> Result<Lease> {
        exec_ok(
            node,
            Command::new(["mkdir", "-p", journal::ROOT]),
            Duration::from_secs(30),
        )
        .await?;
        try_take(node, owner, ttl).await?;
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (node, owner, lost) = (node.clone(), owner.clone(), lost.clone());
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        if let Err(e) = try_take(&node, &owner, ttl).await {
                            warn!(error = %e, "could not renew the node lease");
                            if matches!(e, Error::Busy { .. }) {
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                }
                .in_current_span(),
            )
        };
        Ok(Lease {
            node: node.clone(),
            owner: owner.clone(),
            lost,
            renewer,
        })
    }

    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost);
        }
        Ok(())
    }

    async fn release(self) {
        // Stop renewing first, or a renewal could re-take the lease right after the release.
        self.renewer.abort();
        let release = Command::new([
            "flock",
            "-w",
            "10",
            journal::LOCK_FILE,
            "sh",
            "-c",
            journal::LEASE_RELEASE,
            "sh",
            journal::LEASE_FILE,
        ])
        .arg(self.owner.as_ref());
        if let Err(e) = exec_ok(&self.node, release, Duration::from_secs(30)).await {
            warn!(error = %e, "could not release the node lease; it expires by itself");
        }
    }
}

async fn try_take(node: &DockerNode, owner: &str, ttl: Duration) -> Result<()> {
    let acquire = Command::new([
        "flock",
        "-w",
        "10",
        journal::LOCK_FILE,
        "sh",
        "-c",
        journal::LEASE_ACQUIRE,
        "sh",
        journal::LEASE_FILE,
    ])
    .arg(owner)
    .arg(ttl.as_secs().to_string());
    let output = node.exec(acquire.timeout(Duration::from_secs(30))).await?;
    match output.exit_code {
        0 => Ok(()),
        journal::LEASE_HELD => Err(Error::Busy {
            holder: String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("unknown")
                .to_string(),
        }),
        _ => Err(output.into_error(node.name()).into()),
    }
}

/// Runs `command` and returns its stdout, or an error naming the command and its exit code.
pub(super) async fn exec_ok(
    node: &DockerNode,
    command: Command,
    timeout: Duration,
) -> Result<String> {
    let output = node.exec(command.timeout(timeout)).await?;
    if output.exit_code != 0 {
        return Err(output.into_error(node.name()).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One upgrade attempt on one node.
struct Session<'a> {
    engine: &'a Engine,
    node: DockerNode,
    /// A control-plane node of the same cluster: kubectl runs there with its admin.conf.
    control_plane: DockerNode,
    target: &'a NodeTarget,
    options: &'a Options,
    paths: Paths,
    journal: Journal,
    plan: Plan,
    arch: Arch,
    /// Expected sha256 of each staged binary, once known.
    digests: Vec<(Binary, String)>,
    already_at_target: bool,
}

impl<'a> Session<'a> {
    /// Preflight: reads the node and its cluster, decides the plan, and refuses before anything
    /// changes if the skew rules forbid the upgrade.
    async fn open(
        engine: &'a Engine,
        node: DockerNode,
        target: &'a NodeTarget,
        options: &'a Options,
    ) -> Result<Session<'a>> {
        let quick = engine.timeouts.command;
        let version = target.version;
        let paths = Paths::new(&version);

        let manifest_present = node
            .exec(Command::new(["test", "-f", APISERVER_MANIFEST]).timeout(quick))
            .await?
            .exit_code
            == 0;
        let role = if manifest_present {
            Role::ControlPlane
        } else {
            Role::Worker
        };
        if role != node.role() {
            return Err(Error::RoleMismatch {
                container: node.name().to_string(),
                label: node.role(),
                found: role,
            });
        }
        let arch: Arch = exec_ok(&node, Command::new(["uname", "-m"]), quick)
            .await?
            .trim()
            .parse()?;
        let kubeadm = tool_version(&node, Binary::Kubeadm, "kubeadm", quick).await?;
        let kubelet = tool_version(&node, Binary::Kubelet, "kubelet", quick).await?;
        let kubectl = tool_version(&node, Binary::Kubectl, "kubectl", quick).await?;

        let control_planes: Vec<DockerNode> = engine
            .docker
            .cluster_nodes(&target.cluster)
            .await?
            .into_iter()
            .filter(|n| n.role() == Role::ControlPlane)
            .collect();
        let control_plane = if role == Role::ControlPlane {
            node.clone()
        } else {
            first_with_admin_conf(&control_planes, quick).await?
        };
        let cluster = cluster_version(&control_plane, quick).await?;
        let mut apiservers = Vec::with_capacity(control_planes.len());
        for cp in &control_planes {
            let manifest = exec_ok(cp, Command::new(["cat", APISERVER_MANIFEST]), quick).await?;
            apiservers.push(facts::manifest_image_version(&manifest)?);
        }

        let mut journal = read_journal(&node, &paths, quick)
            .await?
            .unwrap_or_else(|| Journal::new(&version, target.machine.clone()));
        let from = journal.from.clone().unwrap_or(FromVersions {
            kubeadm: kubeadm.to_string(),
            kubelet: kubelet.to_string(),
            kubectl: kubectl.to_string(),
        });
        let kubelet_from: KubeVersion =
            from.kubelet.parse().map_err(|_| Error::CorruptJournal {
                path: paths.journal(),
            })?;
        let plan = plan::plan(
            &Facts {
                role,
                kubelet_from,
                cluster,
                apiservers,
            },
            &version,
            options.policy,
        )?;
        info!(role = ?role, mode = plan.mode.command(), %cluster, from = %kubelet_from, "planned");

        journal.from = Some(from);
        journal.completed.insert(Step::Preflight);
        let mut session = Session {
            engine,
            node,
            control_plane,
            target,
            options,
            paths,
            journal,
            plan,
            arch,
            digests: Vec::new(),
            already_at_target: false,
        };
        // A node that already runs the target everywhere, and that we are not in the middle of
        // (a cordon of ours to undo), needs nothing: answer done without changing anything.
        let binaries_at_target = kubeadm == version && kubelet == version && kubectl == version;
        if binaries_at_target && !session.journal.cordoned_by_us {
            let status = session.node_status().await?;
            let kind_version = session.read_trimmed(KIND_VERSION_FILE).await?;
            if status.ready
                && status.kubelet_version == version.to_string()
                && kind_version.as_deref() == Some(version.to_string().as_str())
            {
                session.already_at_target = true;
            }
        }
        Ok(session)
    }

    async fn run(
        &mut self,
        progress: &watch::Sender<Progress>,
        lease: &Lease,
    ) -> std::result::Result<Outcome, StepError> {
        if self.already_at_target {
            info!("already at the target version");
            return Ok(Outcome::AlreadyAtTarget);
        }
        self.save_journal()
            .await
            .map_err(|e| self.step_error(Step::Preflight, e))?;
        for step in Step::ALL.into_iter().skip(1) {
            progress.send_replace(Progress::Running(step));
            let span = info_span!("step", step = step.id());
            let started = std::time::Instant::now();
            let result = async {
                lease.check()?;
                if self.is_done(step).await? {
                    debug!("already done");
                } else {
                    self.act(step).await?;
                    self.verify(step).await?;
                }
                self.journal.completed.insert(step);
                self.journal.last_error = None;
                if step == Step::RecordVersion {
                    self.journal.done = true;
                }
                if step.recorded() {
                    self.save_journal().await?;
                }
                Ok(())
            }
            .instrument(span)
            .await;
            info!(
                step = step.id(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                ok = result.is_ok(),
                "step finished"
            );
            result.map_err(|e| self.step_error(step, e))?;
        }
        Ok(Outcome::Upgraded)
    }

    fn step_error(&self, step: Step, source: Error) -> StepError {
        StepError {
            step,
            container: self.node.name().to_string(),
            source,
        }
    }

    // ----- checks -----

    async fn is_done(&mut self, step: Step) -> Result<bool> {
        let v = self.target.version;
        Ok(match step {
            Step::Preflight => true,
            Step::Stage => {
                self.expected_digests().await?;
                self.staged_digests_match().await?
            }
            Step::InstallKubeadm => self.installed_version(Binary::Kubeadm).await? == Some(v),
            Step::KubeadmUpgrade => match self.plan.role {
                Role::ControlPlane => self.control_plane_at_target().await?,
                // A worker's `kubeadm upgrade node` only rewrites the kubelet configuration, which
                // the node cannot compare cheaply; it is idempotent, so rerun it unless recorded.
                Role::Worker => self.journal.completed.contains(&Step::KubeadmUpgrade),
            },
            Step::Drain => !self.options.drain || self.journal.completed.contains(&Step::Drain),
            Step::InstallKubelet => {
                self.installed_version(Binary::Kubelet).await? == Some(v)
                    && self.installed_version(Binary::Kubectl).await? == Some(v)
            }
            Step::RestartKubelet => {
                self.node_status().await?.kubelet_version == v.to_string()
                    && self.kubelet_active().await?
            }
            Step::VerifyNode => false,
            Step::Uncordon => !self.journal.cordoned_by_us,
            Step::RecordVersion => {
                self.read_trimmed(KIND_VERSION_FILE).await?.as_deref()
                    == Some(v.to_string().as_str())
            }
        })
    }

    // ----- actions -----

    async fn act(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Preflight => Ok(()),
            Step::Stage => self.stage().await,
            Step::InstallKubeadm => self.install(&[Binary::Kubeadm]).await,
            Step::KubeadmUpgrade => self.kubeadm_upgrade().await,
            Step::Drain => self.drain().await,
            Step::InstallKubelet => self.install(&[Binary::Kubelet, Binary::Kubectl]).await,
            Step::RestartKubelet => {
                let quick = self.engine.timeouts.command;
                exec_ok(
                    &self.node,
                    Command::new(["systemctl", "daemon-reload"]),
                    quick,
                )
                .await?;
                exec_ok(
                    &self.node,
                    Command::new(["systemctl", "restart", "kubelet"]),
                    quick,
                )
                .await?;
                Ok(())
            }
            Step::VerifyNode => Ok(()),
            Step::Uncordon => {
                let name = self.node.name().to_string();
                exec_ok(
                    &self.control_plane,
                    kubectl_command(["uncordon", name.as_str()]),
                    self.engine.timeouts.command,
                )
                .await?;
                self.journal.cordoned_by_us = false;
                Ok(())
            }
            Step::RecordVersion => {
                let contents = format!("{}\n", self.target.version);
                write_file_atomically(
                    &self.node,
                    KIND_VERSION_FILE,
                    contents.into_bytes(),
                    0o644,
                    self.engine.timeouts.command,
                )
                .await
            }
        }
    }

    async fn verify(&mut self, step: Step) -> Result<()> {
        let v = self.target.version;
        match step {
            Step::Preflight => Ok(()),
            Step::Drain if !self.node_status().await?.unschedulable => Err(Error::Verify(format!(
                "Node {} is still schedulable after drain",
                self.node.name()
            ))),
            Step::Uncordon if self.node_status().await?.unschedulable => Err(Error::Verify(
                format!("Node {} is still cordoned after uncordon", self.node.name()),
            )),
            Step::RecordVersion if !self.is_done(Step::RecordVersion).await? => Err(Error::Verify(
                format!("{KIND_VERSION_FILE} does not read {v}"),
            )),
            Step::Drain | Step::Uncordon | Step::RecordVersion => Ok(()),
            Step::Stage => {
                if !self.staged_digests_match().await? {
                    return Err(Error::Verify(
                        "a staged binary does not match its published sha256".into(),
                    ));
                }
                // The right bytes must also be the right program: ask each staged binary its version.
                let quick = self.engine.timeouts.command;
                let kubeadm = tool_version(
                    &self.node,
                    Binary::Kubeadm,
                    &self.paths.staged("kubeadm"),
                    quick,
                )
                .await?;
                let kubelet = tool_version(
                    &self.node,
                    Binary::Kubelet,
                    &self.paths.staged("kubelet"),
                    quick,
                )
                .await?;
                if kubeadm != v || kubelet != v {
                    return Err(Error::Verify(format!(
                        "the staged binaries report {kubeadm} and {kubelet}, not {v}"
                    )));
                }
                Ok(())
            }
            Step::InstallKubeadm | Step::InstallKubelet => {
                if !self.is_done(step).await? {
                    return Err(Error::Verify(format!(
                        "the installed binaries do not report {v}"
                    )));
                }
                Ok(())
            }
            Step::KubeadmUpgrade => {
                if self.plan.role == Role::ControlPlane && !self.control_plane_at_target().await? {
                    return Err(Error::Verify(format!(
                        "the control-plane manifests or kubeadm-config are not at {v} after {}",
                        self.plan.mode.command()
                    )));
                }
                Ok(())
            }
            Step::RestartKubelet => self.wait_kubelet_active().await,
            Step::VerifyNode => self.wait_node_ready().await,
        }
    }

    // ----- staging and installing -----

    /// The sha256 each binary must have: from the verified host cache, or from the published
    /// `.sha256` files fetched by the node itself.
    async fn expected_digests(&mut self) -> Result<()> {
        if !self.digests.is_empty() {
            return Ok(());
        }
        for binary in Binary::ALL {
            let digest = match &self.options.source {
                Source::Upload(cache) => {
                    cache
                        .fetch(&self.target.version.to_string(), self.arch, binary)
                        .await?
                        .sha256
                }
                Source::FetchInNode { base_url } => {
                    let url = format!(
                        "{}.sha256",
                        release_url(base_url, &self.target.version, self.arch, binary)
                    );
                    let published =
                        exec_ok(&self.node, curl(&url, None), self.engine.timeouts.command).await?;
                    parse_published_digest(&published).ok_or_else(|| {
                        Error::Verify(format!("{url} does not hold a sha256 digest"))
                    })?
                }
            };
            self.digests.push((binary, digest));
        }
        Ok(())
    }

    async fn staged_digests_match(&self) -> Result<bool> {
        let mut command = Command::new(["sha256sum", "--"]);
        for (binary, _) in &self.digests {
            command = command.arg(self.paths.staged(binary.name()));
        }
        let output = self
            .node
            .exec(command.timeout(self.engine.timeouts.command))
            .await?;
        // sha256sum exits 1 when a file is missing; the lines it did print still count.
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(self.digests.iter().all(|(binary, digest)| {
            let path = self.paths.staged(binary.name());
            stdout
                .lines()
                .any(|line| line.split_once("  ") == Some((digest.as_str(), path.as_str())))
        }))
    }

    async fn stage(&mut self) -> Result<()> {
        let quick = self.engine.timeouts.command;
        let bin_dir = self.paths.bin_dir();
        exec_ok(
            &self.node,
            Command::new(["mkdir", "-p", bin_dir.as_str()]),
            quick,
        )
        .await?;
        match self.options.source.clone() {
            Source::Upload(cache) => {
                let mut files = Vec::with_capacity(Binary::ALL.len());
                for binary in Binary::ALL {
                    let artifact = cache
                        .fetch(&self.target.version.to_string(), self.arch, binary)
                        .await?;
                    files.push(UploadFile::from_path(binary.name(), artifact.path, 0o755));
                }
                self.node.upload(&bin_dir, files).await?;
            }
            Source::FetchInNode { base_url } => {
                for (binary, digest) in self.digests.clone() {
                    let url = release_url(&base_url, &self.target.version, self.arch, binary);
                    let staged = self.paths.staged(binary.name());
                    let partial = format!("{staged}.part");
                    exec_ok(
                        &self.node,
                        curl(&url, Some(&partial)),
                        self.engine.timeouts.kubeadm,
                    )
                    .await?;
                    let sum = exec_ok(
                        &self.node,
                        Command::new(["sha256sum", "--", partial.as_str()]),
                        quick,
                    )
                    .await?;
                    if sum.split_whitespace().next() != Some(digest.as_str()) {
                        let _ = self
                            .node
                            .exec(Command::new(["rm", "-f", partial.as_str()]).timeout(quick))
                            .await;
                        return Err(Error::ChecksumMismatch {
                            url,
                            expected: digest,
                        });
                    }
                    exec_ok(
                        &self.node,
                        Command::new(["chmod", "0755", partial.as_str()]),
                        quick,
                    )
                    .await?;
                    exec_ok(
                        &self.node,
                        Command::new(["mv", "-f", partial.as_str(), staged.as_str()]),
                        quick,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Swaps staged binaries into /usr/bin by atomic rename, keeping the first replaced copy of
    /// each in the journal directory. Every attempt runs the stage step first, which hashes the
    /// staged files against their published digests (and re-stages on a mismatch), so nothing is
    /// installed that does not match; hashing them again here would only repeat that work.
    async fn install(&mut self, binaries: &[Binary]) -> Result<()> {
        let quick = self.engine.timeouts.command;
        let prev = self.paths.prev_dir();
        for binary in binaries {
            let name = binary.name();
            let command = Command::new(["sh", "-c", INSTALL_BINARY, "sh"])
                .arg(format!("/usr/bin/{name}"))
                .arg(format!("{prev}/{name}"))
                .arg(self.paths.staged(name))
                .arg(format!("/usr/bin/.{name}.capd-inplace"));
            exec_ok(&self.node, command, quick).await?;
        }
        Ok(())
    }

    /// The version the installed `binary` reports, or `None` if it does not run or answers
    /// something unexpected (a half-replaced or foreign binary is simply "not at target").
    async fn installed_version(&self, binary: Binary) -> Result<Option<KubeVersion>> {
        match tool_version(
            &self.node,
            binary,
            binary.name(),
            self.engine.timeouts.command,
        )
        .await
        {
            Ok(version) => Ok(Some(version)),
            Err(Error::Node(crate::node::Error::Exec { .. }) | Error::Parse(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    // ----- kubeadm -----

    async fn control_plane_at_target(&self) -> Result<bool> {
        let quick = self.engine.timeouts.command;
        let v = self.target.version;
        let cluster = cluster_version(&self.control_plane, quick).await?;
        if cluster != v {
            return Ok(false);
        }
        for manifest in CONTROL_PLANE_MANIFESTS {
            let yaml = exec_ok(&self.node, Command::new(["cat", manifest]), quick).await?;
            if facts::manifest_image_version(&yaml)? != v {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn kubeadm_upgrade(&mut self) -> Result<()> {
        let v = self.target.version;
        // kubeadm accepts an UpgradeConfiguration (v1beta4) from v1.31; before that only flags
        // work (v1.30 refuses --config for upgrades).
        let command = if v.minor >= 31 {
            let config = upgrade_configuration(&v);
            write_file_atomically(
                &self.node,
                &self.paths.upgrade_config(),
                config.into_bytes(),
                0o600,
                self.engine.timeouts.command,
            )
            .await?;
            let config_path = self.paths.upgrade_config();
            match self.plan.mode {
                KubeadmMode::Apply => Command::new([
                    "kubeadm",
                    "upgrade",
                    "apply",
                    "--config",
                    config_path.as_str(),
                ]),
                KubeadmMode::Node => Command::new([
                    "kubeadm",
                    "upgrade",
                    "node",
                    "--config",
                    config_path.as_str(),
                ]),
            }
        } else {
            let ignore = format!("--ignore-preflight-errors={IGNORE_PREFLIGHT_ERRORS}");
            let version = v.to_string();
            match self.plan.mode {
                KubeadmMode::Apply => Command::new([
                    "kubeadm",
                    "upgrade",
                    "apply",
                    version.as_str(),
                    "--yes",
                    ignore.as_str(),
                ]),
                KubeadmMode::Node => Command::new(["kubeadm", "upgrade", "node", ignore.as_str()]),
            }
        };
        exec_ok(&self.node, command, self.engine.timeouts.kubeadm).await?;
        Ok(())
    }

    // ----- the Node -----

    async fn node_status(&self) -> Result<NodeStatus> {
        let name = self.node.name().to_string();
        let json = exec_ok(
            &self.control_plane,
            kubectl_command(["get", "node", name.as_str(), "-o", "json"]),
            self.engine.timeouts.command,
        )
        .await?;
        Ok(facts::node(&json)?)
    }

    async fn drain(&mut self) -> Result<()> {
        let status = self.node_status().await?;
        if status.unschedulable && !self.journal.cordoned_by_us {
            // Someone else cordoned it: drain, but leave the cordon for them to lift.
            info!("node was already cordoned; it will stay cordoned");
        } else {
            // Recorded before the cordon, so a crash right after it still uncordons.
            self.journal.cordoned_by_us = true;
            self.save_journal().await?;
        }
        let name = self.node.name().to_string();
        let timeout = format!("--timeout={}s", self.options.drain_timeout.as_secs());
        exec_ok(
            &self.control_plane,
            kubectl_command([
                "drain",
                name.as_str(),
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--force",
                timeout.as_str(),
            ]),
            self.options.drain_timeout + Duration::from_secs(30),
        )
        .await?;
        Ok(())
    }

    async fn kubelet_active(&self) -> Result<bool> {
        let output = self
            .node
            .exec(
                Command::new(["systemctl", "is-active", "kubelet"])
                    .timeout(self.engine.timeouts.command),
            )
            .await?;
        Ok(output.exit_code == 0)
    }

    async fn wait_kubelet_active(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.kubelet_active().await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the kubelet unit to become active".into(),
                    after: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    async fn wait_node_ready(&self) -> Result<()> {
        let v = self.target.version.to_string();
        let limit = self.engine.timeouts.node_ready;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.node_status().await?;
            if status.ready && status.kubelet_version == v && self.kubelet_active().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("Node {} to be Ready at {v}", self.node.name()),
                    after: limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // ----- files -----

    async fn read_trimmed(&self, path: &str) -> Result<Option<String>> {
        let output = self
            .node
            .exec(Command::new(["cat", path]).timeout(self.engine.timeouts.command))
            .await?;
        Ok((output.exit_code == 0)
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string()))
    }

    async fn save_journal(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.journal)
            .map_err(|e| Error::Verify(format!("journal: {e}")))?;
        write_file_atomically(
            &self.node,
            &self.paths.journal(),
            json,
            0o644,
            self.engine.timeouts.command,
        )
        .await
    }
}

async fn read_journal(
    node: &DockerNode,
    paths: &Paths,
    timeout: Duration,
) -> Result<Option<Journal>> {
    let output = node
        .exec(Command::new(["cat", paths.journal().as_str()]).timeout(timeout))
        .await?;
    if output.exit_code != 0 {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|_| Error::CorruptJournal {
            path: paths.journal(),
        })
}

async fn first_with_admin_conf(
    control_planes: &[DockerNode],
    timeout: Duration,
) -> Result<DockerNode> {
    for cp in control_planes {
        if let Ok(output) = cp
            .exec(Command::new(["test", "-f", ADMIN_CONF]).timeout(timeout))
            .await
            && output.exit_code == 0
        {
            return Ok(cp.clone());
        }
    }
    Err(Error::NoControlPlane)
}

/// Writes `contents` (sent on stdin) under a temporary name next to `path`, then renames it
/// into place, in one exec: readers never see a torn file. The script is a constant; the path
/// parts and mode arrive as arguments.
const WRITE_ATOMICALLY: &str = r#"set -eu
dir="$1"; name="$2"; mode="$3"
mkdir -p "$dir"
cat > "$dir/.$name.capd-inplace"
chmod "$mode" "$dir/.$name.capd-inplace"
mv -f "$dir/.$name.capd-inplace" "$dir/$name"
"#;

async fn write_file_atomically(
    node: &DockerNode,
    path: &str,
    contents: Vec<u8>,
    mode: u32,
    timeout: Duration,
) -> Result<()> {
    let (dir, name) = path
        .rsplit_once('/')
        .ok_or_else(|| Error::Verify(format!("{path} is not an absolute path")))?;
    let command = Command::new(["sh", "-c", WRITE_ATOMICALLY, "sh", dir, name])
        .arg(format!("{mode:o}"))
        .stdin(contents);
    exec_ok(node, command, timeout).await?;
    Ok(())
}

/// Keeps the first replaced binary (`cp -n`: a retry keeps the original), then swaps the staged
/// one in by an atomic rename. Arguments: installed path, backup path, staged path, temporary path.
const INSTALL_BINARY: &str = r#"set -eu
installed="$1"; backup="$2"; staged="$3"; incoming="$4"
mkdir -p "$(dirname "$backup")"
cp -an "$installed" "$backup"
install -m 0755 "$staged" "$incoming"
mv -f "$incoming" "$installed"
"#;

/// Asks `program` (a path or name of a kubeadm, kubelet or kubectl binary) for its version,
/// with the command and output format that tool's real version prints.
pub(super) async fn tool_version(
    node: &DockerNode,
    binary: Binary,
    program: &str,
    timeout: Duration,
) -> Result<KubeVersion> {
    let args: &[&str] = match binary {
        Binary::Kubeadm => &["version", "-o", "short"],
        Binary::Kubelet => &["--version"],
        Binary::Kubectl => &["version", "--client", "-o", "json"],
    };
    let stdout = exec_ok(
        node,
        Command::new([program]).args(args.iter().copied()),
        timeout,
    )
    .await?;
    Ok(match binary {
        Binary::Kubeadm => facts::kubeadm_version(&stdout),
        Binary::Kubelet => facts::kubelet_version(&stdout),
        Binary::Kubectl => facts::kubectl_client_version(&stdout),
    }?)
}

/// The `kubernetesVersion` of the cluster's kubeadm-config, read on a control-plane node.
async fn cluster_version(control_plane: &DockerNode, timeout: Duration) -> Result<KubeVersion> {
    let yaml = exec_ok(
        control_plane,
        kubectl_command([
            "-n",
            "kube-system",
            "get",
            "configmap",
            "kubeadm-config",
            "-o",
            "jsonpath={.data.ClusterConfiguration}",
        ]),
        timeout,
    )
    .await?;
    Ok(facts::cluster_configuration_version(&yaml)?)
}

fn kubectl_command<'s>(args: impl IntoIterator<Item = &'s str>) -> Command {
    Command::new(["kubectl", "--kubeconfig", ADMIN_CONF]).args(args)
}

fn curl(url: &str, output: Option<&str>) -> Command {
    let command = Command::new(["curl", "-fsSL", "--retry", "3", "--connect-timeout", "10"]);
    match output {
        Some(path) => command.args(["-o", path, url]),
        None => command.arg(url),
    }
}

fn release_url(base: &str, version: &KubeVersion, arch: Arch, binary: Binary) -> String {
    format!(
        "{}/{version}/bin/linux/{}/{}",
        base.trim_end_matches('/'),
        arch.name(),
        binary.name()
    )
}

/// dl.k8s.io publishes the bare hex digest; `sha256sum` output (`<hex>  <name>`) is accepted too.
fn parse_published_digest(text: &str) -> Option<String> {
    let digest = text.split_whitespace().next()?.to_ascii_lowercase();
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
}

/// The kubeadm.k8s.io/v1beta4 UpgradeConfiguration for `apply` and `node`, non-interactive and
/// with kind's preflight ignores.
fn upgrade_configuration(version: &KubeVersion) -> String {
    let ignores: String = IGNORE_PREFLIGHT_ERRORS
        .split(',')
        .map(|e| format!("    - {e}\n"))
        .collect();
    format!(
        "apiVersion: kubeadm.k8s.io/v1beta4\nkind: UpgradeConfiguration\napply:\n  kubernetesVersion: {version}\n  forceUpgrade: true\n  ignorePreflightErrors:\n{ignores}node:\n  ignorePreflightErrors:\n{ignores}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_digests() {
        let hex = "a".repeat(64);
        assert_eq!(
            parse_published_digest(&format!("{hex}\n")),
            Some(hex.clone())
        );
        assert_eq!(
            parse_published_digest(&format!("{hex}  kubeadm\n")),
            Some(hex.clone())
        );
        assert_eq!(parse_published_digest("<html>not found</html>"), None);
        assert_eq!(parse_published_digest(""), None);
    }

    #[test]
    fn release_urls_follow_dl_k8s_io() {
        let v: KubeVersion = "v1.32.3".parse().unwrap();
        assert_eq!(
            release_url(
                "http://127.0.0.1:8080/release/",
                &v,
                Arch::Amd64,
                Binary::Kubelet
            ),
            "http://127.0.0.1:8080/release/v1.32.3/bin/linux/amd64/kubelet"
        );
    }

    #[test]
    fn upgrade_configuration_is_v1beta4() {
        let yaml = upgrade_configuration(&"v1.32.3".parse().unwrap());
        assert_eq!(
            yaml,
            "apiVersion: kubeadm.k8s.io/v1beta4\nkind: UpgradeConfiguration\napply:\n  kubernetesVersion: v1.32.3\n  forceUpgrade: true\n  ignorePreflightErrors:\n    - SystemVerification\n    - Swap\n    - FileContent--proc-sys-net-bridge-bridge-nf-call-iptables\nnode:\n  ignorePreflightErrors:\n    - SystemVerification\n    - Swap\n    - FileContent--proc-sys-net-bridge-bridge-nf-call-iptables\n"
        );
        assert!(
            lease_owner()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        );
    }
}
