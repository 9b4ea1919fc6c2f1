//! Brings local writes still waiting in the outbox onto a table's new
//! shape when the server renames it or its columns: a write made offline
//! against the old names is sent under the new ones and lands. PostgreSQL
//! keeps a table's OID across RENAME TABLE and a column's number (`attnum`)
//! across RENAME COLUMN; the server sends both, so a rename is told apart
//! from a drop and an add. A write that sets a dropped column is left as
//! it was: the server refuses it with the reason (the column does not
//! exist), and the replica puts its rows back. Nothing is lost in silence.

use std::collections::HashMap;

use pgrelay_protocol::TableSchema;
use rusqlite::{params, Connection};
use serde_json::{Map, Value};

use crate::ClientError;

/// What changed in one table between the schema the replica knew and the
/// one that arrived.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Reshape {
    /// The table's former name, when it was renamed.
    pub(crate) renamed_from: Option<String>,
    /// Renamed columns: (old name, new name).
    pub(crate) columns: Vec<(String, String)>,
    /// Columns the server dropped.
    pub(crate) dropped: Vec<String>,
}

impl Reshape {
    fn is_empty(&self) -> bool {
        self.renamed_from.is_none() && self.columns.is_empty() && self.dropped.is_empty()
    }
}

/// How `incoming` differs from what `known` held of the same table (found
/// by name, or by OID under its former name).
pub(crate) fn compare(known: &HashMap<String, TableSchema>, incoming: &TableSchema) -> Reshape {
    let mut reshape = Reshape::default();
    if incoming.skipped.is_some() {
        return reshape;
    }
    let before = match known.get(&incoming.name) {
        Some(same) => Some(same),
        None => incoming.oid.and_then(|oid| {
            known
                .values()
                .find(|k| k.oid == Some(oid) && k.name != incoming.name)
        }),
    };
    let Some(before) = before else {
        return reshape;
    };
    if before.name != incoming.name {
        reshape.renamed_from = Some(before.name.clone());
    }
    for old in &before.columns {
        let Some(number) = old.attnum else { continue };
        match incoming.columns.iter().find(|c| c.attnum == Some(number)) {
            Some(now) if now.name != old.name => {
                reshape.columns.push((old.name.clone(), now.name.clone()));
            }
            Some(_) => {}
            None if incoming.column(&old.name).is_none() => reshape.dropped.push(old.name.clone()),
            None => {}
        }
    }
    reshape
}

