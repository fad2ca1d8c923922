//! Checks the deployment manifests without a cluster: every YAML document under `config/` and
//! `e2e/kind/` is parsed, and the names, ports, namespaces and secrets that must agree across
//! the Deployment, Service, Certificate and ExtensionConfig are compared.
//!
//! Each check is a function over the parsed documents that returns the problems it found. The
//! `*_passes` tests run it on the real files; the `*_rejects_*` tests break a copy of the real
//! documents in one place and require the same check to report it, so no check can pass by
//! accident.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use capd_inplace::hooks::settings::{self, Settings};
use serde::Deserialize;
use serde_json::{Value, json};

const NAMESPACE: &str = "capd-inplace-system";
const WEBHOOK_SERVICE: &str = "capd-inplace-webhook-service";
const CERT_SECRET: &str = "capd-inplace-webhook-service-cert";
const CERT_DIR: &str = "/tmp/k8s-webhook-server/serving-certs";
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const KIND_CONFIG_API: &str = "kind.x-k8s.io/v1alpha4";
const INJECT_CA_ANNOTATION: &str = "runtime.cluster.x-k8s.io/inject-ca-from-secret";

/// Every kind `config/` may contain, with its apiVersion and whether it is namespaced.
const KNOWN_KINDS: &[(&str, &str, bool)] = &[
    ("Namespace", "v1", false),
    ("ServiceAccount", "v1", true),
    ("Service", "v1", true),
    ("ClusterRole", "rbac.authorization.k8s.io/v1", false),
    ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1", false),
    ("Deployment", "apps/v1", true),
    ("Issuer", "cert-manager.io/v1", true),
    ("Certificate", "cert-manager.io/v1", true),
    ("ExtensionConfig", "runtime.cluster.x-k8s.io/v1beta2", false),
    ("Kustomization", "kustomize.config.k8s.io/v1beta1", false),
];

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Doc {
    file: PathBuf,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
}

/// The parsed documents of one tree, with lookups by kind and name.
#[derive(Clone, Debug)]
struct Docs(Vec<Doc>);

impl Docs {
    fn of_kind(&self, kind: &str) -> Vec<&Doc> {
        self.0.iter().filter(|d| d.kind() == kind).collect()
    }
    fn one(&self, kind: &str) -> Result<&Doc, String> {
        let found = self.of_kind(kind);
        match found.as_slice() {
            [doc] => Ok(doc),
            _ => Err(format!(
                "expected exactly one {kind}, found {}",
                found.len()
            )),
        }
    }
    fn named(&self, kind: &str, name: &str) -> Result<&Doc, String> {
        self.of_kind(kind)
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| format!("no {kind} named {name:?}"))
    }
    fn one_mut(&mut self, kind: &str) -> &mut Value {
        &mut self
            .0
            .iter_mut()
            .find(|d| d.kind() == kind)
            .unwrap_or_else(|| panic!("no {kind} to modify"))
            .value
    }
    fn named_mut(&mut self, kind: &str, name: &str) -> &mut Value {
        &mut self
            .0
            .iter_mut()
            .find(|d| d.kind() == kind && d.name() == name)
            .unwrap_or_else(|| panic!("no {kind} {name} to modify"))
            .value
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}")) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every YAML document of every file under `dir` (multi-document files included). A document
/// that does not parse fails the test with its file name.
fn load(dir: &str) -> Docs {
    let mut docs = Vec::new();
    for file in yaml_files(&repo_root().join(dir)) {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    assert!(!docs.is_empty(), "no YAML documents under {dir}");
    Docs(docs)
}

fn config() -> Docs {
    load("config")
}

// ---------------------------------------------------------------------------------------------
// Helpers over the Deployment
// ---------------------------------------------------------------------------------------------

fn manager_container(docs: &Docs) -> Result<&Value, String> {
    let deployment = docs.one("Deployment")?;
    let containers = deployment.value["spec"]["template"]["spec"]["containers"]
        .as_array()
        .ok_or("Deployment has no containers")?;
    match containers.as_slice() {
        [container] => Ok(container),
        _ => Err(format!(
            "expected one container in the Deployment, found {}",
            containers.len()
        )),
    }
}

/// The value of `--flag=value` or `--flag value` in the container's args.
fn arg<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    let args: Vec<&str> = container["args"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(value) = a.strip_prefix(&prefix) {
            Some(value)
        } else if *a == flag {
            args.get(i + 1).copied()
        } else {
            None
        }
    })
}

/// The port of a Go-style bind address (":9443", "0.0.0.0:9443", "[::]:9443").
fn bind_port(address: &str) -> Option<i64> {
    address.rsplit_once(':')?.1.parse().ok()
}

fn container_port_named(container: &Value, name: &str) -> Option<i64> {
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["containerPort"]
        .as_i64()
}

/// Resolves a Service targetPort or probe port (number or port name) to a container port number.
fn resolve_port(container: &Value, port: &Value) -> Option<i64> {
    match port {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => container_port_named(container, name),
        _ => None,
    }
}

fn mount_path_of(container: &Value, volume: &str) -> Option<String> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)?["mountPath"]
        .as_str()
        .map(str::to_owned)
}

