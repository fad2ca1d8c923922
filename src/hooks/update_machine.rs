//! The UpdateMachine seam: the router hands every decoded UpdateMachine request to an
//! [`UpdateMachineHandler`] held in `AppState`, and sends back whatever it answers.
//!
//! [`EngineHandler`] implements the trait with the upgrade engine; tests put a fixed answer there.
//! An implementation must return quickly (the call has a 10 to 30 s budget): start or look up the
//! background job, then answer `Success` with `retryAfterSeconds > 0` while it runs, `Success`
//! with 0 when done, `Failure` on error.

use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::warn;

use super::settings::Settings;
use super::types::{
    HookResponse, ResponseStatus, UpdateMachineRequest, UpdateMachineResponse, object,
};
use crate::artifacts::{ArtifactCaches, CacheServer};
use crate::node::ProviderId;
use crate::telemetry::{EventSink, metrics::Metrics};
use crate::upgrade::jobs::{JobRegistry, MachineKey, Poll, Progress, Runner};
use crate::upgrade::{Engine, NodeTarget, Options, Source, Step};
use crate::version::KubeVersion;

/// Answers UpdateMachine calls. `request.settings` holds the ExtensionConfig settings; read them with
/// [`super::settings::Settings::from_map`].
pub trait UpdateMachineHandler: Send + Sync + 'static {
    fn update_machine(&self, request: UpdateMachineRequest)
    -> BoxFuture<'_, UpdateMachineResponse>;

    /// Why an UpdateMachine with these settings would be refused by this extension whatever the
    /// Machine (a way of staging it was not started for), or `None`. The CanUpdate hooks decline
    /// with it, so CAPI replaces the Machine instead of retrying an update that cannot start.
    fn refuses(&self, settings: &Settings) -> Option<String>;
}

/// The real UpdateMachine: one background upgrade job per Machine, driven by the upgrade engine.
///
/// A call validates the desired Machine (version, providerID, cluster), then starts or joins the
/// Machine's job and answers from its progress in milliseconds. Nothing about the node is trusted
/// from memory: a new process, or a second replica, resumes from the journal inside the node.
pub struct EngineHandler {
    registry: JobRegistry<UpgradeJob, JobRunner>,
}

impl EngineHandler {
    /// `cache_server`: where the nodes download from when a request's `serveCache` setting asks
    /// for it; with `None` such requests are refused ([`UpdateMachineHandler::refuses`]).
    pub fn new(
        engine: Engine,
        caches: ArtifactCaches,
        cache_server: Option<CacheServer>,
        metrics: Metrics,
        events: EventSink,
        max_concurrent_upgrades: usize,
    ) -> Self {
        let runner = JobRunner {
            engine,
            caches,
            cache_server,
            metrics,
            events,
        };
        EngineHandler {
            registry: JobRegistry::new(runner, max_concurrent_upgrades),
        }
    }

    /// Upgrades queued or running now.
    pub fn in_flight(&self) -> usize {
        self.registry.in_flight()
    }
}

impl UpdateMachineHandler for EngineHandler {
    fn update_machine(
        &self,
        request: UpdateMachineRequest,
    ) -> BoxFuture<'_, UpdateMachineResponse> {
        let response = match UpgradeJob::from_request(&request) {
            Err(message) => UpdateMachineResponse::failure(message),
            // Refused before any job starts, so no upgrade is reported started.
            Ok(job) if let Some(refusal) = self.refuses(&job.settings) => {
                UpdateMachineResponse::failure(refusal)
            }
            Ok(job) => {
                let (key, version) = (job.machine.clone(), job.target.version);
                match self.registry.poll(key, version, || job) {
                    Poll::InProgress {
                        message,
                        retry_after,
                    } => {
                        let mut response =
                            UpdateMachineResponse::new(ResponseStatus::Success, message);
                        response.retry_after_seconds =
                            i32::try_from(retry_after.as_secs().max(1)).unwrap_or(i32::MAX);
                        response
                    }
                    Poll::Done { message } => {
                        UpdateMachineResponse::new(ResponseStatus::Success, message)
                    }
                    Poll::Failed { message } => UpdateMachineResponse::failure(message),
                }
            }
        };
        Box::pin(std::future::ready(response))
    }

    fn refuses(&self, settings: &Settings) -> Option<String> {
        self.registry.runner().refuses(settings)
    }
}

/// One Machine's upgrade, as the request describes it.
pub struct UpgradeJob {
    machine: MachineKey,
    target: NodeTarget,
    settings: Settings,
}

