use super::*;
use std::collections::HashMap;

const KEY: &str = "0123abcd-key-never-shown";
const TOKEN_VALUE: &str = "tok-never-shown-42-0123456789abcdef";

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

fn minimal() -> String {
    format!("[braze]\nendpoint = \"https://rest.iad-01.braze.com/\"\napi_key = \"{KEY}\"\n")
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("/etc/aiq"), &no_env)
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid(lines)) => lines,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn defaults_fill_in_for_a_minimal_file() {
    let c = parse(&minimal()).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/aiq-braze-sync"));
    assert_eq!(c.braze.endpoint, "https://rest.iad-01.braze.com");
    assert_eq!(c.braze.api_key.expose(), KEY);
    assert_eq!(c.braze.request_timeout, Duration::from_secs(30));
    assert_eq!(c.braze.max_objects_per_request, 75);
    assert!(!c.braze.per_array_limit);
    assert_eq!(c.braze.max_request_bytes, 3_500_000);
    assert_eq!(c.ingest.listen, "127.0.0.1:8080".parse().unwrap());
    assert!(c.ingest.token.is_none());
    assert_eq!(c.ingest.max_body_bytes, 16 * 1024 * 1024);
    assert!(!c.ingest.export_passthrough);
    assert_eq!(c.delivery.workers, 256);
    assert_eq!(c.delivery.backoff_initial, Duration::from_millis(500));
    assert_eq!(c.delivery.backoff_max, Duration::from_secs(60));
    assert_eq!(c.delivery.max_requests_per_second, None);
    assert_eq!(c.delivery.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(
        c.delivery.skip_unchanged_for,
        Some(Duration::from_secs(7 * 86_400))
    );
    assert_eq!(c.queue.max_records, 10_000_000);
    assert_eq!(c.queue.max_disk_bytes, 20 * GIB);
    assert_eq!(c.queue.cache_bytes, 64 * MIB);
    assert_eq!(c.queue.compact_min_bytes, 256 * MIB);
    assert_eq!(c.log.level, LevelFilter::INFO);
    assert_eq!(c.identity, PreferId::External);
    assert_eq!(c.update_existing_only, UpdateExistingOnly::default());
    assert!(c.update_existing_only.memberships);
}

#[test]
fn identity_and_profile_policy_are_read_and_checked() {
    let text = format!(
        "{}[identity]\nprefer = \"braze_id\"\n\
         [update_existing_only]\nmemberships = false\nevents = true\n",
        minimal()
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.identity, PreferId::Braze);
    assert_eq!(
        c.update_existing_only,
        UpdateExistingOnly {
            memberships: false,
            attributes: false,
            events: true
        }
    );
    let bad = format!(
        "{}[identity]\nprefer = \"email\"\n[update_existing_only]\nevents = \"yes\"\npurchases = true\n",
        minimal()
    );
    let lines = problems(&bad);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("identity.prefer:")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("update_existing_only.events:")));
    assert!(lines
        .iter()
        .any(|l| l.contains("update_existing_only.purchases")));
}

#[test]
fn every_key_is_read_when_given() {
    let text = format!(
        "data_dir = \"state\"\n\
         [braze]\nendpoint = \"https://rest.fra-01.braze.eu\"\napi_key = \"{KEY}\"\n\
         request_timeout_ms = 5000\nmax_objects_per_request = 50\nper_array_limit = true\n\
         max_request_bytes = 2000000\n\
         [ingest]\nlisten = \"0.0.0.0:9000\"\ntoken = \"{TOKEN_VALUE}\"\nmax_body_bytes = 4096\nexport_passthrough = true\n\
         [delivery]\nworkers = 8\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
         max_requests_per_second = 10\nshutdown_timeout_ms = 0\nskip_unchanged_for_s = 0\n\
         [queue]\nmax_records = 5\nmax_disk_bytes = 1048576\ncache_mb = 1\ncompact_min_mb = 2\n\
         [log]\nlevel = \"DEBUG\"\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/etc/aiq/state"));
    assert_eq!(c.braze.request_timeout, Duration::from_secs(5));
    assert_eq!(c.braze.max_objects_per_request, 50);
    assert!(c.braze.per_array_limit);
    assert_eq!(c.braze.max_request_bytes, 2_000_000);
    assert_eq!(c.ingest.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(c.ingest.token.as_ref().unwrap().expose(), TOKEN_VALUE);
    assert_eq!(c.ingest.max_body_bytes, 4096);
    assert!(c.ingest.export_passthrough);
    assert_eq!(c.delivery.workers, 8);
    assert_eq!(c.delivery.max_requests_per_second, Some(10.0));
    assert_eq!(c.delivery.shutdown_timeout, Duration::ZERO);
    assert_eq!(c.delivery.skip_unchanged_for, None);
    assert_eq!(c.queue.cache_bytes, MIB);
    assert_eq!(c.queue.compact_min_bytes, 2 * MIB);
    assert_eq!(c.log.level, LevelFilter::DEBUG);
}

