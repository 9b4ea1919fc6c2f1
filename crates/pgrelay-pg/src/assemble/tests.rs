use bytes::Bytes;
use pgwire_replication::Lsn as WireLsn;

use super::*;
use crate::pgoutput::tests::encode;
use crate::pgoutput::{OldTuple, RelationColumn, Tuple, TupleValue};

fn relation(oid: u32, name: &str, columns: &[&str]) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: b'd',
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, c)| RelationColumn {
                name: (*c).into(),
                type_oid: 25,
                type_modifier: -1,
                is_key: i == 0,
            })
            .collect(),
    }
}

fn data(message: &RowMessage) -> ReplicationEvent {
    ReplicationEvent::XLogData {
        wal_start: WireLsn(0),
        wal_end: WireLsn(0),
        server_time_micros: 0,
        data: Bytes::from(encode(message)),
    }
}

fn text(values: &[&str]) -> Tuple {
    Tuple(
        values
            .iter()
            .map(|v| TupleValue::Text((*v).into()))
            .collect(),
    )
}

fn begin(final_lsn: u64) -> ReplicationEvent {
    ReplicationEvent::Begin {
        final_lsn: WireLsn(final_lsn),
        xid: 7,
        commit_time_micros: 0,
    }
}

fn commit(lsn: u64) -> ReplicationEvent {
    ReplicationEvent::Commit {
        lsn: WireLsn(lsn),
        end_lsn: WireLsn(lsn + 8),
        commit_time_micros: 1,
    }
}

fn insert(oid: u32, values: &[&str]) -> ReplicationEvent {
    data(&RowMessage::Insert {
        relation_oid: oid,
        new: text(values),
    })
}

fn feed_all(
    assembler: &mut Assembler,
    events: Vec<ReplicationEvent>,
) -> Result<Vec<StreamEvent>, AssembleError> {
    events.into_iter().map(|e| assembler.feed(e)).collect()
}

#[test]
fn a_transaction_is_handed_over_whole_at_its_commit() {
    let mut a = Assembler::default();
    let rel = relation(1, "todos", &["id", "title"]);
    let events = feed_all(
        &mut a,
        vec![
            data(&RowMessage::Relation(rel.clone())),
            begin(100),
            insert(1, &["1", "a"]),
            data(&RowMessage::Update {
                relation_oid: 1,
                old: None,
                new: text(&["1", "b"]),
            }),
            data(&RowMessage::Delete {
                relation_oid: 1,
                old: OldTuple::Key(Tuple(vec![TupleValue::Text("1".into()), TupleValue::Null])),
            }),
            ReplicationEvent::Message {
                transactional: true,
                lsn: WireLsn(90),
                prefix: ORIGIN_PREFIX.into(),
                content: Bytes::from_static(b"client-1"),
            },
            commit(120),
        ],
    )
    .unwrap();
    assert_eq!(events[0], StreamEvent::Relation(rel));
    assert!(events[1..6].iter().all(|e| *e == StreamEvent::Progress));
    let StreamEvent::Committed { tx, end_lsn } = &events[6] else {
        panic!("no commit: {:?}", events[6]);
    };
    assert_eq!((tx.lsn, *end_lsn), (Lsn(120), Lsn(128)));
    assert_eq!(tx.origin.as_deref(), Some("client-1"));
    assert_eq!(tx.commit_time_us, 1 + PG_EPOCH_US);
    let ops: Vec<Op> = tx.changes.iter().map(|c| c.op).collect();
    assert_eq!(ops, vec![Op::Insert, Op::Update, Op::Delete]);
    assert!(tx.changes.iter().all(|c| c.table == "public.todos"));
    assert_eq!(
        tx.changes[2]
            .old
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["id"]
    );
}

#[test]
fn a_large_transaction_keeps_every_row_in_order() {
    let mut a = Assembler::default();
    a.feed(data(&RowMessage::Relation(relation(1, "t", &["id"]))))
        .unwrap();
    a.feed(begin(5_000_000)).unwrap();
    for i in 0..50_000 {
        assert_eq!(
            a.feed(insert(1, &[&i.to_string()])).unwrap(),
            StreamEvent::Progress
        );
    }
    let StreamEvent::Committed { tx, .. } = a.feed(commit(5_000_000)).unwrap() else {
        panic!("no commit");
    };
    assert_eq!(tx.changes.len(), 50_000);
    let last = tx.changes[49_999].new.as_ref().unwrap();
    assert_eq!(last["id"].as_deref(), Some("49999"));
}

