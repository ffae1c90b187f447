//! The configuration file, validated into resolved decisions.
//!
//! The rest of the program sees only [`Config`]: every value in it has been checked, every
//! default filled in, every secret read from wherever it lives. Nothing downstream re-validates.
//!
//! # How a file is read
//!
//! 1. The text is parsed into a plain [`toml::Table`]. A syntax error is reported with its line
//!    and column only: toml's own message quotes the offending line, and that line may hold a
//!    secret (an unterminated `api_key = "...` string, say).
//! 2. The table is walked by hand, section by section, so that *every* problem is collected:
//!    unknown sections and keys, wrong types, out-of-range values, missing required settings,
//!    conflicting settings. [`ConfigError::Invalid`] carries one `KEY: why` line per problem.
//! 3. Environment overrides are applied before validation, so a bad value from the
//!    environment is refused the same way (the line names the variable too). A variable that is
//!    set but empty counts as unset.
//!
//! | Environment variable     | Overrides                                   |
//! |--------------------------|---------------------------------------------|
//! | `BRAZE_REST_ENDPOINT`    | `braze.endpoint`                            |
//! | `BRAZE_API_KEY`          | `braze.api_key` and `braze.api_key_file`    |
//! | `AIQ_SYNC_INGEST_TOKEN`  | `ingest.token` and `ingest.token_file`      |
//! | `CREDENTIALS_DIRECTORY`  | base of a relative `*_file` (systemd `LoadCredential=`) |
//!
//! # Paths
//!
//! A relative `data_dir` is resolved against the config file's directory, so the daemon does
//! not depend on its working directory. A relative `api_key_file` / `token_file` is resolved
//! against `$CREDENTIALS_DIRECTORY` when that is set (systemd's `LoadCredential=`), else
//! against the config file's directory.
//!
//! # Secrets
//!
//! The Braze API key and the ingest token are held in [`Secret`], whose `Debug` and `Display`
//! print `<redacted>`, so a `{:?}` of the whole [`Config`] is safe to log. Error lines about a
//! secret name the key, the environment variable or the file, never the value.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};
use tracing::level_filters::LevelFilter;

/// Environment variable that overrides `braze.endpoint`.
pub const ENV_BRAZE_ENDPOINT: &str = "BRAZE_REST_ENDPOINT";
/// Environment variable that overrides `braze.api_key` / `braze.api_key_file`.
pub const ENV_BRAZE_API_KEY: &str = "BRAZE_API_KEY";
/// Environment variable that overrides `ingest.token` / `ingest.token_file`.
pub const ENV_INGEST_TOKEN: &str = "AIQ_SYNC_INGEST_TOKEN";
/// Set by systemd when the unit uses `LoadCredential=`; relative secret files live there.
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

const DEFAULT_DATA_DIR: &str = "/var/lib/aiq-braze-sync";
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Braze's `/users/track` limit: 75 objects per request (in total, or per array on legacy accounts).
const BRAZE_MAX_OBJECTS: u64 = 75;
const DEFAULT_MAX_REQUEST_BYTES: u64 = 3_500_000;
/// Braze refuses request bodies over 4 MB.
const BRAZE_MAX_REQUEST_BYTES: u64 = 4_000_000;
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_MAX_BODY_BYTES: u64 = 16 * MIB;
const DEFAULT_HEADER_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_UPLOAD_IDLE_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_MIN_BODY_RATE: u64 = 1024;
const DEFAULT_BODY_GRACE_MS: u64 = 2_000;
const DEFAULT_UPLOAD_TIMEOUT_MS: u64 = 600_000;
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
const DEFAULT_WORKERS: u64 = 256;
const DEFAULT_BACKOFF_INITIAL_MS: u64 = 500;
const DEFAULT_BACKOFF_MAX_MS: u64 = 60_000;
/// Upper bound for both backoff settings: a day. Longer waits are surely typos, and a bound
/// keeps the backoff arithmetic elsewhere far from overflow.
const MAX_BACKOFF_MS: u64 = 24 * 60 * 60 * 1000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// A token guarding a socket others can reach is at least this long: guessing one is then out
/// of reach even at the daemon's request rate.
const MIN_PUBLIC_TOKEN_CHARS: usize = 32;
/// A week: what was sent is trusted that long, then sent again once.
const DEFAULT_SKIP_UNCHANGED_FOR_S: u64 = 604_800;
/// Ten years: long enough for any sensible trust, short enough for millisecond arithmetic.
const MAX_SKIP_UNCHANGED_FOR_S: u64 = 315_360_000;
/// systemd kills the service 90 s after SIGTERM by default; shutdown must be done before that.
const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 80_000;
const DEFAULT_MAX_RECORDS: u64 = 10_000_000;
const DEFAULT_MAX_DISK_BYTES: u64 = 20 * GIB;
/// Free space kept in reserve on the data disk: enough for delivery to go on removing records
/// and for a rebuild of a drained queue.
const DEFAULT_MIN_FREE_DISK_MB: u64 = 256;
const DEFAULT_CACHE_MB: u64 = 64;
const DEFAULT_COMPACT_MIN_MB: u64 = 256;

