//! Vault configs (the product's "Vault Integrations") as the management API reads and writes them.
//!
//! [`ConfigSpec`] is the API's view: everything but the credential, which goes in once and never
//! comes back. In a cluster ([`KubeVaultConfigs`]) a config is a `VaultConfig` object and its
//! credential an immutable Secret `iomete-vault-credentials.<config>.<random>` (one per
//! credential version, owned by the config, under the guarded prefix); in `--dev`
//! ([`MemoryVaultConfigs`]) both live in memory and each change is handed to the shared
//! [`VaultBackend`], so the engine and the selector use it at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::stores::WriteError;
use crate::backends::vault::spec::{
    Auth, ClusterAppRole, ClusterAuth, ClusterToken, Credential, DEFAULT_APPROLE_MOUNT,
    SecretKeyRef, Target,
};
use crate::backends::vault::{
    CONFIG_LABEL, Delivery, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SecretValue, VaultBackend,
    VaultConfig, VaultConfigResourceSpec, VaultConfigSpec, VaultError, credentials_secret_prefix,
};
use crate::config::Naming;

/// How the webhook logs in to Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthMethod {
    AppRole,
    Token,
}

/// Authentication as the API shows it: never the secret ID or the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    pub method: AuthMethod,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

/// A Vault config without its credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSpec {
    pub resource_bundle: String,
    pub host: String,
    pub path: String,
    pub namespace: Option<String>,
    pub ca_cert: Option<String>,
    pub auth: AuthSpec,
    /// How values reach pods (runtime or materialize); only platform admins change it.
    pub delivery: Delivery,
}

impl ConfigSpec {
    /// True when a stored credential may not follow this change: it would be sent to another
    /// server, or trusted through another CA, or used for another login.
    pub fn needs_new_credential(&self, before: &ConfigSpec) -> bool {
        self.host != before.host
            || self.ca_cert != before.ca_cert
            || self.namespace != before.namespace
            || self.auth != before.auth
    }
}

/// The last Test Connection the webhook recorded (the VaultConfig's `Ready` condition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyView {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

/// A saved config: spec, version (the ETag), recorded status, and where its credential is.
#[derive(Debug, Clone)]
pub struct StoredConfig {
    pub name: String,
    pub spec: ConfigSpec,
    pub version: String,
    pub ready: Option<ReadyView>,
    pub credential: Credential,
}

/// The checked target for Test Connection or the `--dev` backend.
pub fn target(name: &str, spec: &ConfigSpec, credential: Credential) -> Result<Target, VaultError> {
    let auth = match spec.auth.method {
        AuthMethod::Token => Auth::Token(credential),
        AuthMethod::AppRole => Auth::AppRole {
            mount: spec
                .auth
                .mount
                .clone()
                .unwrap_or_else(|| DEFAULT_APPROLE_MOUNT.to_string()),
            role_id: spec.auth.role_id.clone().unwrap_or_default(),
            secret_id: credential,
        },
    };
    Target::build(
        name,
        &spec.resource_bundle,
        &spec.host,
        &spec.path,
        spec.namespace.as_deref(),
        spec.ca_cert.as_ref().map(|c| c.as_bytes().to_vec()),
        auth,
    )
}

#[async_trait]
pub trait VaultConfigStore: Send + Sync {
    async fn list(&self) -> Result<Vec<StoredConfig>, WriteError>;
    async fn get(&self, name: &str) -> Result<Option<StoredConfig>, WriteError>;
    /// Creates the config; [`WriteError::Exists`] if the name is taken.
    async fn create(
        &self,
        name: &str,
        spec: &ConfigSpec,
        credential: &SecretValue,
    ) -> Result<StoredConfig, WriteError>;
    /// Replaces the spec if `current` is still current; a credential replaces the stored one.
    async fn update(
        &self,
        current: &StoredConfig,
        spec: &ConfigSpec,
        credential: Option<&SecretValue>,
    ) -> Result<StoredConfig, WriteError>;
    /// Deletes the config and its credential if `current` is still current.
    async fn delete(&self, current: &StoredConfig) -> Result<(), WriteError>;
    /// A client through which Test Connection reads credentials kept in Secrets.
    fn kube(&self) -> Option<kube::Client>;
}

// ---- in memory (`--dev`) ----------------------------------------------------------------------

struct MemoryConfig {
    version: u64,
    spec: ConfigSpec,
    credential: Credential,
}

/// `--dev`: configs in memory, seeded from the config file; every change goes to the backend.
pub struct MemoryVaultConfigs {
    configs: Mutex<(u64, BTreeMap<String, MemoryConfig>)>,
    backend: Arc<VaultBackend>,
}

