//! The bytes the queue writes: key encoding and the versioned value envelope.
//!
//! **These types ARE the on-disk format.** Changing a field, its order or an enum variant's
//! position breaks every database in the field: bincode is not self-describing. To grow a
//! record, add `StoredV2` with a new version byte, decode both, and convert V1 into the
//! current in-memory type. Never reuse a version byte.
//!
//! This module owns the bytes of the queue tree's keys and of every record envelope; nothing
//! else in the queue lays them out, and nothing here touches sled or a file.

use serde::{Deserialize, Serialize};

use crate::record::{AttributeUpdate, Event, Membership, Record, TrackArray, TrackObject, UserId};

/// Key prefixes inside the `queue` tree. One tree so that every change a request makes
/// (records, the latest-value index, the sequence high-water mark) lands in one atomic batch.
pub const META: u8 = 0x00;
pub const LANE_EVENTS: u8 = 0x01;
pub const LANE_ATTRIBUTES: u8 = 0x02;
pub const LATEST: u8 = 0x03;
pub const DEAD: u8 = 0x04;
/// `05 user seq`: one key per record in the attribute lane, by user, so that leasing an
/// event finds that user's earlier pending updates (`Queue::lease_lanes`).
pub const USER_PENDING: u8 = 0x05;

/// The meta key saying the `USER_PENDING` index is complete (built at open for a database
/// that lacks it).
pub const META_USER_INDEX: &[u8] = &[META, b'u'];

/// The prefix of one user's `USER_PENDING` keys.
pub fn user_pending_prefix(user: &UserId) -> Vec<u8> {
    let mut k = latest_key(user, "");
    k[0] = USER_PENDING;
    k
}

/// The `USER_PENDING` key of one attribute-lane record.
pub fn user_pending_key(user: &UserId, seq: u64) -> Vec<u8> {
    let mut k = user_pending_prefix(user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The meta key holding the next sequence number, so ids never repeat across restarts.
pub const META_NEXT_SEQ: &[u8] = &[META, b'n'];

/// The meta key holding how many records each lane and the dead letters hold: events, then
/// attribute updates, then dead, u64 big-endian each (the events count is not read at open:
/// the event log counts its own). Written in the same batch as every change to those counts,
/// so after a crash it matches what sled recovered, and opening a queue of millions needs no
/// scan.
pub const META_COUNTS: &[u8] = &[META, b'c'];

/// The meta key holding what has left the event log: its watermark, the next seq and markers
/// for chunks above the watermark (`eventlog::GoneState::encode`).
pub const META_EVENTS_GONE: &[u8] = &[META, b'w'];

/// The meta key a storage probe writes (`Queue::probe_storage`): when it last wrote.
pub const META_PROBE: &[u8] = &[META, b'p'];

pub fn encode_counts(events: u64, attributes: u64, dead: u64) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&events.to_be_bytes());
    v[8..16].copy_from_slice(&attributes.to_be_bytes());
    v[16..].copy_from_slice(&dead.to_be_bytes());
    v
}

pub fn decode_counts(v: &[u8]) -> Option<(u64, u64, u64)> {
    let n = |i: usize| Some(u64::from_be_bytes(v.get(i..i + 8)?.try_into().ok()?));
    Some((n(0)?, n(8)?, n(16)?))
}

/// Version byte of `StoredV1`.
const V1: u8 = 1;
/// Version byte of `StoredV2`: every record kind and identifier form. Records V1 can carry
/// are written as V1, so that a release that reads only V1 can still read a database that
/// holds only such records.
const V2: u8 = 2;
/// Version byte of `DeadV1`.
const DEAD_V1: u8 = 1;
/// Version byte of an attribute update that `retry-dead` put back: `[4][origin u64 BE]`, then
/// the update's own envelope (V1 or V2) unchanged. The origin is the seq it was first accepted
/// under, kept through every later death and retry (`Stored::rank`). 3 is `EVENT_CHUNK_V1`.
pub const RETRIED_V1: u8 = 4;
/// Version byte of an event kept as the JSON members Braze takes (`Event::members`):
/// `[5][accepted_at_ms u64 BE][identifier][members]`, the identifier as its form byte (`e`,
/// `b`, `m`, `p`, or `a` for an alias, as in `latest_key`) and then each of its strings as a
/// u32 BE length and its bytes; the members run to the end. Framed by hand, not by bincode:
/// what is left of an event is two strings, which need no walk through serde to encode or
/// decode. Every event is written this way. A release that predates this version reads one as
/// an unknown version and moves it to the dead letters, from which `retry-dead` restores it
/// once a release that knows `EVENT_V3` runs again.
pub const EVENT_V3: u8 = 5;