/// Rewrites the unanswered outbox entries of the table `incoming` was
/// (under its former name and column names) to its new shape. Runs inside
/// the caller's transaction. Returns how many entries were rewritten.
pub(crate) fn map_outbox(
    conn: &Connection,
    known: &HashMap<String, TableSchema>,
    incoming: &TableSchema,
) -> Result<usize, ClientError> {
    let reshape = compare(known, incoming);
    if reshape.is_empty() {
        return Ok(0);
    }
    let mut moved = 0;
    if let Some(old) = &reshape.renamed_from {
        moved = conn.execute(
            "UPDATE _pgrelay_outbox SET table_name = ?2 WHERE table_name = ?1 AND status IN ('pending', 'sent')",
            params![old, incoming.name],
        )?;
        tracing::info!(from = %old, to = %incoming.name, entries = moved, "local writes follow the renamed table");
    }
    if reshape.columns.is_empty() && reshape.dropped.is_empty() {
        return Ok(moved);
    }
    let entries: Vec<(i64, Option<String>, Option<String>)> = conn
        .prepare(
            "SELECT seq, new_row, old_row FROM _pgrelay_outbox WHERE table_name = ?1 AND status IN ('pending', 'sent')",
        )?
        .query_map([&incoming.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut update =
        conn.prepare("UPDATE _pgrelay_outbox SET new_row = ?2, old_row = ?3 WHERE seq = ?1")?;
    let mut rewritten = 0;
    for (seq, new, old) in entries {
        let parse = |json: &Option<String>| -> Option<Map<String, Value>> {
            json.as_deref().and_then(|j| serde_json::from_str(j).ok())
        };
        let (mut new_row, mut old_row) = (parse(&new), parse(&old));
        reshape_rows(&reshape, new_row.as_mut(), old_row.as_mut());
        let text = |row: Option<Map<String, Value>>| row.map(|r| Value::Object(r).to_string());
        let (new_text, old_text) = (text(new_row), text(old_row));
        if new_text != new || old_text != old {
            update.execute(params![seq, new_text, old_text])?;
            rewritten += 1;
        }
    }
    if rewritten > 0 {
        tracing::info!(table = %incoming.name, entries = rewritten, renamed = ?reshape.columns, dropped = ?reshape.dropped, "local writes follow the table's new columns");
    }
    Ok(moved.max(rewritten))
}

/// Renames the columns of one captured change; drops a dropped column
/// where it carries nothing the write meant (the old row, an unchanged
/// value, a NULL). A dropped column the write set stays, so the server
/// refuses the write with its reason.
fn reshape_rows(
    reshape: &Reshape,
    mut new: Option<&mut Map<String, Value>>,
    mut old: Option<&mut Map<String, Value>>,
) {
    for row in [new.as_deref_mut(), old.as_deref_mut()]
        .into_iter()
        .flatten()
    {
        for (from, to) in &reshape.columns {
            if let Some(value) = row.remove(from) {
                row.insert(to.clone(), value);
            }
        }
    }
    for column in &reshape.dropped {
        let before = old.as_deref_mut().and_then(|o| o.remove(column));
        if let Some(new) = new.as_deref_mut() {
            let meant = match (new.get(column), &before) {
                (None, _) | (Some(Value::Null), _) => false,
                (Some(v), Some(b)) => v != b,
                (Some(_), None) => true,
            };
            if !meant {
                new.remove(column);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(name: &str, oid: u32, columns: &[(&str, i16)]) -> TableSchema {
        serde_json::from_value(json!({
            "name": name,
            "oid": oid,
            "columns": columns.iter().map(|(c, n)| json!(
                {"name": c, "type_oid": 25, "pg_type": "text", "kind": "text", "attnum": n})).collect::<Vec<_>>(),
            "primary_key": ["id"],
            "version": 1,
        }))
        .unwrap()
    }

    #[test]
    fn a_rename_is_told_from_a_drop_by_the_column_number() {
        let known = HashMap::from([(
            "public.todos".to_owned(),
            table("public.todos", 7, &[("id", 1), ("title", 2), ("note", 3)]),
        )]);
        let now = table("public.tasks", 7, &[("id", 1), ("label", 2), ("extra", 4)]);
        let reshape = compare(&known, &now);
        assert_eq!(reshape.renamed_from.as_deref(), Some("public.todos"));
        assert_eq!(reshape.columns, vec![("title".into(), "label".into())]);
        assert_eq!(reshape.dropped, vec!["note".to_owned()]);
    }

    #[test]
    fn rows_take_the_new_names_and_lose_dropped_columns_they_did_not_set() {
        let reshape = Reshape {
            renamed_from: None,
            columns: vec![("title".into(), "label".into())],
            dropped: vec!["note".into()],
        };
        let mut new = json!({"id": 2, "title": "edit", "note": "n"});
        let mut old = json!({"id": 2, "title": "t", "note": "n"});
        reshape_rows(&reshape, new.as_object_mut(), old.as_object_mut());
        assert_eq!(new, json!({"id": 2, "label": "edit"}));
        assert_eq!(old, json!({"id": 2, "label": "t"}));
        // A write that set the dropped column keeps it (the server refuses it).
        let mut new = json!({"id": 3, "note": "mine"});
        let mut old = json!({"id": 3, "note": "n"});
        reshape_rows(&reshape, new.as_object_mut(), old.as_object_mut());
        assert_eq!(new, json!({"id": 3, "note": "mine"}));
    }
}
