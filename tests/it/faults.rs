//! Every Braze answer handled on purpose: one test per fault, through the real daemon and the
//! fake Braze.
//!
//! Where a test needs one known batch, it holds the fake at 503 while it posts (so the records
//! pile up) and then lets it accept: the next request carries everything pending, without any
//! race against the clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fake_braze::{Behaviour, FakeBraze, RequestLog};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::common::*;

/// Long enough to be "until told otherwise": tests end these stretches with `accept`.
const A_LONG_TIME: Duration = Duration::from_secs(600);

/// Braze answers 503 until [`accept`] is called.
fn fail_until_told(fake: &FakeBraze) {
    fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + A_LONG_TIME,
    });
}

fn accept(fake: &FakeBraze) {
    fake.set_behaviour(Behaviour::Accept);
}

/// Requests that got past the scripted 503s.
fn answered(fake: &FakeBraze) -> Vec<RequestLog> {
    let mut requests = fake.requests();
    requests.retain(|r| r.status != 503);
    requests
}

/// An event for `user` whose id (in `properties.id`) is `id`, padded with `pad` bytes of
/// properties.
fn event_for(id: u64, user: &str, pad: usize) -> Value {
    let mut properties = json!({ "id": id });
    // Braze caps property strings at 255 characters, so the padding is spread over several.
    for (n, start) in (0..pad).step_by(250).enumerate() {
        let len = (pad - start).min(250);
        properties[format!("pad{n}")] = Value::String("x".repeat(len));
    }
    json!({
        "name": "purchase",
        "external_id": user,
        "time": "2026-11-28T10:00:00Z",
        "properties": properties,
    })
}

/// A 201 with `errors` names the refused objects: in one request carrying both memberships
/// (attributes objects, several memberships of a user merged into one) and events, exactly
/// the records behind those objects are dead-lettered with Braze's reason, every other record
/// is delivered once, and nothing is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_braze_names_in_errors_are_dead_lettered_and_the_rest_of_a_mixed_batch_delivered() {
    let mut env = Env::start_with(|c| c.delivery.workers = 1).await;
    let refused = ["ev-3", "ev-11", "m-5", "m-6"];
    env.fake.reject_ids(refused.map(String::from));
    fail_until_told(&env.fake);

    let events: Vec<_> = (0..20)
        .map(|i| event_for(i, &format!("ev-{i}"), 0))
        .collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    let mut memberships = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..20 {
        let user = format!("m-{i}");
        memberships.push(membership(&user, "a1", "1", i % 2 == 0));
        expected.insert((user.clone(), "AIQ_a1_1"), i % 2 == 0);
        if i < 8 {
            // A second audience for some users: one attributes object with two fields.
            memberships.push(membership(&user, "a2", "1", true));
            expected.insert((user, "AIQ_a2_1"), true);
        }
    }
    let (status, body) = env.post("/v1/memberships", array(&memberships)).await;
    assert_eq!(status, 202, "{body}");
    accept(&env.fake);

    // ev-3, ev-11, and two memberships each (one object each) of m-5 and m-6.
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(20), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 6
    })
    .await;
    assert!(drained, "{stats}");

    // Every object sent once (a probe may have taken the events before the memberships
    // were posted, so one or two requests), except the records of the two refused objects
    // that merged two memberships (m-5's, m-6's): which update Braze refused there is
    // unknown, so each is sent again alone, and refused alone.
    let requests = answered(&env.fake);
    let (first, alone): (Vec<_>, Vec<_>) = requests.iter().partition(|r| r.status == 201);
    let objects: usize = first.iter().map(|r| r.objects).sum();
    assert_eq!(objects, 40, "{requests:?}");
    assert_eq!(alone.len(), 4, "{requests:?}");
    assert!(
        alone.iter().all(|r| r.status == 400 && r.objects == 1),
        "{requests:?}"
    );
    let counts = event_counts(&env.fake);
    for i in (0..20).filter(|i| ![3, 11].contains(i)) {
        assert_eq!(counts.get(&i), Some(&1), "event {i}");
    }
    assert_eq!(counts.len(), 18);
    for ((user, attribute), member) in &expected {
        let held = env
            .fake
            .attribute_value(&format!("external_id:{user}"), attribute);
        let want = (!refused.contains(&user.as_str())).then_some(Value::Bool(*member));
        assert_eq!(held, want, "{user} {attribute}");
    }
    let mut dead = dead_letters(&env);
    dead.sort();
    let users: Vec<_> = dead.iter().map(|(user, _)| user.as_str()).collect();
    assert_eq!(
        users,
        [
            "external_id:ev-11",
            "external_id:ev-3",
            "external_id:m-5",
            "external_id:m-5",
            "external_id:m-6",
            "external_id:m-6"
        ]
    );
    for (user, reason) in &dead {
        assert!(
            reason.contains("BLACKLISTED_EXTERNAL_USER_ID"),
            "{user}: {reason}"
        );
    }
    assert_eq!(stats["delivery"]["records_delivered"], 18 + 28 - 4);
    env.shutdown().await;
}

