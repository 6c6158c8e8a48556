//! The `tickserve` binary: one executable, one subcommand per job.
//!
//! `serve` runs the server; `bench` measures a server against an SLA
//! (crates/bench); `model prune` and `model optimize` are the offline model
//! tools (crates/model-tools). Settings come, in order of
//! precedence, from flags, `TICKSERVE_*` environment variables, the TOML
//! file given with `--config`, and the built-in defaults.

mod config;
mod security;
mod traces;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tickserve_scheduler::os_thread;

use crate::config::ServeArgs;

#[derive(Debug, Parser)]
#[command(name = "tickserve", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the bench options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the models of a model repository over the Open Inference
    /// Protocol (HTTP), with Prometheus metrics.
    Serve(ServeArgs),
    /// Measure an Open Inference Protocol server (tickserve, Triton,
    /// KServe) and judge it against an SLA: latency, load, rate, stress,
    /// compare. Exit code 0 when the SLA is met, 3 when not.
    Bench(tickserve_bench::cli::BenchArgs),
    /// Offline model tools: prune a model into a new version, compare
    /// precisions and pruning on a validation set (docs/optimization.md).
    Model(tickserve_model_tools::cli::ModelArgs),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Bench(args) => bench(args),
        Command::Model(args) => {
            tickserve_model_tools::cli::run(args)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn bench(args: tickserve_bench::cli::BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tickserve-bench")
        .build()
        .context("cannot start the async runtime")?;
    let finished = runtime.block_on(tickserve_bench::cli::run(args))?;
    Ok(std::process::ExitCode::from(finished.exit_code))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.resolve()?;
    if let Some(priority) = settings.realtime_priority {
        os_thread::set_realtime_priority(priority);
    }
    os_thread::set_request_slice(settings.request_slice);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tickserve-io")
        // Worker and blocking threads alike: blocking work returns itself
        // to the normal policy and slice (os_thread::leave_request_path).
        .on_thread_start(|| os_thread::enter_request_path("runtime"))
        .build()
        .context("cannot start the async runtime")?;
    // The OTLP exporter's gRPC connection lives on the runtime.
    let traces = {
        let _runtime = runtime.enter();
        tickserve_telemetry::traces::init_logging_and_traces(
            settings.log_format,
            &settings.log_level,
            settings.otlp.as_ref(),
        )
        .context("cannot set up logging")?
    };
    tracing::info!(
        ?settings,
        "starting tickserve {}",
        env!("CARGO_PKG_VERSION")
    );
    runtime.block_on(async move {
        let server = tickserve_server::BoundServer::bind(settings.server).await?;
        tracing::info!(http = %server.http_addr(), grpc = %server.grpc_addr(), metrics = %server.metrics_addr(), realtime_http = %shown(server.realtime_http_addr()), realtime_grpc = %shown(server.realtime_grpc_addr()), "listening");
        reload_tokens_on_sighup(server.auth_handle());
        let served = server.serve(shutdown_signal()).await;
        if let Some(traces) = traces {
            // The last spans, after the drain; blocking, so off the runtime
            // that the exporter sends on.
            let flushed = tokio::task::spawn_blocking(move || traces.shutdown())
                .await
                .map_err(|error| error.to_string())
                .and_then(|shutdown| shutdown);
            match flushed {
                Ok(()) => tracing::info!("trace export flushed"),
                Err(error) => tracing::warn!(%error, "trace export not flushed"),
            }
        }
        served?;
        anyhow::Ok(())
    })
}

/// Rereads the token file on every SIGHUP (docs/security.md); a failed
/// read keeps the tokens in force. Logs how many tokens are valid, never
/// the tokens.
fn reload_tokens_on_sighup(auth: tickserve_server::AuthHandle) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: tokens cannot be rotated");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match auth.reload() {
                Ok(tokens) if auth.enabled() => {
                    tracing::info!(tokens, "SIGHUP: bearer tokens reloaded");
                }
                Ok(_) => tracing::info!("SIGHUP: authentication is off, nothing to reload"),
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: tokens not reloaded, the old ones stay valid");
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = auth;
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

/// An optional listener's address for the logs: the address, or "off".
fn shown(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |addr| addr.to_string())
}
