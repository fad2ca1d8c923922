//! Executes the upgrade of one node: preflight, then every [`Step`] as check → act → verify.
//!
//! Each attempt re-derives where the node stands from what the node shows (binary versions,
//! manifest image tags, the Node object) plus the journal for what the node cannot show, so an
//! attempt after a crash, a restart of the extension, or a restart of the node container simply
//! skips what is already done. Only one upgrader works on a node at a time, enforced by a lease
//! kept inside the node (see [`super::journal`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::facts::{self, NodeStatus};
use super::jobs::Progress;
use super::journal::{self, FromVersions, Journal, Paths, RecordedError};
use super::plan::{self, Facts, KubeadmMode, Plan, Policy};
use super::stage::Staging;
use super::step::Step;
use super::{Error, Result, StepError};
use crate::artifacts::{Arch, ArtifactCache, Binary, CacheServer};
use crate::node::{Batch, Command, Docker, DockerNode, ExecOutput, NodeExec, Role};
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
    /// The extension downloads and verifies them into this cache, like [`Source::Upload`], and
    /// the node fetches them with curl from this server of the cache, checking each against the
    /// cache's digest. The node must reach the server.
    Serve {
        cache: ArtifactCache,
        server: CacheServer,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Upload(cache) => write!(f, "Upload({})", cache.source()),
            Source::FetchInNode { base_url } => write!(f, "FetchInNode({base_url})"),
            Source::Serve { cache, server } => {
                write!(f, "Serve({} at {})", cache.source(), server.url())
            }
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
            let started = std::time::Instant::now();
            // The label check happens here, before any exec in any container.
            let node = self.locate(target, Step::Preflight).await?;
            let opened = Session::open(self, node, target, options, Some(self.lease_claim())).await;
            info!(
                step = Step::Preflight.id(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                ok = opened.is_ok(),
                "step finished"
            );
            let mut session = opened.map_err(|e| step_error(Step::Preflight, e))?;
            let outcome = session.run(progress).await;
            if let Err(error) = &outcome {
                session.journal.last_error =
                    Some(RecordedError::new(error.step, &error.source.to_string()));
                session.journal_unsaved = true;
            }
            match (session.finish().await, outcome) {
                (Err(e), Ok(_)) => Err(session.step_error(Step::RecordVersion, e)),
                (Err(Error::LeaseLost), Err(failed)) => {
                    warn!("the node lease passed to another upgrader; the failure is not recorded in the node");
                    Err(failed)
                }
                (Err(e), Err(failed)) => {
                    warn!(error = %e, "could not record the failure in the journal");
                    Err(failed)
                }
                (Ok(()), outcome) => outcome,
            }
        }
        .instrument(span)
        .await
    }
}

impl Engine {
    /// Stages the target version's binaries in the node, changing nothing that runs: under the
    /// node's lease, it reads the node's architecture and runs the stage step alone (download
    /// once into the verified cache, upload, verify in the node). A later upgrade of the node
    /// finds them staged and skips that work. The skew rules are not checked: staged files are
    /// inert until an upgrade, which checks them, installs them.
    pub async fn stage(
        &self,
        target: &NodeTarget,
        options: &Options,
    ) -> std::result::Result<(), StepError> {
        let span = info_span!("stage", container = %target.container, to_version = %target.version);
        async {
            let step_error = |source: Error| StepError {
                step: Step::Stage,
                container: target.container.clone(),
                source,
            };
            let node = self.locate(target, Step::Stage).await?;
            let started = std::time::Instant::now();
            // One exec takes the lease, reads the architecture and hashes what is staged already.
            let claim = self.lease_claim();
            let mut batch = Batch::new(self.timeouts.command);
            batch.push(&claim.command());
            batch.push(&Command::new(["uname", "-m"]));
            batch.push(&Staging::hash_command(&Paths::new(&target.version)));
            let mut answers = batch
                .run(&node)
                .await
                .map_err(|e| step_error(e.into()))?
                .into_iter();
            let lease = claim
                .take(&node, next_answer(&mut answers))
                .map_err(step_error)?;
            let mut staging = None;
            let outcome = async {
                let arch: Arch = stdout_of(next_answer(&mut answers), node.name())?
                    .trim()
                    .parse()?;
                let staging = staging.insert(Staging::new(
                    node.clone(),
                    target.version,
                    &options.source,
                    arch,
                    &self.timeouts,
                    next_answer(&mut answers),
                ));
                staging.ask_last(lease.release_command());
                if !staging.is_done().await? {
                    staging.stage().await?;
                    staging.verify().await?;
                }
                Ok(())
            }
            .await;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                ok = outcome.is_ok(),
                "staged"
            );
            let ended = lease
                .end(staging.as_ref().and_then(Staging::last_answer))
                .await;
            let outcome = outcome.and(ended);
            outcome.map_err(step_error)
        }
        .instrument(span)
        .await
    }
}

