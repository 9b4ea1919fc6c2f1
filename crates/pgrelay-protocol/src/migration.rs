//! Client migrations on the wire: the SQL a replica runs to follow the
//! application's schema (indexes, views, local-only tables), each with its
//! version, and the client's report of how it went; and the versions a
//! server refuses with `upgrade_required`.

use serde::{Deserialize, Serialize};

/// The oldest protocol version this build still serves. A `hello` outside
/// `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` is answered `upgrade_required`.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Which part of a migration a client runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Apply the migration (its `client_up.sql`).
    Up,
    /// Undo it (its `client_down.sql`): the migration was rolled back.
    Down,
}

/// One client migration to run in the replica, in one SQLite transaction
/// together with recording (or, down, forgetting) its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMigration {
    /// The migration's version (its folder's timestamp, e.g. 20261203120000).
    pub version: i64,
    pub name: String,
    pub direction: Direction,
    /// SQLite statements; empty for a down part that undoes nothing.
    pub sql: String,
}

/// Which version of a client a server cannot serve, and what it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequired {
    /// `protocol` or `schema`.
    pub what: String,
    /// The client's version.
    pub client: i64,
    /// The oldest version the server serves.
    pub server_min: i64,
    /// The newest version the server serves.
    pub server_max: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMessage, ServerMessage};

    #[test]
    fn migrations_and_results_round_trip() {
        let msg = ServerMessage::Migrations {
            schema_version: 20261203120000,
            migrations: vec![ClientMigration {
                version: 20261203120000,
                name: "add_index".into(),
                direction: Direction::Up,
                sql: "CREATE INDEX i ON todos (title)".into(),
            }],
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.starts_with(r#"{"type":"migrations""#), "{text}");
        assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), msg);
        let result: ClientMessage = serde_json::from_str(
            r#"{"type":"migration_result","version":7,"direction":"down","error":"no such table"}"#,
        )
        .unwrap();
        assert_eq!(
            result,
            ClientMessage::MigrationResult {
                version: 7,
                direction: Direction::Down,
                error: Some("no such table".into()),
            }
        );
    }

    #[test]
    fn an_old_hello_has_no_schema_version() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"hello","protocol_version":1,"client_id":"c"}"#)
                .unwrap();
        assert!(matches!(
            m,
            ClientMessage::Hello {
                schema_version: None,
                ..
            }
        ));
    }
}
