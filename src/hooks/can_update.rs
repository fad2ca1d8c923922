//! The in-place decision for CanUpdateMachine (KubeadmControlPlane) and CanUpdateMachineSet
//! (MachineDeployment): pure functions from a request to a response.
//!
//! In-place capable is a Kubernetes version change and nothing else, except what the version drags along:
//!
//! * Machine `spec.version` / MachineSet `spec.template.spec.version`: strict `vMAJOR.MINOR.PATCH`, no
//!   downgrade, no major change, at most one minor for control-plane Machines (kubeadm's rule) and at
//!   most `workerMaxMinorSkew` minors for MachineSets. Other Machine spec fields are compared after the
//!   same cleanup CAPI applies (`CleanupMachineSpecForDiff`), so only `version` and `failureDomain` can
//!   differ, and a `failureDomain` change is declined.
//! * The kind node image on the infrastructure object: DockerMachine `spec.customImage`,
//!   DockerMachineTemplate `spec.template.spec.customImage`, DevMachine `spec.backend.docker.customImage`,
//!   DevMachineTemplate `spec.template.spec.backend.docker.customImage`. The new image must be
//!   `<repository>:<desired version>` with an optional `@sha256:<64 hex>`, where the repository is one of
//!   `kindImageRepositories` (default `kindest/node` and `docker.io/kindest/node`, the repository kind's
//!   own image mapper uses; a registry mirror is opt-in because another repository may ship another
//!   base image). The old image must be empty or a kind node image too, and the Kubernetes version must
//!   change with it. Other infrastructure kinds, and DevMachines whose backend is not docker, are declined.
//! * KubeadmConfig / KubeadmConfigTemplate: the whole spec must stay the same, except
//!   `clusterConfiguration.featureGates.ControlPlaneKubeletLocalMode`, which KubeadmControlPlane adds or
//!   drops by itself around a version change (reference §9, problem 3); that key (and a `featureGates` or
//!   `clusterConfiguration` holding nothing else) may change together with a version change. Files,
//!   commands, extra args and every other field are declined.
//!
//! Everything else is declined: `Success` with no patches and a short, deterministic message, so CAPI
//! falls back to a rollout. `Failure` is never used to mean "no"; it would block the rollout.
//!
//! Accepted changes are answered with one JSON Patch per changed object, with paths on the whole
//! object (`/spec/version`, `/spec/template/spec/customImage`, ...). The patches cover exactly the
//! differences found, so CAPI's own check (apply to current, copy back `spec` or `spec.template.spec`,
//! clean, compare with desired) ends in a match only when this module saw every difference.

use std::cmp::Ordering;

use serde::Serialize;
use serde_json::Value;

use super::settings::{CONTROL_PLANE_MAX_MINOR_SKEW, DISABLE_IN_PLACE_UPDATES, Settings};
use super::types::{
    CanUpdateMachineRequest, CanUpdateMachineResponse, CanUpdateMachineSetRequest,
    CanUpdateMachineSetResponse, CanUpdateReads, Outline, Patch, Reads, RequestObject,
    ResponseStatus, object,
};
use crate::version::{self, KubeVersion};

const INFRASTRUCTURE_GROUP: &str = "infrastructure.cluster.x-k8s.io";
const BOOTSTRAP_GROUP: &str = "bootstrap.cluster.x-k8s.io";

/// The only KubeadmConfig field allowed to change, and only together with a version change.
const KUBELET_LOCAL_MODE_GATE: [&str; 3] = [
    "clusterConfiguration",
    "featureGates",
    "ControlPlaneKubeletLocalMode",
];

/// The decision for one request, before it becomes a wire response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// Short and deterministic; it ends up in CAPI's logs.
    pub message: String,
    /// `None` declines the change.
    pub patches: Option<Patches>,
    /// Why, from a closed set of labels, for the decisions metric.
    pub reason: &'static str,
}

/// JSON Patch operations per object; an empty list means "no patch for this object".
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Patches {
    /// Machine or MachineSet.
    pub owner: Vec<Operation>,
    /// Infrastructure machine or template.
    pub infrastructure: Vec<Operation>,
    /// Bootstrap config or template.
    pub bootstrap: Vec<Operation>,
}

/// One JSON Patch (RFC 6902) operation: `add`, `remove` or `replace`. A struct rather than a JSON
/// map, so that building and writing one allocates little.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Operation {
    pub op: &'static str,
    /// A JSON pointer (RFC 6901) on the whole object.
    pub path: String,
    /// The new value; none for `remove`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

impl Decision {
    fn decline(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            patches: None,
            reason,
        }
    }
}

/// Why this extension's UpdateMachine would refuse an update with these settings whatever the
/// Machine (see `UpdateMachineHandler::refuses`), or `None`. A change it would refuse is
/// declined, so CAPI replaces the Machine instead of retrying an update that cannot start; every
/// other decline keeps its own message.
pub type Refuses<'a> = &'a dyn Fn(&Settings) -> Option<String>;

/// Answers CanUpdateMachine; also returns the decision's reason label, for metrics.
pub fn can_update_machine(
    request: &CanUpdateMachineRequest,
    refuses: Refuses,
) -> (CanUpdateMachineResponse, &'static str) {
    let decision = machine_decision(request, refuses);
    let mut response = CanUpdateMachineResponse::new(ResponseStatus::Success, decision.message);
    if let Some(patches) = decision.patches {
        response.machine_patch = to_patch(&patches.owner);
        response.infrastructure_machine_patch = to_patch(&patches.infrastructure);
        response.bootstrap_config_patch = to_patch(&patches.bootstrap);
    }
    (response, decision.reason)
}

fn machine_decision(request: &CanUpdateMachineRequest, refuses: Refuses) -> Decision {
    decide(
        &MACHINE,
        &request.settings,
        refuses,
        Objects {
            owner: request.current.machine.as_ref(),
            infrastructure: request.current.infrastructure_machine.as_ref(),
            bootstrap: request.current.bootstrap_config.as_ref(),
        },
        Objects {
            owner: request.desired.machine.as_ref(),
            infrastructure: request.desired.infrastructure_machine.as_ref(),
            bootstrap: request.desired.bootstrap_config.as_ref(),
        },
    )
}

