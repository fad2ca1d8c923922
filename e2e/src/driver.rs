//! A CAPI-faithful driver: it plays the KubeadmControlPlane, MachineDeployment, MachineSet and
//! Machine controllers towards a Runtime Extension, over HTTPS, on a model of a workload cluster's
//! Machines built from a simulated CAPD cluster. Nothing is faked towards the extension: a
//! rollout decision is only recorded ("would replace Machine X").
//!
//! What mirrors which upstream code (cluster-api v1.12 to v1.14; v1.14 moved
//! `internal/controllers/*` to `core/reconcilers/*` and `controlplane/kubeadm/reconcilers/*`):
//! * Discovery, its validation, settings merge, URL, timeout and failure policy: [`client`], after
//!   `internal/runtime/client/client.go` and `api/runtime/catalog/catalog.go`.
//! * KCP (`controlplane/kubeadm/internal/controllers/update.go` `rollingUpdate`, `inplace.go`
//!   `tryInPlaceUpdate`, `inplace_canupdatemachine.go` `createRequest`/`canUpdateMachine`,
//!   `inplace_trigger.go` `triggerInPlaceUpdate`): one outdated control-plane Machine at a time
//!   (maxSurge 0, so no scale-up first); while a Machine updates in place nothing else happens;
//!   objects trimmed to apiVersion, kind, metadata (name, namespace, labels, annotations) and
//!   spec; the current KubeadmConfig/InfraMachine take the desired labels and annotations;
//!   KubeadmConfigs prepared like `PrepareKubeadmConfigsForDiff(desired, current, true)`
//!   (`controlplane/kubeadm/internal/desiredstate`): the init Machine's `initConfiguration`
//!   becomes a `joinConfiguration`, `controlPlaneEndpoint` and `dns` are taken from desired,
//!   `joinConfiguration.discovery` and `timeouts.controlPlaneComponentHealthCheckSeconds` are
//!   cleared. Defaulting is not modelled: the model only holds already-defaulted values.
//! * The decision after the answer (apply patches to current, copy back spec, cleanup, compare):
//!   [`crate::capi`] (`applyPatchesToRequest`, `matchesMachine`, `CleanupMachineSpecForDiff`).
//! * MachineDeployment (`internal/controllers/machinedeployment/machinedeployment_rollout_rollingupdate.go`
//!   `reconcileInPlaceUpdateIntent`, `machinedeployment_canupdatemachineset.go`) and MachineSet
//!   (`internal/controllers/machineset/machineset_controller.go` `startMoveMachines`,
//!   `triggerInPlaceUpdate`, `completeMoveMachine`): one CanUpdateMachineSet call for the old to
//!   new MachineSet, then Machines move and update in batches of `maxUnavailable`.
//! * Machine controller (`internal/controllers/machine/machine_controller_inplace_update.go`
//!   `reconcileInPlaceUpdate`, `callUpdateMachineHook`, `completeInPlaceUpdate`): preconditions
//!   (update-in-progress on all three objects, UpdateMachine pending), the request with the
//!   DESIRED (live, already updated) objects cleaned up, `retryAfterSeconds` honoured,
//!   `Failure` and transport errors (policy Fail) retried with exponential backoff, completion
//!   removes the annotations.
//!
//! Waits are scaled for test speed by [`Pacing`]: `retryAfterSeconds × retry_scale`, never below
//! 200 ms; the controller-runtime backoff after an error (5 ms doubling to 1000 s upstream) is
//! `failure_backoff` doubling to `failure_backoff_cap`.

pub mod client;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

pub use client::{ExtensionConfig, FailurePolicy, Hook, RuntimeClient};

use crate::capi;
use crate::sim::{Role, SimCluster, Version};

pub const UPDATE_IN_PROGRESS: &str =
    "in-place-updates.internal.cluster.x-k8s.io/update-in-progress";
pub const PENDING_HOOKS: &str = "runtime.cluster.x-k8s.io/pending-hooks";
pub const PENDING_ACKNOWLEDGE_MOVE: &str =
    "in-place-updates.internal.cluster.x-k8s.io/pending-acknowledge-move";