/// Posts 75 events of 75 distinct users in one batch with `poison` among them, lets them go
/// as one request, and returns how many requests beyond that first one it took to deliver
/// When every object of a request is invalid, Braze answers 400 ("Valid data must be
/// provided") with each object in `errors`. Nothing was applied and each record's fault is
/// named, so they are dead-lettered with their reasons from that one answer, not found by
/// splitting the batch (which costs about two requests per record).
#[tokio::test]
async fn a_400_naming_every_object_dead_letters_them_without_splitting() {
    let mut env = Env::start_with(|c| c.delivery.workers = 1).await;
    env.fake.reject_ids((0..30).map(|i| format!("bad-{i}")));
    fail_until_told(&env.fake);
    let events: Vec<_> = (0..30)
        .map(|i| event_for(i, &format!("bad-{i}"), 0))
        .collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    accept(&env.fake);
    let (settled, stats) = wait_for_stats(&env, Duration::from_secs(20), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 30
    })
    .await;
    assert!(settled, "{stats}");
    let requests = answered(&env.fake);
    assert_eq!(requests.len(), 1, "split instead: {requests:?}");
    assert_eq!(requests[0].status, 400);
    let dead = dead_letters(&env);
    assert_eq!(dead.len(), 30);
    for (user, reason) in &dead {
        assert!(
            reason.contains("BLACKLISTED_EXTERNAL_USER_ID"),
            "{user}: {reason}"
        );
    }
    env.shutdown().await;
}

/// every good event exactly once and dead-letter the poison.
async fn extra_requests_to_isolate(poison: &[u64]) -> usize {
    let mut env = Env::start_with(|c| c.delivery.workers = 1).await;
    env.fake
        .poison_ids(poison.iter().map(|i| format!("user-{i}")));
    fail_until_told(&env.fake);
    // `event(i)` belongs to user-i for i < 997: 75 objects, none merged.
    let events: Vec<_> = (0..75).map(event).collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    accept(&env.fake);

    let dead = poison.len() as u64;
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(30), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == dead
    })
    .await;
    assert!(drained, "{stats}");
    let counts = event_counts(&env.fake);
    for i in 0..75 {
        let want = (!poison.contains(&i)).then_some(&1);
        assert_eq!(counts.get(&i), want, "event {i}");
    }
    let requests = answered(&env.fake);
    assert_eq!(requests[0].objects, 75, "{requests:?}");
    assert!(requests.iter().all(|r| r.status == 201 || r.status == 400));
    let mut reasons = dead_letters(&env);
    reasons.sort();
    for ((user, reason), i) in reasons.iter().zip(poison) {
        assert_eq!(user, &format!("external_id:user-{i}"));
        assert!(
            reason.contains("400") && reason.contains("cannot be processed"),
            "{reason}"
        );
    }
    env.shutdown().await;
    requests.len() - 1
}

