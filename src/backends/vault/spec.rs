//! VaultConfig, the seed's "Vault Integration": a namespaced CRD in a cluster, an entry of the local
//! config file without one. Both resolve to a checked [`Target`] that the client works from.
//! Credentials are never part of either object: the CRD names a Secret, the local file a file.

use std::path::PathBuf;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use vault_http::Url;

use super::VaultError;

/// Default mount path of the AppRole auth method.
pub const DEFAULT_APPROLE_MOUNT: &str = "approle";

/// In-cluster form (`vaultconfigs.secrets.iomete.com`); `metadata.name` is the id that
/// `source.id` names. Credentials come from Secrets in the same namespace.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "secrets.iomete.com",
    version = "v1alpha1",
    kind = "VaultConfig",
    namespaced,
    status = "VaultConfigStatus",
    shortname = "vaultcfg",
    doc = "A read-only HashiCorp Vault KV v2 integration (the seed's Vault config).",
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VaultConfigResourceSpec {
    /// Resource bundle (RAS) that governs who may use this config.
    pub resource_bundle: String,
    /// Vault base URL, e.g. `https://vault.example.com:8200`.
    pub host: String,
    /// KV v2 path as the seed writes it, e.g. `/v1/secret/data/production`.
    pub path: String,
    /// Vault Enterprise namespace (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// PEM CA certificate(s) that Vault's TLS certificate chains to (optional; public data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// Exactly one of `appRole` (recommended) or `token`.
    pub auth: ClusterAuth,
    /// How values reach pods: `runtime` (fetched by the pod at start, never stored) or
    /// `materialize` (copied into a Secret of the pod's namespace). Absent: materialize, the
    /// meaning every config had before the field existed (see [`Delivery::unset`]); a config
    /// created without it gets runtime from the webhook's `/default` (admission::defaults).
    #[serde(default = "Delivery::unset")]
    pub delivery: Delivery,
}

/// How a Vault config's values reach the pods that use them (docs/vault.md compares the two).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    /// The pod fetches its values at start from the webhook (the broker), proving who it is with
    /// a pod-bound service-account token; nothing is stored in etcd.
    #[default]
    Runtime,
    /// The webhook copies the values into the Secret `iomete-vault-<config>` in the pod's
    /// namespace and references them from there (for clusters that cannot run the wrapper).
    Materialize,
}

impl Delivery {
    /// What a stored config that does not name `delivery` means: materialize. Configs written
    /// before the field existed must keep working after an upgrade (a default of runtime would
    /// switch them to the wrapper and broker at once, and deny pods whose images are not in the
    /// entrypoint table). New configs get runtime from whatever writes them: the management API
    /// and console ([`Delivery::default`]), the shipped examples and docs, and for a VaultConfig
    /// created without the field, the webhook at CREATE (admission::defaults).
    pub fn unset() -> Delivery {
        Delivery::Materialize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Runtime => "runtime",
            Delivery::Materialize => "materialize",
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the webhook logs in, in a cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.appRole) != has(self.token)").message("set exactly one of appRole or token"))]
pub struct ClusterAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_role: Option<ClusterAppRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<ClusterToken>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAppRole {
    /// The role ID (not a secret by itself).
    pub role_id: String,
    /// Where the secret ID is: a key of a Secret in this namespace.
    pub secret_id_ref: SecretKeyRef,
    /// Mount path of the AppRole auth method (default `approle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterToken {
    /// Where the token is: a key of a Secret in this namespace.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the VaultConfig's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// What the webhook last found when it tested the config (condition type `Ready`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultConfigStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VaultConfigCondition>,
}

/// A `metav1.Condition`-shaped entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultConfigCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD manifest (`manifests/base/crds/vaultconfigs.yaml`).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&VaultConfig::crd()).unwrap_or_default()
}

