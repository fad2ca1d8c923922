//! Shared pieces of the benchmarks: the request bodies ([`requests`]), and for the
//! simulated-cluster ones (`bench-staging`, `bench-scale`) Markdown
//! tables, number formatting, progress on stderr, the extension's per-step log lines, its peak
//! resident memory and CPU time, and how busy the machine's CPUs were.

pub mod requests;

pub use requests::can_update_machine_request;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;

use crate::sim::{self, CLUSTER_LABEL, SimCluster};

/// The arguments of the simulated-cluster benchmarks: the sizes to run (node or worker counts)
/// and the versions.
#[derive(Debug, Clone)]
pub struct Args {
    pub counts: Vec<usize>,
    pub from: String,
    pub to: String,
    /// The command to show in the report.
    pub invoked_as: String,
}

/// Parses `[COUNT_FLAG a,b,c] [--from V] [--to V] [--invoked-as TEXT]` from the process's
/// arguments.
pub fn parse_args(
    program: &str,
    count_flag: &str,
    default_counts: &[usize],
) -> anyhow::Result<Args> {
    let counts_text = default_counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let usage = format!(
        "usage: {program} [{count_flag} {counts_text}] [--from v1.31.4] [--to v1.32.3] [--invoked-as TEXT]"
    );
    let mut args = Args {
        counts: default_counts.to_vec(),
        from: "v1.31.4".into(),
        to: "v1.32.3".into(),
        invoked_as: program.into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| usage.clone())?;
        match flag.as_str() {
            "--from" => args.from = value,
            "--to" => args.to = value,
            "--invoked-as" => args.invoked_as = value,
            flag if flag == count_flag => {
                args.counts = value
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .with_context(|| {
                        format!("{count_flag} takes a comma-separated list of counts")
                    })?;
                if args.counts.contains(&0) {
                    bail!("{count_flag}: every count must be at least 1");
                }
            }
            _ => bail!(usage),
        }
    }
    Ok(args)
}

/// Runs `command` to the end with no stdin, failing with its output unless it succeeded.
pub async fn run_ok(mut command: tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("start {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A Markdown table.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn render(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        out.push_str(&line(&vec!["---".to_string(); self.header.len()]));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// Seconds with two decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// `a / b` with two decimals.
pub fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

/// Decimal megabytes with one decimal (the unit release binaries are usually quoted in).
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// Progress lines on stderr, stamped with the time since the benchmark started.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    start: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            start: Instant::now(),
        }
    }
}

impl Progress {
    pub fn say(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// One `step finished` line of the extension's text log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTiming {
    pub container: String,
    pub step: String,
    pub elapsed_ms: u64,
    pub ok: bool,
}

/// The `step finished` lines of a `capd-inplace` text log (the engine logs one per step and
/// node, inside the `node{container=…}` span).
pub fn step_timings(log: &str) -> Vec<StepTiming> {
    log.lines()
        .filter(|line| line.contains(": step finished "))
        .filter_map(|line| {
            let (spans, event) = line.split_once(": step finished ")?;
            Some(StepTiming {
                container: field(spans, "container")?,
                step: field(event, "step")?,
                elapsed_ms: field(event, "elapsed_ms")?.parse().ok()?,
                ok: field(event, "ok")? == "true",
            })
        })
        .collect()
}

/// The value of `name=value` (quotes removed) in a tracing text line; a value ends at a space,
/// `}` or `:`, which none of the values read here contain.
fn field(text: &str, name: &str) -> Option<String> {
    let key = format!("{name}=");
    let start = text
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || matches!(text.as_bytes()[i - 1], b' ' | b'{'))?
        .0
        + key.len();
    let value: String = text[start..]
        .chars()
        .take_while(|c| !matches!(c, ' ' | '}' | ':'))
        .collect();
    Some(value.trim_matches('"').to_string())
}

/// Peak resident set size of a live process in KiB (`VmHWM` in `/proc/<pid>/status`).
pub fn peak_rss_kib(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no VmHWM for process {pid}")))
}

/// CPU time a live process has used, all its threads together: `utime + stime` from
/// `/proc/<pid>/stat`, which the kernel reports in ticks of a fixed 100 Hz (`USER_HZ`).
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name: state is field 3 of the file, utime field 14, stime field 15.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => Err(std::io::Error::other(format!(
            "unexpected /proc/{pid}/stat: {stat}"
        ))),
    }
}

/// The machine's CPU ticks so far, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    pub total: u64,
}

