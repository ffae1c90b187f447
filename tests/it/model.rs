//! The real queue (sled in a temp dir) driven through random sequences of enqueue, lease,
//! complete (delivered / retry / dead), retry-dead, purge-dead, compact, reopen and "crash
//! after Braze took it", checked after every step against a model of what must hold.
//!
//! The model does not re-implement the queue: it does not predict coalescing or skipping. It
//! knows every record by a unique tag (an event's name, a membership's `time`, an attribute's
//! value), what Braze received and when, and it checks the promises: nothing accepted is lost,
//! nothing delivered comes back, one update of an attribute in flight at a time, per attribute
//! never an older update after a newer one, the last accepted value wins, an operation is only
//! ever dropped for a newer plain value, and the counters agree with what is stored. A record
//! that disappears without being delivered must have a reason the design gives (a newer plain
//! value replaced it, or Braze already had its value).
//!
//! Few cases by default so CI stays fast; `PROPTEST_CASES=500 cargo test --test it model` for
//! a long run.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiq_braze_sync::queue::{
    BatchLimits, Leased, Outcome, Queue, QueueError, QueueSettings, RecordView, Selection,
};
use aiq_braze_sync::record::{AttributeUpdate, Event, Membership, Record, UserId};
use proptest::prelude::*;

/// Small on purpose: collisions on one user's attribute are where the queue's rules live.
const USERS: usize = 3;
/// The first is also the attribute membership `a`/`1` sets, so memberships and attribute
/// updates of it coalesce with each other.
const ATTRIBUTES: [&str; 2] = ["AIQ_a_1", "color"];
const UPDATE_ONLY: &str = r#"{"_update_existing_only":true}"#;
/// An id no record ever gets, to ask retry/purge for something that is not there.
const NO_SUCH_ID: u64 = 1 << 40;
const ALL: usize = 100_000;

type Key = (usize, usize);