/// Local form: one entry of `vaultConfigs` in the config file (`serve --dev`, `review`,
/// `vault check`). Credentials are read from files at login time, so rotating them needs no restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultConfigSpec {
    pub name: String,
    pub resource_bundle: String,
    pub host: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_file: Option<PathBuf>,
    pub auth: LocalAuth,
    /// `runtime` or `materialize`, as in the CRD. Absent is materialize, as there: the file has no
    /// CREATE event to default it at, and an upgrade must not switch existing files. Start-up warns
    /// about each config that does not name it (see [`VaultConfigSpec::delivery`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

impl VaultConfigSpec {
    /// The delivery in force: the named one, else [`Delivery::unset`].
    pub fn delivery(&self) -> Delivery {
        self.delivery.unwrap_or_else(Delivery::unset)
    }
}

/// Exactly one of `token` or `appRole`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<LocalToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_role: Option<LocalAppRole>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalToken {
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalAppRole {
    pub role_id: String,
    pub secret_id_file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

/// Where a credential is read from, at each login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    File(PathBuf),
    Secret {
        namespace: String,
        name: String,
        key: String,
    },
    /// Held in memory: a config created through the management API in `--dev`, or a Test
    /// Connection of a config that is not saved. `Debug` never shows it.
    Memory(super::SecretValue),
}

impl std::fmt::Display for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::File(path) => write!(f, "file {}", path.display()),
            Credential::Secret {
                namespace,
                name,
                key,
            } => write!(f, "Secret {namespace}/{name} key {key}"),
            Credential::Memory(_) => f.write_str("the credential given to the management API"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Token(Credential),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Credential,
    },
}

impl Auth {
    pub fn method(&self) -> &'static str {
        match self {
            Auth::Token(_) => "token",
            Auth::AppRole { .. } => "approle",
        }
    }
}

/// A checked Vault config: everything the client needs, nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub bundle: String,
    pub host: Url,
    /// The configured path without `/v1/`, e.g. `secret/data/production`.
    pub path: String,
    pub namespace: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
    pub auth: Auth,
}

impl Target {
    /// `host` as people wrote it, for messages.
    pub fn host_label(&self) -> String {
        self.host.as_str().trim_end_matches('/').to_string()
    }

