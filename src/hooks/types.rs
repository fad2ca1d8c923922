//! Wire types of `hooks.runtime.cluster.x-k8s.io/v1alpha1`, field for field as upstream
//! (`api/runtime/hooks/v1alpha1/{inplaceupdate,common,discovery}_types.go` in cluster-api).
//!
//! Decoding is lenient the way Go's `encoding/json` is: unknown fields are ignored, `null` reads as
//! the zero value, and every object may be missing. Of the objects inside CanUpdate requests
//! (Machine, MachineSet, infrastructure and bootstrap objects) a [`RequestObject`] holds the few
//! strings the decision reads and the spec, which stays arbitrary JSON; [`object`] has accessors
//! for such JSON. Responses always carry `apiVersion` and `kind: <Hook>Response`, and
//! `UpdateMachineResponse` always carries `retryAfterSeconds`, as upstream's `+required` tag says.
//!
//! Reading the objects is most of what a hook call costs, so a request is read in one pass with a
//! [`Scanner`] and nothing is decoded further than it is read: a CanUpdate object only along the
//! [`Outline`] of what the decision reads of it, and what is the same on both sides only once, to
//! a smaller outline (see [`Reads`]). UpdateMachine keeps only the Machine. What is not decoded is
//! checked to be JSON all the same, as Go's encoding/json checks the fields it does not know.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::scan::{ReadError, Scanner, Span};

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
    pub fn json_patch<T: Serialize>(operations: &[T]) -> Self {
        // Serializing the operations cannot fail: every key is a string.
        let patch = serde_json::to_vec(operations).unwrap_or_default();
        Self {
            patch_type: PatchType::JsonPatch,
            patch,
        }
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::display::Base64Display;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Written straight into the answer, without a string of its own in between.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&Base64Display::new(bytes, &STANDARD))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// The fields every request shares (`TypeMeta` and `CommonRequest`).
pub trait HookRequest: Sized {
    const HOOK: Hook;
    /// Reads a request from its JSON body.
    fn read(body: &[u8]) -> Result<Self, ReadError>;
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
    ($type:ty, $hook:expr, $read:expr) => {
        impl HookRequest for $type {
            const HOOK: Hook = $hook;
            fn read(body: &[u8]) -> Result<Self, ReadError> {
                $read(body)
            }
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
#[derive(Debug, Clone, Default)]
pub struct DiscoveryRequest {
    pub api_version: String,
    pub kind: String,
}
request_type_meta!(DiscoveryRequest, Hook::Discovery, |body| {
    let common = read_request(body, |_, _| Ok(false))?;
    Ok(DiscoveryRequest {
        api_version: common.api_version,
        kind: common.kind,
    })
});

/// The fields of `TypeMeta` and `CommonRequest`, which every request reads alike (Discovery all
/// but `settings`).
#[derive(Debug, Default)]
struct Common {
    api_version: String,
    kind: String,
    settings: BTreeMap<String, String>,
}

/// Reads the top-level object of a request: the [`Common`] fields, and through `field` the hook's
/// own, which it reads and returns true for (a field it does not know is skipped). A `null` field
/// reads as the zero value, as in Go's encoding/json; a repeated field reads as its last value
/// (Go's merges a repeated object into the first; CAPI, which encodes with it, repeats none).
fn read_request<'a>(
    body: &'a [u8],
    mut field: impl FnMut(&[u8], &mut Scanner<'a>) -> Result<bool, ReadError>,
) -> Result<Common, ReadError> {
    let mut scan = Scanner::new(body);
    let mut members = scan
        .object()
        .ok_or_else(|| scan.error_here("expected a JSON object"))?;
    let mut common = Common::default();
    while let Some(key) = members.next_key(&mut scan)? {
        match &*key {
            b"apiVersion" => common.api_version = scan.decode::<Option<_>>()?.unwrap_or_default(),
            b"kind" => common.kind = scan.decode::<Option<_>>()?.unwrap_or_default(),
            // ExtensionConfig `spec.settings`; a `null` value reads as an empty string.
            b"settings" => {
                let settings: Option<BTreeMap<String, Option<String>>> = scan.decode()?;
                common.settings = settings
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.unwrap_or_default()))
                    .collect();
            }
            other => {
                if !field(other, &mut scan)? {
                    scan.skip()?;
                }
            }
        }
    }
    scan.end()?;
    Ok(common)
}

/// The parts of a JSON value to decode.
#[derive(Debug)]
pub enum Outline {
    /// The whole value.
    Whole,
    /// Of an object, only these fields, each along its own outline; every other field is only
    /// checked to be JSON. A value that is not an object is decoded whole.
    Fields(&'static [(&'static str, Outline)]),
    /// The spec the decision compares: only checked while the request is read, and decoded once
    /// both sides are known (see [`Reads`]).
    Spec,
}

/// What the decision reads of the objects of one CanUpdate hook.
///
/// KubeadmControlPlane trims the current and the desired objects the same way and Go encodes equal
/// values as equal bytes, so on a plain upgrade most specs arrive twice, byte for byte, the
/// KubeadmConfig's above all (the bulk of the request, with its files). The request is read in one
/// pass: of each object only what a [`RequestObject`] holds is decoded, its `spec` along the
/// [`Reads::spec`] outline, and where the spec the decision compares is, is noted; the second
/// copy of a spec is only compared with the first, byte for byte. What is the same text on both
/// sides cannot differ, so of it only what the decision checks of each side
/// alone is decoded, once (`unchanged`): of the whole spec when the two specs are the same text,
/// else of each of their top-level fields that is; the fields that differ are decoded whole. What
/// is left out is only checked to be JSON, as Go's encoding/json does with fields it does not know;
/// no answer depends on it.
#[derive(Debug)]
pub struct Reads {
    /// Every object's `spec` field along this outline, with [`Outline::Spec`] where the spec the
    /// decision compares is.
    pub spec: Outline,
    /// Where that spec is in an object: `spec` and the path of [`Outline::Spec`] in `spec`.
    pub spec_path: &'static [&'static str],
    /// What is read of each object's spec (in the order owner, infrastructure object, bootstrap
    /// config) when it is the same text on both sides.
    pub unchanged: [Outline; 3],
}

