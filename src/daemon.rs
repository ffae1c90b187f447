//! The daemon's lifecycle: open the queue, start delivery, upkeep and ingest, and stop them
//! in pipeline order.
//!
//! `start` takes an already-bound listener (tests bind port 0). `Running::shutdown` stops
//! ingest first (in-flight requests finish and get their answer, new ones get 503), then the
//! workers between batches (a batch still in flight after the deadline is abandoned: its
//! records were never removed, so they are sent again after the restart), then upkeep, then
//! syncs the queue. The whole stop is bounded by `delivery.shutdown_timeout_ms` plus the
//! final sync. It never syncs the queue for the last time while a task that holds it runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::braze::BrazeClient;
use crate::config::Config;
use crate::delivery::gate::Gate;
use crate::delivery::{Delivery, DeliveryCounters};
use crate::http::{self, AppState};
use crate::queue::{Backend, BatchLimits, Queue, QueueError, QueueSettings, PID_FILE};
use crate::shutdown::Shutdown;

/// The async runtime the binary runs on: one worker thread, unless `TOKIO_WORKER_THREADS`
/// (read by tokio) asks for more.
///
/// Braze's `/users/track` limit, 3,000 requests per 3 s of 75 objects each
/// (<https://www.braze.com/docs/api/api_limits>), bounds delivery to a rate one thread can
/// drive (BENCHMARKS.md, "End to end beside syslog-ng (the peers bench)"), and the work that
/// can fill a core has threads of its own: bodies over 64 KiB are parsed on the blocking
/// pool, syncs run on the commit threads, sled flushes on its own, event workers have their
/// own runtime. More worker threads add hand-offs of every record between them.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

/// The event workers' runtime: one thread of their own. On the main runtime's one thread
/// they would queue behind every task a backfill keeps ready (leases, request bodies,
/// answers), for as long as the backfill keeps that thread busy (BENCHMARKS.md, "At Braze's
/// pace: requests in flight that adapt"). Here they wait only for each other and the queue's
/// locks.
fn events_runtime() -> std::io::Result<EventsRuntime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("aiq-events")
        .enable_all()
        .build()?;
    Ok(EventsRuntime(Some(runtime)))
}

/// Shuts its runtime down without waiting when dropped: dropping a runtime inside another
/// one's task would panic, and a `start` that fails half-way drops it there.
struct EventsRuntime(Option<tokio::runtime::Runtime>);

impl EventsRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("events runtime is present until dropped")
            .handle()
    }
}

impl Drop for EventsRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts the daemon on a runtime of its own, shaped as the binary's (`runtime()`), for the
/// benches, which drive it from another runtime in the same process: what they measure is
/// then the daemon as it ships, not as their own runtime would run it. Call it outside any
/// runtime; stop it with `runtime.block_on(running.shutdown())`.
pub fn start_on_own_runtime(
    config: &Config,
    listener: std::net::TcpListener,
) -> anyhow::Result<(tokio::runtime::Runtime, Running)> {
    let runtime = runtime()?;
    listener.set_nonblocking(true)?;
    let running =
        runtime.block_on(async { start(config, TcpListener::from_std(listener)?).await })?;
    Ok((runtime, running))
}

/// How often the queue's disk size is measured and a rebuild considered.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
/// Drained event log segments are deleted this often (each time after a sled sync, and only
/// when there are some): more often than `MAINTENANCE_EVERY`, so that under full churn
/// drained segments do not pile up on disk between rounds of upkeep.
const SEGMENTS_EVERY: Duration = Duration::from_millis(200);

pub fn queue_settings(config: &Config) -> QueueSettings {
    QueueSettings {
        max_records: config.queue.max_records,
        max_disk_bytes: config.queue.max_disk_bytes,
        cache_bytes: config.queue.cache_bytes,
        compact_min_bytes: config.queue.compact_min_bytes,
        min_free_bytes: config.queue.min_free_bytes,
        skip_unchanged_for: config.delivery.skip_unchanged_for,
        accept_loss: config.accept_loss,
    }
}

/// Opens the queue off the async threads (opening replays sled's log, which can take seconds).
pub async fn open_queue(config: &Config) -> anyhow::Result<Arc<Queue>> {
    open_queue_if_free(config)
        .await
        .with_context(|| format!("cannot open the queue in {}", config.data_dir.display()))
}

/// As `open_queue`, with the error kept typed so that a caller can tell `Locked` (the daemon
/// is running) from a real failure.
pub async fn open_queue_if_free(config: &Config) -> Result<Arc<Queue>, QueueError> {
    let data_dir = config.data_dir.clone();
    let settings = queue_settings(config);
    tokio::task::spawn_blocking(move || Queue::open(&data_dir, settings))
        .await
        .map_err(|e| QueueError::Io(std::io::Error::other(e)))?
}

