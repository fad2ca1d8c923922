//! `bench-staging`: how fast kubeadm, kubelet and kubectl, padded to the real binaries' sizes,
//! reach 1, 5 and 10 simulated nodes, four ways, on the same clusters in one run:
//!
//! * (a) `capd-inplace stage` with a cold artifact cache (one download from the mirror, then an
//!   upload through the Docker archive API and a sha256 check in every node);
//! * (b) the same with the now warm cache;
//! * (e) the same with `--serve-cache`: the nodes download the binaries with curl from the CLI,
//!   which serves its warm cache, and hash each in the node as soon as it has landed;
//! * (c) `docker cp` of the same three files into every node in parallel, checking nothing: the
//!   practical floor;
//! * (d) `docker exec <node> curl` from the mirror in every node in parallel, checking nothing.
//!
//! Every variant starts from nodes without `/var/lib/capd-inplace` and with the host's dirty pages
//! written back, and ends with the three files of the right sizes in every node. (b) to (d) run
//! three times, interleaved, and report their median: one run of `docker cp` varies by half. Bytes read from
//! the mirror come from the mirror's own log line per response. After (c), the staged files are
//! also hashed in every node at once, with sha256sum and with openssl, untimed by (c), to show
//! what the verification in the stage step costs by itself. Wrapped by
//! `scripts/bench-staging.sh`; prints a Markdown fragment on stdout and progress on stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use capd_inplace_e2e::bench::{Args, Progress, Table, megabytes, parse_args, ratio, run_ok, secs};
use capd_inplace_e2e::extension;
use capd_inplace_e2e::sim::{ArtifactSizes, Options, SimCluster};
use capd_inplace_e2e::sim_artifacts::{self, ARCH, TOOLS};

/// Where the engine stages a version; the floor and the naive variant write to the same place.
const STAGE_ROOT: &str = "/var/lib/capd-inplace";
/// How often each variant but the cold cache runs per node count; the median is reported.
const ROUNDS: usize = 3;

/// What one variant cost on one cluster.
#[derive(Debug, Clone, Copy)]
struct Measured {
    wall: Duration,
    /// Body bytes the mirror wrote, checksum files included.
    mirror_bytes: u64,
    /// GETs of a binary (not of a `.sha256`) the mirror answered with 200.
    binary_downloads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Cold,
    Warm,
    Served,
    DockerCp,
    Curl,
}

impl Variant {
    /// Served follows Warm, which leaves the cache warm whatever the round.
    const ALL: [Variant; 5] = [
        Variant::Cold,
        Variant::Warm,
        Variant::Served,
        Variant::DockerCp,
        Variant::Curl,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Cold => "(a) capd-inplace stage, cold cache",
            Variant::Warm => "(b) capd-inplace stage, warm cache",
            Variant::Served => "(e) capd-inplace stage --serve-cache, warm cache",
            Variant::DockerCp => "(c) docker cp, parallel",
            Variant::Curl => "(d) docker exec curl, parallel",
        }
    }
}

struct Bench {
    capd_inplace: PathBuf,
    to: String,
    /// The published sizes of kubeadm, kubelet and kubectl.
    sizes: [u64; 3],
    /// Holds the floor's source and the cold caches.
    work: tempfile::TempDir,
}

impl Bench {
    fn staged_dir(&self) -> String {
        format!("{STAGE_ROOT}/{}/bin", self.to)
    }

    /// Copies the published files into [`floor_source`]; returns their sizes.
    fn write_floor_source(work: &Path, to: &str, published: &Path) -> anyhow::Result<[u64; 3]> {
        let bin = floor_source(work).join("capd-inplace").join(to).join("bin");
        std::fs::create_dir_all(&bin)?;
        let mut sizes = [0; 3];
        for (size, tool) in sizes.iter_mut().zip(TOOLS) {
            *size = write_dense_copy(&published.join(tool), &bin.join(tool))?;
        }
        Ok(sizes)
    }

    fn total_size(&self) -> u64 {
        self.sizes.iter().sum()
    }