fn pod_volumes(docs: &Docs) -> Result<Vec<Value>, String> {
    Ok(
        docs.one("Deployment")?.value["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    )
}

fn all_ok(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn check_kinds_and_namespaces(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    for doc in &docs.0 {
        let kind = doc.kind();
        let api_version = doc.value["apiVersion"].as_str().unwrap_or("");
        let Some((_, expected_api, namespaced)) = KNOWN_KINDS.iter().find(|(k, ..)| *k == kind)
        else {
            problems.push(format!("{}: unexpected kind {kind:?}", doc.file.display()));
            continue;
        };
        if api_version != *expected_api {
            problems.push(format!(
                "{}: {kind} has apiVersion {api_version:?}, want {expected_api:?}",
                doc.file.display()
            ));
        }
        if kind == "Kustomization" {
            continue;
        }
        if doc.name().is_empty() {
            problems.push(format!("{}: {kind} has no name", doc.file.display()));
        }
        match (namespaced, doc.namespace()) {
            (true, Some(NAMESPACE)) | (false, None) => {}
            (true, other) => problems.push(format!(
                "{kind} {} is in namespace {other:?}, want {NAMESPACE}",
                doc.name()
            )),
            (false, Some(ns)) => problems.push(format!(
                "{kind} {} is cluster-scoped but names namespace {ns}",
                doc.name()
            )),
        }
    }
    if docs.named("Namespace", NAMESPACE).is_err() {
        problems.push(format!("no Namespace {NAMESPACE}"));
    }
    all_ok(problems)
}

/// Every `resources:` entry of every Kustomization exists, and every manifest under `config/` is
/// reachable from `config/default`, so `kubectl apply -k config/default` deploys all of it.
fn check_kustomize_tree(root: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut reached = BTreeSet::new();
    let mut pending = vec![root.join("default")];
    let mut visited = BTreeSet::new();
    while let Some(dir) = pending.pop() {
        let dir = dir.canonicalize().map_err(|e| format!("{dir:?}: {e}"))?;
        if !visited.insert(dir.clone()) {
            continue;
        }
        let file = dir.join("kustomization.yaml");
        let Ok(text) = std::fs::read_to_string(&file) else {
            problems.push(format!("{} has no kustomization.yaml", dir.display()));
            continue;
        };
        reached.insert(file.clone());
        let kustomization: Value = serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())?;
        for resource in kustomization["resources"].as_array().into_iter().flatten() {
            let Some(relative) = resource.as_str() else {
                problems.push(format!("{}: non-string resource", file.display()));
                continue;
            };
            let path = dir.join(relative);
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() {
                reached.insert(path.canonicalize().map_err(|e| e.to_string())?);
            } else {
                problems.push(format!(
                    "{}: resource {relative} does not exist",
                    file.display()
                ));
            }
        }
    }
    for file in yaml_files(root) {
        let file = file.canonicalize().map_err(|e| e.to_string())?;
        if !reached.contains(&file) {
            problems.push(format!(
                "{} is not reachable from config/default",
                file.display()
            ));
        }
    }
    all_ok(problems)
}

/// The webhook Service listens on 443 and forwards to the container port the server binds.
fn check_webhook_service(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let service = docs.named("Service", WEBHOOK_SERVICE)?;
    let container = manager_container(docs)?;
    let ports = service.value["spec"]["ports"]
        .as_array()
        .ok_or("webhook Service has no ports")?;
    let [port] = ports.as_slice() else {
        return Err(format!("webhook Service has {} ports, want 1", ports.len()));
    };
    if port["port"] != 443 {
        problems.push(format!(
            "webhook Service port is {}, want 443",
            port["port"]
        ));
    }
    let webhook_port = container_port_named(container, "webhook-server");
    let target = resolve_port(container, &port["targetPort"]);
    if webhook_port.is_none() || target != webhook_port {
        problems.push(format!(
            "webhook Service targetPort {} resolves to {target:?}, but the container's webhook-server port is {webhook_port:?}",
            port["targetPort"]
        ));
    }
    let bind = arg(container, "--bind-address").and_then(bind_port);
    if bind != webhook_port {
        problems.push(format!(
            "--bind-address port {bind:?} differs from the webhook-server containerPort {webhook_port:?}"
        ));
    }
    problems.extend(check_selects_pods(docs, service)?);
    all_ok(problems)
}

fn check_metrics_service(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let container = manager_container(docs)?;
    let metrics_port = container_port_named(container, "metrics");
    let bind = arg(container, "--metrics-bind-address").and_then(bind_port);
    if metrics_port.is_none() || bind != metrics_port {
        problems.push(format!(
            "--metrics-bind-address port {bind:?} differs from the metrics containerPort {metrics_port:?}"
        ));
    }
    for service in docs
        .of_kind("Service")
        .into_iter()
        .filter(|s| s.name() != WEBHOOK_SERVICE)
    {
        for port in service.value["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if resolve_port(container, &port["targetPort"]).is_none() {
                problems.push(format!(
                    "Service {} targetPort {} is no container port",
                    service.name(),
                    port["targetPort"]
                ));
            }
        }
        problems.extend(check_selects_pods(docs, service)?);
    }
    all_ok(problems)
}

/// A Service's selector must be a subset of the Deployment's pod labels.
fn check_selects_pods(docs: &Docs, service: &Doc) -> Result<Vec<String>, String> {
    let deployment = docs.one("Deployment")?;
    let labels = &deployment.value["spec"]["template"]["metadata"]["labels"];
    let selector = service.value["spec"]["selector"]
        .as_object()
        .ok_or_else(|| format!("Service {} has no selector", service.name()))?;
    Ok(selector
        .iter()
        .filter(|(key, value)| &labels[key.as_str()] != *value)
        .map(|(key, value)| {
            format!(
                "Service {} selects {key}={value}, which the Deployment's pods do not carry",
                service.name()
            )
        })
        .collect())
}

fn check_deployment_selector(docs: &Docs) -> Result<(), String> {
    let deployment = docs.one("Deployment")?;
    let labels = &deployment.value["spec"]["template"]["metadata"]["labels"];
    let match_labels = deployment.value["spec"]["selector"]["matchLabels"]
        .as_object()
        .ok_or("Deployment has no selector.matchLabels")?;
    all_ok(
        match_labels
            .iter()
            .filter(|(key, value)| &labels[key.as_str()] != *value)
            .map(|(key, _)| format!("Deployment selector label {key} is not on its pod template"))
            .collect(),
    )
}

/// The ExtensionConfig calls the webhook Service, in its namespace, on its port.
fn check_extension_config_service(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let extension = docs.one("ExtensionConfig")?;
    let client = &extension.value["spec"]["clientConfig"];
    if !client["url"].is_null() {
        problems.push("clientConfig sets url; exactly one of url and service is allowed".into());
    }
    let reference = &client["service"];
    let service = docs.named("Service", WEBHOOK_SERVICE)?;
    if reference["name"] != service.name() {
        problems.push(format!(
            "ExtensionConfig calls Service {}, want {}",
            reference["name"],
            service.name()
        ));
    }
    if reference["namespace"].as_str() != service.namespace() {
        problems.push(format!(
            "ExtensionConfig calls namespace {}, the Service is in {:?}",
            reference["namespace"],
            service.namespace()
        ));
    }
    // CAPI defaults the port to 443 when it is left out.
    let called_port = reference["port"].as_i64().unwrap_or(443);
    let service_ports: Vec<i64> = service.value["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    if !service_ports.contains(&called_port) {
        problems.push(format!(
            "ExtensionConfig calls port {called_port}, the Service has {service_ports:?}"
        ));
    }
    if extension.name() != "capd-inplace" {
        problems.push(format!("ExtensionConfig is named {}", extension.name()));
    }
    all_ok(problems)
}

/// The Certificate covers the Service's in-cluster names and is issued by an Issuer defined here.
fn check_certificate(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let certificate = docs.one("Certificate")?;
    let service = docs.named("Service", WEBHOOK_SERVICE)?;
    let namespace = service.namespace().unwrap_or("");
    let dns_names: Vec<&str> = certificate.value["spec"]["dnsNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for wanted in [
        format!("{}.{namespace}.svc", service.name()),
        format!("{}.{namespace}.svc.cluster.local", service.name()),
    ] {
        if !dns_names.contains(&wanted.as_str()) {
            problems.push(format!("Certificate dnsNames {dns_names:?} lack {wanted}"));
        }
    }
    let issuer = &certificate.value["spec"]["issuerRef"];
    let issuer_name = issuer["name"].as_str().unwrap_or("");
    match issuer["kind"].as_str() {
        Some("Issuer") => match docs.named("Issuer", issuer_name) {
            Ok(found) if found.namespace() == certificate.namespace() => {}
            Ok(_) => problems.push(format!("Issuer {issuer_name} is in another namespace")),
            Err(e) => problems.push(e),
        },
        other => problems.push(format!(
            "Certificate issuerRef kind is {other:?}, want Issuer"
        )),
    }
    all_ok(problems)
}

/// One Secret links three objects: the Certificate writes it, the Deployment mounts it where
/// the server reads its certificate, and the ExtensionConfig's annotation makes CAPI trust it.
fn check_ca_secret(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let certificate = docs.one("Certificate")?;
    let written = format!(
        "{}/{}",
        certificate.namespace().unwrap_or(""),
        certificate.value["spec"]["secretName"]
            .as_str()
            .unwrap_or("")
    );
    if written != format!("{NAMESPACE}/{CERT_SECRET}") {
        problems.push(format!(
            "Certificate writes {written}, want {NAMESPACE}/{CERT_SECRET}"
        ));
    }
    let extension = docs.one("ExtensionConfig")?;
    let injected = extension.value["metadata"]["annotations"][INJECT_CA_ANNOTATION].as_str();
    if injected != Some(written.as_str()) {
        problems.push(format!(
            "{INJECT_CA_ANNOTATION} is {injected:?}, but the Certificate writes {written}"
        ));
    }
    let deployment = docs.one("Deployment")?;
    let container = manager_container(docs)?;
    let cert_volume = pod_volumes(docs)?
        .into_iter()
        .find(|v| v["secret"]["secretName"].is_string());
    match cert_volume {
        None => problems.push("the Deployment mounts no Secret".into()),
        Some(volume) => {
            let mounted = format!(
                "{}/{}",
                deployment.namespace().unwrap_or(""),
                volume["secret"]["secretName"].as_str().unwrap_or("")
            );
            if mounted != written {
                problems.push(format!(
                    "the Deployment mounts Secret {mounted}, the Certificate writes {written}"
                ));
            }
            let path = volume["name"]
                .as_str()
                .and_then(|name| mount_path_of(container, name));
            let cert_dir = arg(container, "--cert-dir");
            if path.as_deref() != Some(CERT_DIR) || cert_dir != Some(CERT_DIR) {
                problems.push(format!(
                    "certificate mounted at {path:?} and --cert-dir is {cert_dir:?}; both must be {CERT_DIR}"
                ));
            }
        }
    }
    all_ok(problems)
}

/// Liveness and readiness probe the health server's port with the paths it serves.
fn check_probes(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let container = manager_container(docs)?;
    let health = arg(container, "--health-probe-bind-address").and_then(bind_port);
    if health.is_none() || container_port_named(container, "healthz") != health {
        problems.push(format!(
            "--health-probe-bind-address port {health:?} is not the healthz containerPort"
        ));
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        if get["path"] != path {
            problems.push(format!("{probe} path is {}, want {path}", get["path"]));
        }
        let port = resolve_port(container, &get["port"]);
        if port.is_none() || port != health {
            problems.push(format!(
                "{probe} port {} resolves to {port:?}, the health server listens on {health:?}",
                get["port"]
            ));
        }
        if get["scheme"].as_str().is_some_and(|s| s != "HTTP") {
            problems.push(format!(
                "{probe} uses {}, the health server is plain HTTP",
                get["scheme"]
            ));
        }
    }
    all_ok(problems)
}

/// The host's Docker socket is mounted at the same path, as CAPD's manager mounts it.
fn check_docker_socket(docs: &Docs) -> Result<(), String> {
    let container = manager_container(docs)?;
    let volume = pod_volumes(docs)?
        .into_iter()
        .find(|v| v["hostPath"]["path"] == DOCKER_SOCKET)
        .ok_or("no hostPath volume for the Docker socket")?;
    let mounted = volume["name"]
        .as_str()
        .and_then(|name| mount_path_of(container, name));
    if mounted.as_deref() == Some(DOCKER_SOCKET) {
        Ok(())
    } else {
        Err(format!(
            "the Docker socket volume is mounted at {mounted:?}, want {DOCKER_SOCKET}"
        ))
    }
}

/// With a read-only root filesystem, every directory the server writes must be a volume.
fn check_writable_paths(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let container = manager_container(docs)?;
    if container["securityContext"]["readOnlyRootFilesystem"] != true {
        problems.push("readOnlyRootFilesystem is not true".into());
    }
    if container["securityContext"]["allowPrivilegeEscalation"] != false {
        problems.push("allowPrivilegeEscalation is not false".into());
    }
    let volumes = pod_volumes(docs)?;
    let empty_dir_mounts: Vec<String> = volumes
        .iter()
        .filter(|v| v["emptyDir"].is_object())
        .filter_map(|v| v["name"].as_str())
        .filter_map(|name| mount_path_of(container, name))
        .collect();
    match arg(container, "--artifact-cache-dir") {
        Some(dir) if empty_dir_mounts.iter().any(|m| m == dir) => {}
        other => problems.push(format!(
            "--artifact-cache-dir {other:?} is not an emptyDir mount ({empty_dir_mounts:?})"
        )),
    }
    if !empty_dir_mounts.iter().any(|m| m == "/tmp") {
        problems.push("/tmp is not a writable volume".into());
    }
    all_ok(problems)
}

fn check_pod_identity_env(docs: &Docs) -> Result<(), String> {
    let container = manager_container(docs)?;
    let env = container["env"].as_array().cloned().unwrap_or_default();
    let field_of = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    let mut problems = Vec::new();
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        if field_of(name) != Some(json!(field)) {
            problems.push(format!("{name} does not come from {field}"));
        }
    }
    all_ok(problems)
}

