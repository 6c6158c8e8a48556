//! The `tickserve` binary: one executable, one subcommand per job.
//!
//! `serve` runs the server; the benchmark (`bench`) and model tools
//! (`model`) arrive as further subcommands. Settings come, in order of
//! precedence, from flags, `TICKSERVE_*` environment variables, the TOML
//! file given with `--config`, and the built-in defaults.

mod config;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

#[derive(Debug, Parser)]
#[command(name = "tickserve", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the models of a model repository over the Open Inference
    /// Protocol (HTTP), with Prometheus metrics.
    Serve(ServeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.resolve()?;
    tickserve_telemetry::init_logging(settings.log_format, &settings.log_level)
        .map_err(anyhow::Error::msg)
        .context("cannot set up logging")?;
    tracing::info!(
        ?settings,
        "starting tickserve {}",
        env!("CARGO_PKG_VERSION")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tickserve-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = tickserve_server::BoundServer::bind(settings.server).await?;
        tracing::info!(http = %server.http_addr(), grpc = %server.grpc_addr(), metrics = %server.metrics_addr(), "listening");
        server.serve(shutdown_signal()).await?;
        anyhow::Ok(())
    })
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
