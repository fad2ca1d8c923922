//! The shared state that plays the API server: a directory on a Docker volume mounted into
//! every node of one cluster. Writes go through a temporary file and a rename, and every
//! read-modify-write holds an exclusive `flock` on `<dir>/.lock`, so concurrent stand-ins on
//! different nodes are safe.
//!
//! Layout (all JSON):
//! - `configmaps/kube-system/<name>.json`: v1 ConfigMaps (`kubeadm-config`, `kubelet-config`)
//! - `apiservers.json`: `{"<node>": "<version>"}`, the kube-apiserver version per control-plane node
//! - `nodes/<name>.json`: `{"heartbeatMs": <unix ms>, "object": <v1.Node>}`; Ready is derived on read
//! - `pods.json`: a JSON array of v1 Pods (static mirror pods, DaemonSet and Deployment pods)
//! - `faults/<node>/<command>.json`: fault injection, see [`Fault`]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::version::Version;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shared state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shared state {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("kubeadm-config ClusterConfiguration is invalid: {0}")]
    ClusterConfiguration(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the shared state lives inside a node.
pub const DEFAULT_DIR: &str = "/var/lib/simcluster";
/// The node lifecycle controller marks a Node Ready=Unknown when its kubelet has not posted
/// status for this long. Real clusters use 40 s; the double uses 8 s so tests stay fast.
pub const NODE_GRACE: Duration = Duration::from_secs(8);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 in UTC with second precision, as the API server prints `metav1.Time`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A fault armed for one command on one node. Fields combine: `delay_ms` first, then `hang`,
/// then `fail_times`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Fail this many more runs (decremented atomically under the lock), then behave normally.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fail_times: u32,
    /// Printed on stderr by a failing run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Exit code of a failing run (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Never return (until killed), on every run while the file exists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hang: bool,
    /// Sleep this long before doing the real work, on every run while the file exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a run must do because of the armed faults.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FaultEffect {
    pub delay: Duration,
    pub hang: bool,
    pub fail: Option<(String, i32)>,
}

#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
}

struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // Closing the file releases the flock anyway; unlocking explicitly just makes it prompt.
        let _ = self.0.unlock();
    }
}

