//! blockrepl: disk replication over NBD for migration appliances.
//!
//! The library holds everything; the `blockrepl` binary (`src/main.rs`) only
//! parses the command line and dispatches. Integration tests, the benchmark and
//! the chaos suite use the library directly where that is clearer than running
//! the binary.
//!
//! Layout (see ARCHITECTURE.md):
//! - `engine/`: the copy engine (libnbd FFI, planning, execution, progress)
//! - `cli/`: command-line definitions and the foreground commands
//! - `daemon`, `actors/`, `db/`: `blockrepl serve` and its supervised actors
//! - `admin/`: the admin API on the Unix socket (wire types, server, client)
//! - `vmware/`: the vSphere client, changed areas and per-disk NBD sources
//! - `config`, `telemetry`, `shutdown`, `state`: settings, logging, signals, state machine

pub mod actors;
pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod engine;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod vmware;
