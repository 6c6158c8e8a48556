//! `tickserve serve` settings of the OTLP trace export (docs/operations.md,
//! "Tracing"): their flags and environment variables, and how they merge
//! with the TOML file's keys of the same names into the telemetry crate's
//! [`OtlpConfig`]. Off unless an endpoint is given.

use clap::Args;
use tickserve_telemetry::traces::OtlpConfig;

#[derive(Debug, Default, Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector that request traces are exported to, e.g.
    /// "http://127.0.0.1:4317" (Jaeger, the OpenTelemetry Collector);
    /// plain http only. Unset: no export (answers still carry
    /// `traceparent` and `x-request-id`). [default: unset]
    #[arg(long, env = "TICKSERVE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans. [default: tickserve]
    #[arg(long, env = "TICKSERVE_OTLP_SERVICE_NAME", value_name = "NAME")]
    pub otlp_service_name: Option<String>,

    /// Fraction of new traces exported, from 0 to 1; a request with a
    /// `traceparent` follows its caller's sampled flag instead.
    /// [default: 1]
    #[arg(long, env = "TICKSERVE_OTLP_SAMPLE_RATIO", value_name = "RATIO")]
    pub otlp_sample_ratio: Option<f64>,
}

/// The TOML file's keys of the trace export.
#[derive(Debug, Default)]
pub struct TraceFile {
    pub otlp_endpoint: Option<String>,
    pub otlp_service_name: Option<String>,
    pub otlp_sample_ratio: Option<f64>,
}

impl TraceArgs {
    /// The export's settings, or `None` when no endpoint is set.
    pub fn resolve(self, file: TraceFile) -> anyhow::Result<Option<OtlpConfig>> {
        let service_name = self.otlp_service_name.or(file.otlp_service_name);
        let sample_ratio = self.otlp_sample_ratio.or(file.otlp_sample_ratio);
        let Some(endpoint) = self.otlp_endpoint.or(file.otlp_endpoint) else {
            anyhow::ensure!(
                service_name.is_none() && sample_ratio.is_none(),
                "otlp_service_name and otlp_sample_ratio need otlp_endpoint"
            );
            return Ok(None);
        };
        anyhow::ensure!(
            endpoint.starts_with("http://"),
            "otlp_endpoint must be an http:// URL (OTLP over gRPC, no TLS), not {endpoint}"
        );
        let mut config = OtlpConfig::new(endpoint);
        if let Some(name) = service_name {
            anyhow::ensure!(!name.is_empty(), "otlp_service_name must not be empty");
            config.service_name = name;
        }
        if let Some(ratio) = sample_ratio {
            anyhow::ensure!(
                (0.0..=1.0).contains(&ratio),
                "otlp_sample_ratio must be from 0 to 1, not {ratio}"
            );
            config.sample_ratio = ratio;
        }
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_off_by_default_and_flags_override_the_file() {
        assert_eq!(
            TraceArgs::default().resolve(TraceFile::default()).unwrap(),
            None
        );
        let file = TraceFile {
            otlp_endpoint: Some("http://collector:4317".into()),
            otlp_service_name: Some("pricing".into()),
            otlp_sample_ratio: Some(0.5),
        };
        let config = TraceArgs::default().resolve(file).unwrap().unwrap();
        assert_eq!(config.endpoint, "http://collector:4317");
        assert_eq!(config.service_name, "pricing");
        assert_eq!(config.sample_ratio, 0.5);

        let args = TraceArgs {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            ..TraceArgs::default()
        };
        let file = TraceFile {
            otlp_endpoint: Some("http://collector:4317".into()),
            ..TraceFile::default()
        };
        let config = args.resolve(file).unwrap().unwrap();
        assert_eq!(config, OtlpConfig::new("http://127.0.0.1:4317"));
        assert_eq!(config.service_name, "tickserve");
        assert_eq!(config.sample_ratio, 1.0);
    }

    #[test]
    fn bad_settings_are_refused() {
        let with = |endpoint: &str, ratio: Option<f64>| TraceArgs {
            otlp_endpoint: Some(endpoint.into()),
            otlp_sample_ratio: ratio,
            ..TraceArgs::default()
        };
        for args in [
            with("127.0.0.1:4317", None),
            with("https://collector:4317", None),
            with("http://collector:4317", Some(1.5)),
            with("http://collector:4317", Some(-0.1)),
            TraceArgs {
                otlp_sample_ratio: Some(0.1),
                ..TraceArgs::default()
            },
        ] {
            assert!(args.resolve(TraceFile::default()).is_err());
        }
    }
}
