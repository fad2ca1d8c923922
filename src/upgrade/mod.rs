//! The node upgrade engine: a [`plan`] decided from [`facts`] the node shows, executed as ordered
//! [`step`]s, each check → act → verify ([`run`]), recorded in a [`journal`] kept inside the
//! node. [`jobs`] runs upgrades in the background for the polled UpdateMachine hook. The stage
//! step can also run alone ([`Engine::stage`]), to place the binaries ahead of time.

pub mod cluster;
pub mod facts;
pub mod jobs;
pub mod journal;
pub mod plan;
pub mod run;
mod stage;
pub mod step;

use std::time::Duration;

use crate::node::Role;

pub use run::{Engine, NodeTarget, Options, Outcome, Source, Timeouts};
pub use step::Step;

/// Why a step could not complete. Display strings are short and deterministic, because they end
/// up in the Machine's `Updating` condition; detail goes to the logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Node(#[from] crate::node::Error),
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::Error),
    #[error(transparent)]
    Parse(#[from] facts::ParseError),
    #[error(transparent)]
    Skew(#[from] plan::SkewError),
    #[error("another upgrader ({holder}) is working on this node; it will be retried")]
    Busy { holder: String },
    #[error("the node lease was lost to another upgrader; it will be retried")]
    LeaseLost,
    #[error("container {container} is labelled {label:?} but its files say {found:?}")]
    RoleMismatch {
        container: String,
        label: Role,
        found: Role,
    },
    #[error("no running control-plane node of the cluster has /etc/kubernetes/admin.conf")]
    NoControlPlane,
    #[error("the journal {path} is unreadable; inspect it, or remove it to start the upgrade over")]
    CorruptJournal { path: String },
    #[error("{url} does not match its published sha256 {expected}; nothing was installed")]
    ChecksumMismatch { url: String, expected: String },
    #[error("the node could not download {url} ({said}); nothing was staged")]
    Download { url: String, said: String },
    #[error("timed out after {}s waiting for {what}", after.as_secs())]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Verify(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error`] with the step and the container it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{} failed on {container}: {source}", step_title(*step))]
pub struct StepError {
    pub step: Step,
    pub container: String,
    #[source]
    pub source: Error,
}

fn step_title(step: Step) -> String {
    format!("step {}/{} {}", step.number(), Step::total(), step.label())
}
