//! One LiveStore socket: reads frames, answers them through its protocol
//! (0.4 RPC or 0.3 messages), and sends its pull's pages and live batches.
//! One task per socket; every send has a deadline, so a stalled client is
//! closed instead of holding memory, and its subscription buffer is bounded
//! by the store (a full buffer turns into catch-up from storage).

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use tokio::time::Instant;

use super::event::Page;
use super::pull::{Pull, PullStep};
use super::store::{Broadcast, SocketGuard, StoreHandle};
use super::EventLog;

/// Close code sent when the store was reset or the server stops; LiveStore
/// clients reconnect and learn the new backend id.
const CLOSE_RESYNC: u16 = 4000;
const CLOSE_GOING_AWAY: u16 = 1001;

pub(crate) enum Flow {
    Continue,
    Close,
}

/// How a protocol version frames what a socket sends.
pub(crate) trait Protocol: Send {
    fn on_text(&mut self, conn: &mut Conn, text: &str) -> impl Future<Output = Flow> + Send;
    fn page(&self, pull: &Pull, page: &Page, remaining: i64) -> Utf8Bytes;
    fn empty(&self, pull: &Pull) -> Utf8Bytes;
    fn live(&self, pull: &Pull, batch: &Broadcast) -> Vec<Utf8Bytes>;
    fn done(&self, pull: &Pull) -> Option<Utf8Bytes>;
    fn failed(&self, pull: &Pull, message: &str) -> Utf8Bytes;
}

pub(crate) struct Conn {
    ws: WebSocket,
    pub(crate) log: EventLog,
    pub(crate) store: StoreHandle,
    pub(crate) pull: Option<Pull>,
    send_timeout: Duration,
    _guard: SocketGuard,
}

/// The socket could not take a frame in time, or is gone.
pub(crate) struct Gone;

impl Conn {
    pub(crate) fn new(ws: WebSocket, log: EventLog, store: StoreHandle) -> Conn {
        let guard = store.connect_socket();
        Conn {
            ws,
            send_timeout: log.send_timeout(),
            log,
            store,
            pull: None,
            _guard: guard,
        }
    }

    pub(crate) async fn send(&mut self, frame: impl Into<Utf8Bytes>) -> Result<(), Gone> {
        match tokio::time::timeout(self.send_timeout, self.ws.send(Message::Text(frame.into())))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone),
            Err(_) => {
                tracing::warn!(store = %self.store.id, "a LiveStore socket stalled; closing it");
                Err(Gone)
            }
        }
    }

    /// Sends batches already queued for the live pull (a pusher's own echo
    /// goes out before the push's answer, as LiveStore's backend does).
    pub(crate) async fn flush_live<P: Protocol>(&mut self, protocol: &P) -> Result<(), Gone> {
        while let Some(batch) = self.pull.as_mut().and_then(Pull::try_live) {
            let frames = match &self.pull {
                Some(pull) => protocol.live(pull, &batch),
                None => Vec::new(),
            };
            for frame in frames {
                self.send(frame).await?;
            }
        }
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(self.send_timeout, self.ws.send(Message::Close(Some(frame))))
            .await;
    }
}

enum Input {
    Shutdown,
    Idle,
    Frame(Option<Result<Message, axum::Error>>),
    Step(PullStep),
}

async fn next_step(pull: &mut Option<Pull>, storage: &super::storage::Storage) -> PullStep {
    match pull {
        Some(pull) => pull.step(storage).await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn run<P: Protocol>(mut conn: Conn, mut protocol: P) {
    let mut shutdown = conn.log.shutdown();
    let storage = conn.log.storage().clone();
    let idle = conn.log.idle_timeout();
    let mut deadline = Instant::now() + idle;
    loop {
        let input = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => Input::Shutdown,
            frame = conn.ws.recv() => Input::Frame(frame),
            _ = tokio::time::sleep_until(deadline) => Input::Idle,
            step = next_step(&mut conn.pull, &storage) => Input::Step(step),
        };
        let flow = match input {
            Input::Shutdown => {
                conn.close(CLOSE_GOING_AWAY, "server shutting down").await;
                Flow::Close
            }
            Input::Idle => {
                tracing::debug!(store = %conn.store.id, "LiveStore socket silent too long; closing");
                conn.close(CLOSE_GOING_AWAY, "idle").await;
                Flow::Close
            }
            Input::Frame(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => Flow::Close,
            Input::Frame(Some(Ok(message))) => {
                deadline = Instant::now() + idle;
                match message {
                    Message::Text(text) => protocol.on_text(&mut conn, text.as_str()).await,
                    Message::Binary(bytes) => match std::str::from_utf8(&bytes) {
                        Ok(text) => protocol.on_text(&mut conn, text).await,
                        Err(_) => Flow::Continue,
                    },
                    _ => Flow::Continue,
                }
            }
            Input::Step(step) => send_step(&mut conn, &protocol, step).await,
        };
        if let Flow::Close = flow {
            break;
        }
    }
}

async fn send_step<P: Protocol>(conn: &mut Conn, protocol: &P, step: PullStep) -> Flow {
    let Some(pull) = &conn.pull else {
        return Flow::Continue;
    };
    let frames = match step {
        PullStep::Page { page, remaining } => vec![protocol.page(pull, &page, remaining)],
        PullStep::Empty => vec![protocol.empty(pull)],
        PullStep::Live(batch) => protocol.live(pull, &batch),
        PullStep::Done => {
            let frames = protocol.done(pull).into_iter().collect();
            conn.pull = None;
            frames
        }
        PullStep::Failed(message) => {
            tracing::error!(store = %conn.store.id, error = %message, "a pull failed");
            let frames = vec![protocol.failed(pull, &message)];
            conn.pull = None;
            frames
        }
        PullStep::Ended(reason) => {
            conn.close(CLOSE_RESYNC, reason).await;
            return Flow::Close;
        }
    };
    for frame in frames {
        if conn.send(frame).await.is_err() {
            return Flow::Close;
        }
    }
    Flow::Continue
}
