//! Parsing and validating ingest bodies into records, all or nothing.
//!
//! A body is a JSON array of objects or NDJSON (one object per line). Every record is checked
//! before any is queued, and the first problem is reported with its record index, its line and
//! the field, so an operator can find it in a file of millions. Checks here are the ones Braze
//! would otherwise fail the record for later, when nobody is watching. This module never
//! queues anything itself and never hands back part of a body: a body is all records or an
//! error.

mod fast;

use std::fmt;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::PreferId;
use crate::record::{AttributeUpdate, Event, Membership, UserId};

/// Braze refuses longer external ids (`EXTERNAL_USER_ID_TOO_LARGE`).
pub const MAX_EXTERNAL_ID_BYTES: usize = 987;
/// Braze's limit on custom attribute names, event names and string values
/// (<https://www.braze.com/docs/user_guide/data/activation/custom_data/custom_attributes>,
/// <https://www.braze.com/docs/api/objects_filters/event_object>).
pub const MAX_NAME_CHARS: usize = 255;
/// Braze's limit for an event's properties that contain arrays or objects
/// (<https://www.braze.com/docs/api/objects_filters/event_object>).
pub const MAX_PROPERTIES_BYTES: usize = 100 * 1024;
/// Audience and split ids become part of an attribute name; keep them short and plain.
const MAX_ID_PART_BYTES: usize = 100;

/// Why a body was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    /// 0-based index of the record in the body, when the body could be split into records.
    pub index: Option<usize>,
    /// 1-based line of the body where the record (or the syntax error) is.
    pub line: Option<usize>,
    /// The field at fault, when one is.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut place = Vec::new();
        if let Some(i) = self.index {
            place.push(format!("record {i}"));
        }
        if let Some(l) = self.line {
            place.push(format!("line {l}"));
        }
        if let Some(field) = &self.field {
            place.push(format!("field `{field}`"));
        }
        if place.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", place.join(", "), self.message)
        }
    }
}

impl std::error::Error for BadInput {}

/// One record as found in the body, before its fields are checked.
struct RawRecord {
    index: usize,
    line: usize,
    object: Map<String, Value>,
}

impl RawRecord {
    fn bad(&self, field: &str, message: impl Into<String>) -> BadInput {
        BadInput {
            index: Some(self.index),
            line: Some(self.line),
            field: Some(field.to_string()),
            message: message.into(),
        }
    }
}

pub fn parse_memberships(body: &[u8], prefer: PreferId) -> Result<Vec<Membership>, BadInput> {
    let mut out = Vec::new();
    for_each_record(body, |raw| {
        out.push(membership_of(&raw, prefer)?);
        Ok(())
    })?;
    Ok(out)
}

pub fn parse_events(body: &[u8], prefer: PreferId) -> Result<Vec<Event>, BadInput> {
    if let Some(events) = fast::events(body, prefer) {
        return Ok(events);
    }
    let mut out = Vec::new();
    for_each_record(body, |raw| {
        out.push(event_of(&raw, prefer)?);
        Ok(())
    })?;
    Ok(out)
}

