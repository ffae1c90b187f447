//! The daemon against syslog-ng on the same workload, end to end into a Braze stand-in. By
//! hand; not part of CI:
//!
//! ```sh
//! apt-get install -y syslog-ng-core syslog-ng-mod-http   # Debian 12: syslog-ng 3.38 and its http()
//! cargo build --release
//! cargo bench --bench versus_syslog_ng                   # 200,000 records, one run of each
//! cargo bench --bench versus_syslog_ng -- --runs 2 --records 200000 --writers 4 --per-request 500
//! cargo bench --bench versus_syslog_ng -- --aiq-bin /path/to/aiq-braze-sync --peers aiq-braze-sync
//! ```
//!
//! syslog-ng is what a user might run instead: a durable log forwarder whose `http()`
//! destination, behind a disk buffer with `reliable(yes)` and flow control, can post batches
//! of 75 JSON lines to `/users/track`. Without syslog-ng (or its `http` module) installed, the
//! bench says so and exits 0 without measuring.
//!
//! **Workload.** `--records` Braze event objects of about 200 bytes (`external_id`, `name`,
//! `time`, and `properties` carrying a unique integer `id`). Both peers get the same bytes:
//!
//! - syslog-ng tails an NDJSON file written (and synced) before it starts: a file is its
//!   most durable input, because it keeps its read position in its persist file and moves
//!   it only once a line is in the disk buffer. Its clock starts when it is spawned, so its
//!   own start is inside its time.
//! - aiq-braze-sync (the release binary, `--config FILE run`) takes them over HTTP: the same
//!   lines as NDJSON bodies of `--per-request` records to `POST /v1/events`, from `--writers`
//!   concurrent clients, each request resent until it gets its 2xx. The daemon is started
//!   and healthy first (its own start is not timed); the clock starts at the first POST.
//!   Bodies are built before the clock starts, as syslog-ng's file is.
//!
//! **Sink.** Both deliver to a stand-in for Braze in this process, on a thread of its own;
//! each peer run gets a fresh one, and a fresh temporary directory (`--dir`, default the
//! system's), so both peers write to the same disk. By default it is the workspace's
//! `fake-braze`, which checks the API key, the 75-objects rule and every event object as
//! Braze does and keeps what it accepts; that takes CPU on the cores the peers run on, and
//! time in every answer. `--sink counting` puts a stand-in of this file in its place, which
//! checks the key, the 75 objects and each event's required fields, counts ids and keeps
//! nothing else. The sink changes the result (a cheaper one speeds both peers up, and ours
//! far more): compare runs made with the same one.
//!
//! **Configuration.** syslog-ng (written by [`syslog_ng_config`]): `file()` source, the
//! `http()` destination with `batch-lines(75)`, one worker (its default; `--syslog-workers`),
//! a disk buffer with `reliable(yes)`, and flow control on the log path. aiq-braze-sync:
//! a fresh data directory, the sink as `braze.endpoint`, an ingest token, and
//! `delivery.workers = 4` (`--aiq-workers`): the default, 256, is sized for Braze's real
//! latency, and against a sink on loopback it only adds requests in flight.
//!
//! **Measured**, per peer and run:
//! - records/s end to end: records ÷ (the moment the sink holds every id − clock start);
//! - ingest records/s (our daemon only): records ÷ (last 2xx − first POST), i.e. how fast it
//!   durably accepts them;
//! - CPU s: the peer process's utime + stime (`/proc/PID/stat`) from its spawn until the sink
//!   holds every record; µs per record; peak RSS (`VmHWM`);
//! - at the sink, one second after the last record (to catch late duplicates): requests and
//!   objects per request, records lost (ids never received) and duplicated (extra deliveries);
//! - driver CPU s: this process's own CPU over the same span (the sink, and the writers for
//!   our daemon), which the peer shares the cores with.
//!
//! With `--runs R` the two peers alternate which goes first. Every process started here is
//! stopped at the end of its run, on error too, and gets SIGTERM if this process dies first.
//! The machine is shared by the peer, the sink and the writers: read the ratio between the
//! peers of one run, not the absolute rates.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::future::IntoFuture;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use fake_braze::FakeBraze;

