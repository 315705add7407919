//! Command line (clap). Every serve flag can also come from the environment (`env =`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "secrets-webhook",
    version,
    about = "Injects secrets by reference into Spark and Jupyter pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve admission over HTTPS (and the admin port over HTTP).
    // Boxed: the serve flags make this variant far larger than the others.
    Serve(Box<ServeArgs>),
    /// Run one Pod or AdmissionReview (JSON or YAML) through the webhook and print the response.
    Review(ReviewArgs),
    /// Create a CA and a serving certificate for the webhook's Service.
    Certs(crate::certs::CertsArgs),
    /// Vault integration tools.
    #[command(subcommand)]
    Vault(VaultCommand),
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Test Connection: log in, check the mount is KV v2, read the path; one line per step.
    Check {
        /// The Vault config's name.
        name: String,
        /// Local config file holding `vaultConfigs`.
        #[arg(
            long,
            env = "SECRETS_WEBHOOK_CONFIG",
            default_value = "examples/dev-config.yaml"
        )]
        config: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTPS address for admission (`POST /mutate`).
    #[arg(long, env = "SECRETS_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP admin address (/livez, /readyz, /metrics).
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_ADMIN_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub admin_listen: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_TLS_CERT",
        default_value = "/etc/secrets-webhook/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// Serving key (PEM); reloaded when it changes.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_TLS_KEY",
        default_value = "/etc/secrets-webhook/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// Data-plane namespace that holds the secret stores.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_NAMESPACE",
        default_value = "iomete-system"
    )]
    pub namespace: String,
    /// Run without a cluster: generate a development certificate and read the local config file.
    #[arg(long, env = "SECRETS_WEBHOOK_DEV")]
    pub dev: bool,
    /// Where `--dev` writes its CA and serving certificate.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_DEV_CERT_DIR",
        default_value = ".dev-certs"
    )]
    pub dev_cert_dir: PathBuf,
    /// Local config file standing in for the cluster objects (used with `--dev`).
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_CONFIG",
        default_value = "examples/dev-config.yaml"
    )]
    pub config: PathBuf,
    /// Largest admission request body accepted, in bytes.
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_BODY", default_value_t = crate::server::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds allowed for a TLS handshake and for reading request headers.
    #[arg(long, env = "SECRETS_WEBHOOK_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds SIGTERM waits for in-flight requests before exiting.
    #[arg(long, env = "SECRETS_WEBHOOK_DRAIN", default_value_t = 20)]
    pub drain_secs: u64,
    /// Seconds a connection may stay open with no request in progress (HTTP/2 with no open
    /// stream; HTTP/1.1 keep-alive closes after the header timeout already).
    #[arg(long, env = "SECRETS_WEBHOOK_IDLE_TIMEOUT", default_value_t = crate::server::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub idle_timeout_secs: u64,
    /// Admission connections held at once (fewer when the open-file limit is lower); at the cap a
    /// new connection evicts the one idle longest.
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_CONNECTIONS", default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// File descriptors kept free for the admin port, certificate reloads and the Kubernetes and
    /// Vault clients.
    #[arg(long, env = "SECRETS_WEBHOOK_FD_RESERVE", default_value_t = crate::server::DEFAULT_FD_RESERVE)]
    pub fd_reserve: usize,
    /// Listen backlog of the admission port (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "SECRETS_WEBHOOK_LISTEN_BACKLOG", default_value_t = crate::server::DEFAULT_LISTEN_BACKLOG)]
    pub listen_backlog: u32,
    /// Request body bytes received at once, across all connections and streams.
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_INFLIGHT_BYTES", default_value_t = crate::server::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
    /// Estimated memory of the reviews decoded at once; a review estimated larger is refused.
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_DECODE_BYTES", default_value_t = crate::server::DEFAULT_MAX_DECODE_BYTES)]
    pub max_decode_bytes: usize,
    /// Concurrent streams per HTTP/2 connection [default: in-flight bytes / body limit, at most 250].
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_STREAMS")]
    pub max_streams: Option<u32>,
    /// Secret references (annotations and legacy placeholders) one pod may name; also the secret
    /// entries written (env references times the containers they go into).
    #[arg(long, env = "SECRETS_WEBHOOK_MAX_REFERENCES", default_value_t = crate::refs::DEFAULT_MAX_REFERENCES)]
    pub max_references: usize,
    /// The product's `features.secretsV2.enabled`: when false, pods pass untouched (the guard still runs).
    #[arg(long, env = "SECRETS_WEBHOOK_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Who decides Use: `ras` (ResourceBundle objects) or `subject-access-review` (Kubernetes RBAC).
    #[arg(long, env = "SECRETS_WEBHOOK_AUTHORIZER", value_enum, default_value_t = crate::authz::AuthorizerKind::Ras)]
    pub authorizer: crate::authz::AuthorizerKind,
    /// Directory holding the stamp signing keys (files `current` and, while rotating, `previous`):
    /// the mounted Secret. Not used with `--dev`.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_SIGNING_KEY_DIR",
        default_value = "/etc/secrets-webhook/signing-key"
    )]
    pub signing_key_dir: PathBuf,
    /// Admit executors created with service-account tokens that are not bound to their driver pod
    /// (clusters without bound tokens). Weaker: logged as a warning at start.
    #[arg(long, env = "SECRETS_WEBHOOK_ALLOW_UNBOUND_EXECUTOR_TOKENS")]
    pub allow_unbound_executor_tokens: bool,
    /// HTTPS address of the management API and console (`off` to disable). Default: off in a
    /// cluster, 127.0.0.1:8444 with `--dev`. Same certificate as admission.
    #[arg(long, env = "SECRETS_WEBHOOK_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Audiences a bearer token of the API must be issued for (TokenReview); default: the API server's.
    #[arg(
        long = "api-token-audience",
        env = "SECRETS_WEBHOOK_API_TOKEN_AUDIENCES",
        value_delimiter = ','
    )]
    pub api_token_audiences: Vec<String>,
    /// Log format: `json` (default) or `text`.
    #[arg(long, env = "SECRETS_WEBHOOK_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

