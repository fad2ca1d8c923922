//! The HTTPS server for the hooks, the plain-HTTP health probes, certificate reload and shutdown.
//!
//! Certificates follow the controller-runtime convention (`<cert-dir>/tls.crt`, `tls.key`) and are
//! re-read every few seconds: when the bytes change (cert-manager rotated them) a new rustls config is
//! swapped in; a half-written or invalid pair is logged and the old config kept. An optional client CA
//! turns on mutual TLS. The crypto provider is always rustls' `ring`, passed explicitly.
//! `--dev-self-signed` writes a throwaway CA and a localhost certificate with rcgen.
//! A connection on which nothing has moved for [`IDLE_TIMEOUT`] is closed.
//! Shutdown stops accepting, then lets in-flight calls finish for a bounded time.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use axum_server::Handle;
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::router::{AppState, router};
use crate::idle::IdleTimeout;

/// Certificate file name in the cert dir (controller-runtime convention).
pub const CERT_FILE: &str = "tls.crt";
/// Key file name in the cert dir.
pub const KEY_FILE: &str = "tls.key";
/// CA file written by [`ensure_dev_certificate`].
pub const DEV_CA_FILE: &str = "ca.crt";

/// What can go wrong starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key")]
    NoKey { path: PathBuf },
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid client CA: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot generate the dev certificate: {0}")]
    DevCertificate(#[from] rcgen::Error),
    #[error("invalid bind address {address:?}: expected HOST:PORT, :PORT or 0 to disable")]
    BindAddress { address: String },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("server failed: {0}")]
    Serve(#[source] io::Error),
    #[error("server task ended unexpectedly")]
    TaskEnded,
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bind_address: SocketAddr,
    pub cert_dir: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub path_prefix: String,
    /// `None` serves no health probes.
    pub health_bind_address: Option<SocketAddr>,
    /// How often the certificate files are re-read.
    pub reload_interval: Duration,
    /// How long in-flight calls may take after shutdown starts.
    pub shutdown_grace: Duration,
    /// How long a connection may stay open with no byte moving either way; see
    /// [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

/// The [`ServeConfig::idle_timeout`] of `serve`. It closes a connection that says nothing after
/// the TLS handshake, stalls in a request, or is left idle between requests, so that whatever
/// reaches the port cannot hold connections for ever. A client that keeps connections for reuse
/// drops idle ones sooner (Go's HTTP client, which CAPI uses, after 90 s, for HTTP/2 as for
/// HTTP/1.1, and it pings idle HTTP/2 connections every 30 s), so it closes first and never sends
/// a request on a connection the server has just closed; one that opens a connection per call
/// leaves the old ones to this timeout. No call takes that long: CAPI waits 30 s at most.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Parses `HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces, IPv4). `localhost` is 127.0.0.1;
/// other names are refused so that no DNS lookup decides where the server listens.
pub fn parse_bind_address(address: &str) -> Result<SocketAddr> {
    let invalid = || Error::BindAddress {
        address: address.to_owned(),
    };
    if let Some(port) = address.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| invalid())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Some(port) = address.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| invalid())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    address.parse().map_err(|_| invalid())
}

/// Like [`parse_bind_address`], but `"0"` (controller-runtime's convention) or `""` disables.
pub fn parse_optional_bind_address(address: &str) -> Result<Option<SocketAddr>> {
    match address {
        "0" | "" => Ok(None),
        _ => parse_bind_address(address).map(Some),
    }
}

/// The files the TLS config is built from.
#[derive(Debug, Clone)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl CertFiles {
    fn new(cert_dir: &Path, client_ca: Option<&Path>) -> Self {
        Self {
            cert: cert_dir.join(CERT_FILE),
            key: cert_dir.join(KEY_FILE),
            client_ca: client_ca.map(Path::to_path_buf),
        }
    }

    /// The current bytes of every file, in a fixed order; compared to detect a rotation.
    async fn read(&self) -> Result<Vec<Vec<u8>>> {
        let mut contents = Vec::with_capacity(3);
        for path in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            let bytes = tokio::fs::read(path).await.map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            contents.push(bytes);
        }
        Ok(contents)
    }

    fn build(&self, contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>> {
        let (cert, key) = (&contents[0], &contents[1]);
        let client_ca = self.client_ca.as_ref().zip(contents.get(2));
        server_config(
            cert,
            key,
            client_ca.map(|(path, bytes)| (path.as_path(), bytes.as_slice())),
            &self.cert,
            &self.key,
        )
    }
}

fn parse_certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(std::result::Result::ok)
        .collect();
    if certificates.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// A rustls server config with the ring provider, h2 + http/1.1, and optional client certificates.
fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca: Option<(&Path, &[u8])>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = parse_certificates(cert_pem, cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| Error::NoKey {
        path: key_path.to_path_buf(),
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some((path, pem)) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in parse_certificates(pem, path)? {
                roots.add(certificate)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certificates, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Re-reads the files every `interval` and swaps in a new config when their bytes change.
async fn reload_certificates(
    files: CertFiles,
    tls: RustlsConfig,
    mut loaded: Vec<Vec<u8>>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let contents = match files.read().await {
            Ok(contents) => contents,
            Err(err) => {
                warn!(error = %err, "certificate reload: keeping the current certificate");
                continue;
            }
        };
        if contents == loaded {
            continue;
        }
        match files.build(&contents) {
            Ok(config) => {
                tls.reload_from_config(config);
                loaded = contents;
                info!(cert = %files.cert.display(), "certificate reloaded");
            }
            // cert-manager writes the files one by one; the next tick sees the complete pair.
            Err(err) => warn!(error = %err, "certificate reload: keeping the current certificate"),
        }
    }
}

/// Where [`ensure_dev_certificate`] left its files.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    pub ca: PathBuf,
    /// False when an existing certificate in the dir was reused.
    pub generated: bool,
}

/// Writes a dev CA (`ca.crt`) and a certificate for `localhost` and `127.0.0.1` signed by it
/// (`tls.crt`, `tls.key`) into `cert_dir`, unless all three already exist: an existing certificate is
/// never overwritten, and the CA stays the same across restarts.
pub fn ensure_dev_certificate(cert_dir: &Path) -> Result<DevCertificate> {
    let ca_path = cert_dir.join(DEV_CA_FILE);
    let cert_path = cert_dir.join(CERT_FILE);
    let key_path = cert_dir.join(KEY_FILE);
    if ca_path.is_file() && cert_path.is_file() && key_path.is_file() {
        return Ok(DevCertificate {
            ca: ca_path,
            generated: false,
        });
    }
    let generated = generate_dev_certificate(&["localhost", "127.0.0.1"])?;
    let write = |path: &Path, contents: &str| {
        std::fs::write(path, contents).map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(cert_dir).map_err(|source| Error::Write {
        path: cert_dir.to_path_buf(),
        source,
    })?;
    write(&ca_path, &generated.ca_pem)?;
    write(&key_path, &generated.key_pem)?;
    restrict_to_owner(&key_path)?;
    write(&cert_path, &generated.cert_pem)?;
    Ok(DevCertificate {
        ca: ca_path,
        generated: true,
    })
}

fn restrict_to_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// PEM text of a generated CA and a server certificate it signed.
#[derive(Debug, Clone)]
pub struct GeneratedCertificate {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a CA and a server certificate for `names` (DNS names or IP addresses).
pub fn generate_dev_certificate(names: &[&str]) -> Result<GeneratedCertificate> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "capd-inplace dev CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>(),
    )?;
    params
        .distinguished_name
        .push(DnType::CommonName, "capd-inplace");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok(GeneratedCertificate {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Hands each accepted TCP connection to TLS as an [`IdleTimeout`] stream, so that the timer
/// covers the handshake, the requests and the idle time between them alike.
#[derive(Debug, Clone, Copy)]
struct IdleAcceptor {
    idle: Duration,
}

impl<S> Accept<TcpStream, S> for IdleAcceptor {
    type Stream = IdleTimeout<TcpStream>;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        std::future::ready(Ok((IdleTimeout::new(stream, self.idle, ()), service)))
    }
}

/// A started server: its addresses, and the tasks behind them.
pub struct Running {
    pub hooks_address: SocketAddr,
    pub health_address: Option<SocketAddr>,
    handle: Handle<SocketAddr>,
    server: JoinHandle<io::Result<()>>,
    health: Option<(JoinHandle<io::Result<()>>, tokio::sync::oneshot::Sender<()>)>,
    reload: JoinHandle<()>,
    ready: Arc<AtomicBool>,
    shutdown_grace: Duration,
}

/// Loads the certificate, binds both listeners and starts serving. `/readyz` answers 200 from the
/// moment the HTTPS listener is up until shutdown starts, then 503.
pub async fn start(config: ServeConfig, state: AppState) -> Result<Running> {
    let files = CertFiles::new(&config.cert_dir, config.client_ca.as_deref());
    let contents = files.read().await?;
    let tls = RustlsConfig::from_config(files.build(&contents)?);
    let reload = tokio::spawn(
        reload_certificates(files, tls.clone(), contents, config.reload_interval)
            .instrument(info_span!("certificate reload")),
    );

    let listener =
        std::net::TcpListener::bind(config.bind_address).map_err(|source| Error::Bind {
            address: config.bind_address,
            source,
        })?;
    listener.set_nonblocking(true).map_err(Error::Serve)?;
    let hooks_address = listener.local_addr().map_err(Error::Serve)?;
    let handle = Handle::new();
    let app = router(state, &config.path_prefix);
    let acceptor = RustlsAcceptor::new(tls).acceptor(IdleAcceptor {
        idle: config.idle_timeout,
    });
    let server = tokio::spawn(
        axum_server::from_tcp(listener)
            .map_err(Error::Serve)?
            .acceptor(acceptor)
            .handle(handle.clone())
            .serve(app.into_make_service())
            .instrument(info_span!("hooks server", address = %hooks_address)),
    );
    info!(address = %hooks_address, prefix = config.path_prefix, "serving hooks over HTTPS");

    let ready = Arc::new(AtomicBool::new(true));
    let (health, health_address) = match config.health_bind_address {
        Some(address) => {
            let (task, bound, stop) = start_health(address, Arc::clone(&ready)).await?;
            (Some((task, stop)), Some(bound))
        }
        None => (None, None),
    };
    Ok(Running {
        hooks_address,
        health_address,
        handle,
        server,
        health,
        reload,
        ready,
        shutdown_grace: config.shutdown_grace,
    })
}

type HealthParts = (
    JoinHandle<io::Result<()>>,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
);

async fn start_health(address: SocketAddr, ready: Arc<AtomicBool>) -> Result<HealthParts> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind { address, source })?;
    let bound = listener.local_addr().map_err(Error::Serve)?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                    }
                }
            }),
        );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        }
        .instrument(info_span!("health probes", address = %bound)),
    );
    info!(address = %bound, "serving health probes over HTTP");
    Ok((task, bound, stop))
}

