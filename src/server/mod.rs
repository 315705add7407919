//! HTTPS admission server and plain-HTTP admin port.
//!
//! [`bind`] loads the certificate and binds both ports (tests bind `127.0.0.1:0` and read the
//! ports back from [`Bound`]); [`Bound::serve`] runs until its shutdown future completes, then
//! drains. [`run_serve`] is `secrets-webhook serve`: logging, runtime, engine, signals.
//! See `docs/server.md`.

mod budget;
mod conn;
mod http;
pub mod limits;
pub mod logs;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::admission::Webhook;
use crate::cli::ServeArgs;
use crate::config::{ExecutorPolicy, LocalConfig, Naming, Settings};
use crate::identity::{Keys, TrustedControllers, keys};
use crate::metrics::Metrics;
use limits::{Caps, Connections, FdLimit};
use tls::{CertPaths, CertResolver, Reloader, TlsError};

/// How the admin port waits for its own (short) requests once the admission port has drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);
/// Connections the admin port holds (probes, a metrics scraper); they come out of the fd reserve.
const ADMIN_CONNECTIONS: usize = 32;
/// The admin and API ports' listen backlog (the kubelet probes one connection at a time).
const ADMIN_BACKLOG: u32 = 128;
/// Connections the management API holds (out of the fd room, before admission's).
const API_CONNECTIONS: usize = 64;
/// Concurrent streams per HTTP/2 connection on the management API.
const API_STREAMS: u32 = 32;
/// Broker connections at once: a start burst of executors, each its own connection (the broker
/// works on 512 requests at once; the rest wait for a turn).
const BROKER_CONNECTIONS: usize = 1024;
/// Streams per HTTP/2 connection on the broker (each wrapper sends one request).
const BROKER_STREAMS: u32 = 8;

pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
pub const DEFAULT_FD_RESERVE: usize = 128;
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2's own ceiling for concurrent streams (the Go default the API server expects).
const MAX_STREAMS: u32 = 250;
/// How often the mounted signing keys are read for changes (the kubelet updates Secret volumes
/// within about a minute).
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

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
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Admission connections held at once (fewer when the fd limit is lower).
    pub max_connections: usize,
    /// File descriptors kept free for everything but admission connections.
    pub fd_reserve: usize,
    pub listen_backlog: u32,
    /// Request body bytes being received at once, across all connections and streams.
    pub max_inflight_bytes: usize,
    /// Estimated memory of the reviews being decoded at once.
    pub max_decode_bytes: usize,
    /// Streams per HTTP/2 connection; `None`: what the in-flight budget holds at the body limit.
    pub max_streams: Option<u32>,
    /// HTTPS address of the management API (same certificate), if it is served.
    pub api_listen: Option<SocketAddr>,
    /// HTTPS address of the broker pods fetch runtime values from (same certificate), if served.
    pub broker_listen: Option<SocketAddr>,
}

impl ServerOptions {
    /// Options with the command line's defaults for everything but the addresses and files.
    pub fn new(listen: SocketAddr, admin_listen: SocketAddr, cert: PathBuf, key: PathBuf) -> Self {
        Self {
            listen,
            admin_listen,
            tls: CertPaths { cert, key },
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            drain: Duration::from_secs(20),
            reload_interval: Duration::from_secs(2),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            fd_reserve: DEFAULT_FD_RESERVE,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_decode_bytes: DEFAULT_MAX_DECODE_BYTES,
            max_streams: None,
            api_listen: None,
            broker_listen: None,
        }
    }

