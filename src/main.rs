//! The `capd-inplace` command line: `serve` runs the Runtime Extension; `upgrade`, `stage` and
//! `status` work on a CAPD or kind cluster directly; `version` prints the version.
//! Startup only: install the rustls crypto provider, parse the arguments, start logging, dispatch.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use capd_inplace::artifacts::{
    ArtifactCaches, ArtifactSource, CacheServer, DEFAULT_ARTIFACT_URL, FetchConfig,
};
use capd_inplace::hooks::router::AppState;
use capd_inplace::hooks::server::{self, ServeConfig};
use capd_inplace::hooks::update_machine::EngineHandler;
use capd_inplace::node::Docker;
use capd_inplace::telemetry::metrics::{Metrics, metrics_router};
use capd_inplace::telemetry::{self, EventSink, LogFormat};
use capd_inplace::upgrade::{Engine, Options, Source, Timeouts, cluster};
use capd_inplace::version::KubeVersion;

/// mimalloc, not glibc's malloc: a 30 KB CanUpdateMachine request makes hundreds of short-lived
/// allocations on whichever worker thread serves it. Counted with callgrind, glibc's malloc and
/// free took about 17% of the extension's instructions per request, mimalloc about 3%
/// (docs/benchmarks.md, "Where the time goes"). Without transparent huge pages (`no_thp`):
/// with them, each touched 2 MiB stays resident, and the peak at 20 upgrades at once went from
/// about 50 to 82 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Upgrade every node of a CAPD or kind cluster in place: control planes one at a time, then workers.
    Upgrade(UpgradeArgs),
    /// Place a version's binaries in every node ahead of an upgrade, changing nothing that runs.
    Stage(StageArgs),
    /// Show each node's versions, state and upgrade progress.
    Status(StatusArgs),
    /// Print the version.
    Version,
}

/// Where binaries come from, shared by `serve` and `upgrade`.
#[derive(Debug, Args)]
struct ArtifactArgs {
    /// Base URL laid out like https://dl.k8s.io/release (https, http or file://).
    #[arg(long, env = "CAPD_INPLACE_ARTIFACT_URL", default_value = DEFAULT_ARTIFACT_URL)]
    artifact_url: String,

    /// Directory of the verified binary cache.
    #[arg(long, env = "CAPD_INPLACE_ARTIFACT_CACHE_DIR")]
    artifact_cache_dir: Option<PathBuf>,
}

impl ArtifactArgs {
    async fn open(&self, default_dir: PathBuf) -> anyhow::Result<ArtifactCaches> {
        let source = ArtifactSource::parse(&self.artifact_url)?;
        let dir = self.artifact_cache_dir.clone().unwrap_or(default_dir);
        Ok(ArtifactCaches::open(dir, source, FetchConfig::default()).await?)
    }
}

#[derive(Debug, Args)]
struct UpgradeArgs {
    /// The cluster: the value of the io.x-k8s.kind.cluster label on its node containers.
    #[arg(long)]
    cluster: String,

    /// Target Kubernetes version, vMAJOR.MINOR.PATCH.
    #[arg(long)]
    to: String,

    /// How many workers to upgrade at once (after every control-plane node).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers_parallel: u64,

    /// Run the preflight checks and show the plan; change nothing.
    #[arg(long)]
    dry_run: bool,

    /// Do not cordon and drain nodes before replacing their kubelet.
    #[arg(long)]
    no_drain: bool,

    /// Seconds `kubectl drain` may take (1 to 7200, as the drainTimeout setting).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=7200))]
    drain_timeout_seconds: u64,

    #[command(flatten)]
    delivery: DeliveryArgs,

    /// Minor versions a worker may cross in one upgrade (1 to 3).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3))]
    worker_max_minor_skew: u64,

    #[command(flatten)]
    artifacts: ArtifactArgs,

    /// Result format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    output: cli::Output,
}

/// How the binaries reach the nodes; by default the verified cache is uploaded through the
/// Docker Engine.
#[derive(Debug, Args)]
struct DeliveryArgs {
    /// Nodes download the binaries themselves with curl from --artifact-url (which they must reach).
    #[arg(long, conflicts_with = "serve_cache")]
    fetch_in_node: bool,

