//! `POST /users/track` as a Braze-compatible relay: every body form Braze takes reaches the
//! fake Braze unchanged in content, refusals are Braze-shaped, and per user and attribute the
//! order of accepted writes (array operations included) survives failures and retries.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fake_braze::Behaviour;
use serde_json::{json, Map, Value};

use crate::common::*;

const T: &str = "2026-11-28T10:00:00Z";

/// The user key the fake uses for an object (see `FakeBraze::attribute_value`).
fn user_of(object: &Value) -> String {
    if let Some(a) = object.get("user_alias") {
        return format!(
            "user_alias:{}:{}",
            a["alias_label"].as_str().unwrap(),
            a["alias_name"].as_str().unwrap()
        );
    }
    for key in ["external_id", "braze_id", "email", "phone"] {
        if let Some(v) = object.get(key).and_then(Value::as_str) {
            return format!("{key}:{v}");
        }
    }
    panic!("no identifier in {object}")
}

/// Every member of the attributes objects Braze received, per user, in arrival order.
fn received_attributes(fake: &fake_braze::FakeBraze) -> HashMap<String, Map<String, Value>> {
    let mut out: HashMap<String, Map<String, Value>> = HashMap::new();
    for object in fake.attributes() {
        let members = out.entry(user_of(&object)).or_default();
        for (k, v) in object.as_object().unwrap() {
            members.insert(k.clone(), v.clone());
        }
    }
    out
}

