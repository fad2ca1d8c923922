//! Prometheus metrics, served as OpenMetrics text on `GET /metrics`.
//!
//! Every label has a closed set of values (hook names, results, step ids, fixed decision reasons),
//! so the number of series stays small whatever the cluster does. Machine names are never labels:
//! they would grow without bound, and Events on the Machine already carry the per-Machine story.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::upgrade::step::Step;

/// The content type of the OpenMetrics text exposition, which Prometheus negotiates by default.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Step durations range from a file check (tens of milliseconds) to a drain or a wait for the
/// Node to turn Ready (many minutes), so the buckets span 0.05 s to 15 min.
const STEP_DURATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0,
];

pub use crate::hooks::types::Hook;

/// The metric label of a hook: its handler name, as in the request path.
fn hook_label(hook: Hook) -> &'static str {
    match hook {
        Hook::Discovery => "discovery",
        Hook::CanUpdateMachine => "can-update-machine",
        Hook::CanUpdateMachineSet => "can-update-machineset",
        Hook::UpdateMachine => "update-machine",
    }
}

/// How a hook call was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookResult {
    /// `Success` on Discovery and the CanUpdate hooks.
    Success,
    /// `Failure`, including undecodable requests.
    Failure,
    /// UpdateMachine `Success` with `retryAfterSeconds > 0`.
    InProgress,
    /// UpdateMachine `Success` with `retryAfterSeconds 0`.
    Done,
}

impl HookResult {
    pub fn as_str(self) -> &'static str {
        match self {
            HookResult::Success => "success",
            HookResult::Failure => "failure",
            HookResult::InProgress => "in-progress",
            HookResult::Done => "done",
        }
    }
}