#[test]
fn no_free_disk_reserve_is_refused() {
    let text = format!("{}[queue]\nmin_free_disk_mb = 0\n", minimal());
    let lines = problems(&text);
    assert!(
        lines[0].starts_with("queue.min_free_disk_mb: must be between 1"),
        "{lines:?}"
    );
}

#[test]
fn a_short_token_is_refused_off_loopback_and_taken_on_it() {
    let public = format!(
        "{}[ingest]\nlisten = \"0.0.0.0:9000\"\ntoken = \"short-secret\"\n",
        minimal()
    );
    let lines = problems(&public);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("ingest.token: must be at least 32 characters"),
        "{lines:?}"
    );
    assert!(
        lines[0].contains("got 12") && !lines[0].contains("short-secret"),
        "{lines:?}"
    );
    let local = format!("{}[ingest]\ntoken = \"short-secret\"\n", minimal());
    assert!(parse(&local).is_ok());
}

#[test]
fn env_overrides_win_over_the_file() {
    let env = env_of(&[
        (ENV_BRAZE_ENDPOINT, "https://rest.iad-05.braze.com/"),
        (ENV_BRAZE_API_KEY, "from-env"),
        (ENV_INGEST_TOKEN, "token-from-env\n"),
    ]);
    let text = format!("{}[ingest]\ntoken = \"from-file\"\n", minimal());
    let c = Config::from_toml_str(&text, Path::new("/etc/aiq"), &env).unwrap();
    assert_eq!(c.braze.endpoint, "https://rest.iad-05.braze.com");
    assert_eq!(c.braze.api_key.expose(), "from-env");
    assert_eq!(c.ingest.token.unwrap().expose(), "token-from-env");
}

#[test]
fn env_overrides_supply_settings_missing_from_the_file() {
    let env = env_of(&[
        (ENV_BRAZE_ENDPOINT, "https://rest.iad-05.braze.com"),
        (ENV_BRAZE_API_KEY, "from-env"),
    ]);
    let c = Config::from_toml_str("", Path::new("/"), &env).unwrap();
    assert_eq!(c.braze.api_key.expose(), "from-env");
}

#[test]
fn an_env_var_set_but_empty_counts_as_unset() {
    let env = env_of(&[(ENV_BRAZE_API_KEY, ""), (ENV_BRAZE_ENDPOINT, "  ")]);
    let c = Config::from_toml_str(&minimal(), Path::new("/"), &env).unwrap();
    assert_eq!(c.braze.api_key.expose(), KEY);
    assert_eq!(c.braze.endpoint, "https://rest.iad-01.braze.com");
}

#[test]
fn a_bad_env_value_is_refused_with_the_variable_named() {
    let env = env_of(&[(ENV_BRAZE_ENDPOINT, "http://rest.iad-01.braze.com")]);
    let err = Config::from_toml_str(&minimal(), Path::new("/"), &env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "braze.endpoint (from BRAZE_REST_ENDPOINT): plain http would send the API key \
         unencrypted; use https"
    );
}

#[test]
fn an_unknown_key_a_wrong_type_and_an_out_of_range_value_give_three_lines() {
    let text = format!(
        "{}endpoit = \"x\"\n[delivery]\nworkers = \"four\"\nbackoff_initial_ms = 0\n",
        minimal()
    );
    assert_eq!(
        problems(&text),
        vec![
            "braze.endpoit: unknown key (did you mean braze.endpoint?)",
            "delivery.workers: expected an integer, got a string",
            "delivery.backoff_initial_ms: must be between 1 and 86400000, got 0",
        ]
    );
}

#[test]
fn unknown_sections_and_top_level_keys_are_named() {
    let text = format!("colour = 3\n{}[brazee]\nx = 1\n", minimal());
    assert_eq!(
        problems(&text),
        vec![
            "brazee: unknown section (did you mean braze?)",
            "colour: unknown key"
        ]
    );
}