    /// Streams per HTTP/2 connection: as many bodies of the largest size as the in-flight budget
    /// holds, so one connection cannot queue more uploads than the budget can take.
    pub fn h2_streams(&self) -> u32 {
        self.max_streams
            .unwrap_or_else(|| {
                let fit = self.max_inflight_bytes / self.max_body_bytes.max(1);
                u32::try_from(fit).unwrap_or(MAX_STREAMS)
            })
            .clamp(1, MAX_STREAMS)
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
    /// Served on its own thread (see `Bound::serve`), hence a std listener until then.
    admin_listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    connections: Arc<Connections>,
    admin_connections: Arc<Connections>,
    api_connections: Arc<Connections>,
    broker_connections: Arc<Connections>,
    reloader: Reloader,
    initial: tls::LoadedPair,
    state: Arc<http::AppState>,
    options: ServerOptions,
    /// The management API's listener and, once given ([`Bound::with_api`]), its router.
    api: Option<(TcpListener, Option<axum::Router>)>,
    /// The broker's listener and, once given ([`Bound::with_broker`]), its router.
    broker: Option<(TcpListener, Option<axum::Router>)>,
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
    let listener = listen(options.listen, options.listen_backlog)?;
    let admin_listener = listen(options.admin_listen, ADMIN_BACKLOG)?;
    let local = |l: &TcpListener, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let addr = local(&listener, options.listen)?;
    let admin_addr = local(&admin_listener, options.admin_listen)?;
    let admin_listener = admin_listener
        .into_std()
        .map_err(|source| ServerError::Bind {
            addr: admin_addr,
            source,
        })?;
    let api = match options.api_listen {
        Some(at) => Some((listen(at, ADMIN_BACKLOG)?, None)),
        None => None,
    };
    let broker = match options.broker_listen {
        Some(at) => Some((listen(at, ADMIN_BACKLOG)?, None)),
        None => None,
    };
    let fds = FdLimit::read();
    let room = fds.room(options.fd_reserve);
    // The management API's connections (a console backend, a few operators) come first out of
    // the room; admission takes the rest, up to its own cap.
    let api_caps = Caps::new(API_CONNECTIONS, room / 4, options.fd_reserve / 4);
    let api_room = if api.is_some() { api_caps.hard } else { 0 };
    // The broker's connections come out of the room as well (a quarter at most).
    let broker_caps = Caps::new(BROKER_CONNECTIONS, room / 4, options.fd_reserve / 4);
    let broker_room = if broker.is_some() {
        broker_caps.hard
    } else {
        0
    };
    let caps = Caps::new(
        options.max_connections,
        room.saturating_sub(api_room + broker_room),
        options.fd_reserve / 4,
    );
    let connections = Connections::new(caps);
    let api_connections = Connections::new(api_caps);
    let broker_connections = Connections::new(broker_caps);
    let admin_connections = Connections::new(Caps::new(ADMIN_CONNECTIONS, usize::MAX, 8));
    // Large reviews take turns on half the cores, so the I/O workers always have the others.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let heavy_turns = (cores / 2).max(1);
    tracing::info!(
        fd_limit = fds.limit,
        fds_open = fds.open,
        connections = caps.soft,
        h2_streams = options.h2_streams(),
        inflight_bytes = options.max_inflight_bytes,
        decode_bytes = options.max_decode_bytes,
        heavy_turns,
        "limits"
    );
    let state = Arc::new(http::AppState {
        webhook,
        draining: Arc::new(AtomicBool::new(false)),
        max_body_bytes: options.max_body_bytes,
        body_timeout: options.header_timeout,
        budgets: budget::Budgets::new(
            options.max_inflight_bytes,
            options.max_decode_bytes,
            heavy_turns,
        ),
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
        connections,
        admin_connections,
        api_connections,
        broker_connections,
        reloader,
        initial,
        state,
        options,
        api,
        broker,
    })
}

/// A listening socket with an explicit backlog (the default of 128 overflows when several API
/// servers reconnect at once; the kernel caps it at `net.core.somaxconn`).
fn listen(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServerError> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bind().map_err(|source| ServerError::Bind { addr, source })
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

    /// The management API (HTTPS) address actually bound, if any.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The broker (HTTPS) address actually bound, if any.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves `router` on the broker's listener (bound with `broker_listen`).
    pub fn with_broker(mut self, router: axum::Router) -> Self {
        if let Some((_, slot)) = self.broker.as_mut() {
            *slot = Some(router);
        }
        self
    }

    /// Serves `router` on the management API's listener (bound with `api_listen`).
    pub fn with_api(mut self, router: axum::Router) -> Self {
        if let Some((_, slot)) = self.api.as_mut() {
            *slot = Some(router);
        }
        self
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
            connections,
            admin_connections,
            api_connections,
            broker_connections,
            reloader,
            initial,
            state,
            options,
            api,
            broker,
        } = self;
        let (stop, stopped) = watch::channel(false);
        let (admin_stop, admin_stopped) = watch::channel(false);
        let reload = reloader.run(&initial, stopped.clone());
        let api_stopped = stopped.clone();
        let api_acceptor = acceptor.clone();
        let management = async move {
            if let Some((listener, Some(router))) = api {
                conn::accept_loop(
                    listener,
                    conn::Listener {
                        tls: Some(api_acceptor),
                        router,
                        header_timeout: options.header_timeout,
                        idle_timeout: options.idle_timeout,
                        drain: options.drain,
                        connections: api_connections,
                        h2_streams: API_STREAMS,
                        port: "api",
                    },
                    api_stopped,
                )
                .await;
            }
        };
        let broker_stopped = stopped.clone();
        let broker_acceptor = acceptor.clone();
        let brokering = async move {
            if let Some((listener, Some(router))) = broker {
                conn::accept_loop(
                    listener,
                    conn::Listener {
                        tls: Some(broker_acceptor),
                        router,
                        header_timeout: options.header_timeout,
                        idle_timeout: options.idle_timeout,
                        drain: options.drain,
                        connections: broker_connections,
                        h2_streams: BROKER_STREAMS,
                        port: "broker",
                    },
                    broker_stopped,
                )
                .await;
            }
        };
        let admission = async {
            conn::accept_loop(
                listener,
                conn::Listener {
                    tls: Some(acceptor),
                    router: http::admission_router(state.clone()),
                    header_timeout: options.header_timeout,
                    idle_timeout: options.idle_timeout,
                    drain: options.drain,
                    connections,
                    h2_streams: options.h2_streams(),
                    port: "admission",
                },
                stopped,
            )
            .await;
            // The admin port outlives the drain, so /readyz keeps saying "draining" meanwhile.
            admin_stop.send_replace(true);
        };
        let admin = spawn_admin(
            admin_listener,
            conn::Listener {
                tls: None,
                router: http::admin_router(state.clone()),
                header_timeout: options.header_timeout,
                idle_timeout: options.idle_timeout,
                drain: ADMIN_DRAIN,
                connections: admin_connections,
                h2_streams: 1,
                port: "admin",
            },
            admin_stopped,
        );
        let admin = async {
            // Resolves when the thread ends (or could not start).
            let _ = admin.await;
        };
        let control = async {
            tracing::info!(admission = %addr, admin = %admin_addr, "serving");
            shutdown.await;
            tracing::info!(drain = ?options.drain, "shutting down: not ready, no new connections, draining");
            state.draining.store(true, Ordering::SeqCst);
            stop.send_replace(true);
        };
        tokio::join!(control, admission, admin, reload, management, brokering);
        tracing::info!("drained; exiting");
    }
}

