//! The `/v1` body parsers on arbitrary bytes: an answer for every body, never a panic.
#![no_main]

use aiq_braze_sync::config::PreferId;
use aiq_braze_sync::ingest::{parse_attributes, parse_events, parse_memberships, BadInput};
use libfuzzer_sys::fuzz_target;

/// A body is all or nothing: a success holds records, a refusal says what is wrong.
fn check<T>(parsed: Result<Vec<T>, BadInput>) {
    match parsed {
        Ok(records) => assert!(!records.is_empty(), "a body of no records was accepted"),
        Err(bad) => assert!(!bad.message.is_empty(), "a refusal without a message"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(parse_memberships(data, PreferId::External));
    let events = parse_events(data, PreferId::External);
    // Events are sent as the members ingest built: they must be JSON Braze can read.
    for event in events.iter().flatten() {
        assert!(event.fields().is_some(), "members that do not parse: {}", event.members);
    }
    check(events);
    check(parse_attributes(data, PreferId::External));
});