#[test]
fn a_relation_message_mid_transaction_applies_to_the_rows_after_it() {
    let mut a = Assembler::default();
    a.feed(data(&RowMessage::Relation(relation(1, "t", &["id"]))))
        .unwrap();
    a.feed(begin(10)).unwrap();
    a.feed(insert(1, &["1"])).unwrap();
    let altered = relation(1, "t", &["id", "extra"]);
    assert_eq!(
        a.feed(data(&RowMessage::Relation(altered.clone())))
            .unwrap(),
        StreamEvent::Relation(altered)
    );
    a.feed(insert(1, &["2", "x"])).unwrap();
    let StreamEvent::Committed { tx, .. } = a.feed(commit(10)).unwrap() else {
        panic!("no commit");
    };
    assert_eq!(tx.changes[0].new.as_ref().unwrap().len(), 1);
    assert_eq!(
        tx.changes[1].new.as_ref().unwrap()["extra"].as_deref(),
        Some("x")
    );
}

#[test]
fn a_truncate_becomes_one_change_per_table() {
    let mut a = Assembler::default();
    a.feed(data(&RowMessage::Relation(relation(1, "a", &["id"]))))
        .unwrap();
    a.feed(data(&RowMessage::Relation(relation(2, "b", &["id"]))))
        .unwrap();
    a.feed(begin(10)).unwrap();
    a.feed(data(&RowMessage::Truncate {
        relation_oids: vec![1, 2],
        cascade: false,
        restart_identity: false,
    }))
    .unwrap();
    let StreamEvent::Committed { tx, .. } = a.feed(commit(10)).unwrap() else {
        panic!("no commit");
    };
    let tables: Vec<(&str, Op)> = tx
        .changes
        .iter()
        .map(|c| (c.table.as_str(), c.op))
        .collect();
    assert_eq!(
        tables,
        vec![("public.a", Op::Truncate), ("public.b", Op::Truncate)]
    );
}

#[test]
fn out_of_order_events_are_typed_errors() {
    let mut a = Assembler::default();
    assert_eq!(
        a.feed(commit(10)),
        Err(AssembleError::CommitWithoutBegin {
            commit_lsn: Lsn(10)
        })
    );
    a.feed(data(&RowMessage::Relation(relation(1, "t", &["id"]))))
        .unwrap();
    assert_eq!(
        a.feed(insert(1, &["1"])),
        Err(AssembleError::RowOutsideTransaction)
    );
    a.feed(begin(20)).unwrap();
    assert_eq!(
        a.feed(insert(9, &["1"])),
        Err(AssembleError::UnknownRelation { oid: 9 })
    );
    let broken = ReplicationEvent::XLogData {
        wal_start: WireLsn(0),
        wal_end: WireLsn(0),
        server_time_micros: 0,
        data: Bytes::from_static(b"I"),
    };
    let error = a.feed(broken).unwrap_err();
    assert!(matches!(error, AssembleError::Decode(_)));
    assert!(!error.is_retryable());
    assert!(AssembleError::RowOutsideTransaction.is_retryable());
}

#[test]
fn a_keepalive_says_idle_only_between_transactions() {
    let keepalive = || ReplicationEvent::KeepAlive {
        wal_end: WireLsn(500),
        reply_requested: false,
        server_time_micros: 0,
    };
    let mut a = Assembler::default();
    assert_eq!(
        a.feed(keepalive()).unwrap(),
        StreamEvent::Idle { wal_end: Lsn(500) }
    );
    a.feed(begin(10)).unwrap();
    assert_eq!(a.feed(keepalive()).unwrap(), StreamEvent::Progress);
    a.feed(commit(10)).unwrap();
    assert_eq!(
        a.feed(keepalive()).unwrap(),
        StreamEvent::Idle { wal_end: Lsn(500) }
    );
}
