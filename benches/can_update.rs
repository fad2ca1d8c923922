//! The in-process CanUpdateMachine decision on a realistic request of about 30 KB: the version and
//! kind image fixture, with the KubeadmConfig padded by files as real clusters carry them. The
//! request comes from `capd_inplace_e2e::bench`, which the hook-path load test loads too.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use capd_inplace::hooks::can_update::can_update_machine;
use capd_inplace::hooks::scan;
use capd_inplace::hooks::types::{CanUpdateMachineRequest, HookRequest};

fn bench(c: &mut Criterion) {
    let body = capd_inplace_e2e::bench::can_update_machine_request();
    eprintln!("request size: {} bytes", body.len());
    // What the handler does per call: decode the body, decide, encode the answer.
    c.bench_function("can_update_machine decode+decide+encode (30 KB)", |b| {
        b.iter(|| {
            let request = CanUpdateMachineRequest::read(black_box(&body)).expect("decodes");
            let (response, _) = can_update_machine(&request, &|_| None);
            black_box(serde_json::to_vec(&response).expect("encodes"))
        })
    });
    // The floor of reading the request at all: checking it is JSON, keeping nothing, with the
    // scanner the hooks read with; and serde_json doing the same, for comparison.
    c.bench_function(
        "can_update_machine floor: scan::check of the request (30 KB)",
        |b| b.iter(|| scan::check(black_box(&body)).expect("is JSON")),
    );
    c.bench_function(
        "can_update_machine reference: serde_json skim of the request (30 KB)",
        |b| {
            b.iter(|| {
                serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).expect("is JSON")
            })
        },
    );
    let request = CanUpdateMachineRequest::read(&body).expect("decodes");
    c.bench_function("can_update_machine decide only (30 KB)", |b| {
        b.iter(|| black_box(can_update_machine(black_box(&request), &|_| None)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
