//! The Braze-compatible front door: a `/users/track` body checked the way Braze checks it and
//! turned into records.
//!
//! A Braze client pointed at the daemon must not notice the difference, so the answers are
//! Braze's (<https://www.braze.com/docs/api/endpoints/user_data/post_user_track>): objects
//! Braze would refuse on their own come back in `errors` with the `input_array` and `index`
//! they had in the body, while the others are queued; a body that is not a `/users/track`
//! body at all is refused whole.
//!
//! What is queued is what the client sent. `events` and `purchases` objects are kept as their
//! exact JSON text. An `attributes` object is split into one update per attribute, each value
//! kept as its exact JSON text with the object-level fields (`_update_existing_only`,
//! `_merge_objects`, `push_token_import`) beside it; delivery puts one user's updates back
//! into one object. Splitting is what lets the queue keep the last accepted value of each
//! attribute per user, whatever objects the values arrived in. The relay never talks to
//! Braze, and never queues anything itself: `http.rs` queues the records it returns.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::ingest::{
    check_attribute_name, MAX_EXTERNAL_ID_BYTES, MAX_NAME_CHARS, MAX_PROPERTIES_BYTES,
    MAX_RECORDS_PER_REQUEST,
};
use crate::record::{AttributeUpdate, Record, TrackArray, TrackObject, UserId};

/// Braze's message when no object in the body is usable.
pub const NOTHING_VALID: &str =
    "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";

/// Fields of an `attributes` object that describe the object rather than set an attribute.
const OBJECT_FIELDS: [&str; 3] = [
    "_update_existing_only",
    "_merge_objects",
    "push_token_import",
];

/// One object Braze would refuse, named the way Braze names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    #[serde(rename = "type")]
    pub kind: String,
    pub input_array: &'static str,
    pub index: usize,
}

/// A body that is refused whole: Braze answers these with a 400 and applies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub message: String,
    pub errors: Vec<ObjectError>,
}

/// What a body becomes: the records to queue, and what to answer once they are durable.
#[derive(Debug, Default)]
pub struct Relayed {
    pub records: Vec<Record>,
    /// Objects accepted per array; `None` for an array the body did not carry (Braze leaves
    /// its count out then).
    pub attributes: Option<usize>,
    pub events: Option<usize>,
    pub purchases: Option<usize>,
    pub errors: Vec<ObjectError>,
}

impl Relayed {
    /// Braze's success body.
    pub fn answer(&self) -> Value {
        let mut o = serde_json::Map::new();
        o.insert("message".into(), "success".into());
        for (key, count) in [
            ("attributes_processed", self.attributes),
            ("events_processed", self.events),
            ("purchases_processed", self.purchases),
        ] {
            if let Some(n) = count {
                o.insert(key.into(), n.into());
            }
        }
        if !self.errors.is_empty() {
            o.insert(
                "errors".into(),
                serde_json::to_value(&self.errors).unwrap_or_default(),
            );
        }
        Value::Object(o)
    }
}

/// A JSON object's members in the order they were written, values unparsed.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .find(|(k, v)| k == key && v.get() != "null")
            .map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks a `/users/track` body and turns what Braze would take into records.
pub fn parse(body: &[u8]) -> Result<Relayed, Refused> {
    let refused = |message: String| Refused {
        message,
        errors: Vec::new(),
    };
    let top: Members = serde_json::from_slice(body)
        .map_err(|e| refused(format!("Invalid JSON in request body: {e}")))?;
    let mut out = Relayed::default();
    let mut sent = 0usize;
    for array in ["attributes", "events", "purchases"] {
        let Some(raw) = top.get(array) else { continue };
        let items = bounded_array(raw.get(), MAX_RECORDS_PER_REQUEST - sent).map_err(|e| {
            refused(match e {
                TooMany => format!(
                    "a request holds at most {MAX_RECORDS_PER_REQUEST} objects; split it into \
                     smaller requests"
                ),
                NotArray => format!("'{array}' must be an array of objects"),
            })
        })?;
        sent += items.len();
        let mut accepted = 0;
        for (index, item) in items.into_iter().enumerate() {
            let result = match array {
                "attributes" => attributes_object(item),
                "events" => track_object(item, TrackArray::Events),
                _ => track_object(item, TrackArray::Purchases),
            };
            match result {
                Ok(records) => {
                    accepted += 1;
                    out.records.extend(records);
                }
                Err(kind) => out.errors.push(ObjectError {
                    kind,
                    input_array: array,
                    index,
                }),
            }
        }
        match array {
            "attributes" => out.attributes = Some(accepted),
            "events" => out.events = Some(accepted),
            _ => out.purchases = Some(accepted),
        }
    }
    if sent == out.errors.len() {
        return Err(Refused {
            message: NOTHING_VALID.into(),
            errors: out.errors,
        });
    }
    Ok(out)
}

