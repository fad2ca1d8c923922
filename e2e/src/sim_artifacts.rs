//! The simulated node's artifacts: the simnode binary stamped once per version and tool, the
//! dl.k8s.io-shaped mirror tree made from them (optionally padded to the sizes of the real
//! binaries), and the per-version node images (kind's layout image plus
//! `/usr/bin/kube{adm,let,ctl}` and `/kind/version`). Everything is cached by content hash, so a
//! second run reuses it.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::BuildImageOptions;
use capd_inplace_simnode::stamp::trailer;
use capd_inplace_simnode::version::Version;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::sim::{Error, Result};

/// The versions the mirror serves: three patches per minor from v1.30 to v1.33, including the
/// `.0` releases (v1.30.0 has kubeadm's known kubelet-config bug upstream; it is served anyway).
pub const MIRROR_VERSIONS: [&str; 12] = [
    "v1.30.0", "v1.30.6", "v1.30.10", "v1.31.0", "v1.31.4", "v1.31.9", "v1.32.0", "v1.32.3",
    "v1.32.7", "v1.33.0", "v1.33.2", "v1.33.5",
];
pub const TOOLS: [&str; 3] = ["kubeadm", "kubelet", "kubectl"];
pub const ARCH: &str = "amd64";

/// The plain simnode binary: `CAPD_SIMNODE_BIN`, or `simnode` next to the running executable
/// (`target/<profile>/simnode`, also from `target/<profile>/deps/<test>`).
pub fn simnode_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CAPD_SIMNODE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Artifacts(format!("cannot locate the running executable: {e}")))?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        if let Some(d) = dir {
            let candidate = d.join("simnode");
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent();
        }
    }
    Err(Error::Artifacts(format!(
        "no simnode binary next to {}: build it with `cargo build -p capd-inplace-simnode` or set CAPD_SIMNODE_BIN",
        exe.display()
    )))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The bytes of `tool` at `version`: the plain binary plus its trailer.
pub fn stamped(simnode: &[u8], version: &Version, tool: &str) -> Vec<u8> {
    let mut bytes = simnode.to_vec();
    bytes.extend(trailer(version, Some(tool)));
    bytes
}

/// The sizes of the binaries the mirror publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactSizes {
    /// The stamped simnode binary as it is (a few megabytes).
    #[default]
    Plain,
    /// Zero bytes between the binary and its trailer bring each file to exactly this many bytes.
    /// The kernel loads only the ELF segments, so a padded file still runs; moving it costs what
    /// moving a real binary of that size costs.
    Padded {
        kubeadm: u64,
        kubelet: u64,
        kubectl: u64,
    },
}

impl ArtifactSizes {
    /// Roughly the linux/amd64 release binaries of v1.30 to v1.33.
    pub const REAL: ArtifactSizes = ArtifactSizes::Padded {
        kubeadm: 70_000_000,
        kubelet: 80_000_000,
        kubectl: 55_000_000,
    };

    /// The size `tool` is padded to, if any.
    pub fn padded_size(self, tool: &str) -> Option<u64> {
        match (self, tool) {
            (ArtifactSizes::Plain, _) => None,
            (ArtifactSizes::Padded { kubeadm, .. }, "kubeadm") => Some(kubeadm),
            (ArtifactSizes::Padded { kubelet, .. }, "kubelet") => Some(kubelet),
            (ArtifactSizes::Padded { kubectl, .. }, _) => Some(kubectl),
        }
    }

    /// The cache entry holding a tree of these sizes.
    fn tree_name(self) -> String {
        match self {
            ArtifactSizes::Plain => "mirror".into(),
            ArtifactSizes::Padded {
                kubeadm,
                kubelet,
                kubectl,
            } => format!("mirror-padded-{kubeadm}-{kubelet}-{kubectl}"),
        }
    }
}

/// A cache directory keyed by the simnode binary's hash, beside the binary.
fn cache_dir(simnode: &Path, bytes: &[u8]) -> PathBuf {
    let parent = simnode.parent().unwrap_or(Path::new("."));
    parent
        .join("simcluster-cache")
        .join(&sha256_hex(bytes)[..12])
}

/// [`ensure_sized_mirror_tree`] with the plain binaries.
pub fn ensure_mirror_tree(simnode: &Path) -> Result<PathBuf> {
    ensure_sized_mirror_tree(simnode, ArtifactSizes::Plain)
}

