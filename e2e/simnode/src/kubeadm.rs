//! The stand-in `kubeadm`: `version`, `init`, `join`, `upgrade apply`, `upgrade node`.
//! It writes the same files as the real one (static pod manifests, kubeconfigs, the kubelet's
//! config.yaml and kubeadm-flags.env) and keeps the cluster-side objects (kubeadm-config,
//! kubelet-config, API server versions, Nodes) in the shared state.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use serde_yaml::Value as Yaml;

use crate::flags::{self, Kind, Spec, flag};
use crate::state::{now_ms, rfc3339};
use crate::version::{Version, etcd_tag};
use crate::{Ctx, Failure, Outcome, version_info};

pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
pub const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
pub const KUBEADM_FLAGS: &str = "/var/lib/kubelet/kubeadm-flags.env";
pub const MANIFESTS: &str = "/etc/kubernetes/manifests";
pub const APISERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
const COMPONENTS: [&str; 3] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];
/// How long init and join wait for the kubelet to register the Node.
const KUBELET_WAIT: Duration = Duration::from_secs(60);

const GLOBAL: [Spec; 2] = [
    flag("v", Some('v'), Kind::Value),
    flag("rootfs", None, Kind::Value),
];

fn specs(extra: &[Spec]) -> Vec<Spec> {
    GLOBAL.iter().chain(extra).copied().collect()
}

fn usage_error(message: String) -> Failure {
    Failure::new(format!(
        "{message}\nTo see the stack trace of this error execute with --v=5 or higher"
    ))
}

/// Runs `kubeadm <args>`. The fault key is derived by the caller from [`fault_key`].
pub fn run(ctx: &Ctx, args: &[String], out: &mut dyn Write, stdin: &mut dyn BufRead) -> Outcome {
    let (path, rest) = command_path(args);
    match path.as_slice() {
        ["version"] => version(ctx, rest, out),
        ["init"] => init(ctx, rest, out),
        ["join"] => join(ctx, rest, out),
        ["upgrade", "apply"] => upgrade_apply(ctx, rest, out, stdin),
        ["upgrade", "node"] => upgrade_node(ctx, rest, out),
        ["upgrade", other] => Err(usage_error(format!(
            "unknown command {other:?} for \"kubeadm upgrade\""
        ))),
        ["upgrade"] => Err(usage_error(
            "missing subcommand; \"upgrade\" requires a subcommand (apply, node)".into(),
        )),
        [other, ..] => Err(usage_error(format!(
            "unknown command {other:?} for \"kubeadm\""
        ))),
        [] => Err(usage_error("missing subcommand for \"kubeadm\"".into())),
    }
}

/// The subcommand words and the remaining arguments. Leading `-v N`/`--v=N` are skipped, as
/// cobra accepts persistent flags before the subcommand.
fn command_path(args: &[String]) -> (Vec<&str>, &[String]) {
    let mut i = 0;
    let mut path = Vec::new();
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-v" || a == "--v" {
            i += 2;
        } else if a.starts_with("--v=") || (a.starts_with("-v") && a.len() > 2) {
            i += 1;
        } else if a.starts_with('-') {
            break;
        } else if path.is_empty() || (path == ["upgrade"] && path.len() == 1) {
            path.push(a);
            i += 1;
        } else {
            break;
        }
    }
    (path, &args[i.min(args.len())..])
}

/// The fault-injection key of a kubeadm invocation: `kubeadm-init`, `kubeadm-upgrade-apply`, ...
pub fn fault_key(args: &[String]) -> String {
    let (path, _) = command_path(args);
    std::iter::once("kubeadm")
        .chain(path)
        .collect::<Vec<_>>()
        .join("-")
}

fn version(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let p = flags::parse(args, &specs(&[flag("output", Some('o'), Kind::Value)]))
        .map_err(usage_error)?;
    let info = version_info(&ctx.version);
    let text = match p.value("output").unwrap_or("") {
        "short" => format!("{}\n", ctx.version),
        "json" => format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"clientVersion": info})).unwrap_or_default()
        ),
        "yaml" => serde_yaml::to_string(&json!({"clientVersion": info})).unwrap_or_default(),
        "" => format!(
            "kubeadm version: &version.Info{{Major:\"{}\", Minor:\"{}\", GitVersion:\"{}\", GitCommit:\"{}\", GitTreeState:\"clean\", BuildDate:\"{}\", GoVersion:\"{}\", Compiler:\"gc\", Platform:\"linux/amd64\"}}\n",
            info["major"].as_str().unwrap_or(""),
            info["minor"].as_str().unwrap_or(""),
            ctx.version,
            info["gitCommit"].as_str().unwrap_or(""),
            info["buildDate"].as_str().unwrap_or(""),
            info["goVersion"].as_str().unwrap_or(""),
        ),
        other => return Err(usage_error(format!("invalid output format: {other}"))),
    };
    emit(out, &text)
}

fn emit(out: &mut dyn Write, text: &str) -> Outcome {
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::new(format!("write stdout: {e}")))
}

macro_rules! say {
    ($out:expr, $($arg:tt)*) => { emit($out, &format!("{}\n", format_args!($($arg)*)))? };
}

// ---------- configuration files ----------

/// The documents of a kubeadm `--config` file, checked against the API versions this kubeadm
/// minor knows (v1beta4 exists from v1.31; v1beta3 throughout the supported range).
fn load_config(ctx: &Ctx, file: &str) -> Result<Vec<Yaml>, Failure> {
    let text = std::fs::read_to_string(ctx.path(file)).map_err(|e| {
        usage_error(format!(
            "unable to read config from {file:?} : open {file}: {e}"
        ))
    })?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Yaml = serde::Deserialize::deserialize(doc)
            .map_err(|e| usage_error(format!("error converting YAML to JSON: {e}")))?;
        if value.is_null() {
            continue;
        }
        let api = str_at(&value, &["apiVersion"]).unwrap_or_default();
        let kind = str_at(&value, &["kind"]).unwrap_or_default();
        if api.starts_with("kubeadm.k8s.io/") {
            let known = match api.as_str() {
                "kubeadm.k8s.io/v1beta3" => kind != "UpgradeConfiguration",
                "kubeadm.k8s.io/v1beta4" => ctx.version.minor >= 31,
                _ => false,
            };
            if !known {
                return Err(usage_error(format!(
                    "unable to decode config from {file:?}: no kind {kind:?} is registered for version {api:?} in scheme \"k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme/scheme.go:31\""
                )));
            }
        }
        docs.push(value);
    }
    Ok(docs)
}

fn str_at(v: &Yaml, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    match cur {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn doc<'a>(docs: &'a [Yaml], kind: &str) -> Option<&'a Yaml> {
    docs.iter()
        .find(|d| str_at(d, &["kind"]).as_deref() == Some(kind))
}

