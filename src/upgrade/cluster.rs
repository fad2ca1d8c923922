//! Upgrading and inspecting a whole cluster, for the standalone CLI.
//!
//! Without CAPI there is no KubeadmControlPlane to order the work, so this module does what
//! kubeadm's documentation prescribes: control-plane nodes one at a time (the first one runs
//! `kubeadm upgrade apply`, as [`plan`](super::plan) decides from the cluster configuration), then
//! the workers, a few at a time. A control-plane failure stops the run before any worker is
//! touched, because a kubelet must never be newer than an API server.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

use super::jobs::Progress;
use super::journal::{self, Journal};
use super::plan::{KubeadmMode, SkewError};
use super::run::{Engine, NodeTarget, Options, Outcome, Preview, exec_ok, tool_version};
use super::step::Step;
use super::{Error, StepError, facts};
use crate::artifacts::Binary;
use crate::node::{Command, Docker, DockerNode, NodeExec, Role};
use crate::version::KubeVersion;

/// Called whenever a node's progress changes: `(node name, progress)`.
pub type ProgressFn = Arc<dyn Fn(&str, &Progress) + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResult {
    pub node: String,
    pub role: Role,
    pub outcome: NodeOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum NodeOutcome {
    AlreadyAtTarget,
    Upgraded,
    /// `stage`: the binaries are in place and verified; nothing that runs was changed.
    Staged,
    Failed {
        message: String,
    },
    /// Not attempted because an earlier control-plane node failed.
    Skipped,
    /// `--dry-run`: what would happen. `from` is unknown for a worker whose preflight can only pass once the control plane is
    /// upgraded.
    WouldUpgrade {
        mode: String,
        from: Option<String>,
    },
}

impl NodeOutcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, NodeOutcome::Failed { .. })
    }
}

/// The nodes of `cluster`, control planes first.
pub async fn nodes(docker: &Docker, cluster: &str) -> Result<Vec<DockerNode>, Error> {
    let nodes = docker.cluster_nodes(cluster).await?;
    if nodes.is_empty() {
        return Err(Error::Verify(format!(
            "no node containers carry the label io.x-k8s.kind.cluster={cluster}"
        )));
    }
    Ok(nodes)
}

/// Upgrades every node of `cluster` to `version`.
pub async fn upgrade(
    engine: &Engine,
    cluster: &str,
    version: KubeVersion,
    options: &Options,
    workers_parallel: usize,
    dry_run: bool,
    on_progress: ProgressFn,
) -> Result<Vec<NodeResult>, Error> {
    let all = nodes(engine.docker(), cluster).await?;
    let (control_planes, workers): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|n| n.role() == Role::ControlPlane);
    let target_of = |node: &DockerNode| NodeTarget {
        cluster: cluster.to_string(),
        container: node.name().to_string(),
        version,
        machine: None,
    };

    let mut results = Vec::new();
    let mut control_plane_failed = false;
    for node in &control_planes {
        if control_plane_failed {
            results.push(result(node, NodeOutcome::Skipped));
            continue;
        }
        let outcome = one(
            engine,
            &target_of(node),
            options,
            dry_run,
            would_upgrade(&results),
            &on_progress,
        )
        .await;
        control_plane_failed = outcome.is_failure();
        results.push(result(node, outcome));
    }
    if control_plane_failed {
        results.extend(workers.iter().map(|n| result(n, NodeOutcome::Skipped)));
        return Ok(results);
    }
    // In a dry run nothing is upgraded, so workers would fail the "control plane first" rule;
    // report them as upgrading after the control plane instead.
    let control_plane_pending = would_upgrade(&results);
    let worker_results: Vec<NodeResult> = futures::stream::iter(workers.iter())
        .map(|node| {
            let target = target_of(node);
            let on_progress = on_progress.clone();
            async move {
                let outcome = one(
                    engine,
                    &target,
                    options,
                    dry_run,
                    control_plane_pending,
                    &on_progress,
                )
                .await;
                result(node, outcome)
            }
        })
        .buffered(workers_parallel.max(1))
        .collect()
        .await;
    results.extend(worker_results);
    Ok(results)
}

