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

// ---------------------------------------------------------------------------------------------
// Reading the sections
// ---------------------------------------------------------------------------------------------

const TOP_KEYS: &[&str] = &[
    "data_dir",
    "braze",
    "ingest",
    "delivery",
    "queue",
    "log",
    "identity",
    "update_existing_only",
];
const IDENTITY_KEYS: &[&str] = &["prefer"];
const UPDATE_EXISTING_ONLY_KEYS: &[&str] = &["memberships", "attributes", "events"];
const BRAZE_KEYS: &[&str] = &[
    "endpoint",
    "api_key",
    "api_key_file",
    "request_timeout_ms",
    "max_objects_per_request",
    "per_array_limit",
    "max_request_bytes",
];
const INGEST_KEYS: &[&str] = &[
    "listen",
    "token",
    "token_file",
    "max_body_bytes",
    "header_timeout_ms",
    "upload_idle_timeout_ms",
    "min_body_rate",
    "body_grace_ms",
    "upload_timeout_ms",
    "max_connections",
    "export_passthrough",
    "allowed_origins",
    "allowed_hosts",
];
const DELIVERY_KEYS: &[&str] = &[
    "workers",
    "backoff_initial_ms",
    "backoff_max_ms",
    "max_requests_per_second",
    "shutdown_timeout_ms",
    "skip_unchanged_for_s",
];
const QUEUE_KEYS: &[&str] = &[
    "max_records",
    "max_disk_bytes",
    "min_free_disk_mb",
    "cache_mb",
    "compact_min_mb",
];
const LOG_KEYS: &[&str] = &["level"];

/// What the section readers need besides the table.
struct Ctx<'a> {
    /// The config file's directory: relative paths are resolved against it.
    base_dir: &'a Path,
    /// Environment lookup; empty values already filtered out.
    env: &'a dyn Fn(&str) -> Option<String>,
}

fn read_data_dir(top: &Section<'_>, ctx: &Ctx<'_>, p: &mut Problems) -> Checked<PathBuf> {
    match top.string(p, "data_dir")? {
        None => Ok(PathBuf::from(DEFAULT_DATA_DIR)),
        Some(dir) if dir.trim().is_empty() => Err(p.report("data_dir", "must not be empty")),
        Some(dir) => Ok(ctx.base_dir.join(dir)),
    }
}

fn read_braze(root: &Table, ctx: &Ctx<'_>, p: &mut Problems) -> Checked<BrazeConfig> {
    let s = Section::open(root, "braze", BRAZE_KEYS, p);

    let endpoint_in_file = s.string(p, "endpoint");
    let endpoint = match (ctx.env)(ENV_BRAZE_ENDPOINT) {
        Some(url) => check_endpoint(&url)
            .map_err(|why| p.report(&format!("braze.endpoint (from {ENV_BRAZE_ENDPOINT})"), why)),
        None => endpoint_in_file.and_then(|url| match url {
            Some(url) => check_endpoint(url).map_err(|why| p.report("braze.endpoint", why)),
            None => Err(p.report(
                "braze.endpoint",
                format!(
                    "required: the REST endpoint of your Braze instance, such as \
                     https://rest.iad-01.braze.com (or set {ENV_BRAZE_ENDPOINT})"
                ),
            )),
        }),
    };

    let api_key = read_secret(&s, ctx, p, &API_KEY).and_then(|key| {
        key.ok_or_else(|| {
            p.report(
                "braze.api_key",
                format!(
                    "required: set braze.api_key, braze.api_key_file or the \
                     {ENV_BRAZE_API_KEY} environment variable"
                ),
            )
        })
    });

    let request_timeout = s
        .integer(
            p,
            "request_timeout_ms",
            DEFAULT_REQUEST_TIMEOUT_MS,
            100..=600_000,
        )
        .map(Duration::from_millis);
    let max_objects_per_request = s
        .integer(
            p,
            "max_objects_per_request",
            BRAZE_MAX_OBJECTS,
            1..=BRAZE_MAX_OBJECTS,
        )
        .map(to_usize);
    let per_array_limit = s.boolean(p, "per_array_limit", false);
    let max_request_bytes = s
        .integer(
            p,
            "max_request_bytes",
            DEFAULT_MAX_REQUEST_BYTES,
            1024..=BRAZE_MAX_REQUEST_BYTES,
        )
        .map(to_usize);

    Ok(BrazeConfig {
        endpoint: endpoint?,
        api_key: api_key?,
        request_timeout: request_timeout?,
        max_objects_per_request: max_objects_per_request?,
        per_array_limit: per_array_limit?,
        max_request_bytes: max_request_bytes?,
    })
}

