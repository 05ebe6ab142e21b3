//! blockrepl's test harness, shared by the integration tests (`tests/it`), the
//! unit tests of `src/db/`, the benchmark (`src/bin/bench/`, run by
//! `scripts/bench`) and the chaos suite.
//!
//! - [`harness`]: NBD servers (nbdkit, qemu-nbd, with their filters) as child
//!   processes on Unix sockets, the `blockrepl` binary run to completion, the
//!   daemon as a child process, a socket proxy, checksums, allocation maps and
//!   nbdkit's request logs.
//! - [`mariadb`]: a private, throwaway MariaDB (or an existing server) and fresh
//!   databases on it.
//! - [`faulty`]: NBD targets that fail or drop flushes (nbdkit `sh` plugins).
//! - [`jobs`]: jobs queued by SQL as an orchestrator does, and their rows.
//! - [`vcsim`]: the vSphere simulator (`tools/vcsim-cbt`) as a child process.
//!
//! It is a crate of its own, a dev-dependency of blockrepl, and deliberately does
//! not depend on blockrepl: the product's unit tests can use it without a
//! dependency cycle, and it drives the product the way an operator does, through
//! the binary, the database and the admin socket. Failures panic with a message
//! naming what failed, as test code does; the benchmark turns a panic into an
//! aborted scenario.

pub mod faulty;
pub mod harness;
pub mod jobs;
pub mod mariadb;
pub mod vcsim;