    /// Nodes download the binaries with curl from this process, which serves its verified cache
    /// over HTTP at the gateway of their Docker network; faster than an upload through the
    /// Docker Engine. Each node still checks every file's sha256.
    #[arg(long)]
    serve_cache: bool,

    /// Where --serve-cache listens, IP:PORT, instead of the nodes' gateway on a free port.
    #[arg(long, requires = "serve_cache")]
    cache_server_address: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct StageArgs {
    /// The cluster: the value of the io.x-k8s.kind.cluster label on its node containers.
    #[arg(long)]
    cluster: String,

    /// Kubernetes version to stage, vMAJOR.MINOR.PATCH.
    #[arg(long)]
    to: String,

    /// How many nodes to stage at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=64))]
    parallel: u64,

    #[command(flatten)]
    delivery: DeliveryArgs,

    #[command(flatten)]
    artifacts: ArtifactArgs,

    /// Result format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    output: cli::Output,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The cluster: the value of the io.x-k8s.kind.cluster label on its node containers.
    #[arg(long)]
    cluster: String,

    #[arg(long, value_enum, default_value = "text")]
    output: cli::Output,
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

    /// Address of the plain-HTTP /metrics server (Prometheus); 0 disables it.
    #[arg(
        long,
        env = "CAPD_INPLACE_METRICS_BIND_ADDRESS",
        default_value = ":8080"
    )]
    metrics_bind_address: String,

    /// Node upgrades run at once; more wait in a queue.
    #[arg(long, env = "CAPD_INPLACE_MAX_CONCURRENT_UPGRADES", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_concurrent_upgrades: u64,

    /// Serve the verified artifact cache over plain HTTP on this IP:PORT, for requests whose
    /// serveCache setting is "true": an address of the extension that the nodes reach.
    #[arg(long, env = "CAPD_INPLACE_CACHE_SERVER_ADDRESS")]
    cache_server_address: Option<SocketAddr>,

    #[command(flatten)]
    artifacts: ArtifactArgs,

    /// Seconds in-flight calls and upgrade steps may take after SIGTERM.
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
            telemetry::init(cli.log_format, telemetry::SERVER_FILTER)?;
            runtime()?.block_on(serve(args))
        }
        Command::Upgrade(args) => {
            telemetry::init(cli.log_format, telemetry::CLI_FILTER)?;
            runtime()?.block_on(upgrade(args))
        }
        Command::Stage(args) => {
            telemetry::init(cli.log_format, telemetry::CLI_FILTER)?;
            runtime()?.block_on(stage(args))
        }
        Command::Status(args) => {
            telemetry::init(cli.log_format, telemetry::CLI_FILTER)?;
            runtime()?.block_on(status(args))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

/// The CLI's cache lives with the user's other caches, apart from a server's.
fn user_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("capd-inplace")
}

/// Where the CLI's binaries come from: the nodes themselves, or the user's verified cache,
/// uploaded or served.
async fn cli_source(
    artifacts: &ArtifactArgs,
    delivery: &DeliveryArgs,
    docker: &Docker,
    cluster: &str,
) -> anyhow::Result<Source> {
    if delivery.fetch_in_node {
        // Checked as for every other source: the nodes' curl gets it, and errors and the journal
        // quote it.
        let source = ArtifactSource::parse(&artifacts.artifact_url)?;
        anyhow::ensure!(
            !source.is_local(),
            "--fetch-in-node needs an http(s) --artifact-url the nodes can reach, not file://"
        );
        return Ok(Source::FetchInNode {
            base_url: source.as_str().to_string(),
        });
    }
    let cache = artifacts.open(user_cache_dir()).await?.get(None).await?;
    if !delivery.serve_cache {
        return Ok(Source::Upload(cache));
    }
    let address = match delivery.cache_server_address {
        Some(address) => address,
        None => {
            let nodes = docker.cluster_nodes(cluster).await?;
            let node = nodes
                .first()
                .with_context(|| format!("cluster {cluster} has no node containers"))?;
            let gateway = node.network_gateway().await.context(
                "--serve-cache: pass --cache-server-address with an IP:PORT of this host that \
                 the nodes reach",
            )?;
            SocketAddr::new(gateway, 0)
        }
    };
    let server = CacheServer::bind(address).await.context(
        "--serve-cache: pass --cache-server-address with an IP:PORT of this host that the nodes \
         reach, or leave out --serve-cache to upload",
    )?;
    Ok(Source::Serve { cache, server })
}