/// Why an array was not taken.
enum ArrayError {
    TooMany,
    NotArray,
}
use ArrayError::{NotArray, TooMany};

/// The elements of a JSON array as raw text, refused past `most` of them: what one request
/// can make the daemon hold stays bounded whatever the body's shape.
fn bounded_array(text: &str, most: usize) -> Result<Vec<&RawValue>, ArrayError> {
    use serde::de::SeqAccess;
    struct Elements(usize);
    impl<'de> Visitor<'de> for Elements {
        type Value = Result<Vec<&'de RawValue>, ArrayError>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<&RawValue>()? {
                if out.len() == self.0 {
                    return Ok(Err(TooMany));
                }
                out.push(item);
            }
            Ok(Ok(out))
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    match de.deserialize_seq(Elements(most)) {
        Ok(Err(too_many)) => Err(too_many),
        Ok(Ok(items)) => de.end().map(|()| items).map_err(|_| NotArray),
        Err(_) => Err(NotArray),
    }
}

fn object(raw: &RawValue) -> Result<Members<'_>, String> {
    // Capturing raw text does not count nesting; a full parse does (serde_json stops at 128
    // levels), so an object nested past what Braze takes is refused here, not at delivery.
    serde_json::from_str::<Value>(raw.get())
        .map_err(|e| format!("the object is not valid JSON Braze can take: {e}"))?;
    serde_json::from_str(raw.get()).map_err(|_| "each object must be a JSON object".to_string())
}

fn string<'a>(m: &Members<'a>, field: &str) -> Result<Option<String>, String> {
    match m.get(field) {
        None => Ok(None),
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::String(s)) => Ok(Some(s)),
            _ => Err(format!("'{field}' must be a string")),
        },
    }
}

fn boolean(m: &Members<'_>, field: &str) -> Result<(), String> {
    match m.get(field).map(|r| r.get()) {
        None | Some("true") | Some("false") => Ok(()),
        Some(_) => Err(format!("'{field}' must be true or false")),
    }
}

