//! Kubernetes release versions (`vMAJOR.MINOR.PATCH`) and the skew rules the double enforces.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse {0:?} as a Kubernetes release version (want vMAJOR.MINOR.PATCH)")]
pub struct ParseError(pub String);

impl Version {
    /// Accepts `v1.31.4` and, like kubeadm's normalisation, `1.31.4`. Pre-releases are not served
    /// by the simulated mirror and are refused.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(text.to_string());
        let bare = text.trim().strip_prefix('v').unwrap_or(text.trim());
        let mut parts = bare.split('.');
        let mut next = || -> Result<u64, ParseError> {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let version = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(version)
    }

    /// `(major, minor)`, the granularity of every skew rule.
    pub fn minor_key(&self) -> (u64, u64) {
        (self.major, self.minor)
    }

    /// How many minors `self` is ahead of `other` (negative when behind); same major assumed.
    pub fn minors_ahead_of(&self, other: &Version) -> i64 {
        (self.minor as i64 - other.minor as i64) + 1000 * (self.major as i64 - other.major as i64)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The kubelet skew rule of the version-skew policy: never newer than the oldest API server,
/// at most three minors older. `Err` carries the reason.
pub fn check_kubelet_skew(kubelet: &Version, oldest_apiserver: &Version) -> Result<(), String> {
    let ahead = kubelet.minors_ahead_of(oldest_apiserver);
    if ahead > 0 {
        return Err(format!(
            "kubelet version {kubelet} is newer than the oldest kube-apiserver {oldest_apiserver}: \
             the version skew policy forbids a kubelet newer than any API server"
        ));
    }
    if ahead < -3 {
        return Err(format!(
            "kubelet version {kubelet} is more than 3 minor versions older than kube-apiserver \
             {oldest_apiserver}: the version skew policy allows at most 3"
        ));
    }
    Ok(())
}

/// The etcd image tag kubeadm of a given minor deploys (kubeadm's `SupportedEtcdVersion`).
pub fn etcd_tag(minor: u64) -> &'static str {
    match minor {
        ..=29 => "3.5.12-0",
        30 | 31 => "3.5.15-0",
        32 => "3.5.16-0",
        _ => "3.5.21-0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn parses_release_versions_only() {
        assert_eq!(
            v("v1.31.4"),
            Version {
                major: 1,
                minor: 31,
                patch: 4
            }
        );
        assert_eq!(v("1.30.10").to_string(), "v1.30.10");
        for bad in [
            "",
            "v1.31",
            "v1.31.4.5",
            "v1.31.x",
            "v1.32.0-rc.1",
            "stable",
            "v1..4",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn orders_by_numbers_not_text() {
        assert!(v("v1.31.10") > v("v1.31.9"));
        assert!(v("v1.4.0") < v("v1.31.0"));
    }

    #[test]
    fn kubelet_skew_table() {
        let cases = [
            ("same", "v1.31.4", "v1.31.4", true),
            ("newer patch same minor", "v1.31.9", "v1.31.4", true),
            ("one minor newer", "v1.32.0", "v1.31.4", false),
            ("three minors older", "v1.28.0", "v1.31.4", true),
            ("four minors older", "v1.27.0", "v1.31.4", false),
        ];
        for (name, kubelet, api, ok) in cases {
            assert_eq!(
                check_kubelet_skew(&v(kubelet), &v(api)).is_ok(),
                ok,
                "{name}"
            );
        }
    }
}
