//! The run's report: faults by kind with how long each was held and how
//! long the system took to recover after it, then each check's verdict.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::checks::Verdict;
use super::faults::{Fault, Kind};

pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) nodes: usize,
    pub(crate) clients: usize,
    pub(crate) ran: Duration,
    pub(crate) faults: Vec<Fault>,
    pub(crate) checks: Vec<(&'static str, Verdict)>,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// p50 and max of `values` (`(0, 0)` for none).
fn spread(values: &mut [Duration]) -> (Duration, Duration) {
    values.sort();
    match values.len() {
        0 => (Duration::ZERO, Duration::ZERO),
        n => (values[(n - 1) / 2], values[n - 1]),
    }
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|(_, v)| v.is_ok())
    }

    pub(crate) fn render(&self) -> String {
        let mut out = format!(
            "pgrelay chaos: seed {}, {} nodes, {} clients, ran {:.0} s, {} faults\n\n",
            self.seed,
            self.nodes,
            self.clients,
            self.ran.as_secs_f64(),
            self.faults.len()
        );
        out.push_str(&format!(
            "{:<30} {:>6} {:>18} {:>24}\n",
            "fault", "count", "held p50/max ms", "recovered p50/max ms"
        ));
        let mut by_kind: BTreeMap<Kind, Vec<&Fault>> = BTreeMap::new();
        for fault in &self.faults {
            by_kind.entry(fault.kind).or_default().push(fault);
        }
        for (kind, faults) in &by_kind {
            let (held_p50, held_max) =
                spread(&mut faults.iter().map(|f| f.held).collect::<Vec<_>>());
            let (rec_p50, rec_max) = spread(
                &mut faults
                    .iter()
                    .filter_map(|f| f.recovered)
                    .collect::<Vec<_>>(),
            );
            let lost = faults.iter().filter(|f| f.recovered.is_none()).count();
            out.push_str(&format!(
                "{:<30} {:>6} {:>18} {:>24}{}\n",
                kind.name(),
                faults.len(),
                format!("{} / {}", ms(held_p50), ms(held_max)),
                format!("{} / {}", ms(rec_p50), ms(rec_max)),
                if lost > 0 {
                    format!("  ({lost} never recovered)")
                } else {
                    String::new()
                }
            ));
        }
        let (all_p50, all_max) = spread(
            &mut self
                .faults
                .iter()
                .filter_map(|f| f.recovered)
                .collect::<Vec<_>>(),
        );
        out.push_str(&format!(
            "{:<30} {:>6} {:>18} {:>24}\n\nchecks\n",
            "all",
            self.faults.len(),
            "",
            format!("{} / {}", ms(all_p50), ms(all_max))
        ));
        for (name, verdict) in &self.checks {
            match verdict {
                Ok(seen) => out.push_str(&format!("  ok    {name}: {seen}\n")),
                Err(why) => out.push_str(&format!("  FAIL  {name}: {why}\n")),
            }
        }
        out.push_str(&if self.passed() {
            format!("\nresult: PASS (seed {})\n", self.seed)
        } else {
            format!(
                "\nresult: FAIL; replay with --seed {} (the same faults, targets and times)\n",
                self.seed
            )
        });
        out
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut kinds = serde_json::Map::new();
        for kind in Kind::ALL {
            let count = self.faults.iter().filter(|f| f.kind == kind).count();
            if count > 0 {
                kinds.insert(kind.name().to_owned(), json!(count));
            }
        }
        json!({
            "seed": self.seed,
            "nodes": self.nodes,
            "clients": self.clients,
            "ran_s": self.ran.as_secs_f64(),
            "passed": self.passed(),
            "faults_by_kind": kinds,
            "faults": self.faults.iter().map(|f| json!({
                "kind": f.kind.name(),
                "target": f.target,
                "at_ms": ms(f.at),
                "held_ms": ms(f.held),
                "recovered_ms": f.recovered.map(ms),
            })).collect::<Vec<_>>(),
            "checks": self.checks.iter().map(|(name, v)| json!({
                "check": name,
                "ok": v.is_ok(),
                "detail": match v { Ok(s) | Err(s) => s },
            })).collect::<Vec<_>>(),
        })
    }
}