impl Reads {
    /// Where the spec the decision compares is in an object's `spec` field.
    fn below_spec(&self) -> &'static [&'static str] {
        self.spec_path.get(1..).unwrap_or_default()
    }
}

/// One object of a CanUpdate request (Machine or MachineSet, infrastructure object, bootstrap
/// config) as the decision reads it: its type, the owner's name, and its `spec`. Typed rather
/// than a JSON map: these few strings are read of every object of every request, and a map per
/// object, with its keys, cost more than the decision. A value that is not a JSON object holds
/// nothing and is only checked to be JSON, as Go keeps each object as raw JSON
/// (`runtime.RawExtension`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestObject {
    /// `apiVersion`; empty when missing or not a string, as every field below.
    pub api_version: String,
    pub kind: String,
    /// `metadata.name` and `metadata.namespace`: read of the current owner only, whose decision
    /// is logged with them.
    pub name: String,
    pub namespace: String,
    /// `spec`, as far as [`Reads::spec`] has it read; `None` when there is none.
    pub spec: Option<Value>,
}

impl RequestObject {
    /// The object that reading `value` whole gives, every field of it (one that is not a JSON
    /// object has nothing): what the tests compare the answers to requests read along [`Reads`]
    /// with.
    #[cfg(test)]
    pub fn from_value(value: &Value) -> Self {
        let text = |path: &[&str]| object::get_str(value, path).unwrap_or_default().to_owned();
        Self {
            api_version: text(&["apiVersion"]),
            kind: text(&["kind"]),
            name: text(&["metadata", "name"]),
            namespace: text(&["metadata", "namespace"]),
            spec: value.get("spec").cloned(),
        }
    }

    /// The API group of `apiVersion` (the part before `/`), or `""`.
    pub fn api_group(&self) -> &str {
        self.api_version
            .split_once('/')
            .map(|(group, _)| group)
            .unwrap_or_default()
    }

    /// The value at `path` (object keys from the object's top, so starting with `spec`), if
    /// every step exists.
    pub fn get(&self, path: &[&str]) -> Option<&Value> {
        match path.split_first() {
            Some((&"spec", below)) => object::get(self.spec.as_ref()?, below),
            _ => None,
        }
    }

    /// `namespace/name`, for logs.
    pub fn namespaced_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A request whose objects are decoded along [`Reads`]; the decision says which.
pub trait CanUpdateReads {
    const READS: &'static Reads;
}

/// Reads the next value along an outline, noting where its [`Outline::Spec`] is in `spec`. What
/// repeats `known_spec` (the other side's spec, if read before) is only compared with it.
fn read_along<'a>(
    scan: &mut Scanner<'a>,
    outline: &'static Outline,
    spec: &mut Option<ReadSpec<'a>>,
    known_spec: Option<&ReadSpec>,
) -> Result<Value, ReadError> {
    match outline {
        Outline::Whole => scan.decode_value(),
        Outline::Fields(fields) => {
            let Some(mut members) = scan.object() else {
                return scan.decode_value();
            };
            let mut kept = Map::new();
            while let Some(key) = members.next_key(scan)? {
                match fields.iter().find(|(name, _)| name.as_bytes() == &*key) {
                    // A repeated field keeps its last value, as serde_json's own `Value` does.
                    Some((name, outline)) => {
                        let value = read_along(scan, outline, spec, known_spec)?;
                        kept.insert((*name).to_owned(), value);
                    }
                    None => {
                        scan.skip()?;
                    }
                }
            }
            Ok(Value::Object(kept))
        }
        Outline::Spec => {
            *spec = Some(ReadSpec::read(scan, known_spec)?);
            // A placeholder; the decoded spec takes its place (`ReadObject::finish`).
            Ok(Value::Null)
        }
    }
}

/// A field of an object as it was read: its key, unescaped, and where its value is.
type Field<'a> = (Cow<'a, [u8]>, Span);

/// The fields of a spec.
type SpecFields<'a> = Vec<Field<'a>>;

/// Passes over the value of the field `key`, comparing it with `known`, the other side's field in
/// the same place, when that has the same name. On an upgrade most fields of two objects that
/// differ are the same on both sides, in the same order (Go writes a struct's fields in a fixed
/// order); a field is never searched for, which an object of many fields would make quadratic.
fn skip_field(scan: &mut Scanner, key: &[u8], known: Option<&Field>) -> Result<Span, ReadError> {
    let same = known
        .filter(|(known_key, _)| **known_key == *key)
        .and_then(|(_, known)| scan.skip_same(scan.text(*known)));
    match same {
        Some(span) => Ok(span),
        None => scan.skip(),
    }
}

/// A spec as it was read: where it is, and, when it is an object that was checked here rather than
/// compared with the other side's, where each of its fields is (for [`decode_spec_pair`]).
#[derive(Debug)]
struct ReadSpec<'a> {
    span: Span,
    fields: Option<SpecFields<'a>>,
    /// The other side's spec it was only compared with, being the same text.
    repeats: Option<Span>,
}

