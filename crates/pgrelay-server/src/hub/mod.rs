//! Publishes committed transactions to every live session. Each transaction
//! is encoded once and the same bytes go to every socket; the frame also
//! carries the typed transaction, so a session that sends only part of it
//! (row rules, a subscription to some tables) trims it without decoding
//! the bytes again. The bounded ring
//! of a broadcast channel holds the recent ones; a session that falls
//! further behind is told it lagged and reads the change log instead, so a
//! slow client never makes the server buffer without bound. The hub also
//! holds the change log's identity, and ends every live session when a
//! lost slot starts a new change log.

pub(crate) mod encoded;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use axum::extract::ws::Utf8Bytes;
use pgrelay_protocol::{Lsn, ServerMessage, TableSchema, Transaction};
use tokio::sync::{broadcast, watch};

use crate::auth::Scope;

/// One encoded server message, shared by every session.
#[derive(Clone, Debug)]
pub(crate) struct Frame {
    /// For a transaction, its commit LSN; for a schema change, the LSN of
    /// the transaction it precedes.
    pub(crate) lsn: Lsn,
    pub(crate) is_tx: bool,
    pub(crate) text: Utf8Bytes,
    /// What `text` encodes, for the frames a session may trim.
    pub(crate) content: Content,
    /// The tables a transaction changes or a schema frame describes, once
    /// each, so a session that subscribes to some tables can tell at a
    /// glance whether to send, skip or trim the frame.
    pub(crate) tables: Arc<[String]>,
    /// For a schema frame, the table it announces.
    pub(crate) table: Option<String>,
    /// The change log this session follows ended (a lost slot): the
    /// session ends with `gone`.
    pub(crate) ends_log: bool,
    /// When row rules are configured: the transaction's rows and what each
    /// scope may see of it, worked out once per scope.
    filtered: Option<Arc<Filtered>>,
}

/// Each table once, in first-seen order.
fn distinct<'a>(names: impl Iterator<Item = &'a String>) -> Arc<[String]> {
    let mut seen: Vec<String> = Vec::new();
    for name in names {
        if !seen.contains(name) {
            seen.push(name.clone());
        }
    }
    seen.into()
}

/// The typed message behind a frame's bytes, kept for the kinds a session
/// may send only part of.
#[derive(Clone, Debug)]
pub(crate) enum Content {
    Tx(Arc<Transaction>),
    Schema(Arc<[TableSchema]>),
    /// Sent whole or not at all (errors, results, handshake answers).
    Whole,
}

#[derive(Debug, Default)]
struct Filtered {
    by_scope: Mutex<HashMap<u64, Arc<OnceLock<Option<Frame>>>>>,
}

impl Frame {
    pub(crate) fn encode(message: &ServerMessage, lsn: Lsn) -> Frame {
        let text = serde_json::to_string(message).unwrap_or_else(|e| {
            // Only non-string map keys or failing Serialize impls can make this
            // fail; neither exists in the protocol types.
            tracing::error!(error = %e, "encoding a server message failed");
            String::new()
        });
        let (tables, content) = match message {
            ServerMessage::Tx(tx) => (
                distinct(tx.changes.iter().map(|c| &c.table)),
                Content::Tx(Arc::new(tx.clone())),
            ),
            ServerMessage::Schema { tables } => (
                distinct(tables.iter().map(|t| &t.name)),
                Content::Schema(tables.clone().into()),
            ),
            _ => (Arc::from(Vec::new()), Content::Whole),
        };
        Frame {
            lsn,
            is_tx: matches!(message, ServerMessage::Tx(_)),
            text: text.into(),
            content,
            tables,
            table: None,
            ends_log: false,
            filtered: None,
        }
    }

    /// A transaction whose rows are already encoded (`encoded` is `tx`).
    pub(crate) fn encoded(encoded: &crate::hub::encoded::EncodedTx, tx: Arc<Transaction>) -> Frame {
        Frame::received(serde_json::to_string(encoded).unwrap_or_default(), tx)
    }

