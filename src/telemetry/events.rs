//! Kubernetes Events on the Machine being upgraded: at the start, at each step, on failure and on
//! completion, so `kubectl describe machine` tells the story next to CAPI's own Events.
//!
//! Events are `events.k8s.io/v1` objects that point at the Machine through `regarding`. The
//! UpdateMachine request strips `metadata.uid` from the Machine, and `kubectl describe` matches
//! Events by uid, so the sink looks the uid up once per Machine (it needs `get` on
//! `machines.cluster.x-k8s.io`). When the lookup fails, the Event still goes out without a uid and
//! shows in `kubectl get events`.
//!
//! Recording never fails the caller: an upgrade must not stop because an Event could not be
//! written. Errors are logged, and every API call has a time limit.
//!
//! The same Event repeated within [`SERIES_WINDOW`] (a retried failure, a step re-entered after a
//! restart) becomes one Event with a `series` count instead of a new object each time, and the
//! series is written at most once per [`SERIES_UPDATE_INTERVAL`], so retries and polling do not
//! flood the API server. Outside a cluster the sink is disabled and does nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Client, Config};
use tracing::{debug, info, warn};

use crate::upgrade::jobs::MachineKey;
use crate::upgrade::step::Step;

/// `reportingController` on every Event.
pub const REPORTING_CONTROLLER: &str = "capd-inplace";

/// How long an identical Event keeps counting into the same series, as client-go does.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// The least time between two writes of one series' count.
pub const SERIES_UPDATE_INTERVAL: Duration = Duration::from_secs(30);

/// The longest any single API call may take; the caller is an upgrade job that must move on.
const API_TIMEOUT: Duration = Duration::from_secs(10);

// Limits from the events.k8s.io/v1 validation rules: a longer value makes the API server reject
// the whole Event.
const MAX_NOTE_BYTES: usize = 1024;
const MAX_REASON_BYTES: usize = 128;
const MAX_ACTION_BYTES: usize = 128;
const MAX_INSTANCE_BYTES: usize = 128;
const MAX_NAME_BYTES: usize = 253;

/// Bounds memory for Machine uids over a long-lived process; Machines are few, so clearing the
/// whole map when it fills costs only a few lookups.
const MAX_CACHED_UIDS: usize = 4096;