const CLONED_FROM_NAME: &str = "cluster.x-k8s.io/cloned-from-name";
const CLONED_FROM_GROUPKIND: &str = "cluster.x-k8s.io/cloned-from-groupkind";
const CLUSTER_NAME_LABEL: &str = "cluster.x-k8s.io/cluster-name";
const CONTROL_PLANE_LABEL: &str = "cluster.x-k8s.io/control-plane";
const DEPLOYMENT_NAME_LABEL: &str = "cluster.x-k8s.io/deployment-name";
const MACHINE_API: &str = "cluster.x-k8s.io/v1beta2";
const INFRA_API: &str = "infrastructure.cluster.x-k8s.io/v1beta2";
const BOOTSTRAP_API: &str = "bootstrap.cluster.x-k8s.io/v1beta2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("discovery: {0}")]
    Discovery(String),
    #[error("{0}")]
    Transport(String),
    #[error("{hook} got failure response with message: {message}")]
    Failure { hook: &'static str, message: String },
    #[error("{hook} got unknown response status {status:?}")]
    UnknownStatus { hook: &'static str, status: String },
    #[error("no extensions registered for {0} hook")]
    NoHandler(&'static str),
    #[error("found multiple {0} hooks: only one hook is supported")]
    MultipleHandlers(&'static str),
    #[error(transparent)]
    Capi(#[from] capi::Error),
    #[error("Machine {machine}: in-place update not done after {after:?}; last: {last}")]
    Timeout {
        machine: String,
        after: Duration,
        last: String,
    },
    #[error("model: {0}")]
    Model(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the driver paces itself (see the module doc).
#[derive(Debug, Clone)]
pub struct Pacing {
    pub retry_scale: f64,
    pub failure_backoff: Duration,
    pub failure_backoff_cap: Duration,
    /// How long one Machine's in-place update may take before the driver gives up.
    pub machine_deadline: Duration,
}

/// The floor of every wait between two calls about the same Machine.
pub const MIN_WAIT: Duration = Duration::from_millis(200);

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            retry_scale: 0.25,
            failure_backoff: Duration::from_millis(500),
            failure_backoff_cap: Duration::from_secs(4),
            machine_deadline: Duration::from_secs(300),
        }
    }
}

impl Pacing {
    fn retry_wait(&self, retry_after_seconds: u64) -> Duration {
        Duration::from_secs(retry_after_seconds)
            .mul_f64(self.retry_scale)
            .max(MIN_WAIT)
    }

    fn failure_wait(&self, failures: u32) -> Duration {
        self.failure_backoff
            .saturating_mul(1 << failures.min(16))
            .min(self.failure_backoff_cap)
            .max(MIN_WAIT)
    }
}

/// One Machine and its InfraMachine (DockerMachine) and BootstrapConfig (KubeadmConfig), as full
/// objects (with the status, uid and managedFields CAPI trims before sending).
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub machine: Value,
    pub infra: Value,
    pub bootstrap: Value,
}

impl Machine {
    pub fn name(&self) -> &str {
        self.machine["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
    }

    pub fn version(&self) -> &str {
        self.machine["spec"]["version"].as_str().unwrap_or_default()
    }

    pub fn provider_id(&self) -> &str {
        self.machine["spec"]["providerID"]
            .as_str()
            .unwrap_or_default()
    }

    pub fn is_control_plane(&self) -> bool {
        self.machine["metadata"]["labels"]
            .get(CONTROL_PLANE_LABEL)
            .is_some()
    }

    pub fn custom_image(&self) -> &str {
        self.infra["spec"]["customImage"]
            .as_str()
            .unwrap_or_default()
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.machine["metadata"]["annotations"][key].as_str()
    }

    /// `inplace.IsUpdateInProgress`: update-in-progress, or UpdateMachine pending.
    pub fn is_update_in_progress(&self) -> bool {
        self.annotation(UPDATE_IN_PROGRESS).is_some()
            || pending_hooks(&self.machine).contains(&"UpdateMachine".to_string())
    }
}

/// What a user changes on the KubeadmControlPlane or the MachineDeployment (through the
/// ClusterClass, which rewrites `customImage` to `kindest/node:<version>`).
#[derive(Debug, Clone)]
pub struct Change {
    pub version: String,
    pub custom_image: String,
    /// A new KubeadmConfig `files` list (a non-version change).
    pub files: Option<Value>,
}

impl Change {
    /// A version bump with the matching kind image, as CAPD's ClusterClass does it.
    pub fn upgrade(version: &str) -> Change {
        Change {
            version: version.to_string(),
            custom_image: format!("kindest/node:{version}"),
            files: None,
        }
    }
}

/// The desired state KCP or the MachineDeployment holds.
#[derive(Debug, Clone)]
pub struct Desired {
    pub version: String,
    pub custom_image: String,
    /// KCP `spec.kubeadmConfigSpec`, or the KubeadmConfigTemplate's `spec.template.spec`.
    pub kubeadm_config_spec: Value,
}

/// The model of a workload cluster: its KCP, one MachineDeployment and their Machines.
#[derive(Debug, Clone)]
pub struct Workload {
    pub cluster: String,
    pub namespace: String,
    pub control_plane_endpoint: String,
    pub kcp: Desired,
    pub md: Desired,
    pub max_unavailable: usize,
    /// Generation counter of the MachineDeployment's MachineSets (old: `<md>-<n>`).
    pub machine_set_generation: u32,
    pub machines: Vec<Machine>,
}

fn kubelet_extra_args() -> Value {
    json!([{"name": "eviction-hard", "value": "nodefs.available<0%,nodefs.inodesFree<0%,imagefs.available<0%"}])
}

fn node_registration() -> Value {
    json!({"criSocket": "unix:///var/run/containerd/containerd.sock", "kubeletExtraArgs": kubelet_extra_args(), "imagePullPolicy": "IfNotPresent"})
}

fn discovery(endpoint: &str) -> Value {
    json!({"bootstrapToken": {"apiServerEndpoint": endpoint, "token": "abcdef.0123456789abcdef", "caCertHashes": ["sha256:2f4d0b1e8c6a1e2b9f1c0d7a6e5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b"]}})
}

fn audit_file() -> Value {
    json!([{"path": "/etc/kubernetes/audit-policy.yaml", "owner": "root:root", "permissions": "0600", "content": "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n"}])
}

impl Workload {
    /// Models the Machines CAPI would hold for a simulated cluster at `version`: one Machine per
    /// node container (name = container name, providerID `docker:////<container>`), a
    /// DockerMachine with `customImage: kindest/node:<version>`, a KubeadmConfig (the first
    /// control plane is the init Machine).
    pub fn from_sim(cluster: &SimCluster, version: &str) -> Workload {
        let name = cluster.name().to_string();
        let endpoint = format!("{name}-lb:6443");
        let kcp_spec = json!({
            "clusterConfiguration": {
                "imageRepository": "registry.k8s.io",
                "certificatesDir": "/etc/kubernetes/pki",
                "etcd": {"local": {"dataDir": "/var/lib/etcd"}},
                "apiServer": {"certSANs": ["localhost", "127.0.0.1", "0.0.0.0", "host.docker.internal"]},
            },
            "initConfiguration": {"nodeRegistration": node_registration()},
            "joinConfiguration": {"nodeRegistration": node_registration(), "controlPlane": {}},
            "files": audit_file(),
            "format": "cloud-config",
        });
        let md_spec = json!({
            "joinConfiguration": {"nodeRegistration": node_registration()},
            "files": audit_file(),
            "format": "cloud-config",
        });
        let mut workload = Workload {
            cluster: name.clone(),
            namespace: "default".into(),
            control_plane_endpoint: endpoint,
            kcp: Desired {
                version: version.into(),
                custom_image: format!("kindest/node:{version}"),
                kubeadm_config_spec: kcp_spec,
            },
            md: Desired {
                version: version.into(),
                custom_image: format!("kindest/node:{version}"),
                kubeadm_config_spec: md_spec,
            },
            max_unavailable: 1,
            machine_set_generation: 0,
            machines: Vec::new(),
        };
        let mut first_control_plane = true;
        for node in cluster.nodes() {
            let control_plane = node.role == Role::ControlPlane;
            let init = control_plane && first_control_plane;
            first_control_plane &= !control_plane;
            let machine =
                workload.machine_for(&node.name, &node.provider_id(), control_plane, init);
            workload.machines.push(machine);
        }
        workload
    }

    /// A Machine for `container` as CAPI would have created it (also usable for Machines whose
    /// providerID points elsewhere, in security tests).
    pub fn machine_for(
        &self,
        name: &str,
        provider_id: &str,
        control_plane: bool,
        init: bool,
    ) -> Machine {
        let mut labels = Map::new();
        labels.insert(CLUSTER_NAME_LABEL.into(), self.cluster.clone().into());
        let (owner_kind, owner_name, desired) = if control_plane {
            labels.insert(CONTROL_PLANE_LABEL.into(), "".into());
            labels.insert(
                "cluster.x-k8s.io/control-plane-name".into(),
                format!("{}-cp", self.cluster).into(),
            );
            (
                "KubeadmControlPlane",
                format!("{}-cp", self.cluster),
                &self.kcp,
            )
        } else {
            labels.insert(
                DEPLOYMENT_NAME_LABEL.into(),
                format!("{}-md-0", self.cluster).into(),
            );
            (
                "MachineSet",
                self.machine_set_name(self.machine_set_generation),
                &self.md,
            )
        };
        let metadata = |annotations: Value| {
            json!({
                "name": name,
                "namespace": self.namespace,
                "uid": format!("uid-{name}"),
                "resourceVersion": "4711",
                "generation": 2,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": MACHINE_API, "kind": owner_kind, "name": owner_name, "uid": "uid-owner", "controller": true}],
                "managedFields": [{"manager": "capi", "operation": "Apply"}],
            })
        };
        let machine = json!({
            "apiVersion": MACHINE_API,
            "kind": "Machine",
            "metadata": metadata(json!({})),
            "spec": {
                "clusterName": self.cluster,
                "bootstrap": {"configRef": {"apiGroup": "bootstrap.cluster.x-k8s.io", "kind": "KubeadmConfig", "name": name}, "dataSecretName": name},
                "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachine", "name": name},
                "version": desired.version,
                "providerID": provider_id,
                "deletion": {"nodeDrainTimeoutSeconds": 0},
            },
            "status": {
                "nodeRef": {"name": name},
                "initialization": {"infrastructureProvisioned": true, "bootstrapDataSecretCreated": true},
                "phase": "Running",
            },
        });
        let infra = json!({
            "apiVersion": INFRA_API,
            "kind": "DockerMachine",
            "metadata": metadata(json!({CLONED_FROM_NAME: format!("{owner_name}-template"), CLONED_FROM_GROUPKIND: "DockerMachineTemplate.infrastructure.cluster.x-k8s.io"})),
            "spec": {"providerID": provider_id, "customImage": desired.custom_image, "bootstrapTimeout": "3m0s"},
            "status": {"ready": true},
        });
        let mut spec = desired.kubeadm_config_spec.clone();
        if control_plane {
            let cluster_configuration = &mut spec["clusterConfiguration"];
            cluster_configuration["controlPlaneEndpoint"] =
                self.control_plane_endpoint.clone().into();
            cluster_configuration["dns"] = json!({});
            if let Some(object) = spec.as_object_mut() {
                if init {
                    object.remove("joinConfiguration");
                } else {
                    object.remove("initConfiguration");
                }
            }
        }
        if let Some(join) = spec.get_mut("joinConfiguration") {
            join["discovery"] = discovery(&self.control_plane_endpoint);
        }
        let bootstrap = json!({
            "apiVersion": BOOTSTRAP_API,
            "kind": "KubeadmConfig",
            "metadata": metadata(json!({CLONED_FROM_NAME: owner_name, CLONED_FROM_GROUPKIND: format!("{owner_kind}.controlplane.cluster.x-k8s.io")})),
            "spec": spec,
            "status": {"dataSecretName": name, "initialization": {"dataSecretCreated": true}},
        });
        Machine {
            machine,
            infra,
            bootstrap,
        }
    }

    fn machine_set_name(&self, generation: u32) -> String {
        format!("{}-md-0-gen{generation}", self.cluster)
    }

    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name() == name)
    }

    fn machine_mut(&mut self, name: &str) -> Result<&mut Machine> {
        self.machines
            .iter_mut()
            .find(|m| m.name() == name)
            .ok_or_else(|| Error::Model(format!("no Machine {name}")))
    }

    /// KCP's desired objects for an existing control-plane Machine (`computeDesiredMachine`,
    /// `ComputeDesiredKubeadmConfig` for a joining Machine, the infra template clone).
    fn desired_control_plane_objects(&self, current: &Machine) -> Machine {
        let mut desired = current.clone();
        desired.machine["spec"]["version"] = self.kcp.version.clone().into();
        desired.infra["spec"]["customImage"] = self.kcp.custom_image.clone().into();
        let mut spec = self.kcp.kubeadm_config_spec.clone();
        spec["clusterConfiguration"]["controlPlaneEndpoint"] =
            self.control_plane_endpoint.clone().into();
        spec["clusterConfiguration"]["dns"] = json!({});
        if let Some(object) = spec.as_object_mut() {
            object.remove("initConfiguration");
        }
        spec["joinConfiguration"]["discovery"] = discovery(&self.control_plane_endpoint);
        desired.bootstrap["spec"] = spec;
        desired
    }

    /// A MachineSet as the MachineDeployment computes it from its template.
    fn machine_set(&self, name: &str, desired: &Desired, replicas: usize) -> Value {
        let hash = name.rsplit('-').next().unwrap_or_default();
        let labels = json!({CLUSTER_NAME_LABEL: self.cluster, DEPLOYMENT_NAME_LABEL: format!("{}-md-0", self.cluster), "machine-template-hash": hash});
        json!({
            "apiVersion": MACHINE_API,
            "kind": "MachineSet",
            "metadata": {"name": name, "namespace": self.namespace, "uid": format!("uid-{name}"), "labels": labels, "annotations": {"machinedeployment.clusters.x-k8s.io/desired-replicas": replicas.to_string()}},
            "spec": {
                "clusterName": self.cluster,
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "clusterName": self.cluster,
                        "version": desired.version,
                        "bootstrap": {"configRef": {"apiGroup": "bootstrap.cluster.x-k8s.io", "kind": "KubeadmConfigTemplate", "name": name}},
                        "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachineTemplate", "name": name},
                        "deletion": {"nodeDrainTimeoutSeconds": 0, "order": "Random"},
                    },
                },
            },
            "status": {"replicas": replicas},
        })
    }

    fn templates(&self, name: &str, desired: &Desired) -> (Value, Value) {
        let metadata = json!({"name": name, "namespace": self.namespace, "uid": format!("uid-{name}"), "labels": {CLUSTER_NAME_LABEL: self.cluster}});
        let infra = json!({
            "apiVersion": INFRA_API, "kind": "DockerMachineTemplate", "metadata": metadata,
            "spec": {"template": {"spec": {"customImage": desired.custom_image}}},
        });
        let mut spec = desired.kubeadm_config_spec.clone();
        spec["joinConfiguration"]["discovery"] = discovery(&self.control_plane_endpoint);
        let bootstrap = json!({
            "apiVersion": BOOTSTRAP_API, "kind": "KubeadmConfigTemplate", "metadata": metadata,
            "spec": {"template": {"spec": spec}},
        });
        (infra, bootstrap)
    }
}

