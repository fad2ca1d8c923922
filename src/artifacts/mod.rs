//! Getting Kubernetes binaries safely: fetch kubeadm, kubelet and kubectl for a release and an
//! architecture from a source laid out like `https://dl.k8s.io/release` (or a mirror, or a
//! `file://` directory), verify each against its published `.sha256`, and keep it in an on-disk,
//! content-addressed cache that is only ever written by atomic rename.
//!
//! Trust model: the checksum comes from the same source as the binary, so it catches corruption
//! and truncation, and TLS (with redirects that may not downgrade to plain http) is what
//! authenticates the source. A mirror that is itself compromised can serve a matching pair.
//!
//! Cache layout under the cache directory:
//!
//! ```text
//! .lock                                           held by the one process using the cache
//! tmp/                                            downloads in progress; emptied at open
//! sha256/<hex>                                    verified binaries, named by digest, mode 0555
//! verified/<hex>                                  the blob's file status when its content last hashed right
//! index/<source-id>/<version>/linux/<arch>/<bin>  "<hex> <size>": what that source published
//! ```
//!
//! `<source-id>` is a short hash of the normalised source URL, so switching mirrors never reuses
//! another mirror's answer for a version without asking it. A warm fetch (index entry present, blob
//! present with the recorded size) touches no network.
//!
//! A blob's content is hashed when it is downloaded, and hashed again on first use in a process
//! unless its file status (size, inode, mode, change and modification times) is still the one
//! recorded in `verified/` when it last hashed right: re-hashing a full set of binaries costs a
//! few tenths of a second in every CLI run, and any write, chmod, replacement or copy of the file
//! changes that status. What the status cannot show is damage below the file system (bit rot),
//! or a write in the same clock tick as the record; the node catches both, because every upload
//! is hashed again in the node against the published digest, and a mismatch there makes the
//! cache forget the record ([`ArtifactCache::distrust`]), so the next use re-hashes the blob and
//! downloads it again if it is damaged.

mod cache;
mod caches;
mod fetch;
mod serve;
mod source;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{ArtifactCache, CacheStats, CachedArtifact, KubeBinaries};
pub use caches::ArtifactCaches;
pub use fetch::FetchConfig;
pub use serve::CacheServer;
pub use source::{Arch, ArtifactId, ArtifactSource, Binary, DEFAULT_ARTIFACT_URL};

/// Errors of the artifact cache. Sources are kept in `Arc`s so that one failed download can be
/// handed to every caller that was waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(
        "artifact URL {url:?} is not usable: {reason}; give an https:// or http:// base laid out \
         like {DEFAULT_ARTIFACT_URL}, or file:///absolute/dir with the same layout"
    )]
    InvalidSource { url: String, reason: String },

    #[error(
        "Kubernetes version {version:?} is not a release version; expected vMAJOR.MINOR.PATCH \
         such as v1.32.0"
    )]
    InvalidVersion { version: String },

    #[error(
        "architecture {arch:?} is not supported; Kubernetes binaries are fetched for amd64 and arm64"
    )]
    UnsupportedArch { arch: String },

    #[error("artifact fetch settings are invalid: {reason}")]
    InvalidConfig { reason: String },

    #[error(
        "{artifact}: {url} does not exist; check that the version is a published release and \
         that the artifact URL (mirror) carries it"
    )]
    NotFound { artifact: ArtifactId, url: String },

    #[error("{artifact}: {url} answered HTTP {status}; check the mirror, or retry later")]
    HttpStatus {
        artifact: ArtifactId,
        url: String,
        status: u16,
    },

    #[error(
        "{artifact}: checksum mismatch for {url}: published sha256 {expected}, downloaded \
         {actual}; nothing was cached; the source serves a corrupt or altered file, repair it \
         or use another artifact URL"
    )]
    ChecksumMismatch {
        artifact: ArtifactId,
        url: String,
        expected: String,
        actual: String,
    },

    #[error(
        "{artifact}: the checksum file {url} is unusable: {reason}; it must hold the hex sha256 \
         (optionally followed by the file name)"
    )]
    BadChecksumFile {
        artifact: ArtifactId,
        url: String,
        reason: String,
    },

    #[error(
        "{artifact}: download of {url} was truncated at {got} of {expected} bytes; nothing was \
         cached; check the network or the mirror and retry"
    )]
    Truncated {
        artifact: ArtifactId,
        url: String,
        expected: u64,
        got: u64,
    },

    #[error(
        "{artifact}: {url} is larger than the {limit}-byte limit; nothing was cached; raise the \
         size limit only if the source is trusted to serve files this big"
    )]
    TooLarge {
        artifact: ArtifactId,
        url: String,
        limit: u64,
    },

    #[error("{artifact}: cannot download {url}; check the artifact URL, DNS, proxy and network")]
    Unreachable {
        artifact: ArtifactId,
        url: String,
        #[source]
        source: Arc<reqwest::Error>,
    },

    #[error(
        "{artifact}: {url} timed out after {after:?}; the source is slow or unreachable; check \
         the network, or raise the timeouts"
    )]
    Timeout {
        artifact: ArtifactId,
        url: String,
        after: Duration,
    },

    #[error(
        "artifact cache I/O failed at {path}; check that the cache directory is writable and has \
         free space"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    #[error(
        "artifact cache {dir} is in use by another process; give each process its own cache \
         directory"
    )]
    CacheLocked { dir: PathBuf },

    #[error("cannot build the HTTP client for artifact downloads")]
    Client {
        #[source]
        source: Arc<reqwest::Error>,
    },

    #[error("{artifact}: the fetch task stopped unexpectedly; retry")]
    TaskFailed { artifact: ArtifactId },

    #[error(
        "cannot serve the artifact cache on {address}; pick an address of this host that the \
         nodes reach, and a free port"
    )]
    Serve {
        address: std::net::SocketAddr,
        #[source]
        source: Arc<std::io::Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A stable label per variant, for counting failures by kind.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSource { .. } => "invalid_source",
            Error::InvalidVersion { .. } => "invalid_version",
            Error::UnsupportedArch { .. } => "unsupported_arch",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::NotFound { .. } => "not_found",
            Error::HttpStatus { .. } => "http_status",
            Error::ChecksumMismatch { .. } => "checksum_mismatch",
            Error::BadChecksumFile { .. } => "bad_checksum_file",
            Error::Truncated { .. } => "truncated",
            Error::TooLarge { .. } => "too_large",
            Error::Unreachable { .. } => "unreachable",
            Error::Timeout { .. } => "timeout",
            Error::Io { .. } => "io",
            Error::CacheLocked { .. } => "cache_locked",
            Error::Client { .. } => "client",
            Error::TaskFailed { .. } => "task_failed",
            Error::Serve { .. } => "serve",
        }
    }

    /// Whether another attempt could succeed: network trouble and server-side failures, but
    /// never an answer that would repeat (404, a bad checksum, a file over the limit).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { source, .. } => !source.is_redirect() && !source.is_builder(),
            Error::Timeout { .. } | Error::Truncated { .. } => true,
            Error::HttpStatus { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}
