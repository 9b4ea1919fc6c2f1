//! One session per connected client: the handshake, catch-up from the
//! change log, then live transactions from the hub, with no gap and no
//! duplicate between the two (the hub is subscribed to before the log is
//! read, and nothing at or below the last LSN sent goes out twice).
//!
//! Schema changes are ordered with the data: the hub numbers them, and
//! before a snapshot and after every page read from the change log the
//! session announces what changed since its client was last told, so a
//! change published while the session was not listening (hydrating,
//! behind) still comes before the first transaction that needs it.
//!
//! "Caught up" is measured against PostgreSQL: the welcome carries its WAL
//! position at the handshake, and a `caught_up` says how far the capture
//! had got; when that is short of the welcome's position, a second one
//! follows once the capture passes it.
//!
//! Backpressure: a session sends one frame at a time and waits for the
//! socket. While it waits, the hub's bounded ring keeps filling; a session
//! that falls further behind than the ring is told it lagged and reads the
//! change log instead, so a slow client costs no memory of its own. A
//! client that does not read at all is closed with `too_slow` after the
//! send timeout.

mod catchup;
mod handshake;
mod hydrate;
mod incoming;
mod live;
mod migrations;
mod repair;
pub(crate) mod subscription;
pub(crate) mod table;
#[cfg(test)]
mod tests;
mod write;

pub(crate) use incoming::audit_rejections;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage};
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

use crate::api::ratelimit::TokenBucket;
use crate::auth::{Action, Principal, Scope};
use crate::hub::Frame;
use crate::ops::metrics::add;
use crate::registry;
use crate::state::AppState;
use handshake::Hello;
use subscription::Subscription;
use table::{LiveSession, Signal};

/// Why a session ended early; sent to the client before closing.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    /// With `upgrade_required`: the versions on both sides.
    pub(crate) upgrade: Option<Box<pgrelay_protocol::UpgradeRequired>>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            upgrade: None,
        }
    }

    /// `upgrade_required`, with both sides' versions.
    pub(crate) fn upgrade(upgrade: pgrelay_protocol::UpgradeRequired) -> Refusal {
        Refusal {
            code: ErrorCode::UpgradeRequired,
            message: format!(
                "upgrade required: this client's {} version is {}, this server serves {}..={}",
                upgrade.what, upgrade.client, upgrade.server_min, upgrade.server_max
            ),
            upgrade: Some(Box::new(upgrade)),
        }
    }
}

/// What a session speaks over: any sink and stream of WebSocket messages.
/// A server session runs on axum's `WebSocket`; a unit test on channels.
pub(crate) trait Socket:
    Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}

impl<T> Socket for T where
    T: Sink<Message, Error = axum::Error>
        + Stream<Item = Result<Message, axum::Error>>
        + Unpin
        + Send
{
}

/// A session past its handshake, welcome and catch-up: what the live
/// loop goes on with.
struct Opened<'a> {
    session: Session<'a>,
    frames: broadcast::Receiver<Frame>,
    owed: Option<live::Owed>,
    span: tracing::Span,
}

/// Runs a session on an upgraded socket. `place` is its connection's
/// place under `--max-connections`, given back when the session ends; its
/// socket is metered until the hello is accepted.
pub(crate) async fn run(
    mut socket: WebSocket,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
    place: crate::api::serve::ConnectionPlace,
) {
    // Only the live loop's state stays in every idle session's future: what
    // runs once (handshake, welcome, hydration, catch-up) and the ending
    // are boxed, and freed when done (inline they were 5.2 of its 5.8 KB).
    // Boxed: returned by value, it was stored twice in this future.
    let Some(mut opened) = Box::pin(open(&mut socket, &state, &place)).await else {
        return;
    };
    let live = Arc::clone(&opened.session.live);
    let ending = opened
        .session
        .serve(opened.frames, opened.owed, &mut shutdown)
        .instrument(opened.span.clone())
        .await;
    Box::pin(end(opened.session.socket, &state, &live, ending).instrument(opened.span)).await;
}

