//! CAPD-shaped node containers for integration tests: named `<cluster>-<machine>`, hostname
//! equal to the name, kind's cluster and role labels, systemd as PID 1 from the simulated node
//! base image, and the flags a CAPD node needs without `--privileged`.
//!
//! Use from a test file with `mod common;` then `common::simnode::...`. Every container is
//! removed when its [`NodeContainer`] drops, even when the test fails.

#![allow(dead_code, clippy::unwrap_used)] // shared by several test files; a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use tokio::sync::OnceCell;

pub const CLUSTER_LABEL: &str = "io.x-k8s.kind.cluster";
pub const ROLE_LABEL: &str = "io.x-k8s.kind.role";

/// Overrides the image instead of running `scripts/build-simnode-image.sh`.
pub const IMAGE_ENV: &str = "CAPD_INPLACE_SIMNODE_IMAGE";

/// The simulated node base image: `$CAPD_INPLACE_SIMNODE_IMAGE`, or what the (idempotent)
/// build script prints. Built or found once per test binary.
pub async fn simnode_image() -> String {
    static IMAGE: OnceCell<String> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            if let Ok(image) = std::env::var(IMAGE_ENV) {
                return image;
            }
            // Found from this crate up, so that a workspace member can share this file.
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|dir| dir.join("scripts/build-simnode-image.sh"))
                .find(|script| script.exists())
                .expect("scripts/build-simnode-image.sh not found above this crate");
            let script = script.display().to_string();
            let output = tokio::process::Command::new(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{script} failed");
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        })
        .await
        .clone()
}

/// A cluster name no other test (or test run) uses.
pub fn unique_cluster(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// What to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The container is named `<cluster>-<machine>`.
    pub cluster: String,
    pub machine: String,
    /// Value of `io.x-k8s.kind.role` (`control-plane`, `worker`, `external-load-balancer`);
    /// `None` leaves the label out.
    pub role: Option<String>,
    /// Value of `io.x-k8s.kind.cluster`; `None` leaves the label out. Defaults to `cluster`.
    pub cluster_label: Option<String>,
    /// Extra bind mounts (`host:container[:opts]`), e.g. a shared state volume.
    pub binds: Vec<String>,
}

impl NodeSpec {
    pub fn new(cluster: &str, machine: &str, role: &str) -> NodeSpec {
        NodeSpec {
            cluster: cluster.to_string(),
            machine: machine.to_string(),
            role: Some(role.to_string()),
            cluster_label: Some(cluster.to_string()),
            binds: Vec::new(),
        }
    }

    pub fn control_plane(cluster: &str, machine: &str) -> NodeSpec {
        NodeSpec::new(cluster, machine, "control-plane")
    }

    pub fn worker(cluster: &str, machine: &str) -> NodeSpec {
        NodeSpec::new(cluster, machine, "worker")
    }

    /// A container with neither label: not part of any cluster.
    pub fn unlabelled(self) -> NodeSpec {
        NodeSpec {
            role: None,
            cluster_label: None,
            ..self
        }
    }

    pub fn name(&self) -> String {
        format!("{}-{}", self.cluster, self.machine)
    }
}

/// A running node container, removed (forcibly) on drop.
#[derive(Debug)]
pub struct NodeContainer {
    pub docker: bollard::Docker,
    pub name: String,
    pub id: String,
}

/// Creates and starts a CAPD-shaped node container.
pub async fn run_node(docker: &bollard::Docker, spec: NodeSpec) -> NodeContainer {
    let image = simnode_image().await;
    let name = spec.name();
    let mut labels = HashMap::new();
    if let Some(cluster) = &spec.cluster_label {
        labels.insert(CLUSTER_LABEL.to_string(), cluster.clone());
    }
    if let Some(role) = &spec.role {
        labels.insert(ROLE_LABEL.to_string(), role.clone());
    }
    let mut binds = vec!["/sys/fs/cgroup:/sys/fs/cgroup:rw".to_string()];
    binds.extend(spec.binds.iter().cloned());
    let body = ContainerCreateBody {
        image: Some(image),
        hostname: Some(name.clone()),
        labels: Some(labels),
        env: Some(vec!["container=docker".to_string()]),
        host_config: Some(HostConfig {
            cap_add: Some(vec!["SYS_ADMIN".to_string(), "NET_ADMIN".to_string()]),
            security_opt: Some(vec!["seccomp=unconfined".to_string()]),
            tmpfs: Some(
                ["/run", "/run/lock", "/tmp"]
                    .into_iter()
                    .map(|path| (path.to_string(), String::new()))
                    .collect(),
            ),
            binds: Some(binds),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    let created = docker.create_container(Some(options), body).await.unwrap();
    // From here on the guard removes the container whatever happens.
    let container = NodeContainer {
        docker: docker.clone(),
        name,
        id: created.id,
    };
    docker
        .start_container(
            &container.id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .unwrap();
    // Booted before it is used: systemd-tmpfiles empties /tmp while it boots, which would take
    // away files a test had just written there.
    capd_inplace_e2e::sim::wait_for_systemd(docker, &container.name)
        .await
        .unwrap();
    container
}

impl Drop for NodeContainer {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: remove on a thread of its own.
        let (docker, id) = (self.docker.clone(), self.id.clone());
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let options = RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build();
                docker.remove_container(&id, Some(options)).await
            })
        });
        match removal.join() {
            Ok(Ok(())) => {}
            // The test removed it itself.
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => {}
            Ok(Err(error)) => eprintln!("could not remove test container {}: {error}", self.name),
            Err(_) => eprintln!("could not remove test container {}", self.name),
        }
    }
}
