//! Tar archives for the Engine's archive API: built on the fly for uploads, so that large files
//! stream with bounded memory, and read back for a single file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Error, Result};

/// Size of the chunks sent to the Engine, and so the unit of memory per upload in flight.
const CHUNK: usize = 64 * 1024;
/// Chunks buffered between the tar builder and the request body. With [`CHUNK`], at most about
/// half a megabyte per upload waits in memory, whatever the file sizes.
const CHANNEL_CHUNKS: usize = 8;

/// One file to upload.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// The file name inside the target directory: one path component.
    pub name: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub source: FileSource,
}

/// Where an uploaded file's contents come from.
#[derive(Debug, Clone)]
pub enum FileSource {
    Bytes(Bytes),
    /// A file on this host, streamed from disk.
    Path(PathBuf),
}

impl UploadFile {
    /// A file with `contents` from memory, owned by root.
    pub fn from_bytes(
        name: impl Into<String>,
        contents: impl Into<Bytes>,
        mode: u32,
    ) -> UploadFile {
        UploadFile {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            source: FileSource::Bytes(contents.into()),
        }
    }

    /// A file streamed from `path` on this host, owned by root.
    pub fn from_path(name: impl Into<String>, path: impl Into<PathBuf>, mode: u32) -> UploadFile {
        UploadFile {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            source: FileSource::Path(path.into()),
        }
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> UploadFile {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// Checks that `path` is absolute and plain: no `.`, `..`, empty components or NUL.
pub(super) fn validate_node_path(path: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidPath {
            path: path.to_string(),
            reason,
        })
    };
    if !path.starts_with('/') {
        return invalid("it is not absolute");
    }
    if path.contains('\0') {
        return invalid("it contains a NUL byte");
    }
    if path.len() > 4096 {
        return invalid("it is longer than 4096 bytes");
    }
    let inner = path.trim_end_matches('/');
    if inner
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return invalid("it has empty, '.' or '..' components");
    }
    Ok(())
}

pub(super) fn validate_file_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidFileName {
            name: name.to_string(),
            reason,
        })
    };
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) if !name.contains(['/', '\0']) && name.len() <= 255 => {
            Ok(())
        }
        _ => invalid("it must be a single path component without '/', NUL, '.' or '..'"),
    }
}

/// The path of `name` inside `dir` as a tar entry extracted at `/`, so that the Engine creates
/// missing parent directories.
pub(super) fn entry_path(dir: &str, name: &str) -> String {
    let dir = dir.trim_matches('/');
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// A file ready to be archived: its header data, and its contents opened.
pub(super) struct PreparedFile {
    entry_path: String,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    contents: Contents,
}

enum Contents {
    Bytes(Bytes),
    File { file: File, path: PathBuf },
}

impl PreparedFile {
    pub(super) fn size(&self) -> u64 {
        self.size
    }
}

/// Opens every host file up front, so a missing one fails before anything is sent.
/// Blocking: call from `spawn_blocking`.
pub(super) fn prepare(
    container: &str,
    dir: &str,
    files: Vec<UploadFile>,
) -> Result<Vec<PreparedFile>> {
    files
        .into_iter()
        .map(|file| {
            let (size, contents) = match file.source {
                FileSource::Bytes(bytes) => (bytes.len() as u64, Contents::Bytes(bytes)),
                FileSource::Path(path) => {
                    let local_error = |source| Error::LocalFile {
                        container: container.to_string(),
                        path: path.clone(),
                        source,
                    };
                    let opened = File::open(&path).map_err(local_error)?;
                    let metadata = opened.metadata().map_err(local_error)?;
                    if !metadata.is_file() {
                        return Err(local_error(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "not a regular file",
                        )));
                    }
                    (metadata.len(), Contents::File { file: opened, path })
                }
            };
            Ok(PreparedFile {
                entry_path: entry_path(dir, &file.name),
                mode: file.mode,
                uid: file.uid,
                gid: file.gid,
                size,
                contents,
            })
        })
        .collect()
}

/// A producer failure: which host file, if any, and why.
#[derive(Debug)]
pub(super) struct ProduceError {
    pub(super) path: Option<PathBuf>,
    pub(super) source: io::Error,
}