const USAGE: &str = "\
usage: cargo bench --bench versus_syslog_ng -- [options]
  --records N        records per peer and run (200000)
  --writers N        concurrent HTTP clients posting to aiq-braze-sync (4)
  --per-request N    records per POST /v1/events (500)
  --runs N           runs of both peers, alternating which goes first (1)
  --peers LIST       aiq-braze-sync,syslog-ng (both)
  --aiq-bin PATH     the daemon binary (the one cargo built: target/release/aiq-braze-sync)
  --aiq-workers N    the daemon's delivery.workers, or `default` for its own default (4)
  --syslog-ng PATH   the syslog-ng binary (found on PATH or in /usr/sbin)
  --syslog-workers N http() workers, each with its own connection (1, syslog-ng's default)
  --dir DIR          where the temporary directories go (the system's temp dir)
  --sink KIND        fake-braze (the workspace's) or counting (this file's, far cheaper)
  --timeout-s N      give up on a peer run after this long (180)
  --keep             keep the temporary directories (configs, logs, queues) and print them";

/// Braze's limit, and what both peers are held to: objects per `/users/track` request.
const BATCH: usize = 75;
/// Bytes per record, newline included.
const RECORD_BYTES: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Aiq,
    SyslogNg,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Aiq => "aiq-braze-sync",
            Peer::SyslogNg => "syslog-ng",
        }
    }
}

struct Args {
    records: u64,
    writers: usize,
    per_request: usize,
    runs: usize,
    peers: Vec<Peer>,
    aiq_bin: PathBuf,
    aiq_workers: Option<u32>,
    syslog_ng: Option<PathBuf>,
    syslog_workers: u32,
    dir: PathBuf,
    timeout: Duration,
    keep: bool,
    sink: SinkKind,
}