/// A secret string (the Braze API key, the ingest token).
///
/// `Debug` and `Display` print `<redacted>`; only [`Secret::expose`] gives the value, so every
/// place that needs the real thing is easy to find. Comparing a presented token against this
/// one should be done in constant time by the caller (`subtle`), not with `==`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret value itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The validated configuration: every decision the daemon and the commands need, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// `data_dir`: where the sled database lives (absolute when read from a file). Owned by the
    /// queue module; commands open it when the daemon is not running.
    pub data_dir: PathBuf,
    /// `[braze]`: where and how to deliver.
    pub braze: BrazeConfig,
    /// `[ingest]`: the HTTP listener ActionIQ posts to.
    pub ingest: IngestConfig,
    /// `[delivery]`: the workers that drain the queue into Braze.
    pub delivery: DeliveryConfig,
    /// `[queue]`: bounds and tuning of the on-disk queue.
    pub queue: QueueConfig,
    /// `[log]`: what the daemon logs.
    pub log: LogConfig,
    /// `[identity]`: which identifier a record that carries both is sent with.
    pub identity: PreferId,
    /// `[update_existing_only]`: whether each kind of record may create a Braze profile.
    pub update_existing_only: UpdateExistingOnly,
    /// Files holding a secret (the config with an inline key or token, a key or token file)
    /// that group or others may read: logged as warnings at start.
    pub exposed: Vec<String>,
    /// Not a key of the file: `run --accept-loss`, starting on damaged queue files.
    pub accept_loss: bool,
}

/// `identity.prefer`: the identifier a `/v1` record or import row that carries both
/// `external_id` and `braze_id` (as ActionIQ's activation does) is sent with. Braze takes
/// exactly one per object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PreferId {
    /// The customer's own stable key: it survives Braze profile merges and can address a
    /// profile Braze creates for it. The default.
    #[default]
    External,
    /// Braze's internal id: it only ever addresses a profile that exists.
    Braze,
}

/// `[update_existing_only]`: the `_update_existing_only` flag sent with each kind of `/v1`
/// record (`true`: Braze only updates profiles it has and creates none). Objects relayed
/// through `/users/track` carry their own flag and are sent as they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateExistingOnly {
    /// Default `true`: an audience flag on a stub profile for a user Braze has never seen
    /// helps no campaign, and the stub counts as a profile.
    pub memberships: bool,
    /// Default `false`: ActionIQ's attributes (email, names, traits) are what a profile is
    /// made of, and a CDP is commonly the system that creates them.
    pub attributes: bool,
    /// Default `false`: an event can be the first thing Braze hears of a user (a sign-up),
    /// and a campaign triggered by it needs the profile.
    pub events: bool,
}

