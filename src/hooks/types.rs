//! Wire types of `hooks.runtime.cluster.x-k8s.io/v1alpha1`, field for field as upstream
//! (`api/runtime/hooks/v1alpha1/{inplaceupdate,common,discovery}_types.go` in cluster-api).
//!
//! Decoding is lenient the way Go's `encoding/json` is: unknown fields are ignored, `null` reads as
//! the zero value, and every object may be missing. The objects inside requests (Machine, MachineSet,
//! infrastructure and bootstrap objects) stay arbitrary JSON; [`object`] has the few typed accessors the
//! policy needs. Responses always carry `apiVersion` and `kind: <Hook>Response`, and
//! `UpdateMachineResponse` always carries `retryAfterSeconds`, as upstream's `+required` tag says.
//!
//! Decoding the objects is most of what a hook call costs, so none is decoded twice or further than
//! it is read. Every object is checked to be JSON as the request is read; a CanUpdate object is then
//! decoded only along the [`Outline`] of what the decision reads of it, and a current and a desired
//! object that arrive as the same bytes are decoded once, to a smaller outline, and shared (see
//! [`Object`]). UpdateMachine keeps only the Machine.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::can_update::{MACHINE_READS, MACHINE_SET_READS};

/// The group/version of every hook request and response.
pub const API_VERSION: &str = "hooks.runtime.cluster.x-k8s.io/v1alpha1";

/// The hooks this extension serves, plus Discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Discovery,
    CanUpdateMachine,
    CanUpdateMachineSet,
    UpdateMachine,
}

impl Hook {
    /// The hook name as in Discovery `requestHook.hook` and in `pending-hooks`.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Discovery => "Discovery",
            Hook::CanUpdateMachine => "CanUpdateMachine",
            Hook::CanUpdateMachineSet => "CanUpdateMachineSet",
            Hook::UpdateMachine => "UpdateMachine",
        }
    }

    /// The `kind` of the request (`<Hook>Request`).
    pub const fn request_kind(self) -> &'static str {
        match self {
            Hook::Discovery => "DiscoveryRequest",
            Hook::CanUpdateMachine => "CanUpdateMachineRequest",
            Hook::CanUpdateMachineSet => "CanUpdateMachineSetRequest",
            Hook::UpdateMachine => "UpdateMachineRequest",
        }
    }

    /// The `kind` of the response (`<Hook>Response`).
    pub const fn response_kind(self) -> &'static str {
        match self {
            Hook::Discovery => "DiscoveryResponse",
            Hook::CanUpdateMachine => "CanUpdateMachineResponse",
            Hook::CanUpdateMachineSet => "CanUpdateMachineSetResponse",
            Hook::UpdateMachine => "UpdateMachineResponse",
        }
    }
}

/// `status` of every response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseStatus {
    Success,
    Failure,
}

/// `patchType` of a [`Patch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchType {
    #[serde(rename = "JSONPatch")]
    JsonPatch,
    #[serde(rename = "JSONMergePatch")]
    JsonMergePatch,
}

/// A JSON Patch (RFC 6902) or JSON Merge Patch (RFC 7386) for a whole object. `patch` is Go `[]byte`,
/// so on the wire it is standard base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patch {
    pub patch_type: PatchType,
    #[serde(with = "base64_bytes")]
    pub patch: Vec<u8>,
}

impl Patch {
    /// A JSON Patch from its operations.
    pub fn json_patch(operations: &[Value]) -> Self {
        // Serializing a slice of `Value` cannot fail: every key is a string.
        let patch = serde_json::to_vec(operations).unwrap_or_default();
        Self {
            patch_type: PatchType::JsonPatch,
            patch,
        }
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Reads `null` as the type's default, as Go does for non-pointer fields.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// `settings` (ExtensionConfig `spec.settings`); a `null` value reads as an empty string.
fn settings_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, Option<String>>> = Option::deserialize(deserializer)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.unwrap_or_default()))
        .collect())
}

/// The fields every request shares (`TypeMeta` and `CommonRequest`).
pub trait HookRequest: serde::de::DeserializeOwned {
    const HOOK: Hook;
    /// The `apiVersion` the caller sent (may be empty).
    fn api_version(&self) -> &str;
    /// The `kind` the caller sent (may be empty).
    fn kind(&self) -> &str;
}

