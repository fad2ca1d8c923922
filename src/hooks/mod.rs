//! The Cluster API Runtime Extension: wire types, the in-place decision, the router and the server.
//!
//! * [`types`]: `hooks.runtime.cluster.x-k8s.io/v1alpha1` requests and responses.
//! * [`settings`]: the ExtensionConfig `spec.settings` this extension reads.
//! * [`can_update`]: CanUpdateMachine and CanUpdateMachineSet, pure policy and patches.
//! * [`update_machine`]: the seam where the upgrade engine answers UpdateMachine.
//! * [`scan`]: reading request bodies without building what no hook reads.
//! * [`router`]: routes and Discovery from one handler list.
//! * [`server`]: HTTPS with certificate reload, health probes and graceful shutdown.

pub mod can_update;
pub mod router;
pub mod scan;
pub mod server;
pub mod settings;
pub mod types;
pub mod update_machine;
