//! Streams against the real server and engine: a stream's answer equals,
//! bit for bit, the answer to the same window sent whole, across starts,
//! ends, evictions and restarts, over HTTP and gRPC; bad sequences get
//! clear errors and leave the window unchanged; concurrent ticks on one
//! stream are applied one at a time.
//!
//! Every request (stream or whole window) is sent with the result cache
//! off, one at a time, so each is computed alone by the engine at batch
//! size 1 and an equal answer cannot come from the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use tickserve_server::grpc::pb;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tickserve_test_support::RequestExt;

const T: usize = 50;
const F: usize = 60;

/// `n` rows of a deterministic series (row r, feature f).
fn series(n: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            (0..F)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        })
        .collect()
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

/// The answer to `window` (T rows) sent whole.
async fn full(server: &TestServer, model: &str, window: &[Vec<f32>]) -> Value {
    assert_eq!(window.len(), T);
    let body = json!({
        "parameters": {"cache": false},
        "inputs": [{"name": "input", "shape": [1, T, F], "datatype": "FP32", "data": flat(window)}]
    });
    let response = post(server, model, &body).await;
    assert_eq!(response.0, 200, "{}", response.1);
    response.1["outputs"][0]["data"].clone()
}

/// A stream request with `rows` as its new rows, plus `parameters`.
fn tick(id: Value, rows: &[Vec<f32>], parameters: Value) -> Value {
    let mut params = json!({"sequence_id": id, "cache": false});
    for (k, v) in parameters.as_object().unwrap() {
        params[k] = v.clone();
    }
    json!({
        "parameters": params,
        "inputs": [{"name": "input", "shape": [1, rows.len(), F], "datatype": "FP32", "data": flat(rows)}]
    })
}

