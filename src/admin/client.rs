//! The CLI's side of the admin socket: a small blocking HTTP/1.1 client over
//! `std::os::unix::net::UnixStream`, one connection per request
//! (`Connection: close`), so the CLI needs no async runtime.
//!
//! It turns the daemon's JSON errors into [`ClientError::Api`] with the code and
//! message the server chose, and every way of not getting an answer into one line
//! that names the socket. It knows the wire types only as `serde` values; what to
//! print is the CLI's business.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::wire::ErrorBody;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the blockrepl daemon at {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },

    /// The daemon answered with an error.
    #[error("{message} ({code})")]
    Api { status: u16, code: String, message: String },

    #[error("unexpected answer from the daemon at {socket}: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

impl ClientError {
    /// The daemon's error code, if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A raw answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request("GET", path, None)?)
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, ClientError> {
        self.json(self.request("POST", path, Some(body))?)
    }

    /// A successful answer's body as JSON, or the error it carries.
    fn json<T: DeserializeOwned>(&self, r: Response) -> Result<T, ClientError> {
        let r = self.success(r)?;
        serde_json::from_slice(&r.body)
            .map_err(|e| self.protocol(format!("status {} with a body that is not the expected JSON: {e}", r.status)))
    }

    /// `r` if it is a success, else the daemon's error.
    pub fn success(&self, r: Response) -> Result<Response, ClientError> {
        if (200..300).contains(&r.status) {
            return Ok(r);
        }
        match serde_json::from_slice::<ErrorBody>(&r.body) {
            Ok(b) => Err(ClientError::Api { status: r.status, code: b.error.code, message: b.error.message }),
            Err(_) => Err(self.protocol(format!("status {}: {}", r.status, snippet(&r.body)))),
        }
    }

    fn protocol(&self, reason: String) -> ClientError {
        ClientError::Protocol { socket: self.socket.clone(), reason }
    }

    /// Sends one request and reads the whole answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let unreachable = |e: std::io::Error| {
            let reason = match e.kind() {
                std::io::ErrorKind::NotFound => "no such socket (is `blockrepl serve` running?)".to_string(),
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused (is `blockrepl serve` running?)".to_string()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (root and members of the admin group may use it)".to_string()
                }
                _ => e.to_string(),
            };
            ClientError::Unreachable { socket: self.socket.clone(), reason }
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: blockrepl/{}\r\nAccept: application/json\r\n\
             Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        // The daemon may answer before it read everything (a body that is too
        // large), and close: its answer is still there to read.
        let sent = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body));
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        if raw.is_empty() {
            let e = match (sent, read) {
                (Err(e), _) | (_, Err(e)) => e.to_string(),
                _ => "the connection closed without an answer".to_string(),
            };
            return Err(self.protocol(e));
        }
        parse_response(&raw).map_err(|e| self.protocol(e))
    }
}

/// Parses a whole HTTP/1.1 response (status line, headers, a body delimited by
/// Content-Length, chunked encoding, or the end of the connection).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("incomplete HTTP response header")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "HTTP response header is not UTF-8")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: '{}'", snippet(status_line.as_bytes())));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line '{status_line}'"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for l in lines {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse().map_err(|_| format!("bad Content-Length '{v}'"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or_else(|| format!("body ended after {} of {n} bytes", rest.len()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size '{size_text}'"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// The start of a body, on one line, for an error message.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 200 { format!("{}...", one.chars().take(200).collect::<String>()) } else { one }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, status: u16, body: &str) {
        let r = parse_response(raw.as_bytes()).unwrap();
        assert_eq!((r.status, String::from_utf8(r.body).unwrap().as_str()), (status, body), "{raw:?}");
    }

    #[test]
    fn responses_are_parsed_by_length_chunks_or_close() {
        check("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", 200, "{}");
        check("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}trailing", 201, "{}");
        check(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\na;x=1\r\n0123456789\r\n0\r\n\r\n",
            200,
            "abc0123456789",
        );
        check("HTTP/1.0 404 Not Found\r\n\r\nno length", 404, "no length");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}").is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn api_errors_carry_code_and_message() {
        let c = Client::new(Path::new("/nonexistent/admin.sock"));
        let body = br#"{"error":{"code":"not_found","message":"job 'x' not found"}}"#.to_vec();
        let e = c.success(Response { status: 404, body }).unwrap_err();
        assert_eq!(e.to_string(), "job 'x' not found (not_found)");
        assert_eq!(e.code(), Some("not_found"));
        let e = c.success(Response { status: 502, body: b"<html>bad gateway</html>".to_vec() }).unwrap_err();
        assert!(e.to_string().contains("status 502: <html>bad gateway</html>"), "{e}");
    }

    #[test]
    fn a_missing_socket_is_one_clear_line() {
        let e = Client::new(Path::new("/nonexistent/admin.sock")).request("GET", "/api/v1/health", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot reach the blockrepl daemon at /nonexistent/admin.sock: no such socket (is `blockrepl serve` running?)"
        );
    }
}
