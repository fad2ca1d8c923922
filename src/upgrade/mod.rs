//! The node upgrade engine: a [`plan`] decided from [`facts`] the node shows, executed as ordered
//! [`step`]s, each check → act → verify, recorded in a [`journal`] kept inside the node. [`jobs`]
//! runs upgrades in the background for the polled UpdateMachine hook.

pub mod facts;
pub mod jobs;
pub mod journal;
pub mod plan;
pub mod step;