impl State {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        State { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn lock(&self, exclusive: bool) -> Result<Lock> {
        fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Self::io(&path))?;
        if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        }
        .map_err(Self::io(&path))?;
        Ok(Lock(file))
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, rel: &str) -> Result<Option<T>> {
        let path = self.dir.join(rel);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Json { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    fn write<T: Serialize>(&self, rel: &str, value: &T) -> Result<()> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(Self::io(parent))?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, bytes).map_err(Self::io(&tmp))?;
        fs::rename(&tmp, &path).map_err(Self::io(&path))
    }

    // ---- ConfigMaps ----

    pub fn configmap(&self, name: &str) -> Result<Option<Value>> {
        let _lock = self.lock(false)?;
        self.read(&format!("configmaps/kube-system/{name}.json"))
    }

    pub fn put_configmap(&self, name: &str, data: BTreeMap<String, String>) -> Result<()> {
        let _lock = self.lock(true)?;
        let rel = format!("configmaps/kube-system/{name}.json");
        let now = rfc3339(now_ms());
        let created = self
            .read::<Value>(&rel)?
            .and_then(|cm| {
                cm["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(String::from)
            })
            .unwrap_or(now);
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "kube-system", "creationTimestamp": created},
            "data": data,
        });
        self.write(&rel, &cm)
    }

    /// The ClusterConfiguration YAML of kubeadm-config, if the cluster was initialised.
    pub fn cluster_configuration(&self) -> Result<Option<String>> {
        Ok(self.configmap("kubeadm-config")?.and_then(|cm| {
            cm["data"]["ClusterConfiguration"]
                .as_str()
                .map(String::from)
        }))
    }

    /// `kubernetesVersion` of the ClusterConfiguration in kubeadm-config.
    pub fn cluster_version(&self) -> Result<Option<Version>> {
        let Some(yaml) = self.cluster_configuration()? else {
            return Ok(None);
        };
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&yaml).map_err(|e| Error::ClusterConfiguration(e.to_string()))?;
        let text = doc
            .get("kubernetesVersion")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::ClusterConfiguration("no kubernetesVersion".into()))?;
        Version::parse(text)
            .map(Some)
            .map_err(|e| Error::ClusterConfiguration(e.to_string()))
    }

    // ---- API servers ----

    pub fn apiservers(&self) -> Result<BTreeMap<String, Version>> {
        let _lock = self.lock(false)?;
        let raw: BTreeMap<String, String> = self.read("apiservers.json")?.unwrap_or_default();
        Ok(raw
            .into_iter()
            .filter_map(|(node, v)| Version::parse(&v).ok().map(|v| (node, v)))
            .collect())
    }

    pub fn set_apiserver(&self, node: &str, version: &Version) -> Result<()> {
        let _lock = self.lock(true)?;
        let mut raw: BTreeMap<String, String> = self.read("apiservers.json")?.unwrap_or_default();
        raw.insert(node.to_string(), version.to_string());
        self.write("apiservers.json", &raw)
    }

    // ---- Nodes ----

    fn node_rel(name: &str) -> String {
        format!("nodes/{name}.json")
    }

    /// Read-modify-write of one Node under the lock. `f` gets the stored object (or a fresh
    /// skeleton) and returns whether this update is a kubelet heartbeat.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value) -> bool) -> Result<()> {
        let _lock = self.lock(true)?;
        let rel = Self::node_rel(name);
        let mut record: Value = self
            .read(&rel)?
            .unwrap_or_else(|| json!({"heartbeatMs": 0, "object": new_node(name)}));
        if f(&mut record["object"]) {
            record["heartbeatMs"] = json!(now_ms());
        }
        self.write(&rel, &record)
    }

    /// Whether the Node exists, without rendering it.
    pub fn node_exists(&self, name: &str) -> Result<bool> {
        let _lock = self.lock(false)?;
        Ok(self.read::<Value>(&Self::node_rel(name))?.is_some())
    }

    /// A Node as the API server would return it: Ready derived from the last heartbeat.
    pub fn node(&self, name: &str, now: u64) -> Result<Option<Value>> {
        let _lock = self.lock(false)?;
        Ok(self
            .read::<Value>(&Self::node_rel(name))?
            .map(|r| render_node(r, now)))
    }

    pub fn nodes(&self, now: u64) -> Result<Vec<Value>> {
        let _lock = self.lock(false)?;
        let dir = self.dir.join("nodes");
        let mut names = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(Self::io(&dir))?;
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if let Some(name) = file.strip_suffix(".json") {
                        names.push(name.to_string());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Io { path: dir, source }),
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(record) = self.read::<Value>(&Self::node_rel(&name))? {
                out.push(render_node(record, now));
            }
        }
        Ok(out)
    }

    // ---- Pods ----

    pub fn pods(&self) -> Result<Vec<Value>> {
        let _lock = self.lock(false)?;
        Ok(self.read("pods.json")?.unwrap_or_default())
    }

    pub fn update_pods<T>(&self, f: impl FnOnce(&mut Vec<Value>) -> T) -> Result<T> {
        let _lock = self.lock(true)?;
        let mut pods: Vec<Value> = self.read("pods.json")?.unwrap_or_default();
        let out = f(&mut pods);
        self.write("pods.json", &pods)?;
        Ok(out)
    }

    // ---- Faults ----

    /// Consumes the faults armed for `command` in each of `nodes`' directories: sums delays,
    /// ORs hangs, and takes one failure (decrementing its `fail_times`) from the first node that
    /// has one left.
    pub fn take_faults(&self, nodes: &[&str], command: &str) -> Result<FaultEffect> {
        let _lock = self.lock(true)?;
        let mut effect = FaultEffect::default();
        for node in nodes {
            let rel = format!("faults/{node}/{command}.json");
            let Some(mut fault) = self.read::<Fault>(&rel)? else {
                continue;
            };
            effect.delay += Duration::from_millis(fault.delay_ms.unwrap_or(0));
            effect.hang |= fault.hang;
            if effect.fail.is_none() && fault.fail_times > 0 {
                fault.fail_times -= 1;
                let message = fault
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("simulated failure of {command} on {node}"));
                effect.fail = Some((message, fault.exit_code.unwrap_or(1)));
                self.write(&rel, &fault)?;
            }
        }
        Ok(effect)
    }

    pub fn put_fault(&self, node: &str, command: &str, fault: &Fault) -> Result<()> {
        let _lock = self.lock(true)?;
        self.write(&format!("faults/{node}/{command}.json"), fault)
    }
}

fn new_node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": format!("sim-{name}"),
            "creationTimestamp": rfc3339(now_ms()),
            "labels": {},
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {},
        "status": {},
    })
}