fn pending_hooks(machine: &Value) -> Vec<String> {
    machine["metadata"]["annotations"][PENDING_HOOKS]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect()
}

fn set_annotation(object: &mut Value, key: &str, value: &str) {
    let annotations = &mut object["metadata"]["annotations"];
    if !annotations.is_object() {
        *annotations = json!({});
    }
    annotations[key] = value.into();
}

fn remove_annotation(object: &mut Value, key: &str) {
    if let Some(annotations) = object["metadata"]["annotations"].as_object_mut() {
        annotations.remove(key);
    }
}

/// `cleanupMachine` / `cleanupUnstructured`: apiVersion, kind, metadata (name, namespace, labels,
/// annotations) and spec only.
pub fn trim(object: &Value) -> Value {
    let mut metadata = Map::new();
    for key in ["name", "namespace", "labels", "annotations"] {
        if let Some(value) = object["metadata"].get(key)
            && !value.is_null()
            && value.as_object().is_none_or(|m| !m.is_empty())
        {
            metadata.insert(key.into(), value.clone());
        }
    }
    let mut trimmed = Map::new();
    for key in ["apiVersion", "kind"] {
        if let Some(value) = object.get(key) {
            trimmed.insert(key.into(), value.clone());
        }
    }
    trimmed.insert("metadata".into(), Value::Object(metadata));
    trimmed.insert(
        "spec".into(),
        object.get("spec").cloned().unwrap_or(json!({})),
    );
    Value::Object(trimmed)
}

