//! Cutting a database connection that does not answer. The client library can
//! wait forever for a server that stopped answering (a paused or overloaded
//! server, a network path that drops packets), and diesel exposes none of the
//! client's timeout options; so the daemon enforces its deadlines from outside:
//! when a call overruns, the socket of the connection is shut down, the blocked
//! call fails at once with "lost connection", and the caller reconnects later.
//!
//! The connection's socket is found as the socket of this process whose peer is
//! the database server of the URL: the Unix socket path, or the TCP port. Only
//! the DbWriter's executor talks to the database, so that socket is its own.
//! This module knows nothing of when to cut; the executor's guard decides.

use std::os::fd::RawFd;
use std::path::PathBuf;

use nix::sys::socket::{AddressFamily, Shutdown, SockaddrLike, SockaddrStorage, getpeername, shutdown};

/// Where the client library connects for a URL (as diesel and the MariaDB
/// client read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Unix(PathBuf),
    Tcp(u16),
}

/// The client library's socket for `localhost` without `unix_socket=`.
const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";

impl Peer {
    pub fn of(url: &str) -> Option<Peer> {
        let u = url::Url::parse(url).ok()?;
        if let Some((_, path)) = u.query_pairs().find(|(k, _)| k == "unix_socket") {
            return Some(Peer::Unix(PathBuf::from(path.into_owned())));
        }
        if u.host_str() == Some("localhost") {
            return Some(Peer::Unix(PathBuf::from(DEFAULT_SOCKET)));
        }
        Some(Peer::Tcp(u.port().unwrap_or(3306)))
    }

    fn matches(&self, addr: &SockaddrStorage) -> bool {
        match self {
            Peer::Unix(path) => addr.as_unix_addr().and_then(|u| u.path()).is_some_and(|p| p == path),
            // `1.2.3.4:3306` or `[::1]:3306`.
            Peer::Tcp(port) => {
                matches!(addr.family(), Some(AddressFamily::Inet | AddressFamily::Inet6))
                    && addr.to_string().rsplit(':').next() == Some(port.to_string().as_str())
            }
        }
    }
}

/// Shuts down every socket of this process connected to `peer`; returns how many.
pub fn cut_connections(peer: &Peer) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    let mut cut = 0;
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        if let Ok(addr) = getpeername::<SockaddrStorage>(fd)
            && addr.family().is_some()
            && peer.matches(&addr)
            && shutdown(fd, Shutdown::Both).is_ok()
        {
            cut += 1;
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    #[test]
    fn the_peer_is_read_from_the_url() {
        assert_eq!(
            Peer::of("mysql://u:p@localhost/db?unix_socket=/tmp/m.sock"),
            Some(Peer::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(Peer::of("mysql://u@localhost/db"), Some(Peer::Unix(DEFAULT_SOCKET.into())));
        assert_eq!(Peer::of("mysql://u@db.example:3307/db"), Some(Peer::Tcp(3307)));
        assert_eq!(Peer::of("mysql://u@10.0.0.5/db"), Some(Peer::Tcp(3306)));
        assert_eq!(Peer::of("not a url"), None);
    }

    #[test]
    fn only_connections_to_the_peer_are_cut_and_a_blocked_read_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (db_path, other_path) = (dir.path().join("db.sock"), dir.path().join("other.sock"));
        let (db, other) = (UnixListener::bind(&db_path).unwrap(), UnixListener::bind(&other_path).unwrap());
        let mut client = UnixStream::connect(&db_path).unwrap();
        let mut bystander = UnixStream::connect(&other_path).unwrap();
        let (_server_side, _) = db.accept().unwrap();
        let (_other_side, _) = other.accept().unwrap();
        // A read that would wait forever for a server that never answers.
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            client.read(&mut b)
        });
        let mut cut = 0;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !reader.is_finished() && std::time::Instant::now() < end {
            cut += cut_connections(&Peer::Unix(db_path.clone()));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reader.join().unwrap().unwrap(), 0, "the blocked read ended (end of file)");
        assert!(cut >= 1);
        bystander.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let e = bystander.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the other connection is untouched");
    }
}
