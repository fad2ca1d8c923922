//! Policy settings, read from each request's `settings` map (the ExtensionConfig's `spec.settings`).
//!
//! | Setting | Values (default) | Effect |
//! |---|---|---|
//! | `disableInPlaceUpdates` | `"true"` / `"false"` (`"false"`) | `"true"` declines every CanUpdateMachine and CanUpdateMachineSet call, so CAPI always rolls out new Machines. Same name and meaning as upstream's test extension. |
//! | `workerMaxMinorSkew` | `"1"` to `"3"` (`"1"`) | How many minor versions a worker (CanUpdateMachineSet) may cross in one in-place update. The kubelet may trail the API server by three minors; control-plane Machines always follow kubeadm's one-minor rule. |
//! | `drain` | `"true"` / `"false"` (`"true"`) | Cordon and drain the node (through kubectl on a control-plane node) before its kubelet is replaced, and uncordon it after. |
//! | `drainTimeout` | a Go duration, `1s` to `2h` (`"5m"`) | How long `kubectl drain` may take before the step fails. |
//! | `artifactURL` | an `https://`, `http://` or `file://` base laid out like `https://dl.k8s.io/release` (the `--artifact-url` flag) | Where kubeadm, kubelet and kubectl and their `.sha256` files come from. |
//! | `fetchInNode` | `"true"` / `"false"` (`"false"`) | `"true"`: each node downloads the binaries itself with curl from `artifactURL` and checks them against the published sha256, instead of the extension uploading them from its verified cache. Needs an http(s) source: with a `file://` one (set, or `--artifact-url` when unset), CanUpdate declines. |
//! | `serveCache` | `"true"` / `"false"` (`"false"`) | `"true"`: each node downloads the binaries with curl from the extension's own server of its verified cache (`serve --cache-server-address`, which the nodes must reach), checking each against its sha256, instead of the extension uploading them through the Docker Engine. Not with `fetchInNode`. CanUpdate declines it when the extension runs without a cache server. |
//! | `kindImageRepositories` | comma-separated repositories (`"kindest/node,docker.io/kindest/node"`) | Repositories whose `<repo>:<desired version>[@sha256:<digest>]` image counts as the version-coupled kind node image on DockerMachine(Template) `customImage` and DevMachine(Template) `backend.docker.customImage`. Add a mirror here, for example `registry.example:5000/kindest/node`. |
//!
//! A setting with a value outside its range makes the call decline (Success, no patches) with a
//! message naming the setting: declining is CAPI's safe default (a rollout), while `Failure` would block it.
//! Unknown settings are ignored, because the same map goes to every hook of the ExtensionConfig.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::artifacts::ArtifactSource;

/// Name of the setting that declines every in-place update.
pub const DISABLE_IN_PLACE_UPDATES: &str = "disableInPlaceUpdates";
/// Name of the worker minor-skew setting.
pub const WORKER_MAX_MINOR_SKEW: &str = "workerMaxMinorSkew";
/// Name of the kind image repositories setting.
pub const KIND_IMAGE_REPOSITORIES: &str = "kindImageRepositories";
/// Name of the drain on/off setting.
pub const DRAIN: &str = "drain";
/// Name of the drain timeout setting.
pub const DRAIN_TIMEOUT: &str = "drainTimeout";
/// Name of the artifact base URL setting.
pub const ARTIFACT_URL: &str = "artifactURL";
/// Name of the fetch-inside-the-node setting.
pub const FETCH_IN_NODE: &str = "fetchInNode";
/// Name of the setting that serves the verified cache to the nodes.
pub const SERVE_CACHE: &str = "serveCache";
/// Every setting this extension reads.
pub const ALL: [&str; 8] = [
    DISABLE_IN_PLACE_UPDATES,
    WORKER_MAX_MINOR_SKEW,
    KIND_IMAGE_REPOSITORIES,
    DRAIN,
    DRAIN_TIMEOUT,
    ARTIFACT_URL,
    FETCH_IN_NODE,
    SERVE_CACHE,
];
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

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
    pub drain: bool,
    pub drain_timeout: Duration,
    /// `None`: the extension's `--artifact-url`.
    pub artifact_url: Option<ArtifactSource>,
    pub fetch_in_node: bool,
    pub serve_cache: bool,
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
            drain: true,
            drain_timeout: Duration::from_secs(300),
            artifact_url: None,
            fetch_in_node: false,
            serve_cache: false,
        }
    }
}