/// `kubeletExtraArgs` as a sorted map: v1beta3 writes a map, v1beta4 a list of name/value.
fn kubelet_extra_args(node_registration: Option<&Yaml>) -> BTreeMap<String, String> {
    let mut args = BTreeMap::new();
    let Some(raw) = node_registration.and_then(|n| n.get("kubeletExtraArgs")) else {
        return args;
    };
    match raw {
        Yaml::Mapping(map) => {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (k.as_str(), scalar(v)) {
                    args.insert(k.to_string(), v);
                }
            }
        }
        Yaml::Sequence(list) => {
            for item in list {
                if let (Some(k), Some(v)) = (str_at(item, &["name"]), str_at(item, &["value"])) {
                    args.insert(k, v);
                }
            }
        }
        _ => {}
    }
    args
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The cluster-wide settings kubeadm keeps in kubeadm-config.
struct Cluster {
    name: String,
    endpoint: String,
    image_repository: String,
    version: Version,
    pod_subnet: String,
    service_subnet: String,
}

impl Cluster {
    fn from_yaml(
        cfg: Option<&Yaml>,
        default_version: Version,
        node: &str,
    ) -> Result<Self, Failure> {
        let get = |path: &[&str]| cfg.and_then(|c| str_at(c, path));
        let version = match get(&["kubernetesVersion"]) {
            Some(v) => Version::parse(&v).map_err(|e| usage_error(e.to_string()))?,
            None => default_version,
        };
        Ok(Cluster {
            name: get(&["clusterName"]).unwrap_or_else(|| "kubernetes".into()),
            endpoint: get(&["controlPlaneEndpoint"]).unwrap_or_else(|| format!("{node}:6443")),
            image_repository: get(&["imageRepository"]).unwrap_or_else(|| "registry.k8s.io".into()),
            version,
            pod_subnet: get(&["networking", "podSubnet"]).unwrap_or_else(|| "10.244.0.0/16".into()),
            service_subnet: get(&["networking", "serviceSubnet"])
                .unwrap_or_else(|| "10.96.0.0/16".into()),
        })
    }

    fn load(ctx: &Ctx) -> Result<Option<Self>, Failure> {
        let Some(text) = ctx.state.cluster_configuration()? else {
            return Ok(None);
        };
        let yaml: Yaml = serde_yaml::from_str(&text)
            .map_err(|e| Failure::new(format!("kubeadm-config is invalid: {e}")))?;
        Cluster::from_yaml(Some(&yaml), ctx.version, &ctx.node).map(Some)
    }

    fn configuration_yaml(&self, api_version: &str) -> String {
        format!(
            "apiServer: {{}}\napiVersion: {api_version}\ncaCertificateValidityPeriod: 87600h0m0s\ncertificateValidityPeriod: 8760h0m0s\ncertificatesDir: /etc/kubernetes/pki\nclusterName: {}\ncontrolPlaneEndpoint: {}\ncontrollerManager: {{}}\ndns: {{}}\nencryptionAlgorithm: RSA-2048\netcd:\n  local:\n    dataDir: /var/lib/etcd\nimageRepository: {}\nkind: ClusterConfiguration\nkubernetesVersion: {}\nnetworking:\n  dnsDomain: cluster.local\n  podSubnet: {}\n  serviceSubnet: {}\nproxy: {{}}\nscheduler: {{}}\n",
            self.name,
            self.endpoint,
            self.image_repository,
            self.version,
            self.pod_subnet,
            self.service_subnet
        )
    }

    fn save(&self, ctx: &Ctx) -> Outcome {
        let api = if self.version.minor >= 31 {
            "kubeadm.k8s.io/v1beta4"
        } else {
            "kubeadm.k8s.io/v1beta3"
        };
        let data = BTreeMap::from([(
            "ClusterConfiguration".to_string(),
            self.configuration_yaml(api),
        )]);
        ctx.state.put_configmap("kubeadm-config", data)?;
        Ok(())
    }
}

fn kubeconfig(cluster: &Cluster, user: &str) -> String {
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    server: https://{endpoint}\n  name: {name}\ncontexts:\n- context:\n    cluster: {name}\n    user: {user}\n  name: {user}@{name}\ncurrent-context: {user}@{name}\nkind: Config\npreferences: {{}}\nusers:\n- name: {user}\n  user: {{}}\n",
        endpoint = cluster.endpoint,
        name = cluster.name,
    )
}

fn manifest(cluster: &Cluster, component: &str, node: &str) -> String {
    let image = if component == "etcd" {
        format!(
            "{}/etcd:{}",
            cluster.image_repository,
            etcd_tag(cluster.version.minor)
        )
    } else {
        format!(
            "{}/{component}:{}",
            cluster.image_repository, cluster.version
        )
    };
    let args = match component {
        "kube-apiserver" => vec![
            format!("--advertise-address={node}"),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-cluster-ip-range={}", cluster.service_subnet),
        ],
        "kube-controller-manager" => vec![
            format!("--cluster-cidr={}", cluster.pod_subnet),
            format!("--cluster-name={}", cluster.name),
            "--kubeconfig=/etc/kubernetes/controller-manager.conf".into(),
        ],
        "kube-scheduler" => vec!["--kubeconfig=/etc/kubernetes/scheduler.conf".into()],
        _ => vec!["--data-dir=/var/lib/etcd".into(), format!("--name={node}")],
    };
    let args: String = args.iter().map(|a| format!("    - {a}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  creationTimestamp: null\n  labels:\n    component: {component}\n    tier: control-plane\n  name: {component}\n  namespace: kube-system\nspec:\n  containers:\n  - command:\n    - {component}\n{args}    image: {image}\n    imagePullPolicy: IfNotPresent\n    name: {component}\n    resources: {{}}\n  hostNetwork: true\n  priority: 2000001000\n  priorityClassName: system-node-critical\nstatus: {{}}\n"
    )
}

/// The image a manifest on disk runs, e.g. `registry.k8s.io/kube-apiserver:v1.31.4`.
pub fn manifest_image(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("image: ")
            .map(|s| s.trim().to_string())
    })
}

/// Writes the four static pod manifests and mirrors them as Pods in the shared state, as the
/// kubelet would. With `backup`, the old manifests are kept under /etc/kubernetes/tmp first.
fn write_manifests(
    ctx: &Ctx,
    cluster: &Cluster,
    etcd: bool,
    backup: bool,
    out: &mut dyn Write,
) -> Outcome {
    if backup {
        let dir = format!(
            "/etc/kubernetes/tmp/kubeadm-backup-manifests-{}",
            rfc3339(now_ms()).replace(':', "-")
        );
        for component in COMPONENTS.iter().chain(["etcd"].iter()) {
            let src = format!("{MANIFESTS}/{component}.yaml");
            if let Ok(text) = ctx.read(&src) {
                ctx.write(&format!("{dir}/{component}.yaml"), &text)?;
            }
        }
        say!(out, "[upgrade/staticpods] Moving old manifests to {dir}");
    }
    let mut components: Vec<&str> = COMPONENTS.to_vec();
    if etcd || !ctx.exists(&format!("{MANIFESTS}/etcd.yaml")) {
        components.push("etcd");
    }
    for component in components {
        let text = manifest(cluster, component, &ctx.node);
        ctx.write(&format!("{MANIFESTS}/{component}.yaml"), &text)?;
        let image = manifest_image(&text).unwrap_or_default();
        say!(
            out,
            "[upgrade/staticpods] Wrote Static Pod manifest for component {component} ({image})"
        );
        mirror_pod(ctx, component, &image)?;
    }
    Ok(())
}

