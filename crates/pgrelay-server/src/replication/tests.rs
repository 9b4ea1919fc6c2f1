//! The replication loop over an in-memory event stream and change log,
//! with tokio's paused clock: the order of logging, publishing and
//! confirming to the slot (promise 2), without PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use pgrelay_pg::pgoutput::Relation;
use pgrelay_pg::{ConnInfo, PgError, StreamEvent};
use pgrelay_protocol::{Change, Lsn, Op, Transaction};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::source::{Catalog, EventSource};
use super::status::ReplicationStatus;
use super::writer::{ChangeLog, Writer};
use super::Replication;
use crate::history::{HistoryError, LoggedTx};
use crate::hub::{Frame, Hub};
use crate::{ServerConfig, ServerError};

/// A confirmation sent to the slot, with what the change log held then.
#[derive(Clone, Debug)]
struct Confirmed {
    lsn: Lsn,
    logged: Vec<Lsn>,
}

/// The stream: events the test sends; positions the loop confirms.
struct Stream {
    events: mpsc::UnboundedReceiver<StreamEvent>,
    confirmed: watch::Sender<Vec<Confirmed>>,
    logged: watch::Receiver<Vec<Lsn>>,
}

impl EventSource for Stream {
    async fn recv(&mut self) -> Result<Option<StreamEvent>, PgError> {
        Ok(self.events.recv().await)
    }

    fn confirm(&self, lsn: Lsn) {
        let logged = self.logged.borrow().clone();
        self.confirmed
            .send_modify(|c| c.push(Confirmed { lsn, logged }));
    }
}

/// No table changes its description in these tests.
struct Unchanged;

impl Catalog for Unchanged {
    async fn relation(&self, _: &Hub, _: &Relation, _: Lsn) -> Result<Option<Frame>, ServerError> {
        Ok(None)
    }
}

/// The change log: each append waits for the test's verdict (`Ok`
/// commits, `Err` fails) and records the commit LSNs it committed.
struct Log {
    verdicts: mpsc::UnboundedReceiver<Result<(), HistoryError>>,
    logged: watch::Sender<Vec<Lsn>>,
}

impl ChangeLog for Log {
    async fn append(&mut self, txs: &[LoggedTx<'_>]) -> Result<(), HistoryError> {
        let verdict = self.verdicts.recv().await;
        verdict.unwrap_or_else(|| Err(HistoryError::CorruptLog("the test ended".into())))?;
        let lsns: Vec<Lsn> = txs.iter().map(|t| t.tx.lsn).collect();
        self.logged.send_modify(|l| l.extend(lsns));
        Ok(())
    }
}

struct Harness {
    events: mpsc::UnboundedSender<StreamEvent>,
    verdicts: mpsc::UnboundedSender<Result<(), HistoryError>>,
    confirmed: watch::Receiver<Vec<Confirmed>>,
    logged: watch::Receiver<Vec<Lsn>>,
    frames: broadcast::Receiver<Frame>,
    hub: Arc<Hub>,
    _stop: watch::Sender<bool>,
    run: JoinHandle<Result<(), ServerError>>,
}

/// Runs the loop with a change log whose head is `logged`.
fn start(logged: Lsn) -> Harness {
    let url = "postgres://nobody@127.0.0.1:1/nothing";
    let hub = Arc::new(Hub::new(64, logged, Vec::new(), false, "log"));
    let info = ConnInfo::parse(url).unwrap();
    let config = ServerConfig::new(url);
    let status = Arc::new(ReplicationStatus::new());
    let replication = Replication {
        election: super::Election::new(&info, &config, "test".into(), Arc::clone(&status)),
        term: None,
        info,
        config,
        hub: Arc::clone(&hub),
        status,
    };
    let frames = hub.subscribe();
    let (events, events_rx) = mpsc::unbounded_channel();
    let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
    let (confirmed_tx, confirmed) = watch::channel(Vec::new());
    let (logged_tx, logged_rx) = watch::channel(Vec::new());
    let (stop, mut shutdown) = watch::channel(false);
    let mut stream = Stream {
        events: events_rx,
        confirmed: confirmed_tx,
        logged: logged_rx.clone(),
    };
    let run = tokio::spawn(async move {
        let log = Log {
            verdicts: verdicts_rx,
            logged: logged_tx,
        };
        let mut writer = Writer::start(
            log,
            Arc::clone(&replication.hub),
            Arc::clone(&replication.status),
            logged,
        );
        // The term is never lost here: its sender lives as long as the loop.
        let (_term, mut lost) = watch::channel(None);
        replication
            .stream(
                &Unchanged,
                &mut stream,
                &mut writer,
                logged,
                &mut lost,
                &mut shutdown,
            )
            .await
    });
    Harness {
        events,
        verdicts,
        confirmed,
        logged: logged_rx,
        frames,
        hub,
        _stop: stop,
        run,
    }
}

fn committed(lsn: u64, end_lsn: u64) -> StreamEvent {
    StreamEvent::Committed {
        tx: Transaction {
            lsn: Lsn(lsn),
            xid: 1,
            commit_time_us: 0,
            origin: None,
            changes: vec![Change {
                table: "public.t".into(),
                op: Op::Insert,
                new: Some([("id".to_owned(), Some(lsn.to_string()))].into()),
                old: None,
            }],
        },
        end_lsn: Lsn(end_lsn),
    }
}

/// Lets every task run until all of them wait: the paused clock moves
/// only when nothing else can.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn until<T>(rx: &mut watch::Receiver<T>, what: &str, cond: impl FnMut(&T) -> bool) {
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(cond))
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen"))
        .expect("the loop is running");
}

