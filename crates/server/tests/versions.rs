//! Two loaded versions of one model keep separate metric series: each has
//! its own scheduler, so its queue-length gauge (the one an autoscaler
//! reads) and its request counters must not overwrite the other's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tickserve_test_support::RequestExt;

/// The value of the series of `name` whose labels include every `labels`
/// pair, or `None` when there is no such series.
fn series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_keep_separate_series() {
    let model = "two_versions";
    let repo = repository_with_two_versions(model, "[cache]\nenabled = false\n");
    let server = start(config(repo)).await;
    let golden = golden();
    let body = request_for(&golden, &[3], "v");
    for (version, requests) in [("1", 1), ("2", 3)] {
        for _ in 0..requests {
            let response = server
                .client
                .post(server.url(&format!("/v2/models/{model}/versions/{version}/infer")))
                .json(&body)
                .sent()
                .await;
            assert_eq!(response.status(), 200);
        }
    }
    let metrics = server.metrics_text().await;
    for (version, requests) in [("1", 1.0), ("2", 3.0)] {
        let labels = [("model", model), ("version", version), ("priority", "3")];
        assert_eq!(
            series(&metrics, "batch_processing_requests_total", &labels),
            Some(requests),
            "requests of version {version}: {metrics}"
        );
        assert_eq!(
            series(&metrics, "batch_processing_queue_length", &labels),
            Some(0.0),
            "queue-length gauge of version {version}: {metrics}"
        );
        assert!(
            series(
                &metrics,
                "tickserve_batches_total",
                &[("model", model), ("version", version)]
            )
            .is_some_and(|batches| batches >= 1.0),
            "batches of version {version}: {metrics}"
        );
    }
    server.shutdown().await.unwrap();
}
