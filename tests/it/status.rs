//! `/status`: the operator's page, rendered in a real headless Chromium (Debian's `chromium`),
//! its figures held to `/metrics`, its dead letters to the admin API, and a screenshot kept
//! in `target/tmp/status.png`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::common::*;

/// Chromium, if installed; `None` (the test is skipped) unless `STATUS_BROWSER_REQUIRED=1`,
/// which CI sets after installing it.
fn chromium() -> Option<&'static str> {
    for bin in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(bin).arg("--version").output().is_ok() {
            return Some(bin);
        }
    }
    assert!(
        std::env::var_os("STATUS_BROWSER_REQUIRED").is_none(),
        "STATUS_BROWSER_REQUIRED is set but no chromium is installed"
    );
    eprintln!("status: no chromium installed; the browser half of the test is skipped");
    None
}

/// Runs headless Chromium on `url` with `args` (the flags that keep it off the network and
/// out of any profile), and returns its stdout.
fn headless(bin: &str, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1366,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `data-metric="NAME" data-value="N"` pair on the page.
fn figures(dom: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for part in dom.split("data-metric=\"").skip(1) {
        let (name, rest) = part.split_once('"').unwrap();
        let value = rest
            .split_once("data-value=\"")
            .and_then(|(_, v)| v.split_once('"'))
            .map(|(v, _)| v.parse::<f64>().unwrap())
            .unwrap();
        out.push((name.replace("&quot;", "\""), value));
    }
    out
}

fn samples(metrics: &str) -> HashMap<String, f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_metrics_say_in_a_real_browser() {
    let env = Env::start().await;
    env.fake.reject_ids(["refused-user".to_string()]);
    let memberships: Vec<_> = (0..30)
        .map(|i| membership(&format!("m{i}"), "7", "1", i % 3 != 0))
        .collect();
    assert_eq!(
        env.post("/v1/memberships", array(&memberships)).await.0,
        202
    );
    let mut events: Vec<_> = (0..12).map(event).collect();
    events[5]["external_id"] = json!("refused-user");
    assert_eq!(env.post("/v1/events", array(&events)).await.0, 202);
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(20), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 1
    })
    .await;
    assert!(drained, "{stats}");

    // It is an admin page: no credential, a Basic challenge a browser answers with a prompt.
    let url = format!("{}/status", env.base);
    let r = env.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"),
        "{:?}",
        r.headers()
    );
    let r = env
        .client
        .get(&url)
        .basic_auth("operator", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = r.text().await.unwrap();
    // Nothing from elsewhere: no script, stylesheet, image or font is fetched.
    for fetch in ["<script", "<link", "src=", "url(", "@import"] {
        assert!(!html.contains(fetch), "the page fetches something: {fetch}");
    }

    let Some(bin) = chromium() else {
        return;
    };
    let base = env.base.trim_start_matches("http://");
    let browser_url = format!("http://operator:{TOKEN}@{base}/status");
    let dom = headless(bin, &browser_url, &["--dump-dom"]);
    assert!(dom.contains("aiq-braze-sync"), "{dom}");
    assert!(dom.contains("id=\"ready\""), "{dom}");
    assert!(dom.contains("data-ready=\"true\""), "{dom}");

    // Every figure the page shows equals its metric: the queue is drained, so nothing moves,
    // but for the disk, which is measured every second while sled writes behind.
    let metrics = samples(&env.metrics().await);
    let shown = figures(&dom);
    assert!(shown.len() >= 12, "{shown:?}");
    for (name, value) in &shown {
        let metric = metrics
            .get(name)
            .unwrap_or_else(|| panic!("the page shows {name}, which /metrics lacks"));
        if name == "aiq_braze_sync_queue_disk_bytes" {
            assert!(
                *value > 0.0 && *metric > 0.0,
                "{name}: page {value}, /metrics {metric}"
            );
        } else {
            assert_eq!(value, metric, "{name}: page {value}, /metrics {metric}");
        }
    }
    assert_eq!(
        shown
            .iter()
            .find(|(n, _)| n == "aiq_braze_sync_records_delivered_total{kind=\"membership\"}")
            .map(|(_, v)| *v),
        Some(30.0)
    );

    // The dead letter, with Braze's reason and the object as it was sent.
    let dead = env
        .client
        .get(format!("{}/v1/admin/queue/dead", env.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let reason = dead["records"][0]["reason"].as_str().unwrap();
    assert!(dom.contains("refused-user"), "{dom}");
    assert!(
        dom.contains(&reason.replace('&', "&amp;")),
        "{reason} not in {dom}"
    );

    // A screenshot, kept for a person to look at.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        bin,
        &browser_url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "{}",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
}