fn confirmed(h: &Harness) -> Vec<Lsn> {
    h.confirmed.borrow().iter().map(|c| c.lsn).collect()
}

#[tokio::test(start_paused = true)]
async fn the_slot_is_confirmed_only_after_the_change_log_commits() {
    let mut h = start(Lsn::ZERO);
    h.events.send(committed(100, 110)).unwrap();
    settle().await;
    assert!(
        confirmed(&h).is_empty(),
        "confirmed before the log committed"
    );
    h.verdicts.send(Ok(())).unwrap();
    until(&mut h.confirmed, "confirming 110", |c| {
        c.iter().any(|c| c.lsn == Lsn(110))
    })
    .await;
    for c in h.confirmed.borrow().iter() {
        assert!(
            c.lsn <= Lsn(100) || c.logged.contains(&Lsn(100)),
            "{c:?} confirmed past a transaction the log did not hold"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_transaction_is_published_only_after_it_is_logged() {
    let mut h = start(Lsn::ZERO);
    h.events.send(committed(100, 110)).unwrap();
    settle().await;
    assert!(
        matches!(
            h.frames.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "published before it was logged"
    );
    assert_eq!(h.hub.head(), Lsn::ZERO);
    h.verdicts.send(Ok(())).unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(60), h.frames.recv())
        .await
        .expect("published")
        .unwrap();
    assert!(frame.is_tx);
    assert_eq!(frame.lsn, Lsn(100));
    assert!(h.logged.borrow().contains(&Lsn(100)));
}

#[tokio::test(start_paused = true)]
async fn keepalives_move_the_slot_only_when_nothing_is_in_flight() {
    let mut h = start(Lsn::ZERO);
    // Idle: no transaction open and nothing of ours in flight.
    h.events
        .send(StreamEvent::Idle { wal_end: Lsn(50) })
        .unwrap();
    until(&mut h.confirmed, "answering the keepalive", |c| {
        c.iter().any(|c| c.lsn == Lsn(50))
    })
    .await;
    // With a batch in the writer, a keepalive must not move the slot past it.
    h.events.send(committed(100, 110)).unwrap();
    h.events.send(StreamEvent::Progress).unwrap();
    h.events
        .send(StreamEvent::Idle { wal_end: Lsn(200) })
        .unwrap();
    settle().await;
    assert_eq!(confirmed(&h), vec![Lsn(50)]);
    h.verdicts.send(Ok(())).unwrap();
    until(&mut h.confirmed, "confirming the batch", |c| {
        c.iter().any(|c| c.lsn == Lsn(110))
    })
    .await;
    assert!(!confirmed(&h).contains(&Lsn(200)));
    // The next keepalive, with the log caught up, is answered.
    h.events
        .send(StreamEvent::Idle { wal_end: Lsn(300) })
        .unwrap();
    until(&mut h.confirmed, "answering the next keepalive", |c| {
        c.iter().any(|c| c.lsn == Lsn(300))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_replayed_transaction_only_moves_the_position() {
    let mut h = start(Lsn(100));
    // Already in the log (a replay after a crash): nothing is appended.
    h.events.send(committed(100, 110)).unwrap();
    until(&mut h.confirmed, "confirming the replay", |c| {
        c.iter().any(|c| c.lsn == Lsn(110))
    })
    .await;
    assert!(h.logged.borrow().is_empty());
    assert!(matches!(
        h.frames.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_change_log_failure_stops_the_loop_without_confirming() {
    let mut h = start(Lsn::ZERO);
    h.events.send(committed(100, 110)).unwrap();
    h.verdicts
        .send(Err(HistoryError::CorruptLog("disk full".into())))
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), &mut h.run)
        .await
        .expect("the loop stopped")
        .unwrap();
    assert!(
        matches!(
            result,
            Err(ServerError::History(HistoryError::CorruptLog(_)))
        ),
        "{result:?}"
    );
    assert!(confirmed(&h).is_empty(), "confirmed {:?}", confirmed(&h));
    assert!(matches!(
        h.frames.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
}
