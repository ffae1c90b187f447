//! Delivery: workers that drain the queue into Braze.
//!
//! Each worker loops: wait for the gate (backoff, `Retry-After`, rate ceiling), lease a
//! batch that fits one request, send it, and complete every record with a named outcome:
//! delivered, dead (Braze refused that record, with its reason) or retry (left in the queue, in
//! order). A whole-request 400 or a 413 is answered by splitting the batch in halves until the
//! record at fault stands alone; it alone is dead-lettered.

pub mod gate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::braze::{wire, BrazeClient, TrackOutcome};
use crate::config::UpdateExistingOnly;
use crate::queue::format::LANE_EVENTS;
use crate::queue::{BatchLimits, Leased, Outcome, Queue, QueueError};
use gate::{Failure, Gate, Permit};

/// Counters for `queue stats` and `/metrics`.
#[derive(Default)]
pub struct DeliveryCounters {
    pub requests_accepted: AtomicU64,
    pub requests_refused: AtomicU64,
    pub requests_failed: AtomicU64,
    pub records_delivered: AtomicU64,
    pub records_dead: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryStats {
    pub health: gate::Health,
    pub requests_accepted: u64,
    pub requests_refused: u64,
    pub requests_failed: u64,
    pub records_delivered: u64,
    pub records_dead: u64,
}

pub struct Delivery {
    pub queue: Arc<Queue>,
    pub client: BrazeClient,
    pub gate: Gate,
    pub limits: BatchLimits,
    /// The `_update_existing_only` flag each kind of `/v1` record is sent with.
    pub policy: UpdateExistingOnly,
    pub counters: DeliveryCounters,
    /// How many workers may send membership-only batches at once: workers - 1 (at least 1).
    pub backfill_slots: usize,
    /// Workers sending a membership-only batch right now.
    pub backfill_in_flight: AtomicUsize,
}

impl Delivery {
    pub fn stats(&self) -> DeliveryStats {
        let c = &self.counters;
        DeliveryStats {
            health: self.gate.health(),
            requests_accepted: c.requests_accepted.load(Ordering::Relaxed),
            requests_refused: c.requests_refused.load(Ordering::Relaxed),
            requests_failed: c.requests_failed.load(Ordering::Relaxed),
            records_delivered: c.records_delivered.load(Ordering::Relaxed),
            records_dead: c.records_dead.load(Ordering::Relaxed),
        }
    }

    pub fn spawn_workers(
        self: &Arc<Self>,
        n: usize,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        (0..n)
            .map(|id| {
                let this = Arc::clone(self);
                let stop = stop.clone();
                tokio::spawn(async move { this.worker(id, stop).await })
            })
            .collect()
    }

    async fn worker(&self, id: usize, mut stop: watch::Receiver<bool>) {
        tracing::debug!(worker = id, "delivery worker started");
        loop {
            let Some(permit) = self.gate.acquire(&mut stop).await else {
                break;
            };
            // At most workers - 1 may carry memberships alone, so one is always free for
            // events however big the backfill (SPEC guarantee 7).
            let backfill_slot = self
                .backfill_in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.backfill_slots).then_some(n + 1)
                })
                .is_ok();
            let leased = self.queue.lease_lanes(&self.limits, backfill_slot);
            let holds_slot = backfill_slot
                && matches!(&leased, Ok(items) if !items.is_empty() && items.iter().all(|l| l.lane != LANE_EVENTS));
            if backfill_slot && !holds_slot {
                self.backfill_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            let items = match leased {
                Ok(items) => items,
                Err(e) => {
                    self.gate.unused(permit);
                    if !matches!(e, QueueError::Busy) {
                        tracing::error!(error = %e, "cannot read the queue");
                    }
                    tokio::time::sleep(Duration::from_millis(if matches!(e, QueueError::Busy) {
                        10
                    } else {
                        1000
                    }))
                    .await;
                    continue;
                }
            };
            if items.is_empty() {
                self.gate.unused(permit);
                tokio::select! {
                    _ = self.queue.wait_for_work(Duration::from_millis(250)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let results = self.deliver(items, permit, &mut stop).await;
            if holds_slot {
                self.backfill_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            self.record(&results);
            if let Err(e) = self.queue.complete(results) {
                // The records stay queued and will be sent again: a duplicate, not a loss.
                tracing::error!(error = %e, "could not record delivery outcomes; records will be resent");
            }
        }
        tracing::debug!(worker = id, "delivery worker stopped");
    }

    fn record(&self, results: &[(Leased, Outcome)]) {
        let (mut delivered, mut dead) = (0, 0);
        for (_, o) in results {
            match o {
                Outcome::Delivered => delivered += 1,
                Outcome::Dead(_) => dead += 1,
                Outcome::Retry => {}
            }
        }
        self.counters
            .records_delivered
            .fetch_add(delivered, Ordering::Relaxed);
        self.counters
            .records_dead
            .fetch_add(dead, Ordering::Relaxed);
    }

    /// Sends leased records, splitting on a whole-request refusal, and says what became of
    /// each. Stops at the first transient failure: what is left is `Retry`.
    pub async fn deliver(
        &self,
        items: Vec<Leased>,
        permit: Permit,
        stop: &mut watch::Receiver<bool>,
    ) -> Vec<(Leased, Outcome)> {
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
            let outcome = self.client.track(std::mem::take(&mut body.json)).await;
            match outcome {
                TrackOutcome::Accepted { errors, rate } => {
                    self.gate.success(p, rate.remaining, rate.reset_in);
                    self.counters
                        .requests_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    let mut refused: HashMap<usize, String> = HashMap::new();
                    for e in errors {
                        for &pos in body.records_of(&e.input_array, e.index) {
                            refused.insert(pos, format!("Braze refused the object: {}", e.reason));
                        }
                    }
                    for (pos, item) in part.into_iter().enumerate() {
                        let outcome = refused
                            .remove(&pos)
                            .map_or(Outcome::Delivered, Outcome::Dead);
                        done.push((item, outcome));
                    }
                }
                TrackOutcome::Refused { .. } | TrackOutcome::TooLarge => {
                    // Braze answered, so it is up; the batch itself is the problem.
                    self.gate.success(p, None, None);
                    self.counters
                        .requests_refused
                        .fetch_add(1, Ordering::Relaxed);
                    let reason = match &outcome {
                        TrackOutcome::Refused { status, message } => {
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
                    self.gate
                        .failure(p, Failure::Misconfigured(format!("{status}: {message}")));
                    retry_all(&mut done, part, &mut todo);
                    break;
                }
                TrackOutcome::Retry { reason, after } => {
                    self.counters
                        .requests_failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.gate.failure(p, Failure::Transient { reason, after });
                    retry_all(&mut done, part, &mut todo);
                    break;
                }
            }
        }
        done
    }
}

fn retry_all(done: &mut Vec<(Leased, Outcome)>, part: Vec<Leased>, todo: &mut Vec<Vec<Leased>>) {
    done.extend(part.into_iter().map(|i| (i, Outcome::Retry)));
    for rest in todo.drain(..) {
        done.extend(rest.into_iter().map(|i| (i, Outcome::Retry)));
    }
}