/// `PrepareKubeadmConfigsForDiff(desired, current, convertCurrentInitConfigurationToJoinConfiguration=true)`
/// on KubeadmConfig specs (see the module doc).
pub fn prepare_kubeadm_configs_for_diff(desired: &mut Value, current: &mut Value) {
    if let Some(init) = current
        .as_object_mut()
        .and_then(|spec| spec.remove("initConfiguration"))
    {
        let mut join = json!({});
        if let Some(node_registration) = init.get("nodeRegistration") {
            join["nodeRegistration"] = node_registration.clone();
        }
        let mut control_plane = json!({});
        if let Some(endpoint) = init.get("localAPIEndpoint") {
            control_plane["localAPIEndpoint"] = endpoint.clone();
        }
        join["controlPlane"] = control_plane;
        if let Some(timeouts) = init.get("timeouts") {
            join["timeouts"] = timeouts.clone();
        }
        current["joinConfiguration"] = join;
    }
    if let Some(spec) = desired.as_object_mut() {
        spec.remove("initConfiguration");
    }
    for key in ["controlPlaneEndpoint", "dns"] {
        match desired["clusterConfiguration"].get(key).cloned() {
            Some(value) if current.get("clusterConfiguration").is_some() => {
                current["clusterConfiguration"][key] = value;
            }
            _ => {
                if let Some(cc) = current["clusterConfiguration"].as_object_mut() {
                    cc.remove(key);
                }
            }
        }
    }
    for spec in [desired, current] {
        if let Some(join) = spec
            .get_mut("joinConfiguration")
            .and_then(Value::as_object_mut)
        {
            join.remove("discovery");
            if let Some(timeouts) = join.get_mut("timeouts").and_then(Value::as_object_mut) {
                timeouts.remove("controlPlaneComponentHealthCheckSeconds");
            }
        }
    }
}