/// `envelope` marked as first accepted under `origin` (any earlier mark replaced).
pub fn with_origin(envelope: &[u8], origin: u64) -> Vec<u8> {
    let inner = match envelope.split_first() {
        Some((&RETRIED_V1, rest)) => rest.get(8..).unwrap_or_default(),
        _ => envelope,
    };
    let mut out = Vec::with_capacity(9 + inner.len());
    out.push(RETRIED_V1);
    out.extend_from_slice(&origin.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

/// A latest-index value (key `LATEST ...`, see `latest_key`): the seq of the attribute's
/// newest pending update; then, only when it differs from that seq, `0xFF` and the highest
/// rank (`Stored::rank`) among the attribute's pending updates; then the newest one's object
/// fields (JSON object text or nothing, so never starting with 0xFF). Fresh updates always
/// hold the highest rank themselves; only `retry-dead` staging an operation behind a newer
/// update writes the marked form. A release that predates the mark reads it as other object
/// fields, so it never coalesces a new update into that one: both are sent, in order.
pub fn latest_value(seq: u64, rank: u64, fields: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + fields.len());
    v.extend_from_slice(&seq.to_be_bytes());
    if rank != seq {
        v.push(RANK_MARK);
        v.extend_from_slice(&rank.to_be_bytes());
    }
    v.extend_from_slice(fields);
    v
}

/// `(seq, highest pending rank, object fields)` of a latest-index value.
pub fn decode_latest(v: &[u8]) -> Option<(u64, u64, &[u8])> {
    let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    match v.get(8) {
        Some(&RANK_MARK) => {
            let rank = u64::from_be_bytes(v.get(9..17)?.try_into().ok()?);
            Some((seq, rank, &v[17..]))
        }
        _ => Some((seq, seq, &v[8..])),
    }
}

const RANK_MARK: u8 = 0xFF;

/// A pending record's key: prefix then the big-endian sequence, so iteration order is
/// acceptance order within a lane.
pub fn record_key(lane: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = lane;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn dead_key(seq: u64) -> [u8; 9] {
    record_key(DEAD, seq)
}

/// The sequence number at the end of a 9-byte record key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The key of the latest-value index entry for one user's one attribute. Length-prefixed so
/// that no id can run into the attribute name.
pub fn latest_key(user: &UserId, attribute: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + user.value().len() + attribute.len());
    k.push(LATEST);
    // Ids are length-checked at ingest (external ids at most 987 bytes, the others far below
    // 64 KB), so each length fits in two bytes; `part` clamps rather than wrap if not.
    let part = |k: &mut Vec<u8>, s: &str| {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        k.extend_from_slice(&(b.len() as u16).to_be_bytes());
        k.extend_from_slice(b);
    };
    let (form, id, label) = user_parts(user);
    k.push(form);
    part(&mut k, id);
    if let Some(label) = label {
        part(&mut k, label);
    }
    k.extend_from_slice(attribute.as_bytes());
    k
}

/// Generic over the string type: records are encoded from borrowed `&str` (no copies on the
/// ingest path) and decoded into `String`; bincode writes both the same way.
#[derive(Serialize, Deserialize)]
enum UserIdV1<S = String> {
    External(S),
    Braze(S),
}

#[derive(Serialize, Deserialize)]
enum RecordV1<S = String> {
    Membership {
        user: UserIdV1<S>,
        audience_id: S,
        split_id: S,
        member: bool,
        time: Option<S>,
    },
    Event {
        user: UserIdV1<S>,
        name: S,
        time: S,
        properties: Option<S>,
    },
}

#[derive(Serialize, Deserialize)]
struct StoredV1<S = String> {
    accepted_at_ms: u64,
    record: RecordV1<S>,
}

/// Identifiers in V2. Variants may only ever be appended.
#[derive(Serialize, Deserialize)]
enum UserIdV2 {
    External(String),
    Braze(String),
    Alias { name: String, label: String },
    Email(String),
    Phone(String),
}

/// Records in V2. Variants may only ever be appended.
#[derive(Serialize, Deserialize)]
enum RecordV2 {
    Membership {
        user: UserIdV2,
        audience_id: String,
        split_id: String,
        member: bool,
        time: Option<String>,
    },
    Event {
        user: UserIdV2,
        name: String,
        time: String,
        properties: Option<String>,
    },
    Attribute {
        user: UserIdV2,
        name: String,
        value: String,
        object_fields: Option<String>,
    },
    /// `purchase` false: an `events` object; true: a `purchases` object.
    Tracked {
        user: UserIdV2,
        purchase: bool,
        json: String,
    },
}

#[derive(Serialize, Deserialize)]
struct StoredV2 {
    accepted_at_ms: u64,
    record: RecordV2,
}

#[derive(Serialize, Deserialize)]
struct DeadV1 {
    dead_at_ms: u64,
    attempts: u32,
    reason: String,
    /// The pending envelope as it was, so a retry restores exactly what was accepted.
    stored: Vec<u8>,
}

/// A pending record decoded from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub accepted_at_ms: u64,
    pub record: Record,
    /// For an update `retry-dead` put back: the seq it was first accepted under
    /// (`RETRIED_V1`).
    pub origin: Option<u64>,
}

