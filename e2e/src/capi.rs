//! What CAPI does with a CanUpdateMachine / CanUpdateMachineSet answer, on the wire JSON: apply each
//! patch to the whole current object, copy back only `spec` (or `spec.template.spec`), clean up, and
//! compare with desired. The decision is in place only when everything matches.
//!
//! Mirrors upstream cluster-api (v1.12 to v1.14):
//! * `controlplane/kubeadm/internal/controllers/inplace_canupdatemachine.go` (v1.14:
//!   `controlplane/kubeadm/reconcilers/kubeadmcontrolplane/inplace_canupdatemachine.go`):
//!   `applyPatchesToRequest`, `matchesMachine`, `matchesMachineSpec`, `matchesUnstructuredSpec`.
//! * `internal/controllers/machinedeployment/machinedeployment_canupdatemachineset.go` (v1.14:
//!   `core/reconcilers/machinedeployment/...`): the same for MachineSets, comparing `spec.template.spec`
//!   and the BootstrapConfigTemplate only when both sides have one.
//! * `internal/util/patch/patch.go`: `ApplyPatchToObject` (a patch with an empty `patchType` is an
//!   error; an empty JSON Patch list, or an empty or `{}` merge patch, changes nothing) and `Patch` /
//!   `CopyFields` (a copy-back path missing from the patched object is skipped).
//! * `internal/util/inplace/inplace.go`: `CleanupMachineSpecForDiff`.
//! * `internal/runtime/client/client.go`: a response whose `status` is not `Success` is an error.
//!
//! Two deliberate approximations, both because this works on JSON and not on Go types: the typed
//! Machine round trip of `ApplyPatchToTypedObject` is modelled by dropping `null`, `""`, `{}` and
//! `[]` before comparing Machine specs (Go's `omitempty`), and a CanUpdateMachine request without
//! bootstrap configs on either side (KCP never sends one) compares them as equal.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

