//! The `/users/track` request body, built from records.
//!
//! Events become `events` objects, relayed purchases `purchases` objects, both as they were
//! accepted. Attribute updates (memberships included) become `attributes` objects, one per
//! user and set of object-level fields: several updates of one user in a batch travel as one
//! object, which is one object against Braze's 75
//! (<https://www.braze.com/docs/api/endpoints/user_data/post_user_track>). Each object
//! remembers which records it came from, so Braze's per-object `errors` (index into the array
//! as sent) map back to records.
//!
//! `/v1` records get the configured `_update_existing_only` for their kind, always written
//! out (Braze's defaults differ by identifier form:
//! <https://www.braze.com/docs/api/objects_filters/user_attributes_object>); relayed objects
//! carry their own fields. This module only builds bytes: it never sends them, and never
//! changes a value accepted at ingest or relayed.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::config::UpdateExistingOnly;
use crate::record::{json_str, Record, TrackArray, UserId};

/// A request body ready to send, and where each object in it came from.
#[derive(Debug)]
pub struct TrackBody {
    pub json: Vec<u8>,
    /// For each object in `attributes`, positions (in the records given) of its records.
    pub attributes: Vec<Vec<usize>>,
    /// For each object in `events`, the position of its record.
    pub events: Vec<usize>,
    /// For each object in `purchases`, the position of its record.
    pub purchases: Vec<usize>,
}

impl TrackBody {
    pub fn objects(&self) -> usize {
        self.attributes.len() + self.events.len() + self.purchases.len()
    }

    /// Positions of the records behind an object Braze named in an error.
    pub fn records_of(&self, input_array: &str, index: usize) -> &[usize] {
        match input_array {
            "attributes" => self.attributes.get(index).map_or(&[], |v| v.as_slice()),
            "events" => self.events.get(index).map_or(&[], std::slice::from_ref),
            "purchases" => self.purchases.get(index).map_or(&[], std::slice::from_ref),
            _ => &[],
        }
    }

    /// Every object's records, attributes first, in the order they are sent.
    fn objects_in_order(&self) -> Vec<Vec<usize>> {
        let singles = self.events.iter().chain(&self.purchases).map(|&p| vec![p]);
        self.attributes.iter().cloned().chain(singles).collect()
    }
}

fn write_user(out: &mut Vec<u8>, user: &UserId) {
    json_str(out, user.field());
    out.push(b':');
    match user {
        UserId::Alias { name, label } => {
            out.extend_from_slice(b"{\"alias_name\":");
            json_str(out, name);
            out.extend_from_slice(b",\"alias_label\":");
            json_str(out, label);
            out.push(b'}');
        }
        _ => json_str(out, user.value()),
    }
}

/// Writes the members of a JSON object's text (`{"a":1}` gives `,"a":1`), for object-level
/// fields stored as an object.
fn write_members(out: &mut Vec<u8>, object: &str) {
    let inner = object
        .trim()
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'))
        .unwrap_or("")
        .trim();
    if !inner.is_empty() {
        out.push(b',');
        out.extend_from_slice(inner.as_bytes());
    }
}

/// Appends one `"name":value` member for an attribute update.
fn write_attribute(out: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Membership(m) => {
            out.push(b',');
            json_str(out, &m.attribute());
            out.extend_from_slice(if m.member { b":true" } else { b":false" });
        }
        // The object alone: Braze creates the profile.
        Record::Attribute(a) if a.is_profile_only() => {}
        Record::Attribute(a) => {
            out.push(b',');
            json_str(out, &a.name);
            out.push(b':');
            // Stored as the JSON text accepted at ingest, checked there: valid as is.
            out.extend_from_slice(a.value.as_bytes());
        }
        Record::Event(_) | Record::Tracked(_) => {}
    }
}

/// The object-level fields an attribute update is sent with, as a JSON object's text.
fn object_fields<'a>(record: &'a Record, policy: &UpdateExistingOnly) -> Cow<'a, str> {
    let flag = |on: bool| {
        Cow::Borrowed(if on {
            r#"{"_update_existing_only":true}"#
        } else {
            r#"{"_update_existing_only":false}"#
        })
    };
    match record {
        Record::Membership(_) => flag(policy.memberships),
        Record::Attribute(a) => match &a.object_fields {
            Some(fields) => Cow::Borrowed(fields),
            None => flag(policy.attributes),
        },
        Record::Event(_) => flag(policy.events),
        Record::Tracked(_) => Cow::Borrowed(""),
    }
}