    /// A transaction already encoded as `text`, here or by the capturing
    /// node (a follower sends the very bytes its sessions sent).
    pub(crate) fn received(text: String, tx: impl Into<Arc<Transaction>>) -> Frame {
        let tx = tx.into();
        Frame {
            lsn: tx.lsn,
            is_tx: true,
            text: text.into(),
            tables: distinct(tx.changes.iter().map(|c| &c.table)),
            content: Content::Tx(tx),
            table: None,
            ends_log: false,
            filtered: None,
        }
    }

    pub(crate) fn transaction(tx: impl Into<Arc<Transaction>>) -> Frame {
        // Serialize the borrowed transaction without cloning it.
        #[derive(serde::Serialize)]
        #[serde(tag = "type", rename = "tx")]
        struct TxRef<'a> {
            #[serde(flatten)]
            tx: &'a Transaction,
        }
        let tx = tx.into();
        let text = serde_json::to_string(&TxRef { tx: &tx }).unwrap_or_default();
        Frame {
            lsn: tx.lsn,
            is_tx: true,
            text: text.into(),
            tables: distinct(tx.changes.iter().map(|c| &c.table)),
            content: Content::Tx(tx),
            table: None,
            ends_log: false,
            filtered: None,
        }
    }
}

impl Frame {
    /// What `scope` may see of this frame: `None` to send nothing. A
    /// transaction is filtered once per scope; every session of the scope
    /// shares the result.
    pub(crate) fn for_scope(&self, scope: &Scope) -> Option<Frame> {
        if !self.is_tx {
            return match &self.table {
                Some(table) if !scope.can_read_table(table) => None,
                _ => Some(self.clone()),
            };
        }
        let Content::Tx(tx) = &self.content else {
            // Only the hub builds transaction frames, always with their
            // transaction; send nothing rather than something unchecked.
            tracing::error!(lsn = %self.lsn, "a transaction frame without its transaction; withheld from a filtered session");
            return None;
        };
        let filter = || scope.filter_tx(tx).map(Frame::transaction);
        let Some(filtered) = &self.filtered else {
            return filter();
        };
        let slot = {
            let mut by_scope = filtered.by_scope.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(by_scope.entry(scope.id).or_default())
        };
        slot.get_or_init(filter).clone()
    }
}

pub(crate) struct Hub {
    frames: broadcast::Sender<Frame>,
    /// Row rules are configured: frames carry what each scope may see.
    filtering: bool,
    head: watch::Sender<Lsn>,
    /// The WAL position through which every committed change of a synced
    /// table is in the change log and published here: what replication
    /// has confirmed to the slot.
    captured: watch::Sender<Lsn>,
    schemas: RwLock<Schemas>,
    /// The change log's identity (`pgrelay.log_state`): a replica of
    /// another log must hydrate again.
    log_id: RwLock<Arc<str>>,
}

/// What [`Hub::changed_since`] found.
pub(crate) struct SchemaChanges {
    pub(crate) generation: u64,
    pub(crate) tables: Arc<BTreeMap<String, TableSchema>>,
    /// Tables (in `tables`) whose schema changed since the generation asked about.
    pub(crate) changed: Vec<String>,
}

/// The synced tables' schemas, and when each last changed: every change
/// bumps the generation, so a session that remembers the generation it
/// told its client can tell what is new since (whether or not it was
/// listening when the change was published).
#[derive(Default)]
struct Schemas {
    tables: Arc<BTreeMap<String, TableSchema>>,
    changed_at: BTreeMap<String, u64>,
    generation: u64,
}

impl Hub {
    pub(crate) fn new(
        capacity: usize,
        head: Lsn,
        tables: Vec<TableSchema>,
        filtering: bool,
        log_id: &str,
    ) -> Hub {
        let (frames, _) = broadcast::channel(capacity);
        let tables = tables.into_iter().map(|t| (t.name.clone(), t)).collect();
        Hub {
            frames,
            filtering,
            head: watch::Sender::new(head),
            captured: watch::Sender::new(Lsn::ZERO),
            schemas: RwLock::new(Schemas {
                tables: Arc::new(tables),
                ..Schemas::default()
            }),
            log_id: RwLock::new(Arc::from(log_id)),
        }
    }

