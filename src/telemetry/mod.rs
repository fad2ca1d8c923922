//! Observability beyond logs: Prometheus [`metrics`] on `GET /metrics`, and Kubernetes
//! [`events`] on the Machines being upgraded.
//!
//! # Metrics
//!
//! All names carry the `capd_inplace_` prefix. Label values come from closed sets, never from
//! Machine or cluster names.
//!
//! | Metric | Type | Labels | Meaning |
//! |---|---|---|---|
//! | `capd_inplace_hook_requests_total` | counter | `hook` (`discovery`, `can-update-machine`, `can-update-machineset`, `update-machine`), `result` (`success`, `failure`, `in-progress`, `done`) | Hook calls answered. `in-progress` and `done` are UpdateMachine's `Success` with and without `retryAfterSeconds`. |
//! | `capd_inplace_decisions_total` | counter | `hook`, `outcome` (`in_place`, `declined`), `reason` (`version_change`, `no_change`, `settings`, `unsupported_object`, `not_version_change`, `unrelated_image`, `invalid_version`, `downgrade`, `skips_minor`, `major_change`) | What the CanUpdate hooks decided and why. A decline makes CAPI roll the Machine out instead. |
//! | `capd_inplace_upgrades_started_total` | counter | | Node upgrades started. |
//! | `capd_inplace_upgrades_succeeded_total` | counter | | Node upgrades that completed and verified. |
//! | `capd_inplace_upgrades_failed_total` | counter | `step` (a step id such as `kubeadm-upgrade`) | Upgrade attempts that failed, by failing step. Every step's series exists from the start at 0. |
//! | `capd_inplace_step_duration_seconds` | histogram | `step` | Time per upgrade step, successful or not; buckets from 0.05 s to 15 min. |
//! | `capd_inplace_upgrades_in_flight` | gauge | | Node upgrades running now. |
//! | `capd_inplace_artifact_cache_hits_total` | counter | | Kubernetes binaries served from the local verified cache. |
//! | `capd_inplace_artifact_cache_misses_total` | counter | | Kubernetes binaries that had to be downloaded. |
//! | `capd_inplace_artifact_downloaded_bytes_total` | counter | | Bytes downloaded into the artifact cache. |
//!
//! # Events
//!
//! `events.k8s.io/v1` Events regarding the Machine (`cluster.x-k8s.io/v1beta2`), reported by
//! controller `capd-inplace` with the Pod name as instance:
//!
//! | Reason | Type | Action | When |
//! |---|---|---|---|
//! | `InPlaceUpgradeStarted` | Normal | `Upgrade` | an upgrade starts |
//! | `InPlaceUpgradeStep` | Normal | the step id | each step starts; the note is the progress message |
//! | `InPlaceUpgradeFailed` | Warning | the failing step id | an attempt fails; the note is the failure message |
//! | `InPlaceUpgradeSucceeded` | Normal | `Upgrade` | the Node verified at the target version |
//!
//! Identical Events within 6 minutes are one Event with a `series` count. Outside a cluster
//! (no `KUBERNETES_SERVICE_HOST`) Events are off.

pub mod events;
mod logging;
pub mod metrics;

pub use logging::{CLI_FILTER, Error, LogFormat, SERVER_FILTER, init};

pub use events::{EventSink, EventType};
pub use metrics::{Hook, HookResult, InFlight, Metrics, Outcome, metrics_router};
