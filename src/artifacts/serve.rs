//! Verified cache blobs served to nodes over plain HTTP (`--serve-cache`): the nodes download
//! them with curl instead of receiving them through the Docker Engine's archive API, whose tar
//! extraction in the Engine is what sets the pace of an upload (see docs/benchmarks.md).
//!
//! Only blobs this process has offered are served, each at `/sha256/<hex>`. Plain HTTP is enough:
//! a node keeps a download only if it hashes to the digest this process passed in the exec's
//! argv, which travels over the Docker Engine API, not over this connection.
//!
//! Whatever runs on the nodes' network can connect, so the server bounds what a connection may
//! hold ([`Limits`]): a connection on which no byte has moved either way for a while is closed
//! (one that never sends a request, an idle keep-alive, a download nobody reads any more), and
//! beyond a number of connections at once, new ones wait in the kernel's backlog until one ends.
//! There is no limit on a whole download's time: a slow node still gets its 80 MB kubelet. Nor
//! is there one per peer: a client that holds every connection and sends a byte a minute keeps
//! the nodes waiting. The network the nodes share is the trust boundary here, as it is for the
//! nodes themselves.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::io::ReaderStream;
use tracing::{debug, warn};

use super::{CachedArtifact, Error, Result};
use crate::idle::IdleTimeout;

/// Read size when streaming a blob: large enough that a 200 MB set costs few system calls.
const CHUNK: usize = 256 * 1024;

/// What one cache server allows its connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a connection may go without a byte moving either way.
    pub idle: Duration,
    /// How many connections may be open at once.
    pub connections: usize,
}

impl Default for Limits {
    /// A minute of silence, far beyond any pause of a node's curl that is still downloading; and
    /// room for about 85 nodes staging at once (each downloads its three files together).
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            connections: 256,
        }
    }
}

/// What the handler shares with the server's handle.
#[derive(Default)]
struct Shared {
    /// Blob paths by digest, for what has been offered.
    offered: Mutex<HashMap<String, PathBuf>>,
    /// Downloads answered with a blob.
    served: AtomicU64,
}

/// An HTTP server of offered cache blobs. Cheap to clone; when the last clone is dropped, the
/// server stops accepting connections (downloads in progress run to their end).
#[derive(Clone)]
pub struct CacheServer {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheServer")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl CacheServer {
    /// Listens on `address` (port 0: any free port) and serves until dropped, within the default
    /// [`Limits`]. The address is also what the nodes are told, so it must be one they reach: not
    /// `0.0.0.0` or `::`.
    pub async fn bind(address: SocketAddr) -> Result<CacheServer> {
        Self::bind_with(address, Limits::default()).await
    }

    /// As [`CacheServer::bind`], within `limits`.
    pub(crate) async fn bind_with(address: SocketAddr, limits: Limits) -> Result<CacheServer> {
        if address.ip().is_unspecified() {
            return Err(Error::Serve {
                address,
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "an unspecified address is no address a node can reach",
                )),
            });
        }
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| Error::Serve {
                address,
                source: Arc::new(source),
            })?;
        let bound = listener.local_addr().map_err(|source| Error::Serve {
            address,
            source: Arc::new(source),
        })?;
        let shared = Arc::new(Shared::default());
        let router = Router::new()
            .route("/sha256/{digest}", get(blob))
            .with_state(Arc::clone(&shared));
        let listener = GuardedListener {
            listener,
            permits: Arc::new(Semaphore::new(limits.connections)),
            idle: limits.idle,
        };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!(error = %e, "the cache server stopped");
            }
        });
        debug!(%bound, "serving the artifact cache");
        Ok(CacheServer {
            inner: Arc::new(Inner {
                url: format!("http://{bound}"),
                shared,
                task,
            }),
        })
    }

    /// `http://<address>:<port>`, as the nodes reach it.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// How many downloads were answered with a blob (started, not necessarily finished).
    pub fn served(&self) -> u64 {
        self.inner.shared.served.load(Ordering::Relaxed)
    }

    /// Makes `artifact` downloadable and returns its URL.
    pub fn offer(&self, artifact: &CachedArtifact) -> String {
        self.inner
            .shared
            .offered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(artifact.sha256.clone(), artifact.path.clone());
        format!("{}/sha256/{}", self.inner.url, artifact.sha256)
    }
}

async fn blob(State(shared): State<Arc<Shared>>, Path(digest): Path<String>) -> Response {
    let path = shared
        .offered
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&digest)
        .cloned();
    let Some(path) = path else {
        return (StatusCode::NOT_FOUND, "not offered by this cache server\n").into_response();
    };
    let opened = async {
        let file = tokio::fs::File::open(&path).await?;
        let size = file.metadata().await?.len();
        std::io::Result::Ok((file, size))
    };
    match opened.await {
        Ok((file, size)) => {
            debug!(digest, size, "serving a blob");
            shared.served.fetch_add(1, Ordering::Relaxed);
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::CONTENT_LENGTH, size.to_string()),
                ],
                Body::from_stream(ReaderStream::with_capacity(file, CHUNK)),
            )
                .into_response()
        }
        Err(e) => {
            warn!(error = %e, path = %path.display(), "cannot serve a cached blob");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot read the blob\n").into_response()
        }
    }
}

