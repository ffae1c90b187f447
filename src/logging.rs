//! Logs through `tracing`, to stderr: readable text by default, JSON lines for log shippers
//! (`--log-format json`). Under systemd (journald sets `JOURNAL_STREAM`) text lines carry no
//! timestamp of their own, since the journal stamps every line already. The level can change
//! while running (a reload). This module owns how lines look and which level passes, never
//! what is logged: that is each module's.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Layer, Registry};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with timestamp, level, message and fields.
    Json,
}

/// Changes the level of the installed logger.
#[derive(Clone)]
pub struct LevelHandle(reload::Handle<LevelFilter, Registry>);

impl LevelHandle {
    /// Sets the most verbose level logged from now on.
    pub fn set(&self, level: LevelFilter) -> Result<(), String> {
        self.0.reload(level).map_err(|e| e.to_string())
    }
}

/// Installs the process's logger. Call once, before anything logs.
pub fn init(level: LevelFilter, format: Format) -> LevelHandle {
    let (filter, handle) = reload::Layer::new(level);
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let output = match format {
        Format::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_current_span(false)
            .boxed(),
        Format::Text if under_journald => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .boxed(),
        Format::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
    };
    Registry::default().with(filter).with(output).init();
    LevelHandle(handle)
}