fn read_ingest(root: &Table, ctx: &Ctx<'_>, p: &mut Problems) -> Checked<IngestConfig> {
    let s = Section::open(root, "ingest", INGEST_KEYS, p);

    let listen = s.string(p, "listen").and_then(|listen| match listen {
        None => Ok(DEFAULT_LISTEN),
        Some(text) => text.trim().parse::<SocketAddr>().map_err(|_| {
            p.report(
                "ingest.listen",
                format!("expected an IP address and port such as 127.0.0.1:8080, got {text:?}"),
            )
        }),
    });

    let mut token = read_secret(&s, ctx, p, &TOKEN);
    if let (Ok(addr), Ok(given)) = (&listen, &token) {
        if !is_loopback_ip(addr.ip()) {
            let short = given
                .as_ref()
                .map(|t| t.expose().chars().count())
                .filter(|n| *n < MIN_PUBLIC_TOKEN_CHARS);
            match (given, short) {
                (None, _) => {
                    token = Err(p.report(
                        "ingest.token",
                        "required when ingest.listen is not a loopback address",
                    ))
                }
                // The length only: the token itself is never printed.
                (Some(_), Some(n)) => {
                    token = Err(p.report(
                        "ingest.token",
                        format!(
                            "must be at least {MIN_PUBLIC_TOKEN_CHARS} characters when ingest.listen is not a loopback address, got {n} (`openssl rand -hex 32` makes one)"
                        ),
                    ))
                }
                (Some(_), None) => {}
            }
        }
    }

    let max_body_bytes = s
        .integer(p, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, 1024..=GIB)
        .map(to_usize);
    let header_timeout = s
        .integer(
            p,
            "header_timeout_ms",
            DEFAULT_HEADER_TIMEOUT_MS,
            100..=3_600_000,
        )
        .map(Duration::from_millis);
    let upload_idle_timeout = s
        .integer(
            p,
            "upload_idle_timeout_ms",
            DEFAULT_UPLOAD_IDLE_TIMEOUT_MS,
            100..=3_600_000,
        )
        .map(Duration::from_millis);
    let min_body_rate = s.integer(p, "min_body_rate", DEFAULT_MIN_BODY_RATE, 1..=GIB);
    let body_grace = s
        .integer(p, "body_grace_ms", DEFAULT_BODY_GRACE_MS, 100..=3_600_000)
        .map(Duration::from_millis);
    let upload_timeout = s
        .integer(
            p,
            "upload_timeout_ms",
            DEFAULT_UPLOAD_TIMEOUT_MS,
            1_000..=86_400_000,
        )
        .map(Duration::from_millis);
    let max_connections = s
        .integer(p, "max_connections", DEFAULT_MAX_CONNECTIONS, 8..=1_000_000)
        .map(to_usize);

    let export_passthrough = s.boolean(p, "export_passthrough", false);
    let allowed_origins = s.strings(p, "allowed_origins");
    let allowed_hosts = s.strings(p, "allowed_hosts");

    Ok(IngestConfig {
        listen: listen?,
        token: token?,
        max_body_bytes: max_body_bytes?,
        header_timeout: header_timeout?,
        upload_idle_timeout: upload_idle_timeout?,
        min_body_rate: min_body_rate?,
        body_grace: body_grace?,
        upload_timeout: upload_timeout?,
        max_connections: max_connections?,
        export_passthrough: export_passthrough?,
        allowed_origins: allowed_origins?,
        allowed_hosts: allowed_hosts?,
    })
}

fn read_delivery(root: &Table, p: &mut Problems) -> Checked<DeliveryConfig> {
    let s = Section::open(root, "delivery", DELIVERY_KEYS, p);

    let workers = s
        .integer(p, "workers", DEFAULT_WORKERS, 2..=1024)
        .map(to_usize);
    let backoff_initial = s.integer(
        p,
        "backoff_initial_ms",
        DEFAULT_BACKOFF_INITIAL_MS,
        1..=MAX_BACKOFF_MS,
    );
    let mut backoff_max = s.integer(
        p,
        "backoff_max_ms",
        DEFAULT_BACKOFF_MAX_MS,
        1..=MAX_BACKOFF_MS,
    );
    if let (Ok(initial), Ok(max)) = (backoff_initial, backoff_max) {
        if max < initial {
            // Raising backoff_initial_ms alone can trip this, so say when the default is at fault.
            let default = if s.has("backoff_max_ms") {
                ""
            } else {
                " (the default)"
            };
            backoff_max = Err(p.report(
                "delivery.backoff_max_ms",
                format!(
                    "must be at least delivery.backoff_initial_ms ({initial}), got {max}{default}"
                ),
            ));
        }
    }
    let max_requests_per_second = s.positive_number(p, "max_requests_per_second");
    let shutdown_timeout = s.integer_with_note(
        p,
        "shutdown_timeout_ms",
        DEFAULT_SHUTDOWN_TIMEOUT_MS,
        0..=MAX_SHUTDOWN_TIMEOUT_MS,
        " (systemd stops the service 90 s after asking it to)",
    );
    let skip_unchanged_for = s.integer(
        p,
        "skip_unchanged_for_s",
        DEFAULT_SKIP_UNCHANGED_FOR_S,
        0..=MAX_SKIP_UNCHANGED_FOR_S,
    );

    Ok(DeliveryConfig {
        workers: workers?,
        backoff_initial: Duration::from_millis(backoff_initial?),
        backoff_max: Duration::from_millis(backoff_max?),
        max_requests_per_second: max_requests_per_second?,
        shutdown_timeout: Duration::from_millis(shutdown_timeout?),
        skip_unchanged_for: Some(skip_unchanged_for?)
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
    })
}