/// Adds the conditions the kubelet posts and the node lifecycle controller maintains: Ready=True
/// while heartbeats are fresh, Unknown with the unreachable taints once they are older than
/// [`NODE_GRACE`].
fn render_node(record: Value, now: u64) -> Value {
    let heartbeat = record["heartbeatMs"].as_u64().unwrap_or(0);
    let mut node = record["object"].clone();
    let fresh = heartbeat > 0 && now.saturating_sub(heartbeat) <= NODE_GRACE.as_millis() as u64;
    let hb = rfc3339(heartbeat);
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": hb, "lastTransitionTime": hb,
        })
    };
    let conditions = if fresh {
        vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        ]
    } else {
        let unknown = |t: &str| {
            cond(
                t,
                "Unknown",
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
            )
        };
        vec![
            unknown("MemoryPressure"),
            unknown("DiskPressure"),
            unknown("PIDPressure"),
            unknown("Ready"),
        ]
    };
    node["status"]["conditions"] = Value::Array(conditions);
    if !fresh {
        let mut taints = node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for effect in ["NoSchedule", "NoExecute"] {
            taints.push(json!({"key": "node.kubernetes.io/unreachable", "effect": effect, "timeAdded": rfc3339(now)}));
        }
        node["spec"]["taints"] = Value::Array(taints);
    }
    node
}

/// The Ready condition's status of a rendered Node ("True", "False" or "Unknown").
pub fn ready_status(node: &Value) -> &str {
    node["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599_000), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn configmap_and_cluster_version() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        assert_eq!(state.cluster_version().unwrap(), None);
        let data = BTreeMap::from([(
            "ClusterConfiguration".to_string(),
            "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nkubernetesVersion: v1.31.4\n".to_string(),
        )]);
        state.put_configmap("kubeadm-config", data).unwrap();
        assert_eq!(
            state.cluster_version().unwrap(),
            Version::parse("v1.31.4").ok()
        );
        let cm = state.configmap("kubeadm-config").unwrap().unwrap();
        assert_eq!(cm["kind"], "ConfigMap");
        assert_eq!(cm["metadata"]["namespace"], "kube-system");
    }

    #[test]
    fn node_ready_follows_heartbeat_age() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        state.update_node("n1", |_| true).unwrap();
        state
            .update_node("n2", |n| {
                n["spec"]["unschedulable"] = json!(true);
                false
            })
            .unwrap();
        let now = now_ms();
        assert_eq!(
            ready_status(&state.node("n1", now).unwrap().unwrap()),
            "True"
        );
        assert_eq!(
            ready_status(&state.node("n2", now).unwrap().unwrap()),
            "Unknown"
        );
        let stale = state
            .node("n1", now + NODE_GRACE.as_millis() as u64 + 1000)
            .unwrap()
            .unwrap();
        assert_eq!(ready_status(&stale), "Unknown");
        assert_eq!(
            stale["spec"]["taints"][0]["key"],
            "node.kubernetes.io/unreachable"
        );
        let names: Vec<String> = state
            .nodes(now)
            .unwrap()
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["n1", "n2"]);
    }

    #[test]
    fn fail_times_decrements_and_then_passes() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        let fault = Fault {
            fail_times: 2,
            message: Some("boom".into()),
            exit_code: Some(3),
            ..Fault::default()
        };
        state
            .put_fault("w0", "kubeadm-upgrade-node", &fault)
            .unwrap();
        for _ in 0..2 {
            let e = state.take_faults(&["w0"], "kubeadm-upgrade-node").unwrap();
            assert_eq!(e.fail, Some(("boom".to_string(), 3)));
        }
        assert_eq!(
            state.take_faults(&["w0"], "kubeadm-upgrade-node").unwrap(),
            FaultEffect::default()
        );
        assert_eq!(
            state.take_faults(&["cp0"], "kubeadm-upgrade-node").unwrap(),
            FaultEffect::default()
        );
    }

    #[test]
    fn concurrent_fault_consumers_fail_exactly_n_times() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        state
            .put_fault(
                "n",
                "kubectl-drain",
                &Fault {
                    fail_times: 5,
                    ..Fault::default()
                },
            )
            .unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let state = state.clone();
                std::thread::spawn(move || {
                    (0..4)
                        .filter(|_| {
                            state
                                .take_faults(&["n"], "kubectl-drain")
                                .unwrap()
                                .fail
                                .is_some()
                        })
                        .count()
                })
            })
            .collect();
        let failures: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(failures, 5);
    }

    #[test]
    fn delay_and_hang_persist_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        state
            .put_fault(
                "n",
                "kubelet",
                &Fault {
                    delay_ms: Some(20),
                    hang: true,
                    ..Fault::default()
                },
            )
            .unwrap();
        for _ in 0..2 {
            let e = state.take_faults(&["n"], "kubelet").unwrap();
            assert_eq!(e.delay, Duration::from_millis(20));
            assert!(e.hang);
        }
        fs::write(
            dir.path().join("faults/n/kubectl-get.json"),
            "{\"fail_time\": 1}",
        )
        .unwrap();
        assert!(matches!(
            state.take_faults(&["n"], "kubectl-get"),
            Err(Error::Json { .. })
        ));
    }
}
