//! Where delivery time goes: each transaction's time from its PostgreSQL
//! commit to every stage on the way (decoded by the server, in the change
//! log, published, sent, read by the client, applied to its replica), as
//! distributions, and which steps the slowest deliveries spent their time in.

use std::collections::HashMap;

use pgrelay_server::stages::{Stage, StageTime};
use serde_json::json;

use super::fleet::{percentile, Delivery};
use super::report::Report;

/// The stages in order, server then client.
const NAMES: [&str; 6] = [
    "decoded",
    "logged",
    "published",
    "sent",
    "received",
    "applied",
];

/// Each stage's time since commit for one delivery, in µs; `None` where
/// the server recorded nothing for it.
fn timeline(d: &Delivery, server: &HashMap<i64, [Option<i64>; 4]>) -> [Option<i64>; 6] {
    let s = server.get(&d.commit_us).copied().unwrap_or([None; 4]);
    let since = |at: Option<i64>| at.map(|t| t - d.commit_us);
    [
        since(s[0]),
        since(s[1]),
        since(s[2]),
        since(s[3]),
        Some(d.received_us - d.commit_us),
        Some(d.applied_us - d.commit_us),
    ]
}

/// Adds the breakdown to `report` (lines and JSON `stages`).
pub(crate) fn add(report: &mut Report, records: &[StageTime], deliveries: &[Delivery]) {
    // Per transaction, the first time each server stage was reached (the
    // last for `sent`, which every session records).
    let mut server: HashMap<i64, [Option<i64>; 4]> = HashMap::new();
    for r in records {
        let slot = &mut server.entry(r.commit_time_us).or_insert([None; 4])[stage_index(r.stage)];
        *slot = Some(match (*slot, r.stage) {
            (Some(t), Stage::Sent) => t.max(r.at_us),
            (Some(t), _) => t.min(r.at_us),
            (None, _) => r.at_us,
        });
    }
    let timelines: Vec<[Option<i64>; 6]> =
        deliveries.iter().map(|d| timeline(d, &server)).collect();
    let mut stages = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let mut since: Vec<u32> = timelines
            .iter()
            .filter_map(|t| t[i])
            .map(|us| u32::try_from(us.max(0)).unwrap_or(u32::MAX))
            .collect();
        since.sort_unstable();
        let ms = |us: u32| f64::from(us) / 1000.0;
        let (p50, p99, max) = (
            ms(percentile(&since, 50.0)),
            ms(percentile(&since, 99.0)),
            ms(since.last().copied().unwrap_or(0)),
        );
        report.line(
            format!("commit → {name}"),
            format!("p50 {p50:.2} / p99 {p99:.2} / max {max:.2} ms"),
        );
        stages.push(json!({"stage": name, "samples": since.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max}));
    }
    // The slowest 1 % of deliveries: the mean time spent in each step.
    let mut order: Vec<usize> = (0..timelines.len()).collect();
    order.sort_by_key(|&i| timelines[i][5]);
    let tail = &order[order.len() - order.len().div_ceil(100).min(order.len())..];
    let mut steps = Vec::new();
    let mut previous = "commit";
    for (i, name) in NAMES.iter().enumerate() {
        let spent: Vec<i64> = tail
            .iter()
            .filter_map(|&k| {
                let t = timelines[k];
                let before = if i == 0 { Some(0) } else { t[i - 1] };
                Some(t[i]? - before?)
            })
            .collect();
        let mean = if spent.is_empty() {
            0.0
        } else {
            spent.iter().sum::<i64>() as f64 / spent.len() as f64 / 1000.0
        };
        steps.push(json!({"from": previous, "to": name, "tail_mean_ms": mean}));
        previous = *name;
    }
    report.line(
        "slowest 1 %: mean ms per step",
        steps
            .iter()
            .map(|s| {
                format!(
                    "→{} {:.2}",
                    s["to"].as_str().unwrap_or(""),
                    s["tail_mean_ms"].as_f64().unwrap_or(0.0)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.set(
        "stages",
        json!({"since_commit": stages, "slowest_1pc_steps": steps}),
    );
}

fn stage_index(stage: Stage) -> usize {
    match stage {
        Stage::Decoded => 0,
        Stage::Logged => 1,
        Stage::Published => 2,
        Stage::Sent => 3,
    }
}
