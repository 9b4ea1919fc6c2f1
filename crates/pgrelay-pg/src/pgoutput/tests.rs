// The encoder below writes fields of the widths pgoutput uses, from small
// test values.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test values are small and written at pgoutput's field widths"
)]

use proptest::prelude::*;

use super::*;

/// Encodes messages the way pgoutput does, for round-trip tests.
fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn tuple(out: &mut Vec<u8>, t: &Tuple) {
    out.extend_from_slice(&(t.0.len() as u16).to_be_bytes());
    for v in &t.0 {
        match v {
            TupleValue::Null => out.push(b'n'),
            TupleValue::UnchangedToast => out.push(b'u'),
            TupleValue::Text(s) => {
                out.push(b't');
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            TupleValue::Binary(b) => {
                out.push(b'b');
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

fn old(out: &mut Vec<u8>, o: &OldTuple) {
    match o {
        OldTuple::Key(t) => {
            out.push(b'K');
            tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.push(b'O');
            tuple(out, t);
        }
    }
}

pub(crate) fn encode(m: &RowMessage) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        RowMessage::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.oid.to_be_bytes());
            cstr(&mut out, &r.namespace);
            cstr(&mut out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
            for c in &r.columns {
                out.push(u8::from(c.is_key));
                cstr(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        RowMessage::Type {
            oid,
            namespace,
            name,
        } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            cstr(&mut out, namespace);
            cstr(&mut out, name);
        }
        RowMessage::Insert { relation_oid, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation_oid.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        RowMessage::Update {
            relation_oid,
            old: o,
            new,
        } => {
            out.push(b'U');
            out.extend_from_slice(&relation_oid.to_be_bytes());
            if let Some(o) = o {
                old(&mut out, o);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        RowMessage::Delete {
            relation_oid,
            old: o,
        } => {
            out.push(b'D');
            out.extend_from_slice(&relation_oid.to_be_bytes());
            old(&mut out, o);
        }
        RowMessage::Truncate {
            relation_oids,
            cascade,
            restart_identity,
        } => {
            out.push(b'T');
            out.extend_from_slice(&(relation_oids.len() as u32).to_be_bytes());
            out.push(u8::from(*cascade) | (u8::from(*restart_identity) << 1));
            for oid in relation_oids {
                out.extend_from_slice(&oid.to_be_bytes());
            }
        }
        RowMessage::Origin { lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, name);
        }
        RowMessage::Begin {
            final_lsn,
            commit_time_us_pg,
            xid,
        } => {
            out.push(b'B');
            out.extend_from_slice(&final_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time_us_pg.to_be_bytes());
            out.extend_from_slice(&xid.to_be_bytes());
        }
        RowMessage::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time_us_pg,
        } => {
            out.push(b'C');
            out.push(*flags);
            out.extend_from_slice(&commit_lsn.to_be_bytes());
            out.extend_from_slice(&end_lsn.to_be_bytes());
            out.extend_from_slice(&commit_time_us_pg.to_be_bytes());
        }
        RowMessage::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.push(b'M');
            out.push(u8::from(*transactional));
            out.extend_from_slice(&lsn.to_be_bytes());
            cstr(&mut out, prefix);
            out.extend_from_slice(&(content.len() as u32).to_be_bytes());
            out.extend_from_slice(content);
        }
    }
    out
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_ é\"]{0,20}"
}

fn value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        ".{0,40}".prop_map(TupleValue::Text),
        proptest::collection::vec(any::<u8>(), 0..20)
            .prop_map(|b| TupleValue::Binary(Bytes::from(b))),
    ]
}

fn tuple_strategy() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(value(), 0..12).prop_map(Tuple)
}

fn message() -> impl Strategy<Value = RowMessage> {
    let relation = (
        any::<u32>(),
        name(),
        name(),
        prop_oneof![Just(b'd'), Just(b'f'), Just(b'i'), Just(b'n')],
        proptest::collection::vec((name(), any::<u32>(), any::<i32>(), any::<bool>()), 0..10),
    )
        .prop_map(|(oid, namespace, name, replica_identity, cols)| {
            RowMessage::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns: cols
                    .into_iter()
                    .map(|(name, type_oid, type_modifier, is_key)| RelationColumn {
                        name,
                        type_oid,
                        type_modifier,
                        is_key,
                    })
                    .collect(),
            })
        });
    let old = prop_oneof![
        tuple_strategy().prop_map(OldTuple::Key),
        tuple_strategy().prop_map(OldTuple::Full)
    ];
    prop_oneof![
        relation,
        (any::<u32>(), tuple_strategy())
            .prop_map(|(relation_oid, new)| RowMessage::Insert { relation_oid, new }),
        (
            any::<u32>(),
            proptest::option::of(old.clone()),
            tuple_strategy()
        )
            .prop_map(|(relation_oid, old, new)| RowMessage::Update {
                relation_oid,
                old,
                new
            }),
        (any::<u32>(), old)
            .prop_map(|(relation_oid, old)| RowMessage::Delete { relation_oid, old }),
        (
            proptest::collection::vec(any::<u32>(), 0..5),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(relation_oids, cascade, restart_identity)| RowMessage::Truncate {
                    relation_oids,
                    cascade,
                    restart_identity
                }
            ),
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(
            |(final_lsn, commit_time_us_pg, xid)| RowMessage::Begin {
                final_lsn,
                commit_time_us_pg,
                xid
            }
        ),
        (
            any::<u64>(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..30)
        )
            .prop_map(|(lsn, prefix, c)| {
                RowMessage::Message {
                    transactional: true,
                    lsn,
                    prefix,
                    content: Bytes::from(c),
                }
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_inverts_encode(m in message()) {
        prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic(m in message()) {
        let bytes = encode(&m);
        for cut in 0..bytes.len() {
            prop_assert!(decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(&bytes);
    }
}

fn relation() -> Relation {
    let col = |name: &str, is_key| RelationColumn {
        name: name.into(),
        type_oid: 25,
        type_modifier: -1,
        is_key,
    };
    Relation {
        oid: 16384,
        namespace: "public".into(),
        name: "todos".into(),
        replica_identity: b'd',
        columns: vec![col("id", true), col("title", false), col("body", false)],
    }
}

#[test]
fn unchanged_toast_is_left_out_of_the_row() {
    let tuple = Tuple(vec![
        TupleValue::Text("1".into()),
        TupleValue::Null,
        TupleValue::UnchangedToast,
    ]);
    let row = tuple_to_row(&relation(), tuple).unwrap();
    assert_eq!(row.get("id"), Some(&Some("1".to_owned())));
    assert_eq!(row.get("title"), Some(&None));
    assert!(!row.contains_key("body"));
}

#[test]
fn key_tuples_keep_only_key_columns() {
    let tuple = Tuple(vec![
        TupleValue::Text("7".into()),
        TupleValue::Null,
        TupleValue::Null,
    ]);
    let row = old_tuple_to_row(&relation(), OldTuple::Key(tuple.clone())).unwrap();
    assert_eq!(row.len(), 1);
    assert_eq!(row.get("id"), Some(&Some("7".to_owned())));
    assert_eq!(
        old_tuple_to_row(&relation(), OldTuple::Full(tuple))
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn column_count_must_match_the_relation() {
    let err = tuple_to_row(&relation(), Tuple(vec![TupleValue::Null])).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::ColumnCount {
            got: 1,
            expected: 3,
            ..
        }
    ));
}

#[test]
fn binary_values_are_refused() {
    let tuple = Tuple(vec![
        TupleValue::Binary(Bytes::from_static(b"x")),
        TupleValue::Null,
        TupleValue::Null,
    ]);
    assert!(matches!(
        tuple_to_row(&relation(), tuple),
        Err(DecodeError::BinaryValue { .. })
    ));
}

#[test]
fn truncate_of_several_tables() {
    let m = RowMessage::Truncate {
        relation_oids: vec![1, 2, 3],
        cascade: true,
        restart_identity: false,
    };
    assert_eq!(decode(&encode(&m)).unwrap(), m);
}

#[test]
fn bad_input_is_named() {
    assert_eq!(decode(b""), Err(DecodeError::Empty));
    assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage('Z')));
    let mut bytes = encode(&RowMessage::Insert {
        relation_oid: 1,
        new: Tuple(vec![TupleValue::Null]),
    });
    bytes[8] = b'x';
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::BadColumnKind { kind: 'x', .. })
    ));
    let mut bytes = encode(&RowMessage::Insert {
        relation_oid: 1,
        new: Tuple(vec![TupleValue::Text("ab".into())]),
    });
    let last = bytes.len() - 1;
    bytes[last] = 0xff;
    assert!(matches!(decode(&bytes), Err(DecodeError::BadUtf8 { .. })));
    let mut bytes = encode(&RowMessage::Insert {
        relation_oid: 1,
        new: Tuple(vec![]),
    });
    bytes.push(0);
    assert_eq!(decode(&bytes), Err(DecodeError::Trailing(1)));
}
