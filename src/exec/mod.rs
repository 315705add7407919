//! `secrets-webhook exec -- CMD ARGS...`: the wrapper a pod wired for runtime delivery starts
//! with (docs/vault.md, "Delivery: runtime mode"), and `secrets-webhook copy-self DEST`, which its
//! init container runs to install the wrapper.
//!
//! `exec` fetches the container's values from the broker with the pod's projected token (bounded
//! retries, then a clear error and exit status 1), puts env secrets into its own environment,
//! writes Spark confs into a mode-0400 properties file on the pod's memory-backed emptyDir
//! (merged with the original `--properties-file`; values never go into argv), and then replaces
//! itself with the original entrypoint (`execve`: no parent process stays, signals and the exit
//! status are the entrypoint's own).

mod properties;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use crate::broker::protocol::{self, ErrorBody, FetchRequest, FetchResponse};
use crate::plan::PYSPARK_SUBMIT_ARGS;
use crate::plan::runtime::{
    ConfsVia, ENV_BROKER, ENV_BROKER_CA, ENV_CONTAINER, ENV_POD_UID, RUNTIME_DIR, TOKEN_DIR,
    TOKEN_FILE, WRAPPER_ENV, drop_confs,
};

/// `secrets-webhook exec`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// The broker's URL.
    #[arg(long, env = ENV_BROKER)]
    pub broker: String,
    /// PEM CA certificate(s) of the broker (the webhook sets it in the pod's env).
    #[arg(long, env = ENV_BROKER_CA, hide_env_values = true, conflicts_with = "ca_file")]
    pub ca: Option<String>,
    /// A file holding the broker's CA instead of `--ca`.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The container this process runs in.
    #[arg(long, env = ENV_CONTAINER)]
    pub container: String,
    /// The pod's uid (downward API): a token of another pod is refused.
    #[arg(long, env = ENV_POD_UID)]
    pub pod_uid: Option<String>,
    /// The pod's projected token for the broker.
    #[arg(long, default_value_t = format!("{TOKEN_DIR}/{TOKEN_FILE}"))]
    pub token_file: String,
    /// Where the Spark properties files go (the memory-backed emptyDir).
    #[arg(long, default_value = RUNTIME_DIR)]
    pub dir: PathBuf,
    /// Attempts before giving up when the broker is unreachable or busy.
    #[arg(long, default_value_t = 8)]
    pub attempts: u32,
    /// The original entrypoint and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

/// Why `exec` could not start the entrypoint. `Display` is what it prints (never a value).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "cannot read the pod's token at {path}: {reason}; the pod must be admitted by secrets-webhook, which mounts it"
    )]
    Token { path: String, reason: String },
    #[error(
        "the broker's CA certificate is missing or not PEM ({0}); the pod must be admitted by secrets-webhook, which sets it"
    )]
    Ca(String),
    #[error("cannot fetch the secret values from {url} after {attempts} attempts: {reason}")]
    Unreachable {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("the broker at {url} refused to hand out the secret values ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{0}")]
    Spark(String),
    #[error("cannot write the Spark properties file {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("cannot start {program}: {reason}")]
    Start { program: String, reason: String },
}

/// Runs `exec`: returns only when it could not start the entrypoint.
pub fn run(args: ExecArgs) -> ExecError {
    match prepare(&args) {
        Ok(mut command) => {
            let program = args.command[0].to_string_lossy().into_owned();
            let reason = command.exec();
            ExecError::Start {
                program,
                reason: reason.to_string(),
            }
        }
        Err(e) => e,
    }
}

/// Everything up to the `execve`: the command with its env and args, values in place.
pub fn prepare(args: &ExecArgs) -> Result<std::process::Command, ExecError> {
    let values = fetch(args)?;
    let mut argv: Vec<OsString> = args.command.clone();
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    for (name, value) in &values.env {
        env.insert(name.into(), value.into());
    }
    if !values.spark_confs.is_empty() {
        let file = properties_path(&args.dir, &args.container);
        match values.confs_via {
            Some(ConfsVia::SparkSubmit) | None => {
                argv = spark_submit_args(&argv, values.args_at, &values.spark_confs, &file)?;
            }
            Some(ConfsVia::PysparkSubmitArgs) => {
                let current = std::env::var(PYSPARK_SUBMIT_ARGS).unwrap_or_default();
                let next = pyspark_submit_args(&current, &values.spark_confs, &file)?;
                env.insert(PYSPARK_SUBMIT_ARGS.into(), next.into());
            }
        }
    }
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]);
    // The wrapper's settings are its own; the entrypoint does not see them.
    for name in WRAPPER_ENV {
        command.env_remove(name);
    }
    command.envs(env);
    Ok(command)
}

