//! The server's live SLA view: `GET /v2/sla` reflects the requests it
//! answered, and `GET /dashboard` — loaded by a real headless Chromium —
//! fills its panels with those live numbers, with no external assets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use tickserve_test_support::RequestExt;

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in ["/usr/bin", "/usr/local/bin", "/snap/bin"] {
            let p = PathBuf::from(dir).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "no Chromium found: install the Debian package `chromium` (scripts/test.sh does when run as root)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_view_and_dashboard_show_live_numbers() {
    let server = common::start_default().await;
    let golden = common::golden();
    for i in 0..20 {
        let body = common::request_for(&golden, &[i % 4], &format!("r{i}"));
        let r = server.infer(&body).await;
        assert_eq!(r.status(), 200);
    }
    // One failed request (bad shape) counts as an error of the model.
    let r = server.infer(&serde_json::json!({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})).await;
    assert_eq!(r.status(), 400);

    let view: serde_json::Value = server.get_json("/v2/sla").await;
    let overall = &view["overall"];
    assert_eq!(overall["requests"], 21, "{view:#}");
    assert_eq!(overall["ok"], 20);
    assert_eq!(overall["errors"], 1);
    assert!(overall["p99_ms"].as_f64().unwrap() > 0.0);
    let class = &view["classes"][0];
    assert_eq!(class["model"], "cnn_lstm");
    // No priority was sent: the model's default_priority (3).
    assert_eq!(class["class"], "priority 3");
    assert!(["healthy", "warning", "critical"].contains(&view["health"].as_str().unwrap()));
    assert_eq!(view["thresholds"]["p99_ms"], 100.0);
    assert_eq!(view["alerts"]["cpu_percent"], 90.0);
    assert!(view["queue_length"].is_object());
    assert!(view["memory_percent"].as_f64().unwrap() > 0.0);
    // CPU use is the growth between two samples of the resource monitor,
    // a second apart: null until the second one.
    let mut cpu = view["cpu_percent"].clone();
    for _ in 0..100 {
        if cpu.is_number() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        cpu = server.get_json("/v2/sla").await["cpu_percent"].clone();
    }
    assert!(cpu.is_number(), "no CPU sample after 5 s: {cpu}");
    // 1 error in 21 is 4.8 % > 1 %: the check fails with a recommendation.
    let recs = view["recommendations"].as_array().unwrap();
    assert!(
        recs.iter()
            .any(|r| r.as_str().unwrap().contains("error_rate")),
        "{recs:?}"
    );

    let page = server
        .client
        .get(server.url("/dashboard"))
        .text_body()
        .await;
    assert!(page.contains("<title>Batch Processing Performance SLA Dashboard</title>"));
    assert!(
        !page.contains("src=\"http") && !page.contains("<link"),
        "external assets"
    );

    // Real browser: let the page's script fetch /v2/sla and fill the
    // panels, then read the DOM and take a screenshot.
    let dir = tickserve_test_support::fresh_dir("tickserve-dashboard");
    let url = server.url("/dashboard");
    let chromium = chromium();
    let dir2 = dir.clone();
    let dom = tokio::task::spawn_blocking(move || {
        let common_flags = |profile: &str| {
            vec![
                "--headless".to_owned(),
                "--no-sandbox".to_owned(),
                "--disable-gpu".to_owned(),
                "--disable-quic".to_owned(),
                "--no-first-run".to_owned(),
                "--disable-background-networking".to_owned(),
                "--disable-component-update".to_owned(),
                "--disable-sync".to_owned(),
                "--disable-dev-shm-usage".to_owned(),
                format!("--user-data-dir={}", dir2.join(profile).display()),
                "--virtual-time-budget=5000".to_owned(),
            ]
        };
        // Runs chromium on the page with its own profile and `extra`
        // arguments; its output, which must be a success.
        let run = |profile: &str, extra: &[String]| {
            let out = Command::new(&chromium)
                .args(common_flags(profile))
                .args(extra)
                .arg(&url)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "chromium ({profile}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        };
        let out = run("dom", &["--dump-dom".to_owned()]);
        let screenshot = format!("--screenshot={}", dir2.join("dashboard.png").display());
        run("shot", &["--window-size=1280,1000".to_owned(), screenshot]);
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap();
    let panel = |id: &str| -> String {
        let start = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} in\n{dom}"));
        let rest = &dom[start..];
        let open = rest.find('>').unwrap() + 1;
        let close = rest.find('<').unwrap();
        rest[open..close].to_owned()
    };
    // Every panel holds a live number, not the placeholder.
    for id in ["p50", "p99", "rps", "errors", "queue", "cpu", "memory"] {
        let v = panel(id);
        assert!(
            v.chars().any(|c| c.is_ascii_digit()),
            "panel #{id} is `{v}`\n{dom}"
        );
    }
    assert!(panel("errors").contains('%'));
    assert!(["healthy", "warning", "critical"].contains(&panel("health").as_str()));
    // The same window 20 times: the result cache answers most of them.
    assert!(panel("cache").ends_with('%'), "{}", panel("cache"));
    assert!(
        dom.contains("<td>cnn_lstm</td><td>priority 3</td><td>21</td>"),
        "{dom}"
    );
    assert!(dom.contains("Too many errors"), "{dom}");
    let png = std::fs::metadata(dir.join("dashboard.png")).unwrap();
    assert!(png.len() > 10_000, "screenshot of {} bytes", png.len());
    eprintln!("screenshot: {}", dir.join("dashboard.png").display());
    server.shutdown().await.unwrap();
}
