//! `tickserve bench` as an operator runs it: each mode for a few seconds
//! against a real `tickserve serve` (the bundled model, loopback), its JSON
//! report parsed and checked for plausibility, and the exit codes a CI
//! pipeline gates on.
//!
//! One server serves every mode in sequence: the modes then do not compete
//! for the machine's two cores, and the test stays a few seconds per mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tickserve_bench::report::{Report, SCHEMA, sum_requests};

mod common;

/// A `tickserve serve` child, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let common::Served { child, http, log } = common::spawn_serve(&["--log-level", "info"]);
    // Keep reading stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in log.map_while(Result::ok) {});
    common::wait_ready(
        &reqwest::blocking::Client::new(),
        &http,
        Duration::from_secs(60),
    );
    Server {
        child,
        url: format!("http://{http}"),
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tickserve-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An SLA loose enough for a debug build on a loaded 2-core machine:
/// what is checked here is the plumbing, not the speed.
const LOOSE_SLA: &str = "p50_ms = 5000\np95_ms = 5000\np99_ms = 5000\nmax_ms = 10000\nmin_throughput_rps = 1\nmax_error_rate = 0.0\n";

/// Runs `tickserve bench <args>` with a JSON report; returns the exit code
/// and the parsed report.
fn bench(server: &Server, sla: &str, name: &str, args: &[&str]) -> (i32, Report) {
    let dir = temp_dir();
    let sla_path = dir.join(format!("{name}.sla.toml"));
    std::fs::write(&sla_path, sla).unwrap();
    let json = dir.join(format!("{name}.json"));
    let html = dir.join(format!("{name}.html"));
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .arg("bench")
        .args(args)
        .args(["--url", &server.url, "--quiet", "--warmup", "2"])
        .arg("--sla")
        .arg(&sla_path)
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "bench {name}: {:.1} s\n{stdout}{stderr}",
        started.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stdout}\n{stderr}"));
    let report: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(report.schema, SCHEMA);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"), "HTML report without plots");
    assert!(
        stdout.contains("SLA compliance"),
        "text report missing:\n{stdout}"
    );
    (output.status.code().unwrap(), report)
}

fn assert_healthy_run(report: &Report) {
    let o = &report.result.overall;
    assert!(o.requests > 0);
    assert_eq!(o.errors, 0, "errors: {:?}", o.errors_by_reason);
    assert_eq!(o.ok, o.requests);
    assert_eq!(sum_requests(&report.result.classes), o.requests);
    assert_eq!(o.latency_ms.count, o.ok);
    assert!(o.latency_ms.min > 0.0);
    assert!(o.latency_ms.min <= o.latency_ms.median);
    assert!(o.latency_ms.median <= o.latency_ms.p99);
    assert!(o.latency_ms.p99 <= o.latency_ms.max);
    assert!(o.throughput_rps > 0.0);
    assert!(report.compliance.compliant, "{:?}", report.compliance);
}