/// KCP's `createRequest` for CanUpdateMachine, before settings are merged.
pub fn can_update_machine_request(current: &Machine, desired: &Machine) -> Value {
    let mut current_bootstrap = trim(&current.bootstrap);
    let mut desired_bootstrap = trim(&desired.bootstrap);
    prepare_kubeadm_configs_for_diff(
        &mut desired_bootstrap["spec"],
        &mut current_bootstrap["spec"],
    );
    let mut current_infra = trim(&current.infra);
    // The current objects carry the desired labels and annotations, so that only spec differs.
    for (current_object, desired_object) in [
        (&mut current_bootstrap, &desired_bootstrap),
        (&mut current_infra, &trim(&desired.infra)),
    ] {
        for key in ["labels", "annotations"] {
            match desired_object["metadata"].get(key) {
                Some(value) => current_object["metadata"][key] = value.clone(),
                None => {
                    if let Some(metadata) = current_object["metadata"].as_object_mut() {
                        metadata.remove(key);
                    }
                }
            }
        }
    }
    json!({
        "current": {"machine": trim(&current.machine), "infrastructureMachine": current_infra, "bootstrapConfig": current_bootstrap},
        "desired": {"machine": trim(&desired.machine), "infrastructureMachine": trim(&desired.infra), "bootstrapConfig": desired_bootstrap},
    })
}

/// The Machine controller's UpdateMachine request: the live (desired) objects, cleaned up.
pub fn update_machine_request(machine: &Machine) -> Value {
    json!({"desired": {
        "machine": trim(&machine.machine),
        "infrastructureMachine": trim(&machine.infra),
        "bootstrapConfig": trim(&machine.bootstrap),
    }})
}

/// What a controller decided for one Machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    InPlace {
        machine: String,
    },
    WouldReplace {
        machine: String,
        reasons: Vec<String>,
    },
}

/// The driver's log, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A CanUpdate* answer and CAPI's verdict on it.
    Decided {
        hook: &'static str,
        subject: String,
        in_place: bool,
        reasons: Vec<String>,
        message: String,
    },
    /// `SuccessfulStartInPlaceUpdate` (KCP / MachineSet trigger done).
    StartedInPlaceUpdate { machine: String },
    /// The old MachineSet moved a Machine to the new one (MachineDeployment flow).
    Moved {
        machine: String,
        from: String,
        to: String,
    },
    /// `Updating=True/InPlaceUpdating`: `"In-place update in progress: <message>"`.
    Updating { machine: String, message: String },
    /// `Updating=True/InPlaceUpdateFailed` after a Failure answer.
    UpdateFailed { machine: String, message: String },
    /// A transport error with failurePolicy Fail (same handling as a Failure).
    TransportError { machine: String, error: String },
    /// `completeInPlaceUpdate`.
    Completed { machine: String, message: String },
    /// A rollout decision: CAPI would delete this Machine and create a new one.
    WouldReplace {
        machine: String,
        reasons: Vec<String>,
    },
}

/// The driver: the controllers, one runtime client, the model.
pub struct Driver {
    client: RuntimeClient,
    workload: Mutex<Workload>,
    events: Mutex<Vec<Event>>,
    pacing: Pacing,
}

impl Driver {
    pub fn new(client: RuntimeClient, workload: Workload, pacing: Pacing) -> Driver {
        Driver {
            client,
            workload: Mutex::new(workload),
            events: Mutex::new(Vec::new()),
            pacing,
        }
    }

