//! The axum router: one handler list gives both the routes and the Discovery response.
//!
//! Every route is `POST [prefix]/hooks.runtime.cluster.x-k8s.io/v1alpha1/<hook lowercased>[/<name>]`
//! (cluster-api `api/runtime/catalog/catalog.go`, `GVHToPath`). Like upstream's Go server
//! (`exp/runtime/server/server.go`) every answer is HTTP 200 with a JSON body: a body that is missing,
//! not JSON, the wrong kind or over 20 MiB gets `status: Failure` and a message saying what was wrong.
//! No Content-Type is required (CAPI sends none) and the `?timeout=` query is accepted and ignored;
//! a timeout layer bounds every request below CAPI's 30 s maximum.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, post};
use serde::Serialize;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{info, info_span, warn};

use super::can_update::{Refuses, can_update_machine, can_update_machine_set};
use super::settings::Settings;
use super::types::{
    API_VERSION, CanUpdateMachineRequest, CanUpdateMachineResponse, CanUpdateMachineSetRequest,
    CanUpdateMachineSetResponse, DiscoveryRequest, DiscoveryResponse, ExtensionHandler,
    FailurePolicy, GroupVersionHook, Hook, HookRequest, HookResponse, RequestObject,
    ResponseStatus, UpdateMachineRequest, object,
};
use super::update_machine::UpdateMachineHandler;
use crate::telemetry::metrics::{HookResult, Metrics, Outcome};

/// Largest request body read, as upstream's `maxExtensionRequestBodyBytes`.
pub const MAX_BODY_BYTES: usize = 20 * 1024 * 1024;
/// Server-side bound on one request; CAPI's own limit is the handler timeout (at most 30 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(25);
/// The timeout each handler asks CAPI to use (CAPI's default; the maximum is 30).
pub const HANDLER_TIMEOUT_SECONDS: i32 = 10;

/// Shared state of the hook handlers. Cheap to clone: axum clones it for every request, so it is
/// one reference count, not one per part (both worker threads touch it on every call).
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

struct Shared {
    update_machine: Arc<dyn UpdateMachineHandler>,
    metrics: Metrics,
}

impl AppState {
    /// State with the given UpdateMachine implementation.
    pub fn new(update_machine: Arc<dyn UpdateMachineHandler>, metrics: Metrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                update_machine,
                metrics,
            }),
        }
    }

    fn update_machine(&self) -> &dyn UpdateMachineHandler {
        &*self.shared.update_machine
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
}

/// One served handler: its hook, its DNS-1123 name, and its route.
struct Handler {
    hook: Hook,
    name: &'static str,
    route: MethodRouter<AppState>,
}

/// The handler list; Discovery and the routes are both built from it.
fn handlers() -> Vec<Handler> {
    vec![
        Handler {
            hook: Hook::CanUpdateMachine,
            name: "can-update-machine",
            route: can_update_route(can_update_machine, |request: &CanUpdateMachineRequest| {
                request.current.machine.as_ref()
            }),
        },
        Handler {
            hook: Hook::CanUpdateMachineSet,
            name: "can-update-machineset",
            route: can_update_route(
                can_update_machine_set,
                |request: &CanUpdateMachineSetRequest| request.current.machine_set.as_ref(),
            ),
        },
        Handler {
            hook: Hook::UpdateMachine,
            name: "update-machine",
            route: post(|State(state): State<AppState>, body: Body| {
                serve(
                    state,
                    body,
                    |state, request: UpdateMachineRequest| async move {
                        // Only for the log line, so not built when the log level is above info.
                        let machine = tracing::enabled!(tracing::Level::INFO)
                            .then(|| {
                                request
                                    .desired
                                    .machine
                                    .as_ref()
                                    .map(object::namespaced_name)
                            })
                            .flatten()
                            .unwrap_or_default();
                        let response = state.update_machine().update_machine(request).await;
                        state.metrics().hook_request(
                            Hook::UpdateMachine,
                            match (response.status, response.retry_after_seconds) {
                                (ResponseStatus::Failure, _) => HookResult::Failure,
                                (ResponseStatus::Success, 0) => HookResult::Done,
                                (ResponseStatus::Success, _) => HookResult::InProgress,
                            },
                        );
                        info!(
                            hook = Hook::UpdateMachine.name(),
                            machine,
                            status = ?response.status,
                            retry_after_seconds = response.retry_after_seconds,
                            message = response.message,
                            "answered"
                        );
                        response
                    },
                )
            }),
        },
    ]
}