impl MemoryVaultConfigs {
    pub fn new(seed: &[VaultConfigSpec], backend: Arc<VaultBackend>) -> Self {
        let mut configs = BTreeMap::new();
        for c in seed {
            let (auth, credential) = match (&c.auth.app_role, &c.auth.token) {
                (Some(a), _) => (
                    AuthSpec {
                        method: AuthMethod::AppRole,
                        role_id: Some(a.role_id.clone()),
                        mount: a.mount.clone(),
                    },
                    Credential::File(a.secret_id_file.clone()),
                ),
                (None, Some(t)) => (
                    AuthSpec {
                        method: AuthMethod::Token,
                        role_id: None,
                        mount: None,
                    },
                    Credential::File(t.file.clone()),
                ),
                (None, None) => continue,
            };
            let spec = ConfigSpec {
                resource_bundle: c.resource_bundle.clone(),
                host: c.host.clone(),
                path: c.path.clone(),
                namespace: c.namespace.clone(),
                ca_cert: c
                    .ca_cert_file
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok()),
                auth,
                delivery: c.delivery(),
            };
            configs.insert(
                c.name.clone(),
                MemoryConfig {
                    version: 1,
                    spec,
                    credential,
                },
            );
        }
        Self {
            configs: Mutex::new((1, configs)),
            backend,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<String, MemoryConfig>)> {
        self.configs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stored(name: &str, c: &MemoryConfig) -> StoredConfig {
        StoredConfig {
            name: name.to_string(),
            spec: c.spec.clone(),
            version: c.version.to_string(),
            ready: None,
            credential: c.credential.clone(),
        }
    }

    /// Hands the config to the engine's backend.
    fn publish(
        &self,
        name: &str,
        spec: &ConfigSpec,
        credential: Credential,
    ) -> Result<(), WriteError> {
        target(name, spec, credential)
            .and_then(|t| self.backend.put_target(t, spec.delivery))
            .map_err(|e| WriteError::Rejected(e.to_string()))
    }
}

#[async_trait]
impl VaultConfigStore for MemoryVaultConfigs {
    async fn list(&self) -> Result<Vec<StoredConfig>, WriteError> {
        Ok(self
            .lock()
            .1
            .iter()
            .map(|(name, c)| Self::stored(name, c))
            .collect())
    }

    async fn get(&self, name: &str) -> Result<Option<StoredConfig>, WriteError> {
        Ok(self.lock().1.get(name).map(|c| Self::stored(name, c)))
    }

    async fn create(
        &self,
        name: &str,
        spec: &ConfigSpec,
        credential: &SecretValue,
    ) -> Result<StoredConfig, WriteError> {
        let credential = Credential::Memory(credential.clone());
        let mut guard = self.lock();
        if guard.1.contains_key(name) {
            return Err(WriteError::Exists);
        }
        self.publish(name, spec, credential.clone())?;
        guard.0 += 1;
        let config = MemoryConfig {
            version: guard.0,
            spec: spec.clone(),
            credential,
        };
        let stored = Self::stored(name, &config);
        guard.1.insert(name.to_string(), config);
        Ok(stored)
    }

    async fn update(
        &self,
        current: &StoredConfig,
        spec: &ConfigSpec,
        credential: Option<&SecretValue>,
    ) -> Result<StoredConfig, WriteError> {
        let mut guard = self.lock();
        let (counter, configs) = &mut *guard;
        let Some(config) = configs.get_mut(&current.name) else {
            return Err(WriteError::Conflict);
        };
        if config.version.to_string() != current.version {
            return Err(WriteError::Conflict);
        }
        let credential = credential.map_or_else(
            || config.credential.clone(),
            |c| Credential::Memory(c.clone()),
        );
        self.publish(&current.name, spec, credential.clone())?;
        *counter += 1;
        *config = MemoryConfig {
            version: *counter,
            spec: spec.clone(),
            credential,
        };
        Ok(Self::stored(&current.name, config))
    }

    async fn delete(&self, current: &StoredConfig) -> Result<(), WriteError> {
        let mut guard = self.lock();
        match guard.1.get(&current.name) {
            Some(c) if c.version.to_string() == current.version => {}
            _ => return Err(WriteError::Conflict),
        }
        guard.1.remove(&current.name);
        self.backend.remove_config(&current.name);
        Ok(())
    }

    fn kube(&self) -> Option<kube::Client> {
        None
    }
}

// ---- Kubernetes ------------------------------------------------------------------------------

/// VaultConfig objects and their credentials Secrets in the data-plane namespace.
pub struct KubeVaultConfigs {
    client: kube::Client,
    configs: Api<VaultConfig>,
    secrets: Api<Secret>,
    naming: Naming,
}

const FIELD_MANAGER: &str = "secrets-webhook-api";
const SECRET_ID_KEY: &str = "secret-id";
const TOKEN_KEY: &str = "token";

impl KubeVaultConfigs {
    pub fn new(client: kube::Client, naming: Naming) -> Self {
        Self {
            configs: Api::namespaced(client.clone(), &naming.namespace),
            secrets: Api::namespaced(client.clone(), &naming.namespace),
            client,
            naming,
        }
    }

