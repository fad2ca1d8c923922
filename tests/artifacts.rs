//! The artifact cache against a local mirror (axum on 127.0.0.1:0) that serves a generated
//! release tree, counts requests per path, and misbehaves on request.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use capd_inplace::artifacts::{
    Arch, ArtifactCache, ArtifactSource, Binary, CacheStats, Error, FetchConfig,
};
use sha2::{Digest, Sha256};

const VERSION: &str = "v1.32.0";
/// More than one read chunk and many HTTP frames, yet quick to hash in a debug build.
const ARTIFACT_SIZE: usize = 192 * 1024 + 7;

#[derive(Clone)]
enum Behavior {
    Serve,
    Status(u16),
    /// Answers `status` for the first `failures` requests, then serves.
    FailThenServe {
        status: u16,
        failures: Arc<AtomicUsize>,
    },
    /// Declares the full Content-Length but sends only `sent` bytes, then drops the connection.
    Truncate {
        sent: usize,
    },
    /// Accepts the request and never answers.
    Hang,
    /// Sends headers and a first chunk, then goes silent.
    StallBody,
    Delay(Duration),
    /// Answers only once `n` requests wait here together: proves requests run in parallel.
    Rendezvous(Arc<tokio::sync::Barrier>),
    /// Sends the client elsewhere, as dl.k8s.io does to its CDN.
    Redirect(String),
}

#[derive(Default)]
struct MirrorState {
    files: Mutex<HashMap<String, (Bytes, Behavior)>>,
    hits: Mutex<HashMap<String, usize>>,
}

struct Mirror {
    base: String,
    state: Arc<MirrorState>,
}

impl Mirror {
    /// A mirror at `http://127.0.0.1:<port>/release` carrying `VERSION` for amd64.
    async fn start() -> Mirror {
        let state = Arc::new(MirrorState::default());
        for binary in Binary::ALL {
            let bytes = artifact_bytes(VERSION, binary);
            let path = release_path(VERSION, binary);
            let digest = hex_sha256(&bytes);
            state.put(
                &format!("{path}.sha256"),
                digest.into_bytes(),
                Behavior::Serve,
            );
            state.put(&path, bytes, Behavior::Serve);
        }
        let app = Router::new().fallback(serve).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Mirror {
            base: format!("http://127.0.0.1:{port}/release"),
            state,
        }
    }

    fn source(&self) -> ArtifactSource {
        ArtifactSource::parse(&self.base).unwrap()
    }

    fn set(&self, path: &str, behavior: Behavior) {
        let mut files = self.state.files.lock().unwrap();
        files.get_mut(path).expect("path is in the tree").1 = behavior;
    }

    fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        self.state.put(path, bytes, Behavior::Serve);
    }

    fn remove(&self, path: &str) {
        self.state.files.lock().unwrap().remove(path);
    }

    fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.state.hits.lock().unwrap().values().sum()
    }
}

impl MirrorState {
    fn put(&self, path: &str, bytes: impl Into<Bytes>, behavior: Behavior) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_owned(), (bytes.into(), behavior));
    }
}

async fn serve(State(state): State<Arc<MirrorState>>, uri: Uri) -> Response {
    let path = uri.path().to_owned();
    *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let Some((bytes, behavior)) = state.files.lock().unwrap().get(&path).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match behavior {
        Behavior::Serve => bytes.into_response(),
        Behavior::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Behavior::FailThenServe { status, failures } => {
            let failing = failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                StatusCode::from_u16(status).unwrap().into_response()
            } else {
                bytes.into_response()
            }
        }
        Behavior::Truncate { sent } => {
            let head = bytes.slice(..sent);
            // The pause lets the head and the first bytes reach the client before the cut.
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection cut by the test mirror"))
            });
            let body = futures::StreamExt::chain(futures::stream::iter([Ok(head)]), cut);
            Response::builder()
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(Body::from_stream(body))
                .unwrap()
        }
        Behavior::Hang => std::future::pending().await,
        Behavior::StallBody => {
            let first = futures::stream::iter([Ok::<_, std::io::Error>(bytes.slice(..1024))]);
            let body = futures::StreamExt::chain(first, futures::stream::pending());
            Response::builder()
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(Body::from_stream(body))
                .unwrap()
        }
        Behavior::Delay(delay) => {
            tokio::time::sleep(delay).await;
            bytes.into_response()
        }
        Behavior::Rendezvous(barrier) => {
            barrier.wait().await;
            bytes.into_response()
        }
        Behavior::Redirect(location) => {
            (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
        }
    }
}

