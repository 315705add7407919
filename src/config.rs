//! Plain configuration types. The CLI (`cli.rs`) fills them from flags and environment; tests build
//! them directly. `LocalConfig` is the YAML file that stands in for the cluster objects when the
//! webhook runs without a cluster (`serve --dev`, `review`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Names and selectors that decide which stores, pods and annotations the webhook deals with.
/// Defaults are the product's (see `docs/decisions.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    /// Data-plane namespace that holds the Kubernetes secret stores.
    pub namespace: String,
    /// Global store name (`iomete-secret-store`); domain stores are `{global}-{domain}`.
    pub global_store: String,
    /// The reserved `source.id` that names the global store.
    pub global_id: String,
    /// Prefix of the webhook-managed Secrets holding materialized Vault values.
    pub vault_secret_prefix: String,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            namespace: "iomete-system".into(),
            global_store: "iomete-secret-store".into(),
            global_id: "global".into(),
            vault_secret_prefix: "iomete-vault-".into(),
        }
    }
}

impl Naming {
    /// The Kubernetes Secret that holds a domain's (or, for the global id, the global) secrets.
    pub fn store_for(&self, id: &str) -> String {
        if id == self.global_id {
            self.global_store.clone()
        } else {
            format!("{}-{id}", self.global_store)
        }
    }

    /// The webhook-managed Secret that receives materialized values of one Vault config.
    pub fn vault_secret_for(&self, config: &str) -> String {
        format!("{}{config}", self.vault_secret_prefix)
    }

    /// True for any Secret name the webhook manages or guards (stores and Vault materializations).
    pub fn is_managed_secret(&self, name: &str) -> bool {
        name.starts_with(&self.global_store) || name.starts_with(&self.vault_secret_prefix)
    }
}

/// Label selectors that classify Jupyter pods (DESIGN §4); each entry is `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    pub jupyter: Vec<(String, String)>,
}

impl Default for Selectors {
    fn default() -> Self {
        Self {
            jupyter: vec![
                ("component".into(), "singleuser-server".into()),
                ("component".into(), "kernel".into()),
                ("secrets.iomete.com/workload".into(), "jupyter".into()),
            ],
        }
    }
}

/// Everything the admission engine needs to decide, independent of where it runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub naming: Naming,
    pub selectors: Selectors,
    /// Time the engine gives itself when the API server sends no `?timeout=`.
    pub default_budget: Duration,
    /// Master switch (the product's `features.secretsV2.enabled`): off = admit untouched, guard only.
    pub enabled: bool,
    /// Who decides `Use` in a cluster: ResourceBundles (RAS) or Kubernetes RBAC.
    pub authorizer: crate::authz::AuthorizerKind,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            naming: Naming::default(),
            selectors: Selectors::default(),
            default_budget: Duration::from_secs(4),
            enabled: true,
            authorizer: crate::authz::AuthorizerKind::Ras,
        }
    }
}

/// The local config file (YAML). Key names only, never values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub stores: LocalStores,
    #[serde(default)]
    pub vault_configs: Vec<crate::backends::vault::VaultConfigSpec>,
    #[serde(default)]
    pub resource_bundles: Vec<crate::authz::ras::LocalResourceBundle>,
    #[serde(default)]
    pub trusted_controllers: Vec<crate::admission::identity::TrustedController>,
    /// Management API, `--dev` only: static bearer tokens (refused in a cluster).
    #[serde(default)]
    pub api_tokens: Vec<crate::api::ApiToken>,
    /// Management API: who may create and delete Vault configs.
    #[serde(default)]
    pub api_admins: Vec<crate::authz::ras::Subject>,
    /// Management API: backends trusted to name the user they act for (`X-Remote-User`).
    #[serde(default)]
    pub console_backends: Vec<crate::api::ConsoleBackend>,
}

/// Key names of the Kubernetes stores, standing in for the Secrets themselves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStores {
    #[serde(default)]
    pub global: Vec<String>,
    #[serde(default)]
    pub domains: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

impl LocalConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}
