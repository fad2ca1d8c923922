//! The `capd-inplace` command line: `serve` runs the Runtime Extension, `version` prints the version.
//! Startup only: install the rustls crypto provider, parse the arguments, start logging, dispatch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use capd_inplace::hooks::router::AppState;
use capd_inplace::hooks::server::{self, ServeConfig};
use capd_inplace::hooks::update_machine::NotImplemented;
use capd_inplace::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "capd-inplace",
    version,
    about = "In-place Kubernetes upgrades for Cluster API's Docker provider (CAPD)"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        env = "CAPD_INPLACE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Runtime Extension hooks over HTTPS.
    Serve(ServeArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the HTTPS hooks server: HOST:PORT, or :PORT for all interfaces.
    #[arg(long, env = "CAPD_INPLACE_BIND_ADDRESS", default_value = ":9443")]
    bind_address: String,

    /// Directory holding tls.crt and tls.key (re-read when they change).
    #[arg(
        long,
        env = "CAPD_INPLACE_CERT_DIR",
        default_value = "/tmp/k8s-webhook-server/serving-certs"
    )]
    cert_dir: PathBuf,

    /// Generate a dev CA and a localhost certificate into --cert-dir when none is there.
    #[arg(long, env = "CAPD_INPLACE_DEV_SELF_SIGNED")]
    dev_self_signed: bool,

    /// PEM file of CAs for client certificates; turns on mutual TLS.
    #[arg(long, env = "CAPD_INPLACE_CLIENT_CA")]
    client_ca: Option<PathBuf>,

    /// Path prefix before /hooks.runtime.cluster.x-k8s.io/... (ExtensionConfig service.path).
    #[arg(long, env = "CAPD_INPLACE_PATH_PREFIX", default_value = "")]
    path_prefix: String,

    /// Address of the plain-HTTP /healthz and /readyz server; 0 disables it.
    #[arg(
        long,
        env = "CAPD_INPLACE_HEALTH_PROBE_BIND_ADDRESS",
        default_value = ":8081"
    )]
    health_probe_bind_address: String,

    /// Seconds between certificate file checks.
    #[arg(long, env = "CAPD_INPLACE_CERT_RELOAD_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    cert_reload_seconds: u64,

    /// Seconds in-flight calls may take after SIGTERM.
    #[arg(long, env = "CAPD_INPLACE_SHUTDOWN_GRACE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=300))]
    shutdown_grace_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("another rustls crypto provider is already installed"))?;
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("capd-inplace {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Serve(args) => {
            telemetry::init(cli.log_format)?;
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.dev_self_signed {
        let dev = server::ensure_dev_certificate(&args.cert_dir)?;
        let verb = if dev.generated {
            "generated"
        } else {
            "reusing"
        };
        println!(
            "dev certificate ({verb}) for localhost and 127.0.0.1; CA: {}",
            dev.ca.display()
        );
    }
    let config = ServeConfig {
        bind_address: server::parse_bind_address(&args.bind_address)?,
        cert_dir: args.cert_dir,
        client_ca: args.client_ca,
        path_prefix: args.path_prefix,
        health_bind_address: server::parse_optional_bind_address(&args.health_probe_bind_address)?,
        reload_interval: Duration::from_secs(args.cert_reload_seconds),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
    };
    let state = AppState::new(Arc::new(NotImplemented));
    let running = server::start(config, state).await?;
    running.run_until(server::shutdown_signal()).await?;
    Ok(())
}