fn mirror_pod(ctx: &Ctx, component: &str, image: &str) -> Outcome {
    let name = format!("{component}-{}", ctx.node);
    let node = ctx.node.clone();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "kube-system",
            "labels": {"component": component, "tier": "control-plane"},
            "annotations": {"kubernetes.io/config.mirror": "sim", "kubernetes.io/config.source": "file"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "controller": true}],
        },
        "spec": {"nodeName": node, "containers": [{"name": component, "image": image}], "priorityClassName": "system-node-critical"},
        "status": {"phase": "Running"},
    });
    ctx.state.update_pods(|pods| {
        pods.retain(|p| {
            !(p["metadata"]["namespace"] == "kube-system" && p["metadata"]["name"] == name.as_str())
        });
        pods.push(pod);
    })?;
    Ok(())
}

/// The kubelet configuration kubeadm uploads as kubelet-config: the user's KubeletConfiguration
/// (kind's settings) over kubeadm's defaults.
fn kubelet_configuration(user: Option<&Yaml>) -> String {
    let mut cfg = match user {
        Some(Yaml::Mapping(m)) => m.clone(),
        _ => serde_yaml::Mapping::new(),
    };
    let defaults: [(&str, Yaml); 7] = [
        ("apiVersion", "kubelet.config.k8s.io/v1beta1".into()),
        ("kind", "KubeletConfiguration".into()),
        ("cgroupDriver", "systemd".into()),
        ("clusterDNS", Yaml::Sequence(vec!["10.96.0.10".into()])),
        ("clusterDomain", "cluster.local".into()),
        ("rotateCertificates", true.into()),
        ("staticPodPath", MANIFESTS.into()),
    ];
    for (k, v) in defaults {
        cfg.entry(k.into()).or_insert(v);
    }
    serde_yaml::to_string(&Yaml::Mapping(cfg)).unwrap_or_default()
}

fn kubeadm_flags_env(node_registration: Option<&Yaml>) -> String {
    let mut args = kubelet_extra_args(node_registration);
    let cri = node_registration
        .and_then(|n| str_at(n, &["criSocket"]))
        .unwrap_or_else(|| "unix:///run/containerd/containerd.sock".into());
    args.entry("container-runtime-endpoint".into())
        .or_insert(cri);
    let flags: Vec<String> = args.iter().map(|(k, v)| format!("--{k}={v}")).collect();
    format!("KUBELET_KUBEADM_ARGS=\"{}\"\n", flags.join(" "))
}

