//! `import memberships|events|attributes FILE`: ActionIQ's exports, CSV or NDJSON, into the
//! queue.
//!
//! All or nothing, like ingest: the file is read twice. The first pass checks every row
//! (with ingest's own validation) and queues nothing; only a clean file (or, with
//! `--skip-bad`, its good rows) is queued in the second pass, in chunks that are each durable
//! before the next is read. A file from stdin is spooled to a temporary file first. The queue
//! is reached through the running daemon when it holds the database, directly otherwise.
//! Import never queues a row before the whole file has been checked.
//!
//! CSV: a header row names the columns as in the JSON (`audience_id`, `split_id`,
//! `external_id`, `braze_id`, `member`, `time`; `name`, `time`, `properties` for events).
//! `member` takes true/false, 1/0 or yes/no. An empty cell is a missing value. For events, a
//! `properties` cell holds a JSON object, and every other column becomes a string property
//! (ActionIQ's "additional attributes").
//!
//! Attributes CSV: an `external_id` and/or `braze_id` column, and one column per attribute.
//! A cell is text, so a column's type goes in its header as `name:type`: `string` (the
//! default), `number`, `boolean` (true/false, 1/0, yes/no), `date` (ISO 8601 date or time,
//! sent as UTC RFC 3339) or `array` (items separated by `;`). An empty cell leaves the
//! attribute alone, or with `--empty-cells unset` sets it to null (Braze removes it:
//! <https://www.braze.com/docs/api/objects_filters/user_attributes_object>). A row whose
//! cells are all empty is nothing to do, not an error.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{Map, Value};

use crate::config::{Config, PreferId};
use crate::ingest::{self, BadInput};
use crate::queue::Backend;
use crate::record::{Membership, Record};
use crate::target::{Daemon, Target};

/// Records per durable chunk (one request to the daemon, or one commit).
const CHUNK: usize = 5_000;
/// Bad rows listed in full with `--skip-bad`; past this only counted.
const LIST_BAD: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Memberships,
    Events,
    Attributes,
}

/// What an empty CSV cell in an attributes file means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EmptyCells {
    /// Leave the attribute as Braze has it (an export's blank is usually "unknown").
    #[default]
    Skip,
    /// Set the attribute to null, which removes it from the profile.
    Unset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Ndjson,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    /// A path, or `-` for stdin.
    pub file: PathBuf,
    /// Guessed from the extension (or the first byte) when not given.
    pub format: Option<Format>,
    pub skip_bad: bool,
    /// Attributes CSV only.
    pub empty_cells: EmptyCells,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Memberships => "memberships",
            Kind::Events => "events",
            Kind::Attributes => "attributes",
        }
    }

    /// A row's records: one for a membership or event, one per attribute for attributes.
    fn records(
        self,
        index: usize,
        line: usize,
        value: Value,
        prefer: PreferId,
    ) -> Result<Vec<Record>, BadInput> {
        Ok(match self {
            Kind::Memberships => vec![Record::Membership(ingest::membership(
                index, line, value, prefer,
            )?)],
            Kind::Events => vec![Record::Event(ingest::event(index, line, value, prefer)?)],
            Kind::Attributes => ingest::attributes(index, line, value, prefer)?
                .into_iter()
                .map(Record::Attribute)
                .collect(),
        })
    }
}

