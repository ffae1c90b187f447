//! The binary: parse, set up logging, dispatch, print an error once. It never decides anything
//! about records or Braze: every command's work is in the library.

use std::process::ExitCode;

use clap::Parser;

use aiq_braze_sync::check;
use aiq_braze_sync::cli::{Cli, Command, ImportWhat};
use aiq_braze_sync::commands;
use aiq_braze_sync::config::Config;
#[cfg(feature = "demo")]
use aiq_braze_sync::demo;
use aiq_braze_sync::import;
use tracing::level_filters::LevelFilter;

/// sled allocates and frees a node copy per insert; mimalloc serves that churn with far less
/// CPU than glibc's malloc (BENCHMARKS.md, "Durable ingest over HTTP (`benches/ingest.rs`)").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages on its arenas, and each page it gives back and
    // takes again then costs a 2 MiB zeroing fault; without huge pages it holds and zeroes
    // less (BENCHMARKS.md, "End to end beside syslog-ng (the peers bench)"). Best effort: a
    // kernel without the prctl just keeps its default.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // The queue holds personal data and the process holds the API key: what it creates is
    // its owner's alone (directories 0700, files 0600, whatever the caller's umask), and it
    // leaves no core dump behind (systemd's LimitCORE=0 does the same for the service).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    // The open-file soft limit up to the hard one, as most servers do: the soft default
    // (1,024) is a guard for select()-era programs, and the connection cap is derived from
    // it (`http::connection_cap`).
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if files.current < files.maximum {
        let raised = rustix::process::Rlimit {
            current: files.maximum,
            maximum: files.maximum,
        };
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised);
    }
    let cli = Cli::parse();
    aiq_braze_sync::braze::client::install_tls_provider();
    let config = match &cli.command {
        // The demo builds its own configuration: nothing to set up before trying it.
        Command::Demo { .. } => None,
        _ => match Config::load(&cli.config) {
            Ok(c) => Some(c),
            Err(e) => {
                for line in e.to_string().lines() {
                    eprintln!("aiq-braze-sync: config {}: {line}", cli.config.display());
                }
                return ExitCode::from(commands::ExitCode::BadConfig as u8);
            }
        },
    };
    let level = config.as_ref().map_or(LevelFilter::WARN, |c| c.log.level);
    let log_level = aiq_braze_sync::logging::init(level, cli.log_format);
    let runtime = match aiq_braze_sync::daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aiq-braze-sync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (cli.command, config) {
            #[cfg(feature = "demo")]
            (Command::Demo { data, outage_secs }, _) => {
                demo::run(&data, std::time::Duration::from_secs(outage_secs)).await
            }
            #[cfg(not(feature = "demo"))]
            (Command::Demo { .. }, _) => Err(anyhow::anyhow!(
                "this build has no demo: it was built without the `demo` feature"
            )),
            (Command::Run { accept_loss }, Some(mut config)) => {
                config.accept_loss = accept_loss;
                commands::run(config, &cli.config, log_level).await
            }
            (Command::Import { what }, Some(config)) => {
                let (kind, args, empty_cells) = match what {
                    ImportWhat::Memberships(a) => {
                        (import::Kind::Memberships, a, Default::default())
                    }
                    ImportWhat::Events(a) => (import::Kind::Events, a, Default::default()),
                    ImportWhat::Attributes { args, empty_cells } => {
                        (import::Kind::Attributes, args, empty_cells)
                    }
                    ImportWhat::Snapshot {
                        audience,
                        split,
                        file,
                        allow_empty,
                    } => {
                        return import::snapshot(&config, &audience, &split, &file, allow_empty)
                            .await
                    }
                };
                let options = import::Options {
                    kind,
                    file: args.file,
                    format: args.format,
                    skip_bad: args.skip_bad,
                    empty_cells,
                };
                import::run(&config, options).await
            }
            (Command::Check, Some(config)) => Ok(check::run(&config).await.into_result()?),
            (
                Command::Reconcile {
                    audience,
                    split,
                    repair,
                    json,
                },
                Some(config),
            ) => {
                let options = aiq_braze_sync::reconcile::Options {
                    audience,
                    split,
                    repair,
                    json,
                };
                aiq_braze_sync::reconcile::run(&config, options).await
            }
            (Command::Queue { command }, Some(config)) => {
                let (op, json) = commands::QueueOp::from_cli(command);
                commands::queue(config, op, json).await
            }
            (_, None) => unreachable!("every command but demo loaded its configuration above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiq-braze-sync: {e:#}");
            let damaged = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<aiq_braze_sync::queue::QueueError>(),
                    Some(aiq_braze_sync::queue::QueueError::Damaged(_))
                )
            });
            let code = e
                .downcast_ref::<check::Failed>()
                .map(check::Failed::exit_code)
                .or(damaged.then_some(commands::ExitCode::Damaged));
            ExitCode::from(code.unwrap_or(commands::ExitCode::Failure) as u8)
        }
    }
}
