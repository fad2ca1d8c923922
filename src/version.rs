//! Kubernetes versions as Cluster API writes them (`vMAJOR.MINOR.PATCH`), and the upgrade skew rules.
//!
//! Pure functions only. A version string comes from the network (a Machine's `spec.version`), so the
//! parser is strict: a leading `v`, three decimal numbers without leading zeros, no pre-release and no
//! build metadata. CAPI v1.14 compares the kubelet version with `spec.version` as raw strings, so a
//! version with build metadata could never be reported as done; refusing it up front is the honest answer.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Longest version string accepted; real ones are at most `v999.999.999`.
const MAX_VERSION_LEN: usize = 32;

/// Why a version string or an upgrade step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The text is not `vMAJOR.MINOR.PATCH`. The input itself is not echoed: it is untrusted.
    #[error("not a vMAJOR.MINOR.PATCH version")]
    Malformed,
    /// The target is older than the running version.
    #[error("downgrade from {from} to {to} is not supported")]
    Downgrade { from: KubeVersion, to: KubeVersion },
    /// The major version changes.
    #[error("major version change from {from} to {to} is not supported")]
    MajorChange { from: KubeVersion, to: KubeVersion },
    /// More minor versions than allowed are crossed in one step.
    #[error(
        "upgrade from {from} to {to} crosses {minors} minor versions, at most {allowed} allowed"
    )]
    TooManyMinors {
        from: KubeVersion,
        to: KubeVersion,
        minors: u64,
        allowed: u64,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A strict Kubernetes release version, for example `v1.34.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl KubeVersion {
    /// Builds a version from its parts.
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `vMAJOR.MINOR.PATCH` strictly (see the module doc).
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_VERSION_LEN {
            return Err(Error::Malformed);
        }
        let numbers = text.strip_prefix('v').ok_or(Error::Malformed)?;
        // semver rejects leading zeros and junk; pre-release and build metadata are refused below.
        let parsed = semver::Version::parse(numbers).map_err(|_| Error::Malformed)?;
        if !parsed.pre.is_empty() || !parsed.build.is_empty() {
            return Err(Error::Malformed);
        }
        Ok(Self::new(parsed.major, parsed.minor, parsed.patch))
    }
}

impl FromStr for KubeVersion {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What an accepted version change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Same version: nothing to upgrade.
    Unchanged,
    /// Same minor, newer patch.
    Patch,
    /// Newer minor (by at most the allowed number of minors).
    Minor { minors: u64 },
}

/// Checks an upgrade from `from` to `to`: no downgrade, no major change, and at most
/// `max_minors` minor versions crossed (kubeadm's rule is 1).
pub fn check_upgrade(from: KubeVersion, to: KubeVersion, max_minors: u64) -> Result<Change> {
    match to.cmp(&from) {
        Ordering::Less => return Err(Error::Downgrade { from, to }),
        Ordering::Equal => return Ok(Change::Unchanged),
        Ordering::Greater => {}
    }
    if to.major != from.major {
        return Err(Error::MajorChange { from, to });
    }
    let minors = to.minor - from.minor;
    if minors == 0 {
        Ok(Change::Patch)
    } else if minors > max_minors {
        Err(Error::TooManyMinors {
            from,
            to,
            minors,
            allowed: max_minors,
        })
    } else {
        Ok(Change::Minor { minors })
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_strict_versions() {
        let cases: &[(&str, Option<KubeVersion>)] = &[
            ("v1.34.2", Some(KubeVersion::new(1, 34, 2))),
            ("v1.0.0", Some(KubeVersion::new(1, 0, 0))),
            ("v10.100.1000", Some(KubeVersion::new(10, 100, 1000))),
            ("1.34.2", None),
            ("v1.34", None),
            ("v1.34.2.1", None),
            ("v01.34.2", None),
            ("v1.034.2", None),
            ("v1.34.2-rc.0", None),
            ("v1.34.2+k0s", None),
            ("V1.34.2", None),
            (" v1.34.2", None),
            ("v1.34.2 ", None),
            ("v1.31.0; rm -rf /", None),
            ("", None),
            ("v", None),
            ("v1.2.99999999999999999999999", None),
        ];
        for (text, expected) in cases {
            assert_eq!(KubeVersion::parse(text).ok(), *expected, "input {text:?}");
        }
    }

    #[test]
    fn displays_with_v_prefix() {
        assert_eq!(KubeVersion::new(1, 34, 2).to_string(), "v1.34.2");
    }

    #[test]
    fn upgrade_skew_rules() {
        let v = |s: &str| KubeVersion::parse(s).unwrap();
        let cases: &[(&str, &str, u64, Result<Change>)] = &[
            ("v1.33.6", "v1.33.6", 1, Ok(Change::Unchanged)),
            ("v1.33.6", "v1.33.7", 1, Ok(Change::Patch)),
            ("v1.33.6", "v1.34.0", 1, Ok(Change::Minor { minors: 1 })),
            (
                "v1.33.6",
                "v1.35.0",
                1,
                Err(Error::TooManyMinors {
                    from: v("v1.33.6"),
                    to: v("v1.35.0"),
                    minors: 2,
                    allowed: 1,
                }),
            ),
            ("v1.33.6", "v1.35.0", 2, Ok(Change::Minor { minors: 2 })),
            (
                "v1.34.2",
                "v1.33.6",
                3,
                Err(Error::Downgrade {
                    from: v("v1.34.2"),
                    to: v("v1.33.6"),
                }),
            ),
            (
                "v1.34.2",
                "v1.34.1",
                1,
                Err(Error::Downgrade {
                    from: v("v1.34.2"),
                    to: v("v1.34.1"),
                }),
            ),
            (
                "v1.34.2",
                "v2.0.0",
                1,
                Err(Error::MajorChange {
                    from: v("v1.34.2"),
                    to: v("v2.0.0"),
                }),
            ),
        ];
        for (from, to, max, expected) in cases {
            assert_eq!(
                check_upgrade(v(from), v(to), *max),
                *expected,
                "{from} -> {to} (max {max})"
            );
        }
    }

    #[test]
    fn skew_messages_are_stable() {
        let err =
            check_upgrade(KubeVersion::new(1, 32, 0), KubeVersion::new(1, 34, 2), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "upgrade from v1.32.0 to v1.34.2 crosses 2 minor versions, at most 1 allowed"
        );
    }
}