impl Default for UpdateExistingOnly {
    fn default() -> Self {
        UpdateExistingOnly {
            memberships: true,
            attributes: false,
            events: false,
        }
    }
}

/// `[braze]`: the Braze REST API the workers deliver to.
#[derive(Debug, Clone)]
pub struct BrazeConfig {
    /// `braze.endpoint` (env `BRAZE_REST_ENDPOINT`): the instance's REST base URL, such as
    /// `https://rest.iad-01.braze.com`, without a trailing `/`. Always `https://` unless the
    /// host is loopback (a local fake Braze).
    pub endpoint: String,
    /// `braze.api_key` / `braze.api_key_file` (env `BRAZE_API_KEY`): the REST API key, with the
    /// `users.track` and `users.export.ids` permissions.
    pub api_key: Secret,
    /// `braze.request_timeout_ms`: how long one request may take before it counts as a
    /// transient failure and is retried.
    pub request_timeout: Duration,
    /// `braze.max_objects_per_request`: objects per `/users/track` request (at most 75).
    pub max_objects_per_request: usize,
    /// `braze.per_array_limit`: true for legacy accounts whose limit is 75 per array
    /// (`attributes`, `events`, `purchases` each) instead of 75 in total.
    pub per_array_limit: bool,
    /// `braze.max_request_bytes`: the largest request body the batcher builds (Braze refuses
    /// bodies over 4 MB).
    pub max_request_bytes: usize,
}

/// `[ingest]`: the HTTP listener.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// `ingest.listen`: the address the HTTP server binds.
    pub listen: SocketAddr,
    /// `ingest.token` / `ingest.token_file` (env `AIQ_SYNC_INGEST_TOKEN`): the bearer token
    /// every request must carry. Always present when `listen` is not a loopback address.
    pub token: Option<Secret>,
    /// `ingest.max_body_bytes`: larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// `ingest.header_timeout_ms`: a connection that has not sent a whole request head in
    /// this time is closed, so clients that open connections and trickle bytes (slow-loris)
    /// cannot hold them, and their sockets, for ever.
    pub header_timeout: Duration,
    /// `ingest.upload_idle_timeout_ms`: a snapshot upload that sends nothing for this long is
    /// abandoned, so a stalled client cannot hold its split (every other upload of it gets
    /// 409) for as long as its connection lives.
    pub upload_idle_timeout: Duration,
    /// `ingest.min_body_rate` (bytes a second) and `ingest.body_grace_ms`: a body must have
    /// arrived, at any moment, at this average rate after the grace, or the request is
    /// answered 408 and its connection closed. A client trickling a byte every few seconds
    /// would otherwise hold a connection, and a file descriptor, for as long as it likes.
    pub min_body_rate: u64,
    pub body_grace: Duration,
    /// `ingest.upload_timeout_ms`: the longest a snapshot upload may take to arrive whole.
    pub upload_timeout: Duration,
    /// `ingest.max_connections`: connections served at once; more wait to be accepted. The
    /// daemon keeps 256 descriptors of its open-file limit back from them (or half, if the
    /// limit is under 512), whatever this says.
    pub max_connections: usize,
    /// `ingest.export_passthrough`: whether `POST /users/export/ids` is forwarded to Braze.
    /// Off by default: it lets an ingest client read whole Braze profiles with the daemon's
    /// key, which writing records does not need.
    pub export_passthrough: bool,
    /// `ingest.allowed_origins`: origins (`https://app.example.com`) whose browser requests
    /// are taken. A request with any other `Origin` header is refused: browsers send one, and
    /// no page should post to the daemon unless listed.
    pub allowed_origins: Vec<String>,
    /// `ingest.allowed_hosts`: names (`aiq-sync.internal`, with or without a port) a request's
    /// `Host` may carry besides the listen address and, on loopback, `localhost`. Anything
    /// else is refused, so a DNS name rebound to this machine cannot reach the daemon.
    pub allowed_hosts: Vec<String>,
}

