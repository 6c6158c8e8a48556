//! The result cache end to end: a real server, the real engine, a real
//! redis-server (started on a free loopback port by tests/common/redis.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::*;
use tickserve_server::{AdminToken, CacheConfig, RedisConfig, ServerConfig};

const TOKEN: &str = "test-admin-token";

fn redis_config(redis: &RedisServer) -> RedisConfig {
    RedisConfig {
        url: redis.url(),
        // Generous: the CI machine is small and shared; production uses a
        // few ms.
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        open_for: Duration::from_millis(200),
        ..RedisConfig::default()
    }
}

fn cached_config(repository: std::path::PathBuf, redis: Option<&RedisServer>) -> ServerConfig {
    ServerConfig {
        cache: CacheConfig {
            redis: redis.map(redis_config),
            ..CacheConfig::default()
        },
        admin_token: Some(AdminToken::new(TOKEN)),
        ..config(repository)
    }
}

async fn infer(server: &TestServer, model: &str, body: &serde_json::Value) -> serde_json::Value {
    let response = server
        .client
        .post(server.url(&format!("/v2/models/{model}/infer")))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn stats(server: &TestServer) -> serde_json::Value {
    let response = server
        .client
        .get(server.url("/v2/cache/stats"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn clear(server: &TestServer, model: &str, tier: &str) -> serde_json::Value {
    let response = server
        .client
        .delete(server.url(&format!("/v2/cache/models/{model}?tier={tier}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Rows the engine ran for `model`, from the batch-size histogram.
async fn engine_rows(server: &TestServer, model: &str) -> f64 {
    let text = server.metrics_text().await;
    let prefix = format!("batch_processing_batch_size_sum{{model=\"{model}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (bounded) until Redis db 1 holds `n` keys: writes are write-behind.
async fn wait_for_keys(redis: &RedisServer, n: i64) {
    for _ in 0..200 {
        if redis.dbsize(1) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("Redis holds {} keys, expected {n}", redis.dbsize(1));
}

/// A distinct row: golden row 0 with its first value shifted.
fn distinct_request(g: &Golden, i: usize) -> serde_json::Value {
    let mut data = g.input[..ROW].to_vec();
    data[0] += i as f32 * 1e-3;
    serde_json::json!({
        "inputs": [{"name": "input", "shape": [1, 50, 60], "datatype": "FP32", "data": data}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_hit_then_after_l1_clear_an_l2_hit_that_is_promoted() {
    let redis = RedisServer::start();
    let model = "cache_tiers";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(repo, Some(&redis))).await;
    let g = golden();
    let body = request_for(&g, &[0, 1], "a");

    assert_golden_rows(&g, &infer(&server, model, &body).await, &[0, 1]);
    let s = stats(&server).await;
    assert_eq!(
        (s["l1"]["hits"].as_u64(), s["l1"]["misses"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(s["l2"]["misses"], 2);
    assert_eq!(engine_rows(&server, model).await, 2.0);

    assert_golden_rows(&g, &infer(&server, model, &body).await, &[0, 1]);
    let s = stats(&server).await;
    assert_eq!(s["l1"]["hits"], 2, "{s}");
    assert_eq!(
        engine_rows(&server, model).await,
        2.0,
        "an L1 hit never reaches the engine"
    );

    wait_for_keys(&redis, 2).await;
    let cleared = clear(&server, model, "l1").await;
    assert_eq!(cleared["l1_cleared"], true);
    assert_eq!(cleared["l2_cleared"], false);
    assert_eq!(stats(&server).await["l1"]["entries"], 0);

    assert_golden_rows(&g, &infer(&server, model, &body).await, &[0, 1]);
    let s = stats(&server).await;
    assert_eq!(s["l2"]["hits"], 2, "{s}");
    assert_eq!(s["l1"]["entries"], 2, "L2 hits are promoted into L1: {s}");
    assert_eq!(engine_rows(&server, model).await, 2.0);

    assert_golden_rows(&g, &infer(&server, model, &body).await, &[0, 1]);
    let s = stats(&server).await;
    assert_eq!(s["l1"]["hits"], 4, "the promoted rows are L1 hits: {s}");
    assert_eq!(s["l2"]["hits"], 2);

    // A partly cached request: only the new row goes to the engine, and
    // the answer keeps the request's row order.
    assert_golden_rows(
        &g,
        &infer(&server, model, &request_for(&g, &[2, 0, 1], "b")).await,
        &[2, 0, 1],
    );
    assert_eq!(engine_rows(&server, model).await, 3.0);

    // Clearing both tiers removes exactly this model's keys.
    wait_for_keys(&redis, 3).await;
    let cleared = clear(&server, model, "all").await;
    assert_eq!(cleared["l2_keys_deleted"], 3, "{cleared}");
    assert_eq!(redis.dbsize(1), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sharing_redis_share_results() {
    let redis = RedisServer::start();
    let model = "cache_shared";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let a = start(cached_config(repo.clone(), Some(&redis))).await;
    let b = start(cached_config(repo, Some(&redis))).await;
    let g = golden();
    let body = request_for(&g, &[3, 4, 5], "x");
    assert_golden_rows(&g, &infer(&a, model, &body).await, &[3, 4, 5]);
    wait_for_keys(&redis, 3).await;
    assert_golden_rows(&g, &infer(&b, model, &body).await, &[3, 4, 5]);
    let s = stats(&b).await;
    assert_eq!(s["l2"]["hits"], 3, "{s}");
    assert_eq!(s["l1"]["misses"], 3);
    // Both servers record into one process-wide registry: 3 rows in all
    // means B ran none.
    assert_eq!(engine_rows(&b, model).await, 3.0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_in_both_tiers() {
    let redis = RedisServer::start();
    let model = "cache_ttl";
    let repo = repository_with(model, &cnn_lstm_config("[cache]\nttl = \"300ms\"\n"));
    let server = start(cached_config(repo, Some(&redis))).await;
    let g = golden();
    let body = request_for(&g, &[6], "t");
    infer(&server, model, &body).await;
    wait_for_keys(&redis, 1).await;
    infer(&server, model, &body).await;
    assert_eq!(stats(&server).await["l1"]["hits"], 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(redis.dbsize(1), 0, "Redis expired the key (SET .. PX)");
    assert_golden_rows(&g, &infer(&server, model, &body).await, &[6]);
    let s = stats(&server).await;
    assert_eq!(s["l1"]["hits"], 1, "the L1 entry expired: {s}");
    assert_eq!(s["l2"]["misses"], 2, "the L2 entry expired: {s}");
    assert_eq!(engine_rows(&server, model).await, 2.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_parameters_get_their_own_entries() {
    let model = "cache_keys";
    let repo = repository_with(model, &cnn_lstm_config(""));
    std::fs::create_dir_all(repo.join(model).join("2")).unwrap();
    std::fs::copy(
        repo.join(model).join("1/model.onnx"),
        repo.join(model).join("2/model.onnx"),
    )
    .unwrap();
    let server = start(cached_config(repo, None)).await;
    let g = golden();
    let body = request_for(&g, &[7], "k");
    let post = |path: String, body: serde_json::Value| {
        let server = &server;
        async move {
            let r = server
                .client
                .post(server.url(&path))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    post(format!("/v2/models/{model}/versions/1/infer"), body.clone()).await;
    post(format!("/v2/models/{model}/versions/2/infer"), body.clone()).await;
    assert_eq!(
        stats(&server).await["l1"]["hits"],
        0,
        "another version is another key"
    );
    let mut with_param = body.clone();
    with_param["parameters"] = serde_json::json!({"horizon": 5});
    post(
        format!("/v2/models/{model}/versions/1/infer"),
        with_param.clone(),
    )
    .await;
    assert_eq!(
        stats(&server).await["l1"]["hits"],
        0,
        "a parameter is part of the key"
    );
    with_param["parameters"]["priority"] = 1.into();
    with_param["parameters"]["timeout"] = 900_000.into();
    post(format!("/v2/models/{model}/versions/1/infer"), with_param).await;
    assert_eq!(
        stats(&server).await["l1"]["hits"],
        1,
        "priority and timeout are not"
    );
    let mut opt_out = body.clone();
    opt_out["parameters"] = serde_json::json!({"cache": false});
    post(format!("/v2/models/{model}/versions/1/infer"), opt_out).await;
    let s = stats(&server).await;
    assert_eq!(
        (s["l1"]["hits"].as_u64(), s["l1"]["misses"].as_u64()),
        (Some(1), Some(3)),
        "{s}"
    );
    assert_eq!(
        engine_rows(&server, model).await,
        4.0,
        "cache: false runs the engine"
    );

    // Admin endpoints need the token.
    let r = server
        .client
        .get(server.url("/v2/cache/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = server
        .client
        .delete(server.url("/v2/cache/models/nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_off_without_a_token() {
    let server = start(config(root().join("models"))).await;
    let r = server
        .client
        .get(server.url("/v2/cache/stats"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_requests_run_one_engine_row() {
    let model = "cache_coalesce";
    // Waiting mode and a long queue delay keep the first row waiting
    // (alone, its batch never fills) while the others arrive, so they meet
    // it in flight.
    let repo = repository_with(
        model,
        &cnn_lstm_config(
            "[dynamic_batching]\nmax_queue_delay = \"1s\"\nwork_conserving = false\n[dynamic_batching.priority.3]\ndefault_timeout = \"10s\"\n",
        ),
    );
    let server = start(cached_config(repo, None)).await;
    let g = golden();
    let body = request_for(&g, &[8], "c");
    let requests = (0..100).map(|_| infer(&server, model, &body));
    let answers = futures_join_all(requests).await;
    for answer in &answers {
        assert_golden_rows(&g, answer, &[8]);
    }
    assert_eq!(engine_rows(&server, model).await, 1.0);
    let s = stats(&server).await;
    let coalesced = s["coalesced"].as_u64().unwrap();
    assert!(coalesced > 0, "{s}");
    assert_eq!(coalesced + s["l1"]["hits"].as_u64().unwrap(), 99, "{s}");
    server.shutdown().await.unwrap();
}

/// `join_all` without a futures dependency: spawn-free, polls in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut outputs: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if outputs[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => outputs[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_and_coming_back_fails_no_request() {
    let mut redis = RedisServer::start();
    let model = "cache_outage";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(repo, Some(&redis))).await;
    let g = golden();
    for i in 0..90 {
        if i == 30 {
            redis.kill();
        }
        if i == 60 {
            redis.restart();
        }
        // Every third request repeats an earlier row.
        let body = distinct_request(&g, if i % 3 == 0 { 0 } else { i });
        let answer = infer(&server, model, &body).await;
        assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, 3]));
    }
    let s = stats(&server).await;
    assert!(
        s["l2"]["errors"].as_u64().unwrap() > 0,
        "the outage was noticed: {s}"
    );
    let metrics = server.metrics_text().await;
    assert!(
        !metrics.contains(&format!("batch_processing_errors_total{{model=\"{model}\"")),
        "{metrics}"
    );

    // L2 hits resume on their own: a fresh row computed now reaches the
    // restarted Redis and is read back from it after an L1 clear.
    let mut resumed = false;
    for attempt in 0..100 {
        let body = distinct_request(&g, 1000 + attempt);
        infer(&server, model, &body).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        clear(&server, model, "l1").await;
        let before = stats(&server).await["l2"]["hits"].as_u64().unwrap();
        infer(&server, model, &body).await;
        let s = stats(&server).await;
        if s["l2"]["hits"].as_u64().unwrap() == before + 1 {
            assert_eq!(s["l2"]["state"], "closed", "{s}");
            resumed = true;
            break;
        }
    }
    assert!(
        resumed,
        "no L2 hit after Redis came back: {}",
        stats(&server).await
    );
    server.shutdown().await.unwrap();
}
