//! End-to-end suite for capd-inplace: the simulated kind node and the CAPI-faithful driver.

pub mod bench;
pub mod capi;
pub mod driver;
pub mod extension;
pub mod sim;
pub mod sim_artifacts;