impl Stored {
    /// Where this update stands among its attribute's updates, by first acceptance: its
    /// origin if it was retried, else its own seq. `retry-dead` compares ranks, not seqs: a
    /// retry gets a new seq, newer than any update accepted after the one it repeats.
    pub fn rank(&self, seq: u64) -> u64 {
        self.origin.unwrap_or(seq)
    }
}

/// A dead-lettered record decoded from disk.
#[derive(Debug, Clone)]
pub struct Dead {
    pub dead_at_ms: u64,
    pub attempts: u32,
    pub reason: String,
    /// The original envelope: `decode` it to see the record.
    pub stored: Vec<u8>,
}

/// Why stored bytes could not be read back. The record is moved aside, never silently dropped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("unknown format version {0} (written by a newer aiq-braze-sync?)")]
    UnknownVersion(u8),
    #[error("corrupt value: {0}")]
    Corrupt(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Decodes one stored value's body.
///
/// bincode allocates what a length prefix says before it reads the bytes, so a damaged prefix
/// can ask for 2^60 bytes: the allocation fails and the process aborts, and again at every
/// start, since the value is still there. A limit on the bytes claimed makes that an error.
/// No sound value claims more bytes than its slice holds, so the limit is the smallest of a
/// few steps at or above the slice's length (bincode takes it as a constant).
fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    fn limited<T: serde::de::DeserializeOwned, const N: usize>(
        body: &[u8],
    ) -> Result<T, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, config().with_limit::<N>()).map(|(v, _)| v)
    }
    const SMALL: usize = 64 << 10;
    const LARGE: usize = 16 << 20;
    // Past any record ingest can take (`ingest.max_body_bytes` is at most 1 GiB).
    const HUGE: usize = 2 << 30;
    match body.len() {
        n if n <= SMALL => limited::<T, SMALL>(body),
        n if n <= LARGE => limited::<T, LARGE>(body),
        _ => limited::<T, HUGE>(body),
    }
    .map_err(|e| DecodeError::Corrupt(e.to_string()))
}

/// The V1 form of an identifier, if V1 can carry it.
fn user_v1(u: &UserId) -> Option<UserIdV1<&str>> {
    match u {
        UserId::External(s) => Some(UserIdV1::External(s)),
        UserId::Braze(s) => Some(UserIdV1::Braze(s)),
        _ => None,
    }
}