/// Why CAPI would treat the exchange as an error (which blocks the rollout, unlike a "no").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("extension answered {status:?}: {message}")]
    NotSuccess { status: String, message: String },
    #[error("{field}: patchType is not set")]
    MissingPatchType { field: &'static str },
    #[error("{field}: unknown patchType {patch_type:?}")]
    UnknownPatchType {
        field: &'static str,
        patch_type: String,
    },
    #[error("{field}: patch is not valid base64")]
    Base64 { field: &'static str },
    #[error("{field}: cannot decode the patch: {source}")]
    DecodePatch {
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{field}: cannot apply the JSON patch: {source}")]
    ApplyPatch {
        field: &'static str,
        #[source]
        source: json_patch::PatchError,
    },
    #[error("request has no {0}")]
    MissingObject(&'static str),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The outcome of CAPI's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// True when CAPI would update in place.
    pub in_place: bool,
    /// One line per object that still differs, as CAPI logs them.
    pub reasons: Vec<String>,
}

impl Outcome {
    fn from_reasons(reasons: Vec<String>) -> Self {
        Self {
            in_place: reasons.is_empty(),
            reasons,
        }
    }
}

const SPEC: &[&str] = &["spec"];
const TEMPLATE_SPEC: &[&str] = &["spec", "template", "spec"];

/// CAPI's check of a CanUpdateMachine request (wire JSON) against the extension's response.
pub fn can_update_machine(request: &Value, response: &Value) -> Result<Outcome> {
    check_success(response)?;
    let object = |side: &str, key: &'static str| {
        request
            .get(side)
            .and_then(|s| s.get(key))
            .filter(|v| !v.is_null())
    };
    let mut machine = object("current", "machine")
        .cloned()
        .ok_or(Error::MissingObject("current machine"))?;
    let desired_machine =
        object("desired", "machine").ok_or(Error::MissingObject("desired machine"))?;
    let mut infra = object("current", "infrastructureMachine")
        .cloned()
        .ok_or(Error::MissingObject("current infrastructureMachine"))?;
    let desired_infra = object("desired", "infrastructureMachine")
        .ok_or(Error::MissingObject("desired infrastructureMachine"))?;
    let mut bootstrap = object("current", "bootstrapConfig").cloned();
    let desired_bootstrap = object("desired", "bootstrapConfig");

    apply_patch(
        &mut machine,
        response.get("machinePatch"),
        SPEC,
        "machinePatch",
    )?;
    if let Some(bootstrap) = bootstrap.as_mut() {
        apply_patch(
            bootstrap,
            response.get("bootstrapConfigPatch"),
            SPEC,
            "bootstrapConfigPatch",
        )?;
    }
    apply_patch(
        &mut infra,
        response.get("infrastructureMachinePatch"),
        SPEC,
        "infrastructureMachinePatch",
    )?;

    let mut reasons = Vec::new();
    if cleanup_machine_spec(get(&machine, SPEC)) != cleanup_machine_spec(get(desired_machine, SPEC))
    {
        reasons.push("Machine cannot be updated in-place: spec differs".to_owned());
    }
    if bootstrap.as_ref().and_then(|b| get(b, SPEC)) != desired_bootstrap.and_then(|b| get(b, SPEC))
    {
        reasons.push("KubeadmConfig cannot be updated in-place: spec differs".to_owned());
    }
    if get(&infra, SPEC) != get(desired_infra, SPEC) {
        reasons.push(format!(
            "{} cannot be updated in-place: spec differs",
            kind(&infra)
        ));
    }
    Ok(Outcome::from_reasons(reasons))
}

/// CAPI's check of a CanUpdateMachineSet request (wire JSON) against the extension's response.
pub fn can_update_machine_set(request: &Value, response: &Value) -> Result<Outcome> {
    check_success(response)?;
    let object = |side: &str, key: &'static str| {
        request
            .get(side)
            .and_then(|s| s.get(key))
            .filter(|v| !v.is_null())
    };
    let mut machine_set = object("current", "machineSet")
        .cloned()
        .ok_or(Error::MissingObject("current machineSet"))?;
    let desired_machine_set =
        object("desired", "machineSet").ok_or(Error::MissingObject("desired machineSet"))?;
    let mut infra = object("current", "infrastructureMachineTemplate")
        .cloned()
        .ok_or(Error::MissingObject(
            "current infrastructureMachineTemplate",
        ))?;
    let desired_infra = object("desired", "infrastructureMachineTemplate").ok_or(
        Error::MissingObject("desired infrastructureMachineTemplate"),
    )?;
    let mut bootstrap = object("current", "bootstrapConfigTemplate").cloned();
    let desired_bootstrap = object("desired", "bootstrapConfigTemplate");

    apply_patch(
        &mut machine_set,
        response.get("machineSetPatch"),
        TEMPLATE_SPEC,
        "machineSetPatch",
    )?;
    if let Some(bootstrap) = bootstrap.as_mut() {
        apply_patch(
            bootstrap,
            response.get("bootstrapConfigTemplatePatch"),
            TEMPLATE_SPEC,
            "bootstrapConfigTemplatePatch",
        )?;
    }
    apply_patch(
        &mut infra,
        response.get("infrastructureMachineTemplatePatch"),
        TEMPLATE_SPEC,
        "infrastructureMachineTemplatePatch",
    )?;

    let mut reasons = Vec::new();
    if cleanup_machine_spec(get(&machine_set, TEMPLATE_SPEC))
        != cleanup_machine_spec(get(desired_machine_set, TEMPLATE_SPEC))
    {
        reasons
            .push("MachineSet cannot be updated in-place: spec.template.spec differs".to_owned());
    }
    if let (Some(bootstrap), Some(desired_bootstrap)) = (bootstrap.as_ref(), desired_bootstrap)
        && get(bootstrap, TEMPLATE_SPEC) != get(desired_bootstrap, TEMPLATE_SPEC)
    {
        reasons.push(format!(
            "{} cannot be updated in-place: spec.template.spec differs",
            kind(bootstrap)
        ));
    }
    if get(&infra, TEMPLATE_SPEC) != get(desired_infra, TEMPLATE_SPEC) {
        reasons.push(format!(
            "{} cannot be updated in-place: spec.template.spec differs",
            kind(&infra)
        ));
    }
    Ok(Outcome::from_reasons(reasons))
}

fn check_success(response: &Value) -> Result<()> {
    let status = response
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if status == "Success" {
        return Ok(());
    }
    Err(Error::NotSuccess {
        status: status.to_owned(),
        message: response
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

fn kind(object: &Value) -> &str {
    object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn get<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |value, key| value.get(key))
}

/// `ApplyPatchToObject`: patch a copy of the whole object, then copy back `copy_path` only.
fn apply_patch(
    object: &mut Value,
    patch: Option<&Value>,
    copy_path: &[&str],
    field: &'static str,
) -> Result<()> {
    let Some(patch) = patch.filter(|p| !p.is_null()) else {
        return Ok(());
    };
    let patch_type = patch
        .get("patchType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let encoded = patch
        .get("patch")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // `Patch.IsDefined`: neither field set means no patch.
    if patch_type.is_empty() && encoded.is_empty() {
        return Ok(());
    }
    if patch_type.is_empty() {
        return Err(Error::MissingPatchType { field });
    }
    let bytes = STANDARD
        .decode(encoded)
        .map_err(|_| Error::Base64 { field })?;
    let mut patched = object.clone();
    match patch_type {
        "JSONPatch" => {
            let operations: json_patch::Patch = serde_json::from_slice(&bytes)
                .map_err(|source| Error::DecodePatch { field, source })?;
            if operations.0.is_empty() {
                return Ok(());
            }
            json_patch::patch(&mut patched, &operations)
                .map_err(|source| Error::ApplyPatch { field, source })?;
        }
        "JSONMergePatch" => {
            if bytes.is_empty() || bytes == b"{}" {
                return Ok(());
            }
            let merge: Value = serde_json::from_slice(&bytes)
                .map_err(|source| Error::DecodePatch { field, source })?;
            json_patch::merge(&mut patched, &merge);
        }
        other => {
            return Err(Error::UnknownPatchType {
                field,
                patch_type: other.to_owned(),
            });
        }
    }
    if let Some(value) = get(&patched, copy_path) {
        set(object, copy_path, value.clone());
    }
    Ok(())
}

/// `unstructured.SetNestedField`: creates missing parents, replacing non-objects on the way.
fn set(object: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *object = value;
        return;
    };
    let mut current = object;
    for key in parents {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        current = match current {
            Value::Object(map) => map
                .entry((*key).to_owned())
                .or_insert_with(|| Value::Object(Map::new())),
            _ => unreachable!("made an object above"),
        };
    }
    if !current.is_object() {
        *current = Value::Object(Map::new());
    }
    if let Value::Object(map) = current {
        map.insert((*last).to_owned(), value);
    }
}

/// `CleanupMachineSpecForDiff`, then Go's `omitempty` view of the typed struct.
fn cleanup_machine_spec(spec: Option<&Value>) -> Value {
    let mut spec = spec.cloned().unwrap_or(Value::Null);
    if let Value::Object(map) = &mut spec {
        for field in [
            "clusterName",
            "bootstrap",
            "infrastructureRef",
            "providerID",
            "minReadySeconds",
            "readinessGates",
            "taints",
        ] {
            map.remove(field);
        }
        if let Some(Value::Object(deletion)) = map.get_mut("deletion") {
            for field in [
                "nodeDrainTimeoutSeconds",
                "nodeVolumeDetachTimeoutSeconds",
                "nodeDeletionTimeoutSeconds",
            ] {
                deletion.remove(field);
            }
        }
    }
    drop_empty(&mut spec);
    spec
}

fn drop_empty(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(drop_empty);
            map.retain(|_, v| !is_empty(v));
        }
        Value::Array(items) => items.iter_mut().for_each(drop_empty),
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    fn encode(patch: &Value) -> String {
        STANDARD.encode(serde_json::to_vec(patch).unwrap())
    }

    fn request() -> Value {
        let machine = |version: &str| {
            json!({"kind": "Machine", "metadata": {"name": "m"},
                   "spec": {"clusterName": "c", "version": version, "providerID": "docker:////m"}})
        };
        let infra = |image: &str| json!({"kind": "DockerMachine", "spec": {"customImage": image}});
        json!({
            "current": {"machine": machine("v1.33.6"), "infrastructureMachine": infra("kindest/node:v1.33.6")},
            "desired": {"machine": machine("v1.34.2"), "infrastructureMachine": infra("kindest/node:v1.34.2")},
        })
    }

    #[test]
    fn no_patches_means_no_match() {
        let outcome = can_update_machine(&request(), &json!({"status": "Success"})).unwrap();
        assert!(!outcome.in_place);
        assert_eq!(outcome.reasons.len(), 2);
    }

    #[test]
    fn json_and_merge_patches_make_a_match() {
        let response = json!({
            "status": "Success",
            "machinePatch": {"patchType": "JSONMergePatch", "patch": encode(&json!({"spec": {"version": "v1.34.2"}, "metadata": {"name": "ignored"}}))},
            "infrastructureMachinePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/customImage", "value": "kindest/node:v1.34.2"}]))},
        });
        let outcome = can_update_machine(&request(), &response).unwrap();
        assert_eq!(
            outcome,
            Outcome {
                in_place: true,
                reasons: vec![]
            }
        );
    }

    #[test]
    fn only_spec_is_copied_back() {
        // A patch that changes metadata only must not count.
        let response = json!({
            "status": "Success",
            "machinePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]))},
        });
        let outcome = can_update_machine(&request(), &response).unwrap();
        assert!(!outcome.in_place);
    }

    #[test]
    fn cleaned_fields_do_not_count() {
        let mut request = request();
        request["desired"]["machine"]["spec"]["providerID"] = json!("docker:////other");
        request["desired"]["machine"]["spec"]["readinessGates"] = json!([{"conditionType": "X"}]);
        let response = json!({
            "status": "Success",
            "machinePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/version", "value": "v1.34.2"}]))},
            "infrastructureMachinePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/customImage", "value": "kindest/node:v1.34.2"}]))},
        });
        assert!(can_update_machine(&request, &response).unwrap().in_place);
    }

    #[test]
    fn errors_like_capi() {
        let cases = [
            json!({"status": "Failure", "message": "no"}),
            json!({"status": "Success", "machinePatch": {"patch": encode(&json!([]))}}),
            json!({"status": "Success", "machinePatch": {"patchType": "Strategic", "patch": "e30="}}),
            json!({"status": "Success", "machinePatch": {"patchType": "JSONPatch", "patch": "!!"}}),
            json!({"status": "Success", "machinePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/missing/deep", "value": 1}]))}}),
        ];
        for response in cases {
            assert!(
                can_update_machine(&request(), &response).is_err(),
                "{response}"
            );
        }
        // An empty JSON Patch list and an empty merge patch are no-ops, not errors.
        for patch in [
            json!({"patchType": "JSONPatch", "patch": encode(&json!([]))}),
            json!({"patchType": "JSONMergePatch", "patch": ""}),
        ] {
            let response = json!({"status": "Success", "machinePatch": patch});
            assert!(!can_update_machine(&request(), &response).unwrap().in_place);
        }
    }

    #[test]
    fn machine_set_compares_template_spec() {
        let ms = |version: &str, template: &str| {
            json!({"kind": "MachineSet", "spec": {"replicas": 3, "template": {"spec": {
                "version": version, "infrastructureRef": {"name": template}}}}})
        };
        let template = |name: &str, image: &str| {
            json!({"kind": "DockerMachineTemplate", "metadata": {"name": name},
                   "spec": {"template": {"spec": {"customImage": image}}}})
        };
        let request = json!({
            "current": {"machineSet": ms("v1.33.6", "old"), "infrastructureMachineTemplate": template("old", "kindest/node:v1.33.6")},
            "desired": {"machineSet": ms("v1.34.2", "new"), "infrastructureMachineTemplate": template("new", "kindest/node:v1.34.2")},
        });
        let response = json!({
            "status": "Success",
            "machineSetPatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/template/spec/version", "value": "v1.34.2"}]))},
            "infrastructureMachineTemplatePatch": {"patchType": "JSONPatch", "patch": encode(&json!([{"op": "replace", "path": "/spec/template/spec/customImage", "value": "kindest/node:v1.34.2"}]))},
        });
        assert!(
            can_update_machine_set(&request, &response)
                .unwrap()
                .in_place
        );
        let outcome = can_update_machine_set(&request, &json!({"status": "Success"})).unwrap();
        assert_eq!(outcome.reasons.len(), 2);
    }
}
