//! What to fetch and where it lives: binaries, architectures, strict release versions, and the
//! artifact source (an http(s) mirror or a `file://` directory laid out like dl.k8s.io/release).
//!
//! Everything here is pure. URLs and paths are only ever built from a validated
//! [`ReleaseVersion`] and the closed enums, so no caller string reaches a URL or a path.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use reqwest::Url;

use super::{Error, Result};

/// The default artifact base URL, the upstream Kubernetes release bucket.
pub const DEFAULT_ARTIFACT_URL: &str = "https://dl.k8s.io/release";

/// The published checksum file is one short line; anything bigger is not a checksum file.
pub(crate) const MAX_CHECKSUM_FILE_BYTES: u64 = 1024;

/// The Kubernetes binaries the upgrader stages into a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Binary {
    Kubeadm,
    Kubelet,
    Kubectl,
}

impl Binary {
    pub const ALL: [Binary; 3] = [Binary::Kubeadm, Binary::Kubelet, Binary::Kubectl];

    /// The file name, as published and as installed.
    pub fn name(self) -> &'static str {
        match self {
            Binary::Kubeadm => "kubeadm",
            Binary::Kubelet => "kubelet",
            Binary::Kubectl => "kubectl",
        }
    }
}

impl fmt::Display for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Linux architecture Kubernetes publishes binaries for and kind nodes run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The Go/Kubernetes name used in release paths.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The architecture of this machine. CAPD node containers run on the Docker host, so this is
    /// also the nodes' architecture unless the engine is remote.
    pub fn host() -> Result<Arch> {
        std::env::consts::ARCH.parse()
    }
}

impl FromStr for Arch {
    type Err = Error;

