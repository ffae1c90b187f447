//! The stored-record decoders on arbitrary bytes: what is on disk may be damaged, and a
//! value that does not decode must be an error (the queue moves it aside), not a panic.
#![no_main]

use aiq_braze_sync::queue::format::{
    decode, decode_dead, encode, encode_event_chunk, event_count, event_entries,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(stored) = decode(data) {
        // Whatever decodes is written back as the same record.
        let again = decode(&encode(&stored.record, stored.accepted_at_ms)).expect("re-encoded");
        assert_eq!(again, stored);
    }
    if let Ok(dead) = decode_dead(data) {
        let _ = decode(&dead.stored);
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