impl Running {
    /// Serves until `shutdown` resolves, then drains in-flight calls for at most the grace period.
    /// Returns an error if a server stops on its own first.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let outcome = tokio::select! {
            () = shutdown => None,
            ended = &mut self.server => Some(ended),
        };
        self.reload.abort();
        if let Some(ended) = outcome {
            if let Some((task, stop)) = self.health {
                let _ = stop.send(());
                task.abort();
            }
            return match ended {
                Ok(Ok(())) => Err(Error::TaskEnded),
                Ok(Err(err)) => Err(Error::Serve(err)),
                Err(_) => Err(Error::TaskEnded),
            };
        }
        self.ready.store(false, Ordering::Relaxed);
        info!(grace = ?self.shutdown_grace, "shutting down: draining in-flight calls");
        self.handle.graceful_shutdown(Some(self.shutdown_grace));
        // axum-server closes remaining connections at the grace deadline; the extra second only
        // covers the task's own wind-down.
        let drained =
            tokio::time::timeout(self.shutdown_grace + Duration::from_secs(1), self.server).await;
        if let Some((task, stop)) = self.health {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        match drained {
            Ok(Ok(Ok(()))) => {
                info!("shut down");
                Ok(())
            }
            Ok(Ok(Err(err))) => Err(Error::Serve(err)),
            Ok(Err(_)) | Err(_) => Err(Error::TaskEnded),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => info!("received Ctrl-C"),
        () = terminate => info!("received SIGTERM"),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn bind_addresses() {
        let ok = [
            (":9443", "0.0.0.0:9443"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("localhost:8081", "127.0.0.1:8081"),
            ("[::1]:9443", "[::1]:9443"),
        ];
        for (text, expected) in ok {
            assert_eq!(
                parse_bind_address(text).unwrap().to_string(),
                expected,
                "{text}"
            );
        }
        for bad in ["9443", ":http", "example.com:9443", ":99999", ""] {
            assert!(parse_bind_address(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_optional_bind_address("0").unwrap(), None);
        assert!(parse_optional_bind_address(":8081").unwrap().is_some());
    }

    #[tokio::test]
    async fn dev_certificate_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_certificate(dir.path()).unwrap();
        assert!(first.generated);
        let ca = std::fs::read(&first.ca).unwrap();
        let second = ensure_dev_certificate(dir.path()).unwrap();
        assert!(!second.generated);
        assert_eq!(std::fs::read(&second.ca).unwrap(), ca);
        let files = CertFiles::new(dir.path(), None);
        let contents = files.read().await.unwrap();
        files.build(&contents).unwrap();
    }

    #[test]
    fn invalid_pem_is_refused() {
        let generated = generate_dev_certificate(&["localhost"]).unwrap();
        let path = Path::new("tls.crt");
        assert!(matches!(
            server_config(b"junk", generated.key_pem.as_bytes(), None, path, path),
            Err(Error::NoCertificate { .. })
        ));
        assert!(matches!(
            server_config(generated.cert_pem.as_bytes(), b"junk", None, path, path),
            Err(Error::NoKey { .. })
        ));
        assert!(matches!(
            server_config(
                generated.cert_pem.as_bytes(),
                generated.key_pem.as_bytes(),
                Some((path, b"junk")),
                path,
                path
            ),
            Err(Error::NoCertificate { .. })
        ));
    }
}