/// What a CanUpdate hook decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered with patches: the change will be made in place.
    InPlace,
    /// Answered `Success` without patches: CAPI falls back to a rollout.
    Declined,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InPlace => "in_place",
            Outcome::Declined => "declined",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HookLabels {
    hook: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    hook: &'static str,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

type StepHistograms = Family<StepLabels, Histogram, fn() -> Histogram>;

fn step_duration_histogram() -> Histogram {
    Histogram::new(STEP_DURATION_BUCKETS)
}

struct Inner {
    registry: Registry,
    hook_requests: Family<HookLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    upgrades_started: Counter,
    upgrades_succeeded: Counter,
    upgrades_failed: Family<StepLabels, Counter>,
    step_duration: StepHistograms,
    upgrades_in_flight: Gauge,
    artifact_cache_hits: Counter,
    artifact_cache_misses: Counter,
    artifact_downloaded_bytes: Counter,
}

/// The process's metrics. Cheap to clone; all clones feed the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("capd_inplace");

        let hook_requests = Family::<HookLabels, Counter>::default();
        registry.register(
            "hook_requests",
            "Runtime Extension hook calls answered, by hook and result",
            hook_requests.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "CanUpdate decisions, by hook, outcome (in_place or declined) and reason",
            decisions.clone(),
        );
        let upgrades_started = Counter::default();
        registry.register(
            "upgrades_started",
            "In-place node upgrades started",
            upgrades_started.clone(),
        );
        let upgrades_succeeded = Counter::default();
        registry.register(
            "upgrades_succeeded",
            "In-place node upgrades that completed and verified",
            upgrades_succeeded.clone(),
        );
        let upgrades_failed = Family::<StepLabels, Counter>::default();
        registry.register(
            "upgrades_failed",
            "In-place node upgrade attempts that failed, by the step that failed",
            upgrades_failed.clone(),
        );
        let step_duration: StepHistograms = Family::new_with_constructor(step_duration_histogram);
        registry.register_with_unit(
            "step_duration",
            "Time spent in each upgrade step, whether it succeeded or failed",
            Unit::Seconds,
            step_duration.clone(),
        );
        let upgrades_in_flight = Gauge::default();
        registry.register(
            "upgrades_in_flight",
            "In-place node upgrades running now",
            upgrades_in_flight.clone(),
        );
        let artifact_cache_hits = Counter::default();
        registry.register(
            "artifact_cache_hits",
            "Kubernetes binaries served from the local verified cache",
            artifact_cache_hits.clone(),
        );
        let artifact_cache_misses = Counter::default();
        registry.register(
            "artifact_cache_misses",
            "Kubernetes binaries that had to be downloaded",
            artifact_cache_misses.clone(),
        );
        let artifact_downloaded_bytes = Counter::default();
        registry.register_with_unit(
            "artifact_downloaded",
            "Bytes of Kubernetes binaries downloaded into the cache",
            Unit::Bytes,
            artifact_downloaded_bytes.clone(),
        );

        // A failure counter that first appears at 1 hides the failure from `increase()`, so every
        // step starts at 0 and the first failure is visible to alerts.
        for step in Step::ALL {
            upgrades_failed.get_or_create_owned(&StepLabels { step: step.id() });
        }

        Metrics {
            inner: Arc::new(Inner {
                registry,
                hook_requests,
                decisions,
                upgrades_started,
                upgrades_succeeded,
                upgrades_failed,
                step_duration,
                upgrades_in_flight,
                artifact_cache_hits,
                artifact_cache_misses,
                artifact_downloaded_bytes,
            }),
        }
    }

    /// Counts one answered hook call.
    pub fn hook_request(&self, hook: Hook, result: HookResult) {
        self.inner
            .hook_requests
            .get_or_create(&HookLabels {
                hook: hook_label(hook),
                result: result.as_str(),
            })
            .inc();
    }

    /// Counts one CanUpdate decision. `reason` is a fixed identifier such as `version_change`,
    /// `disabled` or `skips_minor`, never text built from the request.
    pub fn decision(&self, hook: Hook, outcome: Outcome, reason: &'static str) {
        self.inner
            .decisions
            .get_or_create(&DecisionLabels {
                hook: hook_label(hook),
                outcome: outcome.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts an upgrade as started and as in flight until the returned guard is dropped, so the
    /// gauge cannot drift when a job ends by an early return, a panic or a shutdown.
    #[must_use = "the upgrade counts as in flight only while the guard lives"]
    pub fn upgrade_started(&self) -> InFlight {
        self.inner.upgrades_started.inc();
        self.inner.upgrades_in_flight.inc();
        InFlight {
            gauge: self.inner.upgrades_in_flight.clone(),
        }
    }

    pub fn upgrade_succeeded(&self) {
        self.inner.upgrades_succeeded.inc();
    }

    pub fn upgrade_failed(&self, step: Step) {
        self.inner
            .upgrades_failed
            .get_or_create(&StepLabels { step: step.id() })
            .inc();
    }

    pub fn observe_step_duration(&self, step: Step, elapsed: Duration) {
        self.inner
            .step_duration
            .get_or_create(&StepLabels { step: step.id() })
            .observe(elapsed.as_secs_f64());
    }

    /// Brings the artifact counters up to the cache's cumulative totals.
    ///
    /// The cache keeps its own running totals, so this takes snapshots rather than increments.
    /// A counter only moves forward (`fetch_max`): a stale or reordered snapshot changes nothing,
    /// and concurrent callers cannot double count.
    pub fn set_artifact_stats(&self, hits: u64, misses: u64, downloaded_bytes: u64) {
        for (counter, total) in [
            (&self.inner.artifact_cache_hits, hits),
            (&self.inner.artifact_cache_misses, misses),
            (&self.inner.artifact_downloaded_bytes, downloaded_bytes),
        ] {
            counter.inner().fetch_max(total, Ordering::Relaxed);
        }
    }

    /// The whole registry in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and every metric here encodes infallibly.
        encode(&mut text, &self.inner.registry).expect("encoding metrics into a String");
        text
    }
}

/// Marks one upgrade as in flight; dropping it takes the upgrade off the gauge.
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A router that serves `GET /metrics`. Merge it into the plain-HTTP server (or the hooks router).
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(metrics)
}