    /// Accepts the Kubernetes names and the kernel names `uname -m` prints inside a node.
    fn from_str(s: &str) -> Result<Arch> {
        match s {
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(Error::UnsupportedArch {
                arch: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strict `vMAJOR.MINOR.PATCH` release version. Checked here again, independent of the callers,
/// because the string becomes a URL path segment and a cache directory name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ReleaseVersion(String);

impl ReleaseVersion {
    pub(crate) fn parse(input: &str) -> Result<ReleaseVersion> {
        let invalid = || Error::InvalidVersion {
            version: input.chars().take(64).collect(),
        };
        let numbers = input.strip_prefix('v').ok_or_else(invalid)?;
        let parts: Vec<&str> = numbers.split('.').collect();
        if parts.len() != 3 {
            return Err(invalid());
        }
        for part in parts {
            let digits_only = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            let leading_zero = part.len() > 1 && part.starts_with('0');
            // u32 bounds the length, so a version cannot balloon a path.
            if !digits_only || leading_zero || part.parse::<u32>().is_err() {
                return Err(invalid());
            }
        }
        Ok(ReleaseVersion(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One artifact: a binary of a release for an architecture. Only built from checked parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactId {
    version: ReleaseVersion,
    arch: Arch,
    binary: Binary,
}

impl ArtifactId {
    /// Checks `version` (strict `vMAJOR.MINOR.PATCH`).
    pub fn new(version: &str, arch: Arch, binary: Binary) -> Result<ArtifactId> {
        Ok(ArtifactId {
            version: ReleaseVersion::parse(version)?,
            arch,
            binary,
        })
    }

    pub fn version(&self) -> &str {
        self.version.as_str()
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn binary(&self) -> Binary {
        self.binary
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (linux/{})",
            self.binary,
            self.version.as_str(),
            self.arch
        )
    }
}

/// Where artifacts come from: a base URL laid out like `https://dl.k8s.io/release`, that is
/// `<base>/<version>/bin/linux/<arch>/<binary>` next to `<binary>.sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSource {
    /// Normalised: no trailing slash, no query, fragment or credentials.
    base: Url,
    kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceKind {
    Http,
    Dir(PathBuf),
}

/// Where one artifact and its checksum file are, in the source's own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Http { binary: Url, checksum: Url },
    File { binary: PathBuf, checksum: PathBuf },
}

impl ArtifactSource {
    /// Parses and checks a base URL: `https://…`, `http://…` or `file:///absolute/dir`.
    pub fn parse(input: &str) -> Result<ArtifactSource> {
        let invalid = |url: &str, reason: &str| Error::InvalidSource {
            url: url.chars().take(200).collect(),
            reason: reason.to_owned(),
        };
        if input.trim().is_empty() {
            return Err(invalid(input, "it is empty"));
        }
        let mut url = Url::parse(input.trim()).map_err(|e| {
            // Never echo an unparseable input that might carry a password.
            let shown = if input.contains('@') {
                "<redacted>"
            } else {
                input
            };
            invalid(shown, &format!("it is not a URL ({e})"))
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            // The URL is logged and put in error messages, so it must not carry secrets.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            return Err(invalid(
                url.as_str(),
                "it carries credentials, which would end up in logs and conditions",
            ));
        }
        if url.cannot_be_a_base() {
            return Err(invalid(url.as_str(), "it cannot be a base URL"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                url.as_str(),
                "it has a query or fragment, which the release layout has no place for",
            ));
        }
        // URL parsing is lenient where a mistake is likely: `file:dir` becomes `/dir` and
        // `http:///path` takes `path` as the host. Insist on the spelled-out form.
        let rest = input.trim().get(url.scheme().len()..).unwrap_or_default();
        let Some(authority) = rest.strip_prefix("://") else {
            return Err(invalid(
                url.as_str(),
                "write it in full, as https://host/path or file:///absolute/dir",
            ));
        };
        let http = matches!(url.scheme(), "https" | "http");
        if http && (authority.is_empty() || authority.starts_with(['/', '\\'])) {
            return Err(invalid(url.as_str(), "it has no host"));
        }
        let kind = match url.scheme() {
            "https" | "http" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(invalid(url.as_str(), "it has no host"));
                }
                SourceKind::Http
            }
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(invalid(
                        url.as_str(),
                        "a file:// URL must name a local directory (file:///dir)",
                    ));
                }
                let dir = url.to_file_path().map_err(|()| {
                    invalid(url.as_str(), "it does not name an absolute local directory")
                })?;
                SourceKind::Dir(dir)
            }
            other => {
                return Err(invalid(
                    url.as_str(),
                    &format!("scheme {other:?} is not supported"),
                ));
            }
        };
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty();
        }
        Ok(ArtifactSource { base: url, kind })
    }

    /// The normalised base URL.
    pub fn as_str(&self) -> &str {
        self.base.as_str()
    }

    /// Whether this source is a local directory (no network involved).
    pub fn is_local(&self) -> bool {
        matches!(self.kind, SourceKind::Dir(_))
    }

    pub(crate) fn locate(&self, id: &ArtifactId) -> Location {
        let name = id.binary.name();
        let checksum_name = format!("{name}.sha256");
        match &self.kind {
            SourceKind::Http => {
                let mut binary = self.base.clone();
                if let Ok(mut segments) = binary.path_segments_mut() {
                    segments.extend([id.version.as_str(), "bin", "linux", id.arch.name(), name]);
                }
                let mut checksum = binary.clone();
                if let Ok(mut segments) = checksum.path_segments_mut() {
                    segments.pop().push(&checksum_name);
                }
                Location::Http { binary, checksum }
            }
            SourceKind::Dir(dir) => {
                let parent = dir
                    .join(id.version.as_str())
                    .join("bin")
                    .join("linux")
                    .join(id.arch.name());
                Location::File {
                    binary: parent.join(name),
                    checksum: parent.join(checksum_name),
                }
            }
        }
    }
}

impl Default for ArtifactSource {
    fn default() -> ArtifactSource {
        ArtifactSource {
            base: Url::parse(DEFAULT_ARTIFACT_URL).unwrap_or_else(|_| unreachable!()),
            kind: SourceKind::Http,
        }
    }
}

impl FromStr for ArtifactSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<ArtifactSource> {
        ArtifactSource::parse(s)
    }
}

impl fmt::Display for ArtifactSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.base.as_str())
    }
}

impl Location {
    /// The artifact's address for messages and logs.
    pub(crate) fn binary_display(&self) -> String {
        match self {
            Location::Http { binary, .. } => binary.to_string(),
            Location::File { binary, .. } => format!("file://{}", binary.display()),
        }
    }

