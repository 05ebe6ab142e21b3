//! The VMware side: what the appliance needs from vSphere to copy a VM's disks
//! itself, without an orchestrator doing the VMware work first.
//!
//! - `client.rs`: the control plane, a small SOAP client of vCenter (log in,
//!   find the VM, list its disks, enable CBT, snapshots, changed areas).
//! - `soap.rs`: the wire format (envelopes out, an element tree in, faults).
//! - `tls.rs`: TLS pinned to the configured SHA-256 certificate thumbprint.
//! - `areas.rs`: vCenter's changed areas as the engine's plan input.
//! - `source.rs`: one NBD server per disk (nbdkit's vddk plugin by default), a
//!   child process that is never orphaned.
//! - `error.rs`: [`VmwareError`], with [`VmwareError::is_transient`] for the
//!   caller's retry policy.
//!
//! Nothing here knows about actors, the database or the admin socket: a job's
//! life (which stage runs when, retries, cleanup) is the daemon's business
//! (`actors::job_run` decides, `actors::vsphere` calls), and each piece here is
//! one blocking call it can make from a worker thread.
//!
//! Why this stack: a complete vSphere SDK crate costs about 12 minutes and 8 GB
//! to build here, for the dozen calls we make. The client is instead written
//! against the documented SOAP API with `ureq` 2 (blocking HTTP, small; it takes
//! a ready rustls configuration, which is where the thumbprint pin goes),
//! `rustls` with the `ring` provider (`aws-lc-rs` needs cmake and builds slowly)
//! and `quick-xml` for the answers. Measured: the crates this adds cost about
//! 2.5 CPU-minutes in a clean test build (mostly ring's C code and rustls),
//! so one to one and a half minutes on two cores.

// A few pieces wait for callers outside the tests (`areas::allocated_extents`,
// for when the engine takes a plan from given extents; `Client::about`'s fields).
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

pub mod areas;
pub mod client;
pub mod error;
pub mod soap;
pub mod source;
pub mod tls;

pub use areas::{CopyKind, DiskAreas};
pub use client::{Client, Disk, Endpoint, Vm, VmRef};
pub use error::VmwareError;
pub use source::Template;

use crate::config::Vcenter;

/// Checks one `[vmware.NAME]` section; on error, the key and why.
pub fn validate_vcenter(name: &str, vc: &Vcenter) -> Result<(), (&'static str, String)> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(("", "the name must be 1 to 64 letters, digits, '-' or '_'".into()));
    }
    match url::Url::parse(&vc.url) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some_and(|h| !h.is_empty()) => {
            if !u.username().is_empty() || u.password().is_some() {
                return Err(("url", "must not hold credentials (use user and password_file)".into()));
            }
        }
        Ok(_) => {
            return Err(("url", format!("'{}' must be an https:// URL, e.g. https://vcenter.example/sdk", vc.url)));
        }
        Err(e) => return Err(("url", format!("'{}': {e}", vc.url))),
    }
    if vc.user.trim().is_empty() {
        return Err(("user", "must not be empty".into()));
    }
    if !vc.password_file.is_absolute() {
        return Err(("password_file", "must be an absolute path".into()));
    }
    tls::Thumbprint::parse(&vc.thumbprint).map_err(|e| ("thumbprint", e))?;
    for (key, d) in [
        ("connect_timeout", vc.connect_timeout),
        ("request_timeout", vc.request_timeout),
        ("task_timeout", vc.task_timeout),
    ] {
        if d.is_zero() {
            return Err((key, "must be longer than 0s".into()));
        }
    }
    if let Some(argv) = &vc.nbd_command {
        Template::parse(argv).map_err(|e| ("nbd_command", e))?;
    }
    Ok(())
}

#[cfg(test)]
pub mod testing;

#[cfg(test)]
mod tests;