/// `/v1/attributes`: one update per attribute of each record, in order.
pub fn parse_attributes(body: &[u8], prefer: PreferId) -> Result<Vec<AttributeUpdate>, BadInput> {
    let mut out = Vec::new();
    for_each_record(body, |raw| {
        out.extend(attributes_of(&raw, prefer)?);
        if out.len() > MAX_ATTRIBUTES_PER_REQUEST {
            return Err(raw.bad(
                "attributes",
                format!(
                    "the request holds more than {MAX_ATTRIBUTES_PER_REQUEST} attribute updates \
                     by here; split it into smaller requests"
                ),
            ));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Attributes one `/v1/attributes` record may set. Each one is a pending update and, once
/// delivered, an entry of the daemon's state: unbounded, one body could grow the state by
/// gigabytes. A profile with more custom attributes than this is not what ActionIQ sends.
pub const MAX_ATTRIBUTES_PER_RECORD: usize = 500;
/// Attribute updates one `/v1/attributes` request may carry.
pub const MAX_ATTRIBUTES_PER_REQUEST: usize = 50_000;

/// One membership from an already-parsed JSON value: `index` and `line` say where it was.
pub fn membership(
    index: usize,
    line: usize,
    value: Value,
    prefer: PreferId,
) -> Result<Membership, BadInput> {
    membership_of(&object_of(index, line, value)?, prefer)
}

/// One event from an already-parsed JSON value: `index` and `line` say where it was.
pub fn event(index: usize, line: usize, value: Value, prefer: PreferId) -> Result<Event, BadInput> {
    event_of(&object_of(index, line, value)?, prefer)
}

/// One record's attribute updates from an already-parsed JSON value.
pub fn attributes(
    index: usize,
    line: usize,
    value: Value,
    prefer: PreferId,
) -> Result<Vec<AttributeUpdate>, BadInput> {
    attributes_of(&object_of(index, line, value)?, prefer)
}

/// A snapshot member's user id from an already-parsed JSON value.
pub fn user(index: usize, line: usize, value: Value, prefer: PreferId) -> Result<UserId, BadInput> {
    user_id(&object_of(index, line, value)?, prefer)
}

/// Names that would change what an object means rather than set an attribute.
const RESERVED_NAMES: [&str; 6] = [
    "external_id",
    "braze_id",
    "user_alias",
    "_update_existing_only",
    "_merge_objects",
    "push_token_import",
];

/// A custom attribute name Braze keeps as it is: not empty, at most 255 characters, and not
/// starting with `$` (Braze's operator prefix in nested attributes).
pub fn check_attribute_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("an attribute name must not be empty".into());
    }
    if name.starts_with('$') {
        return Err(format!(
            "{name:?} is not a valid attribute name: names starting with '$' are Braze operators"
        ));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "attribute name {:?}… is longer than Braze's {MAX_NAME_CHARS} characters",
            name.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

/// A `/v1` attribute value: what Braze stores as a plain value. Objects (nested attributes,
/// `add`/`remove` operations) go through `/users/track`, where they are kept in order.
fn check_attribute_value(value: &Value) -> Result<(), String> {
    let long = |s: &str| s.chars().count() > MAX_NAME_CHARS;
    match value {
        Value::String(s) if long(s) => Err(format!(
            "is a string of {} characters, over Braze's {MAX_NAME_CHARS}",
            s.chars().count()
        )),
        Value::Object(_) => Err(
            "an object is not a plain value; send nested attributes and add/remove operations to /users/track"
                .into(),
        ),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) if long(s) => {
                        return Err(format!(
                            "item {i} is a string over Braze's {MAX_NAME_CHARS} characters"
                        ))
                    }
                    Value::Array(_) | Value::Object(_) | Value::Null => {
                        return Err(format!(
                            "item {i} is {}; an array holds strings, numbers or booleans",
                            type_name(item)
                        ))
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn attributes_of(raw: &RawRecord, prefer: PreferId) -> Result<Vec<AttributeUpdate>, BadInput> {
    let user = user_id(raw, prefer)?;
    let map = match raw.object.get("attributes") {
        Some(Value::Object(map)) if map.is_empty() => {
            return Err(raw.bad("attributes", "holds no attributes"))
        }
        Some(Value::Object(map)) => map,
        None | Some(Value::Null) => {
            return Err(raw.bad("attributes", "is required: an object of name: value"))
        }
        Some(other) => {
            return Err(raw.bad(
                "attributes",
                format!("must be an object, got {}", type_name(other)),
            ))
        }
    };
    if map.len() > MAX_ATTRIBUTES_PER_RECORD {
        return Err(raw.bad(
            "attributes",
            format!(
                "holds {} attributes; at most {MAX_ATTRIBUTES_PER_RECORD} per record",
                map.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        check_attribute_name(name).map_err(|why| raw.bad("attributes", why))?;
        let field = format!("attributes.{name}");
        if RESERVED_NAMES.contains(&name.as_str()) {
            return Err(raw.bad(&field, "is an identifier or object field, not an attribute"));
        }
        check_attribute_value(value).map_err(|why| raw.bad(&field, why))?;
        out.push(AttributeUpdate {
            user: user.clone(),
            name: name.clone(),
            // serde_json's compact text: the same value always has the same text, which is
            // what the unchanged-value check compares.
            value: value.to_string(),
            object_fields: None,
        });
    }
    Ok(out)
}

fn membership_of(raw: &RawRecord, prefer: PreferId) -> Result<Membership, BadInput> {
    Ok(Membership {
        user: user_id(raw, prefer)?,
        audience_id: id_part(raw, "audience_id")?,
        split_id: id_part(raw, "split_id")?,
        member: match raw.object.get("member") {
            Some(Value::Bool(b)) => *b,
            None => return Err(raw.bad("member", "is required (true or false)")),
            Some(other) => {
                return Err(raw.bad(
                    "member",
                    format!("must be true or false, got {}", type_name(other)),
                ))
            }
        },
        time: match raw.object.get("time") {
            None | Some(Value::Null) => None,
            Some(v) => Some(timestamp(raw, "time", v)?),
        },
    })
}

fn event_of(raw: &RawRecord, prefer: PreferId) -> Result<Event, BadInput> {
    let name = match raw.object.get("name") {
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(raw.bad("name", "must not be empty"))
        }
        Some(Value::String(s)) if s.chars().count() > MAX_NAME_CHARS => {
            return Err(raw.bad(
                "name",
                format!("is longer than Braze's {MAX_NAME_CHARS} characters"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        None => return Err(raw.bad("name", "is required")),
        Some(other) => {
            return Err(raw.bad(
                "name",
                format!("must be a string, got {}", type_name(other)),
            ))
        }
    };
    let time = match raw.object.get("time") {
        None | Some(Value::Null) => return Err(raw.bad("time", "is required")),
        Some(v) => timestamp(raw, "time", v)?,
    };
    let properties = match raw.object.get("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            check_property_names(raw, map)?;
            let text = serde_json::to_string(map)
                .map_err(|e| raw.bad("properties", format!("cannot be re-encoded: {e}")))?;
            if text.len() > MAX_PROPERTIES_BYTES {
                return Err(raw.bad(
                    "properties",
                    format!(
                        "is {} bytes, over Braze's {MAX_PROPERTIES_BYTES}",
                        text.len()
                    ),
                ));
            }
            Some(text)
        }
        Some(other) => {
            return Err(raw.bad(
                "properties",
                format!("must be an object, got {}", type_name(other)),
            ))
        }
    };
    Ok(Event::new(
        user_id(raw, prefer)?,
        &name,
        &time,
        properties.as_deref(),
    ))
}

/// Records one `/v1` request may hold. Each becomes a parsed record in memory until the
/// request is queued, so this (with `ingest.max_body_bytes`) bounds what one request costs.
pub const MAX_RECORDS_PER_REQUEST: usize = 100_000;

/// Hands each object of a JSON array or NDJSON body to `each`, with its index and line, as
/// it is parsed: only one record's JSON tree exists at a time, and a body that goes wrong
/// stops at its first bad record. Returns how many records there were.
fn for_each_record(
    body: &[u8],
    mut each: impl FnMut(RawRecord) -> Result<(), BadInput>,
) -> Result<usize, BadInput> {
    // Spreadsheet tools and some exporters start UTF-8 files with a byte-order mark; it is
    // not part of the first record.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let whole = |message: String, line: Option<usize>| BadInput {
        index: None,
        line,
        field: None,
        message,
    };
    let Some(first) = body.iter().position(|b| !b.is_ascii_whitespace()) else {
        return Err(whole("the body holds no records".into(), None));
    };
    let mut count = 0usize;
    let mut take = |index: usize, line: usize, value: Value| {
        if index >= MAX_RECORDS_PER_REQUEST {
            return Err(BadInput {
                index: Some(index),
                line: Some(line),
                field: None,
                message: format!(
                    "a request holds at most {MAX_RECORDS_PER_REQUEST} records; split it into \
                     smaller requests"
                ),
            });
        }
        count = index + 1;
        each(object_of(index, line, value)?)
    };
    if body[first] == b'[' {
        use serde::de::Deserializer as _;
        let mut stopped = None;
        let mut de = serde_json::Deserializer::from_slice(body);
        let visitor = ArrayVisitor {
            lines: ElementLines::new(body),
            take: &mut take,
            stopped: &mut stopped,
        };
        let parsed = de.deserialize_seq(visitor).and_then(|()| de.end());
        if let Some(bad) = stopped {
            return Err(bad);
        }
        parsed.map_err(|e| whole(format!("invalid JSON: {e}"), Some(e.line())))?;
    } else {
        let mut index = 0;
        for (n, text) in body.split(|b| *b == b'\n').enumerate() {
            if text.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let value: Value = serde_json::from_slice(text).map_err(|e| BadInput {
                index: Some(index),
                line: Some(n + 1),
                field: None,
                message: format!("invalid JSON: {e}"),
            })?;
            take(index, n + 1, value)?;
            index += 1;
        }
    }
    if count == 0 {
        return Err(whole("the body holds no records".into(), None));
    }
    Ok(count)
}

/// Walks a JSON array element by element, handing each to `take`. A record's own problem
/// stops the walk: it is kept in `stopped`, and serde is given a placeholder error.
struct ArrayVisitor<'a, 'b, F> {
    lines: ElementLines<'b>,
    take: &'a mut F,
    stopped: &'a mut Option<BadInput>,
}

impl<'de, F> serde::de::Visitor<'de> for ArrayVisitor<'_, '_, F>
where
    F: FnMut(usize, usize, Value) -> Result<(), BadInput>,
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(value) = seq.next_element::<Value>()? {
            let line = self.lines.next().unwrap_or(1);
            if let Err(bad) = (self.take)(index, line, value) {
                *self.stopped = Some(bad);
                return Err(serde::de::Error::custom("stopped at a bad record"));
            }
            index += 1;
        }
        Ok(())
    }
}

fn object_of(index: usize, line: usize, value: Value) -> Result<RawRecord, BadInput> {
    match value {
        Value::Object(object) => Ok(RawRecord {
            index,
            line,
            object,
        }),
        other => Err(BadInput {
            index: Some(index),
            line: Some(line),
            field: None,
            message: format!("a record must be a JSON object, got {}", type_name(&other)),
        }),
    }
}

/// The 1-based line on which each top-level array element starts, one element at a time.
/// Only used for messages, so a cheap scan that tracks strings and nesting is enough (serde
/// parses the same bytes and reports any syntax error itself).
struct ElementLines<'a> {
    body: &'a [u8],
    pos: usize,
    line: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    expecting: bool,
}

impl<'a> ElementLines<'a> {
    fn new(body: &'a [u8]) -> Self {
        ElementLines {
            body,
            pos: 0,
            line: 1,
            depth: 0,
            in_string: false,
            escaped: false,
            expecting: false,
        }
    }
}

impl Iterator for ElementLines<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while let Some(&b) = self.body.get(self.pos) {
            self.pos += 1;
            if b == b'\n' {
                self.line += 1;
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            let starts = self.expecting && !b.is_ascii_whitespace() && b != b']';
            if starts {
                self.expecting = false;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expecting = true;
                    }
                }
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                b',' if self.depth == 1 => self.expecting = true,
                _ => {}
            }
            if starts {
                return Some(self.line);
            }
        }
        None
    }
}

/// The record's one Braze identifier. ActionIQ's activation carries both ids; `prefer`
/// (`identity.prefer`) says which one is sent. Both are checked either way: a malformed id
/// is a malformed record.
fn user_id(raw: &RawRecord, prefer: PreferId) -> Result<UserId, BadInput> {
    let get = |field: &str| -> Result<Option<String>, BadInput> {
        match raw.object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(raw.bad(field, "must not be empty"))
            }
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(raw.bad(field, format!("must be a string, got {}", type_name(other))))
            }
        }
    };
    let external = get("external_id")?;
    if let Some(id) = external
        .as_ref()
        .filter(|id| id.len() > MAX_EXTERNAL_ID_BYTES)
    {
        return Err(raw.bad(
            "external_id",
            format!(
                "is {} bytes, over Braze's {MAX_EXTERNAL_ID_BYTES}",
                id.len()
            ),
        ));
    }
    let braze = get("braze_id")?;
    if let Some(id) = braze.as_ref().filter(|id| id.len() > MAX_EXTERNAL_ID_BYTES) {
        return Err(raw.bad(
            "braze_id",
            format!("is {} bytes; a Braze id is far shorter", id.len()),
        ));
    }
    match (external, braze, prefer) {
        (Some(_), Some(id), PreferId::Braze) | (None, Some(id), _) => Ok(UserId::Braze(id)),
        (Some(id), _, _) => Ok(UserId::External(id)),
        (None, None, _) => Err(raw.bad(
            "external_id",
            "a user id is required: `external_id` or `braze_id`",
        )),
    }
}

/// An audience or split id: a string or an integer, made of characters that are safe inside a
/// Braze attribute name.
fn id_part(raw: &RawRecord, field: &str) -> Result<String, BadInput> {
    let text = match raw.object.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        None | Some(Value::Null) => return Err(raw.bad(field, "is required")),
        Some(other) => {
            return Err(raw.bad(
                field,
                format!("must be a string or an integer, got {}", type_name(other)),
            ))
        }
    };
    check_id_part(&text).map_err(|why| raw.bad(field, why))?;
    Ok(text)
}