impl Settings {
    /// Reads the settings from a request's `settings` map.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self> {
        let mut settings = Self {
            disable_in_place_updates: boolean(map, DISABLE_IN_PLACE_UPDATES, false)?,
            drain: boolean(map, DRAIN, true)?,
            fetch_in_node: boolean(map, FETCH_IN_NODE, false)?,
            serve_cache: boolean(map, SERVE_CACHE, false)?,
            ..Self::default()
        };
        if settings.fetch_in_node && settings.serve_cache {
            return Err(Error::Invalid {
                name: SERVE_CACHE,
                expected: "\"false\" when fetchInNode is \"true\" (the nodes fetch from one place)",
            });
        }
        if let Some(value) = map.get(DRAIN_TIMEOUT) {
            settings.drain_timeout = parse_go_duration(value.trim())
                .filter(|d| (Duration::from_secs(1)..=MAX_DRAIN_TIMEOUT).contains(d))
                .ok_or(Error::Invalid {
                    name: DRAIN_TIMEOUT,
                    expected: "a duration such as 90s or 5m, from 1s to 2h",
                })?;
        }
        if let Some(value) = map.get(ARTIFACT_URL) {
            let source = artifact_source(value.trim()).ok_or(Error::Invalid {
                name: ARTIFACT_URL,
                expected: "an https://, http:// or file:// base URL laid out like https://dl.k8s.io/release",
            })?;
            settings.artifact_url = Some(source);
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

/// The `artifactURL` setting, parsed. CAPI sends the same settings with every call, and
/// UpdateMachine is polled every few seconds per Machine while it runs; after reading the request,
/// parsing the URL was the largest part of answering a poll (docs/benchmarks.md, section 1), so
/// each thread keeps the last text it parsed, and what it parsed to.
fn artifact_source(text: &str) -> Option<ArtifactSource> {
    thread_local! {
        static LAST: RefCell<Option<(String, ArtifactSource)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((parsed, source)) = last.as_ref()
            && parsed == text
        {
            return Some(source.clone());
        }
        let source = ArtifactSource::parse(text).ok()?;
        *last = Some((text.to_owned(), source.clone()));
        Some(source)
    })
}

fn boolean(map: &BTreeMap<String, String>, name: &'static str, default: bool) -> Result<bool> {
    match map.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(Error::Invalid {
            name,
            expected: "\"true\" or \"false\"",
        }),
    }
}

