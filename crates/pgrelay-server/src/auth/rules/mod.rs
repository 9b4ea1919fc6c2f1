//! `rules.toml`: per table, which rows a token may read and write. Checked
//! against the synced tables when the server starts, so a typo in a table
//! or column name stops the server instead of silently hiding rows.

use std::collections::{BTreeMap, BTreeSet};

use pgrelay_protocol::TableSchema;
use serde::Deserialize;

mod expr;
mod parse;

#[cfg(test)]
mod agreement;

use parse::parse;

use expr::Expr;
pub(crate) use expr::{claim_text, Bound};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    tables: BTreeMap<String, TableRulesText>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableRulesText {
    read: Option<String>,
    write: Option<String>,
}

#[derive(Debug)]
struct TableRules {
    read: Option<Expr>,
    write: Option<Expr>,
}

/// The parsed rules of every table.
#[derive(Debug)]
pub(crate) struct Rules {
    /// Tables the file does not list: everything (`allow`) or nothing (`deny`).
    default_allow: bool,
    tables: BTreeMap<String, TableRules>,
    /// Every claim any rule reads: the claims that make up a scope.
    claims: Vec<Vec<String>>,
}

/// What one token may do with one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    pub(crate) read: Bound,
    /// `None`: the table is read-only (or hidden) for this token.
    pub(crate) write: Option<Bound>,
}

impl Rules {
    /// Every authenticated token may read and write everything (`--auth`
    /// without `--rules`).
    pub(crate) fn allow_all() -> Rules {
        Rules {
            default_allow: true,
            tables: BTreeMap::new(),
            claims: Vec::new(),
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Rules, String> {
        let file: RulesFile = toml::from_str(text).map_err(|e| format!("rules: {e}"))?;
        let default_allow = match file.default.as_deref() {
            None | Some("deny") => false,
            Some("allow") => true,
            Some(other) => {
                return Err(format!(
                    "rules: default = {other:?}: use \"deny\" or \"allow\""
                ))
            }
        };
        let mut tables = BTreeMap::new();
        let mut claims = BTreeSet::new();
        for (name, text) in file.tables {
            let qualified = if name.contains('.') {
                name.clone()
            } else {
                format!("public.{name}")
            };
            let mut parse_one = |what: &str, rule: Option<String>| match rule {
                None => Ok(None),
                Some(rule) => parse(&rule)
                    .map(|expr| {
                        expr.claims(&mut claims);
                        Some(expr)
                    })
                    .map_err(|e| format!("rules: tables.{name}.{what} = {rule:?}: {e}")),
            };
            let read = parse_one("read", text.read)?;
            let write = parse_one("write", text.write)?;
            if read.is_none() && write.is_some() {
                return Err(format!(
                    "rules: tables.{name} has `write` without `read`; a client must be able to read what it writes"
                ));
            }
            tables.insert(qualified, TableRules { read, write });
        }
        Ok(Rules {
            default_allow,
            tables,
            claims: claims.into_iter().collect(),
        })
    }

    /// Checks that every listed table is synced and every column a rule
    /// names exists.
    pub(crate) fn check(&self, tables: &[TableSchema]) -> Result<(), String> {
        for (name, rules) in &self.tables {
            let schema = tables
                .iter()
                .find(|t| t.name == *name && t.skipped.is_none())
                .ok_or_else(|| format!("rules: {name} is not a synced table"))?;
            for expr in [&rules.read, &rules.write].into_iter().flatten() {
                let mut columns = BTreeSet::new();
                expr.columns(&mut columns);
                if let Some(unknown) = columns.iter().find(|c| schema.column(c).is_none()) {
                    return Err(format!("rules: {name} has no column {unknown:?}"));
                }
            }
        }
        Ok(())
    }

    /// Tables whose read rule looks at columns outside the primary key:
    /// their updates and deletes must carry the whole old row (REPLICA
    /// IDENTITY FULL) to tell who loses a row.
    pub(crate) fn need_full_identity(&self, tables: &[TableSchema]) -> Vec<String> {
        let mut out = Vec::new();
        for (name, rules) in &self.tables {
            let Some(read) = &rules.read else { continue };
            let Some(schema) = tables.iter().find(|t| t.name == *name) else {
                continue;
            };
            let mut columns = BTreeSet::new();
            read.columns(&mut columns);
            if columns.iter().any(|c| !schema.primary_key.contains(c)) {
                out.push(name.clone());
            }
        }
        out
    }

    /// The values of the claims the rules read: tokens with the same key
    /// see exactly the same rows.
    pub(crate) fn scope_key(&self, claims: &serde_json::Map<String, serde_json::Value>) -> String {
        let values: Vec<Option<&serde_json::Value>> = self
            .claims
            .iter()
            .map(|path| {
                let mut value = claims.get(&path[0]);
                for part in &path[1..] {
                    value = value.and_then(|v| v.get(part));
                }
                value
            })
            .collect();
        serde_json::to_string(&values).unwrap_or_default()
    }

    /// Every table's access for a token with `claims`.
    pub(crate) fn bind(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> (BTreeMap<String, Access>, Access) {
        let tables = self
            .tables
            .iter()
            .map(|(name, rules)| {
                let read = rules
                    .read
                    .as_ref()
                    .map_or(Bound::Const(false), |e| e.bind(claims));
                let write = rules
                    .write
                    .as_ref()
                    .map(|e| e.bind(claims))
                    .filter(|w| !w.is_false());
                (name.clone(), Access { read, write })
            })
            .collect();
        let default = Access {
            read: Bound::Const(self.default_allow),
            write: self.default_allow.then_some(Bound::Const(true)),
        };
        (tables, default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXAMPLE: &str = r#"
default = "deny"
[tables.todos]
read  = "tenant_id = claims.tenant_id"
write = "tenant_id = claims.tenant_id"
[tables.projects]
read  = "owner = claims.sub OR claims.role = 'admin'"
"#;

    #[test]
    fn the_issue_example() {
        let rules = Rules::parse(EXAMPLE).unwrap();
        let claims = json!({"tenant_id": "t1", "sub": "u1", "role": "user", "exp": 1})
            .as_object()
            .cloned()
            .unwrap();
        let (tables, default) = rules.bind(&claims);
        assert!(default.read.is_false() && default.write.is_none());
        assert!(tables["public.projects"].write.is_none());
        assert!(tables["public.todos"].write.is_some());
        // `exp` is not read by any rule, so it is not part of the scope.
        let later = json!({"tenant_id": "t1", "sub": "u1", "role": "user", "exp": 2})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(rules.scope_key(&claims), rules.scope_key(&later));
        assert!(Rules::parse("default = \"maybe\"").is_err());
        assert!(Rules::parse("[tables.t]\nwrite = \"true\"").is_err());
        assert!(Rules::parse("[tables.t]\nread = \"a = \"").is_err());
        assert!(Rules::parse("[tables.t]\nreed = \"true\"").is_err());
    }
}
