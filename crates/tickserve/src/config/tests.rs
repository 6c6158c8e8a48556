use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct Wrapper {
    #[command(flatten)]
    args: ServeArgs,
}

fn parse(argv: &[&str]) -> ServeArgs {
    Wrapper::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
        .unwrap()
        .args
}

/// A fresh `tickserve.toml` holding `text`.
fn config_file(prefix: &str, text: &str) -> PathBuf {
    let file = tickserve_test_support::fresh_dir(prefix).join("tickserve.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn defaults_apply_when_nothing_is_given() {
    let settings = parse(&[]).resolve().unwrap();
    assert_eq!(settings.server.model_repository, PathBuf::from("models"));
    assert_eq!(settings.server.http_addr.to_string(), "127.0.0.1:8000");
    assert_eq!(settings.server.grpc_addr.to_string(), "127.0.0.1:8001");
    assert_eq!(settings.server.metrics_addr.to_string(), "127.0.0.1:8002");
    assert_eq!(settings.server.drain_timeout, Duration::from_secs(30));
    assert_eq!(settings.log_format, LogFormat::Text);
    assert_eq!(settings.log_level, "info");
    assert!(settings.server.cache.enabled);
    assert_eq!(settings.server.cache.capacity, Some(10_000));
    assert_eq!(settings.server.cache.max_bytes, None);
    assert_eq!(settings.server.cache.ttl, Duration::from_secs(600));
    assert!(
        settings.server.cache.redis.is_none(),
        "Redis is off by default"
    );
    assert!(settings.server.admin_token.is_none());
    assert!(settings.otlp.is_none(), "trace export is off by default");
    assert_eq!(settings.realtime_priority, None, "SCHED_FIFO is opt-in");
    assert_eq!(settings.request_slice, Duration::from_micros(100));
    assert_eq!(settings.server.decode, DecodeConfig::default());
    assert_eq!(settings.server.decode.nice, 10);
    assert_eq!(settings.server.realtime_http_addr, None);
    assert_eq!(settings.server.realtime_grpc_addr, None);
}

#[test]
fn the_realtime_listeners_come_from_flags_or_the_file() {
    let file = config_file(
        "tickserve-cfg-rt",
        "realtime_http_addr = \"127.0.0.1:8003\"\nrealtime_grpc_addr = \"127.0.0.1:8004\"\n",
    );
    let addr = |text: &str| Some(text.parse::<std::net::SocketAddr>().unwrap());
    let settings = parse(&["--config", file.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(settings.server.realtime_http_addr, addr("127.0.0.1:8003"));
    assert_eq!(settings.server.realtime_grpc_addr, addr("127.0.0.1:8004"));
    let flag = parse(&[
        "--config",
        file.to_str().unwrap(),
        "--realtime-http-addr",
        "[::1]:9003",
    ])
    .resolve()
    .unwrap();
    assert_eq!(flag.server.realtime_http_addr, addr("[::1]:9003"));
    assert!(Wrapper::try_parse_from(["serve", "--realtime-grpc-addr", "nowhere"]).is_err());
}

#[test]
fn the_realtime_priority_is_read_and_bounded() {
    let settings = parse(&["--realtime-priority", "10"]).resolve().unwrap();
    assert_eq!(settings.realtime_priority, Some(10));
    for bad in ["0", "100"] {
        let refused = Wrapper::try_parse_from(["serve", "--realtime-priority", bad]);
        assert!(refused.is_err(), "--realtime-priority {bad} was accepted");
    }
}

#[test]
fn the_request_slice_is_read_and_bounded() {
    let settings = parse(&["--request-slice", "250us"]).resolve().unwrap();
    assert_eq!(settings.request_slice, Duration::from_micros(250));
    let off = parse(&["--request-slice", "0s"]).resolve().unwrap();
    assert_eq!(off.request_slice, Duration::ZERO);
    for bad in ["50us", "101ms"] {
        let error = parse(&["--request-slice", bad]).resolve().unwrap_err();
        assert!(
            error.to_string().contains("request_slice"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn background_decoding_is_configured_and_its_niceness_bounded() {
    let settings = parse(&[
        "--background-decode-threads",
        "0",
        "--background-decode-nice",
        "-5",
    ])
    .resolve()
    .unwrap();
    assert_eq!(
        settings.server.decode,
        DecodeConfig {
            threads: 0,
            nice: -5
        }
    );
    let error = parse(&["--background-decode-nice", "20"])
        .resolve()
        .unwrap_err();
    assert!(
        error.to_string().contains("background_decode_nice"),
        "{error}"
    );
}

#[test]
fn redis_settings_merge_and_secrets_stay_out_of_debug_output() {
    let settings = parse(&[
        "--redis-url",
        "redis://:hunter2@127.0.0.1:6390",
        "--redis-timeout",
        "20ms",
        "--admin-token",
        "s3cret",
    ])
    .resolve()
    .unwrap();
    let redis = settings.server.cache.redis.clone().unwrap();
    assert_eq!(redis.db, 1);
    assert_eq!(redis.key_prefix, "tickserve:");
    assert_eq!(redis.timeout, Duration::from_millis(20));
    let shown = format!("{settings:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
}

#[test]
fn model_control_flags_resolve_and_load_model_needs_explicit_mode() {
    let control = parse(&[]).resolve().unwrap().server.model_control;
    assert_eq!(control.mode, ControlMode::None);
    assert_eq!(control.poll_interval, Duration::from_secs(5));
    let control = parse(&[
        "--model-control-mode",
        "explicit",
        "--load-model",
        "a",
        "--load-model",
        "b",
    ])
    .resolve()
    .unwrap()
    .server
    .model_control;
    assert_eq!(control.mode, ControlMode::Explicit);
    assert_eq!(control.load_models, vec!["a", "b"]);
    let control = parse(&[
        "--model-control-mode",
        "poll",
        "--repository-poll-interval",
        "250ms",
    ])
    .resolve()
    .unwrap()
    .server
    .model_control;
    assert_eq!(control.mode, ControlMode::Poll);
    assert_eq!(control.poll_interval, Duration::from_millis(250));
    let err = parse(&["--load-model", "a"]).resolve().unwrap_err();
    assert!(err.to_string().contains("explicit"), "{err}");
}

#[test]
fn a_byte_limit_alone_lifts_the_row_limit_and_both_can_be_set() {
    let cache = parse(&["--cache-max-bytes", "1000000"])
        .resolve()
        .unwrap()
        .server
        .cache;
    assert_eq!((cache.capacity, cache.max_bytes), (None, Some(1_000_000)));
    let cache = parse(&["--cache-max-bytes", "1000000", "--cache-capacity", "50"])
        .resolve()
        .unwrap()
        .server
        .cache;
    assert_eq!(
        (cache.capacity, cache.max_bytes),
        (Some(50), Some(1_000_000))
    );
    assert!(parse(&["--cache-max-bytes", "0"]).resolve().is_err());
}

#[test]
fn redis_tls_files_are_read_and_need_rediss() {
    let dir = tickserve_test_support::fresh_dir("tickserve-cfg-tls");
    for name in ["ca.pem", "client.pem", "client.key"] {
        std::fs::write(dir.join(name), format!("PEM of {name}")).unwrap();
    }
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let settings = parse(&[
        "--redis-url",
        "rediss://:pw@cache.internal:6380",
        "--redis-ca-cert",
        &path("ca.pem"),
        "--redis-client-cert",
        &path("client.pem"),
        "--redis-client-key",
        &path("client.key"),
    ])
    .resolve()
    .unwrap();
    let tls = settings.server.cache.redis.clone().unwrap().tls;
    assert_eq!(tls.ca_pem.as_deref(), Some(&b"PEM of ca.pem"[..]));
    let client = tls.client.unwrap();
    assert_eq!(client.key_pem, b"PEM of client.key");
    assert!(!format!("{settings:?}").contains("PEM of client.key"));

    let err = parse(&[
        "--redis-url",
        "redis://h:6379",
        "--redis-ca-cert",
        &path("ca.pem"),
    ])
    .resolve()
    .unwrap_err();
    assert!(format!("{err:#}").contains("rediss://"), "{err:#}");
    let err = parse(&[
        "--redis-url",
        "rediss://h:6380",
        "--redis-client-cert",
        &path("client.pem"),
    ])
    .resolve()
    .unwrap_err();
    assert!(format!("{err:#}").contains("go together"), "{err:#}");
    let err = parse(&[
        "--redis-url",
        "rediss://h:6380",
        "--redis-ca-cert",
        &path("missing"),
    ])
    .resolve()
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("Redis CA certificate"),
        "{err:#}"
    );
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() {
    let file = config_file(
        "tickserve-cfg",
        "http_addr = \"127.0.0.1:9000\"\ndrain_timeout = \"2s\"\nshutdown_delay = \"3s\"\nlog_format = \"json\"\n",
    );
    let settings = parse(&[
        "--config",
        file.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:9100",
    ])
    .resolve()
    .unwrap();
    assert_eq!(settings.server.http_addr.to_string(), "127.0.0.1:9100");
    assert_eq!(settings.server.drain_timeout, Duration::from_secs(2));
    assert_eq!(settings.server.shutdown_delay, Duration::from_secs(3));
    assert_eq!(settings.log_format, LogFormat::Json);
}

/// The literal block `tickserve.toml: |` of a ConfigMap manifest.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "tickserve.toml: |")
        .skip(1)
        .peekable();
    let indent = lines.peek().map_or(0, |l| l.len() - l.trim_start().len());
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_config_is_valid_and_reaches_redis() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/base");
    let configmap = std::fs::read_to_string(base.join("configmap.yaml")).unwrap();
    let deployment = std::fs::read_to_string(base.join("deployment.yaml")).unwrap();
    let toml = configmap_toml(&configmap);
    assert!(toml.contains("model_repository"), "{toml}");
    let file = config_file("tickserve-cfg-k8s", &toml);

    // The Deployment sets the variables clap reads: the config file's
    // path and the Redis URL it builds from the Secret.
    let command = <Wrapper as clap::CommandFactory>::command();
    let env_of = |id: &str| {
        command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str())
            .unwrap()
            .to_owned()
    };
    for variable in [env_of("config"), env_of("redis_url")] {
        assert!(
            deployment.contains(&format!("- name: {variable}\n")),
            "deployment.yaml does not set {variable}"
        );
    }
    assert!(
        deployment.contains("value: redis://:$(REDIS_PASSWORD)@redis:6379"),
        "the Redis URL must name the Service of redis.yaml"
    );

    let settings = parse(&[
        "--config",
        file.to_str().unwrap(),
        "--redis-url",
        "redis://:change-me@redis:6379",
    ])
    .resolve()
    .unwrap();
    assert_eq!(settings.server.http_addr.to_string(), "0.0.0.0:8000");
    assert_eq!(settings.server.drain_timeout, Duration::from_secs(25));
    assert!(settings.server.cache.enabled);
    let redis = settings.server.cache.redis.clone().unwrap();
    assert_eq!(redis.db, 1);
    assert_eq!(redis.key_prefix, "tickserve:");
    assert_eq!(redis.timeout, Duration::from_millis(5));
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    let file = config_file("tickserve-cfg-bad", "http_adr = \"127.0.0.1:9000\"\n");
    let err = parse(&["--config", file.to_str().unwrap()])
        .resolve()
        .unwrap_err();
    assert!(format!("{err:#}").contains("http_adr"), "{err:#}");
}