    pub fn from_local(spec: &VaultConfigSpec) -> Result<Self, VaultError> {
        let invalid = |reason: String| VaultError::InvalidConfig {
            config: spec.name.clone(),
            reason,
        };
        let auth = match (&spec.auth.token, &spec.auth.app_role) {
            (Some(t), None) => Auth::Token(Credential::File(t.file.clone())),
            (None, Some(a)) => Auth::AppRole {
                mount: mount_or_default(a.mount.as_deref()),
                role_id: a.role_id.clone(),
                secret_id: Credential::File(a.secret_id_file.clone()),
            },
            _ => return Err(invalid("auth needs exactly one of token or appRole".into())),
        };
        let ca_pem =
            match &spec.ca_cert_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    invalid(format!("cannot read caCertFile {}: {e}", path.display()))
                })?),
                None => None,
            };
        Self::build(
            &spec.name,
            &spec.resource_bundle,
            &spec.host,
            &spec.path,
            spec.namespace.as_deref(),
            ca_pem,
            auth,
        )
    }

    /// `secrets_namespace` is where the credential Secrets live (the VaultConfig's namespace).
    pub fn from_resource(
        name: &str,
        spec: &VaultConfigResourceSpec,
        secrets_namespace: &str,
    ) -> Result<Self, VaultError> {
        let secret = |r: &SecretKeyRef| Credential::Secret {
            namespace: secrets_namespace.to_string(),
            name: r.name.clone(),
            key: r.key.clone(),
        };
        let auth = match (&spec.auth.token, &spec.auth.app_role) {
            (Some(t), None) => Auth::Token(secret(&t.secret_ref)),
            (None, Some(a)) => Auth::AppRole {
                mount: mount_or_default(a.mount.as_deref()),
                role_id: a.role_id.clone(),
                secret_id: secret(&a.secret_id_ref),
            },
            _ => {
                return Err(VaultError::InvalidConfig {
                    config: name.to_string(),
                    reason: "spec.auth needs exactly one of token or appRole".into(),
                });
            }
        };
        let ca_pem = spec.ca_cert.as_ref().map(|pem| pem.as_bytes().to_vec());
        Self::build(
            name,
            &spec.resource_bundle,
            &spec.host,
            &spec.path,
            spec.namespace.as_deref(),
            ca_pem,
            auth,
        )
    }

    /// A target from parts (the management API's Test Connection and its `--dev` store).
    pub fn build(
        name: &str,
        bundle: &str,
        host: &str,
        path: &str,
        namespace: Option<&str>,
        ca_pem: Option<Vec<u8>>,
        auth: Auth,
    ) -> Result<Self, VaultError> {
        let invalid = |reason: String| VaultError::InvalidConfig {
            config: name.to_string(),
            reason,
        };
        let host_url = Url::parse(host.trim())
            .map_err(|e| invalid(format!("host {host:?} is not a URL ({e})")))?;
        if !matches!(host_url.scheme(), "http" | "https") || host_url.host_str().is_none() {
            return Err(invalid(format!(
                "host {host:?} must be an http:// or https:// URL"
            )));
        }
        if host_url.path() != "/" || host_url.query().is_some() || !host_url.username().is_empty() {
            return Err(invalid(format!(
                "host {host:?} must be the Vault base URL only (no path, query or user)"
            )));
        }
        let trimmed = path.trim().trim_matches('/');
        let trimmed = trimmed.strip_prefix("v1/").unwrap_or(trimmed);
        if trimmed.is_empty() || trimmed == "v1" {
            return Err(invalid(format!(
                "path {path:?} names no mount; write it as the seed does, e.g. /v1/secret/data/production"
            )));
        }
        if let Err(reason) = check_segments(trimmed) {
            return Err(invalid(format!("path {path:?}: {reason}")));
        }
        let namespace = match namespace.map(|n| n.trim().trim_matches('/')) {
            None | Some("") => None,
            Some(ns) if header_safe(ns) => Some(ns.to_string()),
            Some(_) => return Err(invalid("namespace contains unsupported characters".into())),
        };
        if let Auth::AppRole { mount, role_id, .. } = &auth {
            if role_id.trim().is_empty() || !header_safe(role_id.trim()) {
                return Err(invalid("appRole.roleId is empty or not printable".into()));
            }
            check_segments(mount).map_err(|r| invalid(format!("appRole.mount: {r}")))?;
        }
        Ok(Self {
            name: name.to_string(),
            bundle: bundle.to_string(),
            host: host_url,
            path: trimmed.to_string(),
            namespace,
            ca_pem,
            auth,
        })
    }
}

fn mount_or_default(mount: Option<&str>) -> String {
    match mount.map(|m| m.trim().trim_matches('/')) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => DEFAULT_APPROLE_MOUNT.to_string(),
    }
}

/// Path segments we send to Vault: non-empty, no `.`/`..`, nothing that needs escaping tricks.
pub fn check_segments(path: &str) -> Result<(), String> {
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err("has an empty segment (//)".into());
        }
        if segment == "." || segment == ".." {
            return Err("may not contain . or .. segments".into());
        }
        if segment
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '?' | '#' | '%' | '\\'))
        {
            return Err(format!(
                "segment {segment:?} has a character Vault paths cannot use here"
            ));
        }
    }
    Ok(())
}