/// A started daemon. Drop it only through `shutdown`.
pub struct Running {
    pub addr: SocketAddr,
    pub queue: Arc<Queue>,
    pub delivery: Arc<Delivery>,
    /// What the HTTP handlers share; a reload swaps the token in it.
    pub state: Arc<AppState>,
    shutdown: Shutdown,
    server: JoinHandle<std::io::Result<()>>,
    admin_server: Option<JoinHandle<std::io::Result<()>>>,
    workers: Vec<JoinHandle<()>>,
    /// Where the event workers run (`events_runtime`); shut down once they are joined.
    events_runtime: EventsRuntime,
    maintenance: JoinHandle<()>,
    shutdown_timeout: Duration,
    pid_file: std::path::PathBuf,
}

/// The admin socket, in `data_dir`: the `queue` commands talk to the running daemon through
/// it. Only the daemon's user can connect (the file is 0600 in a 0700 directory), which is
/// the credential: no token is needed, and none can leak.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Connections the admin socket serves at once.
const ADMIN_CONNECTIONS: usize = 16;

/// Binds `data_dir/admin.sock`, replacing one a crash left behind (the queue is open, so no
/// other daemon serves this directory).
fn bind_admin_socket(data_dir: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(ADMIN_SOCKET);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Running> {
    let queue = open_queue(config).await?;
    let pid_file = config.data_dir.join(PID_FILE);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write {}", pid_file.display()))?;

    let client =
        BrazeClient::new(&config.braze).context("cannot build the HTTP client for Braze")?;
    let delivery = Arc::new(Delivery {
        queue: Arc::clone(&queue) as Arc<dyn Backend>,
        client,
        gate: Gate::new(
            config.delivery.backoff_initial,
            config.delivery.backoff_max,
            config.delivery.max_requests_per_second,
        ),
        policy: config.update_existing_only,
        // One slot per worker, and one for the maintenance task.
        activity: crate::delivery::activity::Activity::new(config.delivery.workers + 1),
        limits: BatchLimits {
            max_objects: config.braze.max_objects_per_request,
            per_array: config.braze.per_array_limit,
            max_bytes: config.braze.max_request_bytes,
        },
        counters: DeliveryCounters::default(),
        limiter: crate::delivery::concurrency::Limiter::new(
            config.delivery.workers - crate::delivery::event_reserve(config.delivery.workers),
        ),
        backfill_in_flight: Default::default(),
    });
    let shutdown = Shutdown::default();
    let events_runtime = events_runtime().context("cannot start the event workers' thread")?;
    let workers = delivery.spawn_workers(
        config.delivery.workers,
        shutdown.delivery().clone(),
        events_runtime.handle(),
    );

    let history = Arc::new(crate::status::History::default());
    let maintenance = {
        let queue = Arc::clone(&queue);
        let delivery = Arc::clone(&delivery);
        let history = Arc::clone(&history);
        let sample_every =
            (crate::status::SAMPLE_EVERY.as_millis() / SEGMENTS_EVERY.as_millis()) as u64;
        let slot = config.delivery.workers;
        let stop = shutdown.upkeep().clone();
        tokio::spawn(async move {
            for tick in 1u64.. {
                tokio::select! {
                    _ = tokio::time::sleep(SEGMENTS_EVERY) => {}
                    _ = stop.cancelled() => break,
                }
                // `/status`'s hour of samples: one at start, then one every `SAMPLE_EVERY`.
                if tick == 1 || tick % sample_every == 0 {
                    if let Ok(stats) = queue.stats() {
                        history.record(&stats, &delivery.stats());
                    }
                }
                let q = Arc::clone(&queue);
                let _busy = delivery.activity.busy(slot);
                let full =
                    tick % (MAINTENANCE_EVERY.as_millis() / SEGMENTS_EVERY.as_millis()) as u64 == 0;
                let upkeep = move || {
                    if full {
                        q.maintain()
                    } else {
                        q.delete_drained_segments().map(|()| None)
                    }
                };
                match tokio::task::spawn_blocking(upkeep).await {
                    Ok(Ok(Some(c))) => tracing::info!(
                        from_bytes = c.from_bytes,
                        to_bytes = c.to_bytes,
                        live_keys = c.live_keys,
                        pause_ms = c.pause.as_millis() as u64,
                        "queue rebuilt after a drain; disk space given back"
                    ),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "queue maintenance failed"),
                    Err(e) => tracing::error!(error = %e, "queue maintenance task panicked"),
                }
            }
        })
    };

    let state = Arc::new(AppState {
        queue: Arc::clone(&queue) as Arc<dyn Backend>,
        delivery: Arc::clone(&delivery),
        token: std::sync::RwLock::new(config.ingest.token.clone()),
        history,
        snapshots: crate::snapshot::Snapshots::open(
            &config.data_dir,
            Arc::clone(&queue) as Arc<dyn Backend>,
        )
        .context("cannot open the snapshots")?,
        shutdown: shutdown.clone(),
        prefer: config.identity,
        upload_idle_timeout: config.ingest.upload_idle_timeout,
        upload_timeout: config.ingest.upload_timeout,
        body_limits: crate::request_body::Limits {
            max_bytes: config.ingest.max_body_bytes,
            min_rate: config.ingest.min_body_rate,
            grace: config.ingest.body_grace,
        },
        // Room for eight of the largest bodies at once; more are answered 503 until some finish.
        body_budget: crate::request_body::Budget::new(
            config.ingest.max_body_bytes.saturating_mul(8),
        ),
        export_passthrough: config.ingest.export_passthrough,
        export_window: Default::default(),
    });
    let addr = listener.local_addr()?;
    let guard = crate::http_guard::Guard {
        bound: addr,
        origins: config.ingest.allowed_origins.clone(),
        hosts: config.ingest.allowed_hosts.clone(),
    };
    let app = http::router(Arc::clone(&state), guard);
    let admin_server = match bind_admin_socket(&config.data_dir) {
        Ok(listener) => {
            let app = http::admin_router(Arc::clone(&state));
            let stop = shutdown.ingest().clone();
            let header_timeout = config.ingest.header_timeout;
            Some(tokio::spawn(async move {
                http::serve(
                    listener,
                    app,
                    header_timeout,
                    ADMIN_CONNECTIONS,
                    stop.cancelled_owned(),
                )
                .await
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no admin socket: while the daemon runs, the queue \
                commands need ingest.token to reach it over ingest.listen");
            None
        }
    };
    let header_timeout = config.ingest.header_timeout;
    let max_connections =
        http::connection_cap(config.ingest.max_connections, config.delivery.workers);
    if max_connections < config.ingest.max_connections {
        tracing::warn!(
            max_connections,
            wanted = config.ingest.max_connections,
            "ingest.max_connections lowered to fit the open-file limit (raise LimitNOFILE= to serve more)"
        );
    }
    let stop = shutdown.ingest().clone();
    let server = tokio::spawn(async move {
        http::serve(
            listener,
            app,
            header_timeout,
            max_connections,
            stop.cancelled_owned(),
        )
        .await
    });
    tracing::info!(%addr, workers = config.delivery.workers, pending = queue.pending(),
        endpoint = %config.braze.endpoint, "aiq-braze-sync ready");
    Ok(Running {
        addr,
        queue,
        delivery,
        state,
        shutdown,
        server,
        admin_server,
        workers,
        events_runtime,
        maintenance,
        shutdown_timeout: config.delivery.shutdown_timeout,
        pid_file,
    })
}

impl Running {
    /// Cancelled once stopping begins (`Running::shutdown`): for tasks beside the daemon,
    /// such as the service supervisor, that must end with it.
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.shutdown.ingest().clone()
    }

    /// Stops in pipeline order within the configured deadline (`shutdown.rs`); see the module
    /// doc. Every task that holds the queue is joined before its final sync.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown.ingest().cancel();
        if let Some(admin) = self.admin_server.take() {
            if tokio::time::timeout_at(deadline, admin).await.is_err() {
                tracing::warn!("admin requests still open at the deadline; abandoning them");
            }
            let _ = std::fs::remove_file(self.pid_file.with_file_name(ADMIN_SOCKET));
        }
        match tokio::time::timeout_at(deadline, &mut self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "ingest server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ingest server task failed"),
            Err(_) => {
                tracing::warn!("ingest requests still open at the deadline; abandoning them");
                self.server.abort();
                let _ = (&mut self.server).await;
            }
        }
        self.shutdown.delivery().cancel();
        for w in &mut self.workers {
            if tokio::time::timeout_at(deadline, &mut *w).await.is_err() {
                tracing::warn!(
                    "a Braze request was still in flight at the deadline; its records stay queued"
                );
                // Dropped where it waits: its leases were never completed, so its records
                // are still queued and go again after the restart.
                w.abort();
                let _ = w.await;
            }
        }
        drop(self.events_runtime);
        // Not abandoned: a step of upkeep holds the queue on a blocking thread, so it is
        // waited for (its steps are bounded) before the final sync.
        self.shutdown.upkeep().cancel();
        if let Err(e) = (&mut self.maintenance).await {
            tracing::error!(error = %e, "queue maintenance task failed");
        }
        self.queue.sync().await.context("final queue sync failed")?;
        let _ = std::fs::remove_file(&self.pid_file);
        tracing::info!(
            pending = self.queue.pending(),
            "aiq-braze-sync stopped cleanly"
        );
        Ok(())
    }
}
