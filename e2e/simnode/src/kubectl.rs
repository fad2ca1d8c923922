//! The stand-in `kubectl`: `get` (nodes, configmaps, pods), `cordon`, `uncordon`, `drain`,
//! `wait --for=condition=...` and `version`, against the shared state instead of an API server.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::flags::{self, Kind, Spec, flag};
use crate::state::{NODE_GRACE, now_ms, ready_status};
use crate::{Ctx, Failure, Outcome, jsonpath, version_info};

const KUSTOMIZE: &str = "v5.4.2";

const FLAGS: [Spec; 20] = [
    flag("kubeconfig", None, Kind::Value),
    flag("namespace", Some('n'), Kind::Value),
    flag("output", Some('o'), Kind::Value),
    flag("v", Some('v'), Kind::Value),
    flag("request-timeout", None, Kind::Value),
    flag("all-namespaces", Some('A'), Kind::Bool),
    flag("no-headers", None, Kind::Bool),
    flag("field-selector", None, Kind::Value),
    flag("client", None, Kind::Bool),
    flag("ignore-daemonsets", None, Kind::Bool),
    flag("delete-emptydir-data", None, Kind::Bool),
    flag("force", None, Kind::Bool),
    flag("timeout", None, Kind::Value),
    flag("grace-period", None, Kind::Value),
    flag("disable-eviction", None, Kind::Bool),
    flag("skip-wait-for-delete-timeout", None, Kind::Value),
    flag("for", None, Kind::Value),
    flag("dry-run", None, Kind::Value),
    flag("context", None, Kind::Value),
    flag("allow-missing-template-keys", None, Kind::Bool),
];

const SUBCOMMANDS: [&str; 6] = ["get", "cordon", "uncordon", "drain", "wait", "version"];

fn err(message: impl Into<String>) -> Failure {
    Failure::new(format!("error: {}", message.into()))
}

fn not_found(kind: &str, name: &str) -> Failure {
    Failure::new(format!(
        "Error from server (NotFound): {kind} {name:?} not found"
    ))
}

fn emit(out: &mut dyn Write, text: &str) -> Outcome {
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::new(format!("write stdout: {e}")))
}

/// The fault key (`kubectl-<subcommand>`) and the node the command targets, if any, whose fault
/// directory is consulted as well as the executing node's.
pub fn fault_targets(args: &[String]) -> (String, Option<String>) {
    let parsed = flags::parse(args, &FLAGS).unwrap_or_default();
    let sub = parsed.positionals.first().cloned().unwrap_or_default();
    let target = match sub.as_str() {
        "cordon" | "uncordon" | "drain" => parsed.positionals.get(1).cloned(),
        "wait" => parsed
            .positionals
            .get(1)
            .map(|r| r.rsplit('/').next().unwrap_or(r).to_string()),
        _ => None,
    };
    (format!("kubectl-{sub}"), target)
}

pub fn run(ctx: &Ctx, args: &[String], out: &mut dyn Write) -> Outcome {
    let p = flags::parse(args, &FLAGS)
        .map_err(|e| err(format!("{e}\nSee 'kubectl --help' for usage.")))?;
    let Some(sub) = p.positionals.first().map(String::as_str) else {
        return Err(err(
            "You must specify the type of resource to get. Use \"kubectl api-resources\" for a complete list of supported resources.",
        ));
    };
    if !SUBCOMMANDS.contains(&sub) {
        return Err(err(format!("unknown command {sub:?} for \"kubectl\"")));
    }
    if sub == "version" && p.bool("client", false) {
        return version(ctx, &p, out, false);
    }
    require_kubeconfig(ctx, &p)?;
    let rest = &p.positionals[1..];
    match sub {
        "get" => get(ctx, &p, rest, out),
        "cordon" => set_unschedulable(ctx, one_node(rest, sub)?, true, out),
        "uncordon" => set_unschedulable(ctx, one_node(rest, sub)?, false, out),
        "drain" => drain(ctx, &p, one_node(rest, sub)?, out),
        "wait" => wait(ctx, &p, rest, out),
        _ => version(ctx, &p, out, true),
    }
}