/// The route of a CanUpdate hook: `decide` answers the request, declining whatever UpdateMachine
/// would refuse, and the answer is counted and logged with the current owner's name (`owner`).
fn can_update_route<Request, Answer>(
    decide: fn(&Request, Refuses) -> (Answer, &'static str),
    owner: fn(&Request) -> Option<&RequestObject>,
) -> MethodRouter<AppState>
where
    Request: HookRequest + Send + 'static,
    Answer: CanUpdateAnswer + Send + 'static,
{
    post(move |State(state): State<AppState>, body: Body| {
        serve(state, body, move |state, request: Request| async move {
            let refuses = |settings: &Settings| state.update_machine().refuses(settings);
            answer_can_update(
                &state,
                Request::HOOK,
                owner(&request),
                decide(&request, &refuses),
            )
        })
    })
}

/// `[prefix]/hooks.runtime.cluster.x-k8s.io/v1alpha1/<hook lowercased>[/<name>]`.
pub fn hook_path(prefix: &str, hook: Hook, name: Option<&str>) -> String {
    let prefix = normalize_prefix(prefix);
    let hook = hook.name().to_lowercase();
    match name {
        Some(name) => format!("{prefix}/{API_VERSION}/{hook}/{name}"),
        None => format!("{prefix}/{API_VERSION}/{hook}"),
    }
}

/// `""`, `"/"` and `"/x/"` become `""`, `""` and `"/x"`.
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

/// The Discovery answer for a handler list.
fn discovery_response(handlers: &[Handler]) -> DiscoveryResponse {
    let mut response = DiscoveryResponse::new(ResponseStatus::Success, "");
    response.handlers = handlers
        .iter()
        .map(|handler| ExtensionHandler {
            name: handler.name.to_owned(),
            request_hook: GroupVersionHook {
                api_version: API_VERSION.to_owned(),
                hook: handler.hook.name().to_owned(),
            },
            timeout_seconds: Some(HANDLER_TIMEOUT_SECONDS),
            failure_policy: Some(FailurePolicy::Fail),
        })
        .collect();
    response
}

/// The hook router under `path_prefix`.
pub fn router(state: AppState, path_prefix: &str) -> Router {
    let handlers = handlers();
    let discovery = Arc::new(discovery_response(&handlers));
    let mut router = Router::new().route(
        &hook_path(path_prefix, Hook::Discovery, None),
        post(move |State(state): State<AppState>, body: Body| {
            let discovery = Arc::clone(&discovery);
            serve(state, body, |state, _: DiscoveryRequest| async move {
                state
                    .metrics()
                    .hook_request(Hook::Discovery, HookResult::Success);
                DiscoveryResponse::clone(&discovery)
            })
        }),
    );
    for handler in handlers {
        router = router.route(
            &hook_path(path_prefix, handler.hook, Some(handler.name)),
            handler.route,
        );
    }
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(
            |request: &axum::http::Request<Body>| {
                info_span!("hook call", path = %request.uri().path())
            },
        ))
        .with_state(state)
}

/// Reads, decodes and checks the body, then answers with `answer`, which gets the state back
/// with the request, or with a `Failure` saying why not.
async fn serve<Request, Response, Answer, Fut>(
    state: AppState,
    body: Body,
    answer: Answer,
) -> JsonAnswer<Response>
where
    Request: HookRequest,
    Response: HookResponse,
    Answer: FnOnce(AppState, Request) -> Fut,
    Fut: Future<Output = Response>,
{
    match decode::<Request>(body).await {
        Ok(request) => JsonAnswer(answer(state, request).await),
        Err(message) => {
            warn!(hook = Request::HOOK.name(), message, "rejected request");
            state
                .metrics()
                .hook_request(Request::HOOK, HookResult::Failure);
            JsonAnswer(Response::failure(message))
        }
    }
}