    fn stored(&self, object: VaultConfig) -> Option<StoredConfig> {
        let name = object.metadata.name.clone()?;
        let version = object.metadata.resource_version.clone().unwrap_or_default();
        let s = object.spec;
        let secret = |r: &SecretKeyRef| Credential::Secret {
            namespace: self.naming.namespace.clone(),
            name: r.name.clone(),
            key: r.key.clone(),
        };
        let (auth, credential) = match (&s.auth.app_role, &s.auth.token) {
            (Some(a), _) => (
                AuthSpec {
                    method: AuthMethod::AppRole,
                    role_id: Some(a.role_id.clone()),
                    mount: a.mount.clone(),
                },
                secret(&a.secret_id_ref),
            ),
            (None, Some(t)) => (
                AuthSpec {
                    method: AuthMethod::Token,
                    role_id: None,
                    mount: None,
                },
                secret(&t.secret_ref),
            ),
            // Invalid (the CRD's CEL rule forbids it); shown as a token config without one.
            (None, None) => (
                AuthSpec {
                    method: AuthMethod::Token,
                    role_id: None,
                    mount: None,
                },
                Credential::File(std::path::PathBuf::new()),
            ),
        };
        let ready = object
            .status
            .and_then(|st| st.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| ReadyView {
                ready: c.status == "True",
                reason: c.reason,
                message: c.message,
            });
        Some(StoredConfig {
            name,
            spec: ConfigSpec {
                resource_bundle: s.resource_bundle,
                host: s.host,
                path: s.path,
                namespace: s.namespace,
                ca_cert: s.ca_cert,
                auth,
                delivery: s.delivery,
            },
            version,
            ready,
            credential,
        })
    }

    /// Writes a new immutable credentials Secret; returns its name and key.
    async fn new_credential(
        &self,
        config: &str,
        method: AuthMethod,
        value: &SecretValue,
    ) -> Result<SecretKeyRef, WriteError> {
        let key = match method {
            AuthMethod::AppRole => SECRET_ID_KEY,
            AuthMethod::Token => TOKEN_KEY,
        };
        let name = format!(
            "{}{}",
            credentials_secret_prefix(&self.naming, config),
            super::random_hex(4)
        );
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                    (CONFIG_LABEL.to_string(), config.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            immutable: Some(true),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.expose().to_vec()),
            )])),
            ..Secret::default()
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        self.secrets
            .create(&params, &secret)
            .await
            .map_err(write_error)?;
        Ok(SecretKeyRef {
            name,
            key: key.to_string(),
        })
    }

    /// Removes a credentials Secret the API wrote (best effort: logged, never fatal).
    async fn drop_credential(&self, config: &str, credential: &Credential) {
        let Credential::Secret { name, .. } = credential else {
            return;
        };
        if !name.starts_with(&credentials_secret_prefix(&self.naming, config)) {
            return;
        }
        if let Err(e) = self.secrets.delete(name, &DeleteParams::default()).await {
            tracing::warn!(config, secret = %name, error = %super::auth::kube_reason(&e),
                "could not delete an old Vault credentials Secret");
        }
    }

    /// Makes the config own its credentials Secret, so deleting the config removes it.
    async fn adopt(&self, config: &VaultConfig, secret: &str) {
        let Some(uid) = config.metadata.uid.as_deref() else {
            return;
        };
        let patch = json!({"metadata": {"ownerReferences": [{
            "apiVersion": "secrets.iomete.com/v1alpha1", "kind": "VaultConfig",
            "name": config.metadata.name, "uid": uid,
        }]}});
        if let Err(e) = self
            .secrets
            .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(secret, error = %super::auth::kube_reason(&e),
                "could not make the VaultConfig own its credentials Secret");
        }
    }
}

fn resource_spec(spec: &ConfigSpec, credential: SecretKeyRef) -> VaultConfigResourceSpec {
    let auth = match spec.auth.method {
        AuthMethod::AppRole => ClusterAuth {
            app_role: Some(ClusterAppRole {
                role_id: spec.auth.role_id.clone().unwrap_or_default(),
                secret_id_ref: credential,
                mount: spec.auth.mount.clone(),
            }),
            token: None,
        },
        AuthMethod::Token => ClusterAuth {
            app_role: None,
            token: Some(ClusterToken {
                secret_ref: credential,
            }),
        },
    };
    VaultConfigResourceSpec {
        resource_bundle: spec.resource_bundle.clone(),
        host: spec.host.clone(),
        path: spec.path.clone(),
        namespace: spec.namespace.clone(),
        ca_cert: spec.ca_cert.clone(),
        auth,
        delivery: spec.delivery,
    }
}