/// A plausible email address: what Braze answers `EMAIL_BAD_FORMAT` for is caught here.
fn check_email(email: &str) -> Result<(), String> {
    let bad = || "The value provided for the 'email' field is not a valid email.".to_string();
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let ok = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The object's one identifier, as Braze resolves it
/// (<https://www.braze.com/docs/api/objects_filters/user_attributes_object>): exactly one primary
/// identifier (`external_id`, `user_alias`, `braze_id`); without one, `email`, then `phone`.
/// Also says which secondary field was used as the identifier, since it is then not an
/// attribute.
fn identify(m: &Members<'_>) -> Result<(UserId, Option<&'static str>), String> {
    let mut primary = Vec::new();
    if let Some(id) = string(m, "external_id")? {
        if id.is_empty() {
            return Err("'external_id' must not be empty".into());
        }
        if id.len() > MAX_EXTERNAL_ID_BYTES {
            return Err(format!(
                "EXTERNAL_USER_ID_TOO_LARGE: 'external_id' is {} bytes; it must be fewer than {} bytes",
                id.len(),
                MAX_EXTERNAL_ID_BYTES + 1
            ));
        }
        primary.push(UserId::External(id));
    }
    if let Some(id) = string(m, "braze_id")? {
        if id.is_empty() {
            return Err("'braze_id' must not be empty".into());
        }
        primary.push(UserId::Braze(id));
    }
    if let Some(raw) = m.get("user_alias") {
        #[derive(Deserialize)]
        struct Alias {
            alias_name: String,
            alias_label: String,
        }
        let alias: Alias = serde_json::from_str(raw.get()).map_err(|_| {
            "'user_alias' must be an object with string 'alias_name' and 'alias_label'".to_string()
        })?;
        if alias.alias_name.is_empty() || alias.alias_label.is_empty() {
            return Err("'user_alias' needs a non-empty 'alias_name' and 'alias_label'".into());
        }
        primary.push(UserId::Alias {
            name: alias.alias_name,
            label: alias.alias_label,
        });
    }
    let email = string(m, "email")?;
    if let Some(e) = &email {
        check_email(e)?;
    }
    let phone = string(m, "phone")?;
    if phone.as_deref() == Some("") {
        return Err("'phone' must not be empty".into());
    }
    match primary.len() {
        1 => Ok((primary.remove(0), None)),
        0 => match (email, phone) {
            (Some(e), _) => Ok((UserId::Email(e), Some("email"))),
            (None, Some(p)) => Ok((UserId::Phone(p), Some("phone"))),
            (None, None) => Err(
                "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required".into(),
            ),
        },
        _ => Err(
            "only one of 'external_id', 'braze_id' or 'user_alias' may identify an object".into(),
        ),
    }
}

/// Whether a value holds a string longer than Braze keeps (255 characters:
/// <https://www.braze.com/docs/user_guide/data/activation/custom_data/custom_attributes>),
/// itself or as an item of an array.
fn holds_long_string(value: &Value) -> bool {
    let long = |s: &str| s.chars().count() > MAX_NAME_CHARS;
    match value {
        Value::String(s) => long(s),
        Value::Array(items) => items.iter().any(|v| v.as_str().is_some_and(long)),
        _ => false,
    }
}

/// An event or purchase property holding a string longer than Braze keeps is refused here,
/// where the client hears about it.
fn check_strings(name: &str, value: &Value) -> Result<(), String> {
    match holds_long_string(value) {
        true => Err(format!(
            "'{name}' holds a string longer than {MAX_NAME_CHARS} characters"
        )),
        false => Ok(()),
    }
}

fn attributes_object(raw: &RawValue) -> Result<Vec<Record>, String> {
    let m = object(raw)?;
    let (user, secondary) = identify(&m)?;
    for field in OBJECT_FIELDS {
        if field != "push_token_import" || m.get(field).is_some() {
            boolean(&m, field)?;
        }
    }
    let identifiers = ["external_id", "braze_id", "user_alias"];
    let mut fields = String::from("{");
    let mut updates = Vec::new();
    for (name, value) in &m.0 {
        let name = name.as_ref();
        if identifiers.contains(&name) || Some(name) == secondary {
            continue;
        }
        if OBJECT_FIELDS.contains(&name) {
            if fields.len() > 1 {
                fields.push(',');
            }
            fields.push_str(&serde_json::to_string(name).unwrap_or_default());
            fields.push(':');
            fields.push_str(value.get());
            continue;
        }
        check_attribute_name(name)?;
        let parsed: Value = serde_json::from_str(value.get())
            .map_err(|_| format!("'{name}' does not hold a JSON value"))?;
        if holds_long_string(&parsed) {
            // Braze accepts such an object, leaves this attribute as it was and applies the
            // others: so does the relay, by not queueing this one.
            tracing::info!(
                attribute = name,
                "relayed attribute left out: a string over {MAX_NAME_CHARS} characters, which Braze leaves unchanged"
            );
            continue;
        }
        if name == "email" {
            if let Value::String(e) = &parsed {
                check_email(e)?;
            }
        }
        updates.push((name.to_string(), value.get().trim().to_string()));
    }
    fields.push('}');
    if updates.is_empty() {
        // Only an identifier: Braze creates the profile, so it is sent as it is.
        return Ok(vec![Record::Attribute(AttributeUpdate::profile_only(
            user,
            Some(fields),
        ))]);
    }
    Ok(updates
        .into_iter()
        .map(|(name, value)| {
            Record::Attribute(AttributeUpdate {
                user: user.clone(),
                name,
                value,
                object_fields: Some(fields.clone()),
            })
        })
        .collect())
}

/// Whether Braze takes this as an event or purchase time: ISO 8601, or its own
/// `yyyy-MM-dd'T'HH:mm:ss:SSSZ` (<https://www.braze.com/docs/api/objects_filters/event_object>).
pub fn is_braze_time(t: &str) -> bool {
    let colon_millis = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]:[subsecond digits:3][offset_hour sign:mandatory][optional [:]][offset_minute]"
    );
    let colon_millis_utc = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]:[subsecond digits:3]Z"
    );
    OffsetDateTime::parse(t, &Rfc3339).is_ok()
        || OffsetDateTime::parse(t, &Iso8601::DEFAULT).is_ok()
        || PrimitiveDateTime::parse(t, &Iso8601::DEFAULT).is_ok()
        || OffsetDateTime::parse(t, &colon_millis).is_ok()
        || PrimitiveDateTime::parse(t, &colon_millis_utc).is_ok()
}

fn check_time(m: &Members<'_>) -> Result<(), String> {
    let t = string(m, "time")
        .map_err(|_| "'time' must be an ISO 8601 string".to_string())?
        .ok_or_else(|| "'time' is required".to_string())?;
    if is_braze_time(&t) {
        Ok(())
    } else {
        Err(format!("'time' {t:?} is not a valid ISO 8601 time"))
    }
}

