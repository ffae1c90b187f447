//! `/metrics`: what the daemon has done and is doing, in the Prometheus exposition format
//! (OpenMetrics text, through the `prometheus-client` crate).
//!
//! The counters live where the work happens (the queue counts what it accepts and skips,
//! delivery what Braze took, refused or rate-limited) as plain atomics that `queue stats`
//! reads too. A scrape copies them into a fresh registry, so there is one source for each
//! number and nothing to keep in step. The request-latency histogram is the one live
//! `prometheus-client` metric; the registry gets a handle to it. This module never keeps a
//! count of its own.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::AtomicU64;

use prometheus_client::registry::{Registry, Unit};

use crate::delivery::gate::Health;
use crate::delivery::DeliveryStats;
use crate::queue::Stats;

/// Every metric of the daemon's own starts with this (`aiq_braze_sync_`); the process
/// metrics carry the names every Prometheus client gives them (`process_…`).
pub const PREFIX: &str = "aiq_braze_sync";

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

fn counter_family<'a>(
    label: &'static str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in values {
        family
            .get_or_create(&vec![(label, value.to_string())])
            .inc_by(n);
    }
    family
}

fn counter(n: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(n);
    c
}

fn gauge(n: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
    g
}

/// Renders every metric. `queue` is `None` when the queue could not be read (it is being
/// rebuilt); its metrics are then left out of this scrape rather than reported as zero.
/// `not_ready` is the cause `/readyz` gives for a 503, if it gives one.
pub fn render(
    queue: Option<&Stats>,
    delivery: &DeliveryStats,
    latency: &Histogram,
    not_ready: Option<&str>,
) -> String {
    let mut root = Registry::default();
    register_process(&mut root);
    let r = root.sub_registry_with_prefix(PREFIX);
    r.register(
        "ready",
        "1 when /readyz answers 200; 0 with the cause in not_ready_cause.",
        gauge(u64::from(not_ready.is_none())),
    );
    r.register(
        "not_ready_cause",
        "1 for why /readyz answers 503: stopping, storage (writes to disk failing) or paused \
         (Braze refuses the key or endpoint); absent when ready.",
        {
            let f = Family::<Labels, Gauge>::default();
            if let Some(cause) = not_ready {
                f.get_or_create(&vec![("cause", cause.to_string())]).set(1);
            }
            f
        },
    );
    r.register("build_info", "1, with the running version as a label.", {
        let f = Family::<Labels, Gauge>::default();
        f.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        f
    });
    if let Some(q) = queue {
        r.register(
            "records_accepted",
            "Records durably accepted since the daemon started, by kind.",
            counter_family(
                "kind",
                q.accepted_by_kind.iter().map(|(k, n)| (k.as_str(), *n)),
            ),
        );
        r.register(
            "records_skipped_unchanged",
            "Attribute updates not sent because Braze already had that value, by kind.",
            counter_family(
                "kind",
                q.skipped_unchanged_by_kind
                    .iter()
                    .map(|(k, n)| (k.as_str(), *n)),
            ),
        );
        r.register(
            "records_coalesced",
            "Attribute updates replaced by a newer value before they were sent.",
            counter(q.coalesced_total),
        );
        r.register("queue_pending", "Records waiting for Braze, by lane.", {
            let f = Family::<Labels, Gauge>::default();
            f.get_or_create(&vec![("lane", "events".into())])
                .set(q.pending_events as i64);
            f.get_or_create(&vec![("lane", "attributes".into())])
                .set(q.pending_attributes as i64);
            f
        });
        r.register(
            "queue_in_flight",
            "Records sent to Braze and not yet answered.",
            gauge(q.in_flight),
        );
        r.register(
            "queue_dead",
            "Records in the dead-letter queue.",
            gauge(q.dead),
        );
        r.register_with_unit(
            "queue_max_disk",
            "The disk bound (queue.max_disk_bytes): past it ingest gets 503.",
            Unit::Bytes,
            gauge(q.max_disk_bytes),
        );
        r.register(
            "queue_max_records",
            "The bound on pending records (queue.max_records): past it ingest gets 503.",
            gauge(q.max_records),
        );
        r.register_with_unit(
            "queue_disk",
            "Space the queue occupies on disk.",
            Unit::Bytes,
            gauge(q.disk_bytes),
        );
        r.register_with_unit(
            "queue_oldest_pending_age",
            "Age of the oldest pending record (0 when none is pending).",
            Unit::Seconds,
            {
                let g = Gauge::<f64, AtomicU64>::default();
                g.set(q.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
                g
            },
        );
        r.register(
            "queue_compactions",
            "Queue rebuilds that gave disk space back.",
            counter(q.compactions_total),
        );
        r.register(
            "queue_lost",
            "Records given up, at most, when damaged queue files were accepted (run --accept-loss)",
            counter(q.lost_total),
        );
    }
    r.register(
        "records_delivered",
        "Records Braze took, by kind.",
        counter_family(
            "kind",
            delivery.delivered_by_kind.iter().map(|(k, n)| (*k, *n)),
        ),
    );
    r.register(
        "records_dead",
        "Records Braze refused on their own, moved to the dead letters, by kind.",
        counter_family("kind", delivery.dead_by_kind.iter().map(|(k, n)| (*k, *n))),
    );
    r.register(
        "records_retried",
        "Records handed back to the queue to be sent again after a failed request.",
        counter(delivery.records_retried),
    );
    r.register(
        "braze_requests",
        "Requests to Braze's /users/track by outcome: accepted (2xx), refused (400/413, the \
         batch is split), rate_limited (429), failed (5xx, timeouts, network), \
         misconfigured (401/403/404).",
        counter_family("outcome", delivery.requests_by_outcome()),
    );
    r.register_with_unit(
        "braze_request_duration",
        "Time from sending a request to Braze to its answer.",
        Unit::Seconds,
        latency.clone(),
    );
    r.register_with_unit(
        "rate_limit_wait",
        "Time workers waited under the rate ceiling or Braze's pacing.",
        Unit::Seconds,
        {
            let c = Counter::<f64, std::sync::atomic::AtomicU64>::default();
            c.inc_by(delivery.rate_limit_wait_seconds);
            c
        },
    );
    r.register(
        "delivery_in_flight",
        "Requests to Braze in flight now.",
        gauge(delivery.in_flight as u64),
    );
    r.register(
        "delivery_concurrency_limit",
        "Requests to Braze that may be in flight now: adapts to Braze's answers, up to delivery.workers.",
        gauge(delivery.concurrency_limit as u64),
    );
    r.register(
        "delivery_state",
        "1 for the state delivery is in: delivering, retrying (backing off after transient \
         failures) or paused (Braze refuses the key or endpoint).",
        {
            let f = Family::<Labels, Gauge>::default();
            let now = match delivery.health {
                Health::Delivering => "delivering",
                Health::Retrying { .. } => "retrying",
                Health::Paused { .. } => "paused",
            };
            for state in ["delivering", "retrying", "paused"] {
                f.get_or_create(&vec![("state", state.into())])
                    .set(i64::from(state == now));
            }
            f
        },
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    encode(&mut out, &root).expect("encoding metrics into a String cannot fail");
    out
}

/// The process metrics Prometheus clients conventionally export, read from `/proc/self`:
/// resident memory, open and allowed descriptors, CPU time and start time. One that cannot
/// be read (not Linux, a restricted `/proc`) is left out.
fn register_process(r: &mut Registry) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // The fields after the command name, which may hold spaces: `state` is field 3.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let c = Counter::<f64, AtomicU64>::default();
        c.inc_by((utime + stime) as f64 / ticks);
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time spent.",
            Unit::Seconds,
            c,
        );
    }
    if let Some(rss_pages) = field(24) {
        let page = rustix::param::page_size() as u64;
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory size.",
            Unit::Bytes,
            gauge(rss_pages * page),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        r.register(
            "process_open_fds",
            "Open file descriptors.",
            gauge(fds.count() as u64),
        );
    }
    if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        r.register("process_max_fds", "The open-file limit.", gauge(max));
    }
    if let (Some(start_ticks), Ok(boot)) = (field(22), boot_time()) {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(boot + start_ticks as f64 / ticks);
        r.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch.",
            Unit::Seconds,
            g,
        );
    }
}

/// The system's boot time, in seconds since the Unix epoch (`btime` in `/proc/stat`).
fn boot_time() -> Result<f64, ()> {
    std::fs::read_to_string("/proc/stat")
        .map_err(|_| ())?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        .ok_or(())
}
