//! What operators do with the queue: look at pending and dead records, retry or purge dead
//! ones. Listing reads lazily and stops at the limit; it never loads the whole queue, and a
//! retry never puts back a plain value older than one accepted since for the same attribute.

use serde::{Deserialize, Serialize};

use super::format::{dead_key, decode, decode_dead, latest_key, seq_of, Stored, DEAD};
use super::migrate::dead_chunk;
use super::{lane_records, log_records, now_ms, Queue, QueueError, Staging, LANE_ATTRIBUTES};
use crate::record::Record;

/// One record as an operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordView {
    /// The record's sequence number: its id for `retry-dead` and `purge-dead`.
    pub id: u64,
    /// The record's kind (`Kind::name`: "membership", "attribute", "event", "purchase"), or
    /// "undecodable" for bytes that no longer read back.
    pub kind: String,
    pub user: String,
    /// `AIQ_1042_1 = true` for a membership, `name = value` for an attribute, the event's name
    /// and time for an event, a relayed object's JSON.
    pub what: String,
    pub accepted_at_ms: u64,
    pub age_ms: u64,
    /// Delivery attempts: counted since the daemon started for pending records, and up to
    /// the refusal for dead ones.
    pub attempts: u32,
    /// Whether a worker is sending it right now.
    #[serde(default)]
    pub in_flight: bool,
    /// Braze's reason, for dead records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at_ms: Option<u64>,
    /// The Braze object this record is sent as (an event with its properties), filled in by
    /// the caller that knows the `_update_existing_only` policy (`delivery::with_objects`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
    /// The record itself, for rendering `object`; not part of the listing.
    #[serde(skip)]
    pub record: Option<Record>,
}

