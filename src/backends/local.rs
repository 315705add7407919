//! Store index served from the local config file (`stores:`), for running without a cluster.

use std::collections::{BTreeMap, BTreeSet};

use super::{StoreCheck, StoreIndex};
use crate::config::{LocalConfig, Naming};

/// Store name -> key names, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct LocalStores {
    stores: BTreeMap<String, BTreeSet<String>>,
}

impl LocalStores {
    pub fn new(config: &LocalConfig, naming: &Naming) -> Self {
        let mut stores = BTreeMap::new();
        stores.insert(
            naming.global_store.clone(),
            config.stores.global.iter().cloned().collect(),
        );
        for (domain, keys) in &config.stores.domains {
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
