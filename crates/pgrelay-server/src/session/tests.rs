//! The live loop over an in-memory socket, with tokio's paused clock: the
//! timeouts and limits that end a session, without PostgreSQL or a network.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::{Sink, Stream};
use pgrelay_pg::ConnInfo;
use pgrelay_protocol::{Change, Op, Transaction};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::*;
use crate::api::ratelimit::IpLimiter;
use crate::auth::Audit;
use crate::history::reader::LogReader;
use crate::hub::Hub;
use crate::ops::metrics::Metrics;
use crate::registry::EmbeddedRegistry;
use crate::replication::lag::LagMonitor;
use crate::replication::status::ReplicationStatus;
use crate::session::table::SessionTable;
use crate::ServerConfig;

/// The server's end of a connection; the test holds the client's.
struct Duplex {
    from_client: mpsc::UnboundedReceiver<Message>,
    to_client: mpsc::UnboundedSender<Message>,
    /// A client that stopped reading: nothing sent completes.
    stalled: bool,
    /// Times the session flushed the socket.
    flushes: usize,
}

impl Stream for Duplex {
    type Item = Result<Message, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().from_client.poll_recv(cx).map(|m| m.map(Ok))
    }
}

impl Sink<Message> for Duplex {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        if self.stalled {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), axum::Error> {
        let _ = self.to_client.send(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        self.get_mut().flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        Poll::Ready(Ok(()))
    }
}

struct Client {
    send: mpsc::UnboundedSender<Message>,
    received: mpsc::UnboundedReceiver<Message>,
}

fn connection(stalled: bool) -> (Duplex, Client) {
    let (to_server, from_client) = mpsc::unbounded_channel();
    let (to_client, received) = mpsc::unbounded_channel();
    let duplex = Duplex {
        from_client,
        to_client,
        stalled,
        flushes: 0,
    };
    let client = Client {
        send: to_server,
        received,
    };
    (duplex, client)
}

/// Everything a live session touches; the PostgreSQL parts connect only
/// when used, and the live loop uses them only to catch up.
fn state(config: ServerConfig) -> AppState {
    let info = ConnInfo::parse("postgres://nobody@127.0.0.1:1/nothing").unwrap();
    let sessions = Arc::new(SessionTable::default());
    let (_, shutdown) = watch::channel(false);
    // A pool connects only when a connection is asked for.
    let pool = pgrelay_pg::Pool::new(&info, 2).unwrap();
    let (audit, _writer) = Audit::start(pool.clone(), shutdown);
    AppState {
        client_catalog: tokio::sync::watch::channel(Default::default()).0,
        hub: Arc::new(Hub::new(16, Lsn::ZERO, Vec::new(), false, "log")),
        log_reader: LogReader::new(pool.clone()),
        replication: Arc::new(ReplicationStatus::new()),
        writer: Arc::new(crate::writes::Writer::new(pool, BTreeMap::new())),
        owners: crate::auth::owners::Owners::new(info.clone()),
        auth: None,
        audit,
        database: info,
        hydrations: Arc::new(Semaphore::new(1)),
        hydrating: Default::default(),
        hydrations_queued: Default::default(),
        registry: Arc::new(EmbeddedRegistry::new(
            Duration::from_secs(60),
            Arc::clone(&sessions),
            "node".into(),
            "run".into(),
        )),
        sessions,
        node: "node".into(),
        instance: "run".into(),
        metrics: Metrics::default(),
        kept: Arc::default(),
        lag: Arc::new(LagMonitor::new(Duration::from_secs(60))),
        connect_limiter: IpLimiter::new(config.connect_rate, config.connect_burst),
        write_limiter: IpLimiter::new(config.connect_rate, config.connect_burst),
        config,
    }
}

fn config() -> ServerConfig {
    ServerConfig::new("postgres://nobody@127.0.0.1:1/nothing")
}

/// Runs the live loop until it ends.
async fn serve(
    state: &AppState,
    socket: &mut Duplex,
    principal: Option<Principal>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Ending, Refusal> {
    let live = state.sessions.open("c1", Lsn::ZERO);
    let frames = state.hub.subscribe();
    let mut session = Session {
        socket,
        state,
        told: 0,
        live,
        subscription: None,
        bucket: TokenBucket::full(state.config.message_burst, std::time::Instant::now()),
        scope: None,
        principal,
        parts: None,
        schema: None,
        corked: false,
    };
    session.serve(frames, None, shutdown).await
}

fn code(result: Result<Ending, Refusal>) -> ErrorCode {
    match result {
        Err(refusal) => refusal.code,
        Ok(ending) => panic!("ended with {ending:?}, not a refusal"),
    }
}

fn transaction(lsn: u64) -> Transaction {
    Transaction {
        lsn: Lsn(lsn),
        xid: 1,
        commit_time_us: 0,
        origin: None,
        changes: vec![Change {
            table: "public.t".into(),
            op: Op::Insert,
            new: Some([("id".to_owned(), Some("1".to_owned()))].into()),
            old: None,
        }],
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_no_ping_is_closed_as_too_slow() {
    let state = state(config());
    let (mut socket, mut client) = connection(false);
    let (_stop, mut shutdown) = watch::channel(false);
    let started = Instant::now();
    let result = serve(&state, &mut socket, None, &mut shutdown).await;
    assert_eq!(code(result), ErrorCode::TooSlow);
    assert!(started.elapsed() > state.config.idle_timeout);
    assert!(matches!(client.received.try_recv(), Ok(Message::Ping(_))));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_stays_connected_until_its_token_expires() {
    let state = state(config());
    let (mut socket, client) = connection(false);
    let (_stop, mut shutdown) = watch::channel(false);
    // The client answers every 10 s, so it never idles out.
    let pongs = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if client.send.send(Message::Pong(Default::default())).is_err() {
                return;
            }
        }
    });
    let principal = Principal {
        subject: Some("alice".into()),
        expires: SystemTime::now() + Duration::from_secs(120),
        scope: Arc::new(Scope::open(1)),
        owner: Some("alice".into()),
    };
    let started = Instant::now();
    let result = serve(&state, &mut socket, Some(principal), &mut shutdown).await;
    assert_eq!(code(result), ErrorCode::TokenExpired);
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_secs(119),
        "closed after {lasted:?}"
    );
    assert!(lasted > state.config.idle_timeout);
    pongs.abort();
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_closed_as_too_slow_after_the_send_timeout() {
    let state = state(config());
    let (mut socket, _client) = connection(true);
    let (_stop, mut shutdown) = watch::channel(false);
    let hub = Arc::clone(&state.hub);
    let publish = tokio::spawn(async move {
        tokio::task::yield_now().await;
        hub.publish(vec![Frame::transaction(transaction(5))]);
    });
    let started = Instant::now();
    let result = serve(&state, &mut socket, None, &mut shutdown).await;
    match result {
        Err(refusal) => {
            assert_eq!(refusal.code, ErrorCode::TooSlow);
            assert!(
                refusal.message.contains("did not read"),
                "{}",
                refusal.message
            );
        }
        Ok(ending) => panic!("ended with {ending:?}"),
    }
    assert!(started.elapsed() >= state.config.send_timeout);
    publish.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_message_rate_is_refused() {
    let mut config = config();
    config.message_rate = 1.0;
    config.message_burst = 3;
    let state = state(config);
    let (mut socket, client) = connection(false);
    let (_stop, mut shutdown) = watch::channel(false);
    for _ in 0..10 {
        client.send.send(Message::Pong(Default::default())).unwrap();
    }
    let result = serve(&state, &mut socket, None, &mut shutdown).await;
    assert_eq!(code(result), ErrorCode::RateLimited);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_session_going_away() {
    let state = state(config());
    let (mut socket, mut client) = connection(false);
    let (stop, mut shutdown) = watch::channel(false);
    let hub = Arc::clone(&state.hub);
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        hub.publish(vec![Frame::transaction(transaction(9))]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.send(true).unwrap();
    });
    let result = serve(&state, &mut socket, None, &mut shutdown).await;
    assert_eq!(result.unwrap(), Ending::Shutdown);
    going_away(&mut socket).await;
    // The live transaction went out before the close.
    let Some(Message::Text(text)) = client.received.recv().await else {
        panic!("no transaction");
    };
    assert!(text.as_str().contains("\"lsn\""));
    let Some(Message::Close(Some(close))) = client.received.recv().await else {
        panic!("no close frame");
    };
    assert_eq!(close.code, 1001);
    stopper.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn frames_waiting_for_a_session_go_out_in_order_with_one_flush() {
    let state = state(config());
    let (mut socket, mut client) = connection(false);
    let (stop, mut shutdown) = watch::channel(false);
    let hub = Arc::clone(&state.hub);
    let reader = async move {
        tokio::task::yield_now().await;
        // Ten transactions published at once: all wait for the session.
        hub.publish(
            (1..=10)
                .map(|lsn| Frame::transaction(transaction(lsn)))
                .collect(),
        );
        let mut lsns = Vec::new();
        while lsns.len() < 10 {
            match client.received.recv().await {
                Some(Message::Text(text)) => {
                    if let Ok(ServerMessage::Tx(tx)) = serde_json::from_str(&text) {
                        lsns.push(tx.lsn.0);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        let _ = stop.send(true);
        lsns
    };
    let (result, lsns) = tokio::join!(serve(&state, &mut socket, None, &mut shutdown), reader);
    assert!(matches!(result, Ok(Ending::Shutdown)), "{result:?}");
    assert_eq!(lsns, (1..=10).collect::<Vec<u64>>());
    assert!(
        socket.flushes <= 2,
        "{} flushes for 10 waiting frames",
        socket.flushes
    );
}