/// Room for a CanUpdate answer with its patches (about 600 bytes), so that writing one does not
/// grow the buffer on the way (axum's `Json` starts at 128 bytes).
const ANSWER_CAPACITY: usize = 1024;

/// A hook's answer as a JSON body, as axum's `Json` sends it.
struct JsonAnswer<T>(T);

impl<T: Serialize> IntoResponse for JsonAnswer<T> {
    fn into_response(self) -> axum::response::Response {
        let mut body = Vec::with_capacity(ANSWER_CAPACITY);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => ([(CONTENT_TYPE, "application/json")], body).into_response(),
            // Not expected: every answer is a struct of strings, numbers and lists.
            Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
        }
    }
}

async fn decode<Request: HookRequest>(body: Body) -> Result<Request, String> {
    let expected = Request::HOOK.request_kind();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            format!("request body is unreadable or larger than 20 MiB, expected a JSON {expected}")
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("request body is empty, expected a JSON {expected}"));
    }
    let request = Request::read(&bytes)
        .map_err(|err| format!("request body is not a valid {expected}: {err}"))?;
    if !request.api_version().is_empty() && request.api_version() != API_VERSION {
        return Err(format!(
            "request apiVersion is not {API_VERSION}, expected a JSON {expected}"
        ));
    }
    if !request.kind().is_empty() && request.kind() != expected {
        return Err(format!("request kind is not {expected}"));
    }
    Ok(request)
}

/// The answer of either CanUpdate hook, as the router handles it.
trait CanUpdateAnswer: HookResponse {
    /// Whether it patches any object, that is, answers "in place".
    fn patched(&self) -> bool;
    fn message(&self) -> &str;
}

/// Implements [`CanUpdateAnswer`] for a CanUpdate response type, given its patch fields.
macro_rules! can_update_answer {
    ($response:ty, [$($patch:ident),+ $(,)?]) => {
        impl CanUpdateAnswer for $response {
            fn patched(&self) -> bool {
                $(self.$patch.is_some())||+
            }

            fn message(&self) -> &str {
                &self.message
            }
        }
    };
}

can_update_answer!(
    CanUpdateMachineResponse,
    [
        machine_patch,
        infrastructure_machine_patch,
        bootstrap_config_patch,
    ]
);
can_update_answer!(
    CanUpdateMachineSetResponse,
    [
        machine_set_patch,
        infrastructure_machine_template_patch,
        bootstrap_config_template_patch,
    ]
);