pub const REASON_STARTED: &str = "InPlaceUpgradeStarted";
pub const REASON_STEP: &str = "InPlaceUpgradeStep";
pub const REASON_FAILED: &str = "InPlaceUpgradeFailed";
pub const REASON_SUCCEEDED: &str = "InPlaceUpgradeSucceeded";
const ACTION_UPGRADE: &str = "Upgrade";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the in-cluster Kubernetes configuration")]
    InClusterConfig(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API call failed")]
    Api(#[source] kube::Error),
    #[error("Kubernetes API call took longer than {0:?}")]
    Timeout(Duration),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The Event `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Where Events go. Cheap to clone; a disabled sink ignores everything.
#[derive(Clone)]
pub struct EventSink {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: Client,
    reporting_instance: String,
    settings: Settings,
    series: Mutex<HashMap<SeriesKey, Series>>,
    machine_uids: Mutex<HashMap<MachineKey, String>>,
    uid_lookup_warned: AtomicBool,
    sequence: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    series_window: Duration,
    series_update_interval: Duration,
    api_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            series_window: SERIES_WINDOW,
            series_update_interval: SERIES_UPDATE_INTERVAL,
            api_timeout: API_TIMEOUT,
        }
    }
}

/// Events are the same when everything a reader sees is the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    machine: MachineKey,
    kind: EventType,
    reason: String,
    action: String,
    note: String,
}

#[derive(Debug)]
struct Series {
    event_name: String,
    started: Instant,
    /// Occurrences so far, the first included.
    count: i32,
    last_written: Instant,
}

/// What one `record` call must send.
enum Write {
    Create { event_name: String },
    UpdateSeries { event_name: String, count: i32 },
    Nothing,
}

impl EventSink {
    /// A sink that writes Events through `client`; `reporting_instance` names this replica.
    pub fn new(client: Client, reporting_instance: impl Into<String>) -> Self {
        Self::with_settings(client, reporting_instance.into(), Settings::default())
    }

    fn with_settings(client: Client, reporting_instance: String, settings: Settings) -> Self {
        EventSink {
            inner: Some(Arc::new(Inner {
                client,
                reporting_instance: truncate(&reporting_instance, MAX_INSTANCE_BYTES).to_owned(),
                settings,
                series: Mutex::new(HashMap::new()),
                machine_uids: Mutex::new(HashMap::new()),
                uid_lookup_warned: AtomicBool::new(false),
                sequence: AtomicU64::new(0),
            })),
        }
    }

    /// A sink that drops every Event.
    pub fn disabled() -> Self {
        EventSink { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Connects with the in-cluster service account when running in a Pod, and otherwise
    /// returns a disabled sink, so the CLI and local runs need no cluster.
    pub fn from_environment() -> Self {
        // The service-account files alone are not proof of a cluster; the service host is what
        // the kubelet injects into every Pod.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            info!("Kubernetes Events are off: not running inside a cluster");
            return EventSink::disabled();
        }
        match in_cluster_client() {
            Ok(client) => {
                let instance = reporting_instance(
                    std::env::var("POD_NAME").ok(),
                    std::env::var("HOSTNAME").ok(),
                );
                info!(reporting_instance = %instance, "Kubernetes Events on Machines are on");
                EventSink::new(client, instance)
            }
            Err(err) => {
                warn!(error = %error_chain(&err), "Kubernetes Events are off: no usable in-cluster configuration");
                EventSink::disabled()
            }
        }
    }

    /// Records an Event on the Machine. Never fails: problems are logged.
    ///
    /// `reason` is a fixed CamelCase identifier, `action` what was being done, `note` the human
    /// text (cut to 1 KiB).
    pub async fn record(
        &self,
        machine: &MachineKey,
        kind: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let Some(inner) = &self.inner else {
            return;
        };
        let key = SeriesKey {
            machine: machine.clone(),
            kind,
            reason: truncate(reason, MAX_REASON_BYTES).to_owned(),
            action: truncate(action, MAX_ACTION_BYTES).to_owned(),
            note: truncate(note, MAX_NOTE_BYTES).to_owned(),
        };
        match inner.plan(&key, Instant::now()) {
            Write::Nothing => {
                debug!(machine = %machine, reason, "Event repeated; counted in its series");
            }
            Write::Create { event_name } => {
                if let Err(err) = inner.create(&key, &event_name).await {
                    warn!(machine = %machine, reason, error = %error_chain(&err), "could not record a Kubernetes Event");
                    // Forget the series so the next occurrence tries a fresh Event.
                    inner.forget(&key, &event_name);
                }
            }
            Write::UpdateSeries { event_name, count } => {
                if let Err(err) = inner.update_series(machine, &event_name, count).await {
                    warn!(machine = %machine, reason, count, error = %error_chain(&err), "could not update a Kubernetes Event's count");
                }
            }
        }
    }

    /// The upgrade of `machine` to `to_version` has started.
    pub async fn upgrade_started(&self, machine: &MachineKey, to_version: &impl std::fmt::Display) {
        let note = format!("upgrading Kubernetes in place to {to_version}");
        self.record(
            machine,
            EventType::Normal,
            REASON_STARTED,
            ACTION_UPGRADE,
            &note,
        )
        .await;
    }

    /// `step` has started; the note is the same text as the UpdateMachine progress message.
    pub async fn step_started(&self, machine: &MachineKey, step: Step) {
        let note = step.to_string();
        self.record(machine, EventType::Normal, REASON_STEP, step.id(), &note)
            .await;
    }

    /// The upgrade failed in `step`; `message` is the deterministic failure message.
    pub async fn upgrade_failed(&self, machine: &MachineKey, step: Step, message: &str) {
        self.record(
            machine,
            EventType::Warning,
            REASON_FAILED,
            step.id(),
            message,
        )
        .await;
    }

    /// The upgrade finished and the Node verified at `to_version`.
    pub async fn upgrade_succeeded(
        &self,
        machine: &MachineKey,
        to_version: &impl std::fmt::Display,
    ) {
        let note = format!("Kubernetes upgraded in place to {to_version}");
        self.record(
            machine,
            EventType::Normal,
            REASON_SUCCEEDED,
            ACTION_UPGRADE,
            &note,
        )
        .await;
    }
}

impl Inner {
    /// Decides, under the lock and without I/O, whether this occurrence starts a new Event,
    /// updates a series, or is only counted.
    fn plan(&self, key: &SeriesKey, now: Instant) -> Write {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let window = self.settings.series_window;
        series.retain(|_, s| now.duration_since(s.started) < window);
        if let Some(s) = series.get_mut(key) {
            s.count = s.count.saturating_add(1);
            if now.duration_since(s.last_written) < self.settings.series_update_interval {
                return Write::Nothing;
            }
            s.last_written = now;
            return Write::UpdateSeries {
                event_name: s.event_name.clone(),
                count: s.count,
            };
        }
        let event_name = self.event_name(&key.machine.name);
        series.insert(
            key.clone(),
            Series {
                event_name: event_name.clone(),
                started: now,
                count: 1,
                last_written: now,
            },
        );
        Write::Create { event_name }
    }

    fn forget(&self, key: &SeriesKey, event_name: &str) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if series.get(key).is_some_and(|s| s.event_name == event_name) {
            series.remove(key);
        }
    }

    /// `<machine>.<time in ns, hex>.<sequence>`, like client-go's names, kept unique within this
    /// process by the sequence and within the DNS subdomain length limit.
    fn event_name(&self, machine_name: &str) -> String {
        let nanos = Timestamp::now().as_nanosecond();
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let suffix = format!(".{nanos:x}.{sequence:x}");
        let prefix = truncate(machine_name, MAX_NAME_BYTES - suffix.len());
        format!("{prefix}{suffix}")
    }

    async fn create(&self, key: &SeriesKey, event_name: &str) -> Result<()> {
        let uid = self.machine_uid(&key.machine).await;
        let event = Event {
            metadata: ObjectMeta {
                name: Some(event_name.to_owned()),
                namespace: Some(key.machine.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Timestamp::now())),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.reporting_instance.clone()),
            action: Some(key.action.clone()),
            reason: Some(key.reason.clone()),
            note: Some(key.note.clone()),
            type_: Some(key.kind.as_str().to_owned()),
            regarding: Some(machine_reference(&key.machine, uid)),
            ..Event::default()
        };
        let api = Api::<Event>::namespaced(self.client.clone(), &key.machine.namespace);
        self.bounded(api.create(&PostParams::default(), &event))
            .await?;
        Ok(())
    }

    async fn update_series(
        &self,
        machine: &MachineKey,
        event_name: &str,
        count: i32,
    ) -> Result<()> {
        let series = EventSeries {
            count,
            last_observed_time: MicroTime(Timestamp::now()),
        };
        let patch = serde_json::json!({ "series": series });
        let api = Api::<Event>::namespaced(self.client.clone(), &machine.namespace);
        self.bounded(api.patch(event_name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await?;
        Ok(())
    }

    /// The Machine's uid, looked up once and cached. `None` when the lookup fails.
    async fn machine_uid(&self, machine: &MachineKey) -> Option<String> {
        if let Some(uid) = self
            .machine_uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(machine)
        {
            return Some(uid.clone());
        }
        let api = Api::<DynamicObject>::namespaced_with(
            self.client.clone(),
            &machine.namespace,
            &machine_resource(),
        );
        let uid = match self.bounded(api.get_metadata(&machine.name)).await {
            Ok(meta) => meta.metadata.uid,
            Err(err) => {
                // Usually missing RBAC, which stays missing: warn once, then keep quiet.
                let message = "could not look up the Machine's uid; its Events will not show in `kubectl describe machine`";
                if self.uid_lookup_warned.swap(true, Ordering::Relaxed) {
                    debug!(machine = %machine, error = %error_chain(&err), "{message}");
                } else {
                    warn!(machine = %machine, error = %error_chain(&err), "{message}");
                }
                return None;
            }
        }?;
        let mut uids = self
            .machine_uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if uids.len() >= MAX_CACHED_UIDS {
            uids.clear();
        }
        uids.insert(machine.clone(), uid.clone());
        Some(uid)
    }

    async fn bounded<T>(&self, call: impl Future<Output = kube::Result<T>>) -> Result<T> {
        let limit = self.settings.api_timeout;
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| Error::Timeout(limit))?
            .map_err(Error::Api)
    }
}

fn in_cluster_client() -> Result<Client> {
    let config = Config::incluster().map_err(Error::InClusterConfig)?;
    Client::try_from(config).map_err(Error::Client)
}

fn machine_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta2", "Machine"),
        "machines",
    )
}

fn machine_reference(machine: &MachineKey, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("cluster.x-k8s.io/v1beta2".to_owned()),
        kind: Some("Machine".to_owned()),
        name: Some(machine.name.clone()),
        namespace: Some(machine.namespace.clone()),
        uid,
        ..ObjectReference::default()
    }
}

/// The Pod name set through the downward API, else the hostname (which is the Pod name unless the
/// Pod sets its own hostname).
fn reporting_instance(pod_name: Option<String>, hostname: Option<String>) -> String {
    [pod_name, hostname]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| REPORTING_CONTROLLER.to_owned())
}

/// The longest prefix of `text` within `max_bytes` that ends on a character boundary.
fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// An error and its causes on one line, for logs.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that meets an unexpected error should stop right there
mod tests {
    use super::*;

    use axum::http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::task::JoinHandle;

    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        body: Value,
    }

    type Responder = dyn Fn(&Method, &str, &Value) -> Option<(StatusCode, Value)> + Send + Sync;

    /// An API server behind kube's mock service: records every request and answers with
    /// `respond`; `None` leaves the request unanswered (a hung API server).
    struct MockApi {
        seen: Arc<Mutex<Vec<Seen>>>,
        task: JoinHandle<()>,
    }

    impl MockApi {
        fn start(
            settings: Settings,
            respond: impl Fn(&Method, &str, &Value) -> Option<(StatusCode, Value)>
            + Send
            + Sync
            + 'static,
        ) -> (EventSink, MockApi) {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let respond: Arc<Responder> = Arc::new(respond);
            let task = tokio::spawn({
                let seen = seen.clone();
                async move {
                    let mut hung = Vec::new();
                    while let Some((request, send)) = handle.next_request().await {
                        let (parts, body) = request.into_parts();
                        let bytes = body.collect_bytes().await.unwrap();
                        let body = if bytes.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(&bytes).unwrap()
                        };
                        seen.lock().unwrap().push(Seen {
                            method: parts.method.clone(),
                            path: parts.uri.path().to_owned(),
                            body: body.clone(),
                        });
                        match respond(&parts.method, parts.uri.path(), &body) {
                            Some((status, reply)) => send.send_response(
                                Response::builder()
                                    .status(status)
                                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                                    .unwrap(),
                            ),
                            None => hung.push(send),
                        }
                    }
                }
            });
            let client = Client::new(service, "default");
            let sink = EventSink::with_settings(client, "capd-inplace-7d9f".to_owned(), settings);
            (sink, MockApi { seen, task })
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn writes(&self) -> Vec<Seen> {
            self.seen()
                .into_iter()
                .filter(|s| s.method != Method::GET)
                .collect()
        }
    }

    impl Drop for MockApi {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A healthy API server: Machines exist with uid `uid-<name>`, Events are accepted.
    fn healthy(method: &Method, path: &str, body: &Value) -> Option<(StatusCode, Value)> {
        if *method == Method::GET && path.contains("/machines/") {
            let name = path.rsplit('/').next().unwrap();
            return Some((
                StatusCode::OK,
                json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": {"name": name, "namespace": "clusters", "uid": format!("uid-{name}")}
                }),
            ));
        }
        if *method == Method::POST {
            return Some((StatusCode::CREATED, body.clone()));
        }
        if *method == Method::PATCH {
            let name = path.rsplit('/').next().unwrap();
            return Some((
                StatusCode::OK,
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name}}),
            ));
        }
        None
    }

    fn status(code: StatusCode, reason: &str) -> (StatusCode, Value) {
        (
            code,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "injected by the test", "reason": reason, "code": code.as_u16()
            }),
        )
    }

    fn machine(name: &str) -> MachineKey {
        MachineKey {
            namespace: "clusters".to_owned(),
            name: name.to_owned(),
        }
    }

    const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/clusters/events";

    #[tokio::test]
    async fn an_event_regards_the_machine_with_its_uid() {
        let (sink, api) = MockApi::start(Settings::default(), healthy);
        sink.step_started(&machine("md-0-abcde"), Step::KubeadmUpgrade)
            .await;

        let seen = api.seen();
        assert_eq!(seen.len(), 2, "{seen:#?}");
        assert_eq!(seen[0].method, Method::GET);
        assert_eq!(
            seen[0].path,
            "/apis/cluster.x-k8s.io/v1beta2/namespaces/clusters/machines/md-0-abcde"
        );
        assert_eq!(seen[1].method, Method::POST);
        assert_eq!(seen[1].path, EVENTS_PATH);

        let event = &seen[1].body;
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["kind"], "Event");
        assert_eq!(event["metadata"]["namespace"], "clusters");
        let name = event["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("md-0-abcde."), "{name}");
        assert_eq!(
            event["regarding"],
            json!({
                "apiVersion": "cluster.x-k8s.io/v1beta2",
                "kind": "Machine",
                "name": "md-0-abcde",
                "namespace": "clusters",
                "uid": "uid-md-0-abcde"
            })
        );
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["reason"], "InPlaceUpgradeStep");
        assert_eq!(event["action"], "kubeadm-upgrade");
        assert_eq!(event["note"], "step 4/10: kubeadm upgrade");
        assert_eq!(event["reportingController"], "capd-inplace");
        assert_eq!(event["reportingInstance"], "capd-inplace-7d9f");
        assert!(event["eventTime"].as_str().unwrap().ends_with('Z'));
        assert!(event.get("series").is_none());
    }

    #[tokio::test]
    async fn lifecycle_events_have_stable_reasons_actions_and_types() {
        let (sink, api) = MockApi::start(Settings::default(), healthy);
        let m = machine("cp-1");
        sink.upgrade_started(&m, &"v1.32.3").await;
        sink.upgrade_failed(&m, Step::Drain, "step 5/10 cordon and drain: exit 1")
            .await;
        sink.upgrade_succeeded(&m, &"v1.32.3").await;

        let fields: Vec<_> = api
            .writes()
            .iter()
            .map(|s| {
                let e = &s.body;
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["reason"].as_str().unwrap().to_owned(),
                    e["action"].as_str().unwrap().to_owned(),
                    e["note"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected = [
            (
                "Normal",
                "InPlaceUpgradeStarted",
                "Upgrade",
                "upgrading Kubernetes in place to v1.32.3",
            ),
            (
                "Warning",
                "InPlaceUpgradeFailed",
                "drain",
                "step 5/10 cordon and drain: exit 1",
            ),
            (
                "Normal",
                "InPlaceUpgradeSucceeded",
                "Upgrade",
                "Kubernetes upgraded in place to v1.32.3",
            ),
        ]
        .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned()));
        assert_eq!(fields, expected);

        // One uid lookup serves every Event on the Machine.
        let lookups = api
            .seen()
            .iter()
            .filter(|s| s.method == Method::GET)
            .count();
        assert_eq!(lookups, 1);
    }

    #[tokio::test]
    async fn repeats_within_the_window_are_counted_not_posted() {
        let (sink, api) = MockApi::start(Settings::default(), healthy);
        let m = machine("md-0-x");
        for _ in 0..5 {
            sink.upgrade_failed(&m, Step::VerifyNode, "step 8/10: Node not Ready")
                .await;
        }
        let writes = api.writes();
        assert_eq!(writes.len(), 1, "{writes:#?}");
        assert_eq!(writes[0].method, Method::POST);

        // A different note is a different Event.
        sink.upgrade_failed(
            &m,
            Step::VerifyNode,
            "step 8/10: kubelet v1.31.2, v1.32.0 required",
        )
        .await;
        assert_eq!(api.writes().len(), 2);
    }

    #[tokio::test]
    async fn repeats_update_the_series_count_when_the_interval_allows() {
        let settings = Settings {
            series_update_interval: Duration::ZERO,
            ..Settings::default()
        };
        let (sink, api) = MockApi::start(settings, healthy);
        let m = machine("md-0-y");
        for _ in 0..3 {
            sink.upgrade_failed(&m, Step::Stage, "step 2/10: checksum mismatch")
                .await;
        }
        let writes = api.writes();
        assert_eq!(writes.len(), 3, "{writes:#?}");
        assert_eq!(writes[0].method, Method::POST);
        let name = writes[0].body["metadata"]["name"].as_str().unwrap();
        for (write, count) in writes[1..].iter().zip([2, 3]) {
            assert_eq!(write.method, Method::PATCH);
            assert_eq!(write.path, format!("{EVENTS_PATH}/{name}"));
            assert_eq!(write.body["series"]["count"], count);
            assert!(write.body["series"]["lastObservedTime"].is_string());
        }
    }

    #[tokio::test]
    async fn after_the_window_a_repeat_is_a_new_event() {
        let settings = Settings {
            series_window: Duration::ZERO,
            ..Settings::default()
        };
        let (sink, api) = MockApi::start(settings, healthy);
        let m = machine("md-0-z");
        sink.step_started(&m, Step::Preflight).await;
        sink.step_started(&m, Step::Preflight).await;
        let writes = api.writes();
        assert_eq!(writes.len(), 2);
        assert!(writes.iter().all(|w| w.method == Method::POST));
        assert_ne!(
            writes[0].body["metadata"]["name"],
            writes[1].body["metadata"]["name"]
        );
    }

    #[tokio::test]
    async fn a_failing_api_server_does_not_fail_the_caller_and_is_retried_next_time() {
        let (sink, api) = MockApi::start(Settings::default(), |method, path, body| {
            if *method == Method::POST {
                return Some(status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
            }
            healthy(method, path, body)
        });
        let m = machine("md-0-fail");
        sink.upgrade_started(&m, &"v1.32.0").await;
        sink.upgrade_started(&m, &"v1.32.0").await;

        // The failed create left no series behind, so the repeat tried to create again.
        let posts: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|s| s.method == Method::POST)
            .collect();
        assert_eq!(posts.len(), 2, "{posts:#?}");
    }

    #[tokio::test]
    async fn without_read_access_to_machines_the_event_goes_out_without_uid() {
        let (sink, api) = MockApi::start(Settings::default(), |method, path, body| {
            if *method == Method::GET {
                return Some(status(StatusCode::FORBIDDEN, "Forbidden"));
            }
            healthy(method, path, body)
        });
        let m = machine("md-0-rbac");
        sink.upgrade_started(&m, &"v1.32.0").await;
        sink.upgrade_succeeded(&m, &"v1.32.0").await;

        let writes = api.writes();
        assert_eq!(writes.len(), 2);
        for write in &writes {
            assert_eq!(write.body["regarding"]["name"], "md-0-rbac");
            assert!(write.body["regarding"].get("uid").is_none());
        }
        // A failed lookup is not cached: it may be a passing error.
        let lookups = api
            .seen()
            .iter()
            .filter(|s| s.method == Method::GET)
            .count();
        assert_eq!(lookups, 2);
    }

    #[tokio::test]
    async fn a_hung_api_server_is_given_up_on_within_the_time_limit() {
        let settings = Settings {
            api_timeout: Duration::from_millis(50),
            ..Settings::default()
        };
        let (sink, api) = MockApi::start(settings, |_, _, _| None);
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            sink.upgrade_started(&machine("md-0-hung"), &"v1.32.0"),
        )
        .await
        .expect("record must return despite a hung API server");
        // The uid lookup and the create each waited for the limit.
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(api.seen().len(), 2);
    }

    #[tokio::test]
    async fn a_disabled_sink_does_nothing() {
        let sink = EventSink::disabled();
        assert!(!sink.is_enabled());
        sink.upgrade_started(&machine("m"), &"v1.32.0").await;
    }

    #[test]
    fn outside_a_cluster_the_sink_is_disabled() {
        // Under test this process is not a Pod; if it is, the check below would be meaningless.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        assert!(!EventSink::from_environment().is_enabled());
    }

    #[tokio::test]
    async fn long_notes_are_cut_on_a_character_boundary() {
        let (sink, api) = MockApi::start(Settings::default(), healthy);
        let note = "é".repeat(600); // 1200 bytes
        sink.record(
            &machine("m"),
            EventType::Warning,
            REASON_FAILED,
            "drain",
            &note,
        )
        .await;
        let writes = api.writes();
        let sent = writes[0].body["note"].as_str().unwrap();
        assert_eq!(sent.len(), 1024);
        assert!(note.starts_with(sent));
    }

    #[tokio::test]
    async fn event_names_stay_within_the_length_limit_and_are_unique() {
        let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let sink = EventSink::new(Client::new(service, "default"), "i");
        let inner = sink.inner.as_ref().unwrap();
        let long = "m".repeat(300);
        let a = inner.event_name(&long);
        let b = inner.event_name(&long);
        assert!(a.len() <= MAX_NAME_BYTES, "{}", a.len());
        assert_ne!(a, b);
        let short = inner.event_name("md-0-abc");
        assert!(short.starts_with("md-0-abc."));
    }

    #[test]
    fn reporting_instance_prefers_the_pod_name_then_the_hostname() {
        let cases = [
            (Some("pod-a"), Some("host-b"), "pod-a"),
            (None, Some("host-b"), "host-b"),
            (Some(" "), Some("host-b"), "host-b"),
            (None, None, "capd-inplace"),
        ];
        for (pod, host, expected) in cases {
            assert_eq!(
                reporting_instance(pod.map(str::to_owned), host.map(str::to_owned)),
                expected,
                "pod {pod:?}, host {host:?}"
            );
        }
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("", 0), "");
    }
}
