//! Formats of earlier releases, read once at open and rewritten in the current one. Nothing
//! else in the queue knows them.

use super::format::{decode_dead, event_entries, EVENT_CHUNK_V1};
use super::*;

/// Moves events that an older release kept in sled (lane `01`) into the event log: append,
/// sync the log, then remove them from sled. A crash in between leaves them in both; the next
/// open skips the chunks the log already holds.
pub(super) fn migrate_sled_events(st: &Store, log: &mut EventLog) -> Result<(), QueueError> {
    let mut moved = 0usize;
    loop {
        let mut frames = Vec::new();
        let mut keys = Vec::new();
        for item in st.tree.scan_prefix([LANE_EVENTS]).take(4096) {
            let (key, value) = item?;
            if let Some(first) = seq_of(&key).filter(|f| !log.contains(*f)) {
                frames.push((first, format::event_count(&value) as u32, value.to_vec()));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            break;
        }
        moved += frames.len();
        log.append(frames)?;
        log.take_unsynced()?.sync()?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        st.tree.apply_batch(batch)?;
    }
    if moved > 0 {
        st.sync()?;
        tracing::info!(
            chunks = moved,
            "moved pending events from the sled queue into the event log"
        );
    }
    Ok(())
}

/// The events of a dead letter that holds a whole, sound event chunk, each with its
/// envelope: an older release that could not read chunks moved them aside whole. `retry-dead`
/// retries them one by one.
pub(super) fn dead_chunk(value: &[u8]) -> Option<Vec<(Record, Vec<u8>)>> {
    let dead = decode_dead(value).ok()?;
    if dead.stored.first() != Some(&EVENT_CHUNK_V1) {
        return None;
    }
    event_entries(0, &dead.stored)
        .ok()?
        .into_iter()
        .map(|(_, envelope)| Some((decode(envelope).ok()?.record, envelope.to_vec())))
        .collect()
}
