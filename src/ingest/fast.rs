//! The fast path for `/v1/events`: the fields of each event borrowed straight from the body.
//!
//! The full path builds a `serde_json::Value` tree for every record, then serialises its
//! `properties` back to text; this path does neither (BENCHMARKS.md, "End to end beside
//! syslog-ng (the peers bench)"). Here an event's fields are read as borrowed slices, each
//! property's value kept as the text the client sent, and the event's members written once
//! from them. Only a body whose every record passes every check is taken from here, and the
//! result is the same event as the full path would make (the properties may keep the
//! client's key order and the spacing inside values; the JSON is the same). Anything else
//! returns `None` and goes through the full path, which finds the first problem and says
//! where it is: this path never accepts what the full path refuses, and never reports an
//! error of its own.

use std::borrow::Cow;

use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{
    format_time, MAX_EXTERNAL_ID_BYTES, MAX_NAME_CHARS, MAX_PROPERTIES_BYTES,
    MAX_RECORDS_PER_REQUEST,
};
use crate::config::PreferId;
use crate::record::{Event, UserId};

/// The fields of an event that ingest reads; the others are ignored, as on the full path.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<Properties<'a>>,
    #[serde(borrow, default)]
    external_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    braze_id: Option<Cow<'a, str>>,
}

/// Every event of a JSON array or NDJSON body, or `None` if the full path must look at it.
pub fn events(body: &[u8], prefer: PreferId) -> Option<Vec<Event>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    // Checked whole, once: parsed from bytes, serde_json would check every string it borrows
    // on its own. A body that is not UTF-8 is the full path's to refuse.
    let body = std::str::from_utf8(body).ok()?;
    let first = body.bytes().position(|b| !b.is_ascii_whitespace())?;
    let out: Vec<Event> = if body.as_bytes()[first] == b'[' {
        // Element by element: a whole `Vec<Fields>` of a body of `{}` would be many times
        // the body's size before the first event was found wanting.
        use serde::Deserializer as _;
        let mut de = serde_json::Deserializer::from_str(body);
        let events = de.deserialize_seq(Events { prefer }).ok()?;
        de.end().ok()?;
        events
    } else {
        body.split('\n')
            .filter(|line| !line.bytes().all(|b| b.is_ascii_whitespace()))
            .take(MAX_RECORDS_PER_REQUEST + 1)
            .map(|line| event(serde_json::from_str(line).ok()?, prefer))
            .collect::<Option<_>>()?
    };
    (!out.is_empty() && out.len() <= MAX_RECORDS_PER_REQUEST).then_some(out)
}

/// The events of a JSON array, made as each element is read; fails at the first element
/// that is not a plain event, and past `MAX_RECORDS_PER_REQUEST` (the full path says why).
struct Events {
    prefer: PreferId,
}

impl<'de> Visitor<'de> for Events {
    type Value = Vec<Event>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Event>, A::Error> {
        let refuse = || serde::de::Error::custom("the full path decides");
        let mut out = Vec::new();
        while let Some(fields) = seq.next_element::<Fields>()? {
            if out.len() == MAX_RECORDS_PER_REQUEST {
                return Err(refuse());
            }
            out.push(event(fields, self.prefer).ok_or_else(refuse)?);
        }
        Ok(out)
    }
}

fn event(f: Fields, prefer: PreferId) -> Option<Event> {
    let name = f.name?;
    if name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return None;
    }
    let time = time(f.time?)?;
    let members = match f.properties {
        None => crate::record::event_members(&name, &time, None),
        Some(p) => crate::record::event_members_of(&name, &time, &p.0, MAX_PROPERTIES_BYTES)?,
    };
    Some(Event {
        user: user(f.external_id, f.braze_id, prefer)?,
        members,
    })
}

/// The same choice and checks as the full path's `user_id`.
fn user(external: Option<Cow<str>>, braze: Option<Cow<str>>, prefer: PreferId) -> Option<UserId> {
    let sound = |id: &Option<Cow<str>>| {
        id.as_ref()
            .is_none_or(|id| !id.trim().is_empty() && id.len() <= MAX_EXTERNAL_ID_BYTES)
    };
    if !sound(&external) || !sound(&braze) {
        return None;
    }
    match (external, braze, prefer) {
        (Some(_), Some(id), PreferId::Braze) | (None, Some(id), _) => {
            Some(UserId::Braze(id.into_owned()))
        }
        (Some(id), _, _) => Some(UserId::External(id.into_owned())),
        (None, None, _) => None,
    }
}

/// An RFC 3339 string or Unix seconds, as the full path's `timestamp` reads them.
fn time(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let parsed = if text.starts_with('"') {
        let s: Cow<str> = serde_json::from_str(text).ok()?;
        if super::is_canonical_time(&s) {
            return Some(s);
        }
        OffsetDateTime::parse(&s, &Rfc3339).ok()?
    } else {
        let secs: i64 = serde_json::from_str(text).ok()?;
        OffsetDateTime::from_unix_timestamp(secs).ok()?
    };
    Some(format_time(parsed).into())
}

/// Objects with more names than this are checked by the full path.
const MAX_FAST_NAMES: usize = 64;