fn write_event(out: &mut Vec<u8>, record: &Record, policy: &UpdateExistingOnly) {
    match record {
        Record::Event(e) => {
            out.push(b'{');
            write_user(out, &e.user);
            write_members(out, &object_fields(record, policy));
            out.push(b',');
            out.extend_from_slice(e.members.as_bytes());
            out.push(b'}');
        }
        // Relayed objects go out exactly as the client sent them.
        Record::Tracked(t) => out.extend_from_slice(t.json.as_bytes()),
        Record::Membership(_) | Record::Attribute(_) => {}
    }
}

fn write_array(out: &mut Vec<u8>, name: &str, items: &[usize], each: impl Fn(&mut Vec<u8>, usize)) {
    if items.is_empty() {
        return;
    }
    if out.len() > 1 {
        out.push(b',');
    }
    json_str(out, name);
    out.extend_from_slice(b":[");
    for (n, &pos) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        each(out, pos);
    }
    out.push(b']');
}

/// The object `record` is sent to Braze as when it travels alone: what Braze was sent for a
/// dead letter (a refused object that merged several records is sent again record by record
/// before any is dead-lettered), and what a pending record will be sent as.
pub fn object_of(record: &Record, policy: &UpdateExistingOnly) -> serde_json::Value {
    let mut out = Vec::with_capacity(256);
    match record {
        Record::Membership(_) | Record::Attribute(_) => {
            out.push(b'{');
            write_user(&mut out, record.user());
            write_members(&mut out, &object_fields(record, policy));
            write_attribute(&mut out, record);
            out.push(b'}');
        }
        Record::Event(_) | Record::Tracked(_) => write_event(&mut out, record, policy),
    }
    serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
}

/// Builds the body for `items`, in their order. Attribute objects are ordered by each
/// object's first record, so within one user later records come later.
pub fn build<T: AsRef<Record>>(items: &[T], policy: &UpdateExistingOnly) -> TrackBody {
    type ObjectKey<'a> = (&'a UserId, Cow<'a, str>);
    let mut objects: Vec<(ObjectKey, Vec<usize>)> = Vec::new();
    let mut object_index: HashMap<ObjectKey, usize> = HashMap::new();
    let (mut events, mut purchases) = (Vec::new(), Vec::new());
    for (pos, item) in items.iter().enumerate() {
        let record = item.as_ref();
        match record {
            Record::Tracked(t) if t.array == TrackArray::Purchases => purchases.push(pos),
            Record::Event(_) | Record::Tracked(_) => events.push(pos),
            Record::Membership(_) | Record::Attribute(_) => {
                let key = (record.user(), object_fields(record, policy));
                let i = *object_index.entry(key.clone()).or_insert_with(|| {
                    objects.push((key, Vec::new()));
                    objects.len() - 1
                });
                objects[i].1.push(pos);
            }
        }
    }

    // Sized for what is written, so the body is not copied as it grows: an event is its
    // members plus its identifier and object-level fields.
    let size: usize = items
        .iter()
        .map(|item| match item.as_ref() {
            Record::Event(e) => e.members.len() + e.user.value().len() + 64,
            Record::Tracked(t) => t.json.len() + 1,
            _ => 160,
        })
        .sum();
    let mut json = Vec::with_capacity(size + 64);
    json.push(b'{');
    let attributes: Vec<Vec<usize>> = objects.iter().map(|(_, p)| p.clone()).collect();
    let order: Vec<usize> = (0..objects.len()).collect();
    write_array(&mut json, "attributes", &order, |out, i| {
        let ((user, fields), positions) = &objects[i];
        out.push(b'{');
        write_user(out, user);
        write_members(out, fields);
        for &pos in positions {
            write_attribute(out, items[pos].as_ref());
        }
        out.push(b'}');
    });
    write_array(&mut json, "events", &events, |out, pos| {
        write_event(out, items[pos].as_ref(), policy)
    });
    write_array(&mut json, "purchases", &purchases, |out, pos| {
        write_event(out, items[pos].as_ref(), policy)
    });
    json.push(b'}');
    TrackBody {
        json,
        attributes,
        events,
        purchases,
    }
}

/// Splits leased records into two halves by Braze object (a user's attribute updates stay
/// together), for finding the record Braze refuses a whole request for. Gives the records
/// back as `Err` when they form a single object and cannot be split further.
pub fn split_in_half<T: AsRef<Record>>(
    items: Vec<T>,
    policy: &UpdateExistingOnly,
) -> Result<(Vec<T>, Vec<T>), Vec<T>> {
    let objects = build(&items, policy).objects_in_order();
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