/// Writes the kubelet's files from the cluster's kubelet-config and restarts the kubelet like
/// the kubelet-start phase, then waits for the Node to register.
fn kubelet_start(ctx: &Ctx, node_registration: Option<&Yaml>, out: &mut dyn Write) -> Outcome {
    let config = kubelet_config_from_cluster(ctx)?;
    say!(
        out,
        "[kubelet-start] Writing kubelet environment file with flags to file \"{KUBEADM_FLAGS}\""
    );
    ctx.write(KUBEADM_FLAGS, &kubeadm_flags_env(node_registration))?;
    say!(
        out,
        "[kubelet-start] Writing kubelet configuration to file \"{KUBELET_CONFIG}\""
    );
    ctx.write(KUBELET_CONFIG, &config)?;
    say!(out, "[kubelet-start] Starting the kubelet");
    systemctl(ctx, &["restart", "kubelet"])?;
    if ctx.systemd {
        say!(
            out,
            "[kubelet-check] Waiting for a healthy kubelet. This can take up to {}s",
            KUBELET_WAIT.as_secs()
        );
        let start = Instant::now();
        while !ctx.state.node_exists(&ctx.node)? {
            if start.elapsed() > KUBELET_WAIT {
                return Err(Failure::new(format!(
                    "error execution phase kubelet-start: timed out waiting for the kubelet on node {:?} to register: check 'systemctl status kubelet' and 'journalctl -xeu kubelet'",
                    ctx.node
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        say!(
            out,
            "[kubelet-check] The kubelet is healthy after {}ms",
            start.elapsed().as_millis()
        );
    }
    Ok(())
}

fn kubelet_config_from_cluster(ctx: &Ctx) -> Result<String, Failure> {
    ctx.state
        .configmap("kubelet-config")?
        .and_then(|cm| cm["data"]["kubelet"].as_str().map(String::from))
        .ok_or_else(|| {
            Failure::new(
                "error execution phase kubelet-start: configmaps \"kubelet-config\" not found",
            )
        })
}

pub fn systemctl(ctx: &Ctx, args: &[&str]) -> Outcome {
    if !ctx.systemd {
        return Ok(());
    }
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .map_err(|e| Failure::new(format!("failed to run systemctl {}: {e}", args.join(" "))))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "systemctl {} failed: {status}",
            args.join(" ")
        )))
    }
}

/// The mark-control-plane phase: the control-plane label and taint on this node's Node.
fn mark_control_plane(ctx: &Ctx, out: &mut dyn Write) -> Outcome {
    say!(
        out,
        "[mark-control-plane] Marking the node {} as control-plane by adding the labels: [node-role.kubernetes.io/control-plane node.kubernetes.io/exclude-from-external-load-balancers]",
        ctx.node
    );
    ctx.state.update_node(&ctx.node, |node| {
        node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("");
        node["metadata"]["labels"]["node.kubernetes.io/exclude-from-external-load-balancers"] =
            json!("");
        let taint = json!({"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"});
        let taints = node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !taints.contains(&taint) {
            let mut taints = taints;
            taints.push(taint);
            node["spec"]["taints"] = json!(taints);
        }
        false
    })?;
    Ok(())
}

fn preflight_ignored(p: &flags::Parsed, check: &str) -> bool {
    p.list("skip-phases").iter().any(|s| s == "preflight")
        || p.list("ignore-preflight-errors")
            .iter()
            .any(|s| s.eq_ignore_ascii_case("all") || s == check)
}

fn validate_ignore_list(p: &flags::Parsed) -> Outcome {
    let list = p.list("ignore-preflight-errors");
    if list.len() > 1 && list.iter().any(|s| s.eq_ignore_ascii_case("all")) {
        return Err(usage_error(
            "ignore-preflight-errors: Invalid value: \"all\": don't specify individual checks if 'all' is used".into(),
        ));
    }
    Ok(())
}

// ---------- init / join ----------

const INIT_FLAGS: [Spec; 8] = [
    flag("config", None, Kind::Value),
    flag("skip-phases", None, Kind::Value),
    flag("ignore-preflight-errors", None, Kind::Value),
    flag("skip-token-print", None, Kind::Bool),
    flag("upload-certs", None, Kind::Bool),
    flag("node-name", None, Kind::Value),
    flag("dry-run", None, Kind::Bool),
    flag("kubernetes-version", None, Kind::Value),
];

fn init(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let p = flags::parse(args, &specs(&INIT_FLAGS)).map_err(usage_error)?;
    validate_ignore_list(&p)?;
    let docs = match p.value("config") {
        Some(file) => load_config(ctx, file)?,
        None => Vec::new(),
    };
    let mut cluster =
        Cluster::from_yaml(doc(&docs, "ClusterConfiguration"), ctx.version, &ctx.node)?;
    if let Some(v) = p.value("kubernetes-version") {
        cluster.version = Version::parse(v).map_err(|e| usage_error(e.to_string()))?;
    }
    if cluster.version.minor_key() > ctx.version.minor_key()
        || cluster.version.minors_ahead_of(&ctx.version) < -1
    {
        return Err(usage_error(format!(
            "this version of kubeadm only supports deploying clusters with the control plane version >= v{}.{}.0. Current version: {}",
            ctx.version.major,
            ctx.version.minor.saturating_sub(1),
            cluster.version
        )));
    }
    say!(out, "[init] Using Kubernetes version: {}", cluster.version);
    if ctx.exists(APISERVER_MANIFEST)
        && !preflight_ignored(
            &p,
            "FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml",
        )
    {
        return Err(Failure::new(format!(
            "error execution phase preflight: [preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml]: {APISERVER_MANIFEST} already exists\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`"
        )));
    }
    if p.bool("dry-run", false) {
        say!(
            out,
            "[dryrun] Would initialize control plane {} at {}",
            ctx.node,
            cluster.version
        );
        return Ok(());
    }
    let init_cfg = doc(&docs, "InitConfiguration");
    let node_registration = init_cfg.and_then(|d| d.get("nodeRegistration"));
    for (file, user) in [
        (ADMIN_CONF, "kubernetes-admin".to_string()),
        (
            "/etc/kubernetes/super-admin.conf",
            "kubernetes-super-admin".to_string(),
        ),
        (
            "/etc/kubernetes/controller-manager.conf",
            "system:kube-controller-manager".to_string(),
        ),
        (
            "/etc/kubernetes/scheduler.conf",
            "system:kube-scheduler".to_string(),
        ),
        (KUBELET_CONF, format!("system:node:{}", ctx.node)),
    ] {
        say!(
            out,
            "[kubeconfig] Writing {:?} kubeconfig file",
            file.rsplit('/').next().unwrap_or(file)
        );
        ctx.write(file, &kubeconfig(&cluster, &user))?;
    }
    cluster.save(ctx)?;
    say!(
        out,
        "[upload-config] Storing the configuration used in ConfigMap \"kubeadm-config\" in the \"kube-system\" Namespace"
    );
    let kubelet_cfg = kubelet_configuration(doc(&docs, "KubeletConfiguration"));
    ctx.state.put_configmap(
        "kubelet-config",
        BTreeMap::from([("kubelet".to_string(), kubelet_cfg)]),
    )?;
    say!(
        out,
        "[kubelet] Creating a ConfigMap \"kubelet-config\" in namespace kube-system with the configuration for the kubelets in the cluster"
    );
    say!(out, "[control-plane] Using manifest folder \"{MANIFESTS}\"");
    write_manifests(ctx, &cluster, true, false, out)?;
    ctx.state.set_apiserver(&ctx.node, &cluster.version)?;
    coredns_pods(ctx)?;
    kubelet_start(ctx, node_registration, out)?;
    mark_control_plane(ctx, out)?;
    say!(
        out,
        "\nYour Kubernetes control-plane has initialized successfully!"
    );
    Ok(())
}

/// The CoreDNS Deployment's two pods, created by the addon phase of init.
fn coredns_pods(ctx: &Ctx) -> Outcome {
    let node = ctx.node.clone();
    ctx.state.update_pods(|pods| {
        pods.retain(|p| p["metadata"]["labels"]["k8s-app"] != "kube-dns");
        for suffix in ["sim01", "sim02"] {
            pods.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("coredns-7c65d6cfc9-{suffix}"), "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "coredns-7c65d6cfc9", "controller": true}],
                },
                "spec": {"nodeName": node, "containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.3"}],
                         "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
                "status": {"phase": "Running"},
            }));
        }
    })?;
    Ok(())
}

const JOIN_FLAGS: [Spec; 10] = [
    flag("config", None, Kind::Value),
    flag("skip-phases", None, Kind::Value),
    flag("ignore-preflight-errors", None, Kind::Value),
    flag("control-plane", None, Kind::Bool),
    flag("node-name", None, Kind::Value),
    flag("token", None, Kind::Value),
    flag("discovery-token-ca-cert-hash", None, Kind::Value),
    flag(
        "discovery-token-unsafe-skip-ca-verification",
        None,
        Kind::Bool,
    ),
    flag("certificate-key", None, Kind::Value),
    flag("dry-run", None, Kind::Bool),
];

fn join(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let p = flags::parse(args, &specs(&JOIN_FLAGS)).map_err(usage_error)?;
    validate_ignore_list(&p)?;
    let docs = match p.value("config") {
        Some(file) => load_config(ctx, file)?,
        None => Vec::new(),
    };
    let join_cfg = doc(&docs, "JoinConfiguration");
    let control_plane =
        p.bool("control-plane", false) || join_cfg.and_then(|j| j.get("controlPlane")).is_some();
    say!(out, "[preflight] Running pre-flight checks");
    let Some(cluster) = Cluster::load(ctx)? else {
        return Err(Failure::new(
            "error execution phase preflight: couldn't validate the identity of the API Server: the cluster has no kube-system/kubeadm-config (run kubeadm init on the first control-plane node)",
        ));
    };
    if ctx.exists(KUBELET_CONF)
        && !preflight_ignored(&p, "FileAvailable--etc-kubernetes-kubelet.conf")
    {
        return Err(Failure::new(format!(
            "error execution phase preflight: [preflight] Some fatal errors occurred:\n\t[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: {KUBELET_CONF} already exists"
        )));
    }
    if p.bool("dry-run", false) {
        say!(
            out,
            "[dryrun] Would join {} (control plane: {control_plane})",
            ctx.node
        );
        return Ok(());
    }
    say!(
        out,
        "[preflight] Reading configuration from the \"kubeadm-config\" ConfigMap in namespace \"kube-system\"..."
    );
    if control_plane {
        ctx.write(ADMIN_CONF, &kubeconfig(&cluster, "kubernetes-admin"))?;
        write_manifests(ctx, &cluster, true, false, out)?;
        ctx.state.set_apiserver(&ctx.node, &cluster.version)?;
    }
    ctx.write(
        KUBELET_CONF,
        &kubeconfig(&cluster, &format!("system:node:{}", ctx.node)),
    )?;
    kubelet_start(ctx, join_cfg.and_then(|j| j.get("nodeRegistration")), out)?;
    if control_plane {
        mark_control_plane(ctx, out)?;
    }
    say!(out, "\nThis node has joined the cluster");
    Ok(())
}

