//! Cutting a database connection that does not answer. The client library can
//! wait forever for a server that stopped answering (a paused or overloaded
//! server, a network path that drops packets), and diesel exposes none of the
//! client's timeout options; so the daemon enforces its deadlines from outside:
//! when a call overruns, the socket of the connection is shut down, the blocked
//! call fails at once with "lost connection", and the caller reconnects later.
//!
//! A connection's socket is one of this process's sockets whose peer is the
//! database server of the URL (the Unix socket path, or the TCP port); the
//! executor and its readers each hold one connection, so each remembers which
//! socket appeared when it connected ([`sockets_to`]) and only that one is cut.
//! This module knows nothing of when to cut; the executor's guard decides.

use std::collections::BTreeSet;
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

/// The sockets of this process, as (descriptor, inode) pairs.
fn sockets() -> Vec<(RawFd, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    dir.flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse::<RawFd>().ok()?;
            let link = std::fs::read_link(entry.path()).ok()?;
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
            Some((fd, inode))
        })
        .collect()
}

fn connected_to(fd: RawFd, peer: &Peer) -> bool {
    getpeername::<SockaddrStorage>(fd).is_ok_and(|addr| addr.family().is_some() && peer.matches(&addr))
}

/// The inodes of this process's sockets connected to `peer`. Taken before and
/// after a connection is made (connections being made one at a time), the new
/// one is that connection's socket: what [`cut_connections`] spares or cuts.
pub fn sockets_to(peer: &Peer) -> BTreeSet<u64> {
    sockets().into_iter().filter(|(fd, _)| connected_to(*fd, peer)).map(|(_, inode)| inode).collect()
}

/// Which of this process's connections to a peer to cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The connection whose socket has this inode.
    One(u64),
    /// Every connection but those of these inodes (the other calls' own): the
    /// connection being made, whose socket is not known yet.
    AllBut(BTreeSet<u64>),
}

/// Shuts down the sockets connected to `peer` that `which` names; returns how
/// many.
pub fn cut_connections(peer: &Peer, which: &Cut) -> usize {
    let mut cut = 0;
    for (fd, inode) in sockets() {
        let chosen = match which {
            Cut::One(one) => inode == *one,
            Cut::AllBut(spared) => !spared.contains(&inode),
        };
        if chosen && connected_to(fd, peer) && shutdown(fd, Shutdown::Both).is_ok() {
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
        let peer = Peer::Unix(db_path.clone());
        let before = sockets_to(&peer);
        let mut sibling = UnixStream::connect(&db_path).unwrap();
        let (_sibling_side, _) = db.accept().unwrap();
        let siblings: BTreeSet<u64> = sockets_to(&peer).difference(&before).copied().collect();
        assert_eq!(siblings.len(), 1, "the new connection's socket is found");
        // A read that would wait forever for a server that never answers.
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            client.read(&mut b)
        });
        let mut cut = 0;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !reader.is_finished() && std::time::Instant::now() < end {
            cut += cut_connections(&peer, &Cut::AllBut(siblings.clone()));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reader.join().unwrap().unwrap(), 0, "the blocked read ended (end of file)");
        assert!(cut >= 1);
        bystander.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let e = bystander.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the other connection is untouched");
        sibling.set_nonblocking(true).unwrap();
        let e = sibling.read(&mut b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the spared connection to the same peer is untouched");
        let sibling_inode = siblings.into_iter().next().unwrap();
        assert_eq!(cut_connections(&peer, &Cut::One(sibling_inode)), 1);
        sibling.set_nonblocking(false).unwrap();
        assert_eq!(sibling.read(&mut b).unwrap(), 0, "the one connection named is cut");
    }
}
