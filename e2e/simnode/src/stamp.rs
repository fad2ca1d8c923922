//! The version stamp. One compiled binary becomes per-version artifacts by appending a trailer;
//! the running binary reads the tail of its own file to learn which version (and tool) it is.
//! Each version's file therefore has distinct bytes and a distinct sha256, like real releases.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::version::Version;

const PREFIX: &str = "\n--simnode-version:";
const SUFFIX: &str = "--\n";
/// How far from the end a trailer can start; bounds the read.
const TAIL_LEN: u64 = 256;

/// What the trailer says: the version, and optionally the tool the file was published as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub version: Version,
    pub tool: Option<String>,
}

/// The bytes to append to the plain simnode binary, directly or after padding bytes (which
/// make artifacts of a given size for benchmarks: only the end of the file is read).
pub fn trailer(version: &Version, tool: Option<&str>) -> Vec<u8> {
    let tag = match tool {
        Some(tool) => format!("{PREFIX}{version}:{tool}{SUFFIX}"),
        None => format!("{PREFIX}{version}{SUFFIX}"),
    };
    tag.into_bytes()
}

/// Finds the trailer at the very end of `tail`.
pub fn parse_tail(tail: &[u8]) -> Option<Stamp> {
    let suffix = SUFFIX.as_bytes();
    if !tail.ends_with(suffix) {
        return None;
    }
    let body = &tail[..tail.len() - suffix.len()];
    let prefix = PREFIX.as_bytes();
    let start = body.windows(prefix.len()).rposition(|w| w == prefix)? + prefix.len();
    let text = std::str::from_utf8(&body[start..]).ok()?;
    let (version, tool) = match text.split_once(':') {
        Some((v, t)) if !t.is_empty() => (v, Some(t.to_string())),
        Some(_) => return None,
        None => (text, None),
    };
    Some(Stamp {
        version: Version::parse(version).ok()?,
        tool,
    })
}

/// Reads the stamp of a file, usually `/proc/self/exe`.
pub fn read_stamp(path: &Path) -> std::io::Result<Option<Stamp>> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let from = len.saturating_sub(TAIL_LEN);
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::with_capacity(TAIL_LEN as usize);
    file.read_to_end(&mut tail)?;
    Ok(parse_tail(&tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn trailer_round_trips_with_and_without_tool() {
        let mut bin = b"\x7fELF...code...".to_vec();
        bin.extend(trailer(&v("v1.31.4"), None));
        assert_eq!(
            parse_tail(&bin),
            Some(Stamp {
                version: v("v1.31.4"),
                tool: None
            })
        );

        let mut bin = b"\x7fELF".to_vec();
        bin.extend([0u8; 1000]);
        bin.extend(trailer(&v("v1.32.0"), Some("kubelet")));
        let stamp = parse_tail(&bin[bin.len() - 200..]).unwrap();
        assert_eq!(stamp.version, v("v1.32.0"));
        assert_eq!(stamp.tool.as_deref(), Some("kubelet"));
    }

    #[test]
    fn unstamped_or_garbled_tails_are_none() {
        assert_eq!(parse_tail(b"plain binary"), None);
        assert_eq!(parse_tail(b"\n--simnode-version:banana--\n"), None);
        assert_eq!(parse_tail(b"\n--simnode-version:v1.31.4:--\n"), None);
        assert_eq!(parse_tail(b"--\n"), None);
    }

    #[test]
    fn stamp_is_read_from_a_file_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeadm");
        let mut bytes = vec![7u8; 10_300];
        bytes.extend(trailer(&v("v1.30.6"), Some("kubeadm")));
        std::fs::write(&path, bytes).unwrap();
        let stamp = read_stamp(&path).unwrap().unwrap();
        assert_eq!(stamp.version, v("v1.30.6"));
        assert_eq!(stamp.tool.as_deref(), Some("kubeadm"));
    }
}