/// A whole-request 400 (nothing applied, no object named) caused by one record in a batch of
/// 75: the daemon bisects, delivers the 74 others once, dead-letters the one, and spends about
/// two requests per halving doing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_record_in_75_is_isolated_by_bisection_in_about_two_log2_75_requests() {
    let extra = extra_requests_to_isolate(&[41]).await;
    eprintln!("one poison record in 75: {extra} extra requests (2*log2(75) = 12.5)");
    // 75 -> 38 -> 19 -> 10 -> 5 -> 3 -> 2 -> 1: two requests per level, plus a little.
    assert!(extra <= 16, "{extra} extra requests");
}

/// Three poison records in one batch of 75: each costs about as much as one alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_poison_records_in_75_are_isolated_at_about_the_cost_of_one_each() {
    let extra = extra_requests_to_isolate(&[2, 40, 70]).await;
    eprintln!("three poison records in 75: {extra} extra requests (3 x 2*log2(75) = 37.4)");
    assert!(extra <= 3 * 16, "{extra} extra requests");
}

async fn readyz(env: &Env) -> (u16, Value) {
    let r = env
        .client
        .get(format!("{}/readyz", env.base))
        .send()
        .await
        .expect("readyz answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `/readyz` until it answers `status`; returns the last body, or panics after 20 s.
async fn wait_for_readyz(env: &Env, status: u16) -> Value {
    let start = Instant::now();
    loop {
        let (got, body) = readyz(env).await;
        if got == status {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "readyz still {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Braze answers `status` (a key, permission or endpoint problem) for at least `stretch`:
/// delivery pauses with the reason in `/readyz`, everything stays queued (nothing is
/// dead-lettered, however long), and once Braze accepts again delivery resumes by itself.
async fn misconfiguration_pauses_and_recovers(status: u16, stretch: Duration) {
    let mut env = Env::start_with(|c| {
        // The paused gate probes at the backoff ceiling.
        c.delivery.backoff_max = Duration::from_millis(300);
    })
    .await;
    let t0 = Instant::now();
    env.fake.set_behaviour(Behaviour::FailStatus {
        status,
        until: t0 + A_LONG_TIME,
    });
    let events: Vec<_> = (0..50).map(event).collect();
    let (code, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(code, 202, "{body}");

    let body = wait_for_readyz(&env, 503).await;
    let reason = body["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("key")
            && reason.contains("endpoint")
            && reason.contains(&status.to_string()),
        "{status}: {body}"
    );
    // Records accepted while paused stay queued as well.
    let memberships: Vec<_> = (0..10)
        .map(|i| membership(&format!("p-{i}"), "a", "1", true))
        .collect();
    let (code, body) = env.post("/v1/memberships", array(&memberships)).await;
    assert_eq!(code, 202, "{body}");
    let stats = env.stats().await;
    assert_eq!(
        (&stats["queue"]["pending"], &stats["queue"]["dead"]),
        (&json!(60), &json!(0)),
        "{stats}"
    );
    assert_eq!(stats["delivery"]["health"]["state"], "paused", "{stats}");

    let left = stretch.saturating_sub(t0.elapsed());
    tokio::time::sleep(left).await;
    // Still paused, still nothing lost or dead, however long it lasted.
    assert_eq!(readyz(&env).await.0, 503);
    let stats = env.stats().await;
    assert_eq!(
        (&stats["queue"]["pending"], &stats["queue"]["dead"]),
        (&json!(60), &json!(0)),
        "{stats}"
    );
    let probes = env.fake.requests().len();
    accept(&env.fake);

    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(20), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{status}: delivery did not resume: {stats}");
    assert_eq!(stats["queue"]["dead"], 0);
    let counts = event_counts(&env.fake);
    assert!((0..50).all(|i| counts.get(&i) == Some(&1)), "{counts:?}");
    for i in 0..10 {
        let held = env
            .fake
            .attribute_value(&format!("external_id:p-{i}"), "AIQ_a_1");
        assert_eq!(held, Some(Value::Bool(true)));
    }
    let body = wait_for_readyz(&env, 200).await;
    assert_eq!(body["ready"], true, "{body}");
    // One probe at a time, at the ceiling: a handful, not one per worker per backoff step.
    let ceiling_steps = stretch.as_millis() as usize / 300;
    assert!(
        probes <= 2 * ceiling_steps + 4,
        "{probes} requests while paused for {stretch:?}"
    );
    env.shutdown().await;
}

/// 401 for two seconds, then the key works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_pauses_delivery_keeps_everything_queued_and_resumes_by_itself() {
    misconfiguration_pauses_and_recovers(401, Duration::from_secs(2)).await;
}

/// 403 (the key lacks `users.track`) and 404 (a wrong endpoint) pause the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_key_or_a_wrong_endpoint_pauses_delivery_and_resumes_by_itself() {
    for status in [403, 404] {
        misconfiguration_pauses_and_recovers(status, Duration::from_millis(700)).await;
    }
}

/// A 413 says the body is too big, not that a record is bad: a 75-event batch over the limit
/// is split until the halves fit, every event is delivered once, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_brazes_body_limit_is_split_until_it_fits_and_nothing_is_dead() {
    let mut env = Env::start_with(|c| c.delivery.workers = 1).await;
    let limit = 20_000;
    env.fake.set_max_body_bytes(limit);
    fail_until_told(&env.fake);
    // About 1 KB each: 75 of them are ~80 KB, four times the limit.
    let events: Vec<_> = (0..75)
        .map(|i| event_for(i, &format!("big-{i}"), 1000))
        .collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    accept(&env.fake);

    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(30), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");
    assert_eq!(stats["queue"]["dead"], 0, "{stats}");
    let counts = event_counts(&env.fake);
    assert!((0..75).all(|i| counts.get(&i) == Some(&1)), "{counts:?}");
    let requests = answered(&env.fake);
    assert_eq!(requests[0].objects, 75);
    assert_eq!(requests[0].status, 413);
    assert!(requests
        .iter()
        .all(|r| (r.status == 201) == (r.body_bytes <= limit)));
    env.shutdown().await;
}

/// One event alone over the body limit can never be sent: it, and only it, is dead-lettered
/// with the reason, and the events around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_alone_over_brazes_body_limit_is_dead_lettered_and_the_rest_delivered() {
    let mut env = Env::start_with(|c| c.delivery.workers = 1).await;
    env.fake.set_max_body_bytes(20_000);
    fail_until_told(&env.fake);
    let events: Vec<_> = (0..30)
        .map(|i| {
            let pad = if i == 17 { 30_000 } else { 200 };
            event_for(i, &format!("u-{i}"), pad)
        })
        .collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    accept(&env.fake);

    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(30), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 1
    })
    .await;
    assert!(drained, "{stats}");
    let counts = event_counts(&env.fake);
    for i in 0..30 {
        let want = (i != 17).then_some(&1);
        assert_eq!(counts.get(&i), want, "event {i}");
    }
    let dead = dead_letters(&env);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "external_id:u-17");
    assert!(dead[0].1.contains("413"), "{}", dead[0].1);
    env.shutdown().await;
}

