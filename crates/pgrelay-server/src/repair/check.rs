//! One `check`: the server's digests of the client's ranges, and the rows
//! of the ranges it replaces.

use futures_util::StreamExt;
use pgrelay_protocol::copy_text;
use pgrelay_protocol::repair::{
    key_kinds, pg_ranges_condition, CheckSpan, DiffPart, Key, KeyKind, KeyValue, RangeSum,
    RowHasher, Tally,
};
use pgrelay_protocol::TableSchema;

use crate::auth::Scope;
use crate::snapshot::{GiveWay, Snapshot, SnapshotError};

/// Ranges read by one COPY, at most (an `OR` of their conditions).
const RANGES_PER_QUERY: usize = 64;

/// Ranges of one `check`, at most.
const MAX_PARTS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RepairError {
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    /// The client's check is not well formed; the session ends.
    #[error("bad repair check: {0}")]
    BadCheck(String),
}

/// First-round checks of at least this many ranges are read over two
/// connections (see [`answer`]).
const TWIN_PARTS: usize = 64;

/// Whether a check is a first round worth reading over two connections:
/// one span over the whole key space, with many parts. Returns the key
/// where the second connection's half begins.
pub(crate) fn twin_split(table: &TableSchema, spans: &[CheckSpan]) -> Option<Key> {
    let [span] = spans else {
        return None;
    };
    if span.lo.is_some() || span.hi.is_some() || span.parts() < TWIN_PARTS {
        return None;
    }
    key_kinds(table)?;
    span.bounds.get(span.bounds.len() / 2).cloned()
}

/// What [`answer`] found: the differing parts, the table's full digest
/// for a check over the whole key space, and the rows it read.
pub(crate) struct Answer {
    pub(crate) parts: Vec<DiffPart>,
    pub(crate) total: Option<RangeSum>,
    pub(crate) rows_read: u64,
}

/// The parts of `spans` whose rows differ from the client's, and, when
/// the check covers the whole key space, the table's full digest. With a
/// `twin` (a second connection into the same snapshot) a first round is
/// read in two halves at once, one per connection. `known` holds, per
/// span, the sums of parts the server kept digests of (see `kept`; empty
/// for a span it has none of): only the other parts are read.
pub(crate) async fn answer(
    snapshot: &Snapshot,
    twin: Option<&Snapshot>,
    scope: Option<&Scope>,
    table: &TableSchema,
    spans: &[CheckSpan],
    known: &[Vec<Option<RangeSum>>],
) -> Result<Answer, RepairError> {
    let kinds = validate(table, spans)?;
    let mut tally = Tally::new(spans);
    let mut rows_read = 0;
    let any_known = known.iter().flatten().any(Option::is_some);
    if let (true, Some(kinds)) = (any_known, kinds.as_deref()) {
        let mut ranges = Vec::new();
        for (s, span) in spans.iter().enumerate() {
            match known.get(s).filter(|k| k.len() == span.parts()) {
                Some(sums) => {
                    ranges.extend(unknown_ranges(span, sums));
                    for (part, sum) in sums.iter().enumerate() {
                        if let Some(sum) = sum {
                            tally.add_sum(s, part, *sum);
                        }
                    }
                }
                None => ranges.push((span.lo.clone(), span.hi.clone())),
            }
        }
        for batch in ranges.chunks(RANGES_PER_QUERY) {
            let condition = pg_ranges_condition(table, kinds, batch);
            rows_read += digest_rows(
                snapshot,
                scope,
                table,
                Some(kinds),
                Some(&condition),
                &mut tally,
            )
            .await?;
        }
    } else if let (Some(twin), Some(kinds), Some(middle)) =
        (twin, kinds.as_deref(), twin_split(table, spans))
    {
        let first = pg_ranges_condition(table, kinds, &[(None, Some(middle.clone()))]);
        let second = pg_ranges_condition(table, kinds, &[(Some(middle), None)]);
        let mut other = Tally::new(spans);
        let (a, b) = tokio::join!(
            digest_rows(
                snapshot,
                scope,
                table,
                Some(kinds),
                Some(&first),
                &mut tally
            ),
            digest_rows(twin, scope, table, Some(kinds), Some(&second), &mut other),
        );
        rows_read += a? + b?;
        tally.merge(&other);
    } else {
        let ranges: Vec<(Option<Key>, Option<Key>)> =
            spans.iter().map(|s| (s.lo.clone(), s.hi.clone())).collect();
        for batch in ranges.chunks(RANGES_PER_QUERY) {
            let condition = kinds
                .as_deref()
                .map(|kinds| pg_ranges_condition(table, kinds, batch));
            rows_read += digest_rows(
                snapshot,
                scope,
                table,
                kinds.as_deref(),
                condition.as_deref(),
                &mut tally,
            )
            .await?;
        }
    }
    let full_span = spans.len() == 1 && spans[0].lo.is_none() && spans[0].hi.is_none();
    Ok(Answer {
        parts: tally.diff(),
        total: full_span.then(|| tally.total()),
        rows_read,
    })
}

