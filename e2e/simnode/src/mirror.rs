//! `simnode mirror`: a small HTTP/1.1 file server for the artifact tree in dl.k8s.io's layout
//! (`release/<version>/bin/linux/<arch>/<binary>` and `<binary>.sha256`). It answers GET and
//! HEAD with Content-Length, streams file bodies from disk (artifacts padded to real sizes are
//! tens of megabytes), refuses paths that leave the root, and reads `<root>/.delay_ms` on every
//! request so a test can make the mirror slow. Every answer is logged as one [`Served`] line with
//! the body bytes actually written, so a benchmark can count what clients read from the mirror.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
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

const LOG_PREFIX: &str = "simnode mirror: served ";
/// Bytes read from disk and written to the socket at a time.
const COPY_BUFFER: usize = 256 * 1024;

/// One answered request: `simnode mirror: served <method> <target> <status> <n> bytes`, where n
/// counts the body bytes written to the socket (0 for HEAD, fewer than the file if the client
/// went away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub target: String,
    pub status: u16,
    pub body_bytes: u64,
}

impl Served {
    pub fn log_line(&self) -> String {
        // Methods and targets come from whitespace-split request lines, so they hold no spaces;
        // an empty one is logged as "-" to keep the line's field count fixed.
        let field = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        format!(
            "{LOG_PREFIX}{} {} {} {} bytes",
            field(&self.method),
            field(&self.target),
            self.status,
            self.body_bytes
        )
    }

    /// The inverse of [`Served::log_line`]; None for any other line.
    pub fn parse(line: &str) -> Option<Served> {
        let rest = line.trim_end().strip_prefix(LOG_PREFIX)?;
        let fields: Vec<&str> = rest.split(' ').collect();
        match fields.as_slice() {
            [method, target, status, bytes, "bytes"] => Some(Served {
                method: method.to_string(),
                target: target.to_string(),
                status: status.parse().ok()?,
                body_bytes: bytes.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// Serves `root` on `listen` until the process is killed, logging every answer on stderr.
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
    serve_listener(root.to_path_buf(), listener, |served| {
        eprintln!("{}", served.log_line())
    });
    Ok(())
}

/// Serves `root` on `listener`, one thread per connection, calling `on_served` after each answer.
pub fn serve_listener(
    root: PathBuf,
    listener: TcpListener,
    on_served: impl Fn(&Served) + Send + Sync + 'static,
) {
    let on_served = Arc::new(on_served);
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        let on_served = on_served.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            if let Err(e) = handle(&root, stream, on_served.as_ref()) {
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

fn handle(root: &Path, stream: TcpStream, on_served: &dyn Fn(&Served)) -> std::io::Result<()> {
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
        let head = method == "HEAD";
        let conn = if keep_alive { "keep-alive" } else { "close" };
        let mut served = Served {
            method: method.to_string(),
            target: target.to_string(),
            status: 200,
            body_bytes: 0,
        };
        let result = if method != "GET" && !head {
            served.status = 405;
            respond(&stream, &mut served, b"method not allowed\n", head, conn)
        } else if let Some(file) = resolve(root, target).filter(|p| p.is_file()) {
            send_file(&stream, &mut served, &file, head, conn)
        } else {
            served.status = 404;
            respond(&stream, &mut served, b"404 page not found\n", head, conn)
        };
        on_served(&served);
        result?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn headers(mut out: &TcpStream, status: u16, length: u64, conn: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\nConnection: {conn}\r\n\r\n"
    )
}

fn respond(
    mut out: &TcpStream,
    served: &mut Served,
    body: &[u8],
    head: bool,
    conn: &str,
) -> std::io::Result<()> {
    headers(out, served.status, body.len() as u64, conn)?;
    if !head {
        out.write_all(body)?;
        served.body_bytes = body.len() as u64;
    }
    out.flush()
}

/// Streams `path` as the body, counting in `served` what reached the socket even if the client
/// goes away midway.
fn send_file(
    mut out: &TcpStream,
    served: &mut Served,
    path: &Path,
    head: bool,
    conn: &str,
) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    headers(out, served.status, length, conn)?;
    if head {
        return out.flush();
    }
    let mut body = file.take(length);
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = body.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        out.write_all(&buffer[..n])?;
        served.body_bytes += n as u64;
    }
    if served.body_bytes != length {
        // The header promised `length` bytes; closing is the only honest answer left.
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} shrank while it was served", path.display()),
        ));
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Mutex;

    fn request(addr: &str, method: &str, path: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut bytes = Vec::new();
        s.read_to_end(&mut bytes).unwrap();
        bytes
    }

    fn get(addr: &str, path: &str) -> String {
        String::from_utf8_lossy(&request(addr, "GET", path)).into_owned()
    }

    fn start(root: PathBuf) -> (String, Arc<Mutex<Vec<Served>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            serve_listener(root, listener, move |s| {
                sink.lock().unwrap().push(s.clone())
            })
        });
        (addr, log)
    }

    #[test]
    fn serves_files_with_length_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("release/v1.31.4/bin/linux/amd64");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("kubeadm.sha256"), "abc123").unwrap();
        let (addr, _) = start(dir.path().to_path_buf());

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

    #[test]
    fn large_files_stream_whole_and_every_answer_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..3 * COPY_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big"), &body).unwrap();
        let (addr, log) = start(dir.path().to_path_buf());

        let response = request(&addr, "GET", "/big");
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&response[..split]);
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert_eq!(&response[split..], body.as_slice());
        let head_only = request(&addr, "HEAD", "/big");
        assert!(head_only.ends_with(b"\r\n\r\n"));
        request(&addr, "GET", "/missing");
        request(&addr, "POST", "/big");

        let served = log.lock().unwrap().clone();
        let summary: Vec<(&str, u16, u64)> = served
            .iter()
            .map(|s| (s.method.as_str(), s.status, s.body_bytes))
            .collect();
        assert_eq!(
            summary,
            [
                ("GET", 200, body.len() as u64),
                ("HEAD", 200, 0),
                ("GET", 404, 19),
                ("POST", 405, 19),
            ]
        );
        for s in &served {
            assert_eq!(Served::parse(&s.log_line()).as_ref(), Some(s));
        }
    }

    #[test]
    fn log_lines_parse_back_and_other_lines_do_not() {
        let odd = Served {
            method: String::new(),
            target: String::new(),
            status: 405,
            body_bytes: 19,
        };
        assert_eq!(odd.log_line(), "simnode mirror: served - - 405 19 bytes");
        assert_eq!(Served::parse(&odd.log_line()).unwrap().status, 405);
        assert_eq!(
            Served::parse("simnode mirror: serving /srv on 0.0.0.0:8080"),
            None
        );
        assert_eq!(
            Served::parse("simnode mirror: served GET /x 200 many bytes"),
            None
        );
    }
}
