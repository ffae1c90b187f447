//! The Braze-compatible `/users/track` parser on arbitrary bytes.
#![no_main]

use aiq_braze_sync::relay;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match relay::parse(data) {
        // What the daemon answers once the records are queued must be a Braze success body.
        Ok(relayed) => assert_eq!(relayed.answer()["message"], "success"),
        Err(refused) => assert!(!refused.message.is_empty()),
    }
});