/// A 429 seen by one worker holds back all eight: no request reaches Braze inside any 429's
/// Retry-After window (bar those already on the wire when it was sent), and everything
/// arrives once the limit lifts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_holds_back_every_worker_for_its_retry_after() {
    let mut env = Env::start_with(|c| c.delivery.workers = 8).await;
    let t0 = Instant::now();
    env.fake.set_behaviour(Behaviour::RateLimited {
        retry_after: Duration::from_secs(1),
        until: t0 + Duration::from_millis(2500),
    });
    // Records keep arriving through the stretch, so every worker has work all along.
    let mut next = 0u64;
    while t0.elapsed() < Duration::from_millis(2000) {
        let batch: Vec<_> = (next..next + 100).map(event).collect();
        next += 100;
        let (status, body) = env.post("/v1/events", array(&batch)).await;
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = next as usize;
    let fake = env.fake.clone();
    let arrived = wait_until(Duration::from_secs(30), || {
        event_counts(&fake).len() == total
    })
    .await;
    assert!(arrived, "{} of {total} arrived", event_counts(&fake).len());
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained && stats["queue"]["dead"] == 0, "{stats}");
    assert!(event_counts(&fake).values().all(|&n| n == 1));

    let requests = fake.requests();
    let limited = requests.iter().filter(|r| r.status == 429).count();
    assert!(limited >= 2, "{requests:?}");
    assert_no_request_inside_a_retry_after(&requests);
    env.shutdown().await;
}