impl Engine {
    /// The target's container, after the label check and before any exec; a failure is
    /// reported as a failure of `step`.
    async fn locate(
        &self,
        target: &NodeTarget,
        step: Step,
    ) -> std::result::Result<DockerNode, StepError> {
        self.docker
            .locate(&target.cluster, &target.container)
            .await
            .map_err(|e| StepError {
                step,
                container: target.container.clone(),
                source: e.into(),
            })
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
        let node = self.locate(target, Step::Preflight).await?;
        let session = Session::open(self, node, target, options, None)
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

impl Engine {
    fn lease_claim(&self) -> LeaseClaim {
        LeaseClaim {
            owner: self.owner.clone(),
            ttl: self.timeouts.lease,
        }
    }
}

/// This process's request for a node's lease, sent as the first command of the batch that
/// starts the work on the node: the lease costs no exec of its own, and the batch's other
/// commands (read-only questions) run after it is taken.
struct LeaseClaim {
    owner: Arc<str>,
    ttl: Duration,
}

impl LeaseClaim {
    fn command(&self) -> Command {
        acquire_command(&self.owner, self.ttl)
    }

    /// The lease, from the answer to [`LeaseClaim::command`].
    fn take(self, node: &DockerNode, answer: ExecOutput) -> Result<Lease> {
        lease_answer(node, answer)?;
        Ok(Lease::held(node, self.owner, self.ttl))
    }
}

impl Lease {
    /// A lease just taken, renewed from now on.
    fn held(node: &DockerNode, owner: Arc<str>, ttl: Duration) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (node, owner, lost) = (node.clone(), owner.clone(), lost.clone());
            tokio::spawn(
                async move {
                    keep_renewing(ttl / 3, move || {
                        let (node, owner) = (node.clone(), owner.clone());
                        async move { renew(&node, &owner, ttl).await }
                    })
                    .await;
                    lost.store(true, Ordering::SeqCst);
                }
                .in_current_span(),
            )
        };
        Lease {
            node: node.clone(),
            owner,
            lost,
            renewer,
        }
    }

    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost);
        }
        Ok(())
    }

    /// Succeeds, changing nothing, while the node says this process holds the lease; read by
    /// [`lease_guarded`]. Not under the lease lock: the lease file is only ever replaced by a
    /// rename, so a read sees one whole lease, and the lock could not keep the lease from
    /// passing between this check and the commands after it anyway. That saves the two processes
    /// of the lock (`mkdir`, `flock`) in every change.
    fn holder_check(&self) -> Command {
        Command::new([
            "sh",
            "-c",
            journal::IF_LEASE_HELD,
            "sh",
            journal::LEASE_FILE,
        ])
        .arg(self.owner.as_ref())
    }

    /// Releases the lease if this process still holds it.
    fn release_command(&self) -> Command {
        under_lease_lock(journal::LEASE_RELEASE).arg(self.owner.as_ref())
    }

    /// Ends the lease, given the answer to [`Lease::release_command`] if the work's last exec
    /// asked it. That the release removed the lease proves it was held to the end; that it found
    /// another owner's means it was lost. Without an answer, or after a failed one, the lease is
    /// checked and then released in an exec of its own.
    async fn end(self, asked_release: Option<&ExecOutput>) -> Result<()> {
        match asked_release {
            Some(answer) if answer.exit_code == 0 => {
                // A renewal racing that release may have found the lease gone since: no loss.
                drop(self);
                if String::from_utf8_lossy(&answer.stdout).trim() == journal::RELEASED {
                    Ok(())
                } else {
                    Err(Error::LeaseLost)
                }
            }
            _ => {
                let checked = self.check();
                self.release().await;
                checked
            }
        }
    }

    async fn release(self) {
        // Stop renewing first, or a renewal would find the lease gone and report it lost.
        self.renewer.abort();
        let release = self.release_command();
        if let Err(e) = exec_ok(&self.node, release, Duration::from_secs(30)).await {
            warn!(error = %e, "could not release the node lease; it expires by itself");
        }
    }
}

/// Calls `renew` every `period` until it finds the lease lost ([`Error::Busy`]). Each call starts a
/// period after the previous one started, not after it ended, so that a slow renewal does not
/// push the next one later: with the renewal's own time bounded by the period, the lease is
/// extended at least every two periods, within its time of three.
async fn keep_renewing<F, Fut>(period: Duration, mut renew: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the lease was just taken.
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(e) = renew().await {
            warn!(error = %e, "could not renew the node lease");
            if matches!(e, Error::Busy { .. }) {
                return;
            }
        }
    }
}

/// Extends a lease this process holds, in an exec of its own that may take a third of the lease's
/// time (the renewals' period); [`Error::Busy`] when it no longer holds it.
async fn renew(node: &DockerNode, owner: &str, ttl: Duration) -> Result<()> {
    let renew = under_lease_lock(&journal::LEASE_RENEW)
        .arg(owner)
        .arg(ttl.as_secs().to_string())
        .timeout(ttl / 3);
    lease_answer(node, node.exec(renew).await?)
}

fn acquire_command(owner: &str, ttl: Duration) -> Command {
    under_lease_lock(journal::LEASE_ACQUIRE)
        .arg(owner)
        .arg(ttl.as_secs().to_string())
}

