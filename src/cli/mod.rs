//! The command line: clap definitions for every subcommand, and the foreground
//! commands that do not need the daemon (`copy`); `serve` hands over to `daemon`,
//! and the admin commands (`admin`) talk to a running daemon over its socket.
//! Each command returns `anyhow::Result`; `main` turns an error into one line on
//! stderr and an exit code.

pub mod admin;
pub mod copy;
pub mod vmware;

use clap::{Parser, Subcommand};

/// Disk replication over NBD for migration appliances.
#[derive(Debug, Parser)]
#[command(name = "blockrepl", version, about, propagate_version = true)]
pub struct Cli {
    /// The daemon's admin socket (for the commands that talk to a running daemon)
    #[arg(
        long = "socket",
        value_name = "PATH",
        global = true,
        env = "BLOCKREPL_SOCKET",
        default_value = "/run/blockrepl/admin.sock"
    )]
    pub socket: std::path::PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy one disk in the foreground (no daemon, no database).
    Copy(copy::CopyArgs),
    /// Run the replication daemon.
    Serve {
        /// Configuration file [default: /etc/blockrepl/blockrepl.toml, if present]
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
    },
    /// Log in to a configured vCenter and list a VM's disks (changes nothing).
    VmwareCheck(vmware::VmwareCheckArgs),
    #[command(flatten)]
    Admin(admin::AdminCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_socket_may_come_before_or_after_the_command() {
        for args in [
            &["blockrepl", "--socket", "/s", "watch", "job-1"][..],
            &["blockrepl", "watch", "--socket", "/s", "job-1"][..],
            &["blockrepl", "watch", "job-1", "--socket", "/s"][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.socket, std::path::Path::new("/s"), "{args:?}");
            assert!(matches!(cli.command, Command::Admin(admin::AdminCommand::Watch { .. })), "{args:?}");
        }
    }
}
