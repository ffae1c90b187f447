//! Data that databases from earlier releases hold in a form the queue no longer writes: events
//! in sled (moved into the event log at open) and whole event chunks in the dead letters
//! (split by `retry-dead`). It only reads these forms, never writes them. (The counts and the
//! `05` index that older databases lack are built in `open.rs`.)

use super::format::{decode_dead, event_entries, EVENT_CHUNK_V1};
use super::*;

/// Moves events kept in sled (lane `01`, as databases from before the event log hold them)
/// into the event log: append, sync the log, then remove them from sled. A crash in between
/// leaves them in both; the next open skips the chunks the log already holds.
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
/// envelope. Such dead letters exist in databases written by releases that could not read
/// chunks and set them aside whole; `retry-dead` must still retry their events one by one.
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
