//! One verified cache per artifact source, under a single root directory.
//!
//! The ExtensionConfig may name a mirror per request (`artifactURL`), and each cache holds its
//! directory's lock for the life of the process, so each source gets a directory of its own,
//! named by a hash of the source URL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{ArtifactCache, ArtifactSource, CacheStats, FetchConfig, Result};

#[derive(Clone)]
pub struct ArtifactCaches {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    default_source: ArtifactSource,
    config: FetchConfig,
    caches: Mutex<HashMap<String, ArtifactCache>>,
}

impl ArtifactCaches {
    /// Opens the default source's cache at once, so a bad directory fails at startup.
    pub async fn open(
        root: impl Into<PathBuf>,
        default_source: ArtifactSource,
        config: FetchConfig,
    ) -> Result<Self> {
        let caches = ArtifactCaches {
            inner: Arc::new(Inner {
                root: root.into(),
                default_source,
                config,
                caches: Mutex::default(),
            }),
        };
        caches.get(None).await?;
        Ok(caches)
    }

    pub fn default_source(&self) -> &ArtifactSource {
        &self.inner.default_source
    }

    /// The cache for `source`, or for the default source.
    pub async fn get(&self, source: Option<ArtifactSource>) -> Result<ArtifactCache> {
        let source = source.unwrap_or_else(|| self.inner.default_source.clone());
        let mut caches = self.inner.caches.lock().await;
        if let Some(cache) = caches.get(source.as_str()) {
            return Ok(cache.clone());
        }
        let digest = hex::encode(Sha256::digest(source.as_str().as_bytes()));
        let dir = self.inner.root.join(&digest[..16]);
        let key = source.as_str().to_string();
        let cache = ArtifactCache::open(dir, source, self.inner.config.clone()).await?;
        caches.insert(key, cache.clone());
        Ok(cache)
    }

    /// Counters summed over every source.
    pub async fn stats(&self) -> CacheStats {
        let caches = self.inner.caches.lock().await;
        caches
            .values()
            .map(ArtifactCache::stats)
            .fold(CacheStats::default(), |sum, s| CacheStats {
                hits: sum.hits + s.hits,
                misses: sum.misses + s.misses,
                bytes_downloaded: sum.bytes_downloaded + s.bytes_downloaded,
                blobs_rehashed: sum.blobs_rehashed + s.blobs_rehashed,
            })
    }
}
