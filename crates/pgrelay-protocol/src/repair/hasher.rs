//! Row hashes straight from PostgreSQL's text values, without a `String`
//! per value: the canonical encoding is written into one reused buffer and
//! hashed once. Equal to [`row_hash`](super::row_hash) over
//! [`canonical_pg_text`](crate::canonical::canonical_pg_text) of each
//! value (a property test holds them together); the server digests every
//! row of a table with it in a repair's first round.

use std::io::Write;

use xxhash_rust::xxh3::xxh3_128;

use crate::ValueKind;

/// Reusable buffer for [`RowHasher::hash`].
#[derive(Default)]
pub struct RowHasher {
    buffer: Vec<u8>,
}

impl RowHasher {
    /// The hash of a row given as PostgreSQL text per column, each of the
    /// kind at the same position.
    pub fn hash<'a>(
        &mut self,
        kinds: &[ValueKind],
        values: impl IntoIterator<Item = Option<&'a str>>,
    ) -> u128 {
        self.buffer.clear();
        for (&kind, value) in kinds.iter().zip(values) {
            match value {
                None => self.buffer.push(0),
                Some(text) => {
                    self.buffer.push(1);
                    let at = self.buffer.len();
                    self.buffer.extend_from_slice(&[0; 8]);
                    write_canonical(kind, text, &mut self.buffer);
                    let len = (self.buffer.len() - at - 8) as u64;
                    self.buffer[at..at + 8].copy_from_slice(&len.to_be_bytes());
                }
            }
        }
        xxh3_128(&self.buffer)
    }
}

/// Appends the canonical form of `text` (see `canonical_pg_text`).
fn write_canonical(kind: ValueKind, text: &str, out: &mut Vec<u8>) {
    match kind {
        ValueKind::Integer => match text.parse::<i64>() {
            Ok(i) => {
                let _ = write!(out, "{i}");
            }
            Err(_) => out.extend_from_slice(text.as_bytes()),
        },
        ValueKind::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => out.extend_from_slice(text.as_bytes()),
            _ => match text.parse::<f64>() {
                Ok(0.0) => out.push(b'0'),
                Ok(f) if f.is_nan() => out.extend_from_slice(b"NaN"),
                Ok(f) if f.is_infinite() => {
                    out.extend_from_slice(if f > 0.0 { b"Infinity" } else { b"-Infinity" });
                }
                Ok(f) => {
                    let _ = write!(out, "{f:e}");
                }
                Err(_) => out.extend_from_slice(text.as_bytes()),
            },
        },
        ValueKind::Bool => out.extend_from_slice(match text {
            "t" | "true" | "1" => b"t",
            "f" | "false" | "0" => b"f",
            _ => text.as_bytes(),
        }),
        ValueKind::Bytes => match text.strip_prefix("\\x") {
            Some(hex) => out.extend(hex.bytes().map(|b| b.to_ascii_lowercase())),
            None => out.extend_from_slice(text.as_bytes()),
        },
        ValueKind::Numeric | ValueKind::Json | ValueKind::Text => {
            out.extend_from_slice(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::canonical::canonical_pg_text;
    use crate::repair::row_hash;

    const KINDS: [ValueKind; 7] = [
        ValueKind::Integer,
        ValueKind::Float,
        ValueKind::Bool,
        ValueKind::Bytes,
        ValueKind::Numeric,
        ValueKind::Json,
        ValueKind::Text,
    ];

    fn value() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            ".{0,12}",
            any::<i64>().prop_map(|i| i.to_string()),
            "-?0{0,3}[0-9]{1,20}",
            any::<f64>().prop_map(|f| f.to_string()),
            "-?[0-9]{1,4}(\\.[0-9]{0,6})?(e[+-]?[0-9]{1,3})?",
            Just("NaN".to_owned()),
            Just("-Infinity".to_owned()),
            Just("-0".to_owned()),
            "(t|f|true|false|0|1|yes)",
            "\\\\x[0-9a-fA-F]{0,8}",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn equals_row_hash_of_canonical_values(
            row in proptest::collection::vec((0usize..7, value()), 0..8),
        ) {
            let kinds: Vec<ValueKind> = row.iter().map(|(k, _)| KINDS[*k]).collect();
            let canonical: Vec<Option<String>> = row
                .iter()
                .map(|(k, v)| canonical_pg_text(KINDS[*k], v.as_deref()))
                .collect();
            let mut hasher = RowHasher::default();
            let fast = hasher.hash(&kinds, row.iter().map(|(_, v)| v.as_deref()));
            prop_assert_eq!(fast, row_hash(&canonical));
            // The buffer is reused: a second row hashes alike.
            prop_assert_eq!(hasher.hash(&kinds, row.iter().map(|(_, v)| v.as_deref())), fast);
        }
    }
}
