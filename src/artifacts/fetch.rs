//! Moving bytes from a source: the checksum file into memory, the binary into a temp file while
//! hashing it, with timeouts, a size limit, Content-Length enforcement and bounded retries.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tracing::{debug, warn};

use super::source::{Location, MAX_CHECKSUM_FILE_BYTES, parse_checksum_file};
use super::{ArtifactId, Error, Result};

const FILE_READ_CHUNK: usize = 128 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;
const MAX_REDIRECTS: usize = 10;

/// How downloads behave. Every limit applies per artifact and per attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Time to establish a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest silence between two reads, headers included: catches a hung server early
    /// without capping how long a large download on a slow link may take.
    pub read_timeout: Duration,
    /// Deadline for one whole attempt, from connecting to the last body byte.
    pub request_timeout: Duration,
    /// Attempts per request, the first included. Only transient failures are retried.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubled for each further one, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Largest binary accepted. Kubernetes binaries are well under 200 MiB.
    pub max_size: u64,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_size: 256 * 1024 * 1024,
        }
    }
}

impl FetchConfig {
    fn validate(&self) -> Result<()> {
        let invalid = |reason: &str| {
            Err(Error::InvalidConfig {
                reason: reason.to_owned(),
            })
        };
        if self.connect_timeout.is_zero()
            || self.read_timeout.is_zero()
            || self.request_timeout.is_zero()
        {
            return invalid("timeouts must be greater than zero");
        }
        if !(1..=20).contains(&self.max_attempts) {
            return invalid("max_attempts must be between 1 and 20");
        }
        if self.initial_backoff > self.max_backoff {
            return invalid("initial_backoff must not exceed max_backoff");
        }
        if self.max_size == 0 {
            return invalid("max_size must be greater than zero");
        }
        Ok(())
    }
}

/// The HTTP client, the settings, and the count of bytes read from sources.
pub(crate) struct Transport {
    client: reqwest::Client,
    config: FetchConfig,
    bytes_read: AtomicU64,
}

