//! `check`, through the real binary against the fake Braze: each failure has its exit code
//! and a line that says what to fix, and a passing check leaves Braze as it was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fake_braze::{Behaviour, FakeBraze};

use crate::common::API_KEY;

/// What the binary did: exit code, stdout, stderr.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Both streams, for assertion messages.
    fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Writes a config naming `endpoint` and `key` into `dir`.
fn config_file(dir: &Path, endpoint: &str, key: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "data_dir = {:?}\n[braze]\nendpoint = {endpoint:?}\napi_key = {key:?}\nrequest_timeout_ms = 5000\n",
        dir.join("data"),
    );
    std::fs::write(&path, text).expect("config written");
    path
}

/// Runs `aiq-braze-sync --config FILE check` off the runtime, so the fake keeps serving.
async fn check(config: PathBuf) -> Ran {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .args(["--config", config.to_str().expect("UTF-8 path"), "check"])
            // The environment would override the file.
            .env_remove("BRAZE_API_KEY")
            .env_remove("BRAZE_REST_ENDPOINT")
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("the blocking task finishes");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A fake Braze and a check run against it with `key`, after `setup`.
async fn check_against_fake(key: &str, setup: impl FnOnce(&FakeBraze)) -> (FakeBraze, Ran) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBraze::start(API_KEY).await.expect("fake Braze starts");
    setup(&fake);
    let ran = check(config_file(dir.path(), &fake.url(), key)).await;
    (fake, ran)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_setup_passes_and_changes_no_user_in_braze() {
    let (fake, ran) = check_against_fake(API_KEY, |_| {}).await;
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    for line in [
        "ok   endpoint http://127.0.0.1:",
        "ok   api key accepted",
        "ok   users.track permission",
        "ok   users.export.ids permission",
        "check passed",
    ] {
        assert!(
            ran.stdout.contains(line),
            "{line:?} missing in {}",
            ran.all()
        );
    }
    assert!(
        !ran.all().contains(API_KEY),
        "the key was printed: {}",
        ran.all()
    );

    // The track probe reached Braze and was taken, yet no profile was created or changed.
    let tracked = fake.requests();
    assert_eq!(tracked.len(), 1);
    assert_eq!((tracked[0].status, tracked[0].objects), (201, 1));
    assert!(fake.attributes().is_empty(), "{:?}", fake.attributes());
    assert!(fake.attribute_state().is_empty() && fake.events().is_empty());

    // The lookup asked only for the synthetic user's external_id, and found nobody.
    let exports = fake.export_requests();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].status, 201);
    let id = exports[0].body["external_ids"][0].as_str().expect("an id");
    assert!(id.starts_with("aiq-braze-sync-check-"), "{id}");
    assert_eq!(
        exports[0].body["fields_to_export"],
        serde_json::json!(["external_id"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_exits_4_with_a_line_about_the_key() {
    let (fake, ran) = check_against_fake("not-the-key", |_| {}).await;
    assert_eq!(ran.code, Some(4), "{}", ran.all());
    assert!(
        ran.stdout.contains("FAIL api key: Braze answered 401"),
        "{}",
        ran.all()
    );
    assert!(ran.stdout.contains("braze.endpoint"), "{}", ran.all());
    assert!(
        !ran.all().contains("not-the-key"),
        "the key was printed: {}",
        ran.all()
    );
    // The export probe would only say 401 again.
    assert!(fake.export_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_users_track_exits_5_naming_users_track() {
    let (_fake, ran) = check_against_fake(API_KEY, |f| f.set_permissions(false, true)).await;
    assert_eq!(ran.code, Some(5), "{}", ran.all());
    let fail = "FAIL users.track permission: Braze answered 403 Access Denied";
    assert!(ran.stdout.contains(fail), "{}", ran.all());
    assert!(
        ran.stdout.contains("Settings > APIs and Identifiers"),
        "{}",
        ran.all()
    );
    assert!(
        ran.stdout.contains("ok   users.export.ids permission"),
        "{}",
        ran.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_users_export_ids_exits_5_naming_users_export_ids() {
    let (_fake, ran) = check_against_fake(API_KEY, |f| f.set_permissions(true, false)).await;
    assert_eq!(ran.code, Some(5), "{}", ran.all());
    let fail = "FAIL users.export.ids permission: Braze answered 403 Access Denied";
    assert!(ran.stdout.contains(fail), "{}", ran.all());
    assert!(
        ran.stdout.contains("ok   users.track permission"),
        "{}",
        ran.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_either_permission_names_both() {
    let (_fake, ran) = check_against_fake(API_KEY, |f| f.set_permissions(false, false)).await;
    assert_eq!(ran.code, Some(5), "{}", ran.all());
    assert!(
        ran.stdout.contains("FAIL users.track permission"),
        "{}",
        ran.all()
    );
    assert!(
        ran.stdout.contains("FAIL users.export.ids permission"),
        "{}",
        ran.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_answers_404_exits_6_and_asks_for_the_rest_endpoint() {
    let until = Instant::now() + Duration::from_secs(600);
    let not_found = Behaviour::FailStatus { status: 404, until };
    let (_fake, ran) = check_against_fake(API_KEY, |f| f.set_behaviour(not_found)).await;
    assert_eq!(ran.code, Some(6), "{}", ran.all());
    assert!(ran.stdout.contains("Braze answered 404"), "{}", ran.all());
    assert!(ran.stdout.contains("/users/track"), "{}", ran.all());
    assert!(ran.stdout.contains("without a path"), "{}", ran.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_exits_3_with_the_cause() {
    // A port that was free a moment ago: nothing listens on it now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://127.0.0.1:{port}");
    let ran = check(config_file(dir.path(), &endpoint, API_KEY)).await;
    assert_eq!(ran.code, Some(3), "{}", ran.all());
    let fail = format!("FAIL endpoint {endpoint} unreachable");
    assert!(ran.stdout.contains(&fail), "{}", ran.all());
    assert!(
        ran.stdout.to_lowercase().contains("refused"),
        "{}",
        ran.all()
    );
    assert!(
        ran.stdout.contains("skip users.track permission"),
        "{}",
        ran.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_without_a_key_exits_2_before_calling_braze() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBraze::start(API_KEY).await.expect("fake Braze starts");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("[braze]\nendpoint = {:?}\n", fake.url())).unwrap();
    let ran = check(path).await;
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(ran.stderr.contains("braze.api_key"), "{}", ran.all());
    assert!(fake.requests().is_empty() && fake.export_requests().is_empty());
}