/// Visible ASCII only: safe as an HTTP header value (vaultrs panics on anything else).
pub fn header_safe(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(yaml: &str) -> VaultConfigSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// Configs stored before `delivery` existed keep materialize after an upgrade; a named
    /// delivery is what it says; what the management API writes for a new config is runtime.
    #[test]
    fn a_config_that_names_no_delivery_is_materialize() {
        let crd = |extra: &str| -> VaultConfigResourceSpec {
            serde_json::from_str(&format!(
                r#"{{"resourceBundle": "b", "host": "http://v", "path": "/v1/secret/data/x",
                    "auth": {{"token": {{"secretRef": {{"name": "t", "key": "token"}}}}}}{extra}}}"#
            ))
            .unwrap()
        };
        assert_eq!(crd("").delivery, Delivery::Materialize);
        assert_eq!(
            crd(r#", "delivery": "runtime""#).delivery,
            Delivery::Runtime
        );
        assert_eq!(
            crd(r#", "delivery": "materialize""#).delivery,
            Delivery::Materialize
        );
        let base = "{name: c, host: 'http://v', path: /v1/secret/data/x, resourceBundle: b, auth: {token: {file: /t}}";
        assert_eq!(
            local(&format!("{base}}}")).delivery(),
            Delivery::Materialize
        );
        assert_eq!(local(&format!("{base}}}")).delivery, None);
        assert_eq!(
            local(&format!("{base}, delivery: runtime}}")).delivery(),
            Delivery::Runtime
        );
        assert_eq!(
            local(&format!("{base}, delivery: materialize}}")).delivery(),
            Delivery::Materialize
        );
        assert_eq!(Delivery::default(), Delivery::Runtime);
    }

    #[test]
    fn local_token_config_resolves() {
        let spec = local(
            "{name: vault-prod-finance, host: 'http://127.0.0.1:8200', path: /v1/secret/data/production, resourceBundle: finance-bundle, auth: {token: {file: /tmp/t}}}",
        );
        let t = Target::from_local(&spec).unwrap();
        assert_eq!(t.path, "secret/data/production");
        assert_eq!(t.host_label(), "http://127.0.0.1:8200");
        assert_eq!(t.auth, Auth::Token(Credential::File("/tmp/t".into())));
    }

    #[test]
    fn local_approle_defaults_mount() {
        let spec = local(
            "{name: a, host: 'https://v:8200', path: secret/data/x, resourceBundle: b, namespace: team-a/, auth: {appRole: {roleId: r, secretIdFile: /s}}}",
        );
        let t = Target::from_local(&spec).unwrap();
        assert_eq!(t.namespace.as_deref(), Some("team-a"));
        assert!(matches!(t.auth, Auth::AppRole { ref mount, .. } if mount == "approle"));
    }

    #[test]
    fn rejects_bad_hosts_paths_and_auth() {
        for (host, path, auth) in [
            ("ftp://v", "/v1/secret/data/x", "{token: {file: /t}}"),
            (
                "http://v:8200/ui",
                "/v1/secret/data/x",
                "{token: {file: /t}}",
            ),
            ("not a url", "/v1/secret/data/x", "{token: {file: /t}}"),
            ("http://v", "/v1/", "{token: {file: /t}}"),
            ("http://v", "/v1/secret/../sys", "{token: {file: /t}}"),
            ("http://v", "/v1/secret/data/x", "{}"),
            (
                "http://v",
                "/v1/secret/data/x",
                "{token: {file: /t}, appRole: {roleId: r, secretIdFile: /s}}",
            ),
        ] {
            let spec = local(&format!(
                "{{name: c, host: '{host}', path: '{path}', resourceBundle: b, auth: {auth}}}"
            ));
            let err = Target::from_local(&spec).unwrap_err().to_string();
            assert!(err.starts_with("vault config c is invalid"), "{err}");
        }
    }

    #[test]
    fn unknown_local_fields_are_rejected() {
        let err = serde_yaml::from_str::<VaultConfigSpec>(
            "{name: a, host: h, path: p, resourceBundle: b, auth: {token: {value: inline}}}",
        );
        assert!(err.is_err());
    }

    #[test]
    fn crd_is_namespaced_with_status() {
        let yaml = crd_yaml();
        assert!(
            yaml.contains("name: vaultconfigs.secrets.iomete.com"),
            "{yaml}"
        );
        assert!(yaml.contains("scope: Namespaced"));
        assert!(yaml.contains("secretIdRef"));
        assert!(yaml.contains("status: {}"));
        assert!(
            yaml.contains("has(self.appRole) != has(self.token)"),
            "{yaml}"
        );
    }
}