impl Transport {
    pub(crate) fn new(config: FetchConfig) -> Result<Transport> {
        config.validate()?;
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            match redirect_refusal(attempt.previous(), attempt.url()) {
                Some(reason) => attempt.error(reason),
                None => attempt.follow(),
            }
        });
        // reqwest takes rustls' process-wide crypto provider and panics when there is none. A
        // cache must not depend on its caller for that: ring (the provider the rest of the
        // project uses) is installed unless the process already chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .redirect(redirects)
            .user_agent(concat!("capd-inplace/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Client {
                source: Arc::new(e),
            })?;
        Ok(Transport {
            client,
            config,
            bytes_read: AtomicU64::new(0),
        })
    }

    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The digest the source publishes for the artifact, in lowercase hex.
    pub(crate) async fn published_digest(
        &self,
        id: &ArtifactId,
        location: &Location,
    ) -> Result<String> {
        let url = location.checksum_display();
        let text = self
            .with_retries(id, &url, || self.read_checksum_file(id, location, &url))
            .await?;
        parse_checksum_file(&text, id.binary()).map_err(|reason| Error::BadChecksumFile {
            artifact: id.clone(),
            url: url.clone(),
            reason,
        })
    }

    /// Downloads the artifact into `path` (created or truncated per attempt), checks it against
    /// `expected`, and syncs it to disk. Returns its size. The caller owns and removes `path`.
    pub(crate) async fn download(
        &self,
        id: &ArtifactId,
        location: &Location,
        expected: &str,
        path: &Path,
    ) -> Result<u64> {
        let url = location.binary_display();
        let (size, actual, file) = self
            .with_retries(id, &url, || self.download_attempt(id, location, &url, path))
            .await?;
        // A wrong digest is not retried: the source would serve the same bytes again.
        if actual != expected {
            return Err(Error::ChecksumMismatch {
                artifact: id.clone(),
                url,
                expected: expected.to_owned(),
                actual,
            });
        }
        file.sync_all().await.map_err(|e| Error::io(path, e))?;
        Ok(size)
    }

    async fn with_retries<T, F, Fut>(&self, id: &ArtifactId, url: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff = self.config.initial_backoff;
        let mut number = 1;
        loop {
            let result = tokio::time::timeout(self.config.request_timeout, attempt())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        artifact: id.clone(),
                        url: url.to_owned(),
                        after: self.config.request_timeout,
                    })
                });
            match result {
                Err(error) if error.is_transient() && number < self.config.max_attempts => {
                    warn!(
                        %url,
                        attempt = number,
                        max_attempts = self.config.max_attempts,
                        retry_in = ?backoff,
                        error = %error,
                        "transient download failure; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    number += 1;
                }
                other => return other,
            }
        }
    }

    async fn read_checksum_file(
        &self,
        id: &ArtifactId,
        location: &Location,
        url: &str,
    ) -> Result<String> {
        let mut sink = Sink::Memory(Vec::new());
        let copied = match location {
            Location::Http { checksum, .. } => {
                let response = self.get(id, checksum).await?;
                let declared = response.content_length();
                let body = self.http_body(id, url, response);
                self.copy_body(id, url, declared, MAX_CHECKSUM_FILE_BYTES, body, &mut sink)
                    .await
            }
            Location::File { checksum, .. } => {
                let (file, len) = open_source_file(id, checksum).await?;
                let body = file_body(file, checksum.clone());
                self.copy_body(id, url, Some(len), MAX_CHECKSUM_FILE_BYTES, body, &mut sink)
                    .await
            }
        };
        match copied {
            Err(Error::TooLarge { .. }) => {
                return Err(Error::BadChecksumFile {
                    artifact: id.clone(),
                    url: url.to_owned(),
                    reason: format!("it is larger than {MAX_CHECKSUM_FILE_BYTES} bytes"),
                });
            }
            other => other?,
        };
        let Sink::Memory(bytes) = sink else {
            unreachable!("the checksum is read into memory")
        };
        String::from_utf8(bytes).map_err(|_| Error::BadChecksumFile {
            artifact: id.clone(),
            url: url.to_owned(),
            reason: "it is not text".to_owned(),
        })
    }

    async fn download_attempt(
        &self,
        id: &ArtifactId,
        location: &Location,
        url: &str,
        path: &Path,
    ) -> Result<(u64, String, tokio::fs::File)> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut sink = Sink::File(Box::new(FileSink {
            writer: BufWriter::with_capacity(WRITE_BUFFER, file),
            path: path.to_owned(),
            hasher: Sha256::new(),
        }));
        let max_size = self.config.max_size;
        let size = match location {
            Location::Http { binary, .. } => {
                let response = self.get(id, binary).await?;
                let declared = response.content_length();
                let body = self.http_body(id, url, response);
                self.copy_body(id, url, declared, max_size, body, &mut sink)
                    .await?
            }
            Location::File { binary, .. } => {
                let (file, len) = open_source_file(id, binary).await?;
                let body = file_body(file, binary.clone());
                self.copy_body(id, url, Some(len), max_size, body, &mut sink)
                    .await?
            }
        };
        let Sink::File(file_sink) = sink else {
            unreachable!("the binary is written to a file")
        };
        let FileSink {
            mut writer,
            path,
            hasher,
        } = *file_sink;
        writer.flush().await.map_err(|e| Error::io(&path, e))?;
        debug!(%url, size, "download complete");
        Ok((size, hex::encode(hasher.finalize()), writer.into_inner()))
    }

    async fn get(&self, id: &ArtifactId, url: &Url) -> Result<reqwest::Response> {
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.request_error(id, url.as_str(), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Err(Error::NotFound {
                artifact: id.clone(),
                url: url.to_string(),
            });
        }
        Err(Error::HttpStatus {
            artifact: id.clone(),
            url: url.to_string(),
            status: status.as_u16(),
        })
    }

    fn request_error(&self, id: &ArtifactId, url: &str, error: reqwest::Error) -> Error {
        if error.is_timeout() {
            let after = if error.is_connect() {
                self.config.connect_timeout
            } else {
                self.config.read_timeout
            };
            return Error::Timeout {
                artifact: id.clone(),
                url: url.to_owned(),
                after,
            };
        }
        Error::Unreachable {
            artifact: id.clone(),
            url: url.to_owned(),
            source: Arc::new(error),
        }
    }

    fn http_body<'a>(
        &'a self,
        id: &'a ArtifactId,
        url: &'a str,
        response: reqwest::Response,
    ) -> impl Stream<Item = Result<Bytes>> + 'a {
        response
            .bytes_stream()
            .map_err(move |e| self.request_error(id, url, e))
    }

    /// Copies a body into `sink`, counting bytes, refusing more than `limit` and fewer than a
    /// declared length. A connection that drops before the declared length is `Truncated`.
    async fn copy_body(
        &self,
        id: &ArtifactId,
        url: &str,
        declared: Option<u64>,
        limit: u64,
        body: impl Stream<Item = Result<Bytes>>,
        sink: &mut Sink,
    ) -> Result<u64> {
        let too_large = || Error::TooLarge {
            artifact: id.clone(),
            url: url.to_owned(),
            limit,
        };
        let truncated = |got| Error::Truncated {
            artifact: id.clone(),
            url: url.to_owned(),
            expected: declared.unwrap_or_default(),
            got,
        };
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let mut body = std::pin::pin!(body);
        let mut got: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(Error::Unreachable { .. }) if declared.is_some_and(|len| got < len) => {
                    return Err(truncated(got));
                }
                Err(error) => return Err(error),
            };
            got += chunk.len() as u64;
            self.bytes_read
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if got > limit {
                return Err(too_large());
            }
            sink.write(&chunk).await?;
        }
        if declared.is_some_and(|len| got < len) {
            return Err(truncated(got));
        }
        Ok(got)
    }
}

