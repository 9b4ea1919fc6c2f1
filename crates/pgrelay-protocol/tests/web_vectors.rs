//! The web client's repair digests must equal the Rust ones: this test
//! computes canonical values, row hashes and range sums for the inputs in
//! `clients/web/test/unit/repair-vectors.json` and checks them against the
//! outputs stored there, which the web client's unit tests check too.
//! `PGRELAY_WRITE_WEB_VECTORS=1` writes the outputs instead.

use std::path::PathBuf;

use pgrelay_protocol::canonical::canonical_pg_text;
use pgrelay_protocol::repair::{row_hash, RangeSum};
use pgrelay_protocol::ValueKind;
use serde_json::{json, Value};

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../clients/web/test/unit/repair-vectors.json")
}

fn kind(value: &Value) -> ValueKind {
    serde_json::from_value(value.clone()).expect("a value kind")
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

fn canonical_row(row: &Value) -> Vec<Option<String>> {
    let kinds = row["kinds"].as_array().expect("kinds");
    let values = row["values"].as_array().expect("values");
    kinds
        .iter()
        .zip(values)
        .map(|(k, v)| canonical_pg_text(kind(k), text(v).as_deref()))
        .collect()
}

fn sum_json(sum: &RangeSum) -> Value {
    json!({ "rows": sum.rows, "hex": sum.hex(), "short": format!("{:016x}", sum.short()) })
}

#[test]
fn the_web_clients_vectors_match_the_rust_digests() {
    let path = vectors_path();
    let mut doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the vectors file"))
            .expect("JSON");
    let write = std::env::var_os("PGRELAY_WRITE_WEB_VECTORS").is_some();
    let mut mismatches = Vec::new();
    for case in doc["values"].as_array_mut().expect("values") {
        let canonical = canonical_pg_text(kind(&case["kind"]), text(&case["text"]).as_deref());
        let expected = json!(canonical);
        if write {
            case["canonical"] = expected;
        } else if case["canonical"] != expected {
            mismatches.push(format!("{case}: Rust gives {expected}"));
        }
    }
    let mut all = RangeSum::default();
    for row in doc["rows"].as_array_mut().expect("rows") {
        let hash = row_hash(&canonical_row(row));
        all.add(hash);
        let expected = json!(format!("{hash:032x}"));
        if write {
            row["hash"] = expected;
        } else if row["hash"] != expected {
            mismatches.push(format!("{row}: Rust gives {expected}"));
        }
    }
    let expected = sum_json(&all);
    if write {
        doc["sum"] = expected;
        let text = serde_json::to_string_pretty(&doc).expect("JSON") + "\n";
        std::fs::write(&path, text).expect("writing the vectors");
    } else if doc["sum"] != expected {
        mismatches.push(format!("sum {}: Rust gives {expected}", doc["sum"]));
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
