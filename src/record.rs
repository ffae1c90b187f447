//! The records the daemon carries, as the rest of the program sees them.
//!
//! These are in-memory types. The bytes on disk are `queue::format`'s, which converts to and
//! from them, and the request to Braze is `braze::wire`'s: never this module's. Keeping the
//! in-memory and on-disk types apart lets these grow without breaking databases already in
//! the field.

use std::fmt;

/// The identifier a Braze object is addressed by. Braze takes exactly one per object
/// (<https://www.braze.com/docs/api/objects_filters/user_attributes_object>), so a record
/// carries one. `/v1` records use the first two; the `/users/track` relay passes on whichever
/// form the client used.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserId {
    /// The customer's own id; Braze creates a profile for an unknown one (unless the object is
    /// update-only: <https://www.braze.com/docs/api/objects_filters/user_attributes_object>).
    External(String),
    /// Braze's internal id; it can only address a profile that exists.
    Braze(String),
    /// A `user_alias` object.
    Alias {
        name: String,
        label: String,
    },
    /// A secondary identifier, used by Braze only when no primary one is given.
    Email(String),
    Phone(String),
}

impl UserId {
    /// The Braze field name this identifier travels in.
    pub fn field(&self) -> &'static str {
        match self {
            UserId::External(_) => "external_id",
            UserId::Braze(_) => "braze_id",
            UserId::Alias { .. } => "user_alias",
            UserId::Email(_) => "email",
            UserId::Phone(_) => "phone",
        }
    }

    /// The identifier as the JSON value Braze takes in its field.
    pub fn json_value(&self) -> serde_json::Value {
        match self {
            UserId::Alias { name, label } => {
                serde_json::json!({"alias_name": name, "alias_label": label})
            }
            _ => self.value().into(),
        }
    }

    /// The identifier's text; for an alias, its name (the label is in `Display`).
    pub fn value(&self) -> &str {
        match self {
            UserId::External(v) | UserId::Braze(v) | UserId::Email(v) | UserId::Phone(v) => v,
            UserId::Alias { name, .. } => name,
        }
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserId::Alias { name, label } => write!(f, "user_alias:{label}/{name}"),
            _ => write!(f, "{}:{}", self.field(), self.value()),
        }
    }
}

/// One audience split's verdict for one user: state, not a message. Only the latest accepted
/// value per user and attribute matters, which is what lets the queue coalesce them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub user: UserId,
    pub audience_id: String,
    pub split_id: String,
    pub member: bool,
    /// When ActionIQ decided it (RFC 3339, UTC), if it said. Kept for operators; Braze's
    /// attributes objects have no time field.
    pub time: Option<String>,
}

impl Membership {
    /// The Braze custom attribute this membership sets, as Braze's ActionIQ integration page
    /// names it
    /// (<https://www.braze.com/docs/partners/data_and_analytics/customer_data_platform/actioniq>).
    pub fn attribute(&self) -> String {
        format!("AIQ_{}_{}", self.audience_id, self.split_id)
    }
}

/// A customer event: a log entry, delivered once per acceptance (Braze does not deduplicate
/// events: <https://www.braze.com/docs/api/endpoints/user_data/post_user_track>).
///
/// Its name, time and properties are kept as the JSON members Braze's `events` object takes,
/// built once at ingest: an event is stored, leased and sent many times more often than it
/// is looked at, and keeping the fields apart would cost a decode and a re-encode of each on
/// the way out (BENCHMARKS.md, "End to end beside syslog-ng (the peers bench)").
/// [`Event::fields`] reads them back for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub user: UserId,
    /// `"name":…,"time":…` then `,"properties":{…}` when there are any: checked and written
    /// at ingest (`event_members`), sent by `braze::wire` as they are.
    pub members: String,
}