/// Whether the lease was taken, from the answer to [`acquire_command`].
fn lease_answer(node: &DockerNode, output: ExecOutput) -> Result<()> {
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

/// Creates the journal root when missing, then runs its remaining arguments under flock(1) on
/// the lock file: one exec for what would otherwise take two.
const UNDER_LOCK: &str = r#"mkdir -p "$1" && shift && exec flock -w 10 "$@""#;

/// `script` (a lease script from the journal module, given the lease file and then the caller's
/// arguments) run under the lease lock.
fn under_lease_lock(script: &str) -> Command {
    Command::new([
        "sh",
        "-c",
        UNDER_LOCK,
        "sh",
        journal::ROOT,
        journal::LOCK_FILE,
        "sh",
        "-c",
        script,
        "sh",
        journal::LEASE_FILE,
    ])
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
    staging: Staging<'a>,
    known: Known,
    /// What the last action's own exec asked for the step's verification (the installed
    /// versions, the control plane after kubeadm, the Node after a drain or an uncordon): the
    /// verification needs no exec of its own.
    asked_after_action: Option<Vec<ExecOutput>>,
    already_at_target: bool,
    /// Held from the preflight batch on; `None` for a read-only preview.
    lease: Option<Lease>,
    /// The journal changed since it was last written. It is written by the next exec that
    /// changes the node, ahead of the change and stopping it if the write fails, so the node
    /// never runs ahead of its journal, and by the exec that releases the lease.
    journal_unsaved: bool,
}

/// What this attempt knows the node shows: read by preflight, then updated by the attempt's own
/// verified actions. The lease keeps every other upgrader away meanwhile, so the check before a
/// step answers from here instead of asking the node again; what the node could change by itself
/// (the Node object, the kubelet unit) is still asked.
#[derive(Debug, Clone)]
struct Known {
    kubeadm: KubeVersion,
    kubelet: KubeVersion,
    kubectl: KubeVersion,
    kind_version: Option<String>,
    cluster: KubeVersion,
    /// This node's kube-apiserver image version; control planes only.
    apiserver: Option<KubeVersion>,
    /// This attempt swapped the kubelet binary, so the running kubelet is the old one.
    kubelet_replaced: bool,
}

/// What preflight asks every control-plane node, in the batch it sends that node.
fn control_plane_questions(batch: &mut Batch, with_cluster_version: bool) {
    batch.push(&Command::new(["test", "-f", ADMIN_CONF]));
    batch.push(&Command::new(["cat", APISERVER_MANIFEST]));
    if with_cluster_version {
        batch.push(&cluster_version_command());
    }
}

/// A control-plane node's answers to [`control_plane_questions`].
struct ControlPlaneAnswers {
    node: DockerNode,
    has_admin_conf: bool,
    apiserver: KubeVersion,
    /// The cluster's `kubernetesVersion`, when it was asked and could be read.
    cluster: Option<Result<KubeVersion>>,
}

impl ControlPlaneAnswers {
    fn read(
        node: DockerNode,
        answers: &mut impl Iterator<Item = ExecOutput>,
        with_cluster_version: bool,
    ) -> Result<ControlPlaneAnswers> {
        let has_admin_conf = next_answer(answers).exit_code == 0;
        let manifest = stdout_of(next_answer(answers), node.name())?;
        let apiserver = facts::manifest_image_version(&manifest)?;
        let cluster = with_cluster_version.then(|| {
            let yaml = stdout_of(next_answer(answers), node.name())?;
            Ok(facts::cluster_configuration_version(&yaml)?)
        });
        Ok(ControlPlaneAnswers {
            node,
            has_admin_conf,
            apiserver,
            cluster,
        })
    }
}

/// The next answer of a batch. A batch answers every command it was given or fails as a whole,
/// so running out is a bug in the caller's bookkeeping.
pub(super) fn next_answer(answers: &mut impl Iterator<Item = ExecOutput>) -> ExecOutput {
    answers
        .next()
        .expect("a batch answers every command it was given")
}

/// Checks the answers of a change's first `actions` commands, the first failure being the error,
/// and returns the rest: what the same exec asked right after them.
fn asked_after(
    mut answers: Vec<ExecOutput>,
    actions: usize,
    container: &str,
) -> Result<Vec<ExecOutput>> {
    let asked = answers.split_off(actions.min(answers.len()));
    for answer in answers {
        stdout_of(answer, container)?;
    }
    Ok(asked)
}

/// The stdout of a command that must have succeeded.
pub(super) fn stdout_of(output: ExecOutput, container: &str) -> Result<String> {
    if output.exit_code != 0 {
        return Err(output.into_error(container).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether preflight asks the `index`th other control plane for the cluster's version: a worker
/// reads the cluster configuration through the first control plane (a control plane reads its
/// own).
fn asks_cluster_version(node: &DockerNode, index: usize) -> bool {
    node.role() != Role::ControlPlane && index == 0
}

/// The control-plane node kubectl runs on, and the cluster's `kubernetesVersion` read there:
/// the node itself when it is a control plane (listed first), else the first control plane with
/// an admin kubeconfig. The first one was asked for the version in its preflight batch; only when
/// it turns out to lack the kubeconfig is another one asked.
async fn cluster_source(
    control_planes: Vec<ControlPlaneAnswers>,
    target_is_control_plane: bool,
    timeout: Duration,
) -> Result<(DockerNode, KubeVersion)> {
    let mut control_planes = control_planes.into_iter();
    let first = control_planes.next().ok_or(Error::NoControlPlane)?;
    if let Some(cluster) = first.cluster
        && (target_is_control_plane || first.has_admin_conf)
    {
        return Ok((first.node, cluster?));
    }
    let fallback = control_planes
        .find(|cp| cp.has_admin_conf)
        .ok_or(Error::NoControlPlane)?;
    let cluster = cluster_version(&fallback.node, timeout).await?;
    Ok((fallback.node, cluster))
}

impl<'a> Session<'a> {
    /// Preflight: reads the node and its cluster, decides the plan, and refuses before anything
    /// changes if the skew rules forbid the upgrade.
    ///
    /// Every question goes out at once: one batch to the node, and one to each other
    /// control-plane node of the cluster, concurrently. With a `claim`, the node's batch takes
    /// the node's lease before it asks anything; a refusal releases it again, because the next
    /// caller may be right.
    async fn open(
        engine: &'a Engine,
        node: DockerNode,
        target: &'a NodeTarget,
        options: &'a Options,
        claim: Option<LeaseClaim>,
    ) -> Result<Session<'a>> {
        let quick = engine.timeouts.command;
        let version = target.version;
        let paths = Paths::new(&version);

        let all_control_planes: Vec<DockerNode> = engine
            .docker
            .cluster_nodes(&target.cluster)
            .await?
            .into_iter()
            .filter(|n| n.role() == Role::ControlPlane)
            .collect();
        let labelled_control_plane = node.role() == Role::ControlPlane;
        let others: Vec<DockerNode> = all_control_planes
            .into_iter()
            .filter(|cp| cp.id() != node.id())
            .collect();

        let mut own_questions = Batch::new(quick);
        if let Some(claim) = &claim {
            own_questions.push(&claim.command());
        }
        own_questions.push(&Command::new(["test", "-f", APISERVER_MANIFEST]));
        own_questions.push(&Command::new(["uname", "-m"]));
        for binary in Binary::ALL {
            own_questions.push(&version_command(binary, binary.name()));
        }
        own_questions.push(&Command::new(["cat", paths.journal().as_str()]));
        own_questions.push(&Staging::hash_command(&paths));
        own_questions.push(&Command::new(["cat", KIND_VERSION_FILE]));
        if labelled_control_plane {
            control_plane_questions(&mut own_questions, true);
        }
        let other_batches = others.iter().enumerate().map(|(index, cp)| {
            let mut batch = Batch::new(quick);
            control_plane_questions(&mut batch, asks_cluster_version(&node, index));
            async move { batch.run(cp).await }
        });
        let (own_answers, other_answers) = tokio::join!(
            own_questions.run(&node),
            futures::future::join_all(other_batches)
        );

        let mut answers = own_answers?.into_iter();
        let lease = match claim {
            Some(claim) => Some(claim.take(&node, next_answer(&mut answers))?),
            None => None,
        };
        match Self::from_answers(
            engine,
            node,
            target,
            options,
            answers,
            others,
            other_answers,
        )
        .await
        {
            Ok(mut session) => {
                session.lease = lease;
                Ok(session)
            }
            Err(e) => {
                if let Some(lease) = lease {
                    lease.release().await;
                }
                Err(e)
            }
        }
    }

    /// The rest of preflight, from the answers of [`Session::open`]'s batches: the node's own
    /// (after the lease's, when one was claimed), and each other control plane's.
    async fn from_answers(
        engine: &'a Engine,
        node: DockerNode,
        target: &'a NodeTarget,
        options: &'a Options,
        mut answers: std::vec::IntoIter<ExecOutput>,
        others: Vec<DockerNode>,
        other_answers: Vec<crate::node::Result<Vec<ExecOutput>>>,
    ) -> Result<Session<'a>> {
        let quick = engine.timeouts.command;
        let version = target.version;
        let paths = Paths::new(&version);
        let labelled_control_plane = node.role() == Role::ControlPlane;
        let manifest_present = next_answer(&mut answers).exit_code == 0;
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
        let arch: Arch = stdout_of(next_answer(&mut answers), node.name())?
            .trim()
            .parse()?;
        let kubeadm = parse_version(Binary::Kubeadm, next_answer(&mut answers), node.name())?;
        let kubelet = parse_version(Binary::Kubelet, next_answer(&mut answers), node.name())?;
        let kubectl = parse_version(Binary::Kubectl, next_answer(&mut answers), node.name())?;
        let journal_answer = next_answer(&mut answers);
        let staged_hashes = next_answer(&mut answers);
        let kind_answer = next_answer(&mut answers);
        let kind_version = (kind_answer.exit_code == 0).then(|| {
            String::from_utf8_lossy(&kind_answer.stdout)
                .trim()
                .to_string()
        });
        let own_control_plane = if labelled_control_plane {
            Some(ControlPlaneAnswers::read(node.clone(), &mut answers, true)?)
        } else {
            None
        };
        let mut control_planes = Vec::with_capacity(others.len() + 1);
        control_planes.extend(own_control_plane);
        for (index, (cp, batch)) in others.into_iter().zip(other_answers).enumerate() {
            let mut answers = batch?.into_iter();
            control_planes.push(ControlPlaneAnswers::read(
                cp,
                &mut answers,
                asks_cluster_version(&node, index),
            )?);
        }
        let apiservers: Vec<KubeVersion> = control_planes.iter().map(|cp| cp.apiserver).collect();
        let own_apiserver = labelled_control_plane.then(|| apiservers[0]);
        let (control_plane, cluster) =
            cluster_source(control_planes, labelled_control_plane, quick).await?;

        let mut journal = if journal_answer.exit_code == 0 {
            serde_json::from_slice(&journal_answer.stdout).map_err(|_| Error::CorruptJournal {
                path: paths.journal(),
            })?
        } else {
            Journal::new(&version, target.machine.clone())
        };
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
        let staging = Staging::new(
            node.clone(),
            version,
            &options.source,
            arch,
            &engine.timeouts,
            staged_hashes,
        );
        let mut session = Session {
            engine,
            staging,
            node,
            control_plane,
            target,
            options,
            paths,
            journal,
            plan,
            known: Known {
                kubeadm,
                kubelet,
                kubectl,
                kind_version,
                cluster,
                apiserver: own_apiserver,
                kubelet_replaced: false,
            },
            asked_after_action: None,
            already_at_target: false,
            lease: None,
            journal_unsaved: false,
        };
        // A node that already runs the target everywhere, and that we are not in the middle of
        // (a cordon of ours to undo), needs nothing: answer done without changing anything.
        let binaries_at_target = kubeadm == version && kubelet == version && kubectl == version;
        if binaries_at_target && !session.journal.cordoned_by_us {
            let status = session.node_status().await?;
            if status.ready
                && status.kubelet_version == version.to_string()
                && session.known.kind_version.as_deref() == Some(version.to_string().as_str())
            {
                session.already_at_target = true;
            }
        }
        Ok(session)
    }

    fn check_lease(&self) -> Result<()> {
        self.lease.as_ref().map_or(Ok(()), Lease::check)
    }

    /// Writes the journal if it changed, and releases the lease, in one exec. The release
    /// happens whether or not the write succeeded; a failed write is the error, a failed release
    /// only a warning (the lease expires by itself).
    async fn finish(&mut self) -> Result<()> {
        // Built while the session still holds the lease, so the write checks that it does.
        let journal = match (&self.lease, self.journal_unsaved) {
            (Some(_), true) => Some(self.journal_command()?),
            _ => None,
        };
        let Some(lease) = self.lease.take() else {
            return Ok(());
        };
        let mut batch = Batch::new(self.engine.timeouts.command);
        if let Some(journal) = &journal {
            batch.push(journal);
        }
        batch.push(&lease.release_command());
        // Stop renewing first, or a renewal would find the lease gone and report it lost.
        drop(lease);
        let mut answers = match batch.run(&self.node).await {
            Ok(answers) => answers.into_iter(),
            // With nothing to record, only the release failed (say, the node just went away).
            Err(e) if journal.is_none() => {
                warn!(error = %e, "could not release the node lease; it expires by itself");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let written = journal
            .map(|_| lease_guarded(next_answer(&mut answers), self.node.name()))
            .transpose();
        if let Err(e) = stdout_of(next_answer(&mut answers), self.node.name()) {
            warn!(error = %e, "could not release the node lease; it expires by itself");
        }
        written?;
        self.journal_unsaved = false;
        Ok(())
    }

    /// Runs `steps` as one procedure in the node, the journal first if it changed: each step
    /// runs only if every one before it succeeded. Once they all did, the same exec asks
    /// `questions`. Returns the steps' answers, up to the first failure, then the questions';
    /// the caller checks them.
    async fn change(
        &mut self,
        steps: &[Command],
        questions: &[Command],
        timeout: Duration,
    ) -> Result<Vec<ExecOutput>> {
        let mut procedure = Batch::new(timeout);
        let journal = self.journal_unsaved;
        // Under a lease, nothing changes unless the node still says the lease is this process's:
        // the journal write checks that itself, else a check goes first.
        let guard = match (&self.lease, journal) {
            (_, true) => Some(self.journal_command()?),
            (Some(lease), false) => Some(lease.holder_check()),
            (None, false) => None,
        };
        if let Some(guard) = &guard {
            procedure.push_step(guard);
        }
        for step in steps {
            procedure.push_step(step);
        }
        for question in questions {
            procedure.push(question);
        }
        let mut answers = procedure.run(&self.node).await?;
        if guard.is_some() {
            lease_guarded(answers.remove(0), self.node.name())?;
        }
        if journal {
            self.journal_unsaved = false;
        }
        Ok(answers)
    }

    /// Runs `actions` as one change (see [`Session::change`]) that then asks `questions`,
    /// whose answers the step's verification reads (`asked_after_action`).
    async fn change_then_ask(
        &mut self,
        actions: &[Command],
        questions: &[Command],
        timeout: Duration,
    ) -> Result<()> {
        let answers = self.change(actions, questions, timeout).await?;
        self.asked_after_action = Some(asked_after(answers, actions.len(), self.node.name())?);
        Ok(())
    }

    /// Runs `command` as a change (see [`Session::change`]) and returns its stdout.
    async fn change_one(&mut self, command: Command, timeout: Duration) -> Result<String> {
        let mut answers = self.change(&[command], &[], timeout).await?.into_iter();
        stdout_of(next_answer(&mut answers), self.node.name())
    }

    async fn run(
        &mut self,
        progress: &watch::Sender<Progress>,
    ) -> std::result::Result<Outcome, StepError> {
        if self.already_at_target {
            info!("already at the target version");
            return Ok(Outcome::AlreadyAtTarget);
        }
        // The journal is first written after staging, which changes nothing that runs: until
        // then the node still shows the versions `from` records.
        for step in Step::ALL.into_iter().skip(1) {
            progress.send_replace(Progress::Running(step));
            let span = info_span!("step", step = step.id());
            let started = std::time::Instant::now();
            let result = async {
                self.check_lease()?;
                if self.is_done(step).await? {
                    debug!("already done");
                } else {
                    // Only this step's action may answer for this step's verification.
                    self.asked_after_action = None;
                    self.act(step).await?;
                    self.verify(step).await?;
                }
                self.journal.completed.insert(step);
                self.journal.last_error = None;
                if step == Step::RecordVersion {
                    self.journal.done = true;
                }
                if step.recorded() {
                    self.journal_unsaved = true;
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
            Step::Stage => self.staging.is_done().await?,
            Step::InstallKubeadm => self.known.kubeadm == v,
            Step::KubeadmUpgrade => match self.plan.role {
                // What preflight read rules most attempts out without asking again.
                Role::ControlPlane => {
                    self.known.cluster == v
                        && self.known.apiserver == Some(v)
                        && self.control_plane_at_target().await?
                }
                // A worker's `kubeadm upgrade node` only rewrites the kubelet configuration, which
                // the node cannot compare cheaply; it is idempotent, so rerun it unless recorded.
                Role::Worker => self.journal.completed.contains(&Step::KubeadmUpgrade),
            },
            Step::Drain => !self.options.drain || self.journal.completed.contains(&Step::Drain),
            Step::InstallKubelet => self.known.kubelet == v && self.known.kubectl == v,
            Step::RestartKubelet => {
                !self.known.kubelet_replaced && {
                    let (status, active) = self.node_and_kubelet().await?;
                    status.kubelet_version == v.to_string() && active
                }
            }
            Step::VerifyNode => false,
            Step::Uncordon => !self.journal.cordoned_by_us,
            Step::RecordVersion => {
                self.known.kind_version.as_deref() == Some(v.to_string().as_str())
            }
        })
    }

    // ----- actions -----

    async fn act(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Preflight => Ok(()),
            Step::Stage => self.staging.stage().await,
            Step::InstallKubeadm => self.install(&[Binary::Kubeadm]).await,
            Step::KubeadmUpgrade => self.kubeadm_upgrade().await,
            Step::Drain => self.drain().await,
            Step::InstallKubelet => self.install(&[Binary::Kubelet, Binary::Kubectl]).await,
            // The same exec then asks whether the unit came up, for the verification.
            Step::RestartKubelet => {
                self.change_then_ask(
                    &[Command::new(["sh", "-c", RESTART_KUBELET])],
                    &[kubelet_active_command()],
                    self.engine.timeouts.command,
                )
                .await
            }
            Step::VerifyNode => Ok(()),
            Step::Uncordon => {
                let name = self.node.name().to_string();
                self.kubectl_then_read_node(
                    kubectl_command(["uncordon", name.as_str()]),
                    self.engine.timeouts.command,
                )
                .await?;
                self.journal.cordoned_by_us = false;
                Ok(())
            }
            Step::RecordVersion => {
                let contents = format!("{}\n", self.target.version);
                let write = write_file_command(KIND_VERSION_FILE, &contents, 0o644)?;
                let written = self.change_one(write, self.engine.timeouts.command).await?;
                self.known.kind_version = Some(written.trim().to_string());
                Ok(())
            }
        }
    }

    async fn verify(&mut self, step: Step) -> Result<()> {
        let v = self.target.version;
        match step {
            Step::Preflight => Ok(()),
            Step::Drain if !self.node_after_action().await?.unschedulable => Err(Error::Verify(
                format!("Node {} is still schedulable after drain", self.node.name()),
            )),
            Step::Uncordon if self.node_after_action().await?.unschedulable => Err(Error::Verify(
                format!("Node {} is still cordoned after uncordon", self.node.name()),
            )),
            Step::Drain | Step::Uncordon => Ok(()),
            // What the write's own exec read back from the file once it was in place.
            Step::RecordVersion => {
                if self.known.kind_version.as_deref() != Some(v.to_string().as_str()) {
                    return Err(Error::Verify(format!(
                        "{KIND_VERSION_FILE} does not read {v}"
                    )));
                }
                Ok(())
            }
            Step::Stage => self.staging.verify().await,
            Step::InstallKubeadm => self.verify_installed(&[Binary::Kubeadm]),
            Step::InstallKubelet => {
                self.verify_installed(&[Binary::Kubelet, Binary::Kubectl])?;
                self.known.kubelet_replaced = true;
                Ok(())
            }
            Step::KubeadmUpgrade => {
                if self.plan.role == Role::ControlPlane {
                    let asked = self.asked_after_action.take().unwrap_or_default();
                    if !self.control_plane_answers_at_target(asked)? {
                        return Err(Error::Verify(format!(
                            "the control-plane manifests or kubeadm-config are not at {v} after {}",
                            self.plan.mode.command()
                        )));
                    }
                    self.known.cluster = v;
                    self.known.apiserver = Some(v);
                }
                Ok(())
            }
            Step::RestartKubelet => {
                let active_after_restart = self
                    .asked_after_action
                    .take()
                    .is_some_and(|answers| answers.first().is_some_and(|a| a.exit_code == 0));
                if active_after_restart {
                    return Ok(());
                }
                self.wait_kubelet_active().await
            }
            Step::VerifyNode => self.wait_node_ready().await,
        }
    }

    // ----- staging and installing -----

    /// Swaps staged binaries into /usr/bin by atomic rename, keeping the first replaced copy of
    /// each in the journal directory. Every attempt runs the stage step first, which hashes the
    /// staged files against their published digests (and re-stages on a mismatch), so nothing is
    /// installed that does not match; hashing them again here would only repeat that work.
    async fn install(&mut self, binaries: &[Binary]) -> Result<()> {
        let prev = self.paths.prev_dir();
        let mut command = Command::new(["sh", "-c", INSTALL_BINARIES, "sh"]);
        for binary in binaries {
            let name = binary.name();
            command = command.args([
                format!("/usr/bin/{name}"),
                format!("{prev}/{name}"),
                self.paths.staged(name),
                format!("/usr/bin/.{name}.capd-inplace"),
            ]);
        }
        // The same exec asks the installed binaries their versions, for the verification.
        let questions: Vec<Command> = binaries
            .iter()
            .map(|binary| version_command(*binary, binary.name()))
            .collect();
        self.change_then_ask(&[command], &questions, self.engine.timeouts.command)
            .await
    }

    /// Checks each installed binary's version, as the install's exec asked it, and records the
    /// answers; a binary that does not run, answers something unexpected, or was not asked
    /// (the procedure stopped before it) is not at the target.
    fn verify_installed(&mut self, binaries: &[Binary]) -> Result<()> {
        let v = self.target.version;
        let mut answers = self
            .asked_after_action
            .take()
            .unwrap_or_default()
            .into_iter();
        for binary in binaries {
            let reported = answers
                .next()
                .ok_or_else(|| Error::Verify("not asked after the install".into()))
                .and_then(|answer| parse_version(*binary, answer, self.node.name()));
            if !matches!(reported, Ok(version) if version == v) {
                return Err(Error::Verify(format!(
                    "the installed {} does not report {v}: {}",
                    binary.name(),
                    reported.map_or_else(|e| e.to_string(), |version| version.to_string())
                )));
            }
            match binary {
                Binary::Kubeadm => self.known.kubeadm = v,
                Binary::Kubelet => self.known.kubelet = v,
                Binary::Kubectl => self.known.kubectl = v,
            }
        }
        Ok(())
    }

    // ----- kubeadm -----

    /// Whether the cluster configuration and all three control-plane manifests of this node
    /// name the target version. One batch on the node, which is a control plane and so also
    /// where kubectl runs.
    async fn control_plane_at_target(&self) -> Result<bool> {
        let mut batch = Batch::new(self.engine.timeouts.command);
        for question in control_plane_version_questions() {
            batch.push(&question);
        }
        let answers = batch.run(&self.node).await?;
        self.control_plane_answers_at_target(answers)
    }

    /// Reads the answers to [`control_plane_version_questions`]; a missing answer (a procedure
    /// that stopped early) is an error.
    fn control_plane_answers_at_target(&self, answers: Vec<ExecOutput>) -> Result<bool> {
        let v = self.target.version;
        let expected = CONTROL_PLANE_MANIFESTS.len() + 1;
        if answers.len() != expected {
            return Err(Error::Verify(format!(
                "{} of {expected} control-plane checks answered",
                answers.len()
            )));
        }
        let mut answers = answers.into_iter();
        let yaml = stdout_of(next_answer(&mut answers), self.node.name())?;
        if facts::cluster_configuration_version(&yaml)? != v {
            return Ok(false);
        }
        for answer in answers {
            let yaml = stdout_of(answer, self.node.name())?;
            if facts::manifest_image_version(&yaml)? != v {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn kubeadm_upgrade(&mut self) -> Result<()> {
        let v = self.target.version;
        // kubeadm accepts an UpgradeConfiguration (v1beta4) from v1.31; before that only flags
        // work (v1.30 refuses --config for upgrades). The configuration is written by the same
        // exec, just before kubeadm runs.
        let mut commands = Vec::with_capacity(2);
        let command = if v.minor >= 31 {
            let config_path = self.paths.upgrade_config();
            commands.push(write_file_command(
                &config_path,
                &upgrade_configuration(&v),
                0o600,
            )?);
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
        commands.push(command);
        // On a control plane, the same exec then reads what the verification compares.
        let questions = match self.plan.role {
            Role::ControlPlane => control_plane_version_questions(),
            Role::Worker => Vec::new(),
        };
        let timeout = self.engine.timeouts.kubeadm + self.engine.timeouts.command;
        self.change_then_ask(&commands, &questions, timeout).await
    }

    // ----- the Node -----

    async fn node_status(&self) -> Result<NodeStatus> {
        let name = self.node.name().to_string();
        let json = exec_ok(
            &self.control_plane,
            node_command(&name),
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
            // Recorded before the cordon (the drain's exec writes the journal first), so a crash
            // right after it still uncordons.
            self.journal.cordoned_by_us = true;
            self.journal_unsaved = true;
        }
        let name = self.node.name().to_string();
        let timeout = format!("--timeout={}s", self.options.drain_timeout.as_secs());
        self.kubectl_then_read_node(
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
        .await
    }

    /// Runs a kubectl `action` on the Node and reads the Node right after it, in one batch on
    /// the control plane; the step's verification then looks at what was read.
    async fn kubectl_then_read_node(&mut self, action: Command, timeout: Duration) -> Result<()> {
        let timeout = timeout + self.engine.timeouts.command;
        let read_node = node_command(self.node.name());
        let answers = if self.kubectl_runs_in_node() {
            self.change(&[action], &[read_node], timeout).await?
        } else {
            // kubectl runs in another container, which cannot check this node's lease.
            self.guard_in_node().await?;
            let mut batch = Batch::new(timeout);
            batch.push_step(&action);
            batch.push(&read_node);
            batch.run(&self.control_plane).await?
        };
        self.asked_after_action = Some(asked_after(answers, 1, self.control_plane.name())?);
        Ok(())
    }

    /// The Node as read right after this attempt's last kubectl action, or now when the action
    /// was skipped.
    async fn node_after_action(&mut self) -> Result<NodeStatus> {
        match self.asked_after_action.take() {
            Some(answers) => {
                let answer = answers.into_iter().next().ok_or_else(|| {
                    Error::Verify("the Node was not read after the action".into())
                })?;
                Ok(facts::node(&stdout_of(answer, self.control_plane.name())?)?)
            }
            None => self.node_status().await,
        }
    }

    async fn kubelet_active(&self) -> Result<bool> {
        let output = self
            .node
            .exec(kubelet_active_command().timeout(self.engine.timeouts.command))
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

    /// Whether the node is the control plane kubectl runs on, so that a kubectl command and a
    /// question about the node itself can share one exec.
    fn kubectl_runs_in_node(&self) -> bool {
        self.control_plane.id() == self.node.id()
    }

    /// The Node as the API server has it, and whether the kubelet unit is active: one batch
    /// when kubectl runs in the node itself (a control plane), else the two questions to the two
    /// containers at once.
    async fn node_and_kubelet(&self) -> Result<(NodeStatus, bool)> {
        if !self.kubectl_runs_in_node() {
            return tokio::try_join!(self.node_status(), self.kubelet_active());
        }
        let name = self.node.name().to_string();
        let mut batch = Batch::new(self.engine.timeouts.command);
        batch.push(&node_command(&name));
        batch.push(&kubelet_active_command());
        let mut answers = batch.run(&self.node).await?.into_iter();
        let json = stdout_of(next_answer(&mut answers), self.node.name())?;
        let active = next_answer(&mut answers).exit_code == 0;
        Ok((facts::node(&json)?, active))
    }

    async fn wait_node_ready(&self) -> Result<()> {
        let v = self.target.version.to_string();
        let limit = self.engine.timeouts.node_ready;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (status, kubelet_active) = self.node_and_kubelet().await?;
            if status.ready && status.kubelet_version == v && kubelet_active {
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

    /// The command that writes the journal as it is now. Under a lease it writes only while the
    /// lease is still this process's, checked under the lease lock: an upgrader whose lease
    /// expired and passed to another never overwrites the new holder's journal, even before a
    /// renewal has told it so. Its answer is read by [`lease_guarded`].
    fn journal_command(&self) -> Result<Command> {
        let json = serde_json::to_string_pretty(&self.journal)
            .map_err(|e| Error::Verify(format!("journal: {e}")))?;
        let writer = match &self.lease {
            Some(lease) => under_lease_lock(&WRITE_IF_LEASE_HELD).arg(lease.owner.as_ref()),
            None => Command::new(["sh", "-c", WRITE_ATOMICALLY, "sh"]),
        };
        with_write_arguments(writer, &self.paths.journal(), &json, 0o644)
    }

    /// Before a change made from another container (a worker's drain and uncordon, run by kubectl
    /// in the control plane): writes the journal if it changed, else checks that the node still
    /// says the lease is this process's, in one exec in the node (see [`Session::change`]).
    /// Without the check, an upgrader whose lease had passed to another could drain or uncordon
    /// the node in the time before a renewal told it so. It narrows that window to the time
    /// between two execs rather than closing it: the check and kubectl are not one exec, and a
    /// lease lost while a drain runs is seen at the next step.
    async fn guard_in_node(&mut self) -> Result<()> {
        if self.journal_unsaved || self.lease.is_some() {
            self.change(&[], &[], self.engine.timeouts.command).await?;
        }
        Ok(())
    }
}

/// Writes the contents under a temporary name next to the file, then renames it into place:
/// readers never see a torn file. The script is a constant; the path parts, the mode and the
/// contents arrive as arguments (text of a few kilobytes at most, far below the kernel's limit
/// for one argument), so the write can be one command of a batch. It prints the file as it
/// reads once in place, so a caller can verify the write without another exec.
const WRITE_ATOMICALLY: &str = r#"set -eu
dir="$1"; name="$2"; mode="$3"
mkdir -p "$dir"
printf '%s' "$4" > "$dir/.$name.capd-inplace"
chmod "$mode" "$dir/.$name.capd-inplace"
mv -f "$dir/.$name.capd-inplace" "$dir/$name"
cat "$dir/$name"
"#;

/// The command that writes `contents` to `path` atomically and prints it back.
fn write_file_command(path: &str, contents: &str, mode: u32) -> Result<Command> {
    with_write_arguments(
        Command::new(["sh", "-c", WRITE_ATOMICALLY, "sh"]),
        path,
        contents,
        mode,
    )
}

/// `writer` (a script ending in [`WRITE_ATOMICALLY`]) given the write's arguments: the file's
/// directory and name, its mode, its contents.
fn with_write_arguments(writer: Command, path: &str, contents: &str, mode: u32) -> Result<Command> {
    let (dir, name) = path
        .rsplit_once('/')
        .ok_or_else(|| Error::Verify(format!("{path} is not an absolute path")))?;
    Ok(writer
        .arg(dir)
        .arg(name)
        .arg(format!("{mode:o}"))
        .arg(contents))
}

/// [`WRITE_ATOMICALLY`] behind [`journal::IF_LEASE_HELD`], run by [`under_lease_lock`] with the
/// owner and then the write's arguments.
static WRITE_IF_LEASE_HELD: LazyLock<String> =
    LazyLock::new(|| format!("{}{WRITE_ATOMICALLY}", journal::IF_LEASE_HELD));

/// Reads the answer to a command behind [`journal::IF_LEASE_HELD`] ([`Lease::holder_check`], or
/// [`Session::journal_command`] under a lease): [`Error::LeaseLost`] when the lease had passed to
/// another upgrader and the command did nothing.
fn lease_guarded(answer: ExecOutput, container: &str) -> Result<()> {
    if answer.exit_code == journal::LEASE_HELD {
        return Err(Error::LeaseLost);
    }
    stdout_of(answer, container).map(drop)
}

/// For each binary: keeps the first replaced copy (`cp -n`: a retry keeps the original), then
/// swaps the staged one in by an atomic rename. Arguments, four per binary: installed path,
/// backup path, staged path, temporary path. Stops at the first failure.
const INSTALL_BINARIES: &str = r#"set -eu
while [ "$#" -ge 4 ]; do
  installed="$1"; backup="$2"; staged="$3"; incoming="$4"
  shift 4
  mkdir -p "$(dirname "$backup")"
  cp -an "$installed" "$backup"
  install -m 0755 "$staged" "$incoming"
  mv -f "$incoming" "$installed"
done
"#;

/// Restarts the kubelet onto the new binary, re-reading the units first only when systemd says
/// one changed on disk. A binary swap changes no unit, and kubeadm writes the kubelet's flags and
/// configuration (read when the kubelet starts), not its unit files, so the reload the manual
/// procedure runs every time is usually a no-op. It is not free: systemd re-runs every generator
/// and re-reads every unit, the costliest command of a node upgrade in a kind node. A drop-in
/// someone did change is still picked up, because systemd then reports `NeedDaemonReload=yes`.
const RESTART_KUBELET: &str = r#"set -e
if [ "$(systemctl show --property=NeedDaemonReload --value kubelet)" != no ]; then
  systemctl daemon-reload
fi
systemctl restart kubelet"#;

/// Asks `program` (a path or name of a kubeadm, kubelet or kubectl binary) for its version,
/// with the command and output format that tool's real version prints.
pub(super) async fn tool_version(
    node: &DockerNode,
    binary: Binary,
    program: &str,
    timeout: Duration,
) -> Result<KubeVersion> {
    let output = node
        .exec(version_command(binary, program).timeout(timeout))
        .await?;
    parse_version(binary, output, node.name())
}

/// The command that makes `program` print its version, the way that tool's real one does it.
pub(super) fn version_command(binary: Binary, program: &str) -> Command {
    let args: &[&str] = match binary {
        Binary::Kubeadm => &["version", "-o", "short"],
        Binary::Kubelet => &["--version"],
        Binary::Kubectl => &["version", "--client", "-o", "json"],
    };
    Command::new([program]).args(args.iter().copied())
}

/// The version in the answer to [`version_command`].
pub(super) fn parse_version(
    binary: Binary,
    output: ExecOutput,
    container: &str,
) -> Result<KubeVersion> {
    let stdout = stdout_of(output, container)?;
    Ok(match binary {
        Binary::Kubeadm => facts::kubeadm_version(&stdout),
        Binary::Kubelet => facts::kubelet_version(&stdout),
        Binary::Kubectl => facts::kubectl_client_version(&stdout),
    }?)
}

/// What [`Session::control_plane_answers_at_target`] reads: the cluster's kubeadm-config, then
/// each control-plane manifest.
fn control_plane_version_questions() -> Vec<Command> {
    let mut questions = vec![cluster_version_command()];
    questions.extend(
        CONTROL_PLANE_MANIFESTS
            .iter()
            .map(|manifest| Command::new(["cat", *manifest])),
    );
    questions
}

fn cluster_version_command() -> Command {
    kubectl_command([
        "-n",
        "kube-system",
        "get",
        "configmap",
        "kubeadm-config",
        "-o",
        "jsonpath={.data.ClusterConfiguration}",
    ])
}

/// The `kubernetesVersion` of the cluster's kubeadm-config, read on a control-plane node.
async fn cluster_version(control_plane: &DockerNode, timeout: Duration) -> Result<KubeVersion> {
    let yaml = exec_ok(control_plane, cluster_version_command(), timeout).await?;
    Ok(facts::cluster_configuration_version(&yaml)?)
}

/// Reads the Node object `name` as JSON.
fn node_command(name: &str) -> Command {
    kubectl_command(["get", "node", name, "-o", "json"])
}

fn kubelet_active_command() -> Command {
    Command::new(["systemctl", "is-active", "kubelet"])
}

fn kubectl_command<'s>(args: impl IntoIterator<Item = &'s str>) -> Command {
    Command::new(["kubectl", "--kubeconfig", ADMIN_CONF]).args(args)
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

    /// The starts of renewals that each take `takes`, every 10 s over 45 s of paused time, as
    /// milliseconds from the start (so that a schedule off by the time a renewal takes shows);
    /// and whether the renewer stopped by itself. The renewal after `busy_after` calls finds the
    /// lease taken.
    async fn renewals(takes: Duration, busy_after: usize) -> (Vec<u128>, bool) {
        let begin = tokio::time::Instant::now();
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let renewer = keep_renewing(Duration::from_secs(10), || {
            let starts = Arc::clone(&starts);
            async move {
                let calls = {
                    let mut starts = starts.lock().expect("not poisoned");
                    starts.push(begin.elapsed().as_millis());
                    starts.len()
                };
                tokio::time::sleep(takes).await;
                match calls > busy_after {
                    true => Err(Error::Busy {
                        holder: "other".into(),
                    }),
                    false => Ok(()),
                }
            }
        });
        let stopped = tokio::time::timeout(Duration::from_secs(45), renewer)
            .await
            .is_ok();
        let starts = starts.lock().expect("not poisoned").clone();
        (starts, stopped)
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_start_a_period_apart_however_long_each_takes() {
        // A renewal that takes 8 of the 10 s does not push the next one later.
        assert_eq!(
            renewals(Duration::from_secs(8), usize::MAX).await,
            (vec![10_000, 20_000, 30_000, 40_000], false)
        );
        assert_eq!(
            renewals(Duration::from_millis(50), usize::MAX).await,
            (vec![10_000, 20_000, 30_000, 40_000], false)
        );
        // One that finds the lease taken stops the renewer.
        assert_eq!(
            renewals(Duration::from_millis(50), 2).await,
            (vec![10_000, 20_000, 30_000], true)
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

    #[test]
    fn the_journal_is_written_only_by_the_lease_holder() {
        // The script runs in the node's sh (under flock there); the host's sh proves it.
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("lease");
        let journal_dir = dir.path().join("v1.32.3");
        let journal = journal_dir.join("journal.json");
        let write = |owner: &str, contents: &str| {
            std::process::Command::new("sh")
                .args(["-c", &WRITE_IF_LEASE_HELD, "sh"])
                .arg(&lease)
                .args([owner, journal_dir.to_str().unwrap(), "journal.json", "644"])
                .arg(contents)
                .output()
                .unwrap()
        };

        let without_lease = write("a", "{}");
        assert_eq!(
            without_lease.status.code(),
            Some(journal::LEASE_HELD as i32)
        );
        assert_eq!(String::from_utf8_lossy(&without_lease.stdout), "nobody\n");
        assert!(!journal_dir.exists(), "nothing written without the lease");

        std::fs::write(&lease, "a 4102444800\n").unwrap();
        let by_holder = write("a", "{\"step\":1}");
        assert!(by_holder.status.success(), "{by_holder:?}");
        assert_eq!(String::from_utf8_lossy(&by_holder.stdout), "{\"step\":1}");
        assert_eq!(std::fs::read_to_string(&journal).unwrap(), "{\"step\":1}");

        // The lease passed to b: a's late write changes nothing and says who holds it.
        std::fs::write(&lease, "b 4102444800\n").unwrap();
        let by_former_holder = write("a", "{\"step\":2}");
        assert_eq!(
            by_former_holder.status.code(),
            Some(journal::LEASE_HELD as i32)
        );
        assert_eq!(String::from_utf8_lossy(&by_former_holder.stdout), "b\n");
        assert_eq!(std::fs::read_to_string(&journal).unwrap(), "{\"step\":1}");
        let refused = ExecOutput {
            argv: Vec::new(),
            exit_code: by_former_holder.status.code().unwrap().into(),
            stdout: by_former_holder.stdout,
            stderr: Vec::new(),
            truncated: false,
            output_tail: Vec::new(),
        };
        assert!(matches!(
            lease_guarded(refused, "node"),
            Err(Error::LeaseLost)
        ));
    }
}