    pub(crate) fn log_id(&self) -> Arc<str> {
        match self.log_id.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// A new change log replaced the one live sessions follow (its slot was
    /// lost): the head moves to `floor`, where the new log starts, and
    /// every live session is told `gone`. The head moves before the id, so
    /// a session that sees the new id hydrates at the new head.
    pub(crate) fn new_epoch(&self, log_id: &str, floor: Lsn) {
        self.head.send_if_modified(|head| {
            let moved = floor > *head;
            *head = (*head).max(floor);
            moved
        });
        match self.log_id.write() {
            Ok(mut guard) => *guard = Arc::from(log_id),
            Err(poisoned) => *poisoned.into_inner() = Arc::from(log_id),
        }
        let mut frame = Frame::encode(
            &ServerMessage::Error {
                code: pgrelay_protocol::ErrorCode::Gone,
                message: "the replication slot was lost; the server keeps a new change log"
                    .to_owned(),
                upgrade: None,
            },
            Lsn::ZERO,
        );
        frame.ends_log = true;
        // No receivers is fine: nobody is connected.
        let _ = self.frames.send(frame);
    }

    /// Whether row rules are configured.
    pub(crate) fn filtering(&self) -> bool {
        self.filtering
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Frame> {
        self.frames.subscribe()
    }

    /// Commit LSN of the newest transaction in the change log.
    pub(crate) fn head(&self) -> Lsn {
        *self.head.borrow()
    }

    /// The WAL position through which everything is captured.
    pub(crate) fn captured(&self) -> Lsn {
        *self.captured.borrow()
    }

    /// Follows [`Hub::captured`].
    pub(crate) fn watch_captured(&self) -> watch::Receiver<Lsn> {
        self.captured.subscribe()
    }

    /// Replication has everything before `lsn` in the change log and
    /// published (the position never moves back).
    pub(crate) fn set_captured(&self, lsn: Lsn) {
        self.captured.send_if_modified(|captured| {
            let newer = lsn > *captured;
            if newer {
                *captured = lsn;
            }
            newer
        });
    }

    fn read_schemas(&self) -> std::sync::RwLockReadGuard<'_, Schemas> {
        match self.schemas.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(crate) fn schemas(&self) -> Arc<BTreeMap<String, TableSchema>> {
        Arc::clone(&self.read_schemas().tables)
    }

    /// The schemas with their generation, read together.
    pub(crate) fn schemas_at(&self) -> (u64, Arc<BTreeMap<String, TableSchema>>) {
        let schemas = self.read_schemas();
        (schemas.generation, Arc::clone(&schemas.tables))
    }

    /// The current generation and schemas, and the names of the tables
    /// whose schema changed after `generation`, read together.
    pub(crate) fn changed_since(&self, generation: u64) -> SchemaChanges {
        let schemas = self.read_schemas();
        let changed = schemas
            .changed_at
            .iter()
            .filter(|(_, at)| **at > generation)
            .map(|(name, _)| name.clone())
            .collect();
        SchemaChanges {
            generation: schemas.generation,
            tables: Arc::clone(&schemas.tables),
            changed,
        }
    }

    /// Records a table's new schema; returns the frame announcing it.
    pub(crate) fn set_schema(&self, table: TableSchema, before: Lsn) -> Frame {
        let mut frame = Frame::encode(
            &ServerMessage::Schema {
                tables: vec![table.clone()],
            },
            before,
        );
        frame.table = Some(table.name.clone());
        let mut guard = match self.schemas.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.tables.get(&table.name) != Some(&table) {
            guard.generation += 1;
            let generation = guard.generation;
            guard.changed_at.insert(table.name.clone(), generation);
            let mut next = (*guard.tables).clone();
            next.insert(table.name.clone(), table);
            guard.tables = Arc::new(next);
        }
        frame
    }

    /// Publishes frames already durable in the change log, in order.
    pub(crate) fn publish(&self, frames: Vec<Frame>) {
        let mut newest = None;
        for mut frame in frames {
            if self.filtering && frame.is_tx {
                frame.filtered = Some(Arc::default());
            }
            if frame.is_tx {
                newest = Some(frame.lsn);
            }
            // No receivers is fine: nobody is connected.
            let _ = self.frames.send(frame);
        }
        // Never backwards: a head below what a session already holds would
        // make it look ahead of the log.
        if let Some(lsn) = newest {
            self.head.send_if_modified(|head| {
                let moved = lsn > *head;
                *head = (*head).max(lsn);
                moved
            });
        }
    }

    pub(crate) fn sessions(&self) -> usize {
        self.frames.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::{Change, Op};

    fn table(name: &str, columns: &[&str]) -> TableSchema {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "columns": columns.iter().map(|c| serde_json::json!(
                {"name": c, "pg_type": "text", "type_oid": 25, "kind": "text"})).collect::<Vec<_>>(),
            "primary_key": [], "version": 1
        }))
        .unwrap()
    }