/// `[delivery]`: the workers that drain the queue into Braze.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// `delivery.workers`: the most requests to Braze in flight at once. How many are is
    /// adapted to Braze's answers below this (`delivery::concurrency`).
    pub workers: usize,
    /// `delivery.backoff_initial_ms`: the first wait after a transient failure.
    pub backoff_initial: Duration,
    /// `delivery.backoff_max_ms`: the longest wait between retries (never below
    /// `backoff_initial`).
    pub backoff_max: Duration,
    /// `delivery.max_requests_per_second`: a ceiling on requests to Braze across all workers;
    /// `None` means only Braze's own rate-limit headers hold delivery back.
    pub max_requests_per_second: Option<f64>,
    /// `delivery.shutdown_timeout_ms`: how long shutdown waits for in-flight requests before it
    /// abandons them (they stay queued). Under systemd's 90 s stop timeout.
    pub shutdown_timeout: Duration,
    /// `delivery.skip_unchanged_for_s`: an update whose value Braze was last sent is skipped
    /// only if that was sent within this long; `0` (`None`) never skips.
    pub skip_unchanged_for: Option<Duration>,
}

/// `[queue]`: bounds and tuning of the on-disk queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// `queue.max_records`: past this many pending records, ingest answers 503.
    pub max_records: u64,
    /// `queue.max_disk_bytes`: past this size on disk, ingest answers 503.
    pub max_disk_bytes: u64,
    /// `queue.min_free_disk_mb`: below this much free space on the filesystem holding
    /// `data_dir`, ingest answers 503 (a reserve for delivery and rebuilds).
    pub min_free_bytes: u64,
    /// `queue.cache_mb`, in bytes: sled's page cache.
    pub cache_bytes: u64,
    /// `queue.compact_min_mb`, in bytes: the database is rebuilt after a drain only once it is
    /// at least this big.
    pub compact_min_bytes: u64,
}

/// `[log]`: logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `log.level`: the most verbose level logged.
    pub level: LevelFilter,
}

impl Default for IngestConfig {
    /// Loopback on port 8080, no token.
    fn default() -> Self {
        IngestConfig {
            listen: DEFAULT_LISTEN,
            token: None,
            max_body_bytes: to_usize(DEFAULT_MAX_BODY_BYTES),
            header_timeout: Duration::from_millis(DEFAULT_HEADER_TIMEOUT_MS),
            upload_idle_timeout: Duration::from_millis(DEFAULT_UPLOAD_IDLE_TIMEOUT_MS),
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            body_grace: Duration::from_millis(DEFAULT_BODY_GRACE_MS),
            upload_timeout: Duration::from_millis(DEFAULT_UPLOAD_TIMEOUT_MS),
            max_connections: to_usize(DEFAULT_MAX_CONNECTIONS),
            export_passthrough: false,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            workers: to_usize(DEFAULT_WORKERS),
            backoff_initial: Duration::from_millis(DEFAULT_BACKOFF_INITIAL_MS),
            backoff_max: Duration::from_millis(DEFAULT_BACKOFF_MAX_MS),
            max_requests_per_second: None,
            shutdown_timeout: Duration::from_millis(DEFAULT_SHUTDOWN_TIMEOUT_MS),
            skip_unchanged_for: Some(Duration::from_secs(DEFAULT_SKIP_UNCHANGED_FOR_S)),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_records: DEFAULT_MAX_RECORDS,
            max_disk_bytes: DEFAULT_MAX_DISK_BYTES,
            min_free_bytes: DEFAULT_MIN_FREE_DISK_MB * MIB,
            cache_bytes: DEFAULT_CACHE_MB * MIB,
            compact_min_bytes: DEFAULT_COMPACT_MIN_MB * MIB,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LevelFilter::INFO,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8). Nothing was parsed.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML. The message gives the line and column, but never quotes the line
    /// (it may hold a secret).
    #[error("config file is not valid TOML: {0}")]
    Syntax(String),
    /// The file is TOML but some settings are wrong or missing: one `KEY: why` line per problem,
    /// e.g. `delivery.workers: must be between 2 and 1024, got 0`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads and validates the config file at `path`, with overrides from the process
    /// environment.
    ///
    /// Fails when the file cannot be read, is not TOML, or holds any bad or missing setting.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], with environment variables looked up through `env`.
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // Absolute, so that relative paths in the file resolve to absolute ones and nothing later
        // depends on the working directory. `absolute` fails only for an empty path, which the
        // read above has already refused.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = absolute.parent().unwrap_or(Path::new("/"));
        let mut config = Self::from_toml_str(&text, base_dir, env)?;
        config.exposed = exposed_secret_files(&text, &absolute, base_dir, env);
        Ok(config)
    }

