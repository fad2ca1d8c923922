//! CAPI's runtime client towards one ExtensionConfig: Discovery and its validation, handler
//! lookup, URL building, settings merge, the HTTP call, and the failure policy.
//!
//! Mirrors `internal/runtime/client/client.go` (`Discover`, `defaultAndValidateDiscoveryResponse`,
//! `CallExtension`, `httpCall`, `urlForExtension`, `cloneAndAddSettings`) and
//! `api/runtime/catalog/catalog.go` (`GVHToPath`, the lowercased hook in the path).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Error, Result};

/// `hooks.runtime.cluster.x-k8s.io/v1alpha1`.
pub const HOOKS_API_VERSION: &str = "hooks.runtime.cluster.x-k8s.io/v1alpha1";
/// CAPI's default per-handler timeout, and its maximum (`ExtensionHandler.TimeoutSeconds`).
const DEFAULT_TIMEOUT_SECONDS: i64 = 10;
const MAX_TIMEOUT_SECONDS: i64 = 30;
/// CAPI quotes at most this much of a non-200 body in its error.
const MAX_ERROR_BODY: usize = 512;

/// Every hook in CAPI's catalog (lifecycle, topology mutation, in-place). A handler for a hook not
/// listed here fails Discovery, as `cat.IsHookRegistered` makes it.
const CATALOG: [&str; 15] = [
    "BeforeClusterCreate",
    "AfterControlPlaneInitialized",
    "BeforeClusterUpgrade",
    "BeforeControlPlaneUpgrade",
    "AfterControlPlaneUpgrade",
    "BeforeWorkersUpgrade",
    "AfterWorkersUpgrade",
    "AfterClusterUpgrade",
    "BeforeClusterDelete",
    "GeneratePatches",
    "ValidateTopology",
    "DiscoverVariables",
    "CanUpdateMachine",
    "CanUpdateMachineSet",
    "UpdateMachine",
];

/// The in-place hooks the driver calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    CanUpdateMachine,
    CanUpdateMachineSet,
    UpdateMachine,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::CanUpdateMachine => "CanUpdateMachine",
            Hook::CanUpdateMachineSet => "CanUpdateMachineSet",
            Hook::UpdateMachine => "UpdateMachine",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

/// One handler as CAPI registers it in `ExtensionConfig.status.handlers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredHandler {
    /// `<discovered name>.<ExtensionConfig name>` (`NameForHandler`).
    pub name: String,
    /// The hook name, e.g. `UpdateMachine` (also lifecycle hooks, which the driver never calls).
    pub hook: String,
    /// `None` for a timeout of 0 (no deadline, no `?timeout=`).
    pub timeout: Option<Duration>,
    pub failure_policy: FailurePolicy,
}

/// DNS-1123 subdomain (`validation.IsDNS1123Subdomain`).
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `defaultAndValidateDiscoveryResponse` on the wire JSON: status must not be Failure; each
/// handler's name is a unique DNS-1123 subdomain, `timeoutSeconds` defaults to 10 and must be in
/// 0..=30, `failurePolicy` defaults to Fail and must be Fail or Ignore, and the hook must be in the
/// catalog at `hooks.runtime.cluster.x-k8s.io/v1alpha1`.
pub fn validate_discovery(response: &Value, extension: &str) -> Result<Vec<RegisteredHandler>> {
    if response["status"] == "Failure" {
        return Err(Error::Discovery(format!(
            "discovery failed with message {:?}",
            response["message"].as_str().unwrap_or_default()
        )));
    }
    let handlers = match &response["handlers"] {
        Value::Null => return Ok(Vec::new()),
        Value::Array(handlers) => handlers,
        other => {
            return Err(Error::Discovery(format!("handlers is not a list: {other}")));
        }
    };
    let mut errors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut registered = Vec::new();
    for handler in handlers {
        let name = handler["name"].as_str().unwrap_or_default();
        if !seen.insert(name.to_string()) {
            errors.push(format!("duplicate name for handler {name} found"));
        }
        if !is_dns1123_subdomain(name) {
            errors.push(format!(
                "handler name {name:?} is not a valid DNS-1123 subdomain"
            ));
        }
        let timeout = match &handler["timeoutSeconds"] {
            Value::Null => DEFAULT_TIMEOUT_SECONDS,
            value => value.as_i64().unwrap_or(-1),
        };
        if !(0..=MAX_TIMEOUT_SECONDS).contains(&timeout) {
            errors.push(format!(
                "handler {name}: timeoutSeconds must be between 0 and {MAX_TIMEOUT_SECONDS}"
            ));
        }
        let failure_policy = match handler["failurePolicy"].as_str() {
            None | Some("Fail") => Some(FailurePolicy::Fail),
            Some("Ignore") => Some(FailurePolicy::Ignore),
            Some(other) => {
                errors.push(format!(
                    "handler {name}: failurePolicy must be one of \"Ignore\" or \"Fail\", got {other:?}"
                ));
                None
            }
        };
        let api_version = handler["requestHook"]["apiVersion"]
            .as_str()
            .unwrap_or_default();
        let hook = handler["requestHook"]["hook"].as_str().unwrap_or_default();
        if api_version != HOOKS_API_VERSION || !CATALOG.contains(&hook) {
            errors.push(format!(
                "handler {name}: hook {api_version}/{hook} is not registered in the catalog"
            ));
        }
        if let Some(failure_policy) = failure_policy {
            registered.push(RegisteredHandler {
                name: format!("{name}.{extension}"),
                hook: hook.to_string(),
                timeout: u64::try_from(timeout)
                    .ok()
                    .filter(|t| *t > 0)
                    .map(Duration::from_secs),
                failure_policy,
            });
        }
    }
    if errors.is_empty() {
        Ok(registered)
    } else {
        Err(Error::Discovery(errors.join("; ")))
    }
}