pub async fn run(config: &Config, options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let name = options.file.display().to_string();
    let mut file = open(&options.file)?;
    let format = match options.format {
        Some(f) => f,
        None => guess_format(&options.file, &mut file)?,
    };
    let progress = Progress::new();

    // Pass 1: check everything, queue nothing.
    let mut bad: Vec<BadInput> = Vec::new();
    let mut bad_lines = std::collections::HashSet::new();
    let mut good = 0usize;
    let prefer = config.identity;
    for (index, (line, value)) in rows(&mut file, format, &options)?.enumerate() {
        match value.and_then(|v| options.kind.records(index, line, v, prefer)) {
            Ok(records) => good += records.len(),
            Err(e) => {
                if !options.skip_bad {
                    bail!("{name}: {e}; nothing was queued (--skip-bad queues the good rows)");
                }
                bad_lines.insert(line);
                if bad.len() < LIST_BAD {
                    bad.push(e);
                }
            }
        }
        progress.tick("checked", index + 1);
    }
    progress.done();
    if !bad_lines.is_empty() {
        eprintln!("{name}: {} bad rows skipped:", bad_lines.len());
        for e in &bad {
            eprintln!("  {e}");
        }
        if bad_lines.len() > bad.len() {
            eprintln!("  ... and {} more", bad_lines.len() - bad.len());
        }
    }

    // Pass 2: queue the good rows in durable chunks.
    file.rewind()?;
    let mut sink = Sink::open(config, options.kind).await?;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut queued = 0usize;
    for (index, (line, value)) in rows(&mut file, format, &options)?.enumerate() {
        if bad_lines.contains(&line) {
            continue;
        }
        // Pass 1 accepted this row; reading the same bytes again cannot fail differently.
        let records = value
            .and_then(|v| options.kind.records(index, line, v, prefer))
            .with_context(|| format!("{name} changed while it was being imported"))?;
        chunk.extend(records);
        if chunk.len() >= CHUNK {
            queued += sink.send(std::mem::take(&mut chunk)).await?;
            progress.tick("queued", queued);
        }
    }
    queued += sink.send(chunk).await?;
    progress.done();
    println!(
        "imported {queued} {} from {name} ({} bad rows skipped) in {:.1} s, through the {}",
        options.kind.noun(),
        bad_lines.len(),
        started.elapsed().as_secs_f64(),
        sink.describe()
    );
    debug_assert_eq!(queued, good);
    Ok(())
}

/// A whole export as NDJSON lines in the shape the ingest endpoint for `kind` takes (a CSV
/// row becomes the object it stands for), for the demo. Stops at the first unreadable row.
pub fn export_as_ndjson(path: &Path, kind: Kind) -> anyhow::Result<Vec<String>> {
    let mut file = open(path)?;
    let format = guess_format(path, &mut file)?;
    let options = Options {
        kind,
        file: path.to_path_buf(),
        format: Some(format),
        skip_bad: false,
        empty_cells: EmptyCells::Skip,
    };
    let name = path.display();
    let lines = rows(&mut file, format, &options)?
        .map(|(_, row)| {
            let value = row.map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            Ok(serde_json::to_string(&value)?)
        })
        .collect();
    lines
}

/// The file, or stdin spooled to a temporary file (it is read twice).
fn open(path: &Path) -> anyhow::Result<File> {
    if path == Path::new("-") {
        let mut spool = tempfile::tempfile().context("cannot create a temporary file for stdin")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut spool).context("cannot read stdin")?;
        spool.rewind()?;
        Ok(spool)
    } else {
        File::open(path).with_context(|| format!("cannot open {}", path.display()))
    }
}

fn guess_format(path: &Path, file: &mut File) -> anyhow::Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => return Ok(Format::Csv),
        Some("ndjson" | "jsonl" | "json") => return Ok(Format::Ndjson),
        _ => {}
    }
    let mut head = [0u8; 512];
    let n = file.read(&mut head)?;
    file.rewind()?;
    Ok(match head[..n].iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Format::Ndjson,
        _ => Format::Csv,
    })
}

type Row = (usize, Result<Value, BadInput>);

/// The file's rows as JSON objects with their 1-based line numbers, read lazily.
fn rows<'a>(
    file: &'a mut File,
    format: Format,
    options: &Options,
) -> anyhow::Result<Box<dyn Iterator<Item = Row> + 'a>> {
    let (kind, empty_cells) = (options.kind, options.empty_cells);
    let reader = BufReader::with_capacity(1 << 20, file);
    Ok(match format {
        Format::Ndjson => Box::new(reader.lines().enumerate().filter_map(|(n, line)| {
            let line_no = n + 1;
            let text = match line {
                Ok(t) => t,
                Err(e) => return Some((line_no, Err(whole(line_no, format!("cannot read: {e}"))))),
            };
            if text.trim().is_empty() {
                return None;
            }
            Some((
                line_no,
                serde_json::from_str(&text)
                    .map_err(|e| whole(line_no, format!("invalid JSON: {e}"))),
            ))
        })),
        Format::Csv => {
            let mut csv = csv::ReaderBuilder::new()
                .flexible(false)
                .from_reader(reader);
            let headers = csv
                .headers()
                .context("cannot read the CSV header row")?
                .clone();
            let columns = match kind {
                Kind::Attributes => Some(attribute_columns(&headers)?),
                _ => None,
            };
            Box::new(csv.into_records().filter_map(move |row| match row {
                Ok(r) => {
                    let line = r.position().map_or(0, |p| p.line() as usize);
                    match &columns {
                        Some(columns) => attribute_row(columns, &r, line, empty_cells)
                            .transpose()
                            .map(|value| (line, value)),
                        None => Some((line, Ok(csv_object(&headers, &r, kind)))),
                    }
                }
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line() as usize);
                    Some((line, Err(whole(line, format!("bad CSV row: {e}")))))
                }
            }))
        }
    })
}

