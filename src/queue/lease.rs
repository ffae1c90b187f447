//! Leasing: the oldest pending records that fit one Braze request, events first, never two
//! updates of one attribute at once, and an event's user's earlier updates carried with it.
//! A lease only marks records in memory: it never writes them, except to move a value that
//! no longer decodes to the dead letters (`quarantine`).

use super::*;

impl Queue {
    /// Leases the oldest pending records that fit in one Braze request: events first (they are
    /// real time), then attribute updates (memberships included), skipping any attribute whose
    /// earlier update is in flight. Reads lazily from sled; never loads the whole queue.
    pub fn lease(&self, limits: &BatchLimits) -> Result<Vec<Leased>, QueueError> {
        self.lease_lanes(limits, true)
    }

    /// As `lease`, but with `memberships: false` only events are taken: delivery keeps a
    /// worker for events this way, so a backfill never makes an event wait behind it.
    pub fn lease_lanes(
        &self,
        limits: &BatchLimits,
        memberships: bool,
    ) -> Result<Vec<Leased>, QueueError> {
        let store = self.read_store()?;
        let mut leases = self.leases.lock().expect("queue lease lock poisoned");
        let mut out = Vec::with_capacity(limits.max_objects);
        let mut undecodable = Vec::new();
        let mut bytes = 0usize;

        let max_events = limits.max_objects;
        let mut events = 0usize;
        // Braze objects for attribute updates in this request (carried ones first), keyed as
        // the request builder groups them; see the attribute lane below.
        let mut users: HashSet<(UserId, bool, String)> = HashSet::new();
        // Users whose events wait for a later lease: an earlier update of theirs could not be
        // carried in this one.
        let mut held: HashSet<UserId> = HashSet::new();
        // Objects counted against the limit besides events (none on per-array accounts).
        let others = |users: &HashSet<(UserId, bool, String)>| {
            if limits.per_array {
                0
            } else {
                users.len()
            }
        };
        let mut log = self.log.lock().expect("event log lock poisoned");
        let mut cursor = 0u64;
        'chunks: while events + others(&users) < max_events {
            // Chunks whose every remaining event is out with a worker are passed without a read.
            let Some(first) = log
                .chunks_from(cursor)
                .find(|(_, c)| !c.all_out())
                .map(|(f, _)| *f)
            else {
                break;
            };
            cursor = first + 1;
            let payload = match log.read(first) {
                Ok(payload) => payload,
                Err((why, bytes)) => {
                    undecodable.push(Undecodable {
                        lane: Lane::Events,
                        key_seq: first,
                        entry: None,
                        value: bytes,
                        why,
                    });
                    continue;
                }
            };
            let entries = match format::event_entries(first, &payload) {
                Ok(entries) => entries,
                Err(e) => {
                    undecodable.push(Undecodable {
                        lane: Lane::Events,
                        key_seq: first,
                        entry: None,
                        value: payload.to_vec(),
                        why: e.to_string(),
                    });
                    continue;
                }
            };
            let chunk = log.chunk_mut(first).expect("indexed above");
            for (seq, envelope) in entries {
                if events + others(&users) >= max_events {
                    break 'chunks;
                }
                if leases.seqs.contains(&seq) || chunk.gone.contains(&seq) {
                    continue;
                }
                let stored = match decode(envelope) {
                    Ok(stored) => stored,
                    Err(e) => {
                        undecodable.push(Undecodable {
                            lane: Lane::Events,
                            key_seq: first,
                            entry: Some(seq),
                            value: envelope.to_vec(),
                            why: e.to_string(),
                        });
                        continue;
                    }
                };
                // Braze applies a request's attributes before its events
                // (https://www.braze.com/docs/api/api_limits), and clients rely on
                // "set the attribute, then fire the trigger": an event goes only with, or
                // after, every update of its user accepted before it. Those still pending are
                // carried in this request; if one cannot be, the user's events wait.
                let user = stored.record.user();
                if held.contains(user) {
                    continue;
                }
                let carried = self.carry_earlier(
                    &store,
                    &mut leases,
                    user,
                    seq,
                    (limits, events, &mut bytes),
                    &mut users,
                    &mut out,
                )?;
                if !carried || events + 1 + others(&users) > max_events {
                    // What was carried goes now; the event follows in a later request.
                    held.insert(user.clone());
                    continue;
                }
                let size = envelope.len() + 96;
                if bytes + size > limits.max_bytes && !out.is_empty() {
                    break 'chunks;
                }
                bytes += size;
                events += 1;
                chunk.leased += 1;
                leases.seqs.insert(seq);
                out.push(Leased {
                    seq,
                    lane: Lane::Events,
                    key_seq: first,
                    attempts: leases.attempts.get(&seq).copied().unwrap_or(0),
                    stored,
                    raw: None,
                    latest: None,
                });
            }
        }
        drop(log);

