//! The one shutdown signal, in the pipeline's order.
//!
//! A `Shutdown` is handed to every task the daemon starts; each waits on the stage that stops
//! it. `Running::shutdown` moves through the stages in order and joins the tasks of each
//! before the next: ingest first (new requests get 503, those in flight are answered), then
//! delivery (workers stop between batches), then upkeep (the maintenance task, after the step
//! it is in). Only then is the queue synced, so nothing writes to it after its final sync.
//!
//! It never decides when to stop: the command that runs the daemon does (a signal, a storage
//! failure), and tests do.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    ingest: CancellationToken,
    delivery: CancellationToken,
    upkeep: CancellationToken,
}

impl Shutdown {
    /// Cancelled once stopping has begun: ingest stops taking requests.
    pub fn ingest(&self) -> &CancellationToken {
        &self.ingest
    }

    /// Cancelled once ingest has stopped: workers stop between batches.
    pub fn delivery(&self) -> &CancellationToken {
        &self.delivery
    }

    /// Cancelled once delivery has stopped: the maintenance task ends after its current step.
    pub fn upkeep(&self) -> &CancellationToken {
        &self.upkeep
    }

    /// Whether stopping has begun.
    pub fn stopping(&self) -> bool {
        self.ingest.is_cancelled()
    }
}
