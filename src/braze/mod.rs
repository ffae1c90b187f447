//! Braze: the `/users/track` wire format and the HTTP client (with the `check` command's
//! `/users/track` and `/users/export/ids` probes). Nothing else knows Braze's URLs,
//! headers, status codes or JSON shapes.

pub mod client;
pub mod wire;

pub use client::{BrazeClient, ObjectError, ProbeOutcome, RateInfo, TrackOutcome, Unreachable};