    async fn run(&self, cluster: &SimCluster, variant: Variant) -> anyhow::Result<Measured> {
        clean(cluster).await?;
        // Gigabytes written by the previous variant may still be on their way to disk; writing
        // them back here keeps that cost out of the next variant's time.
        run_ok(tokio::process::Command::new("sync"), "sync").await?;
        let served_before = cluster.mirror_served().await?.len();
        let cache = self.work.path().join(format!("cache-{}", cluster.name()));
        let start = Instant::now();
        match variant {
            Variant::Cold | Variant::Warm => {
                if variant == Variant::Cold && cache.exists() {
                    bail!("{} is not a cold cache", cache.display());
                }
                self.stage(cluster, &cache, false).await?
            }
            Variant::Served => self.stage(cluster, &cache, true).await?,
            Variant::DockerCp => self.docker_cp(cluster).await?,
            Variant::Curl => self.curl(cluster).await?,
        }
        let wall = start.elapsed();
        let served = cluster.mirror_served().await?;
        let new = &served[served_before.min(served.len())..];
        self.check_staged(cluster).await?;
        Ok(Measured {
            wall,
            mirror_bytes: new.iter().map(|s| s.body_bytes).sum(),
            binary_downloads: new
                .iter()
                .filter(|s| s.method == "GET" && s.status == 200 && !s.target.ends_with(".sha256"))
                .count(),
        })
    }

    async fn stage(&self, cluster: &SimCluster, cache: &Path, serve: bool) -> anyhow::Result<()> {
        let nodes = cluster.nodes().len().to_string();
        let mut command = tokio::process::Command::new(&self.capd_inplace);
        command
            .args(["stage", "--cluster", cluster.name(), "--to", &self.to])
            .args(["--artifact-url", &cluster.mirror().host_url])
            .arg("--artifact-cache-dir")
            .arg(cache)
            .args(["--parallel", &nodes]);
        if serve {
            command.arg("--serve-cache");
        }
        run_ok(command, "capd-inplace stage").await
    }

    async fn docker_cp(&self, cluster: &SimCluster) -> anyhow::Result<()> {
        let source = floor_source(self.work.path()).join("capd-inplace");
        let copies = cluster.nodes().iter().map(|node| {
            let mut command = tokio::process::Command::new("docker");
            command
                .args(["cp", "-q"])
                .arg(&source)
                .arg(format!("{}:/var/lib/", node.name));
            run_ok(command, "docker cp")
        });
        futures::future::try_join_all(copies).await?;
        Ok(())
    }

    async fn curl(&self, cluster: &SimCluster) -> anyhow::Result<()> {
        let base = format!(
            "{}/{}/bin/linux/{ARCH}",
            cluster.mirror().network_url,
            self.to
        );
        let dir = self.staged_dir();
        let fetches = cluster.nodes().iter().map(|node| {
            let mut command = tokio::process::Command::new("docker");
            command.args(["exec", &node.name, "curl", "-fsS", "--create-dirs"]);
            for tool in TOOLS {
                command
                    .arg("-o")
                    .arg(format!("{dir}/{tool}"))
                    .arg(format!("{base}/{tool}"));
            }
            run_ok(command, "docker exec curl")
        });
        futures::future::try_join_all(fetches).await?;
        Ok(())
    }

    /// How long hashing the staged files takes in every node at once, with `sha256sum` and with
    /// `openssl dgst -sha256` (the stage step verifies with openssl where the node has it).
    async fn hash_costs(&self, cluster: &SimCluster) -> anyhow::Result<(Duration, Duration)> {
        let dir = self.staged_dir();
        let paths: Vec<String> = TOOLS.iter().map(|t| format!("{dir}/{t}")).collect();
        let mut costs = Vec::new();
        for tool in [
            &["sha256sum"][..],
            &["openssl", "dgst", "-sha256", "-r"][..],
        ] {
            let start = Instant::now();
            let runs = cluster.nodes().iter().map(|node| {
                let mut argv = tool.to_vec();
                argv.extend(paths.iter().map(String::as_str));
                async move { cluster.exec_ok(&node.name, &argv).await }
            });
            futures::future::try_join_all(runs).await?;
            costs.push(start.elapsed());
        }
        Ok((costs[0], costs[1]))
    }

    /// Every node holds the three files at their published sizes (the engine variants also
    /// checked their sha256 in the node; the others check nothing, as timed).
    async fn check_staged(&self, cluster: &SimCluster) -> anyhow::Result<()> {
        let dir = self.staged_dir();
        let paths: Vec<String> = TOOLS.iter().map(|t| format!("{dir}/{t}")).collect();
        let want: Vec<String> = self.sizes.iter().map(u64::to_string).collect();
        let checks = cluster.nodes().iter().map(|node| async {
            let mut argv = vec!["stat", "-c", "%s"];
            argv.extend(paths.iter().map(String::as_str));
            let out = cluster.exec_ok(&node.name, &argv).await?;
            let got: Vec<&str> = out.stdout.split_whitespace().collect();
            if got != want {
                bail!("{}: staged sizes {got:?}, expected {want:?}", node.name);
            }
            Ok(())
        });
        futures::future::try_join_all(checks).await?;
        Ok(())
    }
}

/// Where the work directory holds the three published files, fully written (not sparse), laid
/// out as `<dir>/capd-inplace/<version>/bin/<tool>` so that one `docker cp` per node places them.
fn floor_source(work: &Path) -> PathBuf {
    work.join("floor")
}

