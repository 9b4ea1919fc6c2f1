//! Client writes as frames, measured on their encoded bytes: batches packed
//! up to the frame limit, and a client transaction too large for one frame
//! split into `write_part` frames ([`encode_alone`]) that the server puts
//! back together ([`Assembly`]) and applies as one transaction.
//!
//! Every change is encoded once; frames are spliced from those encodings
//! (serde's own output for the envelope, with its final empty list filled),
//! so a size computed before sending is the size sent.

mod assembly;

pub use assembly::{Assembly, PartAnswer};

use serde::{Deserialize, Serialize};

use crate::{
    ClientChange, ClientMessage, ClientTransaction, WriteBatch, MAX_CLIENT_FRAME_BYTES,
    MAX_WRITE_CHANGES,
};

/// The most bytes one client transaction may take on the wire: the sum of
/// the frames that carry it. A transaction that fits one frame (1 MiB) is
/// sent in a `write`; a larger one in `write_part` frames, up to this.
pub const MAX_TRANSACTION_BYTES: usize = 8 << 20;

/// One part of a client transaction too large for one frame. Parts are
/// numbered from 0 and sent in order with nothing between them; the server
/// applies the transaction when the part with `last` arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritePart {
    /// Echoed in the answer (`write_result` or `write_refused`); the same
    /// in every part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The client transaction's id; the same in every part.
    pub transaction_id: String,
    /// 0, 1, 2, ...
    pub part: u32,
    /// True on the transaction's final part.
    pub last: bool,
    /// This part's share of the transaction's changes, in order. Always the
    /// last field: frames are spliced from it.
    pub changes: Vec<ClientChange>,
}

/// Why a client transaction cannot be sent at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error(
        "the transaction has {changes} changes; one transaction may have at most {MAX_WRITE_CHANGES}"
    )]
    Changes { changes: usize },
    #[error(
        "change {index} of the transaction (a {table} row) takes {bytes} bytes encoded; one change must fit in a frame of {MAX_CLIENT_FRAME_BYTES} bytes"
    )]
    Change {
        index: usize,
        table: String,
        bytes: usize,
    },
    #[error(
        "the transaction takes {bytes} bytes on the wire; one transaction may take at most {MAX_TRANSACTION_BYTES}"
    )]
    Bytes { bytes: usize },
}

/// A client transaction with each change encoded once.
#[derive(Clone, Debug)]
pub struct EncodedTransaction {
    id: String,
    changes: Vec<String>,
    /// `{"id":...,"changes":[`.
    head: String,
    tables: Vec<String>,
}