// ---------- upgrade ----------

const UPGRADE_COMMON: [Spec; 9] = [
    flag("config", None, Kind::Value),
    flag("kubeconfig", None, Kind::Value),
    flag("dry-run", None, Kind::Bool),
    flag("ignore-preflight-errors", None, Kind::Value),
    flag("skip-phases", None, Kind::Value),
    flag("certificate-renewal", None, Kind::Bool),
    flag("etcd-upgrade", None, Kind::Bool),
    flag("patches", None, Kind::Value),
    flag("print-config", None, Kind::Bool),
];
const APPLY_ONLY: [Spec; 4] = [
    flag("yes", Some('y'), Kind::Bool),
    flag("force", Some('f'), Kind::Bool),
    flag("allow-experimental-upgrades", None, Kind::Bool),
    flag("allow-release-candidate-upgrades", None, Kind::Bool),
];
/// Flags that may accompany `--config` (kubeadm's ValidateMixedArguments allow-list as far as
/// upgrade is concerned); every other one is refused as in kubernetes/kubeadm#3054.
const MIXABLE_WITH_CONFIG: [&str; 6] = [
    "config",
    "kubeconfig",
    "dry-run",
    "ignore-preflight-errors",
    "skip-phases",
    "v",
];

/// The UpgradeConfiguration of `--config`, accepted from kubeadm v1.31 (v1beta4).
fn upgrade_configuration(ctx: &Ctx, p: &flags::Parsed) -> Result<Option<Yaml>, Failure> {
    let Some(file) = p.value("config") else {
        return Ok(None);
    };
    let mixed: Vec<&str> = p
        .changed_names()
        .into_iter()
        .filter(|n| !MIXABLE_WITH_CONFIG.contains(n))
        .collect();
    if !mixed.is_empty() {
        return Err(usage_error(format!(
            "can not mix '--config' with arguments [{}]",
            mixed.join(" ")
        )));
    }
    let docs = load_config(ctx, file)?;
    let upgrade = doc(&docs, "UpgradeConfiguration").cloned().ok_or_else(|| {
        usage_error(format!(
            "no UpgradeConfiguration kind was found in the YAML file {file:?}"
        ))
    })?;
    Ok(Some(upgrade))
}

fn yaml_bool(v: Option<&Yaml>, path: &[&str]) -> Option<bool> {
    v.and_then(|v| str_at(v, path)).map(|s| s == "true")
}

fn version_errors(fatal: &[String], skippable: &[String]) -> Failure {
    if !fatal.is_empty() {
        let list: String = fatal
            .iter()
            .chain(skippable)
            .map(|m| format!("- {m}\n"))
            .collect();
        Failure::new(format!(
            "[upgrade/version] FATAL: the --version argument is invalid due to these fatal errors:\n\n{list}\nPlease fix the misalignments highlighted above and try upgrading again"
        ))
    } else {
        let list: String = skippable.iter().map(|m| format!("- {m}\n")).collect();
        Failure::new(format!(
            "[upgrade/version] FATAL: the --version argument is invalid due to these errors:\n\n{list}\nCan be bypassed if you pass the --force flag"
        ))
    }
}

/// kubeadm's EnforceVersionPolicies: (fatal, skippable-with-force) errors.
pub fn version_policy(
    target: &Version,
    cluster: &Version,
    kubeadm: &Version,
) -> (Vec<String>, Vec<String>) {
    let (mut fatal, mut skippable) = (Vec::new(), Vec::new());
    if target.minor_key() > kubeadm.minor_key() {
        fatal.push(format!(
            "Specified version to upgrade to {:?} is higher than the kubeadm version {:?}. Upgrade kubeadm first using the tool you used to install kubeadm",
            target.to_string(), kubeadm.to_string()
        ));
    } else if target > kubeadm {
        skippable.push(format!(
            "Specified version to upgrade to {:?} is higher than the kubeadm version {:?}. Upgrade kubeadm first using the tool you used to install kubeadm",
            target.to_string(), kubeadm.to_string()
        ));
    }
    if kubeadm.minors_ahead_of(target) > 1 {
        fatal.push(format!(
            "Kubeadm version {:?} can only be used to upgrade to Kubernetes version {:?}",
            kubeadm.to_string(),
            format!("v{}.{}", kubeadm.major, kubeadm.minor)
        ));
    }
    if target.minors_ahead_of(cluster) > 1 {
        fatal.push(format!(
            "Specified version to upgrade to {:?} is too high; kubeadm can upgrade only 1 minor version at a time",
            target.to_string()
        ));
    }
    if target < cluster {
        if cluster.minors_ahead_of(target) > 1 {
            fatal.push(format!(
                "Specified version to downgrade to {:?} is too low; kubeadm can downgrade only 1 minor version at a time",
                target.to_string()
            ));
        }
        skippable.push(format!(
            "Specified version to upgrade to {:?} is equal to or lower than the cluster version {:?}. Downgrading is not supported yet",
            target.to_string(), cluster.to_string()
        ));
    }
    (fatal, skippable)
}

fn require_kubeconfig(ctx: &Ctx, p: &flags::Parsed, default: &str) -> Outcome {
    let file = p.value("kubeconfig").unwrap_or(default);
    if ctx.exists(file) {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "[upgrade/config] FATAL: failed to create a Kubernetes client from file {file:?}: failed to load admin kubeconfig: open {file}: no such file or directory"
        )))
    }
}