/// Writes the tar of `files` into `tx` in chunks, blocking when the receiver lags: this is what
/// bounds memory. Blocking: call from `spawn_blocking`. On failure the error is also sent down
/// the channel so the request body fails instead of ending as a short, valid-looking archive.
pub(super) fn produce(
    files: Vec<PreparedFile>,
    tx: mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), ProduceError> {
    let writer = ChunkWriter {
        tx: tx.clone(),
        buffer: Vec::with_capacity(CHUNK),
    };
    let result = write_archive(files, writer);
    if let Err(error) = &result {
        let _ = tx.blocking_send(Err(io::Error::new(
            error.source.kind(),
            error.source.to_string(),
        )));
    }
    result
}

fn write_archive(files: Vec<PreparedFile>, writer: ChunkWriter) -> Result<(), ProduceError> {
    let plain = |source| ProduceError { path: None, source };
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut builder = tar::Builder::new(writer);
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(file.size);
        header.set_mode(file.mode);
        header.set_uid(file.uid);
        header.set_gid(file.gid);
        header.set_mtime(mtime);
        match file.contents {
            Contents::Bytes(bytes) => builder
                .append_data(&mut header, &file.entry_path, bytes.as_ref())
                .map_err(plain)?,
            Contents::File { file: opened, path } => {
                // The header already promised `size` bytes: a file that shrinks or grows meanwhile
                // must fail the upload, not corrupt the archive.
                let exact = ExactReader {
                    inner: opened.take(file.size),
                    remaining: file.size,
                };
                builder
                    .append_data(&mut header, &file.entry_path, exact)
                    .map_err(|source| ProduceError {
                        // A closed channel is the request failing (the node gone, a timeout),
                        // which the caller reports; only a failed read is this file's fault.
                        path: (source.kind() != io::ErrorKind::BrokenPipe).then_some(path),
                        source,
                    })?;
            }
        }
    }
    let mut writer = builder.into_inner().map_err(plain)?;
    writer.flush().map_err(plain)
}

/// Reads exactly `remaining` bytes or fails.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being uploaded",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Sends what is written to it as [`CHUNK`]-sized [`Bytes`].
struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the Docker Engine stopped reading the upload",
            )
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() == CHUNK {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// A channel for [`produce`] and the stream that feeds the request body from it.
pub(super) fn body_channel() -> (
    mpsc::Sender<io::Result<Bytes>>,
    impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, stream)
}

/// What the first entry of a downloaded archive held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SingleFile {
    Contents(Vec<u8>),
    TooLarge,
    NotAFile,
}

/// Extracts the first entry of `archive`, a regular file of at most `limit` bytes.
pub(super) fn single_file(archive: &[u8], limit: u64) -> io::Result<SingleFile> {
    let mut archive = tar::Archive::new(archive);
    let mut entries = archive.entries()?;
    let mut entry = entries
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the archive is empty"))??;
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Ok(SingleFile::NotAFile);
    }
    let size = entry.size();
    if size > limit {
        return Ok(SingleFile::TooLarge);
    }
    let mut contents = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut contents)?;
    Ok(SingleFile::Contents(contents))
}

/// A verdict from the first tar header alone, so that a huge file or a directory is refused
/// before it is downloaded. `None` when the header does not tell (long names and PAX records
/// come first as their own entries).
pub(super) fn early_verdict(first_block: &[u8], limit: u64) -> Option<SingleFile> {
    let header = tar::Header::from_byte_slice(first_block);
    match header.entry_type() {
        tar::EntryType::Regular => match header.size() {
            Ok(size) if size > limit => Some(SingleFile::TooLarge),
            _ => None,
        },
        tar::EntryType::GNULongName
        | tar::EntryType::GNULongLink
        | tar::EntryType::XHeader
        | tar::EntryType::XGlobalHeader => None,
        _ => Some(SingleFile::NotAFile),
    }
}

