//! `tickserve bench`: a load generator for any Open Inference Protocol
//! server that speaks in SLA terms.
//!
//! Data flows one way: [`workload`] builds request bodies; [`run`] sends
//! them in closed loop (C clients) or open loop (a schedule, latency from
//! the intended send time); every answer becomes a [`stats::Sample`] in a
//! [`stats::Recorder`] (HDR histograms per priority class); the summary
//! ([`stats::RunStats`]) is judged by [`sla::evaluate`] and rendered by
//! [`report`] as text, JSON and HTML. [`cli`] holds the clap options and
//! the drivers of the seven modes (latency, load, rate, stress, compare,
//! mixed, streams); [`mixed`] runs a foreground class against a background
//! flood; [`streams`] compares whole windows with stream ticks.

pub mod cli;
pub mod mixed;
pub mod report;
pub mod run;
pub mod sla;
pub mod stats;
pub mod streams;
pub mod workload;

/// The gRPC client generated from proto/grpc_service.proto.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// Why a bench run could not be carried out (as opposed to "it ran and
/// the SLA was missed", which is a result).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad options, unreadable input or SLA file, unwritable report.
    #[error("{0}")]
    Config(String),
}