/// The values, from the broker: bounded retries while it is unreachable, busy or says so.
pub fn fetch(args: &ExecArgs) -> Result<FetchResponse, ExecError> {
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| ExecError::Token {
            path: args.token_file.clone(),
            reason: e.to_string(),
        })?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(ExecError::Token {
            path: args.token_file.clone(),
            reason: "it is empty".into(),
        });
    }
    let ca = match (&args.ca, &args.ca_file) {
        (Some(pem), _) => pem.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).map_err(|e| ExecError::Ca(format!("{}: {e}", path.display())))?
        }
        (None, None) => return Err(ExecError::Ca(format!("{ENV_BROKER_CA} is not set"))),
    };
    let certs =
        vault_http::Certificate::from_pem_bundle(&ca).map_err(|e| ExecError::Ca(e.to_string()))?;
    if certs.is_empty() {
        return Err(ExecError::Ca("no certificate in it".into()));
    }
    let url = format!("{}{}", args.broker.trim_end_matches('/'), protocol::PATH);
    // reqwest needs a process-wide rustls provider (main installs ring; this covers tests).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = vault_http::Client::builder()
        .tls_backend_rustls()
        .tls_certs_only(certs)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
        .redirect(vault_http::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| ExecError::Ca(e.to_string()))?;
    let body = FetchRequest {
        container: args.container.clone(),
        pod_uid: args.pod_uid.clone().filter(|u| !u.is_empty()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ExecError::Unreachable {
            url: url.clone(),
            attempts: 0,
            reason: e.to_string(),
        })?;
    let attempts = args.attempts.max(1);
    runtime.block_on(async {
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        for attempt in 1..=attempts {
            let started = Instant::now();
            let sent = client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap_or_default())
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status();
                    let bytes = response.bytes().await.unwrap_or_default();
                    if status.is_success() {
                        return serde_json::from_slice::<FetchResponse>(&bytes).map_err(|_| {
                            ExecError::Unreachable {
                                url: url.clone(),
                                attempts: attempt,
                                reason: "its answer is not a values document".into(),
                            }
                        });
                    }
                    let error: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
                    let retry = error.as_ref().map_or(
                        status.is_server_error() || status.as_u16() == 429,
                        |e| e.retry,
                    );
                    let message = error.map_or_else(
                        || format!("HTTP {status}"),
                        |e| e.message,
                    );
                    if !retry {
                        return Err(ExecError::Refused {
                            url: url.clone(),
                            status: status.as_u16(),
                            message,
                        });
                    }
                    last = message;
                }
                Err(e) => last = describe(&e),
            }
            if attempt < attempts {
                eprintln!(
                    "secrets-webhook exec: attempt {attempt} of {attempts} failed ({last}); trying again"
                );
                tokio::time::sleep(delay.saturating_sub(started.elapsed() / 4)).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        Err(ExecError::Unreachable {
            url: url.clone(),
            attempts,
            reason: last,
        })
    })
}

