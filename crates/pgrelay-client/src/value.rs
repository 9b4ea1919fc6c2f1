//! How a value travels (PostgreSQL's text output) maps to how a replica
//! stores it, and back. The mapping is documented in docs/running.md (Type mapping).

use pgrelay_protocol::ValueKind;
use rusqlite::types::{ToSqlOutput, Value, ValueRef};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{kind:?} value {text:?} cannot be stored: {reason}")]
pub struct ValueError {
    pub kind: ValueKind,
    pub text: String,
    pub reason: &'static str,
}

/// The SQLite value for PostgreSQL's text output of a value of `kind`.
pub fn to_sqlite(kind: ValueKind, text: Option<&str>) -> Result<Value, ValueError> {
    let Some(text) = text else {
        return Ok(Value::Null);
    };
    let bad = |reason| ValueError {
        kind,
        text: text.chars().take(100).collect(),
        reason,
    };
    Ok(match kind {
        ValueKind::Integer => {
            Value::Integer(text.parse().map_err(|_| bad("not a 64-bit integer"))?)
        }
        ValueKind::Float => match text.parse::<f64>() {
            // SQLite has no NaN (it becomes NULL) and prints infinities its own way.
            Ok(f) if f.is_finite() => Value::Real(f),
            _ => Value::Text(text.to_owned()),
        },
        ValueKind::Bool => match text {
            "t" => Value::Integer(1),
            "f" => Value::Integer(0),
            _ => return Err(bad("not t or f")),
        },
        ValueKind::Bytes => {
            let hex_digits = text
                .strip_prefix("\\x")
                .ok_or_else(|| bad("bytea not in hex format"))?;
            Value::Blob(hex::decode(hex_digits).map_err(|_| bad("bad hex digits"))?)
        }
        ValueKind::Numeric | ValueKind::Json | ValueKind::Text => Value::Text(text.to_owned()),
    })
}

/// [`to_sqlite`] without copying text: the value borrows `text` where
/// SQLite stores it as text (SQLite copies it when bound).
pub fn to_sqlite_ref(kind: ValueKind, text: Option<&str>) -> Result<ToSqlOutput<'_>, ValueError> {
    let Some(text) = text else {
        return Ok(ToSqlOutput::Owned(Value::Null));
    };
    match kind {
        ValueKind::Numeric | ValueKind::Json | ValueKind::Text => {
            Ok(ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())))
        }
        ValueKind::Float => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(ToSqlOutput::Owned(Value::Real(f))),
            _ => Ok(ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes()))),
        },
        _ => to_sqlite(kind, Some(text)).map(ToSqlOutput::Owned),
    }
}

/// PostgreSQL's text output for a value a replica stores, up to the
/// canonical encoding (see `pgrelay_protocol::canonical`).
pub fn pg_text_from_sqlite(kind: ValueKind, value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(match kind {
            ValueKind::Bool => if i != 0 { "t" } else { "f" }.to_owned(),
            _ => i.to_string(),
        }),
        ValueRef::Real(f) => Some(format!("{f:e}")),
        ValueRef::Text(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        ValueRef::Blob(bytes) => Some(format!("\\x{}", hex::encode(bytes))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::canonical::canonical_pg_text;
    use proptest::prelude::*;

    fn through_sqlite(kind: ValueKind, text: Option<&str>) -> Option<String> {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(&format!("CREATE TABLE t (v {})", kind.sqlite_type()))
            .unwrap();
        conn.execute(
            "INSERT INTO t VALUES (?1)",
            [to_sqlite(kind, text).unwrap()],
        )
        .unwrap();
        conn.query_row("SELECT v FROM t", [], |r| {
            Ok(pg_text_from_sqlite(kind, r.get_ref(0)?))
        })
        .unwrap()
    }

    fn same_after_sqlite(kind: ValueKind, text: Option<&str>) {
        assert_eq!(
            canonical_pg_text(kind, through_sqlite(kind, text).as_deref()),
            canonical_pg_text(kind, text),
            "{kind:?} {text:?}"
        );
    }

    #[test]
    fn edge_values_survive_a_real_sqlite() {
        same_after_sqlite(ValueKind::Integer, Some("-9223372036854775808"));
        same_after_sqlite(ValueKind::Float, Some("NaN"));
        same_after_sqlite(ValueKind::Float, Some("-Infinity"));
        same_after_sqlite(ValueKind::Float, Some("-0"));
        same_after_sqlite(ValueKind::Float, Some("3.4028235e+38"));
        same_after_sqlite(ValueKind::Bytes, Some("\\x00ff00"));
        same_after_sqlite(ValueKind::Bytes, Some("\\x"));
        same_after_sqlite(ValueKind::Bool, Some("f"));
        same_after_sqlite(
            ValueKind::Numeric,
            Some("123456789012345678901234567890.000000000000000001"),
        );
        same_after_sqlite(ValueKind::Text, Some("é中😀 'q' \"dq\""));
        same_after_sqlite(ValueKind::Text, Some("12"));
        same_after_sqlite(ValueKind::Json, None);
    }

    #[test]
    fn bad_text_is_refused() {
        assert!(to_sqlite(ValueKind::Integer, Some("1.5")).is_err());
        assert!(to_sqlite(ValueKind::Bool, Some("maybe")).is_err());
        assert!(to_sqlite(ValueKind::Bytes, Some("\\xzz")).is_err());
    }

    fn pg_text(kind: ValueKind) -> BoxedStrategy<String> {
        match kind {
            ValueKind::Integer => any::<i64>().prop_map(|i| i.to_string()).boxed(),
            ValueKind::Float => prop_oneof![
                any::<f64>().prop_map(|f| f.to_string()),
                Just("NaN".to_owned()),
                Just("Infinity".to_owned())
            ]
            .boxed(),
            ValueKind::Bool => prop_oneof![Just("t".to_owned()), Just("f".to_owned())].boxed(),
            ValueKind::Bytes => proptest::collection::vec(any::<u8>(), 0..16)
                .prop_map(|b| format!("\\x{}", hex::encode(b)))
                .boxed(),
            ValueKind::Numeric => "-?[0-9]{1,30}(\\.[0-9]{1,30})?".boxed(),
            ValueKind::Json | ValueKind::Text => "\\PC{0,20}".boxed(),
        }
    }

    fn kind() -> impl Strategy<Value = ValueKind> {
        prop_oneof![
            Just(ValueKind::Integer),
            Just(ValueKind::Float),
            Just(ValueKind::Bool),
            Just(ValueKind::Bytes),
            Just(ValueKind::Numeric),
            Just(ValueKind::Json),
            Just(ValueKind::Text),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn canonical_form_survives_the_replica((kind, text) in kind().prop_flat_map(|k| (Just(k), pg_text(k)))) {
            let stored = to_sqlite(kind, Some(&text)).unwrap();
            let back = pg_text_from_sqlite(kind, (&stored).into());
            prop_assert_eq!(canonical_pg_text(kind, back.as_deref()), canonical_pg_text(kind, Some(&text)));
        }
    }
}