/// The admin port on a thread of its own with its own runtime: probes are answered even while
/// admission work keeps the main runtime's workers busy. Dropping `stop`'s sender stops it too.
fn spawn_admin(
    listener: std::net::TcpListener,
    how: conn::Listener,
    stop: watch::Receiver<bool>,
) -> oneshot::Receiver<()> {
    let (done, finished) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => conn::accept_loop(listener, how, stop).await,
                        Err(e) => tracing::error!(error = %e, "admin port cannot listen"),
                    }
                }),
                Err(e) => tracing::error!(error = %e, "admin port cannot start its runtime"),
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "admin port cannot start its thread");
    }
    finished
}

/// `secrets-webhook serve`.
pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    logs::init(&args.log_format)?;
    // Before anything opens a descriptor's worth of clients: the caps are computed from it.
    FdLimit::raise_and_read();
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
        max_references: args.max_references,
        executors: ExecutorPolicy {
            require_bound_token: !args.allow_unbound_executor_tokens,
        },
        ..Settings::default()
    };
    if args.allow_unbound_executor_tokens {
        tracing::warn!(
            "--allow-unbound-executor-tokens: executors are admitted with service-account tokens not \
             bound to their driver pod, so any pod or user holding a token of a driver's service \
             account can create executors that inherit that driver's secrets"
        );
    }
    let api_listen = api_listen(args.api_listen.as_deref(), args.dev)?;
    let broker_listen = broker_listen(args.broker_listen.as_deref(), args.dev)?;
    let mut settings = settings;
    settings.runtime.image = args.runtime_image.clone();
    settings.runtime.broker_url = args
        .broker_url
        .clone()
        .unwrap_or_else(|| format!("https://secrets-webhook.{}.svc:8445", args.namespace));
    if let Some(path) = &args.broker_ca_file {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--broker-ca-file {}: {e}", path.display()))?;
        settings.runtime.broker_ca = Some(pem);
    }
    let (webhook, api, cert, key, dev_ca, client) = if args.dev {
        let dev = crate::certs::ensure_dev_certs(&args.dev_cert_dir)?;
        let mut config = LocalConfig::load(&args.config)?;
        if config.runtime.broker_ca_file.is_none() {
            config.runtime.broker_ca_file = Some(dev.ca.clone());
        }
        let (webhook, api) = match api_listen {
            Some(_) => {
                let (webhook, api) = crate::api::dev(settings, &config, metrics)?;
                (webhook, Some(api))
            }
            None => (Webhook::from_local(settings, &config, metrics)?, None),
        };
        (webhook, api, dev.cert, dev.key, Some(dev.ca), None)
    } else {
        let config = cluster_config(&args.config)?;
        crate::api::refuse_static_tokens(&config)?;
        let client = kube::Client::try_default().await?;
        if settings.runtime.broker_ca.is_none() {
            // cert-manager's Secret (and `secrets-webhook certs --secret-yaml`) hold the CA here.
            let beside = args.tls_cert.with_file_name("ca.crt");
            settings.runtime.broker_ca = std::fs::read_to_string(&beside).ok();
        }
        if settings.runtime.image.is_none() {
            settings.runtime.image = own_image(&client).await;
        }
        config.runtime_into(&mut settings.runtime);
        if settings.runtime.image.is_none() || settings.runtime.broker_ca.is_none() {
            tracing::warn!(
                image = settings.runtime.image.is_some(),
                broker_ca = settings.runtime.broker_ca.is_some(),
                "runtime delivery is not configured: pods using Vault configs with delivery: runtime \
                 will be denied (set --runtime-image and --broker-ca-file)"
            );
        }
        let trusted = TrustedControllers::new(config.trusted_controllers.clone())?;
        // No key until the mounted Secret is read: not ready, and nothing is signed.
        let keys = Keys::empty();
        keys::watch_dir(
            keys.clone(),
            args.signing_key_dir.clone(),
            KEY_RELOAD_INTERVAL,
        );
        let vault = crate::backends::vault::VaultBackend::in_cluster(
            client.clone(),
            settings.naming.clone(),
            keys.clone(),
            crate::backends::vault::VaultOptions {
                metrics: Some(Arc::clone(&metrics)),
                ..Default::default()
            },
        );
        let webhook = Webhook::from_cluster_parts(
            settings,
            client.clone(),
            metrics,
            trusted,
            keys,
            Arc::clone(&vault),
        )?;
        let api = match api_listen {
            Some(_) => Some(crate::api::cluster(
                &webhook,
                vault,
                client.clone(),
                &config,
                args.api_token_audiences.clone(),
            )?),
            None => None,
        };
        (
            webhook,
            api,
            args.tls_cert,
            args.tls_key,
            None,
            Some(client),
        )
    };
    let webhook = Arc::new(webhook);
    let broker = match (broker_listen, client) {
        (Some(_), Some(client)) => Some(crate::broker::Broker::new(Arc::clone(&webhook), client)),
        _ => None,
    };
    let options = ServerOptions {
        max_body_bytes: args.max_body_bytes,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        drain: Duration::from_secs(args.drain_secs),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
        max_connections: args.max_connections,
        fd_reserve: args.fd_reserve,
        listen_backlog: args.listen_backlog,
        max_inflight_bytes: args.max_inflight_bytes,
        max_decode_bytes: args.max_decode_bytes,
        max_streams: args.max_streams,
        api_listen,
        broker_listen,
        ..ServerOptions::new(args.listen, args.admin_listen, cert, key)
    };
    let mut bound = bind(options, webhook).await?;
    if let Some(api) = api {
        bound = bound.with_api(api.router());
    }
    if let Some(broker) = broker {
        bound = bound.with_broker(broker.router());
        if let Some(addr) = bound.broker_addr() {
            tracing::info!(broker = %addr, "broker served (runtime delivery)");
        }
    }
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
        if let Some(api) = bound.api_addr() {
            let port = api.port();
            println!(
                "management API: https://localhost:{port}/api/v1 (OpenAPI: /api/v1/openapi.json), \
                 console: https://localhost:{port}/console/\n\
                 --dev: changes go to an in-memory store and are lost at exit; sign in with a \
                 token from apiTokens in {config}\n\
                 try:\n  curl --cacert {ca} -H 'authorization: Bearer dev-alice' \
                 https://localhost:{port}/api/v1/domains/finance/secrets",
                config = args.config.display(),
            );
        }
    } else if let Some(api) = bound.api_addr() {
        tracing::info!(api = %api, "management API and console served (writes go to the cluster)");
    }
    bound.serve(shutdown_signal()).await;
    Ok(())
}