impl<'a> ReadSpec<'a> {
    /// Reads the next value; when it repeats `known` (the other side's spec), only compares it,
    /// and of an object that does not, each field that repeats the field in its place in `known`.
    fn read(scan: &mut Scanner<'a>, known: Option<&ReadSpec>) -> Result<Self, ReadError> {
        if let Some(known) = known
            && let Some(span) = scan.skip_same(scan.text(known.span))
        {
            return Ok(Self {
                span,
                fields: None,
                repeats: Some(known.span),
            });
        }
        let known_fields = known.and_then(|known| known.fields.as_deref());
        let start = scan.here();
        let Some(mut members) = scan.object() else {
            let span = scan.skip()?;
            return Ok(Self {
                span,
                fields: None,
                repeats: None,
            });
        };
        // Room for the fields of the specs the hooks read, so that it is allocated once.
        let mut fields = Vec::with_capacity(8);
        while let Some(key) = members.next_key(scan)? {
            let known = known_fields.and_then(|known| known.get(fields.len()));
            let value = skip_field(scan, &key, known)?;
            fields.push((key, value));
        }
        Ok(Self {
            span: scan.span_from(start),
            fields: Some(fields),
            repeats: None,
        })
    }
}

/// Decodes a spec, scanned before, along an outline without [`Outline::Spec`].
fn decode_spec(outline: &'static Outline, body: &[u8], spec: Span) -> Result<Value, ReadError> {
    let mut scan = Scanner::at(body, spec);
    if matches!(outline, Outline::Fields([])) && scan.text(spec).starts_with(b"{") {
        // Nothing to read of an object.
        return Ok(Value::Object(Map::new()));
    }
    read_along(&mut scan, outline, &mut None, None)
}

/// One object of a CanUpdate request as it was read: what it holds, with a placeholder for the
/// spec the decision compares, and where that spec is.
#[derive(Debug)]
struct ReadObject<'a> {
    partial: RequestObject,
    spec: Option<ReadSpec<'a>>,
    /// The fields passed over, in their order (the current owner's metadata among them, though it
    /// is read), so that the other side's may be compared with them (metadata and status are
    /// mostly the same on both sides).
    checked: Vec<Field<'a>>,
}

impl<'a> ReadObject<'a> {
    /// Reads the next value as an object along `reads`, `None` if it is `null`; of its metadata
    /// only with `metadata`. `other` is the same object of the other side, if it was read before.
    /// A value that is not an object holds nothing; a repeated field reads as its last value.
    fn read(
        scan: &mut Scanner<'a>,
        reads: &'static Reads,
        metadata: bool,
        other: Option<&ReadObject>,
    ) -> Result<Option<Self>, ReadError> {
        if scan.null() {
            return Ok(None);
        }
        let known_spec = other.and_then(|other| other.spec.as_ref());
        let mut partial = RequestObject::default();
        let mut spec = None;
        let mut checked = Vec::new();
        let Some(mut members) = scan.object() else {
            scan.skip()?;
            return Ok(Some(Self {
                partial,
                spec,
                checked,
            }));
        };
        while let Some(key) = members.next_key(scan)? {
            match &*key {
                b"apiVersion" => partial.api_version = read_text(scan)?,
                b"kind" => partial.kind = read_text(scan)?,
                // Read, and kept among the checked fields, so that the other side's fields are
                // still compared with the field in their place.
                b"metadata" if metadata => {
                    let start = scan.here();
                    (partial.name, partial.namespace) = read_name(scan)?;
                    checked.push((key, scan.span_from(start)));
                }
                b"spec" => {
                    partial.spec = Some(read_along(scan, &reads.spec, &mut spec, known_spec)?);
                }
                _ => {
                    let known = other.and_then(|other| other.checked.get(checked.len()));
                    let value = skip_field(scan, &key, known)?;
                    checked.push((key, value));
                }
            }
        }
        Ok(Some(Self {
            partial,
            spec,
            checked,
        }))
    }

