//! `monitoring/`: the alerting rules and the Grafana dashboard name only metrics the daemon
//! exports, and the rules (and the dashboard's queries) are valid for Prometheus.
//!
//! The names are checked against a live `/metrics` after a workload that creates every
//! labelled series. `promtool` comes with Debian's `prometheus` package; without it the
//! `promtool` test is skipped, unless `MONITORING_REQUIRED` is set (CI sets it), when it fails.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring")
}

fn read(name: &str) -> String {
    let path = monitoring_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names in `text`: identifiers starting `aiq_braze_sync_` or `process_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("aiq_braze_sync_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// The rules file without its comments (a commented-out rule is not loaded).
fn alert_names() -> BTreeSet<String> {
    let yaml = read("alerts.yml");
    let loaded: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    metric_names(&loaded.join("\n"))
}

/// Every query string of the dashboard: panel targets' `expr` and the query variables'
/// `query` and `definition`.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            // The data source variable's `query` is a plugin type, not PromQL.
            Value::Object(m) if m.get("type") == Some(&json!("datasource")) => {}
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(&read("dashboard.json"))
        .unwrap_or_else(|e| panic!("monitoring/dashboard.json is not JSON: {e}"));
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// What a scrape exports: every sample name, and every family with its type (`# TYPE`).
fn exported(metrics: &str) -> (BTreeSet<String>, HashMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut families = HashMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                families.insert(name.to_string(), kind.trim().to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (samples, families)
}

/// Whether a query naming `name` selects something the daemon exports: a sample name in
/// the scrape, or a family's name with the suffix its type gives its samples (a counter's
/// `_total`, a histogram's `_bucket`, `_sum`, `_count`), for a family with no sample yet.
/// A family's bare name is not enough: `rate(x[5m])` on a counter `x` selects nothing,
/// only `x_total` does.
fn is_exported(name: &str, samples: &BTreeSet<String>, families: &HashMap<String, String>) -> bool {
    samples.contains(name)
        || families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            suffixes.iter().any(|s| format!("{family}{s}") == name)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_name_only_exported_metrics() {
    let env = Env::start().await;
    // A workload that gives the labelled families the queries use a series: events and a
    // membership delivered, and one event refused on its own (a dead letter).
    env.fake.reject_ids(["refused-user".to_string()]);
    let mut events: Vec<Value> = (0..3).map(event).collect();
    events[2]["external_id"] = json!("refused-user");
    assert_eq!(env.post("/v1/events", array(&events)).await.0, 202);
    let memberships = [membership("m1", "5", "1", true)];
    assert_eq!(
        env.post("/v1/memberships", array(&memberships)).await.0,
        202
    );
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || fake.events().len() == 2).await,
        "the events were not delivered"
    );
    let (done, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0 && s["queue"]["dead"] == 1
    })
    .await;
    assert!(done, "{stats}");

    let metrics = env.metrics().await;
    let (samples, families) = exported(&metrics);
    assert!(
        samples.contains("aiq_braze_sync_records_dead_total")
            && samples.contains("process_start_time_seconds"),
        "the workload did not produce the series this test relies on:\n{metrics}"
    );

    let dashboard = metric_names(&dashboard_queries().join("\n"));
    let alerts = alert_names();
    // Guards against an extraction that finds nothing and so checks nothing.
    for (file, names, at_least) in [
        ("monitoring/alerts.yml", &alerts, 8),
        ("monitoring/dashboard.json", &dashboard, 15),
    ] {
        assert!(
            names.len() >= at_least,
            "{file}: only {} metric names found: {names:?}",
            names.len()
        );
    }
    let mut missing = Vec::new();
    for (file, names) in [
        ("monitoring/alerts.yml", &alerts),
        ("monitoring/dashboard.json", &dashboard),
    ] {
        for name in names {
            if !is_exported(name, &samples, &families) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named in monitoring/ that /metrics does not export:\n  {}\n\n/metrics:\n{metrics}",
        missing.join("\n  ")
    );
}

/// `promtool`'s output for `args`, or `None` when it is not installed and not required.
fn promtool(args: &[&str]) -> Option<(bool, String)> {
    match Command::new("promtool").args(args).output() {
        Ok(out) => Some((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::env::var_os("MONITORING_REQUIRED").is_none() =>
        {
            eprintln!(
                "monitoring rules not checked: promtool is not installed (Debian's `prometheus` \
                 package has it; set MONITORING_REQUIRED=1 to fail instead)"
            );
            None
        }
        Err(e) => panic!("MONITORING_REQUIRED is set but promtool cannot run: {e}"),
    }
}

#[test]
fn promtool_accepts_the_rules_and_the_dashboard_queries() {
    let rules = monitoring_dir().join("alerts.yml");
    let Some((ok, out)) = promtool(&["check", "rules", rules.to_str().unwrap()]) else {
        return;
    };
    eprintln!("promtool check rules monitoring/alerts.yml:\n{out}");
    assert!(
        ok,
        "promtool check rules monitoring/alerts.yml failed:\n{out}"
    );

    // The dashboard's queries, as recording rules, so that promtool parses them as PromQL.
    // Grafana's `$__rate_interval` becomes a duration; `$instance` is inside a string.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in dashboard_queries().iter().enumerate() {
        if query.starts_with("label_values(") {
            continue; // Grafana's own function, for the variables.
        }
        let expr = query.replace("$__rate_interval", "5m");
        // A JSON string is a YAML double-quoted scalar.
        yaml.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            json!(expr)
        ));
    }
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &yaml).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()]).unwrap();
    assert!(
        ok,
        "monitoring/dashboard.json has a query promtool does not parse:\n{out}\n{yaml}"
    );
}
