//! Key grammar of Vault references and the mapping to data keys of the managed Secret.
//!
//! A key names a field of the secret at the config's path (`db_password`), or, with `#`, a field
//! of a secret below it (`sub/path#field`).

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::spec::check_segments;

/// Where a wanted value is: the secret (relative to the config's path) and its field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaultKey {
    /// Relative secret path, `""` for the secret at the config's path itself.
    pub path: String,
    pub field: String,
}

impl VaultKey {
    pub fn parse(key: &str) -> Result<Self, String> {
        let (path, field) = match key.split_once('#') {
            Some((path, field)) => {
                if path.is_empty() {
                    return Err("nothing before #; write sub/path#field".into());
                }
                check_segments(path)?;
                (path.to_string(), field.to_string())
            }
            None if key.contains('/') => {
                return Err("a key with a path must name a field: sub/path#field".into());
            }
            None => (String::new(), key.to_string()),
        };
        if field.is_empty() {
            return Err("the field name is empty".into());
        }
        if field.chars().any(char::is_control) {
            return Err("the field name has control characters".into());
        }
        Ok(Self { path, field })
    }
}

/// Longest data key we produce (Kubernetes allows 253).
const MAX_DATA_KEY: usize = 200;

/// The data key of the managed Secret for a Vault key. Keys that are already valid
/// (`[-._a-zA-Z0-9]+`) stay as they are; any other is sanitized and gets a short hash of the
/// original, so the mapping is deterministic and distinct keys stay distinct.
pub fn data_key(key: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let valid = !key.is_empty()
        && key.len() <= MAX_DATA_KEY
        && key.chars().all(allowed)
        && !key.starts_with("..")
        && key != ".";
    if valid {
        return key.to_string();
    }
    let mut sanitized: String = key
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .take(MAX_DATA_KEY - 11)
        .collect();
    if sanitized.starts_with('.') {
        sanitized.replace_range(..1, "_");
    }
    let digest = Sha256::digest(key.as_bytes());
    sanitized.push('-');
    for b in &digest[..5] {
        let _ = write!(sanitized, "{b:02x}");
    }
    sanitized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_fields_and_sub_paths() {
        assert_eq!(
            VaultKey::parse("db_password").unwrap(),
            VaultKey {
                path: String::new(),
                field: "db_password".into()
            }
        );
        assert_eq!(
            VaultKey::parse("team/db#pass#word").unwrap(),
            VaultKey {
                path: "team/db".into(),
                field: "pass#word".into()
            }
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        for key in [
            "", "a/b", "#f", "a#", "a//b#f", "../x#f", "a/./b#f", "a b#f", "x#\u{7}",
        ] {
            assert!(VaultKey::parse(key).is_err(), "{key:?}");
        }
    }

    #[test]
    fn data_keys_are_valid_deterministic_and_distinct() {
        let re = regex::Regex::new(r"^[-._a-zA-Z0-9]+$").unwrap();
        assert_eq!(data_key("db_password"), "db_password");
        let a = data_key("sub/path#field");
        let b = data_key("sub_path_field");
        let c = data_key("sub/path/field");
        assert_eq!(a, data_key("sub/path#field"));
        assert!(a.starts_with("sub_path_field-"), "{a}");
        assert_ne!(a, b);
        assert_ne!(a, c);
        for key in [
            a,
            c,
            data_key(".."),
            data_key("."),
            data_key(&"x/".repeat(300)),
        ] {
            assert!(
                re.is_match(&key) && !key.starts_with("..") && key.len() <= 253,
                "{key}"
            );
        }
    }
}