/// The cache server's listener: accepts a connection only with one of the [`Limits`]'
/// connection permits in hand, and hands it out as an [`IdleTimeout`] stream that holds the
/// permit until the connection ends.
struct GuardedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl axum::serve::Listener for GuardedListener {
    type Io = IdleTimeout<TcpStream, OwnedSemaphorePermit>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        // The permit comes first: connections over the limit wait in the backlog, unaccepted.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the permits are never closed");
        // axum's own accept: it retries a connection's error at once, and waits out any other.
        let (stream, peer) = axum::serve::Listener::accept(&mut self.listener).await;
        (IdleTimeout::new(stream, self.idle, permit), peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    async fn get(url: &str) -> (u16, Vec<u8>) {
        let response = reqwest::get(url).await.unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn serves_what_was_offered_and_nothing_else() {
        // reqwest needs a process-wide rustls provider even for plain http.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let contents = vec![7u8; 3 * CHUNK + 5];
        let path = dir.path().join("blob");
        std::fs::write(&path, &contents).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"never offered").unwrap();
        let artifact = |path: PathBuf, sha256: &str| CachedArtifact {
            size: std::fs::metadata(&path).unwrap().len(),
            path,
            sha256: sha256.to_string(),
        };

        let server = CacheServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert!(server.url().starts_with("http://127.0.0.1:"));
        let url = server.offer(&artifact(path, &"a".repeat(64)));
        assert_eq!(url, format!("{}/sha256/{}", server.url(), "a".repeat(64)));
        assert_eq!(get(&url).await, (200, contents));
        assert_eq!(server.served(), 1);

        // Not offered, even though the file exists; and a path outside the route.
        let unoffered = format!("{}/sha256/{}", server.url(), "b".repeat(64));
        assert_eq!(get(&unoffered).await.0, 404);
        assert_eq!(
            get(&format!("{}/sha256/../other", server.url())).await.0,
            404
        );
        assert_eq!(get(&format!("{}/other", server.url())).await.0, 404);

        // An offered blob that went missing is an error, not an empty file.
        let gone = dir.path().join("gone");
        std::fs::write(&gone, b"soon gone").unwrap();
        let gone_url = server.offer(&artifact(gone.clone(), &"c".repeat(64)));
        std::fs::remove_file(&gone).unwrap();
        assert_eq!(get(&gone_url).await.0, 500);
        assert_eq!(server.served(), 1, "only the one blob was served");

        // Dropping the last handle stops the server.
        let base = server.url().to_string();
        drop(server);
        tokio::task::yield_now().await;
        assert!(reqwest::get(&format!("{base}/sha256/x")).await.is_err());
    }

    /// A server on loopback within `limits`, offering one blob of `size` bytes; and the path
    /// of that blob.
    async fn offering(
        dir: &tempfile::TempDir,
        size: usize,
        limits: Limits,
    ) -> (CacheServer, SocketAddr, String) {
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let server = CacheServer::bind_with("127.0.0.1:0".parse().unwrap(), limits)
            .await
            .unwrap();
        let url = server.offer(&CachedArtifact {
            size: size as u64,
            path,
            sha256: "d".repeat(64),
        });
        let address = server.url().trim_start_matches("http://").parse().unwrap();
        let path = url.trim_start_matches(server.url()).to_string();
        (server, address, path)
    }

    fn request(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: cache\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        let idle = Duration::from_millis(300);
        let limits = Limits {
            idle,
            ..Limits::default()
        };
        let (_server, address, _) = offering(&dir, 10, limits).await;
        let started = Instant::now();
        let mut stream = TcpStream::connect(address).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("the server closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= idle, "closed before it was idle");
    }

    #[tokio::test]
    async fn a_download_nobody_reads_is_cut_off_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        // Far more than the socket buffers hold (the client's is kept small, whatever the
        // machine's defaults), so the server's writes must wait.
        let size = 16 << 20;
        let limits = Limits {
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let (_server, address, path) = offering(&dir, size, limits).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let mut stream = socket.connect(address).await.unwrap();
        stream.write_all(&request(&path)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut received = Vec::new();
        // A reset or an end, after what the buffers held; a server that kept the connection
        // would send it all and then wait for the next request, and this would time out.
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
            .await
            .expect("the server ends the connection");
        assert!(
            received.len() < size,
            "all {} bytes arrived",
            received.len()
        );
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_for_one_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            idle: Duration::from_secs(30),
            connections: 1,
        };
        let (_server, address, path) = offering(&dir, 10, limits).await;
        let first = TcpStream::connect(address).await.unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        second.write_all(&request(&path)).await.unwrap();
        let mut answer = [0u8; 64];
        let early =
            tokio::time::timeout(Duration::from_millis(500), second.read(&mut answer)).await;
        assert!(
            early.is_err(),
            "answered while the first held the only connection"
        );
        drop(first);
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut answer))
            .await
            .expect("answered once the first connection ended")
            .unwrap();
        assert!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer[..read])
        );
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_clear_error() {
        let first = CacheServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let taken: SocketAddr = first.url().trim_start_matches("http://").parse().unwrap();
        let error = CacheServer::bind(taken).await.unwrap_err();
        assert!(error.to_string().contains(&taken.to_string()), "{error}");
    }
}
