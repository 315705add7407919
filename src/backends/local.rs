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