#[test]
fn every_mode_runs_against_a_real_server_and_reports_plausible_numbers() {
    let server = start_server();

    // latency: exactly N sequential requests.
    let (code, r) = bench(&server, LOOSE_SLA, "latency", &["latency", "-n", "40"]);
    assert_eq!(code, 0);
    assert_healthy_run(&r);
    assert_eq!(r.result.overall.requests, 40);
    assert_eq!(r.result.classes.keys().collect::<Vec<_>>(), vec!["default"]);

    // load: 4 clients for 2 s.
    let (code, r) = bench(&server, LOOSE_SLA, "load", &["load", "-c", "4", "-d", "2s"]);
    assert_eq!(code, 0);
    assert_healthy_run(&r);
    assert!(
        (1.9..4.0).contains(&r.result.duration_s),
        "{}",
        r.result.duration_s
    );
    // The options are recorded as structured JSON.
    assert_eq!(r.settings["load"]["load"]["concurrency"], 4);
    assert_eq!(r.settings["load"]["load"]["duration"], "2s");

    // rate: 40/s for 2 s, constant arrivals: exactly 80 scheduled sends,
    // split between two priority classes; both latency views reported.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "rate",
        &[
            "rate",
            "-r",
            "40",
            "-d",
            "2s",
            "--priorities",
            "1:50,5:50",
            "--repeat-fraction",
            "0.5",
        ],
    );
    assert_eq!(code, 0);
    assert_healthy_run(&r);
    let o = &r.result.overall;
    assert_eq!(o.requests, 80);
    assert_eq!(
        r.result.classes.keys().collect::<Vec<_>>(),
        vec!["priority 1", "priority 5"]
    );
    let actual = o.actual_latency_ms.as_ref().expect("actual-send latency");
    assert_eq!(actual.count, 80);
    // From the intended time is never shorter than from the actual send.
    assert!(o.latency_ms.max >= actual.max - 0.5);
    assert!(o.late_sends.is_some());

    // mixed: 1 s phases, 20 priority-1 requests/s against 4 priority-5
    // clients. The plumbing is checked, not the speed: every scheduled
    // foreground send is counted in each phase, both classes answer, and
    // the ratios are what the phases say.
    let (_, r) = bench(
        &server,
        LOOSE_SLA,
        "mixed",
        &[
            "mixed",
            "--phase",
            "1s",
            "--fg-rate",
            "20",
            "--bg-clients",
            "4",
        ],
    );
    let m = r.mixed.as_ref().expect("mixed section");
    assert_eq!(r.mode, "mixed");
    assert_eq!((m.fg_priority, m.bg_priority, m.bg_clients), (1, 5, 4));
    for fg in [&m.fg_alone, &m.fg_under_flood] {
        assert_eq!(fg.overall.requests, 20);
        assert_eq!(fg.overall.ok + fg.overall.errors, 20);
        assert_eq!(fg.classes.keys().collect::<Vec<_>>(), vec!["priority 1"]);
    }
    for bg in [&m.bg_alone, &m.bg_under_flood] {
        assert!(bg.overall.ok > 0);
        assert_eq!(bg.classes.keys().collect::<Vec<_>>(), vec!["priority 5"]);
    }
    let ratio = m.fg_under_flood.overall.latency_ms.p99 / m.fg_alone.overall.latency_ms.p99;
    assert!((m.p99_ratio - ratio).abs() < 1e-9);
    assert_eq!(r.compliance.total, 5);
    assert_eq!(
        r.result.overall.requests, 20,
        "the result is the foreground under the flood"
    );

    // stress: three 1 s steps of 1, 2, 3 clients, all within the loose SLA.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "stress",
        &[
            "stress",
            "--start",
            "1",
            "--step",
            "1",
            "--max",
            "3",
            "--step-duration",
            "1s",
        ],
    );
    assert_eq!(code, 0);
    let s = r.stress.as_ref().unwrap();
    assert_eq!(
        s.steps.iter().map(|st| st.level).collect::<Vec<_>>(),
        vec![1.0, 2.0, 3.0]
    );
    assert!(
        s.stopped_because.contains("reached"),
        "{}",
        s.stopped_because
    );
    assert_eq!(s.last_compliant_level, Some(3.0));
    for st in &s.steps {
        assert_eq!(st.stats.overall.errors, 0);
        assert!(st.stats.overall.requests > 0);
    }

    // compare: the same server, candidate with an extra request parameter.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "compare",
        &[
            "compare",
            "--workload",
            "latency",
            "-n",
            "20",
            "--repeats",
            "2",
            "--candidate-param",
            "note=\"candidate\"",
        ],
    );
    assert_eq!(code, 0);
    let c = r.compare.as_ref().unwrap();
    assert_eq!(c.baseline_runs.len(), 2);
    assert_eq!(c.candidate_runs.len(), 2);
    for run in c.baseline_runs.iter().chain(&c.candidate_runs) {
        assert_eq!(run.overall.requests, 20);
        assert_eq!(run.overall.errors, 0);
    }
    assert_eq!(c.improvements.len(), 4);
    assert!(c.improvements.iter().all(|i| i.improvement_pct.is_finite()));

    // An SLA the server cannot meet: exit code 3 and recommendations.
    let (code, r) = bench(
        &server,
        "p50_ms = 0.001\n",
        "strict",
        &["latency", "-n", "10"],
    );
    assert_eq!(code, 3);
    assert!(!r.compliance.compliant);
    assert!(!r.compliance.recommendations.is_empty());

    // A model the server does not have: every request is an error with its
    // status, and the run is not compliant.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "missing",
        &["latency", "-n", "5", "--model", "no_such_model"],
    );
    assert_eq!(code, 3);
    assert_eq!(r.result.overall.errors, 5);
    assert_eq!(r.result.overall.errors_by_reason["http 404"], 5);
}