fn check_properties(m: &Members<'_>) -> Result<(), String> {
    let Some(raw) = m.get("properties") else {
        return Ok(());
    };
    let props: serde_json::Map<String, Value> = serde_json::from_str(raw.get())
        .map_err(|_| "'properties' must be an object".to_string())?;
    if raw.get().len() > MAX_PROPERTIES_BYTES {
        return Err(format!(
            "'properties' is {} bytes, over Braze's {MAX_PROPERTIES_BYTES}",
            raw.get().len()
        ));
    }
    for (key, value) in &props {
        if key.is_empty() {
            return Err("a property name must not be empty".into());
        }
        if key.starts_with('$') {
            return Err(format!(
                "property '{key}' is not valid: names must not start with '$'"
            ));
        }
        if key == "time" || key == "event_name" {
            return Err(format!("property '{key}' is reserved by Braze"));
        }
        if key.chars().count() > MAX_NAME_CHARS {
            return Err(format!(
                "a property name is longer than {MAX_NAME_CHARS} characters"
            ));
        }
        check_strings(key, value)?;
    }
    Ok(())
}

fn non_empty(m: &Members<'_>, field: &str) -> Result<(), String> {
    match string(m, field)? {
        None => Err(format!("'{field}' is required")),
        Some(s) if s.is_empty() => Err(format!("'{field}' must not be empty")),
        Some(s) if s.chars().count() > MAX_NAME_CHARS => Err(format!(
            "'{field}' is longer than {MAX_NAME_CHARS} characters"
        )),
        Some(_) => Ok(()),
    }
}