fn read_queue(root: &Table, p: &mut Problems) -> Checked<QueueConfig> {
    let s = Section::open(root, "queue", QUEUE_KEYS, p);

    let max_records = s.integer(p, "max_records", DEFAULT_MAX_RECORDS, 1..=u64::MAX);
    let max_disk_bytes = s.integer(p, "max_disk_bytes", DEFAULT_MAX_DISK_BYTES, MIB..=u64::MAX);
    // Never 0: sled 0.34 treats a write that meets a full disk as fatal for the open
    // database, so the queue must stop taking records before the disk is full.
    let min_free_disk_mb = s.integer_with_note(
        p,
        "min_free_disk_mb",
        DEFAULT_MIN_FREE_DISK_MB,
        1..=u64::MAX / MIB,
        " (a full disk mid-write stops the queue: keep a reserve)",
    );
    let cache_mb = s.integer(p, "cache_mb", DEFAULT_CACHE_MB, 1..=16_384);
    // The upper bound only keeps the conversion to bytes from overflowing.
    let compact_min_mb = s.integer(
        p,
        "compact_min_mb",
        DEFAULT_COMPACT_MIN_MB,
        1..=u64::MAX / MIB,
    );

    Ok(QueueConfig {
        max_records: max_records?,
        max_disk_bytes: max_disk_bytes?,
        min_free_bytes: min_free_disk_mb? * MIB,
        cache_bytes: cache_mb? * MIB,
        compact_min_bytes: compact_min_mb? * MIB,
    })
}

fn read_identity(root: &Table, p: &mut Problems) -> Checked<PreferId> {
    let s = Section::open(root, "identity", IDENTITY_KEYS, p);
    s.string(p, "prefer")
        .and_then(|prefer| match prefer.map(str::trim) {
            None | Some("external_id") => Ok(PreferId::External),
            Some("braze_id") => Ok(PreferId::Braze),
            Some(other) => Err(p.report(
                "identity.prefer",
                format!("must be \"external_id\" or \"braze_id\", got {other:?}"),
            )),
        })
}

fn read_update_existing_only(root: &Table, p: &mut Problems) -> Checked<UpdateExistingOnly> {
    let s = Section::open(root, "update_existing_only", UPDATE_EXISTING_ONLY_KEYS, p);
    let d = UpdateExistingOnly::default();
    let memberships = s.boolean(p, "memberships", d.memberships);
    let attributes = s.boolean(p, "attributes", d.attributes);
    let events = s.boolean(p, "events", d.events);
    Ok(UpdateExistingOnly {
        memberships: memberships?,
        attributes: attributes?,
        events: events?,
    })
}

fn read_log(root: &Table, p: &mut Problems) -> Checked<LogConfig> {
    let s = Section::open(root, "log", LOG_KEYS, p);

    let level = s.string(p, "level").and_then(|level| match level {
        None => Ok(LevelFilter::INFO),
        Some(text) => match text.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(LevelFilter::ERROR),
            "warn" => Ok(LevelFilter::WARN),
            "info" => Ok(LevelFilter::INFO),
            "debug" => Ok(LevelFilter::DEBUG),
            "trace" => Ok(LevelFilter::TRACE),
            _ => Err(p.report(
                "log.level",
                format!("must be one of error, warn, info, debug, trace, got {text:?}"),
            )),
        },
    });

    Ok(LogConfig { level: level? })
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// The keys and the variable one secret can come from.
struct SecretSource {
    inline: &'static str,
    file: &'static str,
    env: &'static str,
}

const API_KEY: SecretSource = SecretSource {
    inline: "api_key",
    file: "api_key_file",
    env: ENV_BRAZE_API_KEY,
};

const TOKEN: SecretSource = SecretSource {
    inline: "token",
    file: "token_file",
    env: ENV_INGEST_TOKEN,
};

/// Reads a secret from its environment variable, else from the inline key or the file key
/// (not both). `Ok(None)` when none of them is set; the caller decides whether that is fine.
///
/// When the environment variable is set the file named by the config is not read at all: it
/// may not exist where the override is used.
fn read_secret(
    s: &Section<'_>,
    ctx: &Ctx<'_>,
    p: &mut Problems,
    source: &SecretSource,
) -> Checked<Option<Secret>> {
    // Type-checked even when the environment wins: a wrong type is still a broken file.
    let inline = s.string(p, source.inline);
    let file = s.string(p, source.file);
    let inline_key = s.key(source.inline);
    let file_key = s.key(source.file);

    if let Some(value) = (ctx.env)(source.env) {
        return secret_value(&value).map(Some).map_err(|why| {
            p.report(
                &format!("{inline_key} (from {})", source.env),
                format!("the value {why}"),
            )
        });
    }
    let (inline, file) = (inline?, file?);
    match (inline, file) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(p.report(
            &inline_key,
            format!("set either {inline_key} or {file_key}, not both"),
        )),
        (Some(value), None) => secret_value(value)
            .map(Some)
            .map_err(|why| p.report(&inline_key, format!("the value {why}"))),
        (None, Some(path)) => read_secret_file(ctx, path)
            .map(Some)
            .map_err(|why| p.report(&file_key, why)),
    }
}

