//! How many requests to Braze are in flight at once: a limit that adapts to Braze's answers.
//!
//! Each worker sends one request and waits for its answer, so throughput is the requests in
//! flight divided by Braze's latency: a fixed few cannot follow a Braze that answers slowly,
//! and a fixed many overrun one that rate-limits. Workers take a `Slot` before they lease;
//! the limit on slots moves with what Braze says:
//! - **slow start**: while nothing has pushed back, each answer that comes back fast raises
//!   the limit by two (it triples every round trip), from `START` up to `max`: reaching the
//!   `/users/track` ceiling of 1,000 requests a second
//!   (<https://www.braze.com/docs/api/api_limits>) at a latency of L seconds takes
//!   1,000 × L in flight, which this reaches in a few round trips;
//! - **additive increase** after the first push-back: by one per round trip (`1 / limit` an
//!   answer);
//! - **multiplicative decrease** on a 429, a 5xx, a timeout or a network error (halved), and
//!   when latency rises past twice the best seen (by a tenth), at most once per round trip;
//! - it only grows while it is used: an idle queue does not inflate it, and neither do
//!   requests the gate held back for the rate (`Slot::paced`).
//!
//! The limit never drops under `FLOOR` (or the cap, if lower). Event workers take `reserved`
//! slots beside it (`Delivery::event_worker`): they count as in flight and their answers can
//! lower the limit, but they never wait for it, so an event is not held back by a limit a
//! backfill has filled. The rate itself is the gate's business (`gate.rs`): this bounds what
//! is in flight, never when a request is sent; the gate spaces what is sent.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use tokio::sync::Notify;

/// Where the limit starts.
pub const START: f64 = 8.0;
/// The lowest it goes.
pub const FLOOR: f64 = 2.0;

/// What an answer says about Braze's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// Answered (2xx, or a refusal of the records themselves) after `latency`.
    Answered(Duration),
    /// 429, 5xx, a timeout or a network error: Braze pushes back.
    PushedBack,
    /// Nothing to learn (no request went out, or the key is refused).
    Nothing,
}

pub struct Limiter {
    state: Mutex<State>,
    freed: Notify,
    max: f64,
    /// `FLOOR`, or `max` if that is lower.
    floor: f64,
}

struct State {
    limit: f64,
    in_flight: usize,
    /// Reserved slots in use: in flight, but not counted against `limit`.
    reserved: usize,
    slow_start: bool,
    /// The fastest answer seen lately: the latency of an unloaded Braze.
    best: Option<Duration>,
    last_decrease: Instant,
}