impl UpgradeJob {
    /// Reads and checks what the upgrade needs from the desired Machine. Every error message is
    /// deterministic and never echoes the untrusted value.
    fn from_request(request: &UpdateMachineRequest) -> Result<UpgradeJob, String> {
        let settings = Settings::from_map(&request.settings).map_err(|e| e.to_string())?;
        if settings.disable_in_place_updates {
            return Err(
                "in-place updates are disabled (disableInPlaceUpdates); UpdateMachine should not have been called"
                    .to_string(),
            );
        }
        let machine = request
            .desired
            .machine
            .as_ref()
            .ok_or("request has no desired.machine")?;
        let field = |path: &[&str]| object::get_str(machine, path).filter(|s| !s.is_empty());
        let name = field(&["metadata", "name"]).ok_or("desired Machine has no metadata.name")?;
        let namespace =
            field(&["metadata", "namespace"]).ok_or("desired Machine has no metadata.namespace")?;
        if !is_dns_subdomain(name) || !is_dns_subdomain(namespace) {
            return Err("desired Machine name or namespace is not a valid Kubernetes name".into());
        }
        let cluster =
            field(&["spec", "clusterName"]).ok_or("desired Machine has no spec.clusterName")?;
        let version = field(&["spec", "version"])
            .ok_or("desired Machine has no spec.version")?
            .parse::<KubeVersion>()
            .map_err(|_| "desired Machine spec.version is not a vMAJOR.MINOR.PATCH version")?;
        let provider_id = field(&["spec", "providerID"]).ok_or(
            "desired Machine has no spec.providerID yet; CAPD sets it once the node container exists",
        )?;
        let container = ProviderId::parse(provider_id)
            .map_err(|_| "desired Machine spec.providerID is not docker:////<container>")?
            .container()
            .to_string();
        let machine = MachineKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        Ok(UpgradeJob {
            target: NodeTarget {
                cluster: cluster.to_string(),
                container,
                version,
                machine: Some(machine.to_string()),
            },
            machine,
            settings,
        })
    }
}

/// RFC 1123 subdomain, as Kubernetes requires of names and namespaces.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Runs jobs with the engine, and reports them as metrics and Events.
pub struct JobRunner {
    engine: Engine,
    caches: ArtifactCaches,
    cache_server: Option<CacheServer>,
    metrics: Metrics,
    events: EventSink,
}

impl JobRunner {
    /// See [`UpdateMachineHandler::refuses`].
    fn refuses(&self, settings: &Settings) -> Option<String> {
        if settings.fetch_in_node {
            let base = settings
                .artifact_url
                .as_ref()
                .unwrap_or_else(|| self.caches.default_source());
            return base.is_local().then(|| {
                "fetchInNode needs an http(s) artifactURL the nodes can reach, not file://".into()
            });
        }
        (settings.serve_cache && self.cache_server.is_none()).then(|| {
            "serveCache needs the extension started with --cache-server-address, an address of \
             it the nodes reach"
                .into()
        })
    }

    async fn options(&self, settings: &Settings) -> Result<Options, String> {
        if let Some(refusal) = self.refuses(settings) {
            return Err(refusal);
        }
        let artifact_url = settings.artifact_url.clone();
        let source = if settings.fetch_in_node {
            let base = artifact_url.unwrap_or_else(|| self.caches.default_source().clone());
            Source::FetchInNode {
                base_url: base.as_str().to_string(),
            }
        } else {
            let server = self.cache_server.clone().filter(|_| settings.serve_cache);
            let cache = self
                .caches
                .get(artifact_url)
                .await
                .map_err(|e| e.to_string())?;
            match server {
                Some(server) => Source::Serve { cache, server },
                None => Source::Upload(cache),
            }
        };
        let mut options = Options::new(source);
        options.drain = settings.drain;
        options.drain_timeout = settings.drain_timeout;
        options.policy.worker_max_minor_step = settings.worker_max_minor_skew;
        Ok(options)
    }

    /// Forwards the engine's progress to the job, timing steps and recording Events on the way.
    fn observe(
        &self,
        machine: MachineKey,
        outer: watch::Sender<Progress>,
    ) -> (watch::Sender<Progress>, tokio::task::JoinHandle<()>) {
        let (inner, mut rx) = watch::channel(Progress::Queued);
        let (metrics, events) = (self.metrics.clone(), self.events.clone());
        let task = tokio::spawn(async move {
            let mut current: Option<(Step, Instant)> = None;
            while rx.changed().await.is_ok() {
                let progress = rx.borrow_and_update().clone();
                if let Progress::Running(step) = progress {
                    if let Some((previous, since)) = current.replace((step, Instant::now())) {
                        metrics.observe_step_duration(previous, since.elapsed());
                    }
                    // Events wait on the API server (up to its timeout); never hold up progress.
                    let (events, machine) = (events.clone(), machine.clone());
                    tokio::spawn(async move { events.step_started(&machine, step).await });
                }
                outer.send_replace(progress);
            }
            if let Some((previous, since)) = current {
                metrics.observe_step_duration(previous, since.elapsed());
            }
        });
        (inner, task)
    }
}

impl Runner<UpgradeJob> for JobRunner {
    async fn run(&self, job: UpgradeJob, progress: watch::Sender<Progress>) -> Result<(), String> {
        let _in_flight = self.metrics.upgrade_started();
        self.events
            .upgrade_started(&job.machine, &job.target.version)
            .await;
        let options = match self.options(&job.settings).await {
            Ok(options) => options,
            Err(message) => {
                self.metrics.upgrade_failed(Step::Preflight);
                self.events
                    .upgrade_failed(&job.machine, Step::Preflight, &message)
                    .await;
                return Err(message);
            }
        };
        let (inner, forwarder) = self.observe(job.machine.clone(), progress);
        let outcome = self.engine.upgrade(&job.target, &options, &inner).await;
        drop(inner);
        let _ = forwarder.await;
        let stats = self.caches.stats().await;
        self.metrics
            .set_artifact_stats(stats.hits, stats.misses, stats.bytes_downloaded);
        match outcome {
            Ok(_) => {
                self.metrics.upgrade_succeeded();
                self.events
                    .upgrade_succeeded(&job.machine, &job.target.version)
                    .await;
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                warn!(machine = %job.machine, error = ?error.source, "upgrade attempt failed");
                self.metrics.upgrade_failed(error.step);
                self.events
                    .upgrade_failed(&job.machine, error.step, &message)
                    .await;
                Err(message)
            }
        }
    }
}
