use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::RequestBuilder;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Malformed JSON, a missing id and a wrong type each get a 400 that names the place, and
/// `queue stats` (the real command, asking the running daemon) shows nothing was queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_place_and_queues_nothing() {
    // Bind first so that the config file the CLI reads names the daemon's real port.
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_braze::FakeBraze::start(API_KEY).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n[ingest]\nlisten = \"{addr}\"\ntoken = {TOKEN:?}\n",
            dir.path().join("data"),
            fake.url()
        ),
    )
    .unwrap();
    let cfg = aiq_braze_sync::config::Config::load(&config_path).expect("config loads");
    let daemon = aiq_braze_sync::daemon::start(&cfg, listener).await.unwrap();
    let client = http();
    let url = |p: &str| format!("http://{addr}{p}");

    let good = membership("u1", "a", "s", true);
    let cases: Vec<(&str, String, Value)> = vec![
        // Malformed JSON on the second line of an NDJSON body.
        (
            "/v1/memberships",
            format!("{good}\n{{\"audience_id\": \n"),
            serde_json::json!({"index": 1, "line": 2}),
        ),
        // A record without any user id, third in an array.
        (
            "/v1/memberships",
            array(&[
                good.clone(),
                good.clone(),
                serde_json::json!({"audience_id":"a","split_id":"s","member":true}),
            ]),
            serde_json::json!({"index": 2, "field": "external_id"}),
        ),
        // A wrong type: member as a string.
        (
            "/v1/memberships",
            array(&[
                good.clone(),
                serde_json::json!({"audience_id":"a","split_id":"s","external_id":"u2","member":"yes"}),
            ]),
            serde_json::json!({"index": 1, "field": "member"}),
        ),
        // Events: properties not an object, and an unparsable time.
        (
            "/v1/events",
            array(&[
                event(1),
                serde_json::json!({"name":"x","external_id":"u","time":"2026-13-45","properties":{}}),
            ]),
            serde_json::json!({"index": 1, "field": "time"}),
        ),
        (
            "/v1/events",
            array(&[
                serde_json::json!({"name":"x","external_id":"u","time":"2026-01-01T00:00:00Z","properties":"p"}),
            ]),
            serde_json::json!({"index": 0, "field": "properties"}),
        ),
    ];
    for (path, body, place) in cases {
        let (status, answer) = post(&client, &url(path), body).await;
        assert_eq!(status, 400, "{answer}");
        for (k, v) in place.as_object().unwrap() {
            assert_eq!(&answer[k], v, "{k} in {answer}");
        }
        let message = answer["error"].as_str().unwrap();
        assert!(message.starts_with("record "), "{message}");
    }

    // A body over the limit (16 MiB by default) is a 413. One byte over, so that the daemon
    // has read all of it when it answers: closing on unread bytes is a reset, which can reach
    // the client before the answer does.
    let (status, _) = post(&client, &url("/v1/memberships"), " ".repeat((16 << 20) + 1)).await;
    assert_eq!(status, 413);

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .args([
                "--config",
                config_path.to_str().unwrap(),
                "queue",
                "stats",
                "--json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["source"], "daemon");
    assert_eq!(stats["queue"]["pending"], 0);
    assert_eq!(stats["queue"]["accepted_total"], 0);
    assert!(fake.requests().is_empty());
    daemon.shutdown().await.unwrap();
}

const MEMBERS: &str = "/v1/audiences/1042/splits/1/members";
/// Small enough to cross cheaply, big enough for 100k-deep nesting and 200 KB strings.
const LIMIT: usize = 256 << 10;

/// One malformed request and what it must get back.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// Sent chunked, and then the stream stalls instead of ending: the limit must hold while
    /// a body streams in, and an answer can come only from it. With no end chunk left unread,
    /// the daemon's close is not a reset that could lose the answer before it is read.
    streamed: bool,
    status: u16,
    /// Keys the answer must carry with these values: the place of the fault on `/v1`, Braze's
    /// `errors` on `/users/track`.
    place: Value,
    /// A fragment of the message (`error` on `/v1`, `message` on `/users/track`).
    says: &'static str,
}

