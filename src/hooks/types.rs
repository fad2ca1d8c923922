//! Wire types of `hooks.runtime.cluster.x-k8s.io/v1alpha1`, field for field as upstream
//! (`api/runtime/hooks/v1alpha1/{inplaceupdate,common,discovery}_types.go` in cluster-api).
//!
//! Decoding is lenient the way Go's `encoding/json` is: unknown fields are ignored, `null` reads as
//! the zero value, and every object may be missing. The objects inside requests (Machine, MachineSet,
//! infrastructure and bootstrap objects) stay arbitrary JSON; [`object`] has the few typed accessors the
//! policy needs. Responses always carry `apiVersion` and `kind: <Hook>Response`, and
//! `UpdateMachineResponse` always carries `retryAfterSeconds`, as upstream's `+required` tag says.
//!
//! Decoding the objects is most of what a hook call costs, so a request is read in one pass and
//! nothing is decoded further than it is read: a CanUpdate object only along the [`Outline`] of
//! what the decision reads of it, and a spec that is the same on both sides only once, to a smaller
//! outline (see [`Reads`]). UpdateMachine keeps only the Machine. What is not decoded is checked to
//! be JSON all the same, as Go's encoding/json checks the fields it does not know.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

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

/// The parts of a JSON value to decode.
#[derive(Debug)]
pub enum Outline {
    /// The whole value.
    Whole,
    /// Of an object, only these fields, each along its own outline; every other field is only
    /// checked to be JSON. A value that is not an object is decoded whole.
    Fields(&'static [(&'static str, Outline)]),
    /// The spec the decision compares: kept as JSON text while the request is read, and decoded
    /// once both sides are known (see [`Reads`]).
    Spec,
}

/// What the decision reads of the objects of one CanUpdate hook.
///
/// KubeadmControlPlane trims the current and the desired objects the same way and Go encodes equal
/// values as equal bytes, so on a plain upgrade most specs arrive twice, byte for byte, the
/// KubeadmConfig's above all (the bulk of the request, with its files). The request is read in one
/// pass: of each object only its [`Reads::object`] outline is decoded, and its spec is kept as
/// text. A spec that is the same text on both sides cannot differ, so of it only what the decision
/// checks of each side alone is decoded, once (`unchanged_*`); a spec that differs is decoded whole
/// on each side. What is left out is only checked to be JSON, as Go's encoding/json does with
/// fields it does not know; no answer depends on it.
#[derive(Debug)]
pub struct Reads {
    /// Every object along this outline, with [`Outline::Spec`] at `spec_path`.
    pub object: Outline,
    /// Where [`Outline::Spec`] is in `object`.
    pub spec_path: &'static [&'static str],
    /// What is read of the owner's (Machine's or MachineSet's) spec when it is unchanged.
    pub unchanged_owner: Outline,
    /// What is read of the infrastructure object's spec when it is unchanged.
    pub unchanged_infrastructure: Outline,
    /// What is read of the bootstrap config's spec when it is unchanged.
    pub unchanged_bootstrap: Outline,
}

/// A request whose objects are decoded along [`Reads`]; the decision says which.
pub trait CanUpdateReads {
    const READS: &'static Reads;
}

/// Decodes a value along an outline, keeping the text at [`Outline::Spec`] in `spec`.
struct OutlineSeed<'s> {
    outline: &'static Outline,
    spec: &'s mut Option<Box<RawValue>>,
}

impl<'de> DeserializeSeed<'de> for OutlineSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.outline {
            Outline::Whole => Value::deserialize(deserializer),
            Outline::Fields(fields) => deserializer.deserialize_any(FieldsVisitor {
                fields,
                spec: self.spec,
            }),
            Outline::Spec => {
                *self.spec = Some(Box::<RawValue>::deserialize(deserializer)?);
                // A placeholder; the decoded spec takes its place (`ReadObject::finish`).
                Ok(Value::Null)
            }
        }
    }
}

/// Builds a [`Value`] like serde_json's own, except that an object keeps only the listed fields.
struct FieldsVisitor<'s> {
    fields: &'static [(&'static str, Outline)],
    spec: &'s mut Option<Box<RawValue>>,
}

