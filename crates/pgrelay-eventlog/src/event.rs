//! LiveStore events as pgrelay keeps them: the client's encoded event,
//! byte for byte, with the sequence numbers read out of it, and the pages
//! in which events go back to clients.

use serde::Deserialize;
use serde_json::value::RawValue;

/// At most this many events travel in one pull page (LiveStore's
/// `MAX_PULL_EVENTS_PER_MESSAGE`).
pub(crate) const MAX_PAGE_EVENTS: usize = 100;

/// A page is cut before it passes this many bytes of events (LiveStore's
/// `MAX_WS_MESSAGE_BYTES`, 900 kB, keeps frames under ~1 MB).
pub(crate) const MAX_PAGE_BYTES: usize = 900_000;

/// One event of a push, as the client encoded it (`LiveStoreEvent.Global.Encoded`).
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) seq: i64,
    pub(crate) parent: i64,
    /// The event's JSON exactly as pushed; echoed back unchanged.
    pub(crate) json: String,
}

/// An event read back from storage.
#[derive(Clone, Debug)]
pub(crate) struct StoredEvent {
    pub(crate) seq: i64,
    pub(crate) json: String,
    pub(crate) created_at: String,
}

#[derive(Deserialize)]
struct EventFields<'a> {
    name: &'a str,
    #[serde(rename = "seqNum")]
    seq: i64,
    #[serde(rename = "parentSeqNum")]
    parent: i64,
    #[serde(rename = "clientId")]
    client_id: &'a str,
    #[serde(rename = "sessionId")]
    session_id: &'a str,
}

/// Reads a pushed batch: every event needs a name, a client and session
/// id, and sequence numbers that form one chain (each event's parent is
/// the one before it). Whether the chain starts at the store's head is the
/// store's decision, not this one.
pub(crate) fn parse_batch(batch: &[&RawValue]) -> Result<Vec<Event>, String> {
    let mut events = Vec::with_capacity(batch.len());
    for (i, raw) in batch.iter().enumerate() {
        let fields: EventFields<'_> = serde_json::from_str(raw.get())
            .map_err(|e| format!("event {i} of the batch is not a LiveStore event: {e}"))?;
        if fields.name.is_empty() || fields.client_id.is_empty() || fields.session_id.is_empty() {
            return Err(format!(
                "event {i} of the batch needs a name, a clientId and a sessionId"
            ));
        }
        // LiveStore clients number global events one after another; a
        // larger jump (up to i64::MAX) would leave the store unable to
        // accept any later push.
        if fields.parent < 0 || fields.parent.checked_add(1) != Some(fields.seq) {
            return Err(format!(
                "event {i} of the batch: seqNum {} must be parentSeqNum {} + 1",
                fields.seq, fields.parent
            ));
        }
        if let Some(previous) = events.last().map(|e: &Event| e.seq) {
            if fields.parent != previous {
                return Err(format!(
                    "event {i} of the batch: parentSeqNum {} does not follow seqNum {previous}",
                    fields.parent
                ));
            }
        }
        events.push(Event {
            seq: fields.seq,
            parent: fields.parent,
            json: raw.get().to_owned(),
        });
    }
    Ok(events)
}

/// One page of a pull: the JSON array of `{eventEncoded, metadata}` items
/// (the same for both protocol versions) and the last sequence number in it.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) items: String,
    pub(crate) last_seq: i64,
    pub(crate) len: usize,
}