/// Answers CanUpdateMachineSet; also returns the decision's reason label, for metrics.
pub fn can_update_machine_set(
    request: &CanUpdateMachineSetRequest,
    refuses: Refuses,
) -> (CanUpdateMachineSetResponse, &'static str) {
    let decision = decide(
        &MACHINE_SET,
        &request.settings,
        refuses,
        Objects {
            owner: request.current.machine_set.as_ref(),
            infrastructure: request.current.infrastructure_machine_template.as_ref(),
            bootstrap: request.current.bootstrap_config_template.as_ref(),
        },
        Objects {
            owner: request.desired.machine_set.as_ref(),
            infrastructure: request.desired.infrastructure_machine_template.as_ref(),
            bootstrap: request.desired.bootstrap_config_template.as_ref(),
        },
    );
    let mut response = CanUpdateMachineSetResponse::new(ResponseStatus::Success, decision.message);
    if let Some(patches) = decision.patches {
        response.machine_set_patch = to_patch(&patches.owner);
        response.infrastructure_machine_template_patch = to_patch(&patches.infrastructure);
        response.bootstrap_config_template_patch = to_patch(&patches.bootstrap);
    }
    (response, decision.reason)
}

fn to_patch(operations: &[Operation]) -> Option<Patch> {
    (!operations.is_empty()).then(|| Patch::json_patch(operations))
}

/// Where things live for one hook: Machine-shaped (`spec`) or template-shaped (`spec.template.spec`).
struct Shape {
    owner_kind: &'static str,
    /// The part of every object CAPI copies back and compares.
    spec_path: &'static [&'static str],
    /// `spec_path` as messages name it.
    spec_name: &'static str,
    /// Accepted infrastructure kinds, with the path of the kind image below `spec_path`.
    infrastructure_kinds: [(&'static str, &'static [&'static str]); 2],
    bootstrap_kind: &'static str,
    /// Minor versions one update may cross; `None` reads `workerMaxMinorSkew`.
    max_minors: Option<u64>,
}

const DOCKER_IMAGE: &[&str] = &["customImage"];
const DEV_DOCKER_IMAGE: &[&str] = &["backend", "docker", "customImage"];

const MACHINE_SPEC: &[&str] = &["spec"];
const MACHINE_SET_SPEC: &[&str] = &["spec", "template", "spec"];

static MACHINE: Shape = Shape {
    owner_kind: "Machine",
    spec_path: MACHINE_SPEC,
    spec_name: "spec",
    infrastructure_kinds: [
        ("DockerMachine", DOCKER_IMAGE),
        ("DevMachine", DEV_DOCKER_IMAGE),
    ],
    bootstrap_kind: "KubeadmConfig",
    max_minors: Some(CONTROL_PLANE_MAX_MINOR_SKEW),
};

static MACHINE_SET: Shape = Shape {
    owner_kind: "MachineSet",
    spec_path: MACHINE_SET_SPEC,
    spec_name: "spec.template.spec",
    infrastructure_kinds: [
        ("DockerMachineTemplate", DOCKER_IMAGE),
        ("DevMachineTemplate", DEV_DOCKER_IMAGE),
    ],
    bootstrap_kind: "KubeadmConfigTemplate",
    max_minors: None,
};

/// What [`decide`] reads of an owner's or a bootstrap config's spec that is the same on both
/// sides: nothing can differ between the two, and nothing is checked of one side alone.
const UNCHANGED_SPEC: Outline = Outline::Fields(&[]);

/// What [`decide`] reads of an infrastructure spec that is the same on both sides: whether a
/// DevMachine's `backend.docker` ([`DEV_DOCKER_IMAGE`]) is an object, checked on each side alone.
const UNCHANGED_INFRASTRUCTURE_SPEC: Outline = Outline::Fields(&[(
    "backend",
    Outline::Fields(&[("docker", Outline::Fields(&[]))]),
)]);

/// What [`decide`] reads of the objects of a CanUpdateMachine request, in step with [`MACHINE`].
const MACHINE_READS: Reads = Reads {
    spec: Outline::Spec,
    spec_path: MACHINE_SPEC,
    unchanged: [
        UNCHANGED_SPEC,
        UNCHANGED_INFRASTRUCTURE_SPEC,
        UNCHANGED_SPEC,
    ],
};

impl CanUpdateReads for CanUpdateMachineRequest {
    const READS: &'static Reads = &MACHINE_READS;
}

/// A template's spec, where a MachineSet and the templates it points at keep theirs (in their
/// `spec`).
const TEMPLATE_SPEC: Outline =
    Outline::Fields(&[("template", Outline::Fields(&[("spec", Outline::Spec)]))]);

/// As [`MACHINE_READS`], for a CanUpdateMachineSet request, in step with [`MACHINE_SET`].
const MACHINE_SET_READS: Reads = Reads {
    spec: TEMPLATE_SPEC,
    spec_path: MACHINE_SET_SPEC,
    unchanged: [
        UNCHANGED_SPEC,
        UNCHANGED_INFRASTRUCTURE_SPEC,
        UNCHANGED_SPEC,
    ],
};

impl CanUpdateReads for CanUpdateMachineSetRequest {
    const READS: &'static Reads = &MACHINE_SET_READS;
}

/// One side (current or desired) of a request.
#[derive(Clone, Copy)]
struct Objects<'a> {
    owner: Option<&'a RequestObject>,
    infrastructure: Option<&'a RequestObject>,
    bootstrap: Option<&'a RequestObject>,
}

/// The version change an accepted update makes.
#[derive(Clone, Copy)]
struct VersionChange {
    from: KubeVersion,
    to: KubeVersion,
}

fn decide(
    shape: &Shape,
    settings: &std::collections::BTreeMap<String, String>,
    refuses: Refuses,
    current: Objects<'_>,
    desired: Objects<'_>,
) -> Decision {
    match try_decide(shape, settings, refuses, current, desired) {
        Ok(decision) | Err(decision) => decision,
    }
}

/// `Err` carries a decline, so `?` reads as "decline with this".
fn try_decide(
    shape: &Shape,
    settings: &std::collections::BTreeMap<String, String>,
    refuses: Refuses,
    current: Objects<'_>,
    desired: Objects<'_>,
) -> Result<Decision, Decision> {
    let settings = Settings::from_map(settings)
        .map_err(|err| Decision::decline("settings", err.to_string()))?;
    if settings.disable_in_place_updates {
        return Err(Decision::decline(
            "settings",
            format!("in-place updates are disabled by setting {DISABLE_IN_PLACE_UPDATES}"),
        ));
    }
    let owner_kind = shape.owner_kind;
    let (Some(current_owner), Some(desired_owner)) = (current.owner, desired.owner) else {
        return Err(Decision::decline(
            "unsupported_object",
            format!("request has no {owner_kind}"),
        ));
    };
    let (Some(current_infra), Some(desired_infra)) =
        (current.infrastructure, desired.infrastructure)
    else {
        return Err(Decision::decline(
            "unsupported_object",
            "request has no infrastructure object",
        ));
    };
    let image_path = infrastructure_image_path(shape, current_infra, desired_infra)?;
    check_bootstrap_kinds(shape, current.bootstrap, desired.bootstrap)?;

    let max_minors = shape.max_minors.unwrap_or(settings.worker_max_minor_skew);
    let (version_change, owner_ops) =
        owner_version_change(shape, current_owner, desired_owner, max_minors)?;
    let infrastructure_ops = infrastructure_changes(
        shape,
        image_path,
        current_infra,
        desired_infra,
        version_change,
        &settings,
    )?;
    let bootstrap_ops = match (current.bootstrap, desired.bootstrap) {
        (Some(current_bootstrap), Some(desired_bootstrap)) => {
            bootstrap_changes(shape, current_bootstrap, desired_bootstrap, version_change)?
        }
        _ => Vec::new(),
    };

    let patched =
        !(owner_ops.is_empty() && infrastructure_ops.is_empty() && bootstrap_ops.is_empty());
    if patched && let Some(message) = refuses(&settings) {
        return Err(Decision::decline("settings", message));
    }

    let (message, reason) = match version_change {
        Some(change) => (
            format!(
                "in-place update: Kubernetes {} to {}",
                change.from, change.to
            ),
            "version_change",
        ),
        None => ("nothing to update in place".to_owned(), "no_change"),
    };
    Ok(Decision {
        message,
        reason,
        patches: Some(Patches {
            owner: owner_ops,
            infrastructure: infrastructure_ops,
            bootstrap: bootstrap_ops,
        }),
    })
}

/// Checks the infrastructure kind and returns the path of its kind image below `spec_path`.
fn infrastructure_image_path(
    shape: &Shape,
    current: &RequestObject,
    desired: &RequestObject,
) -> Result<&'static [&'static str], Decision> {
    let kind = current.kind.as_str();
    if desired.kind.as_str() != kind || desired.api_group() != current.api_group() {
        return Err(Decision::decline(
            "unsupported_object",
            "infrastructure kind changed",
        ));
    }
    let image_path = shape
        .infrastructure_kinds
        .iter()
        .find(|(supported, _)| *supported == kind)
        .filter(|_| current.api_group() == INFRASTRUCTURE_GROUP)
        .map(|(_, path)| *path)
        .ok_or_else(|| {
            Decision::decline(
                "unsupported_object",
                format!(
                    "infrastructure kind {} is not supported",
                    printable_kind(kind)
                ),
            )
        })?;
    // A DevMachine may run on other backends (in-memory); only docker containers can be upgraded.
    if image_path.len() > 1 {
        let backend = &image_path[..image_path.len() - 1];
        for side in [current, desired] {
            let docker = side
                .get(shape.spec_path)
                .and_then(|spec| object::get(spec, backend));
            if !docker.is_some_and(Value::is_object) {
                return Err(Decision::decline(
                    "unsupported_object",
                    format!("{kind} backend is not docker"),
                ));
            }
        }
    }
    Ok(image_path)
}

