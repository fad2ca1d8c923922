//! `simnode`: one binary that is kubeadm, kubelet or kubectl (by its stamp or `argv[0]`), or the
//! artifact mirror (`simnode mirror --root DIR --listen ADDR`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use capd_inplace_simnode::stamp::read_stamp;
use capd_inplace_simnode::version::Version;
use capd_inplace_simnode::{Ctx, Failure, kubeadm, kubectl, kubelet, mirror};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let called_as = argv0.rsplit('/').next().unwrap_or("").to_string();
    let rest: Vec<String> = args.drain(1..).collect();

    let stamp = read_stamp(std::path::Path::new("/proc/self/exe"))
        .ok()
        .flatten();
    // The stamp says which tool a published file is; a file published as kubeadm stays kubeadm
    // whatever it is renamed to, like the real binaries.
    let tool = stamp
        .as_ref()
        .and_then(|s| s.tool.clone())
        .unwrap_or(called_as);

    if tool == "simnode" {
        return simnode(&rest);
    }
    let version = match stamp.map(|s| s.version).or_else(|| {
        std::env::var("SIMNODE_VERSION")
            .ok()
            .and_then(|v| Version::parse(&v).ok())
    }) {
        Some(v) => v,
        None => {
            eprintln!(
                "simnode: this binary carries no version stamp (see capd_inplace_simnode::stamp), and SIMNODE_VERSION is unset"
            );
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx::from_env(version);
    let (fault_key, target) = match tool.as_str() {
        "kubeadm" => (kubeadm::fault_key(&rest), None),
        "kubectl" => kubectl::fault_targets(&rest),
        "kubelet" if rest.iter().any(|a| a.starts_with("--version")) => {
            ("kubelet-version".to_string(), None)
        }
        "kubelet" => ("kubelet".to_string(), None),
        other => {
            eprintln!(
                "simnode: unknown tool {other:?}; install this binary as kubeadm, kubelet or kubectl, or run `simnode mirror`"
            );
            return ExitCode::from(2);
        }
    };
    if let Err(failure) = apply_faults(&ctx, &fault_key, target.as_deref()) {
        return fail(failure);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match tool.as_str() {
        "kubeadm" => kubeadm::run(&ctx, &rest, &mut out, &mut std::io::stdin().lock()),
        "kubectl" => kubectl::run(&ctx, &rest, &mut out),
        _ => kubelet::run(&ctx, &rest, &mut out),
    };
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(failure),
    }
}

fn fail(failure: Failure) -> ExitCode {
    eprintln!("{}", failure.message);
    ExitCode::from(u8::try_from(failure.code).unwrap_or(1))
}

/// Applies the faults armed for this command on this node (and on the node it targets).
fn apply_faults(ctx: &Ctx, key: &str, target: Option<&str>) -> Result<(), Failure> {
    let mut nodes = vec![ctx.node.as_str()];
    if let Some(t) = target.filter(|t| *t != ctx.node) {
        nodes.push(t);
    }
    let effect = ctx.state.take_faults(&nodes, key)?;
    if !effect.delay.is_zero() {
        std::thread::sleep(effect.delay);
    }
    if effect.hang {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    match effect.fail {
        Some((message, code)) => Err(Failure { message, code }),
        None => Ok(()),
    }
}

fn simnode(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("mirror") => {
            let mut root = None;
            let mut listen = "0.0.0.0:8080".to_string();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--root" => root = it.next().map(PathBuf::from),
                    "--listen" => listen = it.next().cloned().unwrap_or_default(),
                    other => {
                        eprintln!(
                            "simnode mirror: unknown argument {other:?}; usage: simnode mirror --root DIR --listen ADDR"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            let Some(root) = root else {
                eprintln!("simnode mirror: --root DIR is required");
                return ExitCode::from(2);
            };
            match mirror::serve(&root, &listen) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        _ => {
            eprintln!(
                "usage: simnode mirror --root DIR --listen ADDR\n(installed as kubeadm, kubelet or kubectl it behaves as that tool)"
            );
            ExitCode::from(2)
        }
    }
}
