//! CAPD's `providerID` (`docker:////<container-name>`) and the container name rules.

use std::fmt;
use std::str::FromStr;

use super::{Error, Result};

const SCHEME: &str = "docker:////";
/// Kubernetes object names are at most 253 characters, and CAPD derives container names from
/// them; anything longer did not come from CAPD.
const MAX_NAME_LEN: usize = 253;

/// A CAPD Machine's `spec.providerID`, which names its node container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderId {
    container: String,
}

impl ProviderId {
    pub fn parse(provider_id: &str) -> Result<ProviderId> {
        let invalid = |reason| Error::InvalidProviderId {
            provider_id: provider_id.to_string(),
            reason,
        };
        let name = provider_id
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with docker:////"))?;
        name_problem(name).map_or(Ok(()), |reason| Err(invalid(reason)))?;
        Ok(ProviderId {
            container: name.to_string(),
        })
    }

    /// The node container's name.
    pub fn container(&self) -> &str {
        &self.container
    }
}

impl FromStr for ProviderId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ProviderId::parse(s)
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.container)
    }
}

/// Checks a container name against Docker's rule `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, bounded in length.
pub fn validate_container_name(name: &str) -> Result<()> {
    name_problem(name).map_or(Ok(()), |reason| {
        Err(Error::InvalidContainerName {
            name: name.to_string(),
            reason,
        })
    })
}

/// Cluster names become label values and filter arguments: same rule as container names.
pub(super) fn validate_cluster_name(name: &str) -> Result<()> {
    name_problem(name).map_or(Ok(()), |reason| {
        Err(Error::InvalidClusterName {
            name: name.to_string(),
            reason,
        })
    })
}

fn name_problem(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Some("the name is empty"),
        Some(first) if !first.is_ascii_alphanumeric() => {
            return Some("the name must start with a letter or digit");
        }
        Some(_) => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Some("the name is longer than 253 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Some("the name may only contain letters, digits, '_', '.' and '-'");
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn parses_capd_provider_ids() {
        let cases = [
            ("docker:////demo-cp-0", "demo-cp-0"),
            (
                "docker:////my-cluster-md-0-7d9f8-x2k4p",
                "my-cluster-md-0-7d9f8-x2k4p",
            ),
            ("docker:////a", "a"),
            ("docker:////node_1.example", "node_1.example"),
            ("docker:////0abc", "0abc"),
        ];
        for (input, want) in cases {
            let id = ProviderId::parse(input).unwrap();
            assert_eq!(id.container(), want, "{input}");
            assert_eq!(id.to_string(), input, "round trip of {input}");
            assert_eq!(input.parse::<ProviderId>().unwrap(), id);
        }
    }

    #[test]
    fn refuses_anything_else() {
        let long = format!("docker:////{}", "a".repeat(254));
        let cases: &[(&str, &str)] = &[
            ("", "docker:////"),
            ("docker://x", "docker:////"),
            ("docker:///x", "docker:////"),
            ("DOCKER:////x", "docker:////"),
            ("kind://docker/x", "docker:////"),
            (" docker:////x", "docker:////"),
            ("docker:////", "empty"),
            ("docker:////a;rm -rf /", "only contain"),
            ("docker://///x", "start with"),
            ("docker:////../etc", "start with"),
            ("docker:////a/../b", "only contain"),
            ("docker:////-rf", "start with"),
            ("docker:////.hidden", "start with"),
            ("docker:////_x", "start with"),
            ("docker:////a b", "only contain"),
            ("docker:////a\n", "only contain"),
            ("docker:////a\0", "only contain"),
            ("docker:////nœud", "only contain"),
            ("docker:////ｆｕｌｌ", "start with"),
            ("docker:////a$(id)", "only contain"),
            ("docker:////a:b", "only contain"),
            (&long, "253"),
        ];
        for (input, reason_part) in cases {
            match ProviderId::parse(input) {
                Err(Error::InvalidProviderId {
                    provider_id,
                    reason,
                }) => {
                    assert_eq!(&provider_id, input);
                    assert!(
                        reason.contains(reason_part),
                        "{input:?}: reason {reason:?} lacks {reason_part:?}"
                    );
                }
                other => panic!("{input:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn longest_allowed_name() {
        let input = format!("docker:////{}", "a".repeat(253));
        assert!(ProviderId::parse(&input).is_ok());
    }

    #[test]
    fn error_message_says_what_is_expected() {
        let err = ProviderId::parse("docker://x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid providerID \"docker://x\": it does not start with docker:////; expected docker:////<container-name>"
        );
    }

    #[test]
    fn container_and_cluster_names() {
        assert!(validate_container_name("demo-cp-0").is_ok());
        assert!(matches!(
            validate_container_name("x/y"),
            Err(Error::InvalidContainerName { .. })
        ));
        assert!(validate_cluster_name("demo").is_ok());
        assert!(matches!(
            validate_cluster_name("demo=1"),
            Err(Error::InvalidClusterName { .. })
        ));
    }
}
