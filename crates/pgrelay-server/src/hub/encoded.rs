//! A transaction whose row values are serialized to JSON once, then used
//! both for the change log's `data`/`old_data` columns and for the frame
//! every session sends: the hot path never encodes a row twice.

use bytes::BytesMut;
use pgrelay_protocol::{Op, Transaction};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

#[derive(Serialize)]
#[serde(tag = "type", rename = "tx")]
pub(crate) struct EncodedTx {
    pub(crate) lsn: pgrelay_protocol::Lsn,
    pub(crate) xid: u32,
    pub(crate) commit_time_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) origin: Option<String>,
    pub(crate) changes: Vec<EncodedChange>,
}

#[derive(Serialize)]
pub(crate) struct EncodedChange {
    pub(crate) table: String,
    pub(crate) op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) new: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) old: Option<Box<RawValue>>,
}

impl EncodedTx {
    pub(crate) fn new(tx: &Transaction) -> EncodedTx {
        EncodedTx {
            lsn: tx.lsn,
            xid: tx.xid,
            commit_time_us: tx.commit_time_us,
            origin: tx.origin.clone(),
            changes: tx
                .changes
                .iter()
                .map(|c| EncodedChange {
                    table: c.table.clone(),
                    op: c.op,
                    new: c.new.as_ref().map(raw),
                    old: c.old.as_ref().map(raw),
                })
                .collect(),
        }
    }
}

fn raw(row: &pgrelay_protocol::Row) -> Box<RawValue> {
    // A map of strings to optional strings always serializes.
    serde_json::value::to_raw_value(row)
        .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).unwrap_or_default())
}

/// Already-encoded JSON text bound as a `json` or `jsonb` parameter.
#[derive(Debug)]
pub(crate) struct JsonText<'a>(pub(crate) &'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // jsonb's binary format: a version byte, then the text.
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pgrelay_protocol::{Change, Lsn, Op, ServerMessage, Transaction};

    #[test]
    fn encodes_like_the_protocol_type() {
        let mut row = BTreeMap::new();
        row.insert("id".to_owned(), Some("1".to_owned()));
        row.insert("note".to_owned(), None);
        row.insert("quote".to_owned(), Some("say \"hi\"\n".to_owned()));
        let tx = Transaction {
            lsn: Lsn(0x16_0000_0010),
            xid: 7,
            commit_time_us: 1_700_000_000_000_000,
            origin: Some("c1".to_owned()),
            changes: vec![
                Change {
                    table: "public.t".to_owned(),
                    op: Op::Update,
                    new: Some(row.clone()),
                    old: Some(row),
                },
                Change {
                    table: "public.t".to_owned(),
                    op: Op::Truncate,
                    new: None,
                    old: None,
                },
            ],
        };
        let encoded = serde_json::to_string(&super::EncodedTx::new(&tx)).unwrap();
        let decoded: ServerMessage = serde_json::from_str(&encoded).unwrap();
        assert_eq!(decoded, ServerMessage::Tx(tx));
    }
}