fn one_node<'a>(rest: &'a [String], sub: &str) -> Result<&'a str, Failure> {
    match rest {
        [name] => Ok(name),
        [] => Err(err(format!(
            "USAGE: {sub} NODE [flags]\nSee 'kubectl {sub} -h' for help and examples"
        ))),
        _ => Err(err(format!(
            "{sub} accepts exactly one NODE in the simulated kubectl"
        ))),
    }
}

/// Like the real client: an explicit kubeconfig must be readable and a `kind: Config`;
/// without any kubeconfig kubectl falls back to localhost:8080, which refuses.
fn require_kubeconfig(ctx: &Ctx, p: &flags::Parsed) -> Outcome {
    let explicit = p.value("kubeconfig").map(String::from);
    let candidates: Vec<String> = match &explicit {
        Some(file) => vec![file.clone()],
        None => {
            let mut c: Vec<String> = std::env::var("KUBECONFIG")
                .map(|v| {
                    v.split(':')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if c.is_empty() {
                c.push(format!(
                    "{}/.kube/config",
                    std::env::var("HOME").unwrap_or_else(|_| "/root".into())
                ));
            }
            c
        }
    };
    for file in &candidates {
        match ctx.read(file) {
            Ok(text) => {
                let doc: serde_yaml::Value = serde_yaml::from_str(&text)
                    .map_err(|e| err(format!("error loading config file {file:?}: {e}")))?;
                if doc.get("kind").and_then(|k| k.as_str()) != Some("Config") {
                    return Err(err(format!(
                        "error loading config file {file:?}: not a kubeconfig (kind is not Config)"
                    )));
                }
                return Ok(());
            }
            Err(e) if explicit.is_some() => return Err(err(format!("stat {file}: {e}"))),
            Err(_) => {}
        }
    }
    Err(Failure::new(
        "The connection to the server localhost:8080 was refused - did you specify the right host or port?",
    ))
}

fn version(ctx: &Ctx, p: &flags::Parsed, out: &mut dyn Write, server: bool) -> Outcome {
    let server_version = if server {
        let apiservers = ctx.state.apiservers()?;
        Some(apiservers.values().max().copied().ok_or_else(|| {
            Failure::new("The connection to the server was refused - did you specify the right host or port?")
        })?)
    } else {
        None
    };
    let mut doc =
        json!({"clientVersion": version_info(&ctx.version), "kustomizeVersion": KUSTOMIZE});
    if let Some(v) = &server_version {
        doc["serverVersion"] = version_info(v);
    }
    let text = match p.value("output") {
        Some("json") => format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        ),
        Some("yaml") => serde_yaml::to_string(&doc).unwrap_or_default(),
        None => {
            let mut t = format!(
                "Client Version: {}\nKustomize Version: {KUSTOMIZE}\n",
                ctx.version
            );
            if let Some(v) = server_version {
                t.push_str(&format!("Server Version: {v}\n"));
            }
            t
        }
        Some(other) => {
            return Err(err(format!(
                "--output must be 'yaml' or 'json', got {other:?}"
            )));
        }
    };
    emit(out, &text)
}

// ---------- get ----------

enum Resource {
    Node,
    ConfigMap,
    Pod,
}

fn resource(word: &str) -> Result<(Resource, Option<String>), Failure> {
    let (kind, name) = match word.split_once('/') {
        Some((k, n)) => (k, Some(n.to_string())),
        None => (word, None),
    };
    let r = match kind {
        "node" | "nodes" | "no" => Resource::Node,
        "configmap" | "configmaps" | "cm" => Resource::ConfigMap,
        "pod" | "pods" | "po" => Resource::Pod,
        other => {
            return Err(err(format!(
                "the server doesn't have a resource type {other:?}"
            )));
        }
    };
    Ok((r, name))
}

fn get(ctx: &Ctx, p: &flags::Parsed, rest: &[String], out: &mut dyn Write) -> Outcome {
    let Some(first) = rest.first() else {
        return Err(err("Required resource not specified."));
    };
    let (res, mut name) = resource(first)?;
    if name.is_none() {
        name = rest.get(1).cloned();
    }
    let namespace = p.value("namespace").unwrap_or("default");
    let now = now_ms();
    let (kind, items): (&str, Vec<Value>) = match res {
        Resource::Node => ("nodes", ctx.state.nodes(now)?),
        Resource::ConfigMap => {
            let mut cms = Vec::new();
            if namespace == "kube-system" {
                for n in ["kubeadm-config", "kubelet-config"] {
                    cms.extend(ctx.state.configmap(n)?);
                }
            }
            ("configmaps", cms)
        }
        Resource::Pod => {
            let all = p.bool("all-namespaces", false);
            let node_filter = match p.value("field-selector") {
                Some(sel) => Some(
                    sel.strip_prefix("spec.nodeName=")
                        .ok_or_else(|| err(format!("field selector {sel:?} is not supported by the simulated kubectl (only spec.nodeName=)")))?
                        .to_string(),
                ),
                None => None,
            };
            let pods = ctx
                .state
                .pods()?
                .into_iter()
                .filter(|pod| all || pod["metadata"]["namespace"] == namespace)
                .filter(|pod| {
                    node_filter
                        .as_ref()
                        .is_none_or(|n| pod["spec"]["nodeName"] == n.as_str())
                })
                .collect();
            ("pods", pods)
        }
    };
    let output = p.value("output").unwrap_or("");
    let value = match &name {
        Some(n) => items
            .into_iter()
            .find(|i| i["metadata"]["name"] == n.as_str())
            .ok_or_else(|| not_found(kind, n))?,
        None => {
            json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})
        }
    };
    let text = if output == "json" {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )
    } else if output == "yaml" {
        serde_yaml::to_string(&value).unwrap_or_default()
    } else if output == "name" {
        let singular = kind.trim_end_matches('s');
        let list = if name.is_some() {
            vec![value]
        } else {
            value["items"].as_array().cloned().unwrap_or_default()
        };
        list.iter()
            .map(|i| {
                format!(
                    "{singular}/{}\n",
                    i["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    } else if let Some(template) = output.strip_prefix("jsonpath=") {
        jsonpath::render(template, &value).map_err(err)?
    } else if output.is_empty() || output == "wide" {
        let list = if name.is_some() {
            vec![value]
        } else {
            value["items"].as_array().cloned().unwrap_or_default()
        };
        if list.is_empty() {
            return Err(Failure {
                message: format!("No resources found in {namespace} namespace."),
                code: 0,
            });
        }
        table(
            &res,
            &list,
            now,
            p.bool("no-headers", false),
            p.bool("all-namespaces", false),
        )
    } else {
        return Err(err(format!(
            "unable to match a printer suitable for the output format {output:?}, allowed formats are: json,jsonpath,name,wide,yaml (simulated kubectl)"
        )));
    };
    emit(out, &text)
}

fn age(created: &str, now: u64) -> String {
    let Some(ms) = parse_rfc3339(created) else {
        return "<unknown>".into();
    };
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=10_799 => format!("{}m", secs / 60),
        10_800..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000).ok()
}

fn table(res: &Resource, items: &[Value], now: u64, no_headers: bool, with_ns: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    match res {
        Resource::Node => {
            rows.push(
                ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
                    .map(String::from)
                    .to_vec(),
            );
            for n in items {
                let mut status = if ready_status(n) == "True" {
                    "Ready"
                } else {
                    "NotReady"
                }
                .to_string();
                if n["spec"]["unschedulable"] == true {
                    status.push_str(",SchedulingDisabled");
                }
                let roles: Vec<&str> = n["metadata"]["labels"]
                    .as_object()
                    .map(|l| {
                        l.keys()
                            .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                            .collect()
                    })
                    .unwrap_or_default();
                rows.push(vec![
                    n["metadata"]["name"].as_str().unwrap_or("").into(),
                    status,
                    if roles.is_empty() {
                        "<none>".into()
                    } else {
                        roles.join(",")
                    },
                    age(
                        n["metadata"]["creationTimestamp"].as_str().unwrap_or(""),
                        now,
                    ),
                    n["status"]["nodeInfo"]["kubeletVersion"]
                        .as_str()
                        .unwrap_or("")
                        .into(),
                ]);
            }
        }
        Resource::ConfigMap => {
            rows.push(["NAME", "DATA", "AGE"].map(String::from).to_vec());
            for c in items {
                rows.push(vec![
                    c["metadata"]["name"].as_str().unwrap_or("").into(),
                    c["data"]
                        .as_object()
                        .map(|d| d.len())
                        .unwrap_or(0)
                        .to_string(),
                    age(
                        c["metadata"]["creationTimestamp"].as_str().unwrap_or(""),
                        now,
                    ),
                ]);
            }
        }
        Resource::Pod => {
            let mut head = vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
            if with_ns {
                head.insert(0, "NAMESPACE");
            }
            rows.push(head.into_iter().map(String::from).collect());
            for pod in items {
                let running = pod["spec"]["nodeName"].is_string();
                let mut row = vec![
                    pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    if running { "1/1" } else { "0/1" }.into(),
                    if running { "Running" } else { "Pending" }.into(),
                    "0".into(),
                    "<unknown>".into(),
                ];
                if with_ns {
                    row.insert(
                        0,
                        pod["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    );
                }
                rows.push(row);
            }
        }
    }
    if no_headers {
        rows.remove(0);
    }
    let widths: Vec<usize> = (0..rows.first().map(|r| r.len()).unwrap_or(0))
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i + 1 == r.len() {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[i] + 3)
                    }
                })
                .collect();
            format!("{}\n", cells.concat())
        })
        .collect()
}