fn check_bootstrap_kinds(
    shape: &Shape,
    current: Option<&RequestObject>,
    desired: Option<&RequestObject>,
) -> Result<(), Decision> {
    match (current, desired) {
        (None, None) => Ok(()),
        (Some(current), Some(desired)) => {
            for side in [current, desired] {
                let kind = side.kind.as_str();
                if kind != shape.bootstrap_kind || side.api_group() != BOOTSTRAP_GROUP {
                    return Err(Decision::decline(
                        "unsupported_object",
                        format!("bootstrap kind {} is not supported", printable_kind(kind)),
                    ));
                }
            }
            Ok(())
        }
        _ => Err(Decision::decline(
            "unsupported_object",
            "bootstrap config is present on one side only",
        )),
    }
}

/// A kind is untrusted text: show it only when it looks like a Kubernetes kind.
fn printable_kind(kind: &str) -> &str {
    if !kind.is_empty() && kind.len() <= 63 && kind.chars().all(|c| c.is_ascii_alphanumeric()) {
        kind
    } else {
        "(invalid)"
    }
}

/// The specs the decision compares of a current and a desired object, or a decline naming the
/// object as `kind` when either has none.
fn specs<'a>(
    shape: &Shape,
    kind: &str,
    current: &'a RequestObject,
    desired: &'a RequestObject,
) -> Result<(&'a Value, &'a Value), Decision> {
    match (current.get(shape.spec_path), desired.get(shape.spec_path)) {
        (Some(current), Some(desired)) => Ok((current, desired)),
        _ => Err(Decision::decline(
            "unsupported_object",
            format!("{kind} has no {}", shape.spec_name),
        )),
    }
}

/// Compares the cleaned owner specs. Only `version` may differ; returns the change and its patch.
fn owner_version_change(
    shape: &Shape,
    current: &RequestObject,
    desired: &RequestObject,
    max_minors: u64,
) -> Result<(Option<VersionChange>, Vec<Operation>), Decision> {
    let owner_kind = shape.owner_kind;
    let spec_name = shape.spec_name;
    let (current_spec, desired_spec) = specs(shape, owner_kind, current, desired)?;
    let current_spec = cleanup_machine_spec(current_spec);
    let desired_spec = cleanup_machine_spec(desired_spec);
    let mut version_differs = false;
    for difference in differences(&current_spec, &desired_spec) {
        if difference.path == ["version"] {
            version_differs = true;
        } else {
            return Err(Decision::decline(
                "not_version_change",
                format!(
                    "{owner_kind} {spec_name}.{} changed",
                    difference.path.join(".")
                ),
            ));
        }
    }
    if !version_differs {
        return Ok((None, Vec::new()));
    }
    let parse = |spec: &Value, side: &str| {
        let text = object::get_str(spec, &["version"]).unwrap_or_default();
        KubeVersion::parse(text).map_err(|err| {
            Decision::decline(
                "invalid_version",
                format!("{side} {owner_kind} {spec_name}.version is {err}"),
            )
        })
    };
    let from = parse(&current_spec, "current")?;
    let to = parse(&desired_spec, "desired")?;
    version::check_upgrade(from, to, max_minors).map_err(|err| {
        let reason = match err {
            version::Error::Downgrade { .. } => "downgrade",
            version::Error::TooManyMinors { .. } => "skips_minor",
            version::Error::MajorChange { .. } => "major_change",
            version::Error::Malformed => "invalid_version",
        };
        Decision::decline(reason, err.to_string())
    })?;
    let mut path: Vec<&str> = shape.spec_path.to_vec();
    path.push("version");
    let operation = Operation {
        op: "replace",
        path: json_pointer(&path),
        value: Some(Value::String(to.to_string())),
    };
    Ok((Some(VersionChange { from, to }), vec![operation]))
}

