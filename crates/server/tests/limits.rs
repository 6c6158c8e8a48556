//! The limits against slow or abusive clients, against the real server:
//! a client that stalls mid-body gets 408, one that stalls mid-headers is
//! disconnected, connections past the cap are refused with a clear
//! error, and gRPC messages past the size limit get OUT_OF_RANGE.
//! The timeout tests run on tokio's paused clock: the runtime jumps to
//! the next timer whenever everything waits, so the stalled client waits
//! the full timeout in no real time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tickserve_server::grpc::pb;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tickserve_server::{Limits, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

fn with_limits(limits: Limits) -> ServerConfig {
    ServerConfig {
        limits,
        ..config(root().join("models"))
    }
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Starts a server with `limits`, sends it `parts` on one connection and
/// stops there: the server, everything it sent until it closed the
/// connection, and how long that took.
async fn stall(limits: Limits, parts: &[&[u8]]) -> (TestServer, String, Duration) {
    let server = start(with_limits(limits)).await;
    let mut stream = TcpStream::connect(server.http).await.unwrap();
    for part in parts {
        stream.write_all(part).await.unwrap();
    }
    let started = tokio::time::Instant::now();
    let answer = read_to_close(&mut stream).await;
    (server, answer, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_gets_408() {
    let limits = Limits {
        body_read_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    // Headers promise 10 000 bytes; a tenth arrives, then nothing.
    let head = "POST /v2/models/cnn_lstm/infer HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ncontent-length: 10000\r\n\r\n";
    let (server, answer, waited) = stall(limits, &[head.as_bytes(), &[b' '; 1000]]).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a stalled body was answered: {answer}"
    );
    assert!(answer.contains("--body-read-timeout"), "{answer}");
    // The paused clock moved by the timeout, no less.
    assert!(waited >= Duration::from_secs(30));
    // A client that sends its whole body is still answered.
    let golden = golden();
    let response = server.infer(&request_for(&golden, &[2], "whole")).await;
    assert_eq!(response.status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn headers_that_stall_close_the_connection() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let head = b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n";
    let (server, answer, waited) = stall(limits, &[head]).await;
    assert!(
        !answer.contains("200 OK"),
        "answered unfinished headers: {answer}"
    );
    assert!(waited >= Duration::from_secs(10));
    server.shutdown().await.unwrap();
}

/// Sends one keep-alive request on `stream` and returns the answer's
/// head and body (the answers here are small and have Content-Length).
async fn get_on(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_with_a_clear_error() {
    const CAP: usize = 3;
    let server = start(with_limits(Limits {
        max_connections: CAP,
        ..Limits::default()
    }))
    .await;
    // The test client's kept-alive readiness connection may hold a place;
    // open connections until one is refused.
    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() <= CAP, "more than {CAP} connections were served");
        let mut stream = TcpStream::connect(server.http).await.unwrap();
        let answer = get_on(&mut stream, "/v2/health/live").await;
        if answer.starts_with("HTTP/1.1 503") {
            break answer;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        open.push(stream);
    };
    assert!(
        open.len() >= CAP - 1,
        "refused at {} connections",
        open.len()
    );
    assert!(refused.contains("--max-connections"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("connection: close"));
    assert!(
        server
            .metrics_text()
            .await
            .contains("tickserve_connections_refused_total{listener=\"http\"}")
    );
    // Closing one frees its place.
    drop(open.pop());
    let mut answered = false;
    for _ in 0..100 {
        let mut stream = TcpStream::connect(server.http).await.unwrap();
        if get_on(&mut stream, "/v2/health/live")
            .await
            .starts_with("HTTP/1.1 200")
        {
            answered = true;
            break;
        }
        // The server notices the close a moment later.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered, "a freed place was not reused");

    // gRPC: past the cap the calls of the connection fail UNAVAILABLE,
    // naming the limit; within it calls are answered.
    let mut clients = Vec::new();
    for _ in 0..CAP {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
            .await
            .unwrap();
        client.server_live(pb::ServerLiveRequest {}).await.unwrap();
        clients.push(client);
    }
    let mut extra = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let refused = extra
        .server_live(pb::ServerLiveRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("--max-connections"),
        "{refused:?}"
    );
    assert!(
        server
            .metrics_text()
            .await
            .contains("tickserve_connections_refused_total{listener=\"grpc\"}")
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn grpc_messages_past_the_limit_are_refused() {
    let server = start(with_limits(Limits {
        grpc_max_message_bytes: 4096,
        ..Limits::default()
    }))
    .await;
    let golden = golden();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let request = grpc_request("", 1, golden.input[..ROW].to_vec(), true);
    let refused = client.model_infer(request).await.unwrap_err();
    // tonic's code for a message over the decoding limit.
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("4096"), "{}", refused.message());
    server.shutdown().await.unwrap();
}