    pub fn client(&self) -> &RuntimeClient {
        &self.client
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn workload(&self) -> Workload {
        self.workload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds or replaces a Machine in the model (for Machines built by hand in security tests).
    pub fn put_machine(&self, machine: Machine) {
        let mut workload = self.lock();
        workload.machines.retain(|m| m.name() != machine.name());
        workload.machines.push(machine);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Workload> {
        self.workload.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, event: Event) {
        tracing::info!(?event, "driver");
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Changes the KubeadmControlPlane spec and reconciles it until every control-plane Machine
    /// was updated in place or recorded as "would replace".
    ///
    /// Like KCP, it first raises the workload cluster's kubeadm-config `kubernetesVersion`
    /// (`UpdateClusterConfiguration`) when the version goes up by at most one minor. KCP's
    /// admission webhook would refuse a minor skip outright; here the skip still reaches
    /// CanUpdateMachine, so that the extension's own refusal is exercised, but the cluster's
    /// configuration is left alone.
    pub async fn upgrade_control_plane(
        &self,
        cluster: &SimCluster,
        change: &Change,
    ) -> Result<Vec<Decision>> {
        let current = self.lock().kcp.version.clone();
        if let (Ok(from), Ok(to)) = (Version::parse(&current), Version::parse(&change.version))
            && to > from
            && to.major == from.major
            && to.minor <= from.minor + 1
        {
            cluster
                .update_cluster_configuration(&to)
                .await
                .map_err(|e| Error::Model(format!("UpdateClusterConfiguration: {e}")))?;
        }
        let names: Vec<String> = {
            let mut workload = self.lock();
            workload.kcp.version = change.version.clone();
            workload.kcp.custom_image = change.custom_image.clone();
            if let Some(files) = &change.files {
                workload.kcp.kubeadm_config_spec["files"] = files.clone();
            }
            workload
                .machines
                .iter()
                .filter(|m| m.is_control_plane())
                .map(|m| m.name().to_string())
                .collect()
        };
        let mut decisions = Vec::new();
        // maxSurge 0: no scale-up; one outdated Machine at a time, and nothing else while it
        // updates in place (the await below).
        for name in names {
            let (current, desired) = {
                let workload = self.lock();
                let current = workload
                    .machine(&name)
                    .cloned()
                    .ok_or_else(|| Error::Model(format!("no Machine {name}")))?;
                let desired = workload.desired_control_plane_objects(&current);
                (current, desired)
            };
            if current.is_update_in_progress() {
                // "we will always continue with the in-place update".
                self.reconcile_in_place_update(&name).await?;
                decisions.push(Decision::InPlace { machine: name });
                continue;
            }
            if up_to_date(&current, &desired) {
                continue;
            }
            let mut request = can_update_machine_request(&current, &desired);
            let response = self
                .client
                .call(Hook::CanUpdateMachine, &mut request)
                .await?;
            let outcome = capi::can_update_machine(&request, &response)?;
            self.record(Event::Decided {
                hook: Hook::CanUpdateMachine.name(),
                subject: name.clone(),
                in_place: outcome.in_place,
                reasons: outcome.reasons.clone(),
                message: response["message"].as_str().unwrap_or_default().into(),
            });
            if outcome.in_place {
                self.trigger_in_place_update(&name, desired)?;
                self.reconcile_in_place_update(&name).await?;
                decisions.push(Decision::InPlace { machine: name });
            } else {
                self.record(Event::WouldReplace {
                    machine: name.clone(),
                    reasons: outcome.reasons.clone(),
                });
                decisions.push(Decision::WouldReplace {
                    machine: name,
                    reasons: outcome.reasons,
                });
            }
        }
        Ok(decisions)
    }

    /// KCP's `triggerInPlaceUpdate` (or the MachineSet's `completeMoveMachine`): the
    /// update-in-progress annotation first, then the desired InfraMachine, BootstrapConfig and
    /// Machine, then `pending-hooks: UpdateMachine`.
    fn trigger_in_place_update(&self, name: &str, desired: Machine) -> Result<()> {
        let mut workload = self.lock();
        let machine = workload.machine_mut(name)?;
        set_annotation(&mut machine.machine, UPDATE_IN_PROGRESS, "");
        let mut infra = desired.infra;
        set_annotation(&mut infra, UPDATE_IN_PROGRESS, "");
        machine.infra = infra;
        let mut bootstrap = desired.bootstrap;
        set_annotation(&mut bootstrap, UPDATE_IN_PROGRESS, "");
        machine.bootstrap = bootstrap;
        machine.machine["spec"] = desired.machine["spec"].clone();
        let mut hooks = pending_hooks(&machine.machine);
        if !hooks.iter().any(|h| h == "UpdateMachine") {
            hooks.push("UpdateMachine".into());
        }
        hooks.sort();
        set_annotation(&mut machine.machine, PENDING_HOOKS, &hooks.join(","));
        drop(workload);
        self.record(Event::StartedInPlaceUpdate {
            machine: name.to_string(),
        });
        Ok(())
    }

    /// Changes the MachineDeployment's template and reconciles it: one CanUpdateMachineSet for
    /// old → new MachineSet, then Machines moved and updated in batches of `maxUnavailable`.
    pub async fn upgrade_machine_deployment(&self, change: &Change) -> Result<Vec<Decision>> {
        let (request, old_name, new_name, workers) = {
            let mut workload = self.lock();
            let old = workload.md.clone();
            let mut new = old.clone();
            new.version = change.version.clone();
            new.custom_image = change.custom_image.clone();
            if let Some(files) = &change.files {
                new.kubeadm_config_spec["files"] = files.clone();
            }
            let workers: Vec<String> = workload
                .machines
                .iter()
                .filter(|m| !m.is_control_plane())
                .map(|m| m.name().to_string())
                .collect();
            let old_name = workload.machine_set_name(workload.machine_set_generation);
            let new_name = workload.machine_set_name(workload.machine_set_generation + 1);
            let (old_infra, old_bootstrap) = workload.templates(&old_name, &old);
            let (new_infra, new_bootstrap) = workload.templates(&new_name, &new);
            let request = json!({
                "current": {
                    "machineSet": trim(&workload.machine_set(&old_name, &old, workers.len())),
                    "infrastructureMachineTemplate": trim(&old_infra),
                    "bootstrapConfigTemplate": trim(&old_bootstrap),
                },
                "desired": {
                    "machineSet": trim(&workload.machine_set(&new_name, &new, 0)),
                    "infrastructureMachineTemplate": trim(&new_infra),
                    "bootstrapConfigTemplate": trim(&new_bootstrap),
                },
            });
            workload.md = new;
            workload.machine_set_generation += 1;
            (request, old_name, new_name, workers)
        };
        let mut request = request;
        let response = self
            .client
            .call(Hook::CanUpdateMachineSet, &mut request)
            .await?;
        let outcome = capi::can_update_machine_set(&request, &response)?;
        self.record(Event::Decided {
            hook: Hook::CanUpdateMachineSet.name(),
            subject: format!("{old_name} => {new_name}"),
            in_place: outcome.in_place,
            reasons: outcome.reasons.clone(),
            message: response["message"].as_str().unwrap_or_default().into(),
        });
        if !outcome.in_place {
            return Ok(workers
                .into_iter()
                .map(|machine| {
                    self.record(Event::WouldReplace {
                        machine: machine.clone(),
                        reasons: outcome.reasons.clone(),
                    });
                    Decision::WouldReplace {
                        machine,
                        reasons: outcome.reasons.clone(),
                    }
                })
                .collect());
        }
        let batch = self.lock().max_unavailable.max(1);
        let mut decisions = Vec::new();
        for chunk in workers.chunks(batch) {
            for name in chunk {
                self.move_machine(name, &old_name, &new_name)?;
            }
            let results = futures::future::join_all(
                chunk
                    .iter()
                    .map(|name| self.reconcile_in_place_update(name)),
            )
            .await;
            for (name, result) in chunk.iter().zip(results) {
                result?;
                decisions.push(Decision::InPlace {
                    machine: name.clone(),
                });
            }
        }
        Ok(decisions)
    }

    /// The old MachineSet moves the Machine (`pending-acknowledge-move`), the MachineDeployment
    /// acknowledges, and the new MachineSet's `completeMoveMachine` applies its desired objects.
    fn move_machine(&self, name: &str, from: &str, to: &str) -> Result<()> {
        let desired = {
            let mut workload = self.lock();
            let md = workload.md.clone();
            let machine = workload.machine_mut(name)?;
            set_annotation(&mut machine.machine, UPDATE_IN_PROGRESS, "");
            set_annotation(&mut machine.machine, PENDING_ACKNOWLEDGE_MOVE, "");
            machine.machine["metadata"]["ownerReferences"] = json!([{"apiVersion": MACHINE_API, "kind": "MachineSet", "name": to, "uid": format!("uid-{to}"), "controller": true}]);
            machine.machine["metadata"]["labels"]["machine-template-hash"] =
                to.rsplit('-').next().unwrap_or_default().into();
            // The MachineDeployment acknowledged the move (acknowledged-move on the new MachineSet).
            remove_annotation(&mut machine.machine, PENDING_ACKNOWLEDGE_MOVE);
            let mut desired = machine.clone();
            desired.machine["spec"]["version"] = md.version.clone().into();
            desired.infra["spec"]["customImage"] = md.custom_image.clone().into();
            set_annotation(&mut desired.infra, CLONED_FROM_NAME, to);
            let mut spec = md.kubeadm_config_spec.clone();
            spec["joinConfiguration"]["discovery"] =
                machine.bootstrap["spec"]["joinConfiguration"]["discovery"].clone();
            desired.bootstrap["spec"] = spec;
            set_annotation(&mut desired.bootstrap, CLONED_FROM_NAME, to);
            desired
        };
        self.record(Event::Moved {
            machine: name.to_string(),
            from: from.to_string(),
            to: to.to_string(),
        });
        self.trigger_in_place_update(name, desired)
    }

    /// The Machine controller's in-place phase for one Machine, until completion: call
    /// UpdateMachine with the live objects, honour `retryAfterSeconds`, retry Failure and
    /// transport errors with backoff. Returns the final message.
    pub async fn reconcile_in_place_update(&self, name: &str) -> Result<String> {
        let start = Instant::now();
        let mut failures = 0u32;
        let mut last = String::from("not called yet");
        loop {
            if start.elapsed() > self.pacing.machine_deadline {
                return Err(Error::Timeout {
                    machine: name.to_string(),
                    after: self.pacing.machine_deadline,
                    last,
                });
            }
            let machine = self
                .lock()
                .machine(name)
                .cloned()
                .ok_or_else(|| Error::Model(format!("no Machine {name}")))?;
            let pending = pending_hooks(&machine.machine)
                .iter()
                .any(|h| h == "UpdateMachine");
            let in_progress = machine.annotation(UPDATE_IN_PROGRESS).is_some();
            if pending && !in_progress {
                // Orphan cleanup: completes without calling the extension.
                self.complete_in_place_update(name, "orphaned pending hook cleared")?;
                return Ok(String::new());
            }
            if !pending
                || machine.infra["metadata"]["annotations"][UPDATE_IN_PROGRESS].is_null()
                || machine.bootstrap["metadata"]["annotations"][UPDATE_IN_PROGRESS].is_null()
            {
                return Err(Error::Model(format!(
                    "Machine {name}: preconditions for UpdateMachine do not hold"
                )));
            }
            let mut request = update_machine_request(&machine);
            match self.client.call(Hook::UpdateMachine, &mut request).await {
                Ok(response) => {
                    let message = response["message"].as_str().unwrap_or_default().to_string();
                    let retry = response["retryAfterSeconds"].as_u64().unwrap_or(0);
                    failures = 0;
                    if retry == 0 {
                        self.complete_in_place_update(name, &message)?;
                        return Ok(message);
                    }
                    self.record(Event::Updating {
                        machine: name.to_string(),
                        message: message.clone(),
                    });
                    last = message;
                    tokio::time::sleep(self.pacing.retry_wait(retry)).await;
                }
                Err(Error::Failure { message, .. }) => {
                    self.record(Event::UpdateFailed {
                        machine: name.to_string(),
                        message: message.clone(),
                    });
                    last = message;
                    tokio::time::sleep(self.pacing.failure_wait(failures)).await;
                    failures += 1;
                }
                Err(Error::Transport(error)) => {
                    self.record(Event::TransportError {
                        machine: name.to_string(),
                        error: error.clone(),
                    });
                    last = error;
                    tokio::time::sleep(self.pacing.failure_wait(failures)).await;
                    failures += 1;
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// `completeInPlaceUpdate`: update-in-progress removed from all three objects, UpdateMachine
    /// removed from pending-hooks (the annotation deleted when empty).
    fn complete_in_place_update(&self, name: &str, message: &str) -> Result<()> {
        {
            let mut workload = self.lock();
            let machine = workload.machine_mut(name)?;
            remove_annotation(&mut machine.machine, UPDATE_IN_PROGRESS);
            remove_annotation(&mut machine.infra, UPDATE_IN_PROGRESS);
            remove_annotation(&mut machine.bootstrap, UPDATE_IN_PROGRESS);
            let hooks: Vec<String> = pending_hooks(&machine.machine)
                .into_iter()
                .filter(|h| h != "UpdateMachine")
                .collect();
            if hooks.is_empty() {
                remove_annotation(&mut machine.machine, PENDING_HOOKS);
            } else {
                set_annotation(&mut machine.machine, PENDING_HOOKS, &hooks.join(","));
            }
        }
        self.record(Event::Completed {
            machine: name.to_string(),
            message: message.to_string(),
        });
        Ok(())
    }

    /// Marks a Machine for an in-place update to `version` without asking CanUpdateMachine (as
    /// if a controller had decided), for tests of UpdateMachine's own refusals.
    pub fn force_in_place_update(&self, name: &str, version: &str) -> Result<()> {
        let desired = {
            let workload = self.lock();
            let mut desired = workload
                .machine(name)
                .cloned()
                .ok_or_else(|| Error::Model(format!("no Machine {name}")))?;
            desired.machine["spec"]["version"] = version.into();
            desired.infra["spec"]["customImage"] = format!("kindest/node:{version}").into();
            desired
        };
        self.trigger_in_place_update(name, desired)
    }

    /// One UpdateMachine call for a Machine, as the Machine controller makes it.
    pub async fn call_update_machine(&self, name: &str) -> Result<Value> {
        let machine = self
            .lock()
            .machine(name)
            .cloned()
            .ok_or_else(|| Error::Model(format!("no Machine {name}")))?;
        let mut request = update_machine_request(&machine);
        self.client.call(Hook::UpdateMachine, &mut request).await
    }
}

/// KCP's `UpToDate` filter for the fields this model varies: version, image and KubeadmConfig.
fn up_to_date(current: &Machine, desired: &Machine) -> bool {
    let mut current_spec = current.bootstrap["spec"].clone();
    let mut desired_spec = desired.bootstrap["spec"].clone();
    prepare_kubeadm_configs_for_diff(&mut desired_spec, &mut current_spec);
    current.version() == desired.version()
        && current.custom_image() == desired.custom_image()
        && current_spec == desired_spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        let mut workload = Workload {
            cluster: "c1".into(),
            namespace: "default".into(),
            control_plane_endpoint: "c1-lb:6443".into(),
            kcp: Desired {
                version: "v1.31.4".into(),
                custom_image: "kindest/node:v1.31.4".into(),
                kubeadm_config_spec: json!({
                    "clusterConfiguration": {"imageRepository": "registry.k8s.io"},
                    "initConfiguration": {"nodeRegistration": node_registration()},
                    "joinConfiguration": {"nodeRegistration": node_registration(), "controlPlane": {}},
                    "files": audit_file(),
                }),
            },
            md: Desired {
                version: "v1.31.4".into(),
                custom_image: "kindest/node:v1.31.4".into(),
                kubeadm_config_spec: json!({"joinConfiguration": {"nodeRegistration": node_registration()}}),
            },
            max_unavailable: 1,
            machine_set_generation: 0,
            machines: Vec::new(),
        };
        let init = workload.machine_for("c1-cp-0", "docker:////c1-cp-0", true, true);
        let join = workload.machine_for("c1-cp-1", "docker:////c1-cp-1", true, false);
        workload.machines = vec![init, join];
        workload
    }

    #[test]
    fn trim_keeps_only_what_capi_sends() {
        let w = workload();
        let trimmed = trim(&w.machines[0].machine);
        let keys: Vec<&String> = trimmed.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
        let metadata: Vec<&String> = trimmed["metadata"].as_object().unwrap().keys().collect();
        assert_eq!(metadata, ["labels", "name", "namespace"]);
    }

    #[test]
    fn init_machine_compares_equal_to_its_join_form_after_prepare() {
        let mut w = workload();
        w.kcp.version = "v1.32.3".into();
        w.kcp.custom_image = "kindest/node:v1.32.3".into();
        for current in w.machines.clone() {
            let desired = w.desired_control_plane_objects(&current);
            let request = can_update_machine_request(&current, &desired);
            assert_eq!(
                request["current"]["bootstrapConfig"]["spec"],
                request["desired"]["bootstrapConfig"]["spec"],
                "{}",
                current.name()
            );
            assert!(
                request["current"]["bootstrapConfig"]["spec"]["joinConfiguration"]
                    .get("discovery")
                    .is_none()
            );
            assert_eq!(request["desired"]["machine"]["spec"]["version"], "v1.32.3");
            assert_eq!(request["current"]["machine"]["spec"]["version"], "v1.31.4");
            assert!(!up_to_date(&current, &desired));
        }
    }

    #[test]
    fn files_change_remains_a_bootstrap_difference() {
        let mut w = workload();
        w.kcp.kubeadm_config_spec["files"] = json!([]);
        let current = w.machines[1].clone();
        let desired = w.desired_control_plane_objects(&current);
        let request = can_update_machine_request(&current, &desired);
        assert_ne!(
            request["current"]["bootstrapConfig"]["spec"],
            request["desired"]["bootstrapConfig"]["spec"]
        );
        // CAPI with a "yes, version only" answer that leaves files alone: not in place.
        let response = json!({"status": "Success"});
        assert!(
            !capi::can_update_machine(&request, &response)
                .unwrap()
                .in_place
        );
    }

    #[test]
    fn waits_never_go_below_the_floor() {
        let pacing = Pacing {
            retry_scale: 0.0,
            failure_backoff: Duration::ZERO,
            ..Pacing::default()
        };
        assert_eq!(pacing.retry_wait(10), MIN_WAIT);
        assert_eq!(pacing.failure_wait(0), MIN_WAIT);
        assert_eq!(Pacing::default().failure_wait(30), Duration::from_secs(4));
    }
}
