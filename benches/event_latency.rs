//! Event latency while a membership backfill drains (events never wait behind a backfill),
//! run by hand:
//!
//! ```sh
//! cargo bench --bench event_latency                      # 1,000,000-record backfill
//! cargo bench --bench event_latency -- --backfill 200000 --seconds 10 --snapshot 500000
//! cargo bench --bench event_latency -- --backfill 300000 --seconds 5 --braze-latency-ms 200
//! ```
//!
//! A fake Braze and the daemon run in this process on loopback, with a real sled queue in a
//! temporary directory. Events are posted at 1,000/s (10 per request every 10 ms), first
//! alone, then while a backfill of distinct memberships is posted and drains. Latency is from
//! the moment the 202 for an event reaches the client to the arrival of the Braze request that
//! carries it (0 if the event got there first). With `--braze-latency-ms N` the fake Braze
//! answers every request N ms after it arrived, as the real one does in tens to hundreds of
//! milliseconds; the latency measured is still to the request's arrival, so an event is
//! answered by Braze N ms after the figure shown.
//!
//! Last, a split's snapshot of `--snapshot` members (default 500,000) is uploaded while an
//! event is posted every 100 ms: how long each event waits for its 202, and for Braze, while
//! the daemon receives, sorts and diffs the snapshot and queues its members.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiq_braze_sync::config::Config;
use aiq_braze_sync::daemon;
use fake_braze::FakeBraze;

const KEY: &str = "bench-key";

struct Args {
    backfill: u64,
    seconds: u64,
    snapshot: u64,
    braze_latency_ms: u64,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str, default: u64| {
        argv.iter()
            .position(|x| x == name)
            .and_then(|i| argv.get(i + 1))
            .map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
    };
    Args {
        backfill: value("--backfill", 1_000_000),
        seconds: value("--seconds", 10),
        snapshot: value("--snapshot", 500_000),
        braze_latency_ms: value("--braze-latency-ms", 0),
    }
}

/// Posts events at 1,000/s until `until` says stop; returns each event id's ack time.
async fn send_events(
    client: reqwest::Client,
    base: String,
    first_id: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> HashMap<u64, Instant> {
    let mut acked = HashMap::new();
    let mut next = first_id;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        let body: String = (next..next + 10)
            .map(|i| {
                format!(
                    "{{\"name\":\"purchase\",\"external_id\":\"ev-{i}\",\"time\":\"2026-11-28T10:00:00Z\",\"properties\":{{\"id\":{i}}}}}\n"
                )
            })
            .collect();
        let r = client
            .post(format!("{base}/v1/events"))
            .body(body)
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status().as_u16() == 202) {
            let now = Instant::now();
            for i in next..next + 10 {
                acked.insert(i, now);
            }
        }
        next += 10;
    }
    acked
}

fn percentiles(fake: &FakeBraze, acked: &HashMap<u64, Instant>) -> String {
    let mut lat: Vec<Duration> = fake
        .events_with_arrival()
        .into_iter()
        .filter_map(|(at, e)| {
            let id = e["properties"]["id"].as_u64()?;
            let ack = acked.get(&id)?;
            Some(at.saturating_duration_since(*ack))
        })
        .collect();
    lat.sort();
    if lat.is_empty() {
        return "no events measured".into();
    }
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    format!(
        "{} events: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        p(0.50).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3
    )
}

fn main() {
    let args = args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The clients and the fake Braze get a runtime of their own; the daemon runs on one
    // shaped as the binary's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fake = runtime.block_on(FakeBraze::start(KEY)).unwrap();
    if args.braze_latency_ms > 0 {
        fake.set_behaviour(fake_braze::Behaviour::Hang {
            delay: Duration::from_millis(args.braze_latency_ms),
            until: Instant::now() + Duration::from_secs(86_400),
        });
    }
    let mut config = Config::for_local(dir.path().join("data"), fake.url(), KEY);
    config.queue.max_records = args.backfill + 1_000_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (daemon_runtime, running) = daemon::start_on_own_runtime(&config, listener).unwrap();
    let (queue, delivery) = (running.queue.clone(), running.delivery.clone());
    runtime.block_on(measure(&args, &fake, &queue, &delivery, running.addr));
    daemon_runtime.block_on(running.shutdown()).unwrap();
}