/// An event's fields, read back from its members.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct EventFields {
    pub name: String,
    /// RFC 3339, UTC, millisecond precision: the form Braze documents
    /// (<https://www.braze.com/docs/api/objects_filters/event_object>).
    pub time: String,
    #[serde(default)]
    pub properties: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Event {
    /// `time` must already be in Braze's form and `properties` an object's JSON text.
    pub fn new(user: UserId, name: &str, time: &str, properties: Option<&str>) -> Event {
        Event {
            user,
            members: event_members(name, time, properties),
        }
    }

    /// The fields, for display and tools; `None` only if the members were damaged on disk.
    pub fn fields(&self) -> Option<EventFields> {
        serde_json::from_str(&format!("{{{}}}", self.members)).ok()
    }
}

/// One custom (or standard) attribute of one user set to a value. State, like a membership:
/// a newer plain value replaces a pending one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeUpdate {
    pub user: UserId,
    pub name: String,
    /// The value as JSON text, exactly as accepted (bincode cannot carry a JSON value).
    pub value: String,
    /// The object-level fields it travelled with through the relay (`_update_existing_only`,
    /// `_merge_objects`, `push_token_import`) as a JSON object's text. `None` for records
    /// that came in on `/v1`, which get the configured policy at delivery instead.
    pub object_fields: Option<String>,
}

/// Fields of Braze's user attributes object that hold a list of settings applied one item at a
/// time, not one value: `subscription_groups` sets the state of each group it names and
/// leaves the others; `push_tokens` adds the tokens it lists
/// (<https://www.braze.com/docs/api/objects_filters/user_attributes_object>). Two pending
/// updates of one of them both have to reach Braze.
pub const PER_ITEM_FIELDS: &[&str] = &["subscription_groups", "push_tokens"];

impl AttributeUpdate {
    /// An attributes object that holds only an identifier (and object-level fields): Braze
    /// creates the profile if it has none. Stored as an update with an empty name and value,
    /// and sent as the object alone.
    pub fn profile_only(user: UserId, object_fields: Option<String>) -> AttributeUpdate {
        AttributeUpdate {
            user,
            name: String::new(),
            value: String::new(),
            object_fields,
        }
    }

    pub fn is_profile_only(&self) -> bool {
        self.name.is_empty()
    }

    /// A plain value replaces whatever Braze had, so it may replace a pending update and be
    /// compared with the value last delivered. An object value is an operation (`add`,
    /// `remove`, `inc`, nested `$add`/`$update`, a merge) whose effect depends on what came
    /// before, so it is never coalesced or skipped; so is a field Braze applies item by item
    /// (`PER_ITEM_FIELDS`), whose array sets only the items it names.
    ///
    /// A profile-only object is not a value either: it is sent every time (the profile may
    /// have been deleted since), in order with the user's other updates.
    pub fn is_plain(&self) -> bool {
        !self.is_profile_only()
            && !PER_ITEM_FIELDS.contains(&self.name.as_str())
            && !self.value.trim_start().starts_with('{')
    }
}

/// Which array of `/users/track` a relayed object belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackArray {
    Events,
    Purchases,
}

impl TrackArray {
    pub fn name(self) -> &'static str {
        match self {
            TrackArray::Events => "events",
            TrackArray::Purchases => "purchases",
        }
    }
}

/// An `events` or `purchases` object that came through the `/users/track` relay, kept as the
/// client sent it so that Braze receives it unchanged. A log entry, like `Event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackObject {
    pub array: TrackArray,
    /// Its identifier, for operators and for the queue's per-user bookkeeping.
    pub user: UserId,
    /// The whole object as JSON text.
    pub json: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Membership(Membership),
    Event(Event),
    Attribute(AttributeUpdate),
    Tracked(TrackObject),
}

impl Record {
    pub fn user(&self) -> &UserId {
        match self {
            Record::Membership(m) => &m.user,
            Record::Event(e) => &e.user,
            Record::Attribute(a) => &a.user,
            Record::Tracked(t) => &t.user,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Record::Membership(_) => Kind::Membership,
            Record::Attribute(_) => Kind::Attribute,
            Record::Tracked(t) if t.array == TrackArray::Purchases => Kind::Purchase,
            Record::Event(_) | Record::Tracked(_) => Kind::Event,
        }
    }

