//! Verified cache blobs served to nodes over plain HTTP (`--serve-cache`): the nodes download
//! them with curl instead of receiving them through the Docker Engine's archive API, whose tar
//! extraction in the Engine is what sets the pace of an upload (see docs/benchmarks.md).
//!
//! Only blobs this process has offered are served, each at `/sha256/<hex>`. Plain HTTP is enough:
//! a node keeps a download only if it hashes to the digest this process passed in the exec's
//! argv, which travels over the Docker Engine API, not over this connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::io::ReaderStream;
use tracing::{debug, warn};

use super::{CachedArtifact, Error, Result};

/// Read size when streaming a blob: large enough that a 200 MB set costs few system calls.
const CHUNK: usize = 256 * 1024;

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
    /// Listens on `address` (port 0: any free port) and serves until dropped. The address is
    /// also what the nodes are told, so it must be one they reach: not `0.0.0.0` or `::`.
    pub async fn bind(address: SocketAddr) -> Result<CacheServer> {
        if address.ip().is_unspecified() {
            return Err(Error::Serve {
                address,
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "an unspecified address is no address a node can reach",
                )),
            });
        }
        let listener = tokio::net::TcpListener::bind(address)
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

#[cfg(test)]
mod tests {
    use super::*;

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
