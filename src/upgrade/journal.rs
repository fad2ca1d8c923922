//! The journal: what an upgrade did to a node, kept inside the node.
//!
//! The node is the source of truth, not the extension's memory: a restarted extension, a second
//! replica, or the CLI all read the same record. Steps whose effect the node shows (a binary's
//! version, a manifest's image tag) are re-checked instead of trusted; the journal holds what the
//! node cannot show, above all whether *this upgrader* cordoned the node, so that it never
//! uncordons a node an operator cordoned.
//!
//! Layout inside the node (under `/var`, which survives `docker restart` in kind and CAPD nodes,
//! unlike the tmpfs `/run` and `/tmp`):
//!
//! ```text
//! /var/lib/capd-inplace/
//!   .lock                    flock(1) target that serialises lease changes
//!   lease                    "<owner> <expiry unix seconds>": one upgrader at a time per node
//!   <version>/journal.json   this file
//!   <version>/bin/           staged kubeadm, kubelet, kubectl (verified by sha256 before use)
//!   <version>/prev/          the binaries they replaced
//! ```

use std::collections::BTreeSet;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use super::step::Step;
use crate::version::KubeVersion;

pub const ROOT: &str = "/var/lib/capd-inplace";
/// The journal's file name in a version's directory.
pub const FILE_NAME: &str = "journal.json";
pub const LOCK_FILE: &str = "/var/lib/capd-inplace/.lock";
pub const LEASE_FILE: &str = "/var/lib/capd-inplace/lease";

/// Where one target version's files live in the node.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: String,
}

impl Paths {
    pub fn new(target: &KubeVersion) -> Self {
        // `KubeVersion` only displays as vMAJOR.MINOR.PATCH, so this path cannot escape ROOT.
        Paths {
            dir: format!("{ROOT}/{target}"),
        }
    }

    pub fn journal(&self) -> String {
        format!("{}/{FILE_NAME}", self.dir)
    }

    pub fn bin_dir(&self) -> String {
        format!("{}/bin", self.dir)
    }

    pub fn staged(&self, binary: &str) -> String {
        format!("{}/bin/{binary}", self.dir)
    }

    pub fn prev_dir(&self) -> String {
        format!("{}/prev", self.dir)
    }

    pub fn upgrade_config(&self) -> String {
        format!("{}/upgrade-configuration.yaml", self.dir)
    }
}

/// The versions a node had before this upgrade touched it, for the record and for rollback by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromVersions {
    pub kubeadm: String,
    pub kubelet: String,
    pub kubectl: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedError {
    pub step: Step,
    pub message: String,
}

/// The most of an error message the journal keeps. The journal reaches the node as one argument
/// of an exec, which the kernel caps at 128 KiB, and a failed command's message carries up to
/// 64 KiB of its output; the end of it says what went wrong.
const RECORDED_MESSAGE_BYTES: usize = 8 * 1024;

impl RecordedError {
    /// Records `message`, keeping its last `RECORDED_MESSAGE_BYTES` when it is longer.
    pub fn new(step: Step, message: &str) -> RecordedError {
        let mut start = message.len().saturating_sub(RECORDED_MESSAGE_BYTES);
        while !message.is_char_boundary(start) {
            start += 1;
        }
        let message = if start == 0 {
            message.to_string()
        } else {
            format!("…{}", &message[start..])
        };
        RecordedError { step, message }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub target: String,
    /// `namespace/name` of the Machine when driven by CAPI; absent for the CLI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<FromVersions>,
    #[serde(default)]
    pub completed: BTreeSet<Step>,
    /// True only between our cordon and our uncordon.
    #[serde(default)]
    pub cordoned_by_us: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<RecordedError>,
    #[serde(default)]
    pub done: bool,
}

impl Journal {
    pub fn new(target: &KubeVersion, machine: Option<String>) -> Self {
        Journal {
            target: target.to_string(),
            machine,
            from: None,
            completed: BTreeSet::new(),
            cordoned_by_us: false,
            last_error: None,
            done: false,
        }
    }