/// A response that can be built for a failed call.
pub trait HookResponse: Serialize {
    /// A `Failure` response with a message.
    fn failure(message: impl Into<String>) -> Self;
}

macro_rules! request_type_meta {
    ($type:ty, $hook:expr) => {
        impl HookRequest for $type {
            const HOOK: Hook = $hook;
            fn api_version(&self) -> &str {
                &self.api_version
            }
            fn kind(&self) -> &str {
                &self.kind
            }
        }
    };
}

/// `DiscoveryRequest`: only type meta.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiscoveryRequest {
    #[serde(deserialize_with = "null_as_default")]
    pub api_version: String,
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
}
request_type_meta!(DiscoveryRequest, Hook::Discovery);

/// An object of a CanUpdate request, decoded only as far as the decision reads it (see [`Reads`]):
/// what is left out is JSON (checked as the request was read) that no answer depends on.
///
/// KubeadmControlPlane trims the current and the desired objects the same way and Go encodes equal
/// objects as equal bytes, so on a plain upgrade the KubeadmConfig (the bulk of the request, with its
/// files) arrives twice, byte for byte. Such a pair is decoded once, to the `unchanged` outline, and
/// both sides hold the same value: the two sides cannot differ anywhere, so the decision only checks
/// what it checks of each side alone.
pub type Object = Arc<Value>;

/// The parts of a JSON value to decode.
#[derive(Debug)]
pub enum Outline {
    /// The whole value.
    Whole,
    /// Of an object, only these fields, each along its own outline; every other field is skipped.
    /// A value that is not an object is decoded whole.
    Fields(&'static [(&'static str, Outline)]),
}

impl Outline {
    /// Decodes JSON text along this outline.
    pub fn decode(&'static self, json: &str) -> Result<Value, serde_json::Error> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let value = self.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(value)
    }
}

impl<'de> DeserializeSeed<'de> for &'static Outline {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self {
            Outline::Whole => Value::deserialize(deserializer),
            Outline::Fields(fields) => deserializer.deserialize_any(FieldsVisitor(fields)),
        }
    }
}

/// Builds a [`Value`] like serde_json's own, except that an object keeps only the listed fields.
struct FieldsVisitor(&'static [(&'static str, Outline)]);

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(field) = map.next_key_seed(FieldName(self.0))? {
            match field {
                // A repeated field keeps its last value, as serde_json's own `Value` does.
                Some((name, outline)) => {
                    let value = map.next_value_seed(outline)?;
                    kept.insert((*name).to_owned(), value);
                }
                None => {
                    map.next_value::<Skipped>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq))
    }

    fn visit_str<E>(self, text: &str) -> Result<Value, E> {
        Ok(Value::from(text))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// A value read through and dropped, parsed as strictly as decoding it would be (numbers in range,
/// complete escapes), so a request that decoding whole would refuse is refused all the same (the
/// position in the message counts from the start of the object). UpdateMachine's unread objects
/// are only checked to be JSON, as serde skips them.
struct Skipped;

impl<'de> Deserialize<'de> for Skipped {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Not `deserialize_ignored_any`: serde_json skips that without checking numbers and escapes.
        deserializer.deserialize_any(Skipped)
    }
}

impl<'de> Visitor<'de> for Skipped {
    type Value = Skipped;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skipped, A::Error> {
        while map.next_entry::<Skipped, Skipped>()?.is_some() {}
        Ok(Skipped)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skipped, A::Error> {
        while seq.next_element::<Skipped>()?.is_some() {}
        Ok(Skipped)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skipped, E> {
        Ok(Skipped)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skipped, E> {
        Ok(Skipped)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skipped, E> {
        Ok(Skipped)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skipped, E> {
        Ok(Skipped)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skipped, E> {
        Ok(Skipped)
    }

    fn visit_unit<E>(self) -> Result<Skipped, E> {
        Ok(Skipped)
    }
}

/// Reads an object key and finds it among the fields of an outline, without copying it.
struct FieldName(&'static [(&'static str, Outline)]);

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Option<&'static (&'static str, Outline)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Option<&'static (&'static str, Outline)>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|(name, _)| *name == key))
    }
}

