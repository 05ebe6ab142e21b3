//! The one integration-test binary. Everything here runs against real servers
//! started by the shared harness (`testkit/`): nbdkit and qemu-nbd for NBD, a
//! throwaway MariaDB for the database, and `blockrepl` itself as a child process.
//!
//! Modules are grouped by what they need, so `cargo test --test it copy::` runs
//! only the NBD-backed copy tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The shared harness (the `testkit` crate), under the names the modules use.
use testkit::{harness, mariadb, vcsim};

mod admin;
mod adopt;
mod copy;
mod daemon;
mod db;
mod history;
mod limits;
mod orchestrator;
mod peers;
mod planning;
mod trust;
mod vmware;

/// The harness runs the binary cargo built for these tests.
#[test]
fn harness_runs_the_binary_cargo_built() {
    let ours = std::fs::canonicalize(env!("CARGO_BIN_EXE_blockrepl")).unwrap();
    assert_eq!(std::fs::canonicalize(harness::bin()).unwrap(), ours);
}

/// Code is shared through crates, never by including a file by path
/// (ARCHITECTURE.md): the product, the tests and the harness each stand alone.
#[test]
fn no_source_file_is_included_by_path() {
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "testkit/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} source files under {}", files.len(), root.display());
    let attribute = concat!("#[", "path");
    let offenders: Vec<_> = files.iter().filter(|f| std::fs::read_to_string(f).unwrap().contains(attribute)).collect();
    assert!(offenders.is_empty(), "files included by path in: {offenders:?}");
}