        let max_user_objects = if limits.per_array {
            limits.max_objects
        } else {
            limits.max_objects - events
        };
        if memberships && max_user_objects > 0 && bytes < limits.max_bytes {
            let from = record_key(LANE_ATTRIBUTES, leases.attributes_from);
            let to = record_key(LANE_ATTRIBUTES, u64::MAX);
            // Until the scan passes a record it leaves for later, everything it has passed is
            // leased, and the next scan may start after it.
            let mut floor = Some(leases.attributes_from);
            for item in store.tree.range(from..=to) {
                let leased = match &item {
                    Ok((key, _)) => seq_of(key).filter(|s| leases.seqs.contains(s)),
                    Err(_) => None,
                };
                if let Some(seq) = leased {
                    floor = floor.map(|_| seq + 1);
                    continue;
                }
                let Some((seq, value, stored)) = candidate(item, &leases, &mut undecodable)? else {
                    floor = None;
                    continue;
                };
                // Taken below, or left for a later lease.
                let passed = floor.take();
                let Some(attribute) = stored.record.attribute_name() else {
                    undecodable.push(Undecodable {
                        lane: Lane::Attributes,
                        key_seq: seq,
                        entry: None,
                        value: value.to_vec(),
                        why: "a log entry in the attribute lane".to_string(),
                    });
                    continue;
                };
                let user = stored.record.user();
                let lk = latest_key(user, &attribute);
                if leases.attributes.contains(&lk) {
                    continue;
                }
                // Updates of one user travel as one Braze object only when their
                // object-level fields agree; each distinct set is its own object. A
                // membership's and a `/v1` attribute's fields are set at send time by
                // separate policies, so the two kinds are counted apart: never fewer objects
                // than the request will hold, whatever the policies.
                let object = (
                    user.clone(),
                    matches!(stored.record, Record::Membership(_)),
                    stored.record.object_fields().to_string(),
                );
                let new_user = !users.contains(&object);
                let size = value.len()
                    + if new_user {
                        64 + user.value().len() + object.2.len()
                    } else {
                        16
                    };
                if new_user && users.len() >= max_user_objects
                    || bytes + size > limits.max_bytes && !out.is_empty()
                {
                    floor = passed;
                    break;
                }
                bytes += size;
                if new_user {
                    users.insert(object);
                }
                floor = passed.map(|_| seq + 1);
                lease_attribute(&mut leases, &mut out, seq, stored, value.to_vec(), lk);
            }
            if let Some(floor) = floor {
                leases.attributes_from = floor;
            }
        }
        drop(leases);
        drop(store);
        if !undecodable.is_empty() {
            self.quarantine(undecodable)?;
        }
        Ok(out)
    }

    /// Leases into `out` the pending attribute updates of `user` accepted before `event_seq`
    /// that this request does not hold yet: the oldest pending update of each attribute, as
    /// long as none of the attribute's updates is in flight elsewhere and the request has room
    /// for it (`limits`, with `events` events in it). Returns whether every such update is now
    /// in the request, so the event may follow it there if it fits too. An update taken when
    /// the event then does not fit still goes: the event's next lease finds one update less.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn carry_earlier(
        &self,
        store: &Store,
        leases: &mut Leases,
        user: &UserId,
        event_seq: u64,
        (limits, events, bytes): (&BatchLimits, usize, &mut usize),
        users: &mut HashSet<(UserId, bool, String)>,
        out: &mut Vec<Leased>,
    ) -> Result<bool, QueueError> {
        let prefix = format::user_pending_prefix(user);
        if !self.pending_users.maybe(&prefix) {
            return Ok(true);
        }
        let mut end = prefix.clone();
        end.extend_from_slice(&event_seq.to_be_bytes());
        for item in store.tree.range(prefix.as_slice()..end.as_slice()) {
            let (key, _) = item?;
            let Some(seq) = key
                .len()
                .checked_sub(8)
                .and_then(|at| key[at..].try_into().ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if out
                .iter()
                .any(|l| l.lane == Lane::Attributes && l.seq == seq)
            {
                continue; // carried already, for an earlier event of this user
            }
            if leases.seqs.contains(&seq) {
                return Ok(false); // in flight in another request: wait for its answer
            }
            let Some(value) = store.tree.get(record_key(LANE_ATTRIBUTES, seq))? else {
                continue; // its record left the queue (set aside as undecodable)
            };
            let Ok(stored) = decode(&value) else {
                return Ok(false); // the attribute lane's scan sets it aside
            };
            let Some(attribute) = stored.record.attribute_name() else {
                return Ok(false);
            };
            let lk = latest_key(user, &attribute);
            if leases.attributes.contains(&lk) {
                // An older update of this attribute is in flight, or carried here already:
                // this one goes in a later request, and so does the event.
                return Ok(false);
            }
            let object = (
                user.clone(),
                matches!(stored.record, Record::Membership(_)),
                stored.record.object_fields().to_string(),
            );
            let new_object = !users.contains(&object);
            let objects = users.len() + usize::from(new_object);
            let fits = if limits.per_array {
                objects <= limits.max_objects
            } else {
                events + objects <= limits.max_objects
            };
            // (`events` excludes the event being leased: an update may go without it.)
            let size = value.len() + 64 + user.value().len();
            if !fits || *bytes + size > limits.max_bytes {
                return Ok(false);
            }
            *bytes += size;
            users.insert(object);
            lease_attribute(leases, out, seq, stored, value.to_vec(), lk);
        }
        Ok(true)
    }

    /// Moves stored values that no longer decode to the dead letters, loudly, so that one bad
    /// value cannot wedge the queue.
    pub(super) fn quarantine(&self, items: Vec<Undecodable>) -> Result<(), QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let mut batch = sled::Batch::default();
        let mut change = CountChange::default();
        let mut seen = HashSet::new();
        let mut log = self.log.lock().expect("event log lock poisoned");
        for item in items {
            // Two leases may have found the same bad value; move it (and count it) once.
            if !seen.insert((item.lane, item.key_seq, item.entry)) {
                continue;
            }
            let moved = match (item.lane, item.entry) {
                (Lane::Events, Some(seq)) => log.mark_gone(item.key_seq, &[seq]).len() as i64,
                (Lane::Events, None) => log.drop_chunk(item.key_seq) as i64,
                (_, _) => {
                    let key = record_key(item.lane.key_prefix(), item.key_seq);
                    if store.tree.get(key)?.is_none() {
                        continue;
                    }
                    batch.remove(&key);
                    change.attributes -= 1;
                    0
                }
            };
            if item.lane == Lane::Events {
                if moved == 0 {
                    continue;
                }
                change.events -= moved;
            }
            let seq = item.entry.unwrap_or(item.key_seq);
            tracing::error!(seq, error = %item.why, "a stored record no longer decodes; moved to the dead letters");
            let entry = Dead {
                dead_at_ms: now_ms(),
                attempts: 0,
                reason: format!("undecodable stored record: {}", item.why),
                stored: item.value,
            };
            batch.insert(&format::dead_key(seq), encode_dead(&entry));
            change.dead += 1;
        }
        if let Some(gone) = log.gone_value(*next_seq) {
            batch.insert(format::META_EVENTS_GONE, gone);
        }
        drop(log);
        self.counters.stage(&mut batch, change);
        store.tree.apply_batch(batch)?;
        self.counters.apply(change);
        Ok(())
    }
}

