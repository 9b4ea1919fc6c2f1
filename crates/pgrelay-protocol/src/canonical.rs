//! One canonical encoding of values, used to compare a replica with
//! PostgreSQL (`pgrelay verify`) whatever the storage on either side:
//! integers as decimals, floats by value, booleans as `t`/`f`, bytes as
//! hex, everything else as PostgreSQL's text output.

use sha2::{Digest, Sha256};

use crate::ValueKind;

/// The canonical form of a value given as PostgreSQL's text output.
/// Text that does not parse as its kind is kept as is, so it still compares.
pub fn canonical_pg_text(kind: ValueKind, text: Option<&str>) -> Option<String> {
    let text = text?;
    Some(match kind {
        ValueKind::Integer => text
            .parse::<i64>()
            .map(|i| i.to_string())
            .unwrap_or_else(|_| text.to_owned()),
        ValueKind::Float => canonical_float(text),
        ValueKind::Bool => match text {
            "t" | "true" | "1" => "t".to_owned(),
            "f" | "false" | "0" => "f".to_owned(),
            _ => text.to_owned(),
        },
        ValueKind::Bytes => text
            .strip_prefix("\\x")
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| text.to_owned()),
        ValueKind::Numeric | ValueKind::Json | ValueKind::Text => text.to_owned(),
    })
}

fn canonical_float(text: &str) -> String {
    match text {
        "NaN" => return "NaN".to_owned(),
        "Infinity" => return "Infinity".to_owned(),
        "-Infinity" => return "-Infinity".to_owned(),
        _ => {}
    }
    match text.parse::<f64>() {
        // -0 and 0 are the same number; SQLite does not keep the sign of zero.
        Ok(0.0) => "0".to_owned(),
        Ok(f) if f.is_nan() => "NaN".to_owned(),
        Ok(f) if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
        Ok(f) => format!("{f:e}"),
        Err(_) => text.to_owned(),
    }
}

/// Row count and an order-independent checksum of a table's rows: the sum
/// of each row's hash, so rows can be fed in any order in constant memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDigest {
    pub rows: u64,
    sum: u128,
}

impl TableDigest {
    /// Adds a row given as canonical values in column order.
    pub fn add_row(&mut self, values: &[Option<String>]) {
        let mut hasher = Sha256::new();
        for value in values {
            match value {
                // Length-prefixed, with a distinct marker for NULL, so no two
                // different rows encode alike.
                None => hasher.update([0u8]),
                Some(v) => {
                    hasher.update([1u8]);
                    hasher.update((v.len() as u64).to_be_bytes());
                    hasher.update(v.as_bytes());
                }
            }
        }
        let hash = hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash[..16]);
        self.sum = self.sum.wrapping_add(u128::from_be_bytes(first));
        self.rows += 1;
    }

    pub fn checksum_hex(&self) -> String {
        hex::encode(self.sum.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn floats_compare_by_value() {
        let c = |t| canonical_pg_text(ValueKind::Float, Some(t));
        assert_eq!(c("1e+20"), c("100000000000000000000"));
        assert_eq!(c("0.1"), c("0.10"));
        assert_ne!(c("0.1"), c("0.2"));
        assert_eq!(c("-0"), c("0"));
        assert_eq!(c("NaN").as_deref(), Some("NaN"));
    }

    #[test]
    fn other_kinds() {
        assert_eq!(
            canonical_pg_text(ValueKind::Bytes, Some("\\x00FF")).as_deref(),
            Some("00ff")
        );
        assert_eq!(
            canonical_pg_text(ValueKind::Bool, Some("t")).as_deref(),
            Some("t")
        );
        assert_eq!(
            canonical_pg_text(ValueKind::Integer, Some("-0042")).as_deref(),
            Some("-42")
        );
        assert_eq!(
            canonical_pg_text(ValueKind::Numeric, Some("1.50")).as_deref(),
            Some("1.50")
        );
        assert_eq!(canonical_pg_text(ValueKind::Text, None), None);
    }

    #[test]
    fn null_empty_and_the_word_null_differ() {
        let digest = |r: Vec<Option<String>>| {
            let mut d = TableDigest::default();
            d.add_row(&r);
            d
        };
        let a = digest(row(&[None]));
        let b = digest(row(&[Some("")]));
        let c = digest(row(&[Some("NULL")]));
        assert!(a != b && b != c && a != c);
        assert_ne!(
            digest(row(&[Some("ab"), None])),
            digest(row(&[Some("a"), Some("b")]))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn digest_ignores_row_order(rows in proptest::collection::vec(proptest::collection::vec(proptest::option::of(".{0,8}"), 1..4), 0..20)) {
            let mut forward = TableDigest::default();
            let mut backward = TableDigest::default();
            for r in &rows { forward.add_row(r); }
            for r in rows.iter().rev() { backward.add_row(r); }
            prop_assert_eq!(forward, backward);
        }

        #[test]
        fn float_text_round_trips(f in any::<f64>()) {
            let text = if f.is_nan() { "NaN".to_owned() } else if f.is_infinite() { if f > 0.0 { "Infinity".into() } else { "-Infinity".into() } } else { f.to_string() };
            let canon = canonical_pg_text(ValueKind::Float, Some(&text)).unwrap();
            prop_assert_eq!(canonical_pg_text(ValueKind::Float, Some(&canon)), Some(canon));
        }
    }
}
