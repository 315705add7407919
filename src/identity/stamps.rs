//! The stamps the webhook writes on every pod it mutates: whom it admitted the pod for
//! (`secrets.iomete.com/identity`), what the pod may use (`secrets.iomete.com/granted`), and an
//! HMAC-SHA256 signature over both and the pod they belong to (`secrets.iomete.com/signature`).
//! Executors read their driver's stamps back; a stamp that does not verify gives them nothing.
//!
//! The signature covers the namespace, the pod's name (or its `generateName` when the name is
//! generated, which the signature records), the `spark-app-selector` label, the service account,
//! and both stamps, so stamps copied to another pod, or edited, do not verify.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use super::keys::{KeyRing, SignatureError};
use crate::authz::Identity;
use crate::plan::JsonPatch;
use crate::refs::SecretObject;

/// Stamp: the identity the webhook admitted the pod for (JSON `{"user":..,"groups":[..]}`).
pub const STAMP_IDENTITY: &str = "secrets.iomete.com/identity";
/// Stamp: the references the pod was allowed to use (JSON array of short forms, sorted).
pub const STAMP_GRANTED: &str = "secrets.iomete.com/granted";
/// The signature over the stamps and the pod they belong to.
pub const STAMP_SIGNATURE: &str = "secrets.iomete.com/signature";
/// Stamp, on pods with runtime Vault references only: which container fetches which value at
/// start (`plan::runtime::RuntimePlan`, JSON). Covered by the signature.
pub const STAMP_RUNTIME: &str = "secrets.iomete.com/runtime";
/// Every annotation the webhook owns: set only by the webhook, at CREATE, and never changed after.
pub const OWNED: [&str; 4] = [
    STAMP_IDENTITY,
    STAMP_GRANTED,
    STAMP_SIGNATURE,
    STAMP_RUNTIME,
];
/// Label naming the Spark application of a driver and its executors.
pub const SPARK_APP: &str = "spark-app-selector";

/// Version and domain of the signed message, so a signature made for anything else never
/// verifies as a stamp signature.
const DOMAIN: &str = "secrets.iomete.com/stamps/v1";

/// How the signature names the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodName<'a> {
    /// `metadata.name`, known at CREATE.
    Name(&'a str),
    /// `metadata.generateName`: the API server picks the name after admission.
    GenerateName(&'a str),
}

impl PodName<'_> {
    fn tag(self) -> &'static str {
        match self {
            PodName::Name(_) => "n",
            PodName::GenerateName(_) => "g",
        }
    }
}

/// The pod a stamp belongs to, as the signature binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub name: PodName<'a>,
    /// The `spark-app-selector` label, when the pod has one.
    pub app: Option<&'a str>,
    pub service_account: &'a str,
}

impl<'a> Subject<'a> {
    /// A pod being created: its name, or its `generateName` when the API server will pick it.
    pub fn of_new_pod(pod: &'a Pod, namespace: &'a str) -> Self {
        let meta = &pod.metadata;
        let name = match (meta.name.as_deref(), meta.generate_name.as_deref()) {
            (Some(name), _) if !name.is_empty() => PodName::Name(name),
            (_, Some(generated)) if !generated.is_empty() => PodName::GenerateName(generated),
            _ => PodName::Name(""),
        };
        Self::with_name(pod, namespace, name)
    }

    fn with_name(pod: &'a Pod, namespace: &'a str, name: PodName<'a>) -> Self {
        Self {
            namespace,
            name,
            app: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SPARK_APP))
                .map(String::as_str),
            service_account: service_account(pod),
        }
    }

    fn message(&self, identity: &str, granted: &str, runtime: Option<&str>) -> Vec<u8> {
        let (kind, name) = match self.name {
            PodName::Name(n) => ("name", n),
            PodName::GenerateName(g) => ("generateName", g),
        };
        // A JSON array: every field is delimited, so no two subjects give the same bytes. The
        // runtime plan is a ninth element when present, so stamps without one sign as before.
        let fields = (
            DOMAIN,
            self.namespace,
            kind,
            name,
            self.app,
            self.service_account,
            identity,
            granted,
        );
        match runtime {
            None => serde_json::to_vec(&fields),
            Some(plan) => serde_json::to_vec(&(
                fields.0, fields.1, fields.2, fields.3, fields.4, fields.5, fields.6, fields.7,
                plan,
            )),
        }
        .unwrap_or_default()
    }
}