/// Deterministic, incompressible-looking content unique to each version and binary. A cheap
/// xorshift keeps generation fast in debug builds.
fn artifact_bytes(version: &str, binary: Binary) -> Vec<u8> {
    let seed = Sha256::digest(format!("{version}/{binary}"));
    let mut state = u64::from_le_bytes(seed[..8].try_into().unwrap()) | 1;
    let mut bytes = Vec::with_capacity(ARTIFACT_SIZE);
    while bytes.len() < ARTIFACT_SIZE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(ARTIFACT_SIZE);
    bytes
}

fn release_path(version: &str, binary: Binary) -> String {
    format!("/release/{version}/bin/linux/amd64/{binary}")
}

fn checksum_path(version: &str, binary: Binary) -> String {
    format!("{}.sha256", release_path(version, binary))
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn fast_config() -> FetchConfig {
    FetchConfig {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(3),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        max_size: 16 * 1024 * 1024,
    }
}

async fn open(dir: &Path, source: ArtifactSource, config: FetchConfig) -> ArtifactCache {
    ArtifactCache::open(dir, source, config).await.unwrap()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Asserts that the cache holds no binary, no index entry and no leftover temp file.
fn assert_nothing_cached(dir: &Path) {
    for sub in ["sha256", "index", "tmp"] {
        let files = files_under(&dir.join(sub));
        assert!(files.is_empty(), "{sub}/ should be empty: {files:?}");
    }
}

#[tokio::test]
async fn cold_fetch_then_warm_fetch_without_network() {
    let mirror = Mirror::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let cold = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    let expected = artifact_bytes(VERSION, Binary::Kubeadm);
    assert_eq!(std::fs::read(&cold.path).unwrap(), expected);
    assert_eq!(cold.sha256, hex_sha256(&expected));
    assert_eq!(cold.size, ARTIFACT_SIZE as u64);
    assert_eq!(cold.path, dir.path().join("sha256").join(&cold.sha256));
    let mode = std::fs::metadata(&cold.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o555);
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubeadm)), 1);
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubeadm)), 1);
    assert_eq!(
        cache.stats(),
        CacheStats {
            hits: 0,
            misses: 1,
            bytes_downloaded: ARTIFACT_SIZE as u64 + 64,
            blobs_rehashed: 0,
        }
    );
    assert!(files_under(&dir.path().join("tmp")).is_empty());

    let requests_before = mirror.total_hits();
    let warm = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(warm, cold);
    assert_eq!(
        mirror.total_hits(),
        requests_before,
        "warm fetch used the network"
    );
    assert_eq!(cache.stats().hits, 1);

    // A new process (a new cache on the same directory) is warm too, and still offline; the
    // verification record written with the download vouches for the blob, so it is not hashed.
    drop(cache);
    let reopened = open(dir.path(), mirror.source(), fast_config()).await;
    let again = reopened
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(again, cold);
    assert_eq!(
        mirror.total_hits(),
        requests_before,
        "reopened cache used the network"
    );
    assert_eq!(
        reopened.stats(),
        CacheStats {
            hits: 1,
            misses: 0,
            bytes_downloaded: 0,
            blobs_rehashed: 0,
        }
    );
}

#[tokio::test]
async fn known_digest_is_reused_after_asking_only_for_the_checksum() {
    let mirror = Mirror::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubelet)
        .await
        .unwrap();
    drop(cache);

    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    let artifact = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubelet)
        .await
        .unwrap();
    assert_eq!(
        artifact.sha256,
        hex_sha256(&artifact_bytes(VERSION, Binary::Kubelet))
    );
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubelet)), 2);
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubelet)), 1);
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.stats().misses, 0);
}