    /// For state records, the Braze attribute it sets; `None` for log entries.
    pub fn attribute_name(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Record::Membership(m) => Some(m.attribute().into()),
            Record::Attribute(a) => Some(a.name.as_str().into()),
            Record::Event(_) | Record::Tracked(_) => None,
        }
    }

    /// The value a state record sets, as JSON text, when it is a plain value that may be
    /// compared with what Braze has; `None` for operations and log entries.
    pub fn plain_value(&self) -> Option<&str> {
        match self {
            Record::Membership(m) if m.member => Some("true"),
            Record::Membership(_) => Some("false"),
            Record::Attribute(a) if a.is_plain() => Some(&a.value),
            _ => None,
        }
    }

    /// The object-level fields a state record travels with, as stored (empty for none).
    pub fn object_fields(&self) -> &str {
        match self {
            Record::Attribute(a) => a.object_fields.as_deref().unwrap_or(""),
            _ => "",
        }
    }
}

/// Writes a JSON string literal; serde_json's escaping is the one Braze reads.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing JSON into a Vec cannot fail");
}

/// An event's members after its identifier and object-level fields (`Event::members`).
/// `properties` goes in as given: ingest has checked it is an object's JSON text.
pub fn event_members(name: &str, time: &str, properties: Option<&str>) -> String {
    members_with(name, time, properties.map_or(0, str::len), |out| {
        if let Some(p) = properties {
            out.extend_from_slice(b",\"properties\":");
            out.extend_from_slice(p.as_bytes());
        }
    })
}

/// `event_members` for properties read as their top-level names and each value's text as
/// sent (ingest's fast path); `None` if the object's text would pass `max_properties` bytes.
pub fn event_members_of(
    name: &str,
    time: &str,
    properties: &[(std::borrow::Cow<str>, &serde_json::value::RawValue)],
    max_properties: usize,
) -> Option<String> {
    let sent: usize = properties
        .iter()
        .map(|(k, v)| k.len() + v.get().len() + 4)
        .sum();
    let mut object = 0;
    let members = members_with(name, time, sent, |out| {
        out.extend_from_slice(b",\"properties\":");
        let start = out.len();
        out.push(b'{');
        for (i, (key, value)) in properties.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, key);
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        object = out.len() - start;
    });
    (object <= max_properties).then_some(members)
}

fn members_with(name: &str, time: &str, extra: usize, rest: impl FnOnce(&mut Vec<u8>)) -> String {
    // The punctuation and member names take 33 bytes; escapes are rare.
    let mut out = Vec::with_capacity(48 + name.len() + time.len() + extra);
    out.extend_from_slice(b"\"name\":");
    json_str(&mut out, name);
    out.extend_from_slice(b",\"time\":");
    json_str(&mut out, time);
    rest(&mut out);
    String::from_utf8(out).expect("JSON text built from &str is UTF-8")
}

/// What a record is, as counted and shown: relayed events count as events, relayed purchases
/// as purchases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Membership,
    Attribute,
    Event,
    Purchase,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Membership,
        Kind::Attribute,
        Kind::Event,
        Kind::Purchase,
    ];

    /// The name in `/metrics` labels, `queue stats` and the admin API.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Membership => "membership",
            Kind::Attribute => "attribute",
            Kind::Event => "event",
            Kind::Purchase => "purchase",
        }
    }
}

/// Counters, one per kind.
#[derive(Debug, Default)]
pub struct PerKind([std::sync::atomic::AtomicU64; 4]);

impl PerKind {
    pub fn add(&self, kind: Kind, n: u64) {
        self.0[kind as usize].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Each kind's count by its name.
    pub fn by_name(&self) -> std::collections::BTreeMap<&'static str, u64> {
        Kind::ALL
            .iter()
            .map(|k| {
                let n = self.0[*k as usize].load(std::sync::atomic::Ordering::Relaxed);
                (k.name(), n)
            })
            .collect()
    }
}
