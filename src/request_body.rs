//! Reading request bodies within bounds of size, pace and memory.
//!
//! A client decides how big its body is, how fast it sends it and how many it sends at once;
//! none of that may decide how much memory, time or how many file descriptors the daemon
//! spends. Every body read here is:
//! - **paced**: at any moment, what has arrived must be at least `min_rate` bytes a second
//!   since the body began, after a grace period (`Pace`). A client trickling bytes is
//!   answered 408 and its connection closed, instead of holding it for ever.
//! - **sized**: over `max_bytes` is a 413, found from `Content-Length` before anything is
//!   read when the client gives one.
//! - **budgeted**: bodies over `SMALL` bytes draw on one shared budget while their request
//!   lasts (the body, then the records parsed from it). A request that finds the budget
//!   spent is answered 503 with `Retry-After` rather than waiting with its memory held.
//!   Small bodies, which is what events are, never wait on the budget: the connection cap
//!   bounds them.
//! - **copied into one buffer**: hyper hands a body over in the pieces the network gave it,
//!   and a piece keeps its whole read buffer alive, so a body sent a few bytes a packet would
//!   hold a read buffer for every few bytes.
//!
//! This module only reads bytes; it never parses a body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Bodies up to this size are read without drawing on the budget.
pub const SMALL: usize = 64 * 1024;

/// The rules every body is read under (from `[ingest]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `ingest.max_body_bytes`; snapshot uploads, which stream, are not bound by it.
    pub max_bytes: usize,
    /// `ingest.min_body_rate`, bytes a second.
    pub min_rate: u64,
    /// `ingest.body_grace_ms`.
    pub grace: Duration,
}

/// The memory all large bodies in progress may hold, shared by every request.
pub struct Budget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

/// What the budget holds for one request; given back when dropped.
pub struct Held(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let total_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        Budget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Takes `bytes` more for `held`, or says the budget is spent.
    fn take(&self, held: &mut Held, bytes: usize) -> Result<(), BodyError> {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        let permit = Arc::clone(&self.kib)
            .try_acquire_many_owned(kib)
            .map_err(|_| BodyError::Busy)?;
        match &mut held.0 {
            Some(p) => p.merge(permit),
            None => held.0 = Some(permit),
        }
        Ok(())
    }
}

/// Why a body was not read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Over `max_bytes` (413).
    TooLarge { limit: usize },
    /// Slower than `min_rate` after the grace, or over the upload's whole deadline (408).
    TooSlow { received: usize, why: String },
    /// The large bodies in progress hold the whole budget (503).
    Busy,
    /// The client went away or sent a broken body (400).
    Cut(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(
                    f,
                    "the body is over the limit of {limit} bytes (ingest.max_body_bytes)"
                )
            }
            BodyError::TooSlow { received, why } => {
                write!(
                    f,
                    "the body arrived too slowly ({received} bytes received): {why}"
                )
            }
            BodyError::Busy => {
                f.write_str("too many large bodies are being read at once; retry shortly")
            }
            BodyError::Cut(why) => write!(f, "the body was cut short: {why}"),
        }
    }
}

/// The pace a body must keep: by `started + grace + received / min_rate`, more must have
/// come. So a body may pause, and may start late by up to the grace, as long as its average
/// stays above the rate.
pub struct Pace {
    started: Instant,
    grace: Duration,
    min_rate: u64,
    received: usize,
}

impl Pace {
    pub fn new(limits: &Limits) -> Pace {
        Pace {
            started: Instant::now(),
            grace: limits.grace,
            min_rate: limits.min_rate.max(1),
            received: 0,
        }
    }

    pub fn deadline(&self) -> Instant {
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        self.started + self.grace + earned
    }

    pub fn received(&self) -> usize {
        self.received
    }

    pub fn add(&mut self, bytes: usize) {
        self.received += bytes;
    }

    fn too_slow(&self) -> BodyError {
        BodyError::TooSlow {
            received: self.received,
            why: format!(
                "a body must keep at least {} bytes a second after its first {} ms \
                 (ingest.min_body_rate, ingest.body_grace_ms)",
                self.min_rate,
                self.grace.as_millis()
            ),
        }
    }

    /// The next piece of `stream`, or `TooSlow` once the pace is broken.
    pub async fn next<S, E>(&mut self, stream: &mut S) -> Result<Option<Bytes>, BodyError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        match tokio::time::timeout_at(self.deadline(), stream.next()).await {
            Err(_) => Err(self.too_slow()),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(BodyError::Cut(e.to_string())),
            Ok(Some(Ok(piece))) => {
                self.add(piece.len());
                Ok(Some(piece))
            }
        }
    }
}

