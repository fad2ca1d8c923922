//! capd-inplace: in-place Kubernetes upgrades of Cluster API Docker (CAPD) and kind nodes.
//!
//! The crate has two faces. As a Cluster API Runtime Extension ([`hooks`]) it answers the
//! in-place update hooks; as a CLI it upgrades a cluster's nodes directly. Both drive the same
//! engine ([`upgrade`]), which reaches nodes only through the Docker Engine API ([`node`]) and
//! gets Kubernetes binaries through a verified cache ([`artifacts`]).

pub mod artifacts;
pub mod hooks;
mod idle;
pub mod node;
pub mod telemetry;
pub mod upgrade;
pub mod version;
