//! A short `pgrelay chaos` run, as CI runs it: three nodes, three client
//! processes, two minutes of faults (nodes killed and paused, links cut,
//! delayed and frozen, its own PostgreSQL restarted, clients killed
//! mid-apply); every check must pass. `PGRELAY_CHAOS_DURATION` shortens or
//! lengthens it. The run prints its seed: a failure replays with
//! `pgrelay chaos --seed <seed>`.

use std::process::Command;

use crate::support::BIN;

#[test]
fn a_short_chaos_run_loses_doubles_and_tears_nothing() {
    let duration = std::env::var("PGRELAY_CHAOS_DURATION").unwrap_or_else(|_| "120s".to_owned());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("chaos.json");
    // Its own PostgreSQL (no --database-url), so it may restart it.
    let output = Command::new(BIN)
        .args([
            "chaos",
            "--duration",
            &duration,
            "--nodes",
            "3",
            "--clients",
            "3",
        ])
        .arg("--json")
        .arg(&json)
        .env_remove("PGRELAY_DATABASE_URL")
        .env("PGRELAY_LOG", "warn")
        .output()
        .expect("running pgrelay chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgrelay chaos failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).unwrap();
    assert_eq!(report["passed"], true);
    let faults = report["faults"].as_array().expect("faults").len();
    assert!(faults >= 3, "some faults injected, got {faults}");
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.iter().all(|c| c["ok"] == true), "{checks:?}");
}