fn upgrade_apply(
    ctx: &Ctx,
    args: &[String],
    out: &mut dyn Write,
    stdin: &mut dyn BufRead,
) -> Outcome {
    let all: Vec<Spec> = specs(&UPGRADE_COMMON)
        .into_iter()
        .chain(APPLY_ONLY)
        .collect();
    let p = flags::parse(args, &all).map_err(usage_error)?;
    validate_ignore_list(&p)?;
    let upgrade = upgrade_configuration(ctx, &p)?;
    let apply_cfg = upgrade.as_ref().and_then(|u| u.get("apply"));
    let target_text = p
        .positionals
        .first()
        .cloned()
        .or_else(|| apply_cfg.and_then(|a| str_at(a, &["kubernetesVersion"])))
        .ok_or_else(|| {
            usage_error(
                "missing one or more required arguments. Required arguments: [version]".into(),
            )
        })?;
    if p.positionals.len() > 1 {
        return Err(usage_error(format!(
            "too many arguments. Required arguments: [version], got: {:?}",
            p.positionals
        )));
    }
    let target = Version::parse(&target_text).map_err(|_| {
        usage_error(format!(
            "unable to parse normalized version {target_text:?} as a semantic version"
        ))
    })?;
    let force = p.bool("force", false) || yaml_bool(apply_cfg, &["forceUpgrade"]).unwrap_or(false);
    let yes = p.bool("yes", false) || force;
    let dry_run = p.bool("dry-run", false) || yaml_bool(apply_cfg, &["dryRun"]).unwrap_or(false);
    let etcd_upgrade = p.bool(
        "etcd-upgrade",
        yaml_bool(apply_cfg, &["etcdUpgrade"]).unwrap_or(true),
    );
    let skip: Vec<String> = p
        .list("skip-phases")
        .into_iter()
        .chain(
            apply_cfg
                .and_then(|a| a.get("skipPhases"))
                .and_then(|s| s.as_sequence())
                .into_iter()
                .flatten()
                .filter_map(scalar),
        )
        .collect();

    say!(
        out,
        "[upgrade] Reading configuration from the \"kubeadm-config\" ConfigMap in namespace \"kube-system\"..."
    );
    require_kubeconfig(ctx, &p, ADMIN_CONF)?;
    let Some(mut cluster) = Cluster::load(ctx)? else {
        return Err(Failure::new(
            "[upgrade/init config] FATAL: configmaps \"kubeadm-config\" not found",
        ));
    };
    if !ctx.exists(APISERVER_MANIFEST) {
        return Err(Failure::new(format!(
            "[upgrade/health] FATAL: [preflight] Some fatal errors occurred:\n\t[ERROR StaticPodManifest]: the manifest file {APISERVER_MANIFEST:?} does not exist: this is not a control-plane node"
        )));
    }
    say!(out, "[upgrade] Running cluster health checks");
    say!(
        out,
        "[upgrade/version] You have chosen to upgrade to version {target:?}",
        target = target.to_string()
    );
    say!(
        out,
        "[upgrade/versions] Cluster version: {}",
        cluster.version
    );
    say!(out, "[upgrade/versions] kubeadm version: {}", ctx.version);
    let (fatal, skippable) = version_policy(&target, &cluster.version, &ctx.version);
    if !fatal.is_empty() || (!skippable.is_empty() && !force) {
        return Err(version_errors(&fatal, &skippable));
    }
    if !yes && !dry_run {
        emit(out, "[upgrade] Are you sure you want to proceed? [y/N]: ")?;
        let _ = out.flush();
        let mut answer = String::new();
        let _ = stdin.read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y") {
            return Err(Failure::new(
                "won't proceed; the user didn't answer (Y|y) in order to continue",
            ));
        }
    }
    if dry_run {
        say!(
            out,
            "[dryrun] Would upgrade the control plane on {} to {target} (no changes made)",
            ctx.node
        );
        return Ok(());
    }
    cluster.version = target;
    let skipped = |phase: &str| {
        skip.iter()
            .any(|s| s == phase || phase.starts_with(&format!("{s}/")))
    };
    if !skipped("control-plane") {
        say!(
            out,
            "[upgrade/staticpods] Preparing for \"kube-apiserver\" upgrade"
        );
        write_manifests(ctx, &cluster, etcd_upgrade, true, out)?;
        ctx.state.set_apiserver(&ctx.node, &target)?;
    }
    if !skipped("upload-config") {
        cluster.save(ctx)?;
        say!(
            out,
            "[upload-config] Storing the configuration used in ConfigMap \"kubeadm-config\" in the \"kube-system\" Namespace"
        );
        let kubelet = kubelet_config_from_cluster(ctx)?;
        ctx.state.put_configmap(
            "kubelet-config",
            BTreeMap::from([("kubelet".to_string(), kubelet)]),
        )?;
    }
    if !skipped("kubelet-config") {
        ctx.write(KUBELET_CONFIG, &kubelet_config_from_cluster(ctx)?)?;
        say!(
            out,
            "[upgrade] Backing up kubelet config file to /etc/kubernetes/tmp; writing {KUBELET_CONFIG}"
        );
    }
    for addon in ["addon/coredns", "addon/kube-proxy"] {
        if skipped(addon) {
            say!(out, "[upgrade/addon] Skipping phase {addon}");
        } else {
            say!(
                out,
                "[addons] Applied essential addon: {}",
                addon
                    .trim_start_matches("addon/")
                    .replace("coredns", "CoreDNS")
            );
        }
    }
    say!(
        out,
        "\n[upgrade/successful] SUCCESS! Your cluster was upgraded to \"{target}\". Enjoy!\n"
    );
    say!(
        out,
        "[upgrade/kubelet] Now that your control plane is upgraded, please proceed with upgrading your kubelets if you haven't already done so."
    );
    Ok(())
}