#[derive(Debug, Clone, Args)]
pub struct ReviewArgs {
    /// A Pod or an AdmissionReview, JSON or YAML (`-` for standard input).
    pub file: PathBuf,
    /// Local config file standing in for the cluster objects.
    #[arg(
        long,
        env = "SECRETS_WEBHOOK_CONFIG",
        default_value = "examples/dev-config.yaml"
    )]
    pub config: PathBuf,
    /// Submitting user when FILE is a bare Pod (an AdmissionReview carries its own userInfo).
    #[arg(long)]
    pub user: Option<String>,
    /// Submitting user's groups when FILE is a bare Pod.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Submitting user's `userInfo.extra` when FILE is a bare Pod, as KEY=VALUE (repeatable), e.g.
    /// `authentication.kubernetes.io/pod-name=DRIVER` for an executor created with a bound token.
    #[arg(long = "extra", value_parser = parse_extra)]
    pub extra: Vec<(String, String)>,
    /// The owner driver pod (as the webhook admitted it), standing in for the API lookup of executors.
    #[arg(long)]
    pub owner: Option<PathBuf>,
    /// Treat the request as a dry run.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the decoded JSON Patch instead of the AdmissionReview.
    #[arg(long, conflicts_with = "pod")]
    pub patch: bool,
    /// Print the mutated pod instead of the AdmissionReview.
    #[arg(long)]
    pub pod: bool,
}

fn parse_extra(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => crate::server::run_serve(*args),
        Command::Review(args) => crate::review::run(args),
        Command::Certs(args) => crate::certs::run(args),
        Command::Vault(VaultCommand::Check { name, config }) => {
            let local = crate::config::LocalConfig::load(&config)?;
            crate::backends::vault::run_check(&name, &local.vault_configs, &config)
        }
    }
}
