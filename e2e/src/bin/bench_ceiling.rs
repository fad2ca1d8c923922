//! The ceiling of the hook-path load test (`scripts/bench-hooks.sh`): the extension's HTTPS stack
//! with nothing of ours on top. Same allocator, TLS library, provider, protocol versions and
//! certificate (the extension's dev certificate), same ALPN (h2 and HTTP/1.1), same server
//! (axum-server on a multi-threaded tokio runtime); every request's body is read whole, as the
//! extension reads it, and answered with the same bytes, read once from a file holding one of the
//! extension's answers. Whatever the extension serves below this server's rate is the cost of our handlers,
//! layers and state.
//!
//! With `--validate-json` it also checks that each body is JSON (serde_json skipping every value,
//! a little cheaper than the extension's strict reading) before the same fixed answer: less than
//! any extension must do with a request, and so above the ceiling of one that reads it at all.
//!
//! `bench-ceiling ADDRESS CERT_DIR RESPONSE_FILE [--validate-json]`, e.g.
//! `bench-ceiling 127.0.0.1:9444 certs answer.json` (`CERT_DIR` holds `tls.crt` and `tls.key`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::IgnoredAny;

/// The extension's allocator (`src/main.rs`), so that the two servers differ only in what runs
/// on top of the stack.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The extension's TLS settings, as `server_config` in `src/hooks/server.rs` builds them (the e2e
/// crate does not link the extension); keep the two in step.
fn tls(cert_dir: &Path) -> anyhow::Result<ServerConfig> {
    let cert = cert_dir.join("tls.crt");
    let key = cert_dir.join("tls.key");
    let certificates = CertificateDer::pem_file_iter(&cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&key).with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (validate_json, args) = match args.as_slice() {
        [rest @ .., flag] if flag == "--validate-json" => (true, rest),
        all => (false, all),
    };
    let [address, cert_dir, response] = args else {
        bail!("usage: bench-ceiling ADDRESS CERT_DIR RESPONSE_FILE [--validate-json]");
    };
    let address: SocketAddr = address.parse().context("ADDRESS must be IP:PORT")?;
    let answer = Bytes::from(std::fs::read(response).with_context(|| format!("read {response}"))?);
    let app = Router::new().fallback(move |body: Bytes| {
        let answer = answer.clone();
        async move {
            if validate_json && serde_json::from_slice::<IgnoredAny>(&body).is_err() {
                return (
                    [(CONTENT_TYPE, "application/json")],
                    Bytes::from_static(b"{}"),
                );
            }
            ([(CONTENT_TYPE, "application/json")], answer)
        }
    });
    let config = RustlsConfig::from_config(Arc::new(tls(Path::new(cert_dir))?));
    eprintln!("bench-ceiling: serving a fixed answer on https://{address}");
    axum_server::bind_rustls(address, config)
        .serve(app.into_make_service())
        .await
        .context("serve")
}