/// The files holding a secret that group or others may read, each with its mode: the config
/// itself when it holds `api_key` or `token` inline, and the key and token files (resolved as
/// `read_secret_file` does; systemd's credential copies are the service's alone).
fn exposed_secret_files(
    text: &str,
    config_path: &Path,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(root) = text.parse::<Table>() else {
        return Vec::new();
    };
    let field = |section: &str, key: &str| {
        root.get(section)
            .and_then(|s| s.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut files = Vec::new();
    if field("braze", "api_key").is_some() || field("ingest", "token").is_some() {
        files.push(config_path.to_path_buf());
    }
    for (section, key) in [("braze", "api_key_file"), ("ingest", "token_file")] {
        let Some(path) = field(section, key) else {
            continue;
        };
        let path = Path::new(&path);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else if let Some(dir) = env(ENV_CREDENTIALS_DIRECTORY) {
            PathBuf::from(dir).join(path)
        } else {
            base_dir.join(path)
        };
        files.push(full);
    }
    files
        .into_iter()
        .filter_map(|f| {
            let mode = std::fs::metadata(&f).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then(|| format!("{} (mode {mode:o})", f.display()))
        })
        .collect()
}

/// Reads a secret file; the error names the file and never its contents.
fn read_secret_file(ctx: &Ctx<'_>, path: &str) -> Result<Secret, String> {
    if path.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    let path = Path::new(path);
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else if let Some(dir) = (ctx.env)(ENV_CREDENTIALS_DIRECTORY) {
        PathBuf::from(dir).join(path)
    } else {
        ctx.base_dir.join(path)
    };
    let shown = full.display();
    let bytes = std::fs::read(&full).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    secret_value(&text).map_err(|why| format!("{shown} {why}"))
}

/// Trims a secret and checks it can travel in an HTTP header. The error describes the value
/// without quoting it, and reads after "the value" or a file name.
fn secret_value(raw: &str) -> Result<Secret, &'static str> {
    // Trimming both ends is safe: HTTP strips a header value's surrounding whitespace anyway,
    // so a token with leading or trailing spaces could never match.
    let value = raw.trim();
    if value.is_empty() {
        return Err("is empty");
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("contains spaces, control characters or non-ASCII characters");
    }
    Ok(Secret::new(value))
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// Checks a Braze REST endpoint and returns it without trailing `/`. The error is the "why"
/// part of the line; it does not echo the URL (someone may have pasted a key into it).
fn check_endpoint(raw: &str) -> Result<String, String> {
    const EXAMPLE: &str = "https://rest.iad-01.braze.com";
    let url = raw.trim().trim_end_matches('/');
    if url.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace".to_owned());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "must be a URL starting with https://, such as {EXAMPLE}"
        ));
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => {
            return Err(format!(
                "must start with https:// (http:// only for a loopback host), such as {EXAMPLE}"
            ))
        }
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if path.contains(['?', '#']) {
        return Err("must not contain a query or a fragment".to_owned());
    }
    if path.to_ascii_lowercase().ends_with("/users/track") {
        return Err(format!(
            "must be the instance's base URL, such as {EXAMPLE}, without /users/track"
        ));
    }
    if authority.contains('@') {
        return Err("must not contain user credentials".to_owned());
    }
    let host = split_host(authority)?;
    if !tls && !is_loopback_host(host) {
        return Err("plain http would send the API key unencrypted; use https".to_owned());
    }
    Ok(url.to_owned())
}

/// The host of `host[:port]` or `[v6][:port]`, checked to be well formed.
fn split_host(authority: &str) -> Result<&str, String> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("has an unclosed [ in its host".to_owned());
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address as its host".to_owned());
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("has an invalid host".to_owned()),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("must include a host".to_owned());
    }
    let host_ok = authority.starts_with('[')
        || host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !host_ok {
        return Err("has an invalid host".to_owned());
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("has an invalid port".to_owned());
        }
        if port.parse::<u16>().map_or(true, |port| port == 0) {
            return Err("has a port outside 1..=65535".to_owned());
        }
    }
    Ok(host)
}

/// `localhost`, 127.0.0.0/8 or ::1: traffic that never leaves the machine.
fn is_loopback_host(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    name.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

/// 127.0.0.0/8, ::1, or ::ffff:127.x: an address only this machine reaches.
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Every range handed to the section readers ends at or below 1 GiB, which fits a `usize` even
/// on 32-bit targets; the fallback is never taken.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// "line L, column C: message", without toml's quote of the line (it may hold a secret).
fn syntax_message(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().replace('\n', "; ");
    let Some(span) = err.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}

// ---------------------------------------------------------------------------------------------
// Walking the table
// ---------------------------------------------------------------------------------------------

/// Marker for "this value is unusable and the reason is already in [`Problems`]". Only
/// [`Problems::report`] and a [`Section`] whose own problem was reported make one, so an
/// `Err(Reported)` always comes with at least one line.
#[derive(Debug, Clone, Copy)]
struct Reported;

type Checked<T> = Result<T, Reported>;

/// The lines of [`ConfigError::Invalid`], in the order they were found.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn report(&mut self, key: &str, why: impl fmt::Display) -> Reported {
        self.0.push(format!("{key}: {why}"));
        Reported
    }
}

/// One table of the file (`name` is empty for the top level).
struct Section<'t> {
    name: &'static str,
    table: Option<&'t Table>,
    /// The section is there but is not a table; that is reported once, and every key in it
    /// is then unusable without a line of its own.
    bad: bool,
}

