//! Integration tests: one binary (link time on 2 cores), one module per behaviour.
//!
//! Everything is real: a sled database in a temp dir, HTTP over loopback, the fake Braze of the
//! `fake-braze` crate, and for crashes the real binary killed with SIGKILL.

mod attributes;
mod bad_input;
mod binary;
mod braze_client;
mod check;
mod common;
mod crash;
mod damage;
mod disk;
mod end_to_end;
mod faults;
mod hostile;
mod import;
mod model;
mod monitoring;
mod newcomer;
mod object_limit;
mod observability;
mod ordering;
mod outage;
mod pace;
mod powerloss;
mod queue;
mod queue_tools;
mod readme;
mod reconcile;
mod relay;
mod snapshot;
mod status;
mod systemd;