    /// Its spec, to decode; none when a repeated key took the spec's place away, as decoding the
    /// whole object would drop it, unread.
    fn take_spec(&mut self, reads: &'static Reads) -> Option<ReadSpec<'a>> {
        let spec = self.spec.take()?;
        self.partial.get(reads.spec_path).map(|_| spec)
    }

    /// The object with its spec, decoded, in place.
    fn finish(self, reads: &'static Reads, spec: Option<Value>) -> RequestObject {
        let mut object = self.partial;
        let placeholder = object
            .spec
            .as_mut()
            .and_then(|partial| object::get_mut(partial, reads.below_spec()));
        if let (Some(spec), Some(placeholder)) = (spec, placeholder) {
            *placeholder = spec;
        }
        object
    }
}

/// Reads the next value as metadata: its `name` and `namespace` (empty when missing, as when the
/// value is not an object).
fn read_name(scan: &mut Scanner) -> Result<(String, String), ReadError> {
    let (mut name, mut namespace) = Default::default();
    let Some(mut fields) = scan.object() else {
        scan.skip()?;
        return Ok((name, namespace));
    };
    while let Some(key) = fields.next_key(scan)? {
        match &*key {
            b"name" => name = read_text(scan)?,
            b"namespace" => namespace = read_text(scan)?,
            _ => {
                scan.skip()?;
            }
        }
    }
    Ok((name, namespace))
}

/// Reads the next value as a string: any other value reads as empty, as the decision takes it.
fn read_text(scan: &mut Scanner) -> Result<String, ReadError> {
    Ok(match scan.decode_value()? {
        Value::String(text) => text,
        _ => String::new(),
    })
}

/// Decodes the specs of one current/desired pair of objects (`name` on the wire) and puts them in
/// place. An error says whose spec it was.
fn decode_pair(
    reads: &'static Reads,
    body: &[u8],
    name: &str,
    [mut current, mut desired]: [Option<ReadObject>; 2],
    unchanged: &'static Outline,
) -> Result<(Option<RequestObject>, Option<RequestObject>), ReadError> {
    let whole = |side: &str, spec: Option<ReadSpec>| {
        spec.map(|spec| Scanner::at(body, spec.span).decode_span(spec.span))
            .transpose()
            .map_err(|err| err.context(format!("{side} {name} spec")))
    };
    let current_spec = current.as_mut().and_then(|object| object.take_spec(reads));
    let desired_spec = desired.as_mut().and_then(|object| object.take_spec(reads));
    let (current_spec, desired_spec) = match (current_spec, desired_spec) {
        (Some(current_spec), Some(desired_spec)) => {
            let (current_spec, desired_spec) =
                decode_spec_pair(unchanged, body, current_spec, desired_spec, name)?;
            (Some(current_spec), Some(desired_spec))
        }
        (current_spec, desired_spec) => (
            whole("current", current_spec)?,
            whole("desired", desired_spec)?,
        ),
    };
    Ok((
        current.map(|object| object.finish(reads, current_spec)),
        desired.map(|object| object.finish(reads, desired_spec)),
    ))
}

/// Decodes the two specs of a pair. What is the same text on both sides cannot differ, so of it
/// only `unchanged` is decoded, once: of the whole spec when the two are the same text, else of
/// each top-level field that is (the rest of each spec is decoded whole). A Machine's spec on an
/// upgrade differs only in `version`, so only `version` is decoded of it.
fn decode_spec_pair(
    unchanged: &'static Outline,
    body: &[u8],
    current: ReadSpec,
    desired: ReadSpec,
    name: &str,
) -> Result<(Value, Value), ReadError> {
    let scan = Scanner::at(body, current.span);
    // A spec read as a repeat of the very spec on the other side is the same text.
    let same = desired.repeats == Some(current.span)
        || current.repeats == Some(desired.span)
        || scan.text(current.span) == scan.text(desired.span);
    if same {
        let spec = decode_spec(unchanged, body, current.span)
            .map_err(|err| err.context(format!("current and desired {name} spec")))?;
        return Ok((spec.clone(), spec));
    }
    let in_context =
        |side: &'static str| move |err: ReadError| err.context(format!("{side} {name} spec"));
    let (Some(current_fields), Some(desired_fields)) = (current.fields, desired.fields) else {
        // Not both objects: nothing to compare field by field.
        return Ok((
            scan.decode_span(current.span)
                .map_err(in_context("current"))?,
            scan.decode_span(desired.span)
                .map_err(in_context("desired"))?,
        ));
    };
    let decode = |fields: &SpecFields, others: &SpecFields| {
        let others = LastByName::new(others);
        let mut decoded = Map::new();
        for (key, value) in fields {
            let same = others
                .get(key)
                .is_some_and(|other| scan.text(other) == scan.text(*value));
            let outline = match unchanged {
                _ if !same => &Outline::Whole,
                // The names read are text, so bytes that are not UTF-8 match none of them.
                Outline::Fields(read) => {
                    match read.iter().find(|(read, _)| read.as_bytes() == &**key) {
                        Some((_, outline)) => outline,
                        None => {
                            decoded.remove(&*key_text(key));
                            continue;
                        }
                    }
                }
                _ => &Outline::Whole,
            };
            let value = read_along(&mut Scanner::at(body, *value), outline, &mut None, None)?;
            decoded.insert(key_text(key).into_owned(), value);
        }
        Ok::<_, ReadError>(Value::Object(decoded))
    };
    Ok((
        decode(&current_fields, &desired_fields).map_err(in_context("current"))?,
        decode(&desired_fields, &current_fields).map_err(in_context("desired"))?,
    ))
}

/// Where each name among the fields of a spec has its value; a repeated name counts with its last
/// value, as decoding the whole spec would. Specs have a handful of fields, found fastest by going
/// through them; past [`LastByName::FEW`] they are looked up in a map, so that a request with
/// thousands of fields cannot take quadratic time.
enum LastByName<'f> {
    Few(&'f [Field<'f>]),
    Many(HashMap<Cow<'f, str>, Span>),
}

impl<'f> LastByName<'f> {
    const FEW: usize = 32;

    fn new(fields: &'f [Field<'f>]) -> Self {
        if fields.len() <= Self::FEW {
            return Self::Few(fields);
        }
        // Later fields replace earlier ones of the same name.
        Self::Many(
            fields
                .iter()
                .map(|(key, value)| (key_text(key), *value))
                .collect(),
        )
    }

    /// The value of the field named `key`, if there is one.
    fn get(&self, key: &[u8]) -> Option<Span> {
        match self {
            Self::Few(fields) => fields
                .iter()
                .rev()
                .find(|(other, _)| same_name(other, key))
                .map(|(_, value)| *value),
            Self::Many(fields) => fields.get(&*key_text(key)).copied(),
        }
    }
}

/// Whether two keys name the same field, as text (see [`key_text`]): the same bytes always do,
/// and keys that differ in ASCII alone never do, so only other keys are turned into text.
fn same_name(a: &[u8], b: &[u8]) -> bool {
    a == b || (!(a.is_ascii() && b.is_ascii()) && key_text(a) == key_text(b))
}

/// A key as text; one that is not UTF-8 with U+FFFD in place of each bad byte, as Go's
/// encoding/json reads it.
fn key_text(key: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(key) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(key),
    }
}

