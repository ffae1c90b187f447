//! aiq-braze-sync: a durable buffer between ActionIQ and Braze's `/users/track`.
pub mod config;
pub mod fake_braze;