/// With a ceiling of 20 requests a second and eight workers each sending one-record requests,
/// no one-second window at Braze holds more than 20 (+2 for timer slack), nor does the run as
/// a whole average more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_ceiling_holds_across_all_workers() {
    let mut env = Env::start_with(|c| {
        c.delivery.workers = 8;
        c.delivery.max_requests_per_second = Some(20.0);
        c.braze.max_objects_per_request = 1;
    })
    .await;
    let events: Vec<_> = (0..100).map(event).collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    let fake = env.fake.clone();
    let arrived = wait_until(Duration::from_secs(30), || fake.events().len() >= 100).await;
    assert!(arrived, "{} of 100 arrived", fake.events().len());

    let at: Vec<Instant> = fake.requests().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 100, "one request per record");
    let busiest = (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| **t < at[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let span = at[at.len() - 1] - at[0];
    let rate = (at.len() - 1) as f64 / span.as_secs_f64();
    eprintln!("rate ceiling 20/s: busiest second {busiest}, overall {rate:.1}/s over {span:?}");
    assert!(busiest <= 22, "{busiest} requests in one second");
    assert!(rate <= 22.0, "{rate:.1} requests a second overall");
    env.shutdown().await;
}

/// The rate ceiling and a 429 together: workers already waiting for their turn under the
/// ceiling when a 429 comes back must wait out its Retry-After too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_also_holds_back_workers_already_waiting_for_a_rate_ceiling_slot() {
    let mut env = Env::start_with(|c| {
        c.delivery.workers = 8;
        c.delivery.max_requests_per_second = Some(20.0);
        c.braze.max_objects_per_request = 1;
    })
    .await;
    let events: Vec<_> = (0..60).map(event).collect();
    let (status, body) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202, "{body}");
    let fake = env.fake.clone();
    // Once requests flow at the ceiling, every worker is waiting for a slot.
    assert!(wait_until(Duration::from_secs(10), || fake.requests().len() >= 10).await);
    // Long enough (three slots at 20/s) that a request surely meets the 429 however the
    // machine schedules, short enough that all of it sits inside the assertion's grace.
    env.fake.set_behaviour(Behaviour::RateLimited {
        retry_after: Duration::from_secs(1),
        until: Instant::now() + Duration::from_millis(150),
    });
    let arrived = wait_until(Duration::from_secs(30), || fake.events().len() >= 60).await;
    assert!(arrived, "{} of 60 arrived", fake.events().len());
    assert_no_request_inside_a_retry_after(&fake.requests());
    env.shutdown().await;
}