/// Fails the command when any node did not get where it was asked to go.
fn exit_status(results: &[cluster::NodeResult], goal: &str) -> anyhow::Result<()> {
    let failed = results
        .iter()
        .filter(|r| r.outcome.is_failure() || matches!(r.outcome, cluster::NodeOutcome::Skipped))
        .count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} nodes did not {goal}; run the same command again to resume",
            results.len()
        );
    }
    Ok(())
}

async fn stage(args: StageArgs) -> anyhow::Result<()> {
    let version =
        KubeVersion::parse(&args.to).context("--to must be a vMAJOR.MINOR.PATCH version")?;
    let docker = Docker::connect().await?;
    let source = cli_source(&args.artifacts, &args.delivery, &docker, &args.cluster).await?;
    let options = Options::new(source);
    let engine = Engine::new(docker, Timeouts::default());
    let results = cluster::stage(
        &engine,
        &args.cluster,
        version,
        &options,
        usize::try_from(args.parallel).unwrap_or(1),
        cli::progress_reporter(),
    )
    .await?;
    cli::print_results(&results, args.output)?;
    exit_status(&results, &format!("stage {version}"))
}

async fn upgrade(args: UpgradeArgs) -> anyhow::Result<()> {
    let version =
        KubeVersion::parse(&args.to).context("--to must be a vMAJOR.MINOR.PATCH version")?;
    let docker = Docker::connect().await?;
    let source = cli_source(&args.artifacts, &args.delivery, &docker, &args.cluster).await?;
    let mut options = Options::new(source);
    options.drain = !args.no_drain;
    options.drain_timeout = Duration::from_secs(args.drain_timeout_seconds);
    options.policy.worker_max_minor_step = args.worker_max_minor_skew;
    let engine = Engine::new(docker, Timeouts::default());
    let results = cluster::upgrade(
        &engine,
        &args.cluster,
        version,
        &options,
        usize::try_from(args.workers_parallel).unwrap_or(1),
        args.dry_run,
        cli::progress_reporter(),
    )
    .await?;
    cli::print_results(&results, args.output)?;
    exit_status(&results, &format!("reach {version}"))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let reports = cluster::status(&Docker::connect().await?, &args.cluster).await?;
    cli::print_status(&reports, args.output)
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
        idle_timeout: server::IDLE_TIMEOUT,
    };
    let grace = config.shutdown_grace;
    let metrics = Metrics::new();
    let caches = args
        .artifacts
        .open(PathBuf::from("/var/cache/capd-inplace"))
        .await?;
    let engine = Engine::new(Docker::connect().await?, Timeouts::default());
    let cache_server = match args.cache_server_address {
        Some(address) => Some(CacheServer::bind(address).await?),
        None => None,
    };
    let handler = Arc::new(EngineHandler::new(
        engine,
        caches,
        cache_server,
        metrics.clone(),
        EventSink::from_environment(),
        usize::try_from(args.max_concurrent_upgrades).unwrap_or(10),
    ));
    let metrics_server = match server::parse_optional_bind_address(&args.metrics_bind_address)? {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for /metrics on {address}"))?;
            tracing::info!(%address, "serving /metrics");
            let metrics_for_server = metrics.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, metrics_router(metrics_for_server)).await
            }))
        }
        None => None,
    };
    let state = AppState::new(handler.clone(), metrics.clone());
    let running = server::start(config, state).await?;
    running.run_until(server::shutdown_signal()).await?;
    // Upgrades run in the background; give running steps the grace period, then stop. Whatever
    // is cut short resumes from the node's journal on the next UpdateMachine call.
    let deadline = tokio::time::Instant::now() + grace;
    while handler.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    Ok(())
}