    /// The step an operator should look at: the first one not yet completed.
    pub fn current_step(&self) -> Option<Step> {
        if self.done {
            return None;
        }
        Step::ALL.into_iter().find(|s| !self.completed.contains(s))
    }
}

/// The lease protocol, run as `flock -w 10 LOCK_FILE sh -c LEASE_ACQUIRE sh LEASE_FILE OWNER TTL`.
///
/// The script is a constant: request data only ever arrives as positional arguments, never
/// inside the script text. Time comes from the node's own clock, so two upgraders on hosts
/// with different clocks still agree. Exit 75 (EX_TEMPFAIL) means another owner holds a live
/// lease; its owner and expiry are printed.
pub const LEASE_ACQUIRE: &str = r#"set -eu
lease="$1"; owner="$2"; ttl="$3"
now=$(date +%s)
if [ -s "$lease" ]; then
  read -r holder expires < "$lease" || true
  if [ "${holder:-}" != "$owner" ] && [ "${expires:-0}" -gt "$now" ]; then
    echo "${holder:-} ${expires:-0}"
    exit 75
  fi
fi
printf '%s %s\n' "$owner" "$((now + ttl))" > "$lease.tmp"
mv -f "$lease.tmp" "$lease"
"#;

/// The head of a script that changes the node only for the lease's holder, run as
/// `sh -c 'IF_LEASE_HELD…' sh LEASE_FILE OWNER ARGS…` (under the lease lock when what follows
/// must not be separated from the check): unless `OWNER` holds the lease it prints the holder (or
/// `nobody`) and exits [`LEASE_HELD`]; else the rest of the script runs with `ARGS…` as its
/// arguments and `$lease` and `$owner` set. Alone, it is the check.
pub const IF_LEASE_HELD: &str = r#"set -eu
lease="$1"; owner="$2"; shift 2
holder=
if [ -s "$lease" ]; then read -r holder expires < "$lease" || true; fi
if [ "$holder" != "$owner" ]; then
  echo "${holder:-nobody}"
  exit 75
fi
"#;

/// Extends the lease of `OWNER` by `TTL` seconds from now, run as [`LEASE_ACQUIRE`] is. Unlike
/// it, never takes a lease that `OWNER` does not hold ([`IF_LEASE_HELD`]): exit [`LEASE_HELD`],
/// with the holder (or `nobody`) printed, means the lease was lost, perhaps taken and released by
/// another upgrader. So a renewal that runs just after its owner released the lease cannot take
/// it back.
pub static LEASE_RENEW: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"{IF_LEASE_HELD}printf '%s %s\n' "$owner" "$(($(date +%s) + $1))" > "$lease.tmp"
mv -f "$lease.tmp" "$lease"
"#
    )
});

/// Releases the lease if, and only if, `OWNER` holds it, and then prints [`RELEASED`].
pub const LEASE_RELEASE: &str = r#"set -eu
lease="$1"; owner="$2"
if [ -s "$lease" ]; then
  read -r holder expires < "$lease" || true
  if [ "${holder:-}" = "$owner" ]; then rm -f "$lease"; echo released; fi
fi
"#;

/// What [`LEASE_RELEASE`] prints when it removed the owner's lease: the owner held it until then.
pub const RELEASED: &str = "released";