/// The handshake, authentication, the welcome and catch-up; `None` when
/// the session was refused (and its refusal sent).
async fn open<'a>(
    socket: &'a mut WebSocket,
    state: &'a AppState,
    place: &crate::api::serve::ConnectionPlace,
) -> Option<Box<Opened<'a>>> {
    let hello = match handshake::receive(socket, &state.config).await {
        Ok(hello) => hello,
        Err(refusal) => {
            refuse(socket, refusal).await;
            return None;
        }
    };
    let principal = match authenticate(state, &hello) {
        Ok(principal) => principal,
        Err(refusal) => {
            refuse(socket, refusal).await;
            return None;
        }
    };
    if let Some(principal) = &principal {
        if let Err(refusal) = claim(state, &hello.client_id, principal).await {
            refuse(socket, refusal).await;
            return None;
        }
    }
    let subscription = match Subscription::resolve(hello.tables.clone(), &state.hub.schemas()) {
        Ok(subscription) => subscription,
        Err(refusal) => {
            refuse(socket, refusal).await;
            return None;
        }
    };
    place.logged_in();
    let start = hello.last_lsn.unwrap_or(Lsn::ZERO);
    let span = tracing::info_span!("session", client_id = %hello.client_id, lsn = %start);
    let opened = async move {
        let live = state.sessions.open(&hello.client_id, start);
        register(state, &live).await;
        tracing::debug!(tables = ?hello.tables, "session started");
        // Rows are filtered only when rules are configured; a token alone
        // (no rules) sees everything.
        let scope = principal
            .as_ref()
            .filter(|_| state.hub.filtering())
            .map(|p| Arc::clone(&p.scope));
        let mut session = Session {
            socket,
            state,
            told: 0,
            live: Arc::clone(&live),
            subscription,
            bucket: TokenBucket::full(state.config.message_burst, std::time::Instant::now()),
            scope,
            principal,
            parts: None,
            schema: None,
            corked: false,
        };
        match session.prepare(hello).await {
            Ok((frames, owed)) => Some((session, frames, owed)),
            Err(refusal) => {
                end(session.socket, state, &live, Err(refusal)).await;
                None
            }
        }
    }
    .instrument(span.clone())
    .await;
    opened.map(|(session, frames, owed)| {
        Box::new(Opened {
            session,
            frames,
            owed,
            span,
        })
    })
}

/// Ends a session: tells the client why (unless it left), and removes it
/// from the session table and the registry.
async fn end(
    socket: &mut dyn Socket,
    state: &AppState,
    live: &LiveSession,
    ending: Result<Ending, Refusal>,
) {
    match ending {
        Ok(Ending::ClientClosed) => tracing::debug!("client closed the connection"),
        Ok(Ending::Shutdown) => going_away(socket).await,
        Err(refusal) => {
            match refusal.code {
                ErrorCode::TooSlow => add(&state.metrics.too_slow, 1),
                ErrorCode::Replaced => add(&state.metrics.replaced, 1),
                _ => {}
            }
            refuse(socket, refusal).await
        }
    }
    state.sessions.close(live);
    let key = registry::session_key(&state.instance, live);
    if let Err(e) = state.registry.unregister(&live.client_id, &key).await {
        tracing::warn!(error = %e, "unregistering the client failed; its record expires with the TTL");
    }
    state.sessions.finished();
    tracing::debug!(lsn = %live.sent(), "session ended");
}

/// Registers the session. Its own future, so the record is not kept in
/// every idle session's state.
async fn register(state: &AppState, live: &LiveSession) {
    let record = registry::record(&state.node, &state.instance, live);
    if let Err(e) = state.registry.register(&record).await {
        tracing::warn!(error = %e, "registering the client failed; it syncs unregistered");
    }
}

/// Checks the hello's token when `--auth` is set; `None` without auth.
fn authenticate(state: &AppState, hello: &Hello) -> Result<Option<Principal>, Refusal> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    match auth.authenticate(hello.token.as_deref()) {
        Ok(principal) => {
            state.audit.record(
                Action::Connect,
                Some(&hello.client_id),
                principal.subject.as_deref(),
                format!("scope {}", principal.scope.id),
            );
            Ok(Some(principal))
        }
        Err(refused) => {
            state.audit.record(
                Action::Refused,
                Some(&hello.client_id),
                None,
                refused.reason.clone(),
            );
            let code = if refused.expired {
                ErrorCode::TokenExpired
            } else {
                ErrorCode::Unauthorized
            };
            Err(Refusal::new(
                code,
                format!("token refused: {}", refused.reason),
            ))
        }
    }
}