/// Why a redirect must not be followed, if it must not. dl.k8s.io itself redirects to a CDN, so
/// redirects are followed, but never from https down to plain http: the checksum travels the same
/// way as the binary, so TLS is what vouches for both.
fn redirect_refusal(previous: &[Url], next: &Url) -> Option<&'static str> {
    let downgrade = next.scheme() != "https" && previous.iter().any(|url| url.scheme() == "https");
    if downgrade {
        Some("refusing a redirect from https to plain http")
    } else if previous.len() > MAX_REDIRECTS {
        Some("too many redirects")
    } else {
        None
    }
}

enum Sink {
    Memory(Vec<u8>),
    File(Box<FileSink>),
}

/// A temp file being written, and the running hash of what went into it.
struct FileSink {
    writer: BufWriter<tokio::fs::File>,
    path: PathBuf,
    hasher: Sha256,
}

impl Sink {
    async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        match self {
            Sink::Memory(bytes) => bytes.extend_from_slice(chunk),
            Sink::File(file) => {
                file.hasher.update(chunk);
                file.writer
                    .write_all(chunk)
                    .await
                    .map_err(|e| Error::io(file.path.as_path(), e))?;
            }
        }
        Ok(())
    }
}

async fn open_source_file(id: &ArtifactId, path: &Path) -> Result<(tokio::fs::File, u64)> {
    let not_found = || Error::NotFound {
        artifact: id.clone(),
        url: format!("file://{}", path.display()),
    };
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let metadata = file.metadata().await.map_err(|e| Error::io(path, e))?;
    if !metadata.is_file() {
        return Err(not_found());
    }
    Ok((file, metadata.len()))
}

fn file_body(file: tokio::fs::File, path: PathBuf) -> impl Stream<Item = Result<Bytes>> {
    futures::stream::try_unfold((file, path), |(mut file, path)| async move {
        let mut buffer = vec![0; FILE_READ_CHUNK];
        let read = file
            .read(&mut buffer)
            .await
            .map_err(|e| Error::io(&path, e))?;
        if read == 0 {
            return Ok(None);
        }
        buffer.truncate(read);
        Ok(Some((Bytes::from(buffer), (file, path))))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn redirects_never_downgrade_from_https() {
        let url = |s: &str| Url::parse(s).unwrap();
        let secure = url("https://dl.k8s.io/release/v1.32.0/bin/linux/amd64/kubeadm");
        let cdn = url("https://cdn.dl.k8s.io/release/v1.32.0/bin/linux/amd64/kubeadm");
        let plain = url("http://cdn.example/kubeadm");
        assert_eq!(redirect_refusal(std::slice::from_ref(&secure), &cdn), None);
        assert!(redirect_refusal(std::slice::from_ref(&secure), &plain).is_some());
        assert!(redirect_refusal(&[secure.clone(), cdn.clone()], &plain).is_some());
        // A plain-http mirror may redirect within plain http.
        assert_eq!(redirect_refusal(std::slice::from_ref(&plain), &plain), None);
        let loop_of = vec![cdn.clone(); MAX_REDIRECTS + 1];
        assert!(redirect_refusal(&loop_of, &cdn).is_some());
    }

    #[test]
    fn default_config_is_valid_and_bounded() {
        let config = FetchConfig::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.max_size, 256 * 1024 * 1024);
    }

    #[test]
    fn bad_configs_are_refused() {
        type Change = fn(&mut FetchConfig);
        let cases: [(&str, Change); 5] = [
            ("zero attempts", |c| c.max_attempts = 0),
            ("unbounded attempts", |c| c.max_attempts = 1000),
            ("zero read timeout", |c| c.read_timeout = Duration::ZERO),
            ("backoff above cap", |c| {
                c.initial_backoff = c.max_backoff * 2
            }),
            ("zero size", |c| c.max_size = 0),
        ];
        for (name, change) in cases {
            let mut config = FetchConfig::default();
            change(&mut config);
            assert!(
                matches!(config.validate(), Err(Error::InvalidConfig { .. })),
                "case {name}"
            );
        }
    }
}
