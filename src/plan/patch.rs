//! JSON Patch written as it is planned: each operation goes straight into the bytes the
//! AdmissionResponse carries. Building a `serde_json::Value` tree per operation, then serializing
//! and dropping it, was most of a patched admission's cost (docs/performance.md).

use std::fmt;

use serde::Serialize;

/// A JSON Patch (RFC 6902) under construction.
#[derive(Clone, Default)]
pub struct JsonPatch {
    /// The operations so far, comma-separated, without the enclosing brackets.
    json: Vec<u8>,
    len: usize,
    /// Some value did not serialize; the patch must not be sent.
    failed: bool,
}

/// A value the planner gave could not be serialized (not expected for the types it writes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a JSON Patch value could not be serialized")]
pub struct PatchError;

impl JsonPatch {
    pub fn add<'t, V: Serialize + ?Sized>(
        &mut self,
        path: impl IntoIterator<Item = &'t str>,
        value: &V,
    ) {
        self.push("add", path, Some(value));
    }

    pub fn replace<'t, V: Serialize + ?Sized>(
        &mut self,
        path: impl IntoIterator<Item = &'t str>,
        value: &V,
    ) {
        self.push("replace", path, Some(value));
    }

    pub fn remove<'t>(&mut self, path: impl IntoIterator<Item = &'t str>) {
        self.push::<()>("remove", path, None);
    }

    fn push<'t, V: Serialize + ?Sized>(
        &mut self,
        op: &str,
        path: impl IntoIterator<Item = &'t str>,
        value: Option<&V>,
    ) {
        let start = self.json.len();
        if self.len > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(br#"{"op":""#);
        self.json.extend_from_slice(op.as_bytes());
        self.json.extend_from_slice(br#"","path":"#);
        let written = serde_json::to_writer(&mut self.json, &pointer(path)).and_then(|()| {
            let Some(value) = value else { return Ok(()) };
            self.json.extend_from_slice(br#","value":"#);
            serde_json::to_writer(&mut self.json, value)
        });
        if written.is_err() {
            self.json.truncate(start);
            self.failed = true;
            return;
        }
        self.json.push(b'}');
        self.len += 1;
    }

    /// Appends `other`'s operations after this patch's.
    pub fn append(&mut self, other: JsonPatch) {
        self.failed |= other.failed;
        if other.len == 0 {
            return;
        }
        if self.len > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(&other.json);
        self.len += other.len;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// False also when a value failed to serialize, so that the caller asks for the bytes and
    /// learns of the failure instead of sending no patch.
    pub fn is_empty(&self) -> bool {
        self.len == 0 && !self.failed
    }

    /// The patch document, `[...]`.
    pub fn into_bytes(self) -> Result<Vec<u8>, PatchError> {
        self.document()
    }

    /// The operations as `json_patch` values, to apply or inspect them (tests, tools).
    pub fn operations(&self) -> Result<json_patch::Patch, PatchError> {
        serde_json::from_slice(&self.document()?).map_err(|_| PatchError)
    }

    fn document(&self) -> Result<Vec<u8>, PatchError> {
        if self.failed {
            return Err(PatchError);
        }
        let mut out = Vec::with_capacity(self.json.len() + 2);
        out.push(b'[');
        out.extend_from_slice(&self.json);
        out.push(b']');
        Ok(out)
    }
}

/// A JSON Pointer (RFC 6901) from its unescaped tokens.
fn pointer<'t>(tokens: impl IntoIterator<Item = &'t str>) -> String {
    let mut out = String::with_capacity(48);
    for token in tokens {
        out.push('/');
        for c in token.chars() {
            match c {
                '~' => out.push_str("~0"),
                '/' => out.push_str("~1"),
                c => out.push(c),
            }
        }
    }
    out
}

impl fmt::Debug for JsonPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", String::from_utf8_lossy(&self.json))?;
        if self.failed {
            f.write_str(" (a value failed to serialize)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn writes_rfc6902_with_escaped_pointers() {
        let mut patch = JsonPatch::default();
        assert!(patch.is_empty());
        patch.add(["metadata", "annotations", "a.io/x~y"], "v\"1");
        patch.replace(
            ["spec", "containers", "0", "env", "2"],
            &json!({"name": "A"}),
        );
        patch.remove(["spec", "containers", "0", "args"]);
        assert_eq!(patch.len(), 3);
        let doc: serde_json::Value = serde_json::from_slice(&patch.into_bytes().unwrap()).unwrap();
        assert_eq!(
            doc,
            json!([
                {"op": "add", "path": "/metadata/annotations/a.io~1x~0y", "value": "v\"1"},
                {"op": "replace", "path": "/spec/containers/0/env/2", "value": {"name": "A"}},
                {"op": "remove", "path": "/spec/containers/0/args"},
            ])
        );
    }

    #[test]
    fn appended_patches_keep_their_order_and_parse() {
        let mut first = JsonPatch::default();
        first.append(JsonPatch::default());
        let mut second = JsonPatch::default();
        second.add(["a"], &1);
        second.add(["b"], &[2, 3]);
        first.append(second);
        first.remove(["a"]);
        assert_eq!(first.len(), 3);
        let ops = first.operations().unwrap();
        let mut doc = json!({});
        json_patch::patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json!({"b": [2, 3]}));
    }

    #[test]
    fn a_value_that_does_not_serialize_fails_the_whole_patch() {
        struct Broken;
        impl Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("broken"))
            }
        }
        let mut patch = JsonPatch::default();
        patch.add(["a"], &1);
        patch.add(["b"], &Broken);
        assert!(!patch.is_empty());
        assert_eq!(patch.len(), 1);
        assert_eq!(patch.into_bytes(), Err(PatchError));
    }
}