/// A properties object, read in the same pass as its event: its top-level names, each one
/// Braze takes and none repeated (the full path keeps the last of a repeated name; sending
/// both would leave the choice to Braze), and each value's text as sent. Anything else is an
/// error here, which sends the body to the full path to be judged and explained.
struct Properties<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Properties<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Members<'a> {
            type Value = Properties<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object whose names Braze takes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Properties<'a>, A::Error> {
                let mut members: Vec<(Cow<'a, str>, &'a RawValue)> = Vec::with_capacity(8);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    // The repeat check is quadratic: many names go to the full path instead.
                    let takes = members.len() < MAX_FAST_NAMES
                        && !key.is_empty()
                        && !key.starts_with('$')
                        && key != "time"
                        && key != "event_name"
                        && key.chars().count() <= MAX_NAME_CHARS
                        && members.iter().all(|(k, _)| *k != key);
                    if !takes {
                        return Err(serde::de::Error::custom("for the full path"));
                    }
                    members.push((key, value));
                }
                Ok(Properties(members))
            }
        }
        d.deserialize_map(Members(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the full path makes of a body.
    fn full(body: &[u8], prefer: PreferId) -> Result<Vec<Event>, super::super::BadInput> {
        let mut out = Vec::new();
        super::super::for_each_record(body, |r| {
            out.push(super::super::event_of(&r, prefer)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The same users and fields; the properties' text may differ in spacing and order.
    fn same(a: &[Event], b: &[Event]) -> bool {
        let fields = |e: &Event| e.fields().expect("members built at ingest parse");
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.user == y.user && fields(x) == fields(y))
    }

    fn field() -> impl Strategy<Value = Option<(&'static str, String)>> {
        let long = "x".repeat(256);
        let too_long_id = format!("\"{}\"", "u".repeat(988));
        prop_oneof![
            Just(None),
            prop::sample::select(vec![
                ("name", "\"buy\"".to_string()),
                ("name", "\"caf\\u00e9 \\\"x\\\"\"".to_string()),
                ("name", "\"\"".to_string()),
                ("name", "\"  \"".to_string()),
                ("name", "null".to_string()),
                ("name", "7".to_string()),
                ("name", format!("\"{long}\"")),
                ("time", "\"2026-11-28T10:00:00Z\"".to_string()),
                ("time", "\"2026-11-28T10:00:00.123+02:00\"".to_string()),
                ("time", "\"yesterday\"".to_string()),
                ("time", "1764324000".to_string()),
                ("time", "-5".to_string()),
                ("time", "1.5".to_string()),
                ("time", "99999999999999999999".to_string()),
                ("time", "null".to_string()),
                (
                    "properties",
                    "{\"a\": 1, \"b\": {\"c\": [1, \"d\"]}}".to_string()
                ),
                ("properties", "{}".to_string()),
                ("properties", "null".to_string()),
                ("properties", "{\"$x\":1}".to_string()),
                ("properties", "{\"time\":1}".to_string()),
                ("properties", "{\"\":1}".to_string()),
                ("properties", "{\"a\":1,\"a\":2}".to_string()),
                ("properties", "[1]".to_string()),
                ("properties", "\"s\"".to_string()),
                ("external_id", "\"u-1\"".to_string()),
                ("external_id", "\"\"".to_string()),
                ("external_id", "null".to_string()),
                ("external_id", "5".to_string()),
                ("external_id", too_long_id.clone()),
                ("braze_id", "\"b-1\"".to_string()),
                ("braze_id", "\" \"".to_string()),
                ("braze_id", too_long_id),
                ("id", "12".to_string()),
            ])
            .prop_map(Some),
        ]
    }

    fn record() -> impl Strategy<Value = String> {
        // A name given twice always takes the full path (serde refuses the repeat); that is
        // tested on its own below.
        prop::collection::vec(field(), 0..7).prop_map(|fields| {
            let mut seen = std::collections::HashSet::new();
            let members: Vec<String> = fields
                .into_iter()
                .flatten()
                .filter(|(k, _)| seen.insert(*k))
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            format!("{{{}}}", members.join(","))
        })
    }

    proptest! {
        /// Whatever the fast path accepts, the full path accepts as the same events; and the
        /// fast path never accepts what the full path refuses.
        #[test]
        fn the_fast_path_agrees_with_the_full_path(
            records in prop::collection::vec(record(), 1..4),
            array in any::<bool>(),
            braze in any::<bool>(),
        ) {
            let body = if array {
                format!("[{}]", records.join(",\n"))
            } else {
                records.join("\n")
            };
            let prefer = if braze { PreferId::Braze } else { PreferId::External };
            let slow = full(body.as_bytes(), prefer);
            match events(body.as_bytes(), prefer) {
                Some(fast) => {
                    let slow = slow.expect("the full path refused what the fast path took");
                    prop_assert!(same(&fast, &slow), "{body}");
                }
                None => {
                    // Only a body the full path refuses, or one whose properties repeat a
                    // name, takes the long way.
                    if slow.is_ok() {
                        prop_assert!(body.contains(r#""a":1,"a":2"#), "{body}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_ordinary_body_takes_the_fast_path() {
        let body = br#"[{"name":"purchase","external_id":"u-1","time":"2026-11-28T10:00:00Z","properties":{"sku":"A","n":2}},
{"name":"view","braze_id":"b-9","time":1764324000}]"#;
        let fast = events(body, PreferId::External).expect("fast path");
        assert!(same(&fast, &full(body, PreferId::External).unwrap()));
        assert!(
            fast[0]
                .members
                .ends_with(r#","properties":{"sku":"A","n":2}"#),
            "the properties as sent: {}",
            fast[0].members
        );
        assert_eq!(
            fast[1].members,
            r#""name":"view","time":"2025-11-28T10:00:00.000Z""#
        );
    }

    #[test]
    fn a_field_given_twice_takes_the_full_path() {
        let body = br#"{"name":"a","name":"b","external_id":"u","time":1}"#;
        assert!(events(body, PreferId::External).is_none());
        let slow = full(body, PreferId::External).unwrap();
        let name = |e: &Event| e.fields().unwrap().name;
        assert_eq!(name(&slow[0]), "b");
        assert_eq!(name(&parse(body)[0]), "b");
    }

    fn parse(body: &[u8]) -> Vec<Event> {
        super::super::parse_events(body, PreferId::External).unwrap()
    }
}
