//! The gRPC service with tonic's client against the real server: every
//! RPC, both tensor forms, streams, gzip, health checking and error codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tickserve_server::grpc::pb;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

async fn client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
}

fn rows_of(golden: &Golden, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| golden.input[r * ROW..(r + 1) * ROW].iter().copied())
        .collect()
}

fn request(id: &str, rows: usize, data: Vec<f32>, raw: bool) -> pb::ModelInferRequest {
    grpc_request(id, rows, data, raw)
}

fn outputs_of(response: &pb::ModelInferResponse) -> Vec<f32> {
    assert_eq!(response.outputs.len(), 1);
    let output = &response.outputs[0];
    assert_eq!(output.name, "output");
    assert_eq!(output.datatype, "FP32");
    match response.raw_output_contents.first() {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        None => output.contents.as_ref().unwrap().fp32_contents.clone(),
    }
}

fn assert_golden(golden: &Golden, got: &[f32], rows: &[usize]) {
    assert_eq!(got.len(), rows.len() * 3);
    for (i, &r) in rows.iter().enumerate() {
        for j in 0..3 {
            let want = golden.output[r * 3 + j];
            assert!(
                (got[i * 3 + j] - want).abs() <= 1e-5,
                "row {i} output {j}: {} vs {want}",
                got[i * 3 + j]
            );
        }
    }
}