fn whole(line: usize, message: String) -> BadInput {
    BadInput {
        index: None,
        line: Some(line),
        field: None,
        message,
    }
}

/// A CSV row as the JSON object ingest would have received.
fn csv_object(headers: &csv::StringRecord, row: &csv::StringRecord, kind: Kind) -> Value {
    const EVENT_FIELDS: [&str; 4] = ["name", "external_id", "braze_id", "time"];
    let mut object = Map::new();
    let mut extra = Map::new();
    for (column, cell) in headers.iter().zip(row.iter()) {
        if cell.is_empty() {
            continue;
        }
        let value = match (kind, column) {
            (Kind::Memberships, "member") => match cell.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Value::Bool(true),
                "false" | "0" | "no" => Value::Bool(false),
                _ => Value::String(cell.into()),
            },
            (Kind::Events, "properties") => {
                serde_json::from_str(cell).unwrap_or_else(|_| Value::String(cell.into()))
            }
            _ => Value::String(cell.into()),
        };
        if kind == Kind::Events && column != "properties" && !EVENT_FIELDS.contains(&column) {
            extra.insert(column.to_string(), value);
        } else {
            object.insert(column.to_string(), value);
        }
    }
    // A non-object `properties` cell is left as it is, for validation to refuse.
    if let Value::Object(p) = object
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()))
    {
        p.extend(extra);
    }
    if object.get("properties") == Some(&Value::Object(Map::new())) {
        object.remove("properties");
    }
    Value::Object(object)
}

/// A column of an attributes CSV, read from its header.
enum Column {
    /// `external_id` or `braze_id`.
    Id(String),
    Attribute {
        name: String,
        kind: CellType,
    },
}

#[derive(Clone, Copy)]
enum CellType {
    String,
    Number,
    Boolean,
    Date,
    Array,
}

/// Reads `name:type` headers; an unknown type is refused before any row is read.
fn attribute_columns(headers: &csv::StringRecord) -> anyhow::Result<Vec<Column>> {
    let mut columns = Vec::with_capacity(headers.len());
    for header in headers.iter() {
        let header = header.trim();
        if header == "external_id" || header == "braze_id" {
            columns.push(Column::Id(header.to_string()));
            continue;
        }
        let (name, kind) = match header.rsplit_once(':') {
            None => (header, CellType::String),
            Some((name, kind)) => (
                name,
                match kind.trim() {
                    "string" => CellType::String,
                    "number" => CellType::Number,
                    "boolean" => CellType::Boolean,
                    "date" => CellType::Date,
                    "array" => CellType::Array,
                    other => bail!(
                        "line 1, column {header:?}: unknown type {other:?}; use string, number, boolean, date or array"
                    ),
                },
            ),
        };
        ingest::check_attribute_name(name).map_err(|why| anyhow::anyhow!("line 1: {why}"))?;
        columns.push(Column::Attribute {
            name: name.to_string(),
            kind,
        });
    }
    if !columns.iter().any(|c| matches!(c, Column::Id(_))) {
        bail!("line 1: the CSV header must name an external_id or braze_id column");
    }
    Ok(columns)
}

