//! Parsers for what a node prints: tool versions, the Node object, the cluster's kubeadm-config
//! and static pod manifests.
//!
//! Parsing is kept apart from I/O (the way kind keeps `parseSnapshotter` pure) so every format is
//! tested on captured output from the real tools, in `testdata/node/`.

use serde::Deserialize;

use crate::version::KubeVersion;

/// Output that did not have the shape the real tool prints.
#[derive(Debug, thiserror::Error)]
#[error("unexpected output from {what}: {detail}")]
pub struct ParseError {
    pub what: &'static str,
    pub detail: String,
}

fn parse_error(what: &'static str, detail: impl Into<String>) -> ParseError {
    ParseError {
        what,
        detail: detail.into(),
    }
}

fn version_in(what: &'static str, text: &str) -> Result<KubeVersion, ParseError> {
    text.trim().parse().map_err(|_| {
        parse_error(
            what,
            format!("{:?} is not a vMAJOR.MINOR.PATCH version", short(text)),
        )
    })
}

/// Keeps error messages short and free of whole files.
fn short(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// `kubeadm version -o short` prints the bare version.
pub fn kubeadm_version(stdout: &str) -> Result<KubeVersion, ParseError> {
    version_in("kubeadm version -o short", stdout)
}

/// `kubelet --version` prints `Kubernetes vX.Y.Z`.
pub fn kubelet_version(stdout: &str) -> Result<KubeVersion, ParseError> {
    let rest = stdout.trim().strip_prefix("Kubernetes ").ok_or_else(|| {
        parse_error(
            "kubelet --version",
            format!("{:?} does not start with \"Kubernetes \"", short(stdout)),
        )
    })?;
    version_in("kubelet --version", rest)
}

/// `kubectl version --client -o json` prints `{"clientVersion":{"gitVersion":"vX.Y.Z",…},…}`.
pub fn kubectl_client_version(stdout: &str) -> Result<KubeVersion, ParseError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Output {
        client_version: ClientVersion,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ClientVersion {
        git_version: String,
    }
    let output: Output = serde_json::from_str(stdout)
        .map_err(|e| parse_error("kubectl version --client -o json", e.to_string()))?;
    version_in(
        "kubectl version --client -o json",
        &output.client_version.git_version,
    )
}

/// The `kubernetesVersion` of a kubeadm ClusterConfiguration (the `ClusterConfiguration` key of
/// the `kube-system/kubeadm-config` ConfigMap). The document is flat YAML at the top level, so a
/// line scan is exact for the one key we need and avoids a YAML dependency.
pub fn cluster_configuration_version(yaml: &str) -> Result<KubeVersion, ParseError> {
    const WHAT: &str = "kubeadm-config ClusterConfiguration";
    let value = yaml
        .lines()
        .find_map(|line| line.strip_prefix("kubernetesVersion:"))
        .ok_or_else(|| parse_error(WHAT, "no top-level kubernetesVersion"))?;
    version_in(WHAT, value.trim().trim_matches(['"', '\'']))
}

/// The tag of the first `image:` in a static pod manifest, e.g. the kube-apiserver version a
/// control-plane node runs.
pub fn manifest_image_version(yaml: &str) -> Result<KubeVersion, ParseError> {
    const WHAT: &str = "static pod manifest";
    let image = yaml
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("image:"))
        .ok_or_else(|| parse_error(WHAT, "no image"))?
        .trim()
        .trim_matches(['"', '\'']);
    let image = image.split('@').next().unwrap_or(image);
    let tag = image
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .ok_or_else(|| parse_error(WHAT, format!("image {:?} has no tag", short(image))))?;
    version_in(WHAT, tag)
}

/// What the upgrader needs from a `v1.Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub kubelet_version: String,
    pub ready: bool,
    pub unschedulable: bool,
    pub control_plane: bool,
}

#[derive(Deserialize)]
struct NodeObject {
    metadata: NodeMetadata,
    #[serde(default)]
    spec: NodeSpec,
    #[serde(default)]
    status: NodeStatusObject,
}

