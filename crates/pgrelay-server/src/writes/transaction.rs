//! One client transaction inside its savepoint: planned, checked against
//! the token's rules, run pipelined, and each miss explained (conflict,
//! gone, forbidden) with the rows the replica rolls back to.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use pgrelay_pg::PooledClient;
use pgrelay_protocol::{ClientTransaction, Op, RejectCode, Row, TableSchema};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::current::{read_row, show_key, show_value};
use super::error::describe;
use super::statement::{self, plan, Planned};
use crate::auth::Scope;

/// Why a client transaction did not apply; `Fault` ends the batch.
pub(super) enum Failure {
    Rejected {
        code: RejectCode,
        reason: String,
        keys: Vec<(String, Row)>,
    },
    /// Worth another try: a deadlock or serialization failure.
    Transient(String),
    /// The connection or transaction is lost.
    Fault(tokio_postgres::Error),
}

pub(super) async fn apply_tx(
    conn: &mut PooledClient,
    tx: &ClientTransaction,
    schemas: &BTreeMap<String, TableSchema>,
    versions: &BTreeMap<String, String>,
    scope: Option<&Scope>,
) -> Result<(), Failure> {
    let mut planned: Vec<(&TableSchema, Op, Planned)> = Vec::with_capacity(tx.changes.len());
    let mut keys: Vec<(String, Row)> = Vec::new();
    let mut refused = None;
    for change in &tx.changes {
        let Some(table) = schemas.get(&change.table) else {
            refused.get_or_insert((
                RejectCode::UnknownTable,
                format!(
                    "table {:?} is not synced by this server",
                    change.table.chars().take(64).collect::<String>()
                ),
            ));
            continue;
        };
        let rule = scope.map(|s| s.write(&table.name));
        match plan(table, versions.get(&table.name).map(String::as_str), change) {
            Ok(Some(mut p)) => {
                match rule {
                    None => {}
                    Some(Some(rule)) => statement::guard(&mut p, change.op, rule),
                    Some(None) => {
                        // Planned only for its keys: the rejection reports
                        // those rows, so the replica rolls back to them.
                        keys.extend(p.keys.iter().map(|k| (table.name.clone(), k.clone())));
                        refused.get_or_insert((
                            RejectCode::Forbidden,
                            format!("{} is not writable with your token", table.name),
                        ));
                        continue;
                    }
                }
                keys.extend(p.keys.iter().map(|k| (table.name.clone(), k.clone())));
                planned.push((table, change.op, p));
            }
            Ok(None) => {}
            Err(invalid) => {
                // Its rows too: the client wrote them locally and puts them
                // back from the rejection.
                keys.extend(
                    statement::touched_keys(table, change)
                        .into_iter()
                        .map(|k| (table.name.clone(), k)),
                );
                refused.get_or_insert((invalid.code, invalid.reason));
            }
        }
    }
    if let Some((code, reason)) = refused {
        return Err(Failure::Rejected { code, reason, keys });
    }
    // Prepare what this connection has not seen yet, then run the changes
    // pipelined: one round trip for the whole client transaction.
    let mut statements: Vec<Statement> = Vec::with_capacity(planned.len());
    for (_, _, p) in &planned {
        let statement = conn
            .prepare_cached(&p.sql)
            .await
            .map_err(|e| classify(e, &keys, scope.is_some()))?;
        statements.push(statement);
    }
    let client: &Client = conn;
    let runs = planned
        .iter()
        .zip(&statements)
        .map(|((_, _, p), statement)| async move {
            let params: Vec<&(dyn ToSql + Sync)> =
                p.params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            if p.check_returned {
                // Each returned row says whether the row as written is still
                // one the client may write.
                let rows = client.query(statement, &params).await?;
                let allowed = rows.iter().all(|r| r.get::<_, bool>(0));
                return Ok((rows.len() as u64, allowed));
            }
            client
                .execute(statement, &params)
                .await
                .map(|count| (count, true))
        });
    let counts = join_all(runs).await;
    for ((table, op, p), count) in planned.iter().zip(counts) {
        let (count, allowed) = count.map_err(|e| classify(e, &keys, scope.is_some()))?;
        let shown = || p.keys.first().map(show_key).unwrap_or_default();
        if !allowed {
            return Err(Failure::Rejected {
                code: RejectCode::Forbidden,
                reason: format!(
                    "{} row {}: after this {} it would be outside what your token may write",
                    table.name,
                    shown(),
                    op.as_str()
                ),
                keys,
            });
        }
        if count > 0 || !p.must_match {
            continue;
        }
        let Some(key) = p.keys.first() else { continue };
        let current = read_row(client, table, key)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(_) => Failure::Transient(describe(&e)),
                None => Failure::Fault(e),
            })?;
        if let Some(scope) = scope {
            // Under a token's rules a row the token cannot read gets the
            // same answer as a row that does not exist, so a refusal tells
            // nothing of other tenants' rows.
            let visible = current
                .as_ref()
                .filter(|row| scope.may_read(&table.name, row));
            let Some(row) = visible else {
                return Err(Failure::Rejected {
                    code: RejectCode::Forbidden,
                    reason: format!(
                        "{} row {} is not there or not yours to write",
                        table.name,
                        shown()
                    ),
                    keys,
                });
            };
            if scope.write(&table.name).is_some_and(|rule| !rule.eval(row)) {
                return Err(Failure::Rejected {
                    code: RejectCode::Forbidden,
                    reason: format!(
                        "{} row {} is outside what your token may write",
                        table.name,
                        shown()
                    ),
                    keys,
                });
            }
        }
        let reason = match (&current, op) {
            // Deleting a row that is already gone is done.
            (None, Op::Delete) => continue,
            (None, _) => format!(
                "{} row {} no longer exists on the server",
                table.name,
                show_key(key)
            ),
            (Some(row), _) => match versions.get(&table.name) {
                Some(column) => format!(
                    "{} row {} changed on the server: the write was based on {column} = {}, the server has {column} = {}",
                    table.name,
                    show_key(key),
                    show_value(p.params.last().and_then(|v| v.as_deref())),
                    show_value(row.get(column).and_then(|v| v.as_deref()))
                ),
                None => format!("{} row {} was not found", table.name, show_key(key)),
            },
        };
        return Err(Failure::Rejected {
            code: RejectCode::Conflict,
            reason,
            keys,
        });
    }
    Ok(())
}

