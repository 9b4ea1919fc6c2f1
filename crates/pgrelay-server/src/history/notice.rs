//! The payload of the `NOTIFY` each change-log append sends in its own
//! commit. It says where the append starts (the log's head before it) and,
//! when they fit, carries the appended transactions' frames themselves, so
//! a following node publishes small transactions without a round trip to
//! PostgreSQL. An append too big to carry, or a notice the follower cannot
//! place right after its own head, sends the follower to the log instead.

use std::collections::BTreeMap;

use pgrelay_protocol::{Lsn, ServerMessage, Transaction};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::LoggedTx;

/// PostgreSQL refuses a payload of 8,000 bytes or more; this leaves room.
pub(crate) const MAX_PAYLOAD: usize = 7_500;

/// The payload for an append of `txs` to the log `log_id` whose head was
/// `after`, capturing through `end`: the transactions themselves when the
/// whole fits in [`MAX_PAYLOAD`], else only the new head (what older nodes
/// sent for every append: the follower reads the log).
pub(crate) fn appended(log_id: &str, after: Lsn, end: Lsn, txs: &[LoggedTx<'_>]) -> String {
    let head = txs.last().map_or(end, |t| t.tx.lsn);
    let frames: usize = txs.iter().map(|t| t.frame.len() + 1).sum();
    if txs.is_empty() || frames > MAX_PAYLOAD {
        return head.to_string();
    }
    // The highest schema version of each table the append touches: a
    // follower that knows an older one reads the log, which announces the
    // new schema before the transaction.
    let mut versions: BTreeMap<&str, u32> = BTreeMap::new();
    for logged in txs {
        for (change, version) in logged.tx.changes.iter().zip(logged.schema_versions) {
            let v = versions.entry(change.table.as_str()).or_default();
            *v = (*v).max(*version);
        }
    }
    let mut out = String::with_capacity(frames + 160);
    out.push_str("{\"log\":");
    out.push_str(&json(log_id));
    out.push_str(",\"after\":\"");
    out.push_str(&after.to_string());
    out.push_str("\",\"end\":\"");
    out.push_str(&end.to_string());
    out.push_str("\",\"versions\":");
    out.push_str(&json(&versions));
    out.push_str(",\"txs\":[");
    for (i, logged) in txs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Already JSON: the very frame the capturing node's sessions send.
        out.push_str(logged.frame);
    }
    out.push_str("]}");
    if out.len() > MAX_PAYLOAD {
        return head.to_string();
    }
    out
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Strings and maps of strings to numbers always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

/// What a notification on the change log's channel tells a follower.
#[derive(Debug)]
pub(crate) enum Notice {
    /// An append that carries its transactions.
    Appended(Appended),
    /// Only a position (an append too big to carry, a renewal of the
    /// capture term, or a payload this node cannot read): read the log.
    Position(Option<Lsn>),
}

#[derive(Debug)]
pub(crate) struct Appended {
    /// The change log's identity.
    pub(crate) log: String,
    /// The log's head before the append: the transactions follow it directly.
    pub(crate) after: Lsn,
    /// How far the log is captured once the append committed.
    pub(crate) end: Lsn,
    /// Each table's highest schema version in the append.
    pub(crate) versions: BTreeMap<String, u32>,
    /// Each transaction with the frame text sessions send for it.
    pub(crate) txs: Vec<(String, Transaction)>,
}

impl Appended {
    /// The commit LSN of the newest transaction carried.
    pub(crate) fn head(&self) -> Lsn {
        self.txs.last().map_or(self.after, |(_, tx)| tx.lsn)
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    log: String,
    after: Lsn,
    end: Lsn,
    versions: BTreeMap<String, u32>,
    #[serde(borrow)]
    txs: Vec<&'a RawValue>,
}

/// Reads a notification's payload. Never fails: what it cannot read is a
/// [`Notice::Position`] (reading the log is always correct).
pub(crate) fn parse(payload: &str) -> Notice {
    if !payload.starts_with('{') {
        return Notice::Position(payload.parse().ok());
    }
    let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(payload) else {
        return Notice::Position(None);
    };
    let mut txs = Vec::with_capacity(incoming.txs.len());
    for raw in incoming.txs {
        match serde_json::from_str::<ServerMessage>(raw.get()) {
            Ok(ServerMessage::Tx(tx)) => txs.push((raw.get().to_owned(), tx)),
            _ => return Notice::Position(None),
        }
    }
    // Carried in commit order, each after the last: anything else is read.
    let ordered = txs.iter().try_fold(incoming.after, |at, (_, tx)| {
        (tx.lsn > at).then_some(tx.lsn)
    });
    if txs.is_empty() || ordered.is_none() {
        return Notice::Position(Some(incoming.end));
    }
    Notice::Appended(Appended {
        log: incoming.log,
        after: incoming.after,
        end: incoming.end,
        versions: incoming.versions,
        txs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::encoded::EncodedTx;
    use pgrelay_protocol::{Change, Op};

    fn tx(lsn: u64, body: &str) -> Transaction {
        Transaction {
            lsn: Lsn(lsn),
            xid: 9,
            commit_time_us: 1_700_000_000_000_000,
            origin: Some("c\"1".to_owned()),
            changes: vec![Change {
                table: "public.t".to_owned(),
                op: Op::Insert,
                new: Some([("body".to_owned(), Some(body.to_owned()))].into()),
                old: None,
            }],
        }
    }

    fn payload(txs: &[Transaction], versions: &[u32]) -> String {
        let encoded: Vec<(EncodedTx, String)> = txs
            .iter()
            .map(|t| {
                let e = EncodedTx::new(t);
                let text = serde_json::to_string(&e).unwrap();
                (e, text)
            })
            .collect();
        let logged: Vec<LoggedTx<'_>> = encoded
            .iter()
            .map(|(tx, frame)| LoggedTx {
                tx,
                schema_versions: versions,
                frame,
            })
            .collect();
        appended("log-1", Lsn(10), Lsn(30), &logged)
    }

    #[test]
    fn small_appends_carry_their_transactions_as_sessions_see_them() {
        let sent = [tx(20, "a \"quoted\"\nline"), tx(30, "b")];
        let Notice::Appended(got) = parse(&payload(&sent, &[4])) else {
            panic!("a small append carries its transactions");
        };
        assert_eq!(
            (got.log.as_str(), got.after, got.end),
            ("log-1", Lsn(10), Lsn(30))
        );
        assert_eq!(got.versions, [("public.t".to_owned(), 4)].into());
        assert_eq!(got.head(), Lsn(30));
        let txs: Vec<_> = got.txs.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(txs, sent);
        let frame: ServerMessage = serde_json::from_str(&got.txs[0].0).unwrap();
        assert_eq!(frame, ServerMessage::Tx(sent[0].clone()));
    }

    #[test]
    fn big_appends_and_unreadable_payloads_send_the_follower_to_the_log() {
        let big = tx(20, &"x".repeat(MAX_PAYLOAD));
        let sent = payload(&[big], &[1]);
        assert!(sent.len() < 100, "only the head: {sent}");
        assert!(matches!(parse(&sent), Notice::Position(Some(Lsn(20)))));
        assert!(matches!(parse("0/1A"), Notice::Position(Some(Lsn(0x1a)))));
        assert!(matches!(parse("{\"log\":1}"), Notice::Position(None)));
        assert!(matches!(parse(""), Notice::Position(None)));
    }

    #[test]
    fn transactions_out_of_order_are_not_trusted() {
        // The second is not after the first.
        let sent = payload(&[tx(30, "a"), tx(20, "b")], &[1]);
        assert!(matches!(parse(&sent), Notice::Position(Some(Lsn(30)))));
        // The first is not after the position the append follows.
        let sent = payload(&[tx(5, "a")], &[1]);
        assert!(matches!(parse(&sent), Notice::Position(Some(_))));
    }
}
