//! Long-lived per-user state, in its own sled database under `DATA_DIR/state/`.
//!
//! Kept apart from the queue so that the queue, which churns, can be rebuilt cheaply to give
//! disk space back, while this, which grows only with the number of users and attributes,
//! never needs to be.
//!
//! **On-disk format** (changing it breaks existing databases; add a version instead):
//! tree `settled`, key = the queue's latest-value key (`03 kind len id attribute`), value =
//! one of
//! - `[1][rank u64 BE]`: the highest rank (`format::Stored::rank`: the seq an update was
//!   first accepted under) among that user's attribute's updates that left the queue;
//! - `[2][rank u64 BE][value]`: the same, and the last to leave was delivered with this value
//!   (JSON text); an empty value means it was dead-lettered, so Braze's value is unknown;
//! - `[3][rank u64 BE][at u64 BE][value]`: as `2`, and it left the queue at `at` (milliseconds
//!   since the epoch). Written from now on; a `2` counts as sent at an unknown, long past time.
//!
//! Two uses: `retry-dead` drops a dead update ranked below it (it would overwrite a newer
//! value), and ingest skips an update whose value is the one Braze was last sent, if that was
//! recently enough (`QueueSettings::skip_unchanged_for`; Braze bills every attribute write). Written without a sync, after Braze answered and before the queue
//! records the same completion: after a crash it may lag a little (an update is then sent
//! once more), never claim a value Braze was not sent.

use std::path::Path;

use super::QueueError;

const V1: u8 = 1;
const V2: u8 = 2;
const V3: u8 = 3;

/// What is known of one user's attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The highest rank that left the queue (see the module doc).
    pub seq: u64,
    /// The value Braze was last sent (JSON text), if the last update was delivered.
    pub delivered: Option<Vec<u8>>,
    /// When the last update left the queue (milliseconds since the epoch), if known.
    pub at_ms: Option<u64>,
}

impl Settled {
    /// Whether the last update left the queue no longer than `window` before `now_ms`.
    pub fn sent_within(&self, window: std::time::Duration, now_ms: u64) -> bool {
        self.at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= window.as_millis() as u64)
    }
}

pub struct State {
    /// Held so the database stays open; `settled` is a tree inside it.
    _db: sled::Db,
    settled: sled::Tree,
}

impl State {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<State, QueueError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000));
        let db = super::store::open_sled_durably(&config, dir)?;
        let settled = db.open_tree("settled")?;
        Ok(State { _db: db, settled })
    }

    pub fn settled(&self, latest_key: &[u8]) -> Result<Option<Settled>, QueueError> {
        let Some(v) = self.settled.get(latest_key)? else {
            return Ok(None);
        };
        let u64_at = |at: usize| {
            v.get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let delivered = |from: usize| Some(v[from..].to_vec()).filter(|d| !d.is_empty());
        Ok(match v.first() {
            Some(&V1) => u64_at(1).map(|seq| Settled {
                seq,
                delivered: None,
                at_ms: None,
            }),
            Some(&V2) => u64_at(1).map(|seq| Settled {
                seq,
                delivered: delivered(9),
                at_ms: None,
            }),
            Some(&V3) => u64_at(1).zip(u64_at(9)).map(|(seq, at)| Settled {
                seq,
                delivered: delivered(17),
                at_ms: Some(at),
            }),
            _ => None,
        })
    }

    /// The highest rank of this attribute's updates that left the queue, if any.
    pub fn settled_seq(&self, latest_key: &[u8]) -> Result<Option<u64>, QueueError> {
        Ok(self.settled(latest_key)?.map(|s| s.seq))
    }

    /// Records that these updates left the queue: `(key, rank, retried, value Braze now
    /// was sent)`, the value `None` when dead-lettered, at `now_ms`. Per attribute they settle in order (the
    /// queue never has two of one attribute in flight), so the last write holds the value
    /// Braze has. Its rank is the highest too, except for a retried update (`retried`), which
    /// may leave after updates accepted later than it: its rank never lowers what is there.
    pub fn record_settled<'a>(
        &self,
        settled: impl IntoIterator<Item = (&'a [u8], u64, bool, Option<&'a [u8]>)>,
        now_ms: u64,
    ) -> Result<(), QueueError> {
        // One key at a time, not a batch: sled 0.34 seals and writes its log buffer for every
        // batch (an I/O per delivered request), and these facts need no atomicity: each one
        // stands alone, and after a crash any of them may lag, never lead.
        for (key, rank, retried, delivered) in settled {
            let seq = match retried {
                true => self.settled_seq(key)?.map_or(rank, |s| s.max(rank)),
                false => rank,
            };
            let delivered = delivered.unwrap_or_default();
            let mut value = Vec::with_capacity(17 + delivered.len());
            value.push(V3);
            value.extend_from_slice(&seq.to_be_bytes());
            value.extend_from_slice(&now_ms.to_be_bytes());
            value.extend_from_slice(delivered);
            self.settled.insert(key, value)?;
        }
        Ok(())
    }
}
