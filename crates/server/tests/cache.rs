//! The result cache end to end: a real server, the real engine, a real
//! redis-server (started on a free loopback port by tests/common/redis.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;
use tickserve_test_support::RequestExt;

use common::redis::{RedisOptions, RedisServer};
use common::tls::TestPki;
use common::*;
use tickserve_server::{
    AdminToken, CacheConfig, ClientIdentity, RedisConfig, RedisTls, ServerConfig,
};

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

/// The default cache with `redis` as L2 (none: L1 only), and the admin
/// token.
fn cached_config(repository: std::path::PathBuf, redis: Option<RedisConfig>) -> ServerConfig {
    ServerConfig {
        cache: CacheConfig {
            redis,
            ..CacheConfig::default()
        },
        admin_token: Some(AdminToken::new(TOKEN)),
        model_control: tickserve_server::ModelControl::default(),
        ..config(repository)
    }
}

async fn infer(server: &TestServer, model: &str, body: &serde_json::Value) -> serde_json::Value {
    let response = server.post_infer(model, body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Sends an admin request with the token.
async fn admin_request(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.bearer_auth(TOKEN).sent().await
}

/// Sends an admin request with the token; its JSON answer, which must be
/// a 200.
async fn admin(request: reqwest::RequestBuilder) -> serde_json::Value {
    let response = admin_request(request).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn stats(server: &TestServer) -> serde_json::Value {
    admin(server.client.get(server.url("/v2/cache/stats"))).await
}

async fn clear(server: &TestServer, model: &str, tier: &str) -> serde_json::Value {
    let path = format!("/v2/cache/models/{model}?tier={tier}");
    admin(server.client.delete(server.url(&path))).await
}

/// Asserts that no request for `model` failed (the error counter has no
/// series for it).
async fn assert_no_request_failed(server: &TestServer, model: &str) {
    let metrics = server.metrics_text().await;
    assert!(
        !metrics.contains(&format!("batch_processing_errors_total{{model=\"{model}\"")),
        "{metrics}"
    );
}

/// Whether L2 hits resume (bounded, `attempts` fresh rows from
/// `distinct_request(first..)`): a row computed now reaches Redis and is
/// read back from it after an L1 clear. The stats of that hit, if any.
async fn l2_hit_again(
    server: &TestServer,
    model: &str,
    first: usize,
    attempts: usize,
) -> Option<serde_json::Value> {
    let g = golden();
    for attempt in 0..attempts {
        let body = distinct_request(&g, first + attempt);
        infer(server, model, &body).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        clear(server, model, "l1").await;
        let before = stats(server).await["l2"]["hits"].as_u64().unwrap();
        infer(server, model, &body).await;
        let s = stats(server).await;
        if s["l2"]["hits"].as_u64().unwrap() == before + 1 {
            return Some(s);
        }
    }
    None
}

/// Server `a` computes golden `rows` and writes them to Redis; `b`, which
/// shares that Redis, must read them from it. `b`'s cache stats after.
async fn b_reads_what_a_wrote(
    redis: &RedisServer,
    (a, b): (&TestServer, &TestServer),
    model: &str,
    rows: &[usize],
) -> serde_json::Value {
    let g = golden();
    let body = request_for(&g, rows, "shared");
    assert_golden_rows(&g, &infer(a, model, &body).await, rows);
    wait_for_keys(redis, rows.len() as i64).await;
    assert_golden_rows(&g, &infer(b, model, &body).await, rows);
    stats(b).await
}

/// Rows the engine ran for `model` (every version), from the batch-size
/// histogram.
async fn engine_rows(server: &TestServer, model: &str) -> f64 {
    let text = server.metrics_text().await;
    let prefix = format!("batch_processing_batch_size_sum{{model=\"{model}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let server = start(cached_config(repo, Some(redis_config(&redis)))).await;
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
    let a = start(cached_config(repo.clone(), Some(redis_config(&redis)))).await;
    let b = start(cached_config(repo, Some(redis_config(&redis)))).await;
    let s = b_reads_what_a_wrote(&redis, (&a, &b), model, &[3, 4, 5]).await;
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
    let server = start(cached_config(repo, Some(redis_config(&redis)))).await;
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
async fn an_l2_hit_lives_in_l1_only_as_long_as_it_had_left_in_redis() {
    let redis = RedisServer::start();
    let model = "cache_remaining_ttl";
    let repo = repository_with(model, &cnn_lstm_config("[cache]\nttl = \"3s\"\n"));
    let server = start(cached_config(repo, Some(redis_config(&redis)))).await;
    let g = golden();
    let body = request_for(&g, &[16], "r");
    let written = std::time::Instant::now();
    infer(&server, model, &body).await;
    wait_for_keys(&redis, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    clear(&server, model, "l1").await;
    infer(&server, model, &body).await;
    let promoted = std::time::Instant::now();
    let s = stats(&server).await;
    assert_eq!(s["l2"]["hits"], 1, "{s}");
    assert!(
        written.elapsed() < Duration::from_millis(2500),
        "too slow to tell the two lifetimes apart"
    );
    infer(&server, model, &body).await;
    assert_eq!(stats(&server).await["l1"]["hits"], 1, "promoted");
    // Past the Redis entry's end (3 s after it was written), well before
    // 3 s after the promotion.
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(written.elapsed())).await;
    assert!(promoted.elapsed() < Duration::from_millis(2800));
    infer(&server, model, &body).await;
    let s = stats(&server).await;
    assert_eq!(
        s["l1"]["hits"], 1,
        "the promoted row expired with its Redis entry: {s}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_parameters_get_their_own_entries() {
    let model = "cache_keys";
    let repo = repository_with_two_versions(model, "");
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
                .sent()
                .await;
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
    let stats_url = server.url("/v2/cache/stats");
    assert_eq!(server.client.get(stats_url).sent().await.status(), 401);
    let unknown = server.client.delete(server.url("/v2/cache/models/nope"));
    assert_eq!(admin_request(unknown).await.status(), 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_off_without_a_token() {
    let server = start(config(root().join("models"))).await;
    let stats = server.client.get(server.url("/v2/cache/stats"));
    assert_eq!(admin_request(stats).await.status(), 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_requests_run_one_engine_row() {
    let model = "cache_coalesce";
    // Waiting mode and a long queue delay keep the first row waiting
    // (alone, its batch never fills) while the others arrive, so they meet
    // it in flight.
    let repo = repository_with(model, &cnn_lstm_config(&waiting_batches("")));
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
    let server = start(cached_config(repo, Some(redis_config(&redis)))).await;
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
    assert_no_request_failed(&server, model).await;

    // L2 hits resume on their own, from the restarted Redis.
    let Some(s) = l2_hit_again(&server, model, 1000, 100).await else {
        panic!("no L2 hit after Redis came back: {}", stats(&server).await);
    };
    assert_eq!(s["l2"]["state"], "closed", "{s}");
    server.shutdown().await.unwrap();
}

fn tls_config(redis: &RedisServer, pki: &TestPki, client_certificate: bool) -> RedisConfig {
    RedisConfig {
        tls: RedisTls {
            ca_pem: Some(pki.read("ca.crt")),
            client: client_certificate.then(|| ClientIdentity {
                cert_pem: pki.read("client.crt"),
                key_pem: pki.read("client.key"),
            }),
        },
        ..redis_config(redis)
    }
}

fn pki_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tickserve-pki-{}-{name}", std::process::id()))
}

/// Polls the cache stats (bounded) until `done` holds; the last stats.
async fn stats_until(
    server: &TestServer,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut s = stats(server).await;
    for _ in 0..250 {
        if done(&s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = stats(server).await;
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password_shares_results() {
    let pki = TestPki::generate(&pki_dir("shared"), "tickserve test CA");
    let redis = RedisServer::start_with(&RedisOptions {
        password: Some("tls-s3cret"),
        tls: Some(&pki),
        require_client_cert: false,
    });
    assert!(
        redis.url().starts_with("rediss://:tls-s3cret@"),
        "{}",
        redis.url()
    );
    let model = "cache_tls";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let a = start(cached_config(
        repo.clone(),
        Some(tls_config(&redis, &pki, false)),
    ))
    .await;
    let b = start(cached_config(repo, Some(tls_config(&redis, &pki, false)))).await;
    let s = b_reads_what_a_wrote(&redis, (&a, &b), model, &[9, 10]).await;
    assert_eq!(s["l2"]["hits"], 2, "B read A's rows over TLS: {s}");
    assert_eq!(s["l2"]["state"], "closed", "{s}");
    assert_eq!(s["l2"]["errors"], 0, "{s}");
    assert_eq!(engine_rows(&b, model).await, 2.0, "B ran none");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_uses_the_client_certificate() {
    let pki = TestPki::generate(&pki_dir("mutual"), "tickserve test CA");
    let redis = RedisServer::start_with(&RedisOptions {
        tls: Some(&pki),
        require_client_cert: true,
        ..RedisOptions::default()
    });
    let model = "cache_mtls";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(
        repo.clone(),
        Some(tls_config(&redis, &pki, true)),
    ))
    .await;
    let g = golden();
    let body = request_for(&g, &[11], "m");
    infer(&server, model, &body).await;
    wait_for_keys(&redis, 1).await;
    clear(&server, model, "l1").await;
    assert_golden_rows(&g, &infer(&server, model, &body).await, &[11]);
    let s = stats(&server).await;
    assert_eq!(s["l2"]["hits"], 1, "{s}");

    // Without a client certificate the server refuses the connection;
    // requests go on from memory and the engine.
    let anonymous = start(cached_config(repo, Some(tls_config(&redis, &pki, false)))).await;
    for round in 0..3 {
        assert_golden_rows(&g, &infer(&anonymous, model, &body).await, &[11]);
        if round == 0 {
            stats_until(&anonymous, |s| s["l2"]["errors"].as_u64() > Some(0)).await;
        }
    }
    let s = stats(&anonymous).await;
    assert!(s["l2"]["errors"].as_u64() > Some(0), "{s}");
    assert_eq!(s["l2"]["hits"], 0, "{s}");
    server.shutdown().await.unwrap();
    anonymous.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_a_clear_error_and_no_request_fails() {
    let pki = TestPki::generate(&pki_dir("real"), "the real CA");
    let other = TestPki::generate(&pki_dir("other"), "another CA");
    let redis = RedisServer::start_with(&RedisOptions {
        tls: Some(&pki),
        ..RedisOptions::default()
    });
    let model = "cache_wrong_ca";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(repo, Some(tls_config(&redis, &other, false)))).await;
    let g = golden();
    for i in 0..6 {
        // Every other request repeats the first row: L1 still works.
        let row = if i % 2 == 0 { 12 } else { 12 + i };
        let body = request_for(&g, &[row], "w");
        assert_golden_rows(&g, &infer(&server, model, &body).await, &[row]);
    }
    let s = stats_until(&server, |s| s["l2"]["errors"].as_u64() > Some(0)).await;
    let error = s["l2"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        error.starts_with("connect") && error.contains("certificate"),
        "the stats say why: {s}"
    );
    assert_eq!(s["l2"]["hits"], 0, "{s}");
    assert_eq!(s["l1"]["hits"], 2, "{s}");
    assert_eq!(redis.dbsize(1), 0, "nothing reached Redis");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("tickserve_cache_redis_errors_total{operation=\"connect\"}"),
        "{metrics}"
    );
    assert_no_request_failed(&server, model).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_times_out_opens_the_breaker_and_comes_back() {
    let redis = RedisServer::start();
    let model = "cache_slow";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(
        repo,
        Some(RedisConfig {
            timeout: Duration::from_millis(50),
            ..redis_config(&redis)
        }),
    ))
    .await;
    let g = golden();
    infer(&server, model, &distinct_request(&g, 0)).await;
    wait_for_keys(&redis, 1).await;
    // Redis stops answering every client for 1.5 s (a slow or stuck
    // server, not a dead one: connections stay open).
    let paused = std::time::Instant::now();
    let _: String = redis
        .command(0, ::redis::cmd("CLIENT").arg("PAUSE").arg(1500).arg("ALL"))
        .unwrap();
    let mut i = 1;
    while paused.elapsed() < Duration::from_millis(1200) {
        let answer = infer(&server, model, &distinct_request(&g, i)).await;
        assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, 3]));
        i += 1;
    }
    let s = stats(&server).await;
    assert!(s["l2"]["errors"].as_u64() >= Some(3), "{s}");
    let error = s["l2"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out"), "{s}");
    assert_ne!(s["l2"]["state"], "closed", "the breaker opened: {s}");

    // After the pause, the breaker's probe succeeds and L2 is used again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if l2_hit_again(&server, model, 5000, 50).await.is_none() {
        panic!("no L2 hit after the pause: {}", stats(&server).await);
    }
    assert_no_request_failed(&server, model).await;
    server.shutdown().await.unwrap();
}

/// Triton's `inference_stats` of `model` over HTTP, once `computed` engine
/// requests and `succeeded` requests are counted (the engine thread and the
/// batcher count just after answering).
async fn triton_stats(
    server: &TestServer,
    model: &str,
    computed: u64,
    succeeded: u64,
) -> serde_json::Value {
    let mut s = serde_json::Value::Null;
    for _ in 0..200 {
        s = server
            .client
            .get(server.url(&format!("/v2/models/{model}/stats")))
            .json_value()
            .await;
        let stats = &s["model_stats"][0]["inference_stats"];
        if stats["compute_infer"]["count"] == computed && stats["success"]["count"] == succeeded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s["model_stats"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_statistics_count_cache_hits_and_misses_on_both_protocols() {
    use tickserve_server::grpc::pb;
    use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

    let model = "cache_triton_stats";
    let repo = repository_with(model, &cnn_lstm_config(""));
    let server = start(cached_config(repo, None)).await;
    let g = golden();
    let count =
        |s: &serde_json::Value, what: &str| s["inference_stats"][what]["count"].as_u64().unwrap();
    let ns = |s: &serde_json::Value, what: &str| s["inference_stats"][what]["ns"].as_u64().unwrap();

    // A miss (2 rows computed), two full hits, a partial hit (1 row
    // computed), and a request that skips the cache.
    let body = request_for(&g, &[13, 14], "s");
    infer(&server, model, &body).await;
    triton_stats(&server, model, 1, 1).await;
    infer(&server, model, &body).await;
    infer(&server, model, &body).await;
    infer(&server, model, &request_for(&g, &[15, 13], "p")).await;
    triton_stats(&server, model, 2, 4).await;
    let mut opt_out = request_for(&g, &[13], "o");
    opt_out["parameters"] = serde_json::json!({"cache": false});
    infer(&server, model, &opt_out).await;
    let s = triton_stats(&server, model, 3, 5).await;

    assert_eq!(count(&s, "success"), 5, "every answered request: {s}");
    assert_eq!(
        count(&s, "queue"),
        5,
        "queue includes cache hits (Triton): {s}"
    );
    assert_eq!(count(&s, "cache_hit"), 2, "{s}");
    assert_eq!(
        count(&s, "cache_miss"),
        2,
        "the first and the partial request: {s}"
    );
    assert!(ns(&s, "cache_hit") > 0 && ns(&s, "cache_miss") > 0, "{s}");
    for compute in ["compute_input", "compute_infer", "compute_output"] {
        assert_eq!(count(&s, compute), 3, "hits never reach the engine: {s}");
    }
    assert_eq!(
        s["inference_count"], 4,
        "rows the engine ran (2 + 1 + 1): {s}"
    );
    assert_eq!(s["execution_count"], 3, "{s}");
    assert_eq!(count(&s, "fail"), 0, "{s}");

    // gRPC answers from the same counters, and its requests go through
    // the cache too: one more hit.
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let mut request = grpc_request("", 2, g.input[13 * ROW..15 * ROW].to_vec(), false);
    request.model_name = model.into();
    grpc.model_infer(request).await.unwrap();
    let http = triton_stats(&server, model, 3, 6).await;
    let stats = grpc
        .model_statistics(pb::ModelStatisticsRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let i = stats.model_stats[0].inference_stats.unwrap();
    let pair = |d: Option<pb::StatisticDuration>| d.map(|d| (d.count, d.ns)).unwrap();
    let json_pair = |what: &str| (count(&http, what), ns(&http, what));
    assert_eq!(pair(i.cache_hit).0, 3, "{i:?}");
    assert_eq!(pair(i.success).0, 6, "{i:?}");
    for (what, got) in [
        ("success", i.success),
        ("queue", i.queue),
        ("cache_hit", i.cache_hit),
        ("cache_miss", i.cache_miss),
        ("compute_infer", i.compute_infer),
    ] {
        assert_eq!(
            pair(got),
            json_pair(what),
            "{what}: gRPC and HTTP share one source"
        );
    }
    server.shutdown().await.unwrap();
}