/// Closes with 1001 ("going away"): the server is shutting down.
async fn going_away(socket: &mut dyn Socket) {
    let close = CloseFrame {
        code: 1001,
        reason: "server shutting down".into(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        socket.send(Message::Close(Some(close))),
    )
    .await;
}

/// Refuses a client id that another token subject owns (and claims an
/// unowned one for this token's).
pub(crate) async fn claim(
    state: &AppState,
    client_id: &str,
    principal: &Principal,
) -> Result<(), Refusal> {
    use crate::auth::owners::Claim;
    match state
        .owners
        .claim(client_id, principal.owner.as_deref())
        .await
    {
        Ok(Claim::Allowed) => Ok(()),
        Ok(Claim::Taken) => {
            state.audit.record(
                Action::Refused,
                Some(client_id),
                principal.subject.as_deref(),
                "client id owned by another token subject",
            );
            Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!("client id {client_id:?} belongs to another token subject"),
            ))
        }
        Err(e) => Err(internal(e)),
    }
}

/// Sends an error frame and closes with the matching close code.
pub(crate) async fn refuse(socket: &mut dyn Socket, refusal: Refusal) {
    tracing::debug!(code = ?refusal.code, message = %refusal.message, "closing session");
    let frame = Frame::encode(
        &ServerMessage::Error {
            code: refusal.code,
            message: refusal.message.clone(),
            upgrade: refusal.upgrade.map(|u| *u),
        },
        Lsn::ZERO,
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        socket.send(Message::Text(frame.text)),
    )
    .await;
    let reason: String = refusal.message.chars().take(100).collect();
    let close = CloseFrame {
        code: refusal.code.close_code().0,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        socket.send(Message::Close(Some(close))),
    )
    .await;
    // What the client still sends is read and dropped until its close
    // frame, for a second at most: a socket closed with unread data is
    // reset, and a reset can discard the error and close frames before
    // the client has read them (a flooding client never saw why).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

#[derive(Debug, PartialEq, Eq)]
enum Ending {
    ClientClosed,
    Shutdown,
}

struct Session<'a> {
    socket: &'a mut dyn Socket,
    state: &'a AppState,
    /// The schema generation (see `Hub::changed_since`) the client has been
    /// told about.
    told: u64,
    /// Its entry in the session table, which holds its position: the commit
    /// LSN of the last transaction sent or skipped (or the client's own).
    live: Arc<LiveSession>,
    subscription: Option<Subscription>,
    /// Frames the client may still send now (`--message-rate`).
    bucket: TokenBucket,
    /// What this client may see, when row rules are configured.
    scope: Option<Arc<Scope>>,
    principal: Option<Principal>,
    /// A transaction arriving in `write_part` frames; boxed, as most
    /// sessions never have one.
    parts: Option<Box<write::Parts<'a>>>,
    /// The client schema version the replica reaches once it has run the
    /// migrations sent; `None` for a client that does not run client
    /// migrations (no `schema_version` in its hello).
    schema: Option<i64>,
    /// Frames go into the socket's buffer without a flush each, while the
    /// live loop writes out what is waiting (see `forward_waiting`).
    corked: bool,
}

/// Why a session told to close (by an operator, or by its client's new
/// connection) closes.
fn closed_by(signal: Signal) -> Refusal {
    if signal == Signal::Disconnect {
        return Refusal::new(ErrorCode::Disconnected, "disconnected by an operator");
    }
    Refusal::new(
        ErrorCode::Replaced,
        "another connection with this client id took over; this one will not be served again",
    )
}

fn internal(e: impl Into<crate::ServerError>) -> Refusal {
    let e = e.into();
    tracing::warn!(error = %e, "session failed");
    Refusal::new(
        ErrorCode::Internal,
        "the server could not read its change log; reconnect to resume",
    )
}