/// The Deployment runs as the ServiceAccount that the binding grants Events to, and the role
/// grants nothing but creating and patching Events.
fn check_rbac(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let deployment = docs.one("Deployment")?;
    let account = deployment.value["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .ok_or("the Deployment names no serviceAccountName")?;
    docs.named("ServiceAccount", account)?;
    let binding = docs.one("ClusterRoleBinding")?;
    let bound = binding.value["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == NAMESPACE
        });
    if !bound {
        problems.push(format!(
            "no binding subject for ServiceAccount {NAMESPACE}/{account}"
        ));
    }
    let role_name = binding.value["roleRef"]["name"].as_str().unwrap_or("");
    let role = docs.named("ClusterRole", role_name)?;
    let mut granted = BTreeSet::new();
    for rule in role.value["rules"].as_array().into_iter().flatten() {
        for group in rule["apiGroups"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    granted.insert(format!("{group}/{resource}/{verb}").replace('"', ""));
                }
            }
        }
    }
    // Events on Machines, and a read of the Machine for its uid; nothing else.
    let mut wanted: BTreeSet<String> = ["", "events.k8s.io"]
        .iter()
        .flat_map(|g| ["create", "patch"].map(|v| format!("{g}/events/{v}")))
        .collect();
    wanted.insert("cluster.x-k8s.io/machines/get".to_string());
    if granted != wanted {
        problems.push(format!(
            "ClusterRole grants {granted:?}, want exactly {wanted:?}"
        ));
    }
    all_ok(problems)
}