/// Stages `version`'s binaries in every node of `cluster`, `parallel` nodes at a time. Staging
/// changes nothing that runs, so no order between control planes and workers is needed.
pub async fn stage(
    engine: &Engine,
    cluster: &str,
    version: KubeVersion,
    options: &Options,
    parallel: usize,
    on_progress: ProgressFn,
) -> Result<Vec<NodeResult>, Error> {
    let all = nodes(engine.docker(), cluster).await?;
    let results = futures::stream::iter(all.iter())
        .map(|node| {
            let target = NodeTarget {
                cluster: cluster.to_string(),
                container: node.name().to_string(),
                version,
                machine: None,
            };
            let on_progress = on_progress.clone();
            async move {
                on_progress(&target.container, &Progress::Running(Step::Stage));
                let (outcome, last) = match engine.stage(&target, options).await {
                    Ok(()) => (NodeOutcome::Staged, Progress::Done),
                    Err(e) => {
                        let message = e.to_string();
                        (
                            NodeOutcome::Failed {
                                message: message.clone(),
                            },
                            Progress::Failed { message },
                        )
                    }
                };
                on_progress(&target.container, &last);
                result(node, outcome)
            }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    Ok(results)
}

fn result(node: &DockerNode, outcome: NodeOutcome) -> NodeResult {
    NodeResult {
        node: node.name().to_string(),
        role: node.role(),
        outcome,
    }
}

/// Whether a dry run's results so far have a control plane that would upgrade first.
fn would_upgrade(results: &[NodeResult]) -> bool {
    results
        .iter()
        .any(|r| matches!(r.outcome, NodeOutcome::WouldUpgrade { .. }))
}

/// One node's upgrade, or with `dry_run` its preview; `control_plane_pending`: in a dry run, an
/// earlier control plane would upgrade before this node.
async fn one(
    engine: &Engine,
    target: &NodeTarget,
    options: &Options,
    dry_run: bool,
    control_plane_pending: bool,
    on_progress: &ProgressFn,
) -> NodeOutcome {
    if dry_run {
        return match engine.preview(target, options).await {
            Ok(Preview {
                already_at_target: true,
                ..
            }) => NodeOutcome::AlreadyAtTarget,
            // A dry run leaves the cluster at its version, so every control plane previews
            // `kubeadm upgrade apply`; only the first would run it, the others join after it.
            Ok(preview) if control_plane_pending && preview.mode == KubeadmMode::Apply => {
                NodeOutcome::WouldUpgrade {
                    mode: format!(
                        "{} after the first control plane",
                        KubeadmMode::Node.command()
                    ),
                    from: Some(preview.from),
                }
            }
            Ok(preview) => NodeOutcome::WouldUpgrade {
                mode: preview.mode.command().to_string(),
                from: Some(preview.from),
            },
            Err(StepError {
                source: Error::Skew(SkewError::ControlPlaneBehind { .. }),
                ..
            }) if control_plane_pending => NodeOutcome::WouldUpgrade {
                mode: format!("{} after the control plane", KubeadmMode::Node.command()),
                from: None,
            },
            Err(e) => NodeOutcome::Failed {
                message: e.to_string(),
            },
        };
    }
    let (tx, mut rx) = watch::channel(Progress::Queued);
    let forward = {
        let on_progress = on_progress.clone();
        let name = target.container.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let progress = rx.borrow_and_update().clone();
                on_progress(&name, &progress);
            }
        })
    };
    let outcome = engine.upgrade(target, options, &tx).await;
    drop(tx);
    let _ = forward.await;
    let outcome = match outcome {
        Ok(Outcome::AlreadyAtTarget) => NodeOutcome::AlreadyAtTarget,
        Ok(Outcome::Upgraded) => NodeOutcome::Upgraded,
        Err(e) => NodeOutcome::Failed {
            message: e.to_string(),
        },
    };
    let last = match &outcome {
        NodeOutcome::Failed { message } => Progress::Failed {
            message: message.clone(),
        },
        _ => Progress::Done,
    };
    on_progress(&target.container, &last);
    outcome
}

/// One row of `capd-inplace status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    pub role: Role,
    pub kubelet_version: Option<String>,
    pub kubeadm_version: Option<String>,
    pub ready: Option<bool>,
    pub cordoned: Option<bool>,
    /// The newest journal in the node, if an upgrade ever ran there.
    pub upgrade: Option<UpgradeReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    pub target: String,
    /// The step an operator should look at, or "done".
    pub step: String,
    pub last_error: Option<String>,
}

/// Reads what each node of `cluster` shows: versions, the Node's state, and its journal.
/// Every field is best effort, so a broken node still gets a row.
pub async fn status(docker: &Docker, cluster: &str) -> Result<Vec<NodeReport>, Error> {
    let nodes = nodes(docker, cluster).await?;
    let quick = Duration::from_secs(30);
    let mut node_objects = Vec::new();
    for cp in nodes.iter().filter(|n| n.role() == Role::ControlPlane) {
        let get = Command::new([
            "kubectl",
            "--kubeconfig",
            "/etc/kubernetes/admin.conf",
            "get",
            "nodes",
            "-o",
            "json",
        ]);
        if let Ok(json) = exec_ok(cp, get, quick).await
            && let Ok(list) = facts::nodes(&json)
        {
            node_objects = list;
            break;
        }
    }
    let mut reports = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let object = node_objects.iter().find(|n| n.name == node.name());
        let kubeadm = tool_version(node, Binary::Kubeadm, "kubeadm", quick)
            .await
            .ok()
            .map(|v| v.to_string());
        reports.push(NodeReport {
            node: node.name().to_string(),
            role: node.role(),
            kubelet_version: object.map(|n| n.kubelet_version.clone()),
            kubeadm_version: kubeadm,
            ready: object.map(|n| n.ready),
            cordoned: object.map(|n| n.unschedulable),
            upgrade: newest_journal(node, quick)
                .await
                .map(|journal| UpgradeReport {
                    step: journal
                        .current_step()
                        .map_or_else(|| "done".to_string(), |s: Step| s.to_string()),
                    last_error: journal.last_error.map(|e| e.message),
                    target: journal.target,
                }),
        });
    }
    Ok(reports)
}

/// The journal of the newest version that has one: `stage` makes a version's directory without
/// a journal, and must not hide an unfinished upgrade to an older version.
async fn newest_journal(node: &DockerNode, timeout: Duration) -> Option<Journal> {
    let find = Command::new([
        "find",
        journal::ROOT,
        "-mindepth",
        "2",
        "-maxdepth",
        "2",
        "-name",
        journal::FILE_NAME,
    ]);
    let listing = exec_ok(node, find, timeout).await.ok()?;
    let newest: KubeVersion = listing
        .lines()
        .filter_map(|path| {
            let version = path.trim().strip_suffix(journal::FILE_NAME)?;
            version
                .trim_end_matches('/')
                .rsplit('/')
                .next()?
                .parse()
                .ok()
        })
        .max()?;
    let path = journal::Paths::new(&newest).journal();
    let json = exec_ok(node, Command::new(["cat", path.as_str()]), timeout)
        .await
        .ok()?;
    serde_json::from_str(&json).ok()
}