/// Splits events into pages of at most [`MAX_PAGE_EVENTS`] events and about
/// [`MAX_PAGE_BYTES`] bytes; an event larger than that travels alone.
pub(crate) fn paginate<'a>(events: impl IntoIterator<Item = (i64, &'a str, &'a str)>) -> Vec<Page> {
    let mut pages = Vec::new();
    let mut current = Page {
        items: String::from("["),
        last_seq: 0,
        len: 0,
    };
    for (seq, json, created_at) in events {
        let item_len = json.len() + created_at.len() + 110;
        if current.len > 0
            && (current.len >= MAX_PAGE_EVENTS || current.items.len() + item_len > MAX_PAGE_BYTES)
        {
            current.items.push(']');
            pages.push(std::mem::replace(
                &mut current,
                Page {
                    items: String::from("["),
                    last_seq: 0,
                    len: 0,
                },
            ));
        }
        if current.len > 0 {
            current.items.push(',');
        }
        push_item(&mut current.items, json, created_at);
        current.last_seq = seq;
        current.len += 1;
    }
    if current.len > 0 {
        current.items.push(']');
        pages.push(current);
    }
    pages
}

fn push_item(out: &mut String, json: &str, created_at: &str) {
    out.push_str("{\"eventEncoded\":");
    out.push_str(json);
    out.push_str(
        ",\"metadata\":{\"_tag\":\"Some\",\"value\":{\"_tag\":\"SyncMessage.SyncMetadata\",\"createdAt\":",
    );
    // An ISO timestamp of our own making: no escaping needed, but quote it
    // through serde so a hand-edited database cannot break the frame.
    out.push_str(&serde_json::Value::from(created_at).to_string());
    out.push_str("}}}");
}

/// The current time as LiveStore writes `createdAt`: ISO 8601, UTC, milliseconds.
pub(crate) fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn event(seq: i64, parent: i64) -> Box<RawValue> {
        raw(&format!(
            r#"{{"name":"v1.X","args":{{"a":1}},"seqNum":{seq},"parentSeqNum":{parent},"clientId":"c","sessionId":"s"}}"#
        ))
    }

    #[test]
    fn a_chain_is_accepted_and_kept_verbatim() {
        let batch = [event(1, 0), event(2, 1)];
        let refs: Vec<&RawValue> = batch.iter().map(|b| b.as_ref()).collect();
        let events = parse_batch(&refs).unwrap();
        assert_eq!(events[1].seq, 2);
        assert_eq!(events[0].json, batch[0].get());
    }

    #[test]
    fn a_broken_chain_or_missing_field_is_refused() {
        let batch = [event(1, 0), event(3, 2)];
        let refs: Vec<&RawValue> = batch.iter().map(|b| b.as_ref()).collect();
        assert!(parse_batch(&refs).unwrap_err().contains("does not follow"));
        let bad = raw(r#"{"name":"x","seqNum":1,"parentSeqNum":0}"#);
        assert!(parse_batch(&[&bad]).is_err());
        let backwards = event(1, 1);
        assert!(parse_batch(&[&backwards]).is_err());
        let jump = event(i64::MAX, 0);
        assert!(parse_batch(&[&jump]).unwrap_err().contains("+ 1"));
        let overflow = event(i64::MIN, i64::MAX);
        assert!(parse_batch(&[&overflow]).is_err());
    }

    #[test]
    fn pages_hold_at_most_100_events_and_are_valid_json() {
        let json = r#"{"name":"v1.X"}"#;
        let events: Vec<(i64, &str, &str)> = (1..=250)
            .map(|s| (s, json, "2026-01-01T00:00:00.000Z"))
            .collect();
        let pages = paginate(events);
        assert_eq!(
            pages.iter().map(|p| p.len).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        assert_eq!(pages[2].last_seq, 250);
        let parsed: serde_json::Value = serde_json::from_str(&pages[0].items).unwrap();
        assert_eq!(
            parsed[0]["metadata"]["value"]["createdAt"],
            "2026-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn pages_are_cut_by_size() {
        let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(400_000));
        let events: Vec<(i64, &str, &str)> = (1..=5).map(|s| (s, big.as_str(), "t")).collect();
        let pages = paginate(events);
        assert!(pages.iter().all(|p| p.items.len() <= MAX_PAGE_BYTES));
        assert_eq!(pages.iter().map(|p| p.len).sum::<usize>(), 5);
    }
}
