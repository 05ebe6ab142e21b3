//! The one integration-test binary. Everything here runs against real servers
//! started by the harness: nbdkit and qemu-nbd for NBD, a throwaway MariaDB for the
//! database, and `blockrepl` itself as a child process.
//!
//! Modules are grouped by what they need, so `cargo test --test it copy::` runs
//! only the NBD-backed copy tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;
mod mariadb;
mod vcsim;

mod admin;
mod copy;
mod daemon;
mod db;
mod peers;
mod trust;
mod vmware;
