use std::path::Path;
use std::process::Command;

/// The README's first command works: the demo drains the sample data into the stand-in
/// Braze through an outage and reports what it received.
#[test]
fn the_demo_delivers_the_sample_data_through_an_outage() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .current_dir(root)
        .args(["demo", "--outage-secs", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("accepted 4500 records"), "{stdout}");
    assert!(stdout.contains("event purchase        500"), "{stdout}");
    assert!(stdout.contains("dead letters    0"), "{stdout}");
}

/// The example config in data/ stays valid as the keys evolve.
#[test]
fn the_example_config_loads_with_a_key_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/config.example.toml");
    let env = |k: &str| (k == "BRAZE_API_KEY").then(|| "k".to_string());
    let config = aiq_braze_sync::config::Config::load_with_env(&path, &env).unwrap();
    assert_eq!(config.delivery.workers, 256);
    assert_eq!(config.braze.max_objects_per_request, 75);
}

/// A bad config is refused at start with one line per bad key, and exit code 2.
#[test]
fn a_bad_config_is_refused_with_one_line_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key = \"k\"\n[delivery]\nworkers = 0\nbackof_max_ms = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(stderr.contains("delivery.workers"), "{stderr}");
    assert!(stderr.contains("delivery.backof_max_ms"), "{stderr}");
    assert!(!stderr.contains("\"k\""));
}
