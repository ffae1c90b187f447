//! Braze: the `/users/track` wire format and the HTTP client (with the `check` command's
//! `/users/track` and `/users/export/ids` probes). It owns every request to Braze: no other
//! module builds Braze's URLs, headers or request bodies, or reads its status codes. (`relay.rs`
//! reads bodies in Braze's format that clients send to the daemon; it never talks to Braze.)

pub mod client;
pub mod wire;

pub use client::{BrazeClient, ObjectError, ProbeOutcome, RateInfo, TrackOutcome, Unreachable};
