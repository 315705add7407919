//! Reference grammar: what a pod asks for, read from its annotations and legacy placeholders.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use serde::{Deserialize, Serialize};

/// Which backend a secret lives in (the seed's `source.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SourceType {
    Kubernetes,
    Vault,
}

/// The seed's `source`: backend plus domain name, `global`, or Vault config id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(rename = "type")]
    pub kind: SourceType,
    pub id: String,
}

/// The seed's `secretObject`: which secret, by reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretObject {
    pub key: String,
    pub source: Source,
}

impl fmt::Display for SecretObject {
    /// The short form, `kubernetes:finance/db_password`: never a value, safe in any message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.source.kind {
            SourceType::Kubernetes => "kubernetes",
            SourceType::Vault => "vault",
        };
        write!(f, "{kind}:{}/{}", self.source.id, self.key)
    }
}

/// Annotation holding the seed's `envSecrets` items.
pub const ENV_SECRETS: &str = "secrets.iomete.com/env-secrets";
/// Annotation holding the seed's `sparkConfSecrets` items.
pub const SPARK_CONF_SECRETS: &str = "secrets.iomete.com/spark-conf-secrets";
/// Short form, one annotation per variable: `env.secrets.iomete.com/NAME: kubernetes:finance/key`.
pub const ENV_SHORT_PREFIX: &str = "env.secrets.iomete.com/";
/// Short form for Spark confs: `spark-conf.secrets.iomete.com/spark.x.y: vault:config/key`.
pub const SPARK_CONF_SHORT_PREFIX: &str = "spark-conf.secrets.iomete.com/";

/// What a reference feeds: an environment variable or a Spark conf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    Env,
    SparkConf,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Env => "env var",
            TargetKind::SparkConf => "Spark conf",
        })
    }
}

/// One parsed reference: `name` (env var or conf key) receives the value of `secret`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub kind: TargetKind,
    pub name: String,
    pub secret: SecretObject,
    /// The annotation it came from, for messages.
    pub origin: String,
}

