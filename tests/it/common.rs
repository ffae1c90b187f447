//! The test environment: a fake Braze, a daemon on port 0 with a fresh data dir, and request
//! helpers. Each test is a few lines on top of this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aiq_braze_sync::config::Config;
use aiq_braze_sync::daemon::{self, Running};
use fake_braze::FakeBraze;
use serde_json::{json, Value};

pub const API_KEY: &str = "test-api-key-0123";
pub const TOKEN: &str = "test-ingest-token";

pub fn http() -> reqwest::Client {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_test_writer()
            .try_init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A config for a daemon in `dir` that talks to `fake`, with test-speed backoff.
pub fn config(dir: &Path, fake: &FakeBraze) -> Config {
    let mut c = Config::for_local(dir.join("data"), fake.url(), API_KEY);
    c.delivery.backoff_initial = Duration::from_millis(20);
    c.delivery.backoff_max = Duration::from_millis(500);
    c.braze.request_timeout = Duration::from_secs(5);
    c.queue.cache_bytes = 16 << 20;
    c.ingest.token = Some(aiq_braze_sync::config::Secret::new(TOKEN));
    // The fake Braze starts with no profiles, and in update-only mode it applies nothing to
    // a user it has never seen, as Braze does. Tests of delivery let memberships create the
    // profile; `attributes.rs` checks the shipped defaults.
    c.update_existing_only.memberships = false;
    // Tests are not about the free-space reserve (disk.rs is); a crowded CI disk must not
    // turn them into 503s.
    c.queue.min_free_bytes = 0;
    c
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub fake: FakeBraze,
    pub daemon: Option<Running>,
    pub base: String,
    pub client: reqwest::Client,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = FakeBraze::start(API_KEY).await.expect("fake braze");
        let mut cfg = config(dir.path(), &fake);
        tweak(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let daemon = daemon::start(&cfg, listener).await.expect("daemon starts");
        let base = format!("http://{}", daemon.addr);
        Env {
            dir,
            fake,
            daemon: Some(daemon),
            base,
            client: http(),
        }
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        post(&self.client, &format!("{}{path}", self.base), body).await
    }

    pub async fn stats(&self) -> Value {
        let r = self
            .client
            .get(format!("{}/v1/admin/queue/stats", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        let r = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    pub async fn shutdown(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let r = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn event(id: u64) -> Value {
    json!({
        "name": "purchase",
        "external_id": format!("user-{}", id % 997),
        "time": "2026-11-28T10:00:00Z",
        "properties": {"id": id, "sku": "sku-1", "price": 9.5},
    })
}

pub fn membership(user: &str, audience: &str, split: &str, member: bool) -> Value {
    json!({"audience_id": audience, "split_id": split, "external_id": user, "member": member})
}

pub fn array(items: &[Value]) -> String {
    serde_json::to_string(items).unwrap()
}

/// How many times each event id reached the fake.
pub fn event_counts(fake: &FakeBraze) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for e in fake.events() {
        if let Some(id) = e["properties"]["id"].as_u64() {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}

/// Polls `done` until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

pub use aiq_braze_sync::queue::dir_bytes;

/// Polls the daemon's stats (`/v1/admin/queue/stats`) until `done` holds for them or `limit`
/// passes; returns whether it held and the last stats seen, for the failure message.
pub async fn wait_for_stats(
    env: &Env,
    limit: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> (bool, Value) {
    let start = Instant::now();
    loop {
        let stats = env.stats().await;
        if done(&stats) {
            return (true, stats);
        }
        if start.elapsed() >= limit {
            return (false, stats);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dead letters of a running daemon as (user, Braze's reason), oldest first; user is
/// written "external_id:<id>". Panics if the daemon is stopped or the queue cannot be read.
pub fn dead_letters(env: &Env) -> Vec<(String, String)> {
    let daemon = env.daemon.as_ref().expect("the daemon is running");
    let dead = daemon.queue.dead(10_000).expect("dead letters read");
    dead.into_iter()
        .map(|d| (d.user, d.reason.unwrap_or_default()))
        .collect()
}

/// A membership record of audience `a` split `1`, for tests that drive the queue directly.
pub fn member(user: &str, member: bool) -> aiq_braze_sync::record::Record {
    use aiq_braze_sync::record::{Membership, Record, UserId};
    Record::Membership(Membership {
        user: UserId::External(user.into()),
        audience_id: "a".into(),
        split_id: "1".into(),
        member,
        time: None,
    })
}

/// A loopback port free right now, for the real binary to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon in this process, from a loaded config, listening on `config.ingest.listen`
/// (a port the test chose, so that the real binary's commands find it).
pub async fn start_in_process(config: &Config) -> Running {
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .expect("bind the configured listen address");
    daemon::start(config, listener)
        .await
        .expect("daemon starts")
}

/// The value of an unlabelled metric in `/metrics` text; panics naming it if it is absent.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}
