//! The Prometheus alert rules and the Grafana dashboard under deploy/
//! carry the same thresholds as the SLA `tickserve bench` checks, and the
//! dashboard has the seed's title, refresh, window and panels. (promtool
//! checks the rules' syntax in scripts/test.sh.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tickserve_bench::sla::Sla;

use tickserve_test_support::root;

#[test]
fn grafana_dashboard_has_the_seed_panels_and_sla_thresholds() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/tickserve-sla-dashboard.json"))
        .unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["title"], "Batch Processing Performance SLA Dashboard");
    assert_eq!(d["refresh"], "30s");
    assert_eq!(d["time"]["from"], "now-24h");
    let panels = d["panels"].as_array().unwrap();
    let find = |title: &str| {
        panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title}"))
    };
    let threshold_values = |p: &serde_json::Value| -> Vec<f64> {
        p["fieldConfig"]["defaults"]["thresholds"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["value"].as_f64())
            .collect()
    };
    let sla = Sla::default().thresholds;
    assert!(threshold_values(find("p99 latency")).contains(&(sla.p99_ms / 1000.0)));
    assert!(threshold_values(find("Error %")).contains(&(sla.max_error_rate * 100.0)));
    assert!(threshold_values(find("CPU %")).contains(&90.0));
    assert!(threshold_values(find("GPU %")).contains(&85.0));
    for title in ["Requests per second", "Memory %", "Queue length"] {
        find(title);
    }
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            assert!(!t["expr"].as_str().unwrap().is_empty());
        }
    }
}

#[test]
fn alert_rules_use_the_sla_thresholds() {
    let text =
        std::fs::read_to_string(root().join("deploy/prometheus/tickserve-sla.rules.yml")).unwrap();
    let sla = Sla::default().thresholds;
    for (expr, value) in [
        ("p99_5m > ", sla.p99_ms / 1000.0),
        ("p95_5m > ", sla.p95_ms / 1000.0),
        ("p50_5m > ", sla.p50_ms / 1000.0),
        ("ratio5m > ", sla.max_error_rate),
        ("rate5m < ", sla.min_throughput_rps),
    ] {
        let at = text
            .find(expr)
            .unwrap_or_else(|| panic!("no rule `{expr}`"));
        let number: String = text[at + expr.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        assert_eq!(number.parse::<f64>().unwrap(), value, "rule `{expr}`");
    }
}
