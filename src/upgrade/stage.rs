//! The stage step: the target version's kubeadm, kubelet and kubectl placed under the journal
//! directory of a node and verified there, without touching anything that runs. An upgrade runs
//! it first; `capd-inplace stage` runs it alone, ahead of a maintenance window.

use tracing::warn;

use super::journal::Paths;
use super::run::{Source, Timeouts, next_answer, parse_version, stdout_of, version_command};
use super::{Error, Result};
use crate::artifacts::{Arch, ArtifactCache, Binary, KubeBinaries};
use crate::node::{Batch, Command, DockerNode, ExecOutput, NodeExec, UploadFile};
use crate::version::KubeVersion;

/// The stage step on one node.
pub(super) struct Staging<'a> {
    pub(super) node: DockerNode,
    pub(super) version: KubeVersion,
    pub(super) source: &'a Source,
    pub(super) paths: Paths,
    pub(super) arch: Arch,
    pub(super) timeouts: &'a Timeouts,
    /// Expected sha256 of each staged binary, once known.
    digests: Vec<(Binary, String)>,
    /// The verified binaries in the host cache, once fetched (upload and served cache).
    cached: Option<KubeBinaries>,
    /// The answer to [`Staging::hash_command`] from the batch that took the node's lease: what
    /// was staged before this attempt did anything.
    staged_when_leased: ExecOutput,
    /// The staged binaries' answers to [`ASKED_VERSIONS`], when the node fetched them itself:
    /// asked in the same exec as the fetch, right after it.
    versions_after_fetch: Option<Vec<ExecOutput>>,
    /// A command to ask last in the step's final exec, and then its answer: how `capd-inplace
    /// stage` releases the node's lease without an exec of its own.
    ask_last: Option<Command>,
    last_answer: Option<ExecOutput>,
}

/// The staged binaries asked their version before they are installed.
const ASKED_VERSIONS: [Binary; 2] = [Binary::Kubeadm, Binary::Kubelet];

