//! The change ids a client's writes were applied under, recorded in
//! `pgrelay.applied_changes` in the write's own transaction: a batch sent
//! again after a lost answer is recognised and applies nothing twice. Keyed
//! by token subject as well as client id, so a token of another subject
//! cannot record an owner's change ids ahead of it.

use pgrelay_protocol::ClientTransaction;
use tokio_postgres::Client;

/// Who writes: the client id and, under `--auth`, the token's subject (its
/// owner claim; `None` without one, and without `--auth`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Author<'a> {
    pub(crate) client_id: &'a str,
    pub(crate) subject: Option<&'a str>,
}

/// Records the transaction's change ids; false when they were recorded
/// before (the transaction was applied by an earlier send).
pub(super) async fn record_ids(
    client: &Client,
    author: Author<'_>,
    tx: &ClientTransaction,
) -> Result<bool, tokio_postgres::Error> {
    let ids: Vec<&str> = tx.changes.iter().map(|c| c.id.as_str()).collect();
    let subject = author.subject.unwrap_or("");
    let inserted = client
        .execute(
            "INSERT INTO pgrelay.applied_changes (subject, client_id, change_id, tx_id) \
             SELECT $1::text, $2::text, unnest($3::text[]), $4::text ON CONFLICT DO NOTHING",
            &[&subject, &author.client_id, &ids, &tx.id],
        )
        .await?;
    Ok(u64::try_from(ids.len()).is_ok_and(|n| n == inserted))
}
