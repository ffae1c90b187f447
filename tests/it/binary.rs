//! The real binary as a child process: started from a config file, killed with SIGKILL or
//! stopped with SIGTERM, and asked through its `queue` commands. Shared by the crash and
//! power-loss tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_braze::FakeBraze;

use crate::common::*;

/// The real binary, started with a config file; killed with SIGKILL by `kill`.
pub struct Daemon {
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub starts: u32,
}

/// A test that fails half-way must not leave its daemon running after the test binary ends.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    pub fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .args(["--config", self.config.to_str().unwrap(), "run"])
            .env_remove("BRAZE_API_KEY")
            .env_remove("BRAZE_REST_ENDPOINT")
            .env_remove("AIQ_SYNC_INGEST_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
    }

    /// Waits until the daemon answers `/healthz`. If it exits first (say, an operator's
    /// `queue` command opened the database in the moment it was down), it is started again,
    /// as systemd's `Restart=on-failure` would.
    pub async fn until_healthy(&mut self, client: &reqwest::Client, base: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() {
                self.child = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.spawn();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "daemon not healthy within 60 s; log: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
            c.wait().unwrap();
        }
    }

    pub fn sigterm(&mut self) -> i32 {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap().code().unwrap_or(-1)
    }
}

pub fn write_config(dir: &Path, fake: &FakeBraze, port: u16) -> PathBuf {
    write_config_at(dir, &dir.join("data"), fake, port)
}

/// A config file in `dir` for a daemon keeping its queue in `data_dir`.
pub fn write_config_at(dir: &Path, data_dir: &Path, fake: &FakeBraze, port: u16) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\nrequest_timeout_ms = 5000\n\
             [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n\
             [delivery]\nworkers = 4\nbackoff_initial_ms = 20\nbackoff_max_ms = 300\n[queue]\ncache_mb = 16\n\
             [update_existing_only]\nmemberships = false\n",
            data_dir,
            fake.url()
        ),
    )
    .unwrap();
    path
}

/// A fake Braze and the real binary talking to it on a free port, healthy.
pub async fn start_binary(dir: &Path) -> (FakeBraze, Daemon, u16, String, reqwest::Client) {
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let mut daemon = Daemon {
        config: write_config(dir, &fake, port),
        log: dir.join("daemon.log"),
        child: None,
        starts: 0,
    };
    daemon.spawn();
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    wait_healthy(&client, &base).await;
    (fake, daemon, port, base, client)
}

pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("daemon not healthy within 30 s");
}

/// What an operator's `queue …` command prints as JSON (the daemon answers it when running).
pub fn cli_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .args(["--config", config.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}
