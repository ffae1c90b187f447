//! The command line as clap parses it. It owns the names of commands and flags; the
//! configuration's decisions live in `Config`, never here.

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
    /// How log lines are written: readable text, or JSON objects for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::logging::Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: ingest over HTTP, deliver to Braze. Stops cleanly on SIGTERM/SIGINT.
    Run {
        /// Start even if queue files are damaged (cut short, deleted, unreadable): what they
        /// lost is logged, counted in aiq_braze_sync_queue_lost_total, and given up. Without
        /// it the daemon refuses to start on damage and names the files. Use once, after deciding not to
        /// restore a backup. Under systemd: `systemctl set-environment
        /// AIQ_SYNC_ACCEPT_LOSS=1`, restart, then `systemctl unset-environment
        /// AIQ_SYNC_ACCEPT_LOSS`.
        #[arg(long, env = "AIQ_SYNC_ACCEPT_LOSS", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
        accept_loss: bool,
    },
    /// See it work: a local stand-in for Braze, the daemon, and the sample data in data/.
    /// Needs no configuration file.
    Demo {
        /// Where the sample exports (audience_export.csv, events.ndjson) are.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Seconds the stand-in Braze answers 503 at the start, to show retries (0: none).
        #[arg(long, default_value_t = 3)]
        outage_secs: u64,
    },
    /// Queue an ActionIQ export (CSV with a header row, or NDJSON; `-` for stdin). Every row
    /// is checked first: a file with a bad row queues nothing unless --skip-bad.
    Import {
        #[command(subcommand)]
        what: ImportWhat,
    },
    /// Prove the setup against Braze: the endpoint, the API key and both permissions.
    ///
    /// Checks that the endpoint answers, that Braze accepts the API key, and that the key holds
    /// the users.track and users.export.ids permissions. Changes no user's data: it sends an
    /// update-only write and a lookup for a random synthetic user that does not exist. Prints
    /// one line per step; each failure says what to fix.
    ///
    /// Exit codes: 0 all good; 1 anything else; 2 config invalid; 3 endpoint unreachable;
    /// 4 key rejected (401); 5 a permission missing (403); 6 endpoint wrong (404).
    Check,
    /// Compare what Braze holds for a split's members with what it was sent, and repair it.
    ///
    /// Reads the members of the split's last snapshot, looks each up in Braze through
    /// /users/export/ids (50 ids a call, within that endpoint's rate limit, with a progress
    /// line on stderr), and lists those whose AIQ_<audience>_<split> is not true: no profile,
    /// attribute missing, or another value. With --repair, queues `true` for each of them, past
    /// the skip of unchanged values, through the running daemon or straight into the stopped
    /// one's database. Members known by braze_id alone are not checked.
    ///
    /// Exit codes: 0 no drift left (none found, or every repair queued); 1 drift found and not
    /// repaired, or another failure; 2 config invalid; 3 Braze unreachable; 4 key rejected
    /// (401); 5 users.export.ids permission missing (403); 6 endpoint wrong (404).
    ///
    /// Example: aiq-braze-sync --config /etc/aiq-braze-sync/config.toml reconcile --audience 1042 --split 1 --repair
    Reconcile {
        /// The audience id, as in AIQ_<audience>_<split>.
        #[arg(long)]
        audience: String,
        /// The split id.
        #[arg(long)]
        split: String,
        /// Queue the right value for every member that differs (default: only report).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON (every differing member) instead of a summary.
        #[arg(long)]
        json: bool,
    },
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
    /// The oldest pending records, in the order they were accepted.
    Peek {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Dead-lettered records, with the reason Braze gave.
    Dead {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put dead records back in the queue (an update superseded by a newer one is dropped).
    RetryDead {
        #[command(flatten)]
        which: Which,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead records for good.
    PurgeDead {
        #[command(flatten)]
        which: Which,
        #[arg(long)]
        json: bool,
    },
}

/// `--all` or a list of record ids, never both, never neither.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// Every dead record.
    #[arg(long)]
    pub all: bool,
    /// Record ids, as `queue dead` shows them.
    pub ids: Vec<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ImportWhat {
    /// Audience memberships: audience_id, split_id, external_id or braze_id, member, time.
    Memberships(ImportArgs),
    /// Events: name, external_id or braze_id, time, properties (CSV: other columns too).
    Events(ImportArgs),
    /// Custom attributes: external_id or braze_id, then one column per attribute, typed in
    /// the header as name:string|number|boolean|date|array (NDJSON: as /v1/attributes).
    Attributes {
        #[command(flatten)]
        args: ImportArgs,
        /// What an empty CSV cell means: skip (leave the attribute alone) or unset (null).
        #[arg(long, value_enum, default_value = "skip")]
        empty_cells: crate::import::EmptyCells,
    },
    /// A split's whole membership (one external_id or braze_id per row): only who entered
    /// and who left since the last snapshot is queued.
    Snapshot {
        #[arg(long)]
        audience: String,
        #[arg(long)]
        split: String,
        /// The member list, or `-` for stdin.
        file: PathBuf,
        /// An empty list empties the split only with this flag.
        #[arg(long)]
        allow_empty: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The export file, or `-` for stdin.
    pub file: PathBuf,
    /// csv or ndjson; guessed from the extension (or the first byte) when left out.
    #[arg(long, value_enum)]
    pub format: Option<crate::import::Format>,
    /// Queue the good rows and list the bad ones, instead of refusing the whole file.
    #[arg(long)]
    pub skip_bad: bool,
}