impl<'t> Section<'t> {
    /// Looks up a top-level section and reports its unknown keys. A missing section is empty.
    fn open(root: &'t Table, name: &'static str, known: &[&str], p: &mut Problems) -> Self {
        match root.get(name) {
            None => Section {
                name,
                table: None,
                bad: false,
            },
            Some(Value::Table(table)) => {
                check_unknown(table, name, known, p);
                Section {
                    name,
                    table: Some(table),
                    bad: false,
                }
            }
            Some(other) => {
                p.report(name, wrong_type("a table", other));
                Section {
                    name,
                    table: None,
                    bad: true,
                }
            }
        }
    }

    /// The dotted name of `key`, as error lines show it.
    fn key(&self, key: &str) -> String {
        qualified(self.name, key)
    }

    fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    fn get(&self, key: &str) -> Checked<Option<&'t Value>> {
        if self.bad {
            // The section's own line is already in `Problems`.
            return Err(Reported);
        }
        Ok(self.table.and_then(|t| t.get(key)))
    }

    fn string(&self, p: &mut Problems, key: &str) -> Checked<Option<&'t str>> {
        match self.get(key)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(p.report(&self.key(key), wrong_type("a string", other))),
        }
    }

    /// An array of strings, or empty when absent.
    fn strings(&self, p: &mut Problems, key: &str) -> Checked<Vec<String>> {
        match self.get(key)? {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(p.report(
                        &self.key(key),
                        wrong_type("an array of strings", other).replace("got", "holding"),
                    )),
                })
                .collect(),
            Some(other) => Err(p.report(&self.key(key), wrong_type("an array of strings", other))),
        }
    }

    fn boolean(&self, p: &mut Problems, key: &str, default: bool) -> Checked<bool> {
        match self.get(key)? {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(p.report(&self.key(key), wrong_type("a boolean", other))),
        }
    }

    fn integer(
        &self,
        p: &mut Problems,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Checked<u64> {
        self.integer_with_note(p, key, default, range, "")
    }

    /// An integer in `range`, or `default` when absent; `note` follows the range in the error.
    fn integer_with_note(
        &self,
        p: &mut Problems,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
        note: &str,
    ) -> Checked<u64> {
        let n = match self.get(key)? {
            None => return Ok(default),
            Some(Value::Integer(n)) => *n,
            Some(other) => return Err(p.report(&self.key(key), wrong_type("an integer", other))),
        };
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => {
                let (min, max) = (range.start(), range.end());
                let bounds = if *max == u64::MAX {
                    format!("must be at least {min}")
                } else {
                    format!("must be between {min} and {max}")
                };
                Err(p.report(&self.key(key), format!("{bounds}{note}, got {n}")))
            }
        }
    }

    /// An optional number above zero; TOML integers are accepted too (`10` as well as `10.0`).
    fn positive_number(&self, p: &mut Problems, key: &str) -> Checked<Option<f64>> {
        let n = match self.get(key)? {
            None => return Ok(None),
            Some(Value::Float(f)) => *f,
            // Precision loss above 2^53 does not matter for a rate.
            Some(Value::Integer(i)) => *i as f64,
            Some(other) => return Err(p.report(&self.key(key), wrong_type("a number", other))),
        };
        if n.is_finite() && n > 0.0 {
            Ok(Some(n))
        } else {
            Err(p.report(
                &self.key(key),
                format!("must be a number greater than 0, got {n}"),
            ))
        }
    }
}

