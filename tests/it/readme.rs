//! The README's examples, run as written against the real binary and the fake Braze.
//!
//! Every ```sh block that talks to the daemon (`localhost:8080`) or runs a command with
//! `--config FILE` is run by `bash -e`, with the port, the token, the binary and the config
//! file filled in, and `curl` made to fail on an HTTP error. The other blocks are covered
//! elsewhere: the two commands by CI itself and `newcomer.rs` (the demo), the example config
//! by `newcomer.rs`, and the systemd install notes by `systemd-analyze` in `.ci/run`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fake_braze::FakeBraze;

use crate::common::*;

/// The README's shell blocks that these tests run, in order.
fn runnable_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
        .into_iter()
        .filter(|b| b.contains("localhost:8080") || b.contains("--config FILE"))
        .filter(|b| !b.contains("systemctl") && !b.contains("install "))
        .collect()
}

/// The sample files the examples name, in `dir`.
fn sample_files(dir: &Path) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    for name in ["audience_export.csv", "events.ndjson"] {
        std::fs::copy(repo.join(name), data.join(name)).unwrap();
    }
    std::fs::write(
        dir.join("export.csv"),
        "name,external_id,time,sku\npurchase,customer-7,2026-11-28T10:00:00Z,A1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("traits.csv"),
        "external_id,tier,ltv:number,vip:boolean,signup:date,tags:array\n\
         customer-7,gold,1234.5,yes,2024-05-01,a;b\ncustomer-9,,12,no,,\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("audience-1042-1.csv"),
        "external_id\ncustomer-7\ncustomer-8\n",
    )
    .unwrap();
}

fn start(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env_remove("BRAZE_API_KEY")
        .env_remove("BRAZE_REST_ENDPOINT")
        .env_remove("AIQ_SYNC_INGEST_TOKEN")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_example_in_the_readme_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    assert!(
        blocks.len() >= 6,
        "the README's examples were not found: {blocks:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    sample_files(dir.path());
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n\
             [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n\
             [delivery]\nbackoff_initial_ms = 20\nbackoff_max_ms = 300\n",
            dir.path().join("data-dir"),
            fake.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut daemon = start(&config, &log);
    let healthy = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(
        healthy,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let bin = env!("CARGO_BIN_EXE_aiq-braze-sync");
    let prelude = format!(
        "set -e\n\
         curl() {{ command curl -sS --fail-with-body \"$@\"; echo; }}\n\
         some-export-job() {{ cat data/events.ndjson; }}\n\
         aiq-braze-sync() {{ {bin:?} \"$@\"; }}\n"
    );
    for block in blocks {
        let script = block
            .replace("localhost:8080", &format!("127.0.0.1:{port}"))
            .replace("Bearer TOKEN", &format!("Bearer {TOKEN}"))
            .replace("--config FILE", &format!("--config {}", config.display()));
        let (dir_path, full) = (dir.path().to_path_buf(), format!("{prelude}{script}"));
        let out = tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .arg("-c")
                .arg(&full)
                .current_dir(dir_path)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "README example failed:\n{block}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // What the examples sent arrived.
    let fake2 = fake.clone();
    let arrived = wait_until(Duration::from_secs(20), || {
        fake2
            .attribute_value("external_id:customer-7", "tier")
            .is_some()
            && fake2
                .attribute_value("external_id:customer-7", "pets")
                .is_some()
            && !fake2.purchases().is_empty()
            && fake2.events().iter().any(|e| e["name"] == "rode")
    })
    .await;
    assert!(
        arrived,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success());
}
