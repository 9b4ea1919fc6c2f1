use proptest::prelude::*;

use super::*;
use crate::{BatchRefusal, Op, Row};

fn change(n: usize, body: usize) -> ClientChange {
    let mut row = Row::new();
    row.insert("id".into(), Some(n.to_string()));
    row.insert("body".into(), Some("x".repeat(body)));
    ClientChange {
        id: format!("c{n:031}"),
        table: "public.notes".into(),
        op: Op::Insert,
        new: Some(row),
        old: None,
    }
}

fn tx(id: &str, changes: Vec<ClientChange>) -> ClientTransaction {
    ClientTransaction {
        id: id.into(),
        changes,
    }
}

fn parse(frame: &str) -> ClientMessage {
    serde_json::from_str(frame).unwrap()
}

/// Sends `frames` through an assembly; returns what it answered.
fn assemble(frames: &[String]) -> Vec<PartAnswer> {
    let mut slot = None;
    let mut answers = Vec::new();
    for frame in frames {
        let ClientMessage::WritePart(part) = parse(frame) else {
            panic!("not a part: {}", &frame[..80]);
        };
        answers.extend(Assembly::receive(&mut slot, part, frame.len()));
    }
    assert!(
        slot.is_none(),
        "the assembly stays open after the last part"
    );
    answers
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// A spliced batch frame is byte for byte what serde writes, and its
    /// length is known before it is built.
    #[test]
    fn batch_frames_are_what_serde_writes(
        sizes in proptest::collection::vec((1usize..20, 0usize..300), 1..12),
        batch_id in proptest::option::of("[a-z0-9-]{1,20}"),
    ) {
        let mut frame = BatchFrame::new(batch_id.as_deref());
        let mut batch = WriteBatch { batch_id: batch_id.clone(), client_id: None, transactions: Vec::new() };
        let mut n = 0;
        for (i, (changes, body)) in sizes.into_iter().enumerate() {
            let t = tx(&format!("tx-{i}"), (0..changes).map(|_| { n += 1; change(n, body) }).collect());
            let encoded = EncodedTransaction::new(&t);
            prop_assert_eq!(encoded.len(), serde_json::to_string(&t).unwrap().len());
            let predicted = frame.len_with(&encoded);
            frame.push(encoded);
            prop_assert_eq!(frame.len(), predicted);
            batch.transactions.push(t);
        }
        let len = frame.len();
        let text = frame.into_frame();
        prop_assert_eq!(text.len(), len);
        prop_assert_eq!(&text, &serde_json::to_string(&ClientMessage::Write(batch)).unwrap());
    }

    /// A transaction over one frame is split into parts of at most a frame
    /// each, whose sizes the layout knew, and which assemble back into it.
    #[test]
    fn parts_reassemble_into_the_transaction(changes in 1usize..300, body in 0usize..40_000) {
        let t = tx("tx-big", (0..changes).map(|n| change(n, body)).collect());
        let encoded = EncodedTransaction::new(&t);
        let laid = match layout(Some("b-1"), &encoded) {
            Ok(laid) => laid,
            Err(TooLarge::Bytes { bytes }) => {
                prop_assert!(bytes > MAX_TRANSACTION_BYTES);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let frames = encode_alone(Some("b-1"), encoded).unwrap();
        prop_assert_eq!(frames.len(), laid.frames());
        prop_assert_eq!(frames.iter().map(String::len).collect::<Vec<_>>(), laid.sizes.clone());
        for frame in &frames {
            prop_assert!(frame.len() <= MAX_CLIENT_FRAME_BYTES);
        }
        if !laid.is_split() {
            prop_assert_eq!(parse(&frames[0]), ClientMessage::Write(WriteBatch {
                batch_id: Some("b-1".into()), client_id: None, transactions: vec![t],
            }));
            return Ok(());
        }
        // Each part but the last is full: the next change would not fit.
        let answers = assemble(&frames);
        prop_assert_eq!(answers, vec![PartAnswer::Complete(WriteBatch {
            batch_id: Some("b-1".into()), client_id: None, transactions: vec![t],
        })]);
    }
}

#[test]
fn a_transaction_exactly_one_frame_long_is_one_write() {
    // Grow the last row until the frame is exactly the limit.
    let mut changes: Vec<ClientChange> = (0..100).map(|n| change(n, 10_000)).collect();
    let base =
        BatchFrame::new(Some("b-1")).len_with(&EncodedTransaction::new(&tx("t", changes.clone())));
    let pad = MAX_CLIENT_FRAME_BYTES - base;
    changes[99] = change(99, 10_000 + pad);
    let at = EncodedTransaction::new(&tx("t", changes.clone()));
    let laid = layout(Some("b-1"), &at).unwrap();
    assert_eq!((laid.frames(), laid.bytes()), (1, MAX_CLIENT_FRAME_BYTES));
    changes[99] = change(99, 10_000 + pad + 1);
    let past = EncodedTransaction::new(&tx("t", changes));
    let laid = layout(Some("b-1"), &past).unwrap();
    assert_eq!(laid.frames(), 2);
    let frames = encode_alone(Some("b-1"), past).unwrap();
    assert!(frames.iter().all(|f| f.len() <= MAX_CLIENT_FRAME_BYTES));
    assert_eq!(assemble(&frames).len(), 1);
}

#[test]
fn what_cannot_be_sent_is_named() {
    let many = tx("t", (0..=MAX_WRITE_CHANGES).map(|n| change(n, 0)).collect());
    assert_eq!(
        layout(None, &EncodedTransaction::new(&many)),
        Err(TooLarge::Changes {
            changes: MAX_WRITE_CHANGES + 1
        })
    );
    let huge_row = tx("t", vec![change(1, 1), change(2, MAX_CLIENT_FRAME_BYTES)]);
    let err = layout(None, &EncodedTransaction::new(&huge_row)).unwrap_err();
    assert!(
        matches!(err, TooLarge::Change { index: 1, ref table, .. } if table == "public.notes"),
        "{err:?}"
    );
    assert!(err.to_string().contains("1048576"), "{err}");
    let heavy = tx("t", (0..20).map(|n| change(n, 500_000)).collect());
    let err = layout(None, &EncodedTransaction::new(&heavy)).unwrap_err();
    assert!(matches!(err, TooLarge::Bytes { bytes } if bytes > MAX_TRANSACTION_BYTES));
    assert!(err.to_string().contains("8388608"), "{err}");
}

fn part(id: &str, n: u32, last: bool, changes: Vec<ClientChange>) -> WritePart {
    WritePart {
        batch_id: Some(format!("b-{id}")),
        transaction_id: id.into(),
        part: n,
        last,
        changes,
    }
}

fn refused(answers: &[PartAnswer]) -> Vec<(Option<String>, BatchRefusal)> {
    answers
        .iter()
        .map(|a| match a {
            PartAnswer::Refused { batch_id, code, .. } => (batch_id.clone(), *code),
            PartAnswer::Complete(b) => panic!("completed {:?}", b.batch_id),
        })
        .collect()
}

#[test]
fn parts_out_of_order_are_refused_once() {
    let mut slot = None;
    assert!(Assembly::receive(&mut slot, part("a", 0, false, vec![change(1, 1)]), 100).is_empty());
    // Part 2 before part 1: the transaction is refused, its rest dropped.
    let answers = Assembly::receive(&mut slot, part("a", 2, false, vec![change(2, 1)]), 100);
    assert_eq!(
        refused(&answers),
        vec![(Some("b-a".into()), BatchRefusal::MalformedBatch)]
    );
    assert!(Assembly::receive(&mut slot, part("a", 3, true, vec![change(3, 1)]), 100).is_empty());
    assert!(slot.is_none());
    // A part without its first part.
    let answers = Assembly::receive(&mut slot, part("b", 1, true, vec![change(1, 1)]), 100);
    assert_eq!(
        refused(&answers),
        vec![(Some("b-b".into()), BatchRefusal::MalformedBatch)]
    );
    // Another write in the middle interrupts the open transaction.
    assert!(Assembly::receive(&mut slot, part("c", 0, false, vec![change(1, 1)]), 100).is_empty());
    let answer = Assembly::interrupt(&mut slot, "a write").unwrap();
    assert!(matches!(
        answer,
        PartAnswer::Refused {
            code: BatchRefusal::MalformedBatch,
            ..
        }
    ));
    assert!(slot.is_none());
    // A part 0 always starts afresh; a single part is a whole transaction.
    let answers = Assembly::receive(&mut slot, part("d", 0, true, vec![change(1, 1)]), 100);
    assert!(matches!(&answers[..], [PartAnswer::Complete(b)] if b.transactions[0].id == "d"));
}

#[test]
fn an_assembly_over_the_limits_is_refused_and_the_rest_dropped() {
    let mut slot = None;
    let frame = MAX_CLIENT_FRAME_BYTES;
    let mut answers = Vec::new();
    for n in 0..12u32 {
        answers.extend(Assembly::receive(
            &mut slot,
            part("big", n, n == 11, vec![change(n as usize, 1)]),
            frame,
        ));
        if let Some(open) = &slot {
            assert!(open.changes.is_empty() || open.bytes() <= MAX_TRANSACTION_BYTES);
        }
    }
    assert_eq!(
        refused(&answers),
        vec![(Some("b-big".into()), BatchRefusal::BatchTooLarge)]
    );
    assert!(slot.is_none());
    let mut answers = Vec::new();
    for n in 0..3u32 {
        let changes = (0..4_000).map(|i| change(i, 0)).collect();
        answers.extend(Assembly::receive(
            &mut slot,
            part("many", n, n == 2, changes),
            1000,
        ));
    }
    match &answers[..] {
        [PartAnswer::Refused { code, message, .. }] => {
            assert_eq!(*code, BatchRefusal::BatchTooLarge);
            assert!(message.contains("10000"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn write_part_wire_form() {
    let text = r#"{"type":"write_part","batch_id":"b-1","transaction_id":"t","part":0,"last":true,"changes":[]}"#;
    let message: ClientMessage = serde_json::from_str(text).unwrap();
    assert_eq!(
        message,
        ClientMessage::WritePart(WritePart {
            batch_id: Some("b-1".into()),
            transaction_id: "t".into(),
            part: 0,
            last: true,
            changes: Vec::new(),
        })
    );
    assert_eq!(serde_json::to_string(&message).unwrap(), text);
    assert!(serde_json::from_str::<ClientMessage>(
        r#"{"type":"write_part","transaction_id":"t","part":0,"last":true,"changes":[],"x":1}"#
    )
    .is_err());
}