/// `scoped`: the writer's token sees only some rows, and PostgreSQL's
/// detail (which may quote a conflicting row of another tenant) is left out.
fn classify(error: tokio_postgres::Error, keys: &[(String, Row)], scoped: bool) -> Failure {
    let Some(db) = error.as_db_error() else {
        return Failure::Fault(error);
    };
    let state = db.code();
    let class = &state.code()[..2];
    let code = if *state == SqlState::T_R_DEADLOCK_DETECTED
        || *state == SqlState::T_R_SERIALIZATION_FAILURE
        || *state == SqlState::LOCK_NOT_AVAILABLE
        || *state == SqlState::QUERY_CANCELED
    {
        return Failure::Transient(db.message().to_owned());
    } else if class == "23" {
        RejectCode::ConstraintViolation
    } else if class == "22" {
        RejectCode::InvalidValue
    } else if *state == SqlState::UNDEFINED_COLUMN {
        RejectCode::UnknownColumn
    } else if *state == SqlState::UNDEFINED_TABLE {
        RejectCode::UnknownTable
    } else if class == "08" || class == "57" || class == "53" || class == "58" || class == "XX" {
        // Connection, shutdown, resources, system: not the write's fault.
        return Failure::Fault(error);
    } else {
        RejectCode::Database
    };
    let mut reason = db.message().to_owned();
    if let Some(detail) = db.detail().filter(|_| !scoped) {
        reason.push_str(": ");
        reason.push_str(detail);
    }
    Failure::Rejected {
        code,
        reason,
        keys: keys.to_vec(),
    }
}
