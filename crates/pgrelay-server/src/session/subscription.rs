//! The tables a client syncs. A frame that touches only those goes out as
//! it is (the shared bytes); one that touches none is skipped; a
//! transaction that touches both is trimmed to the client's tables and
//! encoded again for this session alone.

use std::collections::{BTreeMap, BTreeSet};

use pgrelay_protocol::{ErrorCode, ServerMessage, TableSchema, Transaction};

use super::Refusal;
use crate::hub::{Content, Frame};

/// Most tables a `hello` may name.
const MAX_TABLES: usize = 1_000;

#[derive(Debug)]
pub(crate) struct Subscription {
    tables: BTreeSet<String>,
}

/// What to do with a frame.
pub(crate) enum Pass {
    Send(Frame),
    Skip,
}

impl Subscription {
    /// Resolves the names a client asked for (`todos` means `public.todos`)
    /// against the synced tables; `None` when it asked for all of them.
    pub(crate) fn resolve(
        asked: Option<Vec<String>>,
        synced: &BTreeMap<String, TableSchema>,
    ) -> Result<Option<Subscription>, Refusal> {
        let Some(asked) = asked else {
            return Ok(None);
        };
        if asked.is_empty() || asked.len() > MAX_TABLES {
            return Err(Refusal::new(
                ErrorCode::MalformedFrame,
                format!("tables: name 1 to {MAX_TABLES} tables, or leave it out for all"),
            ));
        }
        let mut tables = BTreeSet::new();
        for name in asked {
            let qualified = if name.contains('.') {
                name.clone()
            } else {
                format!("public.{name}")
            };
            match synced.get(&qualified) {
                Some(schema) if schema.skipped.is_none() => {
                    tables.insert(qualified);
                }
                _ => {
                    let name: String = name.chars().take(128).collect();
                    return Err(Refusal::new(
                        ErrorCode::UnknownTable,
                        format!("this server does not sync a table {name:?}"),
                    ));
                }
            }
        }
        Ok(Some(Subscription { tables }))
    }

    pub(crate) fn wants(&self, table: &str) -> bool {
        self.tables.contains(table)
    }

    /// The frame as this client may see it. Frames about no table (errors,
    /// results) always pass.
    pub(crate) fn pass(&self, frame: Frame) -> Pass {
        if frame.tables.is_empty() {
            return Pass::Send(frame);
        }
        let wanted = frame.tables.iter().filter(|t| self.wants(t)).count();
        if wanted == frame.tables.len() {
            return Pass::Send(frame);
        }
        if wanted == 0 {
            return Pass::Skip;
        }
        // A mixed frame: keep this client's part of what it carries, encode
        // again.
        match &frame.content {
            Content::Tx(tx) => match self.trimmed(tx) {
                Some(tx) => Pass::Send(Frame::transaction(tx)),
                None => Pass::Skip,
            },
            Content::Schema(tables) => Pass::Send(Frame::encode(
                &ServerMessage::Schema {
                    tables: tables
                        .iter()
                        .filter(|t| self.wants(&t.name))
                        .cloned()
                        .collect(),
                },
                frame.lsn,
            )),
            Content::Whole => {
                tracing::error!(lsn = %frame.lsn, "a frame naming tables carries no message to trim; skipped for a subscriber");
                Pass::Skip
            }
        }
    }

    /// A copy of the transaction with only this client's changes; `None`
    /// if none.
    fn trimmed(&self, tx: &Transaction) -> Option<Transaction> {
        let changes: Vec<_> = tx
            .changes
            .iter()
            .filter(|c| self.wants(&c.table))
            .cloned()
            .collect();
        (!changes.is_empty()).then(|| Transaction {
            lsn: tx.lsn,
            xid: tx.xid,
            commit_time_us: tx.commit_time_us,
            origin: tx.origin.clone(),
            changes,
        })
    }

    /// The transaction with only this client's changes; `None` if none.
    pub(crate) fn trim(&self, mut tx: Transaction) -> Option<Transaction> {
        tx.changes.retain(|c| self.wants(&c.table));
        (!tx.changes.is_empty()).then_some(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::{Change, Lsn, Op};

    fn schemas(names: &[&str]) -> BTreeMap<String, TableSchema> {
        names
            .iter()
            .map(|n| {
                let schema: TableSchema = serde_json::from_value(serde_json::json!({
                    "name": n, "columns": [], "primary_key": [], "version": 1
                }))
                .unwrap();
                (n.to_string(), schema)
            })
            .collect()
    }

    fn tx(tables: &[&str]) -> Transaction {
        Transaction {
            lsn: Lsn(7),
            xid: 1,
            commit_time_us: 0,
            origin: None,
            changes: tables
                .iter()
                .map(|t| Change {
                    table: t.to_string(),
                    op: Op::Delete,
                    new: None,
                    old: Some([("id".to_owned(), Some("1".to_owned()))].into()),
                })
                .collect(),
        }
    }

    #[test]
    fn names_resolve_or_are_refused() {
        let synced = schemas(&["public.a", "public.b", "app.c"]);
        let sub = Subscription::resolve(Some(vec!["a".into(), "app.c".into()]), &synced)
            .unwrap()
            .unwrap();
        assert!(sub.wants("public.a") && sub.wants("app.c") && !sub.wants("public.b"));
        assert!(Subscription::resolve(None, &synced).unwrap().is_none());
        let refused = Subscription::resolve(Some(vec!["nope".into()]), &synced).unwrap_err();
        assert_eq!(refused.code, ErrorCode::UnknownTable);
        let refused = Subscription::resolve(Some(vec![]), &synced).unwrap_err();
        assert_eq!(refused.code, ErrorCode::MalformedFrame);
    }

    #[test]
    fn frames_are_sent_skipped_or_trimmed() {
        let synced = schemas(&["public.a", "public.b"]);
        let sub = Subscription::resolve(Some(vec!["a".into()]), &synced)
            .unwrap()
            .unwrap();
        let only_a = Frame::transaction(tx(&["public.a"]));
        match sub.pass(only_a.clone()) {
            Pass::Send(f) => assert_eq!(f.text, only_a.text),
            Pass::Skip => panic!("skipped its own table"),
        }
        assert!(matches!(
            sub.pass(Frame::transaction(tx(&["public.b"]))),
            Pass::Skip
        ));
        match sub.pass(Frame::transaction(tx(&[
            "public.b", "public.a", "public.b",
        ]))) {
            Pass::Send(f) => {
                let ServerMessage::Tx(t) = serde_json::from_str(f.text.as_str()).unwrap() else {
                    panic!("not a tx")
                };
                assert_eq!(t, tx(&["public.a"]));
                assert_eq!(f.lsn, Lsn(7));
            }
            Pass::Skip => panic!("skipped a mixed transaction"),
        }
        let caught_up = Frame::encode(
            &ServerMessage::CaughtUp {
                lsn: Lsn(1),
                wal_lsn: None,
            },
            Lsn(1),
        );
        assert!(matches!(sub.pass(caught_up), Pass::Send(_)));
    }
}
