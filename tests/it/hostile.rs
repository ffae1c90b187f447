//! Hostile clients against the real binary: huge bodies built to multiply in memory, bodies
//! sent a byte a packet, a crowd of connections that trickle under a small open-file limit,
//! and a big snapshot upload beside a stream of events. The process is the daemon as it
//! ships, so its memory and file limits are measured, not assumed.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::binary::{start_binary, write_config, Daemon};
use super::common::{free_port, http, TOKEN};

/// A line of `/proc/PID/status`, in MiB (`VmHWM` is the peak resident set).
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_built_to_multiply_in_memory_keep_the_daemon_small() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, daemon, port, base, client) = start_binary(dir.path()).await;
    let pid = daemon.child.as_ref().unwrap().id();
    let at_start = status_mib(pid, "VmRSS:");

    // Four 15 MiB bodies at once, each a shape that once cost tens of times its size: an
    // array of numbers (a tree of values), an array of empty objects (the events fast path),
    // and the Braze-compatible arrays.
    let n = (15 << 20) / 2;
    let zeros = format!("[{}0]", "0,".repeat(n - 1));
    let empties = format!("[{}{{}}]", "{},".repeat(n / 3 * 2 - 1));
    let track = format!("{{\"events\":{zeros}}}");
    let sends = [
        ("/v1/memberships", zeros.clone()),
        ("/v1/events", empties),
        ("/v1/attributes", zeros),
        ("/users/track", track),
    ]
    .map(|(path, body)| {
        let client = client.clone();
        let url = format!("{base}{path}");
        tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (path, r.status().as_u16(), r.text().await.unwrap())
        })
    });
    for send in sends {
        let (path, status, text) = send.await.unwrap();
        assert_eq!(status, 400, "{path}: {text}");
    }

    // A body sent a byte a packet, on four connections at once.
    let piece = 512 * 1024;
    let event = r#"{"name":"e","external_id":"u1","time":"2026-01-01T00:00:00Z"}"#;
    let trickles = (0..4).map(|_| {
        let body = format!("{}{event}\n", " ".repeat(piece));
        tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.set_nodelay(true).unwrap();
            let head = format!(
                "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            for (i, b) in body.as_bytes().iter().enumerate() {
                s.write_all(std::slice::from_ref(b)).await.unwrap();
                if i % 64 == 0 {
                    // Let each byte leave as a packet of its own.
                    tokio::task::yield_now().await;
                }
            }
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            answer
        })
    });
    for t in trickles.collect::<Vec<_>>() {
        let answer = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }

    let peak = status_mib(pid, "VmHWM:");
    eprintln!("resident at start {at_start:.0} MiB, peak {peak:.0} MiB");
    assert!(peak < 256.0, "peak resident set {peak:.0} MiB");
}