impl EncodedTransaction {
    pub fn new(tx: &ClientTransaction) -> EncodedTransaction {
        let changes = tx.changes.iter().map(encode).collect();
        let head = open_list(&ClientTransaction {
            id: tx.id.clone(),
            changes: Vec::new(),
        });
        EncodedTransaction {
            id: tx.id.clone(),
            changes,
            head,
            tables: tx.changes.iter().map(|c| c.table.clone()).collect(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn changes(&self) -> usize {
        self.changes.len()
    }

    /// Bytes of the transaction's JSON inside a batch.
    pub fn len(&self) -> usize {
        self.head.len() + list_len(&self.changes) + CLOSE.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn push_json(&self, out: &mut String) {
        out.push_str(&self.head);
        push_list(out, &self.changes);
        out.push_str(CLOSE);
    }
}

/// A `write` frame being packed with whole transactions.
#[derive(Debug)]
pub struct BatchFrame {
    /// `{"type":"write",...,"transactions":[`.
    head: String,
    transactions: Vec<EncodedTransaction>,
    len: usize,
    changes: usize,
}

impl BatchFrame {
    pub fn new(batch_id: Option<&str>) -> BatchFrame {
        let head = open_list(&ClientMessage::Write(WriteBatch {
            batch_id: batch_id.map(str::to_owned),
            client_id: None,
            transactions: Vec::new(),
        }));
        let len = head.len() + CLOSE.len();
        BatchFrame {
            head,
            transactions: Vec::new(),
            len,
            changes: 0,
        }
    }

    /// The frame's length with `tx` added.
    pub fn len_with(&self, tx: &EncodedTransaction) -> usize {
        self.len + usize::from(!self.transactions.is_empty()) + tx.len()
    }

    /// Whether `tx` fits in this frame within the protocol's limits.
    pub fn fits(&self, tx: &EncodedTransaction) -> bool {
        self.len_with(tx) <= MAX_CLIENT_FRAME_BYTES
            && self.changes + tx.changes() <= MAX_WRITE_CHANGES
            && self.transactions.len() < crate::MAX_WRITE_TRANSACTIONS
    }

    pub fn push(&mut self, tx: EncodedTransaction) {
        self.len = self.len_with(&tx);
        self.changes += tx.changes();
        self.transactions.push(tx);
    }

    pub fn transactions(&self) -> impl Iterator<Item = &str> {
        self.transactions.iter().map(|t| t.id.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.transactions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn changes(&self) -> usize {
        self.changes
    }

    pub fn into_frame(self) -> String {
        let mut out = String::with_capacity(self.len);
        out.push_str(&self.head);
        for (n, tx) in self.transactions.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            tx.push_json(&mut out);
        }
        out.push_str(CLOSE);
        out
    }
}

/// How a transaction goes out when sent alone: its frames' sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Changes per frame, in order: one entry for a `write`, several for
    /// `write_part` frames.
    parts: Vec<usize>,
    /// Bytes of each frame.
    sizes: Vec<usize>,
}

impl Layout {
    /// How many frames carry the transaction.
    pub fn frames(&self) -> usize {
        self.sizes.len()
    }

    /// The sum of the frames' lengths.
    pub fn bytes(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// Whether it needs `write_part` frames.
    pub fn is_split(&self) -> bool {
        self.parts.len() > 1
    }
}

/// Lays out `tx` sent alone under `batch_id`: one `write` frame when it
/// fits, else `write_part` frames, each filled up to the frame limit.
pub fn layout(batch_id: Option<&str>, tx: &EncodedTransaction) -> Result<Layout, TooLarge> {
    if tx.changes() > MAX_WRITE_CHANGES {
        return Err(TooLarge::Changes {
            changes: tx.changes(),
        });
    }
    let alone = BatchFrame::new(batch_id).len_with(tx);
    if alone <= MAX_CLIENT_FRAME_BYTES {
        return Ok(Layout {
            parts: vec![tx.changes()],
            sizes: vec![alone],
        });
    }
    let mut parts = Vec::new();
    let mut sizes = Vec::new();
    let mut next = 0;
    while next < tx.changes.len() {
        // Measured with `"last":false`, the longer of the two; the final
        // part's frame is one byte shorter.
        let head = part_head(batch_id, &tx.id, part_number(parts.len()), false).len() + CLOSE.len();
        let mut len = head;
        let mut count = 0;
        for change in &tx.changes[next..] {
            let added = change.len() + usize::from(count > 0);
            if len + added > MAX_CLIENT_FRAME_BYTES {
                break;
            }
            len += added;
            count += 1;
        }
        if count == 0 {
            return Err(TooLarge::Change {
                index: next,
                table: tx.tables.get(next).cloned().unwrap_or_default(),
                bytes: tx.changes[next].len(),
            });
        }
        next += count;
        parts.push(count);
        sizes.push(if next == tx.changes.len() {
            len - 1
        } else {
            len
        });
    }
    let layout = Layout { parts, sizes };
    if layout.bytes() > MAX_TRANSACTION_BYTES {
        return Err(TooLarge::Bytes {
            bytes: layout.bytes(),
        });
    }
    Ok(layout)
}

/// The frames that carry `tx` alone, as [`layout`] says.
pub fn encode_alone(
    batch_id: Option<&str>,
    tx: EncodedTransaction,
) -> Result<Vec<String>, TooLarge> {
    let layout = layout(batch_id, &tx)?;
    if !layout.is_split() {
        let mut frame = BatchFrame::new(batch_id);
        frame.push(tx);
        return Ok(vec![frame.into_frame()]);
    }
    let mut frames = Vec::with_capacity(layout.parts.len());
    let mut changes = tx.changes.iter();
    let count = layout.parts.len();
    for (n, (&take, &size)) in layout.parts.iter().zip(&layout.sizes).enumerate() {
        let last = n + 1 == count;
        let mut out = String::with_capacity(size);
        out.push_str(&part_head(batch_id, &tx.id, part_number(n), last));
        let part: Vec<&String> = changes.by_ref().take(take).collect();
        for (i, change) in part.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(change);
        }
        out.push_str(CLOSE);
        frames.push(out);
    }
    Ok(frames)
}

/// A part's number: parts are at least a kilobyte and a transaction at
/// most `MAX_TRANSACTION_BYTES`, so it always fits.
fn part_number(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn part_head(batch_id: Option<&str>, tx_id: &str, part: u32, last: bool) -> String {
    open_list(&ClientMessage::WritePart(WritePart {
        batch_id: batch_id.map(str::to_owned),
        transaction_id: tx_id.to_owned(),
        part,
        last,
        changes: Vec::new(),
    }))
}

const CLOSE: &str = "]}";

fn encode(change: &ClientChange) -> String {
    // Serialising plain strings and maps to a String cannot fail.
    serde_json::to_string(change).unwrap_or_default()
}

/// `value`'s JSON up to (and with) the `[` of its last field, an empty list.
fn open_list<T: Serialize>(value: &T) -> String {
    let mut json = serde_json::to_string(value).unwrap_or_default();
    if json.ends_with("[]}") {
        json.truncate(json.len() - CLOSE.len());
    }
    json
}

fn list_len(items: &[String]) -> usize {
    items.iter().map(String::len).sum::<usize>() + items.len().saturating_sub(1)
}

fn push_list(out: &mut String, items: &[String]) {
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
}

#[cfg(test)]
mod tests;
