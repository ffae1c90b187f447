//! The records the daemon carries, as the rest of the program sees them.
//!
//! These are in-memory types; the bytes on disk are `queue::format`, which converts to and from
//! them. Keeping the two apart lets these grow without breaking databases already in the field.

use std::fmt;

/// A Braze primary identifier. Braze takes exactly one per object, so a record carries one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserId {
    /// The customer's own id; Braze creates a profile for an unknown one.
    External(String),
    /// Braze's internal id; it can only address a profile that exists.
    Braze(String),
}

impl UserId {
    /// The Braze field name this identifier travels in.
    pub fn field(&self) -> &'static str {
        match self {
            UserId::External(_) => "external_id",
            UserId::Braze(_) => "braze_id",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            UserId::External(v) | UserId::Braze(v) => v,
        }
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.field(), self.value())
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
    /// The Braze custom attribute this membership sets, as the integration page names it.
    pub fn attribute(&self) -> String {
        format!("AIQ_{}_{}", self.audience_id, self.split_id)
    }
}

/// A customer event: a log entry, delivered once per acceptance (Braze never deduplicates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub user: UserId,
    pub name: String,
    /// RFC 3339, UTC, millisecond precision: the form Braze documents.
    pub time: String,
    /// The properties object as JSON text (kept as text: bincode cannot carry a JSON value).
    pub properties: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Membership(Membership),
    Event(Event),
}

impl Record {
    pub fn user(&self) -> &UserId {
        match self {
            Record::Membership(m) => &m.user,
            Record::Event(e) => &e.user,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Record::Membership(_) => "membership",
            Record::Event(_) => "event",
        }
    }
}