fn track_object(raw: &RawValue, array: TrackArray) -> Result<Vec<Record>, String> {
    let m = object(raw)?;
    let (user, _) = identify(&m)?;
    boolean(&m, "_update_existing_only")?;
    string(&m, "app_id")?;
    match array {
        TrackArray::Events => non_empty(&m, "name")?,
        TrackArray::Purchases => {
            non_empty(&m, "product_id")?;
            let currency = string(&m, "currency")?.ok_or("'currency' is required")?;
            if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_alphabetic()) {
                return Err("'currency' is not valid: a three-letter ISO 4217 code".into());
            }
            match m
                .get("price")
                .map(|r| serde_json::from_str::<Value>(r.get()))
            {
                Some(Ok(Value::Number(_))) => {}
                None => return Err("'price' is required".into()),
                Some(_) => return Err("'price' is not valid".into()),
            }
            if let Some(q) = m.get("quantity") {
                let q: Option<u64> = serde_json::from_str(q.get()).ok();
                if !q.is_some_and(|q| (1..=100).contains(&q)) {
                    return Err("'quantity' is not valid".into());
                }
            }
        }
    }
    check_time(&m)?;
    check_properties(&m)?;
    Ok(vec![Record::Tracked(TrackObject {
        array,
        user,
        json: raw.get().trim().to_string(),
    })])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(records: &[Record]) -> Vec<(String, String, String)> {
        records
            .iter()
            .map(|r| match r {
                Record::Attribute(a) => (
                    a.name.clone(),
                    a.value.clone(),
                    a.object_fields.clone().unwrap_or_default(),
                ),
                other => panic!("not an attribute: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_attributes_object_splits_into_updates_with_its_object_fields() {
        let r = parse(
            br#"{"attributes":[{"external_id":"u1","_update_existing_only":true,
                "tier":"gold","ltv":12.50,"tags":{"add":["a"]},"email":"a@b.co","gone":null}]}"#,
        )
        .unwrap();
        assert_eq!(r.attributes, Some(1));
        assert_eq!(r.events, None);
        let f = r#"{"_update_existing_only":true}"#.to_string();
        assert_eq!(
            attrs(&r.records),
            vec![
                ("tier".into(), "\"gold\"".into(), f.clone()),
                ("ltv".into(), "12.50".into(), f.clone()),
                ("tags".into(), r#"{"add":["a"]}"#.into(), f.clone()),
                ("email".into(), "\"a@b.co\"".into(), f.clone()),
                ("gone".into(), "null".into(), f),
            ]
        );
        assert_eq!(r.records[0].user(), &UserId::External("u1".into()));
    }

    #[test]
    fn identifiers_resolve_as_braze_resolves_them() {
        let user = |body: &str| {
            let r = parse(format!(r#"{{"attributes":[{body}]}}"#).as_bytes()).unwrap();
            r.records[0].user().clone()
        };
        assert_eq!(
            user(r#"{"user_alias":{"alias_name":"n","alias_label":"l"},"x":1}"#),
            UserId::Alias {
                name: "n".into(),
                label: "l".into()
            }
        );
        // Email wins over phone without a primary id; phone is then an ordinary attribute.
        let r = parse(br#"{"attributes":[{"email":"a@b.co","phone":"+1555","x":1}]}"#).unwrap();
        assert_eq!(r.records[0].user(), &UserId::Email("a@b.co".into()));
        assert_eq!(attrs(&r.records)[0].0, "phone");
        assert_eq!(
            user(r#"{"phone":"+1555","x":1}"#),
            UserId::Phone("+1555".into())
        );
        assert_eq!(user(r#"{"braze_id":"b","x":1}"#), UserId::Braze("b".into()));
    }

    #[test]
    fn objects_braze_would_refuse_come_back_in_errors_and_the_rest_is_kept() {
        let long_id = "x".repeat(988);
        let body = format!(
            r#"{{"attributes":[{{"external_id":"ok","a":1}},{{"a":1}},
                {{"external_id":"u","braze_id":"b","a":1}},{{"external_id":"{long_id}","a":1}},
                {{"external_id":"u","$op":1}},{{"external_id":"u","s":"{long}","t":1}}],
              "events":[{{"external_id":"u","name":"e","time":"2026-01-01T00:00:00Z"}},
                {{"external_id":"u","name":"e","time":"yesterday"}},{{"external_id":"u","time":"2026-01-01T00:00:00Z"}}],
              "purchases":[{{"external_id":"u","product_id":"p","currency":"USD","price":1,"quantity":0,"time":"2026-01-01T00:00:00Z"}}]}}"#,
            long = "y".repeat(256)
        );
        let r = parse(body.as_bytes()).unwrap();
        let at: Vec<_> = r.errors.iter().map(|e| (e.input_array, e.index)).collect();
        assert_eq!(
            at,
            vec![
                ("attributes", 1),
                ("attributes", 2),
                ("attributes", 3),
                ("attributes", 4),
                ("events", 1),
                ("events", 2),
                ("purchases", 0)
            ]
        );
        assert!(
            r.errors[0].kind.contains("is required"),
            "{:?}",
            r.errors[0]
        );
        assert!(r.errors[2].kind.contains("EXTERNAL_USER_ID_TOO_LARGE"));
        assert!(r.errors[6].kind.contains("'quantity' is not valid"));
        // The over-long string is left out, as Braze leaves it unchanged; its sibling stays.
        let names: Vec<_> = r
            .records
            .iter()
            .filter_map(|rec| match rec {
                Record::Attribute(a) => Some(a.name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["a", "t"]);
        assert_eq!(
            (r.attributes, r.events, r.purchases),
            (Some(2), Some(1), Some(0))
        );
        assert_eq!(r.records.len(), 3);
    }

    #[test]
    fn malformed_bodies_and_bodies_with_nothing_valid_are_refused_whole() {
        assert!(parse(b"{not json")
            .unwrap_err()
            .message
            .contains("Invalid JSON"));
        assert!(parse(b"[1,2]").is_err());
        assert!(parse(br#"{"events":{"name":"x"}}"#)
            .unwrap_err()
            .message
            .contains("must be an array"));
        let r = parse(br#"{"events":[{"name":"x"}]}"#).unwrap_err();
        assert_eq!(r.message, NOTHING_VALID);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(parse(b"{}").unwrap_err().message, NOTHING_VALID);
    }

    #[test]
    fn an_object_nested_too_deeply_is_refused_at_the_door() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let body = format!(
            r#"{{"events":[{{"external_id":"u","name":"e","time":"2026-01-01T00:00:00Z","x":{deep}}},
                {{"external_id":"u","name":"e","time":"2026-01-01T00:00:00Z"}}]}}"#
        );
        let r = parse(body.as_bytes()).unwrap();
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].index, 0);
        assert_eq!(r.events, Some(1));
    }

    #[test]
    fn track_objects_are_kept_byte_for_byte() {
        let event = r#"{"time":"2013-07-16T19:20:30:000+0100","name":"rode","user_alias":{"alias_name":"n","alias_label":"l"},"properties":{"nested":{"deep":[1,{"x":"y"}]}},"app_id":"a"}"#;
        let r = parse(format!(r#"{{"events":[ {event} ],"attributes":[]}}"#).as_bytes()).unwrap();
        assert_eq!(r.attributes, Some(0));
        match &r.records[0] {
            Record::Tracked(t) => assert_eq!(t.json, event),
            other => panic!("{other:?}"),
        }
    }
}
