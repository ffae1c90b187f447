//! Braze: the `/users/track` wire format and the HTTP client. Nothing else knows Braze's URLs,
//! headers, status codes or JSON shapes.

pub mod client;
pub mod wire;

pub use client::{BrazeClient, ObjectError, RateInfo, TrackOutcome};