#[derive(Deserialize)]
struct NodeMetadata {
    name: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct NodeSpec {
    #[serde(default)]
    unschedulable: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeStatusObject {
    #[serde(default)]
    conditions: Vec<NodeCondition>,
    #[serde(default)]
    node_info: NodeInfo,
}

#[derive(Deserialize)]
struct NodeCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeInfo {
    #[serde(default)]
    kubelet_version: String,
}

impl From<NodeObject> for NodeStatus {
    fn from(node: NodeObject) -> Self {
        let ready = node
            .status
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True");
        NodeStatus {
            control_plane: node
                .metadata
                .labels
                .contains_key("node-role.kubernetes.io/control-plane"),
            name: node.metadata.name,
            kubelet_version: node.status.node_info.kubelet_version,
            ready,
            unschedulable: node.spec.unschedulable,
        }
    }
}

/// `kubectl get node NAME -o json`.
pub fn node(json: &str) -> Result<NodeStatus, ParseError> {
    let node: NodeObject = serde_json::from_str(json)
        .map_err(|e| parse_error("kubectl get node -o json", e.to_string()))?;
    Ok(node.into())
}

/// `kubectl get nodes -o json` (a `v1.List` of Nodes).
pub fn nodes(json: &str) -> Result<Vec<NodeStatus>, ParseError> {
    #[derive(Deserialize)]
    struct List {
        items: Vec<NodeObject>,
    }
    let list: List = serde_json::from_str(json)
        .map_err(|e| parse_error("kubectl get nodes -o json", e.to_string()))?;
    Ok(list.items.into_iter().map(NodeStatus::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> KubeVersion {
        s.parse().unwrap()
    }

    #[test]
    fn tool_versions() {
        assert_eq!(kubeadm_version("v1.32.3\n").unwrap(), v("v1.32.3"));
        assert_eq!(
            kubelet_version("Kubernetes v1.31.4\n").unwrap(),
            v("v1.31.4")
        );
        assert!(kubelet_version("v1.31.4").is_err());
        assert!(kubeadm_version("v1.32").is_err());
        assert!(kubeadm_version("").is_err());
        let kubectl = include_str!("../../testdata/node/kubectl-version-client.json");
        assert_eq!(kubectl_client_version(kubectl).unwrap(), v("v1.31.4"));
    }

    #[test]
    fn cluster_configuration() {
        let yaml = include_str!("../../testdata/node/cluster-configuration.yaml");
        assert_eq!(cluster_configuration_version(yaml).unwrap(), v("v1.31.4"));
        assert!(cluster_configuration_version("apiVersion: kubeadm.k8s.io/v1beta4\n").is_err());
        assert_eq!(
            cluster_configuration_version("kubernetesVersion: \"v1.30.6\"\n").unwrap(),
            v("v1.30.6")
        );
    }

    #[test]
    fn manifest_image() {
        let yaml = include_str!("../../testdata/node/kube-apiserver.yaml");
        assert_eq!(manifest_image_version(yaml).unwrap(), v("v1.31.4"));
        assert_eq!(
            manifest_image_version(
                "    image: registry.k8s.io/kube-apiserver:v1.32.0@sha256:abc\n"
            )
            .unwrap(),
            v("v1.32.0")
        );
        assert!(manifest_image_version("    image: localhost:5000/kube-apiserver\n").is_err());
        assert!(manifest_image_version("kind: Pod\n").is_err());
    }

    #[test]
    fn node_objects() {
        let node = node(include_str!(
            "../../testdata/node/node-worker-cordoned.json"
        ))
        .unwrap();
        assert_eq!(
            node,
            NodeStatus {
                name: "demo-md-0-w0".into(),
                kubelet_version: "v1.31.4".into(),
                ready: true,
                unschedulable: true,
                control_plane: false,
            }
        );
        let list = nodes(include_str!("../../testdata/node/nodes.json")).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].control_plane && !list[0].unschedulable);
        assert!(!list[1].ready, "a Ready=Unknown condition is not ready");
        assert!(super::node("{}").is_err());
    }
}