fn sorted(mut v: Vec<Value>) -> Vec<String> {
    let mut s: Vec<String> = v.drain(..).map(|x| x.to_string()).collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_form_braze_takes_reaches_braze_unchanged() {
    let env = Env::start().await;
    let alias = json!({"alias_name": "n-1", "alias_label": "crm"});
    let attributes = vec![
        json!({"external_id": "ext-1", "first_name": "Ada", "tier": "gold", "ltv": 12.5,
               "vip": true, "signup": "2024-05-01T10:00:00Z", "tags": ["a", "b"],
               "address": {"city": "Paris", "zip": "75001"}, "cleared": null}),
        json!({"user_alias": alias, "_update_existing_only": false, "score": 3}),
        json!({"braze_id": "b-1", "nickname": "bz"}),
        // No primary id: email identifies, and phone is an ordinary attribute.
        json!({"email": "only@example.com", "phone": "+15550100", "city": "Lyon"}),
        json!({"phone": "+15550101", "country": "FR"}),
        json!({"external_id": "ext-2", "_merge_objects": true, "prefs": {"lang": "fr"}}),
        json!({"external_id": "ext-3", "pets": {"add": ["cat"]}, "visits": {"inc": 2},
               "pets_gone": {"remove": ["dog"]}}),
    ];
    let events = vec![
        json!({"external_id": "ext-1", "app_id": "app-1", "name": "rode", "time": T,
               "properties": {"n": 1, "nested": {"a": [1, 2, {"b": "c"}]}}}),
        json!({"user_alias": alias, "name": "viewed", "time": "2013-07-16T19:20:30:000+0100"}),
        json!({"email": "only@example.com", "name": "opened", "time": "2026-11-28T12:00:00.123+02:00"}),
    ];
    let purchases = vec![
        json!({"external_id": "ext-1", "product_id": "sku-9", "currency": "EUR", "price": 19.99,
               "quantity": 2, "time": T, "properties": {"color": "red"}}),
        json!({"braze_id": "b-1", "product_id": "p", "currency": "USD", "price": 0, "time": T}),
    ];
    let body = json!({"attributes": attributes, "events": events, "purchases": purchases});
    let (status, answer) = env.post("/users/track", body.to_string()).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        answer,
        json!({"message": "success", "attributes_processed": 7, "events_processed": 3,
               "purchases_processed": 2})
    );

    let fake = env.fake.clone();
    let users = attributes.len();
    let members: usize = attributes
        .iter()
        .map(|a| a.as_object().unwrap().len())
        .sum();
    let arrived = wait_until(Duration::from_secs(20), || {
        fake.events().len() == 3 && fake.purchases().len() == 2 && {
            let got = received_attributes(&fake);
            got.len() == users && got.values().map(Map::len).sum::<usize>() == members
        }
    })
    .await;
    assert!(
        arrived,
        "not everything arrived: {:?} {:?} {:?}",
        fake.attributes(),
        fake.events(),
        fake.purchases()
    );
    assert_eq!(sorted(fake.events()), sorted(events));
    assert_eq!(sorted(fake.purchases()), sorted(purchases));
    let got = received_attributes(&fake);
    for sent in &attributes {
        let user = user_of(sent);
        assert_eq!(
            Value::Object(got[&user].clone()),
            *sent,
            "attributes of {user} changed on the way"
        );
    }
    // The fake applied the operations as Braze would.
    assert_eq!(
        fake.attribute_value("external_id:ext-3", "pets"),
        Some(json!(["cat"]))
    );
    assert_eq!(
        fake.attribute_value("external_id:ext-3", "visits"),
        Some(json!(2.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_braze_would_refuse_are_listed_and_the_others_delivered() {
    let env = Env::start().await;
    let body = json!({
        "attributes": [
            {"external_id": "good-1", "tier": "gold"},
            {"tier": "no identifier"},
            {"external_id": "x", "braze_id": "y", "tier": "two primaries"},
            {"external_id": "good-2", "$set": 1},
            {"external_id": "good-3", "email": "not-an-email"},
            {"external_id": "x".repeat(988), "tier": "long id"},
        ],
        "events": [
            {"external_id": "good-1", "name": "ok", "time": T},
            {"external_id": "good-1", "name": "bad time", "time": "tomorrow"},
            {"external_id": "good-1", "name": "reserved", "time": T, "properties": {"time": 1}},
        ],
        "purchases": [
            {"external_id": "good-1", "product_id": "p", "currency": "EURO", "price": 1, "time": T},
        ],
    });
    let (status, answer) = env.post("/users/track", body.to_string()).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["message"], "success");
    assert_eq!(
        (
            &answer["attributes_processed"],
            &answer["events_processed"],
            &answer["purchases_processed"]
        ),
        (&json!(1), &json!(1), &json!(0))
    );
    let places: Vec<(String, u64)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["type"].as_str().is_some_and(|t| !t.is_empty()), "{e}");
            (
                e["input_array"].as_str().unwrap().to_string(),
                e["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect: Vec<(String, u64)> = [
        ("attributes", 1),
        ("attributes", 2),
        ("attributes", 3),
        ("attributes", 4),
        ("attributes", 5),
        ("events", 1),
        ("events", 2),
        ("purchases", 0),
    ]
    .iter()
    .map(|(a, i)| (a.to_string(), *i))
    .collect();
    assert_eq!(places, expect);
    assert!(answer["errors"][4]["type"]
        .as_str()
        .unwrap()
        .contains("EXTERNAL_USER_ID_TOO_LARGE"));

    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || fake.events().len() == 1
            && !fake.attributes().is_empty())
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.attributes(),
        vec![json!({"external_id": "good-1", "tier": "gold"})]
    );
    assert_eq!(fake.events()[0]["name"], "ok");
    assert!(fake.purchases().is_empty());
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["dead"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_braze_would_refuse_whole_is_a_braze_shaped_400_and_queues_nothing() {
    let env = Env::start().await;
    for (body, message) in [
        ("{\"attributes\": [", "Invalid JSON"),
        ("[]", "Invalid JSON"),
        (r#"{"events": {"name": "x"}}"#, "'events' must be an array"),
        ("{}", "Valid data must be provided"),
        (
            r#"{"attributes": [], "events": [{"name": "no user", "time": "2026-01-01T00:00:00Z"}]}"#,
            "Valid data must be provided",
        ),
    ] {
        let (status, answer) = env.post("/users/track", body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(message),
            "{body} -> {answer}"
        );
        assert!(answer["errors"].is_array(), "{answer}");
    }
    let (status, answer) = env
        .post(
            "/users/track",
            r#"{"events": [{"name": "no user", "time": "2026-01-01T00:00:00Z"}]}"#,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(answer["errors"][0]["input_array"], "events");
    assert_eq!(answer["errors"][0]["index"], 0);

    // A Braze client with the wrong key gets Braze's 401 shape.
    let r = env
        .client
        .post(format!("{}/users/track", env.base))
        .bearer_auth("wrong")
        .body(r#"{"attributes":[{"external_id":"u","a":1}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["message"], "Invalid API key");

    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 0, "{stats}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.fake.requests().is_empty());
}

/// The model of one attribute: what Braze should hold after these writes, applied in order.
fn model(writes: &[Value]) -> Option<Value> {
    let mut held: Option<Value> = None;
    for w in writes {
        held = match (held, w) {
            (held, Value::Object(op)) if op.contains_key("add") || op.contains_key("remove") => {
                let mut items = match held {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                };
                for x in op
                    .get("add")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if !items.contains(x) {
                        items.push(x.clone());
                    }
                }
                if let Some(gone) = op.get("remove").and_then(Value::as_array) {
                    items.retain(|i| !gone.contains(i));
                }
                Some(Value::Array(items))
            }
            (_, Value::Null) => None,
            (_, v) => Some(v.clone()),
        };
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_operations_and_values_keep_their_order_through_failures() {
    let env = Env::start_with(|c| c.delivery.workers = 4).await;
    let mut tags_writes = Vec::new();
    let mut level_last = Value::Null;
    let started = Instant::now();
    for i in 0..60u64 {
        // Operations on `tags` are never coalesced: each must land, in order.
        let tags = match i % 5 {
            0 | 1 | 3 => json!({"add": [format!("t{i}")]}),
            2 => json!({"remove": [format!("t{}", i - 1)]}),
            _ => json!([format!("reset{i}")]),
        };
        tags_writes.push(tags.clone());
        // A plain value whose object fields flip: never merged across the flip, still ordered.
        level_last = json!(i);
        let body = json!({"attributes": [
            {"external_id": "u-order", "tags": tags},
            {"external_id": "u-order", "_update_existing_only": i % 2 == 0, "level": i},
        ]});
        let (status, answer) = env.post("/users/track", body.to_string()).await;
        assert_eq!(status, 201, "{answer}");
        if i % 10 == 4 {
            // An outage mid-stream: everything in flight is retried.
            env.fake.set_behaviour(Behaviour::FailStatus {
                status: 503,
                until: Instant::now() + Duration::from_millis(150),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expected_tags = model(&tags_writes);
    let fake = env.fake.clone();
    let done = wait_until(Duration::from_secs(30), || {
        fake.attribute_value("external_id:u-order", "level") == Some(level_last.clone())
            && fake.attribute_value("external_id:u-order", "tags") == expected_tags
    })
    .await;
    assert!(
        done,
        "after {:?}: tags {:?} (expected {:?}), level {:?}",
        started.elapsed(),
        fake.attribute_value("external_id:u-order", "tags"),
        expected_tags,
        fake.attribute_value("external_id:u-order", "level")
    );
    // What arrived is what was sent, in order, each once; a write is missing only where a
    // later plain value replaced it before it left (coalescing: same final value, fewer
    // data points).
    let arrived: Vec<Value> = fake
        .attributes()
        .iter()
        .filter_map(|o| o.get("tags").cloned())
        .collect();
    let mut next = 0;
    for (i, write) in tags_writes.iter().enumerate() {
        if arrived.get(next) == Some(write) {
            next += 1;
        } else {
            let replaced = tags_writes[i + 1..].iter().any(|w| !w.is_object());
            assert!(replaced, "write {i} {write} was lost: arrived {arrived:?}");
        }
    }
    assert_eq!(next, arrived.len(), "arrived out of order: {arrived:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_value_braze_already_has_is_not_sent_again() {
    let env = Env::start().await;
    let body = json!({"attributes": [{"external_id": "same", "tier": "gold", "n": 1}]});
    let (status, _) = env.post("/users/track", body.to_string()).await;
    assert_eq!(status, 201);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake.attributes().len() == 1).await);
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    let (status, answer) = env.post("/users/track", body.to_string()).await;
    assert_eq!(status, 201);
    assert_eq!(answer["attributes_processed"], 1);
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["skipped_unchanged_total"], 2, "{stats}");
    assert_eq!(stats["queue"]["pending"], 0, "{stats}");
    // An operation is never skipped: it changes what Braze holds each time.
    let op = json!({"attributes": [{"external_id": "same", "visits": {"inc": 1}}]});
    for _ in 0..2 {
        assert_eq!(env.post("/users/track", op.to_string()).await.0, 201);
    }
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:same", "visits")
            == Some(json!(2.0)))
        .await
    );
    assert_eq!(fake.attributes().len(), 3);
}

/// An attributes object with only an identifier makes Braze create the profile: it is sent
/// as it is, every time, and not taken for an empty update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attributes_object_with_only_an_identifier_reaches_braze() {
    let env = Env::start().await;
    let body = json!({"attributes": [
        {"external_id": "only-id"},
        {"user_alias": {"alias_name": "a-1", "alias_label": "crm"}, "_update_existing_only": false},
    ]});
    for _ in 0..2 {
        let (status, answer) = env.post("/users/track", body.to_string()).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["attributes_processed"], 2, "{answer}");
    }
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake.attributes().len() == 4).await);
    let mut objects = sorted(fake.attributes());
    objects.dedup();
    assert_eq!(
        objects,
        [
            r#"{"_update_existing_only":false,"user_alias":{"alias_label":"crm","alias_name":"a-1"}}"#,
            r#"{"external_id":"only-id"}"#,
        ]
    );
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    assert_eq!(stats["queue"]["skipped_unchanged_total"], 0, "{stats}");
}

/// Braze accepts an attributes object with a custom string over 255 characters, leaves that
/// attribute as it was and applies the others; the relay is no stricter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_character_string_leaves_its_attribute_unchanged_and_its_siblings_apply() {
    let env = Env::start().await;
    let first = json!({"attributes": [{"external_id": "u1", "bio": "short", "tier": "bronze"}]});
    let (status, answer) = env.post("/users/track", first.to_string()).await;
    assert_eq!(status, 201, "{answer}");
    let fake = env.fake.clone();
    let bio = |f: &fake_braze::FakeBraze| f.attribute_value("external_id:u1", "bio");
    assert!(wait_until(Duration::from_secs(10), || bio(&fake).is_some()).await);

    let long = "x".repeat(300);
    let second = json!({"attributes": [{"external_id": "u1", "bio": long, "tier": "gold"}]});
    let (status, answer) = env.post("/users/track", second.to_string()).await;
    assert_eq!(
        (
            status,
            &answer["attributes_processed"],
            answer.get("errors")
        ),
        (201, &json!(1), None),
        "{answer}"
    );
    let tier = |f: &fake_braze::FakeBraze| f.attribute_value("external_id:u1", "tier");
    assert!(
        wait_until(Duration::from_secs(10), || tier(&fake)
            == Some(json!("gold")))
        .await,
        "the sibling never arrived: {:?}",
        fake.attributes()
    );
    assert_eq!(bio(&fake), Some(json!("short")));
}

/// Braze applies `subscription_groups` item by item: two pending updates for different
/// groups of one user are not one value replacing the other, and both must reach Braze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pending_subscription_group_updates_of_one_user_both_reach_braze() {
    let env = Env::start().await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(1),
    });
    let group = |id: &str, state: &str| {
        json!({"attributes": [{"external_id": "sg", "subscription_groups": [
            {"subscription_group_id": id, "subscription_state": state}]}]})
    };
    for body in [
        group("news", "subscribed"),
        group("offers", "subscribed"),
        group("offers", "subscribed"),
    ] {
        let (status, answer) = env.post("/users/track", body.to_string()).await;
        assert_eq!(status, 201, "{answer}");
    }
    let fake = env.fake.clone();
    let groups =
        |f: &fake_braze::FakeBraze| f.attribute_value("external_id:sg", "subscription_groups");
    let both = json!([
        {"subscription_group_id": "news", "subscription_state": "subscribed"},
        {"subscription_group_id": "offers", "subscription_state": "subscribed"},
    ]);
    assert!(
        wait_until(Duration::from_secs(15), || groups(&fake)
            == Some(both.clone()))
        .await,
        "Braze holds {:?}; sent {:?}",
        groups(&fake),
        fake.attributes()
    );
    // Not a value: nothing was coalesced or skipped as unchanged.
    let (_, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert_eq!(stats["queue"]["skipped_unchanged_total"], 0, "{stats}");
    assert_eq!(stats["queue"]["coalesced_total"], 0, "{stats}");
    assert_eq!(fake.attributes().len(), 3);
}