/// Counts and logs a CanUpdate `decision` (the answer and its reason label), and returns its
/// answer.
fn answer_can_update<A: CanUpdateAnswer>(
    state: &AppState,
    hook: Hook,
    owner: Option<&RequestObject>,
    (answer, reason): (A, &'static str),
) -> A {
    let metrics = state.metrics();
    let patched = answer.patched();
    metrics.hook_request(hook, HookResult::Success);
    let outcome = if patched {
        Outcome::InPlace
    } else {
        Outcome::Declined
    };
    metrics.decision(hook, outcome, reason);
    info!(
        hook = hook.name(),
        object = owner
            .map(RequestObject::namespaced_name)
            .unwrap_or_default(),
        patched,
        message = answer.message(),
        "answered"
    );
    answer
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::hooks::types::UpdateMachineResponse;
    use futures::future::BoxFuture;

    /// Answers every UpdateMachine with the same in-progress response, to test the seam, and
    /// refuses the `serveCache` setting.
    struct Fixed;

    const FIXED_MESSAGE: &str = "step 4/10: kubeadm upgrade";
    const REFUSAL: &str = "serveCache is not served here";

    impl UpdateMachineHandler for Fixed {
        fn update_machine(&self, _: UpdateMachineRequest) -> BoxFuture<'_, UpdateMachineResponse> {
            let mut response = UpdateMachineResponse::new(ResponseStatus::Success, FIXED_MESSAGE);
            response.retry_after_seconds = 10;
            Box::pin(std::future::ready(response))
        }

        fn refuses(&self, settings: &Settings) -> Option<String> {
            settings.serve_cache.then(|| REFUSAL.to_owned())
        }
    }
    use axum::http::Request;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    fn app(prefix: &str) -> Router {
        router(AppState::new(Arc::new(Fixed), Metrics::new()), prefix)
    }

    async fn call(app: Router, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let response = app
            .oneshot(Request::post(path).body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        if status == StatusCode::OK {
            // Every answer is JSON, and says so.
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        }
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    const BASE: &str = "/hooks.runtime.cluster.x-k8s.io/v1alpha1";

    #[tokio::test]
    async fn discovery_lists_the_three_handlers() {
        let (status, body) = call(
            app(""),
            &format!("{BASE}/discovery?timeout=10s"),
            r#"{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"DiscoveryRequest"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let hook = |name: &str, hook: &str| {
            json!({"name": name, "requestHook": {"apiVersion": API_VERSION, "hook": hook},
                   "timeoutSeconds": 10, "failurePolicy": "Fail"})
        };
        assert_eq!(
            body,
            json!({
                "apiVersion": API_VERSION,
                "kind": "DiscoveryResponse",
                "status": "Success",
                "handlers": [
                    hook("can-update-machine", "CanUpdateMachine"),
                    hook("can-update-machineset", "CanUpdateMachineSet"),
                    hook("update-machine", "UpdateMachine"),
                ],
            })
        );
    }

    #[tokio::test]
    async fn discovery_passes_capi_validation() {
        let handlers = handlers();
        let response = discovery_response(&handlers);
        let mut names = std::collections::BTreeSet::new();
        for handler in &response.handlers {
            // DNS-1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, at most 63.
            let name = handler.name.as_str();
            assert!(name.len() <= 63 && !name.is_empty());
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'));
            assert!(names.insert(name), "duplicate {name}");
            assert!((0..=30).contains(&handler.timeout_seconds.unwrap()));
            assert_eq!(handler.failure_policy, Some(FailurePolicy::Fail));
            assert_eq!(handler.request_hook.api_version, API_VERSION);
        }
    }

    #[tokio::test]
    async fn every_route_answers_bad_bodies_with_failure() {
        let routes = [
            ("discovery", "DiscoveryResponse"),
            (
                "canupdatemachine/can-update-machine",
                "CanUpdateMachineResponse",
            ),
            (
                "canupdatemachineset/can-update-machineset",
                "CanUpdateMachineSetResponse",
            ),
            ("updatemachine/update-machine", "UpdateMachineResponse"),
        ];
        let bodies: [(&str, Vec<u8>, &str); 6] = [
            ("empty", Vec::new(), "request body is empty"),
            (
                "garbage",
                b"\x00not json{".to_vec(),
                "request body is not a valid",
            ),
            ("array", b"[1,2]".to_vec(), "request body is not a valid"),
            ("empty array", b"[]".to_vec(), "request body is not a valid"),
            (
                "wrong kind",
                br#"{"kind":"SomethingElse"}"#.to_vec(),
                "request kind is not",
            ),
            (
                "wrong apiVersion",
                br#"{"apiVersion":"v1"}"#.to_vec(),
                "request apiVersion is not",
            ),
        ];
        for (route, kind) in routes {
            for (name, body, message) in &bodies {
                let (status, response) = call(
                    app("/prefix"),
                    &format!("/prefix{BASE}/{route}?timeout=10s"),
                    body.clone(),
                )
                .await;
                assert_eq!(status, StatusCode::OK, "{route} {name}");
                assert_eq!(response["kind"], kind, "{route} {name}");
                assert_eq!(response["apiVersion"], API_VERSION, "{route} {name}");
                assert_eq!(response["status"], "Failure", "{route} {name}");
                let text = response["message"].as_str().unwrap();
                assert!(text.starts_with(message), "{route} {name}: {text}");
            }
        }
    }

    #[tokio::test]
    async fn oversized_body_is_a_failure() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let (status, response) = call(
            app(""),
            &format!("{BASE}/canupdatemachine/can-update-machine"),
            big,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response["status"], "Failure");
        assert!(
            response["message"]
                .as_str()
                .unwrap()
                .contains("larger than 20 MiB")
        );
    }

    #[tokio::test]
    async fn update_machine_goes_through_the_seam() {
        let (status, response) = call(
            app(""),
            &format!("{BASE}/updatemachine/update-machine"),
            r#"{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"UpdateMachineRequest","desired":{}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            response,
            json!({
                "apiVersion": API_VERSION,
                "kind": "UpdateMachineResponse",
                "status": "Success",
                "message": FIXED_MESSAGE,
                "retryAfterSeconds": 10,
            })
        );
    }

    #[tokio::test]
    async fn can_update_declines_what_update_machine_would_refuse() {
        let in_place: Value =
            serde_json::from_slice(&capd_inplace_e2e::bench::can_update_machine_request()).unwrap();
        let mut refused = in_place.clone();
        refused["settings"]["serveCache"] = json!("true");
        let path = format!("{BASE}/canupdatemachine/can-update-machine");

        let (_, answer) = call(app(""), &path, in_place.to_string()).await;
        assert_eq!(answer["status"], "Success", "{answer}");
        assert!(answer["machinePatch"].is_object(), "{answer}");

        let (_, answer) = call(app(""), &path, refused.to_string()).await;
        assert_eq!(answer["status"], "Success", "{answer}");
        assert_eq!(answer["message"], REFUSAL);
        assert!(answer.get("machinePatch").is_none(), "{answer}");

        // Every other decline keeps its own message: invalid settings, disabled updates, a
        // request the decision itself declines.
        for (settings, declined) in [
            (
                json!({"serveCache": "true", "workerMaxMinorSkew": "9"}),
                "invalid setting workerMaxMinorSkew:",
            ),
            (
                json!({"serveCache": "true", "disableInPlaceUpdates": "true"}),
                "in-place updates are disabled",
            ),
        ] {
            let mut request = in_place.clone();
            request["settings"] = settings;
            let (_, answer) = call(app(""), &path, request.to_string()).await;
            let message = answer["message"].as_str().unwrap();
            assert!(message.starts_with(declined), "{message}");
        }
        let (_, answer) = call(
            app(""),
            &format!("{BASE}/canupdatemachineset/can-update-machineset"),
            r#"{"settings":{"serveCache":"true"}}"#,
        )
        .await;
        assert_eq!(answer["message"], "request has no MachineSet");
    }

    #[tokio::test]
    async fn metrics_count_calls_and_decisions() {
        let metrics = Metrics::new();
        let app = router(AppState::new(Arc::new(Fixed), metrics.clone()), "");
        call(app.clone(), &format!("{BASE}/discovery"), "{}").await;
        call(
            app.clone(),
            &format!("{BASE}/updatemachine/update-machine"),
            "{}",
        )
        .await;
        call(
            app.clone(),
            &format!("{BASE}/canupdatemachine/can-update-machine"),
            "garbage",
        )
        .await;
        call(
            app,
            &format!("{BASE}/canupdatemachine/can-update-machine"),
            r#"{"settings":{"disableInPlaceUpdates":"true"}}"#,
        )
        .await;
        let text = metrics.encode();
        for line in [
            r#"capd_inplace_hook_requests_total{hook="discovery",result="success"} 1"#,
            r#"capd_inplace_hook_requests_total{hook="update-machine",result="in-progress"} 1"#,
            r#"capd_inplace_hook_requests_total{hook="can-update-machine",result="failure"} 1"#,
            r#"capd_inplace_hook_requests_total{hook="can-update-machine",result="success"} 1"#,
            r#"capd_inplace_decisions_total{hook="can-update-machine",outcome="declined",reason="settings"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[tokio::test]
    async fn prefix_is_normalized() {
        for prefix in ["/ext", "ext", "/ext/"] {
            let (status, response) =
                call(app(prefix), &format!("/ext{BASE}/discovery"), "{}").await;
            assert_eq!(status, StatusCode::OK, "{prefix}");
            assert_eq!(response["status"], "Success", "{prefix}");
        }
        let (status, _) = call(app("/ext"), &format!("{BASE}/discovery"), "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