/// `CleanupMachineSpecForDiff` (cluster-api `internal/util/inplace/inplace.go`) on JSON: the fields
/// CAPI never compares are dropped, then zero values are pruned because CAPI compares typed Go
/// structs, where `null`, `""`, `{}` and `[]` are all the same as absent.
fn cleanup_machine_spec(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(fields) = spec.as_object_mut() {
        for ignored in [
            "clusterName",
            "bootstrap",
            "infrastructureRef",
            "providerID",
            "minReadySeconds",
            "readinessGates",
            "taints",
        ] {
            fields.remove(ignored);
        }
        if let Some(deletion) = fields.get_mut("deletion").and_then(Value::as_object_mut) {
            for ignored in [
                "nodeDrainTimeoutSeconds",
                "nodeVolumeDetachTimeoutSeconds",
                "nodeDeletionTimeoutSeconds",
            ] {
                deletion.remove(ignored);
            }
        }
    }
    prune_zero_values(&mut spec);
    spec
}

fn prune_zero_values(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            for field in fields.values_mut() {
                prune_zero_values(field);
            }
            fields.retain(|_, field| !is_zero(field));
        }
        Value::Array(items) => items.iter_mut().for_each(prune_zero_values),
        _ => {}
    }
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

fn infrastructure_changes(
    shape: &Shape,
    image_path: &[&str],
    current: &RequestObject,
    desired: &RequestObject,
    version_change: Option<VersionChange>,
    settings: &Settings,
) -> Result<Vec<Operation>, Decision> {
    let kind = current.kind.as_str();
    let spec_name = shape.spec_name;
    let (current_spec, desired_spec) = specs(shape, kind, current, desired)?;
    // Only for the messages of declines.
    let image_name = || format!("{kind} {spec_name}.{}", image_path.join("."));
    let mut operations = Vec::new();
    for difference in differences(current_spec, desired_spec) {
        if difference.path != image_path {
            return Err(Decision::decline(
                "not_version_change",
                format!("{kind} {spec_name}.{} changed", difference.path.join(".")),
            ));
        }
        let Some(change) = version_change else {
            return Err(Decision::decline(
                "not_version_change",
                format!(
                    "{} changed without a Kubernetes version change",
                    image_name()
                ),
            ));
        };
        let current_image = difference
            .current
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !current_image.is_empty()
            && kind_image_tag(current_image, &settings.kind_image_repositories)
                .is_none_or(|tag| KubeVersion::parse(tag).is_err())
        {
            return Err(Decision::decline(
                "unrelated_image",
                format!("current {} is not a kind node image", image_name()),
            ));
        }
        let desired_tag = difference
            .desired
            .and_then(Value::as_str)
            .and_then(|image| kind_image_tag(image, &settings.kind_image_repositories));
        if desired_tag != Some(change.to.to_string().as_str()) {
            return Err(Decision::decline(
                "unrelated_image",
                format!(
                    "desired {} is not a kind node image for {}",
                    image_name(),
                    change.to
                ),
            ));
        }
        operations.push(operation(shape.spec_path, &difference));
    }
    Ok(operations)
}

/// The tag of `<repository>:<tag>[@sha256:<64 hex>]` when the repository is a kind node repository.
fn kind_image_tag<'a>(image: &'a str, repositories: &[String]) -> Option<&'a str> {
    let name = match image.split_once('@') {
        Some((name, digest)) => {
            let hex = digest.strip_prefix("sha256:")?;
            let valid =
                hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            valid.then_some(name)?
        }
        None => image,
    };
    let (repository, tag) = name.rsplit_once(':')?;
    // A ':' followed by a '/' is a registry port, not a tag.
    if tag.contains('/') {
        return None;
    }
    repositories
        .iter()
        .any(|known| known == repository)
        .then_some(tag)
}

fn bootstrap_changes(
    shape: &Shape,
    current: &RequestObject,
    desired: &RequestObject,
    version_change: Option<VersionChange>,
) -> Result<Vec<Operation>, Decision> {
    let kind = current.kind.as_str();
    let spec_name = shape.spec_name;
    let (current_spec, desired_spec) = specs(shape, kind, current, desired)?;
    let mut operations = Vec::new();
    for difference in differences(current_spec, desired_spec) {
        // Named only in a decline: the accepted gate toggle needs no text.
        let field = || format!("{kind} {spec_name}.{}", difference.path.join("."));
        if !is_kubelet_local_mode_toggle(&difference) {
            return Err(Decision::decline(
                "not_version_change",
                format!("{} changed", field()),
            ));
        }
        if version_change.is_none() {
            return Err(Decision::decline(
                "not_version_change",
                format!("{} changed without a Kubernetes version change", field()),
            ));
        }
        operations.push(operation(shape.spec_path, &difference));
    }
    Ok(operations)
}

/// True when the difference is the `ControlPlaneKubeletLocalMode` gate, or a parent of it that holds
/// nothing else on either side.
fn is_kubelet_local_mode_toggle(difference: &Difference<'_>) -> bool {
    let allowed = &KUBELET_LOCAL_MODE_GATE[..];
    if difference.path.len() >= allowed.len() {
        return difference.path[..allowed.len()] == *allowed;
    }
    let Some(rest) = allowed.strip_prefix(difference.path.as_slice()) else {
        return false;
    };
    holds_only(difference.current, rest) && holds_only(difference.desired, rest)
}

/// True when `value` is absent, or an object chain that holds nothing but `path`.
fn holds_only(value: Option<&Value>, path: &[&str]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return true;
    };
    match value {
        None => true,
        Some(Value::Object(fields)) => {
            fields.keys().all(|key| key == first) && holds_only(fields.get(*first), rest)
        }
        Some(_) => false,
    }
}

/// One place where current and desired differ: a key present on one side only, or unequal values
/// that are not both objects (arrays are compared whole, as a list change is one change).
#[derive(Debug)]
struct Difference<'a> {
    path: Vec<&'a str>,
    current: Option<&'a Value>,
    desired: Option<&'a Value>,
}

/// Every difference between two values, in key order.
fn differences<'a>(current: &'a Value, desired: &'a Value) -> Vec<Difference<'a>> {
    let mut found = Vec::new();
    collect_differences(Some(current), Some(desired), &mut Vec::new(), &mut found);
    found
}

fn collect_differences<'a>(
    current: Option<&'a Value>,
    desired: Option<&'a Value>,
    path: &mut Vec<&'a str>,
    found: &mut Vec<Difference<'a>>,
) {
    // Most of a request is equal on both sides; comparing in place is far cheaper than walking
    // it key by key.
    if current == desired {
        return;
    }
    if let (Some(Value::Object(current_fields)), Some(Value::Object(desired_fields))) =
        (current, desired)
    {
        // serde_json's maps keep their keys in order (its `preserve_order` feature is off, as
        // `maps_are_sorted_by_key` checks), so the union of the two is a merge.
        let mut current_keys = current_fields.keys().peekable();
        let mut desired_keys = desired_fields.keys().peekable();
        while let Some(key) = match (current_keys.peek(), desired_keys.peek()) {
            (Some(current_key), Some(desired_key)) => match current_key.cmp(desired_key) {
                Ordering::Less => current_keys.next(),
                Ordering::Greater => desired_keys.next(),
                Ordering::Equal => {
                    desired_keys.next();
                    current_keys.next()
                }
            },
            (Some(_), None) => current_keys.next(),
            (None, _) => desired_keys.next(),
        } {
            path.push(key);
            collect_differences(
                current_fields.get(key),
                desired_fields.get(key),
                path,
                found,
            );
            path.pop();
        }
    } else {
        found.push(Difference {
            path: path.clone(),
            current,
            desired,
        });
    }
}