/// A reference the webhook cannot honour. `Display` is the denial text: where, what, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {origin}: {subject}{problem}; {fix}")]
pub struct RefError {
    pub origin: String,
    /// `item 2 (DB_PASSWORD -> kubernetes:finance/db_password): ` or empty.
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

impl RefError {
    fn new(
        origin: &str,
        subject: String,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            origin: shown_origin(origin),
            subject,
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// An annotation name for a message: a short form's target is part of the name, and is shown only
/// when it is valid.
fn shown_origin(origin: &str) -> String {
    let short = [
        (ENV_SHORT_PREFIX, is_env_name as fn(&str) -> bool),
        (SPARK_CONF_SHORT_PREFIX, is_spark_conf_key),
    ];
    for (prefix, valid) in short {
        if let Some(target) = origin.strip_prefix(prefix) {
            return if valid(target) {
                origin.to_owned()
            } else {
                format!("{prefix}… (the name after '/' is {})", shape(target))
            };
        }
    }
    if origin == ENV_SECRETS || origin == SPARK_CONF_SECRETS {
        origin.to_owned()
    } else {
        shape(origin)
    }
}

/// An item of the seed's `envSecrets` / `sparkConfSecrets` arrays.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Item {
    key: String,
    secret_object: SecretObject,
}

/// References per pod the webhook accepts by default (`--max-references`); real pods carry tens.
pub const DEFAULT_MAX_REFERENCES: usize = 1000;

/// How many references the annotations name, counted without building them: the short forms, plus
/// the items of each JSON array (an annotation that is not a JSON array counts as one, and fails
/// later in [`parse_annotations`]). Linear in the annotations' size and allocation-free, so the
/// engine can refuse a pod with too many references before it parses any of them.
pub fn count_references<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> usize {
    annotations
        .into_iter()
        .map(|(name, value)| {
            if name == ENV_SECRETS || name == SPARK_CONF_SECRETS {
                json_array_len(value).unwrap_or(1)
            } else if name.starts_with(ENV_SHORT_PREFIX)
                || name.starts_with(SPARK_CONF_SHORT_PREFIX)
            {
                1
            } else {
                0
            }
        })
        .fold(0usize, usize::saturating_add)
}

/// The number of elements of a JSON array, read without keeping any of them.
fn json_array_len(text: &str) -> Option<usize> {
    struct Count;
    impl<'de> serde::de::Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0usize;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde::Deserializer::deserialize_seq(&mut de, Count).ok()
}

/// Reads every reference from a pod's annotations (JSON and short forms), validated. All problems
/// are reported, not only the first.
pub fn parse_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    global_id: &str,
) -> Result<Vec<Reference>, Vec<RefError>> {
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in annotations {
        let (kind, target) = if name == ENV_SECRETS || name == SPARK_CONF_SECRETS {
            let kind = if name == ENV_SECRETS {
                TargetKind::Env
            } else {
                TargetKind::SparkConf
            };
            parse_json_items(name, value, kind, global_id, &mut refs, &mut errors);
            continue;
        } else if let Some(target) = name.strip_prefix(ENV_SHORT_PREFIX) {
            (TargetKind::Env, target)
        } else if let Some(target) = name.strip_prefix(SPARK_CONF_SHORT_PREFIX) {
            (TargetKind::SparkConf, target)
        } else {
            continue;
        };
        match parse_short(value) {
            Ok(secret) => push_checked(
                Reference {
                    kind,
                    name: target.to_owned(),
                    secret,
                    origin: name.clone(),
                },
                None,
                global_id,
                &mut refs,
                &mut errors,
            ),
            Err(problem) => errors.push(RefError::new(
                name,
                String::new(),
                problem,
                "write it as kubernetes:<domain>/<key>, kubernetes:global/<key> or vault:<vault-config>/<key>",
            )),
        }
    }
    dedupe(&mut refs, &mut errors);
    if errors.is_empty() {
        Ok(refs)
    } else {
        Err(errors)
    }
}

/// The same target named twice: identical references collapse, different ones are an error.
fn dedupe(refs: &mut Vec<Reference>, errors: &mut Vec<RefError>) {
    refs.sort_by(|a, b| (a.kind, &a.name, &a.secret).cmp(&(b.kind, &b.name, &b.secret)));
    refs.dedup_by(|b, a| a.kind == b.kind && a.name == b.name && a.secret == b.secret);
    for pair in refs.windows(2) {
        let [a, b] = pair else { continue };
        if a.kind == b.kind && a.name == b.name {
            errors.push(RefError::new(
                &b.origin,
                format!("{} {:?}: ", b.kind, clip(&b.name)),
                format!(
                    "referenced twice, as {} (in {}) and as {}",
                    a.secret, a.origin, b.secret
                ),
                "keep one reference per name",
            ));
        }
    }
}

fn parse_json_items(
    origin: &str,
    value: &str,
    kind: TargetKind,
    global_id: &str,
    refs: &mut Vec<Reference>,
    errors: &mut Vec<RefError>,
) {
    let fix = r#"write a JSON array like [{"key":"NAME","secretObject":{"key":"secret_key","source":{"type":"KUBERNETES","id":"my-domain"}}}]"#;
    // Well-formed arrays (nearly all) are read straight into items; only a malformed one goes
    // through `Value`s below, to name each bad item.
    if let Ok(items) = serde_json::from_str::<Vec<Item>>(value) {
        for (index, item) in items.into_iter().enumerate() {
            let reference = Reference {
                kind,
                name: item.key,
                secret: item.secret_object,
                origin: origin.to_owned(),
            };
            push_checked(reference, Some(index), global_id, refs, errors);
        }
        return;
    }
    let items: Vec<serde_json::Value> = match serde_json::from_str(value) {
        Ok(items) => items,
        Err(e) => {
            errors.push(RefError::new(
                origin,
                String::new(),
                format!("not a JSON array of references ({})", json_problem(&e)),
                fix,
            ));
            return;
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        match Item::deserialize(item) {
            Ok(item) => push_checked(
                Reference {
                    kind,
                    name: item.key,
                    secret: item.secret_object,
                    origin: origin.to_owned(),
                },
                Some(index),
                global_id,
                refs,
                errors,
            ),
            Err(e) => errors.push(RefError::new(
                origin,
                format!("item {index}: "),
                json_problem(&e),
                fix,
            )),
        }
    }
}

/// `kubernetes:finance/db_password`, `vault:config/sub/path#field` (type case-insensitive).
/// Problems never quote the value: someone may have pasted a secret where a reference belongs.
fn parse_short(value: &str) -> Result<SecretObject, String> {
    let shape = "the value is not of the form <type>:<id>/<key>";
    let (kind, rest) = value.trim().split_once(':').ok_or(shape)?;
    let kind = match kind.to_ascii_lowercase().as_str() {
        "kubernetes" => SourceType::Kubernetes,
        "vault" => SourceType::Vault,
        _ => return Err("the source type is not \"kubernetes\" or \"vault\"".into()),
    };
    let (id, key) = rest.split_once('/').ok_or(shape)?;
    Ok(SecretObject {
        key: key.to_owned(),
        source: Source {
            kind,
            id: id.to_owned(),
        },
    })
}

/// Validates one reference and keeps it, or records why not.
fn push_checked(
    reference: Reference,
    item: Option<usize>,
    global_id: &str,
    refs: &mut Vec<Reference>,
    errors: &mut Vec<RefError>,
) {
    match validate(&reference, global_id) {
        Ok(()) => refs.push(reference),
        Err((problem, fix)) => {
            // Formatted only for a bad reference: this runs for every reference of every pod.
            let item = item.map(|i| format!("item {i}: ")).unwrap_or_default();
            let valid_name = match reference.kind {
                TargetKind::Env => is_env_name(&reference.name),
                TargetKind::SparkConf => is_spark_conf_key(&reference.name),
            };
            let name = if valid_name {
                format!("{:?}", reference.name)
            } else {
                format!("name ({})", shape(&reference.name))
            };
            let subject = format!("{item}{} {name}: ", reference.kind);
            errors.push(RefError::new(&reference.origin, subject, problem, fix))
        }
    }
}

type Problem = (String, &'static str);

/// The first problem of a reference. Nothing that fails a check is quoted: it is described by its
/// shape (`shape`), since someone may have pasted a secret where a name belongs.
fn validate(r: &Reference, global_id: &str) -> Result<(), Problem> {
    match r.kind {
        TargetKind::Env if !is_env_name(&r.name) => {
            return Err((
                "is not a valid environment variable name".into(),
                "use letters, digits, '_', '-' or '.', not starting with a digit",
            ));
        }
        TargetKind::SparkConf if !is_spark_conf_key(&r.name) => {
            return Err((
                "is not a Spark conf key".into(),
                "Spark only reads keys that start with \"spark.\" and use letters, digits, '.', '_' or '-'",
            ));
        }
        _ => {}
    }
    let s = &r.secret;
    let id = &s.source.id;
    if id.is_empty() {
        return Err((
            "source.id is empty".into(),
            "name a domain, \"global\" or a Vault config",
        ));
    }
    if !is_dns_label(id) {
        return Err((
            format!("source.id ({}) is not a valid name", shape(id)),
            "domains and Vault configs are lowercase letters, digits and '-' (at most 63)",
        ));
    }
    let kind = match s.source.kind {
        SourceType::Kubernetes => "kubernetes",
        SourceType::Vault => "vault",
    };
    if s.key.is_empty() {
        return Err((
            format!("{kind}:{id}/: the key is empty"),
            "name the secret's key",
        ));
    }
    let bad_key = |what: &str| {
        format!(
            "{kind}:{id}/…: the key ({}) is not a valid {what}",
            shape(&s.key)
        )
    };
    match s.source.kind {
        SourceType::Kubernetes if !is_secret_data_key(&s.key) => Err((
            bad_key("Kubernetes secret key"),
            "Kubernetes store keys use letters, digits, '.', '_' or '-'",
        )),
        SourceType::Vault if !is_vault_key(&s.key) => Err((
            bad_key("Vault key"),
            "write <field> or <sub/path>#<field>, without '.' or '..' path segments",
        )),
        SourceType::Vault if id == global_id => Err((
            format!("{s}: the global store is a Kubernetes source"),
            "use kubernetes:global/<key>, or name a Vault config",
        )),
        _ => Ok(()),
    }
}

/// A name from a pod spec, when it has the form of a Kubernetes name or env var (letters, digits,
/// '.', '_', '-'; at most 253). At mutating admission the API server has not validated the pod
/// yet, so a name may hold anything, a pasted secret included.
pub fn plain_name(name: &str) -> Option<&str> {
    let plain = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    plain.then_some(name)
}

/// A name from a pod spec for a message: quoted when plain ([`plain_name`]), else its shape.
pub fn shown_name(name: &str) -> String {
    match plain_name(name) {
        Some(name) => format!("{name:?}"),
        None => format!("({})", shape(name)),
    }
}

/// What a string that failed validation looks like, without its content: its length and the
/// kinds of character in it. Used in every denial and log line about such a string.
pub fn shape(s: &str) -> String {
    if s.is_empty() {
        return "an empty value".into();
    }
    let count = s.chars().count();
    let kinds: Vec<&str> = [
        ("letters", s.chars().any(|c| c.is_ascii_alphabetic())),
        ("digits", s.chars().any(|c| c.is_ascii_digit())),
        ("whitespace", s.chars().any(char::is_whitespace)),
        ("punctuation", s.chars().any(|c| c.is_ascii_punctuation())),
        ("control characters", s.chars().any(char::is_control)),
        (
            "other characters",
            s.chars()
                .any(|c| !c.is_ascii() && !c.is_whitespace() && !c.is_control()),
        ),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    let plural = if count == 1 { "" } else { "s" };
    format!("a value of {count} character{plural}: {}", kinds.join(", "))
}

/// Env names as Kubernetes validates them (C identifiers plus '-' and '.').
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '-' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && name.len() <= 256
}

fn is_spark_conf_key(key: &str) -> bool {
    key.len() > "spark.".len()
        && key.len() <= 256
        && key.starts_with("spark.")
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_dns_label(id: &str) -> bool {
    id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Secret data keys: `[-._a-zA-Z0-9]+`, not `.` or `..`.
pub fn is_secret_data_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `field` or `sub/path#field`: printable, no whitespace, no `.`/`..` or empty path segments.
fn is_vault_key(key: &str) -> bool {
    let (path, field) = match key.rsplit_once('#') {
        Some((path, field)) => (Some(path), field),
        None => (None, key),
    };
    let clean = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '#' | '?' | '%' | '\\'))
    };
    key.len() <= 512
        && clean(field)
        && !field.contains('/')
        && path.is_none_or(|p| {
            p.split('/')
                .all(|seg| clean(seg) && seg != "." && seg != "..")
        })
}

/// At most 64 characters of user input in a message, so a huge annotation cannot flood a denial.
fn clip(s: &str) -> &str {
    clip_to(s, 64)
}

fn clip_to(s: &str, chars: usize) -> &str {
    match s.char_indices().nth(chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// serde's description of a JSON problem, bounded, without the strings it would quote
/// (`invalid type: string "hunter2"`, ``unknown field `hunter2` ``): someone may have pasted a
/// secret into the annotation.
fn json_problem(e: &serde_json::Error) -> String {
    static QUOTED: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r#"string "(?:[^"\\]|\\.)*""#).unwrap_or_else(|_| unreachable!())
    });
    static UNKNOWN: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"unknown (field|variant) `[^`]*`").unwrap_or_else(|_| unreachable!())
    });
    let text = e.to_string();
    let text = QUOTED.replace_all(&text, "a string");
    let text = UNKNOWN.replace_all(&text, "an unknown $1");
    clip_to(&text, 200).to_owned()
}