/// The exit code of the lease scripts ([`LEASE_ACQUIRE`], and [`IF_LEASE_HELD`] with every
/// script that starts with it) when the lease is not the caller's.
pub const LEASE_HELD: i64 = 75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_errors_keep_the_end_of_long_messages() {
        let short = RecordedError::new(Step::Drain, "drain failed");
        assert_eq!(short.message, "drain failed");
        // Three-byte characters: the cut falls inside one and moves to the next boundary.
        let long = format!("{}the end", "€".repeat(4_000));
        let kept = RecordedError::new(Step::KubeadmUpgrade, &long).message;
        assert!(kept.starts_with('…') && kept.ends_with("the end"), "{kept}");
        assert!(kept.len() <= RECORDED_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn paths_stay_under_root() {
        let paths = Paths::new(&"v1.32.3".parse().unwrap());
        assert_eq!(
            paths.journal(),
            "/var/lib/capd-inplace/v1.32.3/journal.json"
        );
        assert_eq!(
            paths.staged("kubelet"),
            "/var/lib/capd-inplace/v1.32.3/bin/kubelet"
        );
    }

    #[test]
    fn journal_round_trips_and_tolerates_older_fields() {
        let mut journal = Journal::new(&"v1.32.3".parse().unwrap(), Some("default/m1".into()));
        journal.completed.insert(Step::Preflight);
        journal.completed.insert(Step::Stage);
        journal.cordoned_by_us = true;
        let json = serde_json::to_string(&journal).unwrap();
        assert_eq!(serde_json::from_str::<Journal>(&json).unwrap(), journal);
        assert_eq!(journal.current_step(), Some(Step::InstallKubeadm));

        let minimal: Journal = serde_json::from_str(r#"{"target":"v1.32.3","unknown":1}"#).unwrap();
        assert_eq!(minimal.current_step(), Some(Step::Preflight));
    }

    #[test]
    fn lease_scripts_behave() {
        // The scripts run in the node's sh; run them here with the host's sh to prove the protocol.
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("lease");
        let lease = lease.to_str().unwrap();
        let run = |script: &str, args: &[&str]| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg("sh")
                .args(args)
                .output()
                .unwrap()
        };
        assert!(run(LEASE_ACQUIRE, &[lease, "a", "60"]).status.success());
        assert!(
            run(LEASE_ACQUIRE, &[lease, "a", "60"]).status.success(),
            "renewal by the holder"
        );
        let other = run(LEASE_ACQUIRE, &[lease, "b", "60"]);
        assert_eq!(other.status.code(), Some(LEASE_HELD as i32));
        assert!(String::from_utf8_lossy(&other.stdout).starts_with("a "));
        std::fs::write(lease, "a 1\n").unwrap();
        assert!(run(&LEASE_RENEW, &[lease, "a", "60"]).status.success());
        let renewed = std::fs::read_to_string(lease).unwrap();
        let (holder, expires) = renewed.trim().split_once(' ').unwrap();
        assert_eq!(holder, "a");
        assert!(expires.parse::<u64>().unwrap() > 1_700_000_000, "{renewed}");
        let renewed_by_other = run(&LEASE_RENEW, &[lease, "b", "60"]);
        assert_eq!(renewed_by_other.status.code(), Some(LEASE_HELD as i32));
        assert_eq!(String::from_utf8_lossy(&renewed_by_other.stdout), "a\n");
        let not_released = run(LEASE_RELEASE, &[lease, "b"]);
        assert!(not_released.status.success());
        assert_eq!(String::from_utf8_lossy(&not_released.stdout), "");
        assert!(
            std::path::Path::new(lease).exists(),
            "only the holder releases"
        );
        let released = run(LEASE_RELEASE, &[lease, "a"]);
        assert!(released.status.success());
        assert_eq!(String::from_utf8_lossy(&released.stdout).trim(), RELEASED);
        // Released, the lease is nobody's: a late renewal does not take it back.
        let late = run(&LEASE_RENEW, &[lease, "a", "60"]);
        assert_eq!(late.status.code(), Some(LEASE_HELD as i32));
        assert_eq!(String::from_utf8_lossy(&late.stdout), "nobody\n");
        assert!(!std::path::Path::new(lease).exists());
        assert!(run(LEASE_ACQUIRE, &[lease, "b", "0"]).status.success());
        assert!(
            run(LEASE_ACQUIRE, &[lease, "a", "60"]).status.success(),
            "an expired lease is taken over"
        );
    }
}
