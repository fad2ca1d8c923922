//! Every fixture in `testdata/hooks/cases.json`, answered in-process (router) and through the real
//! HTTPS server, then judged the way CAPI judges it (`capd_inplace_e2e::capi`).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use axum::body::Body;
use capd_inplace::hooks::router::router;
use capd_inplace::hooks::types::API_VERSION;
use capd_inplace_e2e::capi;
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    name: String,
    route: String,
    request: String,
    status: String,
    in_place: Option<bool>,
    message: Option<String>,
    message_prefix: Option<String>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/hooks")
}

fn cases() -> Vec<(Case, Vec<u8>)> {
    let manifest = std::fs::read(fixtures_dir().join("cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_slice(&manifest).unwrap();
    assert!(cases.len() >= 20, "manifest lost cases");
    cases
        .into_iter()
        .map(|case| {
            let body = std::fs::read(fixtures_dir().join(&case.request)).unwrap();
            (case, body)
        })
        .collect()
}

fn response_kind(route: &str) -> &'static str {
    match route.split('/').next().unwrap() {
        "discovery" => "DiscoveryResponse",
        "canupdatemachine" => "CanUpdateMachineResponse",
        "canupdatemachineset" => "CanUpdateMachineSetResponse",
        "updatemachine" => "UpdateMachineResponse",
        other => panic!("unknown route {other}"),
    }
}

fn check(case: &Case, body: &[u8], response: &Value) {
    let name = &case.name;
    assert_eq!(response["apiVersion"], API_VERSION, "{name}");
    assert_eq!(response["kind"], response_kind(&case.route), "{name}");
    assert_eq!(
        response["status"],
        case.status.as_str(),
        "{name}: {response}"
    );
    let message = response["message"].as_str().unwrap_or_default();
    if let Some(expected) = &case.message {
        assert_eq!(message, expected, "{name}");
    }
    if let Some(prefix) = &case.message_prefix {
        assert!(message.starts_with(prefix.as_str()), "{name}: {message}");
    }
    if case.route.starts_with("updatemachine") {
        assert!(
            response["retryAfterSeconds"].is_number(),
            "{name}: retryAfterSeconds missing"
        );
    }
    let Some(in_place) = case.in_place else {
        return;
    };
    let request: Value = serde_json::from_slice(body).unwrap();
    let outcome = match case.route.as_str() {
        "canupdatemachine/can-update-machine" => capi::can_update_machine(&request, response),
        "canupdatemachineset/can-update-machineset" => {
            capi::can_update_machine_set(&request, response)
        }
        other => panic!("{name}: inPlace on route {other}"),
    }
    .unwrap_or_else(|err| panic!("{name}: CAPI would fail the exchange: {err}"));
    assert_eq!(outcome.in_place, in_place, "{name}: {:?}", outcome.reasons);
    if !in_place {
        // A decline carries no patch at all: nothing half-applied.
        let patches: Vec<_> = response
            .as_object()
            .unwrap()
            .keys()
            .filter(|key| key.ends_with("Patch"))
            .collect();
        assert!(
            patches.is_empty(),
            "{name}: declined with patches {patches:?}"
        );
    }
}

#[tokio::test]
async fn fixtures_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(common::engine_state(dir.path()).await, "");
    for (case, body) in cases() {
        let request =
            axum::http::Request::post(format!("{}/{}?timeout=10s", common::BASE, case.route))
                .body(Body::from(body.clone()))
                .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200, "{}", case.name);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let response: Value = serde_json::from_slice(&bytes).unwrap();
        check(&case, &body, &response);
    }
}

#[tokio::test]
async fn fixtures_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = common::write_certificate(dir.path());
    let server = common::TestServer::start(common::config(dir.path())).await;
    let client = common::client(&certificate.ca_pem, None);
    for (case, body) in cases() {
        let response = client
            .post(server.url(&format!("{}/{}?timeout=10s", common::BASE, case.route)))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", case.name);
        let response: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        check(&case, &body, &response);
    }
    server.stop().await.unwrap();
}