fn user_of(u: UserIdV1) -> UserId {
    match u {
        UserIdV1::External(s) => UserId::External(s),
        UserIdV1::Braze(s) => UserId::Braze(s),
    }
}

fn user_v2(u: &UserId) -> UserIdV2 {
    match u.clone() {
        UserId::External(s) => UserIdV2::External(s),
        UserId::Braze(s) => UserIdV2::Braze(s),
        UserId::Alias { name, label } => UserIdV2::Alias { name, label },
        UserId::Email(s) => UserIdV2::Email(s),
        UserId::Phone(s) => UserIdV2::Phone(s),
    }
}

fn user_of_v2(u: UserIdV2) -> UserId {
    match u {
        UserIdV2::External(s) => UserId::External(s),
        UserIdV2::Braze(s) => UserId::Braze(s),
        UserIdV2::Alias { name, label } => UserId::Alias { name, label },
        UserIdV2::Email(s) => UserId::Email(s),
        UserIdV2::Phone(s) => UserId::Phone(s),
    }
}

/// The V1 form of a record, if V1 can carry it.
fn record_v1(record: &Record) -> Option<RecordV1<&str>> {
    Some(match record {
        Record::Membership(m) => RecordV1::Membership {
            user: user_v1(&m.user)?,
            audience_id: &m.audience_id,
            split_id: &m.split_id,
            member: m.member,
            time: m.time.as_deref(),
        },
        Record::Event(_) | Record::Attribute(_) | Record::Tracked(_) => return None,
    })
}

fn record_v2(record: &Record) -> RecordV2 {
    match record {
        Record::Membership(m) => RecordV2::Membership {
            user: user_v2(&m.user),
            audience_id: m.audience_id.clone(),
            split_id: m.split_id.clone(),
            member: m.member,
            time: m.time.clone(),
        },
        Record::Event(_) => unreachable!("`encode` writes every event as EVENT_V3"),
        Record::Attribute(a) => RecordV2::Attribute {
            user: user_v2(&a.user),
            name: a.name.clone(),
            value: a.value.clone(),
            object_fields: a.object_fields.clone(),
        },
        Record::Tracked(t) => RecordV2::Tracked {
            user: user_v2(&t.user),
            purchase: t.array == TrackArray::Purchases,
            json: t.json.clone(),
        },
    }
}

fn record_of_v2(r: RecordV2) -> Record {
    match r {
        RecordV2::Membership {
            user,
            audience_id,
            split_id,
            member,
            time,
        } => Record::Membership(Membership {
            user: user_of_v2(user),
            audience_id,
            split_id,
            member,
            time,
        }),
        RecordV2::Event {
            user,
            name,
            time,
            properties,
        } => Record::Event(Event::new(
            user_of_v2(user),
            &name,
            &time,
            properties.as_deref(),
        )),
        RecordV2::Attribute {
            user,
            name,
            value,
            object_fields,
        } => Record::Attribute(AttributeUpdate {
            user: user_of_v2(user),
            name,
            value,
            object_fields,
        }),
        RecordV2::Tracked {
            user,
            purchase,
            json,
        } => Record::Tracked(TrackObject {
            array: if purchase {
                TrackArray::Purchases
            } else {
                TrackArray::Events
            },
            user: user_of_v2(user),
            json,
        }),
    }
}

pub fn encode(record: &Record, accepted_at_ms: u64) -> Vec<u8> {
    if let Record::Event(e) = record {
        return encode_event(e, accepted_at_ms);
    }
    // Encoding plain structs of strings into a Vec cannot fail.
    let fail = "bincode encoding into a Vec cannot fail";
    match record_v1(record) {
        Some(record) => {
            let mut out = vec![V1];
            bincode::serde::encode_into_std_write(
                StoredV1 {
                    accepted_at_ms,
                    record,
                },
                &mut out,
                config(),
            )
            .expect(fail);
            out
        }
        None => {
            let mut out = vec![V2];
            bincode::serde::encode_into_std_write(
                StoredV2 {
                    accepted_at_ms,
                    record: record_v2(record),
                },
                &mut out,
                config(),
            )
            .expect(fail);
            out
        }
    }
}

