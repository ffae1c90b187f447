//! The seam: the queue as ingest, delivery, snapshots and the commands use it.
//!
//! `Backend` is everything above the queue may ask of it; it never names sled, a key or a
//! lane byte. The sled queue (`Queue`) is its first implementation; a second (a queue shared
//! by several daemons) is judged against the promises written on each method. Opening,
//! syncing and upkeep are the daemon's business with the backend it built, never the seam's.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use super::{
    BatchLimits, Leased, Outcome, PurgeReport, Queue, QueueError, RecordView, RetryReport,
    Selection, Staged, Stats,
};
use crate::record::Record;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Backend: Send + Sync {
    /// Durably queues every record, or none: once this returns `Ok`, the records survive a
    /// crash and a power cut, and will be leased until completed as delivered or dead.
    /// `skip_unchanged: false` queues every value even if Braze was lately sent it. A newer
    /// plain value of a user's attribute may replace a pending one (last accepted wins).
    fn enqueue_with(
        &self,
        records: Vec<Record>,
        skip_unchanged: bool,
    ) -> BoxFuture<'_, Result<(), QueueError>>;

    /// `enqueue_with`, skipping values Braze was lately sent.
    fn enqueue(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), QueueError>> {
        self.enqueue_with(records, true)
    }

    /// The first half of an enqueue for a large request, blocking (call it off the runtime's
    /// threads): stages the records, checking the bounds for all of them first, so that a
    /// request over them stages nothing. Not durable until `commit_staged`.
    fn stage_blocking(
        &self,
        records: &[Record],
        skip_unchanged: bool,
    ) -> Result<Staged, QueueError>;

    /// Makes what `stage_blocking` staged durable, as `enqueue` would.
    fn commit_staged(&self, staged: Staged) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Whether `incoming` more records fit the bounds; `Full`, naming the bound, if not.
    fn check_bounds(&self, incoming: u64) -> Result<(), QueueError>;

    /// The disk bound, in bytes.
    fn max_disk_bytes(&self) -> u64;

    /// The oldest pending records that fit one Braze request (`limits`), events first, then
    /// (if `memberships`) attribute updates. Never two updates of one user's attribute in
    /// flight at once; an event comes with its user's earlier pending updates. Leased records
    /// stay queued until `complete`; a crash makes them pending again.
    fn lease(&self, limits: &BatchLimits, memberships: bool) -> Result<Vec<Leased>, QueueError>;

    /// Ends leases: `Delivered` leaves the queue, `Dead` moves to the dead letters with its
    /// reason, `Retry` stays where it was, in order.
    fn complete(&self, results: Vec<(Leased, Outcome)>) -> Result<(), QueueError>;

    /// Completes once new work may be there after this call; take it before leasing.
    fn work_signal(&self) -> tokio::sync::futures::Notified<'_>;

    /// Records pending, leased ones included.
    fn pending(&self) -> u64;

    fn stats(&self) -> Result<Stats, QueueError>;

    /// Since when, and why, writes to the disk have been failing; `None` once one succeeds.
    fn storage_failure(&self) -> Option<(Instant, String)>;

    /// The oldest `limit` pending records, in acceptance order.
    fn peek(&self, limit: usize) -> Result<Vec<RecordView>, QueueError>;

    /// The oldest `limit` dead letters, with Braze's reasons.
    fn dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError>;

    /// The newest `limit` dead letters, newest first.
    fn latest_dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError>;

    /// Puts dead letters back at the end of their lane; an update older than one accepted
    /// since for the same attribute is dropped as superseded instead.
    fn retry_dead<'a>(
        &'a self,
        selection: &'a Selection,
    ) -> BoxFuture<'a, Result<RetryReport, QueueError>>;

    /// Deletes dead letters.
    fn purge_dead<'a>(
        &'a self,
        selection: &'a Selection,
    ) -> BoxFuture<'a, Result<PurgeReport, QueueError>>;
}

impl Backend for Queue {
    fn enqueue_with(
        &self,
        records: Vec<Record>,
        skip_unchanged: bool,
    ) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(Queue::enqueue_with(self, records, skip_unchanged))
    }

    fn stage_blocking(
        &self,
        records: &[Record],
        skip_unchanged: bool,
    ) -> Result<Staged, QueueError> {
        Queue::stage_blocking(self, records, skip_unchanged)
    }

    fn commit_staged(&self, staged: Staged) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(Queue::commit_staged(self, staged))
    }

    fn check_bounds(&self, incoming: u64) -> Result<(), QueueError> {
        Queue::check_bounds(self, incoming)
    }

    fn max_disk_bytes(&self) -> u64 {
        Queue::max_disk_bytes(self)
    }

    fn lease(&self, limits: &BatchLimits, memberships: bool) -> Result<Vec<Leased>, QueueError> {
        Queue::lease_lanes(self, limits, memberships)
    }

    fn complete(&self, results: Vec<(Leased, Outcome)>) -> Result<(), QueueError> {
        Queue::complete(self, results)
    }

    fn work_signal(&self) -> tokio::sync::futures::Notified<'_> {
        Queue::work_signal(self)
    }

    fn pending(&self) -> u64 {
        Queue::pending(self)
    }

    fn stats(&self) -> Result<Stats, QueueError> {
        Queue::stats(self)
    }

    fn storage_failure(&self) -> Option<(Instant, String)> {
        Queue::storage_failure(self)
    }

    fn peek(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        Queue::peek(self, limit)
    }

    fn dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        Queue::dead(self, limit)
    }

    fn latest_dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        Queue::latest_dead(self, limit)
    }

    fn retry_dead<'a>(
        &'a self,
        selection: &'a Selection,
    ) -> BoxFuture<'a, Result<RetryReport, QueueError>> {
        Box::pin(Queue::retry_dead(self, selection))
    }

    fn purge_dead<'a>(
        &'a self,
        selection: &'a Selection,
    ) -> BoxFuture<'a, Result<PurgeReport, QueueError>> {
        Box::pin(Queue::purge_dead(self, selection))
    }
}
