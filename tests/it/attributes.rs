//! `/v1/attributes` and the identity rules: typed values reach Braze as the right JSON types,
//! bad names and values are refused with their place and nothing queued, a record with both
//! ids goes out with the configured one, `_update_existing_only` follows the per-kind policy,
//! unchanged values are skipped, and the last accepted value wins through failures.

use std::time::{Duration, Instant};

use aiq_braze_sync::config::{PreferId, UpdateExistingOnly};
use fake_braze::Behaviour;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_reach_braze_as_the_right_json_types() {
    let env = Env::start().await;
    let values = json!({
        "tier": "gold", "visits": 42, "ltv": 1234.5, "vip": true, "churned": false,
        "signup": "2024-05-01T10:00:00Z", "tags": ["a", "b"], "scores": [1, 2.5],
    });
    let body = format!(
        "{}\n{}\n",
        json!({"external_id": "t-1", "attributes": values}),
        json!({"braze_id": "b-7", "attributes": {"tier": "silver"}})
    );
    let (status, answer) = env.post("/v1/attributes", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 9);
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || fake.attribute_state().len()
            == 9)
        .await
    );
    for (name, value) in values.as_object().unwrap() {
        assert_eq!(
            fake.attribute_value("external_id:t-1", name).as_ref(),
            Some(value),
            "{name}"
        );
    }
    assert_eq!(
        fake.attribute_value("braze_id:b-7", "tier"),
        Some(json!("silver"))
    );
    // One object per user, with the attributes policy (default: may create the profile).
    let t1 = fake
        .attributes()
        .into_iter()
        .find(|o| o["external_id"] == "t-1")
        .unwrap();
    assert_eq!(t1["_update_existing_only"], false);
    assert_eq!(t1.as_object().unwrap().len(), 10);

    // null unsets.
    let (status, _) = env
        .post(
            "/v1/attributes",
            json!([{"external_id": "t-1", "attributes": {"tier": null}}]).to_string(),
        )
        .await;
    assert_eq!(status, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:t-1", "tier")
            .is_none())
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_name_or_value_is_refused_with_its_place_and_nothing_is_queued() {
    let env = Env::start().await;
    let good = json!({"external_id": "ok", "attributes": {"tier": "gold"}});
    let cases = [
        (
            json!({"external_id": "u", "attributes": {"$tier": 1}}),
            "attributes",
            "'$'",
        ),
        (
            json!({"external_id": "u", "attributes": {"bio": "x".repeat(256)}}),
            "attributes.bio",
            "256 characters",
        ),
        (
            json!({"external_id": "u", "attributes": {"tags": {"add": ["x"]}}}),
            "attributes.tags",
            "/users/track",
        ),
        (
            json!({"external_id": "x".repeat(988), "attributes": {"a": 1}}),
            "external_id",
            "987",
        ),
        (
            json!({"external_id": "", "attributes": {"a": 1}}),
            "external_id",
            "empty",
        ),
        (json!({"attributes": {"a": 1}}), "external_id", "required"),
    ];
    for (bad, field, says) in cases {
        let body = format!("{good}\n{bad}\n");
        let (status, answer) = env.post("/v1/attributes", body).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["field"], field, "{answer}");
        assert_eq!((&answer["index"], &answer["line"]), (&json!(1), &json!(2)));
        assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
        assert_eq!(answer["queued"], 0);
    }
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 0, "{stats}");
    assert_eq!(stats["queue"]["accepted_total"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_both_ids_is_sent_with_the_configured_one() {
    for (prefer, expect) in [
        (PreferId::External, "external_id:e-1"),
        (PreferId::Braze, "braze_id:b-1"),
    ] {
        let env = Env::start_with(|c| c.identity = prefer).await;
        let both = json!({"external_id": "e-1", "braze_id": "b-1"});
        let mut membership = membership("", "7", "1", true);
        membership
            .as_object_mut()
            .unwrap()
            .extend(both.as_object().unwrap().clone());
        let mut attribute = json!({"attributes": {"tier": "gold"}});
        attribute
            .as_object_mut()
            .unwrap()
            .extend(both.as_object().unwrap().clone());
        let mut ev = event(1);
        ev.as_object_mut()
            .unwrap()
            .extend(both.as_object().unwrap().clone());
        assert_eq!(
            env.post("/v1/memberships", array(&[membership])).await.0,
            202
        );
        assert_eq!(env.post("/v1/attributes", array(&[attribute])).await.0, 202);
        assert_eq!(env.post("/v1/events", array(&[ev])).await.0, 202);
        let fake = env.fake.clone();
        assert!(
            wait_until(Duration::from_secs(10), || fake
                .attribute_value(expect, "AIQ_7_1")
                .is_some()
                && fake.attribute_value(expect, "tier").is_some()
                && fake.events().len() == 1)
            .await,
            "{prefer:?}: {:?}",
            fake.attributes()
        );
        // Exactly one identifier on every object sent.
        for object in fake.attributes().iter().chain(&fake.events()) {
            let ids = ["external_id", "braze_id"]
                .iter()
                .filter(|k| object.get(**k).is_some())
                .count();
            assert_eq!(ids, 1, "{object}");
        }
    }
}

/// The shipped policy: memberships update only profiles Braze has, attributes and events may
/// create them. The fake, like Braze, applies nothing update-only to a user it has not seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_existing_only_follows_the_policy_for_each_kind() {
    let env = Env::start_with(|c| c.update_existing_only = UpdateExistingOnly::default()).await;
    // A membership for a user Braze has never seen creates no profile.
    let (status, _) = env
        .post(
            "/v1/memberships",
            array(&[membership("ghost", "9", "1", true)]),
        )
        .await;
    assert_eq!(status, 202);
    // An event and an attribute may create theirs; then a membership lands on it.
    let mut ev = event(5);
    ev["external_id"] = json!("known");
    assert_eq!(env.post("/v1/events", array(&[ev])).await.0, 202);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake.events().len() == 1).await);
    let attr = json!({"external_id": "known", "attributes": {"tier": "gold"}});
    assert_eq!(env.post("/v1/attributes", array(&[attr])).await.0, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:known", "tier")
            .is_some())
        .await
    );
    let (status, _) = env
        .post(
            "/v1/memberships",
            array(&[membership("known", "9", "1", true)]),
        )
        .await;
    assert_eq!(status, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:known", "AIQ_9_1")
            .is_some())
        .await
    );
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    assert_eq!(fake.attribute_value("external_id:ghost", "AIQ_9_1"), None);

    assert_eq!(fake.events()[0]["_update_existing_only"], false);
    let flags: Vec<(Value, Value)> = fake
        .attributes()
        .iter()
        .map(|o| {
            let what = if o.get("tier").is_some() {
                "tier"
            } else {
                "AIQ_9_1"
            };
            (json!(what), o["_update_existing_only"].clone())
        })
        .collect();
    assert_eq!(
        flags,
        vec![
            (json!("tier"), json!(false)),
            (json!("AIQ_9_1"), json!(true))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_attribute_values_are_skipped_and_counted() {
    let env = Env::start().await;
    let body = array(&[json!({"external_id": "s", "attributes": {"tier": "gold", "n": 1}})]);
    assert_eq!(env.post("/v1/attributes", body.clone()).await.0, 202);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake.attributes().len() == 1).await);
    let (drained, _) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained);
    assert_eq!(env.post("/v1/attributes", body).await.0, 202);
    let changed = array(&[json!({"external_id": "s", "attributes": {"tier": "gold", "n": 2}})]);
    assert_eq!(env.post("/v1/attributes", changed).await.0, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:s", "n")
            == Some(json!(2)))
        .await
    );
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["skipped_unchanged_total"], 3, "{stats}");
    // The second object carried only the value that changed.
    assert_eq!(
        fake.attributes()[1],
        json!({"external_id": "s", "_update_existing_only": false, "n": 2})
    );
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("aiq_braze_sync_records_skipped_unchanged_total{kind=\"attribute\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_accepted_value_wins_through_failures_and_retries() {
    let env = Env::start_with(|c| c.delivery.workers = 4).await;
    let mut last = 0;
    for i in 0..80u64 {
        let records: Vec<Value> = (0..5)
            .map(|u| json!({"external_id": format!("o-{u}"), "attributes": {"score": i, "tier": format!("t{}", i % 3)}}))
            .collect();
        assert_eq!(env.post("/v1/attributes", array(&records)).await.0, 202);
        last = i;
        if i % 20 == 7 {
            env.fake.set_behaviour(Behaviour::FailStatus {
                status: 500,
                until: Instant::now() + Duration::from_millis(100),
            });
        }
        if i % 20 == 15 {
            env.fake.set_behaviour(Behaviour::Hang {
                delay: Duration::from_millis(50),
                until: Instant::now() + Duration::from_millis(100),
            });
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let fake = env.fake.clone();
    let settled = wait_until(Duration::from_secs(30), || {
        (0..5).all(|u| {
            fake.attribute_value(&format!("external_id:o-{u}"), "score") == Some(json!(last))
                && fake.attribute_value(&format!("external_id:o-{u}"), "tier")
                    == Some(json!(format!("t{}", last % 3)))
        })
    })
    .await;
    assert!(settled, "{:?}", fake.attribute_state());
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    // Still the last value once everything in flight has landed.
    for u in 0..5 {
        assert_eq!(
            fake.attribute_value(&format!("external_id:o-{u}"), "score"),
            Some(json!(last))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_braze_refuses_go_to_the_dead_letters_and_the_rest_arrive() {
    let env = Env::start().await;
    env.fake.reject_ids(["blocked".to_string()]);
    let records = [
        json!({"external_id": "fine", "attributes": {"tier": "gold"}}),
        json!({"external_id": "blocked", "attributes": {"tier": "gold", "n": 1}}),
    ];
    assert_eq!(env.post("/v1/attributes", array(&records)).await.0, 202);
    let fake = env.fake.clone();
    let (dead, stats) =
        wait_for_stats(&env, Duration::from_secs(10), |s| s["queue"]["dead"] == 2).await;
    assert!(dead, "{stats}");
    assert_eq!(
        fake.attribute_value("external_id:fine", "tier"),
        Some(json!("gold"))
    );
    let letters = dead_letters(&env);
    assert_eq!(letters.len(), 2);
    for (user, reason) in letters {
        assert_eq!(user, "external_id:blocked");
        assert!(reason.contains("BLACKLISTED_EXTERNAL_USER_ID"), "{reason}");
    }
}

/// A 201 does not prove Braze holds a value: an update-only membership for a profile Braze
/// does not have yet changes nothing. Within `skip_unchanged_for_s` the same value is skipped;
/// past it, it is sent again, and once the profile exists, Braze holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_sent_longer_ago_than_skip_unchanged_for_is_sent_again() {
    let env = Env::start_with(|c| {
        c.update_existing_only.memberships = true;
        c.delivery.skip_unchanged_for = Some(Duration::from_secs(2));
    })
    .await;
    let body = array(&[membership("late", "7", "1", true)]);
    let fake = env.fake.clone();
    let sent = |f: &fake_braze::FakeBraze| f.requests().iter().filter(|r| r.status == 201).count();
    assert_eq!(env.post("/v1/memberships", body.clone()).await.0, 202);
    assert!(wait_until(Duration::from_secs(10), || sent(&fake) == 1).await);
    // Braze answered 201 and stored nothing: there is no profile yet.
    assert_eq!(fake.attribute_value("external_id:late", "AIQ_7_1"), None);
    wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;

    // The user signs up (an SDK creates the profile). The same value within the window is
    // taken as unchanged...
    fake.create_profile("late");
    assert_eq!(env.post("/v1/memberships", body.clone()).await.0, 202);
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["skipped_unchanged_total"], 1, "{stats}");
    // ...and past it, sent again; now Braze holds it.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(env.post("/v1/memberships", body).await.0, 202);
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:late", "AIQ_7_1")
            == Some(json!(true)))
        .await
    );
    assert_eq!(sent(&fake), 2);
}

/// `skip_unchanged_for_s = 0`: every update is sent, whatever was sent before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_skip_unchanged_for_zero_every_value_is_sent() {
    let env = Env::start_with(|c| c.delivery.skip_unchanged_for = None).await;
    let body = array(&[json!({"external_id": "s", "attributes": {"tier": "gold"}})]);
    let fake = env.fake.clone();
    for n in 1..=3 {
        assert_eq!(env.post("/v1/attributes", body.clone()).await.0, 202);
        assert!(wait_until(Duration::from_secs(10), || fake.attributes().len() == n).await);
        wait_for_stats(&env, Duration::from_secs(10), |s| {
            s["queue"]["pending"] == 0
        })
        .await;
    }
    assert_eq!(env.stats().await["queue"]["skipped_unchanged_total"], 0);
}

/// Two clients' updates of one user travel as one Braze object. When Braze refuses that object
/// for one bad value, only that value's update goes to the dead letters: the other client's
/// update is sent again on its own and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_merged_object_dead_letters_only_the_update_at_fault() {
    let env = Env::start().await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: std::time::Instant::now() + Duration::from_millis(800),
    });
    let bad = array(&[json!({"external_id": "m", "attributes": {"email": "not an address"}})]);
    let good = array(&[json!({"external_id": "m", "attributes": {"tier": "gold"}})]);
    assert_eq!(env.post("/v1/attributes", bad).await.0, 202);
    assert_eq!(env.post("/v1/attributes", good).await.0, 202);
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || fake
            .attribute_value("external_id:m", "tier")
            == Some(json!("gold")))
        .await,
        "the innocent update never arrived; requests: {:?}",
        fake.requests()
    );
    let (_, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 1
    })
    .await;
    assert_eq!(stats["queue"]["dead"], 1, "{stats}");
    let dead = dead_letters(&env);
    assert!(dead[0].1.contains("EMAIL_BAD_FORMAT"), "{dead:?}");
}
