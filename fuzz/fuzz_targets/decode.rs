//! The stored-record decoders on arbitrary bytes: what is on disk may be damaged, and a
//! value that does not decode must be an error (the queue moves it aside), not a panic.
#![no_main]

use aiq_braze_sync::queue::format::{decode, decode_dead, encode};
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
});