/// Start of a legacy placeholder, `${secrets.<key>}`, resolved from the global store.
const PLACEHOLDER_OPEN: &str = "${secrets.";

/// A part of a string that may hold legacy placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Why a legacy placeholder cannot be honoured (the caller says where it was found).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceholderError {
    #[error("a ${{secrets.…}} placeholder has no closing '}}'")]
    Unterminated,
    #[error(
        "a ${{secrets.…}} placeholder does not name a valid secret key ({0}); keys use letters, digits, '.', '_' or '-'"
    )]
    BadKey(String),
}

/// True when `s` may hold a placeholder: the cheap test before [`split_placeholders`].
pub fn has_placeholder(s: &str) -> bool {
    s.contains(PLACEHOLDER_OPEN)
}

/// Splits `s` into text and placeholders. `$$` is the kubelet's escape for a literal `$`, so
/// `$${secrets.x}` stays text, as the kubelet would render it.
pub fn split_placeholders(s: &str) -> Result<Vec<Piece<'_>>, PlaceholderError> {
    let mut pieces = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
        } else if bytes.get(i + 1) == Some(&b'$') {
            i += 2;
        } else if s[i..].starts_with(PLACEHOLDER_OPEN) {
            let key_start = i + PLACEHOLDER_OPEN.len();
            let key_len = s[key_start..]
                .find('}')
                .ok_or(PlaceholderError::Unterminated)?;
            let key = &s[key_start..key_start + key_len];
            if !is_secret_data_key(key) {
                return Err(PlaceholderError::BadKey(shape(key)));
            }
            if text_start < i {
                pieces.push(Piece::Text(&s[text_start..i]));
            }
            pieces.push(Piece::Placeholder(key));
            i = key_start + key_len + 1;
            text_start = i;
        } else {
            i += 1;
        }
    }
    if text_start < s.len() {
        pieces.push(Piece::Text(&s[text_start..]));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests;
