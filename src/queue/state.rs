//! Long-lived per-user state, in its own sled database under `DATA_DIR/state/`.
//!
//! Kept apart from the queue so that the queue, which churns, can be rebuilt cheaply to give
//! disk space back, while this, which grows only with the number of users and attributes,
//! never needs to be.
//!
//! **On-disk format** (changing it breaks existing databases; add a version instead):
//! tree `settled`, key = the queue's latest-value key (`03 kind len id attribute`), value =
//! `[1u8][seq u64 BE]`: the sequence number of the newest update of that user's attribute
//! that has left the queue (delivered to Braze or dead-lettered). Retrying a dead update
//! older than it would overwrite a newer value, so `retry-dead` skips such updates.
//! Written without a sync: after a crash it may lag a little, never lead.

use std::path::Path;

use super::QueueError;

const V1: u8 = 1;

pub struct State {
    /// Held so the database stays open; `settled` is a tree inside it.
    _db: sled::Db,
    settled: sled::Tree,
}

impl State {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<State, QueueError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| QueueError::from_sled_open(dir, e))?;
        let settled = db.open_tree("settled")?;
        Ok(State { _db: db, settled })
    }

    /// The newest sequence number of this attribute that left the queue, if any.
    pub fn settled_seq(&self, latest_key: &[u8]) -> Result<Option<u64>, QueueError> {
        Ok(self
            .settled
            .get(latest_key)?
            .and_then(|v| match v.split_first() {
                Some((&V1, rest)) => rest.try_into().ok().map(u64::from_be_bytes),
                _ => None,
            }))
    }

    /// Records that these updates left the queue. Per attribute they settle in order (the
    /// queue never has two of one attribute in flight), so the last write is the newest.
    pub fn record_settled<'a>(
        &self,
        settled: impl IntoIterator<Item = (&'a [u8], u64)>,
    ) -> Result<(), QueueError> {
        let mut batch = sled::Batch::default();
        for (key, seq) in settled {
            let mut value = [0u8; 9];
            value[0] = V1;
            value[1..].copy_from_slice(&seq.to_be_bytes());
            batch.insert(key, &value);
        }
        self.settled.apply_batch(batch)?;
        Ok(())
    }
}
