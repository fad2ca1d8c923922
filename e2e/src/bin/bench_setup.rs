//! What the hook-path load test (`scripts/bench-hooks.sh`) needs from the Rust side:
//!
//! * `bench-setup can-update-request FILE`: writes the ~30 KB CanUpdateMachine request the
//!   criterion bench decides on ([`capd_inplace_e2e::bench`]).
//! * `bench-setup upgrades-in-flight CLUSTER WORKERS FROM TO URL CA_FILE DELAY_MS POLL_FILE`:
//!   brings up a simulated cluster of one control plane and `WORKERS` workers at `FROM`, upgrades
//!   the control plane to `TO` through the extension at `URL` the way KubeadmControlPlane does
//!   (the skew rules refuse workers ahead of it), arms a `DELAY_MS` delay on every worker's
//!   `kubeadm upgrade node`, starts every worker's upgrade with a first UpdateMachine call, waits
//!   until all of them sit in that step, and writes one worker's UpdateMachine request, as the
//!   Machine controller sends it, to `POLL_FILE`. Prints the URL that request is posted to. The
//!   cluster is left running (the script removes it with `simcluster down CLUSTER`), and so are
//!   the upgrades, inside the extension.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capd_inplace_e2e::driver::{
    Change, Driver, ExtensionConfig, Hook, Pacing, RuntimeClient, Workload, update_machine_request,
};
use capd_inplace_e2e::sim::{Fault, Role, SimCluster};

/// How long the workers may take to reach the delayed step (staging ten nodes on two cores).
const PARK_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["can-update-request", file] => {
            std::fs::write(file, capd_inplace_e2e::bench::can_update_machine_request())
                .with_context(|| format!("write {file}"))
        }
        [
            "upgrades-in-flight",
            cluster,
            workers,
            from,
            to,
            url,
            ca,
            delay_ms,
            poll_file,
        ] => {
            let setup = InFlight {
                cluster,
                workers: workers.parse().context("WORKERS must be a number")?,
                from,
                to,
                url,
                ca_pem: std::fs::read_to_string(ca).with_context(|| format!("read {ca}"))?,
                delay_ms: delay_ms.parse().context("DELAY_MS must be a number")?,
            };
            let (poll_url, request) = setup.run().await?;
            std::fs::write(poll_file, request).with_context(|| format!("write {poll_file}"))?;
            println!("{poll_url}");
            Ok(())
        }
        _ => bail!(
            "usage: bench-setup can-update-request FILE\n       bench-setup upgrades-in-flight CLUSTER WORKERS FROM TO URL CA_FILE DELAY_MS POLL_FILE"
        ),
    }
}

struct InFlight<'a> {
    cluster: &'a str,
    workers: usize,
    from: &'a str,
    to: &'a str,
    url: &'a str,
    ca_pem: String,
    delay_ms: u64,
}

impl InFlight<'_> {
    /// Returns the poll URL and the request body.
    async fn run(&self) -> anyhow::Result<(String, Vec<u8>)> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let started = Instant::now();
        let cluster = SimCluster::up(self.cluster, 1, self.workers, self.from).await?;
        eprintln!(
            "bench-setup: cluster {} up ({} nodes) in {:.0?}",
            self.cluster,
            cluster.nodes().len(),
            started.elapsed()
        );
        let result = self.upgrade(&cluster).await;
        // Also on failure: the script's cleanup removes the cluster by name.
        cluster.detach();
        result
    }

    async fn upgrade(&self, cluster: &SimCluster) -> anyhow::Result<(String, Vec<u8>)> {
        // The mirror is the cluster's, so the setting CAPI would pass from the ExtensionConfig
        // points the extension there; the extension itself was started before the cluster.
        let settings = [("artifactURL".to_string(), cluster.mirror().host_url.clone())];
        let client = RuntimeClient::discover(ExtensionConfig::capd_inplace(
            vec![self.url.to_string()],
            self.ca_pem.clone(),
            settings,
        ))
        .await?;
        let driver = Driver::new(
            client,
            Workload::from_sim(cluster, self.from),
            Pacing::default(),
        );

        let started = Instant::now();
        driver
            .upgrade_control_plane(cluster, &Change::upgrade(self.to))
            .await?;
        eprintln!(
            "bench-setup: control plane at {} in {:.0?}",
            self.to,
            started.elapsed()
        );

        let workers: Vec<String> = cluster
            .nodes()
            .iter()
            .filter(|n| n.role == Role::Worker)
            .map(|n| n.name.clone())
            .collect();
        let delay = Fault {
            delay_ms: Some(self.delay_ms),
            ..Fault::default()
        };
        for worker in &workers {
            cluster
                .inject_fault(worker, "kubeadm-upgrade-node", &delay)
                .await?;
        }
        let started = Instant::now();
        for worker in &workers {
            driver.force_in_place_update(worker, self.to)?;
            driver.call_update_machine(worker).await?;
        }
        wait_parked(&driver, &workers).await?;
        eprintln!(
            "bench-setup: {} worker upgrades in flight, all in `kubeadm upgrade`, after {:.0?}",
            workers.len(),
            started.elapsed()
        );

        let first = workers.first().context("the cluster has no workers")?;
        let machine = driver
            .workload()
            .machine(first)
            .cloned()
            .context("the driver has no Machine for the first worker")?;
        let mut request = update_machine_request(&machine);
        driver
            .client()
            .prepare_request(Hook::UpdateMachine, &mut request);
        let url = driver.client().hook_url(Hook::UpdateMachine)?;
        Ok((url, serde_json::to_vec(&request)?))
    }
}

/// Polls every worker until each answers that it is in the delayed step; any other answer
/// than in-progress (done, Failure) means the setup is not what the benchmark claims.
async fn wait_parked(driver: &Driver, workers: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + PARK_TIMEOUT;
    let mut waiting: Vec<&String> = workers.iter().collect();
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            bail!("workers not in `kubeadm upgrade` after {PARK_TIMEOUT:?}: {waiting:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut still = Vec::new();
        for worker in waiting {
            let response = driver.call_update_machine(worker).await?;
            let message = response["message"].as_str().unwrap_or_default();
            if response["retryAfterSeconds"].as_u64().unwrap_or(0) == 0 {
                bail!("{worker} is no longer in progress: {message}");
            }
            if !message.contains("kubeadm upgrade") {
                still.push(worker);
            }
        }
        waiting = still;
    }
    Ok(())
}
