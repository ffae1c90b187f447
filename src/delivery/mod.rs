//! Delivery: workers that drain the queue into Braze.
//!
//! Each worker loops: wait for the gate (backoff, `Retry-After`, rate ceiling), lease a
//! batch that fits one request, send it, and complete every record with a named outcome:
//! delivered, dead (Braze refused that record, with its reason) or retry (left in the queue, in
//! order). A whole-request 400 or a 413 is answered by splitting the batch in halves until the
//! record at fault stands alone; it alone is dead-lettered.
//!
//! Two kinds of worker share that loop. General workers take a slot under the adaptive limit
//! (`concurrency.rs`) and lease events first, then attribute updates. Event workers
//! (`event_reserve` of them) lease events only, on a runtime thread and a connection pool of
//! their own, in slots beside the limit, and go ahead of the gate's queue: however much of the
//! daemon a backfill occupies, an event waits only for an event worker to come back from
//! Braze.
//!
//! Delivery owns what becomes of each leased record; it never removes a record itself (the
//! queue does, on `complete`) and never dead-letters one Braze did not refuse.

pub mod activity;
pub mod concurrency;
pub mod gate;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::braze::client::{Connections, ObjectError};
use crate::braze::{wire, BrazeClient, TrackOutcome};
use crate::config::UpdateExistingOnly;
use crate::queue::{Backend, BatchLimits, Lane, Leased, Outcome, QueueError};
use crate::record::PerKind;
use concurrency::Signal;
use gate::{Failure, Gate, Permit};

/// How many of `delivery.workers` are event workers, sending events in reserved slots
/// beside the adaptive limit (`Delivery::event_worker`): a quarter, at most 8 and at least 1,
/// leaving at least one general worker (which alone delivers attribute updates).
/// With eight cycling, events arriving steadily wait for the next one about an eighth of
/// Braze's latency; more would only take a larger share of Braze's rate from the backfill.
pub fn event_reserve(workers: usize) -> usize {
    (workers / 4).clamp(1, 8).min(workers.saturating_sub(1))
}

/// Fills in each listed record's `object`: what it was, or will be, sent to Braze as
/// (`wire::object_of`).
pub fn with_objects(
    mut records: Vec<crate::queue::RecordView>,
    policy: &UpdateExistingOnly,
) -> Vec<crate::queue::RecordView> {
    for r in &mut records {
        r.object = r
            .record
            .as_ref()
            .map(|record| wire::object_of(record, policy));
    }
    records
}

