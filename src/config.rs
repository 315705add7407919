//! The configuration, gathered. Each setting type lives with the module that owns it (re-exported
//! here); this module holds only the local config file (`LocalConfig`, YAML), which stands in for
//! the cluster objects when the webhook runs without a cluster (`serve --dev`, `review`), and the
//! engine built from it. The engine's modules do not depend on this one (the management API,
//! which assembles itself from the config file, does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::admission::{BuildError, Webhook};
use crate::authz::cache::CacheSettings;
use crate::backends::VaultSource;
use crate::backends::local::LocalStores;
use crate::backends::vault::{VaultBackend, VaultOptions};
use crate::identity::{Keys, StaticOwner, TrustedControllers};
use crate::metrics::Metrics;

pub use crate::admission::Settings;
pub use crate::backends::Naming;
pub use crate::backends::local::StoresConfig;
pub use crate::identity::ExecutorPolicy;
pub use crate::identity::keys::SigningKeysConfig;
pub use crate::workload::Selectors;

/// The local config file (YAML). Key names only, never values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub stores: StoresConfig,
    #[serde(default)]
    pub vault_configs: Vec<crate::backends::vault::VaultConfigSpec>,
    #[serde(default)]
    pub resource_bundles: Vec<crate::authz::ras::LocalResourceBundle>,
    #[serde(default)]
    pub trusted_controllers: Vec<crate::identity::TrustedController>,
    /// Stamp signing keys for `serve --dev` and `review` (a cluster reads them from a Secret);
    /// without them a key is generated for the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_keys: Option<SigningKeysConfig>,
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

    /// The config file's namespace, when it names one, is the data-plane namespace.
    fn settings(&self, mut settings: Settings) -> Settings {
        if let Some(ns) = &self.namespace {
            settings.naming.namespace = ns.clone();
        }
        settings
    }
}

impl Webhook {
    /// The embedded default: stores, Vault configs, bundles, trusted controllers and signing keys
    /// from the local config file, no cluster.
    pub fn from_local(
        settings: Settings,
        config: &LocalConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let vault = local_vault(&settings, config, Arc::clone(&metrics))?;
        Self::from_local_parts(settings, config, metrics, vault)
    }

    /// [`Webhook::from_local`] with the Vault backend built by the caller (`review` keeps it to
    /// print the Secret writes a cluster would see).
    pub fn from_local_parts(
        settings: Settings,
        config: &LocalConfig,
        metrics: Arc<Metrics>,
        vault: Option<Arc<VaultBackend>>,
    ) -> Result<Self, BuildError> {
        let settings = config.settings(settings);
        let stores = Arc::new(LocalStores::new(&config.stores, &settings.naming));
        let trusted = TrustedControllers::new(config.trusted_controllers.clone())
            .map_err(|e| BuildError::Config(e.to_string()))?;
        let keys = Keys::local(config.signing_keys.as_ref())
            .map_err(|e| BuildError::Config(format!("signingKeys: {e}")))?;
        Ok(Self {
            settings,
            stores,
            vault: vault.map(|v| v as Arc<dyn VaultSource>),
            authz: crate::authz::local(
                &config.resource_bundles,
                CacheSettings::default(),
                Arc::clone(&metrics),
            ),
            trusted,
            // No cluster: executors need `review --owner DRIVER.json` (see review.rs).
            owners: Arc::new(StaticOwner::default()),
            keys,
            metrics,
        })
    }
}

/// The config file's Vault configs, if any; their cache lookups and Vault calls count in `metrics`.
pub fn local_vault(
    settings: &Settings,
    config: &LocalConfig,
    metrics: Arc<Metrics>,
) -> Result<Option<Arc<VaultBackend>>, BuildError> {
    if config.vault_configs.is_empty() {
        return Ok(None);
    }
    VaultBackend::from_local(
        &config.vault_configs,
        config.settings(settings.clone()).naming,
        VaultOptions {
            metrics: Some(metrics),
            ..VaultOptions::default()
        },
    )
    .map(Some)
    .map_err(|e| BuildError::Config(e.to_string()))
}