/// Every setting is a known key with a string value the extension accepts, and every known key
/// is present, so the file documents all of them.
fn check_settings(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    let extension = docs.one("ExtensionConfig")?;
    let settings = extension.value["spec"]["settings"]
        .as_object()
        .ok_or("ExtensionConfig has no spec.settings")?;
    // Each value is checked by the extension's own settings parser, one key at a time, so a
    // problem names its key.
    for (key, value) in settings {
        if !settings::ALL.contains(&key.as_str()) {
            problems.push(format!("unknown setting {key}"));
            continue;
        }
        let Some(text) = value.as_str() else {
            problems.push(format!("setting {key} is {value}, not a string"));
            continue;
        };
        let one = BTreeMap::from([(key.clone(), text.to_string())]);
        if let Err(error) = Settings::from_map(&one) {
            problems.push(format!("setting {key}: {error}"));
        }
    }
    for key in settings::ALL {
        if !settings.contains_key(key) {
            problems.push(format!(
                "setting {key} is not documented in the ExtensionConfig"
            ));
        }
    }
    all_ok(problems)
}

fn check_namespace_selector(docs: &Docs) -> Result<(), String> {
    let extension = docs.one("ExtensionConfig")?;
    let selector = &extension.value["spec"]["namespaceSelector"];
    let expressions = selector["matchExpressions"].as_array();
    let admits_default = expressions.into_iter().flatten().any(|e| {
        e["key"] == "kubernetes.io/metadata.name"
            && e["operator"] == "In"
            && e["values"]
                .as_array()
                .is_some_and(|v| v.contains(&json!("default")))
    });
    if admits_default {
        Ok(())
    } else {
        Err(format!(
            "namespaceSelector {selector} does not admit the default namespace"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// e2e/kind
// ---------------------------------------------------------------------------------------------

/// Every templateRef in the ClusterClass names a template defined next to it, the Cluster uses
/// that class, KCP rolls out without surge, and the workers' rollout creates no extra Machine.
fn check_kind_e2e(docs: &Docs) -> Result<(), String> {
    let mut problems = Vec::new();
    // kind's own config is also `kind: Cluster`; only Cluster API's documents matter here.
    let docs = &Docs(
        docs.0
            .iter()
            .filter(|d| d.value["apiVersion"] != KIND_CONFIG_API)
            .cloned()
            .collect(),
    );
    let class = docs.one("ClusterClass")?;
    let mut refs = Vec::new();
    collect_template_refs(&class.value["spec"], &mut refs);
    if refs.len() < 5 {
        problems.push(format!(
            "ClusterClass has {} templateRefs, want 5",
            refs.len()
        ));
    }
    for reference in &refs {
        let kind = reference["kind"].as_str().unwrap_or("");
        let name = reference["name"].as_str().unwrap_or("");
        match docs.named(kind, name) {
            Ok(template) if template.value["apiVersion"] == reference["apiVersion"] => {}
            Ok(template) => problems.push(format!(
                "templateRef {kind}/{name} wants {}, the template is {}",
                reference["apiVersion"], template.value["apiVersion"]
            )),
            Err(e) => problems.push(format!("ClusterClass templateRef: {e}")),
        }
    }
    let cluster = docs.one("Cluster")?;
    let topology = &cluster.value["spec"]["topology"];
    if topology["classRef"]["name"] != class.name() {
        problems.push(format!(
            "Cluster uses class {}, the ClusterClass is {}",
            topology["classRef"]["name"],
            class.name()
        ));
    }
    let kcp = docs.one("KubeadmControlPlaneTemplate")?;
    let kcp_surge =
        &kcp.value["spec"]["template"]["spec"]["rollout"]["strategy"]["rollingUpdate"]["maxSurge"];
    if *kcp_surge != 0 {
        problems.push(format!("KCP maxSurge is {kcp_surge}, want 0"));
    }
    for md in topology["workers"]["machineDeployments"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let rolling = &md["rollout"]["strategy"]["rollingUpdate"];
        if rolling["maxSurge"] != 0 || rolling["maxUnavailable"] != 1 {
            problems.push(format!(
                "MachineDeployment {} rolls out with {rolling}, want maxSurge 0, maxUnavailable 1",
                md["name"]
            ));
        }
    }
    all_ok(problems)
}

fn collect_template_refs(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "templateRef" {
                    out.push(child.clone());
                } else {
                    collect_template_refs(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_template_refs(i, out)),
        _ => {}
    }
}

/// The kind management cluster hands the host's Docker socket to its node.
fn check_kind_management(docs: &Docs) -> Result<(), String> {
    let config = docs
        .0
        .iter()
        .find(|d| d.value["apiVersion"] == KIND_CONFIG_API)
        .ok_or("no kind cluster config")?;
    let mounted = config.value["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|n| n["extraMounts"].as_array().cloned().unwrap_or_default())
        .any(|m| m["hostPath"] == DOCKER_SOCKET && m["containerPath"] == DOCKER_SOCKET);
    if mounted {
        Ok(())
    } else {
        Err("the kind management cluster does not mount the Docker socket".into())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests on the real manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_document_has_a_known_kind_and_the_right_namespace() {
    check_kinds_and_namespaces(&config()).unwrap();
}

#[test]
fn kustomize_tree_reaches_every_manifest() {
    check_kustomize_tree(&repo_root().join("config")).unwrap();
}

#[test]
fn webhook_service_targets_the_webhook_port() {
    check_webhook_service(&config()).unwrap();
}

#[test]
fn metrics_service_targets_the_metrics_port() {
    check_metrics_service(&config()).unwrap();
}

#[test]
fn deployment_selector_matches_its_pods() {
    check_deployment_selector(&config()).unwrap();
}

#[test]
fn extension_config_calls_the_webhook_service() {
    check_extension_config_service(&config()).unwrap();
}

#[test]
fn certificate_covers_the_service_names() {
    check_certificate(&config()).unwrap();
}

#[test]
fn one_secret_links_certificate_deployment_and_ca_injection() {
    check_ca_secret(&config()).unwrap();
}

#[test]
fn probes_use_the_health_port() {
    check_probes(&config()).unwrap();
}

#[test]
fn docker_socket_is_mounted() {
    check_docker_socket(&config()).unwrap();
}

#[test]
fn written_paths_are_volumes_under_a_read_only_root() {
    check_writable_paths(&config()).unwrap();
}

#[test]
fn pod_identity_comes_from_the_downward_api() {
    check_pod_identity_env(&config()).unwrap();
}

#[test]
fn rbac_grants_only_events() {
    check_rbac(&config()).unwrap();
}

#[test]
fn settings_are_known_strings_with_valid_values() {
    check_settings(&config()).unwrap();
}

#[test]
fn namespace_selector_admits_the_e2e_namespace() {
    check_namespace_selector(&config()).unwrap();
}

#[test]
fn kind_e2e_cluster_class_and_cluster_agree() {
    check_kind_e2e(&load("e2e/kind")).unwrap();
}

#[test]
fn kind_management_cluster_mounts_the_docker_socket() {
    check_kind_management(&load("e2e/kind")).unwrap();
}

/// When kubectl is installed, its built-in kustomize must render config/default to exactly the
/// objects the files hold. (No cluster is needed to render.)
#[test]
fn kubectl_kustomize_renders_every_object() {
    let rendered = match std::process::Command::new("kubectl")
        .args(["kustomize", "config/default"])
        .current_dir(repo_root())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("kubectl is not installed; skipping the kustomize rendering check");
            return;
        }
        Err(e) => panic!("kubectl kustomize: {e}"),
    };
    assert!(
        rendered.status.success(),
        "kubectl kustomize config/default failed: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let key = |v: &Value| {
        format!(
            "{}/{}/{}",
            v["kind"].as_str().unwrap_or(""),
            v["metadata"]["namespace"].as_str().unwrap_or(""),
            v["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let text = String::from_utf8(rendered.stdout).unwrap();
    let rendered: BTreeSet<String> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| key(&Value::deserialize(d).unwrap()))
        .collect();
    let files: BTreeSet<String> = config()
        .0
        .iter()
        .filter(|d| d.kind() != "Kustomization")
        .map(|d| key(&d.value))
        .collect();
    assert_eq!(rendered, files);
}

// ---------------------------------------------------------------------------------------------
// Each check must catch a break
// ---------------------------------------------------------------------------------------------

fn container_mut(docs: &mut Docs) -> &mut Value {
    &mut docs.one_mut("Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn set_arg(docs: &mut Docs, flag: &str, value: &str) {
    let args = container_mut(docs)["args"].as_array_mut().unwrap();
    let prefix = format!("{flag}=");
    let position = args
        .iter()
        .position(|a| a.as_str().is_some_and(|a| a.starts_with(&prefix)))
        .unwrap();
    args[position] = json!(format!("{flag}={value}"));
}

fn volume_mut<'a>(docs: &'a mut Docs, name: &str) -> &'a mut Value {
    docs.one_mut("Deployment")["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|v| v["name"] == name)
        .unwrap()
}

#[track_caller]
fn assert_rejects(check: fn(&Docs) -> Result<(), String>, docs: &Docs, expected: &str) {
    match check(docs) {
        Ok(()) => panic!("the check accepted a broken manifest (expected: {expected})"),
        Err(message) => assert!(
            message.contains(expected),
            "message {message:?} does not mention {expected:?}"
        ),
    }
}

#[test]
fn kinds_check_rejects_a_wrong_api_version_and_namespace() {
    let mut docs = config();
    docs.one_mut("ExtensionConfig")["apiVersion"] = json!("runtime.cluster.x-k8s.io/v1alpha1");
    assert_rejects(check_kinds_and_namespaces, &docs, "apiVersion");

    let mut docs = config();
    docs.one_mut("Service")["metadata"]["namespace"] = json!("capd-system");
    assert_rejects(check_kinds_and_namespaces, &docs, "namespace");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["metadata"]["namespace"] = json!(NAMESPACE);
    assert_rejects(check_kinds_and_namespaces, &docs, "cluster-scoped");
}

#[test]
fn kustomize_check_rejects_an_unlisted_file() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("config");
    copy_tree(&repo_root().join("config"), &root);
    check_kustomize_tree(&root).unwrap();
    std::fs::write(root.join("manager/extra.yaml"), "kind: ConfigMap\n").unwrap();
    let message = check_kustomize_tree(&root).unwrap_err();
    assert!(message.contains("extra.yaml"), "{message}");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn webhook_service_check_rejects_mismatched_ports() {
    let mut docs = config();
    docs.named_mut("Service", WEBHOOK_SERVICE)["spec"]["ports"][0]["targetPort"] = json!(9444);
    assert_rejects(check_webhook_service, &docs, "targetPort");

    let mut docs = config();
    docs.named_mut("Service", WEBHOOK_SERVICE)["spec"]["ports"][0]["port"] = json!(8443);
    assert_rejects(check_webhook_service, &docs, "443");

    let mut docs = config();
    set_arg(&mut docs, "--bind-address", ":9000");
    assert_rejects(check_webhook_service, &docs, "--bind-address");

    let mut docs = config();
    docs.named_mut("Service", WEBHOOK_SERVICE)["spec"]["selector"]["app.kubernetes.io/name"] =
        json!("capd");
    assert_rejects(check_webhook_service, &docs, "do not carry");
}

#[test]
fn metrics_service_check_rejects_a_moved_metrics_server() {
    let mut docs = config();
    set_arg(&mut docs, "--metrics-bind-address", ":9090");
    assert_rejects(check_metrics_service, &docs, "--metrics-bind-address");
}

#[test]
fn deployment_selector_check_rejects_foreign_labels() {
    let mut docs = config();
    docs.one_mut("Deployment")["spec"]["selector"]["matchLabels"]["tier"] = json!("x");
    assert_rejects(check_deployment_selector, &docs, "tier");
}

#[test]
fn extension_config_check_rejects_a_wrong_reference() {
    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["clientConfig"]["service"]["name"] =
        json!("test-extension-webhook-service");
    assert_rejects(check_extension_config_service, &docs, "calls Service");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["clientConfig"]["service"]["namespace"] =
        json!("default");
    assert_rejects(check_extension_config_service, &docs, "namespace");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["clientConfig"]["service"]["port"] = json!(9443);
    assert_rejects(check_extension_config_service, &docs, "port 9443");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["clientConfig"]["url"] = json!("https://x:9443");
    assert_rejects(check_extension_config_service, &docs, "url");
}

#[test]
fn certificate_check_rejects_missing_names_and_issuer() {
    let mut docs = config();
    docs.one_mut("Certificate")["spec"]["dnsNames"] =
        json!(["capd-inplace-webhook-service.capd-inplace-system.svc.cluster.local"]);
    assert_rejects(
        check_certificate,
        &docs,
        "capd-inplace-webhook-service.capd-inplace-system.svc",
    );

    let mut docs = config();
    docs.one_mut("Certificate")["spec"]["issuerRef"]["name"] = json!("nobody");
    assert_rejects(check_certificate, &docs, "nobody");
}

#[test]
fn ca_secret_check_rejects_any_of_the_three_diverging() {
    let mut docs = config();
    docs.one_mut("Certificate")["spec"]["secretName"] = json!("other-cert");
    assert_rejects(check_ca_secret, &docs, "other-cert");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["metadata"]["annotations"][INJECT_CA_ANNOTATION] =
        json!("capd-inplace-system/other-cert");
    assert_rejects(check_ca_secret, &docs, INJECT_CA_ANNOTATION);

    let mut docs = config();
    volume_mut(&mut docs, "cert")["secret"]["secretName"] = json!("other-cert");
    assert_rejects(check_ca_secret, &docs, "mounts Secret");

    let mut docs = config();
    set_arg(&mut docs, "--cert-dir", "/certs");
    assert_rejects(check_ca_secret, &docs, "--cert-dir");
}

#[test]
fn probe_check_rejects_the_wrong_port_or_path() {
    let mut docs = config();
    container_mut(&mut docs)["readinessProbe"]["httpGet"]["port"] = json!("metrics");
    assert_rejects(check_probes, &docs, "readinessProbe port");

    let mut docs = config();
    container_mut(&mut docs)["livenessProbe"]["httpGet"]["path"] = json!("/livez");
    assert_rejects(check_probes, &docs, "livenessProbe path");

    let mut docs = config();
    set_arg(&mut docs, "--health-probe-bind-address", ":9440");
    assert_rejects(check_probes, &docs, "--health-probe-bind-address");
}

#[test]
fn docker_socket_check_rejects_a_moved_mount() {
    let mut docs = config();
    let mounts = container_mut(&mut docs)["volumeMounts"]
        .as_array_mut()
        .unwrap();
    for mount in mounts.iter_mut().filter(|m| m["name"] == "dockersock") {
        mount["mountPath"] = json!("/run/docker.sock");
    }
    assert_rejects(check_docker_socket, &docs, "mounted at");

    let mut docs = config();
    volume_mut(&mut docs, "dockersock")["hostPath"]["path"] = json!("/run/docker.sock");
    assert_rejects(check_docker_socket, &docs, "no hostPath");
}

#[test]
fn writable_paths_check_rejects_a_cache_on_the_root_filesystem() {
    let mut docs = config();
    set_arg(&mut docs, "--artifact-cache-dir", "/var/lib/capd-inplace");
    assert_rejects(check_writable_paths, &docs, "--artifact-cache-dir");

    let mut docs = config();
    container_mut(&mut docs)["securityContext"]["readOnlyRootFilesystem"] = json!(false);
    assert_rejects(check_writable_paths, &docs, "readOnlyRootFilesystem");
}

#[test]
fn pod_identity_check_rejects_a_literal_value() {
    let mut docs = config();
    let env = container_mut(&mut docs)["env"].as_array_mut().unwrap();
    env[0] = json!({"name": "POD_NAMESPACE", "value": "capd-inplace-system"});
    assert_rejects(check_pod_identity_env, &docs, "POD_NAMESPACE");
}

#[test]
fn rbac_check_rejects_extra_rights_and_a_wrong_subject() {
    let mut docs = config();
    docs.one_mut("ClusterRole")["rules"]
        .as_array_mut()
        .unwrap()
        .push(
            json!({"apiGroups": ["cluster.x-k8s.io"], "resources": ["machines"], "verbs": ["patch"]}),
        );
    assert_rejects(check_rbac, &docs, "machines/patch");

    let mut docs = config();
    docs.one_mut("ClusterRoleBinding")["subjects"][0]["namespace"] = json!("default");
    assert_rejects(check_rbac, &docs, "no binding subject");
}

#[test]
fn settings_check_rejects_unknown_keys_bad_values_and_non_strings() {
    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["settings"]["drainTimout"] = json!("5m");
    assert_rejects(check_settings, &docs, "unknown setting drainTimout");

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["settings"]["drain"] = json!(true);
    assert_rejects(check_settings, &docs, "not a string");

    for (key, bad) in [
        ("drainTimeout", "5 minutes"),
        ("drainTimeout", "m5"),
        ("workerMaxMinorSkew", "4"),
        ("fetchInNode", "yes"),
        ("artifactURL", "dl.k8s.io/release"),
    ] {
        let mut docs = config();
        docs.one_mut("ExtensionConfig")["spec"]["settings"][key] = json!(bad);
        assert_rejects(check_settings, &docs, key);
    }

    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["settings"]
        .as_object_mut()
        .unwrap()
        .remove("fetchInNode");
    assert_rejects(check_settings, &docs, "fetchInNode is not documented");
}

#[test]
fn namespace_selector_check_rejects_a_selector_without_default() {
    let mut docs = config();
    docs.one_mut("ExtensionConfig")["spec"]["namespaceSelector"]["matchExpressions"][0]["values"] =
        json!(["clusters"]);
    assert_rejects(check_namespace_selector, &docs, "does not admit");
}

fn capi_cluster_mut(docs: &mut Docs) -> &mut Value {
    &mut docs
        .0
        .iter_mut()
        .find(|d| d.kind() == "Cluster" && d.value["apiVersion"] != KIND_CONFIG_API)
        .unwrap()
        .value
}

#[test]
fn kind_e2e_check_rejects_dangling_refs_and_surge() {
    let mut docs = load("e2e/kind");
    docs.one_mut("ClusterClass")["spec"]["infrastructure"]["templateRef"]["name"] =
        json!("missing");
    assert_rejects(check_kind_e2e, &docs, "missing");

    let mut docs = load("e2e/kind");
    docs.one_mut("KubeadmControlPlaneTemplate")["spec"]["template"]["spec"]["rollout"]["strategy"]
        ["rollingUpdate"]["maxSurge"] = json!(1);
    assert_rejects(check_kind_e2e, &docs, "KCP maxSurge");

    let mut docs = load("e2e/kind");
    capi_cluster_mut(&mut docs)["spec"]["topology"]["classRef"]["name"] = json!("quick-start");
    assert_rejects(check_kind_e2e, &docs, "uses class");

    let mut docs = load("e2e/kind");
    capi_cluster_mut(&mut docs)["spec"]["topology"]["workers"]["machineDeployments"][0]["rollout"]
        ["strategy"]["rollingUpdate"]["maxSurge"] = json!(1);
    assert_rejects(check_kind_e2e, &docs, "maxSurge 0");
}
