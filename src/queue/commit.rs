//! Group commit: one thread makes everyone's writes durable with one sync. The queue runs
//! two, one for the event log and one for sled, so a request waits only for the store it
//! wrote to. A committer owns only the syncing: it never writes a record itself, and never
//! answers a waiter before the sync that covers the waiter's writes has succeeded.
//!
//! sled 0.34.7's `flush_async()` deadlocks with several concurrent callers and its `flush()`
//! does not fsync, so durability is ours. A writer inserts into sled, then asks this thread for
//! a commit and waits. The thread takes every request waiting at that moment, syncs once
//! (flush + fdatasync), and answers them all: the cost of a sync is shared by every request
//! that arrived while the previous one ran, which is what makes many small requests cheap.
//!
//! The same thread makes delivery progress durable: what left the queue is written without
//! anyone waiting for it, and a crash or power cut that loses it only sends those records
//! again. Between group commits, at most every `PROGRESS_SYNC_EVERY`, it runs the `progress`
//! sync, after the waiters of the commit before were answered, so ingest never waits for it
//! unless a request arrives while it runs. A cut then resends at most that interval's
//! deliveries (plus what was in flight), not the longer interval of sled's own flusher
//! (`store.rs`).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::QueueError;

type Waiter = oneshot::Sender<Result<(), String>>;

/// How often, at most, delivery progress written since the last sync is synced.
pub const PROGRESS_SYNC_EVERY: Duration = Duration::from_millis(20);

pub struct Committer {
    /// `None` only while dropping: closing the channel is what ends the thread.
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Joins the thread, so that once the queue is dropped the database it syncs is closed
    /// too (sled holds a lock on its directory until then).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    /// Starts the commit thread. `sync` must make durable every write done before it is
    /// called; `progress` is called every `PROGRESS_SYNC_EVERY` and should sync what was
    /// written without a waiter, if anything was. The thread ends when the `Committer` is
    /// dropped.
    pub fn spawn<F, P>(name: &str, sync: F, progress: P) -> std::io::Result<Committer>
    where
        F: Fn() -> Result<(), QueueError> + Send + 'static,
        P: Fn() -> Result<(), QueueError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let thread = thread::Builder::new().name(name.into()).spawn(move || {
            let mut progress_synced = Instant::now();
            // Logged once per run of failures, not at every `PROGRESS_SYNC_EVERY`.
            let mut progress_failing = false;
            loop {
                match rx.recv_timeout(PROGRESS_SYNC_EVERY) {
                    Ok(first) => {
                        let mut waiters = vec![first];
                        waiters.extend(rx.try_iter());
                        let result = sync().map_err(|e| e.to_string());
                        if let Err(e) = &result {
                            tracing::error!(error = %e, waiters = waiters.len(),
                                    "queue sync failed; the waiting requests are refused");
                        }
                        for w in waiters {
                            // A waiter that gave up (its request was dropped) needs no
                            // answer.
                            let _ = w.send(result.clone());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                if progress_synced.elapsed() < PROGRESS_SYNC_EVERY {
                    continue;
                }
                progress_synced = Instant::now();
                match progress() {
                    Ok(()) => progress_failing = false,
                    Err(e) if !progress_failing => {
                        progress_failing = true;
                        tracing::warn!(error = %e,
                                "delivery progress sync failed; a crash now would send more again");
                    }
                    Err(_) => {}
                }
            }
        })?;
        Ok(Committer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Returns once every write made before this call is on disk.
    pub async fn commit(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        let sender = self.tx.as_ref().ok_or(QueueError::Closed)?;
        sender.send(tx).map_err(|_| QueueError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Sync(e)),
            Err(_) => Err(QueueError::Closed),
        }
    }
}