/// A transport error without its URL's query or anything sent.
fn describe(e: &vault_http::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn properties_path(dir: &Path, container: &str) -> PathBuf {
    dir.join("run").join(container).join("spark.properties")
}

/// The Spark driver's argv with the confs in a properties file: after `driver` (at `args_at`),
/// `--properties-file <ours>` replaces the original one, whose content ours starts with (or
/// `spark-defaults.conf`, which spark-submit would otherwise have read), and `--conf`s of the
/// delivered keys are dropped (they would win over the file).
fn spark_submit_args(
    argv: &[OsString],
    args_at: usize,
    confs: &BTreeMap<String, String>,
    file: &Path,
) -> Result<Vec<OsString>, ExecError> {
    if argv.get(args_at).and_then(|a| a.to_str()) != Some("driver") {
        return Err(ExecError::Spark(format!(
            "this container's args do not start with \"driver\" at position {args_at}, so the Spark confs cannot \
             be handed to spark-submit; the pod changed after admission"
        )));
    }
    let strings: Option<Vec<String>> = argv[args_at + 1..]
        .iter()
        .map(|a| a.to_str().map(str::to_string))
        .collect();
    let Some(strings) = strings else {
        return Err(ExecError::Spark(
            "the driver's args are not UTF-8, so the Spark confs cannot be merged into them".into(),
        ));
    };
    let (options, rest) = split_options(&strings);
    let keys: BTreeSet<&str> = confs.keys().map(String::as_str).collect();
    let (options, _) = drop_confs(options, &keys);
    let (options, base) = take_properties_file(&options);
    let base = match base {
        Some(path) => Some(read_base(Path::new(&path))?),
        None => spark_defaults().map(|p| read_base(&p)).transpose()?,
    };
    write_properties(file, base.as_deref(), confs)?;
    let mut out: Vec<OsString> = argv[..=args_at].to_vec();
    out.push("--properties-file".into());
    out.push(file.as_os_str().to_owned());
    out.extend(options.into_iter().map(OsString::from));
    out.extend(rest.iter().map(OsString::from));
    Ok(out)
}

/// `PYSPARK_SUBMIT_ARGS` with `--properties-file <ours>` before `pyspark-shell`, merged the same
/// way as for a driver.
fn pyspark_submit_args(
    current: &str,
    confs: &BTreeMap<String, String>,
    file: &Path,
) -> Result<String, ExecError> {
    let tokens = shlex::split(current).ok_or_else(|| {
        ExecError::Spark(format!(
            "{PYSPARK_SUBMIT_ARGS} has unbalanced quotes, so the Spark confs cannot be added; fix its quoting"
        ))
    })?;
    let keys: BTreeSet<&str> = confs.keys().map(String::as_str).collect();
    let (mut tokens, _) = drop_confs(&tokens, &keys);
    if tokens.last().map(String::as_str) == Some("pyspark-shell") {
        tokens.pop();
    }
    let (tokens, base) = take_properties_file(&tokens);
    let base = match base {
        Some(path) => Some(read_base(Path::new(&path))?),
        None => spark_defaults().map(|p| read_base(&p)).transpose()?,
    };
    write_properties(file, base.as_deref(), confs)?;
    let path = file.to_string_lossy().into_owned();
    let words = ["--properties-file".to_string(), path]
        .into_iter()
        .chain(tokens)
        .chain(["pyspark-shell".to_string()])
        .collect::<Vec<_>>();
    shlex::try_join(words.iter().map(String::as_str)).map_err(|_| {
        ExecError::Spark(format!(
            "the properties file path cannot be quoted into {PYSPARK_SUBMIT_ARGS}"
        ))
    })
}

/// spark-submit's options (up to the primary resource) and the rest (the resource and the
/// application's own args, which may not be touched).
fn split_options(args: &[String]) -> (&[String], &[String]) {
    // spark-submit's switches: every other option takes a value (SparkSubmitOptionParser).
    const SWITCHES: [&str; 7] = [
        "--verbose",
        "-v",
        "--supervise",
        "--help",
        "-h",
        "--version",
        "--usage-error",
    ];
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if !arg.starts_with('-') {
            break;
        }
        i += if SWITCHES.contains(&arg.as_str()) || arg.contains('=') {
            1
        } else {
            2
        };
    }
    let i = i.min(args.len());
    args.split_at(i)
}

/// The options without `--properties-file X` (or `--properties-file=X`), and X.
fn take_properties_file(options: &[String]) -> (Vec<String>, Option<String>) {
    let mut out = Vec::with_capacity(options.len());
    let mut found = None;
    let mut i = 0;
    while i < options.len() {
        if options[i] == "--properties-file" {
            found = options.get(i + 1).cloned();
            i += 2;
            continue;
        }
        if let Some(path) = options[i].strip_prefix("--properties-file=") {
            found = Some(path.to_string());
        } else {
            out.push(options[i].clone());
        }
        i += 1;
    }
    (out, found)
}

/// The `spark-defaults.conf` spark-submit reads when no properties file is given.
fn spark_defaults() -> Option<PathBuf> {
    let dir = std::env::var_os("SPARK_CONF_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("SPARK_HOME").map(|h| PathBuf::from(h).join("conf")))?;
    let file = dir.join("spark-defaults.conf");
    file.is_file().then_some(file)
}

fn read_base(path: &Path) -> Result<String, ExecError> {
    std::fs::read_to_string(path).map_err(|e| {
        ExecError::Spark(format!(
            "cannot read the properties file {} to merge the secret confs into it: {e}",
            path.display()
        ))
    })
}

/// Writes `base` and then the confs (a later key wins in a properties file) into a new file of
/// mode 0400, in a directory of mode 0700; an earlier file (a restarted container) is replaced.
fn write_properties(
    file: &Path,
    base: Option<&str>,
    confs: &BTreeMap<String, String>,
) -> Result<(), ExecError> {
    let failed = |e: std::io::Error| ExecError::Write {
        path: file.display().to_string(),
        reason: e.to_string(),
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(file)
        .map_err(failed)?;
    let text = properties::merged(base, confs);
    std::io::Write::write_all(&mut out, text.as_bytes()).map_err(failed)?;
    Ok(())
}

/// `secrets-webhook copy-self DEST`: the init container's job. Copies this binary (mode 0555) so
/// that a container of any image can run it; no shell needed.
pub fn copy_self(dest: &Path) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let partial = dest.with_extension("partial");
    std::fs::copy(&me, &partial).map_err(|e| {
        anyhow::anyhow!("cannot copy {} to {}: {e}", me.display(), partial.display())
    })?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&partial, dest)?;
    Ok(())
}

#[cfg(test)]
mod tests;