// ---------- cordon / uncordon / drain ----------

fn set_unschedulable(ctx: &Ctx, name: &str, cordon: bool, out: &mut dyn Write) -> Outcome {
    if !ctx.state.node_exists(name)? {
        return Err(not_found("nodes", name));
    }
    let mut changed = false;
    ctx.state.update_node(name, |node| {
        let was = node["spec"]["unschedulable"] == true;
        changed = was != cordon;
        let mut taints: Vec<Value> = node["spec"]["taints"].as_array().cloned().unwrap_or_default();
        taints.retain(|t| t["key"] != "node.kubernetes.io/unschedulable");
        if cordon {
            node["spec"]["unschedulable"] = json!(true);
            taints.push(json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule", "timeAdded": crate::state::rfc3339(now_ms())}));
        } else if let Some(spec) = node["spec"].as_object_mut() {
            spec.remove("unschedulable");
        }
        if taints.is_empty() {
            if let Some(spec) = node["spec"].as_object_mut() {
                spec.remove("taints");
            }
        } else {
            node["spec"]["taints"] = Value::Array(taints);
        }
        false
    })?;
    let verb = if cordon { "cordoned" } else { "uncordoned" };
    let already = if changed { "" } else { "already " };
    emit(out, &format!("node/{name} {already}{verb}\n"))
}

fn pod_ref(p: &Value) -> String {
    format!(
        "{}/{}",
        p["metadata"]["namespace"].as_str().unwrap_or(""),
        p["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn controller_kind(p: &Value) -> Option<&str> {
    p["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
        .and_then(|o| o["kind"].as_str())
}

fn drain(ctx: &Ctx, p: &flags::Parsed, name: &str, out: &mut dyn Write) -> Outcome {
    let timeout = parse_duration(p.value("timeout").unwrap_or("0s")).map_err(err)?;
    set_unschedulable(ctx, name, true, out)?;
    let pods: Vec<Value> = ctx
        .state
        .pods()?
        .into_iter()
        .filter(|pod| pod["spec"]["nodeName"] == name)
        .collect();
    let (mut daemonset, mut local, mut unmanaged, mut evict) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for pod in &pods {
        if pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string() {
            continue;
        }
        match controller_kind(pod) {
            Some("DaemonSet") => daemonset.push(pod_ref(pod)),
            None => unmanaged.push(pod_ref(pod)),
            Some(_) => {
                let empty_dir = pod["spec"]["volumes"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["emptyDir"].is_object()));
                if empty_dir && !p.bool("delete-emptydir-data", false) {
                    local.push(pod_ref(pod));
                } else {
                    evict.push(pod.clone());
                }
            }
        }
    }
    let mut errors = Vec::new();
    if !daemonset.is_empty() && !p.bool("ignore-daemonsets", false) {
        errors.push(format!(
            "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): {}",
            daemonset.join(", ")
        ));
    }
    if !local.is_empty() {
        errors.push(format!(
            "cannot delete Pods with local storage (use --delete-emptydir-data to override): {}",
            local.join(", ")
        ));
    }
    if !unmanaged.is_empty() && !p.bool("force", false) {
        errors.push(format!(
            "cannot delete Pods that declare no controller (use --force to override): {}",
            unmanaged.join(", ")
        ));
    }
    if !errors.is_empty() {
        let joined = errors.join(", ");
        return Err(Failure::new(format!(
            "error: unable to drain node {name:?} due to error: {joined}, continuing command...\nThere are pending nodes to be drained:\n {name}\n{joined}"
        )));
    }
    if !daemonset.is_empty() {
        eprintln!(
            "Warning: ignoring DaemonSet-managed Pods: {}",
            daemonset.join(", ")
        );
    }
    if !unmanaged.is_empty() {
        eprintln!(
            "Warning: deleting Pods that declare no controller: {}",
            unmanaged.join(", ")
        );
        let names = unmanaged.clone();
        ctx.state
            .update_pods(|all| all.retain(|pod| !names.contains(&pod_ref(pod))))?;
    }
    let start = Instant::now();
    for pod in &evict {
        if timeout > Duration::ZERO && start.elapsed() > timeout {
            return Err(Failure::new(format!(
                "error: unable to drain node {name:?} due to error: drain did not complete within {}, continuing command...",
                format_duration(timeout)
            )));
        }
        emit(out, &format!("evicting pod {}\n", pod_ref(pod)))?;
        evict_and_reschedule(ctx, pod, name)?;
        emit(
            out,
            &format!(
                "pod/{} evicted\n",
                pod["metadata"]["name"].as_str().unwrap_or("")
            ),
        )?;
    }
    emit(out, &format!("node/{name} drained\n"))
}

/// Eviction deletes the pod; its ReplicaSet (the controller the double plays) recreates it on
/// another schedulable Ready node, or leaves it Pending when there is none.
fn evict_and_reschedule(ctx: &Ctx, pod: &Value, from: &str) -> Outcome {
    let now = now_ms();
    let target = ctx
        .state
        .nodes(now)?
        .into_iter()
        .filter(|n| {
            n["metadata"]["name"] != from
                && n["spec"]["unschedulable"] != true
                && ready_status(n) == "True"
        })
        .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
        .next();
    let old = pod_ref(pod);
    let mut replacement = pod.clone();
    let base = pod["metadata"]["name"].as_str().unwrap_or("pod");
    let stem = base.rsplit_once('-').map(|(s, _)| s).unwrap_or(base);
    replacement["metadata"]["name"] = json!(format!("{stem}-{:05x}", now % 0xfffff));
    match &target {
        Some(n) => {
            replacement["spec"]["nodeName"] = json!(n);
            replacement["status"]["phase"] = json!("Running");
        }
        None => {
            if let Some(spec) = replacement["spec"].as_object_mut() {
                spec.remove("nodeName");
            }
            replacement["status"]["phase"] = json!("Pending");
        }
    }
    ctx.state.update_pods(|all| {
        all.retain(|p| pod_ref(p) != old);
        all.push(replacement);
    })?;
    Ok(())
}

// ---------- wait ----------

fn wait(ctx: &Ctx, p: &flags::Parsed, rest: &[String], out: &mut dyn Write) -> Outcome {
    let for_ = p.value("for").ok_or_else(|| {
        err("--for must be specified (simulated kubectl supports condition=<Type>[=<status>])")
    })?;
    let cond = for_.strip_prefix("condition=").ok_or_else(|| {
        err(format!(
            "unrecognized condition: {for_:?} (the simulated kubectl supports only condition=...)"
        ))
    })?;
    let (cond_type, want) = cond.split_once('=').unwrap_or((cond, "True"));
    let want = match want.to_ascii_lowercase().as_str() {
        "true" => "True",
        "false" => "False",
        "unknown" => "Unknown",
        _ => return Err(err(format!("invalid condition status {want:?}"))),
    };
    let name = match rest {
        [one] => match one.split_once('/') {
            Some(("node" | "nodes" | "no", n)) => n.to_string(),
            _ => {
                return Err(err(format!(
                    "the simulated kubectl waits only on node/<name>, got {one:?}"
                )));
            }
        },
        [kind, n] if matches!(kind.as_str(), "node" | "nodes" | "no") => n.clone(),
        _ => return Err(err("wait needs exactly one node/<name>")),
    };
    let timeout = parse_duration(p.value("timeout").unwrap_or("30s")).map_err(err)?;
    let start = Instant::now();
    loop {
        let node = ctx
            .state
            .node(&name, now_ms())?
            .ok_or_else(|| not_found("nodes", &name))?;
        let status = node["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == cond_type))
            .and_then(|c| c["status"].as_str())
            .unwrap_or("");
        if status == want {
            return emit(out, &format!("node/{name} condition met\n"));
        }
        if start.elapsed() >= timeout {
            return Err(err(format!(
                "timed out waiting for the condition on nodes/{name}"
            )));
        }
        std::thread::sleep(Duration::from_millis(250).min(NODE_GRACE));
    }
}

/// Go's time.ParseDuration for the units kubectl users write (h, m, s, ms), plus a bare "0".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("time: invalid duration {text:?}");
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        rest = &rest[len..];
    }
    Ok(total)
}

fn format_duration(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use crate::version::Version;

    fn ctx(dir: &std::path::Path) -> Ctx {
        let c = Ctx {
            version: Version::parse("v1.31.4").unwrap(),
            root: dir.join("root"),
            state: State::new(dir.join("state")),
            node: "cp0".into(),
            systemd: false,
        };
        c.write(
            "/etc/kubernetes/admin.conf",
            "apiVersion: v1\nkind: Config\n",
        )
        .unwrap();
        c
    }

    fn exec(c: &Ctx, list: &[&str]) -> Result<String, Failure> {
        let mut out = Vec::new();
        let args: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        run(c, &args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    const KC: &str = "--kubeconfig=/etc/kubernetes/admin.conf";

    fn seed(c: &Ctx) {
        c.state
            .set_apiserver("cp0", &Version::parse("v1.31.4").unwrap())
            .unwrap();
        for n in ["cp0", "w0"] {
            c.state
                .update_node(n, |node| {
                    node["status"]["nodeInfo"]["kubeletVersion"] = json!("v1.31.4");
                    true
                })
                .unwrap();
        }
        c.state
            .update_pods(|pods| {
                pods.push(json!({"metadata": {"name": "kube-proxy-1", "namespace": "kube-system",
                    "ownerReferences": [{"kind": "DaemonSet", "controller": true}]}, "spec": {"nodeName": "w0"}}));
                pods.push(json!({"metadata": {"name": "web-abc-1", "namespace": "default",
                    "ownerReferences": [{"kind": "ReplicaSet", "controller": true}]}, "spec": {"nodeName": "w0"}}));
            })
            .unwrap();
    }

    #[test]
    fn kubeconfig_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let e = exec(&c, &["get", "nodes", "--kubeconfig", "/nope"]).unwrap_err();
        assert!(e.message.starts_with("error: stat /nope"), "{}", e.message);
        c.write("/bad.conf", "kind: Pod\n").unwrap();
        assert!(
            exec(&c, &["get", "nodes", "--kubeconfig", "/bad.conf"])
                .unwrap_err()
                .message
                .contains("not a kubeconfig")
        );
        assert!(
            exec(&c, &["version", "--client", "-o", "json"])
                .unwrap()
                .contains("\"gitVersion\": \"v1.31.4\"")
        );
    }

    #[test]
    fn get_nodes_json_table_and_jsonpath() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        seed(&c);
        let list: Value =
            serde_json::from_str(&exec(&c, &[KC, "get", "nodes", "-o", "json"]).unwrap()).unwrap();
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"].as_array().unwrap().len(), 2);
        assert_eq!(list["items"][0]["kind"], "Node");
        let one: Value =
            serde_json::from_str(&exec(&c, &[KC, "get", "node", "w0", "-o", "json"]).unwrap())
                .unwrap();
        assert_eq!(one["metadata"]["name"], "w0");
        let table = exec(&c, &[KC, "get", "nodes"]).unwrap();
        assert!(
            table.starts_with("NAME   STATUS   ROLES    AGE   VERSION\ncp0    Ready    <none>"),
            "{table}"
        );
        let jp = exec(
            &c,
            &[
                KC,
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.nodeInfo.kubeletVersion}",
            ],
        )
        .unwrap();
        assert_eq!(jp, "v1.31.4 v1.31.4");
        assert_eq!(
            exec(&c, &[KC, "get", "node", "ghost"]).unwrap_err().message,
            "Error from server (NotFound): nodes \"ghost\" not found"
        );
        assert!(
            exec(&c, &[KC, "get", "nodes", "-o", "go-template={{.}}"])
                .unwrap_err()
                .message
                .contains("unable to match a printer")
        );
    }

    #[test]
    fn cordon_uncordon_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        seed(&c);
        assert_eq!(
            exec(&c, &[KC, "cordon", "w0"]).unwrap(),
            "node/w0 cordoned\n"
        );
        assert_eq!(
            exec(&c, &[KC, "cordon", "w0"]).unwrap(),
            "node/w0 already cordoned\n"
        );
        let node = c.state.node("w0", now_ms()).unwrap().unwrap();
        assert_eq!(node["spec"]["unschedulable"], true);
        assert_eq!(
            node["spec"]["taints"][0]["key"],
            "node.kubernetes.io/unschedulable"
        );
        assert!(
            exec(&c, &[KC, "get", "nodes"])
                .unwrap()
                .contains("Ready,SchedulingDisabled")
        );
        assert_eq!(
            exec(&c, &[KC, "uncordon", "w0"]).unwrap(),
            "node/w0 uncordoned\n"
        );
        let node = c.state.node("w0", now_ms()).unwrap().unwrap();
        assert!(node["spec"]["unschedulable"].is_null() && node["spec"]["taints"].is_null());
        assert_eq!(
            exec(&c, &[KC, "uncordon", "w0"]).unwrap(),
            "node/w0 already uncordoned\n"
        );
    }

    #[test]
    fn drain_refuses_daemonsets_then_evicts_and_reschedules() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        seed(&c);
        let e = exec(&c, &[KC, "drain", "w0"]).unwrap_err();
        assert!(e.message.contains("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): kube-system/kube-proxy-1"), "{}", e.message);
        let out = exec(
            &c,
            &[
                KC,
                "drain",
                "w0",
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--force",
                "--timeout=60s",
            ],
        )
        .unwrap();
        assert!(
            out.contains(
                "evicting pod default/web-abc-1\npod/web-abc-1 evicted\nnode/w0 drained\n"
            ),
            "{out}"
        );
        let pods = c.state.pods().unwrap();
        let web: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["namespace"] == "default")
            .collect();
        assert_eq!(web.len(), 1);
        assert_eq!(web[0]["spec"]["nodeName"], "cp0");
    }

    #[test]
    fn wait_for_ready_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        seed(&c);
        assert_eq!(
            exec(
                &c,
                &[
                    KC,
                    "wait",
                    "--for=condition=Ready",
                    "node/w0",
                    "--timeout=5s"
                ]
            )
            .unwrap(),
            "node/w0 condition met\n"
        );
        let e = exec(
            &c,
            &[
                KC,
                "wait",
                "--for=condition=Ready=false",
                "node/w0",
                "--timeout=300ms",
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "error: timed out waiting for the condition on nodes/w0"
        );
    }

    #[test]
    fn configmap_jsonpath() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        let data = std::collections::BTreeMap::from([(
            "ClusterConfiguration".to_string(),
            "kubernetesVersion: v1.31.4\n".to_string(),
        )]);
        c.state.put_configmap("kubeadm-config", data).unwrap();
        let out = exec(
            &c,
            &[
                KC,
                "-n",
                "kube-system",
                "get",
                "configmap",
                "kubeadm-config",
                "-o",
                "jsonpath={.data.ClusterConfiguration}",
            ],
        )
        .unwrap();
        assert_eq!(out, "kubernetesVersion: v1.31.4\n");
        assert!(
            exec(&c, &[KC, "get", "cm", "kubeadm-config"])
                .unwrap_err()
                .message
                .contains("NotFound")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err() && parse_duration("abc").is_err());
    }

    #[test]
    fn fault_target_is_the_node_argument() {
        let args: Vec<String> = ["drain", "w0", "--ignore-daemonsets"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            fault_targets(&args),
            ("kubectl-drain".to_string(), Some("w0".to_string()))
        );
        let args: Vec<String> = ["wait", "--for=condition=Ready", "node/w1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(fault_targets(&args).1.as_deref(), Some("w1"));
    }
}