async fn post(server: &TestServer, model: &str, body: &Value) -> (u16, Value) {
    let response = server.post_infer(model, body).await;
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Sends a stream request that must be answered; returns its output.
async fn answered(server: &TestServer, model: &str, body: &Value) -> Value {
    let (status, answer) = post(server, model, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([1, 3]));
    answer["outputs"][0]["data"].clone()
}

/// Sends a stream request that must be refused with `status` and a
/// message containing `needle`.
async fn refused(server: &TestServer, model: &str, body: &Value, status: u16, needle: &str) {
    let (got, answer) = post(server, model, body).await;
    assert_eq!(got, status, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

fn window_of(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows[rows.len() - T..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_answers_equal_whole_windows_across_starts_ends_evictions_and_restarts() {
    let model = "streams_equal";
    let server = start_model(model, "[stream]\nmax_streams = 2").await;
    let rows = series(T + 40);

    // A starts with a whole window, then gets one tick at a time, then
    // three at once.
    let a = json!(1001);
    let answer = answered(
        &server,
        model,
        &tick(a.clone(), &rows[..T], json!({"sequence_start": true})),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[..T]).await);
    for end in T + 1..=T + 5 {
        let answer = answered(
            &server,
            model,
            &tick(a.clone(), &rows[end - 1..end], json!({})),
        )
        .await;
        assert_eq!(
            answer,
            full(&server, model, &window_of(&rows[..end])).await,
            "tick {end}"
        );
    }
    let answer = answered(
        &server,
        model,
        &tick(a.clone(), &rows[T + 5..T + 8], json!({})),
    )
    .await;
    assert_eq!(
        answer,
        full(&server, model, &window_of(&rows[..T + 8])).await
    );

    // B (a string id) and C take the two places: A, least recently used,
    // is evicted and refused, never answered from its old rows.
    let b = json!("EURUSD");
    answered(
        &server,
        model,
        &tick(
            b.clone(),
            &rows[10..10 + T],
            json!({"sequence_start": true}),
        ),
    )
    .await;
    answered(
        &server,
        model,
        &tick(
            json!(1003),
            &rows[20..20 + T],
            json!({"sequence_start": true}),
        ),
    )
    .await;
    refused(
        &server,
        model,
        &tick(a.clone(), &rows[T + 8..T + 9], json!({})),
        404,
        "evicted",
    )
    .await;
    let answer = answered(
        &server,
        model,
        &tick(b.clone(), &rows[10 + T..11 + T], json!({})),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[11..11 + T]).await);

    // A restarted holds only its new window.
    let answer = answered(
        &server,
        model,
        &tick(
            a.clone(),
            &rows[30..30 + T],
            json!({"sequence_start": true}),
        ),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[30..30 + T]).await);
    let answer = answered(
        &server,
        model,
        &tick(a.clone(), &rows[T + 30..T + 31], json!({})),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[31..31 + T]).await);

    // An end is answered, then the stream is gone.
    let answer = answered(
        &server,
        model,
        &tick(
            a.clone(),
            &rows[T + 31..T + 32],
            json!({"sequence_end": true}),
        ),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[32..32 + T]).await);
    refused(
        &server,
        model,
        &tick(a.clone(), &rows[0..1], json!({})),
        404,
        "sequence_start=true",
    )
    .await;

    // Warm-up under "reject": the rows are kept and the answer says how
    // many are missing; once full, the answer is the whole window's.
    let d = json!("warming");
    refused(
        &server,
        model,
        &tick(d.clone(), &rows[..10], json!({"sequence_start": true})),
        409,
        "40 more rows",
    )
    .await;
    refused(
        &server,
        model,
        &tick(d.clone(), &rows[10..49], json!({})),
        409,
        "1 more rows",
    )
    .await;
    let answer = answered(&server, model, &tick(d.clone(), &rows[49..50], json!({}))).await;
    assert_eq!(answer, full(&server, model, &rows[..T]).await);

    let metrics = server.metrics_text().await;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("model=\"{model}\"")))
            .unwrap_or_else(|| panic!("no {name} for {model} in\n{metrics}"))
            .to_owned()
    };
    assert!(
        line("tickserve_streams_live{").ends_with(" 2"),
        "{}",
        line("tickserve_streams_live{")
    );
    assert!(line("tickserve_streams_memory_bytes{").ends_with(&format!(
        " {}",
        2 * T * F * 4 + "EURUSD".len() + "warming".len()
    )));
    let evicted = line("tickserve_streams_evicted_total{");
    assert!(
        evicted.contains("reason=\"capacity\"") && !evicted.ends_with(" 0"),
        "{evicted}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padding_with_zeros_answers_like_the_padded_window() {
    let model = "streams_pad";
    let server = start_model(model, "[stream]\nwarmup = \"pad\"").await;
    let rows = series(3);
    let answer = answered(
        &server,
        model,
        &tick(json!(5), &rows[..1], json!({"sequence_start": true})),
    )
    .await;
    let mut padded = vec![vec![0.0f32; F]; T - 1];
    padded.push(rows[0].clone());
    assert_eq!(answer, full(&server, model, &padded).await);
    let answer = answered(&server, model, &tick(json!(5), &rows[1..3], json!({}))).await;
    let mut padded = vec![vec![0.0f32; F]; T - 3];
    padded.extend_from_slice(&rows[..3]);
    assert_eq!(answer, full(&server, model, &padded).await);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sequences_get_clear_errors_and_leave_the_window_unchanged() {
    let model = "streams_bad";
    let server = start_model(model, "").await;
    let rows = series(T + 2);
    let id = json!(77);
    answered(
        &server,
        model,
        &tick(id.clone(), &rows[..T], json!({"sequence_start": true})),
    )
    .await;

    let bad_rows = series(T + 1);
    refused(
        &server,
        model,
        &tick(id.clone(), &bad_rows, json!({})),
        400,
        "1 <= k <= 50",
    )
    .await;
    let mut narrow = tick(id.clone(), &[vec![0.5f32; F - 1]], json!({}));
    narrow["inputs"][0]["shape"] = json!([1, 1, F - 1]);
    refused(&server, model, &narrow, 400, "[1, k, 60]").await;
    let mut two = tick(id.clone(), &rows[T..T + 2], json!({}));
    two["inputs"][0]["shape"] = json!([2, 1, F]);
    refused(&server, model, &two, 400, "[1, k, 60]").await;
    let mut short = tick(id.clone(), &rows[T..T + 1], json!({}));
    short["inputs"][0]["data"] = json!([1.0, 2.0]);
    refused(&server, model, &short, 400, "needs 60").await;
    refused(
        &server,
        model,
        &tick(json!(78), &rows[T..T + 1], json!({})),
        404,
        "unknown",
    )
    .await;
    refused(
        &server,
        model,
        &tick(json!(0), &rows[T..T + 1], json!({})),
        400,
        "positive integer",
    )
    .await;
    refused(
        &server,
        model,
        &tick(id.clone(), &rows[T..T + 1], json!({"sequence_end": 1})),
        400,
        "true or false",
    )
    .await;
    // Refused after the stream's turn was taken (an unknown output): the
    // window must not advance either.
    let mut unknown_output = tick(id.clone(), &rows[T..T + 1], json!({}));
    unknown_output["outputs"] = json!([{"name": "nope"}]);
    refused(&server, model, &unknown_output, 400, "unknown output").await;
    let mut bad_cache = tick(id.clone(), &rows[T..T + 1], json!({}));
    bad_cache["parameters"]["cache"] = json!("maybe");
    refused(&server, model, &bad_cache, 400, "cache").await;
    // Nor a refused restart.
    let mut bad_restart = tick(id.clone(), &rows[2..T + 2], json!({"sequence_start": true}));
    bad_restart["outputs"] = json!([{"name": "nope"}]);
    refused(&server, model, &bad_restart, 400, "unknown output").await;

    // The next good tick sees exactly the first window plus itself.
    let answer = answered(
        &server,
        model,
        &tick(id.clone(), &rows[T..T + 1], json!({})),
    )
    .await;
    assert_eq!(answer, full(&server, model, &rows[1..T + 1]).await);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ticks_on_one_stream_are_applied_one_at_a_time() {
    const N: usize = 6;
    let model = "streams_concurrent";
    let server = start_model(model, "").await;
    let rows = series(T + N);
    let id = json!("one");
    answered(
        &server,
        model,
        &tick(id.clone(), &rows[..T], json!({"sequence_start": true})),
    )
    .await;
    let sends: Vec<_> = (0..N)
        .map(|i| {
            let body = tick(id.clone(), &rows[T + i..T + i + 1], json!({}));
            let client = server.client.clone();
            let url = server.url(&format!("/v2/models/{model}/infer"));
            tokio::spawn(async move {
                let response = client.post(url).json(&body).sent().await;
                assert_eq!(response.status(), 200);
                let answer: Value = response.json().await.unwrap();
                answer["outputs"][0]["data"].clone()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for send in sends {
        answers.push(Some(send.await.unwrap()));
    }
    // Serialised, each answer is the window after the ticks applied
    // before it plus its own: rebuild that order one step at a time. An
    // interleaving, a lost or a doubled tick would leave an answer that
    // matches no step.
    let mut window = rows[..T].to_vec();
    for step in 0..N {
        let mut matched = None;
        for (i, answer) in answers.iter().enumerate() {
            let Some(answer) = answer else { continue };
            let mut next = window[1..].to_vec();
            next.push(rows[T + i].clone());
            if *answer == full(&server, model, &next).await {
                matched = Some((i, next));
                break;
            }
        }
        let (i, next) = matched.unwrap_or_else(|| panic!("no answer matches step {step}"));
        answers[i] = None;
        window = next;
    }
    server.shutdown().await.unwrap();
}

fn grpc_request(
    model: &str,
    id: pb::infer_parameter::ParameterChoice,
    start: bool,
    rows: &[Vec<f32>],
) -> pb::ModelInferRequest {
    let mut parameters = std::collections::HashMap::new();
    parameters.insert(
        "sequence_id".to_owned(),
        pb::InferParameter {
            parameter_choice: Some(id),
        },
    );
    parameters.insert(
        "sequence_start".to_owned(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(start)),
        },
    );
    parameters.insert(
        "cache".to_owned(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(false)),
        },
    );
    pb::ModelInferRequest {
        model_name: model.into(),
        parameters,
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, rows.len() as i64, F as i64],
            contents: Some(pb::InferTensorContents {
                fp32_contents: flat(rows),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_answer_like_whole_windows_and_map_their_errors() {
    use pb::infer_parameter::ParameterChoice::{StringParam, Uint64Param};
    let model = "streams_grpc";
    let server = start_model(model, "").await;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let rows = series(T + 1);
    let outputs = |response: pb::ModelInferResponse| -> Vec<u32> {
        response.outputs[0]
            .contents
            .as_ref()
            .unwrap()
            .fp32_contents
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let whole = |window: &[Vec<f32>]| {
        let mut request = grpc_request(model, Uint64Param(1), false, window);
        request.parameters.remove("sequence_id");
        request.parameters.remove("sequence_start");
        request
    };
    let started = client
        .model_infer(grpc_request(model, Uint64Param(9), true, &rows[..T]))
        .await
        .unwrap()
        .into_inner();
    let expected = client
        .model_infer(whole(&rows[..T]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outputs(started), outputs(expected));
    let ticked = client
        .model_infer(grpc_request(model, Uint64Param(9), false, &rows[T..]))
        .await
        .unwrap()
        .into_inner();
    let expected = client
        .model_infer(whole(&rows[1..]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outputs(ticked), outputs(expected));

    let unknown = client
        .model_infer(grpc_request(
            model,
            StringParam("nope".into()),
            false,
            &rows[T..],
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let warming = client
        .model_infer(grpc_request(
            model,
            StringParam("new".into()),
            true,
            &rows[..3],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        warming.code(),
        tonic::Code::FailedPrecondition,
        "{warming:?}"
    );
    assert!(warming.message().contains("47 more rows"), "{warming:?}");
    let too_many = client
        .model_infer(grpc_request(model, Uint64Param(9), false, &series(T + 1)))
        .await
        .unwrap_err();
    assert_eq!(
        too_many.code(),
        tonic::Code::InvalidArgument,
        "{too_many:?}"
    );
    server.shutdown().await.unwrap();
}
