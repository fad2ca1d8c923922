//! The on-disk, content-addressed cache and its single-flight front door. The layout and the
//! verification trade-off are described in the module docs of [`crate::artifacts`].

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use super::fetch::Transport;
use super::{Arch, ArtifactId, ArtifactSource, Binary, Error, FetchConfig, Result};

const LOCK_FILE: &str = ".lock";
const TMP_DIR: &str = "tmp";
const BLOB_DIR: &str = "sha256";
const INDEX_DIR: &str = "index";
const VERIFIED_DIR: &str = "verified";
/// Cached binaries are immutable: readable and executable, never writable in place.
const BLOB_MODE: u32 = 0o555;
const HASH_BUFFER: usize = 256 * 1024;

/// A verified binary in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedArtifact {
    /// `<cache>/sha256/<hex>`; never rewritten once there.
    pub path: PathBuf,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    pub size: u64,
}

/// The three binaries of one release for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeBinaries {
    pub kubeadm: CachedArtifact,
    pub kubelet: CachedArtifact,
    pub kubectl: CachedArtifact,
}

impl KubeBinaries {
    pub fn get(&self, binary: Binary) -> &CachedArtifact {
        match binary {
            Binary::Kubeadm => &self.kubeadm,
            Binary::Kubelet => &self.kubelet,
            Binary::Kubectl => &self.kubectl,
        }
    }
}

/// Counters since the cache was opened. A hit or a miss counts one resolution of an artifact,
/// however many callers shared it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Served from disk, with or without asking the source for its checksum.
    pub hits: u64,
    /// Needed a download (counted whether or not the download then succeeded).
    pub misses: u64,
    /// Bytes read from the source (checksum files, failed attempts and `file://` copies included).
    pub bytes_downloaded: u64,
    /// Cached blobs whose content was hashed again because no valid verification record vouched
    /// for them.
    pub blobs_rehashed: u64,
}

/// Verified Kubernetes binaries on disk. Cheap to clone; clones share the cache, its in-flight
/// downloads and its counters. One process owns a cache directory at a time.
#[derive(Clone)]
pub struct ArtifactCache {
    inner: Arc<Inner>,
}

type Flight = Shared<BoxFuture<'static, Result<CachedArtifact>>>;

struct Inner {
    root: PathBuf,
    source: ArtifactSource,
    /// Keeps one source's published digests apart from another's.
    source_id: String,
    transport: Transport,
    in_flight: Mutex<HashMap<ArtifactId, Flight>>,
    /// Digests whose blob content was re-hashed by this process.
    verified: Mutex<HashSet<String>>,
    hits: AtomicU64,
    misses: AtomicU64,
    rehashed: AtomicU64,
    temp_seq: AtomicU64,
    /// Held (flock) for the cache's lifetime, so leftovers in `tmp/` can only be another run's.
    _lock: File,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("root", &self.inner.root)
            .field("source", &self.inner.source.as_str())
            .finish_non_exhaustive()
    }
}