/// Which dead records an operator means.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    All,
    Ids(Vec<u64>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetryReport {
    /// Back in the queue, behind everything already pending.
    pub retried: Vec<u64>,
    /// Dropped: a newer update of the same user and attribute was accepted since, and
    /// sending this one would overwrite it.
    pub superseded: Vec<u64>,
    /// Asked for but not in the dead letters.
    pub missing: Vec<u64>,
    /// Dead entries whose bytes no longer decode: left where they are.
    pub undecodable: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeReport {
    pub purged: Vec<u64>,
    pub missing: Vec<u64>,
}

fn view(id: u64, stored: &Stored, attempts: u32) -> RecordView {
    let what = match &stored.record {
        Record::Membership(m) => format!("{} = {}", m.attribute(), m.member),
        Record::Event(e) => match e.fields() {
            Some(f) => format!("{} at {}", f.name, f.time),
            None => e.members.clone(),
        },
        Record::Attribute(a) if a.is_profile_only() => "(the profile alone)".to_string(),
        Record::Attribute(a) => format!("{} = {}", a.name, a.value),
        Record::Tracked(t) => t.json.clone(),
    };
    RecordView {
        id,
        kind: stored.record.kind().name().to_string(),
        user: stored.record.user().to_string(),
        what,
        accepted_at_ms: stored.accepted_at_ms,
        age_ms: now_ms().saturating_sub(stored.accepted_at_ms),
        attempts,
        in_flight: false,
        reason: None,
        dead_at_ms: None,
        object: None,
        record: Some(stored.record.clone()),
    }
}

fn undecodable_view(id: u64, why: String) -> RecordView {
    RecordView {
        id,
        kind: "undecodable".into(),
        user: String::new(),
        what: why,
        accepted_at_ms: 0,
        age_ms: 0,
        attempts: 0,
        in_flight: false,
        reason: None,
        dead_at_ms: None,
        object: None,
        record: None,
    }
}

/// A pending record: its seq and its stored bytes, or why they cannot be read.
type PendingItem = (u64, Result<Vec<u8>, String>);

/// A dead-letter entry: its id and its stored bytes.
type DeadEntry = (u64, sled::IVec);

impl Queue {
    /// The oldest `limit` pending records of both lanes, in acceptance order.
    pub fn peek(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let leases = self.leases.lock().expect("queue lease lock poisoned");
        let events = log_records(
            &mut self.log.lock().expect("event log lock poisoned"),
            limit,
        );
        let mut events = events.into_iter().map(Ok).peekable();
        let mut attributes = lane_records(&store.tree, LANE_ATTRIBUTES)
            .map(|item| item.map(|(seq, v)| (seq, Ok(v))))
            .peekable();
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.len() < limit {
            // Take whichever lane's next record was accepted first.
            let head = |r: Option<&Result<PendingItem, QueueError>>| {
                r.and_then(|r| r.as_ref().ok()).map(|(seq, _)| *seq)
            };
            let item = match (head(events.peek()), head(attributes.peek())) {
                (None, None) if attributes.peek().is_none() => break,
                (Some(a), Some(b)) if b < a => attributes.next(),
                (Some(_), _) => events.next(),
                (None, _) => attributes.next(),
            };
            let Some(item) = item else {
                break;
            };
            let (id, value) = item?;
            let mut v = match value.map(|v| decode(&v).map_err(|e| e.to_string())) {
                Ok(Ok(stored)) => view(id, &stored, leases.attempts.get(&id).copied().unwrap_or(0)),
                Ok(Err(why)) | Err(why) => undecodable_view(id, why),
            };
            v.in_flight = leases.seqs.contains(&id);
            out.push(v);
        }
        Ok(out)
    }

    /// The oldest `limit` dead-lettered records, with Braze's reasons.
    pub fn dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        self.dead_in_order(limit, false)
    }

    /// The newest `limit` dead letters (by acceptance), newest first.
    pub fn latest_dead(&self, limit: usize) -> Result<Vec<RecordView>, QueueError> {
        self.dead_in_order(limit, true)
    }

    fn dead_in_order(
        &self,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<RecordView>, QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let mut out = Vec::new();
        let scan = store.tree.scan_prefix([DEAD]);
        let items: Box<dyn Iterator<Item = _>> = if newest_first {
            Box::new(scan.rev())
        } else {
            Box::new(scan)
        };
        for item in items.take(limit) {
            let (key, value) = item?;
            let id = seq_of(&key).unwrap_or(0);
            let v = match decode_dead(&value) {
                Ok(dead) => {
                    let mut v = match decode(&dead.stored) {
                        Ok(stored) => view(id, &stored, dead.attempts),
                        Err(e) => undecodable_view(id, e.to_string()),
                    };
                    v.attempts = dead.attempts;
                    v.reason = Some(dead.reason);
                    v.dead_at_ms = Some(dead.dead_at_ms);
                    v
                }
                Err(e) => undecodable_view(id, e.to_string()),
            };
            out.push(v);
        }
        Ok(out)
    }

    fn dead_entries(
        &self,
        tree: &sled::Tree,
        selection: &Selection,
    ) -> Result<(Vec<DeadEntry>, Vec<u64>), QueueError> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        match selection {
            Selection::All => {
                for item in tree.scan_prefix([DEAD]) {
                    let (k, v) = item?;
                    found.push((seq_of(&k).unwrap_or(0), v));
                }
            }
            Selection::Ids(ids) => {
                let mut ids = ids.clone();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    match tree.get(dead_key(id))? {
                        Some(v) => found.push((id, v)),
                        None => missing.push(id),
                    }
                }
            }
        }
        Ok((found, missing))
    }

    /// Puts dead records back in the queue, oldest first, each behind everything pending,
    /// except updates that a newer accepted update of the same user and attribute
    /// supersedes. Durable when it returns.
    pub async fn retry_dead(&self, selection: &Selection) -> Result<RetryReport, QueueError> {
        let report = self.stage_retry(selection)?;
        self.commit_all().await?;
        self.work.notify_waiters();
        Ok(report)
    }

    fn stage_retry(&self, selection: &Selection) -> Result<RetryReport, QueueError> {
        let store = self.read_store()?;
        let mut next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let (entries, missing) = self.dead_entries(&store.tree, selection)?;
        let mut report = RetryReport {
            missing,
            ..RetryReport::default()
        };
        let mut staging = Staging::new(self, &store.tree, &mut next_seq);
        for (id, value) in entries {
            // A whole event chunk in a dead letter (as releases that could not read chunks set
            // them aside): its events are retried one by one.
            if let Some(events) = dead_chunk(&value) {
                staging.remove_dead(id);
                for (record, envelope) in events {
                    staging.add(&record, envelope)?;
                }
                report.retried.push(id);
                continue;
            }
            let Ok((dead, stored)) =
                decode_dead(&value).and_then(|d| decode(&d.stored).map(|s| (d, s)))
            else {
                report.undecodable.push(id);
                continue;
            };
            staging.remove_dead(id);
            let Some(attribute) = stored.record.attribute_name() else {
                staging.add(&stored.record, dead.stored)?;
                report.retried.push(id);
                continue;
            };
            // Updates are compared by when they were first accepted (their rank), not by
            // seq: a retry takes a new seq, newer than anything accepted after the update it
            // repeats, and keeps its rank (`format::with_origin`) through later retries.
            let rank = stored.rank(id);
            // Only a plain value can be superseded; an operation (`add`, `remove`, ...)
            // still means something after newer updates, so it is retried at the back of
            // the lane.
            if stored.record.plain_value().is_some() {
                let lk = latest_key(stored.record.user(), &attribute);
                // Pending (this call's retries included: the index ranks them), or gone
                // from the queue: delivered or dead.
                let pending = staging.pending(&lk)?.map(|p| p.rank);
                let newest = pending.max(self.state.settled_seq(&lk)?);
                if newest.is_some_and(|n| n > rank) {
                    report.superseded.push(id);
                    continue;
                }
            }
            if staging.add_ranked(&stored.record, dead.stored, Some(rank))? {
                report.retried.push(id);
            } else {
                // Braze already holds this value: nothing to send.
                report.superseded.push(id);
            }
        }
        staging.apply()?;
        Ok(report)
    }

    /// Deletes dead records for good.
    pub async fn purge_dead(&self, selection: &Selection) -> Result<PurgeReport, QueueError> {
        let report = {
            let store = self.read_store()?;
            let _writer = self.writer.lock().expect("queue writer lock poisoned");
            let (entries, missing) = self.dead_entries(&store.tree, selection)?;
            let mut batch = sled::Batch::default();
            for (id, _) in &entries {
                batch.remove(&dead_key(*id));
            }
            let change = super::CountChange {
                dead: -(entries.len() as i64),
                ..Default::default()
            };
            self.counters.stage(&mut batch, change);
            store.tree.apply_batch(batch)?;
            self.counters.apply(change);
            let purged: Vec<u64> = entries.into_iter().map(|(id, _)| id).collect();
            PurgeReport { purged, missing }
        };
        self.commit_all().await?;
        Ok(report)
    }
}
