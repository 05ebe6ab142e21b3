//! The `blockrepl` binary: parses the command line, dispatches, and turns an
//! error into one line on stderr and an exit code. Everything else is in the
//! library (`src/lib.rs`).

use std::process::ExitCode;

use blockrepl::{cli, daemon, engine};
use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Copy(args) => cli::copy::run(args),
        cli::Command::Serve { config } => daemon::run(config),
        cli::Command::VmwareCheck(args) => cli::vmware::run(args),
        cli::Command::Admin(cmd) => cli::admin::run(cmd, &cli.socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockrepl: {e:#}");
            if e.downcast_ref::<engine::CopyError>().is_some_and(engine::CopyError::is_cancelled) {
                ExitCode::from(130)
            } else if e.downcast_ref::<daemon::Unfixable>().is_some() {
                ExitCode::from(daemon::EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