async fn serve_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], metrics.encode())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that meets an unexpected error should stop right there
mod tests {
    use super::*;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    /// The sample lines of one metric family (everything that is not a comment).
    fn samples(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn hook_requests_are_counted_by_hook_and_result() {
        let metrics = Metrics::new();
        metrics.hook_request(Hook::UpdateMachine, HookResult::InProgress);
        metrics.hook_request(Hook::UpdateMachine, HookResult::InProgress);
        metrics.hook_request(Hook::UpdateMachine, HookResult::Done);
        metrics.hook_request(Hook::CanUpdateMachineSet, HookResult::Failure);
        metrics.hook_request(Hook::Discovery, HookResult::Success);

        let text = metrics.encode();
        let mut lines = samples(&text, "capd_inplace_hook_requests_total");
        lines.sort();
        assert_eq!(
            lines,
            [
                r#"capd_inplace_hook_requests_total{hook="can-update-machineset",result="failure"} 1"#,
                r#"capd_inplace_hook_requests_total{hook="discovery",result="success"} 1"#,
                r#"capd_inplace_hook_requests_total{hook="update-machine",result="done"} 1"#,
                r#"capd_inplace_hook_requests_total{hook="update-machine",result="in-progress"} 2"#,
            ]
        );
        assert!(text.contains("# TYPE capd_inplace_hook_requests counter\n"));
    }

    #[test]
    fn decisions_carry_hook_outcome_and_reason() {
        let metrics = Metrics::new();
        metrics.decision(Hook::CanUpdateMachine, Outcome::InPlace, "version_change");
        metrics.decision(Hook::CanUpdateMachine, Outcome::Declined, "skips_minor");
        metrics.decision(Hook::CanUpdateMachine, Outcome::Declined, "skips_minor");
        metrics.decision(Hook::CanUpdateMachineSet, Outcome::Declined, "disabled");

        let mut lines = samples(&metrics.encode(), "capd_inplace_decisions_total");
        lines.sort();
        assert_eq!(
            lines,
            [
                r#"capd_inplace_decisions_total{hook="can-update-machine",outcome="declined",reason="skips_minor"} 2"#,
                r#"capd_inplace_decisions_total{hook="can-update-machine",outcome="in_place",reason="version_change"} 1"#,
                r#"capd_inplace_decisions_total{hook="can-update-machineset",outcome="declined",reason="disabled"} 1"#,
            ]
        );
    }

    #[test]
    fn upgrade_lifecycle_moves_counters_and_the_in_flight_gauge() {
        let metrics = Metrics::new();
        let first = metrics.upgrade_started();
        let second = metrics.upgrade_started();
        let text = metrics.encode();
        assert_eq!(
            samples(&text, "capd_inplace_upgrades_started_total"),
            ["capd_inplace_upgrades_started_total 2"]
        );
        assert_eq!(
            samples(&text, "capd_inplace_upgrades_in_flight"),
            ["capd_inplace_upgrades_in_flight 2"]
        );

        metrics.upgrade_succeeded();
        drop(first);
        metrics.upgrade_failed(Step::KubeadmUpgrade);
        drop(second);

        let text = metrics.encode();
        assert_eq!(
            samples(&text, "capd_inplace_upgrades_in_flight"),
            ["capd_inplace_upgrades_in_flight 0"]
        );
        assert_eq!(
            samples(&text, "capd_inplace_upgrades_succeeded_total"),
            ["capd_inplace_upgrades_succeeded_total 1"]
        );
        let failed = samples(&text, "capd_inplace_upgrades_failed_total");
        assert!(
            failed.contains(
                &r#"capd_inplace_upgrades_failed_total{step="kubeadm-upgrade"} 1"#.to_owned()
            ),
            "{failed:?}"
        );
    }

    #[test]
    fn every_step_has_a_failure_series_from_the_start() {
        let text = Metrics::new().encode();
        let failed = samples(&text, "capd_inplace_upgrades_failed_total");
        assert_eq!(failed.len(), Step::ALL.len());
        for step in Step::ALL {
            let line = format!(
                r#"capd_inplace_upgrades_failed_total{{step="{}"}} 0"#,
                step.id()
            );
            assert!(failed.contains(&line), "missing {line} in {failed:?}");
        }
    }

    #[tokio::test]
    async fn in_flight_guard_decrements_even_when_the_job_panics() {
        let metrics = Metrics::new();
        let job_metrics = metrics.clone();
        let job = tokio::spawn(async move {
            let _in_flight = job_metrics.upgrade_started();
            panic!("job blew up");
        });
        assert!(job.await.unwrap_err().is_panic());
        assert_eq!(
            samples(&metrics.encode(), "capd_inplace_upgrades_in_flight"),
            ["capd_inplace_upgrades_in_flight 0"]
        );
    }

    #[test]
    fn step_durations_land_in_the_right_buckets() {
        let metrics = Metrics::new();
        metrics.observe_step_duration(Step::Drain, Duration::from_millis(40));
        metrics.observe_step_duration(Step::Drain, Duration::from_secs(200));
        metrics.observe_step_duration(Step::Drain, Duration::from_secs(3600));

        let text = metrics.encode();
        assert!(text.contains("# UNIT capd_inplace_step_duration_seconds seconds\n"));
        assert!(text.contains("# TYPE capd_inplace_step_duration_seconds histogram\n"));
        let lines = samples(&text, "capd_inplace_step_duration_seconds_bucket");
        let bucket = |le: &str| {
            let prefix =
                format!(r#"capd_inplace_step_duration_seconds_bucket{{le="{le}",step="drain"}} "#);
            lines
                .iter()
                .find_map(|line| line.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in {lines:?}"))
                .to_owned()
        };
        assert_eq!(bucket("0.05"), "1");
        assert_eq!(bucket("120.0"), "1");
        assert_eq!(bucket("300.0"), "2");
        assert_eq!(bucket("900.0"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert_eq!(
            samples(&text, "capd_inplace_step_duration_seconds_count"),
            [r#"capd_inplace_step_duration_seconds_count{step="drain"} 3"#]
        );
        assert_eq!(
            samples(&text, "capd_inplace_step_duration_seconds_sum"),
            [r#"capd_inplace_step_duration_seconds_sum{step="drain"} 3800.04"#]
        );
    }

    #[test]
    fn artifact_stats_follow_the_cache_totals_and_never_go_back() {
        let metrics = Metrics::new();
        metrics.set_artifact_stats(2, 3, 1_000);
        metrics.set_artifact_stats(5, 3, 4_096);
        // A stale snapshot arriving late must not make a counter go backwards.
        metrics.set_artifact_stats(4, 1, 10);

        let text = metrics.encode();
        assert_eq!(
            samples(&text, "capd_inplace_artifact_cache_hits_total"),
            ["capd_inplace_artifact_cache_hits_total 5"]
        );
        assert_eq!(
            samples(&text, "capd_inplace_artifact_cache_misses_total"),
            ["capd_inplace_artifact_cache_misses_total 3"]
        );
        assert_eq!(
            samples(&text, "capd_inplace_artifact_downloaded_bytes_total"),
            ["capd_inplace_artifact_downloaded_bytes_total 4096"]
        );
    }

    #[test]
    fn a_fresh_registry_lists_every_unlabelled_metric_and_ends_with_eof() {
        // Labelled families other than the failures appear with their first series.
        let text = Metrics::new().encode();
        for family in [
            "# TYPE capd_inplace_upgrades_started counter",
            "# TYPE capd_inplace_upgrades_succeeded counter",
            "# TYPE capd_inplace_upgrades_failed counter",
            "# TYPE capd_inplace_upgrades_in_flight gauge",
            "# TYPE capd_inplace_artifact_cache_hits counter",
            "# TYPE capd_inplace_artifact_cache_misses counter",
            "# TYPE capd_inplace_artifact_downloaded_bytes counter",
            "# UNIT capd_inplace_artifact_downloaded_bytes bytes",
        ] {
            assert!(text.contains(family), "missing {family:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn the_router_serves_openmetrics_text() {
        let metrics = Metrics::new();
        metrics.hook_request(Hook::CanUpdateMachine, HookResult::Success);
        let response = metrics_router(metrics)
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE].to_str().unwrap(),
            OPENMETRICS_CONTENT_TYPE
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains(
                r#"capd_inplace_hook_requests_total{hook="can-update-machine",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn the_router_answers_only_get_on_metrics() {
        let router = metrics_router(Metrics::new());
        let post = router
            .clone()
            .oneshot(Request::post("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        let other = router
            .oneshot(Request::get("/other").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
    }
}