fn case(what: &'static str, path: &'static str, body: impl Into<Vec<u8>>, status: u16) -> Case {
    Case {
        what,
        method: if path.ends_with("/members") {
            "PUT"
        } else {
            "POST"
        },
        path,
        content_type: Some(if path.ends_with("/members") {
            "application/x-ndjson"
        } else {
            "application/json"
        }),
        body: body.into(),
        streamed: false,
        status,
        place: json!({}),
        says: "",
    }
}

impl Case {
    fn at(mut self, place: Value) -> Case {
        self.place = place;
        self
    }
    fn says(mut self, says: &'static str) -> Case {
        self.says = says;
        self
    }
    fn streamed(mut self) -> Case {
        self.streamed = true;
        self
    }
    fn typed(mut self, content_type: Option<&'static str>) -> Case {
        self.content_type = content_type;
        self
    }
}

/// A request on a connection of its own: the daemon closes a connection whose body it did
/// not read to the end, and a pooled one reused just as it closes fails the next case.
fn request(env: &Env, method: &str, path: &str, content_type: Option<&str>) -> RequestBuilder {
    let r = env
        .client
        .request(method.parse().unwrap(), format!("{}{path}", env.base))
        .header("connection", "close")
        .bearer_auth(TOKEN);
    match content_type {
        Some(t) => r.header("content-type", t),
        None => r,
    }
}

