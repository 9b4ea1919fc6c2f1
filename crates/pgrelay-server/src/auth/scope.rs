//! A scope: the rules bound to one set of claim values. Sessions whose
//! tokens carry the same values for the claims the rules read share one
//! scope, so a change is evaluated once per scope, not once per client.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use pgrelay_protocol::{Change, Op, Row, Transaction};

use super::rules::Bound;
use super::rules::{Access, Rules};

#[derive(Debug)]
pub struct Scope {
    pub(crate) id: u64,
    tables: BTreeMap<String, Access>,
    default: Access,
}

impl Scope {
    /// A scope that may read and write everything (no rules configured).
    #[cfg(test)]
    pub(crate) fn open(id: u64) -> Scope {
        Scope {
            id,
            tables: BTreeMap::new(),
            default: Access {
                read: Bound::Const(true),
                write: Some(Bound::Const(true)),
            },
        }
    }

    fn access(&self, table: &str) -> &Access {
        self.tables.get(table).unwrap_or(&self.default)
    }

    pub(crate) fn read(&self, table: &str) -> &Bound {
        &self.access(table).read
    }

    /// The rule a write to `table` must pass; `None` when the table is not
    /// writable with this token.
    pub(crate) fn write(&self, table: &str) -> Option<&Bound> {
        self.access(table).write.as_ref()
    }

    pub(crate) fn can_read_table(&self, table: &str) -> bool {
        !self.read(table).is_false()
    }

    /// The read rule of `table` as a SQL predicate (never NULL), for
    /// snapshot queries: append its values to `params`, which already hold
    /// the query's other parameters.
    pub fn read_predicate(&self, table: &str, params: &mut Vec<Option<String>>) -> String {
        self.read(table).to_sql(params)
    }

    /// The read rule of `table` for a snapshot's COPY, which takes no bind
    /// parameters: value `n` is read from the transaction-local setting
    /// `pgrelay.rule_<n>`; bind the returned values with
    /// [`SNAPSHOT_SETTINGS_SQL`] in the same transaction first. `None` when
    /// every row is visible.
    pub(crate) fn snapshot_filter(&self, table: &str) -> Option<(String, Vec<String>)> {
        let rule = self.read(table);
        if *rule == Bound::Const(true) {
            return None;
        }
        let mut values = Vec::new();
        let predicate = rule.to_sql_as(&mut values, &|n| {
            format!("current_setting('pgrelay.rule_{n}')")
        });
        Some((predicate, values.into_iter().flatten().collect()))
    }

    /// Whether a row of `table` may be read: for snapshot rows read as text.
    pub fn may_read(&self, table: &str, row: &Row) -> bool {
        self.read(table).eval(row)
    }

    /// The part of `tx` this scope may see; `None` when nothing is left. A
    /// row that moves into the scope arrives as an insert, one that moves
    /// out as a delete.
    pub(crate) fn filter_tx(&self, tx: &Transaction) -> Option<Transaction> {
        let mut changes = Vec::new();
        for change in &tx.changes {
            if let Some(kept) = self.filter_change(change) {
                changes.push(kept);
            }
        }
        (!changes.is_empty()).then(|| Transaction {
            lsn: tx.lsn,
            xid: tx.xid,
            commit_time_us: tx.commit_time_us,
            origin: tx.origin.clone(),
            changes,
        })
    }

    fn filter_change(&self, change: &Change) -> Option<Change> {
        let rule = self.read(&change.table);
        if rule.is_false() {
            return None;
        }
        match change.op {
            Op::Truncate => Some(change.clone()),
            Op::Insert => change
                .new
                .as_ref()
                .filter(|row| rule.eval(row))
                .map(|_| change.clone()),
            Op::Delete => change
                .old
                .as_ref()
                .filter(|row| rule.eval(row))
                .map(|_| change.clone()),
            Op::Update => {
                let new = change.new.as_ref()?;
                // An unchanged TOASTed column is absent from `new`: the old
                // row (REPLICA IDENTITY FULL) has its value.
                let whole_new: Row = match &change.old {
                    Some(old) => {
                        let mut row = old.clone();
                        row.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
                        row
                    }
                    None => new.clone(),
                };
                let after = rule.eval(&whole_new);
                // Without an old row the key did not change and the rule
                // reads only key columns (else the table has FULL identity).
                let before = change.old.as_ref().map_or(after, |old| rule.eval(old));
                match (before, after) {
                    (true, true) => Some(change.clone()),
                    (false, false) => None,
                    (true, false) => Some(Change {
                        table: change.table.clone(),
                        op: Op::Delete,
                        new: None,
                        old: change.old.clone(),
                    }),
                    (false, true) => Some(Change {
                        table: change.table.clone(),
                        op: Op::Insert,
                        new: Some(whole_new),
                        old: None,
                    }),
                }
            }
        }
    }
}

