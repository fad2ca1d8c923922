//! The real `capd-inplace serve` process for end-to-end tests: HTTPS on a loopback port with a
//! dev CA written into its own cert dir, its own artifact cache dir, plain-HTTP health and metrics
//! ports. It can be SIGKILLed and restarted on the same ports and cert dir (the CA stays, so
//! clients keep trusting it). The process is killed when the value drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no capd-inplace binary next to {0}: build it with `cargo build --bin capd-inplace` (make e2e does)"
    )]
    BinaryNotFound(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("capd-inplace did not become ready within {after:?}; log tail:\n{log}")]
    NotReady { after: Duration, log: String },
    #[error("capd-inplace exited while starting ({status}); log tail:\n{log}")]
    Exited { status: String, log: String },
    #[error("TLS client: {0}")]
    Tls(String),
    #[error("metrics: {0}")]
    Metrics(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// `target/<profile>/capd-inplace`, found from the running test executable (`target/<profile>/deps/x`),
/// or `CAPD_INPLACE_BIN`.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CAPD_INPLACE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(io("locate the test executable"))?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("capd-inplace"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::BinaryNotFound(exe.display().to_string()))
}

/// A free loopback port (bound then released; the process binds it right after).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("read the bound port"))?
        .port())
}

/// Choices for [`ExtensionProcess::start_with`].
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The artifact cache directory; by default a new one in the process dir. A given directory
    /// may hold a cache warmed before; only one process may use it at a time.
    pub artifact_cache_dir: Option<PathBuf>,
    /// More `capd-inplace serve` flags, e.g. `--max-concurrent-upgrades 20`.
    pub extra_args: Vec<String>,
}

/// One `capd-inplace serve` process.
pub struct ExtensionProcess {
    binary: PathBuf,
    dir: tempfile::TempDir,
    artifact_url: String,
    options: ServeOptions,
    port: u16,
    health_port: u16,
    metrics_port: u16,
    child: Option<Child>,
    starts: u32,
}

impl ExtensionProcess {
    /// Starts `capd-inplace serve` with `--artifact-url artifact_url` and waits until it answers.
    pub async fn start(artifact_url: &str) -> Result<ExtensionProcess> {
        Self::start_with(artifact_url, ServeOptions::default()).await
    }

    /// [`ExtensionProcess::start`] with [`ServeOptions`].
    pub async fn start_with(artifact_url: &str, options: ServeOptions) -> Result<ExtensionProcess> {
        let mut process = ExtensionProcess {
            binary: binary()?,
            dir: tempfile::Builder::new()
                .prefix("capd-inplace-e2e-")
                .tempdir()
                .map_err(io("create the process dir"))?,
            artifact_url: artifact_url.to_string(),
            options,
            port: 0,
            health_port: 0,
            metrics_port: 0,
            child: None,
            starts: 0,
        };
        // A port found free may be taken before the process binds it (by any other process's
        // socket, an outgoing connection's included); then the process exits at once, and
        // starts again on other ports.
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            (process.port, process.health_port, process.metrics_port) =
                (free_port()?, free_port()?, free_port()?);
            match process.spawn().await {
                Err(Error::Exited { .. }) if attempt < ATTEMPTS => attempt += 1,
                started => return started.map(|()| process),
            }
        }
    }

    fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("serve-{}.log", self.starts))
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).map_err(io("create the log file"))?;
        let log_err = log.try_clone().map_err(io("clone the log file"))?;
        let cache = self
            .options
            .artifact_cache_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("cache"));
        let child = Command::new(&self.binary)
            .arg("serve")
            .args(["--bind-address", &format!("127.0.0.1:{}", self.port)])
            .arg("--cert-dir")
            .arg(self.cert_dir())
            .arg("--dev-self-signed")
            .args([
                "--health-probe-bind-address",
                &format!("127.0.0.1:{}", self.health_port),
            ])
            .args([
                "--metrics-bind-address",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--artifact-url", &self.artifact_url])
            .arg("--artifact-cache-dir")
            .arg(&cache)
            .args(&self.options.extra_args)
            .env("RUST_LOG", "info")
            // An error the process ends with is printed without a backtrace, which would push the
            // error out of the log's tail (panics keep theirs).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(io(format!("spawn {}", self.binary.display())))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{}/readyz", self.health_port);
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        while start.elapsed() < timeout {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(Error::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if self.cert_dir().join("ca.crt").is_file()
                && let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady {
            after: timeout,
            log: self.log_tail(),
        })
    }

    /// The base URL CAPI would have in `ExtensionConfig.spec.clientConfig.url`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The dev CA PEM (`caBundle`).
    pub fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(self.cert_dir().join("ca.crt")).map_err(io("read ca.crt"))
    }

    /// The running process's id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (no graceful shutdown), and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports, cert dir and cache dir.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let response = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Metrics(e.to_string()))?
            .get(url)
            .send()
            .await
            .map_err(|e| Error::Metrics(e.to_string()))?;
        response
            .text()
            .await
            .map_err(|e| Error::Metrics(e.to_string()))
    }

    /// The last lines of every log of this process (all restarts), for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for start in 1..=self.starts {
            let path = self.dir.path().join(format!("serve-{start}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                out.push_str(&format!(
                    "--- start {start} ---\n{}\n",
                    lines[from..].join("\n")
                ));
            }
        }
        out
    }

    /// The whole log of every start, for assertions on what the process did.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .filter_map(|start| {
                std::fs::read_to_string(self.dir.path().join(format!("serve-{start}.log"))).ok()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ExtensionProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of one Prometheus sample line (`name{labels} value`), 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A reqwest client trusting only `ca_pem` (HTTP/2 and HTTP/1.1 offered, as CAPI's client does).
pub fn https_client(ca_pem: &str) -> Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let certificate = certificate.map_err(|e| Error::Tls(e.to_string()))?;
        roots
            .add(certificate)
            .map_err(|e| Error::Tls(e.to_string()))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        // CAPI's client does not follow redirects.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
}
