//! Names of the Secrets the webhook reads, writes and guards, and the data-plane namespace.

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