impl ArtifactCache {
    /// Opens (creating if needed) the cache in `dir`, takes its lock, and removes temp files a
    /// crashed run left behind.
    pub async fn open(
        dir: impl Into<PathBuf>,
        source: ArtifactSource,
        config: FetchConfig,
    ) -> Result<ArtifactCache> {
        let root = dir.into();
        let transport = Transport::new(config)?;
        let prepared = root.clone();
        let (lock, removed) = blocking(&root, move || prepare_dir(&prepared)).await??;
        if removed > 0 {
            info!(dir = %root.display(), removed, "removed stale partial downloads");
        }
        let source_id = hex::encode(&Sha256::digest(source.as_str().as_bytes())[..8]);
        Ok(ArtifactCache {
            inner: Arc::new(Inner {
                root,
                source,
                source_id,
                transport,
                in_flight: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashSet::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                rehashed: AtomicU64::new(0),
                temp_seq: AtomicU64::new(0),
                _lock: lock,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    pub fn source(&self) -> &ArtifactSource {
        &self.inner.source
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            bytes_downloaded: self.inner.transport.bytes_read(),
            blobs_rehashed: self.inner.rehashed.load(Ordering::Relaxed),
        }
    }

    /// Forgets that the blob with this digest was verified: its next use hashes it again (and
    /// fetches it again if it is damaged). For a caller that found the blob's bytes wrong
    /// downstream, such as a node that hashed an upload of it.
    pub async fn distrust(&self, sha256: &str) -> Result<()> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sha256);
        remove_if_present(&self.inner.stamp_path(sha256)).await
    }

    /// A verified binary for `version` (strict `vMAJOR.MINOR.PATCH`). Concurrent calls for the
    /// same artifact share one resolution; different artifacts proceed in parallel. The work runs
    /// in its own task, so a caller that gives up does not abort a download others wait for.
    pub async fn fetch(&self, version: &str, arch: Arch, binary: Binary) -> Result<CachedArtifact> {
        let id = ArtifactId::new(version, arch, binary)?;
        let flight = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match in_flight.get(&id) {
                Some(flight) => {
                    debug!(artifact = %id, "joining a fetch in progress");
                    flight.clone()
                }
                None => {
                    let flight = self.start_flight(id.clone());
                    in_flight.insert(id, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// kubeadm, kubelet and kubectl for one release, fetched in parallel.
    pub async fn fetch_all(&self, version: &str, arch: Arch) -> Result<KubeBinaries> {
        let (kubeadm, kubelet, kubectl) = tokio::try_join!(
            self.fetch(version, arch, Binary::Kubeadm),
            self.fetch(version, arch, Binary::Kubelet),
            self.fetch(version, arch, Binary::Kubectl),
        )?;
        Ok(KubeBinaries {
            kubeadm,
            kubelet,
            kubectl,
        })
    }

    fn start_flight(&self, id: ArtifactId) -> Flight {
        let span = info_span!(
            "artifact_fetch",
            version = id.version(),
            arch = %id.arch(),
            binary = %id.binary(),
            source = self.inner.source.as_str(),
        );
        let inner = Arc::clone(&self.inner);
        let key = id.clone();
        let task = tokio::spawn(
            async move {
                let result = inner.resolve(&key).await;
                if let Err(error) = &result {
                    warn!(error = %error, kind = error.metric_label(), "artifact fetch failed");
                }
                // Later callers start afresh: a warm hit after success, a new try after failure.
                inner
                    .in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                result
            }
            .instrument(span),
        );
        async move {
            task.await
                .unwrap_or_else(|_| Err(Error::TaskFailed { artifact: id }))
        }
        .boxed()
        .shared()
    }
}

impl Inner {
    async fn resolve(&self, id: &ArtifactId) -> Result<CachedArtifact> {
        let index_path = self.index_path(id);
        if let Some(entry) = self.read_index(&index_path).await? {
            if let Some(hit) = self.cached_blob(&entry.sha256, Some(entry.size)).await? {
                self.hits.fetch_add(1, Ordering::Relaxed);
                debug!(sha256 = %hit.sha256, "cache hit, no network needed");
                return Ok(hit);
            }
            remove_if_present(&index_path).await?;
        }

        let location = self.source.locate(id);
        let expected = self.transport.published_digest(id, &location).await?;
        if let Some(hit) = self.cached_blob(&expected, None).await? {
            self.write_index(&index_path, &hit).await?;
            self.hits.fetch_add(1, Ordering::Relaxed);
            debug!(sha256 = %hit.sha256, "cache hit by published digest");
            return Ok(hit);
        }

        self.misses.fetch_add(1, Ordering::Relaxed);
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let partial = PartialFile::new(
            self.root
                .join(TMP_DIR)
                .join(format!("{expected}.{seq}.partial")),
        );
        let size = self
            .transport
            .download(id, &location, &expected, &partial.path)
            .await?;
        let artifact = self.commit_blob(partial, &expected, size).await?;
        self.write_index(&index_path, &artifact).await?;
        info!(sha256 = %artifact.sha256, size, "downloaded and verified");
        Ok(artifact)
    }

    fn index_path(&self, id: &ArtifactId) -> PathBuf {
        self.root
            .join(INDEX_DIR)
            .join(&self.source_id)
            .join(id.version())
            .join("linux")
            .join(id.arch().name())
            .join(id.binary().name())
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join(BLOB_DIR).join(sha256)
    }

    async fn read_index(&self, path: &Path) -> Result<Option<IndexEntry>> {
        let text = match tokio::fs::read_to_string(path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        match IndexEntry::parse(&text) {
            Some(entry) => Ok(Some(entry)),
            None => {
                warn!(path = %path.display(), "ignoring a damaged cache index entry");
                remove_if_present(path).await?;
                Ok(None)
            }
        }
    }

    /// The blob for `sha256`, if present and intact. A blob of the wrong size or content is
    /// removed so that it is fetched again.
    async fn cached_blob(
        &self,
        sha256: &str,
        expected_size: Option<u64>,
    ) -> Result<Option<CachedArtifact>> {
        let path = self.blob_path(sha256);
        let metadata = match tokio::fs::metadata(&path).await {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let size_ok = expected_size.is_none_or(|size| size == metadata.len());
        if !metadata.is_file() || !size_ok {
            warn!(path = %path.display(), "discarding a cached blob of the wrong size");
            remove_if_present(&path).await?;
            return Ok(None);
        }
        if !self.is_verified(sha256) {
            let stamp_path = self.stamp_path(sha256);
            let recorded = match tokio::fs::read_to_string(&stamp_path).await {
                Ok(text) => Stamp::parse(&text),
                Err(_) => None,
            };
            if recorded != Some(Stamp::of(&metadata)) {
                self.rehashed.fetch_add(1, Ordering::Relaxed);
                let hashed = path.clone();
                let actual = blocking(&path, move || hash_file(&hashed)).await?;
                if actual != sha256 {
                    warn!(path = %path.display(), %actual, "discarding a damaged cached blob");
                    remove_if_present(&stamp_path).await?;
                    remove_if_present(&path).await?;
                    return Ok(None);
                }
                self.write_stamp(sha256, &metadata).await?;
            }
            self.mark_verified(sha256);
        }
        Ok(Some(CachedArtifact {
            path,
            sha256: sha256.to_owned(),
            size: metadata.len(),
        }))
    }

    /// Moves a verified, synced download to its content address.
    async fn commit_blob(
        &self,
        partial: PartialFile,
        sha256: &str,
        size: u64,
    ) -> Result<CachedArtifact> {
        let target = self.blob_path(sha256);
        let from = partial.path.clone();
        let to = target.clone();
        let metadata = blocking(&target, move || {
            std::fs::set_permissions(&from, std::fs::Permissions::from_mode(BLOB_MODE))?;
            std::fs::rename(&from, &to)?;
            sync_parent(&to)?;
            std::fs::metadata(&to)
        })
        .await?;
        partial.disarm();
        self.write_stamp(sha256, &metadata).await?;
        self.mark_verified(sha256);
        Ok(CachedArtifact {
            path: target,
            sha256: sha256.to_owned(),
            size,
        })
    }

    async fn write_index(&self, path: &Path, artifact: &CachedArtifact) -> Result<()> {
        let contents = IndexEntry {
            sha256: artifact.sha256.clone(),
            size: artifact.size,
        }
        .render();
        self.replace_file(path, contents, Durability::Synced).await
    }

    /// Writes a small file under a temporary name in `tmp/`, then renames it over `path`
    /// (creating its directory): readers see the old contents or the new, never a part.
    async fn replace_file(
        &self,
        path: &Path,
        contents: String,
        durability: Durability,
    ) -> Result<()> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let partial = PartialFile::new(self.root.join(TMP_DIR).join(format!("{seq}.partial")));
        let from = partial.path.clone();
        let to = path.to_owned();
        blocking(path, move || {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut file = File::create(&from)?;
            file.write_all(contents.as_bytes())?;
            if durability == Durability::Synced {
                file.sync_all()?;
            }
            std::fs::rename(&from, &to)?;
            if durability == Durability::Synced {
                sync_parent(&to)?;
            }
            Ok(())
        })
        .await?;
        partial.disarm();
        Ok(())
    }

    fn stamp_path(&self, sha256: &str) -> PathBuf {
        self.root.join(VERIFIED_DIR).join(sha256)
    }

    /// Records the status of a blob whose content just hashed right. Not synced: a record lost
    /// in a crash only costs one more hash.
    async fn write_stamp(&self, sha256: &str, metadata: &std::fs::Metadata) -> Result<()> {
        let contents = Stamp::of(metadata).render();
        self.replace_file(&self.stamp_path(sha256), contents, Durability::Unsynced)
            .await
    }

    fn is_verified(&self, sha256: &str) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(sha256)
    }

    fn mark_verified(&self, sha256: &str) {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sha256.to_owned());
    }
}

/// Whether [`Inner::replace_file`] waits for the file and its directory entry to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Synced,
    Unsynced,
}

/// The status of a blob file when its content last hashed right: any write, chmod, replacement
/// or copy changes at least one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    inode: u64,
    mode: u32,
    changed_ns: i128,
    modified_ns: i128,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        let nanos =
            |seconds: i64, nanos: i64| i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
        Stamp {
            size: metadata.size(),
            inode: metadata.ino(),
            mode: metadata.mode(),
            changed_ns: nanos(metadata.ctime(), metadata.ctime_nsec()),
            modified_ns: nanos(metadata.mtime(), metadata.mtime_nsec()),
        }
    }

    fn parse(text: &str) -> Option<Stamp> {
        let mut fields = text.split_whitespace();
        let stamp = Stamp {
            size: fields.next()?.parse().ok()?,
            inode: fields.next()?.parse().ok()?,
            mode: fields.next()?.parse().ok()?,
            changed_ns: fields.next()?.parse().ok()?,
            modified_ns: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(stamp)
    }

    fn render(&self) -> String {
        format!(
            "{} {} {} {} {}\n",
            self.size, self.inode, self.mode, self.changed_ns, self.modified_ns
        )
    }
}

/// What a source published for one artifact, as recorded after a verified download.
#[derive(Debug, PartialEq, Eq)]
struct IndexEntry {
    sha256: String,
    size: u64,
}

impl IndexEntry {
    fn parse(text: &str) -> Option<IndexEntry> {
        let mut fields = text.split_whitespace();
        let sha256 = fields.next()?;
        let size = fields.next()?.parse().ok()?;
        let well_formed = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed || fields.next().is_some() {
            return None;
        }
        Some(IndexEntry {
            sha256: sha256.to_owned(),
            size,
        })
    }

    fn render(&self) -> String {
        format!("{} {}\n", self.sha256, self.size)
    }
}

/// A file under `tmp/` that is removed when dropped, unless it was moved into place.
struct PartialFile {
    path: PathBuf,
    armed: bool,
}

impl PartialFile {
    fn new(path: PathBuf) -> PartialFile {
        PartialFile { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            // Unlinking one file is quick; waiting for a blocking thread in Drop is not possible.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn prepare_dir(root: &Path) -> std::io::Result<Result<(File, usize)>> {
    for dir in [TMP_DIR, BLOB_DIR, INDEX_DIR, VERIFIED_DIR] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Ok(Err(Error::CacheLocked {
                dir: root.to_owned(),
            }));
        }
        Err(TryLockError::Error(e)) => return Err(e),
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(root.join(TMP_DIR))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
        removed += 1;
    }
    Ok(Ok((lock, removed)))
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; HASH_BUFFER];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

/// Makes a rename durable: the directory entry must reach the disk, not just the file data.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

async fn remove_if_present(path: &Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Runs file work off the async threads; `path` names the place in an error.
async fn blocking<T, F>(path: &Path, work: F) -> Result<T>
where
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| Error::io(path, e)),
        Err(join) => Err(Error::io(path, std::io::Error::other(join.to_string()))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn index_entries_round_trip_and_reject_damage() {
        let entry = IndexEntry {
            sha256: "0123456789abcdef".repeat(4),
            size: 42,
        };
        assert_eq!(IndexEntry::parse(&entry.render()), Some(entry));
        let hex = "ab".repeat(32);
        let damaged = [
            ("empty", String::new()),
            ("no size", hex.clone()),
            ("negative size", format!("{hex} -1")),
            ("uppercase digest", format!("{} 1", hex.to_uppercase())),
            ("short digest", "abc 1".to_owned()),
            ("extra field", format!("{hex} 1 2")),
            ("path in digest", format!("../../{} 1", &hex[6..])),
        ];
        for (name, text) in damaged {
            assert_eq!(IndexEntry::parse(&text), None, "case {name}");
        }
    }

    #[test]
    fn partial_files_vanish_unless_disarmed() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = dir.path().join("a.partial");
        std::fs::write(&dropped, b"x").unwrap();
        drop(PartialFile::new(dropped.clone()));
        assert!(!dropped.exists());

        let kept = dir.path().join("b.partial");
        std::fs::write(&kept, b"x").unwrap();
        PartialFile::new(kept.clone()).disarm();
        assert!(kept.exists());
    }

    #[test]
    fn hash_file_matches_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            hash_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