/// An audience or split id is part of a Braze attribute name: short, plain characters.
pub fn check_id_part(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.len() > MAX_ID_PART_BYTES {
        return Err(format!("is longer than {MAX_ID_PART_BYTES} bytes"));
    }
    if !text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{text:?} may hold only letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// An RFC 3339 string or Unix seconds, normalised to the UTC RFC 3339 form Braze documents.
fn timestamp(raw: &RawRecord, field: &str, value: &Value) -> Result<String, BadInput> {
    let parsed = match value {
        Value::String(s) if is_canonical_time(s) => return Ok(s.clone()),
        Value::String(s) => OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
            raw.bad(
                field,
                format!("{s:?} is not an RFC 3339 / ISO 8601 timestamp: {e}"),
            )
        })?,
        Value::Number(n) => n
            .as_i64()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(|| raw.bad(field, format!("{n} is not a valid Unix time in seconds")))?,
        other => {
            return Err(raw.bad(
                field,
                format!(
                    "must be an RFC 3339 string or Unix seconds, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    Ok(format_time(parsed))
}

/// Formats a time the way the daemon sends every time to Braze: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
/// Written digit by digit, without `format!`: every accepted event's time goes through here
/// (BENCHMARKS.md, "End to end beside syslog-ng (the peers bench)").
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let Ok(year) = u16::try_from(t.year()) else {
        // Before year 0 (the `time` crate allows it): the general form.
        return format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        );
    };
    let mut out = String::with_capacity(24);
    let parts: [(Option<char>, u16, u32); 7] = [
        (None, year, 4),
        (Some('-'), u8::from(t.month()).into(), 2),
        (Some('-'), t.day().into(), 2),
        (Some('T'), t.hour().into(), 2),
        (Some(':'), t.minute().into(), 2),
        (Some(':'), t.second().into(), 2),
        (Some('.'), t.millisecond(), 3),
    ];
    for (sep, n, width) in parts {
        out.extend(sep);
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (n / 10u16.pow(place) % 10) as u8));
        }
    }
    out.push('Z');
    out
}

