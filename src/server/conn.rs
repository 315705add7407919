//! Accept loop and per-connection serving (style of kubert's `server.rs`): the accept loop only
//! accepts; the TLS handshake, protocol choice and HTTP happen in the connection's own task, each
//! step bounded in time, so a slow or silent client holds nothing but its own task.

use std::io;
use std::pin::Pin;
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

/// HTTP/2 liveness pings: a peer that stops answering is dropped.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// After an accept error (e.g. out of file descriptors), wait before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How one listener serves its connections.
#[derive(Clone)]
pub(crate) struct Listener {
    /// `None` for the plain-HTTP admin port.
    pub tls: Option<TlsAcceptor>,
    pub router: Router,
    /// Bounds the TLS handshake, the wait for the first bytes and each request's headers.
    pub header_timeout: Duration,
    /// How long in-flight requests may take to finish once `stop` turns true.
    pub drain: Duration,
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
                Ok((tcp, _peer)) => {
                    connections.spawn(serve_connection(tcp, how.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
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

async fn serve_connection(tcp: TcpStream, how: Listener, mut stop: watch::Receiver<bool>) {
    // Admission responses are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = how.tls.clone() else {
        return serve_http(tcp, false, &how, stop).await;
    };
    let handshake = tokio::select! {
        done = tokio::time::timeout(how.header_timeout, acceptor.accept(tcp)) => done,
        _ = stopped(&mut stop) => return,
    };
    match handshake {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            serve_http(stream, h2, &how, stop).await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

/// HTTP/1.1 or (when ALPN chose it) HTTP/2 on an established stream, until the peer closes, a
/// timeout fires, or `stop` asks for a graceful close after the current requests.
async fn serve_http<S>(stream: S, h2: bool, how: &Listener, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(FirstByteDeadline::new(stream, how.header_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(how.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(how.header_timeout)
        .max_concurrent_streams(250);
    // The protocol is known (ALPN, or plain HTTP/1.1 on the admin port): no sniffing, which would
    // wait for bytes without a timeout.
    let builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let router = how.router.clone();
    let service =
        service_fn(move |request: hyper::Request<Incoming>| router.clone().oneshot(request));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection closed with an error");
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
