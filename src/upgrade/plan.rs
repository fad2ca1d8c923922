//! Deciding how to upgrade one node, before anything changes: which `kubeadm upgrade` to run and
//! whether the version skew rules allow the upgrade at all.
//!
//! The rules are kubeadm's and Kubernetes' own (see `node-upgrade-choreography.md` §1.4):
//! - kubeadm moves a control plane at most one minor at a time and never downgrades;
//! - a kubelet must never be newer than any kube-apiserver in the cluster, so workers go after
//!   every control-plane node;
//! - `kubeadm upgrade apply` raises the cluster's kubeadm-config; `kubeadm upgrade node` follows it.
//!   Under CAPI, KubeadmControlPlane raises kubeadm-config before touching Machines, so every node
//!   runs `upgrade node`; standalone, the first control-plane node runs `apply`.

use crate::node::Role;
use crate::version::KubeVersion;

/// What preflight read from the node and its cluster.
#[derive(Debug, Clone)]
pub struct Facts {
    pub role: Role,
    /// Versions before this upgrade: from the journal when one exists, else the installed binaries.
    pub kubelet_from: KubeVersion,
    /// `kubernetesVersion` of the cluster's kubeadm-config.
    pub cluster: KubeVersion,
    /// The kube-apiserver version of every control-plane node (from their static pod manifests).
    pub apiservers: Vec<KubeVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How many minors a worker's kubelet may move in one upgrade (kubeadm's rule is 1; the
    /// version skew policy allows a kubelet up to 3 minors behind the API server).
    pub worker_max_minor_step: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            worker_max_minor_step: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeadmMode {
    /// `kubeadm upgrade apply <version>`: upgrades the cluster configuration and this control plane.
    Apply,
    /// `kubeadm upgrade node`: follows the cluster configuration.
    Node,
}

impl KubeadmMode {
    pub fn command(self) -> &'static str {
        match self {
            KubeadmMode::Apply => "kubeadm upgrade apply",
            KubeadmMode::Node => "kubeadm upgrade node",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub role: Role,
    pub mode: KubeadmMode,
}

/// Why an upgrade may not start. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkewError {
    #[error("{target} is older than the node's kubelet {from}: downgrades are not supported")]
    Downgrade {
        from: KubeVersion,
        target: KubeVersion,
    },
    #[error("{from} to {target} skips a minor version; upgrade one minor at a time")]
    SkipsMinor {
        from: KubeVersion,
        target: KubeVersion,
    },
    #[error(
        "the cluster is already at {cluster}, newer than {target}; upgrade this node to {cluster}"
    )]
    ClusterNewer {
        cluster: KubeVersion,
        target: KubeVersion,
    },
    #[error(
        "the control plane runs kube-apiserver {apiserver}, older than {target}; upgrade the control plane first"
    )]
    ControlPlaneBehind {
        apiserver: KubeVersion,
        target: KubeVersion,
    },
    #[error("the cluster has no control-plane node with a kube-apiserver manifest")]
    NoControlPlane,
    #[error(
        "kubeadm {target} is known to break `kubeadm upgrade apply` (it resets the kubelet configuration); use the next patch release"
    )]
    KnownBadKubeadm { target: KubeVersion },
}

fn minor_steps(from: &KubeVersion, to: &KubeVersion) -> u64 {
    if from.major != to.major {
        // Kubernetes has had no major bump; treat one as an unbounded jump.
        return u64::MAX;
    }
    to.minor.saturating_sub(from.minor)
}