/// Bytes of tar framing allowed on top of the file itself when downloading: headers (with long
/// names or PAX records), padding and the end blocks.
pub(super) const ARCHIVE_OVERHEAD: u64 = 64 * 1024;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn node_paths() {
        for ok in [
            "/",
            "/etc/kubernetes",
            "/var/cache/capd-inplace/v1.31.4/",
            "/a b",
        ] {
            assert!(validate_node_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "etc",
            "./etc",
            "/etc/../root",
            "/etc/./x",
            "//etc",
            "/a//b",
            "/a\0b",
        ] {
            assert!(
                matches!(validate_node_path(bad), Err(Error::InvalidPath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn file_names() {
        for ok in ["kubeadm", ".journal.capd-inplace", "a b", "ünïcode"] {
            assert!(validate_file_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(256);
        for bad in ["", ".", "..", "a/b", "/a", "a/", "a\0", &long] {
            assert!(
                matches!(validate_file_name(bad), Err(Error::InvalidFileName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn entry_paths() {
        assert_eq!(entry_path("/", "f"), "f");
        assert_eq!(entry_path("/etc/kubernetes", "f"), "etc/kubernetes/f");
        assert_eq!(entry_path("/etc/kubernetes/", "f"), "etc/kubernetes/f");
    }

    fn collect(files: Vec<UploadFile>, dir: &str) -> Vec<u8> {
        let prepared = prepare("c", dir, files).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        produce(prepared, tx).unwrap();
        let mut out = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= CHUNK);
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[test]
    fn produced_archive_has_headers_and_contents() {
        let mut host = tempfile::NamedTempFile::new().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&big).unwrap();
        let long_name = "n".repeat(120);
        let files = vec![
            UploadFile::from_bytes("small", &b"hello"[..], 0o640).owner(1000, 1001),
            UploadFile::from_path(long_name.clone(), host.path(), 0o755),
        ];
        let tar = collect(files, "/var/lib/deep/dir");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((
                entry.path().unwrap().to_string_lossy().into_owned(),
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap(),
                data,
            ));
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0],
            (
                "var/lib/deep/dir/small".into(),
                0o640,
                1000,
                1001,
                b"hello".to_vec()
            )
        );
        assert_eq!(seen[1].0, format!("var/lib/deep/dir/{long_name}"));
        assert_eq!((seen[1].1, seen[1].2, seen[1].3), (0o755, 0, 0));
        assert_eq!(seen[1].4, big);
    }

    #[test]
    fn missing_host_file_fails_before_sending() {
        let files = vec![UploadFile::from_path(
            "x",
            "/nonexistent/capd-inplace-test",
            0o644,
        )];
        match prepare("node-1", "/tmp", files) {
            Err(Error::LocalFile {
                container, path, ..
            }) => {
                assert_eq!(container, "node-1");
                assert_eq!(path, PathBuf::from("/nonexistent/capd-inplace-test"));
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a missing file was accepted"),
        }
    }

    #[test]
    fn shrinking_file_fails_the_archive() {
        let mut host = tempfile::NamedTempFile::new().unwrap();
        host.write_all(&[7u8; 10_000]).unwrap();
        let prepared = prepare(
            "c",
            "/tmp",
            vec![UploadFile::from_path("f", host.path(), 0o644)],
        )
        .unwrap();
        host.as_file().set_len(100).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let error = produce(prepared, tx).unwrap_err();
        assert_eq!(error.path.as_deref(), Some(host.path()));
        let mut saw_error = false;
        while let Ok(chunk) = rx.try_recv() {
            saw_error |= chunk.is_err();
        }
        assert!(saw_error, "the body stream must fail too");
    }

    /// Whether from memory or from a host file, a request that stopped reading stops the
    /// producer, and is not blamed on the file (the upload's own error says what happened).
    #[test]
    fn producer_stops_when_the_receiver_is_gone() {
        let mut host = tempfile::NamedTempFile::new().unwrap();
        host.write_all(&vec![7u8; 10 * CHUNK]).unwrap();
        for file in [
            UploadFile::from_bytes("f", vec![0u8; 10 * CHUNK], 0o644),
            UploadFile::from_path("f", host.path(), 0o644),
        ] {
            let prepared = prepare("c", "/tmp", vec![file]).unwrap();
            let (tx, rx) = mpsc::channel(1);
            drop(rx);
            let error = produce(prepared, tx).unwrap_err();
            assert_eq!(error.source.kind(), io::ErrorKind::BrokenPipe);
            assert_eq!(error.path, None);
        }
    }

    fn archive_of(entry_type: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, "f", data).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn single_file_extraction() {
        let tar = archive_of(tar::EntryType::Regular, b"0123456789");
        assert_eq!(
            single_file(&tar, 10).unwrap(),
            SingleFile::Contents(b"0123456789".to_vec())
        );
        assert_eq!(single_file(&tar, 9).unwrap(), SingleFile::TooLarge);
        let dir = archive_of(tar::EntryType::Directory, b"");
        assert_eq!(single_file(&dir, 10).unwrap(), SingleFile::NotAFile);
        assert!(single_file(b"", 10).is_err());
        assert_eq!(early_verdict(&tar[..512], 9), Some(SingleFile::TooLarge));
        assert_eq!(early_verdict(&tar[..512], 10), None);
        assert_eq!(early_verdict(&dir[..512], 10), Some(SingleFile::NotAFile));
        assert!(single_file(&[1u8; 512], 10).is_err());
    }
}