#[test]
fn a_section_that_is_not_a_table_is_one_line() {
    let text = format!("delivery = 4\n{}", minimal());
    assert_eq!(
        problems(&text),
        vec!["delivery: expected a table, got an integer"]
    );
}

#[test]
fn an_empty_file_names_both_required_settings() {
    let lines = problems("");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("braze.endpoint: required"));
    assert!(lines[1].starts_with("braze.api_key: required"));
}

#[test]
fn a_non_loopback_listen_without_a_token_is_refused() {
    let text = format!("{}[ingest]\nlisten = \"0.0.0.0:8080\"\n", minimal());
    assert_eq!(
        problems(&text),
        vec!["ingest.token: required when ingest.listen is not a loopback address"]
    );
    let ipv6 = format!("{}[ingest]\nlisten = \"[::1]:8080\"\n", minimal());
    assert!(parse(&ipv6).unwrap().ingest.token.is_none());
}

#[test]
fn a_listen_address_that_does_not_parse_is_refused() {
    let text = format!("{}[ingest]\nlisten = \"localhost:80\"\n", minimal());
    assert_eq!(
        problems(&text),
        vec![
            "ingest.listen: expected an IP address and port such as 127.0.0.1:8080, \
             got \"localhost:80\""
        ]
    );
}

#[test]
fn plain_http_to_a_public_host_is_refused() {
    let text =
        format!("[braze]\nendpoint = \"http://rest.iad-01.braze.com\"\napi_key = \"{KEY}\"\n");
    assert_eq!(
        problems(&text),
        vec!["braze.endpoint: plain http would send the API key unencrypted; use https"]
    );
}

#[test]
fn plain_http_to_a_loopback_host_is_allowed() {
    for endpoint in [
        "http://127.0.0.1:9999/",
        "http://127.1.2.3",
        "http://localhost:8081",
        "http://[::1]:8081/braze",
    ] {
        let text = format!("[braze]\nendpoint = \"{endpoint}\"\napi_key = \"{KEY}\"\n");
        let c = parse(&text).unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        assert_eq!(c.braze.endpoint, endpoint.trim_end_matches('/'));
    }
}

#[test]
fn malformed_endpoints_are_refused() {
    for endpoint in [
        "rest.iad-01.braze.com",
        "ftp://rest.iad-01.braze.com",
        "https://",
        "https://:443",
        "https://user:pw@rest.iad-01.braze.com",
        "https://rest.iad-01.braze.com:99999",
        "https://rest.iad-01.braze.com/users/track",
        "https://rest.iad-01.braze.com?x=1",
    ] {
        let text = format!("[braze]\nendpoint = \"{endpoint}\"\napi_key = \"{KEY}\"\n");
        let lines = problems(&text);
        assert_eq!(lines.len(), 1, "{endpoint}: {lines:?}");
        assert!(lines[0].starts_with("braze.endpoint: "), "{lines:?}");
        assert!(!lines[0].contains("pw@"), "{lines:?}");
    }
}

#[test]
fn api_key_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("braze.key");
    std::fs::write(&key_path, format!("{KEY}\n\n")).unwrap();
    let text = format!(
        "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = {:?}\n",
        key_path.display().to_string()
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.braze.api_key.expose(), KEY);
}

#[test]
fn a_relative_api_key_file_is_resolved_against_credentials_directory() {
    let creds = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("braze.key"), "from-creds\n").unwrap();
    std::fs::write(config_dir.path().join("braze.key"), "from-config-dir\n").unwrap();
    let text =
        "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"braze.key\"\n";
    let creds_dir = creds.path().to_str().unwrap();
    let env = env_of(&[(ENV_CREDENTIALS_DIRECTORY, creds_dir)]);
    let c = Config::from_toml_str(text, config_dir.path(), &env).unwrap();
    assert_eq!(c.braze.api_key.expose(), "from-creds");
}

#[test]
fn a_relative_api_key_file_is_resolved_against_the_config_dir_otherwise() {
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(config_dir.path().join("braze.key"), "from-config-dir\n").unwrap();
    let config_path = config_dir.path().join("aiq.toml");
    std::fs::write(
        &config_path,
        "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"braze.key\"\n",
    )
    .unwrap();
    let c = Config::load_with_env(&config_path, &no_env).unwrap();
    assert_eq!(c.braze.api_key.expose(), "from-config-dir");
}