/// The JSON Patch operation that turns the current side of `difference` into the desired side.
fn operation(spec_path: &[&str], difference: &Difference<'_>) -> Operation {
    let mut path: Vec<&str> = spec_path.to_vec();
    path.extend_from_slice(&difference.path);
    let path = json_pointer(&path);
    let (op, value) = match (difference.current, difference.desired) {
        (None, Some(value)) => ("add", Some(value.clone())),
        (Some(_), None) => ("remove", None),
        // Both sides present.
        (_, value) => ("replace", Some(value.cloned().unwrap_or(Value::Null))),
    };
    Operation { op, path, value }
}

/// RFC 6901 pointer from object keys.
fn json_pointer(path: &[&str]) -> String {
    let mut pointer = String::new();
    for key in path {
        pointer.push('/');
        for character in key.chars() {
            match character {
                '~' => pointer.push_str("~0"),
                '/' => pointer.push_str("~1"),
                other => pointer.push(other),
            }
        }
    }
    pointer
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::hooks::types::{
        CanUpdateMachineRequestObjects, CanUpdateMachineSetRequestObjects, HookRequest,
    };
    use serde_json::json;

    fn docker_machine(image: Option<&str>) -> Value {
        let mut spec = json!({"providerID": "docker:////c1-cp-7xk2p"});
        if let Some(image) = image {
            spec["customImage"] = json!(image);
        }
        json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2",
            "kind": "DockerMachine",
            "metadata": {"name": "c1-cp-7xk2p", "namespace": "default"},
            "spec": spec,
        })
    }

    fn machine(version: &str) -> Value {
        json!({
            "apiVersion": "cluster.x-k8s.io/v1beta2",
            "kind": "Machine",
            "metadata": {"name": "c1-cp-7xk2p", "namespace": "default"},
            "spec": {
                "clusterName": "c1",
                "version": version,
                "providerID": "docker:////c1-cp-7xk2p",
                "bootstrap": {"dataSecretName": "c1-cp-7xk2p"},
                "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachine", "name": "c1-cp-7xk2p"},
                "deletion": {"nodeDrainTimeoutSeconds": 0},
            },
        })
    }

    fn kubeadm_config(feature_gates: Option<Value>) -> Value {
        let mut cluster_configuration = json!({"apiServer": {"certSANs": ["localhost"]}});
        if let Some(gates) = feature_gates {
            cluster_configuration["featureGates"] = gates;
        }
        json!({
            "apiVersion": "bootstrap.cluster.x-k8s.io/v1beta2",
            "kind": "KubeadmConfig",
            "metadata": {"name": "c1-cp-7xk2p", "namespace": "default"},
            "spec": {"clusterConfiguration": cluster_configuration, "files": []},
        })
    }

    struct Case {
        name: &'static str,
        settings: &'static [(&'static str, &'static str)],
        current: (Value, Value, Option<Value>),
        desired: (Value, Value, Option<Value>),
        message: &'static str,
        accepted: bool,
    }

    /// The request a case sends, as KubeadmControlPlane puts it on the wire.
    fn request_body(case: &Case) -> Value {
        let wire = |side: &(Value, Value, Option<Value>)| json!({"machine": side.0, "infrastructureMachine": side.1, "bootstrapConfig": side.2});
        let settings: serde_json::Map<String, Value> = case
            .settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        json!({
            "settings": settings,
            "current": wire(&case.current),
            "desired": wire(&case.desired),
        })
    }

    /// The decision on a case's request, read as it is served.
    fn run(case: &Case) -> Decision {
        let body = request_body(case).to_string();
        machine_decision(
            &CanUpdateMachineRequest::read(body.as_bytes()).unwrap(),
            &|_| None,
        )
    }

    #[test]
    fn machine_decisions() {
        let img = |v: &str| Some(format!("kindest/node:{v}"));
        let dm = |image: Option<String>| docker_machine(image.as_deref());
        let cases = [
            Case {
                name: "version only",
                settings: &[],
                current: (
                    machine("v1.33.6"),
                    dm(img("v1.33.6")),
                    Some(kubeadm_config(None)),
                ),
                desired: (
                    machine("v1.34.2"),
                    dm(img("v1.33.6")),
                    Some(kubeadm_config(None)),
                ),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.2",
                accepted: true,
            },
            Case {
                name: "version and kind image with digest",
                settings: &[],
                current: (machine("v1.33.6"), dm(img("v1.33.6")), None),
                desired: (
                    machine("v1.34.2"),
                    dm(Some(format!(
                        "kindest/node:v1.34.2@sha256:{}",
                        "a".repeat(64)
                    ))),
                    None,
                ),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.2",
                accepted: true,
            },
            Case {
                name: "image for another version",
                settings: &[],
                current: (machine("v1.33.6"), dm(img("v1.33.6")), None),
                desired: (machine("v1.34.2"), dm(img("v1.34.1")), None),
                message: "desired DockerMachine spec.customImage is not a kind node image for v1.34.2",
                accepted: false,
            },
            Case {
                name: "short digest",
                settings: &[],
                current: (machine("v1.33.6"), dm(img("v1.33.6")), None),
                desired: (
                    machine("v1.34.2"),
                    dm(Some("kindest/node:v1.34.2@sha256:abc".to_owned())),
                    None,
                ),
                message: "desired DockerMachine spec.customImage is not a kind node image for v1.34.2",
                accepted: false,
            },
            Case {
                name: "mirror needs the setting",
                settings: &[],
                current: (machine("v1.33.6"), dm(img("v1.33.6")), None),
                desired: (
                    machine("v1.34.2"),
                    dm(Some(
                        "registry.example:5000/kindest/node:v1.34.2".to_owned(),
                    )),
                    None,
                ),
                message: "desired DockerMachine spec.customImage is not a kind node image for v1.34.2",
                accepted: false,
            },
            Case {
                name: "mirror allowed by the setting",
                settings: &[(
                    "kindImageRepositories",
                    "kindest/node,registry.example:5000/kindest/node",
                )],
                current: (machine("v1.33.6"), dm(img("v1.33.6")), None),
                desired: (
                    machine("v1.34.2"),
                    dm(Some(
                        "registry.example:5000/kindest/node:v1.34.2".to_owned(),
                    )),
                    None,
                ),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.2",
                accepted: true,
            },
            Case {
                name: "custom base image before",
                settings: &[],
                current: (
                    machine("v1.33.6"),
                    dm(Some("example/node:v1.33.6".to_owned())),
                    None,
                ),
                desired: (machine("v1.34.2"), dm(img("v1.34.2")), None),
                message: "current DockerMachine spec.customImage is not a kind node image",
                accepted: false,
            },
            Case {
                name: "image without version change",
                settings: &[],
                current: (machine("v1.34.2"), dm(img("v1.34.2")), None),
                desired: (
                    machine("v1.34.2"),
                    dm(Some(format!(
                        "kindest/node:v1.34.2@sha256:{}",
                        "b".repeat(64)
                    ))),
                    None,
                ),
                message: "DockerMachine spec.customImage changed without a Kubernetes version change",
                accepted: false,
            },
            Case {
                name: "image from empty",
                settings: &[],
                current: (machine("v1.33.6"), dm(None), None),
                desired: (machine("v1.34.2"), dm(img("v1.34.2")), None),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.2",
                accepted: true,
            },
            Case {
                name: "feature gate toggled with the version",
                settings: &[],
                current: (
                    machine("v1.33.6"),
                    dm(None),
                    Some(kubeadm_config(Some(
                        json!({"ControlPlaneKubeletLocalMode": true}),
                    ))),
                ),
                desired: (machine("v1.34.2"), dm(None), Some(kubeadm_config(None))),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.2",
                accepted: true,
            },
            Case {
                name: "another feature gate",
                settings: &[],
                current: (machine("v1.33.6"), dm(None), Some(kubeadm_config(None))),
                desired: (
                    machine("v1.34.2"),
                    dm(None),
                    Some(kubeadm_config(Some(
                        json!({"ControlPlaneKubeletLocalMode": true, "Other": true}),
                    ))),
                ),
                message: "KubeadmConfig spec.clusterConfiguration.featureGates changed",
                accepted: false,
            },
            Case {
                name: "feature gate without version change",
                settings: &[],
                current: (machine("v1.34.2"), dm(None), Some(kubeadm_config(None))),
                desired: (
                    machine("v1.34.2"),
                    dm(None),
                    Some(kubeadm_config(Some(
                        json!({"ControlPlaneKubeletLocalMode": false}),
                    ))),
                ),
                message: "KubeadmConfig spec.clusterConfiguration.featureGates changed without a Kubernetes version change",
                accepted: false,
            },
            Case {
                name: "failure domain",
                settings: &[],
                current: (machine("v1.33.6"), dm(None), None),
                desired: (
                    {
                        let mut m = machine("v1.33.6");
                        m["spec"]["failureDomain"] = json!("fd2");
                        m
                    },
                    dm(None),
                    None,
                ),
                message: "Machine spec.failureDomain changed",
                accepted: false,
            },
            Case {
                name: "ignored machine fields",
                settings: &[],
                current: (machine("v1.33.6"), dm(None), None),
                desired: (
                    {
                        let mut m = machine("v1.34.0");
                        m["spec"]["deletion"] = json!({"nodeDrainTimeoutSeconds": 30});
                        m["spec"]["providerID"] = json!(null);
                        m["spec"]["failureDomain"] = json!("");
                        m
                    },
                    dm(None),
                    None,
                ),
                message: "in-place update: Kubernetes v1.33.6 to v1.34.0",
                accepted: true,
            },
            Case {
                name: "downgrade",
                settings: &[],
                current: (machine("v1.34.2"), dm(None), None),
                desired: (machine("v1.33.6"), dm(None), None),
                message: "downgrade from v1.34.2 to v1.33.6 is not supported",
                accepted: false,
            },
            Case {
                name: "skipped minor is refused for control planes even with the worker setting",
                settings: &[("workerMaxMinorSkew", "3")],
                current: (machine("v1.32.4"), dm(None), None),
                desired: (machine("v1.34.2"), dm(None), None),
                message: "upgrade from v1.32.4 to v1.34.2 crosses 2 minor versions, at most 1 allowed",
                accepted: false,
            },
            Case {
                name: "invalid version",
                settings: &[],
                current: (machine("v1.30.4"), dm(None), None),
                desired: (machine("v1.31.0; rm -rf /"), dm(None), None),
                message: "desired Machine spec.version is not a vMAJOR.MINOR.PATCH version",
                accepted: false,
            },
            Case {
                name: "disabled",
                settings: &[("disableInPlaceUpdates", "true")],
                current: (machine("v1.33.6"), dm(None), None),
                desired: (machine("v1.34.2"), dm(None), None),
                message: "in-place updates are disabled by setting disableInPlaceUpdates",
                accepted: false,
            },
            Case {
                name: "bad setting",
                settings: &[("workerMaxMinorSkew", "9")],
                current: (machine("v1.33.6"), dm(None), None),
                desired: (machine("v1.34.2"), dm(None), None),
                message: "invalid setting workerMaxMinorSkew: expected an integer from 1 to 3",
                accepted: false,
            },
            Case {
                name: "bootstrap on one side",
                settings: &[],
                current: (machine("v1.33.6"), dm(None), Some(kubeadm_config(None))),
                desired: (machine("v1.34.2"), dm(None), None),
                message: "bootstrap config is present on one side only",
                accepted: false,
            },
            Case {
                name: "unknown infrastructure kind",
                settings: &[],
                current: (
                    machine("v1.33.6"),
                    json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2", "kind": "AWSMachine", "spec": {}}),
                    None,
                ),
                desired: (
                    machine("v1.34.2"),
                    json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2", "kind": "AWSMachine", "spec": {}}),
                    None,
                ),
                message: "infrastructure kind AWSMachine is not supported",
                accepted: false,
            },
            Case {
                name: "in-memory DevMachine",
                settings: &[],
                current: (
                    machine("v1.33.6"),
                    json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2", "kind": "DevMachine", "spec": {"backend": {"inMemory": {}}}}),
                    None,
                ),
                desired: (
                    machine("v1.34.2"),
                    json!({"apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2", "kind": "DevMachine", "spec": {"backend": {"inMemory": {}}}}),
                    None,
                ),
                message: "DevMachine backend is not docker",
                accepted: false,
            },
            Case {
                name: "no changes",
                settings: &[],
                current: (machine("v1.34.2"), dm(None), Some(kubeadm_config(None))),
                desired: (machine("v1.34.2"), dm(None), Some(kubeadm_config(None))),
                message: "nothing to update in place",
                accepted: true,
            },
        ];
        for case in &cases {
            let decision = run(case);
            assert_eq!(decision.message, case.message, "case {:?}", case.name);
            // Objects decoded whole get the very same answer.
            assert_eq!(
                machine_answer(&request_body(case)),
                decision.message,
                "case {:?}",
                case.name
            );
            assert_eq!(
                decision.patches.is_some(),
                case.accepted,
                "case {:?}",
                case.name
            );
            // The metric label comes from a closed set and agrees with the outcome.
            const DECLINES: [&str; 8] = [
                "settings",
                "unsupported_object",
                "not_version_change",
                "unrelated_image",
                "invalid_version",
                "downgrade",
                "skips_minor",
                "major_change",
            ];
            if case.accepted {
                assert!(
                    ["version_change", "no_change"].contains(&decision.reason),
                    "case {:?}: {}",
                    case.name,
                    decision.reason
                );
            } else {
                assert!(
                    DECLINES.contains(&decision.reason),
                    "case {:?}: {}",
                    case.name,
                    decision.reason
                );
            }
            // Deterministic: the same input gives the same answer.
            assert_eq!(run(case), decision, "case {:?}", case.name);
        }
    }

    /// A request's objects as they are without outlines.
    fn whole(body: &Value, side: &str, key: &str) -> Option<RequestObject> {
        body[side]
            .get(key)
            .filter(|value| !value.is_null())
            .map(RequestObject::from_value)
    }

    /// The message of the CanUpdateMachine answer to `body` as served (objects decoded along their
    /// outlines), after checking that the objects decoded whole get the very same answer.
    fn machine_answer(body: &Value) -> String {
        let served = CanUpdateMachineRequest::read(body.to_string().as_bytes()).unwrap();
        let objects = |side| CanUpdateMachineRequestObjects {
            machine: whole(body, side, "machine"),
            infrastructure_machine: whole(body, side, "infrastructureMachine"),
            bootstrap_config: whole(body, side, "bootstrapConfig"),
        };
        let whole = CanUpdateMachineRequest {
            settings: served.settings.clone(),
            current: objects("current"),
            desired: objects("desired"),
            ..Default::default()
        };
        let answer = can_update_machine(&served, &|_| None);
        assert_eq!(answer, can_update_machine(&whole, &|_| None), "{body}");
        answer.0.message
    }

    /// As [`machine_answer`], for CanUpdateMachineSet.
    fn machine_set_answer(body: &Value) -> String {
        let served = CanUpdateMachineSetRequest::read(body.to_string().as_bytes()).unwrap();
        let objects = |side| CanUpdateMachineSetRequestObjects {
            machine_set: whole(body, side, "machineSet"),
            infrastructure_machine_template: whole(body, side, "infrastructureMachineTemplate"),
            bootstrap_config_template: whole(body, side, "bootstrapConfigTemplate"),
        };
        let whole = CanUpdateMachineSetRequest {
            settings: served.settings.clone(),
            current: objects("current"),
            desired: objects("desired"),
            ..Default::default()
        };
        let answer = can_update_machine_set(&served, &|_| None);
        assert_eq!(answer, can_update_machine_set(&whole, &|_| None), "{body}");
        answer.0.message
    }

    /// A request whose pair `key` is `same` on both sides: one value, so the same bytes.
    fn with_same(mut body: Value, key: &str, same: Value) -> Value {
        body["current"][key] = same.clone();
        body["desired"][key] = same;
        body
    }

    #[test]
    fn unchanged_pairs_decide_as_whole_objects() {
        let upgrade = json!({
            "current": {
                "machine": machine("v1.33.6"),
                "infrastructureMachine": docker_machine(Some("kindest/node:v1.33.6")),
                "bootstrapConfig": kubeadm_config(None),
            },
            "desired": {
                "machine": machine("v1.34.2"),
                "infrastructureMachine": docker_machine(Some("kindest/node:v1.34.2")),
                "bootstrapConfig": kubeadm_config(None),
            },
        });
        let infra = |kind: &str, spec: Option<Value>| {
            let mut object = json!({
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2",
                "kind": kind,
                "metadata": {"name": "m", "namespace": "default"},
            });
            if let Some(spec) = spec {
                object["spec"] = spec;
            }
            object
        };
        let in_place = "in-place update: Kubernetes v1.33.6 to v1.34.2";
        let cases = [
            (
                "infrastructureMachine",
                infra("DockerMachine", None),
                "DockerMachine has no spec",
            ),
            (
                "infrastructureMachine",
                infra("DockerMachine", Some(json!("text"))),
                in_place,
            ),
            (
                "infrastructureMachine",
                infra("DockerMachine", Some(json!(null))),
                in_place,
            ),
            (
                "infrastructureMachine",
                infra("DevMachine", Some(json!({"backend": {"inMemory": {}}}))),
                "DevMachine backend is not docker",
            ),
            (
                "infrastructureMachine",
                infra("DevMachine", Some(json!({"backend": {"docker": true}}))),
                "DevMachine backend is not docker",
            ),
            (
                "infrastructureMachine",
                infra("DevMachine", Some(json!({"backend": "docker"}))),
                "DevMachine backend is not docker",
            ),
            (
                "infrastructureMachine",
                infra(
                    "DevMachine",
                    Some(json!({"backend": {"docker": {"customImage": "kindest/node:v1.33.6"}}})),
                ),
                in_place,
            ),
            (
                "infrastructureMachine",
                infra("AWSMachine", Some(json!({}))),
                "infrastructure kind AWSMachine is not supported",
            ),
            (
                "infrastructureMachine",
                json!({"apiVersion": "example.com/v1", "kind": "DockerMachine", "spec": {}}),
                "infrastructure kind DockerMachine is not supported",
            ),
            (
                "infrastructureMachine",
                json!(5),
                "infrastructure kind (invalid) is not supported",
            ),
            (
                "bootstrapConfig",
                json!({"apiVersion": "bootstrap.cluster.x-k8s.io/v1beta2", "kind": "Other", "spec": {}}),
                "bootstrap kind Other is not supported",
            ),
            (
                "bootstrapConfig",
                json!({"apiVersion": "example.com/v1", "kind": "KubeadmConfig", "spec": {}}),
                "bootstrap kind KubeadmConfig is not supported",
            ),
            (
                "bootstrapConfig",
                json!({"apiVersion": "bootstrap.cluster.x-k8s.io/v1beta2", "kind": "KubeadmConfig"}),
                "KubeadmConfig has no spec",
            ),
            (
                "bootstrapConfig",
                json!(["KubeadmConfig"]),
                "bootstrap kind (invalid) is not supported",
            ),
            (
                "machine",
                json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine"}),
                "Machine has no spec",
            ),
            (
                "machine",
                machine("v1.33.6"),
                "DockerMachine spec.customImage changed without a Kubernetes version change",
            ),
        ];
        for (key, same, message) in cases {
            let body = with_same(upgrade.clone(), key, same);
            assert_eq!(machine_answer(&body), message, "{body}");
        }

        let template = |kind: &str, template: Value| {
            json!({
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2",
                "kind": kind,
                "spec": {"template": template},
            })
        };
        let machine_set = |version: &str| {
            json!({
                "apiVersion": "cluster.x-k8s.io/v1beta2",
                "kind": "MachineSet",
                "spec": {"template": {"spec": {"version": version}}},
            })
        };
        let upgrade = json!({
            "current": {"machineSet": machine_set("v1.33.6")},
            "desired": {"machineSet": machine_set("v1.34.2")},
        });
        let cases = [
            (
                template("DevMachineTemplate", json!("text")),
                "DevMachineTemplate backend is not docker",
            ),
            (
                template(
                    "DevMachineTemplate",
                    json!({"spec": {"backend": {"inMemory": {}}}}),
                ),
                "DevMachineTemplate backend is not docker",
            ),
            (
                template(
                    "DevMachineTemplate",
                    json!({"spec": {"backend": {"docker": {}}}}),
                ),
                in_place,
            ),
            (
                template("DockerMachineTemplate", json!({})),
                "DockerMachineTemplate has no spec.template.spec",
            ),
            (
                template(
                    "DockerMachineTemplate",
                    json!({"spec": {"customImage": "x"}}),
                ),
                in_place,
            ),
        ];
        for (same, message) in cases {
            let body = with_same(upgrade.clone(), "infrastructureMachineTemplate", same);
            assert_eq!(machine_set_answer(&body), message, "{body}");
        }
        let body = with_same(upgrade.clone(), "machineSet", machine_set("v1.33.6"));
        assert_eq!(
            machine_set_answer(&body),
            "request has no infrastructure object"
        );
        // An unchanged MachineSet beside an unchanged template: decided from the outlines alone.
        let same_template = template("DockerMachineTemplate", json!({"spec": {}}));
        let body = with_same(
            with_same(upgrade, "infrastructureMachineTemplate", same_template),
            "machineSet",
            machine_set("v1.33.6"),
        );
        assert_eq!(machine_set_answer(&body), "nothing to update in place");
    }

    #[test]
    fn patches_touch_only_what_changed() {
        let object = |value: Value| RequestObject::from_value(&value);
        let current_config = object(kubeadm_config(Some(
            json!({"ControlPlaneKubeletLocalMode": true}),
        )));
        let decision = decide(
            &MACHINE,
            &Default::default(),
            &|_| None,
            Objects {
                owner: Some(&object(machine("v1.33.6"))),
                infrastructure: Some(&object(docker_machine(Some("kindest/node:v1.33.6")))),
                bootstrap: Some(&current_config),
            },
            Objects {
                owner: Some(&object(machine("v1.34.2"))),
                infrastructure: Some(&object(docker_machine(Some("kindest/node:v1.34.2")))),
                bootstrap: Some(&object(kubeadm_config(None))),
            },
        );
        let patches = decision.patches.unwrap();
        let json = |operations: &[Operation]| serde_json::to_value(operations).unwrap();
        assert_eq!(
            json(&patches.owner),
            json!([{"op": "replace", "path": "/spec/version", "value": "v1.34.2"}])
        );
        assert_eq!(
            json(&patches.infrastructure),
            json!([{"op": "replace", "path": "/spec/customImage", "value": "kindest/node:v1.34.2"}])
        );
        assert_eq!(
            json(&patches.bootstrap),
            json!([{"op": "remove", "path": "/spec/clusterConfiguration/featureGates"}])
        );
    }

    #[test]
    fn kind_image_tags() {
        let repos = vec![
            "kindest/node".to_owned(),
            "localhost:5000/kindest/node".to_owned(),
        ];
        let digest = "0123456789abcdef".repeat(4);
        let cases: &[(String, Option<&str>)] = &[
            ("kindest/node:v1.34.2".into(), Some("v1.34.2")),
            (
                format!("kindest/node:v1.34.2@sha256:{digest}"),
                Some("v1.34.2"),
            ),
            (
                format!("kindest/node:v1.34.2@sha256:{}", digest.to_uppercase()),
                None,
            ),
            ("kindest/node:v1.34.2@sha512:00".into(), None),
            ("kindest/node".into(), None),
            (
                "localhost:5000/kindest/node:v1.34.2".into(),
                Some("v1.34.2"),
            ),
            ("localhost:5000/kindest/node".into(), None),
            ("evil/kindest/node:v1.34.2".into(), None),
        ];
        for (image, expected) in cases {
            assert_eq!(kind_image_tag(image, &repos), *expected, "{image}");
        }
    }

    /// Where [`Outline::Spec`] is in `outline`, if anywhere.
    fn spec_marker(outline: &Outline) -> Option<Vec<&'static str>> {
        match outline {
            Outline::Spec => Some(Vec::new()),
            Outline::Whole => None,
            Outline::Fields(fields) => fields.iter().find_map(|(name, field)| {
                let mut path = spec_marker(field)?;
                path.insert(0, *name);
                Some(path)
            }),
        }
    }

    #[test]
    fn reads_keep_the_spec_the_decision_compares() {
        for (reads, shape) in [
            (&MACHINE_READS, &MACHINE),
            (&MACHINE_SET_READS, &MACHINE_SET),
        ] {
            // Decoding puts the spec back at `spec_path`, the shape's own constant.
            let mut marker = spec_marker(&reads.spec).expect("a spec to compare");
            marker.insert(0, "spec");
            assert_eq!(marker, reads.spec_path, "{}", shape.owner_kind);
            assert_eq!(shape.spec_path, reads.spec_path);
            assert_eq!(shape.spec_name, shape.spec_path.join("."));
        }
    }

    #[test]
    fn maps_are_sorted_by_key() {
        let map: serde_json::Map<String, Value> = [("b", 1), ("c", 2), ("a", 3)]
            .map(|(key, value)| (key.to_owned(), value.into()))
            .into_iter()
            .collect();
        assert!(map.keys().is_sorted());
        // The differences come in key order, whichever side a key is on.
        let current = json!({"b": 1, "d": 1, "e": {"x": 1}});
        let desired = json!({"a": 1, "b": 2, "c": 1, "e": {"x": 2, "y": 1}});
        let paths: Vec<Vec<&str>> = differences(&current, &desired)
            .into_iter()
            .map(|difference| difference.path)
            .collect();
        assert_eq!(
            paths,
            [
                vec!["a"],
                vec!["b"],
                vec!["c"],
                vec!["d"],
                vec!["e", "x"],
                vec!["e", "y"]
            ]
        );
    }

    #[test]
    fn json_pointer_escapes() {
        assert_eq!(json_pointer(&["spec", "a/b", "c~d"]), "/spec/a~1b/c~0d");
    }
}
