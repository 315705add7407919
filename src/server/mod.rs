//! HTTPS admission server and plain-HTTP admin port.
//!
//! [`bind`] loads the certificate and binds both ports (tests bind `127.0.0.1:0` and read the
//! ports back from [`Bound`]); [`Bound::serve`] runs until its shutdown future completes, then
//! drains. [`run_serve`] is `secrets-webhook serve`: logging, runtime, engine, signals.
//! See `docs/server.md`.

mod conn;
mod http;
pub mod logging;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission::Webhook;
use crate::admission::identity::TrustedControllers;
use crate::cli::ServeArgs;
use crate::config::{LocalConfig, Naming, Settings};
use crate::metrics::Metrics;
use tls::{CertPaths, CertResolver, Reloader, TlsError};

/// How the admin port waits for its own (short) requests once the admission port has drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);

/// Everything the server needs; `run_serve` fills it from the command line, tests build it.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls: CertPaths,
    pub max_body_bytes: usize,
    /// Bounds the TLS handshake, the first bytes and each request's headers, and the body.
    pub header_timeout: Duration,
    /// How long in-flight requests may take once shutdown starts.
    pub drain: Duration,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
}

impl ServerOptions {
    /// Options with the command line's defaults for everything but the addresses and files.
    pub fn new(listen: SocketAddr, admin_listen: SocketAddr, cert: PathBuf, key: PathBuf) -> Self {
        Self {
            listen,
            admin_listen,
            tls: CertPaths { cert, key },
            max_body_bytes: 4 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(20),
            reload_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Both ports bound and the certificate loaded; nothing is served until [`Bound::serve`].
pub struct Bound {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    listener: TcpListener,
    admin_listener: TcpListener,
    acceptor: TlsAcceptor,
    reloader: Reloader,
    initial: tls::LoadedPair,
    state: Arc<http::AppState>,
    options: ServerOptions,
}

/// Loads the certificate pair (failing if it is unusable) and binds both ports.
pub async fn bind(options: ServerOptions, webhook: Arc<Webhook>) -> Result<Bound, ServerError> {
    let initial = tls::load_pair(&options.tls).await?;
    let metrics = webhook.metrics.clone();
    if let Some(not_after) = initial.not_after {
        metrics.cert_expiry(tls::seconds_until(not_after));
    }
    let resolver = Arc::new(CertResolver::new(initial.certified.clone()));
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(resolver.clone())?));
    let listen = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let listener = listen(options.listen).await?;
    let admin_listener = listen(options.admin_listen).await?;
    let local = |l: &TcpListener, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let addr = local(&listener, options.listen)?;
    let admin_addr = local(&admin_listener, options.admin_listen)?;
    let state = Arc::new(http::AppState {
        webhook,
        draining: Arc::new(AtomicBool::new(false)),
        max_body_bytes: options.max_body_bytes,
        body_timeout: options.header_timeout,
    });
    let reloader = Reloader {
        paths: options.tls.clone(),
        resolver,
        metrics,
        interval: options.reload_interval,
    };
    Ok(Bound {
        addr,
        admin_addr,
        listener,
        admin_listener,
        acceptor,
        reloader,
        initial,
        state,
        options,
    })
}

impl Bound {
    /// The admission (HTTPS) address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin (HTTP) address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` completes; then reports not-ready, stops accepting, lets in-flight
    /// admission requests finish within the drain time, stops the admin port, and returns.
    /// Dropping the future stops everything at once.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Bound {
            addr,
            admin_addr,
            listener,
            admin_listener,
            acceptor,
            reloader,
            initial,
            state,
            options,
        } = self;
        let (stop, stopped) = watch::channel(false);
        let (admin_stop, admin_stopped) = watch::channel(false);
        let reload = reloader.run(&initial, stopped.clone());
        let admission = async {
            conn::accept_loop(
                listener,
                conn::Listener {
                    tls: Some(acceptor),
                    router: http::admission_router(state.clone()),
                    header_timeout: options.header_timeout,
                    drain: options.drain,
                },
                stopped,
            )
            .await;
            // The admin port outlives the drain, so /readyz keeps saying "draining" meanwhile.
            admin_stop.send_replace(true);
        };
        let admin = conn::accept_loop(
            admin_listener,
            conn::Listener {
                tls: None,
                router: http::admin_router(state.clone()),
                header_timeout: options.header_timeout,
                drain: ADMIN_DRAIN,
            },
            admin_stopped,
        );
        let control = async {
            tracing::info!(admission = %addr, admin = %admin_addr, "serving");
            shutdown.await;
            tracing::info!(drain = ?options.drain, "shutting down: not ready, no new connections, draining");
            state.draining.store(true, Ordering::SeqCst);
            stop.send_replace(true);
        };
        tokio::join!(control, admission, admin, reload);
        tracing::info!("drained; exiting");
    }
}

/// `secrets-webhook serve`.
pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    logging::init(&args.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve_main(args))
}

async fn serve_main(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let settings = Settings {
        naming: Naming {
            namespace: args.namespace.clone(),
            ..Naming::default()
        },
        enabled: args.enabled,
        authorizer: args.authorizer,
        ..Settings::default()
    };
    let (webhook, cert, key, dev_ca) = if args.dev {
        let dev = crate::certs::ensure_dev_certs(&args.dev_cert_dir)?;
        let config = LocalConfig::load(&args.config)?;
        let webhook = Webhook::from_local(settings, &config, metrics)?;
        (webhook, dev.cert, dev.key, Some(dev.ca))
    } else {
        let client = kube::Client::try_default().await?;
        let trusted = cluster_trusted_controllers(&args.config)?;
        let webhook = Webhook::from_cluster(settings, client, metrics, trusted).await?;
        (webhook, args.tls_cert, args.tls_key, None)
    };
    let options = ServerOptions {
        max_body_bytes: args.max_body_bytes,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        drain: Duration::from_secs(args.drain_secs),
        ..ServerOptions::new(args.listen, args.admin_listen, cert, key)
    };
    let bound = bind(options, Arc::new(webhook)).await?;
    if let Some(ca) = dev_ca {
        let port = bound.addr().port();
        let ca = ca.display();
        // On stdout: stderr carries only log lines (one JSON object each, docs/logging.md).
        println!(
            "secrets-webhook --dev: https://localhost:{port}/mutate (development CA: {ca})\n\
             admin: http://{admin}/readyz\n\
             try:\n  curl --cacert {ca} -H 'content-type: application/json' \
             --data @examples/review-spark-driver.json https://localhost:{port}/mutate",
            admin = bound.admin_addr(),
        );
    }
    bound.serve(shutdown_signal()).await;
    Ok(())
}

/// In a cluster only `trustedControllers` comes from the config file (mounted from a ConfigMap);
/// stores, Vault configs and bundles come from the API. No file: no trusted controllers.
fn cluster_trusted_controllers(path: &std::path::Path) -> anyhow::Result<TrustedControllers> {
    if !path.exists() {
        tracing::info!(config = %path.display(), "no config file: no trusted controllers");
        return Ok(TrustedControllers::default());
    }
    let config = LocalConfig::load(path)?;
    Ok(TrustedControllers::new(config.trusted_controllers)?)
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
