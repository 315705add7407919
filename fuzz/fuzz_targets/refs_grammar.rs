//! The reference grammar on arbitrary annotation maps and strings.
//! - `parse_annotations` never panics; every accepted reference re-parses from its short form to
//!   itself; no two accepted references feed the same target; every error message is bounded and
//!   never quotes a value the short-form parser rejected.
//! - `split_placeholders`: the pieces re-joined give the input back, placeholder keys are valid.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use secrets_webhook::refs::{
    ENV_SECRETS, ENV_SHORT_PREFIX, Piece, SPARK_CONF_SECRETS, SPARK_CONF_SHORT_PREFIX, TargetKind,
    has_placeholder, is_secret_data_key, parse_annotations, split_placeholders,
};

/// Longest denial line the grammar may produce, whatever the input size.
const ERROR_MAX: usize = 2048;
const GLOBAL_ID: &str = "global";

#[derive(Arbitrary, Debug)]
enum Key {
    EnvJson,
    ConfJson,
    EnvShort(String),
    ConfShort(String),
    /// A conf key that passes the name check, so the value is what gets exercised.
    ConfShortSpark(String),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Kubernetes,
    Vault,
    Other(String),
}

impl Kind {
    fn text(&self, upper: bool) -> String {
        let s = match self {
            Kind::Kubernetes => "kubernetes",
            Kind::Vault => "vault",
            Kind::Other(s) => s,
        };
        if upper {
            s.to_uppercase()
        } else {
            s.to_owned()
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Id {
    Global,
    Finance,
    Any(String),
}

impl Id {
    fn text(&self) -> &str {
        match self {
            Id::Global => GLOBAL_ID,
            Id::Finance => "finance",
            Id::Any(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Item {
    name: String,
    key: String,
    kind: Kind,
    id: Id,
    extra_field: bool,
    /// The key repeated this many more times (long keys from short inputs).
    times: u8,
}

#[derive(Arbitrary, Debug)]
enum Val {
    Raw(String),
    Short {
        kind: Kind,
        id: Id,
        key: String,
        pad: bool,
    },
    /// A key made long cheaply: `key` repeated `times` times.
    Long {
        kind: Kind,
        id: Id,
        key: String,
        times: u8,
    },
    Items(Vec<Item>),
    /// A JSON array whose items are arbitrary JSON text.
    RawItems(Vec<String>),
}

impl Val {
    fn text(&self) -> String {
        match self {
            Val::Raw(s) => s.clone(),
            Val::Short { kind, id, key, pad } => {
                let s = format!("{}:{}/{key}", kind.text(false), id.text());
                if *pad { format!("  {s}\n") } else { s }
            }
            Val::Long {
                kind,
                id,
                key,
                times,
            } => format!("{}:{}/{}", kind.text(false), id.text(), long(key, *times)),
            Val::Items(items) => {
                let items: Vec<serde_json::Value> = items
                    .iter()
                    .map(|i| {
                        let mut v = serde_json::json!({
                            "key": i.name,
                            "secretObject": {"key": long(&i.key, i.times), "source": {"type": i.kind.text(true), "id": i.id.text()}}
                        });
                        if i.extra_field {
                            v["secretObject"]["value"] = serde_json::json!(i.key);
                        }
                        v
                    })
                    .collect();
                serde_json::Value::Array(items).to_string()
            }
            Val::RawItems(items) => format!("[{}]", items.join(",")),
        }
    }
}

/// `s` repeated, at most about 4 KiB: long enough to break any message bound, cheap to run.
fn long(s: &str, times: u8) -> String {
    let mut out = s.repeat(usize::from(times % 64));
    out.truncate(out.floor_char_boundary(4096));
    out
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(Key, Val)>,
    text: String,
}

fn key_text(key: &Key) -> String {
    match key {
        Key::EnvJson => ENV_SECRETS.to_owned(),
        Key::ConfJson => SPARK_CONF_SECRETS.to_owned(),
        Key::EnvShort(s) => format!("{ENV_SHORT_PREFIX}{s}"),
        Key::ConfShort(s) => format!("{SPARK_CONF_SHORT_PREFIX}{s}"),
        Key::ConfShortSpark(s) => {
            let tail: String = s
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .collect();
            format!("{SPARK_CONF_SHORT_PREFIX}spark.x{tail}")
        }
        Key::Other(s) => s.clone(),
    }
}

fuzz_target!(|input: Input| {
    let annotations: BTreeMap<String, String> = input
        .annotations
        .iter()
        .map(|(k, v)| (key_text(k), v.text()))
        .collect();
    check_annotations(&annotations);
    check_split(&input.text);
});

fn check_annotations(annotations: &BTreeMap<String, String>) {
    match parse_annotations(annotations, GLOBAL_ID) {
        Ok(refs) => {
            for pair in refs.windows(2) {
                assert!(
                    !(pair[0].kind == pair[1].kind && pair[0].name == pair[1].name),
                    "two references feed {:?}",
                    pair[0].name
                );
            }
            for r in &refs {
                let prefix = match r.kind {
                    TargetKind::Env => ENV_SHORT_PREFIX,
                    TargetKind::SparkConf => SPARK_CONF_SHORT_PREFIX,
                };
                let key = format!("{prefix}{}", r.name);
                let short = BTreeMap::from([(key.clone(), r.secret.to_string())]);
                let again = parse_annotations(&short, GLOBAL_ID).unwrap_or_else(|e| {
                    panic!("{r:?} does not re-parse from its short form: {e:?}")
                });
                assert_eq!(again.len(), 1);
                assert_eq!(again[0].secret, r.secret, "short form round trip");
                assert_eq!((again[0].kind, &again[0].name), (r.kind, &r.name));
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                let text = e.to_string();
                assert!(
                    text.len() <= ERROR_MAX,
                    "error of {} bytes: {}",
                    text.len(),
                    &text[..text.floor_char_boundary(300)]
                );
                let Some(value) = annotations.get(&e.origin) else {
                    // The origin is clipped; a clipped origin names no annotation exactly.
                    continue;
                };
                let short_form = e.origin.starts_with(ENV_SHORT_PREFIX)
                    || e.origin.starts_with(SPARK_CONF_SHORT_PREFIX);
                let rejected_shape = text.contains("is not of the form")
                    || text.contains("is not \"kubernetes\" or \"vault\"");
                let trimmed = value.trim();
                // The wording has no digits and no non-ASCII: a value with one of those inside
                // the problem text can only have been quoted back.
                let marked = trimmed.chars().any(|c| c.is_ascii_digit() || !c.is_ascii());
                if short_form && rejected_shape && marked {
                    // Someone may have pasted a secret where a reference belongs.
                    let said = format!("{}{}", e.subject, e.problem);
                    assert!(
                        !said.contains(trimmed),
                        "a rejected value is quoted back: {text}"
                    );
                }
            }
        }
    }
}

fn check_split(s: &str) {
    let Ok(pieces) = split_placeholders(s) else {
        return;
    };
    let mut joined = String::with_capacity(s.len());
    for piece in &pieces {
        match piece {
            Piece::Text(t) => {
                assert!(!t.is_empty(), "empty text piece");
                joined.push_str(t);
            }
            Piece::Placeholder(key) => {
                assert!(is_secret_data_key(key), "placeholder key {key:?}");
                joined.push_str("${secrets.");
                joined.push_str(key);
                joined.push('}');
            }
        }
    }
    assert_eq!(joined, s, "pieces re-join to the input");
    if !has_placeholder(s) {
        assert!(
            pieces.iter().all(|p| matches!(p, Piece::Text(_))),
            "a placeholder where has_placeholder saw none"
        );
    }
}