/// Go's `time.ParseDuration`, which CAPI users write durations for: an optional sign, then one or
/// more parts of a decimal number (a fraction allowed: `1.5m`, `.5s`) and a unit, `ns`, `us` (or
/// `µs`), `ms`, `s`, `m` or `h`; `0` alone needs no unit. `None` for anything else, and for a
/// negative or overflowing duration, which no setting takes. A fraction is kept to the
/// nanosecond, the precision of Go's durations.
fn parse_go_duration(text: &str) -> Option<Duration> {
    const NANOS_PER: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    // Longer than any duration worth writing; it bounds the digits parsed below.
    if text.len() > 64 {
        return None;
    }
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let digits_end = |text: &str| text.bytes().take_while(u8::is_ascii_digit).count();
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let (whole, after) = rest.split_at(digits_end(rest));
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(digits_end(after)),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_end = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale = NANOS_PER.iter().find(|(name, _)| *name == unit)?.1;
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Twenty digits of a fraction are below a nanosecond of the largest unit.
        let fraction = &fraction[..fraction.len().min(20)];
        let fraction_nanos = match fraction {
            "" => 0,
            digits => digits.parse::<u128>().ok()? * scale / 10u128.pow(digits.len() as u32),
        };
        nanos = nanos
            .checked_add(whole.checked_mul(scale)?)?
            .checked_add(fraction_nanos)?;
        rest = after;
    }
    // Go's durations end at the largest i64 of nanoseconds.
    if nanos > i64::MAX as u128 || (negative && nanos > 0) {
        return None;
    }
    Some(Duration::from_nanos(u64::try_from(nanos).ok()?))
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
        let engine = Settings::from_map(&map(&[
            (DRAIN, "false"),
            (DRAIN_TIMEOUT, "1h30m"),
            (ARTIFACT_URL, "file:///srv/mirror/release"),
            (FETCH_IN_NODE, "true"),
        ]))
        .unwrap();
        assert!(!engine.drain && engine.fetch_in_node && !engine.serve_cache);
        let served = Settings::from_map(&map(&[(SERVE_CACHE, "true")])).unwrap();
        assert!(served.serve_cache && !served.fetch_in_node);
        let both = Settings::from_map(&map(&[(FETCH_IN_NODE, "true"), (SERVE_CACHE, "true")]));
        assert!(
            both.unwrap_err()
                .to_string()
                .starts_with("invalid setting serveCache:")
        );
        assert_eq!(engine.drain_timeout, Duration::from_secs(5400));
        assert_eq!(
            engine
                .artifact_url
                .map(|s| s.as_str().to_string())
                .as_deref(),
            Some("file:///srv/mirror/release")
        );
    }

    /// What Go's `time.ParseDuration` gives for the same texts.
    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("90s", ms(90_000)),
            ("5m", ms(300_000)),
            ("1h30m", ms(5_400_000)),
            ("1.5m", ms(90_000)),
            ("2m30.5s", ms(150_500)),
            ("1500ms", ms(1_500)),
            (".5s", ms(500)),
            ("1.s", ms(1_000)),
            ("+5m", ms(300_000)),
            ("0", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("300us", Duration::from_micros(300)),
            ("300µs", Duration::from_micros(300)),
            ("1h1ns", Duration::from_nanos(3_600_000_000_001)),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_go_duration(text), Some(want), "{text}");
        }
        for bad in [
            "",
            "5",
            "m",
            "5d",
            "-5m",
            "5m30",
            ".",
            ".s",
            "1..5s",
            "5 m",
            "5M",
            "s5",
            "+",
            // Beyond Go's largest duration (about 292 years).
            "2562048h",
            "99999999999999999999999h",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
        assert_eq!(
            parse_go_duration("2562047h"),
            Some(Duration::from_secs(2_562_047 * 3600))
        );
    }

    /// Each thread remembers the last `artifactURL` it parsed: the same text gives what parsing
    /// gives, and any other text is parsed, a bad one refused, in whatever order they come.
    #[test]
    fn a_remembered_artifact_url_answers_only_for_the_same_text() {
        let url =
            |text: &str| Settings::from_map(&map(&[(ARTIFACT_URL, text)])).map(|s| s.artifact_url);
        let parsed = |text: &str| Some(ArtifactSource::parse(text).unwrap());
        for text in [
            "https://mirror.example/release",
            "https://mirror.example/release",
            "file:///srv/release",
            "https://mirror.example/release",
        ] {
            assert_eq!(url(text).unwrap(), parsed(text), "{text}");
        }
        assert!(url("https://user:secret@mirror.example/release").is_err());
        assert!(url("https://mirror.example/release?x").is_err());
        assert_eq!(
            url("https://mirror.example/release").unwrap(),
            parsed("https://mirror.example/release")
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
            (DRAIN, "no"),
            (DRAIN_TIMEOUT, "0s"),
            (DRAIN_TIMEOUT, "3h"),
            (ARTIFACT_URL, "ftp://mirror/release"),
            (ARTIFACT_URL, "https://user:secret@mirror/release"),
            (FETCH_IN_NODE, "1"),
            (SERVE_CACHE, "on"),
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