impl<'a> Staging<'a> {
    pub(super) fn new(
        node: DockerNode,
        version: KubeVersion,
        source: &'a Source,
        arch: Arch,
        timeouts: &'a Timeouts,
        staged_when_leased: ExecOutput,
    ) -> Staging<'a> {
        Staging {
            node,
            version,
            source,
            paths: Paths::new(&version),
            arch,
            timeouts,
            digests: Vec::new(),
            cached: None,
            staged_when_leased,
            versions_after_fetch: None,
            ask_last: None,
            last_answer: None,
        }
    }

    /// Asks `command` last in the step's final exec, if the step runs one (not when it was
    /// already done); [`Staging::last_answer`] then holds its answer.
    pub(super) fn ask_last(&mut self, command: Command) {
        self.ask_last = Some(command);
    }

    /// The answer to the command given to [`Staging::ask_last`], once asked.
    pub(super) fn last_answer(&self) -> Option<&ExecOutput> {
        self.last_answer.as_ref()
    }

    /// Runs `batch` with the [`Staging::ask_last`] command as its last question, which it keeps
    /// apart from the answers it returns.
    async fn run_final(&mut self, mut batch: Batch) -> Result<Vec<ExecOutput>> {
        if let Some(last) = &self.ask_last {
            batch.push(last);
        }
        let asked = batch.len();
        let mut answers = batch.run(&self.node).await?;
        // Fewer answers: a step failed, and no question was asked.
        if self.ask_last.is_some() && answers.len() == asked {
            self.last_answer = answers.pop();
        }
        Ok(answers)
    }

    /// Whether every binary was already staged with its published digest when the lease was
    /// taken. Asked once, before this attempt stages anything.
    pub(super) async fn is_done(&mut self) -> Result<bool> {
        self.expected_digests().await?;
        Ok(self.mismatched(&self.staged_when_leased).is_empty())
    }

    /// The sha256 each binary must have: from the verified host cache, or from the published
    /// `.sha256` files fetched by the node itself.
    pub(super) async fn expected_digests(&mut self) -> Result<()> {
        if !self.digests.is_empty() {
            return Ok(());
        }
        match self.source {
            Source::Upload(cache) | Source::Serve { cache, .. } => {
                // The three downloads of a cold cache run in parallel.
                let cached = cache
                    .fetch_all(&self.version.to_string(), self.arch)
                    .await?;
                self.digests = Binary::ALL
                    .into_iter()
                    .map(|binary| (binary, cached.get(binary).sha256.clone()))
                    .collect();
                self.cached = Some(cached);
            }
            Source::FetchInNode { base_url } => {
                let urls: Vec<(Binary, String)> = Binary::ALL
                    .into_iter()
                    .map(|binary| {
                        let url = release_url(base_url, &self.version, self.arch, binary);
                        (binary, format!("{url}.sha256"))
                    })
                    .collect();
                let mut batch = Batch::new(self.timeouts.command);
                for (_, url) in &urls {
                    batch.push(&curl(url));
                }
                let answers = batch.run(&self.node).await?;
                for ((binary, url), answer) in urls.into_iter().zip(answers) {
                    let published = stdout_of(answer, self.node.name())?;
                    let digest = parse_published_digest(&published).ok_or_else(|| {
                        Error::Verify(format!("{url} does not hold a sha256 digest"))
                    })?;
                    self.digests.push((binary, digest));
                }
            }
        }
        Ok(())
    }

    /// Prints the digest of each staged binary of the version `paths` belong to.
    pub(super) fn hash_command(paths: &Paths) -> Command {
        hash_command(Binary::ALL.map(|binary| paths.staged(binary.name())))
    }

    /// The expected digests that were not printed for their staged binaries. A missing file
    /// prints no line, so it does not match.
    fn mismatched(&self, output: &ExecOutput) -> Vec<&str> {
        let stdout = String::from_utf8_lossy(&output.stdout);
        self.digests
            .iter()
            .filter(|(binary, digest)| {
                let path = self.paths.staged(binary.name());
                !stdout
                    .lines()
                    .any(|line| hash_line(line) == Some((digest.as_str(), path.as_str())))
            })
            .map(|(_, digest)| digest.as_str())
            .collect()
    }

    /// The staged bytes must match their published digests, and be the right programs: each
    /// staged kubeadm and kubelet is asked its version too. An upload is hashed here, in one
    /// batch with the questions. Binaries the node fetched itself were hashed there before they
    /// were renamed into place ([`FETCH_VERIFIED`]), and asked their versions in the same exec.
    pub(super) async fn verify(&mut self) -> Result<()> {
        let v = self.version;
        let mut answers = match self.versions_after_fetch.take() {
            Some(answers) => answers.into_iter(),
            None => {
                let mut batch = Batch::new(self.timeouts.command);
                batch.push(&Self::hash_command(&self.paths));
                for binary in ASKED_VERSIONS {
                    batch.push(&version_command(binary, &self.paths.staged(binary.name())));
                }
                let mut answers = self.run_final(batch).await?.into_iter();
                let wrong = self.mismatched(&next_answer(&mut answers));
                if !wrong.is_empty() {
                    self.distrust(&wrong).await;
                    return Err(Error::Verify(
                        "a staged binary does not match its published sha256".into(),
                    ));
                }
                answers
            }
        };
        for binary in ASKED_VERSIONS {
            let reported = parse_version(binary, next_answer(&mut answers), self.node.name())?;
            if reported != v {
                return Err(Error::Verify(format!(
                    "the staged {} reports {reported}, not {v}",
                    binary.name()
                )));
            }
        }
        Ok(())
    }

    /// Bytes from the cache that hash wrong in the node may come from a cached blob damaged
    /// where its file status cannot show it: the cache forgets these digests' records, so the
    /// next attempt hashes those blobs again.
    async fn distrust(&self, digests: &[&str]) {
        if let Source::Upload(cache) | Source::Serve { cache, .. } = self.source {
            for digest in digests {
                if let Err(e) = cache.distrust(digest).await {
                    warn!(error = %e, digest, "could not forget the cache's record");
                }
            }
        }
    }

    /// Places the binaries under the journal directory: uploaded from the verified cache, or
    /// fetched by the node itself (from the artifact URL, or from this process's server of the
    /// cache) and checked before they are moved into place.
    pub(super) async fn stage(&mut self) -> Result<()> {
        match self.source.clone() {
            Source::Upload(cache) => {
                let cached = self.cached(&cache).await?;
                let files = Binary::ALL
                    .into_iter()
                    .map(|binary| {
                        UploadFile::from_path(binary.name(), cached.get(binary).path.clone(), 0o755)
                    })
                    .collect();
                self.node.upload(&self.paths.bin_dir(), files).await?;
                Ok(())
            }
            Source::FetchInNode { base_url } => {
                let downloads = self
                    .digests
                    .iter()
                    .map(|(binary, digest)| {
                        let url = release_url(&base_url, &self.version, self.arch, *binary);
                        (*binary, url, digest.clone())
                    })
                    .collect();
                self.fetch_in_node(downloads).await
            }
            Source::Serve { cache, server } => {
                let cached = self.cached(&cache).await?;
                let downloads = Binary::ALL
                    .into_iter()
                    .map(|binary| {
                        let artifact = cached.get(binary);
                        (binary, server.offer(artifact), artifact.sha256.clone())
                    })
                    .collect();
                let fetched = self.fetch_in_node(downloads).await;
                if let Err(Error::ChecksumMismatch { expected, .. }) = &fetched {
                    self.distrust(&[expected.as_str()]).await;
                }
                fetched
            }
        }
    }

    /// The verified binaries from the host cache: those [`Staging::expected_digests`] fetched, or
    /// fetched now.
    async fn cached(&mut self, cache: &ArtifactCache) -> Result<KubeBinaries> {
        Ok(match self.cached.take() {
            Some(cached) => cached,
            None => {
                cache
                    .fetch_all(&self.version.to_string(), self.arch)
                    .await?
            }
        })
    }

    /// Runs [`FETCH_VERIFIED`] in the node for `(binary, url, sha256)` downloads, and asks the
    /// fetched binaries their versions in the same exec.
    async fn fetch_in_node(&mut self, downloads: Vec<(Binary, String, String)>) -> Result<()> {
        let bin_dir = self.paths.bin_dir();
        let mut fetch = Command::new(["bash", "-c", FETCH_VERIFIED, "bash", &bin_dir]);
        for (binary, url, digest) in &downloads {
            fetch = fetch.args([
                url.clone(),
                self.paths.staged(binary.name()),
                digest.clone(),
            ]);
        }
        // Each download gets the budget it had when each was an exec of its own.
        let mut batch =
            Batch::new(self.timeouts.kubeadm * downloads.len() as u32 + self.timeouts.command);
        batch.push_step(&fetch);
        for binary in ASKED_VERSIONS {
            batch.push(&version_command(binary, &self.paths.staged(binary.name())));
        }
        let mut answers = self.run_final(batch).await?.into_iter();
        let fetched = next_answer(&mut answers);
        if fetched.exit_code == FETCHED_WRONG_BYTES {
            let stdout = String::from_utf8_lossy(&fetched.stdout);
            let named = stdout
                .lines()
                .find_map(|line| line.strip_prefix(WRONG_BYTES));
            if let Some((_, url, expected)) = downloads
                .into_iter()
                .find(|(_, url, _)| Some(url.as_str()) == named)
            {
                return Err(Error::ChecksumMismatch { url, expected });
            }
        }
        if fetched.exit_code == DOWNLOAD_FAILED {
            let stderr = String::from_utf8_lossy(&fetched.stderr);
            if let Some((url, said)) = failed_download(&stderr) {
                return Err(Error::Download { url, said });
            }
        }
        if fetched.exit_code != 0 {
            return Err(fetched.into_error(self.node.name()).into());
        }
        self.versions_after_fetch = Some(answers.collect());
        Ok(())
    }
}