fn args() -> Result<Args> {
    let mut a = Args {
        records: 200_000,
        writers: 4,
        per_request: 500,
        runs: 1,
        peers: vec![Peer::SyslogNg, Peer::Aiq],
        aiq_bin: PathBuf::from(env!("CARGO_BIN_EXE_aiq-braze-sync")),
        aiq_workers: Some(4),
        syslog_ng: None,
        syslog_workers: 1,
        dir: std::env::temp_dir(),
        timeout: Duration::from_secs(180),
        keep: false,
        sink: SinkKind::FakeBraze,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--bench" {
            continue; // cargo bench passes it to every harness-less bench
        }
        if flag == "--keep" {
            a.keep = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = argv
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || -> Result<u64> {
            let n: u64 = value
                .parse()
                .with_context(|| format!("{flag} takes a number, got {value:?}"))?;
            if n == 0 {
                bail!("{flag} must be at least 1");
            }
            Ok(n)
        };
        match flag.as_str() {
            "--records" => a.records = number()?,
            "--writers" => a.writers = number()? as usize,
            "--per-request" => a.per_request = number()? as usize,
            "--runs" => a.runs = number()? as usize,
            "--aiq-workers" if value == "default" => a.aiq_workers = None,
            "--aiq-workers" => a.aiq_workers = Some(number()? as u32),
            "--syslog-workers" => a.syslog_workers = number()? as u32,
            "--timeout-s" => a.timeout = Duration::from_secs(number()?),
            "--aiq-bin" => a.aiq_bin = PathBuf::from(&value),
            "--syslog-ng" => a.syslog_ng = Some(PathBuf::from(&value)),
            "--dir" => a.dir = PathBuf::from(&value),
            "--sink" => {
                a.sink = match value.as_str() {
                    "fake-braze" => SinkKind::FakeBraze,
                    "counting" => SinkKind::Counting,
                    other => bail!("unknown sink {other:?}: fake-braze or counting"),
                }
            }
            "--peers" => {
                a.peers = Vec::new();
                for name in value.split(',') {
                    a.peers.push(match name.trim() {
                        "aiq-braze-sync" | "aiq" => Peer::Aiq,
                        "syslog-ng" => Peer::SyslogNg,
                        other => bail!("unknown peer {other:?}: aiq-braze-sync or syslog-ng"),
                    });
                }
            }
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// Record `i` as one NDJSON line of [`RECORD_BYTES`]: a Braze event object whose
/// `properties.id` is `i`, padded to size.
fn record(i: u64) -> String {
    let line = |pad: &str| {
        format!(
            "{{\"external_id\":\"user-{:07}\",\"name\":\"purchase\",\"time\":\"2026-11-28T{:02}:{:02}:{:02}Z\",\
             \"properties\":{{\"id\":{i},\"sku\":\"SKU-{:06}\",\"price\":19.5,\"currency\":\"EUR\",\"note\":\"{pad}\"}}}}\n",
            i % 1_000_000,
            (i / 3600) % 24,
            (i / 60) % 60,
            i % 60,
            i % 999_983,
        )
    };
    let short = line("").len();
    line(&"x".repeat(RECORD_BYTES.saturating_sub(short)))
}

// ------------------------------------------------------------------------------------ sink

/// Which stand-in for Braze the peers deliver to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    /// The workspace's `fake-braze`: every Braze rule checked, every object kept.
    FakeBraze,
    /// This file's counter: Braze's key and 75-objects checks, the events' required fields,
    /// and a count per id; as little CPU as a sink can take.
    Counting,
}

/// A fresh stand-in on a thread and runtime of its own, so that answering does not wait
/// behind the writers (or the other way round). Stopped when dropped.
struct Sink {
    url: String,
    state: SinkState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum SinkState {
    FakeBraze(FakeBraze, u64),
    Counting(Arc<Counter>),
}

/// What the sink has taken, for ids `0..n`.
#[derive(Clone, Default)]
struct Seen {
    /// Deliveries of each id.
    copies: Vec<u32>,
    unique: u64,
    /// Deliveries after an id's first.
    duplicated: u64,
    /// Events whose `properties.id` is not one of ours.
    foreign: u64,
    /// When the last id still missing arrived (the request that carried it).
    complete_at: Option<Instant>,
    requests: u64,
    /// Requests answered with anything but a 2xx.
    refused: u64,
    max_objects: usize,
}

impl Seen {
    fn new(n: u64) -> Seen {
        Seen {
            copies: vec![0; n as usize],
            ..Seen::default()
        }
    }

    fn event(&mut self, id: Option<u64>, at: Instant) {
        match id.and_then(|id| self.copies.get_mut(id as usize)) {
            None => self.foreign += 1,
            Some(copies) => {
                *copies += 1;
                if *copies > 1 {
                    self.duplicated += 1;
                    return;
                }
                self.unique += 1;
                if self.unique == self.copies.len() as u64 {
                    self.complete_at = Some(at);
                }
            }
        }
    }
}

impl Sink {
    fn start(kind: SinkKind, key: &str, n: u64) -> Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let key = key.to_owned();
        let serve = async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let stopped = async move { drop(stop_rx.await) };
            match kind {
                SinkKind::FakeBraze => match FakeBraze::start_on(listener, &key).await {
                    Ok(fake) => {
                        let _ = ready_tx.send(Ok(SinkState::FakeBraze(fake.clone(), n)));
                        stopped.await;
                        fake.stop();
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                },
                SinkKind::Counting => {
                    let counter = Arc::new(Counter {
                        key,
                        seen: Mutex::new(Seen::new(n)),
                    });
                    let app = axum::Router::new()
                        .route("/users/track", axum::routing::post(count))
                        .with_state(counter.clone());
                    let _ = ready_tx.send(Ok(SinkState::Counting(counter)));
                    // Stopping ends the runtime, and with it every connection still open.
                    tokio::select! {
                        Err(e) = axum::serve(listener, app).into_future() => {
                            eprintln!("versus_syslog_ng: the sink stopped: {e}")
                        }
                        () = stopped => {}
                    }
                }
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || runtime.block_on(serve))?;
        let state = ready_rx.recv().context("the sink's thread died")??;
        Ok(Sink {
            url,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// A cheap count that reaches `n` no later than the sink holds every id.
    fn progress(&self) -> u64 {
        match &self.state {
            SinkState::FakeBraze(fake, _) => {
                let requests = fake.requests();
                let ok = requests.iter().filter(|r| (200..300).contains(&r.status));
                ok.map(|r| r.objects as u64).sum()
            }
            SinkState::Counting(counter) => counter.seen.lock().unwrap().unique,
        }
    }

    /// Everything the sink holds; for `fake-braze` it goes through every object.
    fn seen(&self) -> Seen {
        match &self.state {
            SinkState::Counting(counter) => counter.seen.lock().unwrap().clone(),
            SinkState::FakeBraze(fake, n) => {
                let mut seen = Seen::new(*n);
                for (at, event) in fake.events_with_arrival() {
                    seen.event(event.pointer("/properties/id").and_then(|v| v.as_u64()), at);
                }
                for request in fake.requests() {
                    seen.requests += 1;
                    seen.refused += u64::from(!(200..300).contains(&request.status));
                    seen.max_objects = seen.max_objects.max(request.objects);
                }
                seen
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Counter {
    key: String,
    seen: Mutex<Seen>,
}

/// A `/users/track` body as far as [`SinkKind::Counting`] reads it: the three arrays, and
/// of each event what Braze requires (`external_id`, `name`, `time`, `properties`) and our
/// `id`.
#[derive(serde::Deserialize)]
struct TrackBody<'a> {
    #[serde(default)]
    attributes: Vec<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    events: Vec<Event<'a>>,
    #[serde(default)]
    purchases: Vec<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    external_id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    time: Cow<'a, str>,
    properties: Properties,
}

#[derive(serde::Deserialize)]
struct Properties {
    id: u64,
}

/// [`SinkKind::Counting`]'s `/users/track`: 401 without the key; 400 for a body that is not
/// Braze's, holds more than 75 objects or an event with an empty identifier, name or time;
/// else 201, and each event counted.
async fn count(
    axum::extract::State(counter): axum::extract::State<Arc<Counter>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let at = Instant::now();
    let key = headers.get("authorization").and_then(|v| v.to_str().ok());
    let authorised = key.and_then(|k| k.strip_prefix("Bearer ")) == Some(counter.key.as_str());
    let parsed = serde_json::from_slice::<TrackBody>(&body);
    let objects = |b: &TrackBody| b.attributes.len() + b.events.len() + b.purchases.len();
    let blank = |e: &Event| e.external_id.is_empty() || e.name.is_empty() || e.time.is_empty();
    let (status, message) = match &parsed {
        _ if !authorised => (StatusCode::UNAUTHORIZED, "Invalid API key"),
        Ok(b) if objects(b) > BATCH => (StatusCode::BAD_REQUEST, "Max Input Length Exceeded"),
        Ok(b) if !b.events.iter().any(blank) => (StatusCode::CREATED, "success"),
        _ => (StatusCode::BAD_REQUEST, "Bad Request"),
    };
    let mut seen = counter.seen.lock().unwrap();
    seen.requests += 1;
    let events = match parsed {
        Ok(b) if status == StatusCode::CREATED => {
            seen.max_objects = seen.max_objects.max(objects(&b));
            for event in &b.events {
                seen.event(Some(event.properties.id), at);
            }
            b.events.len()
        }
        _ => {
            seen.refused += 1;
            0
        }
    };
    drop(seen);
    let answer = match status {
        StatusCode::CREATED => format!("{{\"message\":\"success\",\"events_processed\":{events}}}"),
        _ => format!("{{\"message\":\"{message}\"}}"),
    };
    (status, [("content-type", "application/json")], answer).into_response()
}

// ------------------------------------------------------------------------------- processes

/// A peer process. Dropped without [`Proc::stop`] (an error, a panic), it is killed.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env_remove("NOTIFY_SOCKET");
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // signal follows the thread that spawned it: every spawn happens on the main thread.
        unsafe {
            cmd.pre_exec(|| {
                let term = Some(rustix::process::Signal::TERM);
                rustix::process::set_parent_process_death_signal(term).map_err(Into::into)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc { child, name, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Err (with the end of its log) if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("last lines of its log:\n{tail}")
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(&mut self, grace: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("{} ignored SIGTERM for {grace:?}; killed", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds (user + system, all threads) and peak RSS in MB of a running process.
fn cpu_and_peak(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces:
    // state is the first, utime the 12th and stime the 13th; in USER_HZ, 100 on Linux.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, peak_kb / 1024.0)
}

/// Writes a file only its owner can read: the configs hold a key (the daemon warns otherwise).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A peer run's directory: removed afterwards unless `--keep`.
fn run_dir(a: &Args, peer: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("versus-{peer}-"))
        .disable_cleanup(a.keep)
        .tempdir_in(&a.dir)?;
    if a.keep {
        println!("{peer}: kept in {}", dir.path().display());
    }
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).fold(String::new(), |mut s, _| {
        let _ = write!(s, "{:02x}", fastrand::u8(..));
        s
    })
}

// -------------------------------------------------------------------------------- outcome

struct Outcome {
    peer: Peer,
    run: usize,
    records: u64,
    end_to_end: Duration,
    ingest: Option<Duration>,
    cpu_s: f64,
    peak_mb: f64,
    /// This process's CPU over the same span: the sink, and for our daemon the writers.
    driver_cpu_s: f64,
    seen: Seen,
    /// Our daemon: records whose request never got a 2xx.
    not_acked: u64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.records as f64 / self.end_to_end.as_secs_f64()
    }
}

/// The peer's CPU s and peak RSS MB, and this process's CPU s, sampled together.
struct Sample {
    cpu_s: f64,
    peak_mb: f64,
    driver_cpu_s: f64,
}

fn sample(peer: &Proc) -> Sample {
    let (cpu_s, peak_mb) = cpu_and_peak(peer.pid());
    let driver_cpu_s = cpu_and_peak(std::process::id()).0;
    Sample {
        cpu_s,
        peak_mb,
        driver_cpu_s,
    }
}

/// Polls the sink until it holds every id; returns the sample taken then. Fails if the peer
/// exits or `deadline` passes.
async fn until_delivered(
    sink: &Sink,
    n: u64,
    peer: &mut Proc,
    deadline: Instant,
) -> Result<Sample> {
    let mut checked_at = 0;
    loop {
        peer.check_alive()?;
        // The cheap count first; the full check only once it could pass, and again only
        // after more has arrived.
        let progress = sink.progress();
        if progress >= n && progress > checked_at {
            let at_completion = sample(peer);
            if sink.seen().complete_at.is_some() {
                return Ok(at_completion);
            }
            checked_at = progress;
        }
        if Instant::now() > deadline {
            let unique = sink.seen().unique;
            bail!(
                "{}: the sink holds {unique} of {n} records after the timeout",
                peer.name
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What is left for the report once the sink has every record: a pause for late
/// duplicates, then the peer is stopped and the sink counted.
async fn settle(sink: &Sink, peer: &mut Proc) -> Result<Seen> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    peer.stop(Duration::from_secs(20))?;
    Ok(sink.seen())
}

// ----------------------------------------------------------------------- aiq-braze-sync

/// How the writers fared.
#[derive(Default)]
struct Ingest {
    acked: u64,
    last_ack: Option<Instant>,
    /// A 4xx other than 408/429: the request can never succeed.
    refused: Option<String>,
}

/// Posts every body from `writers` concurrent clients, each request until it gets a 2xx.
async fn post_all(
    url: String,
    token: String,
    bodies: Arc<Vec<(u64, Bytes)>>,
    writers: usize,
    deadline: Instant,
) -> Result<Ingest> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(writers)
        .timeout(Duration::from_secs(30))
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let ingest = Arc::new(Mutex::new(Ingest::default()));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        let (bodies, next, ingest) = (bodies.clone(), next.clone(), ingest.clone());
        tasks.push(tokio::spawn(async move {
            while let Some((records, body)) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                while Instant::now() < deadline {
                    let sent = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await;
                    let mut pause = Duration::from_millis(100);
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            let mut i = ingest.lock().unwrap();
                            i.acked += records;
                            i.last_ack = Some(Instant::now());
                            break;
                        }
                        Ok(r) if matches!(r.status().as_u16(), 408 | 429 | 500..) => {
                            let after = r.headers().get("retry-after");
                            let secs = after.and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                            if let Some(s) = secs {
                                pause = Duration::from_secs_f64(s.clamp(0.1, 2.0));
                            }
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            ingest.lock().unwrap().refused = Some(format!("{status} {text}"));
                            return;
                        }
                        Err(_) => {} // refused or reset: try again shortly
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let mut ingest = ingest.lock().unwrap();
    Ok(std::mem::take(&mut *ingest))
}

async fn run_aiq(a: &Args, run: usize, bodies: &Arc<Vec<(u64, Bytes)>>) -> Result<Outcome> {
    let dir = run_dir(a, "aiq-braze-sync")?;
    let key = format!("bench-{}", random_hex(12));
    let token = random_hex(24);
    let sink = Sink::start(a.sink, &key, a.records)?;
    let port = free_port()?;
    let data = dir.path().join("data");
    let mut config = format!(
        "data_dir = {data:?}\n\n[braze]\nendpoint = {:?}\napi_key = {key:?}\n\n\
         [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {token:?}\n",
        sink.url
    );
    if let Some(w) = a.aiq_workers {
        config.push_str(&format!("\n[delivery]\nworkers = {w}\n"));
    }
    let config_path = dir.path().join("aiq-braze-sync.toml");
    write_private(&config_path, &config)?;
    rustix::fs::sync();

    let mut cmd = Command::new(&a.aiq_bin);
    cmd.arg("--config").arg(&config_path).arg("run");
    // The environment would override the config.
    for var in [
        "BRAZE_REST_ENDPOINT",
        "BRAZE_API_KEY",
        "AIQ_SYNC_INGEST_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    let mut daemon = Proc::spawn("aiq-braze-sync", cmd, dir.path().join("daemon.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let health = reqwest::Client::builder().no_proxy().build()?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        daemon.check_alive()?;
        let r = health.get(format!("{base}/healthz")).send().await;
        if r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > ready_by {
            bail!(
                "aiq-braze-sync: /healthz not 200 within 60 s; {}",
                daemon.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let driver_cpu_before = cpu_and_peak(std::process::id()).0;
    let deadline = started + a.timeout;
    let writers = tokio::spawn(post_all(
        format!("{base}/v1/events"),
        token,
        bodies.clone(),
        a.writers,
        deadline,
    ));
    let delivered = until_delivered(&sink, a.records, &mut daemon, deadline).await;
    if delivered.is_err() {
        writers.abort();
    }
    let at_completion = delivered?;
    let ingest = writers.await??;
    let seen = settle(&sink, &mut daemon).await?;
    if let Some(refused) = &ingest.refused {
        bail!("aiq-braze-sync refused a request: {refused}");
    }
    let complete_at = seen.complete_at.context("records went missing")?;
    let ingest_time = (ingest.acked == a.records)
        .then_some(ingest.last_ack)
        .flatten()
        .map(|at| at - started);
    Ok(Outcome {
        peer: Peer::Aiq,
        run,
        records: a.records,
        end_to_end: complete_at - started,
        ingest: ingest_time,
        cpu_s: at_completion.cpu_s,
        peak_mb: at_completion.peak_mb,
        driver_cpu_s: at_completion.driver_cpu_s - driver_cpu_before,
        not_acked: a.records - ingest.acked,
        seen,
    })
}

// ------------------------------------------------------------------------------ syslog-ng

/// syslog-ng's binary, the `@version` its config should carry, or why it cannot run here.
fn find_syslog_ng(given: Option<&Path>) -> std::result::Result<(PathBuf, String), String> {
    const INSTALL: &str = "apt-get install -y syslog-ng-core syslog-ng-mod-http";
    let bin = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs =
                std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]);
            let found = dirs.map(|d| d.join("syslog-ng")).find(|p| p.is_file());
            found.ok_or_else(|| {
                format!("syslog-ng is not installed ({INSTALL}, or --syslog-ng PATH)")
            })?
        }
    };
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not run: {e} ({INSTALL})", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let modules = field("Available-Modules:").unwrap_or_default();
    for module in ["affile", "http", "disk-buffer"] {
        if !modules.split(',').any(|m| m.trim() == module) {
            return Err(format!("syslog-ng lacks its {module} module ({INSTALL})"));
        }
    }
    let version = field("Config version:").ok_or("syslog-ng --version names no config version")?;
    Ok((bin, version))
}

/// syslog-ng's configuration for one run: the input file, a disk buffer that acknowledges a
/// line to the source only once it is written (`reliable(yes)`) and flow control, so that
/// the file position moves only past lines that are safe; then `http()` posting Braze
/// bodies of up to 75 lines to the sink.
fn syslog_ng_config(
    version: &str,
    input: &Path,
    state: &Path,
    url: &str,
    key: &str,
    workers: u32,
) -> String {
    let input = input.display();
    let buffer = state.join("buffer");
    let buffer = buffer.display();
    format!(
        r#"@version: {version}
# Written by benches/versus_syslog_ng.rs for one run.
options {{
  stats-freq(0);
  log-msg-size(8192);
}};

# Every line is one Braze event object, taken whole as the message.
source s_records {{
  file("{input}"
       flags(no-parse)
       follow-freq(0.05)
       log-fetch-limit(1500)
       log-iw-size(30000));
}};

destination d_braze {{
  http(
    url("{url}/users/track")
    method("POST")
    headers("Content-Type: application/json", "Authorization: Bearer {key}")
    body-prefix('{{"events":[')
    body("${{MSG}}")
    delimiter(",")
    body-suffix("]}}")
    batch-lines({BATCH})
    workers({workers})
    # A partial batch waits at most 10 ms for more lines, then goes as it is: full batches
    # while lines keep coming, and no long wait for the last one.
    batch-timeout(10)
    timeout(30)
    # After a failed request, wait a second and try the same batch again.
    time-reopen(1)
    disk-buffer(
      reliable(yes)
      dir("{buffer}")
      disk-buf-size(536870912)
      mem-buf-size(33554432)
    )
  );
}};

log {{ source(s_records); destination(d_braze); flags(flow-control); }};
"#
    )
}

async fn run_syslog_ng(
    a: &Args,
    run: usize,
    bin: &Path,
    version: &str,
    input: &[u8],
) -> Result<Outcome> {
    let dir = run_dir(a, "syslog-ng")?;
    let key = format!("bench-{}", random_hex(12));
    let sink = Sink::start(a.sink, &key, a.records)?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("buffer"))?;
    let input_path = dir.path().join("records.ndjson");
    let mut f = std::fs::File::create(&input_path)?;
    f.write_all(input)?;
    f.sync_all()?;
    drop(f);
    let config_path = dir.path().join("syslog-ng.conf");
    let url = &sink.url;
    let config = syslog_ng_config(version, &input_path, &state, url, &key, a.syslog_workers);
    write_private(&config_path, &config)?;
    rustix::fs::sync();

    let mut cmd = Command::new(bin);
    cmd.args(["--foreground", "--stderr", "--no-caps", "--cfgfile"])
        .arg(&config_path)
        .arg("--persist-file")
        .arg(state.join("syslog-ng.persist"))
        .arg("--pidfile")
        .arg(state.join("syslog-ng.pid"))
        .arg("--control")
        .arg(state.join("syslog-ng.ctl"));
    let started = Instant::now();
    let driver_cpu_before = cpu_and_peak(std::process::id()).0;
    let mut peer = Proc::spawn("syslog-ng", cmd, dir.path().join("syslog-ng.log"))?;
    let deadline = started + a.timeout;
    let at_completion = until_delivered(&sink, a.records, &mut peer, deadline).await?;
    let seen = settle(&sink, &mut peer).await?;
    let complete_at = seen.complete_at.context("records went missing")?;
    Ok(Outcome {
        peer: Peer::SyslogNg,
        run,
        records: a.records,
        end_to_end: complete_at - started,
        ingest: None,
        cpu_s: at_completion.cpu_s,
        peak_mb: at_completion.peak_mb,
        driver_cpu_s: at_completion.driver_cpu_s - driver_cpu_before,
        not_acked: 0,
        seen,
    })
}

// ----------------------------------------------------------------------------------- main

fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| run | peer | records/s end to end | ingest records/s | CPU s | CPU µs/record | peak RSS MB \
         | requests (not 2xx) | objects/request mean / max | lost | duplicated | driver CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let ingest = o.ingest.map_or("-".into(), |d| {
            thousands(o.records as f64 / d.as_secs_f64())
        });
        let seen = &o.seen;
        let ok = seen.requests - seen.refused;
        let delivered = seen.unique + seen.duplicated + seen.foreign;
        let mut lost = (o.records - seen.unique).to_string();
        if o.not_acked > 0 {
            lost.push_str(&format!(" ({} never acked)", o.not_acked));
        }
        let mut duplicated = seen.duplicated.to_string();
        if seen.foreign > 0 {
            duplicated.push_str(&format!(" (+{} not ours)", seen.foreign));
        }
        let _ = writeln!(
            t,
            "| {} | {} | {} | {ingest} | {:.2} | {:.1} | {:.1} | {} ({}) | {:.1} / {} | {lost} | {duplicated} | {:.2} |",
            o.run,
            o.peer.name(),
            thousands(o.rate()),
            o.cpu_s,
            o.cpu_s / o.records as f64 * 1e6,
            o.peak_mb,
            seen.requests,
            seen.refused,
            delivered as f64 / ok.max(1) as f64,
            seen.max_objects,
            o.driver_cpu_s,
        );
    }
    t
}

fn ratios(outcomes: &[Outcome], runs: usize) -> String {
    let mut out = String::new();
    for run in 1..=runs {
        let of = |p: Peer| outcomes.iter().find(|o| o.run == run && o.peer == p);
        if let (Some(aiq), Some(sng)) = (of(Peer::Aiq), of(Peer::SyslogNg)) {
            let _ = writeln!(
                out,
                "run {run}: aiq-braze-sync ÷ syslog-ng = {:.2}× the records/s end to end, {:.2}× the CPU s",
                aiq.rate() / sng.rate(),
                aiq.cpu_s / sng.cpu_s
            );
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = bench().await {
        eprintln!("versus_syslog_ng: {e:#}");
        std::process::exit(1);
    }
}

async fn bench() -> Result<()> {
    let a = args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let syslog_ng = if a.peers.contains(&Peer::SyslogNg) {
        match find_syslog_ng(a.syslog_ng.as_deref()) {
            Ok(found) => Some(found),
            Err(why) => {
                println!("versus_syslog_ng: skipped: {why}");
                return Ok(());
            }
        }
    } else {
        None
    };
    if a.peers.contains(&Peer::Aiq) && !a.aiq_bin.is_file() {
        bail!(
            "{} is missing: cargo build --release, or --aiq-bin PATH",
            a.aiq_bin.display()
        );
    }

    let mut input = Vec::with_capacity(a.records as usize * RECORD_BYTES);
    let mut bodies = Vec::new();
    let mut start = 0;
    while start < a.records {
        let end = (start + a.per_request as u64).min(a.records);
        let body: String = (start..end).map(record).collect();
        input.extend_from_slice(body.as_bytes());
        bodies.push((end - start, Bytes::from(body)));
        start = end;
    }
    let bodies = Arc::new(bodies);
    println!(
        "versus_syslog_ng: {} records of {RECORD_BYTES} bytes per peer and run, sink {}; aiq-braze-sync: {} writers, {} records a request, {}; syslog-ng: {}",
        a.records,
        match a.sink {
            SinkKind::FakeBraze => "fake-braze",
            SinkKind::Counting => "counting",
        },
        a.writers,
        a.per_request,
        a.aiq_bin.display(),
        syslog_ng.as_ref().map_or("-".into(), |(b, v)| format!("{} (config version {v})", b.display())),
    );

    let mut outcomes = Vec::new();
    for run in 1..=a.runs {
        let mut order = a.peers.clone();
        if run % 2 == 0 {
            order.reverse();
        }
        for peer in order {
            let outcome = match peer {
                Peer::Aiq => run_aiq(&a, run, &bodies).await,
                Peer::SyslogNg => {
                    let (bin, version) = syslog_ng.as_ref().expect("found above");
                    run_syslog_ng(&a, run, bin, version, &input).await
                }
            }
            .with_context(|| format!("run {run}, {}", peer.name()))?;
            println!(
                "run {run}, {}: {} records/s end to end, {:.2} CPU s",
                peer.name(),
                thousands(outcome.rate()),
                outcome.cpu_s
            );
            outcomes.push(outcome);
        }
    }
    println!("\n{}\n{}", table(&outcomes), ratios(&outcomes, a.runs));
    Ok(())
}