/// The service account a pod runs as (`default` when none is named, as the API server sets it).
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Why a pod's stamps cannot be used. `Display` completes "its driver's stamps ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    #[error("are missing ({0}): it was not admitted with secret references by this webhook")]
    Missing(&'static str),
    #[error("do not verify: {0}")]
    Signature(#[from] SignatureError),
    #[error("are unreadable ({0})")]
    Unreadable(&'static str),
}

/// What a pod's verified stamps say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    pub identity: Identity,
    pub granted: BTreeSet<String>,
    /// The runtime plan (`STAMP_RUNTIME`), verified with the rest; `None` when the pod has none.
    pub runtime: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityStamp {
    user: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// `secrets.iomete.com/identity`: `{"user":"alice","groups":["data-eng"]}` (groups sorted). Only
/// the user and groups: what an executor needs to be checked as its driver's user.
pub fn identity_stamp(identity: &Identity) -> String {
    let mut groups = identity.groups.clone();
    groups.sort();
    groups.dedup();
    let stamp = IdentityStamp {
        user: identity.username.clone(),
        groups,
    };
    // Serializing two strings and a list of strings cannot fail.
    serde_json::to_string(&stamp).unwrap_or_default()
}

/// `secrets.iomete.com/granted`: the short forms of the references, sorted, de-duplicated, as a
/// JSON array (keys may hold any character, so no separator is safe), e.g.
/// `["kubernetes:finance/db_password","vault:vault-prod-finance/s3_secret"]`.
pub fn granted_stamp<'a>(granted: impl IntoIterator<Item = &'a SecretObject>) -> String {
    let set: BTreeSet<String> = granted.into_iter().map(ToString::to_string).collect();
    serde_json::to_string(&set).unwrap_or_default()
}

/// The three owned annotations for a pod admitted for `identity` with `granted` references,
/// signed with the current key.
pub fn stamp_annotations<'a>(
    identity: &Identity,
    granted: impl IntoIterator<Item = &'a SecretObject>,
    subject: &Subject<'_>,
    keys: &KeyRing,
) -> BTreeMap<String, String> {
    stamps_with_runtime(identity, granted, None, subject, keys)
}

/// [`stamp_annotations`] with a runtime plan (the value of `STAMP_RUNTIME`), signed with the rest.
pub fn stamps_with_runtime<'a>(
    identity: &Identity,
    granted: impl IntoIterator<Item = &'a SecretObject>,
    runtime: Option<&str>,
    subject: &Subject<'_>,
    keys: &KeyRing,
) -> BTreeMap<String, String> {
    let identity = identity_stamp(identity);
    let granted = granted_stamp(granted);
    let signature = format!(
        "v1.{}.{}",
        subject.name.tag(),
        keys.sign(&subject.message(&identity, &granted, runtime))
    );
    let mut stamps = BTreeMap::from([
        (STAMP_IDENTITY.to_string(), identity),
        (STAMP_GRANTED.to_string(), granted),
        (STAMP_SIGNATURE.to_string(), signature),
    ]);
    if let Some(plan) = runtime {
        stamps.insert(STAMP_RUNTIME.to_string(), plan.to_string());
    }
    stamps
}

/// Reads and verifies the stamps of a stored pod in `namespace`. The signature is checked before
/// anything else is read, so a forged stamp is never parsed.
pub fn verify(pod: &Pod, namespace: &str, keys: &KeyRing) -> Result<Stamped, StampError> {
    let annotations = pod.metadata.annotations.as_ref();
    let get = |key: &'static str| {
        annotations
            .and_then(|a| a.get(key))
            .map(String::as_str)
            .ok_or(StampError::Missing(key))
    };
    let (identity, granted, signature) = (
        get(STAMP_IDENTITY)?,
        get(STAMP_GRANTED)?,
        get(STAMP_SIGNATURE)?,
    );
    let mut parts = signature.splitn(3, '.');
    let (Some("v1"), Some(tag), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SignatureError::Malformed.into());
    };
    let meta = &pod.metadata;
    let name = match tag {
        "n" => PodName::Name(meta.name.as_deref().unwrap_or_default()),
        "g" => PodName::GenerateName(meta.generate_name.as_deref().unwrap_or_default()),
        _ => return Err(SignatureError::Malformed.into()),
    };
    let runtime = annotations
        .and_then(|a| a.get(STAMP_RUNTIME))
        .map(String::as_str);
    let subject = Subject::with_name(pod, namespace, name);
    keys.verify(mac, &subject.message(identity, granted, runtime))?;
    let identity: IdentityStamp =
        serde_json::from_str(identity).map_err(|_| StampError::Unreadable(STAMP_IDENTITY))?;
    if identity.user.is_empty() {
        return Err(StampError::Unreadable(STAMP_IDENTITY));
    }
    let granted: BTreeSet<String> =
        serde_json::from_str(granted).map_err(|_| StampError::Unreadable(STAMP_GRANTED))?;
    Ok(Stamped {
        identity: Identity::new(identity.user, identity.groups),
        granted,
        runtime: runtime.map(str::to_string),
    })
}