/// Removes everything staged, so each variant starts from the same empty node.
async fn clean(cluster: &SimCluster) -> anyhow::Result<()> {
    let removals = cluster
        .nodes()
        .iter()
        .map(|node| cluster.exec_ok(&node.name, &["rm", "-rf", STAGE_ROOT]));
    futures::future::try_join_all(removals).await?;
    Ok(())
}

/// Copies `from` byte by byte, so the copy is fully allocated whatever holes `from` has.
fn write_dense_copy(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut input = std::fs::File::open(from)?;
    let mut output = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o755)
        .open(to)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        output.write_all(&buffer[..n])?;
        total += n as u64;
    }
    output.sync_all()?;
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args("bench-staging", "--nodes", &[1, 5, 10])?;
    let progress = Progress::default();
    let capd_inplace = extension::binary()?;
    let simnode = sim_artifacts::simnode_binary()?;

    progress.say("padded mirror tree (built once, then cached)");
    let tree = {
        let simnode = simnode.clone();
        tokio::task::spawn_blocking(move || {
            sim_artifacts::ensure_sized_mirror_tree(&simnode, ArtifactSizes::REAL)
        })
        .await??
    };
    let published = tree
        .join("release")
        .join(&args.to)
        .join("bin/linux")
        .join(ARCH);
    let work = tempfile::Builder::new()
        .prefix("capd-inplace-bench-staging-")
        .tempdir()?;
    let sizes = Bench::write_floor_source(work.path(), &args.to, &published)?;
    let bench = Bench {
        capd_inplace,
        to: args.to.clone(),
        sizes,
        work,
    };

    progress.say(format!(
        "creating clusters of {:?} nodes in parallel",
        args.counts
    ));
    let setup = Instant::now();
    let options = Options {
        artifact_sizes: ArtifactSizes::REAL,
    };
    let clusters = futures::future::try_join_all(args.counts.iter().map(|&n| {
        let name = format!("bench-stage-{n}");
        let from = args.from.clone();
        async move { SimCluster::up_with(&name, 1, n - 1, &from, options).await }
    }))
    .await?;
    let setup = setup.elapsed();
    progress.say(format!("clusters up in {}s", secs(setup)));

    let mut results: Vec<Row> = Vec::new();
    for (cluster, &n) in clusters.iter().zip(&args.counts) {
        // A cache is cold once; the other variants run ROUNDS times, interleaved so that a
        // change in the machine's background load hits each of them, and report their median.
        let mut rounds: [Vec<Measured>; Variant::ALL.len()] = Default::default();
        let mut hashing = (Duration::ZERO, Duration::ZERO);
        for round in 0..ROUNDS {
            for (index, variant) in Variant::ALL.into_iter().enumerate() {
                if variant == Variant::Cold && round > 0 {
                    continue;
                }
                progress.say(format!("{n} node(s): {}", variant.label()));
                let m = bench.run(cluster, variant).await?;
                progress.say(format!(
                    "{n} node(s): {} took {}s, {} MB from the mirror",
                    variant.label(),
                    secs(m.wall),
                    megabytes(m.mirror_bytes)
                ));
                rounds[index].push(m);
                if variant == Variant::DockerCp && round == 0 {
                    // Outside any timed variant: what verifying the staged bytes costs by itself.
                    hashing = bench.hash_costs(cluster).await?;
                }
            }
        }
        let measured = rounds.map(median);
        clean(cluster).await?;
        results.push(Row {
            nodes: n,
            measured,
            hashing,
        });
    }
    for cluster in clusters {
        cluster.down().await?;
    }

    print_report(&args, &bench, setup, progress.elapsed(), &results);
    Ok(())
}

/// The round of median wall time, with the most any round read from the mirror (so a download
/// in any round shows).
fn median(mut rounds: Vec<Measured>) -> Measured {
    rounds.sort_by_key(|m| m.wall);
    let mirror_bytes = rounds.iter().map(|m| m.mirror_bytes).max().unwrap_or(0);
    let binary_downloads = rounds.iter().map(|m| m.binary_downloads).max().unwrap_or(0);
    Measured {
        mirror_bytes,
        binary_downloads,
        ..rounds[rounds.len() / 2]
    }
}

/// One node count's results: the variants in [`Variant::ALL`] order, and the in-node hashing
/// times (sha256sum, openssl) of the staged files in every node at once.
struct Row {
    nodes: usize,
    measured: [Measured; Variant::ALL.len()],
    hashing: (Duration, Duration),
}

