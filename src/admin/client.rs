//! The CLI's side of the admin socket: an HTTP/1.1 client (hyper's, over a
//! tokio `UnixStream`, on a small current-thread runtime made per request), one
//! connection per request, so the CLI stays a plain blocking program.
//!
//! It turns the daemon's JSON errors into [`ClientError::Api`] with the code and
//! message the server chose, and every way of not getting an answer into one line
//! that names the socket. It knows the wire types only as `serde` values; what to
//! print is the CLI's business.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
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

    fn unreachable(&self, e: std::io::Error) -> ClientError {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "no such socket (is `blockrepl serve` running?)".to_string(),
            std::io::ErrorKind::ConnectionRefused => "connection refused (is `blockrepl serve` running?)".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (root and members of the admin group may use it)".to_string()
            }
            _ => e.to_string(),
        };
        ClientError::Unreachable { socket: self.socket.clone(), reason }
    }

    /// Sends one request and reads the whole answer, within [`TIMEOUT`].
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| self.protocol(format!("cannot start the client runtime: {e}")))?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::USER_AGENT, concat!("blockrepl/", env!("CARGO_PKG_VERSION")))
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| self.protocol(format!("cannot make the request: {e}")))?;
        runtime.block_on(async {
            match tokio::time::timeout(TIMEOUT, self.exchange(request)).await {
                Ok(answer) => answer,
                Err(_) => Err(self.protocol(format!("no answer within {} s", TIMEOUT.as_secs()))),
            }
        })
    }

    async fn exchange(&self, request: hyper::Request<Full<Bytes>>) -> Result<Response, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| self.unreachable(e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        // The connection task drives the socket; it ends with the exchange.
        let driver = tokio::spawn(connection);
        let answer = sender.send_request(request).await.map_err(|e| self.protocol(describe(&e)))?;
        let status = answer.status().as_u16();
        let body = answer.into_body().collect().await.map_err(|e| self.protocol(describe(&e)))?.to_bytes().to_vec();
        drop(sender);
        driver.abort();
        Ok(Response { status, body })
    }
}

/// hyper's error with its cause, which says what actually happened.
fn describe(e: &hyper::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
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