fn upgrade_node(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let p = flags::parse(args, &specs(&UPGRADE_COMMON)).map_err(usage_error)?;
    validate_ignore_list(&p)?;
    let upgrade = upgrade_configuration(ctx, &p)?;
    let node_cfg = upgrade.as_ref().and_then(|u| u.get("node"));
    let dry_run = p.bool("dry-run", false) || yaml_bool(node_cfg, &["dryRun"]).unwrap_or(false);
    let etcd_upgrade = p.bool(
        "etcd-upgrade",
        yaml_bool(node_cfg, &["etcdUpgrade"]).unwrap_or(true),
    );
    let skip: Vec<String> = p
        .list("skip-phases")
        .into_iter()
        .chain(
            node_cfg
                .and_then(|a| a.get("skipPhases"))
                .and_then(|s| s.as_sequence())
                .into_iter()
                .flatten()
                .filter_map(scalar),
        )
        .collect();
    let skipped = |phase: &str| {
        skip.iter()
            .any(|s| s == phase || phase.starts_with(&format!("{s}/")))
    };

    let control_plane = ctx.exists(APISERVER_MANIFEST);
    let default_kubeconfig = if control_plane || ctx.exists(ADMIN_CONF) {
        ADMIN_CONF
    } else {
        KUBELET_CONF
    };
    require_kubeconfig(ctx, &p, default_kubeconfig)?;
    say!(
        out,
        "[upgrade] Reading configuration from the \"kubeadm-config\" ConfigMap in namespace \"kube-system\"..."
    );
    let Some(cluster) = Cluster::load(ctx)? else {
        return Err(Failure::new(
            "[upgrade/init config] FATAL: configmaps \"kubeadm-config\" not found",
        ));
    };
    if ctx.version < cluster.version {
        return Err(Failure::new(format!(
            "error execution phase preflight: the kubeadm version {:?} is older than the cluster version {:?}: upgrade kubeadm first",
            ctx.version.to_string(),
            cluster.version.to_string()
        )));
    }
    if !control_plane {
        say!(
            out,
            "[preflight] Skipping prepull. Not a control plane node."
        );
    }
    if dry_run {
        say!(
            out,
            "[dryrun] Would upgrade node {} to the cluster version {} (no changes made)",
            ctx.node,
            cluster.version
        );
        return Ok(());
    }
    if control_plane && !skipped("control-plane") {
        say!(
            out,
            "[upgrade] Upgrading your Static Pod-hosted control plane instance to version {:?}...",
            cluster.version.to_string()
        );
        write_manifests(ctx, &cluster, etcd_upgrade, true, out)?;
        ctx.state.set_apiserver(&ctx.node, &cluster.version)?;
    } else if !control_plane {
        say!(out, "[upgrade] Skipping phase. Not a control plane node.");
    }
    if !skipped("kubelet-config") {
        ctx.write(KUBELET_CONFIG, &kubelet_config_from_cluster(ctx)?)?;
        say!(
            out,
            "[upgrade] Writing kubelet configuration to file \"{KUBELET_CONFIG}\""
        );
    }
    say!(
        out,
        "[upgrade] The configuration for this node was successfully upgraded!"
    );
    say!(
        out,
        "[upgrade] Now you should go ahead and upgrade the kubelet package using your package manager."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;

    struct Node {
        _dir: tempfile::TempDir,
        ctx: Ctx,
    }

    fn node(version: &str, name: &str, state: &State, shared: &std::path::Path) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let _ = shared;
        Node {
            ctx: Ctx {
                version: Version::parse(version).unwrap(),
                root: dir.path().to_path_buf(),
                state: state.clone(),
                node: name.to_string(),
                systemd: false,
            },
            _dir: dir,
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn exec(ctx: &Ctx, list: &[&str]) -> Result<String, Failure> {
        let mut out = Vec::new();
        let mut stdin: &[u8] = b"";
        run(ctx, &args(list), &mut out, &mut stdin)?;
        Ok(String::from_utf8(out).unwrap())
    }

    const KIND_CONFIG: &str = "apiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\nclusterName: demo\nkubernetesVersion: v1.30.6\ncontrolPlaneEndpoint: demo-cp-0:6443\n---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: InitConfiguration\nnodeRegistration:\n  criSocket: unix:///run/containerd/containerd.sock\n  kubeletExtraArgs:\n    node-ip: 172.18.0.2\n    provider-id: docker:////demo-cp-0\n---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\nnodeRegistration:\n  kubeletExtraArgs:\n    fail-swap-on: \"false\"\n---\napiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nfailSwapOn: false\ncgroupRoot: /kubelet\nimageGCHighThresholdPercent: 100\n";

    struct Cluster2 {
        _shared: tempfile::TempDir,
        cp: Node,
        worker: Node,
    }

    fn cluster_at_1_30() -> Cluster2 {
        let shared = tempfile::tempdir().unwrap();
        let state = State::new(shared.path());
        let cp = node("v1.30.6", "demo-cp-0", &state, shared.path());
        let worker = node("v1.30.6", "demo-md-0-0", &state, shared.path());
        for n in [&cp, &worker] {
            n.ctx.write("/kind/kubeadm.conf", KIND_CONFIG).unwrap();
        }
        exec(
            &cp.ctx,
            &[
                "init",
                "--config=/kind/kubeadm.conf",
                "--skip-token-print",
                "--v=6",
            ],
        )
        .unwrap();
        exec(
            &worker.ctx,
            &[
                "join",
                "--config",
                "/kind/kubeadm.conf",
                "--skip-phases=preflight",
                "--ignore-preflight-errors=all",
                "--v=6",
            ],
        )
        .unwrap();
        Cluster2 {
            _shared: shared,
            cp,
            worker,
        }
    }

    fn with_version(n: &Node, v: &str) -> Ctx {
        Ctx {
            version: Version::parse(v).unwrap(),
            ..n.ctx.clone()
        }
    }

    #[test]
    fn version_outputs() {
        let shared = tempfile::tempdir().unwrap();
        let n = node("v1.31.4", "n", &State::new(shared.path()), shared.path());
        assert_eq!(
            exec(&n.ctx, &["version", "-o", "short"]).unwrap(),
            "v1.31.4\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&exec(&n.ctx, &["version", "-o=json"]).unwrap()).unwrap();
        assert_eq!(json["clientVersion"]["minor"], "31");
        assert_eq!(json["clientVersion"]["gitVersion"], "v1.31.4");
        assert!(
            exec(&n.ctx, &["version"])
                .unwrap()
                .starts_with("kubeadm version: &version.Info{Major:\"1\"")
        );
        assert!(
            exec(&n.ctx, &["version", "-o", "xml"])
                .unwrap_err()
                .message
                .contains("invalid output format")
        );
        assert!(
            exec(&n.ctx, &["reset-all"])
                .unwrap_err()
                .message
                .starts_with("unknown command \"reset-all\" for \"kubeadm\"")
        );
        assert!(
            exec(&n.ctx, &["init", "--bogus"])
                .unwrap_err()
                .message
                .starts_with("unknown flag: --bogus")
        );
    }

    #[test]
    fn init_and_join_write_kind_layout_and_cluster_objects() {
        let c = cluster_at_1_30();
        let api = c.cp.ctx.read(APISERVER_MANIFEST).unwrap();
        assert_eq!(
            manifest_image(&api).unwrap(),
            "registry.k8s.io/kube-apiserver:v1.30.6"
        );
        assert!(
            c.cp.ctx
                .read("/etc/kubernetes/manifests/etcd.yaml")
                .unwrap()
                .contains("etcd:3.5.15-0")
        );
        assert!(c.cp.ctx.exists(ADMIN_CONF) && c.cp.ctx.exists(KUBELET_CONF));
        assert!(!c.worker.ctx.exists(ADMIN_CONF) && !c.worker.ctx.exists(APISERVER_MANIFEST));
        let cfg = c.worker.ctx.read(KUBELET_CONFIG).unwrap();
        assert!(cfg.contains("failSwapOn: false") && cfg.contains("cgroupRoot: /kubelet"));
        let flags = c.cp.ctx.read(KUBEADM_FLAGS).unwrap();
        assert!(
            flags.contains("--provider-id=docker:////demo-cp-0"),
            "{flags}"
        );
        assert!(
            flags.contains("--container-runtime-endpoint=unix:///run/containerd/containerd.sock")
        );
        let state = &c.cp.ctx.state;
        assert_eq!(
            state.cluster_version().unwrap().unwrap().to_string(),
            "v1.30.6"
        );
        assert_eq!(state.apiservers().unwrap().len(), 1);
        let cp_node = state.node("demo-cp-0", now_ms()).unwrap().unwrap();
        assert_eq!(
            cp_node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
            ""
        );
        // A second init is refused by preflight.
        let again = exec(&c.cp.ctx, &["init", "--config=/kind/kubeadm.conf"]).unwrap_err();
        assert!(
            again
                .message
                .contains("FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml")
        );
    }

    #[test]
    fn v1beta4_config_is_unknown_to_kubeadm_1_30() {
        let shared = tempfile::tempdir().unwrap();
        let n = node("v1.30.6", "n", &State::new(shared.path()), shared.path());
        n.ctx
            .write(
                "/c.yaml",
                "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\n",
            )
            .unwrap();
        let e = exec(&n.ctx, &["init", "--config", "/c.yaml"]).unwrap_err();
        assert!(e.message.contains(
            "no kind \"ClusterConfiguration\" is registered for version \"kubeadm.k8s.io/v1beta4\""
        ));
    }

    #[test]
    fn apply_refusals() {
        let c = cluster_at_1_30();
        let cases: [(&str, &str, &[&str], &str); 8] = [
            (
                "kubeadm too old",
                "v1.30.6",
                &["upgrade", "apply", "v1.31.4", "--yes"],
                "is higher than the kubeadm version",
            ),
            (
                "skipped minor",
                "v1.32.3",
                &["upgrade", "apply", "v1.32.3", "--yes"],
                "kubeadm can upgrade only 1 minor version at a time",
            ),
            (
                "downgrade without force",
                "v1.30.6",
                &["upgrade", "apply", "v1.30.0", "--yes"],
                "Can be bypassed if you pass the --force flag",
            ),
            (
                "no --yes and no tty",
                "v1.31.4",
                &["upgrade", "apply", "v1.31.4"],
                "won't proceed; the user didn't answer (Y|y)",
            ),
            (
                "no version",
                "v1.31.4",
                &["upgrade", "apply", "-y"],
                "Required arguments: [version]",
            ),
            (
                "bad version",
                "v1.31.4",
                &["upgrade", "apply", "latest", "-y"],
                "unable to parse normalized version",
            ),
            (
                "config mixed with yes",
                "v1.31.4",
                &["upgrade", "apply", "--config", "/u.yaml", "--yes"],
                "can not mix '--config' with arguments [yes]",
            ),
            (
                "unknown subcommand",
                "v1.31.4",
                &["upgrade", "plan-it"],
                "unknown command \"plan-it\" for \"kubeadm upgrade\"",
            ),
        ];
        for (name, kubeadm, argv, want) in cases {
            let ctx = with_version(&c.cp, kubeadm);
            let err = exec(&ctx, argv).unwrap_err();
            assert!(err.message.contains(want), "{name}: {}", err.message);
            assert_eq!(err.code, 1, "{name}");
        }
        // Nothing changed.
        assert_eq!(
            c.cp.ctx
                .state
                .cluster_version()
                .unwrap()
                .unwrap()
                .to_string(),
            "v1.30.6"
        );
        // A worker has no admin.conf.
        let err = exec(
            &with_version(&c.worker, "v1.31.4"),
            &["upgrade", "apply", "v1.31.4", "-y"],
        )
        .unwrap_err();
        assert!(
            err.message.contains("/etc/kubernetes/admin.conf"),
            "{}",
            err.message
        );
        // Downgrade with --force (same minor) goes through.
        exec(&c.cp.ctx, &["upgrade", "apply", "v1.30.0", "--force"]).unwrap();
        assert_eq!(
            c.cp.ctx
                .state
                .cluster_version()
                .unwrap()
                .unwrap()
                .to_string(),
            "v1.30.0"
        );
    }

    #[test]
    fn apply_then_node_upgrades_cluster_and_is_idempotent() {
        let c = cluster_at_1_30();
        let cp = with_version(&c.cp, "v1.31.4");
        let out = exec(
            &cp,
            &[
                "upgrade",
                "apply",
                "v1.31.4",
                "--yes",
                "--ignore-preflight-errors=SystemVerification,Swap",
            ],
        )
        .unwrap();
        assert!(
            out.contains("[upgrade/successful] SUCCESS! Your cluster was upgraded to \"v1.31.4\"")
        );
        assert_eq!(
            manifest_image(&cp.read(APISERVER_MANIFEST).unwrap()).unwrap(),
            "registry.k8s.io/kube-apiserver:v1.31.4"
        );
        assert_eq!(
            cp.state.cluster_version().unwrap().unwrap().to_string(),
            "v1.31.4"
        );
        assert_eq!(
            cp.state.apiservers().unwrap()["demo-cp-0"].to_string(),
            "v1.31.4"
        );
        let pods = cp.state.pods().unwrap();
        assert!(
            pods.iter()
                .any(|p| p["metadata"]["name"] == "kube-apiserver-demo-cp-0"
                    && p["spec"]["containers"][0]["image"]
                        == "registry.k8s.io/kube-apiserver:v1.31.4")
        );

        // The worker with the old kubeadm is refused, with the new one it passes, twice.
        let err = exec(&c.worker.ctx, &["upgrade", "node"]).unwrap_err();
        assert!(
            err.message.contains("older than the cluster version"),
            "{}",
            err.message
        );
        let worker = with_version(&c.worker, "v1.31.4");
        for _ in 0..2 {
            let out = exec(
                &worker,
                &["upgrade", "node", "--ignore-preflight-errors=all"],
            )
            .unwrap();
            assert!(out.contains("Skipping prepull. Not a control plane node."));
        }
        assert!(!worker.exists(APISERVER_MANIFEST));
    }

    #[test]
    fn upgrade_configuration_needs_1_31_and_drives_apply() {
        let c = cluster_at_1_30();
        let cfg = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: UpgradeConfiguration\napply:\n  kubernetesVersion: v1.31.4\n  forceUpgrade: true\n  ignorePreflightErrors: [SystemVerification]\nnode:\n  ignorePreflightErrors: [SystemVerification]\n";
        c.cp.ctx.write("/u.yaml", cfg).unwrap();
        let old = exec(&c.cp.ctx, &["upgrade", "apply", "--config", "/u.yaml"]).unwrap_err();
        assert!(
            old.message
                .contains("no kind \"UpgradeConfiguration\" is registered"),
            "{}",
            old.message
        );
        let cp = with_version(&c.cp, "v1.31.4");
        exec(&cp, &["upgrade", "apply", "--config", "/u.yaml", "--v=5"]).unwrap();
        assert_eq!(
            cp.state.cluster_version().unwrap().unwrap().to_string(),
            "v1.31.4"
        );
        // A second control plane's `upgrade node` follows the shared version, not its kubeadm.
        exec(&cp, &["upgrade", "node", "--config=/u.yaml"]).unwrap();
        let mixed = exec(
            &cp,
            &[
                "upgrade",
                "node",
                "--config=/u.yaml",
                "--etcd-upgrade=false",
            ],
        )
        .unwrap_err();
        assert!(
            mixed
                .message
                .contains("can not mix '--config' with arguments [etcd-upgrade]")
        );
    }

    #[test]
    fn upgrade_node_on_cp_uses_cluster_version_not_its_own() {
        let c = cluster_at_1_30();
        let cp = with_version(&c.cp, "v1.31.4");
        exec(&cp, &["upgrade", "apply", "v1.31.0", "-y"]).unwrap();
        exec(&cp, &["upgrade", "node"]).unwrap();
        assert_eq!(
            manifest_image(&cp.read(APISERVER_MANIFEST).unwrap()).unwrap(),
            "registry.k8s.io/kube-apiserver:v1.31.0"
        );
    }

    #[test]
    fn fault_keys() {
        assert_eq!(
            fault_key(&args(&["upgrade", "node", "--v=5"])),
            "kubeadm-upgrade-node"
        );
        assert_eq!(
            fault_key(&args(&["--v=5", "upgrade", "apply", "v1.31.4"])),
            "kubeadm-upgrade-apply"
        );
        assert_eq!(
            fault_key(&args(&["version", "-o", "short"])),
            "kubeadm-version"
        );
    }
}
