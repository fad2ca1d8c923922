//! End-to-end suite for capd-inplace: the simulated kind node and the CAPI-faithful driver.

pub mod capi;
