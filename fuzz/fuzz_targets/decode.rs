//! The stored-record decoders on arbitrary bytes: what is on disk may be damaged, and a
//! value that does not decode must be an error (the queue moves it aside), not a panic.
#![no_main]

use aiq_braze_sync::queue::format::{
    decode, decode_dead, decode_latest, encode, encode_event_chunk, event_count, event_entries,
    latest_value, with_origin,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(stored) = decode(data) {
        // Whatever decodes is written back as the same record, with the same origin.
        let mut bytes = encode(&stored.record, stored.accepted_at_ms);
        if let Some(origin) = stored.origin {
            bytes = with_origin(&bytes, origin);
        }
        let again = decode(&bytes).expect("re-encoded");
        assert_eq!(again, stored);
    }
    if let Ok(dead) = decode_dead(data) {
        let _ = decode(&dead.stored);
    }
    // A latest-index value reads back as it is written.
    if let Some((seq, rank, fields)) = decode_latest(data) {
        if fields.first() != Some(&0xFF) {
            let again = latest_value(seq, rank, fields);
            assert_eq!(decode_latest(&again), Some((seq, rank, fields)));
        }
    }
    // An event chunk: its framing either reads back exactly or is an error.
    let _ = event_count(data);
    if let Ok(entries) = event_entries(7, data) {
        if data.first() == Some(&aiq_braze_sync::queue::format::EVENT_CHUNK_V1) {
            let again = encode_event_chunk(7, entries.iter().copied());
            assert_eq!(again, data);
        }
        for (_, envelope) in entries {
            let _ = decode(envelope);
        }
    }
});