/// Reads the objects of one side of a CanUpdate request (`null` reads as none), named on the wire
/// as in `names`; `other` is the other side, as far as it was read.
fn read_objects<'a>(
    scan: &mut Scanner<'a>,
    reads: &'static Reads,
    names: [&str; 3],
    expecting: &str,
    current: bool,
    other: &[Option<ReadObject>; 3],
) -> Result<[Option<ReadObject<'a>>; 3], ReadError> {
    let mut objects = <[Option<ReadObject>; 3]>::default();
    if scan.null() {
        return Ok(objects);
    }
    let mut members = scan
        .object()
        .ok_or_else(|| scan.error_here(&format!("expected an object ({expecting})")))?;
    while let Some(key) = members.next_key(scan)? {
        match names.iter().position(|name| name.as_bytes() == &*key) {
            Some(index) => {
                // Only the current owner's name is read; its decision is logged with it.
                let metadata = current && index == 0;
                objects[index] = ReadObject::read(scan, reads, metadata, other[index].as_ref())?;
            }
            None => {
                scan.skip()?;
            }
        }
    }
    Ok(objects)
}

/// The objects of one side of a CanUpdate request: owner, infrastructure and bootstrap.
type SideObjects = [Option<RequestObject>; 3];

/// Reads a CanUpdate request, its objects named on the wire as in `names`, into the current and
/// the desired objects along `reads`.
fn read_can_update(
    body: &[u8],
    reads: &'static Reads,
    names: [&str; 3],
    expecting: &str,
) -> Result<(Common, SideObjects, SideObjects), ReadError> {
    let mut current = Default::default();
    let mut desired = Default::default();
    let common = read_request(body, |key, scan| {
        match key {
            b"current" => current = read_objects(scan, reads, names, expecting, true, &desired)?,
            b"desired" => desired = read_objects(scan, reads, names, expecting, false, &current)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let (mut current_objects, mut desired_objects) =
        (SideObjects::default(), SideObjects::default());
    for (index, pair) in current.into_iter().zip(desired).enumerate() {
        (current_objects[index], desired_objects[index]) = decode_pair(
            reads,
            body,
            names[index],
            pair.into(),
            &reads.unchanged[index],
        )?;
    }
    Ok((common, current_objects, desired_objects))
}

/// A CanUpdate request type: the request as the handlers see it, and its objects, read along its
/// [`Reads`]. The two CanUpdate hooks differ only in names.
macro_rules! can_update_request {
    (
        $(#[$doc:meta])*
        $request:ident, $hook:expr,
        $(#[$objects_doc:meta])*
        $objects:ident,
        { $owner:ident, $infrastructure:ident, $bootstrap:ident $(,)? },
        // The objects' names on the wire.
        names = [$owner_name:literal, $infrastructure_name:literal, $bootstrap_name:literal] $(,)?
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
        request_type_meta!($request, $hook, |body| {
            let (common, current, desired) = read_can_update(
                body,
                <$request as CanUpdateReads>::READS,
                [$owner_name, $infrastructure_name, $bootstrap_name],
                stringify!($objects),
            )?;
            Ok($request {
                api_version: common.api_version,
                kind: common.kind,
                settings: common.settings,
                current: $objects::from(current),
                desired: $objects::from(desired),
            })
        });

        $(#[$objects_doc])*
        #[derive(Debug, Clone, Default)]
        pub struct $objects {
            pub $owner: Option<RequestObject>,
            pub $infrastructure: Option<RequestObject>,
            pub $bootstrap: Option<RequestObject>,
        }

        impl From<SideObjects> for $objects {
            fn from([$owner, $infrastructure, $bootstrap]: SideObjects) -> Self {
                Self { $owner, $infrastructure, $bootstrap }
            }
        }
    };
}

can_update_request!(
    /// `CanUpdateMachineRequest`, sent by KubeadmControlPlane.
    CanUpdateMachineRequest, Hook::CanUpdateMachine,
    /// `CanUpdateMachineRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineRequestObjects,
    { machine, infrastructure_machine, bootstrap_config },
    names = ["machine", "infrastructureMachine", "bootstrapConfig"],
);

can_update_request!(
    /// `CanUpdateMachineSetRequest`, sent by the MachineDeployment controller.
    CanUpdateMachineSetRequest, Hook::CanUpdateMachineSet,
    /// `CanUpdateMachineSetRequestObjects`; `None` means missing or `null`.
    CanUpdateMachineSetRequestObjects,
    { machine_set, infrastructure_machine_template, bootstrap_config_template },
    names = ["machineSet", "infrastructureMachineTemplate", "bootstrapConfigTemplate"],
);

/// `UpdateMachineRequest`, sent (and re-sent) by the Machine controller. Only `desired` exists.
#[derive(Debug, Clone, Default)]
pub struct UpdateMachineRequest {
    pub api_version: String,
    pub kind: String,
    pub settings: BTreeMap<String, String>,
    pub desired: UpdateMachineRequestObjects,
}
request_type_meta!(UpdateMachineRequest, Hook::UpdateMachine, |body| {
    let mut desired = UpdateMachineRequestObjects::default();
    let common = read_request(body, |key, scan| {
        if key != b"desired" {
            return Ok(false);
        }
        desired = UpdateMachineRequestObjects::read(scan)?;
        Ok(true)
    })?;
    Ok(UpdateMachineRequest {
        api_version: common.api_version,
        kind: common.kind,
        settings: common.settings,
        desired,
    })
});

/// `UpdateMachineRequestObjects`; `None` means missing or `null`. CAPI also sends the
/// `infrastructureMachine` and the `bootstrapConfig` (with its files, often most of the request);
/// the upgrade needs neither, and CAPI repeats the call every few seconds while an upgrade runs,
/// so they are only checked to be JSON, never decoded. Of the Machine, only what the upgrade reads
/// (`UPDATE_MACHINE_READS`).
#[derive(Debug, Clone, Default)]
pub struct UpdateMachineRequestObjects {
    pub machine: Option<Value>,
}

impl UpdateMachineRequestObjects {
    /// Reads the next value; `null` reads as no objects.
    fn read(scan: &mut Scanner) -> Result<Self, ReadError> {
        let mut objects = Self::default();
        if scan.null() {
            return Ok(objects);
        }
        let mut members = scan
            .object()
            .ok_or_else(|| scan.error_here("expected an object (UpdateMachineRequestObjects)"))?;
        while let Some(key) = members.next_key(scan)? {
            if &*key != b"machine" {
                scan.skip()?;
            } else if scan.null() {
                objects.machine = None;
            } else {
                objects.machine = Some(read_along(scan, &UPDATE_MACHINE_READS, &mut None, None)?);
            }
        }
        Ok(objects)
    }
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
    use crate::hooks::scan::NOT_JSON;
    use serde_json::json;

    fn body(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn decodes_leniently() {
        let request = CanUpdateMachineRequest::read(&body(json!({
            "apiVersion": API_VERSION,
            "kind": "CanUpdateMachineRequest",
            "settings": {"disableInPlaceUpdates": "true", "empty": null},
            "unknownField": {"x": 1},
            "current": {"machine": {"spec": {"version": "v1.33.6"}}, "bootstrapConfig": null},
            "desired": null,
        })))
        .unwrap();
        assert_eq!(request.settings["disableInPlaceUpdates"], "true");
        assert_eq!(request.settings["empty"], "");
        assert!(request.current.machine.is_some());
        assert!(request.current.bootstrap_config.is_none());
        assert!(request.current.infrastructure_machine.is_none());
        assert!(request.desired.machine.is_none());

        let update = UpdateMachineRequest::read(&body(json!({
            "desired": {
                "machine": {
                    "metadata": {"name": "m", "namespace": "ns", "labels": {"a": "b"}},
                    "spec": {"clusterName": "c", "version": "v1.34.2", "bootstrap": {"x": 1}},
                    "status": {"phase": "Running"},
                },
                "bootstrapConfig": {"spec": {"files": [{"path": "/a"}]}},
            },
        })))
        .unwrap();
        // Of the Machine only what the upgrade reads; the other objects are only checked to be JSON.
        assert_eq!(
            update.desired.machine,
            Some(json!({
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"clusterName": "c", "version": "v1.34.2"},
            }))
        );
        let missing = UpdateMachineRequest::read(br#"{"desired": {"machine": null}}"#).unwrap();
        assert!(missing.desired.machine.is_none());

        let empty = UpdateMachineRequest::read(b"{}").unwrap();
        assert_eq!(empty.kind, "");
        let nulls =
            UpdateMachineRequest::read(br#"{"apiVersion":null,"kind":null,"settings":null}"#)
                .unwrap();
        assert!(nulls.settings.is_empty());
    }

    /// The outlines of a test: the spec is the whole `spec` field; nothing read of an unchanged
    /// owner spec, and a DevMachine's backend of an unchanged infrastructure spec.
    struct Test;

    const TEST_READS: Reads = Reads {
        spec: Outline::Spec,
        spec_path: &["spec"],
        unchanged: [
            Outline::Fields(&[]),
            Outline::Fields(&[(
                "backend",
                Outline::Fields(&[("docker", Outline::Fields(&[]))]),
            )]),
            Outline::Whole,
        ],
    };

    impl CanUpdateReads for Test {
        const READS: &'static Reads = &TEST_READS;
    }

    /// Reads a current and a desired object as a request's objects are read.
    fn read_pair(
        current: &str,
        desired: &str,
        unchanged: &'static Outline,
    ) -> Result<(Option<Value>, Option<Value>), ReadError> {
        let body = format!(r#"{{"current": {current}, "desired": {desired}}}"#);
        let mut scan = Scanner::new(body.as_bytes());
        let mut members = scan.object().unwrap();
        members.next_key(&mut scan)?;
        let current = ReadObject::read(&mut scan, Test::READS, false, None)?;
        members.next_key(&mut scan)?;
        let desired = ReadObject::read(&mut scan, Test::READS, false, current.as_ref())?;
        let (current, desired) = decode_pair(
            Test::READS,
            body.as_bytes(),
            "test",
            [current, desired],
            unchanged,
        )?;
        Ok((as_json(current), as_json(desired)))
    }

    /// What was read of an object, as JSON: the texts that are not empty and the spec, if any.
    fn as_json(object: Option<RequestObject>) -> Option<Value> {
        object.map(|object| {
            let mut fields = Map::new();
            for (name, text) in [
                ("apiVersion", object.api_version),
                ("kind", object.kind),
                ("name", object.name),
                ("namespace", object.namespace),
            ] {
                if !text.is_empty() {
                    fields.insert(name.to_owned(), Value::String(text));
                }
            }
            if let Some(spec) = object.spec {
                fields.insert("spec".to_owned(), spec);
            }
            Value::Object(fields)
        })
    }

    #[test]
    fn a_spec_that_is_the_same_text_is_read_to_its_outline() {
        let nothing = &TEST_READS.unchanged[0];
        let (current, desired) = read_pair(
            r#"{"kind": "A", "status": {"x": 1}, "spec": {"files": [{"path": "/a"}], "n": 1e400}}"#,
            r#"{"kind": "B", "spec": {"files": [{"path": "/a"}], "n": 1e400}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(current, Some(json!({"kind": "A", "spec": {}})));
        assert_eq!(desired, Some(json!({"kind": "B", "spec": {}})));

        let backend = &TEST_READS.unchanged[1];
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
    fn fields_that_are_the_same_text_on_both_sides_are_read_to_their_outline() {
        let nothing = &TEST_READS.unchanged[0];
        // Only the fields that differ are decoded; a field that is the same text on both sides is
        // only checked to be JSON, so its number out of range is no error.
        let (current, desired) = read_pair(
            r#"{"spec": {"big": {"x": 1e400}, "version": "v1.33.6", "same": [1], "gone": 1}}"#,
            r#"{"spec": {"big": {"x": 1e400}, "version": "v1.34.2", "same": [1], "new": {}}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(
            current,
            Some(json!({"spec": {"version": "v1.33.6", "gone": 1}}))
        );
        assert_eq!(
            desired,
            Some(json!({"spec": {"version": "v1.34.2", "new": {}}}))
        );

        // A field the same on both sides is read along the unchanged spec's outline.
        let backend = &TEST_READS.unchanged[1];
        let (current, desired) = read_pair(
            r#"{"spec": {"backend": {"docker": {"image": "a"}, "x": 1}, "image": "a"}}"#,
            r#"{"spec": {"backend": {"docker": {"image": "a"}, "x": 1}, "image": "b"}}"#,
            backend,
        )
        .unwrap();
        assert_eq!(
            current,
            Some(json!({"spec": {"backend": {"docker": {}}, "image": "a"}}))
        );
        assert_eq!(
            desired,
            Some(json!({"spec": {"backend": {"docker": {}}, "image": "b"}}))
        );

        // A repeated field counts with its last value, on each side.
        let (current, desired) = read_pair(
            r#"{"spec": {"k": 1, "k": 2, "v": 1}}"#,
            r#"{"spec": {"k": 2, "v": 2}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(current, Some(json!({"spec": {"v": 1}})));
        assert_eq!(desired, Some(json!({"spec": {"v": 2}})));

        // Fields are matched by name as text: names that are not UTF-8 read as U+FFFD, the last
        // one counting, as decoding the whole spec (and Go's encoding/json) would read them.
        let request = CanUpdateMachineRequest::read(
            b"{\"current\": {\"machine\": {\"spec\": {\"version\": \"v1.33.6\", \"\xff\": 1, \"\xfe\": 3}}},
              \"desired\": {\"machine\": {\"spec\": {\"version\": \"v1.34.2\", \"\xfe\": 3, \"\xff\": 1}}}}",
        )
        .unwrap();
        assert_eq!(
            as_json(request.current.machine.clone()),
            Some(json!({"spec": {"version": "v1.33.6", "\u{fffd}": 3}}))
        );
        assert_eq!(
            as_json(request.desired.machine.clone()),
            Some(json!({"spec": {"version": "v1.34.2", "\u{fffd}": 1}}))
        );

        // What differs is decoded strictly, and the error says whose spec it was.
        let error = read_pair(
            r#"{"spec": {"n": 1e400}}"#,
            r#"{"spec": {"n": 1}}"#,
            nothing,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("current test spec: number out of range"),
            "{error}"
        );
    }

    #[test]
    fn fields_repeating_the_other_side_are_compared_and_still_checked() {
        let nothing = &TEST_READS.unchanged[0];
        // The fields the same as the other side's are passed over by comparison; a number is
        // never taken for the start of another (`1` of `12`), and the rest is still decoded.
        let (current, desired) = read_pair(
            r#"{"spec": {"files": [{"path": "/a"}], "n": 1, "s": "x", "v": "a"}}"#,
            r#"{"spec": {"files": [{"path": "/a"}], "n": 12, "s": "x", "v": "b"}}"#,
            nothing,
        )
        .unwrap();
        assert_eq!(current, Some(json!({"spec": {"n": 1, "v": "a"}})));
        assert_eq!(desired, Some(json!({"spec": {"n": 12, "v": "b"}})));
        // What follows a repeated field is still checked.
        for bad in [
            r#"{"spec": {"s": "x"y, "v": "b"}}"#,
            r#"{"spec": {"files": [{"path": "/a"}]], "v": "b"}}"#,
        ] {
            let refused = read_pair(
                r#"{"spec": {"files": [{"path": "/a"}], "s": "x", "v": "a"}}"#,
                bad,
                nothing,
            );
            assert!(refused.is_err(), "{bad}");
        }
        // So are the fields of an object that are only checked: metadata, status.
        let request = |desired: &str| {
            let body = format!(
                r#"{{"current": {{"bootstrapConfig": {{"metadata": {{"labels": {{"a": "b"}}}}, "status": [1]}}}},
                    "desired": {{"bootstrapConfig": {desired}}}}}"#
            );
            CanUpdateMachineRequest::read(body.as_bytes()).map(|_| ())
        };
        request(r#"{"metadata": {"labels": {"a": "b"}}, "status": [1, 2]}"#).unwrap();
        request(r#"{"metadata": {"labels": {"a": "c"}}, "status": [1]}"#).unwrap();
        for bad in [
            r#"{"metadata": {"labels": {"a": "b"}}}}"#,
            r#"{"status": [1]]}"#,
        ] {
            assert!(request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_repeated_name_counts_with_its_last_value_among_few_fields_or_many() {
        let nothing = &TEST_READS.unchanged[0];
        for count in [3, LastByName::FEW + 8] {
            let fields: String = (0..count).map(|n| format!(r#""f{n}": {n}, "#)).collect();
            let (current, desired) = read_pair(
                &format!(r#"{{"spec": {{{fields}"version": "a"}}}}"#),
                &format!(r#"{{"spec": {{{fields}"version": "b", "f0": 5}}}}"#),
                nothing,
            )
            .unwrap();
            assert_eq!(
                current,
                Some(json!({"spec": {"f0": 0, "version": "a"}})),
                "{count}"
            );
            assert_eq!(
                desired,
                Some(json!({"spec": {"f0": 5, "version": "b"}})),
                "{count}"
            );
        }
    }

    #[test]
    fn an_object_that_is_not_an_object_is_only_checked() {
        // As Go keeps it, raw: valid JSON, holding nothing the decision reads.
        let request =
            CanUpdateMachineRequest::read(br#"{"current": {"machine": [1e400, "\ud800"]}}"#)
                .unwrap();
        assert_eq!(request.current.machine, Some(RequestObject::default()));
        assert!(CanUpdateMachineRequest::read(br#"{"current": {"machine": [1,]}}"#).is_err());
    }

    #[test]
    fn requests_are_read_along_their_outlines() {
        let bootstrap = json!({"kind": "KubeadmConfig", "spec": {"files": [{"path": "/a"}]}});
        let body = json!({
            "current": {"machine": {"spec": {"version": "v1.33.6"}}, "bootstrapConfig": bootstrap},
            "desired": {"machine": {"spec": {"version": "v1.34.2"}}, "bootstrapConfig": bootstrap},
        })
        .to_string();
        let request = CanUpdateMachineRequest::read(body.as_bytes()).unwrap();
        let (current, desired) = (&request.current, &request.desired);
        // Of an unchanged object, only the outline of its spec.
        let unchanged = Some(json!({"kind": "KubeadmConfig", "spec": {}}));
        assert_eq!(as_json(current.bootstrap_config.clone()), unchanged);
        assert_eq!(as_json(desired.bootstrap_config.clone()), unchanged);
        // Of a changed one, the whole spec.
        assert_eq!(
            as_json(desired.machine.clone()),
            Some(json!({"spec": {"version": "v1.34.2"}}))
        );
        assert_eq!(
            as_json(current.machine.clone()),
            Some(json!({"spec": {"version": "v1.33.6"}}))
        );

        // A spec decoded whole is decoded strictly, and the error says whose spec it was.
        let error = CanUpdateMachineRequest::read(
            br#"{"current": {"machine": {"spec": {"version": 1e400}}},
                "desired": {"machine": {"spec": {"version": "v1.34.2"}}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("current machine spec: number out of range at line 1 column 50"),
            "{error}"
        );

        // A spec read as a repeat of the other side's counts as the same only while that side
        // keeps it: here a repeated `current` replaces it.
        let request = CanUpdateMachineRequest::read(
            br#"{"current": {"machine": {"spec": {"a": 1}}}, "desired": {"machine": {"spec": {"a": 1}}},
                "current": {"machine": {"spec": {"a": 2}}}}"#,
        )
        .unwrap();
        assert_eq!(
            as_json(request.current.machine.clone()),
            Some(json!({"spec": {"a": 2}}))
        );
        assert_eq!(
            as_json(request.desired.machine.clone()),
            Some(json!({"spec": {"a": 1}}))
        );

        // A spec whose place a repeated key took away is dropped unread, as decoding the whole
        // object would drop it: its number out of range is no error.
        let request = CanUpdateMachineSetRequest::read(
            br#"{"current": {"machineSet": {"spec": {"template": {"spec": {"x": 1e400}}}, "spec": {}}},
                "desired": {"machineSet": {"spec": {"template": {"spec": {}}}}}}"#,
        )
        .unwrap();
        assert_eq!(
            as_json(request.current.machine_set.clone()),
            Some(json!({"spec": {}}))
        );
        assert_eq!(
            as_json(request.desired.machine_set.clone()),
            Some(json!({"spec": {"template": {"spec": {}}}}))
        );

        // Errors still name the upstream types.
        let error = CanUpdateMachineSetRequest::read(br#"{"desired": 5}"#)
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
        for bad in NOT_JSON {
            for body in [
                format!(r#"{{"current": {{"machine": {{"status": {bad}}}}}}}"#),
                format!(
                    r#"{{"current": {{"bootstrapConfig": {{"spec": {{"x": {bad}}}}}}},
                        "desired": {{"bootstrapConfig": {{"spec": {{"x": {bad}}}}}}}}}"#
                ),
            ] {
                assert!(
                    CanUpdateMachineRequest::read(body.as_bytes()).is_err(),
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
        let decode = |json: &str| {
            let mut scan = Scanner::new(json.as_bytes());
            let spec = scan.skip()?;
            decode_spec(&OUTLINE, json.as_bytes(), spec)
        };
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
        assert_eq!(
            object::get_str(&machine, &["spec", "customImage"]),
            Some("kindest/node:v1.34.2")
        );
        assert_eq!(object::get_str(&machine, &["spec", "missing"]), None);
        assert_eq!(object::namespaced_name(&machine), "ns/m");

        let read = RequestObject::from_value(&machine);
        assert_eq!(read.kind, "DockerMachine");
        assert_eq!(read.api_group(), "infrastructure.cluster.x-k8s.io");
        assert_eq!(
            read.get(&["spec", "customImage"]),
            Some(&json!("kindest/node:v1.34.2"))
        );
        assert_eq!(read.get(&["customImage"]), None);
        assert_eq!(read.namespaced_name(), "ns/m");
        // What is not a string reads as empty; what is not an object holds nothing.
        let odd = RequestObject::from_value(&json!({"kind": 5, "apiVersion": "v1"}));
        assert_eq!((odd.kind.as_str(), odd.api_group()), ("", ""));
        assert_eq!(
            RequestObject::from_value(&json!([1])),
            RequestObject::default()
        );
    }
}
