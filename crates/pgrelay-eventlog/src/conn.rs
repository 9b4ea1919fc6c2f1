//! One LiveStore socket: reads frames, answers them through its protocol
//! (0.4 RPC or 0.3 messages), and sends its pulls' pages and live batches
//! (a socket may hold several pulls: LiveStore's devtools open a second
//! live pull on the app's connection).
//! One task per socket; every send has a deadline, so a stalled client is
//! closed instead of holding memory, and its subscription buffer is bounded
//! by the store (a full buffer turns into catch-up from storage).

use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::Extensions;
use futures_util::future::select_all;
use tokio::time::Instant;

use super::limits::FrameBudget;

use super::event::Page;
use super::pull::{Pull, PullStep};
use super::store::{Broadcast, SocketGuard, StoreHandle};
use super::EventLog;

/// Close code sent when the store was reset or the server stops; LiveStore
/// clients reconnect and learn the new backend id.
const CLOSE_RESYNC: u16 = 4000;
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a socket over `--message-rate` (as the row sync's).
const CLOSE_RATE_LIMITED: u16 = 4429;

/// Pulls one socket may hold at once; a further one is refused.
pub(crate) const MAX_PULLS: usize = 16;

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
    /// The socket's pulls, each under its own request id.
    pub(crate) pulls: Vec<Pull>,
    send_timeout: Duration,
    frames: Box<dyn FrameBudget>,
    _guard: SocketGuard,
    /// The upgrade request's extensions, held while the socket lives: the
    /// host keeps the connection's place under its connection limit there.
    _request: Extensions,
}

/// The socket could not take a frame in time, or is gone.
pub(crate) struct Gone;

impl Conn {
    pub(crate) fn new(
        ws: WebSocket,
        log: EventLog,
        store: StoreHandle,
        request: Extensions,
    ) -> Conn {
        let guard = store.connect_socket();
        Conn {
            ws,
            send_timeout: log.send_timeout(),
            frames: log.admission().frames(),
            log,
            store,
            pulls: Vec::new(),
            _guard: guard,
            _request: request,
        }
    }

    /// Adds a pull; one under the same request id is replaced (a client
    /// never reuses an id while its request runs). `Err` past [`MAX_PULLS`].
    pub(crate) fn add_pull(&mut self, pull: Pull) -> Result<(), Pull> {
        if let Some(old) = self
            .pulls
            .iter_mut()
            .find(|p| p.request_id == pull.request_id)
        {
            *old = pull;
            return Ok(());
        }
        if self.pulls.len() >= MAX_PULLS {
            return Err(pull);
        }
        self.pulls.push(pull);
        Ok(())
    }

    /// Removes the pull under `request_id`; whether there was one.
    pub(crate) fn end_pull(&mut self, request_id: &str) -> bool {
        let before = self.pulls.len();
        self.pulls.retain(|p| p.request_id != request_id);
        self.pulls.len() != before
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
        for i in 0..self.pulls.len() {
            while let Some(batch) = self.pulls.get_mut(i).and_then(Pull::try_live) {
                let frames = protocol.live(&self.pulls[i], &batch);
                for frame in frames {
                    self.send(frame).await?;
                }
            }
        }
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        self.close_with(code, reason.to_owned()).await;
    }

    async fn close_with(&mut self, code: u16, reason: String) {
        // A close reason is at most 123 bytes.
        let mut reason = reason;
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        let _ = tokio::time::timeout(self.send_timeout, self.ws.send(Message::Close(Some(frame))))
            .await;
    }
}

enum Input {
    Shutdown,
    Idle,
    Frame(Option<Result<Message, axum::Error>>),
    Step(usize, PullStep),
}

/// The next step of whichever pull has one first, with the pull's index.
async fn next_step(pulls: &mut [Pull], storage: &super::storage::Storage) -> (usize, PullStep) {
    match pulls {
        [] => std::future::pending().await,
        [pull] => (0, pull.step(storage).await),
        pulls => {
            // Every step is cancel-safe, so the ones that lose lose nothing.
            let steps = pulls.iter_mut().map(|p| Box::pin(p.step(storage)));
            let (step, index, _) = select_all(steps).await;
            (index, step)
        }
    }
}

pub(crate) async fn run<P: Protocol>(mut conn: Conn, mut protocol: P) {
    let mut shutdown = conn.log.shutdown();
    // Waited on for the socket's life (a new wait per loop would register
    // with the shutdown signal at every batch sent).
    let stopping = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopping);
    let storage = conn.log.storage().clone();
    let idle = conn.log.idle_timeout();
    // One timer for the socket's life, moved only when the client sends: a
    // new one per loop would register with the timer wheel (a lock shared
    // by every socket) at every live batch sent.
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        let input = tokio::select! {
            biased;
            () = &mut stopping => Input::Shutdown,
            frame = conn.ws.recv() => Input::Frame(frame),
            () = &mut deadline => Input::Idle,
            (index, step) = next_step(&mut conn.pulls, &storage) => Input::Step(index, step),
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
                deadline.as_mut().reset(Instant::now() + idle);
                if let Err(reason) = conn.frames.take() {
                    tracing::debug!(store = %conn.store.id, "LiveStore socket over the message rate; closing");
                    conn.close_with(CLOSE_RATE_LIMITED, reason).await;
                    break;
                }
                match message {
                    Message::Text(text) => protocol.on_text(&mut conn, text.as_str()).await,
                    Message::Binary(bytes) => match std::str::from_utf8(&bytes) {
                        Ok(text) => protocol.on_text(&mut conn, text).await,
                        Err(_) => Flow::Continue,
                    },
                    _ => Flow::Continue,
                }
            }
            Input::Step(index, step) => send_step(&mut conn, &protocol, index, step).await,
        };
        if let Flow::Close = flow {
            break;
        }
    }
}

async fn send_step<P: Protocol>(
    conn: &mut Conn,
    protocol: &P,
    index: usize,
    step: PullStep,
) -> Flow {
    let Some(pull) = conn.pulls.get(index) else {
        return Flow::Continue;
    };
    let frames = match step {
        PullStep::Page { page, remaining } => vec![protocol.page(pull, &page, remaining)],
        PullStep::Empty => vec![protocol.empty(pull)],
        PullStep::Live(batch) => protocol.live(pull, &batch),
        PullStep::Done => {
            let frames = protocol.done(pull).into_iter().collect();
            conn.pulls.remove(index);
            frames
        }
        PullStep::Failed(message) => {
            tracing::error!(store = %conn.store.id, error = %message, "a pull failed");
            let frames = vec![protocol.failed(pull, &message)];
            conn.pulls.remove(index);
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