#[tokio::test]
async fn sha256sum_format_is_accepted() {
    let mirror = Mirror::start().await;
    let bytes = artifact_bytes(VERSION, Binary::Kubectl);
    mirror.put(
        &checksum_path(VERSION, Binary::Kubectl),
        format!("{}  kubectl\n", hex_sha256(&bytes)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    let artifact = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubectl)
        .await
        .unwrap();
    assert_eq!(std::fs::read(artifact.path).unwrap(), bytes);
}

#[tokio::test]
async fn redirects_are_followed() {
    let mirror = Mirror::start().await;
    let path = release_path(VERSION, Binary::Kubeadm);
    let cdn_path = format!("/cdn{path}");
    mirror.put(&cdn_path, artifact_bytes(VERSION, Binary::Kubeadm));
    mirror.set(&path, Behavior::Redirect(cdn_path.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    let artifact = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(artifact.path).unwrap(),
        artifact_bytes(VERSION, Binary::Kubeadm)
    );
    assert_eq!((mirror.hits(&path), mirror.hits(&cdn_path)), (1, 1));
}

#[tokio::test]
async fn checksum_mismatch_caches_nothing_and_is_not_retried() {
    let mirror = Mirror::start().await;
    let wrong = hex_sha256(b"something else");
    mirror.put(&checksum_path(VERSION, Binary::Kubeadm), wrong.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    match &error {
        Error::ChecksumMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(
                actual,
                &hex_sha256(&artifact_bytes(VERSION, Binary::Kubeadm))
            );
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("kubeadm v1.32.0 (linux/amd64)"),
        "{message}"
    );
    assert!(message.contains("nothing was cached"), "{message}");
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubeadm)), 1);
    assert_nothing_cached(dir.path());

    // The failure is not remembered: once the mirror is fixed, the fetch succeeds.
    let right = hex_sha256(&artifact_bytes(VERSION, Binary::Kubeadm));
    mirror.put(&checksum_path(VERSION, Binary::Kubeadm), right.clone());
    let artifact = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(artifact.sha256, right);
}

#[tokio::test]
async fn truncated_download_is_an_error_and_caches_nothing() {
    let mirror = Mirror::start().await;
    mirror.set(
        &release_path(VERSION, Binary::Kubelet),
        Behavior::Truncate { sent: 70_000 },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubelet)
        .await
        .unwrap_err();
    match error {
        Error::Truncated { expected, got, .. } => {
            assert_eq!(expected, ARTIFACT_SIZE as u64);
            assert!(got < expected, "got {got} of {expected}");
        }
        other => panic!("expected a truncated download, got {other:?}"),
    }
    // A dropped connection is worth retrying; each attempt failed the same way.
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubelet)), 3);
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let mirror = Mirror::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let error = cache
        .fetch("v1.99.0", Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("kubeadm v1.99.0"), "{error}");
    assert_eq!(mirror.hits(&checksum_path("v1.99.0", Binary::Kubeadm)), 1);

    // The checksum is published but the binary is missing.
    mirror.remove(&release_path(VERSION, Binary::Kubectl));
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubectl)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubectl)), 1);
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn service_unavailable_is_retried_then_succeeds() {
    let mirror = Mirror::start().await;
    mirror.set(
        &release_path(VERSION, Binary::Kubeadm),
        Behavior::FailThenServe {
            status: 503,
            failures: Arc::new(AtomicUsize::new(2)),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let artifact = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(artifact.path).unwrap(),
        artifact_bytes(VERSION, Binary::Kubeadm)
    );
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubeadm)), 3);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_the_attempt_limit() {
    let mirror = Mirror::start().await;
    mirror.set(
        &checksum_path(VERSION, Binary::Kubeadm),
        Behavior::Status(503),
    );
    mirror.set(
        &checksum_path(VERSION, Binary::Kubelet),
        Behavior::Status(403),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::HttpStatus { status: 503, .. }),
        "{error:?}"
    );
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubeadm)), 3);

    // A client error will not change on retry.
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubelet)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::HttpStatus { status: 403, .. }),
        "{error:?}"
    );
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubelet)), 1);
}

#[tokio::test]
async fn hanging_server_hits_the_timeout() {
    let mirror = Mirror::start().await;
    mirror.set(&checksum_path(VERSION, Binary::Kubeadm), Behavior::Hang);
    mirror.set(&release_path(VERSION, Binary::Kubelet), Behavior::StallBody);
    let config = FetchConfig {
        read_timeout: Duration::from_millis(200),
        max_attempts: 2,
        ..fast_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), config).await;

    let started = Instant::now();
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    // The idle timeout fires, well before the 3 s deadline per attempt.
    let idle = Duration::from_millis(200);
    assert!(
        matches!(error, Error::Timeout { after, .. } if after == idle),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubeadm)), 2);

    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubelet)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn overall_request_timeout_bounds_a_trickling_download() {
    let mirror = Mirror::start().await;
    mirror.set(
        &release_path(VERSION, Binary::Kubectl),
        Behavior::Delay(Duration::from_secs(5)),
    );
    let config = FetchConfig {
        read_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_millis(300),
        max_attempts: 1,
        ..fast_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), config).await;
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubectl)
        .await
        .unwrap_err();
    match error {
        Error::Timeout { after, .. } => assert_eq!(after, Duration::from_millis(300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let source = ArtifactSource::parse(&format!("http://127.0.0.1:{port}/release")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), source, fast_config()).await;
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Unreachable { .. }), "{error:?}");
    assert!(std::error::Error::source(&error).is_some());
}

