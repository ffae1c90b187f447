//! The command line as clap parses it. Decisions live in `Config`; this only names things.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "aiq-braze-sync",
    version,
    about = "Durable ActionIQ -> Braze sync daemon"
)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        default_value = "/etc/aiq-braze-sync/config.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: ingest over HTTP, deliver to Braze. Stops cleanly on SIGTERM/SIGINT.
    Run,
    /// Inspect the queue (asks the running daemon, or opens the database if it is stopped).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Pending and dead-lettered records, the oldest pending age, bytes on disk.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
