//! The steps of a node upgrade, in order.
//!
//! The order follows kubeadm's documented procedure (upgrade kubeadm, `kubeadm upgrade`, drain,
//! kubelet and kubectl, restart, uncordon) with staging first and bookkeeping last. A step's
//! number and label appear in UpdateMachine messages, which CAPI copies into the Machine's
//! `Updating` condition, so they are stable strings.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Preflight,
    Stage,
    InstallKubeadm,
    KubeadmUpgrade,
    Drain,
    InstallKubelet,
    RestartKubelet,
    VerifyNode,
    Uncordon,
    RecordVersion,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Preflight,
        Step::Stage,
        Step::InstallKubeadm,
        Step::KubeadmUpgrade,
        Step::Drain,
        Step::InstallKubelet,
        Step::RestartKubelet,
        Step::VerifyNode,
        Step::Uncordon,
        Step::RecordVersion,
    ];

    /// 1-based position, as shown to users ("step 4/10").
    pub fn number(self) -> usize {
        Step::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(0, |i| i + 1)
    }

    pub fn total() -> usize {
        Step::ALL.len()
    }

    /// The stable identifier used in the journal, metrics and logs.
    pub fn id(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Stage => "stage",
            Step::InstallKubeadm => "install-kubeadm",
            Step::KubeadmUpgrade => "kubeadm-upgrade",
            Step::Drain => "drain",
            Step::InstallKubelet => "install-kubelet",
            Step::RestartKubelet => "restart-kubelet",
            Step::VerifyNode => "verify-node",
            Step::Uncordon => "uncordon",
            Step::RecordVersion => "record-version",
        }
    }

    /// A short human label for progress messages.
    pub fn label(self) -> &'static str {
        match self {
            Step::Preflight => "preflight checks",
            Step::Stage => "stage kubeadm, kubelet and kubectl",
            Step::InstallKubeadm => "install kubeadm",
            Step::KubeadmUpgrade => "kubeadm upgrade",
            Step::Drain => "cordon and drain",
            Step::InstallKubelet => "install kubelet and kubectl",
            Step::RestartKubelet => "restart kubelet",
            Step::VerifyNode => "wait for the Node to be Ready at the target version",
            Step::Uncordon => "uncordon",
            Step::RecordVersion => "record /kind/version",
        }
    }

    /// Whether finishing this step is written to the journal (by the next exec that changes the
    /// node, ahead of the change, or by the one that releases the lease). Steps whose effect the
    /// node shows (binary versions, the running kubelet's version) are re-checked on resume and
    /// need no record; these are the ones whose completion the node cannot show (a worker's
    /// `kubeadm upgrade node`, our drain and uncordon, the end), plus the long ones, so `status`
    /// stays close to the truth. A record costs no exec of its own: a worker's drain and uncordon
    /// run in the control plane, and each is preceded by an exec in the worker that checks its
    /// lease, which carries the record.
    pub fn recorded(self) -> bool {
        matches!(
            self,
            Step::Stage | Step::KubeadmUpgrade | Step::Drain | Step::Uncordon | Step::RecordVersion
        )
    }

    /// How soon CAPI should poll again while this step runs: long steps get long intervals so
    /// polling costs nothing, short ones short intervals so completion is seen quickly.
    pub fn retry_after(self) -> Duration {
        match self {
            Step::KubeadmUpgrade | Step::Drain => Duration::from_secs(10),
            Step::Stage | Step::VerifyNode => Duration::from_secs(5),
            _ => Duration::from_secs(2),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {}/{}: {}",
            self.number(),
            Step::total(),
            self.label()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_is_dense_and_ordered() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(step.number(), i + 1);
            if i > 0 {
                assert!(Step::ALL[i - 1] < *step);
            }
        }
        assert_eq!(
            Step::KubeadmUpgrade.to_string(),
            "step 4/10: kubeadm upgrade"
        );
    }

    #[test]
    fn ids_round_trip_through_serde() {
        for step in Step::ALL {
            let json = serde_json::to_string(&step).unwrap();
            assert_eq!(json, format!("\"{}\"", step.id()));
            assert_eq!(serde_json::from_str::<Step>(&json).unwrap(), step);
        }
    }
}