/// Raises this test process's own open-file limit: it holds more connections than a
/// default shell's 1,024.
fn raise_own_file_limit(to: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= to,
        "this test needs an open-file hard limit of {to}, have {hard}"
    );
    let raised = Rlimit {
        current: Some(to.max(now.current.unwrap_or(0))),
        maximum: now.maximum,
    };
    setrlimit(Resource::Nofile, raised).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_under_a_small_file_limit_leave_room_for_a_good_request() {
    raise_own_file_limit(4096);
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_braze::FakeBraze::start(super::common::API_KEY)
        .await
        .unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &fake, port);
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // The daemon under the usual 1,024 open files, hard and soft.
    let child = std::process::Command::new("prlimit")
        .args(["--nofile=1024:1024", "--"])
        .arg(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env_remove("AIQ_SYNC_INGEST_TOKEN")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prlimit (util-linux) runs the daemon");
    let _daemon = Daemon {
        config,
        log: log_path.clone(),
        child: Some(child),
        starts: 1,
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    super::binary::wait_healthy(&client, &base).await;

    // 1,200 clients send a head, then a body byte every 5 s.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow: Vec<_> = (0..1200)
        .map(|_| {
            let (head, connected) = (head.clone(), connected.clone());
            tokio::spawn(async move {
                let Ok(Ok(mut s)) = tokio::time::timeout(
                    Duration::from_secs(30),
                    TcpStream::connect(("127.0.0.1", port)),
                )
                .await
                else {
                    return;
                };
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for _ in 0..1000 {
                    if s.write_all(b" ").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            })
        })
        .collect();
    // Until they all hold a connection (or wait in the backlog for one): more than the
    // daemon's 1,024 files could serve.
    let waiting = Instant::now();
    while connected.load(std::sync::atomic::Ordering::Relaxed) < 1150
        && waiting.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} slow clients connected in {:?}",
        connected.load(std::sync::atomic::Ordering::Relaxed),
        waiting.elapsed()
    );

    // A new connection, as a new client makes: not one left open by the health check.
    let fresh = http();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        fresh
            .post(format!("{base}/v1/events"))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/json")
            .body(r#"[{"name":"good","external_id":"u1","time":"2026-01-01T00:00:00Z"}]"#)
            .send(),
    )
    .await;
    let waited = started.elapsed();
    for s in slow {
        s.abort();
    }
    let answer = answer
        .unwrap_or_else(|_| {
            panic!(
                "a good request waited over 5 s behind 1,200 slow clients; log: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })
        .unwrap();
    eprintln!("the good request was answered in {waited:?}");
    assert_eq!(answer.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_answered_and_delivered_while_a_big_snapshot_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _daemon, _port, base, client) = start_binary(dir.path()).await;
    let members: String = (0..500_000)
        .map(|i| format!("{{\"external_id\":\"member-{i:07}\"}}\n"))
        .collect();
    let upload_started = Instant::now();
    let upload = {
        // A debug build takes a while over half a million members.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let url = format!("{base}/v1/audiences/a1/splits/s1/members");
        tokio::spawn(async move {
            let r = client
                .put(url)
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/x-ndjson")
                .body(members)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };

    // When each event reached Braze, looked for every 20 ms from the start.
    let watcher = {
        let fake = fake.clone();
        tokio::spawn(async move {
            let mut reached = std::collections::HashMap::new();
            loop {
                let now = Instant::now();
                for e in fake.events() {
                    if let Some(name) = e["name"].as_str() {
                        reached.entry(name.to_string()).or_insert(now);
                    }
                }
                if reached.contains_key("last") {
                    return reached;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // An event every 100 ms until the upload is answered (and at least 20).
    let mut answered = Vec::new();
    let mut sent = 0;
    let post = |name: String| {
        client
            .post(format!("{base}/v1/events"))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/json")
            .body(format!(
                r#"[{{"name":"{name}","external_id":"u1","time":"2026-01-01T00:00:00Z"}}]"#
            ))
            .send()
    };
    while !upload.is_finished() || sent < 20 {
        let name = format!("during-{sent}");
        let started = Instant::now();
        let r = post(name.clone()).await.unwrap();
        assert_eq!(r.status(), 202);
        answered.push((name, Instant::now(), started.elapsed()));
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(started.elapsed())).await;
    }
    let (status, text) = upload.await.unwrap();
    assert_eq!(status, 200, "{text}");
    eprintln!("the upload took {:?}: {text}", upload_started.elapsed());
    assert_eq!(post("last".into()).await.unwrap().status(), 202);
    let reached = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("the events reach Braze")
        .unwrap();

    let mut waits: Vec<Duration> = answered.iter().map(|(_, _, w)| *w).collect();
    waits.sort();
    let median = waits[waits.len() / 2];
    let slowest = *waits.last().unwrap();
    let to_braze = answered
        .iter()
        .map(|(name, at, _)| {
            reached
                .get(name)
                .map(|r| r.saturating_duration_since(*at))
                .unwrap_or_else(|| panic!("{name} never reached Braze"))
        })
        .max()
        .unwrap();
    eprintln!(
        "{} events during the upload: answered in median {median:?}, at most {slowest:?}; \
         at Braze within {to_braze:?}",
        answered.len()
    );
    // The goals (a median under 100 ms, every answer within 1 s, at Braze within 2 s) are
    // measured in a release build by `benches/event_latency.rs`; a debug build on two cores
    // spends most of its time elsewhere. Bounds a debug build keeps, and which a snapshot
    // handled on the runtime's thread broke by seconds:
    assert!(
        slowest < Duration::from_secs(2),
        "slowest {slowest:?}, median {median:?}"
    );
    assert!(to_braze < Duration::from_secs(3), "to Braze {to_braze:?}");
}