/// What CAPI knows of an extension: `ExtensionConfig.spec` (clientConfig + settings).
#[derive(Debug, Clone)]
pub struct ExtensionConfig {
    /// `metadata.name`, the suffix of the registered handler names.
    pub name: String,
    /// The Service's endpoints (one per extension replica); calls go round-robin, as through a
    /// ClusterIP Service. Each is `https://host:port[/prefix]`.
    pub endpoints: Vec<String>,
    /// `clientConfig.caBundle`.
    pub ca_pem: String,
    /// `spec.settings`.
    pub settings: BTreeMap<String, String>,
}

impl ExtensionConfig {
    /// capd-inplace registered as upstream's e2e registers its test extension: named
    /// `capd-inplace`, with `extensionConfigName` set to that name among its `settings`.
    pub fn capd_inplace(
        endpoints: Vec<String>,
        ca_pem: String,
        settings: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        const NAME: &str = "capd-inplace";
        ExtensionConfig {
            name: NAME.into(),
            endpoints,
            ca_pem,
            settings: settings
                .into_iter()
                .chain([("extensionConfigName".to_string(), NAME.to_string())])
                .collect(),
        }
    }
}

/// One HTTP exchange, kept for assertions.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub hook: String,
    pub endpoint: String,
    pub outcome: String,
}

/// The runtime client for one discovered ExtensionConfig.
pub struct RuntimeClient {
    http: reqwest::Client,
    config: ExtensionConfig,
    handlers: Vec<RegisteredHandler>,
    next_endpoint: AtomicUsize,
    calls: Mutex<Vec<CallRecord>>,
}

impl RuntimeClient {
    /// Calls Discovery on the first endpoint (timeout 10 s, as CAPI does) and validates it.
    pub async fn discover(config: ExtensionConfig) -> Result<RuntimeClient> {
        if config.endpoints.is_empty() {
            return Err(Error::Discovery("no endpoints".into()));
        }
        let http = crate::extension::https_client(&config.ca_pem)
            .map_err(|e| Error::Discovery(e.to_string()))?;
        let mut client = RuntimeClient {
            http,
            config,
            handlers: Vec::new(),
            next_endpoint: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
        };
        let request = json!({"apiVersion": HOOKS_API_VERSION, "kind": "DiscoveryRequest"});
        let discovery = RegisteredHandler {
            name: "discovery".into(),
            hook: "Discovery".into(),
            timeout: Some(Duration::from_secs(DEFAULT_TIMEOUT_SECONDS as u64)),
            failure_policy: FailurePolicy::Fail,
        };
        let url = client.url(
            &client.config.endpoints[0],
            "discovery",
            None,
            discovery.timeout,
        );
        let response = client
            .post(
                &url,
                &discovery,
                serde_json::to_vec(&request).unwrap_or_default(),
            )
            .await
            .map_err(|e| Error::Discovery(e.to_string()))?;
        client.handlers = validate_discovery(&response, &client.config.name)?;
        Ok(client)
    }