/// Counters for `queue stats` and `/metrics`.
pub struct DeliveryCounters {
    pub requests_accepted: AtomicU64,
    pub requests_refused: AtomicU64,
    /// Transient failures and key/endpoint refusals alike; the two below are parts of it.
    pub requests_failed: AtomicU64,
    pub requests_rate_limited: AtomicU64,
    pub requests_misconfigured: AtomicU64,
    pub records_delivered: AtomicU64,
    pub records_dead: AtomicU64,
    pub delivered_by_kind: PerKind,
    pub dead_by_kind: PerKind,
    /// Records handed back to the queue to be sent again.
    pub records_retried: AtomicU64,
    /// Seconds from sending a request to Braze's answer (or the transport error).
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for DeliveryCounters {
    fn default() -> Self {
        DeliveryCounters {
            requests_accepted: Default::default(),
            requests_refused: Default::default(),
            requests_failed: Default::default(),
            requests_rate_limited: Default::default(),
            requests_misconfigured: Default::default(),
            records_delivered: Default::default(),
            records_dead: Default::default(),
            delivered_by_kind: Default::default(),
            dead_by_kind: Default::default(),
            records_retried: Default::default(),
            // 5 ms to about 40 s, doubling: the low buckets resolve fast answers; the top
            // buckets catch requests that end at the timeout.
            latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14),
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryStats {
    pub health: gate::Health,
    pub requests_accepted: u64,
    pub requests_refused: u64,
    pub requests_failed: u64,
    pub requests_rate_limited: u64,
    pub requests_misconfigured: u64,
    pub records_delivered: u64,
    pub records_dead: u64,
    pub records_retried: u64,
    /// Per kind: membership, attribute, event, purchase.
    pub delivered_by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub dead_by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Seconds workers spent waiting under the rate ceiling or Braze's pacing.
    pub rate_limit_wait_seconds: f64,
    /// Requests to Braze in flight now, and how many may be (`concurrency.rs`).
    pub in_flight: usize,
    pub concurrency_limit: usize,
}

pub struct Delivery {
    pub queue: Arc<dyn Backend>,
    pub client: BrazeClient,
    pub gate: Gate,
    pub limits: BatchLimits,
    /// The `_update_existing_only` flag each kind of `/v1` record is sent with.
    pub policy: UpdateExistingOnly,
    pub counters: DeliveryCounters,
    /// Requests in flight at once, adapting to Braze's answers (`concurrency.rs`), up to
    /// `delivery.workers`.
    pub limiter: concurrency::Limiter,
    /// General workers sending a batch of attribute updates alone right now: at most the limit
    /// less a quarter of it (and less one, unless the limit is one), so general workers keep
    /// carrying events however big the backfill.
    pub backfill_in_flight: AtomicUsize,
    /// Which workers are inside a bounded step, and since when (the watchdog's evidence).
    pub activity: activity::Activity,
}

impl DeliveryStats {
    /// Requests by what Braze answered, as `/metrics` and `/status` show them: accepted,
    /// refused, rate_limited, failed (transient failures other than 429) and misconfigured.
    pub fn requests_by_outcome(&self) -> [(&'static str, u64); 5] {
        let transient = self
            .requests_failed
            .saturating_sub(self.requests_rate_limited + self.requests_misconfigured);
        [
            ("accepted", self.requests_accepted),
            ("refused", self.requests_refused),
            ("rate_limited", self.requests_rate_limited),
            ("failed", transient),
            ("misconfigured", self.requests_misconfigured),
        ]
    }
}

impl Delivery {
    pub fn stats(&self) -> DeliveryStats {
        let c = &self.counters;
        DeliveryStats {
            health: self.gate.health(),
            requests_accepted: c.requests_accepted.load(Ordering::Relaxed),
            requests_refused: c.requests_refused.load(Ordering::Relaxed),
            requests_failed: c.requests_failed.load(Ordering::Relaxed),
            requests_rate_limited: c.requests_rate_limited.load(Ordering::Relaxed),
            requests_misconfigured: c.requests_misconfigured.load(Ordering::Relaxed),
            records_delivered: c.records_delivered.load(Ordering::Relaxed),
            records_dead: c.records_dead.load(Ordering::Relaxed),
            records_retried: c.records_retried.load(Ordering::Relaxed),
            delivered_by_kind: c.delivered_by_kind.by_name(),
            dead_by_kind: c.dead_by_kind.by_name(),
            rate_limit_wait_seconds: self.gate.paced().as_secs_f64(),
            in_flight: self.limiter.in_flight(),
            concurrency_limit: self.limiter.limit(),
        }
    }

    /// Starts the delivery tasks for a cap of `workers` requests in flight: `event_reserve`
    /// of them event workers, on `events_runtime`, the rest general workers under the
    /// adaptive limit (which was built for `workers - event_reserve`) on the current one.
    pub fn spawn_workers(
        self: &Arc<Self>,
        workers: usize,
        stop: CancellationToken,
        events_runtime: &tokio::runtime::Handle,
    ) -> Vec<JoinHandle<()>> {
        let events = event_reserve(workers);
        (0..workers)
            .map(|id| {
                let this = Arc::clone(self);
                let stop = stop.clone();
                if id < events {
                    events_runtime.spawn(async move { this.event_worker(id, stop).await })
                } else {
                    tokio::spawn(async move { this.worker(id, stop).await })
                }
            })
            .collect()
    }

    /// A general worker: takes a slot under the adaptive limit and its turn at the gate,
    /// then leases events first and attribute updates after.
    async fn worker(&self, id: usize, stop: CancellationToken) {
        tracing::debug!(worker = id, "delivery worker started");
        loop {
            let Some(mut slot) = self.limiter.acquire(&stop).await else {
                break;
            };
            let asked = std::time::Instant::now();
            let Some(permit) = self.gate.acquire(&stop).await else {
                break;
            };
            slot.paced(asked.elapsed());
            // At most three quarters of the limit (and at least one less) may carry
            // attribute updates alone, so general workers carry events too however big the
            // backfill.
            let limit = self.limiter.limit();
            let backfill_slots = limit.saturating_sub((limit / 4).max(1)).max(1);
            let backfill_slot = self
                .backfill_in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < backfill_slots).then_some(n + 1)
                })
                .is_ok();
            let signal = self.queue.work_signal();
            let leased = {
                let _busy = self.activity.busy(id);
                self.queue.lease(&self.limits, backfill_slot)
            };
            let holds_slot = backfill_slot
                && matches!(&leased, Ok(items) if !items.is_empty() && items.iter().all(|l| l.lane != Lane::Events));
            if backfill_slot && !holds_slot {
                self.backfill_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            let items = match leased {
                Ok(items) if !items.is_empty() => items,
                other => {
                    // Waiting for work is not a request in flight: the slot goes back first.
                    drop(slot);
                    self.gate.unused(permit);
                    self.wait_for_work(other.err(), signal, &stop).await;
                    continue;
                }
            };
            let (results, answer) = self
                .deliver(id, items, permit, &stop, Connections::Shared)
                .await;
            slot.finish(answer);
            if holds_slot {
                self.backfill_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            self.complete(id, results);
        }
        tracing::debug!(worker = id, "delivery worker stopped");
    }

    /// An event worker: leases events only (with the updates of their users that must go
    /// before them), then goes ahead of the gate's queue of paced requests and sends them in
    /// a reserved slot. However full the limit and the gate's queue are with a backfill, an
    /// event waits for one of these workers to come back from Braze, not for the backfill.
    async fn event_worker(&self, id: usize, stop: CancellationToken) {
        tracing::debug!(worker = id, "event worker started");
        while !stop.is_cancelled() {
            let signal = self.queue.work_signal();
            let leased = {
                let _busy = self.activity.busy(id);
                self.queue.lease(&self.limits, false)
            };
            let items = match leased {
                Ok(items) if !items.is_empty() => items,
                other => {
                    self.wait_for_work(other.err(), signal, &stop).await;
                    continue;
                }
            };
            // Leased first, so that a turn at the gate is taken only for a request that will
            // go. Backoff and `Retry-After` still hold it back, with its events leased.
            let Some(permit) = self.gate.acquire_first(&stop).await else {
                let results = items.into_iter().map(|l| (l, Outcome::Retry)).collect();
                self.complete(id, results);
                break;
            };
            let slot = self.limiter.reserved();
            let (results, answer) = self
                .deliver(id, items, permit, &stop, Connections::Events)
                .await;
            slot.finish(answer);
            self.complete(id, results);
        }
        tracing::debug!(worker = id, "event worker stopped");
    }

    /// After an empty lease, until new work is queued (or a while, or `stop`); after a failed
    /// one, a pause (short if the queue was only busy being rebuilt).
    async fn wait_for_work(
        &self,
        error: Option<QueueError>,
        signal: tokio::sync::futures::Notified<'_>,
        stop: &CancellationToken,
    ) {
        let pause = match error {
            None => {
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_millis(250), signal) => {}
                    _ = stop.cancelled() => {}
                }
                return;
            }
            Some(QueueError::Busy) => Duration::from_millis(10),
            Some(e) => {
                tracing::error!(error = %e, "cannot read the queue");
                Duration::from_millis(1000)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Counts what became of each record and writes it to the queue.
    fn complete(&self, id: usize, results: Vec<(Leased, Outcome)>) {
        self.record(&results);
        let _busy = self.activity.busy(id);
        if let Err(e) = self.queue.complete(results) {
            // The records stay queued and will be sent again: a duplicate, not a loss.
            tracing::error!(error = %e, "could not record delivery outcomes; records will be resent");
        }
    }

    fn record(&self, results: &[(Leased, Outcome)]) {
        let c = &self.counters;
        for (item, o) in results {
            let kind = item.stored.record.kind();
            match o {
                Outcome::Delivered => {
                    c.records_delivered.fetch_add(1, Ordering::Relaxed);
                    c.delivered_by_kind.add(kind, 1);
                }
                Outcome::Dead(_) => {
                    c.records_dead.fetch_add(1, Ordering::Relaxed);
                    c.dead_by_kind.add(kind, 1);
                }
                Outcome::Retry => {
                    c.records_retried.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends leased records, splitting on a whole-request refusal, and says what became of
    /// each. Stops at the first transient failure: what is left is `Retry`.
    pub async fn deliver(
        &self,
        worker: usize,
        items: Vec<Leased>,
        permit: Permit,
        stop: &CancellationToken,
        connections: Connections,
    ) -> (Vec<(Leased, Outcome)>, Signal) {
        // What the first answer said of Braze's load; a push-back later overrides it.
        let mut signal = Signal::Nothing;
        let mut done = Vec::with_capacity(items.len());
        let mut todo = vec![items];
        let mut permit = Some(permit);
        while let Some(part) = todo.pop() {
            let p = match permit.take() {
                Some(p) => p,
                None => match self.gate.acquire(stop).await {
                    Some(p) => p,
                    None => {
                        retry_all(&mut done, part, &mut todo);
                        break;
                    }
                },
            };
            let mut body = wire::build(&part, &self.policy);
            let sent_at = std::time::Instant::now();
            let outcome = {
                let _busy = self.activity.busy(worker);
                self.client
                    .track(connections, std::mem::take(&mut body.json))
                    .await
            };
            let latency = sent_at.elapsed();
            self.counters.latency.observe(latency.as_secs_f64());
            signal = match (&outcome, signal) {
                (TrackOutcome::Retry { .. }, _) => Signal::PushedBack,
                (TrackOutcome::Misconfigured { .. }, s) => s,
                (_, Signal::Nothing) => Signal::Answered(latency),
                (_, s) => s,
            };
            match outcome {
                TrackOutcome::Accepted { errors, rate } => {
                    if let (Some(limit), Some(reset_in)) = (rate.limit, rate.reset_in) {
                        self.gate.learn(limit, reset_in);
                    }
                    self.gate.success(p, rate.remaining, rate.reset_in);
                    self.counters
                        .requests_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    let refused = refused_records(&body, &errors);
                    settle_refusals(part, refused, true, &mut done, &mut todo);
                }
                // Braze named every object with its own reason: nothing was applied and
                // each object's fault is known, so there is nothing to find by splitting.
                TrackOutcome::Refused { ref errors, .. }
                    if refused_records(&body, errors).named() == part.len() =>
                {
                    self.gate.success(p, None, None);
                    self.counters
                        .requests_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        records = part.len(),
                        "dead-lettering records Braze refuses, each with its reason"
                    );
                    let refused = refused_records(&body, errors);
                    settle_refusals(part, refused, false, &mut done, &mut todo);
                }
                TrackOutcome::Refused { .. } | TrackOutcome::TooLarge => {
                    // Braze answered, so it is up; the batch itself is the problem.
                    self.gate.success(p, None, None);
                    self.counters
                        .requests_refused
                        .fetch_add(1, Ordering::Relaxed);
                    let reason = match &outcome {
                        TrackOutcome::Refused {
                            status, message, ..
                        } => {
                            format!("Braze refused the request ({status}): {message}")
                        }
                        _ => "the record alone is over Braze's 4 MB request limit (413)".into(),
                    };
                    match wire::split_in_half(part, &self.policy) {
                        Ok((first, second)) => {
                            // Popped first-half first, so order is kept.
                            todo.push(second);
                            todo.push(first);
                        }
                        Err(single) => {
                            tracing::warn!(records = single.len(), %reason, "dead-lettering a record Braze refuses");
                            done.extend(
                                single
                                    .into_iter()
                                    .map(|i| (i, Outcome::Dead(reason.clone()))),
                            );
                        }
                    }
                }
                TrackOutcome::Misconfigured { status, message } => {
                    self.counters
                        .requests_failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .requests_misconfigured
                        .fetch_add(1, Ordering::Relaxed);
                    self.gate
                        .failure(p, Failure::Misconfigured(format!("{status}: {message}")));
                    retry_all(&mut done, part, &mut todo);
                    break;
                }
                TrackOutcome::Retry {
                    reason,
                    after,
                    rate_limited,
                } => {
                    self.counters
                        .requests_failed
                        .fetch_add(1, Ordering::Relaxed);
                    if rate_limited {
                        self.counters
                            .requests_rate_limited
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.gate.failure(p, Failure::Transient { reason, after });
                    retry_all(&mut done, part, &mut todo);
                    break;
                }
            }
        }
        (done, signal)
    }
}

/// What Braze's per-object errors say of a request's records.
#[derive(Default)]
struct Refusals {
    /// Records that were an object on their own: Braze refused exactly them, with this reason.
    dead: HashMap<usize, String>,
    /// Records merged with others into an object Braze refused: which of them was at fault
    /// is unknown, so each is sent again alone (the others' updates must not pay for it).
    alone: HashSet<usize>,
}

impl Refusals {
    fn named(&self) -> usize {
        self.dead.len() + self.alone.len()
    }
}

/// Positions (in the leased batch) of the records behind the objects Braze named in `errors`,
/// with its reason for each.
fn refused_records(body: &wire::TrackBody, errors: &[ObjectError]) -> Refusals {
    let mut refused = Refusals::default();
    for e in errors {
        match body.records_of(&e.input_array, e.index) {
            [pos] => {
                refused
                    .dead
                    .insert(*pos, format!("Braze refused the object: {}", e.reason));
            }
            several => refused.alone.extend(several),
        }
    }
    refused
}

/// Settles a request's records after Braze named some objects: refused single-record objects
/// go to the dead letters, records of refused merged objects are queued in `todo` to be sent
/// one by one (in their order), and the rest were delivered if `delivered`, else are sent
/// again too (a 400 applies nothing).
fn settle_refusals(
    part: Vec<Leased>,
    mut refused: Refusals,
    delivered: bool,
    done: &mut Vec<(Leased, Outcome)>,
    todo: &mut Vec<Vec<Leased>>,
) {
    let mut alone = Vec::new();
    for (pos, item) in part.into_iter().enumerate() {
        if let Some(reason) = refused.dead.remove(&pos) {
            done.push((item, Outcome::Dead(reason)));
        } else if refused.alone.contains(&pos) || !delivered {
            alone.push(item);
        } else {
            done.push((item, Outcome::Delivered));
        }
    }
    // Popped last-first: the first record goes first.
    todo.extend(alone.into_iter().rev().map(|item| vec![item]));
}

fn retry_all(done: &mut Vec<(Leased, Outcome)>, part: Vec<Leased>, todo: &mut Vec<Vec<Leased>>) {
    done.extend(part.into_iter().map(|i| (i, Outcome::Retry)));
    for rest in todo.drain(..) {
        done.extend(rest.into_iter().map(|i| (i, Outcome::Retry)));
    }
}
