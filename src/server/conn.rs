//! Accept loop and per-connection serving (style of kubert's `server.rs`): the accept loop only
//! accepts and keeps the books ([`Connections`]); the TLS handshake, protocol choice and HTTP
//! happen in the connection's own task, each step bounded in time, so a slow or silent client
//! holds nothing but its own task. A connection without a request in progress closes after the
//! idle timeout, or earlier when a new connection needs its place.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::limits::{Conn, Connections, Registration};

/// HTTP/2 liveness pings: a peer that stops answering is dropped.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// HTTP/2 flow-control windows: the most a peer can send that the server has not yet taken (the
/// server takes body bytes only within the upload budget). Small against the defaults (1 MiB),
/// so hundreds of connections cannot park much memory in receive buffers; plenty for the API
/// server's reviews of a few KiB.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// HTTP/1.1 read buffer bound (headers included; hyper's default is about 400 KiB).
const H1_MAX_BUFFER: usize = 64 * 1024;
/// After an accept error (e.g. out of file descriptors), wait before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long an idle or evicted connection has to finish its goodbye (GOAWAY) before it is
/// dropped, unless a request raced in meanwhile.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How one listener serves its connections.
#[derive(Clone)]
pub(crate) struct Listener {
    /// `None` for the plain-HTTP admin port.
    pub tls: Option<TlsAcceptor>,
    pub router: Router,
    /// Bounds the TLS handshake, the wait for the first bytes and each request's headers.
    pub header_timeout: Duration,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight requests may take to finish once `stop` turns true.
    pub drain: Duration,
    /// The port's open connections and their caps.
    pub connections: Arc<Connections>,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_streams: u32,
    /// `admission` or `admin`, for logs.
    pub port: &'static str,
}

/// Accepts until `stop` turns true, then closes the listener, lets open connections finish their
/// current requests within `drain`, and drops whatever is left.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    how: Listener,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(ended) = connections.join_next(), if !connections.is_empty() => log_panic(ended),
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => match how.connections.admit() {
                    Some(registration) => {
                        connections.spawn(serve_connection(tcp, how.clone(), stop.clone(), registration));
                    }
                    None => {
                        // Closed at once: every connection is busy, or evicted ones are still
                        // closing. The client retries; nothing was read.
                        drop(tcp);
                        tracing::warn!(
                            port = how.port,
                            open = how.connections.open(),
                            cap = how.connections.caps().soft,
                            "connection refused: at the connection cap and none is idle"
                        );
                    }
                },
                Err(e) => {
                    let out_of_fds = matches!(
                        rustix::io::Errno::from_io_error(&e),
                        Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
                    );
                    tracing::warn!(port = how.port, error = %e, "accept failed");
                    if out_of_fds {
                        // Something else holds descriptors too: make room, then retry.
                        how.connections.evict_one();
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(how.drain, async {
        while let Some(ended) = connections.join_next().await {
            log_panic(ended);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            port = how.port,
            open = connections.len(),
            "drain time is over; closing the remaining connections"
        );
        connections.shutdown().await;
    }
}

fn log_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection task panicked");
    }
}

/// Resolves once `stop` is true (or its sender is gone). Holds no borrow of the channel afterwards.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn serve_connection(
    tcp: TcpStream,
    how: Listener,
    mut stop: watch::Receiver<bool>,
    registration: Registration,
) {
    // Admission responses are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = how.tls.clone() else {
        return serve_http(tcp, false, &how, stop, &registration.conn).await;
    };
    let handshake = tokio::select! {
        done = tokio::time::timeout(how.header_timeout, acceptor.accept(tcp)) => done,
        _ = stopped(&mut stop) => return,
        _ = registration.conn.evicted() => return,
    };
    match handshake {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            serve_http(stream, h2, &how, stop, &registration.conn).await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

/// Why a connection is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Shutdown,
    Idle,
    Evicted,
}

/// HTTP/1.1 or (when ALPN chose it) HTTP/2 on an established stream, until the peer closes, a
/// timeout fires, the connection is idle or evicted, or `stop` asks for a graceful close after
/// the current requests.
async fn serve_http<S>(
    stream: S,
    h2: bool,
    how: &Listener,
    mut stop: watch::Receiver<bool>,
    conn: &Arc<Conn>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(FirstByteDeadline::new(stream, how.header_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(how.header_timeout)
        .max_buf_size(H1_MAX_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(how.header_timeout)
        .max_concurrent_streams(how.h2_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    // The protocol is known (ALPN, or plain HTTP/1.1 on the admin port): no sniffing, which would
    // wait for bytes without a timeout.
    let builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let router = how.router.clone();
    let requests = conn.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        // The connection is busy (not idle, not evictable) until the response is produced.
        let active = requests.begin();
        let response = router.clone().oneshot(request);
        async move {
            let response = response.await;
            drop(active);
            response
        }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let why = tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection closed with an error");
            }
            return;
        }
        _ = stopped(&mut stop) => Close::Shutdown,
        _ = conn.idle_for(how.idle_timeout) => Close::Idle,
        _ = conn.evicted() => Close::Evicted,
    };
    tracing::debug!(port = how.port, reason = ?why, "closing connection");
    // HTTP/2: GOAWAY, so the client moves to a new connection without losing a request;
    // HTTP/1.1: close after the current request.
    connection.as_mut().graceful_shutdown();
    if why == Close::Shutdown {
        // Bounded by the accept loop's drain.
        let _ = connection.await;
        return;
    }
    // Idle or evicted: a request that raced in still finishes; otherwise the goodbye is bounded
    // (a peer that does not read could hold it forever).
    loop {
        match tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await {
            Ok(_) => return,
            Err(_) if conn.active() == 0 => return,
            Err(_) => {}
        }
    }
}

/// Fails reads with `TimedOut` when the peer has sent no byte at all within the deadline. Covers the
/// gap hyper leaves open: an HTTP/2 client that completes TLS and then never sends its preface.
struct FirstByteDeadline<S> {
    inner: S,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> FirstByteDeadline<S> {
    fn new(inner: S, within: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = match this.deadline.as_mut() {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client sent nothing in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
