//! Reference grammar: what a pod asks for, read from its annotations and legacy placeholders.

use std::fmt;

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