#[derive(Debug, Clone, Copy)]
enum Gen {
    Event(usize),
    Member(usize, bool),
    /// user, attribute, with object fields
    Plain(usize, usize, bool),
    Op(usize, usize, bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Delivered,
    Retry,
    Dead,
}

#[derive(Debug, Clone)]
enum Step {
    Enqueue(Vec<Gen>),
    Lease {
        max_objects: usize,
        memberships: bool,
        per_array: bool,
    },
    /// Completes some outstanding leases, each chosen modulo their number, in this order.
    Complete(Vec<(usize, Out)>),
    /// `None`: all dead letters; else the chosen ones, plus an id that is not dead if `true`.
    RetryDead(Option<Vec<usize>>, bool),
    PurgeDead(Option<Vec<usize>>, bool),
    Compact,
    /// A clean restart: leases are dropped, nothing was sent.
    Reopen,
    /// Braze took every outstanding lease, then the process died before `complete`.
    CrashAfterSend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Event,
    Plain,
    Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Accepted and not settled: stored, or replaced/skipped by the queue (which the final
    /// check must then justify).
    Queued,
    InFlight,
    Delivered,
    Dead,
    Purged,
    /// Dropped by retry-dead: a newer update of the attribute was accepted.
    Superseded,
}

#[derive(Debug)]
struct Rec {
    kind: Kind,
    user: usize,
    key: Option<Key>,
    /// The JSON text Braze gets for an attribute ("true" for a membership).
    value: String,
    fields: bool,
    /// Model clock at acceptance; a retry from the dead letters accepts it again.
    acc: u64,
    /// Model clock at the first acceptance, kept through retries: what `retry-dead` compares
    /// to decide whether a newer update supersedes a dead one.
    first: u64,
    /// The value Braze last received for this attribute when this was accepted: if equal,
    /// the queue may skip it.
    braze_had: Option<String>,
    status: Status,
    /// The queue's id, once seen (a retry gives a new one).
    seq: Option<u64>,
    leased_at: u64,
    /// Times Braze received it.
    sent: u32,
    /// Times Braze received it without the queue hearing back (crash before `complete`):
    /// each allows one more delivery.
    unacked: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    delivered: u32,
    dead: u32,
    retried: u32,
    superseded: u32,
    purged: u32,
    replaced_or_skipped: u32,
    reopens: u32,
    compactions: u32,
    resent: u32,
}

struct Model {
    recs: Vec<Rec>,
    clock: u64,
    /// Outstanding leases, oldest first.
    leases: Vec<Leased>,
    /// Per attribute, the record Braze received last and its acceptance time then (a retry
    /// from the dead letters accepts it again later).
    braze: HashMap<Key, (usize, u64)>,
    tally: Tally,
}

fn user_id(u: usize) -> UserId {
    UserId::External(format!("u{u}"))
}

fn record(g: Gen, tag: usize) -> Record {
    match g {
        Gen::Event(u) => Record::Event(Event::new(
            user_id(u),
            &format!("e{tag}"),
            "2026-01-01T00:00:00.000Z",
            None,
        )),
        Gen::Member(u, member) => Record::Membership(Membership {
            user: user_id(u),
            audience_id: "a".into(),
            split_id: "1".into(),
            member,
            time: Some(format!("t{tag}")),
        }),
        Gen::Plain(u, a, f) | Gen::Op(u, a, f) => Record::Attribute(AttributeUpdate {
            user: user_id(u),
            name: ATTRIBUTES[a].into(),
            value: if matches!(g, Gen::Plain(..)) {
                format!("\"v{tag}\"")
            } else {
                format!(r#"{{"add":["o{tag}"]}}"#)
            },
            object_fields: f.then(|| UPDATE_ONLY.into()),
        }),
    }
}

fn digits(s: &str) -> usize {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    d.parse().expect("a tag")
}

/// The tag a record was built with.
fn tag_of(r: &Record) -> usize {
    match r {
        Record::Event(e) => digits(&e.fields().expect("members parse").name),
        Record::Membership(m) => digits(m.time.as_deref().expect("tagged")),
        Record::Attribute(a) => digits(&a.value),
        Record::Tracked(_) => unreachable!("never enqueued here"),
    }
}

/// The tag an operator's view shows, where it shows one (not for memberships).
fn tag_of_view(v: &RecordView) -> Option<usize> {
    match v.kind.as_str() {
        "event" => v.what.split_whitespace().next().map(digits),
        "attribute" => v.what.split_once(" = ").map(|(_, value)| digits(value)),
        _ => None,
    }
}

fn settings() -> QueueSettings {
    QueueSettings {
        max_records: 1_000_000,
        max_disk_bytes: 1 << 40,
        // sled's open is the slow part of a case; a small cache keeps it cheap.
        cache_bytes: 4 << 20,
        compact_min_bytes: 1 << 30,
        min_free_bytes: 0,
        skip_unchanged_for: Some(std::time::Duration::from_secs(604_800)),
        accept_loss: false,
    }
}

impl Model {
    fn new() -> Model {
        Model {
            recs: Vec::new(),
            clock: 0,
            leases: Vec::new(),
            braze: HashMap::new(),
            tally: Tally::default(),
        }
    }

    fn accept(&mut self, g: Gen) -> Record {
        let tag = self.recs.len();
        self.clock += 1;
        let (kind, user, key, fields) = match g {
            Gen::Event(u) => (Kind::Event, u, None, false),
            Gen::Member(u, _) => (Kind::Plain, u, Some((u, 0)), false),
            Gen::Plain(u, a, f) => (Kind::Plain, u, Some((u, a)), f),
            Gen::Op(u, a, f) => (Kind::Op, u, Some((u, a)), f),
        };
        let r = record(g, tag);
        let value = r.plain_value().map_or_else(
            || match &r {
                Record::Attribute(a) => a.value.clone(),
                _ => String::new(),
            },
            str::to_string,
        );
        let braze_had = key.and_then(|k| self.braze_value(k));
        self.recs.push(Rec {
            kind,
            user,
            key,
            value,
            fields,
            acc: self.clock,
            first: self.clock,
            braze_had,
            status: Status::Queued,
            seq: None,
            leased_at: 0,
            sent: 0,
            unacked: 0,
        });
        r
    }

    fn braze_value(&self, k: Key) -> Option<String> {
        self.braze.get(&k).map(|&(t, _)| self.recs[t].value.clone())
    }

    /// Whether a plain value of the same attribute, with the same object fields, was
    /// accepted after `after`: the one reason the queue may drop an update unsent.
    fn replaced_after(&self, tag: usize, after: u64) -> bool {
        let r = &self.recs[tag];
        self.recs.iter().enumerate().any(|(t, o)| {
            t != tag
                && o.kind == Kind::Plain
                && o.key == r.key
                && o.fields == r.fields
                && o.acc > after
        })
    }

    fn by_seq(&self, seq: u64) -> Option<usize> {
        self.recs.iter().position(|r| r.seq == Some(seq))
    }

    fn dead_seqs(&self) -> BTreeSet<u64> {
        self.recs
            .iter()
            .filter(|r| r.status == Status::Dead)
            .map(|r| r.seq.expect("a dead record was leased, so its id is known"))
            .collect()
    }

    /// Braze receives `tag`. Checks it is not a duplicate and, per attribute, not older than
    /// what Braze already received.
    fn send(&mut self, tag: usize, acked: bool) -> Result<(), TestCaseError> {
        let r = &mut self.recs[tag];
        r.sent += 1;
        if !acked {
            r.unacked += 1;
        }
        prop_assert!(
            r.sent <= 1 + r.unacked,
            "record {tag} reached Braze {} times with {} crash(es) between send and ack",
            r.sent,
            r.unacked
        );
        if r.sent > 1 {
            self.tally.resent += 1;
        }
        if let Some(k) = r.key {
            let acc = r.acc;
            if let Some(&(last, last_acc)) = self.braze.get(&k) {
                prop_assert!(
                    last == tag || last_acc < acc,
                    "attribute {k:?}: record {tag} (accepted at {acc}) sent after record {last} \
                     (accepted at {last_acc})"
                );
            }
            self.braze.insert(k, (tag, acc));
        }
        Ok(())
    }

    /// Every lease is gone; what was in flight is pending again.
    fn reopened(&mut self) {
        for l in self.leases.drain(..) {
            let r = &mut self.recs[tag_of(&l.stored.record)];
            r.status = Status::Queued;
        }
        self.tally.reopens += 1;
    }
}

fn reopen(q: Arc<Queue>, dir: &Path) -> Result<Arc<Queue>, TestCaseError> {
    prop_assert_eq!(Arc::strong_count(&q), 1, "someone else holds the queue");
    drop(q);
    // sled 0.34's `Db::drop` returns before its I/O threads let go of the directory lock
    // (https://github.com/spacejam/sled/issues/1289), so an immediate reopen in the same
    // process is now and then refused. A real restart is a
    // new process. Bounded: a lock that is never released fails.
    let started = Instant::now();
    loop {
        match Queue::open(dir, settings()) {
            Err(QueueError::Locked { .. }) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            opened => return opened.map_err(|e| fail("reopen", e)),
        }
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e}"))
}

fn lease(
    q: &Queue,
    m: &mut Model,
    limits: &BatchLimits,
    memberships: bool,
) -> Result<usize, TestCaseError> {
    let got = q
        .lease_lanes(limits, memberships)
        .map_err(|e| fail("lease", e))?;
    m.clock += 1;
    let mut in_flight: BTreeSet<Key> = m
        .leases
        .iter()
        .filter_map(|l| m.recs[tag_of(&l.stored.record)].key)
        .collect();
    let events = got
        .iter()
        .filter(|l| l.stored.record.attribute_name().is_none());
    prop_assert!(events.count() <= limits.max_objects);
    for l in &got {
        let tag = tag_of(&l.stored.record);
        let (status, seq, key, user, acc) = {
            let r = &m.recs[tag];
            (r.status, r.seq, r.key, r.user, r.acc)
        };
        prop_assert_eq!(status, Status::Queued, "record {} leased", tag);
        if let Some(seq) = seq {
            prop_assert_eq!(seq, l.seq, "record {} changed id", tag);
        }
        if let Some(k) = key {
            // From the events lane only to go before, or with, a later event of its user.
            prop_assert!(
                memberships
                    || m.recs.iter().any(|e| e.kind == Kind::Event
                        && e.user == user
                        && e.acc > acc
                        && e.status == Status::Queued),
                "an attribute leased from the events lane without a later event of its user"
            );
            prop_assert!(
                in_flight.insert(k),
                "two updates of attribute {:?} in flight at once (record {})",
                k,
                tag
            );
        }
        let r = &mut m.recs[tag];
        r.status = Status::InFlight;
        r.seq = Some(l.seq);
        r.leased_at = m.clock;
    }
    if got.is_empty() {
        // An event waits for nothing but an earlier update of its own user (which goes first,
        // or with it): with none queued or in flight, an empty lease means no event is queued.
        let waiting = m
            .recs
            .iter()
            .filter(|r| r.kind == Kind::Event && r.status == Status::Queued)
            .filter(|e| {
                !m.recs.iter().any(|a| {
                    a.key.is_some()
                        && a.user == e.user
                        && a.acc < e.acc
                        && matches!(a.status, Status::Queued | Status::InFlight)
                })
            })
            .count();
        prop_assert_eq!(waiting, 0, "events pending, but the lease is empty");
    }
    let n = got.len();
    m.leases.extend(got);
    Ok(n)
}

/// Outstanding leases chosen by index, each once, in the order chosen.
fn choose(m: &Model, picks: &[(usize, Out)]) -> Vec<(usize, Out)> {
    let mut chosen: Vec<(usize, Out)> = Vec::new();
    if m.leases.is_empty() {
        return chosen;
    }
    for (i, out) in picks {
        let at = i % m.leases.len();
        if !chosen.iter().any(|(c, _)| *c == at) {
            chosen.push((at, *out));
        }
    }
    chosen
}

fn deliver_all(q: &Queue, m: &mut Model) -> Result<(), TestCaseError> {
    let all = (0..m.leases.len()).map(|at| (at, Out::Delivered)).collect();
    complete(q, m, all)
}

/// Completes the outstanding leases at these positions with these outcomes.
fn complete(q: &Queue, m: &mut Model, chosen: Vec<(usize, Out)>) -> Result<(), TestCaseError> {
    if chosen.is_empty() {
        return Ok(());
    }
    let results: Vec<(Leased, Outcome)> = chosen
        .iter()
        .map(|(at, out)| {
            let outcome = match out {
                Out::Delivered => Outcome::Delivered,
                Out::Retry => Outcome::Retry,
                Out::Dead => Outcome::Dead("refused".into()),
            };
            (m.leases[*at].clone(), outcome)
        })
        .collect();
    let mut positions: Vec<usize> = chosen.iter().map(|(at, _)| *at).collect();
    positions.sort_unstable();
    for at in positions.into_iter().rev() {
        m.leases.remove(at);
    }
    q.complete(results.clone())
        .map_err(|e| fail("complete", e))?;
    m.clock += 1;
    let dead: BTreeSet<u64> = q
        .dead(ALL)
        .map_err(|e| fail("dead", e))?
        .iter()
        .map(|v| v.id)
        .collect();
    for (l, outcome) in results {
        let tag = tag_of(&l.stored.record);
        match outcome {
            Outcome::Delivered => {
                m.send(tag, true)?;
                m.recs[tag].status = Status::Delivered;
                m.tally.delivered += 1;
            }
            Outcome::Retry => m.recs[tag].status = Status::Queued,
            Outcome::Dead(_) if dead.contains(&l.seq) => {
                m.recs[tag].status = Status::Dead;
                m.tally.dead += 1;
            }
            Outcome::Dead(_) => {
                // Not kept: only right if a newer value replaced it while it was in flight.
                let leased_at = m.recs[tag].leased_at;
                prop_assert!(
                    m.recs[tag].kind != Kind::Event && m.replaced_after(tag, leased_at),
                    "record {} refused by Braze but not in the dead letters",
                    tag
                );
                m.recs[tag].status = Status::Queued;
            }
        }
    }
    Ok(())
}

/// The ids a selection step means: all dead letters, or some of them plus maybe one that
/// is not dead.
fn selection(m: &Model, which: &Option<Vec<usize>>, bogus: bool) -> Selection {
    let dead: Vec<u64> = m.dead_seqs().into_iter().collect();
    match which {
        None => Selection::All,
        Some(picks) => {
            let mut ids: Vec<u64> = if dead.is_empty() {
                Vec::new()
            } else {
                picks.iter().map(|i| dead[i % dead.len()]).collect()
            };
            if bogus {
                ids.push(NO_SUCH_ID);
            }
            Selection::Ids(ids)
        }
    }
}

/// (dead ids selected, ids asked for that are not dead), both ascending.
fn expected(m: &Model, sel: &Selection) -> (Vec<u64>, Vec<u64>) {
    let dead = m.dead_seqs();
    match sel {
        Selection::All => (dead.into_iter().collect(), Vec::new()),
        Selection::Ids(ids) => {
            let ids: BTreeSet<u64> = ids.iter().copied().collect();
            (
                ids.iter().copied().filter(|i| dead.contains(i)).collect(),
                ids.iter().copied().filter(|i| !dead.contains(i)).collect(),
            )
        }
    }
}

async fn retry_dead(
    q: &Queue,
    m: &mut Model,
    which: &Option<Vec<usize>>,
    bogus: bool,
) -> Result<(), TestCaseError> {
    let sel = selection(m, which, bogus);
    let (selected, missing) = expected(m, &sel);
    let report = q.retry_dead(&sel).await.map_err(|e| fail("retry", e))?;
    let mut got_missing = report.missing.clone();
    got_missing.sort_unstable();
    prop_assert_eq!(got_missing, missing);
    prop_assert!(report.undecodable.is_empty());
    let mut settled: Vec<u64> = report
        .retried
        .iter()
        .chain(&report.superseded)
        .copied()
        .collect();
    settled.sort_unstable();
    prop_assert_eq!(
        &settled,
        &selected,
        "retried + superseded != selected: {:?}",
        report
    );

    // Whether a newer update exists is judged by when each was first accepted, whatever
    // retries came since.
    let before: Vec<u64> = m.recs.iter().map(|r| r.first).collect();
    for seq in &selected {
        let tag = m.by_seq(*seq).expect("a dead record is known");
        let r = &m.recs[tag];
        let newer: Vec<usize> = (0..m.recs.len())
            .filter(|&t| t != tag && m.recs[t].key.is_some() && m.recs[t].key == r.key)
            .filter(|&t| before[t] > before[tag])
            .collect();
        let superseded = report.superseded.contains(seq);
        if r.kind == Kind::Plain {
            prop_assert_eq!(
                superseded,
                !newer.is_empty(),
                "dead plain update {} (id {}) of {:?}: superseded = {}, newer accepted: {:?}",
                tag,
                seq,
                r.key,
                superseded,
                newer
            );
        } else {
            prop_assert!(
                !superseded,
                "record {} is not a plain value, yet superseded",
                tag
            );
        }
    }
    for seq in &selected {
        let tag = m.by_seq(*seq).expect("known");
        if report.retried.contains(seq) {
            m.clock += 1;
            let braze_had = m.recs[tag].key.and_then(|k| m.braze_value(k));
            let r = &mut m.recs[tag];
            r.status = Status::Queued;
            r.acc = m.clock;
            r.seq = None;
            r.braze_had = braze_had;
            m.tally.retried += 1;
        } else {
            m.recs[tag].status = Status::Superseded;
            m.tally.superseded += 1;
        }
    }
    Ok(())
}

async fn purge_dead(
    q: &Queue,
    m: &mut Model,
    which: &Option<Vec<usize>>,
    bogus: bool,
) -> Result<(), TestCaseError> {
    let sel = selection(m, which, bogus);
    let (selected, missing) = expected(m, &sel);
    let report = q.purge_dead(&sel).await.map_err(|e| fail("purge", e))?;
    let (mut purged, mut got_missing) = (report.purged, report.missing);
    purged.sort_unstable();
    got_missing.sort_unstable();
    prop_assert_eq!(&purged, &selected);
    prop_assert_eq!(got_missing, missing);
    for seq in purged {
        let tag = m.by_seq(seq).expect("known");
        m.recs[tag].status = Status::Purged;
        m.tally.purged += 1;
    }
    Ok(())
}

/// What `stats`, `peek` and `dead` say agrees with the model and with each other.
fn check(q: &Queue, m: &mut Model) -> Result<(), TestCaseError> {
    let s = q.stats().map_err(|e| fail("stats", e))?;
    prop_assert_eq!(s.in_flight, m.leases.len() as u64, "in flight");

    let dead = q.dead(ALL).map_err(|e| fail("dead", e))?;
    prop_assert_eq!(s.dead, dead.len() as u64, "stats.dead vs the dead letters");
    let dead_ids: BTreeSet<u64> = dead.iter().map(|v| v.id).collect();
    prop_assert_eq!(dead_ids, m.dead_seqs(), "dead letters");

    let peek = q.peek(ALL).map_err(|e| fail("peek", e))?;
    prop_assert_eq!(
        s.pending,
        peek.len() as u64,
        "stats.pending vs what peek lists"
    );
    prop_assert_eq!(s.pending, s.pending_events + s.pending_attributes);
    let events = m
        .recs
        .iter()
        .filter(|r| r.kind == Kind::Event)
        .filter(|r| matches!(r.status, Status::Queued | Status::InFlight))
        .count() as u64;
    prop_assert_eq!(s.pending_events, events, "pending events");

    for v in &peek {
        let tag = match m.by_seq(v.id).or_else(|| tag_of_view(v)) {
            Some(tag) => tag,
            None => {
                // A membership not leased yet: its view has no tag, so match on content.
                let matches = m.recs.iter().any(|r| {
                    r.seq.is_none()
                        && r.status == Status::Queued
                        && r.key == Some((r.user, 0))
                        && v.user == user_id(r.user).to_string()
                        && v.what == format!("AIQ_a_1 = {}", r.value)
                });
                prop_assert!(
                    matches,
                    "peek lists {:?}, which the model has no trace of",
                    v
                );
                continue;
            }
        };
        let r = &mut m.recs[tag];
        prop_assert!(
            matches!(r.status, Status::Queued | Status::InFlight),
            "peek lists record {} ({:?}), which is {:?}",
            tag,
            v,
            r.status
        );
        prop_assert_eq!(
            v.in_flight,
            r.status == Status::InFlight,
            "in flight: {:?}",
            v
        );
        prop_assert_eq!(&v.user, &user_id(r.user).to_string());
        match r.seq {
            Some(seq) => prop_assert_eq!(seq, v.id, "record {} listed under another id", tag),
            None => r.seq = Some(v.id),
        }
    }
    Ok(())
}

/// Everything left is leased and delivered, then the end state is judged: nothing lost, no
/// duplicates, operations all delivered, each attribute at its last accepted value.
async fn drain_and_judge(q: Arc<Queue>, dir: &Path, m: &mut Model) -> Result<(), TestCaseError> {
    deliver_all(&q, m)?;
    let limits = BatchLimits {
        max_objects: 50,
        per_array: false,
        max_bytes: 3_500_000,
    };
    let mut rounds = 0;
    while lease(&q, m, &limits, true)? > 0 {
        rounds += 1;
        prop_assert!(rounds < 500, "the queue never drains");
        deliver_all(&q, m)?;
    }
    check(&q, m)?;
    let s = q.stats().map_err(|e| fail("stats", e))?;
    prop_assert_eq!((s.pending, s.in_flight), (0, 0), "left after draining");

    // A delivered record does not come back after a restart.
    let q = reopen(q, dir)?;
    prop_assert!(q.lease(&limits).map_err(|e| fail("lease", e))?.is_empty());
    check(&q, m)?;

    for (tag, r) in m.recs.iter().enumerate() {
        prop_assert!(r.status != Status::InFlight);
        if r.status != Status::Queued {
            continue;
        }
        // Accepted, not dead, and never delivered: only a newer plain value or Braze
        // already having the value excuses that.
        m.tally.replaced_or_skipped += 1;
        let replaced = m.replaced_after(tag, r.acc);
        match r.kind {
            Kind::Event => prop_assert!(false, "event {} was lost", tag),
            Kind::Op => prop_assert!(replaced, "operation {} was never delivered", tag),
            Kind::Plain => prop_assert!(
                replaced || r.braze_had.as_deref() == Some(r.value.as_str()),
                "update {} ({}) of {:?} was never delivered; Braze had {:?}",
                tag,
                r.value,
                r.key,
                r.braze_had
            ),
        }
    }
    let keys: BTreeSet<Key> = m.recs.iter().filter_map(|r| r.key).collect();
    for k in keys {
        // The newest update that should have reached Braze: sent, or unsent for a reason
        // other than being replaced (that is, skipped as unchanged).
        let last = (0..m.recs.len())
            .filter(|&t| m.recs[t].key == Some(k))
            .filter(|&t| {
                let r = &m.recs[t];
                r.sent > 0 || (r.status == Status::Queued && !m.replaced_after(t, r.acc))
            })
            .max_by_key(|&t| m.recs[t].acc);
        let Some(last) = last else { continue };
        let holds = m.braze.get(&k).map(|&(t, _)| t);
        if m.recs[last].sent > 0 {
            prop_assert_eq!(holds, Some(last), "attribute {:?}: Braze got last", k);
        } else {
            prop_assert_eq!(
                m.braze_value(k),
                Some(m.recs[last].value.clone()),
                "attribute {:?}: Braze holds, vs the last accepted (record {})",
                k,
                last
            );
        }
    }
    Ok(())
}

async fn run(steps: &[Step]) -> Result<Tally, TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let mut q = Queue::open(dir, settings()).map_err(|e| fail("open", e))?;
    let mut m = Model::new();
    for step in steps {
        match step {
            Step::Enqueue(gens) => {
                let records: Vec<Record> = gens.iter().map(|g| m.accept(*g)).collect();
                q.enqueue(records).await.map_err(|e| fail("enqueue", e))?;
            }
            Step::Lease {
                max_objects,
                memberships,
                per_array,
            } => {
                let limits = BatchLimits {
                    max_objects: *max_objects,
                    per_array: *per_array,
                    max_bytes: 3_500_000,
                };
                lease(&q, &mut m, &limits, *memberships)?;
            }
            Step::Complete(picks) => {
                let chosen = choose(&m, picks);
                complete(&q, &mut m, chosen)?;
            }
            Step::RetryDead(which, bogus) => retry_dead(&q, &mut m, which, *bogus).await?,
            Step::PurgeDead(which, bogus) => purge_dead(&q, &mut m, which, *bogus).await?,
            Step::Compact => {
                let generation = q.stats().map_err(|e| fail("stats", e))?.generation;
                q.compact().map_err(|e| fail("compact", e))?;
                let now = q.stats().map_err(|e| fail("stats", e))?.generation;
                prop_assert_eq!(now, generation + 1);
                m.tally.compactions += 1;
            }
            Step::Reopen => {
                q = reopen(q, dir)?;
                m.reopened();
            }
            Step::CrashAfterSend => {
                let tags: Vec<usize> = m.leases.iter().map(|l| tag_of(&l.stored.record)).collect();
                for tag in tags {
                    m.send(tag, false)?;
                }
                q = reopen(q, dir)?;
                m.reopened();
            }
        }
        check(&q, &mut m)?;
    }
    drain_and_judge(q, dir, &mut m).await?;
    Ok(m.tally)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

fn gen() -> impl Strategy<Value = Gen> {
    let fields = || prop::bool::weighted(0.25);
    prop_oneof![
        2 => (0..USERS).prop_map(Gen::Event),
        3 => (0..USERS, any::<bool>()).prop_map(|(u, m)| Gen::Member(u, m)),
        2 => (0..USERS, 0..ATTRIBUTES.len(), fields()).prop_map(|(u, a, f)| Gen::Plain(u, a, f)),
        2 => (0..USERS, 0..ATTRIBUTES.len(), fields()).prop_map(|(u, a, f)| Gen::Op(u, a, f)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let out = prop_oneof![4 => Just(Out::Delivered), 2 => Just(Out::Retry), 2 => Just(Out::Dead)];
    let which = || prop::option::weighted(0.6, prop::collection::vec(0usize..8, 0..=3));
    prop_oneof![
        6 => prop::collection::vec(gen(), 1..=5).prop_map(Step::Enqueue),
        5 => (1usize..=4, prop::bool::weighted(0.85), any::<bool>()).prop_map(
            |(max_objects, memberships, per_array)| Step::Lease {
                max_objects,
                memberships,
                per_array,
            }
        ),
        5 => prop::collection::vec((0usize..8, out), 1..=4).prop_map(Step::Complete),
        2 => (which(), any::<bool>()).prop_map(|(w, b)| Step::RetryDead(w, b)),
        1 => (which(), any::<bool>()).prop_map(|(w, b)| Step::PurgeDead(w, b)),
        1 => Just(Step::Compact),
        1 => Just(Step::Reopen),
        1 => Just(Step::CrashAfterSend),
    ]
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Whatever the order of enqueue, lease, delivery, refusal, retry, purge, compaction,
    /// restart and crash after send, the queue keeps every promise the model checks.
    #[test]
    fn the_queue_keeps_its_promises_under_any_sequence_of_operations(
        steps in prop::collection::vec(step(), 10..=40),
    ) {
        block_on(run(&steps))?;
    }
}

/// The property's own check: one schedule, written out, that goes through every path the
/// model judges (a replaced in-flight update, a skipped unchanged one, a resend after a crash,
/// a superseded retry, a purge, a compaction), so that a model which stopped looking would
/// show here.
#[test]
fn the_model_sees_every_path_it_judges() {
    use Gen::*;
    let lease = Step::Lease {
        max_objects: 4,
        memberships: true,
        per_array: false,
    };
    let steps = vec![
        // Tags 0-3: an event, u0's membership, u1's color, an operation on u2's color.
        Step::Enqueue(vec![
            Event(0),
            Member(0, true),
            Plain(1, 1, false),
            Op(2, 1, false),
        ]),
        lease.clone(),
        // Tag 4 replaces the membership in flight.
        Step::Enqueue(vec![Member(0, false)]),
        Step::Complete(vec![
            (0, Out::Delivered),
            (1, Out::Dead),
            (2, Out::Dead),
            (3, Out::Retry),
        ]),
        lease.clone(),
        Step::CrashAfterSend,
        lease.clone(),
        Step::Complete(vec![(0, Out::Delivered), (1, Out::Delivered)]),
        // Tag 5: Braze has `false` already. Tag 6: newer than u1's dead color.
        Step::Enqueue(vec![Member(0, false)]),
        Step::Enqueue(vec![Plain(1, 1, false)]),
        Step::RetryDead(None, false),
        lease.clone(),
        Step::Complete(vec![(0, Out::Dead)]),
        // Tag 7: an operation after it, refused too, then retried by id.
        Step::Enqueue(vec![Op(1, 1, false)]),
        lease.clone(),
        Step::Complete(vec![(0, Out::Dead)]),
        Step::RetryDead(Some(vec![1]), true),
        Step::PurgeDead(None, false),
        Step::Compact,
        Step::Reopen,
    ];
    let t = block_on(run(&steps)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        [t.delivered, t.dead, t.retried, t.superseded, t.purged],
        [4, 3, 1, 1, 1],
        "{t:?}"
    );
    assert_eq!(
        [t.replaced_or_skipped, t.resent, t.reopens, t.compactions],
        [2, 2, 2, 1],
        "{t:?}"
    );
}

/// Found by the model. Braze refused an `add` on a user's attribute and then the plain value
/// accepted after it; the operator retries all dead letters. The plain value is the newest
/// update of that attribute, so it must be sent (after the `add`, or replacing it): nothing
/// newer supersedes it.
#[tokio::test]
async fn retrying_an_operation_with_the_newer_value_after_it_keeps_the_newer_value() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings()).unwrap();
    let limits = BatchLimits {
        max_objects: 50,
        per_array: false,
        max_bytes: 3_500_000,
    };
    let update = |value: &str| {
        Record::Attribute(AttributeUpdate {
            user: user_id(0),
            name: "color".into(),
            value: value.into(),
            object_fields: None,
        })
    };
    let mut dead = Vec::new();
    for value in [r#"{"add":["x"]}"#, r#""blue""#] {
        q.enqueue(vec![update(value)]).await.unwrap();
        let leased = q.lease(&limits).unwrap();
        assert_eq!(leased.len(), 1);
        dead.push(leased[0].seq);
        let refused = Outcome::Dead("refused".into());
        q.complete(leased.into_iter().map(|l| (l, refused.clone())).collect())
            .unwrap();
    }

    let report = q.retry_dead(&Selection::All).await.unwrap();
    assert_eq!(report.superseded, Vec::<u64>::new(), "{report:?}");

    let mut sent = Vec::new();
    loop {
        let leased = q.lease(&limits).unwrap();
        if leased.is_empty() {
            break;
        }
        for l in &leased {
            if let Record::Attribute(a) = &l.stored.record {
                sent.push(a.value.clone());
            }
        }
        q.complete(
            leased
                .into_iter()
                .map(|l| (l, Outcome::Delivered))
                .collect(),
        )
        .unwrap();
    }
    assert_eq!(
        sent.last().map(String::as_str),
        Some(r#""blue""#),
        "sent: {sent:?}"
    );
}

fn color(value: &str) -> Record {
    Record::Attribute(AttributeUpdate {
        user: user_id(0),
        name: "color".into(),
        value: value.into(),
        object_fields: None,
    })
}

/// Leases until nothing is left and ends every lease with `outcome`: the values, in order.
fn drain_colors(q: &Queue, outcome: &Outcome) -> Vec<(String, u64)> {
    let limits = BatchLimits {
        max_objects: 50,
        per_array: false,
        max_bytes: 3_500_000,
    };
    let mut out = Vec::new();
    loop {
        let leased = q.lease(&limits).unwrap();
        if leased.is_empty() {
            return out;
        }
        for l in &leased {
            if let Record::Attribute(a) = &l.stored.record {
                out.push((a.value.clone(), l.seq));
            }
        }
        q.complete(leased.into_iter().map(|l| (l, outcome.clone())).collect())
            .unwrap();
    }
}

/// Accepts `value` and has Braze refuse it: its dead letter's id.
async fn refused(q: &Queue, value: &str) -> u64 {
    q.enqueue(vec![color(value)]).await.unwrap();
    let dead = drain_colors(q, &Outcome::Dead("refused".into()));
    assert_eq!(dead.len(), 1);
    dead[0].1
}

fn values(sent: &[(String, u64)]) -> Vec<&str> {
    sent.iter().map(|(v, _)| v.as_str()).collect()
}

/// Braze refused an `add` on a user's attribute and then the plain value accepted after it.
/// The operator retries them in two calls, the `add` first, delivered in between: the plain
/// value is still the newest accepted and must go out, not be dropped as superseded by the
/// `add`'s retry (a retry takes a new seq, not a new place in acceptance order). And a retried
/// `add`, pending behind a newer update or delivered after one, must not let an older plain
/// value through.
#[tokio::test]
async fn retries_in_separate_calls_keep_acceptance_order() {
    const ADD: &str = r#"{"add":["x"]}"#;
    let delivered = Outcome::Delivered;

    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings()).unwrap();
    let (add, blue) = (refused(&q, ADD).await, refused(&q, r#""blue""#).await);
    let report = q.retry_dead(&Selection::Ids(vec![add])).await.unwrap();
    assert_eq!(report.retried, vec![add], "{report:?}");
    assert_eq!(values(&drain_colors(&q, &delivered)), vec![ADD]);
    let report = q.retry_dead(&Selection::Ids(vec![blue])).await.unwrap();
    assert_eq!(report.retried, vec![blue], "{report:?}");
    assert_eq!(values(&drain_colors(&q, &delivered)), vec![r#""blue""#]);
    drop(q);

    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings()).unwrap();
    let (add, red) = (refused(&q, ADD).await, refused(&q, r#""red""#).await);
    q.enqueue(vec![color(r#""green""#)]).await.unwrap();
    let report = q.retry_dead(&Selection::Ids(vec![add])).await.unwrap();
    assert_eq!(report.retried, vec![add], "{report:?}");
    let report = q.retry_dead(&Selection::Ids(vec![red])).await.unwrap();
    assert_eq!(report.superseded, vec![red], "{report:?}");
    assert_eq!(
        values(&drain_colors(&q, &delivered)),
        vec![r#""green""#, ADD]
    );
    drop(q);

    // A retried `add` delivered after a newer value still leaves that value the newest known.
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings()).unwrap();
    let add = refused(&q, ADD).await;
    let red = refused(&q, r#""red""#).await;
    let blue = refused(&q, r#""blue""#).await;
    for id in [blue, add] {
        let report = q.retry_dead(&Selection::Ids(vec![id])).await.unwrap();
        assert_eq!(report.retried, vec![id], "{report:?}");
        drain_colors(&q, &delivered);
    }
    let report = q.retry_dead(&Selection::Ids(vec![red])).await.unwrap();
    assert_eq!(report.superseded, vec![red], "{report:?}");
}