    pub(crate) fn checksum_display(&self) -> String {
        match self {
            Location::Http { checksum, .. } => checksum.to_string(),
            Location::File { checksum, .. } => format!("file://{}", checksum.display()),
        }
    }
}

/// Reads a published checksum file: the bare hex digest (what dl.k8s.io serves) or sha256sum's
/// `<hex>  <name>` / `<hex> *<name>`. Returns the digest in lowercase hex.
pub(crate) fn parse_checksum_file(
    text: &str,
    binary: Binary,
) -> std::result::Result<String, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next().ok_or("it is empty")?;
    if lines.next().is_some() {
        return Err("it has more than one line".to_owned());
    }
    let mut fields = line.split_whitespace();
    let digest = fields.next().ok_or("it is empty")?;
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("it does not start with a 64-digit hex sha256".to_owned());
    }
    if let Some(name) = fields.next() {
        let name = name.strip_prefix('*').unwrap_or(name);
        let base_name = name.rsplit('/').next().unwrap_or(name);
        if base_name != binary.name() {
            return Err(format!("it is for {base_name:?}, not {:?}", binary.name()));
        }
    }
    if fields.next().is_some() {
        return Err("it has trailing fields after the file name".to_owned());
    }
    Ok(digest.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn release_versions() {
        let cases = [
            ("plain", "v1.32.0", true),
            ("zeros", "v0.0.0", true),
            ("big minor", "v1.123.45", true),
            ("no v", "1.32.0", false),
            ("capital V", "V1.32.0", false),
            ("two parts", "v1.32", false),
            ("four parts", "v1.32.0.1", false),
            ("pre-release", "v1.33.0-rc.1", false),
            ("build metadata", "v1.32.0+k3s1", false),
            ("leading zero", "v1.032.0", false),
            ("empty part", "v1..0", false),
            ("empty", "", false),
            ("traversal", "v1.32.0/../../etc", false),
            ("slash", "v1/32.0", false),
            ("space", "v1.32.0 ", false),
            ("overflow", "v1.32.99999999999", false),
            ("sign", "v1.+32.0", false),
            ("unicode digit", "v1.٣2.0", false),
        ];
        for (name, input, ok) in cases {
            let got = ReleaseVersion::parse(input);
            assert_eq!(got.is_ok(), ok, "case {name}: {input:?} -> {got:?}");
            if let Err(e) = got {
                assert!(matches!(e, Error::InvalidVersion { .. }), "case {name}");
            }
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::Amd64);
        assert_eq!("x86_64".parse::<Arch>().unwrap(), Arch::Amd64);
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Arm64);
        assert_eq!("aarch64".parse::<Arch>().unwrap(), Arch::Arm64);
        assert!(matches!(
            "s390x".parse::<Arch>(),
            Err(Error::UnsupportedArch { .. })
        ));
        // The host this test runs on is one the project supports.
        assert!(Arch::host().is_ok());
    }

    #[test]
    fn sources_accepted_and_normalised() {
        let cases = [
            (
                "default",
                "https://dl.k8s.io/release",
                "https://dl.k8s.io/release",
            ),
            (
                "trailing slash",
                "https://dl.k8s.io/release/",
                "https://dl.k8s.io/release",
            ),
            (
                "http mirror",
                "http://10.0.0.1:8080/k8s",
                "http://10.0.0.1:8080/k8s",
            ),
            (
                "root of host",
                "https://mirror.example",
                "https://mirror.example/",
            ),
            (
                "file dir",
                "file:///srv/k8s/release/",
                "file:///srv/k8s/release",
            ),
            (
                "file localhost",
                "file://localhost/srv/k8s",
                "file:///srv/k8s",
            ),
            (
                "spaces trimmed",
                "  https://dl.k8s.io/release ",
                "https://dl.k8s.io/release",
            ),
        ];
        for (name, input, want) in cases {
            let source = ArtifactSource::parse(input)
                .unwrap_or_else(|e| panic!("case {name}: {input:?} refused: {e}"));
            assert_eq!(source.as_str(), want, "case {name}");
        }
        assert_eq!(
            ArtifactSource::default(),
            ArtifactSource::parse(DEFAULT_ARTIFACT_URL).unwrap()
        );
    }

    #[test]
    fn sources_refused() {
        let cases = [
            ("empty", ""),
            ("blank", "   "),
            ("no scheme", "dl.k8s.io/release"),
            ("ftp", "ftp://mirror.example/release"),
            ("s3", "s3://bucket/release"),
            ("mailto", "mailto:admin@example.com"),
            ("data", "data:text/plain,hi"),
            ("query", "https://dl.k8s.io/release?x=1"),
            ("fragment", "https://dl.k8s.io/release#top"),
            ("credentials", "https://user:secret@mirror.example/release"),
            ("file remote host", "file://server/share/release"),
            ("relative file", "file:relative/dir"),
            ("file without slashes", "file:/srv/release"),
            ("no host", "http:///release"),
            ("garbage", "https://exa mple.com/"),
        ];
        for (name, input) in cases {
            match ArtifactSource::parse(input) {
                Err(Error::InvalidSource { url, reason }) => {
                    assert!(!url.contains("secret"), "case {name} leaks the password");
                    assert!(!reason.is_empty(), "case {name}");
                }
                other => panic!("case {name}: {input:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn locations_follow_the_release_layout() {
        let id = ArtifactId::new("v1.32.1", Arch::Arm64, Binary::Kubelet).unwrap();
        let http = ArtifactSource::parse("https://dl.k8s.io/release/").unwrap();
        assert_eq!(
            http.locate(&id),
            Location::Http {
                binary: Url::parse("https://dl.k8s.io/release/v1.32.1/bin/linux/arm64/kubelet")
                    .unwrap(),
                checksum: Url::parse(
                    "https://dl.k8s.io/release/v1.32.1/bin/linux/arm64/kubelet.sha256"
                )
                .unwrap(),
            }
        );
        let root = ArtifactSource::parse("http://127.0.0.1:8080").unwrap();
        let Location::Http { binary, .. } = root.locate(&id) else {
            panic!("http source gave a file location")
        };
        assert_eq!(
            binary.as_str(),
            "http://127.0.0.1:8080/v1.32.1/bin/linux/arm64/kubelet"
        );
        let dir = ArtifactSource::parse("file:///srv/mirror").unwrap();
        assert_eq!(
            dir.locate(&id),
            Location::File {
                binary: PathBuf::from("/srv/mirror/v1.32.1/bin/linux/arm64/kubelet"),
                checksum: PathBuf::from("/srv/mirror/v1.32.1/bin/linux/arm64/kubelet.sha256"),
            }
        );
        assert!(dir.is_local() && !http.is_local());
    }

    #[test]
    fn checksum_files() {
        let hex = "ab".repeat(32);
        let upper = hex.to_ascii_uppercase();
        let ok = [
            ("bare", hex.clone()),
            ("bare newline", format!("{hex}\n")),
            ("uppercase", upper),
            ("sha256sum text", format!("{hex}  kubeadm\n")),
            ("sha256sum binary", format!("{hex} *kubeadm")),
            ("with path", format!("{hex}  bin/linux/amd64/kubeadm")),
        ];
        for (name, text) in ok {
            assert_eq!(
                parse_checksum_file(&text, Binary::Kubeadm).as_deref(),
                Ok(hex.as_str()),
                "case {name}"
            );
        }
        let bad = [
            ("empty", String::new()),
            ("short", "abc".to_owned()),
            ("not hex", "zz".repeat(32)),
            ("sha512 length", "ab".repeat(64)),
            ("other file", format!("{hex}  kubelet")),
            ("two lines", format!("{hex}\n{hex}\n")),
            ("trailing junk", format!("{hex}  kubeadm extra")),
            ("html page", "<html>not found</html>".to_owned()),
        ];
        for (name, text) in bad {
            assert!(
                parse_checksum_file(&text, Binary::Kubeadm).is_err(),
                "case {name}"
            );
        }
    }

    #[test]
    fn artifact_display_names_binary_version_and_arch() {
        let id = ArtifactId::new("v1.31.4", Arch::Amd64, Binary::Kubectl).unwrap();
        assert_eq!(id.to_string(), "kubectl v1.31.4 (linux/amd64)");
    }
}
