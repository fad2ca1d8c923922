//! The HTTPS server itself: empty bodies on every route, certificate reload, mutual TLS, health
//! probes and graceful shutdown. Everything binds 127.0.0.1:0.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capd_inplace::hooks::server;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use serde_json::Value;

#[tokio::test]
async fn empty_body_on_every_route_is_a_200_failure_with_the_right_kind() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = common::write_certificate(dir.path());
    let server = common::TestServer::start(common::config(dir.path())).await;
    let client = common::client(&certificate.ca_pem, None);
    for (route, kind) in [
        ("discovery", "DiscoveryResponse"),
        (
            "canupdatemachine/can-update-machine",
            "CanUpdateMachineResponse",
        ),
        (
            "canupdatemachineset/can-update-machineset",
            "CanUpdateMachineSetResponse",
        ),
        ("updatemachine/update-machine", "UpdateMachineResponse"),
    ] {
        let response = client
            .post(server.url(&format!("{}/{route}", common::BASE)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{route}");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["kind"], kind, "{route}");
        assert_eq!(body["status"], "Failure", "{route}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn rotated_certificate_is_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = common::write_certificate(dir.path());
    let server = common::TestServer::start(common::config(dir.path())).await;
    let discovery = server.url(&format!("{}/discovery", common::BASE));
    let body =
        r#"{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"DiscoveryRequest"}"#;
    let old_client = common::client(&first.ca_pem, None);
    assert_eq!(
        old_client
            .post(&discovery)
            .body(body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let second = common::write_certificate(dir.path());
    // New connections must see the new certificate within a few reload intervals (100 ms each).
    let new_client = common::client(&second.ca_pem, None);
    let mut served = false;
    for _ in 0..50 {
        if new_client.post(&discovery).body(body).send().await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the rotated certificate was never served");
    // A client trusting only the old CA is now refused (fresh client, so no pooled connection).
    let fresh_old_client = common::client(&first.ca_pem, None);
    assert!(
        fresh_old_client
            .post(&discovery)
            .body(body)
            .send()
            .await
            .is_err()
    );

    // A broken file is ignored: the current certificate stays.
    std::fs::write(dir.path().join(server::CERT_FILE), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let another_client = common::client(&second.ca_pem, None);
    assert_eq!(
        another_client
            .post(&discovery)
            .body(body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn client_ca_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let serving = common::write_certificate(dir.path());
    let client_identity = client_certificate();
    let ca_path = dir.path().join("client-ca.crt");
    std::fs::write(&ca_path, &client_identity.ca_pem).unwrap();
    let mut config = common::config(dir.path());
    config.client_ca = Some(ca_path);
    let server = common::TestServer::start(config).await;
    let url = server.url(&format!("{}/discovery", common::BASE));

    let anonymous = common::client(&serving.ca_pem, None);
    assert!(anonymous.post(&url).body("{}").send().await.is_err());
    let authenticated = common::client(&serving.ca_pem, Some(&client_identity));
    let response = authenticated.post(&url).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await.unwrap();
}

/// A CA and a client certificate it signed, with the clientAuth usage mutual TLS requires.
fn client_certificate() -> server::GeneratedCertificate {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test client CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "capi-controller-manager");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    server::GeneratedCertificate {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test]
async fn health_probes_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let certificate = common::write_certificate(dir.path());
    let server = common::TestServer::start(common::config(dir.path())).await;
    let health = server.health.unwrap();
    // Health probes are plain HTTP; this client's TLS settings are simply unused.
    let plain = common::client(&certificate.ca_pem, None);
    for probe in ["healthz", "readyz"] {
        let response = plain
            .get(format!("http://{health}/{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{probe}");
    }
    let hooks_url = server.url(&format!("{}/discovery", common::BASE));
    server.stop().await.unwrap();
    // After shutdown nothing listens any more.
    let client = common::client(&certificate.ca_pem, None);
    assert!(client.post(&hooks_url).body("{}").send().await.is_err());
    assert!(
        plain
            .get(format!("http://{health}/healthz"))
            .send()
            .await
            .is_err()
    );
}

/// A server whose connections time out after `idle`, and TLS settings for a raw HTTP/1.1 client.
async fn idle_timeout_server(
    dir: &std::path::Path,
    idle: Duration,
) -> (common::TestServer, Arc<rustls::ClientConfig>) {
    let certificate = common::write_certificate(dir);
    let server = common::TestServer::start(server::ServeConfig {
        idle_timeout: idle,
        ..common::config(dir)
    })
    .await;
    let mut tls = common::tls_config(&certificate.ca_pem, None);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    (server, Arc::new(tls))
}

/// A TLS connection to `address` with its handshake done; reads give up after 10 s, which
/// bounds a test whose server never closes.
fn tls_connection(
    address: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let socket = TcpStream::connect(address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = StreamOwned::new(ClientConnection::new(tls, name).unwrap(), socket);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// A client that says nothing after the TLS handshake, or stalls in its headers, is cut off once
/// nothing has moved for the idle timeout, and not before.
#[tokio::test]
async fn a_connection_on_which_nothing_moves_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let (server, tls) = idle_timeout_server(dir.path(), timeout).await;
    let partial_headers = format!(
        "POST {}/discovery HTTP/1.1\r\nHost: localhost\r\n",
        common::BASE
    );
    for sent in [String::new(), partial_headers] {
        let (address, tls, what) = (server.hooks, Arc::clone(&tls), sent.clone());
        let (answer, open_for) = tokio::task::spawn_blocking(move || {
            let mut stream = tls_connection(address, tls);
            stream.write_all(sent.as_bytes()).unwrap();
            stream.flush().unwrap();
            let started = Instant::now();
            let mut byte = [0; 1];
            // A close reads as the end of the stream, or as an error where the server sent no
            // close_notify first; anything read would be an answer.
            let answer = stream.read(&mut byte).ok().filter(|read| *read > 0);
            (answer, started.elapsed())
        })
        .await
        .unwrap();
        assert_eq!(answer, None, "{what:?}: the server answered");
        assert!(
            open_for >= timeout - Duration::from_millis(100) && open_for < Duration::from_secs(5),
            "{what:?}: closed after {open_for:?}, the timeout being {timeout:?}"
        );
    }
    server.stop().await.unwrap();
}

/// A keep-alive connection that asks again before the idle timeout is kept, however long it
/// lives in all.
#[tokio::test]
async fn a_connection_in_use_outlives_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let (server, tls) = idle_timeout_server(dir.path(), timeout).await;
    let body =
        r#"{"apiVersion":"hooks.runtime.cluster.x-k8s.io/v1alpha1","kind":"DiscoveryRequest"}"#;
    let request = format!(
        "POST {}/discovery HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        common::BASE,
        body.len()
    );
    let address = server.hooks;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut stream = tls_connection(address, tls);
        let started = Instant::now();
        let mut statuses = Vec::new();
        // Four calls 350 ms apart: the connection lives twice the timeout.
        for _ in 0..4 {
            stream.write_all(request.as_bytes()).unwrap();
            stream.flush().unwrap();
            statuses.push(read_answer(&mut stream));
            std::thread::sleep(Duration::from_millis(350));
        }
        assert!(started.elapsed() > 2 * timeout);
        statuses
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec!["HTTP/1.1 200 OK"; 4]);
    server.stop().await.unwrap();
}

/// Reads one HTTP/1.1 answer with a Content-Length; returns its status line.
fn read_answer(stream: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|n| n.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    head.lines().next().unwrap().to_owned()
}