/// Owned annotations a client put on the incoming pod. On a pod the webhook mutates they are
/// overwritten; on any other pod the engine resets them, otherwise a forged driver stamp would
/// hand its executors grants nobody checked.
pub fn client_stamps(pod: &Pod) -> Vec<&'static str> {
    let Some(annotations) = pod.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    OWNED
        .into_iter()
        .filter(|k| annotations.contains_key(*k))
        .collect()
}

/// The owned annotations whose value differs between two versions of a pod (added, removed or
/// changed).
pub fn changed(old: &Pod, new: &Pod) -> Vec<&'static str> {
    let get = |pod: &Pod, key: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
    };
    OWNED
        .into_iter()
        .filter(|key| get(old, key) != get(new, key))
        .collect()
}

/// Whether a pod holds secrets the webhook granted (a non-empty `granted` stamp). Such a pod's
/// images are fixed and it takes no ephemeral containers: either would run new code next to them.
pub fn holds_grants(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STAMP_GRANTED))
        .is_some_and(|g| !matches!(g.trim(), "" | "[]"))
}

/// JSON Patch operations that make the pod's owned annotations exactly `stamps`: set (add or
/// replace) the given ones, remove client-supplied ones not among them. Nothing when the pod
/// already carries exactly these values, so a second pass is a no-op.
pub fn stamp_ops(pod: &Pod, stamps: &BTreeMap<String, String>) -> JsonPatch {
    let current = pod.metadata.annotations.as_ref();
    let pointer = |key| ["metadata", "annotations", key];
    let mut ops = JsonPatch::default();
    if current.is_none() && !stamps.is_empty() {
        ops.add(
            ["metadata", "annotations"],
            &BTreeMap::<String, String>::new(),
        );
    }
    for (key, value) in stamps {
        match current.and_then(|a| a.get(key)) {
            Some(existing) if existing == value => {}
            Some(_) => ops.replace(pointer(key), value),
            None => ops.add(pointer(key), value),
        }
    }
    for key in client_stamps(pod) {
        if !stamps.contains_key(key) {
            ops.remove(pointer(key));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::{Source, SourceType};

    fn fixture(name: &str) -> Pod {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pods");
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn keys() -> KeyRing {
        KeyRing::new(b"test-key-0123456789abcdef0123456789abcdef", None).unwrap()
    }

    fn finance_db() -> SecretObject {
        SecretObject {
            key: "db_password".into(),
            source: Source {
                kind: SourceType::Kubernetes,
                id: "finance".into(),
            },
        }
    }

    fn stamped_driver(keys: &KeyRing) -> Pod {
        let mut pod = fixture("spark35-driver-submit.json");
        let alice = Identity::new("alice", vec!["data-eng".into()]);
        let stamps = stamp_annotations(
            &alice,
            [&finance_db()],
            &Subject::of_new_pod(&pod, "default"),
            keys,
        );
        pod.metadata
            .annotations
            .get_or_insert_default()
            .extend(stamps);
        pod
    }

    fn set(pod: &mut Pod, key: &str, value: &str) {
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(key.into(), value.into());
    }

    #[test]
    fn stamps_are_deterministic_and_verify() {
        let keys = keys();
        let pod = stamped_driver(&keys);
        let again = stamped_driver(&keys);
        assert_eq!(pod.metadata.annotations, again.metadata.annotations);
        let a = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            a[STAMP_IDENTITY],
            r#"{"user":"alice","groups":["data-eng"]}"#
        );
        assert_eq!(a[STAMP_GRANTED], r#"["kubernetes:finance/db_password"]"#);
        assert!(a[STAMP_SIGNATURE].starts_with(&format!("v1.n.{}.", keys.current_id())));
        let got = verify(&pod, "default", &keys).unwrap();
        assert_eq!(
            got.identity,
            Identity::new("alice", vec!["data-eng".into()])
        );
        assert_eq!(
            got.granted,
            BTreeSet::from(["kubernetes:finance/db_password".to_string()])
        );
    }

    #[test]
    fn any_change_to_what_the_signature_covers_breaks_it() {
        let keys = keys();
        let pod = stamped_driver(&keys);
        let broken = |what: &str, pod: Pod, namespace: &str| {
            let e = verify(&pod, namespace, &keys).unwrap_err();
            assert_eq!(e, StampError::Signature(SignatureError::Mismatch), "{what}");
        };
        broken("namespace", pod.clone(), "other");
        let mut p = pod.clone();
        p.metadata.name = Some("other-driver".into());
        broken("name", p, "default");
        let mut p = pod.clone();
        p.metadata
            .labels
            .get_or_insert_default()
            .insert(SPARK_APP.into(), "spark-other".into());
        broken("application", p, "default");
        let mut p = pod.clone();
        p.spec.as_mut().unwrap().service_account_name = Some("admin".into());
        broken("service account", p, "default");
        let mut p = pod.clone();
        set(
            &mut p,
            STAMP_IDENTITY,
            r#"{"user":"root","groups":["data-eng"]}"#,
        );
        broken("identity", p, "default");
        let mut p = pod.clone();
        set(
            &mut p,
            STAMP_GRANTED,
            r#"["kubernetes:finance/db_password","kubernetes:hr/salary"]"#,
        );
        broken("grants", p, "default");
        // Signed by another key: unknown key id.
        let other = KeyRing::new(b"another-key-0123456789abcdef0123456789ab", None).unwrap();
        let e = verify(&stamped_driver(&other), "default", &keys).unwrap_err();
        assert!(matches!(
            e,
            StampError::Signature(SignatureError::UnknownKey(_))
        ));
        // Missing pieces (the runtime plan is optional, covered below).
        for key in OWNED[..3].iter().copied() {
            let mut p = pod.clone();
            p.metadata.annotations.as_mut().unwrap().remove(key);
            assert_eq!(
                verify(&p, "default", &keys),
                Err(StampError::Missing(key)),
                "{key}"
            );
        }
        // The runtime plan is signed: added, changed or removed, the signature breaks.
        let alice = Identity::new("alice", Vec::new());
        let subject = Subject::of_new_pod(&pod, "default");
        let with_plan = {
            let mut p = pod.clone();
            let stamps =
                stamps_with_runtime(&alice, [&finance_db()], Some("{\"c\":1}"), &subject, &keys);
            p.metadata.annotations.as_mut().unwrap().extend(stamps);
            p
        };
        let stamped = verify(&with_plan, "default", &keys).unwrap();
        assert_eq!(stamped.runtime.as_deref(), Some("{\"c\":1}"));
        let mut p = with_plan.clone();
        set(&mut p, STAMP_RUNTIME, "{\"c\":2}");
        assert!(matches!(
            verify(&p, "default", &keys),
            Err(StampError::Signature(_))
        ));
        let mut p = with_plan.clone();
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(STAMP_RUNTIME);
        assert!(matches!(
            verify(&p, "default", &keys),
            Err(StampError::Signature(_))
        ));
        let mut p = pod.clone();
        set(&mut p, STAMP_RUNTIME, "{\"c\":1}");
        assert!(matches!(
            verify(&p, "default", &keys),
            Err(StampError::Signature(_))
        ));
        let mut p = pod.clone();
        set(&mut p, STAMP_SIGNATURE, "v2.n.abc.def");
        assert_eq!(
            verify(&p, "default", &keys),
            Err(StampError::Signature(SignatureError::Malformed))
        );
    }

    #[test]
    fn generated_names_are_signed_as_such() {
        let keys = keys();
        let mut pod = fixture("spark35-driver-submit.json");
        pod.metadata.name = None;
        pod.metadata.generate_name = Some("spark-pi-".into());
        let alice = Identity::new("alice", vec![]);
        let subject = Subject::of_new_pod(&pod, "default");
        assert_eq!(subject.name, PodName::GenerateName("spark-pi-"));
        let stamps = stamp_annotations(&alice, [&finance_db()], &subject, &keys);
        assert!(stamps[STAMP_SIGNATURE].starts_with("v1.g."));
        pod.metadata
            .annotations
            .get_or_insert_default()
            .extend(stamps);
        // Stored: the API server picked a name.
        pod.metadata.name = Some("spark-pi-x7k2q".into());
        assert!(verify(&pod, "default", &keys).is_ok());
        // Claiming the stamps were signed for the name does not verify.
        let sig =
            pod.metadata.annotations.as_ref().unwrap()[STAMP_SIGNATURE].replace("v1.g.", "v1.n.");
        set(&mut pod, STAMP_SIGNATURE, &sig);
        assert!(verify(&pod, "default", &keys).is_err());
    }

    #[test]
    fn an_empty_name_or_generate_name_counts_as_absent() {
        let mut pod = fixture("spark35-driver-submit.json");
        // The API server generates a name for `name: ""`: the signature must bind generateName.
        pod.metadata.name = Some(String::new());
        pod.metadata.generate_name = Some("spark-pi-".into());
        assert_eq!(
            Subject::of_new_pod(&pod, "default").name,
            PodName::GenerateName("spark-pi-")
        );
        // Neither: no generated name to bind either.
        pod.metadata.name = None;
        pod.metadata.generate_name = Some(String::new());
        assert_eq!(Subject::of_new_pod(&pod, "default").name, PodName::Name(""));
    }

    #[test]
    fn service_account_defaults_like_the_api_server() {
        let mut pod = fixture("spark35-driver-submit.json");
        assert_eq!(service_account(&pod), "spark");
        let spec = pod.spec.as_mut().unwrap();
        // serviceAccountName wins over the deprecated serviceAccount; an empty one is absent.
        spec.service_account = Some("legacy".into());
        assert_eq!(service_account(&pod), "spark");
        let spec = pod.spec.as_mut().unwrap();
        spec.service_account_name = Some(String::new());
        assert_eq!(service_account(&pod), "legacy");
        let spec = pod.spec.as_mut().unwrap();
        spec.service_account = Some(String::new());
        assert_eq!(service_account(&pod), "default");
        let spec = pod.spec.as_mut().unwrap();
        spec.service_account_name = None;
        spec.service_account = None;
        assert_eq!(service_account(&pod), "default");
    }

    #[test]
    fn owned_annotation_changes_and_grants_are_seen() {
        let keys = keys();
        let pod = stamped_driver(&keys);
        assert!(holds_grants(&pod));
        assert!(changed(&pod, &pod).is_empty());
        let mut p = pod.clone();
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(STAMP_SIGNATURE);
        assert_eq!(changed(&pod, &p), vec![STAMP_SIGNATURE]);
        let mut p = pod.clone();
        set(&mut p, STAMP_GRANTED, "[]");
        assert!(!holds_grants(&p));
        assert_eq!(changed(&pod, &p), vec![STAMP_GRANTED]);
        let bare = fixture("spark35-driver-submit.json");
        assert!(!holds_grants(&bare));
        assert_eq!(changed(&bare, &pod), OWNED[..3].to_vec());
    }

    fn apply(pod: &Pod, ops: JsonPatch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &ops.operations().unwrap()).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn stamp_ops_replace_forged_stamps_and_are_idempotent() {
        let keys = keys();
        let alice = Identity::new("alice", Vec::new());
        let mut bare = fixture("spark35-driver-submit.json");
        bare.metadata.annotations = None;
        let stamps = stamp_annotations(
            &alice,
            [&finance_db()],
            &Subject::of_new_pod(&bare, "default"),
            &keys,
        );
        // No annotations at all: parent first.
        let stamped = apply(&bare, stamp_ops(&bare, &stamps));
        assert_eq!(stamped.metadata.annotations.as_ref(), Some(&stamps));
        assert!(stamp_ops(&stamped, &stamps).is_empty());

        // Forged values are replaced.
        let mut forged = bare.clone();
        forged.metadata.annotations = Some(BTreeMap::from([
            (STAMP_IDENTITY.to_string(), r#"{"user":"root"}"#.to_string()),
            (STAMP_SIGNATURE.to_string(), "v1.n.x.y".to_string()),
            ("keep".to_string(), "me".to_string()),
        ]));
        let fixed = apply(&forged, stamp_ops(&forged, &stamps));
        let a = fixed.metadata.annotations.unwrap();
        for (key, value) in &stamps {
            assert_eq!(&a[key], value);
        }
        assert_eq!(a["keep"], "me");

        // Without stamps to set, client-supplied ones are removed.
        let cleaned = apply(&forged, stamp_ops(&forged, &BTreeMap::new()));
        let a = cleaned.metadata.annotations.unwrap();
        assert!(!a.contains_key(STAMP_IDENTITY) && !a.contains_key(STAMP_SIGNATURE));
        assert_eq!(a["keep"], "me");
        assert!(stamp_ops(&bare, &BTreeMap::new()).is_empty());
    }
}
