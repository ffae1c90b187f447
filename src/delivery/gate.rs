//! The retry policy, shared by every worker: when the next request to Braze may go.
//!
//! One gate for all workers, because Braze's limits and outages are per account, not per
//! worker: a 429 or a 503 seen by one worker holds them all back. While Braze is failing only
//! one worker at a time probes it, so an outage costs one request per backoff step instead of
//! one per worker. Backoff is the `backoff` crate's exponential with jitter, with its 15-minute
//! give-up turned off: transient failures are retried for as long as they last. The gate owns
//! only when a request may go; it never sees a record and never decides what becomes of one.

use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use serde::Serialize;
use tokio::time::Instant;

/// What delivery is doing, for `/readyz`, `queue stats` and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Delivering,
    /// Transient failures; retrying with backoff.
    Retrying {
        reason: String,
        failures: u64,
    },
    /// Braze refuses our key or endpoint; nothing will work until someone fixes it.
    Paused {
        reason: String,
        failures: u64,
    },
}

struct State {
    backoff: ExponentialBackoff,
    not_before: Instant,
    next_slot: Instant,
    probe_in_flight: bool,
    health: Health,
    failures: u64,
    /// The rate ceiling as a gap between requests; changed by a reload.
    min_interval: Option<Duration>,
    /// The gap Braze's own limit asks for (`learn`), and the longest window seen.
    learned_interval: Option<Duration>,
    window: Duration,
    /// Turns taken ahead of the queue by `acquire_first`: each is given back by the next
    /// waiter whose turn comes, which waits for a new one at the end of the queue.
    owed: u32,
}

/// The share of Braze's limit the gate paces to: close to all of it, with room for the
/// jitter of timers and clocks, so that many requests in flight do not meet a 429.
const SHARE_OF_LIMIT: f64 = 0.95;

pub struct Gate {
    state: Mutex<State>,
    backoff_max: Duration,
    /// Time workers spent waiting for a slot under the rate ceiling or Braze's pacing, for
    /// `/metrics`.
    paced_ms: std::sync::atomic::AtomicU64,
}

fn interval_of(max_requests_per_second: Option<f64>) -> Option<Duration> {
    max_requests_per_second.map(|r| Duration::from_secs_f64(1.0 / r))
}

/// Permission to send one request. Report how it went with `Gate::success` / `failure`.
#[must_use]
pub struct Permit {
    probe: bool,
}

pub enum Failure {
    /// Transient; wait at least `after` if Braze said so.
    Transient {
        reason: String,
        after: Option<Duration>,
    },
    /// Key, permission or endpoint problem: wait at the backoff ceiling between probes.
    Misconfigured(String),
}

impl Gate {
    pub fn new(initial: Duration, max: Duration, max_requests_per_second: Option<f64>) -> Gate {
        let backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(initial)
            .with_max_interval(max)
            .with_multiplier(2.0)
            .with_randomization_factor(0.5)
            // The crate's default gives up after 15 minutes; our guarantee is never to.
            .with_max_elapsed_time(None)
            .build();
        let now = Instant::now();
        Gate {
            state: Mutex::new(State {
                backoff,
                not_before: now,
                next_slot: now,
                probe_in_flight: false,
                health: Health::Delivering,
                failures: 0,
                min_interval: interval_of(max_requests_per_second),
                learned_interval: None,
                window: Duration::ZERO,
                owed: 0,
            }),
            backoff_max: max,
            paced_ms: Default::default(),
        }
    }

    pub fn health(&self) -> Health {
        self.lock().health.clone()
    }

    /// Changes the rate ceiling (a reload); the next slot handed out follows it.
    pub fn set_max_requests_per_second(&self, max_requests_per_second: Option<f64>) {
        let mut s = self.lock();
        s.min_interval = interval_of(max_requests_per_second);
        s.next_slot = s.next_slot.min(Instant::now());
    }