#[test]
fn a_bad_key_file_is_named_but_its_contents_are_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.key"), format!("{KEY} {KEY}\n")).unwrap();
    let text =
        "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key_file = \"bad.key\"\n\
                [ingest]\ntoken_file = \"missing.token\"\n";
    let err = Config::from_toml_str(text, dir.path(), &no_env).unwrap_err();
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(lines[0].starts_with("braze.api_key_file: "), "{shown}");
    assert!(lines[0].contains("bad.key"), "{shown}");
    assert!(
        lines[1].starts_with("ingest.token_file: cannot read "),
        "{shown}"
    );
    assert!(lines[1].contains("missing.token"), "{shown}");
    assert!(!shown.contains(KEY), "{shown}");
}

#[test]
fn both_api_key_and_api_key_file_are_refused() {
    let text = format!("{}api_key_file = \"/run/key\"\n", minimal());
    assert_eq!(
        problems(&text),
        vec!["braze.api_key: set either braze.api_key or braze.api_key_file, not both"]
    );
}

#[test]
fn an_empty_api_key_is_refused() {
    let text = "[braze]\nendpoint = \"https://rest.iad-01.braze.com\"\napi_key = \"  \"\n";
    assert_eq!(problems(text), vec!["braze.api_key: the value is empty"]);
}

#[test]
fn backoff_max_below_backoff_initial_is_refused_by_name() {
    let text = format!("{}[delivery]\nbackoff_initial_ms = 120000\n", minimal());
    assert_eq!(
        problems(&text),
        vec![
            "delivery.backoff_max_ms: must be at least delivery.backoff_initial_ms (120000), \
             got 60000 (the default)"
        ]
    );
}

#[test]
fn a_shutdown_timeout_past_systemds_stop_timeout_is_refused() {
    let text = format!("{}[delivery]\nshutdown_timeout_ms = 90000\n", minimal());
    let lines = problems(&text);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("delivery.shutdown_timeout_ms: must be between 0 and 80000"));
}

#[test]
fn a_rate_ceiling_must_be_positive() {
    let text = format!("{}[delivery]\nmax_requests_per_second = 0\n", minimal());
    assert_eq!(
        problems(&text),
        vec!["delivery.max_requests_per_second: must be a number greater than 0, got 0"]
    );
}

#[test]
fn an_unknown_log_level_is_refused() {
    let text = format!("{}[log]\nlevel = \"verbose\"\n", minimal());
    assert_eq!(
        problems(&text),
        vec!["log.level: must be one of error, warn, info, debug, trace, got \"verbose\""]
    );
}

#[test]
fn a_syntax_error_gives_its_position_but_not_the_line() {
    let text = format!("[braze]\nendpoint = \"https://x\"\napi_key = \"{KEY}\n");
    let err = parse(&text).unwrap_err();
    let shown = err.to_string();
    assert!(matches!(err, ConfigError::Syntax(_)));
    assert!(shown.contains("line 3, column"), "{shown}");
    assert!(!shown.contains(KEY), "{shown}");
}

#[test]
fn a_missing_config_file_names_the_path() {
    let err = Config::load_with_env(Path::new("/nonexistent/aiq.toml"), &no_env).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/aiq.toml"));
}

#[test]
fn debug_of_config_never_contains_the_key_or_token() {
    let text = format!(
        "{}[ingest]\nlisten = \"0.0.0.0:8080\"\ntoken = \"{TOKEN_VALUE}\"\n",
        minimal()
    );
    let c = parse(&text).unwrap();
    let shown = format!("{c:?} {c:#?}");
    assert!(!shown.contains(KEY), "{shown}");
    assert!(!shown.contains(TOKEN_VALUE), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert_eq!(c.braze.api_key.to_string(), "<redacted>");
}

#[test]
fn for_local_listens_on_an_ephemeral_loopback_port_with_defaults() {
    let c = Config::for_local(
        PathBuf::from("/tmp/x"),
        "http://127.0.0.1:1234/".to_owned(),
        KEY,
    );
    assert_eq!(c.ingest.listen.port(), 0);
    assert!(c.ingest.listen.ip().is_loopback());
    assert_eq!(c.braze.endpoint, "http://127.0.0.1:1234");
    assert_eq!(c.delivery.workers, 256);
}