/// In a cluster only `trustedControllers` and the management API's `apiAdmins` and
/// `consoleBackends` come from the config file (mounted from a ConfigMap); stores, Vault configs
/// and bundles come from the API. No file: none of them.
fn cluster_config(path: &std::path::Path) -> anyhow::Result<LocalConfig> {
    if !path.exists() {
        tracing::info!(config = %path.display(), "no config file: no trusted controllers, no API admins");
        return Ok(LocalConfig::default());
    }
    let config = LocalConfig::load(path)?;
    if config.signing_keys.is_some() {
        anyhow::bail!(
            "{}: signingKeys are for --dev and review only; in a cluster the signing key comes from \
             the Secret mounted at --signing-key-dir (docs/operations.md)",
            path.display()
        );
    }
    Ok(config)
}

/// `--api-listen`: an address, or `off`; unset means off, except with `--dev` (127.0.0.1:8444).
fn api_listen(flag: Option<&str>, dev: bool) -> anyhow::Result<Option<SocketAddr>> {
    match flag.map(str::trim) {
        None if dev => Ok(Some(SocketAddr::from(([127, 0, 0, 1], 8444)))),
        None | Some("off") | Some("") => Ok(None),
        Some(addr) => addr.parse().map(Some).map_err(|_| {
            anyhow::anyhow!("--api-listen must be an address like 0.0.0.0:8444, or off")
        }),
    }
}