/// Makes (once) the mirror tree `<dir>/release/<v>/bin/linux/amd64/<tool>{,.sha256}` for every
/// [`MIRROR_VERSIONS`] entry, with files of `sizes`, and returns `<dir>`. Built in a temporary
/// directory and renamed into place, so concurrent test processes never see half a tree.
pub fn ensure_sized_mirror_tree(simnode: &Path, sizes: ArtifactSizes) -> Result<PathBuf> {
    let bytes = std::fs::read(simnode).map_err(io(simnode))?;
    let cache = cache_dir(simnode, &bytes);
    let tree = cache.join(sizes.tree_name());
    if tree.join("release").is_dir() {
        return Ok(tree);
    }
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    // Unique per call, not only per process: test threads of one process build it concurrently.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = cache.join(format!(
        "{}.tmp.{}.{}",
        sizes.tree_name(),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let versions = MIRROR_VERSIONS
        .iter()
        .map(|v| Version::parse(v).map_err(|e| Error::Artifacts(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    for tool in TOOLS {
        let digests = match sizes.padded_size(tool) {
            None => versions
                .iter()
                .map(|version| {
                    let body = stamped(&bytes, version, tool);
                    write_file(&tmp_binary(&tmp, version, tool)?, &body, 0o755)?;
                    Ok(sha256_hex(&body))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(size) => write_padded(&tmp, &bytes, &versions, tool, size)?,
        };
        for (version, digest) in versions.iter().zip(digests) {
            let file = tmp_binary(&tmp, version, tool)?;
            write_file(
                &file.with_file_name(format!("{tool}.sha256")),
                digest.as_bytes(),
                0o644,
            )?;
        }
    }
    match std::fs::rename(&tmp, &tree) {
        Ok(()) => {}
        // Another process won the race; its tree is identical.
        Err(_) if tree.join("release").is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(Error::Io {
                path: tree,
                source: e,
            });
        }
    }
    Ok(tree)
}

/// `<tree>/release/<version>/bin/linux/<arch>/<tool>`, its directory created.
fn tmp_binary(tree: &Path, version: &Version, tool: &str) -> Result<PathBuf> {
    let dir = tree
        .join("release")
        .join(version.to_string())
        .join("bin/linux")
        .join(ARCH);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir.join(tool))
}

/// Writes `tool` for every version as the binary, zeros up to `size` minus the trailer, and the
/// trailer, and returns their sha256 digests. The zeros are a hole in the file, so a tree of
/// twelve versions takes little disk; the digests share the hash of the common prefix, so the
/// padding is hashed about once per tool rather than once per file.
fn write_padded(
    tree: &Path,
    simnode: &[u8],
    versions: &[Version],
    tool: &str,
    size: u64,
) -> Result<Vec<String>> {
    let tags: Vec<Vec<u8>> = versions.iter().map(|v| trailer(v, Some(tool))).collect();
    let longest = tags.iter().map(Vec::len).max().unwrap_or(0) as u64;
    let Some(shared_zeros) = size.checked_sub(simnode.len() as u64 + longest) else {
        return Err(Error::InvalidArgument(format!(
            "{tool} cannot be padded to {size} bytes: the stamped binary alone is larger"
        )));
    };
    let mut prefix = Sha256::new();
    prefix.update(simnode);
    hash_zeros(&mut prefix, shared_zeros);
    versions
        .iter()
        .zip(&tags)
        .map(|(version, tag)| {
            let path = tmp_binary(tree, version, tool)?;
            let zeros = size - simnode.len() as u64 - tag.len() as u64;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o755)
                .open(&path)
                .map_err(io(&path))?;
            file.write_all(simnode).map_err(io(&path))?;
            file.set_len(simnode.len() as u64 + zeros)
                .map_err(io(&path))?;
            file.seek(SeekFrom::End(0)).map_err(io(&path))?;
            file.write_all(tag).map_err(io(&path))?;
            let mut hasher = prefix.clone();
            hash_zeros(&mut hasher, zeros - shared_zeros);
            hasher.update(tag);
            Ok(hex::encode(hasher.finalize()))
        })
        .collect()
}

fn hash_zeros(hasher: &mut Sha256, mut count: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while count > 0 {
        let n = count.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        count -= n as u64;
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

static LAYOUT_IMAGE: OnceCell<String> = OnceCell::const_new();

/// The kind-layout image from `scripts/build-simnode-image.sh` (built once, minutes the very
/// first time because of debootstrap, seconds afterwards).
pub async fn layout_image() -> Result<String> {
    LAYOUT_IMAGE
        .get_or_try_init(|| async {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-simnode-image.sh");
            let output = tokio::process::Command::new("bash")
                .arg(&script)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(io(&script))?;
            let tag = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if !output.status.success() || tag.is_empty() {
                return Err(Error::Artifacts(format!(
                    "{} failed ({}): {}",
                    script.display(),
                    output.status,
                    tail(&String::from_utf8_lossy(&output.stderr))
                )));
            }
            Ok(tag)
        })
        .await
        .cloned()
}

pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The node image for `version`, like `kindest/node:<version>`: the layout image plus the
/// stamped tools and `/kind/version`. Tagged `capd-inplace/simnode-node:<version>-<hash>`.
pub async fn node_image(docker: &Docker, simnode: &Path, version: &Version) -> Result<String> {
    let layout = layout_image().await?;
    let bytes = tokio::fs::read(simnode).await.map_err(io(simnode))?;
    let key = sha256_hex(format!("{layout} {} {version}", sha256_hex(&bytes)).as_bytes());
    let tag = format!("capd-inplace/simnode-node:{version}-{}", &key[..12]);
    if docker.inspect_image(&tag).await.is_ok() {
        return Ok(tag);
    }
    let mut context = tar::Builder::new(Vec::new());
    let dockerfile = format!(
        "FROM {layout}\nCOPY kubeadm kubelet kubectl /usr/bin/\nCOPY version /kind/version\nLABEL io.x-k8s.simnode.version={version}\n"
    );
    append(&mut context, "Dockerfile", dockerfile.as_bytes(), 0o644)?;
    for tool in TOOLS {
        append(&mut context, tool, &stamped(&bytes, version, tool), 0o755)?;
    }
    append(
        &mut context,
        "version",
        format!("{version}\n").as_bytes(),
        0o644,
    )?;
    let body = context
        .into_inner()
        .map_err(|e| Error::Artifacts(format!("build context: {e}")))?;
    let options = BuildImageOptions {
        t: Some(tag.clone()),
        dockerfile: "Dockerfile".into(),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(body.into())));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| Error::docker(format!("build {tag}"), e))?;
        if let Some(detail) = info.error_detail {
            return Err(Error::Artifacts(format!(
                "build {tag}: {}",
                detail.message.unwrap_or_default()
            )));
        }
    }
    Ok(tag)
}

pub(crate) fn append(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, path, bytes)
        .map_err(|e| Error::Artifacts(format!("tar {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capd_inplace_simnode::stamp::parse_tail;

    #[test]
    fn mirror_tree_has_every_version_with_matching_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("simnode");
        std::fs::write(&bin, b"\x7fELF fake simnode").unwrap();
        let tree = ensure_mirror_tree(&bin).unwrap();
        assert_eq!(
            ensure_mirror_tree(&bin).unwrap(),
            tree,
            "second call reuses the cache"
        );
        let mut digests = std::collections::HashSet::new();
        for v in MIRROR_VERSIONS {
            for tool in TOOLS {
                let file = tree.join(format!("release/{v}/bin/linux/amd64/{tool}"));
                let body = std::fs::read(&file).unwrap();
                let sha =
                    std::fs::read_to_string(file.with_file_name(format!("{tool}.sha256"))).unwrap();
                assert_eq!(sha, sha256_hex(&body));
                assert!(digests.insert(sha), "every artifact has distinct bytes");
                let stamp = parse_tail(&body).unwrap();
                assert_eq!(stamp.version.to_string(), v);
                assert_eq!(stamp.tool.as_deref(), Some(tool));
            }
        }
    }

    #[test]
    fn padded_tree_has_exact_sizes_zeros_and_matching_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("simnode");
        let plain = b"\x7fELF fake simnode".to_vec();
        std::fs::write(&bin, &plain).unwrap();
        let sizes = ArtifactSizes::Padded {
            kubeadm: 300_000,
            kubelet: 200_001,
            kubectl: 100_000,
        };
        let tree = ensure_sized_mirror_tree(&bin, sizes).unwrap();
        assert_ne!(tree, ensure_mirror_tree(&bin).unwrap());
        for v in MIRROR_VERSIONS {
            for tool in TOOLS {
                let file = tree.join(format!("release/{v}/bin/linux/amd64/{tool}"));
                let body = std::fs::read(&file).unwrap();
                assert_eq!(
                    Some(body.len() as u64),
                    sizes.padded_size(tool),
                    "{v} {tool}"
                );
                let sha =
                    std::fs::read_to_string(file.with_file_name(format!("{tool}.sha256"))).unwrap();
                assert_eq!(sha, sha256_hex(&body), "{v} {tool}");
                let tag = trailer(&Version::parse(v).unwrap(), Some(tool));
                assert!(body.starts_with(&plain) && body.ends_with(&tag));
                assert!(
                    body[plain.len()..body.len() - tag.len()]
                        .iter()
                        .all(|b| *b == 0)
                );
            }
        }
        let too_small = ArtifactSizes::Padded {
            kubeadm: 10,
            kubelet: 10,
            kubectl: 10,
        };
        assert!(ensure_sized_mirror_tree(&bin, too_small).is_err());
    }
}
