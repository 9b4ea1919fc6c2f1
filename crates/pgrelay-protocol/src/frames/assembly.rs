//! The server's side of `write_part`: a transaction put back together from
//! its parts, in order, within the limits, or refused.

use crate::{BatchRefusal, ClientChange, ClientTransaction, WriteBatch, MAX_WRITE_CHANGES};

use super::{WritePart, MAX_TRANSACTION_BYTES};

/// What the server does with a `write_part`.
#[derive(Debug, PartialEq, Eq)]
pub enum PartAnswer {
    /// The last part came: apply this batch (one transaction).
    Complete(WriteBatch),
    /// Answer `write_refused` for this batch id.
    Refused {
        batch_id: Option<String>,
        code: BatchRefusal,
        message: String,
    },
}

/// A transaction arriving in parts on one connection; at most one at a
/// time. Holds at most [`MAX_TRANSACTION_BYTES`] of frames and
/// [`MAX_WRITE_CHANGES`] changes: past either it is refused and dropped.
#[derive(Debug)]
pub struct Assembly {
    batch_id: Option<String>,
    transaction_id: String,
    next: u32,
    pub(super) changes: Vec<ClientChange>,
    bytes: usize,
    /// Answered already (refused): its remaining parts are dropped unread.
    dropped: bool,
}

impl Assembly {
    /// Bytes of frames held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it still collects (it was not refused or dropped).
    pub fn is_collecting(&self) -> bool {
        !self.dropped
    }

    /// An assembly that drops the rest of `part`'s transaction unanswered
    /// (the caller answered it); `None` when `part` is its last.
    pub fn drop_rest(part: &WritePart) -> Option<Assembly> {
        (!part.last).then(|| Assembly {
            batch_id: part.batch_id.clone(),
            transaction_id: part.transaction_id.clone(),
            next: part.part.saturating_add(1),
            changes: Vec::new(),
            bytes: 0,
            dropped: true,
        })
    }

    /// Something other than the next part came (a `write`): the unfinished
    /// transaction is dropped, and refused unless it was answered already.
    pub fn interrupt(slot: &mut Option<Assembly>, by: &str) -> Option<PartAnswer> {
        let open = slot.take()?;
        (!open.dropped).then(|| PartAnswer::Refused {
            message: format!(
                "transaction {:?} was interrupted by {by} before its last part; its parts are dropped",
                open.transaction_id
            ),
            batch_id: open.batch_id,
            code: BatchRefusal::MalformedBatch,
        })
    }

    /// Takes `part`, whose frame was `frame_bytes` long.
    pub fn receive(
        slot: &mut Option<Assembly>,
        part: WritePart,
        frame_bytes: usize,
    ) -> Vec<PartAnswer> {
        let mut answers = Vec::new();
        if let Some(mut open) = slot.take() {
            let continues = part.part != 0
                && open.transaction_id == part.transaction_id
                && open.next == part.part;
            if continues && open.dropped {
                if !part.last {
                    open.next = open.next.saturating_add(1);
                    *slot = Some(open);
                }
                return answers;
            }
            if continues {
                open.take(part, frame_bytes, slot, &mut answers);
                return answers;
            }
            answers.extend(Assembly::interrupt(
                &mut Some(open),
                &format!(
                    "part {} of transaction {:?}",
                    part.part,
                    short(&part.transaction_id)
                ),
            ));
        }
        if part.part != 0 {
            let message = format!(
                "part {} of transaction {:?} came without the parts before it",
                part.part,
                short(&part.transaction_id)
            );
            let already = answers.iter().any(
                |a| matches!(a, PartAnswer::Refused { batch_id, .. } if *batch_id == part.batch_id),
            );
            if !already {
                answers.push(PartAnswer::Refused {
                    batch_id: part.batch_id.clone(),
                    code: BatchRefusal::MalformedBatch,
                    message,
                });
            }
            *slot = Assembly::drop_rest(&part);
            return answers;
        }
        let open = Assembly {
            batch_id: part.batch_id.clone(),
            transaction_id: part.transaction_id.clone(),
            next: 0,
            changes: Vec::new(),
            bytes: 0,
            dropped: false,
        };
        open.take(part, frame_bytes, slot, &mut answers);
        answers
    }

    fn take(
        mut self,
        part: WritePart,
        frame_bytes: usize,
        slot: &mut Option<Assembly>,
        answers: &mut Vec<PartAnswer>,
    ) {
        self.next = self.next.saturating_add(1);
        self.bytes = self.bytes.saturating_add(frame_bytes);
        let last = part.last;
        self.changes.extend(part.changes);
        let over = if self.changes.len() > MAX_WRITE_CHANGES {
            Some(format!(
                "transaction {:?} has more than {MAX_WRITE_CHANGES} changes, the most one transaction may have",
                short(&self.transaction_id)
            ))
        } else if self.bytes > MAX_TRANSACTION_BYTES {
            Some(format!(
                "transaction {:?} takes more than {MAX_TRANSACTION_BYTES} bytes in its parts, the most one transaction may take",
                short(&self.transaction_id)
            ))
        } else {
            None
        };
        if let Some(message) = over {
            answers.push(PartAnswer::Refused {
                batch_id: self.batch_id.clone(),
                code: BatchRefusal::BatchTooLarge,
                message,
            });
            self.changes = Vec::new();
            self.dropped = true;
            if !last {
                *slot = Some(self);
            }
            return;
        }
        if !last {
            *slot = Some(self);
            return;
        }
        answers.push(PartAnswer::Complete(WriteBatch {
            batch_id: self.batch_id,
            client_id: None,
            transactions: vec![ClientTransaction {
                id: self.transaction_id,
                changes: self.changes,
            }],
        }));
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}
