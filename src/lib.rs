//! aiq-braze-sync: a durable buffer between ActionIQ and Braze's `/users/track`.
//!
//! # A record's path
//!
//! ```text
//! POST /v1/events ─▶ http.rs (router, token, `post_events`) ─▶ request_body.rs (size, pace,
//!   memory) ─▶ ingest/ (parse and check, all or nothing; `fast.rs` for plain events)
//!   ─▶ record.rs (`Record`) ─▶ queue::Backend::enqueue (durable, then 202)
//! delivery/ (a worker: `concurrency.rs` slot, `gate.rs` turn) ─▶ queue::Backend::lease
//!   ─▶ braze/wire.rs (`build`: the /users/track body) ─▶ braze/client.rs (`track`: the
//!   answer as a `TrackOutcome`) ─▶ queue::Backend::complete (delivered, dead, or retry)
//! ```
//!
//! A record is answered 2xx only once it is on disk. It leaves the queue only when Braze has
//! taken it (removed) or refused it for itself (moved to the dead letters with the reason);
//! anything else (a crash, an outage, a 429) leaves it queued, in order. For one user and one
//! attribute the last value Braze receives is the last one accepted.
//!
//! # Modules
//!
//! - [`config`]: the TOML file and environment, validated into resolved decisions.
//! - [`record`]: memberships and events as the program sees them.
//! - [`ingest`]: parsing and validating request bodies, all or nothing, with the place of
//!   every error.
//! - [`members`]: a snapshot's member list, read line by line as it streams in.
//! - [`snapshot`]: a split's whole membership in sorted files, diffed against the previous
//!   upload so that only entries and exits are queued.
//! - [`queue`]: the only owner of sled: durable enqueue (group commit), leases, dead
//!   letters, bounds, and giving disk space back, behind the `queue::Backend` seam. Its doc
//!   is the on-disk format, the lock order and a glossary.
//! - [`braze`]: the `/users/track` wire format and HTTP client; every answer becomes a named
//!   outcome.
//! - [`delivery`]: the workers and the shared retry policy (backoff, `Retry-After`, rate
//!   ceiling).
//! - [`relay`]: the Braze-compatible `/users/track` body, checked as Braze checks it and
//!   split into records.
//! - [`metrics`]: `/metrics` in the Prometheus exposition format.
//! - [`status`]: `/status`, one page for an operator's browser, and the hour of samples it
//!   draws.
//! - [`http`]: the ingest, health, metrics and admin endpoints, and the accept loop with
//!   its connection cap.
//! - [`http_guard`]: what a browser may not do: cross-origin posts, foreign `Host`s.
//! - [`request_body`]: reading bodies within bounds of size, pace and shared memory.
//! - [`daemon`]: start and stop in pipeline order.
//! - [`shutdown`]: the one shutdown signal every task waits on, stage by stage.
//! - [`service`]: life under systemd: notify, watchdog, reload on SIGHUP.
//! - [`logging`]: text or JSON log lines, the level changeable while running.
//! - [`import`]: CSV and NDJSON exports into the queue, checked whole before anything is
//!   queued.
//! - [`cli`], [`commands`]: the command line.
//! - [`target`]: where a command's work goes: the queue opened directly, or the running
//!   daemon that holds it.
//! - [`reconcile`]: the `reconcile` command: what Braze holds for a split's members against
//!   what the daemon says they are, and with `--repair` the right value queued again.
//! - [`check`]: the `check` command, proving endpoint, key and both permissions without
//!   changing any user's data.
//! - `demo`: the newcomer's command, the whole pipeline against the `fake-braze` crate (a
//!   Braze stand-in of this workspace); built with the default `demo` feature.

pub mod braze;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod http;
pub mod http_guard;
pub mod import;
pub mod ingest;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod record;
pub mod relay;
pub mod request_body;
pub mod service;
pub mod shutdown;
pub mod snapshot;
pub mod status;
pub mod target;
