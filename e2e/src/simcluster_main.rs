//! `simcluster up NAME CONTROL_PLANES WORKERS VERSION [--real-size-artifacts] | down NAME`: a
//! simulated CAPD/kind cluster for humans and benchmark scripts, wrapped by scripts/simcluster.sh.
//! `--real-size-artifacts` makes the mirror publish binaries padded to the real sizes.

use anyhow::{Context, bail};
use capd_inplace_e2e::sim::{ArtifactSizes, Options, SimCluster};

const USAGE: &str = "usage: simcluster up NAME CONTROL_PLANES WORKERS VERSION [--real-size-artifacts] | simcluster down NAME";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["up", name, cps, workers, version, flags @ ..] => {
            let cps: usize = cps.parse().context("CONTROL_PLANES must be a number")?;
            let workers: usize = workers.parse().context("WORKERS must be a number")?;
            let artifact_sizes = match flags {
                [] => ArtifactSizes::Plain,
                ["--real-size-artifacts"] => ArtifactSizes::REAL,
                _ => bail!(USAGE),
            };
            let options = Options { artifact_sizes };
            let cluster = SimCluster::up_with(name, cps, workers, version, options).await?;
            for node in cluster.nodes() {
                println!(
                    "{}\t{}\t{}\t{}",
                    node.name,
                    node.role.label(),
                    node.ip,
                    node.provider_id()
                );
            }
            println!("mirror (host):    {}", cluster.mirror().host_url);
            println!("mirror (network): {}", cluster.mirror().network_url);
            println!(
                "try: docker exec {} kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes",
                cluster.control_plane().name
            );
            cluster.detach();
            Ok(())
        }
        ["down", name] => {
            SimCluster::down_by_name(name).await?;
            println!("removed simulated cluster {name}");
            Ok(())
        }
        _ => bail!(USAGE),
    }
}
