//! Client writes: a batch of client transactions (the `write` message and
//! the body of `POST /api/changes`) and the server's answer per transaction.

use serde::{Deserialize, Serialize};

use crate::{Op, Row};

/// Most client transactions in one batch.
pub const MAX_WRITE_TRANSACTIONS: usize = 1_000;
/// Most changes in one batch, over all its transactions.
pub const MAX_WRITE_CHANGES: usize = 10_000;

/// A batch of client transactions, applied by the server in one PostgreSQL
/// transaction with a savepoint per client transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBatch {
    /// Names the batch in a refusal; chosen by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The writing client. Required over HTTP; on the WebSocket it is the
    /// `hello`'s client id and may be left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub transactions: Vec<ClientTransaction>,
}

/// Changes a client made together; applied all or none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTransaction {
    /// Unique per client transaction.
    pub id: String,
    pub changes: Vec<ClientChange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientChange {
    /// Unique per change, forever: a change whose id the server has applied
    /// before is not applied again.
    pub id: String,
    /// Schema-qualified table name, e.g. `public.todos`.
    pub table: String,
    /// `insert`, `update` or `delete`.
    pub op: Op,
    /// Insert: the row (NULL columns are left to the server's defaults).
    /// Update: the columns to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Row>,
    /// Update and delete: the row as the client last saw it; holds at least
    /// the primary key and, for a table under a version check, the version
    /// column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Row>,
}

/// The answer to a batch: one result per client transaction, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// PostgreSQL's WAL insert position read right after the batch's
    /// transaction committed: its commit LSN is at most this. A replica
    /// whose position reached it holds every applied write of the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<crate::Lsn>,
    /// The position of the batch's first WAL record: its commit LSN is
    /// above this. The transaction from this client (`origin`) whose
    /// commit LSN lies in `(lsn_floor, lsn]` carries the batch's writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn_floor: Option<crate::Lsn>,
    pub results: Vec<TxResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteStatus {
    /// Committed in PostgreSQL (now, or by an earlier send of the same
    /// change ids).
    Applied,
    /// Refused for good: resending it will not help.
    Rejected,
    /// Not applied because of a fault on the server; send it again later.
    Retry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The table is not synced by this server, or has no primary key.
    UnknownTable,
    /// A column the table does not have.
    UnknownColumn,
    /// The change is missing something (its row, its key, the version).
    InvalidChange,
    /// PostgreSQL refused a value (bad type, out of range, ...).
    InvalidValue,
    /// A constraint (unique, foreign key, check, not null) refused it.
    ConstraintViolation,
    /// The row changed since the client read it (version check), or it no
    /// longer exists.
    Conflict,
    /// Any other error PostgreSQL raised while applying it.
    Database,
    /// The token's rules do not allow this write: the table is read-only
    /// for it, or the row (before or after the change) is outside what it
    /// may write.
    Forbidden,
}

/// What happened to one client transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxResult {
    /// The client transaction's id.
    pub id: String,
    pub status: WriteStatus,
    /// True when the change ids had been applied before (a resend).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
    /// Why it was rejected (PostgreSQL's message where it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a rejection: the server's current version of every row the
    /// transaction touched, so the client can put its replica back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<CurrentRow>,
}

impl TxResult {
    pub fn applied(id: impl Into<String>, duplicate: bool) -> TxResult {
        TxResult {
            id: id.into(),
            status: WriteStatus::Applied,
            duplicate,
            code: None,
            reason: None,
            rows: Vec::new(),
        }
    }

    pub fn retry(id: impl Into<String>, reason: impl Into<String>) -> TxResult {
        TxResult {
            id: id.into(),
            status: WriteStatus::Retry,
            duplicate: false,
            code: None,
            reason: Some(reason.into()),
            rows: Vec::new(),
        }
    }
}

/// A row as the server has it now; `row` is absent when it does not exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRow {
    pub table: String,
    /// The primary key the client used.
    pub key: Row,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<Row>,
}

/// Why a whole batch was refused before anything was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchRefusal {
    /// Not a valid `write` message (missing or wrong fields, duplicate ids,
    /// an operation other than insert/update/delete).
    MalformedBatch,
    /// Over [`MAX_WRITE_TRANSACTIONS`] or [`MAX_WRITE_CHANGES`], or a frame
    /// over the frame limit.
    BatchTooLarge,
}