#[tokio::test]
async fn size_limit_is_enforced_before_reading_the_body() {
    let mirror = Mirror::start().await;
    let config = FetchConfig {
        max_size: 1000,
        ..fast_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), config).await;
    let error = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::TooLarge { limit: 1000, .. }),
        "{error:?}"
    );
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubeadm)), 1);
    assert!(cache.stats().bytes_downloaded < 1000);
    assert_nothing_cached(dir.path());
}

#[tokio::test]
async fn fifty_concurrent_fetches_share_one_download() {
    let mirror = Mirror::start().await;
    mirror.set(
        &release_path(VERSION, Binary::Kubelet),
        Behavior::Delay(Duration::from_millis(200)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;

    let fetches = (0..50).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(VERSION, Arch::Amd64, Binary::Kubelet).await })
    });
    let results = futures::future::join_all(fetches).await;
    let first = results[0].as_ref().unwrap().as_ref().unwrap().clone();
    for result in results {
        assert_eq!(result.unwrap().unwrap(), first);
    }
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubelet)), 1);
    assert_eq!(mirror.hits(&checksum_path(VERSION, Binary::Kubelet)), 1);
    assert_eq!(cache.stats().misses, 1);
}

#[tokio::test]
async fn fetch_all_downloads_the_three_binaries_in_parallel() {
    let mirror = Mirror::start().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    for binary in Binary::ALL {
        mirror.set(
            &release_path(VERSION, binary),
            Behavior::Rendezvous(Arc::clone(&barrier)),
        );
    }
    let config = FetchConfig {
        read_timeout: Duration::from_secs(2),
        max_attempts: 1,
        ..fast_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), config).await;

    // Sequential downloads would leave the first one waiting at the barrier until it timed out.
    let binaries = cache.fetch_all(VERSION, Arch::Amd64).await.unwrap();
    for binary in Binary::ALL {
        let artifact = binaries.get(binary);
        assert_eq!(
            std::fs::read(&artifact.path).unwrap(),
            artifact_bytes(VERSION, binary)
        );
    }
    assert_eq!(cache.stats().misses, 3);
}

#[tokio::test]
async fn file_source_works_and_refuses_a_bad_digest() {
    let mirror_dir = tempfile::tempdir().unwrap();
    let write_release = |version: &str, digest_of: &dyn Fn(&[u8]) -> String| {
        let bin_dir = mirror_dir.path().join(version).join("bin/linux/amd64");
        std::fs::create_dir_all(&bin_dir).unwrap();
        for binary in Binary::ALL {
            let bytes = artifact_bytes(version, binary);
            std::fs::write(bin_dir.join(format!("{binary}.sha256")), digest_of(&bytes)).unwrap();
            std::fs::write(bin_dir.join(binary.name()), bytes).unwrap();
        }
    };
    write_release(VERSION, &|bytes| hex_sha256(bytes));
    write_release("v1.32.1", &|_| hex_sha256(b"tampered"));
    let source = ArtifactSource::parse(&format!("file://{}", mirror_dir.path().display())).unwrap();
    assert!(source.is_local());

    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), source, fast_config()).await;
    let binaries = cache.fetch_all(VERSION, Arch::Amd64).await.unwrap();
    assert_eq!(
        std::fs::read(&binaries.kubectl.path).unwrap(),
        artifact_bytes(VERSION, Binary::Kubectl)
    );
    assert_eq!(cache.stats().misses, 3);

    let blobs_before = files_under(&dir.path().join("sha256"));
    let error = cache
        .fetch("v1.32.1", Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ChecksumMismatch { .. }), "{error:?}");
    assert_eq!(files_under(&dir.path().join("sha256")), blobs_before);
    assert!(files_under(&dir.path().join("tmp")).is_empty());

    let error = cache
        .fetch("v1.30.0", Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn bad_versions_and_sources_are_refused_before_any_request() {
    let mirror = Mirror::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    for version in [
        "1.32.0",
        "v1.32",
        "v1.32.0-rc.1",
        "v1.32.0/../../etc",
        "",
        "latest",
    ] {
        let error = cache
            .fetch(version, Arch::Amd64, Binary::Kubeadm)
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidVersion { .. }),
            "{version:?}: {error:?}"
        );
    }
    assert_eq!(mirror.total_hits(), 0);

    for url in [
        "ftp://mirror.example/release",
        "dl.k8s.io/release",
        "https://user:pw@mirror.example/release",
        "https://dl.k8s.io/release?token=x",
        "file://otherhost/srv/release",
        "",
    ] {
        let error = ArtifactSource::parse(url).unwrap_err();
        assert!(
            matches!(error, Error::InvalidSource { .. }),
            "{url:?}: {error:?}"
        );
    }
    let error = "s390x".parse::<Arch>().unwrap_err();
    assert!(matches!(error, Error::UnsupportedArch { .. }));
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = FetchConfig {
        max_attempts: 0,
        ..fast_config()
    };
    let error = ArtifactCache::open(dir.path(), ArtifactSource::default(), config)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfig { .. }), "{error:?}");
}

