//! Local writes as the capture triggers recorded them in `_pgrelay_outbox`,
//! read back and turned into the protocol's client changes (PostgreSQL
//! input text per column).

use std::collections::HashMap;

use pgrelay_protocol::{ClientChange, Op, Row, TableSchema, ValueKind};
use rusqlite::Connection;

use crate::ClientError;

const COLUMNS: &str = "tx_id, change_id, table_name, op, new_row, old_row";

/// One captured change of a client transaction.
pub(crate) struct Captured {
    pub(crate) tx_id: String,
    pub(crate) change_id: String,
    pub(crate) table: String,
    pub(crate) op: String,
    pub(crate) new: Option<String>,
    pub(crate) old: Option<String>,
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Captured> {
    Ok(Captured {
        tx_id: r.get(0)?,
        change_id: r.get(1)?,
        table: r.get(2)?,
        op: r.get(3)?,
        new: r.get(4)?,
        old: r.get(5)?,
    })
}

/// Local writes the server has not confirmed (pending or sent), oldest
/// first; at most `limit` of them.
pub(crate) fn unconfirmed(
    conn: &Connection,
    limit: Option<usize>,
) -> Result<Vec<Captured>, ClientError> {
    // SQLite reads a negative LIMIT as none.
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM _pgrelay_outbox WHERE status IN ('pending', 'sent') ORDER BY seq LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit], from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Local writes in flight (see `rebase`), oldest first: unanswered ones
/// whose echo has not arrived, and applied ones awaiting their echo.
pub(crate) fn in_flight(conn: &Connection) -> Result<Vec<Captured>, ClientError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS}, seq FROM _pgrelay_outbox o WHERE status IN ('pending', 'sent') \
           AND NOT EXISTS (SELECT 1 FROM _pgrelay_landing l WHERE l.tx_id = o.tx_id AND l.echoed = 1) \
         UNION ALL \
         SELECT {COLUMNS}, seq FROM _pgrelay_outbox WHERE status = 'applied' \
           AND tx_id IN (SELECT tx_id FROM _pgrelay_landing WHERE echoed = 0) \
         ORDER BY seq"
    ))?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Every captured change of the client transaction `tx_id`, in order.
pub(crate) fn of_transaction(conn: &Connection, tx_id: &str) -> Result<Vec<Captured>, ClientError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM _pgrelay_outbox WHERE tx_id = ?1 ORDER BY seq"
    ))?;
    let rows = stmt.query_map([tx_id], from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// A captured change as the protocol sends it.
pub(crate) fn to_client_change(
    captured: &Captured,
    tables: &HashMap<String, TableSchema>,
) -> Result<ClientChange, ClientError> {
    let op = Op::parse(&captured.op)
        .ok_or_else(|| ClientError::Replica(format!("outbox op {:?}", captured.op)))?;
    let table = tables.get(&captured.table);
    let new = captured
        .new
        .as_deref()
        .map(|j| row_from_json(j, table))
        .transpose()?;
    let old = captured
        .old
        .as_deref()
        .map(|j| row_from_json(j, table))
        .transpose()?;
    let new = match (op, new, &old) {
        // Only the columns the update changed, so concurrent writers of
        // other columns of the same row do not undo each other.
        (Op::Update, Some(new), Some(old)) => Some(
            new.into_iter()
                .filter(|(k, v)| old.get(k) != Some(v))
                .collect(),
        ),
        (_, new, _) => new,
    };
    Ok(ClientChange {
        id: captured.change_id.clone(),
        table: captured.table.clone(),
        op,
        new,
        old,
    })
}

/// A captured row (JSON from the triggers) as PostgreSQL text values.
pub(crate) fn row_from_json(json: &str, table: Option<&TableSchema>) -> Result<Row, ClientError> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| ClientError::Replica(format!("outbox row: {e}")))?;
    Ok(map
        .into_iter()
        .map(|(column, value)| {
            let kind = table
                .and_then(|t| t.column(&column))
                .map_or(ValueKind::Text, |c| c.kind);
            let text = pg_text(kind, &value);
            (column, text)
        })
        .collect())
}

/// PostgreSQL input text for a value SQLite stored in a column of `kind`.
pub(crate) fn pg_text(kind: ValueKind, value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::Null => None,
        Value::Bool(b) => Some(if *b { "t" } else { "f" }.to_owned()),
        Value::Number(n) => Some(match (kind, n.as_i64()) {
            (ValueKind::Bool, Some(i)) => if i != 0 { "t" } else { "f" }.to_owned(),
            (_, Some(i)) => i.to_string(),
            (_, None) => match n.as_f64() {
                Some(f) => format!("{f:?}"),
                None => n.to_string(),
            },
        }),
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sqlite_values_become_postgres_text() {
        assert_eq!(pg_text(ValueKind::Integer, &json!(42)), Some("42".into()));
        assert_eq!(pg_text(ValueKind::Bool, &json!(1)), Some("t".into()));
        assert_eq!(pg_text(ValueKind::Bool, &json!(0)), Some("f".into()));
        assert_eq!(pg_text(ValueKind::Float, &json!(0.5)), Some("0.5".into()));
        assert_eq!(
            pg_text(ValueKind::Float, &json!(1e300)),
            Some("1e300".into())
        );
        assert_eq!(pg_text(ValueKind::Text, &json!("a'b")), Some("a'b".into()));
        assert_eq!(pg_text(ValueKind::Text, &json!(null)), None);
    }

    #[test]
    fn updates_send_only_changed_columns() {
        let captured = Captured {
            tx_id: "t".into(),
            change_id: "c".into(),
            table: "public.todos".into(),
            op: "update".into(),
            new: Some(r#"{"id":7,"title":"new","done":0}"#.into()),
            old: Some(r#"{"id":7,"title":"old","done":0}"#.into()),
        };
        let change = to_client_change(&captured, &HashMap::new()).unwrap();
        let new = change.new.unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(new["title"], Some("new".to_owned()));
        assert_eq!(change.old.unwrap()["id"], Some("7".to_owned()));
    }
}
