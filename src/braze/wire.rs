//! The `/users/track` request body, built from leased records.
//!
//! Events become `events` objects. Membership updates become `attributes` objects, one per
//! user: several updates of one user in a batch travel as one object, which is one object
//! against Braze's 75. Each object remembers which records it came from, so Braze's per-object
//! `errors` (index into the array as sent) map back to records.

use std::collections::HashMap;
use std::io::Write;

use crate::queue::Leased;
use crate::record::{Record, UserId};

/// A request body ready to send, and where each object in it came from.
#[derive(Debug)]
pub struct TrackBody {
    pub json: Vec<u8>,
    /// For each object in `attributes`, positions (in the leased slice) of its records.
    pub attributes: Vec<Vec<usize>>,
    /// For each object in `events`, the position of its record.
    pub events: Vec<usize>,
}

impl TrackBody {
    pub fn objects(&self) -> usize {
        self.attributes.len() + self.events.len()
    }

    /// Positions of the records behind an object Braze named in an error.
    pub fn records_of(&self, input_array: &str, index: usize) -> &[usize] {
        match input_array {
            "attributes" => self.attributes.get(index).map_or(&[], |v| v.as_slice()),
            "events" => self.events.get(index).map_or(&[], std::slice::from_ref),
            _ => &[],
        }
    }
}

/// Writes a JSON string literal; serde_json's escaping is the one Braze reads.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing JSON into a Vec cannot fail");
}

fn write_user(out: &mut Vec<u8>, user: &UserId) {
    out.push(b'"');
    out.extend_from_slice(user.field().as_bytes());
    out.extend_from_slice(b"\":");
    json_str(out, user.value());
}

/// Builds the body for `items`, in their order. Attribute objects are ordered by each user's
/// first record, so within one user later records come later.
pub fn build(items: &[Leased]) -> TrackBody {
    let mut users: Vec<(&UserId, Vec<usize>)> = Vec::new();
    let mut user_index: HashMap<&UserId, usize> = HashMap::new();
    let mut events = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        match &item.stored.record {
            Record::Event(_) => events.push(pos),
            Record::Membership(m) => {
                let i = *user_index.entry(&m.user).or_insert_with(|| {
                    users.push((&m.user, Vec::new()));
                    users.len() - 1
                });
                users[i].1.push(pos);
            }
        }
    }

    let mut json = Vec::with_capacity(items.len() * 160 + 32);
    json.push(b'{');
    if !users.is_empty() {
        json.extend_from_slice(b"\"attributes\":[");
        for (n, (user, positions)) in users.iter().enumerate() {
            if n > 0 {
                json.push(b',');
            }
            json.push(b'{');
            write_user(&mut json, user);
            for &pos in positions {
                if let Record::Membership(m) = &items[pos].stored.record {
                    json.push(b',');
                    json_str(&mut json, &m.attribute());
                    let _ = write!(json, ":{}", m.member);
                }
            }
            json.push(b'}');
        }
        json.push(b']');
    }
    if !events.is_empty() {
        if !users.is_empty() {
            json.push(b',');
        }
        json.extend_from_slice(b"\"events\":[");
        for (n, &pos) in events.iter().enumerate() {
            if n > 0 {
                json.push(b',');
            }
            if let Record::Event(e) = &items[pos].stored.record {
                json.push(b'{');
                write_user(&mut json, &e.user);
                json.extend_from_slice(b",\"name\":");
                json_str(&mut json, &e.name);
                json.extend_from_slice(b",\"time\":");
                json_str(&mut json, &e.time);
                if let Some(p) = &e.properties {
                    // Stored as JSON text re-encoded by serde_json at ingest: valid as is.
                    json.extend_from_slice(b",\"properties\":");
                    json.extend_from_slice(p.as_bytes());
                }
                json.push(b'}');
            }
        }
        json.push(b']');
    }
    json.push(b'}');
    TrackBody {
        json,
        attributes: users.into_iter().map(|(_, p)| p).collect(),
        events,
    }
}

/// Splits leased records into two halves by Braze object (a user's attribute updates stay
/// together), for finding the record Braze refuses a whole request for. Returns `None` when the
/// records form a single object and cannot be split further.
pub fn split_in_half(items: Vec<Leased>) -> Result<(Vec<Leased>, Vec<Leased>), Vec<Leased>> {
    let body = build(&items);
    let objects: Vec<Vec<usize>> = body
        .attributes
        .iter()
        .cloned()
        .chain(body.events.iter().map(|&p| vec![p]))
        .collect();
    if objects.len() < 2 {
        return Err(items);
    }
    let half = objects.len() / 2;
    let mut side = vec![false; items.len()];
    for object in &objects[half..] {
        for &p in object {
            side[p] = true;
        }
    }
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (item, second_half) in items.into_iter().zip(side) {
        if second_half {
            second.push(item);
        } else {
            first.push(item);
        }
    }
    Ok((first, second))
}