    /// Total time workers waited for a slot under the rate ceiling or Braze's pacing.
    pub fn paced(&self) -> Duration {
        Duration::from_millis(self.paced_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Held only for arithmetic, never across an await.
        self.state.lock().expect("delivery gate lock poisoned")
    }

    /// Waits until a request may be sent. Returns `None` if `stop` fires first.
    pub async fn acquire(&self, stop: &CancellationToken) -> Option<Permit> {
        self.acquire_in_turn(stop, false).await
    }

    /// As `acquire`, but ahead of the requests already waiting for their turn under the rate
    /// ceiling: for events, which must not wait behind a backfill's queue of paced requests.
    /// The first of those to reach its turn gives it up and queues again at the end, so the
    /// number of requests sent in any window is unchanged; only their order is. Only one turn
    /// is owed at a time; until it is given back, this queues as `acquire` does. Backoff,
    /// `Retry-After` and probing bind it as any other.
    pub async fn acquire_first(&self, stop: &CancellationToken) -> Option<Permit> {
        self.acquire_in_turn(stop, true).await
    }

    async fn acquire_in_turn(&self, stop: &CancellationToken, first: bool) -> Option<Permit> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            // Decide under the lock, wait outside it: a std guard must not live across an await.
            let (wait, granted) = {
                let mut s = self.lock();
                let now = Instant::now();
                if now < s.not_before {
                    (s.not_before - now, None)
                } else if s.health != Health::Delivering && s.probe_in_flight {
                    // Someone is already asking Braze whether it is back.
                    (Duration::from_millis(50), None)
                } else {
                    let probe = s.health != Health::Delivering;
                    if probe {
                        s.probe_in_flight = true;
                    }
                    let turn = s.next_slot.max(now);
                    let slot = match s.min_interval.max(s.learned_interval) {
                        // One turn owed at a time: events that come faster than the
                        // queue pays them back queue like any other request.
                        Some(_) if first && turn > now && s.owed == 0 => {
                            s.owed += 1;
                            now
                        }
                        Some(interval) => {
                            if turn == now {
                                // Nobody waits for a turn, so nobody can give one back.
                                s.owed = 0;
                            }
                            s.next_slot = turn + interval;
                            turn
                        }
                        None => turn,
                    };
                    (slot - now, Some(Permit { probe }))
                }
            };
            if let Some(permit) = granted {
                if !wait.is_zero() {
                    self.paced_ms.fetch_add(
                        wait.as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    tokio::time::sleep(wait).await;
                    // A failure reported while we waited for our slot (a 429's Retry-After, a
                    // backoff) binds us too: give the permit up and wait again. Otherwise every
                    // worker queued behind the rate ceiling would send inside the window.
                    let mut s = self.lock();
                    if Instant::now() < s.not_before
                        || (!permit.probe && s.health != Health::Delivering)
                    {
                        if permit.probe {
                            s.probe_in_flight = false;
                        }
                        continue;
                    }
                    // An event went in this turn's stead.
                    if s.owed > 0 && !permit.probe {
                        s.owed -= 1;
                        continue;
                    }
                }
                return Some(permit);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    /// Hands back a permit that sent nothing (the queue was empty).
    pub fn unused(&self, permit: Permit) {
        if permit.probe {
            self.lock().probe_in_flight = false;
        }
    }

    /// What Braze's rate-limit headers say of its limit: `limit` requests a window, the
    /// current one ending in `reset_in`. The window's length is taken as the longest
    /// `reset_in` seen (whole seconds), and requests are spaced so that `SHARE_OF_LIMIT` of
    /// the limit is used: many requests in flight then approach the limit without a storm of
    /// 429s. The configured ceiling still applies when it is lower.
    pub fn learn(&self, limit: u64, reset_in: Duration) {
        if limit == 0 {
            return;
        }
        let mut s = self.lock();
        let window = Duration::from_secs(reset_in.as_secs_f64().ceil().max(1.0) as u64);
        s.window = s.window.max(window);
        let interval = s.window.div_f64(limit as f64 * SHARE_OF_LIMIT);
        s.learned_interval = Some(interval);
    }

    /// Braze answered 2xx. `remaining` and `reset_in` from its headers pace the workers so
    /// that the window's last requests are spread over what is left of it.
    pub fn success(&self, permit: Permit, remaining: Option<u64>, reset_in: Option<Duration>) {
        let mut s = self.lock();
        if permit.probe {
            s.probe_in_flight = false;
        }
        if s.health != Health::Delivering {
            tracing::info!(
                after_failures = s.failures,
                "Braze accepts requests again; delivery resumed"
            );
            s.health = Health::Delivering;
            s.failures = 0;
        }
        s.backoff.reset();
        if let (Some(remaining), Some(reset_in)) = (remaining, reset_in) {
            if remaining < 10 {
                let spread = reset_in / (remaining as u32 + 1);
                s.not_before = s.not_before.max(Instant::now() + spread);
            }
        }
    }

    /// The request failed; hold every worker back by the backoff (and at least as long as
    /// Braze asked). Logs once per change of state, not once per attempt.
    pub fn failure(&self, permit: Permit, failure: Failure) {
        let mut s = self.lock();
        if permit.probe {
            s.probe_in_flight = false;
        }
        s.failures += 1;
        let failures = s.failures;
        let step = s.backoff.next_backoff().unwrap_or(self.backoff_max);
        let (delay, health) = match failure {
            Failure::Transient { reason, after } => {
                // Braze's own word beats our guess: wait what it said, plus a little jitter
                // so the workers do not all come back in the same millisecond.
                let delay = after.map_or(step, |a| {
                    a + Duration::from_millis(fastrand::u64(
                        0..=(a.as_millis() as u64 / 10).min(1000),
                    ))
                });
                (delay, Health::Retrying { reason, failures })
            }
            Failure::Misconfigured(reason) => {
                (self.backoff_max, Health::Paused { reason, failures })
            }
        };
        let changed = std::mem::discriminant(&health) != std::mem::discriminant(&s.health);
        if changed {
            match &health {
                Health::Paused { reason, .. } => tracing::error!(%reason,
                    "Braze refuses our key or endpoint; delivery paused, everything stays queued"),
                Health::Retrying { reason, .. } => {
                    tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64,
                    "delivery to Braze failing; retrying with backoff")
                }
                Health::Delivering => {}
            }
        }
        s.health = health;
        s.not_before = s.not_before.max(Instant::now() + delay);
        // Every waiter queues again after the pause: the turns owed are void.
        s.owed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn stop() -> CancellationToken {
        CancellationToken::new()
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_holds_back_every_worker_at_least_that_long() {
        let gate = Gate::new(Duration::from_millis(10), Duration::from_secs(60), None);
        let rx = stop();
        let p = gate.acquire(&rx).await.unwrap();
        gate.failure(
            p,
            Failure::Transient {
                reason: "429".into(),
                after: Some(Duration::from_secs(5)),
            },
        );
        let start = Instant::now();
        let p = gate.acquire(&rx).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(5));
        gate.success(p, None, None);
        assert_eq!(gate.health(), Health::Delivering);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_stays_under_the_ceiling_without_giving_up() {
        let gate = Gate::new(Duration::from_millis(100), Duration::from_secs(2), None);
        let rx = stop();
        let mut waits = Vec::new();
        for _ in 0..40 {
            let start = Instant::now();
            let p = gate.acquire(&rx).await.unwrap();
            waits.push(start.elapsed());
            gate.failure(
                p,
                Failure::Transient {
                    reason: "503".into(),
                    after: None,
                },
            );
        }
        // Jitter is ±50%, so the ceiling can be exceeded by half of it at most.
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(3)));
        assert!(waits[39] >= Duration::from_secs(1), "{waits:?}");
        assert!(matches!(
            gate.health(),
            Health::Retrying { failures: 40, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_ceiling_spaces_requests_across_workers() {
        let gate = Gate::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
            Some(10.0),
        );
        let rx = stop();
        let start = Instant::now();
        for _ in 0..11 {
            let p = gate.acquire(&rx).await.unwrap();
            gate.success(p, None, None);
        }
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_goes_ahead_of_paced_requests_and_the_rate_holds() {
        let gate = Arc::new(Gate::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
            Some(10.0),
        ));
        let start = Instant::now();
        // Five backfill requests queue for their turns: 0, 100, … 400 ms.
        let queued: Vec<_> = (0..5)
            .map(|_| {
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    let rx = stop();
                    let p = gate.acquire(&rx).await.unwrap();
                    gate.success(p, None, None);
                    start.elapsed()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // An event at 150 ms goes at once, not at 500 ms behind them.
        let rx = stop();
        let p = gate.acquire_first(&rx).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(150));
        gate.success(p, None, None);
        let mut turns = Vec::new();
        for q in queued {
            turns.push(q.await.unwrap().as_millis());
        }
        turns.sort();
        // The request whose turn was at 200 ms gave it to the event and went at the end, at
        // 500 ms: six requests in six turns of 100 ms.
        assert_eq!(turns, vec![0, 100, 300, 400, 500]);
        let p = gate.acquire(&rx).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(600));
        gate.success(p, None, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_binds_a_worker_already_waiting_for_its_rate_slot() {
        let gate = Arc::new(Gate::new(
            Duration::from_millis(10),
            Duration::from_secs(60),
            Some(10.0),
        ));
        let rx = stop();
        let first = gate.acquire(&rx).await.unwrap();
        let start = Instant::now();
        // The second worker's slot is 100 ms away; it is sleeping towards it.
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            let rx = rx.clone();
            async move { gate.acquire(&rx).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.failure(
            first,
            Failure::Transient {
                reason: "429".into(),
                after: Some(Duration::from_secs(5)),
            },
        );
        assert!(waiting.await.unwrap());
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn few_requests_left_in_the_window_are_spread_over_what_is_left_of_it() {
        let gate = Gate::new(Duration::from_millis(10), Duration::from_secs(60), None);
        let rx = stop();
        let p = gate.acquire(&rx).await.unwrap();
        gate.success(p, Some(1), Some(Duration::from_secs(10)));
        let start = Instant::now();
        let p = gate.acquire(&rx).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // Plenty left: no pacing.
        gate.success(p, Some(5000), Some(Duration::from_secs(10)));
        let start = Instant::now();
        let _p = gate.acquire(&rx).await.unwrap();
        assert!(start.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_misconfigured_key_pauses_until_a_probe_succeeds() {
        let gate = Gate::new(Duration::from_millis(10), Duration::from_secs(30), None);
        let rx = stop();
        let p = gate.acquire(&rx).await.unwrap();
        gate.failure(p, Failure::Misconfigured("401 Invalid API Key".into()));
        assert!(matches!(gate.health(), Health::Paused { .. }));
        let start = Instant::now();
        let p = gate.acquire(&rx).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(30));
        gate.success(p, None, None);
        assert_eq!(gate.health(), Health::Delivering);
    }
}
