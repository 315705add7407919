//! What `secrets-webhook exec` and the broker say to each other (`POST /v1/values`, JSON), in one
//! place for both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::runtime::ConfsVia;

/// The broker's path.
pub const PATH: &str = "/v1/values";

/// Largest request body the broker reads.
pub const MAX_REQUEST: usize = 4 * 1024;

/// The request; the pod's token goes in `Authorization: Bearer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FetchRequest {
    /// The container the caller runs in: its values, and nothing else, are returned.
    pub container: String,
    /// The pod uid the caller believes it runs in (downward API); a token bound to another pod
    /// is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// The answer: exactly the container's granted values. Its `Debug` shows names only.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FetchResponse {
    /// Env var name → value.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Spark conf key → value.
    #[serde(default)]
    pub spark_confs: BTreeMap<String, String>,
    /// How the Spark confs reach Spark (when there are any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confs_via: Option<ConfsVia>,
    /// Where the container's args start in the wrapper's argv after `--`.
    #[serde(default)]
    pub args_at: usize,
}

impl std::fmt::Debug for FetchResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchResponse")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("spark_confs", &self.spark_confs.keys().collect::<Vec<_>>())
            .field("confs_via", &self.confs_via)
            .field("args_at", &self.args_at)
            .finish()
    }
}

/// An error answer: a short slug, the text (never a value), and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    pub retry: bool,
}
