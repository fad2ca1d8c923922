//! The in-process CanUpdateMachine decision on a realistic request of about 30 KB: the version and
//! kind image fixture, with the KubeadmConfig padded by files as real clusters carry them.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use capd_inplace::hooks::can_update::can_update_machine;
use capd_inplace::hooks::types::CanUpdateMachineRequest;
use serde_json::{Value, json};

const FIXTURE: &str = include_str!("../testdata/hooks/machine-version-and-kind-image.request.json");
const TARGET_BYTES: usize = 30 * 1024;

fn padded_request() -> Vec<u8> {
    let mut request: Value = serde_json::from_str(FIXTURE).expect("fixture is JSON");
    let mut index = 0;
    while serde_json::to_vec(&request).expect("serializable").len() < TARGET_BYTES {
        let file = json!({
            "path": format!("/etc/kubernetes/extra/config-{index}.yaml"),
            "owner": "root:root",
            "permissions": "0644",
            "content": format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra-{index}\ndata:\n  key: value-{index}\n  other: {}\n", "x".repeat(200)),
        });
        for side in ["current", "desired"] {
            request[side]["bootstrapConfig"]["spec"]["files"]
                .as_array_mut()
                .expect("files is a list")
                .push(file.clone());
        }
        index += 1;
    }
    serde_json::to_vec(&request).expect("serializable")
}

fn bench(c: &mut Criterion) {
    let body = padded_request();
    eprintln!("request size: {} bytes", body.len());
    // What the handler does per call: decode the body, decide, encode the answer.
    c.bench_function("can_update_machine decode+decide+encode (30 KB)", |b| {
        b.iter(|| {
            let request: CanUpdateMachineRequest =
                serde_json::from_slice(black_box(&body)).expect("decodes");
            let (response, _) = can_update_machine(&request);
            black_box(serde_json::to_vec(&response).expect("encodes"))
        })
    });
    let request: CanUpdateMachineRequest = serde_json::from_slice(&body).expect("decodes");
    c.bench_function("can_update_machine decide only (30 KB)", |b| {
        b.iter(|| black_box(can_update_machine(black_box(&request))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
