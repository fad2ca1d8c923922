//! `bench-scale`: the whole in-place upgrade of simulated clusters of one control plane and W
//! workers (W = 1, 5, 10, 20 by default), through the real `capd-inplace serve` process driven by
//! the CAPI-faithful driver: KCP first, then the MachineDeployment with `maxUnavailable = W`, so
//! every worker updates at once. The extension runs with `--max-concurrent-upgrades W` (its
//! default of 10 would queue the rest) and a warm artifact cache shared by every run.
//!
//! Reports per W the wall time of the whole upgrade and of the worker phase, the extension's peak
//! resident memory (`VmHWM`), and, at the largest W, the per-step durations from the extension's
//! `step finished` log lines. Wrapped by `scripts/bench-scale.sh`; prints a Markdown fragment on
//! stdout and progress on stderr. Clusters are removed on the way out, also after a failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capd_inplace_e2e::bench::{
    Args, CpuTicks, ExecCounter, Progress, StepTiming, Table, cpu_time, parse_args, peak_rss_kib,
    run_ok, secs, step_timings,
};
use capd_inplace_e2e::driver::{
    Change, Decision, Driver, ExtensionConfig, Pacing, RuntimeClient, Workload,
};
use capd_inplace_e2e::extension::{self, ExtensionProcess, ServeOptions};
use capd_inplace_e2e::sim::{SimCluster, Version};
use capd_inplace_e2e::sim_artifacts;

/// The aim for the extension's peak resident memory at the largest W.
const RSS_AIM_MB: f64 = 64.0;

/// One W's results.
struct Run {
    workers: usize,
    cluster_up: Duration,
    whole: Duration,
    control_plane: Duration,
    worker_phase: Duration,
    peak_rss_kib: u64,
    /// CPU time the extension used during the upgrade.
    extension_cpu: Duration,
    /// How busy the machine's CPUs were during the upgrade, in percent.
    host_busy: f64,
    /// Execs the Engine created during the upgrade, by container name.
    execs: BTreeMap<String, u64>,
    steps: Vec<StepTiming>,
}

fn cluster_name(workers: usize) -> String {
    format!("bench-scale-{workers}")
}

async fn upgrade_once(
    args: &Args,
    workers: usize,
    artifact_url: &str,
    cache: &Path,
    progress: &Progress,
) -> anyhow::Result<Run> {
    progress.say(format!("W={workers}: creating 1 + {workers} nodes"));
    let started = Instant::now();
    let cluster = SimCluster::up(&cluster_name(workers), 1, workers, &args.from).await?;
    let cluster_up = started.elapsed();
    progress.say(format!("W={workers}: cluster up in {}s", secs(cluster_up)));

    let extension = ExtensionProcess::start_with(
        artifact_url,
        ServeOptions {
            artifact_cache_dir: Some(cache.to_path_buf()),
            extra_args: vec!["--max-concurrent-upgrades".into(), workers.to_string()],
        },
    )
    .await?;
    let client = RuntimeClient::discover(ExtensionConfig::capd_inplace(
        vec![extension.url()],
        extension.ca_pem()?,
        [],
    ))
    .await?;
    let mut workload = Workload::from_sim(&cluster, &args.from);
    workload.max_unavailable = workers;
    let driver = Driver::new(client, workload, Pacing::default());
    let change = Change::upgrade(&args.to);

    let pid = extension.pid().context("the extension is not running")?;
    progress.say(format!("W={workers}: upgrading"));
    let counter = ExecCounter::start(&cluster).await?;
    let cpu_before = cpu_time(pid)?;
    let host_before = CpuTicks::now()?;
    let start = Instant::now();
    let cp = driver.upgrade_control_plane(&cluster, &change).await?;
    let control_plane = start.elapsed();
    let md = driver.upgrade_machine_deployment(&change).await?;
    let whole = start.elapsed();
    let extension_cpu = cpu_time(pid)? - cpu_before;
    let host_busy = CpuTicks::now()?.busy_percent_since(&host_before);
    let execs = counter.stop();
    let in_place = cp
        .iter()
        .chain(&md)
        .filter(|d| matches!(d, Decision::InPlace { .. }))
        .count();
    if in_place != 1 + workers {
        bail!(
            "W={workers}: {in_place} Machines updated in place, expected {}: {cp:?} {md:?}",
            1 + workers
        );
    }
    let target = Version::parse(&args.to).map_err(|e| anyhow::anyhow!("{e}"))?;
    cluster
        .wait_nodes_ready(&target, Duration::from_secs(60))
        .await?;
    let peak_rss_kib = peak_rss_kib(pid)?;
    let steps = step_timings(&extension.log());
    progress.say(format!(
        "W={workers}: upgraded in {}s (workers {}s), peak RSS {:.1} MB",
        secs(whole),
        secs(whole - control_plane),
        mb(peak_rss_kib)
    ));
    drop(extension);
    cluster.down().await?;
    Ok(Run {
        workers,
        cluster_up,
        whole,
        control_plane,
        worker_phase: whole - control_plane,
        peak_rss_kib,
        extension_cpu,
        host_busy,
        execs,
        steps,
    })
}

/// Decimal megabytes, the unit of the aim, from the kernel's KiB.
fn mb(kib: u64) -> f64 {
    (kib * 1024) as f64 / 1e6
}