pub fn plan(facts: &Facts, target: &KubeVersion, policy: Policy) -> Result<Plan, SkewError> {
    let from = facts.kubelet_from;
    if *target < from {
        return Err(SkewError::Downgrade {
            from,
            target: *target,
        });
    }
    match facts.role {
        Role::ControlPlane => {
            if minor_steps(&from, target) > 1 {
                return Err(SkewError::SkipsMinor {
                    from,
                    target: *target,
                });
            }
            if facts.cluster > *target {
                return Err(SkewError::ClusterNewer {
                    cluster: facts.cluster,
                    target: *target,
                });
            }
            if facts.cluster == *target {
                return Ok(Plan {
                    role: facts.role,
                    mode: KubeadmMode::Node,
                });
            }
            if minor_steps(&facts.cluster, target) > 1 {
                return Err(SkewError::SkipsMinor {
                    from: facts.cluster,
                    target: *target,
                });
            }
            // kubeadm v1.30.0 rewrote /var/lib/kubelet/config.yaml with defaults on apply,
            // dropping kind's kubelet settings (kubernetes/kubeadm#3049).
            if *target
                == (KubeVersion {
                    major: 1,
                    minor: 30,
                    patch: 0,
                })
            {
                return Err(SkewError::KnownBadKubeadm { target: *target });
            }
            Ok(Plan {
                role: facts.role,
                mode: KubeadmMode::Apply,
            })
        }
        Role::Worker => {
            let oldest = facts
                .apiservers
                .iter()
                .min()
                .ok_or(SkewError::NoControlPlane)?;
            // The worker's own refusals first: they stand whatever the control plane does, so a
            // dry run (which expects the control plane to be behind) must not hide them.
            if minor_steps(&from, target) > policy.worker_max_minor_step {
                return Err(SkewError::SkipsMinor {
                    from,
                    target: *target,
                });
            }
            if facts.cluster > *target {
                return Err(SkewError::ClusterNewer {
                    cluster: facts.cluster,
                    target: *target,
                });
            }
            if oldest < target {
                return Err(SkewError::ControlPlaneBehind {
                    apiserver: *oldest,
                    target: *target,
                });
            }
            Ok(Plan {
                role: facts.role,
                mode: KubeadmMode::Node,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> KubeVersion {
        s.parse().unwrap()
    }

    fn facts(role: Role, from: &str, cluster: &str, apiservers: &[&str]) -> Facts {
        Facts {
            role,
            kubelet_from: v(from),
            cluster: v(cluster),
            apiservers: apiservers.iter().map(|s| v(s)).collect(),
        }
    }

    #[test]
    fn decisions() {
        use KubeadmMode::*;
        use Role::*;
        let wide = Policy {
            worker_max_minor_step: 3,
        };
        type Case = (
            &'static str,
            Facts,
            &'static str,
            Policy,
            Result<KubeadmMode, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "first control plane, standalone",
                facts(ControlPlane, "v1.31.4", "v1.31.4", &["v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Ok(Apply),
            ),
            (
                "control plane under CAPI: kubeadm-config already raised",
                facts(ControlPlane, "v1.31.4", "v1.32.3", &["v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Ok(Node),
            ),
            (
                "second control plane after apply",
                facts(ControlPlane, "v1.31.4", "v1.32.3", &["v1.32.3", "v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Ok(Node),
            ),
            (
                "patch upgrade",
                facts(ControlPlane, "v1.31.4", "v1.31.4", &["v1.31.4"]),
                "v1.31.9",
                Policy::default(),
                Ok(Apply),
            ),
            (
                "resume on an already upgraded node",
                facts(ControlPlane, "v1.32.3", "v1.32.3", &["v1.32.3"]),
                "v1.32.3",
                Policy::default(),
                Ok(Node),
            ),
            (
                "downgrade",
                facts(ControlPlane, "v1.32.3", "v1.32.3", &["v1.32.3"]),
                "v1.31.4",
                Policy::default(),
                Err("downgrades are not supported"),
            ),
            (
                "control plane skips a minor",
                facts(ControlPlane, "v1.30.6", "v1.30.6", &["v1.30.6"]),
                "v1.32.3",
                Policy::default(),
                Err("skips a minor"),
            ),
            (
                "cluster newer than target",
                facts(ControlPlane, "v1.31.4", "v1.32.3", &["v1.32.3"]),
                "v1.31.9",
                Policy::default(),
                Err("upgrade this node to v1.32.3"),
            ),
            (
                "apply to v1.30.0",
                facts(ControlPlane, "v1.29.9", "v1.29.9", &["v1.29.9"]),
                "v1.30.0",
                Policy::default(),
                Err("known to break"),
            ),
            (
                "worker after the control plane",
                facts(Worker, "v1.31.4", "v1.32.3", &["v1.32.3"]),
                "v1.32.3",
                Policy::default(),
                Ok(Node),
            ),
            (
                "worker before the control plane",
                facts(Worker, "v1.31.4", "v1.31.4", &["v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Err("upgrade the control plane first"),
            ),
            (
                "worker while one apiserver lags",
                facts(Worker, "v1.31.4", "v1.32.3", &["v1.32.3", "v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Err("kube-apiserver v1.31.4"),
            ),
            (
                "worker jumping two minors by default",
                facts(Worker, "v1.30.6", "v1.32.3", &["v1.32.3"]),
                "v1.32.3",
                Policy::default(),
                Err("skips a minor"),
            ),
            (
                // A dry run expects the control plane behind; this refusal must still show.
                "worker jumping two minors while the control plane is behind",
                facts(Worker, "v1.30.6", "v1.31.4", &["v1.31.4"]),
                "v1.32.3",
                Policy::default(),
                Err("skips a minor"),
            ),
            (
                "worker jumping two minors when widened",
                facts(Worker, "v1.30.6", "v1.32.3", &["v1.32.3"]),
                "v1.32.3",
                wide,
                Ok(Node),
            ),
            (
                "worker with no control plane found",
                facts(Worker, "v1.31.4", "v1.32.3", &[]),
                "v1.32.3",
                Policy::default(),
                Err("no control-plane node"),
            ),
        ];
        for (name, facts, target, policy, want) in cases {
            let got = plan(&facts, &v(target), policy);
            match (got, want) {
                (Ok(plan), Ok(mode)) => assert_eq!(plan.mode, mode, "{name}"),
                (Err(err), Err(fragment)) => {
                    assert!(err.to_string().contains(fragment), "{name}: {err}")
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
