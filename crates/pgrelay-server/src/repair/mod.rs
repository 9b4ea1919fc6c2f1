//! Repair on the server's side: answers a replica's range checks from one
//! consistent snapshot, so a replica that cannot resume from the change log
//! receives only the rows that differ (see `pgrelay_protocol::repair` for
//! the exchange, `docs/repair.md` for what it guarantees).
//!
//! Rows are read with COPY from the snapshot's transaction and digested
//! here, in Rust, over the same canonical encoding the client uses, one
//! row at a time: memory stays flat whatever the table's size. Range
//! bounds from the client are checked (shape, order, key types) before
//! they reach SQL, where they become literals (COPY takes no parameters).
//!
//! The server keeps digests of each table too (`kept`, made by
//! `keeper`): a first round then reads only the ranges the change log
//! says were written since (`since`).

mod check;
mod keeper;
mod kept;
mod since;

pub(crate) use check::{answer, replaced_batches, replaced_rows, twin_split, RepairError};
pub(crate) use keeper::keep_digests;
pub(crate) use kept::{Dirty, Kept, KeptDigests};
pub(crate) use since::{written_since, Since};
