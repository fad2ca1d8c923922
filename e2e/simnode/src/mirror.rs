//! `simnode mirror`: a small HTTP/1.1 file server for the artifact tree in dl.k8s.io's layout
//! (`release/<version>/bin/linux/<arch>/<binary>` and `<binary>.sha256`). It answers GET and
//! HEAD with Content-Length, refuses paths that leave the root, and reads `<root>/.delay_ms`
//! on every request so a test can make the mirror slow.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mirror: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Serves `root` on `listen` until the process is killed.
pub fn serve(root: &Path, listen: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(listen).map_err(|source| Error::Listen {
        addr: listen.to_string(),
        source,
    })?;
    eprintln!(
        "simnode mirror: serving {} on {}",
        root.display(),
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    serve_listener(root.to_path_buf(), listener);
    Ok(())
}

pub fn serve_listener(root: PathBuf, listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            if let Err(e) = handle(&root, stream) {
                eprintln!("simnode mirror: {e}");
            }
        });
    }
}

/// Maps a URL path onto the tree, or None when it is not a plain relative path.
pub fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let path = url_path.split(['?', '#']).next()?;
    let rel = Path::new(path.trim_start_matches('/'));
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    if rel.file_name()?.to_string_lossy().starts_with('.') {
        return None;
    }
    Some(root.join(rel))
}

fn handle(root: &Path, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut keep_alive = request_line.trim_end().ends_with("HTTP/1.1");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if header.to_ascii_lowercase().starts_with("connection:")
                && header.to_ascii_lowercase().contains("close")
            {
                keep_alive = false;
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let delay = std::fs::read_to_string(root.join(".delay_ms"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(ms) = delay {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut out = &stream;
        let conn = if keep_alive { "keep-alive" } else { "close" };
        if method != "GET" && method != "HEAD" {
            respond(
                &mut out,
                "405 Method Not Allowed",
                b"method not allowed\n",
                method == "HEAD",
                conn,
            )?;
        } else {
            match resolve(root, target).filter(|p| p.is_file()) {
                Some(file) => {
                    let mut body = Vec::new();
                    std::fs::File::open(&file)?.read_to_end(&mut body)?;
                    respond(&mut out, "200 OK", &body, method == "HEAD", conn)?;
                }
                None => respond(
                    &mut out,
                    "404 Not Found",
                    b"404 page not found\n",
                    method == "HEAD",
                    conn,
                )?,
            }
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

fn respond(
    out: &mut &TcpStream,
    status: &str,
    body: &[u8],
    head: bool,
    conn: &str,
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        body.len()
    )?;
    if !head {
        out.write_all(body)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: &str, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn serves_files_with_length_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("release/v1.31.4/bin/linux/amd64");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("kubeadm.sha256"), "abc123").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || serve_listener(root, listener));

        let ok = get(&addr, "/release/v1.31.4/bin/linux/amd64/kubeadm.sha256");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 6\r\n") && ok.ends_with("\r\n\r\nabc123"));
        assert!(get(&addr, "/release/v9.9.9/bin/linux/amd64/kubeadm").starts_with("HTTP/1.1 404"));
        assert!(get(&addr, "/../etc/passwd").starts_with("HTTP/1.1 404"));
        assert!(get(&addr, "/.delay_ms").starts_with("HTTP/1.1 404"));

        std::fs::write(dir.path().join(".delay_ms"), "300").unwrap();
        let start = std::time::Instant::now();
        assert!(
            get(&addr, "/release/v1.31.4/bin/linux/amd64/kubeadm.sha256")
                .starts_with("HTTP/1.1 200")
        );
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