pub fn decode(bytes: &[u8]) -> Result<Stored, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match version {
        V1 => {
            let v1: StoredV1 = decode_body(body)?;
            let record = match v1.record {
                RecordV1::Membership {
                    user,
                    audience_id,
                    split_id,
                    member,
                    time,
                } => Record::Membership(Membership {
                    user: user_of(user),
                    audience_id,
                    split_id,
                    member,
                    time,
                }),
                RecordV1::Event {
                    user,
                    name,
                    time,
                    properties,
                } => Record::Event(Event::new(
                    user_of(user),
                    &name,
                    &time,
                    properties.as_deref(),
                )),
            };
            Ok(Stored {
                accepted_at_ms: v1.accepted_at_ms,
                record,
                origin: None,
            })
        }
        V2 => {
            let v2: StoredV2 = decode_body(body)?;
            Ok(Stored {
                accepted_at_ms: v2.accepted_at_ms,
                record: record_of_v2(v2.record),
                origin: None,
            })
        }
        RETRIED_V1 => {
            let corrupt = |what: &str| DecodeError::Corrupt(format!("retried update: {what}"));
            let origin = body
                .get(..8)
                .ok_or_else(|| corrupt("truncated origin"))?
                .try_into()
                .map(u64::from_be_bytes)
                .expect("8 bytes");
            let inner = &body[8..];
            if inner.first() == Some(&RETRIED_V1) {
                return Err(corrupt("wrapped twice"));
            }
            Ok(Stored {
                origin: Some(origin),
                ..decode(inner)?
            })
        }
        EVENT_V3 => decode_event(body),
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

/// An identifier's form byte and strings, as `latest_key` and `EVENT_V3` write them. The
/// form bytes are on disk in both: never change or reuse one.
fn user_parts(user: &UserId) -> (u8, &str, Option<&str>) {
    match user {
        UserId::External(id) => (b'e', id, None),
        UserId::Braze(id) => (b'b', id, None),
        UserId::Email(id) => (b'm', id, None),
        UserId::Phone(id) => (b'p', id, None),
        UserId::Alias { name, label } => (b'a', name, Some(label)),
    }
}

fn encode_event(e: &Event, accepted_at_ms: u64) -> Vec<u8> {
    let (form, id, label) = user_parts(&e.user);
    let text = |out: &mut Vec<u8>, s: &str| {
        // An identifier is at most a few KiB: ingest refuses longer ones.
        out.extend_from_slice(
            &u32::try_from(s.len())
                .expect("an id under 4 GiB")
                .to_be_bytes(),
        );
        out.extend_from_slice(s.as_bytes());
    };
    let label_len = label.map_or(0, |l| 4 + l.len());
    let mut out = Vec::with_capacity(14 + id.len() + label_len + e.members.len());
    out.push(EVENT_V3);
    out.extend_from_slice(&accepted_at_ms.to_be_bytes());
    out.push(form);
    text(&mut out, id);
    if let Some(label) = label {
        text(&mut out, label);
    }
    out.extend_from_slice(e.members.as_bytes());
    out
}

fn decode_event(body: &[u8]) -> Result<Stored, DecodeError> {
    let corrupt = |what: &str| DecodeError::Corrupt(format!("event: {what}"));
    let (at, rest) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("truncated time"))?;
    let (&form, mut rest) = rest.split_first().ok_or_else(|| corrupt("no identifier"))?;
    let mut text = || -> Result<String, DecodeError> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated identifier"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(corrupt("identifier past the value"));
        }
        let (s, tail) = tail.split_at(len);
        rest = tail;
        std::str::from_utf8(s)
            .map(str::to_string)
            .map_err(|_| corrupt("identifier is not UTF-8"))
    };
    let user = match form {
        b'e' => UserId::External(text()?),
        b'b' => UserId::Braze(text()?),
        b'm' => UserId::Email(text()?),
        b'p' => UserId::Phone(text()?),
        b'a' => UserId::Alias {
            name: text()?,
            label: text()?,
        },
        _ => return Err(corrupt("unknown identifier form")),
    };
    let members = std::str::from_utf8(rest).map_err(|_| corrupt("members are not UTF-8"))?;
    if !members.starts_with("\"name\":") {
        return Err(corrupt("members do not start with the name"));
    }
    Ok(Stored {
        accepted_at_ms: u64::from_be_bytes(*at),
        record: Record::Event(Event {
            user,
            members: members.to_string(),
        }),
        origin: None,
    })
}

