//! TEMPORARY: replaced by the hooks branch's version module at merge.
use std::fmt;
use std::str::FromStr;
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}
#[derive(Debug, thiserror::Error)]
#[error("invalid version")]
pub struct ParseVersionError;
impl FromStr for Version {
    type Err = ParseVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix('v').ok_or(ParseVersionError)?;
        let mut it = rest
            .split('.')
            .map(|p| p.parse::<u64>().map_err(|_| ParseVersionError));
        let v = Version {
            major: it.next().ok_or(ParseVersionError)??,
            minor: it.next().ok_or(ParseVersionError)??,
            patch: it.next().ok_or(ParseVersionError)??,
        };
        if it.next().is_some() {
            return Err(ParseVersionError);
        }
        Ok(v)
    }
}
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}