/// The ranges of a span's parts not `known`, neighbours merged.
fn unknown_ranges(span: &CheckSpan, known: &[Option<RangeSum>]) -> Vec<(Option<Key>, Option<Key>)> {
    let mut ranges = Vec::new();
    let mut part = 0;
    while part < known.len() {
        if known[part].is_some() {
            part += 1;
            continue;
        }
        let first = part;
        while known.get(part).is_some_and(Option::is_none) {
            part += 1;
        }
        let (lo, _) = span.part_range(first);
        let (_, hi) = span.part_range(part - 1);
        ranges.push((lo, hi));
    }
    ranges
}

/// Reads the rows `condition` holds for with COPY and adds each to the
/// tally (keyed by `kinds`; none: the table is compared whole). Returns
/// the rows read.
async fn digest_rows(
    snapshot: &Snapshot,
    scope: Option<&Scope>,
    table: &TableSchema,
    kinds: Option<&[KeyKind]>,
    condition: Option<&str>,
    tally: &mut Tally<'_>,
) -> Result<u64, RepairError> {
    for_each_row_hash(
        snapshot,
        scope,
        table,
        kinds,
        condition,
        None,
        |key, hash| match key {
            None => tally.add_whole(0, hash),
            Some(key) => tally.add(&key, hash),
        },
    )
    .await
}

/// Reads the rows `condition` holds for with COPY and calls `each` with
/// each row's key (`None` without `kinds`) and hash; returns the rows
/// read. A row whose key does not read is skipped. A background reader
/// passes `give_way`, and stops reading while hydrations are under way.
pub(crate) async fn for_each_row_hash(
    snapshot: &Snapshot,
    scope: Option<&Scope>,
    table: &TableSchema,
    kinds: Option<&[KeyKind]>,
    condition: Option<&str>,
    mut give_way: Option<&mut GiveWay>,
    mut each: impl FnMut(Option<Key>, u128),
) -> Result<u64, RepairError> {
    let key_at: Vec<usize> = table
        .primary_key
        .iter()
        .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
        .collect();
    let value_kinds: Vec<_> = table.columns.iter().map(|c| c.kind).collect();
    let mut hasher = RowHasher::default();
    let mut rows = 0u64;
    let stream = snapshot.copy_rows(table, scope, condition).await?;
    let mut stream = Box::pin(stream);
    loop {
        if let Some(give_way) = give_way.as_deref_mut() {
            give_way.pause().await;
        }
        let Some(data) = stream.next().await else {
            break;
        };
        let data = data.map_err(SnapshotError::sql(format!("repairing {}", table.name)))?;
        copy_text::for_each_row(
            &data,
            |values| {
                rows += 1;
                let hash = hasher.hash(&value_kinds, values.iter().map(|v| v.as_deref()));
                match kinds {
                    None => each(None, hash),
                    Some(kinds) => {
                        // A key column's value keys alike before and after
                        // canonicalising (integers parse, text is kept),
                        // so the raw text serves.
                        let key: Option<Key> = key_at
                            .iter()
                            .zip(kinds)
                            .map(|(&i, &kind)| {
                                KeyValue::from_canonical(
                                    kind,
                                    values.get(i).and_then(|v| v.as_deref()),
                                )
                            })
                            .collect();
                        if let Some(key) = key {
                            each(Some(key), hash);
                        }
                    }
                }
                Ok(())
            },
            |message| RepairError::BadCheck(format!("COPY row of {}: {message}", table.name)),
        )?;
    }
    Ok(rows)
}