async fn measure(
    args: &Args,
    fake: &FakeBraze,
    queue: &aiq_braze_sync::queue::Queue,
    delivery: &aiq_braze_sync::delivery::Delivery,
    addr: std::net::SocketAddr,
) {
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();

    // 1. Events alone.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = tokio::spawn(send_events(client.clone(), base.clone(), 0, stop.clone()));
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = sender.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "events alone at 1,000/s:            {}",
        percentiles(fake, &acked)
    );

    // 2. Events while a backfill is posted and drains.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = tokio::spawn(send_events(
        client.clone(),
        base.clone(),
        10_000_000,
        stop.clone(),
    ));
    let started = Instant::now();
    let posted = Arc::new(Mutex::new(0u64));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (client, base, posted, n) =
            (client.clone(), base.clone(), posted.clone(), args.backfill);
        writers.push(tokio::spawn(async move {
            let mut i = w * 5_000;
            while i < n {
                let end = (i + 5_000).min(n);
                let body: String = (i..end)
                    .map(|u| format!("{{\"audience_id\":\"bf\",\"split_id\":\"1\",\"external_id\":\"bf-{u}\",\"member\":true}}\n"))
                    .collect();
                loop {
                    let r = client.post(format!("{base}/v1/memberships")).body(body.clone()).send().await.unwrap();
                    if r.status().as_u16() == 202 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                *posted.lock().unwrap() += end - i;
                i += 10_000;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let ingested = started.elapsed();
    // Drained once Braze has every membership: the events keep flowing meanwhile, and with
    // a Braze that takes its time some are always in flight.
    loop {
        let s = queue.stats().unwrap();
        let stats = delivery.stats();
        let delivered = stats.delivered_by_kind["membership"];
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!(
                "limit {} in flight {}",
                stats.concurrency_limit, stats.in_flight
            );
        }
        if s.pending_attributes == 0 && delivered >= args.backfill {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = sender.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "events during a {}-record backfill: {}",
        args.backfill,
        percentiles(fake, &acked)
    );
    println!(
        "backfill: posted in {:.1} s ({:.0} records/s durable), drained in {:.1} s ({:.0} records/s end to end), {} Braze requests",
        ingested.as_secs_f64(),
        args.backfill as f64 / ingested.as_secs_f64(),
        drained.as_secs_f64(),
        args.backfill as f64 / drained.as_secs_f64(),
        fake.requests().len()
    );

    // 3. An event every 100 ms while a snapshot uploads (`--snapshot 0` skips it).
    if args.snapshot == 0 {
        return;
    }
    let members: String = (0..args.snapshot)
        .map(|i| format!("{{\"external_id\":\"snap-{i}\"}}\n"))
        .collect();
    let started = Instant::now();
    let upload = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let r = client
                .put(format!("{base}/v1/audiences/snap/splits/1/members"))
                .header("Content-Type", "application/x-ndjson")
                .body(members)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let mut acked = HashMap::new();
    let mut answers = Vec::new();
    let mut id = 20_000_000u64;
    while !upload.is_finished() {
        let sent = Instant::now();
        let body = format!(
            "{{\"name\":\"purchase\",\"external_id\":\"ev-{id}\",\"time\":\"2026-11-28T10:00:00Z\",\"properties\":{{\"id\":{id}}}}}\n"
        );
        let r = client
            .post(format!("{base}/v1/events"))
            .header("Content-Type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        acked.insert(id, Instant::now());
        answers.push(sent.elapsed());
        id += 1;
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(sent.elapsed())).await;
    }
    let (status, report) = upload.await.unwrap();
    assert_eq!(status, 200, "{report}");
    let uploaded = started.elapsed();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    answers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "events during a {}-member snapshot upload ({:.1} s): 202 in p50 {:.1} ms, max {:.1} ms; to Braze {}",
        args.snapshot,
        uploaded.as_secs_f64(),
        ms(answers[answers.len() / 2]),
        ms(answers[answers.len() - 1]),
        percentiles(fake, &acked)
    );
}
