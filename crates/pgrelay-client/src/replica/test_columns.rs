//! A column for the replica's unit tests, shared by their modules.

use pgrelay_protocol::{Column, ValueKind};

/// A column of PostgreSQL type `text` read as `kind`.
pub(super) fn column(name: &str, kind: ValueKind) -> Column {
    Column {
        name: name.to_owned(),
        pg_type: "text".to_owned(),
        type_oid: 25,
        kind,
        attnum: None,
    }
}