/// Fills the shared cache with the target version through `capd-inplace stage` on a throwaway
/// one-node cluster, so that every measured run starts warm.
async fn warm_cache(args: &Args, artifact_url: &str, cache: &Path) -> anyhow::Result<()> {
    let cluster = SimCluster::up("bench-scale-warmup", 1, 0, &args.from).await?;
    let mut command = tokio::process::Command::new(extension::binary()?);
    command
        .args(["stage", "--cluster", cluster.name(), "--to", &args.to])
        .args(["--artifact-url", artifact_url])
        .arg("--artifact-cache-dir")
        .arg(cache);
    let staged = run_ok(command, "capd-inplace stage").await;
    cluster.down().await?;
    staged
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = parse_args("bench-scale", "--workers", &[1, 5, 10, 20])?;
    let progress = Progress::default();
    let simnode = sim_artifacts::simnode_binary()?;
    let tree =
        tokio::task::spawn_blocking(move || sim_artifacts::ensure_mirror_tree(&simnode)).await??;
    // A file:// source has the same address in every run, so the cache's index stays valid
    // across clusters (each cluster's own mirror listens on a different port).
    let artifact_url = format!("file://{}", tree.join("release").display());
    let work = tempfile::Builder::new()
        .prefix("capd-inplace-bench-scale-")
        .tempdir()?;
    let cache = work.path().join("cache");

    progress.say("warming the artifact cache");
    warm_cache(&args, &artifact_url, &cache).await?;
    let mut runs = Vec::new();
    for &workers in &args.counts {
        runs.push(upgrade_once(&args, workers, &artifact_url, &cache, &progress).await?);
    }
    print_report(&args, &runs, progress.elapsed());
    Ok(())
}

fn print_report(args: &Args, runs: &[Run], runtime: Duration) {
    let mut out = String::new();
    out.push_str("### Scale: one control plane and W workers, all workers at once\n\n");
    out.push_str(&format!("Command: `{}`\n\n", args.invoked_as));
    out.push_str(&format!(
        "{} → {} through `capd-inplace serve` (`--max-concurrent-upgrades W`, warm cache, plain \
         stand-in binaries) and the CAPI-faithful driver (KCP, then the MachineDeployment with \
         maxUnavailable = W; UpdateMachine polled every `retryAfterSeconds` × {}). \
         Extension CPU is its user + system time during the upgrade; host CPU busy is every core, \
         whatever ran. {} cores; whole run {} s.\n\n",
        args.from,
        args.to,
        Pacing::default().retry_scale,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        secs(runtime),
    ));
    let mut table = Table::new([
        "W",
        "cluster up (s)",
        "whole upgrade (s)",
        "control plane (s)",
        "worker phase (s)",
        "peak RSS (MB)",
        "extension CPU (s)",
        "host CPU busy (%)",
        "execs",
    ]);
    for run in runs {
        table.row([
            run.workers.to_string(),
            secs(run.cluster_up),
            secs(run.whole),
            secs(run.control_plane),
            secs(run.worker_phase),
            format!("{:.1}", mb(run.peak_rss_kib)),
            secs(run.extension_cpu),
            format!("{:.0}", run.host_busy),
            run.execs.values().sum::<u64>().to_string(),
        ]);
    }
    out.push_str(&table.render());

    let Some(largest) = runs.iter().max_by_key(|r| r.workers) else {
        print!("{out}");
        return;
    };
    let control_plane = format!("{}-cp-0", cluster_name(largest.workers));
    out.push_str(&format!(
        "\nWhere the time goes at W = {} (`step finished` lines of the steps that succeeded, milliseconds):\n\n",
        largest.workers
    ));
    let mut steps = Table::new(["step", "control plane", "workers: mean", "workers: max"]);
    let mut order: Vec<&str> = Vec::new();
    for timing in &largest.steps {
        if !order.contains(&timing.step.as_str()) {
            order.push(&timing.step);
        }
    }
    for step in order {
        let of = |worker: bool| -> Vec<u64> {
            largest
                .steps
                .iter()
                .filter(|t| t.ok && t.step == step && (t.container != control_plane) == worker)
                .map(|t| t.elapsed_ms)
                .collect()
        };
        let cp: u64 = of(false).iter().sum();
        let workers = of(true);
        let mean = workers.iter().sum::<u64>() as f64 / workers.len().max(1) as f64;
        steps.row([
            step.to_string(),
            cp.to_string(),
            format!("{mean:.0}"),
            workers.iter().max().copied().unwrap_or(0).to_string(),
        ]);
    }
    out.push_str(&steps.render());
    let in_control_plane = largest.execs.get(&control_plane).copied().unwrap_or(0);
    let in_workers: u64 = largest.execs.values().sum::<u64>() - in_control_plane;
    out.push_str(&format!(
        "\nExecs at W = {} (from the Docker Engine's `exec_create` events): {in_control_plane} in \
         the control-plane container (its own upgrade, and the kubectl calls of every worker's \
         drain, uncordon and Node checks), {:.1} per worker container.\n",
        largest.workers,
        in_workers as f64 / largest.workers as f64,
    ));
    let rss = mb(largest.peak_rss_kib);
    out.push_str(&format!(
        "\nVerdict: peak RSS at W = {} is {rss:.1} MB, {} the {RSS_AIM_MB:.0} MB aim.\n",
        largest.workers,
        if rss < RSS_AIM_MB { "within" } else { "over" },
    ));
    print!("{out}");
}