/// What the decision reads of the objects of one current/desired pair.
#[derive(Debug)]
pub struct Reads {
    /// When the two sides differ.
    pub changed: Outline,
    /// When both sides are the same bytes.
    pub unchanged: Outline,
}

/// Decodes one current/desired pair along `reads`, once when both sides are the same bytes.
fn decode_pair(
    current: Option<Box<RawValue>>,
    desired: Option<Box<RawValue>>,
    reads: &'static Reads,
) -> Result<(Option<Object>, Option<Object>), serde_json::Error> {
    if let (Some(current), Some(desired)) = (&current, &desired)
        && current.get() == desired.get()
    {
        let shared = Arc::new(reads.unchanged.decode(current.get())?);
        return Ok((Some(Arc::clone(&shared)), Some(shared)));
    }
    let decode = |raw: &RawValue| reads.changed.decode(raw.get()).map(Arc::new);
    Ok((
        current.as_deref().map(decode).transpose()?,
        desired.as_deref().map(decode).transpose()?,
    ))
}

/// A CanUpdate request as it arrives, its objects (`O`, one side's) still JSON text.
#[derive(Default, Deserialize)]
#[serde(
    default,
    rename_all = "camelCase",
    bound(deserialize = "O: Default + Deserialize<'de>")
)]
struct RawCanUpdateRequest<O> {
    #[serde(deserialize_with = "null_as_default")]
    api_version: String,
    #[serde(deserialize_with = "null_as_default")]
    kind: String,
    #[serde(deserialize_with = "settings_map")]
    settings: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    current: O,
    #[serde(deserialize_with = "null_as_default")]
    desired: O,
}

/// A CanUpdate request type: the request as the handlers see it, its objects decoded along
/// `$reads`, and the raw shape it is decoded through (whose decode errors name the upstream
/// objects type, not the raw one). The two CanUpdate hooks differ only in names.
macro_rules! can_update_request {
    (
        $(#[$doc:meta])*
        $request:ident, $hook:expr, $reads:expr,
        $(#[$objects_doc:meta])*
        $objects:ident, $raw:ident, { $owner:ident, $infrastructure:ident, $bootstrap:ident $(,)? },
        // serde's attributes take string literals only, so the names come again as text.
        try_from = $try_from:literal, expecting = $expecting:literal $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(try_from = $try_from)]
        pub struct $request {
            pub api_version: String,
            pub kind: String,
            pub settings: BTreeMap<String, String>,
            pub current: $objects,
            pub desired: $objects,
        }
        request_type_meta!($request, $hook);

        $(#[$objects_doc])*
        #[derive(Debug, Clone, Default)]
        pub struct $objects {
            pub $owner: Option<Object>,
            pub $infrastructure: Option<Object>,
            pub $bootstrap: Option<Object>,
        }

        #[derive(Default, Deserialize)]
        #[serde(default, expecting = $expecting, rename_all = "camelCase")]
        struct $raw {
            $owner: Option<Box<RawValue>>,
            $infrastructure: Option<Box<RawValue>>,
            $bootstrap: Option<Box<RawValue>>,
        }

        impl TryFrom<RawCanUpdateRequest<$raw>> for $request {
            type Error = serde_json::Error;

            fn try_from(raw: RawCanUpdateRequest<$raw>) -> Result<Self, Self::Error> {
                let (current, desired) = (raw.current, raw.desired);
                let reads = $reads;
                let owner = decode_pair(current.$owner, desired.$owner, reads)?;
                let infrastructure =
                    decode_pair(current.$infrastructure, desired.$infrastructure, reads)?;
                let bootstrap = decode_pair(current.$bootstrap, desired.$bootstrap, reads)?;
                Ok($request {
                    api_version: raw.api_version,
                    kind: raw.kind,
                    settings: raw.settings,
                    current: $objects {
                        $owner: owner.0,
                        $infrastructure: infrastructure.0,
                        $bootstrap: bootstrap.0,
                    },
                    desired: $objects {
                        $owner: owner.1,
                        $infrastructure: infrastructure.1,
                        $bootstrap: bootstrap.1,
                    },
                })
            }
        }
    };
}

can_update_request!(
    /// `CanUpdateMachineRequest`, sent by KubeadmControlPlane.
    CanUpdateMachineRequest, Hook::CanUpdateMachine, &MACHINE_READS,
    /// `CanUpdateMachineRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineRequestObjects, RawMachineObjects,
    { machine, infrastructure_machine, bootstrap_config },
    try_from = "RawCanUpdateRequest<RawMachineObjects>",
    expecting = "struct CanUpdateMachineRequestObjects",
);

can_update_request!(
    /// `CanUpdateMachineSetRequest`, sent by the MachineDeployment controller.
    CanUpdateMachineSetRequest, Hook::CanUpdateMachineSet, &MACHINE_SET_READS,
    /// `CanUpdateMachineSetRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineSetRequestObjects, RawMachineSetObjects,
    { machine_set, infrastructure_machine_template, bootstrap_config_template },
    try_from = "RawCanUpdateRequest<RawMachineSetObjects>",
    expecting = "struct CanUpdateMachineSetRequestObjects",
);

/// `UpdateMachineRequest`, sent (and re-sent) by the Machine controller. Only `desired` exists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateMachineRequest {
    #[serde(deserialize_with = "null_as_default")]
    pub api_version: String,
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(deserialize_with = "settings_map")]
    pub settings: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub desired: UpdateMachineRequestObjects,
}
request_type_meta!(UpdateMachineRequest, Hook::UpdateMachine);