    pub fn handlers(&self) -> &[RegisteredHandler] {
        &self.handlers
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Exactly one handler must serve the hook (KCP and the Machine controller error on more).
    pub fn handler(&self, hook: Hook) -> Result<&RegisteredHandler> {
        let mut matching = self.handlers.iter().filter(|h| h.hook == hook.name());
        match (matching.next(), matching.next()) {
            (None, _) => Err(Error::NoHandler(hook.name())),
            (Some(_), Some(_)) => Err(Error::MultipleHandlers(hook.name())),
            (Some(handler), None) => Ok(handler),
        }
    }

    /// `urlForExtension`: endpoint + `GVHToPath` (`/<group>/<version>/<lowercased hook>/<name>`),
    /// `?timeout=<n>s` when the timeout is not 0.
    fn url(
        &self,
        endpoint: &str,
        hook: &str,
        name: Option<&str>,
        timeout: Option<Duration>,
    ) -> String {
        let mut url = format!(
            "{}/{HOOKS_API_VERSION}/{}",
            endpoint.trim_end_matches('/'),
            hook.to_lowercase()
        );
        if let Some(name) = name {
            url.push('/');
            url.push_str(name);
        }
        if let Some(timeout) = timeout {
            url.push_str(&format!("?timeout={}s", timeout.as_secs()));
        }
        url
    }

    fn next_endpoint(&self) -> &str {
        let i = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        &self.config.endpoints[i % self.config.endpoints.len()]
    }

    /// `cloneAndAddSettings`: ExtensionConfig settings merged into the request, request values
    /// win; `settings` omitted when empty. Also sets the request's apiVersion and kind.
    pub fn prepare_request(&self, hook: Hook, request: &mut Value) {
        let Some(object) = request.as_object_mut() else {
            return;
        };
        object.insert("apiVersion".into(), HOOKS_API_VERSION.into());
        object.insert("kind".into(), format!("{}Request", hook.name()).into());
        let mut settings: Map<String, Value> = self
            .config
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        if let Some(Value::Object(own)) = object.get("settings") {
            for (k, v) in own {
                settings.insert(k.clone(), v.clone());
            }
        }
        if settings.is_empty() {
            object.remove("settings");
        } else {
            object.insert("settings".into(), Value::Object(settings));
        }
    }

    /// The URL the next call of `hook` goes to: the next endpoint, with the handler's discovered
    /// name and timeout.
    pub fn hook_url(&self, hook: Hook) -> Result<String> {
        Ok(self.next_hook_url(hook)?.1)
    }

    /// The next endpoint, and the URL of `hook`'s handler there.
    fn next_hook_url(&self, hook: Hook) -> Result<(String, String)> {
        let handler = self.handler(hook)?;
        let endpoint = self.next_endpoint().to_string();
        let url = self.url(
            &endpoint,
            hook.name(),
            Some(discovered_name(&handler.name, &self.config.name)),
            handler.timeout,
        );
        Ok((endpoint, url))
    }

    /// `CallExtension`: prepares `request` in place (so the caller compares against what was
    /// sent), posts it, and interprets the answer. A `Failure` is always an error; a transport
    /// error (connection, non-200, undecodable body) is an error under `Fail` and a default
    /// `Success` under `Ignore`.
    pub async fn call(&self, hook: Hook, request: &mut Value) -> Result<Value> {
        let handler = self.handler(hook)?.clone();
        self.prepare_request(hook, request);
        let body = serde_json::to_vec(&request).map_err(|e| Error::Model(e.to_string()))?;
        let (endpoint, url) = self.next_hook_url(hook)?;
        let result = self.post(&url, &handler, body).await;
        let outcome = match &result {
            Ok(response) => format!(
                "{} {}",
                response["status"].as_str().unwrap_or("?"),
                response["message"].as_str().unwrap_or_default()
            ),
            Err(e) => format!("transport error: {e}"),
        };
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(CallRecord {
                hook: hook.name().into(),
                endpoint,
                outcome,
            });
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                return match handler.failure_policy {
                    FailurePolicy::Ignore => Ok(json!({"status": "Success"})),
                    FailurePolicy::Fail => Err(error),
                };
            }
        };
        match response["status"].as_str() {
            Some("Success") => Ok(response),
            Some("Failure") => Err(Error::Failure {
                hook: hook.name(),
                message: response["message"].as_str().unwrap_or_default().to_string(),
            }),
            other => Err(Error::UnknownStatus {
                hook: hook.name(),
                status: other.unwrap_or_default().to_string(),
            }),
        }
    }

    /// Posts raw bytes to a hook's handler (for garbage-body tests): HTTP status and decoded body.
    pub async fn post_raw(&self, hook: Hook, body: Vec<u8>) -> Result<(u16, Value)> {
        let url = self.hook_url(hook)?;
        let response = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(30))
            .body(body)
            .send()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| Error::Transport(e.to_string()))?;
        Ok((status, value))
    }

    /// `httpCall`: POST without headers, the handler's timeout as the deadline, HTTP 200 required,
    /// body decoded leniently (unknown fields ignored).
    async fn post(&self, url: &str, handler: &RegisteredHandler, body: Vec<u8>) -> Result<Value> {
        let mut request = self.http.post(url).body(body);
        if let Some(timeout) = handler.timeout {
            request = request.timeout(timeout);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Transport(format!("http call failed: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::Transport(format!("reading the response: {e}")))?;
        if status != reqwest::StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes);
            let text: String = text.chars().take(MAX_ERROR_BODY).collect();
            return Err(Error::Transport(format!(
                "non 200 response code, {status}, body: {text}"
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Transport(format!("failed to decode the response: {e}")))
    }
}

/// CAPI strips `.<ExtensionConfig name>` from the registered name before building the URL.
fn discovered_name<'a>(registered: &'a str, extension: &str) -> &'a str {
    registered
        .strip_suffix(&format!(".{extension}"))
        .unwrap_or(registered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(name: &str, hook: &str) -> Value {
        json!({"name": name, "requestHook": {"apiVersion": HOOKS_API_VERSION, "hook": hook}})
    }

    #[test]
    fn discovery_defaults_timeout_and_policy() {
        let response =
            json!({"status": "Success", "handlers": [handler("update-machine", "UpdateMachine")]});
        let handlers = validate_discovery(&response, "inplace").unwrap();
        assert_eq!(
            handlers,
            [RegisteredHandler {
                name: "update-machine.inplace".into(),
                hook: "UpdateMachine".into(),
                timeout: Some(Duration::from_secs(10)),
                failure_policy: FailurePolicy::Fail,
            }]
        );
    }

    #[test]
    fn discovery_rejects_what_capi_rejects() {
        let cases = [
            json!({"status": "Failure", "message": "no"}),
            json!({"handlers": [handler("a", "UpdateMachine"), handler("a", "CanUpdateMachine")]}),
            json!({"handlers": [handler("Not_DNS", "UpdateMachine")]}),
            json!({"handlers": [{"name": "a", "timeoutSeconds": 31, "requestHook": {"apiVersion": HOOKS_API_VERSION, "hook": "UpdateMachine"}}]}),
            json!({"handlers": [{"name": "a", "timeoutSeconds": -1, "requestHook": {"apiVersion": HOOKS_API_VERSION, "hook": "UpdateMachine"}}]}),
            json!({"handlers": [{"name": "a", "failurePolicy": "Sometimes", "requestHook": {"apiVersion": HOOKS_API_VERSION, "hook": "UpdateMachine"}}]}),
            json!({"handlers": [handler("a", "RebootMachine")]}),
            json!({"handlers": [{"name": "a", "requestHook": {"apiVersion": "hooks.runtime.cluster.x-k8s.io/v1beta9", "hook": "UpdateMachine"}}]}),
        ];
        for case in cases {
            assert!(validate_discovery(&case, "x").is_err(), "{case}");
        }
        let zero = json!({"handlers": [{"name": "a", "timeoutSeconds": 0, "failurePolicy": "Ignore", "requestHook": {"apiVersion": HOOKS_API_VERSION, "hook": "BeforeClusterUpgrade"}}]});
        let handlers = validate_discovery(&zero, "x").unwrap();
        assert_eq!(handlers[0].timeout, None);
        assert_eq!(handlers[0].failure_policy, FailurePolicy::Ignore);
    }

    #[test]
    fn dns1123() {
        for good in ["a", "can-update-machine", "a.b-c.d0"] {
            assert!(is_dns1123_subdomain(good), "{good}");
        }
        for bad in ["", "A", "-a", "a-", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }
}
