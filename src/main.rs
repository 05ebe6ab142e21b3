//! blockrepl: disk replication over NBD for migration appliances.
//!
//! Layout (see ARCHITECTURE.md):
//! - `engine/`: the copy engine (libnbd FFI, planning, execution, progress)
//! - `cli/`: command-line definitions and the foreground commands
//! - `daemon`, `actors/`, `db/`: `blockrepl serve` and its supervised actors
//! - `admin/`: the admin API on the Unix socket (wire types, server, client)
//! - `vmware/`: the vSphere client, changed areas and per-disk NBD sources
//! - `config`, `telemetry`, `shutdown`, `state`: settings, logging, signals, state machine
//!
//! `main` only parses the command line, dispatches, and turns an error into one
//! line on stderr and an exit code.

mod actors;
mod admin;
mod cli;
mod config;
mod daemon;
mod db;
mod engine;
mod shutdown;
mod state;
mod telemetry;
mod vmware;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Copy(args) => cli::copy::run(args),
        cli::Command::Serve { config } => daemon::run(config),
        cli::Command::VmwareCheck(args) => cli::vmware::run(args),
        cli::Command::Admin(cmd) => cli::admin::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockrepl: {e:#}");
            let cancelled = e.downcast_ref::<engine::CopyError>().is_some_and(engine::CopyError::is_cancelled);
            if cancelled { ExitCode::from(130) } else { ExitCode::FAILURE }
        }
    }
}
