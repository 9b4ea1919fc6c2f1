//! Accepts HTTP connections and serves them with hyper's HTTP/1 server
//! (hand-written instead of `axum::serve`, which gives hyper no timer, so
//! no header timeout could ever close an idle connection). Every connection
//! holds a place under `--max-connections` from accept until it closes; a
//! sync session keeps its connection's place. One over the limit is
//! answered 503 and closed; one that sends no request head for
//! `--http-idle-timeout` (new, or kept alive between requests) is closed.
//! What a connection sends is metered (`prelogin`) until it is trusted.
//! With `--tls-cert`, each connection's TLS handshake runs on its own task
//! (under the same timeout as a request head), over the metered socket.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::prelogin::{Budget, Gate, Metered};
use crate::ops::metrics::add;
use crate::ServerError;

/// Connections over the limit being answered at once; more are dropped
/// unanswered, so a flood costs a bounded amount.
const MAX_REFUSING: usize = 256;

/// A connection's place under `--max-connections`, in every request's
/// extensions. Whoever keeps the connection past its request (the sync
/// WebSocket) keeps a clone.
#[derive(Clone)]
pub(crate) struct ConnectionPlace {
    // Held, never read: the place is given back when the last clone goes.
    _permit: Arc<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl ConnectionPlace {
    /// The session's hello was accepted: its socket may send up to the
    /// full frame limits from now on.
    pub(crate) fn logged_in(&self) {
        self.gate.open();
    }
}

/// What the accept loop needs.
pub(crate) struct Limits {
    /// One permit per open connection.
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) idle_timeout: Duration,
    /// Connections refused at the limit (a metric).
    pub(crate) refused: Arc<AtomicU64>,
    /// Bytes sent by connections not yet trusted, all together.
    pub(crate) prelogin: Arc<Budget>,
    /// `--tls-cert`: every connection speaks TLS.
    pub(crate) tls: Option<TlsAcceptor>,
}

/// Serves `app` on `listener` until shutdown, then lets the connections
/// finish what they are answering.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(e, &mut shutdown).await;
                continue;
            }
        };
        // Frames are small and often back to back (a write result, then
        // its echo): with Nagle's algorithm the second waits for the
        // client's delayed ACK, ~40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
        match Arc::clone(&limits.connections).try_acquire_owned() {
            Ok(permit) => {
                let gate = Gate::new(Arc::clone(&limits.prelogin));
                let place = ConnectionPlace {
                    _permit: Arc::new(permit),
                    gate: Arc::clone(&gate),
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    // A sync session stays metered until its hello is
                    // accepted; other requests are bounded by their routes.
                    if request.uri().path() == "/api/sync" {
                        place.gate.close();
                    } else {
                        place.gate.open();
                    }
                    request.extensions_mut().insert(place.clone());
                    request.extensions_mut().insert(ConnectInfo(peer));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, request)
                });
                let tcp = Metered::new(tcp, gate);
                connections.spawn(serve_tls(
                    tcp,
                    limits.tls.clone(),
                    service,
                    limits.idle_timeout,
                    shutdown.clone(),
                ));
            }
            Err(_) => {
                add(&limits.refused, 1);
                // Past the bound of refusals in flight: no answer at all.
                let Ok(refusal) = Arc::clone(&refusing).try_acquire_owned() else {
                    continue;
                };
                let max = limits.max_connections;
                let service = hyper::service::service_fn(move |_: Request<Incoming>| async move {
                    Ok::<_, Infallible>(too_many_connections(max))
                });
                let idle = limits.idle_timeout;
                let stop = shutdown.clone();
                let tls = limits.tls.clone();
                connections.spawn(async move {
                    serve_tls(tcp, tls, service, idle, stop).await;
                    drop(refusal);
                });
            }
        }
    }
    drop(listener);
    // Idle connections close at once; those answering a request finish it.
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection, over TLS when an acceptor is given: its
/// handshake must finish within `idle_timeout`, as a request head must.
async fn serve_tls<S, T>(
    tcp: T,
    tls: Option<TlsAcceptor>,
    service: S,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(acceptor) = tls else {
        return serve(tcp, service, idle_timeout, shutdown).await;
    };
    let handshake = tokio::time::timeout(idle_timeout, acceptor.accept(tcp));
    let stream = tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => return,
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // A client that does not trust the certificate ends here.
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake not finished in time; closed");
                return;
            }
        },
    };
    serve(stream, service, idle_timeout, shutdown).await
}

/// Serves one connection until it closes, is upgraded, or the server
/// shuts down.
async fn serve<S, T>(
    tcp: T,
    service: S,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(connection);
    // The guard `wait_for` returns must not live across the await below.
    let stopping = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::select! {
        biased;
        _ = stopping => {
            connection.as_mut().graceful_shutdown();
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended during shutdown");
            }
        }
        result = connection.as_mut() => {
            if let Err(e) = result {
                // Timeouts and clients that go away mid-request end here.
                tracing::trace!(error = %e, "connection ended");
            }
        }
    }
}

/// A 503 that closes the connection.
fn too_many_connections(max: usize) -> Response {
    let body = serde_json::json!({
        "code": "too_many_connections",
        "message": format!(
            "the server holds its limit of {max} connections (--max-connections); retry with backoff"
        ),
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONNECTION, "close")],
        Json(body),
    )
        .into_response()
}

/// An accept that failed: a connection that went away before it was
/// accepted is nothing; anything else (out of file descriptors) waits a
/// moment, so the loop does not spin.
async fn accept_failed(error: std::io::Error, shutdown: &mut watch::Receiver<bool>) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %error, "accepting a connection failed; retrying in a second");
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}
