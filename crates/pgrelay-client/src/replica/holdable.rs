//! Which server tables a SQLite replica can hold. PostgreSQL allows what
//! SQLite cannot: column names that differ only in case ("Name" and
//! "name"), and a table in `public` named like one in another schema
//! (`public."a.b"` and `a.b` are both `a.b` here). Such a table is kept out
//! of the replica with the reason (as the web client does), and the rest
//! syncs on.

use std::collections::HashMap;

use pgrelay_protocol::TableSchema;

/// Why the replica cannot hold `table` beside `all` (the other synced
/// tables), or `None`.
pub(crate) fn cannot_hold<'a>(
    table: &TableSchema,
    all: impl IntoIterator<Item = &'a TableSchema>,
) -> Option<String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for column in &table.columns {
        if let Some(other) = seen.insert(column.name.to_lowercase(), &column.name) {
            return Some(format!(
                "columns \"{other}\" and \"{}\" differ only in case, and SQLite's column names ignore case",
                column.name
            ));
        }
    }
    let name = table.sqlite_name().to_lowercase();
    if name.starts_with("_pgrelay_") || name.starts_with("sqlite_") {
        return Some(format!(
            "its name \"{}\" is reserved in the replica",
            table.sqlite_name()
        ));
    }
    for other in all {
        if other.name == table.name || other.skipped.is_some() {
            continue;
        }
        if other.sqlite_name().to_lowercase() == name {
            return Some(format!(
                "it and {} would both be the replica's table \"{}\" (SQLite's names ignore case, and public's tables lose their schema)",
                other.name,
                table.sqlite_name()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, columns: &[&str]) -> TableSchema {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "columns": columns.iter().map(|c| serde_json::json!({"name": c, "type_oid": 25, "pg_type": "text", "kind": "text"})).collect::<Vec<_>>(),
            "primary_key": [columns[0]],
            "version": 1,
        }))
        .unwrap()
    }

    #[test]
    fn columns_differing_only_in_case_are_refused() {
        let t = table("public.people", &["id", "Name", "name"]);
        let why = cannot_hold(&t, [&t]).unwrap();
        assert!(why.contains("\"Name\" and \"name\""), "{why}");
    }

    #[test]
    fn tables_with_one_sqlite_name_are_refused() {
        let a = table("public.a.b", &["id"]);
        let b = table("a.b", &["id"]);
        assert!(cannot_hold(&a, [&a, &b]).unwrap().contains("a.b"));
        let upper = table("public.Items", &["id"]);
        let lower = table("public.items", &["id"]);
        assert!(cannot_hold(&upper, [&upper, &lower]).is_some());
        assert_eq!(cannot_hold(&lower, [&lower]), None);
    }
}
