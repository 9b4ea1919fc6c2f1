//! Smoke runs of every `pgrelay bench` with tiny sizes, so the benchmark
//! code cannot rot: each must finish, report complete delivery and write
//! its JSON and SVG. No timing is asserted.

use std::process::Command;

use crate::support::BIN;

fn run_bench(args: &[&str]) -> serde_json::Value {
    let admin = pgrelay_testkit::test_server_admin_url().expect("a PostgreSQL for tests");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let svg = dir.path().join("out.svg");
    let output = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--database-url")
        .arg(&admin)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .env("PGRELAY_LOG", "warn")
        .output()
        .expect("running pgrelay bench");
    assert!(
        output.status.success(),
        "pgrelay bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let figure = std::fs::read_to_string(&svg).expect("the SVG figure");
    assert!(
        figure.starts_with("<svg") && figure.contains("<polyline"),
        "an SVG with a line"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON results")).unwrap();
    assert_eq!(report["failure"], serde_json::Value::Null);
    report
}

#[test]
fn capture_bench_runs_and_logs_every_row() {
    let report = run_bench(&["capture", "--rows", "3000", "--tx-size", "250"]);
    let results = &report["results"];
    assert!(results["recvlogical_rows_per_sec"].as_f64().unwrap() > 0.0);
    assert!(results["pgrelay_rows_per_sec"].as_f64().unwrap() > 0.0);
    assert!(results["change_log_wal_bytes_per_change"].as_f64().unwrap() > 0.0);
}

#[test]
fn latency_bench_delivers_every_transaction_to_every_client() {
    let report = run_bench(&[
        "latency",
        "--clients",
        "5",
        "--rate",
        "100",
        "--duration",
        "1s",
    ]);
    let results = &report["results"];
    assert_eq!(results["complete"], true);
    assert_eq!(results["written"], 100);
    assert_eq!(
        results["samples"], 500,
        "one latency sample per transaction per client"
    );
    // Every stage, server and client, is timed for every delivery.
    let stages = report["stages"]["since_commit"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "decoded",
            "logged",
            "published",
            "sent",
            "received",
            "applied"
        ]
    );
    for stage in stages {
        assert_eq!(stage["samples"], 500, "{stage}");
    }
}

#[test]
fn light_latency_bench_delivers_every_transaction_to_every_reader() {
    let report = run_bench(&[
        "latency",
        "--light",
        "--clients",
        "6",
        "--processes",
        "2",
        "--rate",
        "100",
        "--duration",
        "1s",
    ]);
    let results = &report["results"];
    assert_eq!(results["complete"], true);
    assert_eq!(results["written"], 100);
    assert_eq!(results["costs"]["frames"], 600);
    assert!(results["costs"]["bytes_per_frame"].as_f64().unwrap() > 0.0);
}

#[test]
fn light_fanout_bench_delivers_every_row_to_every_reader() {
    let report = run_bench(&[
        "fanout",
        "--light",
        "--clients",
        "3",
        "--rows",
        "2000",
        "--tx-size",
        "100",
    ]);
    let results = &report["results"];
    assert_eq!(results["complete"], true);
    assert_eq!(results["deliveries"], 6000);
    assert_eq!(results["costs"]["frames"], 60);
}

#[test]
fn full_clients_in_processes_apply_every_transaction() {
    let report = run_bench(&[
        "latency",
        "--processes",
        "2",
        "--clients",
        "4",
        "--rate",
        "50",
        "--duration",
        "1s",
    ]);
    let results = &report["results"];
    assert_eq!(results["full"], true);
    assert_eq!(results["processes"], 2);
    assert_eq!(results["complete"], true);
    assert_eq!(results["written"], 50);
    // Counted in the four replicas: each holds every transaction's row.
    assert_eq!(results["costs"]["changes"], 200);
    assert_eq!(results["costs"]["frames"], 200);
}

#[test]
fn full_clients_in_pinned_processes_apply_every_row() {
    let report = run_bench(&[
        "fanout",
        "--processes",
        "2",
        "--clients",
        "4",
        "--rows",
        "2000",
        "--tx-size",
        "500",
        "--server-cpus",
        "0",
        "--client-cpus",
        "0",
    ]);
    let results = &report["results"];
    assert_eq!(results["full"], true);
    assert_eq!(results["server_cpus"], "0");
    assert_eq!(results["complete"], true);
    assert_eq!(results["deliveries"], 8000);
    assert_eq!(results["costs"]["changes"], 8000);
    assert_eq!(results["costs"]["frames"], 16);
}

#[test]
fn fanout_bench_delivers_every_row_to_every_client() {
    let report = run_bench(&[
        "fanout",
        "--clients",
        "4",
        "--rows",
        "2000",
        "--tx-size",
        "500",
    ]);
    assert_eq!(report["results"]["complete"], true);
    assert_eq!(report["results"]["deliveries"], 8000);
}

#[test]
fn tenant_fanout_bench_delivers_each_tenant_its_rows_only() {
    let report = run_bench(&[
        "fanout",
        "--clients",
        "6",
        "--tenants",
        "3",
        "--rows",
        "3000",
        "--tx-size",
        "500",
    ]);
    assert_eq!(report["results"]["complete"], true);
    // Each client gets its tenant's third of the rows.
    assert_eq!(report["results"]["deliveries"], 6000);
    assert_eq!(report["results"]["scopes"], 3);
    assert_eq!(report["results"]["leaking_replicas"], 0);
}

#[test]
fn idle_bench_measures_memory_per_connection() {
    let report = run_bench(&["idle", "--connections", "200"]);
    assert!(report["results"]["bytes_per_connection"].as_f64().is_some());
    assert_eq!(report["results"]["connections"], 200);
}

#[test]
fn writes_bench_applies_every_client_write_once() {
    let report = run_bench(&[
        "writes",
        "--rows",
        "500",
        "--tx-size",
        "50",
        "--rate",
        "50",
        "--duration",
        "1s",
    ]);
    let results = &report["results"];
    assert_eq!(results["complete"], true);
    assert_eq!(results["rows_in_postgres"], 550);
    assert_eq!(
        results["applied_change_ids"], 550,
        "each change id recorded once"
    );
}

#[test]
fn hydrate_bench_loads_every_row_into_both_replicas() {
    let report = run_bench(&["hydrate", "--rows", "3000", "--rounds", "2"]);
    assert_eq!(report["rows"], 3000);
    // Each round's replica is checked for every row (the bench fails
    // otherwise), and each has its own COPY.
    assert_eq!(report["rounds"].as_array().unwrap().len(), 2);
    assert!(report["export_rows_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["client_peak_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn eventlog_bench_delivers_every_event_to_every_client() {
    let report = run_bench(&[
        "eventlog",
        "--clients",
        "5",
        "--events",
        "1000",
        "--single-events",
        "50",
        "--stores",
        "400",
        "--max-stores",
        "200",
    ]);
    let results = &report["results"];
    assert_eq!(results["stores"]["touched"], 400);
    assert_eq!(
        results["stores"]["rss_samples"].as_array().unwrap().len(),
        21
    );
    assert_eq!(results["batch_100"]["complete"], true);
    assert_eq!(results["batch_1"]["complete"], true);
    assert!(results["batch_100"]["events_per_sec"].as_f64().unwrap() > 0.0);
}
