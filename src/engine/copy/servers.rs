//! The server pair: URIs checked before connecting, the first connection to
//! each server (with retries when the caller wants them), and [`Servers`], what
//! the two servers said they can do, checked for fitness and turned into a
//! request size.

use super::report::Request;
use super::{Copier, Event};
use crate::engine::error::{CopyError, Role};
use crate::engine::nbd::{BlockSize, ConnectOptions, Handle, NbdError};
use crate::engine::progress::Stage;
use crate::engine::retry::sleep_unless;
use crate::engine::spec::{Changes, CopySpec, MAX_REQUEST};
use crate::engine::zero;

impl Copier {
    /// Validates the URIs, connects to both servers and checks that they fit.
    pub(super) fn connect_pair(&self, events: &(dyn Fn(Event) + Sync)) -> Result<(Handle, Handle, Servers), CopyError> {
        let spec = &self.spec;
        self.set_stage(Stage::Connecting, events);
        validate_uri(Role::Source, &spec.source)?;
        validate_uri(Role::Target, &spec.target)?;
        let stop = || self.cancel.is_cancelled();
        let contexts: Vec<String> = match &spec.changes {
            Changes::Full => vec!["base:allocation".into()],
            Changes::DirtyBitmap(name) => vec![format!("qemu:dirty-bitmap:{name}")],
            Changes::ChangedAreas(_) => vec![],
        };
        let reporter = self.reporter(events);
        let connect = |role: Role, uri: &str, contexts: &[String]| {
            let opts = ConnectOptions { name: role_name(role), meta_contexts: contexts };
            let policy = spec.tuning.retry;
            let mut failures = 0;
            loop {
                let error = match Handle::connect(uri, &opts, spec.tuning.connect_timeout, &stop) {
                    Ok(h) => return Ok(h),
                    Err(error) => error,
                };
                failures += 1;
                // Nobody listening (yet) is worth waiting for; a refused export or
                // a failed TLS handshake is not.
                let absent = error.is_transient() || error.errno == libc::ENOENT;
                if !spec.tuning.retry_first_connect || !absent || !policy.allows(failures) || stop() {
                    return Err(self.cancelled_or(CopyError::Connect { role, uri: uri.into(), error }));
                }
                reporter.retry(role, Request::whole("connection"), failures, &error);
                reporter.flush(false);
                sleep_unless(policy.delay(failures), &stop);
            }
        };
        let src = connect(Role::Source, &spec.source, &contexts)?;
        let dst = connect(Role::Target, &spec.target, &[])?;
        let servers = Servers::inspect(spec, &src, &dst)?;
        Ok((src, dst, servers))
    }
}

pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// Refuses URIs libnbd would reject with a less helpful message, or that name a
/// transport we do not support.
pub fn validate_uri(role: Role, uri: &str) -> Result<(), CopyError> {
    let bad = |reason: &str| Err(CopyError::BadUri { role, uri: uri.into(), reason: reason.into() });
    let Some((scheme, rest)) = uri.split_once("://") else {
        return bad("expected nbd://, nbds://, nbd+unix:// or nbds+unix://");
    };
    match scheme {
        "nbd" | "nbds" => {
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() {
                return bad("no host");
            }
        }
        "nbd+unix" | "nbds+unix" => {
            let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
            if !query.split('&').any(|kv| kv.starts_with("socket=") && kv.len() > "socket=".len()) {
                return bad("a Unix socket URI needs ?socket=PATH");
            }
        }
        _ => return bad("expected nbd://, nbds://, nbd+unix:// or nbds+unix://"),
    }
    Ok(())
}

/// What the two servers told us at connection time, checked for fitness.
pub(super) struct Servers {
    pub(super) source_size: u64,
    pub(super) base_allocation: bool,
    /// Both servers advertise multi-conn.
    pub(super) multi_conn: bool,
    /// The source does: it takes another connection, for planning.
    pub(super) source_multi_conn: bool,
    pub(super) can_zero: bool,
    pub(super) can_fast_zero: bool,
    pub(super) can_flush: bool,
    /// Largest request both servers accept (0 = no limit advertised).
    pub(super) max_block: u64,
    /// Alignment both servers want (at least 1): every request starts and ends
    /// on a multiple of it.
    pub(super) min_block: u64,
    /// The larger of the servers' preferred request sizes (0 = none advertised).
    pub(super) preferred: u64,
}

