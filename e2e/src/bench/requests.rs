//! Request bodies the benchmarks share: the criterion bench of the decision (`benches/can_update.rs`)
//! and the hook-path load test (`scripts/bench-hooks.sh`) must load the same request, or their
//! figures would not describe the same work.

use serde_json::{Value, json};

/// The version and kind image fixture: a control-plane Machine whose only change is the one CAPI
/// asks about on a Kubernetes upgrade.
const FIXTURE: &str =
    include_str!("../../../testdata/hooks/machine-version-and-kind-image.request.json");

/// Roughly what KCP sends for a real control plane: the KubeadmConfig carries files (audit policy,
/// admission config, patches) that dwarf the rest of the request.
pub const CAN_UPDATE_REQUEST_BYTES: usize = 30 * 1024;

/// A CanUpdateMachineRequest of at least [`CAN_UPDATE_REQUEST_BYTES`]: the fixture with the same
/// files added to the current and the desired KubeadmConfig, so the answer is still "in place".
/// As on a plain upgrade from KCP, the two KubeadmConfigs are the same bytes: they are read once,
/// and no file is decoded or compared.
pub fn can_update_machine_request() -> Vec<u8> {
    let mut request: Value = serde_json::from_str(FIXTURE).expect("the fixture is JSON");
    let mut index = 0;
    while serde_json::to_vec(&request)
        .expect("a Value serializes")
        .len()
        < CAN_UPDATE_REQUEST_BYTES
    {
        let file = json!({
            "path": format!("/etc/kubernetes/extra/config-{index}.yaml"),
            "owner": "root:root",
            "permissions": "0644",
            "content": format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra-{index}\ndata:\n  key: value-{index}\n  other: {}\n", "x".repeat(200)),
        });
        for side in ["current", "desired"] {
            request[side]["bootstrapConfig"]["spec"]["files"]
                .as_array_mut()
                .expect("the fixture's KubeadmConfig has files")
                .push(file.clone());
        }
        index += 1;
    }
    serde_json::to_vec(&request).expect("a Value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_large_and_keeps_its_shape() {
        let body = can_update_machine_request();
        assert!(body.len() >= CAN_UPDATE_REQUEST_BYTES);
        assert!(body.len() < CAN_UPDATE_REQUEST_BYTES + 1024);
        let request: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(request["kind"], "CanUpdateMachineRequest");
        assert_eq!(
            request["current"]["bootstrapConfig"]["spec"]["files"],
            request["desired"]["bootstrapConfig"]["spec"]["files"]
        );
    }
}