async fn answer(r: RequestBuilder) -> (u16, Value) {
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn send(
    env: &Env,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    answer(request(env, method, path, content_type).body(body)).await
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn with(template: &str, hole: &str) -> Vec<u8> {
    template.replace("HOLE", hole).into_bytes()
}

fn corpus() -> Vec<Case> {
    const M: &str = "/v1/memberships";
    const E: &str = "/v1/events";
    const A: &str = "/v1/attributes";
    const T: &str = "/users/track";
    let good_m = membership("u1", "a", "s", true).to_string();
    let good_e = event(1).to_string();
    let deep = nested(100_000);
    let huge = "x".repeat(200_000);
    let time = "2026-01-01T00:00:00Z";
    let attr = |v: &str| with(r#"{"external_id":"u","attributes":{"a":HOLE}}"#, v);
    let track_event = |extra: &str| {
        with(
            &format!(r#"{{"events":[{{"external_id":"u","name":"e","time":"{time}"HOLE}}]}}"#),
            extra,
        )
    };
    let long_audience: &'static str =
        Box::leak(format!("/v1/audiences/{}/splits/1/members", "a".repeat(101)).into_boxed_str());
    vec![
        // Truncated JSON.
        case("array cut short", M, format!("[\n{good_m},\n{good_m}")[..60].to_string(), 400)
            .at(json!({"line": 2}))
            .says("invalid JSON"),
        case("NDJSON last line cut short", E, format!("{good_e}\n{}", &good_e[..30]), 400)
            .at(json!({"index": 1, "line": 2}))
            .says("EOF"),
        case("attributes cut short", A, r#"{"external_id":"u","attributes":{"a""#, 400)
            .at(json!({"index": 0, "line": 1})),
        case("track body cut short", T, r#"{"attributes":[{"external_id":"u","#, 400)
            .says("Invalid JSON"),
        case("member line cut short", MEMBERS, "{\"external_id\":\"a\"}\n{\"external_id\":\"b", 400)
            .at(json!({"line": 2}))
            .says("invalid JSON"),
        case("empty body", M, "", 400).says("no records"),
        case("only whitespace", E, " \n\r\n\t", 400).says("no records"),
        case("empty track body", T, "", 400).says("Invalid JSON"),
        // Wrong types.
        case("a bare number", M, "42", 400)
            .at(json!({"index": 0, "line": 1}))
            .says("must be a JSON object, got a number"),
        case("an array of arrays", E, "[[1]]", 400)
            .at(json!({"index": 0, "line": 1}))
            .says("got an array"),
        case("external_id a number", M, r#"{"audience_id":"a","split_id":"s","external_id":7,"member":true}"#, 400)
            .at(json!({"index": 0, "field": "external_id"})),
        case("split_id a float", M, r#"[{"audience_id":"a","split_id":1.5,"external_id":"u","member":true}]"#, 400)
            .at(json!({"index": 0, "field": "split_id"})),
        case("event name a number", E, format!(r#"[{{"name":1,"external_id":"u","time":"{time}"}}]"#), 400)
            .at(json!({"field": "name"})),
        case("event time a boolean", E, r#"[{"name":"n","external_id":"u","time":true}]"#, 400)
            .at(json!({"field": "time"})),
        case("attributes an array", A, r#"{"external_id":"u","attributes":[1]}"#, 400)
            .at(json!({"field": "attributes"})),
        case("attribute value an object", A, attr(r#"{"inc":1}"#), 400)
            .at(json!({"field": "attributes.a"})),
        case("track body an array", T, "[1,2]", 400).says("Invalid JSON"),
        case("track attributes an object", T, r#"{"attributes":{"external_id":"u"}}"#, 400)
            .says("must be an array"),
        case("track objects not objects", T, r#"{"events":[1,"x"]}"#, 400)
            .at(json!({"errors": [{"input_array": "events", "index": 0}, {"input_array": "events", "index": 1}]}))
            .says("Valid data must be provided"),
        case("member id a number", MEMBERS, "{\"external_id\":\"a\"}\n{\"external_id\":7}\n", 400)
            .at(json!({"line": 2, "field": "external_id"})),
        // Huge strings, each under the body limit.
        case("huge external_id", M, with(r#"{"audience_id":"a","split_id":"s","external_id":"HOLE","member":true}"#, &huge), 400)
            .at(json!({"index": 0, "field": "external_id"}))
            .says("over Braze's 987"),
        case("huge event name", E, with(&format!(r#"{{"name":"HOLE","external_id":"u","time":"{time}"}}"#), &huge), 400)
            .at(json!({"field": "name"})),
        case("huge property", E, with(&format!(r#"{{"name":"n","external_id":"u","time":"{time}","properties":{{"p":"HOLE"}}}}"#), &huge), 400)
            .at(json!({"field": "properties"}))
            .says("over Braze's 102400"),
        case("huge attribute value", A, attr(&format!("\"{huge}\"")), 400)
            .at(json!({"field": "attributes.a"})),
        case("huge attribute name", A, with(r#"{"external_id":"u","attributes":{"HOLE":1}}"#, &huge), 400)
            .at(json!({"field": "attributes"})),
        case("huge member line", MEMBERS, with(r#"{"external_id":"HOLE"}"#, &huge), 400)
            .at(json!({"line": 1}))
            .says("longer than 65536 bytes"),
        case("long member id", MEMBERS, with(r#"{"external_id":"HOLE"}"#, &huge[..2000]), 400)
            .at(json!({"line": 1, "field": "external_id"})),
        case("huge audience id in the path", long_audience, "{\"external_id\":\"a\"}\n", 400)
            .at(json!({"field": "audience_id"})),
        // Deep nesting: refused by depth, never by a stack overflow.
        case("100k nested arrays", M, deep.clone(), 400)
            .at(json!({"line": 1}))
            .says("recursion limit"),
        case("100k nested arrays in NDJSON", E, format!("{good_e}\n{{\"name\":{deep}}}"), 400)
            .at(json!({"index": 1, "line": 2}))
            .says("recursion limit"),
        case("100k nested arrays as a value", A, attr(&deep), 400)
            .at(json!({"index": 0, "line": 1}))
            .says("recursion limit"),
        case("100k nested arrays as the track body", T, deep.clone(), 400)
            .says("Invalid JSON"),
        case("100k nested arrays as a track attribute", T, with(r#"{"attributes":[{"external_id":"u","a":HOLE}]}"#, &deep), 400)
            .at(json!({"errors": [{"input_array": "attributes", "index": 0}]})),
        case("100k nested arrays in event properties", T, track_event(&format!(r#","properties":{{"p":{deep}}}"#)), 400)
            .at(json!({"errors": [{"input_array": "events", "index": 0}]})),
        case("30k nested arrays on a member line", MEMBERS, nested(30_000), 400)
            .at(json!({"line": 1}))
            .says("recursion limit"),
        // Invalid UTF-8.
        case("invalid UTF-8 in an id", M, [format!("{good_m}\n").as_bytes(), b"{\"audience_id\":\"a\",\"split_id\":\"s\",\"external_id\":\"\xff\xfe\",\"member\":true}\n"].concat(), 400)
            .at(json!({"index": 1, "line": 2}))
            .says("invalid unicode"),
        case("invalid UTF-8 in an array", E, b"[{\"name\":\"\xc3\x28\",\"external_id\":\"u\",\"time\":1}]".to_vec(), 400)
            .at(json!({"line": 1})),
        case("invalid UTF-8 in a name", A, b"{\"external_id\":\"u\",\"attributes\":{\"\xed\xa0\x80\":1}}".to_vec(), 400)
            .at(json!({"index": 0})),
        case("invalid UTF-8 in a track body", T, b"{\"attributes\":[{\"external_id\":\"\xff\",\"a\":1}]}".to_vec(), 400)
            .says("Invalid JSON"),
        case("invalid UTF-8 on a member line", MEMBERS, b"{\"external_id\":\"a\"}\n{\"external_id\":\"\xff\"}\n".to_vec(), 400)
            .at(json!({"line": 2}))
            .says("not valid UTF-8"),
        case("a UTF-16 CSV", MEMBERS, b"\xff\xfee\0x\0t\0e\0r\0n\0a\0l\0_\0i\0d\0\n\0a\0\n\0".to_vec(), 400)
            .typed(Some("text/csv"))
            .at(json!({"line": 1})),
        // NUL bytes.
        case("a NUL inside a string", M, b"{\"audience_id\":\"a\",\"split_id\":\"s\",\"external_id\":\"u\0\",\"member\":true}".to_vec(), 400)
            .at(json!({"index": 0, "line": 1}))
            .says("control character"),
        case("a NUL line between records", E, format!("{good_e}\n\0\n{good_e}\n"), 400)
            .at(json!({"index": 1, "line": 2})),
        case("a NUL before the body", T, "\0{\"attributes\":[]}", 400).says("Invalid JSON"),
        case("a NUL on a member line", MEMBERS, "{\"external_id\":\"a\"}\n\0\n", 400)
            .at(json!({"line": 2})),
        // Wrong content types: only JSON and NDJSON are taken (and CSV for a member list), so
        // a browser form (text/plain, form-urlencoded, multipart) never gets in; on the member
        // list the type chooses the reader.
        case("CSV to a JSON endpoint", E, "name,external_id,time\nn,u,1\n", 415)
            .typed(Some("text/csv"))
            .says("not taken"),
        case("a form to /users/track", T, "attributes=x", 415)
            .typed(Some("application/x-www-form-urlencoded"))
            .says("not taken"),
        case("a text/plain form post", E, r#"[{"name":"n","external_id":"u","time":"2026-01-01T00:00:00Z"}]"#, 415)
            .typed(Some("text/plain"))
            .says("not taken"),
        case("a JSON array as a member list", MEMBERS, r#"[{"external_id":"a"}]"#, 400)
            .typed(Some("application/json"))
            .at(json!({"line": 1}))
            .says("CSV header"),
        case("NDJSON sent as CSV", MEMBERS, "{\"external_id\":\"a\"}\n", 400)
            .typed(Some("text/csv"))
            .at(json!({"line": 1}))
            .says("CSV header"),
        case("CSV sent as NDJSON", MEMBERS, "external_id\na\n", 400)
            .typed(Some("application/x-ndjson"))
            .at(json!({"line": 1}))
            .says("invalid JSON"),
        case("a multipart form as a member list", MEMBERS, "--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nexternal_id\na\n--b--\r\n", 415)
            .typed(Some("multipart/form-data; boundary=b"))
            .says("not taken"),
        // Over `ingest.max_body_bytes`.
        case("one byte over the limit", M, " ".repeat(LIMIT + 1), 413).says("max_body_bytes"),
        case("a chunked body over the limit", E, " ".repeat(LIMIT + 1), 413)
            .streamed()
            .says("max_body_bytes"),
        case("over the limit on /users/track", T, " ".repeat(LIMIT + 1), 413)
            .says("max_body_bytes"),
    ]
}

/// Whether an answer is the one `c` must get; all cases are tried before the test fails.
fn check(c: &Case, status: u16, answer: &Value) -> Result<(), String> {
    if status != c.status {
        return Err(format!("status {status}, want {}", c.status));
    }
    for (k, want) in c.place.as_object().unwrap() {
        let got = &answer[k];
        let same = match (got, want) {
            // Braze's `type` is free text: match where each error points.
            (Value::Array(got), Value::Array(want)) if k == "errors" => {
                got.len() == want.len()
                    && got.iter().zip(want).all(|(g, w)| {
                        g["input_array"] == w["input_array"]
                            && g["index"] == w["index"]
                            && g["type"].is_string()
                    })
            }
            _ => got == want,
        };
        if !same {
            return Err(format!("{k} is {got}, want {want}"));
        }
    }
    // `/users/track` answers the way Braze does; `/v1` with `error`.
    let message = if c.path == "/users/track" {
        if !answer["errors"].is_array() {
            return Err("not Braze-shaped: no `errors`".into());
        }
        &answer["message"]
    } else {
        &answer["error"]
    };
    match message.as_str() {
        Some(m) if m.contains(c.says) => Ok(()),
        Some(m) => Err(format!("{m:?} does not say {:?}", c.says)),
        None => Err("no message".into()),
    }
}

/// Every case in the corpus gets its 4xx, names the place where it must, queues nothing, and
/// leaves the daemon serving good requests of every kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_malformed_bodies_gets_4xx_and_queues_nothing() {
    let mut env = Env::start_with(|c| c.ingest.max_body_bytes = LIMIT).await;
    let mut failed = Vec::new();
    for c in corpus() {
        let r = request(&env, c.method, c.path, c.content_type);
        let r = if c.streamed {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                c.body.chunks(8 << 10).map(|b| Ok(b.to_vec())).collect();
            let stalls = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
            r.body(reqwest::Body::wrap_stream(stalls))
        } else {
            r.body(c.body.clone())
        };
        let (status, answer) = answer(r).await;
        if let Err(why) = check(&c, status, &answer) {
            let shown = answer.to_string();
            failed.push(format!(
                "{}: {why}\n    {}",
                c.what,
                &shown[..shown.len().min(300)]
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));

    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 0, "{stats}");
    assert_eq!(stats["queue"]["accepted_total"], 0, "{stats}");
    assert!(env.fake.requests().is_empty());

    // Still serving. JSON and NDJSON types, or none (no browser form sends a body without
    // one), are taken; what a form sends is not, so a web page cannot post records.
    let good = membership("u1", "a", "s", true).to_string();
    for content_type in [
        None,
        Some("application/json; charset=utf-8"),
        Some("application/x-ndjson"),
    ] {
        let (status, v) = send(&env, "POST", "/v1/memberships", content_type, good.clone()).await;
        assert_eq!(status, 202, "{content_type:?}: {v}");
    }
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let (status, v) = send(
            &env,
            "POST",
            "/v1/memberships",
            Some(content_type),
            good.clone(),
        )
        .await;
        assert_eq!(status, 415, "{content_type}: {v}");
    }
    let (status, v) = send(&env, "POST", "/v1/events", None, event(1).to_string()).await;
    assert_eq!(status, 202, "{v}");
    let (status, v) = send(
        &env,
        "POST",
        "/v1/attributes",
        None,
        r#"{"external_id":"u","attributes":{"a":1}}"#,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let (status, v) = send(
        &env,
        "POST",
        "/users/track",
        None,
        r#"{"attributes":[{"external_id":"u","b":1}]}"#,
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = send(&env, "PUT", MEMBERS, None, "external_id\na\n").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(env.stats().await["queue"]["accepted_total"], 7);
    env.shutdown().await;
}

/// Opens a connection and sends `head` and then `body` a byte at a time, `gap` apart.
async fn trickle(addr: &str, head: &str, body: &[u8], gap: Duration) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for b in body {
        tokio::time::sleep(gap).await;
        s.write_all(&[*b]).await.unwrap();
    }
    s
}

fn head(method: &str, path: &str, content_length: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/x-ndjson\r\nConnection: close\r\nContent-Length: {content_length}\r\n\r\n"
    )
}

/// Clients that trickle their request and then stall hold up no one else, and get nothing of
/// theirs queued, not even the whole records they did send; one that finishes, however
/// slowly, is accepted whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_uploads_block_no_one_and_queue_nothing() {
    let mut env = Env::start().await;
    let addr = env.base.trim_start_matches("http://").to_string();
    let records: String = (0..3)
        .map(|i| format!("{}\n", membership(&format!("slow-{i}"), "a", "s", true)))
        .collect();
    let members = "{\"external_id\":\"a\"}\n{\"external_id\":\"b\"}\n";
    let (half, rest) = records.split_at(records.len() * 3 / 4);
    let gap = Duration::from_millis(2);
    let mut lorises = Vec::new();
    // More stalled connections than the runtime has threads: a blocking read would starve it.
    for _ in 0..8 {
        lorises.push(
            trickle(
                &addr,
                "POST /v1/memberships HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-",
                b"",
                gap,
            )
            .await,
        );
        lorises.push(
            trickle(
                &addr,
                &head("POST", "/v1/events", 1000),
                b"[{\"name\":",
                gap,
            )
            .await,
        );
    }
    // Two whole records and part of a third, then a stall.
    let mut slow = trickle(
        &addr,
        &head("POST", "/v1/memberships", records.len()),
        half.as_bytes(),
        gap,
    )
    .await;
    let stalled_put = trickle(
        &addr,
        &head("PUT", MEMBERS, members.len() + 10),
        members.as_bytes(),
        gap,
    )
    .await;

    let good: [(&str, &str, String, u16); 5] = [
        (
            "POST",
            "/v1/memberships",
            membership("u1", "a", "s", true).to_string(),
            202,
        ),
        ("POST", "/v1/events", event(1).to_string(), 202),
        (
            "POST",
            "/v1/attributes",
            r#"{"external_id":"u","attributes":{"a":1}}"#.into(),
            202,
        ),
        (
            "POST",
            "/users/track",
            r#"{"attributes":[{"external_id":"u","b":1}]}"#.into(),
            201,
        ),
        (
            "PUT",
            "/v1/audiences/1042/splits/2/members",
            members.into(),
            200,
        ),
    ];
    // Were the daemon held up by the stalled clients, these would hang until the client's
    // 30 s timeout.
    for (method, path, body, want) in good {
        let (status, v) = send(&env, method, path, Some("application/x-ndjson"), body).await;
        assert_eq!(status, want, "{path}: {v}");
    }
    // The stalled upload still holds its split, as an upload in progress does.
    let (status, v) = send(&env, "PUT", MEMBERS, None, members).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(env.stats().await["queue"]["accepted_total"], 6);

    // Finishing, slowly, gets the whole body accepted.
    for b in rest.as_bytes() {
        tokio::time::sleep(gap).await;
        slow.write_all(&[*b]).await.unwrap();
    }
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(answer.ends_with(r#"{"accepted":3}"#), "{answer}");

    // Hanging up half-way leaves nothing behind, and frees the split once the daemon sees it.
    drop(lorises);
    drop(stalled_put);
    let (mut status, mut v) = (409, Value::Null);
    for _ in 0..100 {
        (status, v) = send(&env, "PUT", MEMBERS, None, members).await;
        if status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["entered"], 2, "{v}");
    assert_eq!(env.stats().await["queue"]["accepted_total"], 6 + 3 + 2);
    env.shutdown().await;
}

/// A client that never finishes its request head is cut off after `ingest.header_timeout_ms`,
/// so stalled connections (and their sockets) cannot pile up; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_not_finished_in_time_is_cut_off() {
    let env = Env::start_with(|c| c.ingest.header_timeout = Duration::from_millis(300)).await;
    let addr = env.base.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _) = env.post("/v1/events", array(&[event(1)])).await;
    assert_eq!(status, 202, "served while the other head stalls");
    // The server ends the stalled connection: the read reaches its end (or a reset).
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a stalled request head was never cut off");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut off after {:?}, before the timeout",
        started.elapsed()
    );
}

/// A snapshot upload that goes quiet is abandoned after `ingest.upload_idle_timeout_ms`: the
/// client is told, the split is free for the next upload, and the members it did send are
/// not taken (the previous snapshot stays the reference).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_upload_that_goes_quiet_is_abandoned_and_frees_its_split() {
    let mut env =
        Env::start_with(|c| c.ingest.upload_idle_timeout = Duration::from_millis(300)).await;
    let addr = env.base.trim_start_matches("http://").to_string();
    let members = "{\"external_id\":\"a\"}\n{\"external_id\":\"b\"}\n";
    let mut quiet = trickle(
        &addr,
        &head("PUT", MEMBERS, 1000),
        members.as_bytes(),
        Duration::ZERO,
    )
    .await;
    let started = std::time::Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), quiet.read_to_string(&mut answer))
        .await
        .expect("the quiet upload was never abandoned")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("sent nothing for 300 ms"), "{answer}");
    assert_eq!(env.stats().await["queue"]["accepted_total"], 0);
    // The split is free at once, and the abandoned members were never part of a snapshot.
    let (status, v) = send(&env, "PUT", MEMBERS, None, "{\"external_id\":\"c\"}\n").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["entered"].as_u64(), v["exited"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    env.shutdown().await;
}

/// One record may set at most 500 attributes and one request carry at most 50,000 updates:
/// each is pending state and then an entry of the daemon's own state, so an unbounded body
/// could grow the disk by gigabytes. Refused with 400 naming the limit, nothing queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_per_record_and_per_request_are_bounded() {
    let env = Env::start().await;
    let many: serde_json::Map<String, Value> =
        (0..501).map(|i| (format!("a{i}"), json!(i))).collect();
    let body = array(&[json!({"external_id": "u", "attributes": many})]);
    let (status, v) = env.post("/v1/attributes", body).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("at most 500 per record"),
        "{v}"
    );
    assert_eq!(v["field"], "attributes");

    let records: Vec<Value> = (0..101)
        .map(|u| {
            let attrs: serde_json::Map<String, Value> =
                (0..500).map(|i| (format!("a{i}"), json!(i))).collect();
            json!({"external_id": format!("u{u}"), "attributes": attrs})
        })
        .collect();
    let (status, v) = env.post("/v1/attributes", array(&records)).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("more than 50000 attribute updates"),
        "{v}"
    );
    assert_eq!(v["index"], 100, "{v}");
    assert_eq!(env.stats().await["queue"]["accepted_total"], 0);
}