impl Servers {
    fn inspect(spec: &CopySpec, src: &Handle, dst: &Handle) -> Result<Self, CopyError> {
        let q = |role: Role, what: &'static str| {
            let uri = if role == Role::Source { &spec.source } else { &spec.target };
            move |error: NbdError| CopyError::Query { role, uri: uri.clone(), what, error }
        };
        let source_size = src.size().map_err(q(Role::Source, "size"))?;
        let target_size = dst.size().map_err(q(Role::Target, "size"))?;
        if target_size < source_size {
            return Err(CopyError::TargetTooSmall { uri: spec.target.clone(), target_size, source_size });
        }
        if dst.is_read_only().map_err(q(Role::Target, "flags"))? {
            return Err(CopyError::TargetReadOnly { uri: spec.target.clone() });
        }
        let base_allocation = match &spec.changes {
            Changes::Full => src.can_meta_context("base:allocation").map_err(q(Role::Source, "meta contexts"))?,
            Changes::DirtyBitmap(name) => {
                let ctx = format!("qemu:dirty-bitmap:{name}");
                if !src.can_meta_context(&ctx).map_err(q(Role::Source, "meta contexts"))? {
                    return Err(CopyError::NoSuchBitmap { uri: spec.source.clone(), name: name.clone() });
                }
                false
            }
            Changes::ChangedAreas(_) => false,
        };
        let max = |h: &Handle, role| h.block_size(BlockSize::Maximum).map_err(q(role, "block size"));
        let min = |h: &Handle, role| h.block_size(BlockSize::Minimum).map_err(q(role, "block size"));
        let max_block = match (max(src, Role::Source)?, max(dst, Role::Target)?) {
            (0, b) | (b, 0) => b,
            (a, b) => a.min(b),
        };
        let min_block = min(src, Role::Source)?.max(min(dst, Role::Target)?).max(1);
        let pref = |h: &Handle, role| h.block_size(BlockSize::Preferred).map_err(q(role, "block size"));
        let preferred = pref(src, Role::Source)?.max(pref(dst, Role::Target)?);
        let can_flush = dst.can_flush().map_err(q(Role::Target, "flags"))?;
        if !can_flush && !spec.allow_no_flush {
            return Err(CopyError::NoFlush { uri: spec.target.clone() });
        }
        let source_multi_conn = src.can_multi_conn().map_err(q(Role::Source, "flags"))?;
        Ok(Self {
            source_size,
            base_allocation,
            multi_conn: source_multi_conn && dst.can_multi_conn().map_err(q(Role::Target, "flags"))?,
            source_multi_conn,
            can_zero: dst.can_zero().map_err(q(Role::Target, "flags"))?,
            can_fast_zero: dst.can_fast_zero().map_err(q(Role::Target, "flags"))?,
            can_flush,
            max_block,
            min_block,
            preferred,
        })
    }

    /// The request size to use: the wish, at least the servers' preferred size,
    /// within their maximum, a multiple of their alignment and of the
    /// zero-detection block where possible.
    pub(super) fn request_size(&self, wanted: usize) -> usize {
        let mut size = wanted.clamp(zero::BLOCK, MAX_REQUEST) as u64;
        size = size.max(self.preferred.min(MAX_REQUEST as u64));
        if self.max_block > 0 {
            size = size.min(self.max_block);
        }
        let align = self.min_block.max(if size >= zero::BLOCK as u64 { zero::BLOCK as u64 } else { 1 });
        ((size / align) * align).max(self.min_block) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked_before_connecting() {
        for ok in [
            "nbd://host/export",
            "nbd://h:10809",
            "nbds://h/e?tls-psk-file=/k",
            "nbd+unix:///e?socket=/s",
            "nbds+unix:///?socket=/s",
        ] {
            assert!(validate_uri(Role::Source, ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/dev/sda",
            "http://h/",
            "nbd:///export",
            "nbd+unix:///export",
            "nbd+unix:///?socket=",
            "nbd+vsock://1",
        ] {
            let e = validate_uri(Role::Target, bad).unwrap_err().to_string();
            assert!(e.starts_with("bad target URI"), "{bad}: {e}");
        }
    }

    #[test]
    fn request_size_respects_server_limits() {
        let s = |max_block, min_block| Servers {
            preferred: 0,
            source_size: 0,
            base_allocation: true,
            multi_conn: false,
            source_multi_conn: false,
            can_zero: true,
            can_fast_zero: false,
            can_flush: true,
            max_block,
            min_block,
        };
        assert_eq!(s(0, 1).request_size(1 << 20), 1 << 20);
        assert_eq!(s(0, 1).request_size(1 << 30), MAX_REQUEST);
        assert_eq!(s(65536, 512).request_size(1 << 20), 65536);
        assert_eq!(s(0, 1).request_size(5000), 4096);
        assert_eq!(s(0, 1).request_size(1), 4096);
    }
}
