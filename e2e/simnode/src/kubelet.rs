//! The stand-in `kubelet`: `--version`, and the service that kind's kubelet.service starts.
//! As a service it checks its files and the version skew, then registers its Node in the shared
//! state and posts a heartbeat every [`HEARTBEAT`] until it is stopped (SIGTERM).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use crate::version::check_kubelet_skew;
use crate::{Ctx, Failure, Outcome};

pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The kubelet's flags as `--name=value` pairs. Every flag is accepted and most are ignored,
/// as the double runs no pods; positional arguments are refused like the real kubelet does.
#[derive(Debug, Default)]
pub struct Flags {
    values: BTreeMap<String, String>,
}

impl Flags {
    pub fn parse(args: &[String]) -> Result<Self, Failure> {
        let mut values = BTreeMap::new();
        for arg in args {
            let Some(body) = arg
                .strip_prefix("--")
                .or_else(|| arg.strip_prefix('-').filter(|b| !b.is_empty()))
            else {
                return Err(Failure::new(format!(
                    "unknown command {arg:?} for \"kubelet\""
                )));
            };
            let (name, value) = body.split_once('=').unwrap_or((body, "true"));
            values.insert(name.to_string(), value.to_string());
        }
        Ok(Flags { values })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

pub fn run(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let flags = Flags::parse(args)?;
    if let Some(v) = flags.get("version").filter(|v| *v != "false") {
        let text = if v == "raw" {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&crate::version_info(&ctx.version))
                    .unwrap_or_default()
            )
        } else {
            format!("Kubernetes {}\n", ctx.version)
        };
        return out
            .write_all(text.as_bytes())
            .map_err(|e| Failure::new(e.to_string()));
    }
    preflight(ctx, &flags)?;
    let name = flags
        .get("hostname-override")
        .unwrap_or(&ctx.node)
        .to_string();
    let mut skew_checked = false;
    loop {
        match register(ctx, &flags, &name, &mut skew_checked) {
            Ok(()) => {}
            Err(Retry::Fatal(f)) => return Err(f),
            Err(Retry::Later(msg)) => eprintln!(
                "E kubelet_node_status.go] \"Unable to register node with API server\" err={msg:?} node={name:?}"
            ),
        }
        std::thread::sleep(HEARTBEAT);
    }
}

/// The real kubelet's start-up failures when kubeadm has not written its files yet; under
/// systemd's Restart=always this crash-loops until init or join has run.
pub fn preflight(ctx: &Ctx, flags: &Flags) -> Outcome {
    if let Some(config) = flags.get("config")
        && let Err(e) = ctx.read(config)
    {
        return Err(Failure::new(format!(
            "E run.go:72] \"command failed\" err=\"failed to load kubelet config file, path: {config}, error: failed to load Kubelet config file {config}, error failed to read kubelet config file \\\"{config}\\\", error: open {config}: {e}\""
        )));
    }
    let kubeconfig = flags.get("kubeconfig");
    let bootstrap = flags.get("bootstrap-kubeconfig");
    let have = |f: Option<&str>| f.is_some_and(|f| ctx.exists(f));
    if !have(kubeconfig) {
        if kubeconfig.is_none() {
            return Err(Failure::new(
                "E run.go:72] \"command failed\" err=\"the simulated kubelet needs --kubeconfig: standalone mode is not simulated\"",
            ));
        }
        if !have(bootstrap) {
            let file = bootstrap.unwrap_or("/etc/kubernetes/bootstrap-kubelet.conf");
            return Err(Failure::new(format!(
                "E run.go:72] \"command failed\" err=\"failed to run Kubelet: unable to load bootstrap kubeconfig: stat {file}: no such file or directory\""
            )));
        }
    }
    Ok(())
}

enum Retry {
    Later(String),
    Fatal(Failure),
}