/// Whether `s` is already in `format_time`'s form and names a real instant (leap seconds
/// aside): then it is stored as sent, with no parse and format round trip.
pub fn is_canonical_time(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 24 {
        return false;
    }
    let shape = b.iter().enumerate().all(|(i, c)| match i {
        4 | 7 => *c == b'-',
        10 => *c == b'T',
        13 | 16 => *c == b':',
        19 => *c == b'.',
        23 => *c == b'Z',
        _ => c.is_ascii_digit(),
    });
    if !shape {
        return false;
    }
    let n = |from: usize, to: usize| {
        b[from..to]
            .iter()
            .fold(0u16, |acc, c| acc * 10 + u16::from(c - b'0'))
    };
    let date = time::Month::try_from(n(5, 7) as u8)
        .and_then(|m| time::Date::from_calendar_date(i32::from(n(0, 4)), m, n(8, 10) as u8));
    date.is_ok() && n(11, 13) < 24 && n(14, 16) < 60 && n(17, 19) < 60
}

/// Braze drops or errors on property names it reserves
/// (<https://www.braze.com/docs/api/objects_filters/event_object>); refuse them here, where
/// someone sees.
fn check_property_names(raw: &RawRecord, map: &Map<String, Value>) -> Result<(), BadInput> {
    for key in map.keys() {
        let field = format!("properties.{key}");
        if key.is_empty() {
            return Err(raw.bad("properties", "a property name must not be empty"));
        }
        if key.starts_with('$') {
            return Err(raw.bad(&field, "Braze forbids property names starting with '$'"));
        }
        if key == "time" || key == "event_name" {
            return Err(raw.bad(&field, "is a name Braze reserves for itself"));
        }
        if key.chars().count() > MAX_NAME_CHARS {
            return Err(raw.bad(
                &field,
                format!("name is longer than Braze's {MAX_NAME_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The digit-by-digit form is `format!`'s, and every time it writes is canonical, so
        /// storing a canonical time as sent changes nothing.
        #[test]
        fn format_time_writes_the_canonical_form(secs in 0i64..253_402_300_800, ms in 0u16..1000) {
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::milliseconds(ms.into());
            let text = format_time(t);
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(), t.millisecond()
            );
            proptest::prop_assert_eq!(&text, &expected);
            proptest::prop_assert!(is_canonical_time(&text));
            proptest::prop_assert_eq!(format_time(OffsetDateTime::parse(&text, &Rfc3339).unwrap()), text);
        }
    }

    #[test]
    fn only_real_instants_in_the_stored_form_are_canonical() {
        assert!(is_canonical_time("2024-02-29T23:59:59.999Z"));
        for s in [
            "2023-02-29T00:00:00.000Z",
            "2024-13-01T00:00:00.000Z",
            "2024-01-01T24:00:00.000Z",
            "2024-01-01T00:60:00.000Z",
            "2024-01-01T00:00:60.000Z",
            "2024-01-01T00:00:00.000+00:00",
            "2024-01-01T00:00:00Z",
            "2024-01-01 00:00:00.000Z",
            "2024-01-0a T00:00:00.000Z",
        ] {
            assert!(!is_canonical_time(s), "{s}");
        }
    }

    #[test]
    fn a_json_array_and_ndjson_give_the_same_memberships() {
        let array = br#"[{"audience_id":"a1","split_id":2,"external_id":"u1","member":true},
            {"audience_id":"a1","split_id":"2","braze_id":"b9","member":false,"time":"2026-01-02T03:04:05+01:00"}]"#;
        let ndjson = b"{\"audience_id\":\"a1\",\"split_id\":2,\"external_id\":\"u1\",\"member\":true}\n\n{\"audience_id\":\"a1\",\"split_id\":\"2\",\"braze_id\":\"b9\",\"member\":false,\"time\":\"2026-01-02T03:04:05+01:00\"}\n";
        let a = parse_memberships(array, PreferId::External).unwrap();
        assert_eq!(a, parse_memberships(ndjson, PreferId::External).unwrap());
        assert_eq!(a[0].attribute(), "AIQ_a1_2");
        assert_eq!(a[1].user, UserId::Braze("b9".into()));
        assert_eq!(a[1].time.as_deref(), Some("2026-01-02T02:04:05.000Z"));
    }

    #[test]
    fn a_bad_record_is_named_by_index_line_and_field() {
        let body = b"{\"audience_id\":\"a\",\"split_id\":\"s\",\"external_id\":\"u\",\"member\":true}\n{\"audience_id\":\"a\",\"split_id\":\"s\",\"external_id\":\"u\",\"member\":\"yes\"}\n";
        let err = parse_memberships(body, PreferId::External).unwrap_err();
        assert_eq!(err.index, Some(1));
        assert_eq!(err.line, Some(2));
        assert_eq!(err.field.as_deref(), Some("member"));
        assert!(err
            .to_string()
            .contains("must be true or false, got a string"));
    }

    #[test]
    fn array_elements_report_the_line_they_start_on() {
        let body = b"[\n {\"name\":\"a\",\"external_id\":\"u\",\"time\":1},\n {\"name\":\"[,]\",\n  \"external_id\":\"u\",\"time\":\"nope\"}\n]";
        let err = parse_events(body, PreferId::External).unwrap_err();
        assert_eq!((err.index, err.line), (Some(1), Some(3)));
        assert_eq!(err.field.as_deref(), Some("time"));
    }

    #[test]
    fn events_need_a_user_a_name_a_time_and_object_properties() {
        let cases: [(&[u8], &str); 5] = [
            (br#"[{"name":"x","time":1}]"#, "external_id"),
            (br#"[{"name":"","external_id":"u","time":1}]"#, "name"),
            (br#"[{"name":"x","external_id":"u"}]"#, "time"),
            (
                br#"[{"name":"x","external_id":"u","time":1,"properties":[1]}]"#,
                "properties",
            ),
            (
                br#"[{"name":"x","external_id":"u","time":1,"properties":{"$a":1}}]"#,
                "properties.$a",
            ),
        ];
        for (body, field) in cases {
            let err = parse_events(body, PreferId::External).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
        }
    }

    #[test]
    fn a_byte_order_mark_before_the_first_record_is_ignored() {
        let body = b"\xEF\xBB\xBF{\"name\":\"x\",\"external_id\":\"u\",\"time\":1}\n";
        assert_eq!(parse_events(body, PreferId::External).unwrap().len(), 1);
        let array = b"\xEF\xBB\xBF[{\"name\":\"x\",\"external_id\":\"u\",\"time\":1}]";
        assert_eq!(parse_events(array, PreferId::External).unwrap().len(), 1);
    }

    #[test]
    fn malformed_json_is_refused_with_its_line() {
        let err = parse_events(b"[\n{\"name\": }\n]", PreferId::External).unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.starts_with("invalid JSON"));
        assert!(parse_events(b"  \n ", PreferId::External).is_err());
    }

    #[test]
    fn an_external_id_over_987_bytes_is_refused() {
        let id = "x".repeat(988);
        let body =
            format!(r#"[{{"audience_id":"a","split_id":"s","external_id":"{id}","member":true}}]"#);
        let err = parse_memberships(body.as_bytes(), PreferId::External).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("external_id"));
    }

    #[test]
    fn a_record_with_both_ids_is_sent_with_the_preferred_one() {
        let body = br#"{"external_id":"e1","braze_id":"b1","attributes":{"tier":"gold"}}"#;
        let by = |prefer| parse_attributes(body, prefer).unwrap()[0].user.clone();
        assert_eq!(by(PreferId::External), UserId::External("e1".into()));
        assert_eq!(by(PreferId::Braze), UserId::Braze("b1".into()));
        // A malformed id is refused even when the other one is used.
        let bad = br#"{"external_id":"","braze_id":"b1","attributes":{"tier":"gold"}}"#;
        assert!(parse_attributes(bad, PreferId::Braze).is_err());
    }

    #[test]
    fn attributes_become_one_update_each_with_compact_json_values() {
        let body = br#"{"external_id":"u","attributes":{"ltv":12.5,"vip":true,"tags":["a","b"],"signup":"2024-05-01T00:00:00Z","gone":null}}"#;
        let updates = parse_attributes(body, PreferId::External).unwrap();
        let got: Vec<(&str, &str)> = updates
            .iter()
            .map(|u| (u.name.as_str(), u.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("gone", "null"),
                ("ltv", "12.5"),
                ("signup", "\"2024-05-01T00:00:00Z\""),
                ("tags", "[\"a\",\"b\"]"),
                ("vip", "true"),
            ]
        );
        assert!(updates.iter().all(|u| u.object_fields.is_none()));
    }

    #[test]
    fn bad_attribute_names_and_values_are_named() {
        let long = "x".repeat(256);
        let cases = [
            (
                r#"{"external_id":"u","attributes":{"$set":1}}"#.to_string(),
                "attributes",
            ),
            (
                format!(r#"{{"external_id":"u","attributes":{{"{long}":1}}}}"#),
                "attributes",
            ),
            (
                format!(r#"{{"external_id":"u","attributes":{{"s":"{long}"}}}}"#),
                "attributes.s",
            ),
            (
                r#"{"external_id":"u","attributes":{"o":{"add":[1]}}}"#.to_string(),
                "attributes.o",
            ),
            (
                r#"{"external_id":"u","attributes":{"a":[[1]]}}"#.to_string(),
                "attributes.a",
            ),
            (
                r#"{"external_id":"u","attributes":{"braze_id":"x"}}"#.to_string(),
                "attributes.braze_id",
            ),
            (
                r#"{"external_id":"u","attributes":{}}"#.to_string(),
                "attributes",
            ),
            (r#"{"external_id":"u"}"#.to_string(), "attributes"),
        ];
        for (body, field) in cases {
            let err = parse_attributes(body.as_bytes(), PreferId::External).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{body}: {err}");
        }
    }
}