/// One attributes CSV row as the JSON `/v1/attributes` takes, with each cell typed by its
/// column; `None` when the row sets nothing.
fn attribute_row(
    columns: &[Column],
    row: &csv::StringRecord,
    line: usize,
    empty: EmptyCells,
) -> Result<Option<Value>, BadInput> {
    let mut object = Map::new();
    let mut attributes = Map::new();
    for (column, cell) in columns.iter().zip(row.iter()) {
        match column {
            Column::Id(field) => {
                if !cell.is_empty() {
                    object.insert(field.clone(), Value::String(cell.into()));
                }
            }
            Column::Attribute { name, kind } => {
                if cell.is_empty() {
                    if empty == EmptyCells::Unset {
                        attributes.insert(name.clone(), Value::Null);
                    }
                    continue;
                }
                let bad = |why: String| BadInput {
                    index: None,
                    line: Some(line),
                    field: Some(name.clone()),
                    message: why,
                };
                let value = match kind {
                    CellType::String => Value::String(cell.into()),
                    CellType::Number => serde_json::from_str::<serde_json::Number>(cell.trim())
                        .map(Value::Number)
                        .map_err(|_| bad(format!("{cell:?} is not a number")))?,
                    CellType::Boolean => match cell.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" => Value::Bool(true),
                        "false" | "0" | "no" => Value::Bool(false),
                        _ => return Err(bad(format!("{cell:?} is not true or false"))),
                    },
                    CellType::Date => Value::String(
                        date_cell(cell.trim())
                            .ok_or_else(|| bad(format!("{cell:?} is not an ISO 8601 date")))?,
                    ),
                    CellType::Array => Value::Array(
                        cell.split(';')
                            .map(|item| Value::String(item.trim().into()))
                            .collect(),
                    ),
                };
                attributes.insert(name.clone(), value);
            }
        }
    }
    if attributes.is_empty() {
        return Ok(None);
    }
    object.insert("attributes".into(), Value::Object(attributes));
    Ok(Some(Value::Object(object)))
}

/// An ISO 8601 date (`2024-05-01`, taken as midnight UTC) or date and time, as the UTC
/// RFC 3339 text Braze recognises as a time.
fn date_cell(cell: &str) -> Option<String> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};
    let at = OffsetDateTime::parse(cell, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(cell, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(cell, &Iso8601::DEFAULT).map(|t| t.assume_utc()))
        .or_else(|_| {
            Date::parse(
                cell,
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .map(|d| PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc())
        })
        .ok()?;
    Some(ingest::format_time(at))
}

/// Where the chunks go: the running daemon, or the database itself.
enum Sink {
    Daemon {
        daemon: Daemon,
        client: reqwest::Client,
        url: String,
    },
    Local(std::sync::Arc<dyn Backend>),
}

impl Sink {
    async fn open(config: &Config, kind: Kind) -> anyhow::Result<Sink> {
        Ok(match Target::open(config).await? {
            Target::Database(queue) => Sink::Local(queue),
            Target::Daemon(daemon) => Sink::Daemon {
                client: daemon.client(Some(Duration::from_secs(120)))?,
                url: daemon.url(&format!("/v1/{}", kind.noun())),
                daemon,
            },
        })
    }

    fn describe(&self) -> &'static str {
        match self {
            Sink::Daemon { .. } => "running daemon",
            Sink::Local(_) => "database (daemon stopped)",
        }
    }

    /// Queues one chunk durably; returns how many records it held.
    async fn send(&mut self, chunk: Vec<Record>) -> anyhow::Result<usize> {
        let n = chunk.len();
        if n == 0 {
            return Ok(0);
        }
        match self {
            Sink::Local(queue) => queue.enqueue(chunk).await?,
            Sink::Daemon {
                daemon,
                client,
                url,
            } => {
                let mut body = Vec::with_capacity(n * 128);
                for r in &chunk {
                    serde_json::to_writer(&mut body, &to_json(r))?;
                    body.push(b'\n');
                }
                loop {
                    let request = daemon.authorized(client.post(url.as_str()).body(body.clone()));
                    let response = request
                        .send()
                        .await
                        .with_context(|| format!("POST {url}"))?;
                    let status = response.status().as_u16();
                    if status == 202 {
                        break;
                    }
                    if status == 503 {
                        // Full, compacting or restarting: wait as asked and send the chunk again.
                        let wait = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(1u64);
                        tokio::time::sleep(Duration::from_secs(wait.min(30))).await;
                        continue;
                    }
                    bail!(
                        "{url} answered {status}: {}",
                        response.text().await.unwrap_or_default().trim()
                    );
                }
            }
        }
        Ok(n)
    }
}