fn qualified(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// Reports every key of `table` that is not in `known`, with a suggestion for a likely typo.
fn check_unknown(table: &Table, section: &str, known: &[&str], p: &mut Problems) {
    for (key, value) in table {
        if known.contains(&key.as_str()) {
            continue;
        }
        let what = if section.is_empty() && value.is_table() {
            "unknown section"
        } else {
            "unknown key"
        };
        let hint = known
            .iter()
            .map(|k| (edit_distance(key, k), k))
            .filter(|(d, k)| *d <= 2 && *d < k.len())
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| format!(" (did you mean {}?)", qualified(section, k)))
            .unwrap_or_default();
        p.report(&qualified(section, key), format!("{what}{hint}"));
    }
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// "expected a string, got an integer".
fn wrong_type(expected: &str, got: &Value) -> String {
    let got = match got {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    };
    format!("expected {expected}, got {got}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const KEY: &str = "0123abcd-key-never-shown";
    const TOKEN_VALUE: &str = "tok-never-shown-42-0123456789abcdef";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn minimal() -> String {
        format!("[braze]\nendpoint = \"https://rest.iad-01.braze.com/\"\napi_key = \"{KEY}\"\n")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/aiq"), &no_env)
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid(lines)) => lines,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_in_for_a_minimal_file() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/aiq-braze-sync"));
        assert_eq!(c.braze.endpoint, "https://rest.iad-01.braze.com");
        assert_eq!(c.braze.api_key.expose(), KEY);
        assert_eq!(c.braze.request_timeout, Duration::from_secs(30));
        assert_eq!(c.braze.max_objects_per_request, 75);
        assert!(!c.braze.per_array_limit);
        assert_eq!(c.braze.max_request_bytes, 3_500_000);
        assert_eq!(c.ingest.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(c.ingest.token.is_none());
        assert_eq!(c.ingest.max_body_bytes, 16 * 1024 * 1024);
        assert!(!c.ingest.export_passthrough);
        assert_eq!(c.delivery.workers, 256);
        assert_eq!(c.delivery.backoff_initial, Duration::from_millis(500));
        assert_eq!(c.delivery.backoff_max, Duration::from_secs(60));
        assert_eq!(c.delivery.max_requests_per_second, None);
        assert_eq!(c.delivery.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(
            c.delivery.skip_unchanged_for,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(c.queue.max_records, 10_000_000);
        assert_eq!(c.queue.max_disk_bytes, 20 * GIB);
        assert_eq!(c.queue.cache_bytes, 64 * MIB);
        assert_eq!(c.queue.compact_min_bytes, 256 * MIB);
        assert_eq!(c.log.level, LevelFilter::INFO);
        assert_eq!(c.identity, PreferId::External);
        assert_eq!(c.update_existing_only, UpdateExistingOnly::default());
        assert!(c.update_existing_only.memberships);
    }

    #[test]
    fn identity_and_profile_policy_are_read_and_checked() {
        let text = format!(
            "{}[identity]\nprefer = \"braze_id\"\n\
             [update_existing_only]\nmemberships = false\nevents = true\n",
            minimal()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.identity, PreferId::Braze);
        assert_eq!(
            c.update_existing_only,
            UpdateExistingOnly {
                memberships: false,
                attributes: false,
                events: true
            }
        );
        let bad = format!(
            "{}[identity]\nprefer = \"email\"\n[update_existing_only]\nevents = \"yes\"\npurchases = true\n",
            minimal()
        );
        let lines = problems(&bad);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("identity.prefer:")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("update_existing_only.events:")));
        assert!(lines
            .iter()
            .any(|l| l.contains("update_existing_only.purchases")));
    }

    #[test]
    fn every_key_is_read_when_given() {
        let text = format!(
            "data_dir = \"state\"\n\
             [braze]\nendpoint = \"https://rest.fra-01.braze.eu\"\napi_key = \"{KEY}\"\n\
             request_timeout_ms = 5000\nmax_objects_per_request = 50\nper_array_limit = true\n\
             max_request_bytes = 2000000\n\
             [ingest]\nlisten = \"0.0.0.0:9000\"\ntoken = \"{TOKEN_VALUE}\"\nmax_body_bytes = 4096\nexport_passthrough = true\n\
             [delivery]\nworkers = 8\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
             max_requests_per_second = 10\nshutdown_timeout_ms = 0\nskip_unchanged_for_s = 0\n\
             [queue]\nmax_records = 5\nmax_disk_bytes = 1048576\ncache_mb = 1\ncompact_min_mb = 2\n\
             [log]\nlevel = \"DEBUG\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/aiq/state"));
        assert_eq!(c.braze.request_timeout, Duration::from_secs(5));
        assert_eq!(c.braze.max_objects_per_request, 50);
        assert!(c.braze.per_array_limit);
        assert_eq!(c.braze.max_request_bytes, 2_000_000);
        assert_eq!(c.ingest.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.ingest.token.as_ref().unwrap().expose(), TOKEN_VALUE);
        assert_eq!(c.ingest.max_body_bytes, 4096);
        assert!(c.ingest.export_passthrough);
        assert_eq!(c.delivery.workers, 8);
        assert_eq!(c.delivery.max_requests_per_second, Some(10.0));
        assert_eq!(c.delivery.shutdown_timeout, Duration::ZERO);
        assert_eq!(c.delivery.skip_unchanged_for, None);
        assert_eq!(c.queue.cache_bytes, MIB);
        assert_eq!(c.queue.compact_min_bytes, 2 * MIB);
        assert_eq!(c.log.level, LevelFilter::DEBUG);
    }

    #[test]
    fn no_free_disk_reserve_is_refused() {
        let text = format!("{}[queue]\nmin_free_disk_mb = 0\n", minimal());
        let lines = problems(&text);
        assert!(
            lines[0].starts_with("queue.min_free_disk_mb: must be between 1"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_short_token_is_refused_off_loopback_and_taken_on_it() {
        let public = format!(
            "{}[ingest]\nlisten = \"0.0.0.0:9000\"\ntoken = \"short-secret\"\n",
            minimal()
        );
        let lines = problems(&public);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("ingest.token: must be at least 32 characters"),
            "{lines:?}"
        );
        assert!(
            lines[0].contains("got 12") && !lines[0].contains("short-secret"),
            "{lines:?}"
        );
        let local = format!("{}[ingest]\ntoken = \"short-secret\"\n", minimal());
        assert!(parse(&local).is_ok());
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let env = env_of(&[
            (ENV_BRAZE_ENDPOINT, "https://rest.iad-05.braze.com/"),
            (ENV_BRAZE_API_KEY, "from-env"),
            (ENV_INGEST_TOKEN, "token-from-env\n"),
        ]);
        let text = format!("{}[ingest]\ntoken = \"from-file\"\n", minimal());
        let c = Config::from_toml_str(&text, Path::new("/etc/aiq"), &env).unwrap();
        assert_eq!(c.braze.endpoint, "https://rest.iad-05.braze.com");
        assert_eq!(c.braze.api_key.expose(), "from-env");
        assert_eq!(c.ingest.token.unwrap().expose(), "token-from-env");
    }

    #[test]
    fn env_overrides_supply_settings_missing_from_the_file() {
        let env = env_of(&[
            (ENV_BRAZE_ENDPOINT, "https://rest.iad-05.braze.com"),
            (ENV_BRAZE_API_KEY, "from-env"),
        ]);
        let c = Config::from_toml_str("", Path::new("/"), &env).unwrap();
        assert_eq!(c.braze.api_key.expose(), "from-env");
    }

    #[test]
    fn an_env_var_set_but_empty_counts_as_unset() {
        let env = env_of(&[(ENV_BRAZE_API_KEY, ""), (ENV_BRAZE_ENDPOINT, "  ")]);
        let c = Config::from_toml_str(&minimal(), Path::new("/"), &env).unwrap();
        assert_eq!(c.braze.api_key.expose(), KEY);
        assert_eq!(c.braze.endpoint, "https://rest.iad-01.braze.com");
    }

    #[test]
    fn a_bad_env_value_is_refused_with_the_variable_named() {
        let env = env_of(&[(ENV_BRAZE_ENDPOINT, "http://rest.iad-01.braze.com")]);
        let err = Config::from_toml_str(&minimal(), Path::new("/"), &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "braze.endpoint (from BRAZE_REST_ENDPOINT): plain http would send the API key \
             unencrypted; use https"
        );
    }

    #[test]
    fn an_unknown_key_a_wrong_type_and_an_out_of_range_value_give_three_lines() {
        let text = format!(
            "{}endpoit = \"x\"\n[delivery]\nworkers = \"four\"\nbackoff_initial_ms = 0\n",
            minimal()
        );
        assert_eq!(
            problems(&text),
            vec![
                "braze.endpoit: unknown key (did you mean braze.endpoint?)",
                "delivery.workers: expected an integer, got a string",
                "delivery.backoff_initial_ms: must be between 1 and 86400000, got 0",
            ]
        );
    }

    #[test]
    fn unknown_sections_and_top_level_keys_are_named() {
        let text = format!("colour = 3\n{}[brazee]\nx = 1\n", minimal());
        assert_eq!(
            problems(&text),
            vec![
                "brazee: unknown section (did you mean braze?)",
                "colour: unknown key"
            ]
        );
    }

    #[test]
    fn a_section_that_is_not_a_table_is_one_line() {
        let text = format!("delivery = 4\n{}", minimal());
        assert_eq!(
            problems(&text),
            vec!["delivery: expected a table, got an integer"]
        );
    }

    #[test]
    fn an_empty_file_names_both_required_settings() {
        let lines = problems("");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("braze.endpoint: required"));
        assert!(lines[1].starts_with("braze.api_key: required"));
    }

    #[test]
    fn a_non_loopback_listen_without_a_token_is_refused() {
        let text = format!("{}[ingest]\nlisten = \"0.0.0.0:8080\"\n", minimal());
        assert_eq!(
            problems(&text),
            vec!["ingest.token: required when ingest.listen is not a loopback address"]
        );
        let ipv6 = format!("{}[ingest]\nlisten = \"[::1]:8080\"\n", minimal());
        assert!(parse(&ipv6).unwrap().ingest.token.is_none());
    }

    #[test]
    fn a_listen_address_that_does_not_parse_is_refused() {
        let text = format!("{}[ingest]\nlisten = \"localhost:80\"\n", minimal());
        assert_eq!(
            problems(&text),
            vec![
                "ingest.listen: expected an IP address and port such as 127.0.0.1:8080, \
                 got \"localhost:80\""
            ]
        );
    }

    #[test]
    fn plain_http_to_a_public_host_is_refused() {
        let text =
            format!("[braze]\nendpoint = \"http://rest.iad-01.braze.com\"\napi_key = \"{KEY}\"\n");
        assert_eq!(
            problems(&text),
            vec!["braze.endpoint: plain http would send the API key unencrypted; use https"]
        );
    }

    #[test]
    fn plain_http_to_a_loopback_host_is_allowed() {
        for endpoint in [
            "http://127.0.0.1:9999/",
            "http://127.1.2.3",
            "http://localhost:8081",
            "http://[::1]:8081/braze",
        ] {
            let text = format!("[braze]\nendpoint = \"{endpoint}\"\napi_key = \"{KEY}\"\n");
            let c = parse(&text).unwrap_or_else(|e| panic!("{endpoint}: {e}"));
            assert_eq!(c.braze.endpoint, endpoint.trim_end_matches('/'));
        }
    }

    #[test]
    fn malformed_endpoints_are_refused() {
        for endpoint in [
            "rest.iad-01.braze.com",
            "ftp://rest.iad-01.braze.com",
            "https://",
            "https://:443",
            "https://user:pw@rest.iad-01.braze.com",
            "https://rest.iad-01.braze.com:99999",
            "https://rest.iad-01.braze.com/users/track",
            "https://rest.iad-01.braze.com?x=1",
        ] {
            let text = format!("[braze]\nendpoint = \"{endpoint}\"\napi_key = \"{KEY}\"\n");
            let lines = problems(&text);
            assert_eq!(lines.len(), 1, "{endpoint}: {lines:?}");
            assert!(lines[0].starts_with("braze.endpoint: "), "{lines:?}");
            assert!(!lines[0].contains("pw@"), "{lines:?}");
        }
    }

    #[test]
    fn api_key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("braze.key");
        std::fs::write(&key_path, format!("{KEY}\n\n")).unwrap();
        let text = format!(
            "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = {:?}\n",
            key_path.display().to_string()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.braze.api_key.expose(), KEY);
    }

    #[test]
    fn a_relative_api_key_file_is_resolved_against_credentials_directory() {
        let creds = tempfile::tempdir().unwrap();
        let config_dir = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("braze.key"), "from-creds\n").unwrap();
        std::fs::write(config_dir.path().join("braze.key"), "from-config-dir\n").unwrap();
        let text =
            "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"braze.key\"\n";
        let creds_dir = creds.path().to_str().unwrap();
        let env = env_of(&[(ENV_CREDENTIALS_DIRECTORY, creds_dir)]);
        let c = Config::from_toml_str(text, config_dir.path(), &env).unwrap();
        assert_eq!(c.braze.api_key.expose(), "from-creds");
    }

    #[test]
    fn a_relative_api_key_file_is_resolved_against_the_config_dir_otherwise() {
        let config_dir = tempfile::tempdir().unwrap();
        std::fs::write(config_dir.path().join("braze.key"), "from-config-dir\n").unwrap();
        let config_path = config_dir.path().join("aiq.toml");
        std::fs::write(
            &config_path,
            "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"braze.key\"\n",
        )
        .unwrap();
        let c = Config::load_with_env(&config_path, &no_env).unwrap();
        assert_eq!(c.braze.api_key.expose(), "from-config-dir");
    }

    #[test]
    fn a_bad_key_file_is_named_but_its_contents_are_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.key"), format!("{KEY} {KEY}\n")).unwrap();
        let text =
            "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"bad.key\"\n\
                    [ingest]\ntoken_file = \"missing.token\"\n";
        let err = Config::from_toml_str(text, dir.path(), &no_env).unwrap_err();
        let shown = err.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 2, "{shown}");
        assert!(lines[0].starts_with("braze.api_key_file: "), "{shown}");
        assert!(lines[0].contains("bad.key"), "{shown}");
        assert!(
            lines[1].starts_with("ingest.token_file: cannot read "),
            "{shown}"
        );
        assert!(lines[1].contains("missing.token"), "{shown}");
        assert!(!shown.contains(KEY), "{shown}");
    }

    #[test]
    fn both_api_key_and_api_key_file_are_refused() {
        let text = format!("{}api_key_file = \"/run/key\"\n", minimal());
        assert_eq!(
            problems(&text),
            vec!["braze.api_key: set either braze.api_key or braze.api_key_file, not both"]
        );
    }

    #[test]
    fn an_empty_api_key_is_refused() {
        let text = "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key = \"  \"\n";
        assert_eq!(problems(text), vec!["braze.api_key: the value is empty"]);
    }

    #[test]
    fn backoff_max_below_backoff_initial_is_refused_by_name() {
        let text = format!("{}[delivery]\nbackoff_initial_ms = 120000\n", minimal());
        assert_eq!(
            problems(&text),
            vec![
                "delivery.backoff_max_ms: must be at least delivery.backoff_initial_ms (120000), \
                 got 60000 (the default)"
            ]
        );
    }

    #[test]
    fn a_shutdown_timeout_past_systemds_stop_timeout_is_refused() {
        let text = format!("{}[delivery]\nshutdown_timeout_ms = 90000\n", minimal());
        let lines = problems(&text);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("delivery.shutdown_timeout_ms: must be between 0 and 80000"));
    }

    #[test]
    fn a_rate_ceiling_must_be_positive() {
        let text = format!("{}[delivery]\nmax_requests_per_second = 0\n", minimal());
        assert_eq!(
            problems(&text),
            vec!["delivery.max_requests_per_second: must be a number greater than 0, got 0"]
        );
    }

    #[test]
    fn an_unknown_log_level_is_refused() {
        let text = format!("{}[log]\nlevel = \"verbose\"\n", minimal());
        assert_eq!(
            problems(&text),
            vec!["log.level: must be one of error, warn, info, debug, trace, got \"verbose\""]
        );
    }

    #[test]
    fn a_syntax_error_gives_its_position_but_not_the_line() {
        let text = format!("[braze]\nendpoint = \"https://x\"\napi_key = \"{KEY}\n");
        let err = parse(&text).unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, ConfigError::Syntax(_)));
        assert!(shown.contains("line 3, column"), "{shown}");
        assert!(!shown.contains(KEY), "{shown}");
    }

    #[test]
    fn a_missing_config_file_names_the_path() {
        let err = Config::load_with_env(Path::new("/nonexistent/aiq.toml"), &no_env).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/aiq.toml"));
    }

    #[test]
    fn debug_of_config_never_contains_the_key_or_token() {
        let text = format!(
            "{}[ingest]\nlisten = \"0.0.0.0:8080\"\ntoken = \"{TOKEN_VALUE}\"\n",
            minimal()
        );
        let c = parse(&text).unwrap();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!shown.contains(TOKEN_VALUE), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(c.braze.api_key.to_string(), "<redacted>");
    }

    #[test]
    fn for_local_listens_on_an_ephemeral_loopback_port_with_defaults() {
        let c = Config::for_local(
            PathBuf::from("/tmp/x"),
            "http://127.0.0.1:1234/".to_owned(),
            KEY,
        );
        assert_eq!(c.ingest.listen.port(), 0);
        assert!(c.ingest.listen.ip().is_loopback());
        assert_eq!(c.braze.endpoint, "http://127.0.0.1:1234");
        assert_eq!(c.delivery.workers, 256);
    }
}