/// Sets `pgrelay.rule_<n>` to the n-th value of `$1` for the current
/// transaction: the values of [`Scope::snapshot_filter`], bound, never
/// spliced.
pub(crate) const SNAPSHOT_SETTINGS_SQL: &str =
    "SELECT count(set_config('pgrelay.rule_' || n, v, true)) \
     FROM unnest($1::text[]) WITH ORDINALITY AS t(v, n)";

/// The rules, and the scopes of connected tokens, shared while in use.
#[derive(Debug)]
pub(crate) struct Scopes {
    rules: Rules,
    next_id: AtomicU64,
    live: Mutex<HashMap<String, Weak<Scope>>>,
}

impl Scopes {
    pub(crate) fn new(rules: Rules) -> Scopes {
        Scopes {
            rules,
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The scope of a token with `claims`: the same `Arc` for every token
    /// whose claims the rules read have the same values.
    pub(crate) fn scope(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Arc<Scope> {
        let key = self.rules.scope_key(claims);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(scope) = live.get(&key).and_then(Weak::upgrade) {
            return scope;
        }
        let (tables, default) = self.rules.bind(claims);
        let scope = Arc::new(Scope {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tables,
            default,
        });
        if live.len() >= 64 && live.len().is_power_of_two() {
            live.retain(|_, s| s.strong_count() > 0);
        }
        live.insert(key, Arc::downgrade(&scope));
        scope
    }

    /// Distinct scopes with a connected token.
    pub(crate) fn live(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().filter(|s| s.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::Lsn;
    use serde_json::json;

    fn row(pairs: &[(&str, &str)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    fn scopes() -> Scopes {
        Scopes::new(
            Rules::parse(
                "[tables.todos]\nread = \"tenant = claims.tenant\"\nwrite = \"tenant = claims.tenant\"",
            )
            .unwrap(),
        )
    }

    fn claims(tenant: &str, sub: &str) -> serde_json::Map<String, serde_json::Value> {
        json!({"tenant": tenant, "sub": sub})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn tokens_with_the_same_claim_values_share_a_scope() {
        let scopes = scopes();
        let a = scopes.scope(&claims("t1", "u1"));
        let b = scopes.scope(&claims("t1", "u2"));
        let c = scopes.scope(&claims("t2", "u1"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(scopes.live(), 2);
        drop((a, b));
        assert_eq!(scopes.live(), 1);
    }

    #[test]
    fn moving_rows_become_deletes_and_inserts() {
        let scopes = scopes();
        let t1 = scopes.scope(&claims("t1", "u"));
        let t2 = scopes.scope(&claims("t2", "u"));
        let t3 = scopes.scope(&claims("t3", "u"));
        let tx = Transaction {
            lsn: Lsn(10),
            xid: 1,
            commit_time_us: 0,
            origin: None,
            changes: vec![Change {
                table: "public.todos".into(),
                op: Op::Update,
                new: Some(row(&[("id", "1"), ("tenant", "t2")])),
                old: Some(row(&[("id", "1"), ("tenant", "t1"), ("body", "b")])),
            }],
        };
        let lost = t1.filter_tx(&tx).unwrap();
        assert_eq!(lost.changes[0].op, Op::Delete);
        assert!(lost.changes[0].new.is_none());
        let gained = t2.filter_tx(&tx).unwrap();
        assert_eq!(gained.changes[0].op, Op::Insert);
        assert!(gained.changes[0].old.is_none());
        assert_eq!(
            gained.changes[0].new.as_ref().unwrap()["body"].as_deref(),
            Some("b")
        );
        assert!(t3.filter_tx(&tx).is_none());
        let other = Transaction {
            changes: vec![Change {
                table: "public.secret".into(),
                op: Op::Truncate,
                new: None,
                old: None,
            }],
            ..tx
        };
        assert!(t1.filter_tx(&other).is_none());
    }
}