/// Ranges whose rows [`replaced_rows`] reads with one COPY.
pub(crate) fn replaced_batches(
    ranges: &[(Option<Key>, Option<Key>)],
) -> std::slice::Chunks<'_, (Option<Key>, Option<Key>)> {
    ranges.chunks(RANGES_PER_QUERY)
}

/// The rows of one batch of ranges (see [`replaced_batches`]), as COPY
/// text; `None` ranges mean the whole table.
///
/// One COPY at a time: the caller reads this stream to its end before it
/// opens the next. A second COPY started on the snapshot's connection
/// while the first one's rows are still unread waits for its answer
/// behind those rows, and the connection stops reading them once its
/// one-message channel is full: both wait forever (the stall `bench
/// repair` hit at 200,000 rows, where more than one batch of ranges was
/// replaced at once).
pub(crate) async fn replaced_rows(
    snapshot: &Snapshot,
    scope: Option<&Scope>,
    table: &TableSchema,
    batch: &[(Option<Key>, Option<Key>)],
) -> Result<tokio_postgres::CopyOutStream, RepairError> {
    let condition = key_kinds(table)
        .as_deref()
        .map(|kinds| pg_ranges_condition(table, kinds, batch));
    Ok(snapshot
        .copy_rows(table, scope, condition.as_deref())
        .await?)
}

/// Checks a client's spans against the table; returns its key kinds
/// (`None`: compared whole).
fn validate(table: &TableSchema, spans: &[CheckSpan]) -> Result<Option<Vec<KeyKind>>, RepairError> {
    let bad = |m: &str| Err(RepairError::BadCheck(format!("{}: {m}", table.name)));
    if spans.is_empty() {
        return bad("no spans");
    }
    if spans.iter().map(CheckSpan::parts).sum::<usize>() > MAX_PARTS {
        return bad("too many ranges");
    }
    if !spans.iter().all(CheckSpan::is_valid) {
        return bad("a span is not well formed");
    }
    let kinds = key_kinds(table);
    let Some(kinds) = kinds else {
        let span = &spans[0];
        if spans.len() != 1 || span.parts() != 1 || span.lo.is_some() || span.hi.is_some() {
            return bad("a table without a comparable key is checked whole, in one range");
        }
        return Ok(None);
    };
    for span in spans {
        for key in span.lo.iter().chain(&span.hi).chain(&span.bounds) {
            let fits = key.len() == kinds.len()
                && key.iter().zip(&kinds).all(|(v, k)| match (v, k) {
                    (KeyValue::Int(_), KeyKind::Integer) => true,
                    (KeyValue::Text(t), KeyKind::Text) => !t.contains('\0'),
                    (KeyValue::Text(t), KeyKind::Uuid) => {
                        t.len() == 36 && t.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                    }
                    _ => false,
                });
            if !fits {
                return bad("a bound does not match the table's key");
            }
        }
    }
    // Ascending and disjoint: each span starts at or after the previous end.
    for pair in spans.windows(2) {
        match (&pair[0].hi, &pair[1].lo) {
            (Some(hi), Some(lo)) if hi <= lo => {}
            _ => return bad("spans overlap or are out of order"),
        }
    }
    Ok(Some(kinds))
}
