//! Authentication and TLS against the real server: bearer tokens required
//! and refused over HTTP and gRPC, health and metrics open, TLS and mutual
//! TLS with certificates made by the test (rcgen), over both protocols.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tickserve_test_support::RequestExt;

use common::tls::TestPki;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tickserve_server::grpc::pb;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tickserve_server::{AuthConfig, BoundServer, ServerConfig, TlsConfig};
use tokio_rustls::rustls;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TOKEN: &str = "t0ken-for-tests";

fn infer_request() -> pb::ModelInferRequest {
    grpc_request("auth", 1, golden().input[..ROW].to_vec(), false)
}

/// The bundled repository behind token authentication ([`TOKEN`]).
async fn start_with_token() -> TestServer {
    start(ServerConfig {
        auth: Some(AuthConfig::Token(TOKEN.into())),
        ..config(root().join("models"))
    })
    .await
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn http_routes_need_the_token_and_health_and_metrics_do_not() {
    let server = start_with_token().await;
    let golden = golden();
    let body = request_for(&golden, &[0], "auth");
    let url = server.url("/v2/models/cnn_lstm/infer");

    let refused = server.client.post(&url).json(&body).sent().await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("Bearer"));

    let wrong = server
        .client
        .post(&url)
        .bearer_auth("t0ken-for-test")
        .json(&body)
        .sent()
        .await;
    assert_eq!(wrong.status(), 401);

    let answered = server
        .client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .sent()
        .await;
    assert_eq!(answered.status(), 200);
    assert_golden_rows(&golden, &answered.json().await.unwrap(), &[0]);

    // Repository, metadata and statistics are protected too.
    for (method, path) in [
        (reqwest::Method::POST, "/v2/repository/index"),
        (reqwest::Method::GET, "/v2/models/cnn_lstm"),
        (reqwest::Method::GET, "/v2/models/stats"),
        (reqwest::Method::GET, "/v2"),
        (reqwest::Method::GET, "/v2/cache/stats"),
    ] {
        let status = |token: Option<&str>| {
            let mut request = server.client.request(method.clone(), server.url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            async move { request.sent().await.status() }
        };
        assert_eq!(status(None).await, 401, "{path} without a token");
        assert_eq!(status(Some(TOKEN)).await, 200, "{path} with the token");
    }
    // Health checks and metrics stay open.
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/cnn_lstm/ready",
    ] {
        let status = server.client.get(server.url(path)).sent().await;
        assert_eq!(status.status(), 200, "{path}");
    }
    assert!(server.metrics_text().await.contains("tickserve_ready"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn grpc_calls_need_the_token_and_health_does_not() {
    let server = start_with_token().await;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let refused = client.model_infer(infer_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let wrong = client
        .model_infer(with_token(infer_request(), "nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let refused = client
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let answer = client
        .model_infer(with_token(infer_request(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outputs[0].shape, vec![1, 3]);

    let live = client
        .server_live(pb::ServerLiveRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(live.live);
    let ready = client
        .model_ready(pb::ModelReadyRequest {
            name: "cnn_lstm".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    server.shutdown().await.unwrap();
}

// --- TLS -------------------------------------------------------------

fn pki(name: &str) -> TestPki {
    TestPki::generate(
        &std::env::temp_dir().join(format!("tickserve-tls-{}-{name}", std::process::id())),
        "tickserve test CA",
    )
}

fn tls_config(pki: &TestPki, mutual: bool) -> TlsConfig {
    TlsConfig {
        cert_pem: pki.read("server.crt"),
        key_pem: pki.read("server.key"),
        client_ca_pem: mutual.then(|| pki.read("ca.crt")),
    }
}

fn client_tls(pki: &TestPki, identity: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pki.read("ca.crt")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = if identity {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&pki.read("client.crt")).unwrap()],
                PrivateKeyDer::from_pem_slice(&pki.read("client.key")).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTP/1.1 request over TLS; `Err` when the connection or the
/// handshake fails.
async fn https(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

struct TlsServer {
    http: SocketAddr,
    grpc: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tickserve_server::StartError>>,
}

/// Starts a TLS server and waits for readiness over HTTPS.
async fn start_tls(pki: &TestPki, mutual: bool) -> TlsServer {
    let server = BoundServer::bind(ServerConfig {
        tls: Some(tls_config(pki, mutual)),
        ..config(root().join("models"))
    })
    .await
    .unwrap();
    let (http, grpc) = (server.http_addr(), server.grpc_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let tls = client_tls(pki, true);
    for _ in 0..600 {
        if let Ok((200, _)) = https(http, tls.clone(), "GET", "/v2/health/ready", vec![]).await {
            return TlsServer {
                http,
                grpc,
                stop,
                task,
            };
        }
        assert!(!task.is_finished(), "server stopped before becoming ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("TLS server not ready after 6 s");
}

impl TlsServer {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn grpc_tls_client(
    server: &TlsServer,
    pki: &TestPki,
    identity: bool,
) -> Result<GrpcInferenceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.crt")))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.crt"),
            pki.read("client.key"),
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// A gRPC inference over TLS (with a client certificate when
/// `client_certificate`) is answered.
async fn assert_grpc_tls_answers(server: &TlsServer, pki: &TestPki, client_certificate: bool) {
    let mut client = grpc_tls_client(server, pki, client_certificate)
        .await
        .unwrap();
    let answer = client
        .model_infer(infer_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outputs[0].shape, vec![1, 3]);
}

#[tokio::test]
async fn tls_serves_http_and_grpc_and_refuses_plain_text() {
    let pki = pki("plain");
    let server = start_tls(&pki, false).await;
    let golden = golden();
    let body = serde_json::to_vec(&request_for(&golden, &[1], "tls")).unwrap();
    let (status, answer) = https(
        server.http,
        client_tls(&pki, false),
        "POST",
        "/v2/models/cnn_lstm/infer",
        body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_golden_rows(&golden, &serde_json::from_slice(&answer).unwrap(), &[1]);

    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/v2/health/live", server.http))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered on a TLS port");

    assert_grpc_tls_answers(&server, &pki, false).await;
    server.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = pki("mutual");
    let server = start_tls(&pki, true).await;
    let (status, _) = https(
        server.http,
        client_tls(&pki, true),
        "GET",
        "/v2/health/live",
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // Without a certificate the server ends the handshake: TLS 1.3
    // reports it at the first read, so the request fails.
    let refused = https(
        server.http,
        client_tls(&pki, false),
        "GET",
        "/v2/health/live",
        vec![],
    )
    .await;
    assert!(refused.is_err(), "answered without a client certificate");
    // A certificate from another CA is refused too.
    let other = self::pki("other");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::pem::PemObject::from_pem_slice(&pki.read("ca.crt")).unwrap())
        .unwrap();
    let mut foreign_identity = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![rustls::pki_types::pem::PemObject::from_pem_slice(&other.read("client.crt")).unwrap()],
        rustls::pki_types::pem::PemObject::from_pem_slice(&other.read("client.key")).unwrap(),
    )
    .unwrap();
    foreign_identity.alpn_protocols = vec![b"http/1.1".to_vec()];
    let refused = https(
        server.http,
        Arc::new(foreign_identity),
        "GET",
        "/v2/health/live",
        vec![],
    )
    .await;
    assert!(
        refused.is_err(),
        "answered a client certificate of another CA"
    );

    assert_grpc_tls_answers(&server, &pki, true).await;
    let without = match grpc_tls_client(&server, &pki, false).await {
        Err(_) => true,
        Ok(mut client) => client.model_infer(infer_request()).await.is_err(),
    };
    assert!(without, "gRPC answered without a client certificate");
    server.shutdown().await;
}
