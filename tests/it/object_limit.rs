//! No request to Braze ever holds more objects than `max_objects_per_request`: what the queue
//! leases is counted the way the request builder writes it, for every mix of kinds,
//! `_update_existing_only` policies and relayed objects. A real queue in a temp dir, leased
//! and built as delivery does, until it is empty.

use std::collections::HashMap;

use aiq_braze_sync::braze::wire;
use aiq_braze_sync::config::UpdateExistingOnly;
use aiq_braze_sync::queue::{BatchLimits, Outcome, Queue, QueueSettings};
use aiq_braze_sync::record::{
    AttributeUpdate, Event, Membership, Record, TrackArray, TrackObject, UserId,
};
use proptest::prelude::*;

/// One record to queue: which kind, for which of a few users, about which attribute.
#[derive(Debug, Clone)]
enum Kind {
    Membership,
    /// `/v1/attributes`: its `_update_existing_only` comes from the policy.
    Attribute,
    /// Through the `/users/track` relay, with its own `_update_existing_only`.
    Relayed(bool),
    Event,
    RelayedEvent,
    RelayedPurchase,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Membership),
        Just(Kind::Attribute),
        any::<bool>().prop_map(Kind::Relayed),
        Just(Kind::Event),
        Just(Kind::RelayedEvent),
        Just(Kind::RelayedPurchase),
    ]
}

fn record(kind: &Kind, user: u8, attribute: u8, n: usize) -> Record {
    let id = UserId::External(format!("u{user}"));
    let external = format!("u{user}");
    match kind {
        Kind::Membership => Record::Membership(Membership {
            user: id,
            audience_id: format!("a{attribute}"),
            split_id: "1".into(),
            member: n.is_multiple_of(2),
            time: None,
        }),
        Kind::Attribute => Record::Attribute(AttributeUpdate {
            user: id,
            name: format!("attr{attribute}"),
            value: n.to_string(),
            object_fields: None,
        }),
        Kind::Relayed(only) => Record::Attribute(AttributeUpdate {
            user: id,
            name: format!("attr{attribute}"),
            value: n.to_string(),
            object_fields: Some(format!("{{\"_update_existing_only\":{only}}}")),
        }),
        Kind::Event => Record::Event(Event::new(
            id,
            "e",
            "2026-01-01T00:00:00Z",
            Some(&format!("{{\"n\":{n}}}")),
        )),
        Kind::RelayedEvent | Kind::RelayedPurchase => {
            let (array, json) = match kind {
                Kind::RelayedEvent => (
                    TrackArray::Events,
                    format!(
                        r#"{{"external_id":"{external}","name":"r","time":"2026-01-01T00:00:00Z","properties":{{"n":{n}}}}}"#
                    ),
                ),
                _ => (
                    TrackArray::Purchases,
                    format!(
                        r#"{{"external_id":"{external}","product_id":"p","currency":"EUR","price":{n},"time":"2026-01-01T00:00:00Z"}}"#
                    ),
                ),
            };
            Record::Tracked(TrackObject {
                array,
                user: id,
                json,
            })
        }
    }
}

fn settings() -> QueueSettings {
    QueueSettings {
        max_records: 1_000_000,
        max_disk_bytes: 1 << 40,
        cache_bytes: 4 << 20,
        compact_min_bytes: 1 << 30,
        min_free_bytes: 0,
        skip_unchanged_for: None,
        accept_loss: false,
    }
}

/// Queues `records`, then leases, builds and delivers as delivery does until nothing is
/// left; fails on the first body over the limit.
async fn drain(
    records: Vec<Record>,
    limits: BatchLimits,
    policy: UpdateExistingOnly,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), settings()).unwrap();
    let count = records.len();
    queue.enqueue(records).await.unwrap();
    let mut sent = 0;
    for _ in 0..=count {
        let leased = queue.lease_lanes(&limits, true).unwrap();
        if leased.is_empty() {
            break;
        }
        let body = wire::build(&leased, &policy);
        let arrays = [
            ("attributes", body.attributes.len()),
            ("events", body.events.len()),
            ("purchases", body.purchases.len()),
        ];
        if limits.per_array {
            for (array, n) in arrays {
                prop_assert!(
                    n <= limits.max_objects,
                    "{n} objects in {array}, over {} per array: {}",
                    limits.max_objects,
                    String::from_utf8_lossy(&body.json)
                );
            }
        } else {
            prop_assert!(
                body.objects() <= limits.max_objects,
                "{} objects, over {}: {}",
                body.objects(),
                limits.max_objects,
                String::from_utf8_lossy(&body.json)
            );
        }
        sent += leased.len();
        let done: Vec<_> = leased
            .into_iter()
            .map(|l| (l, Outcome::Delivered))
            .collect();
        queue.complete(done).unwrap();
    }
    prop_assert_eq!(
        queue.pending(),
        0,
        "the queue did not drain ({} sent)",
        sent
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_request_holds_more_objects_than_the_limit(
        ops in prop::collection::vec((kind(), 0u8..6, 0u8..3), 1..80),
        max_objects in 1usize..=8,
        per_array in any::<bool>(),
        (memberships, attributes, events) in (any::<bool>(), any::<bool>(), any::<bool>()),
    ) {
        // Unique attributes per (user, attribute, kind) keep plain values from all coalescing
        // into one record; a few still do, as in real traffic.
        let mut n: HashMap<(u8, u8), usize> = HashMap::new();
        let records: Vec<Record> = ops
            .iter()
            .map(|(k, user, attribute)| {
                let i = n.entry((*user, *attribute)).or_default();
                *i += 1;
                record(k, *user, *attribute, *i)
            })
            .collect();
        let limits = BatchLimits { max_objects, per_array, max_bytes: 3_500_000 };
        let policy = UpdateExistingOnly { memberships, attributes, events };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(drain(records, limits, policy))?;
    }
}

/// End to end against the fake, which refuses a request over its object limit whole: users
/// with a membership and a `/v1` attribute pending at once (two objects each: the policies
/// differ) are delivered with no request refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_and_attributes_of_the_same_users_never_make_a_request_over_the_limit() {
    use crate::common::*;
    use serde_json::json;
    use std::time::{Duration, Instant};
    let env = Env::start_with(|c| {
        c.braze.max_objects_per_request = 10;
        // The shipped defaults: memberships update-only, attributes not.
        c.update_existing_only = Default::default();
    })
    .await;
    env.fake.set_max_objects(10);
    env.fake.set_behaviour(fake_braze::Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(2),
    });
    let users: Vec<String> = (0..40).map(|i| format!("both-{i}")).collect();
    for user in &users {
        env.fake.create_profile(user);
    }
    // Each user's two updates one after the other, so they are leased together.
    for u in &users {
        let m = array(&[membership(u, "5", "1", true)]);
        assert_eq!(env.post("/v1/memberships", m).await.0, 202);
        let a = array(&[json!({"external_id": u, "attributes": {"tier": "gold"}})]);
        assert_eq!(env.post("/v1/attributes", a).await.0, 202);
    }
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(20), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    let refused: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.status == 400)
        .collect();
    assert!(refused.is_empty(), "requests over the limit: {refused:?}");
    assert_eq!(stats["queue"]["dead"], 0, "{stats}");
    assert_eq!(env.fake.attribute_state().len(), 80);
}