fn register(ctx: &Ctx, flags: &Flags, name: &str, skew_checked: &mut bool) -> Result<(), Retry> {
    let apiservers = ctx
        .state
        .apiservers()
        .map_err(|e| Retry::Later(e.to_string()))?;
    let Some(oldest) = apiservers.values().min() else {
        return Err(Retry::Later("Post \"https://control-plane:6443/api/v1/nodes\": dial tcp: connect: connection refused".into()));
    };
    // A control-plane kubelet is checked against its own node's API server: kubeadm's documented
    // HA upgrade restarts the first control plane's new kubelet while the other API servers are
    // still old, and a control-plane kubelet talks to its local API server
    // (ControlPlaneKubeletLocalMode). Workers go through the load balancer: the oldest counts.
    let reference = apiservers.get(name).unwrap_or(oldest);
    if !*skew_checked {
        check_kubelet_skew(&ctx.version, reference).map_err(|msg| {
            Retry::Fatal(Failure::new(format!(
                "E run.go:72] \"command failed\" err=\"{msg}\""
            )))
        })?;
        *skew_checked = true;
    }
    let version = ctx.version.to_string();
    let labels = node_labels(name, flags.get("node-labels"));
    let provider_id = flags.get("provider-id").map(String::from);
    let node_ip = flags.get("node-ip").map(String::from);
    let os_image = os_image(ctx);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let first = !ctx
        .state
        .node_exists(name)
        .map_err(|e| Retry::Later(e.to_string()))?;
    ctx.state
        .update_node(name, |node| {
            for (k, v) in &labels {
                node["metadata"]["labels"][k] = json!(v);
            }
            if let Some(id) = &provider_id {
                node["spec"]["providerID"] = json!(id);
            }
            if node["spec"]["podCIDR"].is_null() {
                node["spec"]["podCIDR"] = json!("10.244.0.0/24");
            }
            let mut addresses = vec![json!({"type": "Hostname", "address": name})];
            if let Some(ip) = &node_ip {
                addresses.insert(0, json!({"type": "InternalIP", "address": ip}));
            }
            node["status"]["addresses"] = Value::Array(addresses);
            let resources =
                json!({"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"});
            node["status"]["capacity"] = resources.clone();
            node["status"]["allocatable"] = resources;
            node["status"]["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": 10250}});
            node["status"]["nodeInfo"] = json!({
                "architecture": "amd64",
                "bootID": "",
                "containerRuntimeVersion": "containerd://1.7.18",
                "kernelVersion": kernel,
                "kubeProxyVersion": version,
                "kubeletVersion": version,
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": os_image,
                "systemUUID": "",
            });
            true
        })
        .map_err(|e| Retry::Later(e.to_string()))?;
    if first {
        daemonset_pods(ctx, name).map_err(|e| Retry::Later(e.to_string()))?;
    }
    Ok(())
}

fn node_labels(name: &str, extra: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("beta.kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
    ]);
    for pair in extra.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        labels.insert(k.to_string(), v.to_string());
    }
    labels
}

fn os_image(ctx: &Ctx) -> String {
    ctx.read("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Debian GNU/Linux 12 (bookworm)".into())
}