impl<'de> Visitor<'de> for FieldsVisitor<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(field) = map.next_key_seed(FieldName(self.fields))? {
            match field {
                // A repeated field keeps its last value, as serde_json's own `Value` does.
                Some((name, outline)) => {
                    let value = map.next_value_seed(OutlineSeed {
                        outline,
                        spec: &mut *self.spec,
                    })?;
                    kept.insert((*name).to_owned(), value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
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

/// Decodes a spec (JSON already checked as the request was read) along an outline without
/// [`Outline::Spec`].
fn decode_spec(outline: &'static Outline, spec: &RawValue) -> Result<Value, serde_json::Error> {
    let text = spec.get();
    if matches!(outline, Outline::Fields([])) && text.trim_start().starts_with('{') {
        // Nothing to read of an object.
        return Ok(Value::Object(Map::new()));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = OutlineSeed {
        outline,
        spec: &mut None,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// One object of a CanUpdate request as it was read: its fields along the outline, and its spec
/// as text.
struct ReadObject<R> {
    partial: Value,
    spec: Option<Box<RawValue>>,
    request: PhantomData<R>,
}

impl<'de, R: CanUpdateReads> Deserialize<'de> for ReadObject<R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut spec = None;
        let partial = OutlineSeed {
            outline: &R::READS.object,
            spec: &mut spec,
        }
        .deserialize(deserializer)?;
        Ok(Self {
            partial,
            spec,
            request: PhantomData,
        })
    }
}

impl<R: CanUpdateReads> ReadObject<R> {
    /// The object with its spec in place: `unchanged` when both sides had the same spec text,
    /// else the spec decoded whole. A spec whose place a repeated key took away is dropped, as
    /// decoding the whole object would.
    fn finish(self, unchanged: Option<&Value>) -> Result<Value, serde_json::Error> {
        let mut value = self.partial;
        if let (Some(text), Some(placeholder)) =
            (self.spec, object::get_mut(&mut value, R::READS.spec_path))
        {
            *placeholder = match unchanged {
                Some(spec) => spec.clone(),
                None => serde_json::from_str(text.get())?,
            };
        }
        Ok(value)
    }
}

/// Decodes the specs of one current/desired pair of objects (`name` on the wire), once when they
/// are the same text. An error says whose spec it was; its position counts from the spec.
fn decode_pair<R: CanUpdateReads>(
    name: &str,
    current: Option<ReadObject<R>>,
    desired: Option<ReadObject<R>>,
    unchanged: &'static Outline,
) -> Result<(Option<Value>, Option<Value>), String> {
    let unchanged = match (&current, &desired) {
        (
            Some(ReadObject {
                spec: Some(current_spec),
                ..
            }),
            Some(ReadObject {
                spec: Some(desired_spec),
                ..
            }),
        ) if current_spec.get() == desired_spec.get() => Some(
            decode_spec(unchanged, current_spec)
                .map_err(|err| format!("current and desired {name} spec: {err}"))?,
        ),
        _ => None,
    };
    let finish = |side: &str, object: Option<ReadObject<R>>| {
        object
            .map(|object| object.finish(unchanged.as_ref()))
            .transpose()
            .map_err(|err| format!("{side} {name} spec: {err}"))
    };
    Ok((finish("current", current)?, finish("desired", desired)?))
}

/// A CanUpdate request as it is read, its objects (`O`, one side's) not yet complete.
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

/// A CanUpdate request type: the request as the handlers see it, its objects decoded along its
/// [`Reads`], and the raw shape it is read through (whose decode errors name the upstream objects
/// type, not the raw one). The two CanUpdate hooks differ only in names.
macro_rules! can_update_request {
    (
        $(#[$doc:meta])*
        $request:ident, $hook:expr,
        $(#[$objects_doc:meta])*
        $objects:ident, $raw:ident,
        { $owner:ident, $infrastructure:ident, $bootstrap:ident $(,)? },
        // The objects' names on the wire, for errors; and, since serde's attributes take string
        // literals only, the objects type's name again as text.
        names = [$owner_name:literal, $infrastructure_name:literal, $bootstrap_name:literal],
        expecting = $expecting:literal $(,)?
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default)]
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
            pub $owner: Option<Value>,
            pub $infrastructure: Option<Value>,
            pub $bootstrap: Option<Value>,
        }

        #[derive(Default, Deserialize)]
        #[serde(default, expecting = $expecting, rename_all = "camelCase")]
        struct $raw {
            $owner: Option<ReadObject<$request>>,
            $infrastructure: Option<ReadObject<$request>>,
            $bootstrap: Option<ReadObject<$request>>,
        }

        impl<'de> Deserialize<'de> for $request {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = RawCanUpdateRequest::<$raw>::deserialize(deserializer)?;
                let (current, desired) = (raw.current, raw.desired);
                let reads = <$request as CanUpdateReads>::READS;
                let pair = |name, current, desired, unchanged| {
                    decode_pair(name, current, desired, unchanged)
                        .map_err(serde::de::Error::custom)
                };
                let owner = pair(
                    $owner_name,
                    current.$owner,
                    desired.$owner,
                    &reads.unchanged_owner,
                )?;
                let infrastructure = pair(
                    $infrastructure_name,
                    current.$infrastructure,
                    desired.$infrastructure,
                    &reads.unchanged_infrastructure,
                )?;
                let bootstrap = pair(
                    $bootstrap_name,
                    current.$bootstrap,
                    desired.$bootstrap,
                    &reads.unchanged_bootstrap,
                )?;
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
    CanUpdateMachineRequest, Hook::CanUpdateMachine,
    /// `CanUpdateMachineRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineRequestObjects, RawMachineObjects,
    { machine, infrastructure_machine, bootstrap_config },
    names = ["machine", "infrastructureMachine", "bootstrapConfig"],
    expecting = "struct CanUpdateMachineRequestObjects",
);

can_update_request!(
    /// `CanUpdateMachineSetRequest`, sent by the MachineDeployment controller.
    CanUpdateMachineSetRequest, Hook::CanUpdateMachineSet,
    /// `CanUpdateMachineSetRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineSetRequestObjects, RawMachineSetObjects,
    { machine_set, infrastructure_machine_template, bootstrap_config_template },
    names = ["machineSet", "infrastructureMachineTemplate", "bootstrapConfigTemplate"],
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
/// so they are only checked to be JSON, never decoded. Of the Machine, only what the upgrade reads
/// (`UPDATE_MACHINE_READS`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateMachineRequestObjects {
    #[serde(deserialize_with = "update_machine_reads")]
    pub machine: Option<Value>,
}

/// What UpdateMachine reads of the desired Machine: which Machine, and which node, cluster and
/// version to upgrade.
const UPDATE_MACHINE_READS: Outline = Outline::Fields(&[
    (
        "metadata",
        Outline::Fields(&[("name", Outline::Whole), ("namespace", Outline::Whole)]),
    ),
    (
        "spec",
        Outline::Fields(&[
            ("clusterName", Outline::Whole),
            ("version", Outline::Whole),
            ("providerID", Outline::Whole),
        ]),
    ),
]);

fn update_machine_reads<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Value>, D::Error> {
    /// The Machine along [`UPDATE_MACHINE_READS`]; `null` reads as missing.
    struct Machine(Value);

    impl<'de> Deserialize<'de> for Machine {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            OutlineSeed {
                outline: &UPDATE_MACHINE_READS,
                spec: &mut None,
            }
            .deserialize(deserializer)
            .map(Machine)
        }
    }

    Ok(Option::<Machine>::deserialize(deserializer)?.map(|machine| machine.0))
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

    /// As [`get`], to change the value.
    pub fn get_mut<'a>(object: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
        path.iter()
            .try_fold(object, |value, key| value.get_mut(*key))
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

        let update: UpdateMachineRequest = serde_json::from_value(json!({
            "desired": {
                "machine": {
                    "metadata": {"name": "m", "namespace": "ns", "labels": {"a": "b"}},
                    "spec": {"clusterName": "c", "version": "v1.34.2", "bootstrap": {"x": 1}},
                    "status": {"phase": "Running"},
                },
                "bootstrapConfig": {"spec": {"files": [{"path": "/a"}]}},
            },
        }))
        .unwrap();
        // Of the Machine only what the upgrade reads; the other objects are only checked to be JSON.
        assert_eq!(
            update.desired.machine,
            Some(json!({
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"clusterName": "c", "version": "v1.34.2"},
            }))
        );
        let missing: UpdateMachineRequest =
            serde_json::from_str(r#"{"desired": {"machine": null}}"#).unwrap();
        assert!(missing.desired.machine.is_none());

        let empty: UpdateMachineRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.kind, "");
        let nulls: UpdateMachineRequest =
            serde_json::from_str(r#"{"apiVersion":null,"kind":null,"settings":null}"#).unwrap();
        assert!(nulls.settings.is_empty());
    }

    /// The outlines of a test: one object field, with its spec; nothing read of an unchanged
    /// owner spec, and a DevMachine's backend of an unchanged infrastructure spec.
    struct Test;

    const TEST_READS: Reads = Reads {
        object: Outline::Fields(&[("kind", Outline::Whole), ("spec", Outline::Spec)]),
        spec_path: &["spec"],
        unchanged_owner: Outline::Fields(&[]),
        unchanged_infrastructure: Outline::Fields(&[(
            "backend",
            Outline::Fields(&[("docker", Outline::Fields(&[]))]),
        )]),
        unchanged_bootstrap: Outline::Whole,
    };

    impl CanUpdateReads for Test {
        const READS: &'static Reads = &TEST_READS;
    }

    /// Reads a current and a desired object as a request's objects are read.
    fn read_pair(
        current: &str,
        desired: &str,
        unchanged: &'static Outline,
    ) -> Result<(Option<Value>, Option<Value>), String> {
        let read = |json| serde_json::from_str::<ReadObject<Test>>(json).unwrap();
        decode_pair("test", Some(read(current)), Some(read(desired)), unchanged)
    }

    #[test]
    fn a_spec_that_is_the_same_text_is_read_to_its_outline() {
        let nothing = &TEST_READS.unchanged_owner;
        let (current, desired) = read_pair(
            r#"{"kind": "A", "status": {"x": 1}, "spec": {"files": [{"path": "/a"}], "n": 1e400}}"#,
            r#"{"kind": "B", "spec": {"files": [{"path": "/a"}], "n": 1e400}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(current, Some(json!({"kind": "A", "spec": {}})));
        assert_eq!(desired, Some(json!({"kind": "B", "spec": {}})));

        let backend = &TEST_READS.unchanged_infrastructure;
        let spec = r#"{"spec": {"backend": {"docker": {"customImage": "x"}, "other": 1}}}"#;
        let (current, desired) = read_pair(spec, spec, backend).unwrap();
        assert_eq!(current, Some(json!({"spec": {"backend": {"docker": {}}}})));
        assert_eq!(current, desired);

        // A spec that is not an object is read whole, even with nothing to read of it.
        let (current, _) = read_pair(r#"{"spec": [1]}"#, r#"{"spec": [1]}"#, nothing).unwrap();
        assert_eq!(current, Some(json!({"spec": [1]})));

        // Specs that differ are decoded whole, so strictly: a number out of range is refused.
        let (current, desired) = read_pair(
            r#"{"spec": {"version": "v1.33.6", "x": [1.5]}}"#,
            r#"{"spec": {"version": "v1.34.2"}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(
            current,
            Some(json!({"spec": {"version": "v1.33.6", "x": [1.5]}}))
        );
        assert_eq!(desired, Some(json!({"spec": {"version": "v1.34.2"}})));
        let refused = read_pair(r#"{"spec": {"n": 1e400}}"#, r#"{"spec": {}}"#, nothing);
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("number out of range")
        );

        // No spec: nothing in its place.
        let (current, desired) = read_pair(r#"{"kind": "A"}"#, r#"{"spec": 1}"#, nothing).unwrap();
        assert_eq!(current, Some(json!({"kind": "A"})));
        assert_eq!(desired, Some(json!({"spec": 1})));
    }

    #[test]
    fn requests_are_read_along_their_outlines() {
        let bootstrap = json!({"kind": "KubeadmConfig", "spec": {"files": [{"path": "/a"}]}});
        let body = json!({
            "current": {"machine": {"spec": {"version": "v1.33.6"}}, "bootstrapConfig": bootstrap},
            "desired": {"machine": {"spec": {"version": "v1.34.2"}}, "bootstrapConfig": bootstrap},
        })
        .to_string();
        let request: CanUpdateMachineRequest = serde_json::from_str(&body).unwrap();
        let (current, desired) = (&request.current, &request.desired);
        // Of an unchanged object, only the outline of its spec.
        let unchanged = Some(json!({"kind": "KubeadmConfig", "spec": {}}));
        assert_eq!(current.bootstrap_config, unchanged);
        assert_eq!(desired.bootstrap_config, unchanged);
        // Of a changed one, the whole spec.
        assert_eq!(
            desired.machine,
            Some(json!({"spec": {"version": "v1.34.2"}}))
        );
        assert_eq!(
            current.machine,
            Some(json!({"spec": {"version": "v1.33.6"}}))
        );

        // A spec decoded whole is decoded strictly, and the error says whose spec it was.
        let error = serde_json::from_str::<CanUpdateMachineRequest>(
            r#"{"current": {"machine": {"spec": {"version": 1e400}}},
                "desired": {"machine": {"spec": {"version": "v1.34.2"}}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("current machine spec: number out of range at line 1 column 17"),
            "{error}"
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
    fn what_is_not_decoded_is_still_checked_to_be_json() {
        // In a field the decision does not read, and in a spec that is the same on both sides.
        for bad in [
            "[1,]",
            "[1 2]",
            r#""unterminated"#,
            r#""\q""#,
            r#""\u12""#,
            "\"tab\tinside\"",
            "1.",
            "-",
            "01",
            "{\"a\" 1}",
            "nul",
        ] {
            for body in [
                format!(r#"{{"current": {{"machine": {{"status": {bad}}}}}}}"#),
                format!(
                    r#"{{"current": {{"bootstrapConfig": {{"spec": {{"x": {bad}}}}}}},
                        "desired": {{"bootstrapConfig": {{"spec": {{"x": {bad}}}}}}}}}"#
                ),
            ] {
                assert!(
                    serde_json::from_str::<CanUpdateMachineRequest>(&body).is_err(),
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn outlines_keep_only_their_fields() {
        static OUTLINE: Outline = Outline::Fields(&[
            ("kind", Outline::Whole),
            ("spec", Outline::Fields(&[("nested", Outline::Fields(&[]))])),
        ]);
        let decode = |json: &str| decode_spec(&OUTLINE, &RawValue::from_string(json.to_owned())?);
        assert_eq!(
            decode(
                r#"{"kind": "K", "other": {"x": [1, 2e3]}, "spec": {"nested": {"big": [1]}, "skipped": 1}}"#
            )
            .unwrap(),
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
                decode(json).unwrap(),
                serde_json::from_str::<Value>(json).unwrap(),
                "{json}"
            );
        }
        assert_eq!(
            decode(r#"{"spec": {"nested": "text"}, "kind": 5}"#).unwrap(),
            json!({"spec": {"nested": "text"}, "kind": 5})
        );
        // Keys are compared unescaped, and a repeated key keeps its last value, as serde_json does.
        assert_eq!(
            decode(r#"{"k\u0069nd": "first", "kind": "last"}"#).unwrap(),
            json!({"kind": "last"})
        );
        // What is decoded is decoded strictly, what is skipped is only checked to be JSON.
        assert!(decode(r#"{"kind": 1e400}"#).is_err());
        assert!(decode(r#"{"other": [1, 1e400], "spec": {"skipped": "\ud800"}}"#).is_ok());
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
