//! Store index served from the local config file (`stores:`), for running without a cluster.

use std::collections::{BTreeMap, BTreeSet};

use super::{StoreCheck, StoreIndex};
use serde::{Deserialize, Serialize};

use super::Naming;

/// Key names of the Kubernetes stores as the config file writes them (`stores:`), standing in
/// for the Secrets themselves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresConfig {
    #[serde(default)]
    pub global: Vec<String>,
    #[serde(default)]
    pub domains: BTreeMap<String, Vec<String>>,
}

/// Store name -> key names, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct LocalStores {
    stores: BTreeMap<String, BTreeSet<String>>,
}

impl LocalStores {
    pub fn new(config: &StoresConfig, naming: &Naming) -> Self {
        let mut stores = BTreeMap::new();
        stores.insert(
            naming.global_store.clone(),
            config.global.iter().cloned().collect(),
        );
        for (domain, keys) in &config.domains {
            stores.insert(naming.store_for(domain), keys.iter().cloned().collect());
        }
        Self { stores }
    }
}

impl StoreIndex for LocalStores {
    fn ready(&self) -> bool {
        true
    }

    fn check(&self, store: &str, key: &str) -> StoreCheck {
        match self.stores.get(store) {
            None => StoreCheck::MissingStore,
            Some(keys) if keys.contains(key) => StoreCheck::Present,
            Some(_) => StoreCheck::MissingKey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_files_stores_answer_like_the_secrets_would() {
        let config: StoresConfig = serde_json::from_value(serde_json::json!({
            "global": ["shared_token"],
            "domains": {"finance": ["db_password", "api_key"], "empty": []}
        }))
        .unwrap();
        let naming = Naming::default();
        let stores = LocalStores::new(&config, &naming);
        assert!(stores.ready(), "fixed at start: ready at once");
        let global = naming.global_store.as_str();
        let finance = naming.store_for("finance");
        for (store, key, expected) in [
            (global, "shared_token", StoreCheck::Present),
            (global, "db_password", StoreCheck::MissingKey),
            (finance.as_str(), "db_password", StoreCheck::Present),
            (finance.as_str(), "api_key", StoreCheck::Present),
            (finance.as_str(), "shared_token", StoreCheck::MissingKey),
            ("iomete-secret-store-empty", "x", StoreCheck::MissingKey),
            (
                "iomete-secret-store-marketing",
                "db_password",
                StoreCheck::MissingStore,
            ),
        ] {
            assert_eq!(stores.check(store, key), expected, "{store}/{key}");
        }
    }
}