    #[test]
    fn schema_changes_are_numbered_so_a_session_finds_what_it_missed() {
        let hub = Hub::new(
            16,
            Lsn::ZERO,
            vec![table("public.a", &["id"])],
            false,
            "log",
        );
        let (told, schemas) = hub.schemas_at();
        assert_eq!(schemas.len(), 1);
        assert!(hub.changed_since(told).changed.is_empty());
        hub.set_schema(table("public.b", &["id"]), Lsn::ZERO);
        hub.set_schema(table("public.a", &["id", "extra"]), Lsn::ZERO);
        // Announcing the same schema again is not a change.
        hub.set_schema(table("public.b", &["id"]), Lsn::ZERO);
        let changes = hub.changed_since(told);
        assert_eq!(changes.changed, vec!["public.a", "public.b"]);
        assert_eq!(changes.tables["public.a"].columns.len(), 2);
        assert!(hub.changed_since(changes.generation).changed.is_empty());
    }

    #[test]
    fn the_captured_position_only_moves_forward() {
        let hub = Hub::new(16, Lsn::ZERO, Vec::new(), false, "log");
        let mut watch = hub.watch_captured();
        hub.set_captured(Lsn(10));
        hub.set_captured(Lsn(5));
        assert_eq!(hub.captured(), Lsn(10));
        assert!(watch.has_changed().unwrap());
        assert_eq!(*watch.borrow_and_update(), Lsn(10));
        hub.set_captured(Lsn(10));
        assert!(!watch.has_changed().unwrap());
    }

    #[test]
    fn a_new_epoch_ends_live_sessions_and_the_head_never_moves_back() {
        let hub = Hub::new(16, Lsn(10), Vec::new(), false, "old");
        let mut live = hub.subscribe();
        hub.new_epoch("new", Lsn(50));
        assert_eq!(&*hub.log_id(), "new");
        assert_eq!(hub.head(), Lsn(50));
        assert!(live.try_recv().unwrap().ends_log);
        // A late frame from before the epoch does not pull the head back.
        let tx = Transaction {
            lsn: Lsn(20),
            xid: 1,
            commit_time_us: 0,
            origin: None,
            changes: Vec::new(),
        };
        hub.publish(vec![Frame::transaction(tx)]);
        assert_eq!(hub.head(), Lsn(50));
    }

    #[test]
    fn a_transaction_is_filtered_once_per_scope() {
        let hub = Hub::new(16, Lsn::ZERO, Vec::new(), true, "log");
        let mut live = hub.subscribe();
        let tx = Transaction {
            lsn: Lsn(7),
            xid: 1,
            commit_time_us: 0,
            origin: None,
            changes: vec![Change {
                table: "public.t".into(),
                op: Op::Insert,
                new: Some([("id".to_owned(), Some("1".to_owned()))].into()),
                old: None,
            }],
        };
        hub.publish(vec![Frame::transaction(tx)]);
        let frame = live.try_recv().unwrap();
        let (one, other) = (Scope::open(1), Scope::open(2));
        let first = frame.for_scope(&one).unwrap();
        let again = frame.clone().for_scope(&one).unwrap();
        // The same bytes: the second session of the scope reused the first's result.
        assert_eq!(first.text.as_str().as_ptr(), again.text.as_str().as_ptr());
        let elsewhere = frame.for_scope(&other).unwrap();
        assert_ne!(
            first.text.as_str().as_ptr(),
            elsewhere.text.as_str().as_ptr()
        );
        assert_eq!(first.text.as_str(), elsewhere.text.as_str());
    }
}
