//! Large client transactions (promises 4 and 5): any local transaction the
//! protocol allows — up to 10,000 changes and `MAX_TRANSACTION_BYTES` on
//! the wire, in one frame or in `write_part` frames — reaches PostgreSQL
//! once, in one PostgreSQL transaction; a larger one is refused by
//! `execute` and never enters the outbox; the server refuses an over-limit
//! or out-of-order multi-part write without harming anyone else; and a
//! write the client cannot send is set aside with its rows restored.

mod client;
mod multi_part;
mod sizes;

use std::path::Path;
use std::time::Duration;

use crate::support::{wait_for, World};

pub(super) const WAIT: Duration = Duration::from_secs(120);
pub(super) const TABLE: &str =
    "CREATE TABLE big (id bigint PRIMARY KEY, tx int NOT NULL, body text NOT NULL)";

/// SQL inserting `rows` rows of transaction `tx` (ids `base`..), each body
/// `body` characters long, the last one `last` characters.
pub(super) fn insert(tx: u32, base: u64, rows: usize, body: usize, last: usize) -> String {
    format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {max}) \
         INSERT INTO big (id, tx, body) \
         SELECT {base} + i, {tx}, substr(replace(hex(zeroblob(len / 2 + 1)), '0', 'x'), 1, len) \
         FROM (SELECT i, CASE WHEN i = {max} THEN {last} ELSE {body} END AS len FROM n)",
        max = rows - 1
    )
}

pub(super) fn local_count(path: &Path, sql: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

pub(super) async fn wait_count(world: &World, sql: &str, want: i64) {
    wait_for(&format!("{sql} = {want}"), WAIT, || async {
        (world.count(sql).await == want).then_some(())
    })
    .await;
}

/// Each transaction's rows committed once, in one PostgreSQL transaction,
/// as the client's write (its echo is recognised by origin).
pub(super) async fn check_once_and_atomic(world: &World, tx: u32, rows: i64, origin: &str) {
    let origin = pgrelay_protocol::origin_tag(origin);
    let history = format!(
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}'"
    );
    wait_count(world, &history, rows).await;
    let lsns = format!(
        "SELECT count(DISTINCT lsn) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}'"
    );
    assert_eq!(
        world.count(&lsns).await,
        1,
        "transaction {tx} split in PostgreSQL"
    );
    let echoed = format!(
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}' AND origin_client = '{origin}'"
    );
    assert_eq!(
        world.count(&echoed).await,
        rows,
        "transaction {tx} not tagged with its origin"
    );
}