fn print_report(args: &Args, bench: &Bench, setup: Duration, runtime: Duration, results: &[Row]) {
    let (sizes, total) = (bench.sizes, bench.total_size());
    let mut out = String::new();
    out.push_str("### Staging: capd-inplace against docker cp and curl\n\n");
    out.push_str(&format!("Command: `{}`\n\n", args.invoked_as));
    out.push_str(&format!(
        "{} → {}: kubeadm, kubelet and kubectl padded to {} + {} + {} = {total} bytes ({} MB). \
         Each variant starts from nodes without `{STAGE_ROOT}` and after a `sync`; wall time \
         from start to the last node done; (a) runs once (a cache is cold once), the others \
         {ROUNDS} times, interleaved, and the median is shown. {} cores; clusters created in {} s; whole run {} s.\n\n",
        args.from,
        args.to,
        sizes[0],
        sizes[1],
        sizes[2],
        megabytes(total),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        secs(setup),
        secs(runtime),
    ));
    let mut times = Table::new([
        "nodes",
        "(a) cold (s)",
        "(b) warm (s)",
        "(e) served (s)",
        "(c) docker cp (s)",
        "(d) curl (s)",
        "(b)/(c)",
        "(e)/(c)",
        "(a)/(c)",
        "(d)/(c)",
    ]);
    let mut bytes = Table::new([
        "nodes",
        "(a) cold: MB (binary GETs)",
        "(b) warm: MB (binary GETs)",
        "(e) served: MB (binary GETs)",
        "(c) docker cp: MB (binary GETs)",
        "(d) curl: MB (binary GETs)",
    ]);
    let mut hashing = Table::new([
        "nodes",
        "sha256sum in every node (s)",
        "openssl dgst -sha256 in every node (s)",
        "(c) + openssl (s)",
        "(b)/((c) + openssl)",
        "(e)/((c) + openssl)",
    ]);
    let mut warm_ok = true;
    let mut served_ok = true;
    let mut warm_ok_verified = true;
    let mut one_download = true;
    for Row {
        nodes: n,
        measured: row,
        hashing: (sha256sum, openssl),
    } in results
    {
        let [cold, warm, served, cp, curl] = *row;
        // docker cp followed by the verification the stage step does in the node: the floor
        // for a transfer that is checked before anything uses it.
        let verified_cp = cp.wall + *openssl;
        hashing.row([
            n.to_string(),
            secs(*sha256sum),
            secs(*openssl),
            secs(verified_cp),
            ratio(warm.wall, verified_cp),
            ratio(served.wall, verified_cp),
        ]);
        warm_ok_verified &= warm.wall.as_secs_f64() <= 1.2 * verified_cp.as_secs_f64();
        times.row([
            n.to_string(),
            secs(cold.wall),
            secs(warm.wall),
            secs(served.wall),
            secs(cp.wall),
            secs(curl.wall),
            ratio(warm.wall, cp.wall),
            ratio(served.wall, cp.wall),
            ratio(cold.wall, cp.wall),
            ratio(curl.wall, cp.wall),
        ]);
        bytes.row(
            [n.to_string()].into_iter().chain(
                row.iter()
                    .map(|m| format!("{} ({})", megabytes(m.mirror_bytes), m.binary_downloads)),
            ),
        );
        warm_ok &= warm.wall.as_secs_f64() <= 1.2 * cp.wall.as_secs_f64();
        served_ok &= served.wall.as_secs_f64() <= 1.2 * cp.wall.as_secs_f64();
        // Checksum files (64 hex digits each) are the only other bytes a cold fetch reads.
        one_download &= cold.binary_downloads == TOOLS.len()
            && cold.mirror_bytes == total + 64 * TOOLS.len() as u64
            && warm.mirror_bytes == 0
            && served.mirror_bytes == 0;
    }
    out.push_str(&times.render());
    out.push_str("\nBytes read from the mirror (response bodies, `.sha256` files included):\n\n");
    out.push_str(&bytes.render());
    out.push_str(
        "\nWhat verifying the staged files costs by itself (the three files hashed in every node \
         at once, after (c), untimed there; the stage step verifies with openssl where the node has \
         it, sha256sum otherwise):\n\n",
    );
    out.push_str(&hashing.render());
    out.push_str(&format!(
        "\nVerdict: (b) within 1.2× of (c) at every node count: {}; (e) within 1.2× of (c) at \
         every node count: {}; (b) within 1.2× of (c) followed by the same in-node verification: \
         {}; one download per version (cold: the three files once plus their checksums, warm and \
         served: 0 bytes) at every node count: {}.\n",
        if warm_ok { "yes" } else { "no" },
        if served_ok { "yes" } else { "no" },
        if warm_ok_verified { "yes" } else { "no" },
        if one_download { "yes" } else { "no" },
    ));
    print!("{out}");
}
