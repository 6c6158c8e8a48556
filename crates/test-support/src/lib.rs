//! What tickserve's tests, examples and benches share, so no test file
//! carries its own copy: the repository root, the PyTorch fixtures
//! (`fixtures/golden/*`, `.npy` files written by `tools/export_reference.py`),
//! model repositories built in a fresh temp folder, request bodies and the
//! golden check, and, with the `server` feature, a real server on
//! 127.0.0.1:0 and a real `redis-server` on a free loopback port.
//!
//! A dev-dependency only: it panics with a message on any setup failure,
//! which is what a test wants.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    missing_debug_implementations
)]

mod fixture;
#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "server")]
pub mod redis;
mod repo;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
pub mod tls;

pub use fixture::{
    Golden, ROW, argmax, assert_golden_rows, available_or_skip, bench_budget, error_of, golden,
    max_abs_diff, read_npy, request_for, root, sine_input,
};
#[cfg(feature = "otlp")]
pub use otlp::{OtlpReceiver, Received, hex, otlp_receiver, spans_of};
pub use repo::{
    CNN_LSTM_SIGNATURE, cnn_lstm_config, fresh_dir, repository_with, repository_with_two_versions,
    waiting_batches, with_version,
};
#[cfg(feature = "server")]
pub use server::{
    RequestExt, TestServer, config, grpc_request, msgpack_request, start, start_default,
    start_model, write_json_post,
};