/// What the DaemonSet controller does when a Node appears: a kube-proxy and a kindnet pod.
fn daemonset_pods(ctx: &Ctx, node: &str) -> crate::state::Result<()> {
    let version = ctx
        .state
        .cluster_version()?
        .map(|v| v.to_string())
        .unwrap_or_default();
    let suffix: String = node
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        .to_string();
    let suffix = &suffix[suffix.len().saturating_sub(5)..];
    ctx.state.update_pods(|pods| {
        for (ds, image) in [
            ("kube-proxy", format!("registry.k8s.io/kube-proxy:{version}")),
            ("kindnet", "docker.io/kindest/kindnetd:v20241108-5c6d2daf".to_string()),
        ] {
            let name = format!("{ds}-{suffix}");
            if pods.iter().any(|p| p["metadata"]["name"] == name.as_str()) {
                continue;
            }
            pods.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": "kube-system", "labels": {"k8s-app": ds},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": ds, "controller": true}],
                },
                "spec": {"nodeName": node, "containers": [{"name": ds, "image": image}]},
                "status": {"phase": "Running"},
            }));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use crate::version::Version;

    fn ctx(dir: &std::path::Path, version: &str) -> Ctx {
        Ctx {
            version: Version::parse(version).unwrap(),
            root: dir.join("root"),
            state: State::new(dir.join("state")),
            node: "w0".into(),
            systemd: false,
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn version_flag() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        run(&ctx(dir.path(), "v1.31.4"), &args(&["--version"]), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "Kubernetes v1.31.4\n");
    }

    #[test]
    fn service_needs_kubeadm_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path(), "v1.31.4");
        let flags = Flags::parse(&args(&[
            "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
            "--kubeconfig=/etc/kubernetes/kubelet.conf",
            "--config=/var/lib/kubelet/config.yaml",
        ]))
        .unwrap();
        assert!(
            preflight(&c, &flags)
                .unwrap_err()
                .message
                .contains("failed to load kubelet config file")
        );
        c.write(
            "/var/lib/kubelet/config.yaml",
            "kind: KubeletConfiguration\n",
        )
        .unwrap();
        assert!(
            preflight(&c, &flags)
                .unwrap_err()
                .message
                .contains("unable to load bootstrap kubeconfig")
        );
        c.write("/etc/kubernetes/kubelet.conf", "kind: Config\n")
            .unwrap();
        preflight(&c, &flags).unwrap();
        assert!(Flags::parse(&args(&["serve"])).is_err());
    }

    #[test]
    fn control_plane_kubelet_is_checked_against_its_own_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let newer = ctx(dir.path(), "v1.32.0");
        newer
            .state
            .set_apiserver("cp0", &Version::parse("v1.32.0").unwrap())
            .unwrap();
        newer
            .state
            .set_apiserver("cp1", &Version::parse("v1.31.4").unwrap())
            .unwrap();
        let flags = Flags::parse(&args(&["--provider-id=docker:////cp0"])).unwrap();
        assert!(register(&newer, &flags, "cp0", &mut false).is_ok());
        assert!(matches!(
            register(&newer, &flags, "cp1", &mut false),
            Err(Retry::Fatal(_))
        ));
    }

    #[test]
    fn registration_enforces_skew_and_posts_version() {
        let dir = tempfile::tempdir().unwrap();
        let newer = ctx(dir.path(), "v1.32.0");
        newer
            .state
            .set_apiserver("cp0", &Version::parse("v1.31.4").unwrap())
            .unwrap();
        newer
            .state
            .set_apiserver("cp1", &Version::parse("v1.32.0").unwrap())
            .unwrap();
        let flags = Flags::parse(&args(&[
            "--node-labels=role=edge",
            "--provider-id=docker:////w0",
        ]))
        .unwrap();
        let mut checked = false;
        match register(&newer, &flags, "w0", &mut checked) {
            Err(Retry::Fatal(f)) => assert!(
                f.message
                    .contains("newer than the oldest kube-apiserver v1.31.4"),
                "{}",
                f.message
            ),
            _ => panic!("a kubelet newer than an API server must exit"),
        }
        let ok = ctx(dir.path(), "v1.31.9");
        assert!(register(&ok, &flags, "w0", &mut checked).is_ok());
        let node = ok
            .state
            .node("w0", crate::state::now_ms())
            .unwrap()
            .unwrap();
        assert_eq!(node["status"]["nodeInfo"]["kubeletVersion"], "v1.31.9");
        assert_eq!(node["metadata"]["labels"]["role"], "edge");
        assert_eq!(node["spec"]["providerID"], "docker:////w0");
        assert_eq!(crate::state::ready_status(&node), "True");
        assert_eq!(ok.state.pods().unwrap().len(), 2);
    }
}