/// `UpdateMachineRequestObjects`; `None` means missing or `null`. CAPI also sends the
/// `infrastructureMachine` and the `bootstrapConfig` (with its files, often most of the request);
/// the upgrade needs neither, and CAPI repeats the call every few seconds while an upgrade runs,
/// so they are only checked to be JSON, never decoded.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateMachineRequestObjects {
    pub machine: Option<Value>,
}

/// `failurePolicy` of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    Ignore,
    Fail,
}

/// `GroupVersionHook`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupVersionHook {
    pub api_version: String,
    pub hook: String,
}

/// `ExtensionHandler` as listed by Discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionHandler {
    pub name: String,
    pub request_hook: GroupVersionHook,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
}

macro_rules! response_type {
    ($(#[$doc:meta])* $name:ident, $hook:expr, { $($(#[$fattr:meta])* pub $field:ident : $ftype:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default)]
            pub api_version: String,
            #[serde(default)]
            pub kind: String,
            pub status: ResponseStatus,
            #[serde(default, skip_serializing_if = "String::is_empty")]
            pub message: String,
            $($(#[$fattr])* pub $field: $ftype,)*
        }

        impl $name {
            /// A response with `apiVersion` and `kind` filled in and every optional field empty.
            pub fn new(status: ResponseStatus, message: impl Into<String>) -> Self {
                Self {
                    api_version: API_VERSION.to_owned(),
                    kind: $hook.response_kind().to_owned(),
                    status,
                    message: message.into(),
                    $($field: Default::default(),)*
                }
            }
        }

        impl HookResponse for $name {
            fn failure(message: impl Into<String>) -> Self {
                Self::new(ResponseStatus::Failure, message)
            }
        }
    };
}

response_type!(
    /// `DiscoveryResponse`.
    DiscoveryResponse, Hook::Discovery, {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub handlers: Vec<ExtensionHandler>,
    }
);

response_type!(
    /// `CanUpdateMachineResponse`. A missing patch means "this object needs nothing from me"; answering
    /// `Success` with no patch for a changed object declines the in-place update.
    CanUpdateMachineResponse, Hook::CanUpdateMachine, {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub machine_patch: Option<Patch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub infrastructure_machine_patch: Option<Patch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub bootstrap_config_patch: Option<Patch>,
    }
);

response_type!(
    /// `CanUpdateMachineSetResponse`.
    CanUpdateMachineSetResponse, Hook::CanUpdateMachineSet, {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub machine_set_patch: Option<Patch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub infrastructure_machine_template_patch: Option<Patch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub bootstrap_config_template_patch: Option<Patch>,
    }
);

response_type!(
    /// `UpdateMachineResponse`: `Success` + `retryAfterSeconds > 0` is "in progress", `Success` + 0 is
    /// "done", `Failure` is "failed" (CAPI retries it with backoff).
    UpdateMachineResponse, Hook::UpdateMachine, {
        #[serde(default)]
        pub retry_after_seconds: i32,
    }
);

/// Typed reads of the arbitrary JSON objects inside requests.
pub mod object {
    use serde_json::Value;

    /// The value at `path` (object keys), if every step exists.
    pub fn get<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
        path.iter().try_fold(object, |value, key| value.get(key))
    }

    /// The string at `path`, if it exists and is a string.
    pub fn get_str<'a>(object: &'a Value, path: &[&str]) -> Option<&'a str> {
        get(object, path).and_then(Value::as_str)
    }

    /// `kind`, or `""`.
    pub fn kind(object: &Value) -> &str {
        get_str(object, &["kind"]).unwrap_or_default()
    }

    /// The API group of `apiVersion` (the part before `/`), or `""`.
    pub fn api_group(object: &Value) -> &str {
        let api_version = get_str(object, &["apiVersion"]).unwrap_or_default();
        api_version
            .split_once('/')
            .map(|(group, _)| group)
            .unwrap_or_default()
    }

    /// `metadata.namespace/metadata.name`, for logs.
    pub fn namespaced_name(object: &Value) -> String {
        format!(
            "{}/{}",
            get_str(object, &["metadata", "namespace"]).unwrap_or_default(),
            get_str(object, &["metadata", "name"]).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_leniently() {
        let request: CanUpdateMachineRequest = serde_json::from_value(json!({
            "apiVersion": API_VERSION,
            "kind": "CanUpdateMachineRequest",
            "settings": {"disableInPlaceUpdates": "true", "empty": null},
            "unknownField": {"x": 1},
            "current": {"machine": {"spec": {"version": "v1.33.6"}}, "bootstrapConfig": null},
            "desired": null,
        }))
        .unwrap();
        assert_eq!(request.settings["disableInPlaceUpdates"], "true");
        assert_eq!(request.settings["empty"], "");
        assert!(request.current.machine.is_some());
        assert!(request.current.bootstrap_config.is_none());
        assert!(request.current.infrastructure_machine.is_none());
        assert!(request.desired.machine.is_none());

        let empty: UpdateMachineRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.kind, "");
        let nulls: UpdateMachineRequest =
            serde_json::from_str(r#"{"apiVersion":null,"kind":null,"settings":null}"#).unwrap();
        assert!(nulls.settings.is_empty());
    }

    #[test]
    fn identical_objects_are_decoded_once() {
        let bootstrap = json!({"kind": "KubeadmConfig", "spec": {"files": [{"path": "/a"}]}});
        let body = json!({
            "current": {"machine": {"spec": {"version": "v1.33.6"}}, "bootstrapConfig": bootstrap},
            "desired": {"machine": {"spec": {"version": "v1.34.2"}}, "bootstrapConfig": bootstrap},
        })
        .to_string();
        let request: CanUpdateMachineRequest = serde_json::from_str(&body).unwrap();
        let (current, desired) = (&request.current, &request.desired);
        assert!(Arc::ptr_eq(
            current.bootstrap_config.as_ref().unwrap(),
            desired.bootstrap_config.as_ref().unwrap()
        ));
        // Of an unchanged object, only the outline of its spec.
        assert_eq!(
            current.bootstrap_config.as_deref(),
            Some(&json!({"kind": "KubeadmConfig", "spec": {}}))
        );
        // Of a changed one, the whole spec.
        assert_eq!(
            desired.machine.as_deref(),
            Some(&json!({"spec": {"version": "v1.34.2"}}))
        );
        assert_eq!(
            current.machine.as_deref(),
            Some(&json!({"spec": {"version": "v1.33.6"}}))
        );

        // Errors still name the upstream types.
        let error = serde_json::from_str::<CanUpdateMachineSetRequest>(r#"{"desired": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("CanUpdateMachineSetRequestObjects"),
            "{error}"
        );
    }

    #[test]
    fn outlines_keep_only_their_fields() {
        static OUTLINE: Outline = Outline::Fields(&[
            ("kind", Outline::Whole),
            ("spec", Outline::Fields(&[("nested", Outline::Fields(&[]))])),
        ]);
        let decode = |json: &str| OUTLINE.decode(json).unwrap();
        assert_eq!(
            decode(
                r#"{"kind": "K", "other": {"x": [1, 2e3]}, "spec": {"nested": {"big": [1]}, "skipped": 1}}"#
            ),
            json!({"kind": "K", "spec": {"nested": {}}})
        );
        // Anything that is not an object is kept whole, wherever it is.
        for json in [
            r#"[1, {"a": -2}, 1.5]"#,
            "null",
            "true",
            "-7",
            "18446744073709551615",
            r#""text""#,
        ] {
            assert_eq!(
                decode(json),
                serde_json::from_str::<Value>(json).unwrap(),
                "{json}"
            );
        }
        assert_eq!(
            decode(r#"{"spec": {"nested": "text"}, "kind": 5}"#),
            json!({"spec": {"nested": "text"}, "kind": 5})
        );
        // Keys are compared unescaped, and a repeated key keeps its last value, as serde_json does.
        assert_eq!(
            decode(r#"{"k\u0069nd": "first", "kind": "last"}"#),
            json!({"kind": "last"})
        );
        assert!(OUTLINE.decode("{} {}").is_err());
        // What is skipped is parsed as strictly as decoding it whole: refused alike, with the same
        // message.
        for json in [
            r#"{"other": [1, 1e400]}"#,
            r#"{"other": "\ud800"}"#,
            r#"{"spec": {"skipped": {"\ud800": 1}}}"#,
        ] {
            assert_eq!(
                OUTLINE.decode(json).unwrap_err().to_string(),
                serde_json::from_str::<Value>(json).unwrap_err().to_string(),
                "{json}"
            );
        }
    }

    #[test]
    fn update_machine_response_always_has_retry_after_seconds() {
        let response = UpdateMachineResponse::new(ResponseStatus::Success, "");
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            json!({
                "apiVersion": API_VERSION,
                "kind": "UpdateMachineResponse",
                "status": "Success",
                "retryAfterSeconds": 0,
            })
        );
    }

    #[test]
    fn patch_is_base64_on_the_wire() {
        let mut response = CanUpdateMachineResponse::new(ResponseStatus::Success, "ok");
        response.machine_patch = Some(Patch::json_patch(&[json!(
            {"op": "replace", "path": "/spec/version", "value": "v1.34.2"}
        )]));
        let wire = serde_json::to_value(&response).unwrap();
        // The exact bytes of the upstream example (reference §6.2).
        assert_eq!(
            wire["machinePatch"],
            json!({
                "patchType": "JSONPatch",
                "patch": "W3sib3AiOiJyZXBsYWNlIiwicGF0aCI6Ii9zcGVjL3ZlcnNpb24iLCJ2YWx1ZSI6InYxLjM0LjIifV0=",
            })
        );
        assert!(wire.get("infrastructureMachinePatch").is_none());
        let back: CanUpdateMachineResponse = serde_json::from_value(wire).unwrap();
        assert_eq!(back, response);
    }

    #[test]
    fn failure_echoes_type_meta() {
        let response = CanUpdateMachineSetResponse::failure("bad body");
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            json!({
                "apiVersion": API_VERSION,
                "kind": "CanUpdateMachineSetResponse",
                "status": "Failure",
                "message": "bad body",
            })
        );
    }

    #[test]
    fn object_accessors() {
        let machine = json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta2",
            "kind": "DockerMachine",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"customImage": "kindest/node:v1.34.2"},
        });
        assert_eq!(object::kind(&machine), "DockerMachine");
        assert_eq!(
            object::api_group(&machine),
            "infrastructure.cluster.x-k8s.io"
        );
        assert_eq!(
            object::get_str(&machine, &["spec", "customImage"]),
            Some("kindest/node:v1.34.2")
        );
        assert_eq!(object::get_str(&machine, &["spec", "missing"]), None);
        assert_eq!(object::namespaced_name(&machine), "ns/m");
    }
}