impl CpuTicks {
    pub fn now() -> std::io::Result<CpuTicks> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ticks.len() < 5 {
            return Err(std::io::Error::other("unexpected /proc/stat"));
        }
        // user nice system idle iowait irq softirq steal ...; guest time is inside user already.
        let total: u64 = ticks.iter().take(8).sum();
        Ok(CpuTicks {
            busy: total - ticks[3] - ticks[4],
            total,
        })
    }

    /// The share of the machine's CPU that was busy between `earlier` and `self`, in percent.
    pub fn busy_percent_since(&self, earlier: &CpuTicks) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1);
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// Counts the execs the Docker Engine creates in a cluster's containers, by container name, from
/// the Engine's own `exec_create` events: what ran, not what the code is thought to run.
pub struct ExecCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Marks the counter's own probe execs, which it leaves out.
const PROBE: &str = "capd-inplace-bench-probe";

impl ExecCounter {
    /// Subscribes to the events and returns once a probe exec came through, so that no exec
    /// started after this returns is missed.
    pub async fn start(cluster: &SimCluster) -> sim::Result<ExecCounter> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["exec_create".to_string()]),
            (
                "label".to_string(),
                vec![format!("{CLUSTER_LABEL}={}", cluster.name())],
            ),
        ]);
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let probes = Arc::new(Mutex::new(0u64));
        let task = {
            let docker = cluster.docker().clone();
            let (counts, probes) = (counts.clone(), probes.clone());
            tokio::spawn(async move {
                let options = EventsOptions {
                    filters: Some(filters),
                    ..Default::default()
                };
                let mut events = docker.events(Some(options));
                while let Some(Ok(event)) = events.next().await {
                    if event.action.as_deref().is_some_and(|a| a.ends_with(PROBE)) {
                        *probes.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                        continue;
                    }
                    let name = event
                        .actor
                        .and_then(|actor| actor.attributes)
                        .and_then(|mut attributes| attributes.remove("name"));
                    if let Some(name) = name {
                        *counts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entry(name)
                            .or_insert(0) += 1;
                    }
                }
            })
        };
        let node = cluster.control_plane().name.clone();
        let start = Instant::now();
        while *probes.lock().unwrap_or_else(PoisonError::into_inner) == 0 {
            if start.elapsed() > Duration::from_secs(10) {
                task.abort();
                return Err(sim::Error::Timeout {
                    what: "the Docker Engine's exec events".into(),
                    after: Duration::from_secs(10),
                });
            }
            cluster.exec(&node, &["true", PROBE]).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(ExecCounter { counts, task })
    }

    /// Stops counting and returns the execs per container name.
    pub fn stop(self) -> BTreeMap<String, u64> {
        self.task.abort();
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_markdown() {
        let mut table = Table::new(["a", "b"]);
        table.row(["1", "2"]);
        assert_eq!(table.render(), "| a | b |\n| --- | --- |\n| 1 | 2 |\n");
        assert_eq!(secs(Duration::from_millis(1234)), "1.23");
        assert_eq!(
            ratio(Duration::from_secs(3), Duration::from_secs(2)),
            "1.50"
        );
        assert_eq!(megabytes(205_000_123), "205.0");
    }

    #[test]
    fn step_lines_are_parsed_from_the_text_log() {
        let log = "\
2026-01-01T00:00:01.000000Z  INFO node{container=bsc-20-md-0-3 to_version=v1.32.3}:step{step=\"stage\"}: capd_inplace::upgrade::run: step finished step=\"stage\" elapsed_ms=1234 ok=true
2026-01-01T00:00:01.000000Z  INFO node{container=bsc-20-md-0-3 to_version=v1.32.3}: capd_inplace::upgrade::run: planned role=Worker
2026-01-01T00:00:02.000000Z  INFO node{container=bsc-20-cp-0 to_version=v1.32.3}:step{step=\"drain\"}: capd_inplace::upgrade::run: step finished step=\"drain\" elapsed_ms=7 ok=false
";
        assert_eq!(
            step_timings(log),
            [
                StepTiming {
                    container: "bsc-20-md-0-3".into(),
                    step: "stage".into(),
                    elapsed_ms: 1234,
                    ok: true,
                },
                StepTiming {
                    container: "bsc-20-cp-0".into(),
                    step: "drain".into(),
                    elapsed_ms: 7,
                    ok: false,
                },
            ]
        );
    }

    #[test]
    fn memory_and_cpu_of_this_process_and_machine_are_read() {
        let pid = std::process::id();
        assert!(peak_rss_kib(pid).unwrap() > 0);
        let before = cpu_time(pid).unwrap();
        let machine = CpuTicks::now().unwrap();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(pid).unwrap() > before);
        let later = CpuTicks::now().unwrap();
        assert!(later.total > machine.total);
        let busy = later.busy_percent_since(&machine);
        assert!((0.0..=100.0).contains(&busy), "{busy}");
    }
}