/// Version byte of an event chunk: a lane-1 value holding several events. Events are a log
/// that is only ever appended and drained, so a request's events share one value instead of
/// one sled key each: sled 0.34 pays a tree node copy per insert and keeps a resident page
/// entry per key, so a key per event would cost CPU at ingest and memory for every event of
/// a backlog. A lane-1 value with another version byte is one envelope stored under its own
/// sequence number (as databases from before chunks hold every event, or a chunk of one).
pub const EVENT_CHUNK_V1: u8 = 3;

/// The framing of an event chunk, after its version byte: a u32 count, then per event its
/// sequence number as a u32 offset from the key's and its envelope's length (u32 each, all
/// big-endian), then the envelopes back to back. Offsets are explicit because a request may
/// interleave events with attribute updates, which take sequence numbers of their own.
pub fn encode_event_chunk<'a>(
    first: u64,
    entries: impl ExactSizeIterator<Item = (u64, &'a [u8])> + Clone,
) -> Vec<u8> {
    let payload: usize = entries.clone().map(|(_, e)| e.len()).sum();
    let mut out = Vec::with_capacity(5 + entries.len() * 8 + payload);
    out.push(EVENT_CHUNK_V1);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (seq, envelope) in entries.clone() {
        // Within a chunk seqs grow from the key's by fewer than the records of one request.
        let offset = u32::try_from(seq - first).expect("a chunk spans less than 2^32 seqs");
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    }
    for (_, envelope) in entries {
        out.extend_from_slice(envelope);
    }
    out
}

/// The events in the lane-1 value stored under `first`, with their sequence numbers, in order.
/// Envelopes are not decoded here: a lease decodes only the ones it takes.
pub fn event_entries(first: u64, value: &[u8]) -> Result<Vec<(u64, &[u8])>, DecodeError> {
    let (&version, body) = value.split_first().ok_or(DecodeError::Empty)?;
    if version != EVENT_CHUNK_V1 {
        return Ok(vec![(first, value)]);
    }
    let corrupt = |what: &str| DecodeError::Corrupt(format!("event chunk: {what}"));
    let u32_at = |at: usize| -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(|| corrupt("truncated header"))?
                .try_into()
                .expect("4 bytes"),
        ))
    };
    let count = u32_at(0)? as usize;
    // Checked before anything is reserved: a damaged count must not allocate gigabytes.
    let header = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&n| n <= body.len())
        .ok_or_else(|| corrupt("count past the value"))?;
    let mut out = Vec::with_capacity(count);
    let mut at = header;
    for i in 0..count {
        let seq = first + u64::from(u32_at(4 + i * 8)?);
        let len = u32_at(8 + i * 8)? as usize;
        let envelope = body
            .get(at..at + len)
            .ok_or_else(|| corrupt("entry past the value"))?;
        out.push((seq, envelope));
        at += len;
    }
    if at != body.len() {
        return Err(corrupt("bytes after the last entry"));
    }
    Ok(out)
}

/// How many events a lane-1 value claims to hold, even if it no longer decodes: what the
/// queue counts drop by when it is moved aside whole.
pub fn event_count(value: &[u8]) -> u64 {
    match value.split_first() {
        Some((&EVENT_CHUNK_V1, body)) => body
            .get(..4)
            .map_or(1, |c| {
                u32::from_be_bytes(c.try_into().expect("4 bytes")) as u64
            })
            .clamp(1, (body.len() / 8).max(1) as u64),
        _ => 1,
    }
}

pub fn encode_dead(dead: &Dead) -> Vec<u8> {
    let mut out = vec![DEAD_V1];
    bincode::serde::encode_into_std_write(
        DeadV1 {
            dead_at_ms: dead.dead_at_ms,
            attempts: dead.attempts,
            reason: dead.reason.clone(),
            stored: dead.stored.clone(),
        },
        &mut out,
        config(),
    )
    .expect("bincode encoding into a Vec cannot fail");
    out
}