#[tokio::test]
async fn open_removes_stale_temp_files_and_locks_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tmp/leftover")).unwrap();
    std::fs::write(dir.path().join("tmp/abc.0.partial"), b"half a binary").unwrap();

    let cache = open(dir.path(), ArtifactSource::default(), fast_config()).await;
    assert!(
        std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    let error = ArtifactCache::open(dir.path(), ArtifactSource::default(), fast_config())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::CacheLocked { .. }), "{error:?}");

    drop(cache);
    open(dir.path(), ArtifactSource::default(), fast_config()).await;
}

#[tokio::test]
async fn damaged_cache_entries_are_detected_and_fetched_again() {
    let mirror = Mirror::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    let fetched = cache.fetch_all(VERSION, Arch::Amd64).await.unwrap();
    drop(cache);

    // Same size, different content, written in place: the file's status no longer matches its
    // verification record, so the blob is hashed again, which notices.
    overwrite(&fetched.kubeadm.path, &vec![0u8; ARTIFACT_SIZE]);
    // Cut short: the size check notices.
    overwrite(&fetched.kubelet.path, b"short");
    // Replaced by a file of the same size and mode under another inode: hashed again.
    let swap = dir.path().join("swap");
    std::fs::write(&swap, vec![1u8; ARTIFACT_SIZE]).unwrap();
    std::fs::set_permissions(&swap, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::rename(&swap, &fetched.kubectl.path).unwrap();

    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    for binary in Binary::ALL {
        let again = cache.fetch(VERSION, Arch::Amd64, binary).await.unwrap();
        assert_eq!(&again, fetched.get(binary));
        assert_eq!(
            std::fs::read(&again.path).unwrap(),
            artifact_bytes(VERSION, binary)
        );
        assert_eq!(mirror.hits(&release_path(VERSION, binary)), 2);
    }
    assert_eq!(cache.stats().misses, 3);
    assert_eq!(cache.stats().blobs_rehashed, 2);
    drop(cache);

    // Untouched since its download: the record vouches for it in the next process.
    let cache = open(dir.path(), mirror.source(), fast_config()).await;
    let kubeadm = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(cache.stats().blobs_rehashed, 0);

    // Distrusted (a node found an upload of it wrong): the next use hashes it, here in the same
    // process and without a download, because the blob itself is intact; then it is vouched
    // for again.
    cache.distrust(&kubeadm.sha256).await.unwrap();
    let checked = cache
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(checked, kubeadm);
    assert_eq!(cache.stats().blobs_rehashed, 1);
    assert_eq!(mirror.hits(&release_path(VERSION, Binary::Kubeadm)), 2);
    drop(cache);
    let reopened = open(dir.path(), mirror.source(), fast_config()).await;
    reopened
        .fetch(VERSION, Arch::Amd64, Binary::Kubeadm)
        .await
        .unwrap();
    assert_eq!(reopened.stats().blobs_rehashed, 0);
}

fn overwrite(path: &Path, bytes: &[u8]) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, bytes).unwrap();
}
