//! Publishes committed transactions to every live session. Each transaction
//! is encoded once and the same bytes go to every socket. The bounded ring
//! of a broadcast channel holds the recent ones; a session that falls
//! further behind is told it lagged and reads the change log instead, so a
//! slow client never makes the server buffer without bound.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use pgrelay_protocol::{Lsn, ServerMessage, TableSchema, Transaction};
use tokio::sync::{broadcast, watch};

/// One encoded server message, shared by every session.
#[derive(Clone, Debug)]
pub(crate) struct Frame {
    /// For a transaction, its commit LSN; for a schema change, the LSN of
    /// the transaction it precedes.
    pub(crate) lsn: Lsn,
    pub(crate) is_tx: bool,
    pub(crate) text: Utf8Bytes,
    /// The tables a transaction changes or a schema frame describes, once
    /// each, so a session that subscribes to some tables can tell at a
    /// glance whether to send, skip or trim the frame.
    pub(crate) tables: Arc<[String]>,
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

impl Frame {
    pub(crate) fn encode(message: &ServerMessage, lsn: Lsn) -> Frame {
        let text = serde_json::to_string(message).unwrap_or_else(|e| {
            // Only non-string map keys or failing Serialize impls can make this
            // fail; neither exists in the protocol types.
            tracing::error!(error = %e, "encoding a server message failed");
            String::new()
        });
        let tables = match message {
            ServerMessage::Tx(tx) => distinct(tx.changes.iter().map(|c| &c.table)),
            ServerMessage::Schema { tables } => distinct(tables.iter().map(|t| &t.name)),
            _ => Arc::from(Vec::new()),
        };
        Frame {
            lsn,
            is_tx: matches!(message, ServerMessage::Tx(_)),
            text: text.into(),
            tables,
        }
    }

    /// A transaction whose rows are already encoded.
    pub(crate) fn encoded(tx: &crate::encoded::EncodedTx) -> Frame {
        let text = serde_json::to_string(tx).unwrap_or_default();
        Frame {
            lsn: tx.lsn,
            is_tx: true,
            text: text.into(),
            tables: distinct(tx.changes.iter().map(|c| &c.table)),
        }
    }

    pub(crate) fn transaction(tx: &Transaction) -> Frame {
        // Serialize the borrowed transaction without cloning it.
        #[derive(serde::Serialize)]
        #[serde(tag = "type", rename = "tx")]
        struct TxRef<'a> {
            #[serde(flatten)]
            tx: &'a Transaction,
        }
        let text = serde_json::to_string(&TxRef { tx }).unwrap_or_default();
        Frame {
            lsn: tx.lsn,
            is_tx: true,
            text: text.into(),
            tables: distinct(tx.changes.iter().map(|c| &c.table)),
        }
    }
}

pub(crate) struct Hub {
    frames: broadcast::Sender<Frame>,
    head: watch::Sender<Lsn>,
    schemas: RwLock<Arc<BTreeMap<String, TableSchema>>>,
}

impl Hub {
    pub(crate) fn new(capacity: usize, head: Lsn, tables: Vec<TableSchema>) -> Hub {
        let (frames, _) = broadcast::channel(capacity);
        let schemas = tables.into_iter().map(|t| (t.name.clone(), t)).collect();
        Hub {
            frames,
            head: watch::Sender::new(head),
            schemas: RwLock::new(Arc::new(schemas)),
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Frame> {
        self.frames.subscribe()
    }

    /// Commit LSN of the newest transaction in the change log.
    pub(crate) fn head(&self) -> Lsn {
        *self.head.borrow()
    }

    pub(crate) fn schemas(&self) -> Arc<BTreeMap<String, TableSchema>> {
        match self.schemas.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Records a table's new schema; returns the frame announcing it.
    pub(crate) fn set_schema(&self, table: TableSchema, before: Lsn) -> Frame {
        let frame = Frame::encode(
            &ServerMessage::Schema {
                tables: vec![table.clone()],
            },
            before,
        );
        let mut guard = match self.schemas.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = (**guard).clone();
        next.insert(table.name.clone(), table);
        *guard = Arc::new(next);
        frame
    }

    /// Publishes frames already durable in the change log, in order.
    pub(crate) fn publish(&self, frames: Vec<Frame>) {
        let mut newest = None;
        for frame in frames {
            if frame.is_tx {
                newest = Some(frame.lsn);
            }
            // No receivers is fine: nobody is connected.
            let _ = self.frames.send(frame);
        }
        if let Some(lsn) = newest {
            self.head.send_replace(lsn);
        }
    }

    pub(crate) fn sessions(&self) -> usize {
        self.frames.receiver_count()
    }
}
