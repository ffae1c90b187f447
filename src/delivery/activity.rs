//! What the workers are doing, for the systemd watchdog.
//!
//! A worker waits a lot, legitimately: for work, for its rate slot, through a backoff that may
//! last a minute. What must never last is a step with its own bound: a call into the queue or
//! one HTTP request (bounded by `braze.request_timeout_ms`). Each worker marks when it enters
//! such a step and clears the mark when it leaves, so a worker stuck inside one (a hung disk,
//! a runtime bug, a lost timeout) shows as busy for longer than any bound allows. The
//! watchdog then stops pinging systemd, which restarts the service; the queue on disk keeps
//! everything. This module only keeps the marks: it never stops or restarts a worker itself
//! (`service.rs` reads the marks).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Activity {
    epoch: Instant,
    /// Per worker: milliseconds since `epoch` + 1 when the current bounded step began; 0
    /// while the worker is between steps.
    busy_since: Vec<AtomicU64>,
}

/// Clears the worker's mark when the step ends, however it ends.
pub struct Busy<'a> {
    slot: &'a AtomicU64,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new(workers: usize) -> Activity {
        Activity {
            epoch: Instant::now(),
            busy_since: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Marks `worker` as inside a bounded step until the guard drops.
    pub fn busy(&self, worker: usize) -> Busy<'_> {
        let slot = &self.busy_since[worker % self.busy_since.len()];
        slot.store(self.now_ms(), Ordering::Relaxed);
        Busy { slot }
    }

    /// How long the longest-running bounded step has been running.
    pub fn longest_step(&self) -> Duration {
        let now = self.now_ms();
        let oldest = self
            .busy_since
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
            .min();
        Duration::from_millis(oldest.map_or(0, |since| now.saturating_sub(since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_counts_while_it_runs_and_stops_counting_when_it_ends() {
        let a = Activity::new(2);
        assert_eq!(a.longest_step(), Duration::ZERO);
        let guard = a.busy(1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.longest_step() >= Duration::from_millis(25));
        drop(guard);
        assert_eq!(a.longest_step(), Duration::ZERO);
    }
}