/// One request's place in flight; given back when dropped (or through `finish`).
pub struct Slot<'a> {
    limiter: &'a Limiter,
    /// In flight with it, and the limit, when it was taken: an answer raises the limit only
    /// if half of it or more was in use then or is at the answer.
    taken_with: usize,
    limit_then: f64,
    done: bool,
    reserved: bool,
    /// How long the gate held this request back for the rate (`Slot::paced`).
    paced: Duration,
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        let max = (max as f64).max(1.0);
        Limiter {
            state: Mutex::new(State {
                limit: START.min(max),
                in_flight: 0,
                reserved: 0,
                slow_start: true,
                best: None,
                last_decrease: Instant::now(),
            }),
            freed: Notify::new(),
            max,
            floor: FLOOR.min(max),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("concurrency limiter lock poisoned")
    }

    /// The current limit, whole.
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    /// Requests in flight, reserved slots included.
    pub fn in_flight(&self) -> usize {
        let s = self.lock();
        s.in_flight + s.reserved
    }

    /// A slot outside the limit, at once: the caller bounds how many it holds. Its answer
    /// can lower the limit (Braze pushing back concerns everything in flight) but never
    /// raises it.
    pub fn reserved(&self) -> Slot<'_> {
        let mut s = self.lock();
        s.reserved += 1;
        Slot {
            limiter: self,
            taken_with: 0,
            limit_then: s.limit.floor(),
            done: false,
            reserved: true,
            paced: Duration::ZERO,
        }
    }

    /// A slot, once fewer than the limit are in flight; `None` if `stop` fires first.
    pub async fn acquire(&self, stop: &CancellationToken) -> Option<Slot<'_>> {
        loop {
            let freed = self.freed.notified();
            {
                let mut s = self.lock();
                if stop.is_cancelled() {
                    return None;
                }
                if (s.in_flight as f64) < s.limit.floor() {
                    s.in_flight += 1;
                    return Some(Slot {
                        limiter: self,
                        taken_with: s.in_flight,
                        limit_then: s.limit.floor(),
                        done: false,
                        reserved: false,
                        paced: Duration::ZERO,
                    });
                }
            }
            tokio::select! {
                _ = freed => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    fn settle(&self, slot: &Slot<'_>, signal: Signal) {
        let mut s = self.lock();
        // Held at the gate for longer than half its answer took: the rate binds, and more in
        // flight would only queue there.
        let paced = matches!(signal, Signal::Answered(latency) if slot.paced > latency / 2);
        let busy = !slot.reserved
            && !paced
            && slot.taken_with.max(s.in_flight) as f64 >= slot.limit_then / 2.0;
        if slot.reserved {
            s.reserved -= 1;
        } else {
            s.in_flight -= 1;
        }
        let round_trip = s.best.unwrap_or(Duration::from_millis(100));
        let may_decrease = s.last_decrease.elapsed() >= round_trip;
        match signal {
            Signal::Nothing => {}
            Signal::PushedBack => {
                s.slow_start = false;
                if may_decrease {
                    s.limit = (s.limit / 2.0).max(self.floor);
                    s.last_decrease = Instant::now();
                }
            }
            Signal::Answered(latency) => {
                // The best latency forgets slowly, so a Braze that got slower for good
                // becomes the new normal rather than a congestion signal for ever.
                let best = match s.best {
                    Some(b) if latency >= b => b + (latency - b) / 64,
                    _ => latency,
                };
                s.best = Some(best);
                if latency > best * 2 + Duration::from_millis(20) {
                    s.slow_start = false;
                    if may_decrease {
                        s.limit = (s.limit * 0.9).max(self.floor);
                        s.last_decrease = Instant::now();
                    }
                } else if busy {
                    let step = if s.slow_start { 2.0 } else { 1.0 / s.limit };
                    s.limit = (s.limit + step).min(self.max);
                }
            }
        }
        // Wake as many waiters as there are free slots (a few at a time: each one that takes a
        // slot wakes more when it gives it back), not all of them: with hundreds of workers
        // waiting, waking every one for each answer is work for every waiter where only a
        // few can go.
        let free = (s.limit.floor() as usize).saturating_sub(s.in_flight);
        drop(s);
        for _ in 0..free.min(8) {
            self.freed.notify_one();
        }
    }
}

impl Slot<'_> {
    /// Notes how long the gate made this request wait for its turn under the rate. If that
    /// is more than half of Braze's answer time, the answer does not raise the limit: the rate
    /// binds, and more requests in flight would only queue at the gate (where an event worker
    /// that leased first would wait behind them all).
    pub fn paced(&mut self, waited: Duration) {
        self.paced = waited;
    }

    /// Gives the slot back with what the answer said.
    pub fn finish(mut self, signal: Signal) {
        self.done = true;
        self.limiter.settle(&self, signal);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.settle(self, Signal::Nothing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop() -> CancellationToken {
        CancellationToken::new()
    }

    /// Fills every slot and answers them all with `signal`: one round trip.
    async fn round(l: &Limiter, signal: Signal) {
        let stop = stop();
        let mut slots = Vec::new();
        for _ in 0..l.limit() {
            slots.push(l.acquire(&stop).await.unwrap());
        }
        for s in slots {
            s.finish(signal);
        }
    }

    #[tokio::test]
    async fn fast_answers_triple_the_limit_each_round_trip_up_to_the_cap() {
        let l = Limiter::new(256);
        let fast = Signal::Answered(Duration::from_millis(200));
        let mut seen = vec![l.limit()];
        for _ in 0..8 {
            round(&l, fast).await;
            seen.push(l.limit());
        }
        assert_eq!(seen, vec![8, 24, 72, 216, 256, 256, 256, 256, 256]);
    }

    #[tokio::test]
    async fn push_back_halves_it_once_a_round_trip_then_it_grows_by_one() {
        let l = Limiter::new(256);
        let fast = Signal::Answered(Duration::from_millis(10));
        for _ in 0..5 {
            round(&l, fast).await;
        }
        assert_eq!(l.limit(), 256);
        std::thread::sleep(Duration::from_millis(20));
        // A whole round of 429s: halved once, not 128 times.
        round(&l, Signal::PushedBack).await;
        assert_eq!(l.limit(), 128);
        round(&l, fast).await;
        round(&l, fast).await;
        assert_eq!(l.limit(), 129, "about one more a round trip");
        // Never under the floor.
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(20));
            round(&l, Signal::PushedBack).await;
        }
        assert_eq!(l.limit(), FLOOR as usize);
    }

    #[tokio::test]
    async fn an_unused_limit_does_not_grow() {
        let l = Limiter::new(256);
        let stop = stop();
        for _ in 0..100 {
            let slot = l.acquire(&stop).await.unwrap();
            slot.finish(Signal::Answered(Duration::from_millis(5)));
        }
        assert_eq!(l.limit(), START as usize);
    }

    #[tokio::test]
    async fn reserved_slots_never_wait_and_never_raise_the_limit() {
        let l = Limiter::new(256);
        let stop = stop();
        let mut full = Vec::new();
        for _ in 0..l.limit() {
            full.push(l.acquire(&stop).await.unwrap());
        }
        // The limit is full, yet reserved slots are handed out, and counted in flight.
        let reserved: Vec<_> = (0..4).map(|_| l.reserved()).collect();
        assert_eq!(l.in_flight(), START as usize + 4);
        for r in reserved {
            r.finish(Signal::Answered(Duration::from_millis(5)));
        }
        assert_eq!(l.limit(), START as usize, "reserved answers do not grow it");
        // Nor do they take a place under the limit: one more regular slot is still refused.
        let more = tokio::time::timeout(Duration::from_millis(20), l.acquire(&stop)).await;
        assert!(more.is_err(), "the limit is still full");
        // But Braze pushing back on one lowers it.
        std::thread::sleep(Duration::from_millis(120));
        l.reserved().finish(Signal::PushedBack);
        assert_eq!(l.limit(), START as usize / 2);
        drop(full);
    }

    #[tokio::test]
    async fn answers_held_at_the_gate_for_the_rate_do_not_raise_the_limit() {
        let l = Limiter::new(256);
        let stop = stop();
        let answered = Signal::Answered(Duration::from_millis(200));
        // Each waited 150 ms for its turn: the rate binds, the limit stays.
        for _ in 0..3 {
            let mut slots = Vec::new();
            for _ in 0..l.limit() {
                slots.push(l.acquire(&stop).await.unwrap());
            }
            for mut s in slots {
                s.paced(Duration::from_millis(150));
                s.finish(answered);
            }
        }
        assert_eq!(l.limit(), START as usize);
        // A short wait (a burst of turns) does not count as the rate binding.
        let mut slots = Vec::new();
        for _ in 0..l.limit() {
            slots.push(l.acquire(&stop).await.unwrap());
        }
        for mut s in slots {
            s.paced(Duration::from_millis(20));
            s.finish(answered);
        }
        assert!(l.limit() > START as usize);
    }

    #[tokio::test]
    async fn rising_latency_lowers_the_limit() {
        let l = Limiter::new(256);
        for _ in 0..4 {
            round(&l, Signal::Answered(Duration::from_millis(50))).await;
        }
        let before = l.limit();
        std::thread::sleep(Duration::from_millis(60));
        round(&l, Signal::Answered(Duration::from_millis(400))).await;
        assert!(l.limit() < before, "{} then {}", before, l.limit());
    }
}
