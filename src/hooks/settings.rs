//! Policy settings, read from each request's `settings` map (the ExtensionConfig's `spec.settings`).
//!
//! | Setting | Values (default) | Effect |
//! |---|---|---|
//! | `disableInPlaceUpdates` | `"true"` / `"false"` (`"false"`) | `"true"` declines every CanUpdateMachine and CanUpdateMachineSet call, so CAPI always rolls out new Machines. Same name and meaning as upstream's test extension. |
//! | `workerMaxMinorSkew` | `"1"` to `"3"` (`"1"`) | How many minor versions a worker (CanUpdateMachineSet) may cross in one in-place update. The kubelet may trail the API server by three minors; control-plane Machines always follow kubeadm's one-minor rule. |
//! | `kindImageRepositories` | comma-separated repositories (`"kindest/node,docker.io/kindest/node"`) | Repositories whose `<repo>:<desired version>[@sha256:<digest>]` image counts as the version-coupled kind node image on DockerMachine(Template) `customImage` and DevMachine(Template) `backend.docker.customImage`. Add a mirror here, for example `registry.example:5000/kindest/node`. |
//!
//! A setting with a value outside its range makes the call decline (Success, no patches) with a
//! message naming the setting: declining is CAPI's safe default (a rollout), while `Failure` would block it.
//! Unknown settings are ignored, because the same map goes to every hook of the ExtensionConfig.

use std::collections::BTreeMap;

/// Name of the setting that declines every in-place update.
pub const DISABLE_IN_PLACE_UPDATES: &str = "disableInPlaceUpdates";
/// Name of the worker minor-skew setting.
pub const WORKER_MAX_MINOR_SKEW: &str = "workerMaxMinorSkew";
/// Name of the kind image repositories setting.
pub const KIND_IMAGE_REPOSITORIES: &str = "kindImageRepositories";

/// The repositories kind's own image mapper uses, with and without the implicit registry.
const DEFAULT_KIND_IMAGE_REPOSITORIES: [&str; 2] = ["kindest/node", "docker.io/kindest/node"];
/// kubeadm's rule: one minor version per upgrade.
pub const CONTROL_PLANE_MAX_MINOR_SKEW: u64 = 1;
/// The kubelet version skew policy allows a kubelet three minors behind the API server.
const WORKER_MAX_MINOR_SKEW_LIMIT: u64 = 3;

/// A setting that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid setting {name}: expected {expected}")]
    Invalid {
        name: &'static str,
        expected: &'static str,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The parsed policy settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub disable_in_place_updates: bool,
    pub worker_max_minor_skew: u64,
    pub kind_image_repositories: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            disable_in_place_updates: false,
            worker_max_minor_skew: 1,
            kind_image_repositories: DEFAULT_KIND_IMAGE_REPOSITORIES
                .iter()
                .map(|repo| (*repo).to_owned())
                .collect(),
        }
    }
}

impl Settings {
    /// Reads the settings from a request's `settings` map.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self> {
        let mut settings = Self::default();
        if let Some(value) = map.get(DISABLE_IN_PLACE_UPDATES) {
            settings.disable_in_place_updates = match value.trim() {
                "true" => true,
                "false" | "" => false,
                _ => {
                    return Err(Error::Invalid {
                        name: DISABLE_IN_PLACE_UPDATES,
                        expected: "\"true\" or \"false\"",
                    });
                }
            };
        }
        if let Some(value) = map.get(WORKER_MAX_MINOR_SKEW) {
            settings.worker_max_minor_skew = value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|skew| (1..=WORKER_MAX_MINOR_SKEW_LIMIT).contains(skew))
                .ok_or(Error::Invalid {
                    name: WORKER_MAX_MINOR_SKEW,
                    expected: "an integer from 1 to 3",
                })?;
        }
        if let Some(value) = map.get(KIND_IMAGE_REPOSITORIES) {
            let repositories: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|repo| !repo.is_empty())
                .map(str::to_owned)
                .collect();
            let valid = !repositories.is_empty()
                && repositories.iter().all(|repo| {
                    repo.chars().all(|c| {
                        c.is_ascii_lowercase()
                            || c.is_ascii_digit()
                            || matches!(c, '.' | '-' | '_' | '/' | ':')
                    })
                });
            if !valid {
                return Err(Error::Invalid {
                    name: KIND_IMAGE_REPOSITORIES,
                    expected: "a comma-separated list of image repositories",
                });
            }
            settings.kind_image_repositories = repositories;
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_when_empty() {
        assert_eq!(Settings::from_map(&map(&[])), Ok(Settings::default()));
        assert_eq!(
            Settings::from_map(&map(&[("extensionConfigName", "x")])),
            Ok(Settings::default())
        );
    }

    #[test]
    fn reads_each_setting() {
        let settings = Settings::from_map(&map(&[
            (DISABLE_IN_PLACE_UPDATES, "true"),
            (WORKER_MAX_MINOR_SKEW, "3"),
            (
                KIND_IMAGE_REPOSITORIES,
                " kindest/node , registry.example:5000/kindest/node ",
            ),
        ]))
        .unwrap();
        assert!(settings.disable_in_place_updates);
        assert_eq!(settings.worker_max_minor_skew, 3);
        assert_eq!(
            settings.kind_image_repositories,
            ["kindest/node", "registry.example:5000/kindest/node"]
        );
    }

    #[test]
    fn rejects_bad_values() {
        let cases = [
            (DISABLE_IN_PLACE_UPDATES, "yes"),
            (WORKER_MAX_MINOR_SKEW, "0"),
            (WORKER_MAX_MINOR_SKEW, "4"),
            (WORKER_MAX_MINOR_SKEW, "one"),
            (KIND_IMAGE_REPOSITORIES, ""),
            (KIND_IMAGE_REPOSITORIES, "Kindest/Node"),
            (KIND_IMAGE_REPOSITORIES, "kindest/node;rm"),
        ];
        for (name, value) in cases {
            let err = Settings::from_map(&map(&[(name, value)])).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid setting {name}:")),
                "{name}={value}: {err}"
            );
        }
    }
}
