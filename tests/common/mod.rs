//! Helpers shared by the integration tests: CAPD-shaped node containers ([`simnode`]), and for
//! the HTTPS tests a server on 127.0.0.1:0 with a generated certificate, and a
//! reqwest client (rustls with ring) that trusts only the generated CA.

#![allow(clippy::unwrap_used, dead_code)]

pub mod simnode;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capd_inplace::artifacts::{ArtifactCaches, ArtifactSource, FetchConfig};
use capd_inplace::hooks::router::AppState;
use capd_inplace::hooks::server::{self, GeneratedCertificate, Running, ServeConfig};
use capd_inplace::hooks::update_machine::EngineHandler;
use capd_inplace::node::Docker;
use capd_inplace::telemetry::EventSink;
use capd_inplace::telemetry::metrics::Metrics;
use capd_inplace::upgrade::{Engine, Timeouts};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const BASE: &str = "/hooks.runtime.cluster.x-k8s.io/v1alpha1";

/// Writes `tls.crt` / `tls.key` for 127.0.0.1 and localhost into `dir`; returns the PEM texts.
pub fn write_certificate(dir: &Path) -> GeneratedCertificate {
    let generated = server::generate_dev_certificate(&["127.0.0.1", "localhost"]).unwrap();
    // Key first: a reader that sees the new certificate must also see its key.
    std::fs::write(dir.join(server::KEY_FILE), &generated.key_pem).unwrap();
    std::fs::write(dir.join(server::CERT_FILE), &generated.cert_pem).unwrap();
    generated
}

/// A config for 127.0.0.1:0 with fast reload and a short grace period.
pub fn config(cert_dir: &Path) -> ServeConfig {
    ServeConfig {
        bind_address: "127.0.0.1:0".parse().unwrap(),
        cert_dir: cert_dir.to_path_buf(),
        client_ca: None,
        path_prefix: String::new(),
        health_bind_address: Some("127.0.0.1:0".parse().unwrap()),
        reload_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(2),
        idle_timeout: server::IDLE_TIMEOUT,
    }
}

/// A started server and the means to stop it.
pub struct TestServer {
    pub hooks: SocketAddr,
    pub health: Option<SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<server::Result<()>>,
}

/// The production hook state: the engine-backed UpdateMachine, with an artifact cache in
/// `cache_dir` whose source is an empty local mirror (no test reaches the network).
pub async fn engine_state(cache_dir: &Path) -> AppState {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mirror = cache_dir.join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let source = ArtifactSource::parse(&format!("file://{}", mirror.display())).unwrap();
    let caches = ArtifactCaches::open(cache_dir.join("cache"), source, FetchConfig::default())
        .await
        .unwrap();
    let engine = Engine::new(Docker::connect().await.unwrap(), Timeouts::default());
    let metrics = Metrics::new();
    let handler = EngineHandler::new(
        engine,
        caches,
        None,
        metrics.clone(),
        EventSink::disabled(),
        4,
    );
    AppState::new(Arc::new(handler), metrics)
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> Self {
        let state = engine_state(&config.cert_dir.join("state")).await;
        let running: Running = server::start(config, state).await.unwrap();
        let (hooks, health) = (running.hooks_address, running.health_address);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(running.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            hooks,
            health,
            stop,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.hooks.port())
    }

    /// Stops the server and waits for it (bounded).
    pub async fn stop(self) -> server::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
    }
}

/// A client that trusts only `ca_pem`, optionally presenting a client certificate.
pub fn client(ca_pem: &str, identity: Option<&GeneratedCertificate>) -> reqwest::Client {
    let mut tls = tls_config(ca_pem, identity);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// TLS settings that trust only `ca_pem`, optionally presenting a client certificate; no ALPN.
pub fn tls_config(ca_pem: &str, identity: Option<&GeneratedCertificate>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some(identity) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}
