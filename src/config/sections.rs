//! Reading each section of the file into its part of `Config`, collecting every problem.

use super::*;

pub(super) const TOP_KEYS: &[&str] = &[
    "data_dir",
    "braze",
    "ingest",
    "delivery",
    "queue",
    "log",
    "identity",
    "update_existing_only",
];
pub(super) const IDENTITY_KEYS: &[&str] = &["prefer"];
pub(super) const UPDATE_EXISTING_ONLY_KEYS: &[&str] = &["memberships", "attributes", "events"];
pub(super) const BRAZE_KEYS: &[&str] = &[
    "endpoint",
    "api_key",
    "api_key_file",
    "request_timeout_ms",
    "max_objects_per_request",
    "per_array_limit",
    "max_request_bytes",
];
pub(super) const INGEST_KEYS: &[&str] = &[
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
pub(super) const DELIVERY_KEYS: &[&str] = &[
    "workers",
    "backoff_initial_ms",
    "backoff_max_ms",
    "max_requests_per_second",
    "shutdown_timeout_ms",
    "skip_unchanged_for_s",
];
pub(super) const QUEUE_KEYS: &[&str] = &[
    "max_records",
    "max_disk_bytes",
    "min_free_disk_mb",
    "cache_mb",
    "compact_min_mb",
];
pub(super) const LOG_KEYS: &[&str] = &["level"];

/// What the section readers need besides the table.
pub(super) struct Ctx<'a> {
    /// The config file's directory: relative paths are resolved against it.
    pub(super) base_dir: &'a Path,
    /// Environment lookup; empty values already filtered out.
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

pub(super) fn read_data_dir(
    top: &Section<'_>,
    ctx: &Ctx<'_>,
    p: &mut Problems,
) -> Checked<PathBuf> {
    match top.string(p, "data_dir")? {
        None => Ok(PathBuf::from(DEFAULT_DATA_DIR)),
        Some(dir) if dir.trim().is_empty() => Err(p.report("data_dir", "must not be empty")),
        Some(dir) => Ok(ctx.base_dir.join(dir)),
    }
}

pub(super) fn read_braze(root: &Table, ctx: &Ctx<'_>, p: &mut Problems) -> Checked<BrazeConfig> {
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

pub(super) fn read_ingest(root: &Table, ctx: &Ctx<'_>, p: &mut Problems) -> Checked<IngestConfig> {
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

pub(super) fn read_delivery(root: &Table, p: &mut Problems) -> Checked<DeliveryConfig> {
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

pub(super) fn read_queue(root: &Table, p: &mut Problems) -> Checked<QueueConfig> {
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

pub(super) fn read_identity(root: &Table, p: &mut Problems) -> Checked<PreferId> {
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

pub(super) fn read_update_existing_only(
    root: &Table,
    p: &mut Problems,
) -> Checked<UpdateExistingOnly> {
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

pub(super) fn read_log(root: &Table, p: &mut Problems) -> Checked<LogConfig> {
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
