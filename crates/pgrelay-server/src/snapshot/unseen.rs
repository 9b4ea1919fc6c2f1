//! Where the change stream resumes after a snapshot. PostgreSQL writes a
//! commit to the WAL, where capture may already decode and log it, a
//! moment before the transaction becomes visible to new snapshots; a
//! snapshot taken in that moment counts it as still in progress. The
//! stream must then resume below it, or the client would never receive
//! it (the client skips every logged transaction its snapshot saw, so
//! resuming lower repeats nothing).

use pgrelay_protocol::{Lsn, Visibility};
use tokio_postgres::types::PgLsn;

use super::{Snapshot, SnapshotError};

/// Logged transactions looked at, newest first. One the snapshot did not
/// see committed while the snapshot was taken, so it is among the newest:
/// PostgreSQL makes a commit visible microseconds after writing it.
const NEWEST: i64 = 1_000;

impl Snapshot {
    /// `head`, the change log's head read before the snapshot was taken,
    /// or just below the oldest transaction logged at or below it that
    /// the snapshot does not see.
    pub(crate) async fn resume_at(&self, head: Lsn) -> Result<Lsn, SnapshotError> {
        if self.visibility.xip.is_empty() {
            // Every transaction that began before the snapshot and is not
            // listed as in progress is visible (or aborted, never logged).
            return Ok(head);
        }
        let rows = self
            .client
            .query(
                "SELECT lsn, transaction_id FROM pgrelay.change_history \
                 WHERE lsn <= $1 AND ordinal = 0 ORDER BY lsn DESC LIMIT $2",
                &[&PgLsn::from(head.0), &NEWEST],
            )
            .await
            .map_err(SnapshotError::sql("reading the newest logged transactions"))?;
        let logged = rows.iter().map(|r| {
            let xid = u32::try_from(r.get::<_, i64>(1)).unwrap_or(u32::MAX);
            (Lsn(u64::from(r.get::<_, PgLsn>(0))), xid)
        });
        let resume = resume_before_unseen(head, &self.visibility, logged);
        if resume != head {
            tracing::info!(%head, %resume, "the snapshot missed a transaction already logged; resuming below it");
        }
        Ok(resume)
    }
}

/// `head`, lowered to just below the oldest of `logged` (commit LSN and
/// transaction id) that `visibility` does not see.
pub(crate) fn resume_before_unseen(
    head: Lsn,
    visibility: &Visibility,
    logged: impl IntoIterator<Item = (Lsn, u32)>,
) -> Lsn {
    logged
        .into_iter()
        .filter(|(lsn, xid)| *lsn <= head && !visibility.sees(*xid))
        .map(|(lsn, _)| Lsn(lsn.0.saturating_sub(1)))
        .min()
        .map_or(head, |below| below.min(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visibility(text: &str) -> Visibility {
        Visibility::parse(text, Lsn(1_000)).unwrap()
    }

    #[test]
    fn a_head_every_logged_transaction_of_which_the_snapshot_sees_stays() {
        let v = visibility("100:110:105");
        let logged = [(Lsn(500), 104), (Lsn(400), 99), (Lsn(300), 101)];
        assert_eq!(resume_before_unseen(Lsn(500), &v, logged), Lsn(500));
    }

    #[test]
    fn a_logged_transaction_the_snapshot_counts_in_progress_is_streamed_again() {
        // 105 committed at 450 (logged) but was still in progress for the
        // snapshot; 107 too, at 480.
        let v = visibility("100:110:105,107");
        let logged = [
            (Lsn(500), 104),
            (Lsn(480), 107),
            (Lsn(450), 105),
            (Lsn(300), 101),
        ];
        assert_eq!(resume_before_unseen(Lsn(500), &v, logged), Lsn(449));
    }

    #[test]
    fn transactions_above_the_head_do_not_move_it() {
        let v = visibility("100:110:105");
        assert_eq!(
            resume_before_unseen(Lsn(400), &v, [(Lsn(450), 105)]),
            Lsn(400)
        );
    }
}
