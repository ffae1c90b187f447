//! The streaming member-list reader on arbitrary bytes, cut into arbitrary chunks.
//!
//! Byte 0 picks the format the Content-Type would have named, byte 1 the chunk size; the
//! rest is the body. How the network happens to cut a body must not change what it means,
//! so the chunked read must give exactly what reading it in one piece gives.
#![no_main]

use aiq_braze_sync::config::PreferId;
use aiq_braze_sync::ingest::BadInput;
use aiq_braze_sync::members::{Format, MemberReader};
use aiq_braze_sync::record::UserId;
use libfuzzer_sys::fuzz_target;

fn read(
    format: Option<Format>,
    chunks: std::slice::Chunks<'_, u8>,
) -> Result<Vec<UserId>, BadInput> {
    let mut users = Vec::new();
    let mut add = |u| {
        users.push(u);
        Ok::<(), BadInput>(())
    };
    let mut reader = MemberReader::new(format, PreferId::External);
    for chunk in chunks {
        reader.feed(chunk, &mut add)?;
    }
    let n = reader.finish(&mut add)?;
    assert_eq!(n, users.len(), "finish counts other members than it gave");
    Ok(users)
}

fuzz_target!(|data: &[u8]| {
    let [format, size, body @ ..] = data else {
        return;
    };
    let format = match format % 3 {
        0 => None,
        1 => Some(Format::Ndjson),
        _ => Some(Format::Csv),
    };
    let whole = read(format, body.chunks(body.len().max(1)));
    let chunked = read(format, body.chunks(usize::from(*size).max(1)));
    assert_eq!(whole, chunked, "the chunking changed the result");
});