#[tokio::test]
async fn health_metadata_config_statistics_and_index() {
    let server = start_default().await;
    let mut c = client(&server).await;
    let live = c.server_live(pb::ServerLiveRequest {}).await.unwrap();
    assert!(live.into_inner().live);
    let ready = c.server_ready(pb::ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
    let ready = c
        .model_ready(pb::ModelReadyRequest {
            name: "cnn_lstm".into(),
            version: "1".into(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);

    let meta = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "tickserve");
    assert!(meta.extensions.contains(&"model_configuration".to_owned()));
    assert!(meta.extensions.contains(&"binary_tensor_data".to_owned()));

    let meta = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "cnn_lstm".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, vec!["1".to_owned()]);
    assert_eq!(meta.inputs[0].shape, vec![-1, 50, 60]);
    assert_eq!(meta.outputs[0].shape, vec![-1, 3]);

    let config = c
        .model_config(pb::ModelConfigRequest {
            name: "cnn_lstm".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "cnn_lstm");
    assert_eq!(config.max_batch_size, 32);
    assert_eq!(config.input[0].dims, vec![50, 60]);
    assert_eq!(config.input[0].data_type, pb::DataType::TypeFp32 as i32);
    assert_eq!(config.output[0].dims, vec![3]);
    match config.scheduling_choice {
        Some(pb::model_config::SchedulingChoice::DynamicBatching(b)) => {
            assert_eq!(b.max_queue_delay_microseconds, 5000)
        }
        None => panic!("no dynamic_batching"),
    }

    let golden = golden();
    c.model_infer(request("s", 2, rows_of(&golden, &[40, 41]), false))
        .await
        .unwrap();
    // The engine thread counts a batch just after answering it: give the
    // counters a moment to catch up with the answer.
    let mut stats = pb::ModelStatisticsResponse::default();
    for _ in 0..100 {
        stats = c
            .model_statistics(pb::ModelStatisticsRequest {
                name: "cnn_lstm".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let done = &stats.model_stats[0];
        if done.inference_count == 2
            && done
                .inference_stats
                .as_ref()
                .and_then(|i| i.success)
                .map(|d| d.count)
                == Some(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = &stats.model_stats[0];
    assert_eq!((s.name.as_str(), s.version.as_str()), ("cnn_lstm", "1"));
    assert_eq!(s.inference_count, 2);
    let success = s.inference_stats.as_ref().unwrap().success.unwrap();
    assert_eq!(success.count, 1);
    assert!(success.ns > 0);

    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(index.models.len(), 1);
    assert_eq!(index.models[0].state, "READY");

    let channel = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn typed_and_raw_tensors_return_the_golden_outputs() {
    let server = start_default().await;
    let mut c = client(&server).await;
    let golden = golden();
    let rows = [0, 1, 2];
    let typed = c
        .model_infer(request("typed", 3, rows_of(&golden, &rows), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(typed.id, "typed");
    assert_eq!(typed.model_version, "1");
    assert!(typed.raw_output_contents.is_empty());
    assert_eq!(typed.outputs[0].shape, vec![3, 3]);
    assert_golden(&golden, &outputs_of(&typed), &rows);

    let raw = c
        .model_infer(request("raw", 3, rows_of(&golden, &rows), true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raw.raw_output_contents.len(), 1);
    assert!(raw.outputs[0].contents.is_none());
    assert_golden(&golden, &outputs_of(&raw), &rows);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_answers_every_request_and_reports_errors_in_band() {
    let server = start_default().await;
    let mut c = client(&server).await;
    let golden = golden();
    let mut requests: Vec<pb::ModelInferRequest> = (0..4)
        .map(|r| request(&format!("r{r}"), 1, rows_of(&golden, &[r]), r % 2 == 0))
        .collect();
    let mut bad = request("bad", 1, vec![0.0; 10], false);
    bad.inputs[0].shape = vec![1, 10];
    requests.push(bad);
    // The stream joins the caller's trace; each answer names its own
    // request's span and id in its parameters.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut stream = tonic::Request::new(tokio_stream::iter(requests));
    stream.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let mut answers = c.model_stream_infer(stream).await.unwrap().into_inner();
    let mut seen = Vec::new();
    let mut span_ids = std::collections::HashSet::new();
    while let Some(answer) = answers.message().await.unwrap() {
        let response = answer.infer_response.unwrap();
        let text = |name: &str| match &response.parameters[name].parameter_choice {
            Some(pb::infer_parameter::ParameterChoice::StringParam(v)) => v.clone(),
            other => panic!("{name}: {other:?}"),
        };
        let traceparent = text("traceparent");
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!((fields[0], fields[1], fields[3]), ("00", trace_id, "01"));
        assert!(span_ids.insert(fields[2].to_owned()), "{traceparent}");
        assert_eq!(text("x-request-id").len(), 32);
        if response.id == "bad" {
            assert!(
                answer.error_message.contains("shape"),
                "{}",
                answer.error_message
            );
        } else {
            assert_eq!(answer.error_message, "");
            let r: usize = response.id[1..].parse().unwrap();
            assert_golden(&golden, &outputs_of(&response), &[r]);
        }
        seen.push(response.id);
    }
    seen.sort();
    assert_eq!(seen, ["bad", "r0", "r1", "r2", "r3"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn gzip_round_trips_a_max_batch_request() {
    let server = start_default().await;
    let mut c = client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let golden = golden();
    let available = golden.input.len() / ROW;
    let rows: Vec<usize> = (0..32).map(|i| i % available).collect();
    let response = c
        .model_infer(request("big", 32, rows_of(&golden, &rows), true))
        .await
        .unwrap();
    assert_eq!(
        response
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    assert_golden(&golden, &outputs_of(&response.into_inner()), &rows);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_map_to_grpc_codes_with_the_reason() {
    let server = start_default().await;
    let mut c = client(&server).await;
    let golden = golden();

    let mut unknown = request("u", 1, rows_of(&golden, &[0]), false);
    unknown.model_name = "nope".into();
    let status = c.model_infer(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("unknown model 'nope'"),
        "{status}"
    );

    let mut version = request("v", 1, rows_of(&golden, &[0]), false);
    version.model_version = "7".into();
    assert_eq!(
        c.model_infer(version).await.unwrap_err().code(),
        Code::NotFound
    );

    let mut fp64 = request("d", 1, Vec::new(), false);
    fp64.inputs[0].datatype = "FP64".into();
    fp64.inputs[0].contents = Some(pb::InferTensorContents {
        fp64_contents: vec![0.0; ROW],
        ..Default::default()
    });
    let status = c.model_infer(fp64).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("datatype FP64; the model takes FP32"),
        "{status}"
    );

    let mut mismatch = request("m", 1, rows_of(&golden, &[0]), true);
    mismatch.raw_input_contents.push(vec![0; 4]);
    let status = c.model_infer(mismatch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("raw_input_contents"), "{status}");

    let too_many = request("t", 33, vec![0.0; 33 * ROW], true);
    let status = c.model_infer(too_many).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_batch_size"), "{status}");

    let status = c
        .model_config(pb::ModelConfigRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted_as_http_is_429() {
    // As the HTTP test: waiting mode, a long delay and a queue of two.
    let server = start_model("cnn_lstm", &waiting_batches("max_queue_size = 2\n")).await;
    let golden = golden();
    let c = client(&server).await;
    let send = |i: usize| {
        let mut c = c.clone();
        let request = request("q", 1, rows_of(&golden, &[i]), false);
        async move { c.model_infer(request).await }
    };
    let first = tokio::spawn(send(0));
    let second = tokio::spawn(send(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = send(2).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("is full"), "{status}");
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_grpc_request_counts_under_its_priority_and_reaches_the_sla_view() {
    // A model name of its own: the metrics recorder is shared by every
    // server of this test binary.
    let server = start_model("grpc_priority", "").await;
    let golden = golden();
    let mut c = client(&server).await;
    let mut prioritised = request("p1", 1, rows_of(&golden, &[0]), false);
    prioritised.model_name = "grpc_priority".into();
    prioritised.parameters.insert(
        "priority".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(1)),
        },
    );
    let response = c.model_infer(prioritised).await.unwrap().into_inner();
    assert_golden(&golden, &outputs_of(&response), &[0]);

    let metrics = server.metrics_text().await;
    for series in [
        "batch_processing_requests_total{model=\"grpc_priority\",version=\"1\",outcome=\"success\",batch_type=\"single\",source=\"grpc\",priority=\"1\"} 1",
        "batch_processing_latency_seconds_count{model=\"grpc_priority\",version=\"1\",batch_size_range=\"single\",priority=\"1\"} 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }

    // The throughput gauge is published once a second.
    let mut published = false;
    for _ in 0..30 {
        if server
            .metrics_text()
            .await
            .contains("batch_processing_throughput_rps{model=\"grpc_priority\"}")
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "no throughput gauge for the model");

    let view = server.get_json("/v2/sla").await;
    assert_eq!(view["overall"]["requests"], 1, "{view:#}");
    assert_eq!(view["overall"]["ok"], 1);
    let class = &view["classes"][0];
    assert_eq!(class["model"], "grpc_priority");
    assert_eq!(class["class"], "priority 1");
    server.shutdown().await.unwrap();
}