/// A stored value that could not be read back, and where it is.
pub(super) struct Undecodable {
    pub(super) lane: Lane,
    /// The sequence number in its key.
    pub(super) key_seq: u64,
    /// One event inside an event chunk; `None` for the whole value.
    pub(super) entry: Option<u64>,
    pub(super) value: Vec<u8>,
    pub(super) why: String,
}

/// One attribute-lane entry as a lease candidate: `None` if it is leased already or does not
/// decode (then it is set aside in `undecodable` for `quarantine`).
pub(super) fn candidate(
    item: sled::Result<(sled::IVec, sled::IVec)>,
    leases: &Leases,
    undecodable: &mut Vec<Undecodable>,
) -> Result<Option<(u64, sled::IVec, Stored)>, QueueError> {
    let (key, value) = item?;
    let Some(seq) = seq_of(&key).filter(|s| !leases.seqs.contains(s)) else {
        return Ok(None);
    };
    match decode(&value) {
        Ok(stored) => Ok(Some((seq, value, stored))),
        Err(e) => {
            undecodable.push(Undecodable {
                lane: Lane::Attributes,
                key_seq: seq,
                entry: None,
                value: value.to_vec(),
                why: e.to_string(),
            });
            Ok(None)
        }
    }
}

/// Marks an attribute-lane record leased (it and its attribute: no other update of the
/// attribute is leased until it completes) and adds it to `out`.
pub(super) fn lease_attribute(
    leases: &mut Leases,
    out: &mut Vec<Leased>,
    seq: u64,
    stored: Stored,
    raw: Vec<u8>,
    latest: Vec<u8>,
) {
    leases.seqs.insert(seq);
    leases.attributes.insert(latest.clone());
    out.push(Leased {
        seq,
        lane: Lane::Attributes,
        key_seq: seq,
        attempts: leases.attempts.get(&seq).copied().unwrap_or(0),
        stored,
        raw: Some(raw),
        latest: Some(latest),
    });
}
