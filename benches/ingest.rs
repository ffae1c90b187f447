//! Durable ingest over HTTP, beside the disk's own limit measured in the same run. By hand:
//!
//! ```sh
//! cargo bench --bench ingest                       # the full matrix, 3 s per cell
//! cargo bench --bench ingest -- --seconds 5 --sizes 1000 --clients 8
//! cargo bench --bench ingest -- --dir /var/tmp     # measure another disk
//! ```
//!
//! The daemon runs in this process (real sled queue, real HTTP on loopback), with the fake
//! Braze answering 503 so that delivery stays out of the way and only ingest is measured.
//! Each cell posts NDJSON events, `size` per request, from `clients` concurrent clients, for
//! `--seconds`; a record counts once its request got the 202, which the daemon sends only
//! after the records are fdatasync'ed.
//!
//! The reference ("raw") is the best the disk can do for the same work: one writer appending
//! the same bytes to a file and calling fdatasync, with each sync covering what `clients`
//! requests of `size` records carry (the group commit's ideal). Printed side by side, with
//! the ratio.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiq_braze_sync::config::Config;
use aiq_braze_sync::daemon;
use fake_braze::{Behaviour, FakeBraze};

const KEY: &str = "bench-key";

struct Args {
    seconds: u64,
    sizes: Vec<usize>,
    clients: Vec<usize>,
    dir: Option<PathBuf>,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        argv.iter()
            .position(|x| x == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let list = |name: &str, default: &[usize]| {
        value(name).map_or(default.to_vec(), |v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("a list of numbers"))
                .collect()
        })
    };
    Args {
        seconds: value("--seconds").map_or(3, |v| v.parse().expect("--seconds takes a number")),
        sizes: list("--sizes", &[1, 100, 1000]),
        clients: list("--clients", &[1, 8, 64]),
        dir: value("--dir").map(PathBuf::from),
    }
}

fn event_line(id: u64) -> String {
    format!(
        "{{\"name\":\"purchase\",\"external_id\":\"user-{}\",\"time\":\"2026-11-28T10:00:00Z\",\"properties\":{{\"id\":{id},\"sku\":\"sku-1\",\"price\":9.5}}}}\n",
        id % 100_003
    )
}

/// Records per second the daemon acknowledged for one cell.
async fn daemon_cell(base: &str, size: usize, clients: usize, seconds: u64) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, acked, stop) =
            (client.clone(), next.clone(), acked.clone(), stop.clone());
        let url = format!("{base}/v1/events");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let first = next.fetch_add(size as u64, Ordering::Relaxed);
                let body: String = (first..first + size as u64).map(event_line).collect();
                let r = client.post(&url).body(body).send().await.unwrap();
                if r.status() == 202 {
                    acked.fetch_add(size as u64, Ordering::Relaxed);
                } else {
                    panic!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let counted = acked.load(Ordering::Relaxed);
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    counted as f64 / took.as_secs_f64()
}

/// Records per second a bare append + fdatasync loop reaches with one sync per `group`
/// records of `record_bytes` each.
fn raw_cell(dir: &std::path::Path, group: usize, record_bytes: usize, seconds: u64) -> f64 {
    let path = dir.join("raw-reference");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![b'x'; group * record_bytes];
    let start = Instant::now();
    let mut records = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        records += group as u64;
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    rate
}

/// glibc's malloc was a third of ingest's CPU under profile (sled allocates and frees a node
/// copy per insert); mimalloc handles that churn far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let fake = runtime.block_on(FakeBraze::start(KEY)).unwrap();
    fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(24 * 3600),
    });
    let mut config = Config::for_local(dir.path().join("data"), fake.url(), KEY);
    config.delivery.backoff_max = Duration::from_secs(60);
    config.queue.max_records = u64::MAX;
    config.queue.max_disk_bytes = u64::MAX;
    config.queue.min_free_bytes = 0;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (daemon_runtime, running) = daemon::start_on_own_runtime(&config, listener).unwrap();
    let addr = running.addr;
    runtime.block_on(async {
        let base = format!("http://{addr}");
        let record_bytes = event_line(123_456).len();
        println!(
            "durable ingest, {} s per cell, {record_bytes}-byte NDJSON events, disk of {}",
            args.seconds,
            dir.path().display()
        );
        println!(
            "{:>9} {:>8} {:>14} {:>14} {:>7}",
            "records", "clients", "daemon rec/s", "raw rec/s", "ratio"
        );
        for &size in &args.sizes {
            for &clients in &args.clients {
                let ours = daemon_cell(&base, size, clients, args.seconds).await;
                let raw = {
                    let d = dir.path().to_path_buf();
                    let secs = args.seconds;
                    tokio::task::spawn_blocking(move || {
                        raw_cell(&d, size * clients, record_bytes, secs)
                    })
                    .await
                    .unwrap()
                };
                println!(
                    "{size:>9} {clients:>8} {ours:>14.0} {raw:>14.0} {:>6.0}%",
                    100.0 * ours / raw
                );
            }
        }
    });
    daemon_runtime.block_on(running.shutdown()).unwrap();
}