pub fn decode_dead(bytes: &[u8]) -> Result<Dead, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match version {
        DEAD_V1 => {
            let d: DeadV1 = decode_body(body)?;
            Ok(Dead {
                dead_at_ms: d.dead_at_ms,
                attempts: d.attempts,
                reason: d.reason,
                stored: d.stored,
            })
        }
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_their_members() {
        let time = "2026-01-01T00:00:00.000Z";
        let users = [
            UserId::Braze("b1".into()),
            UserId::External("caf\u{e9}".into()),
            UserId::Email("a@b.co".into()),
            UserId::Phone("+15550100".into()),
            UserId::Alias {
                name: "n".into(),
                label: "l".into(),
            },
        ];
        for (i, user) in users.into_iter().enumerate() {
            let props = (i % 2 == 0).then_some(r#"{"sku":"x","n":[1,2]}"#);
            let r = Record::Event(Event::new(user, "purchase \"x\"", time, props));
            let bytes = encode(&r, 42);
            assert_eq!(bytes[0], EVENT_V3);
            let back = decode(&bytes).unwrap();
            assert_eq!((back.accepted_at_ms, &back.record), (42, &r));
            let Record::Event(e) = back.record else {
                unreachable!()
            };
            let fields = e.fields().unwrap();
            assert_eq!(
                (fields.name.as_str(), fields.time.as_str()),
                ("purchase \"x\"", time)
            );
            assert_eq!(fields.properties.is_some(), props.is_some());
            // Any cut through the identifier is an error, never a panic or a shorter event.
            for cut in 9..bytes.len() - e.members.len() {
                assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    /// Events written before `EVENT_V3` still decode, into the same members. The V1 literal
    /// is `{accepted 7, external_id "u", name "n", time "t", properties {}}`.
    #[test]
    fn events_written_as_version_one_or_two_still_decode() {
        let v1 = [1, 7, 1, 0, 1, b'u', 1, b'n', 1, b't', 1, 2, b'{', b'}'];
        let back = decode(&v1).unwrap();
        let expected = Event::new(UserId::External("u".into()), "n", "t", Some("{}"));
        assert_eq!(back.record, Record::Event(expected));
        assert_eq!(back.accepted_at_ms, 7);

        let mut v2 = vec![V2];
        bincode::serde::encode_into_std_write(
            StoredV2 {
                accepted_at_ms: 9,
                record: RecordV2::Event {
                    user: UserIdV2::Phone("+1".into()),
                    name: "e".into(),
                    time: "t".into(),
                    properties: None,
                },
            },
            &mut v2,
            config(),
        )
        .unwrap();
        let back = decode(&v2).unwrap();
        let expected = Event::new(UserId::Phone("+1".into()), "e", "t", None);
        assert_eq!(back.record, Record::Event(expected));
    }

    /// A retried update keeps its origin through a second retry, and a latest-index value
    /// carries a rank only where it differs from the seq.
    #[test]
    fn origins_and_index_ranks_round_trip() {
        let r = Record::Attribute(AttributeUpdate {
            user: UserId::External("u".into()),
            name: "color".into(),
            value: r#""blue""#.into(),
            object_fields: None,
        });
        let plain = encode(&r, 7);
        assert_eq!(decode(&plain).unwrap().rank(12), 12);
        let once = with_origin(&plain, 3);
        let twice = with_origin(&once, 3);
        assert_eq!(once, twice, "a second retry does not wrap again");
        let back = decode(&twice).unwrap();
        assert_eq!((back.origin, back.rank(40), back.record), (Some(3), 3, r));
        assert!(matches!(
            decode(&[RETRIED_V1, 0, 0, 0, 0, 0, 0, 0, 3, RETRIED_V1]),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(&[RETRIED_V1, 0, 3]),
            Err(DecodeError::Corrupt(_))
        ));

        let fields = br#"{"_update_existing_only":true}"#;
        let fresh = latest_value(9, 9, fields);
        assert_eq!(
            fresh.len(),
            8 + fields.len(),
            "the form every release wrote"
        );
        assert_eq!(decode_latest(&fresh), Some((9, 9, &fields[..])));
        let behind = latest_value(9, 12, fields);
        assert_eq!(decode_latest(&behind), Some((9, 12, &fields[..])));
        assert_eq!(
            decode_latest(&latest_value(9, 12, b"")),
            Some((9, 12, &b""[..]))
        );
        assert_eq!(decode_latest(&[0; 8]), Some((0, 0, &b""[..])));
        assert_eq!(decode_latest(&[0; 7]), None);
    }

    /// Bytes written by version 1 must decode forever: this literal is a V1 membership.
    #[test]
    fn version_one_bytes_written_today_still_decode() {
        let m = Record::Membership(Membership {
            user: UserId::External("u".into()),
            audience_id: "a".into(),
            split_id: "s".into(),
            member: true,
            time: None,
        });
        let bytes = encode(&m, 7);
        assert_eq!(bytes, vec![1, 7, 0, 0, 1, b'u', 1, b'a', 1, b's', 1, 0]);
        assert_eq!(decode(&bytes).unwrap().record, m);
    }

    #[test]
    fn relay_records_round_trip_as_version_two() {
        let records = [
            Record::Attribute(AttributeUpdate {
                user: UserId::Alias {
                    name: "n".into(),
                    label: "l".into(),
                },
                name: "tags".into(),
                value: r#"{"add":["a"]}"#.into(),
                object_fields: Some(r#"{"_update_existing_only":true}"#.into()),
            }),
            Record::Tracked(TrackObject {
                array: TrackArray::Purchases,
                user: UserId::Email("a@b.co".into()),
                json: r#"{"email":"a@b.co","product_id":"p"}"#.into(),
            }),
        ];
        for r in records {
            let bytes = encode(&r, 9);
            assert_eq!(bytes[0], V2);
            assert_eq!(decode(&bytes).unwrap().record, r);
        }
    }

    #[test]
    fn latest_keys_of_different_identifier_forms_never_collide() {
        let alias = |n: &str, l: &str| UserId::Alias {
            name: n.into(),
            label: l.into(),
        };
        let keys = [
            latest_key(&UserId::External("ab".into()), "x"),
            latest_key(&UserId::Braze("ab".into()), "x"),
            latest_key(&UserId::Email("ab".into()), "x"),
            latest_key(&alias("a", "bx"), ""),
            latest_key(&alias("ab", "x"), ""),
            latest_key(&alias("ab", ""), "x"),
        ];
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors_not_panics() {
        assert!(matches!(
            decode(&[9, 1, 2]),
            Err(DecodeError::UnknownVersion(9))
        ));
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode(&[1, 0xff, 0xff]),
            Err(DecodeError::Corrupt(_))
        ));
    }

    /// A damaged length prefix (found by the `decode` fuzz target) must be an error: bincode
    /// allocates what a prefix says before reading, and a failed allocation aborts.
    #[test]
    fn a_length_prefix_past_the_value_is_an_error_not_an_abort() {
        // 0xfd: a u64 length follows; this one says 2^60 - 1 bytes.
        let huge = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let record = [&[V1, 7, 0, 0][..], &huge].concat();
        assert!(matches!(decode(&record), Err(DecodeError::Corrupt(_))));
        let dead = [&[DEAD_V1, 7, 1][..], &huge].concat();
        assert!(matches!(decode_dead(&dead), Err(DecodeError::Corrupt(_))));
        // A string that claims 1 MiB in a value of a few bytes.
        let record = [V2, 7, 0, 0, 0xfc, 0, 0, 0x10, 0];
        assert!(matches!(decode(&record), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn record_keys_sort_by_lane_then_sequence() {
        assert!(record_key(LANE_EVENTS, 255) < record_key(LANE_EVENTS, 256));
        assert!(record_key(LANE_EVENTS, u64::MAX) < record_key(LANE_ATTRIBUTES, 0));
        assert_eq!(seq_of(&record_key(DEAD, 77)), Some(77));
    }
}
