//! Logs through `tracing`, to stderr: readable text by default, JSON lines for log shippers
//! (`--log-format json`). Under systemd (journald sets `JOURNAL_STREAM`) every line starts
//! with its syslog priority, `<3>` for errors to `<7>` for debug (sd-daemon(3)), which
//! journald takes off and keeps as the entry's priority, so `journalctl -p warning` shows
//! warnings and errors only; and text lines carry no timestamp of their own, since the
//! journal stamps every line already. The level can change
//! while running (a reload). This module owns how lines look and which level passes, never
//! what is logged: that is each module's.

use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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
        Format::Json if under_journald => fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(Prioritized(
                fmt::format()
                    .json()
                    .with_target(false)
                    .with_current_span(false),
            ))
            .fmt_fields(fmt::format::JsonFields::new())
            .boxed(),
        Format::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_current_span(false)
            .boxed(),
        Format::Text if under_journald => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Prioritized(
                fmt::format()
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            ))
            .boxed(),
        Format::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
    };
    Registry::default().with(filter).with(output).init();
    LevelHandle(handle)
}

/// Writes the event's syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug
/// and trace) before what the inner format writes: the prefix journald reads on a stream.
struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