impl WriteBatch {
    /// Checks what can be checked without the database: sizes, unique ids,
    /// and that each change carries what its operation needs.
    pub fn check(&self) -> Result<(), (BatchRefusal, String)> {
        let malformed = |m: String| Err((BatchRefusal::MalformedBatch, m));
        if self.transactions.len() > MAX_WRITE_TRANSACTIONS {
            return Err((
                BatchRefusal::BatchTooLarge,
                format!(
                    "{} transactions in one batch; the limit is {MAX_WRITE_TRANSACTIONS}",
                    self.transactions.len()
                ),
            ));
        }
        let changes: usize = self.transactions.iter().map(|t| t.changes.len()).sum();
        if changes > MAX_WRITE_CHANGES {
            return Err((
                BatchRefusal::BatchTooLarge,
                format!("{changes} changes in one batch; the limit is {MAX_WRITE_CHANGES}"),
            ));
        }
        let mut tx_ids = std::collections::HashSet::new();
        let mut change_ids = std::collections::HashSet::new();
        for tx in &self.transactions {
            if !valid_id(&tx.id) {
                return malformed(format!("transaction id {:?} is not 1-128 characters of letters, digits, '-', '_', '.', ':'", short(&tx.id)));
            }
            if !tx_ids.insert(tx.id.as_str()) {
                return malformed(format!("transaction id {:?} appears twice", tx.id));
            }
            if tx.changes.is_empty() {
                return malformed(format!("transaction {:?} has no changes", tx.id));
            }
            for change in &tx.changes {
                if !valid_id(&change.id) {
                    return malformed(format!(
                        "change id {:?} in transaction {:?} is not 1-128 characters of letters, digits, '-', '_', '.', ':'",
                        short(&change.id),
                        tx.id
                    ));
                }
                if !change_ids.insert(change.id.as_str()) {
                    return malformed(format!("change id {:?} appears twice", change.id));
                }
                let needs = match change.op {
                    Op::Insert => change.new.is_some(),
                    Op::Update => change.new.is_some() && change.old.is_some(),
                    Op::Delete => change.old.is_some(),
                    Op::Truncate => {
                        return malformed(format!(
                            "change {:?}: clients cannot truncate",
                            change.id
                        ))
                    }
                };
                if !needs {
                    return malformed(format!(
                        "change {:?}: {} needs {}",
                        change.id,
                        change.op.as_str(),
                        match change.op {
                            Op::Insert => "`new`",
                            Op::Update => "`new` and `old`",
                            _ => "`old`",
                        }
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The same rule as client ids.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, op: Op) -> ClientChange {
        let mut row = Row::new();
        row.insert("id".into(), Some("1".into()));
        ClientChange {
            id: id.into(),
            table: "public.t".into(),
            op,
            new: (op != Op::Delete).then(|| row.clone()),
            old: (op != Op::Insert).then_some(row),
        }
    }

    fn batch(txs: Vec<Vec<ClientChange>>) -> WriteBatch {
        WriteBatch {
            batch_id: None,
            client_id: None,
            transactions: txs
                .into_iter()
                .enumerate()
                .map(|(n, changes)| ClientTransaction {
                    id: format!("tx{n}"),
                    changes,
                })
                .collect(),
        }
    }

    #[test]
    fn a_good_batch_passes() {
        let b = batch(vec![
            vec![change("a", Op::Insert), change("b", Op::Update)],
            vec![change("c", Op::Delete)],
        ]);
        assert_eq!(b.check(), Ok(()));
    }

    #[test]
    fn bad_batches_are_refused_whole() {
        let dup = batch(vec![
            vec![change("a", Op::Insert)],
            vec![change("a", Op::Delete)],
        ]);
        assert_eq!(dup.check().unwrap_err().0, BatchRefusal::MalformedBatch);
        let trunc = batch(vec![vec![change("a", Op::Truncate)]]);
        assert_eq!(trunc.check().unwrap_err().0, BatchRefusal::MalformedBatch);
        let mut no_old = change("a", Op::Update);
        no_old.old = None;
        assert_eq!(
            batch(vec![vec![no_old]]).check().unwrap_err().0,
            BatchRefusal::MalformedBatch
        );
        assert_eq!(
            batch(vec![vec![]]).check().unwrap_err().0,
            BatchRefusal::MalformedBatch
        );
        let big = batch(
            (0..=MAX_WRITE_TRANSACTIONS)
                .map(|n| vec![change(&format!("c{n}"), Op::Insert)])
                .collect(),
        );
        assert_eq!(big.check().unwrap_err().0, BatchRefusal::BatchTooLarge);
    }

    #[test]
    fn wire_forms() {
        let text = r#"{"type":"write","batch_id":"b1","transactions":[{"id":"t1","changes":[{"id":"c1","table":"public.todos","op":"update","new":{"done":"t"},"old":{"id":"7"}}]}]}"#;
        let message: crate::ClientMessage = serde_json::from_str(text).unwrap();
        let crate::ClientMessage::Write(batch) = message else {
            panic!("not a write");
        };
        assert_eq!(batch.transactions[0].changes[0].op, Op::Update);
        assert!(serde_json::from_str::<crate::ClientMessage>(
            r#"{"type":"write","transactions":[],"bogus":1}"#
        )
        .is_err());
        let result = crate::ServerMessage::WriteResult(WriteResults {
            lsn: None,
            lsn_floor: None,
            batch_id: Some("b1".into()),
            results: vec![TxResult::applied("t1", false)],
        });
        let text = serde_json::to_string(&result).unwrap();
        assert_eq!(
            text,
            r#"{"type":"write_result","batch_id":"b1","results":[{"id":"t1","status":"applied"}]}"#
        );
        assert_eq!(
            serde_json::from_str::<crate::ServerMessage>(&text).unwrap(),
            result
        );
    }
}