/// Fails if a request reached the fake inside a 429's Retry-After window, bar a 200 ms grace
/// for requests already on the wire when the 429 was sent.
fn assert_no_request_inside_a_retry_after(requests: &[RequestLog]) {
    let limited: Vec<_> = requests.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "no 429 was sent: {requests:?}");
    let grace = Duration::from_millis(200);
    for l in &limited {
        let window = l.retry_after.expect("a 429 carries Retry-After");
        for r in requests {
            let inside = r.at > l.at + grace && r.at < l.at + window;
            assert!(
                !inside,
                "a request came {:?} after a 429 asking for {window:?}",
                r.at - l.at
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ordering under a random mix of faults
// ---------------------------------------------------------------------------------------------

const USERS: usize = 5;
const CLIENT_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
enum Step {
    /// One request of membership flips, (user, member), in this order.
    Post(Vec<(usize, bool)>),
    /// 503 for this long.
    Unavailable(Duration),
    /// 429 with a 1 s Retry-After, for 100 ms.
    RateLimited,
    /// Requests arriving for this long hang for 300 ms, past the client's 200 ms timeout,
    /// and are applied anyway: the daemon cannot tell whether a timed-out request was taken,
    /// so it sends those records again. (The fake applies requests in arrival order, so a hung
    /// request never lands after one that arrived later.)
    Hang(Duration),
}

fn step() -> impl Strategy<Value = (Step, Duration)> {
    let ms = |r: std::ops::RangeInclusive<u64>| r.prop_map(Duration::from_millis);
    let flips = prop::collection::vec((0..USERS, any::<bool>()), 1..=6);
    let step = prop_oneof![
        6 => flips.prop_map(Step::Post),
        1 => ms(50..=200).prop_map(Step::Unavailable),
        1 => Just(Step::RateLimited),
        1 => ms(50..=250).prop_map(Step::Hang),
    ];
    // A pause after each step, so faults and posts interleave with the workers' timing.
    (step, ms(0..=30))
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    ProptestConfig {
        cases,
        // Each case runs a daemon for seconds; keep a failing run's shrinking bounded.
        max_shrink_time: 300_000,
        ..ProptestConfig::default()
    }
}

/// Runs the schedule against a fresh daemon; returns (user, what Braze holds, last accepted)
/// for every user where they differ.
async fn run_schedule(
    schedule: &[(Step, Duration)],
    workers: usize,
) -> Vec<(String, Option<Value>, Option<bool>)> {
    let mut env = Env::start_with(|c| {
        c.delivery.workers = workers;
        c.braze.request_timeout = CLIENT_TIMEOUT;
    })
    .await;
    let mut last: Vec<Option<bool>> = vec![None; USERS];
    for (step, pause) in schedule {
        let now = Instant::now();
        match step {
            Step::Post(flips) => {
                let batch: Vec<_> = flips
                    .iter()
                    .map(|(u, member)| membership(&format!("o-{u}"), "aud", "1", *member))
                    .collect();
                let (status, body) = env.post("/v1/memberships", array(&batch)).await;
                assert_eq!(status, 202, "{body}");
                for (u, member) in flips {
                    last[*u] = Some(*member);
                }
            }
            Step::Unavailable(d) => env.fake.set_behaviour(Behaviour::FailStatus {
                status: 503,
                until: now + *d,
            }),
            Step::RateLimited => env.fake.set_behaviour(Behaviour::RateLimited {
                retry_after: Duration::from_secs(1),
                until: now + Duration::from_millis(100),
            }),
            Step::Hang(d) => env.fake.set_behaviour(Behaviour::Hang {
                delay: Duration::from_millis(300),
                until: now + *d,
            }),
        }
        tokio::time::sleep(*pause).await;
    }
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(30), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["in_flight"] == 0
    })
    .await;
    assert!(drained, "queue never drained: {stats}");
    assert_eq!(stats["queue"]["dead"], 0, "{stats}");
    // A hung request is applied up to 300 ms after it arrived, even after its client gave up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let wrong = (0..USERS)
        .filter_map(|u| {
            let user = format!("o-{u}");
            let held = env
                .fake
                .attribute_value(&format!("external_id:{user}"), "AIQ_aud_1");
            (held != last[u].map(Value::Bool)).then_some((user, held, last[u]))
        })
        .collect();
    env.shutdown().await;
    wrong
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Whatever mix of 503s, 429s and hangs past the client's timeout Braze throws at 4 to 8
    /// workers, every user ends with the last membership value accepted for them.
    #[test]
    fn every_user_ends_with_the_last_accepted_value_whatever_faults_and_workers(
        schedule in prop::collection::vec(step(), 20..=40),
        workers in 4usize..=8,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let wrong = runtime.block_on(run_schedule(&schedule, workers));
        prop_assert!(wrong.is_empty(), "(user, Braze holds, last accepted): {:?}", wrong);
    }
}

/// The property's own check: a schedule with no faults at all ends right (guards against a
/// vacuous property, e.g. one that never posts).
#[test]
fn the_ordering_property_holds_without_faults() {
    let schedule: Vec<_> = (0..10)
        .map(|i| {
            let flips = (0..USERS).map(|u| (u, (i + u) % 2 == 0)).collect();
            (Step::Post(flips), Duration::ZERO)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    assert_eq!(runtime.block_on(run_schedule(&schedule, 4)), []);
}