/// The spec as a merge patch that also clears what is no longer set.
fn spec_patch(spec: &VaultConfigResourceSpec) -> serde_json::Value {
    let mut value = serde_json::to_value(spec).unwrap_or_else(|_| json!({}));
    if let Some(obj) = value.as_object_mut() {
        obj.entry("namespace").or_insert(serde_json::Value::Null);
        obj.entry("caCert").or_insert(serde_json::Value::Null);
        if let Some(auth) = obj.get_mut("auth").and_then(|a| a.as_object_mut()) {
            auth.entry("appRole").or_insert(serde_json::Value::Null);
            auth.entry("token").or_insert(serde_json::Value::Null);
            if let Some(a) = auth.get_mut("appRole").and_then(|a| a.as_object_mut()) {
                a.entry("mount").or_insert(serde_json::Value::Null);
            }
        }
    }
    value
}

fn write_error(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => WriteError::Exists,
        kube::Error::Api(s) if s.code == 409 || s.code == 404 => WriteError::Conflict,
        kube::Error::Api(s) if s.code == 422 => WriteError::Rejected(format!(
            "the Kubernetes API refused the VaultConfig: {}",
            s.message
        )),
        _ => WriteError::Unavailable(super::auth::kube_reason(&e)),
    }
}

fn credential_ref(credential: &Credential) -> Option<SecretKeyRef> {
    match credential {
        Credential::Secret { name, key, .. } => Some(SecretKeyRef {
            name: name.clone(),
            key: key.clone(),
        }),
        _ => None,
    }
}

#[async_trait]
impl VaultConfigStore for KubeVaultConfigs {
    async fn list(&self) -> Result<Vec<StoredConfig>, WriteError> {
        let list = self
            .configs
            .list(&Default::default())
            .await
            .map_err(write_error)?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| self.stored(o))
            .collect())
    }

    async fn get(&self, name: &str) -> Result<Option<StoredConfig>, WriteError> {
        let found = self.configs.get_opt(name).await.map_err(write_error)?;
        Ok(found.and_then(|o| self.stored(o)))
    }

    async fn create(
        &self,
        name: &str,
        spec: &ConfigSpec,
        credential: &SecretValue,
    ) -> Result<StoredConfig, WriteError> {
        let secret = self
            .new_credential(name, spec.auth.method, credential)
            .await?;
        let object = VaultConfig::new(name, resource_spec(spec, secret.clone()));
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.configs.create(&params, &object).await {
            Ok(created) => {
                self.adopt(&created, &secret.name).await;
                self.stored(created).ok_or_else(|| {
                    WriteError::Unavailable("the VaultConfig came back without a name".into())
                })
            }
            Err(e) => {
                let written = Credential::Secret {
                    namespace: self.naming.namespace.clone(),
                    name: secret.name,
                    key: secret.key,
                };
                self.drop_credential(name, &written).await;
                Err(write_error(e))
            }
        }
    }

    async fn update(
        &self,
        current: &StoredConfig,
        spec: &ConfigSpec,
        credential: Option<&SecretValue>,
    ) -> Result<StoredConfig, WriteError> {
        let name = &current.name;
        let (secret, fresh) = match credential {
            Some(value) => (
                self.new_credential(name, spec.auth.method, value).await?,
                true,
            ),
            None => (
                credential_ref(&current.credential).ok_or_else(|| {
                    WriteError::Rejected(
                        "the config has no credentials Secret; send the credential".into(),
                    )
                })?,
                false,
            ),
        };
        let patch = json!({
            "metadata": {"resourceVersion": current.version},
            "spec": spec_patch(&resource_spec(spec, secret.clone())),
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let written = Credential::Secret {
            namespace: self.naming.namespace.clone(),
            name: secret.name.clone(),
            key: secret.key.clone(),
        };
        match self
            .configs
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(updated) => {
                if fresh {
                    self.adopt(&updated, &secret.name).await;
                    self.drop_credential(name, &current.credential).await;
                }
                self.stored(updated).ok_or_else(|| {
                    WriteError::Unavailable("the VaultConfig came back without a name".into())
                })
            }
            Err(e) => {
                if fresh {
                    self.drop_credential(name, &written).await;
                }
                Err(write_error(e))
            }
        }
    }

    async fn delete(&self, current: &StoredConfig) -> Result<(), WriteError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(current.version.clone()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        self.configs
            .delete(&current.name, &params)
            .await
            .map_err(write_error)?;
        self.drop_credential(&current.name, &current.credential)
            .await;
        Ok(())
    }

    fn kube(&self) -> Option<kube::Client> {
        Some(self.client.clone())
    }
}
