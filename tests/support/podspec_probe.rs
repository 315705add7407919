//! Every field of a k8s-openapi type, found through its own `Deserialize`: a serde `Deserializer`
//! that answers every question the type asks — each struct field present (the type names them in
//! `deserialize_struct`), each list with one item, each map with one entry — and records the path
//! of every string field and the structs around it. No list of fields is written by hand, so a new
//! field in a new k8s-openapi version shows up here by itself.
//!
//! `secret_naming_fields` turns that into the list of PodSpec fields that name a Secret, which
//! `tests/secret_fields.rs` compares with the guard, the webhook's CEL pre-filter and the
//! data-plane ValidatingAdmissionPolicy.

use std::cell::RefCell;
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::PodSpec;
use serde::de::value::Error;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

/// A string field: where it is (`volumes[].csi.nodePublishSecretRef.name`) and the Rust types of
/// the structs it sits in, innermost last (`[..., "CSIVolumeSource", "LocalObjectReference"]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StringField {
    pub path: String,
    pub structs: Vec<&'static str>,
}

/// Types whose `name` always names a Secret.
const SECRET_TYPES: [&str; 6] = [
    "SecretKeySelector",
    "SecretEnvSource",
    "SecretProjection",
    "SecretVolumeSource",
    "SecretReference",
    "LocalObjectReference",
];

/// `LocalObjectReference` fields of a PodSpec that name something other than a Secret. Empty in
/// the k8s-openapi versions built against; a new one makes the coverage test fail until it is
/// reviewed and listed here or handled by the guard.
const NOT_SECRETS: [&str; 0] = [];

/// The value every probed string holds: a managed store's name, so the guard sees every field.
pub const PROBE_VALUE: &str = "iomete-secret-store-probe";

/// A PodSpec with every field filled in, and all its string fields.
pub fn full_pod_spec() -> (PodSpec, Vec<StringField>) {
    let found = RefCell::new(Vec::new());
    let spec = serde::Deserialize::deserialize(Probe {
        path: String::new(),
        structs: Vec::new(),
        found: &found,
        depth: 0,
    })
    .unwrap_or_else(|e| panic!("probing PodSpec: {e}"));
    (spec, found.into_inner())
}

/// The PodSpec fields (paths) that name a Secret: a `name` (or `secretName`) field inside one of
/// the Secret reference types, or on a path that mentions a secret. Panics on a
/// `LocalObjectReference` that neither mentions a secret nor is listed in `NOT_SECRETS`.
pub fn secret_naming_fields() -> BTreeSet<String> {
    let (_, fields) = full_pod_spec();
    let mut out = BTreeSet::new();
    for f in fields {
        let leaf = f.path.rsplit('.').next().unwrap_or_default();
        let leaf_lower = leaf.to_ascii_lowercase();
        let is_name = leaf == "name" || leaf_lower.ends_with("secretname");
        let mentions_secret = f.path.to_ascii_lowercase().contains("secret");
        let inner = f.structs.last().copied().unwrap_or_default();
        if inner == "LocalObjectReference"
            && !mentions_secret
            && !NOT_SECRETS.contains(&f.path.as_str())
        {
            panic!(
                "{} is a LocalObjectReference that does not say it names a Secret: review it, then \
                 handle it in the guard or list it in NOT_SECRETS",
                f.path
            );
        }
        if is_name
            && (mentions_secret || SECRET_TYPES.contains(&inner))
            && !NOT_SECRETS.contains(&f.path.as_str())
        {
            out.insert(f.path);
        }
    }
    out
}

struct Probe<'a> {
    path: String,
    structs: Vec<&'static str>,
    found: &'a RefCell<Vec<StringField>>,
    depth: usize,
}

/// Deep enough for any PodSpec; stops a recursive type from recursing forever.
const MAX_DEPTH: usize = 48;

impl<'a> Probe<'a> {
    fn child(&self, segment: &str, within: Option<&'static str>) -> Probe<'a> {
        let path = if self.path.is_empty() {
            segment.to_string()
        } else if segment.starts_with('[') {
            format!("{}{segment}", self.path)
        } else {
            format!("{}.{segment}", self.path)
        };
        let mut structs = self.structs.clone();
        structs.extend(within);
        Probe {
            path,
            structs,
            found: self.found,
            depth: self.depth + 1,
        }
    }

    /// The string for a field; `expects` is what the type's visitor says it wants. Timestamps
    /// (object metadata inside a volume claim template) get a timestamp.
    fn string(&self, expects: &dyn de::Expected) -> String {
        let expects = expects.to_string().to_ascii_lowercase();
        if expects.contains("timestamp") || expects.contains("date") || expects.contains("time") {
            return "2024-01-01T00:00:00Z".to_string();
        }
        self.found.borrow_mut().push(StringField {
            path: self.path.clone(),
            structs: self.structs.clone(),
        });
        PROBE_VALUE.to_string()
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Untyped values (IntOrString, raw JSON): a string.
        let value = self.string(&visitor);
        visitor.visit_string(value)
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(true)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(1.0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(1.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_char('x')
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let value = self.string(&v);
        v.visit_string(value)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let value = self.string(&v);
        v.visit_string(value)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_byte_buf(b"x".to_vec())
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_byte_buf(b"x".to_vec())
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        if self.depth > MAX_DEPTH {
            v.visit_none()
        } else {
            v.visit_some(self)
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let item = self.child("[]", None);
        v.visit_seq(One { item: Some(item) })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let value = self.child("{}", None);
        v.visit_map(Entries {
            entries: vec![("key", value)],
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let entries = fields
            .iter()
            .map(|field| (*field, self.child(field, Some(name))))
            .collect();
        v.visit_map(Entries { entries })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: enum {name} is not probed",
            self.path
        )))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let value = self.string(&v);
        v.visit_string(value)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

/// A sequence of one item.
struct One<'a> {
    item: Option<Probe<'a>>,
}

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.item.take() {
            Some(item) => seed.deserialize(item).map(Some),
            None => Ok(None),
        }
    }
}

/// A struct's fields (or a map's one entry), keys as plain strings.
struct Entries<'a> {
    entries: Vec<(&'static str, Probe<'a>)>,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.first() {
            Some((key, _)) => seed.deserialize((*key).into_deserializer()).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (_, value) = self.entries.remove(0);
        seed.deserialize(value)
    }
}