/// The URL of the download [`FETCH_VERIFIED`] reports as failed, and the last line curl printed
/// about it, from the script's stderr.
fn failed_download(stderr: &str) -> Option<(String, String)> {
    let (_, from_last) = stderr.rsplit_once(CANNOT_DOWNLOAD)?;
    let (url, after) = from_last.split_once('\n').unwrap_or((from_last, ""));
    let said = after
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("curl failed");
    Some((url.to_string(), said.to_string()))
}

/// A shell function, `sha256 FILE`, that prints `<sha256 hex> <path>` (see [`hash_line`]).
/// OpenSSL's sha256 uses the CPU's SHA extensions where coreutils' `sha256sum` does not: about
/// four times faster on 200 MB of binaries, which is most of what verifying a stage costs.
/// `sha256sum` where there is no openssl. A macro, so that scripts can `concat!` it.
macro_rules! sha256_function {
    () => {
        r#"sha256() {
  if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r "$1"; else sha256sum -- "$1"; fi
}
"#
    };
}

/// Downloads binaries in the node, each kept only if its sha256 is the published one, in one bash
/// exec. Arguments: the directory, then `<url> <staged path> <sha256>` per binary.
///
/// The downloads run at once, each into `<staged path>.part` and hashed as soon as it is
/// complete, so that on a node with a core to spare the transfers and the hashing overlap. Once
/// all are done, every digest is checked before any file is renamed into place, so a partial or
/// wrong file is never staged. On any failure, and when `timeout` ends the exec, the script
/// removes every file it wrote and exits:
/// - with [`FETCHED_WRONG_BYTES`] after printing [`WRONG_BYTES`] and the URL on stdout, when a
///   download has another digest than expected;
/// - with [`DOWNLOAD_FAILED`] after printing [`CANNOT_DOWNLOAD`], the URL, and curl's own
///   message on stderr, when a download fails;
/// - with another code, and a message on stderr, when it cannot hash or place a file.
const FETCH_VERIFIED: &str = concat!(
    sha256_function!(),
    r#"set -u
dir=$1
shift
mkdir -p "$dir" || exit 1
urls=() staged=() digests=() jobs=()
while [ $# -ge 3 ]; do
  urls+=("$1") staged+=("$2") digests+=("$3")
  shift 3
done
if [ $# -ne 0 ]; then
  echo "stray arguments: $*" >&2
  exit 2
fi
discard() {
  kill $(jobs -pr) 2>/dev/null
  wait
  for s in "${staged[@]}"; do rm -f "$s.part" "$s.part.sum" "$s.part.err"; done
}
trap 'discard; exit 124' TERM INT
for i in "${!urls[@]}"; do
  part="${staged[i]}.part"
  (
    curl -fsSL --retry 3 --connect-timeout 10 -o "$part" "${urls[i]}" 2>"$part.err" || exit 102
    sha256 "$part" >"$part.sum"
  ) &
  jobs+=($!)
done
for i in "${!urls[@]}"; do
  wait "${jobs[i]}"
  rc=$?
  part="${staged[i]}.part"
  if [ "$rc" -eq 102 ]; then
    printf 'cannot download: %s\n' "${urls[i]}" >&2
    cat "$part.err" >&2
    discard
    exit 102
  fi
  sum=
  read -r sum _ <"$part.sum" 2>/dev/null
  if [ "$rc" -ne 0 ] || [ "${#sum}" -ne 64 ]; then
    printf 'cannot hash %s\n' "$part" >&2
    discard
    exit 1
  fi
  if [ "$sum" != "${digests[i]}" ]; then
    printf 'wrong sha256: %s\n' "${urls[i]}"
    discard
    exit 101
  fi
done
for i in "${!urls[@]}"; do
  part="${staged[i]}.part"
  if ! chmod 0755 "$part" || ! mv -f "$part" "${staged[i]}"; then
    printf 'cannot place %s\n' "${staged[i]}" >&2
    discard
    exit 1
  fi
  rm -f "$part.sum" "$part.err"
done
"#
);

/// What [`FETCH_VERIFIED`] prints on stderr before the URL of a download that failed, and
/// curl's message.
const CANNOT_DOWNLOAD: &str = "cannot download: ";

/// What [`FETCH_VERIFIED`] prints before the URL of a download with the wrong sha256.
const WRONG_BYTES: &str = "wrong sha256: ";

/// [`FETCH_VERIFIED`]'s exit code for a download whose sha256 is not the published one; above
/// every exit code curl uses.
const FETCHED_WRONG_BYTES: i64 = 101;

/// [`FETCH_VERIFIED`]'s exit code for a download that failed.
const DOWNLOAD_FAILED: i64 = 102;

/// Prints `<sha256 hex> <path>` for each existing file among its arguments.
const HASH_FILES: &str = concat!(
    sha256_function!(),
    r#"for f do
  [ -f "$f" ] || continue
  sha256 "$f"
done
"#
);

fn hash_command<S: Into<String>>(paths: impl IntoIterator<Item = S>) -> Command {
    Command::new(["sh", "-c", HASH_FILES, "sh"]).args(paths)
}

/// `(digest, path)` from a line of `openssl dgst -sha256 -r` (`<hex> *<path>`) or `sha256sum`
/// (`<hex>  <path>`).
fn hash_line(line: &str) -> Option<(&str, &str)> {
    let (digest, rest) = line.split_once(' ')?;
    let path = rest.strip_prefix('*').or_else(|| rest.strip_prefix(' '))?;
    Some((digest, path))
}

/// Prints what `url` holds, with the same curl options as [`FETCH_VERIFIED`].
fn curl(url: &str) -> Command {
    Command::new([
        "curl",
        "-fsSL",
        "--retry",
        "3",
        "--connect-timeout",
        "10",
        url,
    ])
}

fn release_url(base: &str, version: &KubeVersion, arch: Arch, binary: Binary) -> String {
    format!(
        "{}/{version}/bin/linux/{}/{}",
        base.trim_end_matches('/'),
        arch.name(),
        binary.name()
    )
}

/// dl.k8s.io publishes the bare hex digest; `sha256sum` output (`<hex>  <name>`) is accepted too.
fn parse_published_digest(text: &str) -> Option<String> {
    let digest = text.split_whitespace().next()?.to_ascii_lowercase();
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_lines_of_both_tools() {
        let hex = "b".repeat(64);
        let path = "/var/lib/capd-inplace/v1.32.3/bin/kubeadm";
        assert_eq!(
            hash_line(&format!("{hex} *{path}")),
            Some((hex.as_str(), path))
        );
        assert_eq!(
            hash_line(&format!("{hex}  {path}")),
            Some((hex.as_str(), path))
        );
        assert_eq!(hash_line(&format!("{hex}{path}")), None);
        assert_eq!(hash_line(""), None);
    }

    /// Runs [`HASH_FILES`] with the host's `sh` on `files`, with `path` as PATH.
    fn hash_files_on_host(path: &std::ffi::OsStr, files: &[&std::path::Path]) -> String {
        let output = std::process::Command::new("/bin/sh")
            .args(["-c", HASH_FILES, "sh"])
            .args(files)
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn hash_files_prints_the_same_digests_with_or_without_openssl() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kubeadm");
        std::fs::write(&file, b"a staged binary").unwrap();
        let expected = hex::encode(Sha256::digest(b"a staged binary"));
        let missing = dir.path().join("missing");
        // A PATH whose only program is coreutils' sha256sum: the fallback branch.
        let only_sha256sum = dir.path().join("bin");
        std::fs::create_dir(&only_sha256sum).unwrap();
        let sha256sum = ["/usr/bin/sha256sum", "/bin/sha256sum"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("coreutils sha256sum on the host");
        std::os::unix::fs::symlink(sha256sum, only_sha256sum.join("sha256sum")).unwrap();
        let host_path = std::env::var_os("PATH").unwrap_or_default();
        for path in [only_sha256sum.as_os_str(), host_path.as_os_str()] {
            let printed = hash_files_on_host(path, &[&file, &missing]);
            let lines: Vec<_> = printed.lines().filter_map(hash_line).collect();
            // A missing file prints nothing; the existing one its digest and path.
            assert_eq!(
                lines,
                [(expected.as_str(), file.to_str().unwrap())],
                "{path:?}"
            );
        }
    }

    /// Runs [`FETCH_VERIFIED`] with the host's bash, a `curl` that copies from `mirror` (by the
    /// URL's last segment; a missing file is a failed download that leaves a partial one), and
    /// `(url, staged path, sha256)` per binary.
    fn fetch_verified_on_host(
        mirror: &std::path::Path,
        dir: &std::path::Path,
        binaries: &[(&str, &std::path::Path, &str)],
    ) -> std::process::Output {
        fetch_verified_command(mirror, dir, binaries)
            .output()
            .unwrap()
    }

    /// [`fetch_verified_on_host`], not started. A URL ending in `slow` makes the fake curl write
    /// a partial file and hang.
    fn fetch_verified_command(
        mirror: &std::path::Path,
        dir: &std::path::Path,
        binaries: &[(&str, &std::path::Path, &str)],
    ) -> std::process::Command {
        use std::os::unix::fs::PermissionsExt;
        let fake = mirror.join("fake-bin");
        std::fs::create_dir_all(&fake).unwrap();
        let curl = fake.join("curl");
        std::fs::write(
            &curl,
            "#!/bin/sh\nfor url; do :; done\n\
             while [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n\
             [ \"${url##*/}\" = slow ] && { echo partial > \"$out\"; exec sleep 30; }\n\
             cp \"$MIRROR/${url##*/}\" \"$out\" 2>/dev/null && exit 0\n\
             echo partial > \"$out\"; echo 'the fake curl failed' >&2; exit 22\n",
        )
        .unwrap();
        std::fs::set_permissions(&curl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            fake.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = std::process::Command::new("bash");
        command.args(["-c", FETCH_VERIFIED, "bash"]).arg(dir);
        for (url, staged, digest) in binaries {
            command.arg(url).arg(staged).arg(digest);
        }
        command.env("PATH", path).env("MIRROR", mirror);
        command
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn fetched_binaries_are_staged_only_with_their_published_digest() {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::PermissionsExt;
        let mirror = tempfile::tempdir().unwrap();
        std::fs::write(mirror.path().join("kubeadm"), b"kubeadm bytes").unwrap();
        std::fs::write(mirror.path().join("kubelet"), b"kubelet bytes").unwrap();
        let kubeadm_sum = hex::encode(Sha256::digest(b"kubeadm bytes"));
        let kubelet_sum = hex::encode(Sha256::digest(b"kubelet bytes"));
        let node = tempfile::tempdir().unwrap();
        let dir = node.path().join("v1.32.3/bin");
        let (kubeadm, kubelet) = (dir.join("kubeadm"), dir.join("kubelet"));
        let url = |name: &str| format!("http://mirror/v1.32.3/bin/linux/amd64/{name}");
        let nothing: Vec<String> = Vec::new();

        // The first download has other bytes than published: it is named, and neither it nor
        // the right one after it is staged; no partial, digest or error file is left.
        let wrong = "0".repeat(64);
        let output = fetch_verified_on_host(
            mirror.path(),
            &dir,
            &[
                (&url("kubeadm"), &kubeadm, &wrong),
                (&url("kubelet"), &kubelet, &kubelet_sum),
            ],
        );
        assert_eq!(output.status.code(), Some(FETCHED_WRONG_BYTES as i32));
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("{WRONG_BYTES}{}", url("kubeadm"))
        );
        assert_eq!(listing(&dir), nothing);

        // A download that fails (the second, after the first was fetched and hashed) fails the
        // script, which names it with curl's message and leaves nothing.
        let output = fetch_verified_on_host(
            mirror.path(),
            &dir,
            &[
                (&url("kubeadm"), &kubeadm, &kubeadm_sum),
                (&url("kubectl"), &dir.join("kubectl"), &kubeadm_sum),
            ],
        );
        assert_eq!(output.status.code(), Some(DOWNLOAD_FAILED as i32));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            failed_download(&stderr),
            Some((url("kubectl"), "the fake curl failed".to_string())),
            "{stderr}"
        );
        assert_eq!(listing(&dir), nothing);

        // Arguments that are not whole triples are refused before anything is fetched.
        let output = std::process::Command::new("bash")
            .args(["-c", FETCH_VERIFIED, "bash"])
            .arg(&dir)
            .args([url("kubeadm").as_str(), "only-a-path"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert_eq!(listing(&dir), nothing);

        // Right digests: staged, executable, nothing else left.
        let output = fetch_verified_on_host(
            mirror.path(),
            &dir,
            &[
                (&url("kubeadm"), &kubeadm, &kubeadm_sum),
                (&url("kubelet"), &kubelet, &kubelet_sum),
            ],
        );
        assert!(output.status.success(), "{output:?}");
        for staged in [&kubeadm, &kubelet] {
            let mode = std::fs::metadata(staged).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{}", staged.display());
        }
        assert_eq!(std::fs::read(&kubelet).unwrap(), b"kubelet bytes");
        assert_eq!(listing(&dir), ["kubeadm", "kubelet"]);
    }

    #[test]
    fn a_fetch_ended_by_its_timeout_leaves_nothing() {
        use std::os::unix::process::CommandExt;
        let mirror = tempfile::tempdir().unwrap();
        let node = tempfile::tempdir().unwrap();
        let dir = node.path().join("v1.32.3/bin");
        let sum = "0".repeat(64);
        // A process group of its own, as coreutils `timeout` gives the command it runs.
        let mut child = fetch_verified_command(
            mirror.path(),
            &dir,
            &[("http://mirror/slow", &dir.join("kubelet"), &sum)],
        )
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let part = dir.join("kubelet.part");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !part.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the fake curl never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // What coreutils `timeout` sends when the exec's time is up: TERM to the whole group,
        // the fake curl included.
        let group = format!("-{}", child.id());
        let status = std::process::Command::new("kill")
            .args(["-TERM", "--", &group])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(child.wait().unwrap().code(), Some(124));
        let left: Vec<String> = listing(&dir);
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_failed_download_is_named_with_what_curl_said() {
        let stderr = "cannot download: http://a/kubelet\n\
                      curl: (7) Failed to connect to a port 80\n";
        assert_eq!(
            failed_download(stderr),
            Some((
                "http://a/kubelet".to_string(),
                "curl: (7) Failed to connect to a port 80".to_string()
            ))
        );
        assert_eq!(
            failed_download("cannot download: http://a/kubeadm\n"),
            Some(("http://a/kubeadm".to_string(), "curl failed".to_string()))
        );
        assert_eq!(failed_download("cannot place /x/kubeadm\n"), None);
    }

    #[test]
    fn published_digests() {
        let hex = "a".repeat(64);
        assert_eq!(
            parse_published_digest(&format!("{hex}\n")),
            Some(hex.clone())
        );
        assert_eq!(
            parse_published_digest(&format!("{hex}  kubeadm\n")),
            Some(hex.clone())
        );
        assert_eq!(parse_published_digest("<html>not found</html>"), None);
        assert_eq!(parse_published_digest(""), None);
    }

    #[test]
    fn release_urls_follow_dl_k8s_io() {
        let v: KubeVersion = "v1.32.3".parse().unwrap();
        assert_eq!(
            release_url(
                "http://127.0.0.1:8080/release/",
                &v,
                Arch::Amd64,
                Binary::Kubelet
            ),
            "http://127.0.0.1:8080/release/v1.32.3/bin/linux/amd64/kubelet"
        );
    }
}