/// A validated record in the shape the ingest endpoints take.
fn to_json(record: &Record) -> Value {
    let mut o = Map::new();
    let user = record.user();
    o.insert(user.field().into(), user.json_value());
    match record {
        Record::Membership(Membership {
            audience_id,
            split_id,
            member,
            time,
            ..
        }) => {
            o.insert("audience_id".into(), audience_id.as_str().into());
            o.insert("split_id".into(), split_id.as_str().into());
            o.insert("member".into(), (*member).into());
            if let Some(t) = time {
                o.insert("time".into(), t.as_str().into());
            }
        }
        Record::Event(e) => {
            // Built by ingest's checks just before, so they parse.
            if let Ok(Value::Object(members)) = serde_json::from_str(&format!("{{{}}}", e.members))
            {
                o.extend(members);
            }
        }
        Record::Attribute(a) => {
            let value = serde_json::from_str(&a.value).unwrap_or(Value::Null);
            o.insert(
                "attributes".into(),
                Value::Object(Map::from_iter([(a.name.clone(), value)])),
            );
        }
        Record::Tracked(t) => return serde_json::from_str(&t.json).unwrap_or(Value::Null),
    }
    Value::Object(o)
}

/// One line of progress on a terminal, redrawn at most every 200 ms; silent otherwise.
struct Progress {
    enabled: bool,
    started: Instant,
    last: std::cell::Cell<Instant>,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            enabled: std::io::stderr().is_terminal(),
            started: now,
            last: std::cell::Cell::new(now),
        }
    }

    fn tick(&self, what: &str, n: usize) {
        if !self.enabled || self.last.get().elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last.set(Instant::now());
        let rate = n as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        eprint!("\r  {what} {n:>12} rows  ({rate:>9.0} rows/s)");
        let _ = std::io::stderr().flush();
    }

    fn done(&self) {
        if self.enabled {
            eprint!("\r{:60}\r", "");
        }
    }
}

/// `import snapshot`: streams a member list to the daemon's snapshot endpoint, or, when the
/// daemon is stopped, diffs it against the stored snapshot directly. Either way a list that
/// fails part-way changes nothing.
pub async fn snapshot(
    config: &Config,
    audience: &str,
    split: &str,
    file: &Path,
    allow_empty: bool,
) -> anyhow::Result<()> {
    for (what, id) in [("--audience", audience), ("--split", split)] {
        ingest::check_id_part(id).map_err(|why| anyhow::anyhow!("{what} {why}"))?;
    }
    let started = Instant::now();
    let source = open(file)?;
    let name = file.display().to_string();
    let target = Target::open(config).await?;
    let report = match &target {
        Target::Database(queue) => {
            let snapshots =
                crate::snapshot::Snapshots::open(&config.data_dir, std::sync::Arc::clone(queue))?;
            let mut upload = snapshots.begin(audience, split)?;
            let mut reader = crate::members::MemberReader::new(None, config.identity);
            let mut add = |user| upload.add(&user).map_err(anyhow::Error::from);
            let mut input = BufReader::with_capacity(1 << 20, source);
            loop {
                let buf = input.fill_buf()?;
                if buf.is_empty() {
                    break;
                }
                let n = buf.len();
                reader
                    .feed(buf, &mut add)
                    .with_context(|| format!("{name}: nothing was changed"))?;
                input.consume(n);
            }
            reader
                .finish(&mut add)
                .with_context(|| format!("{name}: nothing was changed"))?;
            let report = upload.finish(allow_empty).await?;
            serde_json::to_value(report)?
        }
        Target::Daemon(daemon) => {
            let url = daemon.url(&format!(
                "/v1/audiences/{audience}/splits/{split}/members?allow_empty={allow_empty}"
            ));
            // No timeout: an upload takes as long as the file is big.
            let request = daemon.authorized(
                daemon
                    .client(None)?
                    .put(&url)
                    .body(reqwest::Body::from(tokio::fs::File::from_std(source))),
            );
            let response = request.send().await.with_context(|| format!("PUT {url}"))?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "{name}: the daemon answered {status}: {}; nothing was changed",
                    body["error"].as_str().unwrap_or("")
                );
            }
            body
        }
    };
    let via = target.describe();
    println!(
        "snapshot of audience {audience} split {split}: {} entered, {} exited, {} unchanged ({} members) in {:.1} s, through the {via}",
        report["entered"], report["exited"], report["unchanged"], report["members"],
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