/// `--broker-listen`: an address, or `off`; unset means 0.0.0.0:8445 in a cluster and off with
/// `--dev` (there is no API server to review the pods' tokens).
fn broker_listen(flag: Option<&str>, dev: bool) -> anyhow::Result<Option<SocketAddr>> {
    match flag.map(str::trim) {
        None if dev => Ok(None),
        None => Ok(Some(SocketAddr::from(([0, 0, 0, 0], 8445)))),
        Some("off") | Some("") => Ok(None),
        Some(_) if dev => anyhow::bail!(
            "--broker-listen needs a cluster: the broker checks each pod's token with the API server"
        ),
        Some(addr) => addr.parse().map(Some).map_err(|_| {
            anyhow::anyhow!("--broker-listen must be an address like 0.0.0.0:8445, or off")
        }),
    }
}

/// The image of this pod's container (`POD_NAMESPACE`/`POD_NAME` from the downward API), which
/// the runtime wrapper's init container runs: the same binary as this process.
async fn own_image(client: &kube::Client) -> Option<String> {
    let (Ok(namespace), Ok(name)) = (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME"))
    else {
        tracing::warn!("POD_NAMESPACE or POD_NAME not set: cannot read this pod's image");
        return None;
    };
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), &namespace);
    for attempt in 0..5u32 {
        match tokio::time::timeout(Duration::from_secs(5), pods.get(&name)).await {
            Ok(Ok(pod)) => {
                let containers = pod.spec.map(|s| s.containers).unwrap_or_default();
                let image = containers
                    .iter()
                    .find(|c| c.name == "secrets-webhook")
                    .or(containers.first())
                    .and_then(|c| c.image.clone());
                if image.is_none() {
                    tracing::warn!(pod = %name, "this pod's container has no image");
                }
                return image;
            }
            Ok(Err(e)) => {
                tracing::warn!(pod = %name, attempt, error = %e, "cannot read this pod's image")
            }
            Err(_) => {
                tracing::warn!(pod = %name, attempt, "cannot read this pod's image: timed out")
            }
        }
        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster's key comes from its Secret only: a config file carrying `signingKeys` (copied
    /// from the development config, say) stops the server at start instead of signing with it.
    #[test]
    fn a_cluster_refuses_signing_keys_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "signingKeys: {current: development-only-signing-key-not-for-clusters}\n",
        )
        .unwrap();
        let e = cluster_config(&path).unwrap_err().to_string();
        assert!(
            e.contains("signingKeys are for --dev and review only"),
            "{e}"
        );
        std::fs::write(&path, "trustedControllers: []\n").unwrap();
        assert!(cluster_config(&path).is_ok());
    }
}
