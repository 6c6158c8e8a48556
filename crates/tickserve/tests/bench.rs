//! `tickserve bench` as an operator runs it: each mode for a few seconds
//! against a real `tickserve serve` (the bundled model, loopback), its JSON
//! report parsed and checked for plausibility, and the exit codes a CI
//! pipeline gates on.
//!
//! One server serves every mode in sequence: the modes then do not compete
//! for the machine's two cores, and the test stays a few seconds per mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tickserve_bench::report::{Report, SCHEMA, sum_requests};

mod common;

/// A `tickserve serve` child, killed when dropped.
struct Server {
    child: Child,
    url: String,
    grpc_url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let common::Served {
        child,
        http,
        grpc,
        log,
    } = common::spawn_serve(&["--log-level", "info"]);
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
        grpc_url: format!("http://{grpc}"),
    }
}

/// An SLA loose enough for a debug build on a loaded 2-core machine:
/// what is checked here is the plumbing, not the speed.
const LOOSE_SLA: &str = "p50_ms = 5000\np95_ms = 5000\np99_ms = 5000\nmax_ms = 10000\nmin_throughput_rps = 1\nmax_error_rate = 0.0\n";

/// Runs `tickserve bench <args>` with a JSON report; returns the exit code
/// and the parsed report.
fn bench(server: &Server, sla: &str, name: &str, args: &[&str]) -> (i32, Report) {
    let dir = tickserve_test_support::fresh_dir("tickserve-bench-test");
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

#[test]
fn mixed_mode_runs_three_phases_and_its_counts_add_up() {
    let server = start_server();
    // 20 foreground requests/s for 1 s per phase (`--phase` sets all
    // three): exactly 20 scheduled sends in each foreground phase; 3
    // background clients of 2 rows.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "mixed",
        &[
            "mixed",
            "--fg-rate",
            "20",
            "--bg-clients",
            "3",
            "--bg-rows",
            "2",
            "--phase",
            "1s",
        ],
    );
    // Whether the goals are met depends on the machine (a debug build
    // here): only the plumbing is checked.
    assert!(code == 0 || code == 3, "exit code {code}");
    assert_eq!(r.mode, "mixed");
    let m = r.mixed.as_ref().expect("mixed section");
    assert_eq!(m.foreground.class, "priority 1");
    assert_eq!(m.background.class, "priority 5");
    assert_eq!(m.background.rows_per_request, 2);
    assert_eq!(m.foreground.target_ms, Some(2.0));
    assert_eq!(m.background.target_ms, None);
    let names: Vec<&str> = m.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, tickserve_bench::mixed::PHASES);
    let shape: Vec<(bool, bool)> = m
        .phases
        .iter()
        .map(|p| (p.foreground.is_some(), p.background.is_some()))
        .collect();
    assert_eq!(shape, vec![(true, false), (false, true), (true, true)]);
    for p in &m.phases {
        for (c, rows) in [
            (&p.foreground, m.foreground.rows_per_request),
            (&p.background, m.background.rows_per_request),
        ] {
            let Some(c) = c else { continue };
            let n = &c.counts;
            assert_eq!(
                n.ok + n.http_429 + n.http_503 + n.other,
                n.requests,
                "{n:?}"
            );
            assert_eq!(n.requests, c.stats.requests);
            assert_eq!(n.ok, c.stats.ok);
            assert!(c.stats.good <= c.stats.ok);
            assert!((c.rows_per_s - c.stats.throughput_rps * rows as f64).abs() < 1e-6);
        }
    }
    let fg = |i: usize| m.phases[i].foreground.as_ref().unwrap();
    let bg = |i: usize| m.phases[i].background.as_ref().unwrap();
    assert_eq!(fg(0).counts.requests, 20);
    assert_eq!(fg(2).counts.requests, 20);
    assert!(bg(1).counts.ok > 0, "{:?}", bg(1).counts);
    // The report's result is the phase with both classes.
    assert_eq!(
        r.result.classes.keys().collect::<Vec<_>>(),
        vec!["priority 1", "priority 5"]
    );
    assert_eq!(
        r.result.overall.requests,
        fg(2).counts.requests + bg(2).counts.requests
    );
    assert_eq!(sum_requests(&r.result.classes), r.result.overall.requests);
    // The summary reads the phases.
    let s = &m.summary;
    assert_eq!(s.fg_p99_alone_ms, fg(0).stats.latency_ms.p99);
    assert_eq!(s.fg_p99_flood_ms, fg(2).stats.latency_ms.p99);
    assert_eq!(s.bg_rps_alone, bg(1).stats.throughput_rps);
    assert_eq!(s.bg_rows_per_s_with_fg, bg(2).rows_per_s);
    // Four goal checks, then the SLA file's six on the "both" phase.
    let c = &r.compliance;
    assert_eq!(c.total, 10);
    assert_eq!(c.checks[0].scope, "foreground");
    assert_eq!(c.checks[2].scope, "background");
    assert_eq!(c.compliant, code == 0);
}

#[test]
fn every_protocol_drives_the_server_with_the_shape_from_the_metadata() {
    let server = start_server();
    let grpc_url = server.grpc_url.clone();
    for (name, extra) in [
        ("json", vec!["--protocol", "http-json"]),
        ("binary", vec!["--protocol", "http-binary"]),
        ("grpc", vec!["--protocol", "grpc", "--grpc-url", &grpc_url]),
    ] {
        let mut args = vec!["latency", "-n", "10", "--priorities", "1:1"];
        args.extend(extra);
        let (code, r) = bench(&server, LOOSE_SLA, name, &args);
        assert_eq!(code, 0, "{name}");
        assert_healthy_run(&r);
        assert_eq!(r.result.overall.requests, 10, "{name}");
        assert_eq!(
            r.result.classes.keys().collect::<Vec<_>>(),
            vec!["priority 1"]
        );
        // No --shape: the input comes from the model's metadata.
        let common = &r.settings["latency"]["common"];
        assert_eq!(common["shape"], serde_json::json!([1, 50, 60]), "{name}");
        assert_eq!(common["input_name"], "input");
    }
    // A gRPC request for a model the server does not have: NOT_FOUND,
    // counted as the HTTP status it maps to.
    let (code, r) = bench(
        &server,
        LOOSE_SLA,
        "grpc-missing",
        &[
            "latency",
            "-n",
            "3",
            "--model",
            "no_such_model",
            "--protocol",
            "grpc",
            "--grpc-url",
            &grpc_url,
        ],
    );
    assert_eq!(code, 3);
    assert_eq!(r.result.overall.errors_by_reason["http 404"], 3);
}