/// Reads a whole body under `limits`, drawing on `budget` once it is past `SMALL`. What is
/// returned holds its share of the budget; keep it while the request's records live.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limits: &Limits,
    budget: &Budget,
) -> Result<(Bytes, Held), BodyError> {
    let mut held = Held(None);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = BodyError::TooLarge {
        limit: limits.max_bytes,
    };
    let mut pace = Pace::new(limits);
    let mut stream = body.into_data_stream();
    if let Some(n) = declared {
        if n > limits.max_bytes as u64 {
            if n <= 2 * limits.max_bytes as u64 {
                drain(&mut stream, &mut pace, limits.max_bytes).await;
            }
            return Err(too_large);
        }
    }
    // Trusting the declared length for the first allocation is safe: it is under the limit,
    // and over `SMALL` it is paid for from the budget first.
    let expected = declared.map_or(0, |n| n as usize);
    let mut counted = 0;
    if expected > SMALL {
        budget.take(&mut held, expected)?;
        counted = expected;
    }
    let mut buffer = Vec::with_capacity(expected);
    while let Some(piece) = pace.next(&mut stream).await? {
        if buffer.len() + piece.len() > limits.max_bytes {
            drop(buffer);
            drain(&mut stream, &mut pace, limits.max_bytes).await;
            return Err(too_large);
        }
        buffer.extend_from_slice(&piece);
        if buffer.len() > SMALL && buffer.capacity() > counted {
            budget.take(&mut held, buffer.capacity() - counted)?;
            counted = buffer.capacity();
        }
    }
    Ok((Bytes::from(buffer), held))
}

/// How long a refused body is read on, at most (`drain`).
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a body that is refused as too large, up to twice the limit
/// and for `DRAIN_FOR` at most, so that the client reads the 413 rather than a connection
/// reset (closing a socket with unread bytes resets it, and the reset can reach the client
/// before the answer). A body larger or slower than that is cut off: its client gets the
/// reset.
async fn drain<S, E>(stream: &mut S, pace: &mut Pace, limit: usize)
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let until = Instant::now() + DRAIN_FOR;
    while pace.received <= limit.saturating_mul(2) {
        match tokio::time::timeout_at(until, pace.next(stream)).await {
            Ok(Ok(Some(_))) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            min_rate: 1024,
            grace: Duration::from_millis(200),
        }
    }

    fn trickle(pieces: Vec<&'static [u8]>, every: Duration) -> Body {
        let stream = futures_util::stream::unfold(pieces.into_iter(), move |mut it| async move {
            let piece = it.next()?;
            tokio::time::sleep(every).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(piece)), it))
        });
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_in_many_pieces_arrives_in_one_buffer() {
        let pieces: Vec<&'static [u8]> = vec![b"ab"; 500];
        let body = trickle(pieces, Duration::ZERO);
        let (bytes, _held) = read(
            &HeaderMap::new(),
            body,
            &limits(4096),
            &Budget::new(1 << 20),
        )
        .await
        .unwrap();
        assert_eq!(bytes.len(), 1000);
    }

    #[tokio::test]
    async fn a_trickling_body_is_refused_once_the_grace_is_spent() {
        let body = trickle(vec![b"a"; 100], Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = read(
            &HeaderMap::new(),
            body,
            &limits(4096),
            &Budget::new(1 << 20),
        )
        .await
        .err()
        .expect("a byte every 100 ms is under 1 KiB/s");
        assert!(matches!(err, BodyError::TooSlow { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn over_the_limit_is_too_large_before_reading_when_declared() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "5000".parse().unwrap());
        let body = trickle(vec![b"a"], Duration::from_secs(3600));
        let err = read(&headers, body, &limits(4096), &Budget::new(1 << 20))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, BodyError::TooLarge { limit: 4096 }), "{err}");
        let body = trickle(vec![&[0u8; 3000], &[0u8; 3000]], Duration::ZERO);
        let err = read(
            &HeaderMap::new(),
            body,
            &limits(4096),
            &Budget::new(1 << 20),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, BodyError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn large_bodies_share_the_budget_and_give_it_back() {
        let budget = Budget::new(200 * 1024);
        let big: &'static [u8] = Box::leak(vec![b'x'; 150 * 1024].into_boxed_slice());
        let limits = limits(1 << 20);
        let (_, held) = read(
            &HeaderMap::new(),
            trickle(vec![big], Duration::ZERO),
            &limits,
            &budget,
        )
        .await
        .unwrap();
        let second = read(
            &HeaderMap::new(),
            trickle(vec![big], Duration::ZERO),
            &limits,
            &budget,
        )
        .await;
        assert!(matches!(second, Err(BodyError::Busy)));
        // Small bodies never wait on it.
        read(
            &HeaderMap::new(),
            trickle(vec![b"{}"], Duration::ZERO),
            &limits,
            &budget,
        )
        .await
        .unwrap();
        drop(held);
        read(
            &HeaderMap::new(),
            trickle(vec![big], Duration::ZERO),
            &limits,
            &budget,
        )
        .await
        .unwrap();
    }
}