    /// Validates config text. Relative paths in it are resolved against `base_dir` (the config
    /// file's directory); environment variables are looked up through `env`.
    ///
    /// Fails with [`ConfigError::Syntax`] when `text` is not TOML, and with
    /// [`ConfigError::Invalid`], listing every problem, when any setting is bad or missing.
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let root: Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(syntax_message(text, &e)))?;
        // "Set but empty" is the shell's way of unsetting (`BRAZE_API_KEY= cmd`), so it counts
        // as unset.
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let ctx = Ctx {
            base_dir,
            env: &env,
        };

        let mut p = Problems::default();
        check_unknown(&root, "", TOP_KEYS, &mut p);
        let top = Section {
            name: "",
            table: Some(&root),
            bad: false,
        };
        let data_dir = read_data_dir(&top, &ctx, &mut p);
        let braze = read_braze(&root, &ctx, &mut p);
        let ingest = read_ingest(&root, &ctx, &mut p);
        let delivery = read_delivery(&root, &mut p);
        let queue = read_queue(&root, &mut p);
        let log = read_log(&root, &mut p);
        let identity = read_identity(&root, &mut p);
        let update_existing_only = read_update_existing_only(&root, &mut p);

        // Every check above has run; the `?`s below only assemble. A `Reported` always comes
        // with a line in `p`, so an `Err` here never yields an empty `Invalid`.
        let config = (|| -> Checked<Config> {
            Ok(Config {
                data_dir: data_dir?,
                braze: braze?,
                ingest: ingest?,
                delivery: delivery?,
                queue: queue?,
                log: log?,
                identity: identity?,
                update_existing_only: update_existing_only?,
                exposed: Vec::new(),
                accept_loss: false,
            })
        })();
        match config {
            Ok(config) if p.0.is_empty() => Ok(config),
            _ => {
                debug_assert!(!p.0.is_empty(), "a value was refused without a reason");
                Err(ConfigError::Invalid(p.0))
            }
        }
    }

    /// A config for tests and the demo: every default, this endpoint, API key and data dir, and
    /// an ingest listener on `127.0.0.1:0` (the caller binds and learns the port) without a
    /// token. Not validated: the caller supplies a loopback endpoint of its own.
    pub fn for_local(data_dir: PathBuf, endpoint: String, api_key: &str) -> Config {
        Config {
            data_dir,
            braze: BrazeConfig {
                endpoint: endpoint.trim_end_matches('/').to_owned(),
                api_key: Secret::new(api_key),
                request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
                max_objects_per_request: to_usize(BRAZE_MAX_OBJECTS),
                per_array_limit: false,
                max_request_bytes: to_usize(DEFAULT_MAX_REQUEST_BYTES),
            },
            ingest: IngestConfig {
                listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                ..IngestConfig::default()
            },
            delivery: DeliveryConfig::default(),
            queue: QueueConfig::default(),
            log: LogConfig::default(),
            identity: PreferId::default(),
            update_existing_only: UpdateExistingOnly::default(),
            exposed: Vec::new(),
            accept_loss: false,
        }
    }
}

mod secrets;
mod sections;
#[cfg(test)]
mod tests;
mod values;
mod walk;

use secrets::*;
use sections::*;
pub use values::is_loopback_ip;
use values::*;
use walk::*;
