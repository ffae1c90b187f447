//! `GET /status`: one self-contained page for an operator's browser.
//!
//! It shows what `/metrics` and the admin API hold, read at the moment of the request: the
//! queue depth per lane, the oldest pending age, readiness and its reason, Braze's answers by
//! class, what was delivered by kind, the latest dead letters with Braze's reason and the
//! object, and the last hour of depth and delivery rate from `History`, a ring of samples
//! kept in memory. Every figure that `/metrics` also exports carries the metric's name in a
//! `data-metric` attribute, so a test can hold the page to the metrics. The page has no
//! external assets (styles and charts are inline) and refreshes itself.
//!
//! This module owns the page and the samples; it never changes the queue, and it never
//! shows a secret.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delivery::DeliveryStats;
use crate::queue::{RecordView, Stats};

/// How often `History` is sampled, and how many samples it keeps (an hour's worth).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(30);
const SAMPLES_KEPT: usize = 120;
/// Dead letters the page lists.
pub const DEAD_SHOWN: usize = 10;
/// The page asks the browser to reload it this often, in seconds.
const REFRESH_S: u32 = 10;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub pending_events: u64,
    pub pending_attributes: u64,
    /// Records Braze took since the daemon started.
    pub delivered: u64,
}

/// The last hour of samples, oldest first.
#[derive(Default)]
pub struct History(Mutex<VecDeque<Sample>>);

impl History {
    pub fn record(&self, stats: &Stats, delivery: &DeliveryStats) {
        let mut samples = self.0.lock().expect("status history lock poisoned");
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample(stats, delivery));
    }

    pub fn samples(&self) -> Vec<Sample> {
        let samples = self.0.lock().expect("status history lock poisoned");
        samples.iter().copied().collect()
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sample(stats: &Stats, delivery: &DeliveryStats) -> Sample {
    Sample {
        at: now_s(),
        pending_events: stats.pending_events,
        pending_attributes: stats.pending_attributes,
        delivered: delivery.records_delivered,
    }
}

/// What the page is drawn from.
pub struct View<'a> {
    /// `None` while the queue is being rebuilt.
    pub queue: Option<&'a Stats>,
    pub delivery: &'a DeliveryStats,
    /// The reason `/readyz` gives for a 503, if it gives one.
    pub not_ready: Option<&'a str>,
    pub history: Vec<Sample>,
    pub dead: &'a [RecordView],
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Thousands separated by thin spaces.
fn num(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    out
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{:.1} s", ms as f64 / 1000.0),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A figure with the metric it equals, for the test that compares the two.
fn figure(label: &str, metric: &str, value: u64, note: &str) -> String {
    format!(
        "<div class=card><div class=label>{}</div><div class=value data-metric=\"{}\" data-value=\"{value}\">{}</div><div class=note>{}</div></div>",
        esc(label),
        esc(metric),
        num(value),
        esc(note)
    )
}

/// An SVG polyline chart of `series` (each a name, a colour and its points), no scripts.
fn chart(series: &[(&str, &str, Vec<f64>)], unit: &str) -> String {
    let (w, h, pad) = (560.0, 140.0, 4.0);
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0);
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" role=img aria-label=\"{}\" preserveAspectRatio=none>",
        esc(unit)
    );
    if n >= 2 {
        for (_, colour, points) in series {
            let mut line = String::new();
            for (i, v) in points.iter().enumerate() {
                let x = pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64;
                let y = h - pad - (h - 2.0 * pad) * v / top;
                let _ = write!(line, "{x:.1},{y:.1} ");
            }
            let _ = write!(
                svg,
                "<polyline fill=none stroke=\"{colour}\" stroke-width=2 points=\"{line}\"/>"
            );
        }
    } else {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=middle class=empty>Samples every {} s; the chart fills in as they come.</text>",
            w / 2.0,
            h / 2.0,
            SAMPLE_EVERY.as_secs()
        );
    }
    svg.push_str("</svg><div class=legend>");
    for (name, colour, _) in series {
        let _ = write!(
            svg,
            "<span><i style=\"background:{colour}\"></i>{}</span>",
            esc(name)
        );
    }
    let _ = write!(
        svg,
        "<span class=muted>top: {} {}</span></div>",
        num(top.round() as u64),
        esc(unit)
    );
    svg
}

const STYLE: &str = "
:root{--bg:#f6f7f9;--fg:#1d2433;--muted:#667085;--card:#fff;--line:#e3e6eb;--ok:#117a3d;--bad:#b42318;--warn:#b54708}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:16px;align-items:center;padding:14px 28px;background:#fff;border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}h2{font-size:15px;margin:0 0 10px}
.state{padding:4px 10px;border-radius:12px;font-weight:600;font-size:13px}
.ok{background:#e7f6ec;color:var(--ok)}.bad{background:#fdecea;color:var(--bad)}.warn{background:#fef4e6;color:var(--warn)}
.muted,.note{color:var(--muted);font-size:12px}main{max-width:1240px;margin:0 auto;padding:20px 28px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-bottom:18px}
.card,section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}.value{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:14px;margin-bottom:14px}@media(max-width:900px){.grid{grid-template-columns:1fr}}
svg{width:100%;height:140px;background:#fbfcfd;border:1px solid var(--line);border-radius:6px}.empty{fill:var(--muted);font-size:12px}
.legend{display:flex;gap:14px;font-size:12px;margin-top:6px}.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
table{width:100%;border-collapse:collapse;font-size:13px}th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font-size:12px;max-height:7em;overflow:auto}
";

/// The whole page.
pub fn render(v: &View<'_>) -> String {
    let mut h = String::with_capacity(16 << 10);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\"><meta http-equiv=refresh content={REFRESH_S}><title>aiq-braze-sync: status</title><style>{STYLE}</style></head><body>"
    );
    let (class, state) = match v.not_ready {
        None => ("ok", "Ready".to_string()),
        Some(reason) => ("bad", format!("Not ready: {reason}")),
    };
    let health = match &v.delivery.health {
        crate::delivery::gate::Health::Delivering => ("ok", "delivering".to_string()),
        crate::delivery::gate::Health::Retrying { reason, failures } => (
            "warn",
            format!("retrying after {failures} failures: {reason}"),
        ),
        crate::delivery::gate::Health::Paused { reason, .. } => (
            "bad",
            format!("paused: Braze refuses the key or endpoint: {reason}"),
        ),
    };
    let _ = write!(
        h,
        "<header><h1>aiq-braze-sync</h1><span class=\"state {class}\" id=ready data-ready=\"{}\">{}</span><span class=\"state {}\" id=delivery>Delivery {}</span><span class=muted>version {} · refreshes every {REFRESH_S} s</span></header><main>",
        v.not_ready.is_none(),
        esc(&state),
        health.0,
        esc(&health.1),
        env!("CARGO_PKG_VERSION")
    );

    h.push_str("<div class=cards>");
    match v.queue {
        Some(q) => {
            h.push_str(&figure(
                "Pending events",
                "aiq_braze_sync_queue_pending{lane=\"events\"}",
                q.pending_events,
                "events and purchases",
            ));
            h.push_str(&figure(
                "Pending attribute updates",
                "aiq_braze_sync_queue_pending{lane=\"attributes\"}",
                q.pending_attributes,
                "memberships included",
            ));
            h.push_str(&figure(
                "In flight",
                "aiq_braze_sync_queue_in_flight",
                q.in_flight,
                "leased by a worker now",
            ));
            h.push_str(&figure(
                "Dead letters",
                "aiq_braze_sync_queue_dead",
                q.dead,
                "refused by Braze, kept with the reason",
            ));
            let _ = write!(
                h,
                "<div class=card><div class=label>Oldest pending</div><div class=value id=oldest data-ms=\"{}\">{}</div><div class=note>age of the oldest record waiting</div></div>",
                q.oldest_pending_age_ms.unwrap_or(0),
                q.oldest_pending_age_ms.map_or("none".into(), age)
            );
            let _ = write!(
                h,
                "<div class=card><div class=label>Disk</div><div class=value data-metric=\"aiq_braze_sync_queue_disk_bytes\" data-value=\"{}\">{} MiB</div><div class=note>of {} MiB (queue.max_disk_bytes)</div></div>",
                q.disk_bytes,
                num(q.disk_bytes >> 20),
                num(q.max_disk_bytes >> 20)
            );
        }
        None => h.push_str(
            "<div class=card><div class=label>Queue</div><div class=value>…</div><div class=note>being rebuilt to give disk space back; back in a moment</div></div>",
        ),
    }
    h.push_str("</div>");

    // The last hour: depth, and delivery per minute between samples, with now appended.
    let mut points = v.history.clone();
    if let Some(q) = v.queue {
        points.push(sample(q, v.delivery));
    }
    let rate: Vec<f64> = points
        .windows(2)
        .map(|w| {
            let secs = w[1].at.saturating_sub(w[0].at).max(1) as f64;
            w[1].delivered.saturating_sub(w[0].delivered) as f64 * 60.0 / secs
        })
        .collect();
    h.push_str("<div class=grid><section><h2>Queue depth, last hour</h2>");
    h.push_str(&chart(
        &[
            (
                "events",
                "#2e6bd1",
                points.iter().map(|p| p.pending_events as f64).collect(),
            ),
            (
                "attribute updates",
                "#c4661f",
                points.iter().map(|p| p.pending_attributes as f64).collect(),
            ),
        ],
        "records",
    ));
    h.push_str("</section><section><h2>Delivered per minute, last hour</h2>");
    h.push_str(&chart(&[("delivered", "#117a3d", rate)], "records/min"));
    h.push_str("</section></div>");

    // Braze's answers, and what was delivered.
    let d = v.delivery;
    h.push_str("<div class=grid><section><h2>Braze's answers since start</h2><table><tr><th>class</th><th>meaning</th><th class=n>requests</th></tr>");
    for (outcome, n) in d.requests_by_outcome() {
        let meaning = match outcome {
            "accepted" => "2xx",
            "refused" => "400 / 413: records refused",
            "rate_limited" => "429: waited as told",
            "failed" => "5xx, timeouts, network",
            _ => "401 / 403 / 404: key or endpoint",
        };
        let _ = write!(
            h,
            "<tr><td>{outcome}</td><td class=muted>{meaning}</td><td class=n data-metric=\"aiq_braze_sync_braze_requests_total{{outcome=&quot;{outcome}&quot;}}\" data-value=\"{n}\">{}</td></tr>",
            num(n)
        );
    }
    h.push_str("</table></section><section><h2>Records since start</h2><table><tr><th>kind</th><th class=n>delivered</th><th class=n>dead</th></tr>");
    for (kind, delivered) in &d.delivered_by_kind {
        let dead = d.dead_by_kind.get(kind).copied().unwrap_or(0);
        let _ = write!(
            h,
            "<tr><td>{kind}</td><td class=n data-metric=\"aiq_braze_sync_records_delivered_total{{kind=&quot;{kind}&quot;}}\" data-value=\"{delivered}\">{}</td><td class=n data-metric=\"aiq_braze_sync_records_dead_total{{kind=&quot;{kind}&quot;}}\" data-value=\"{dead}\">{}</td></tr>",
            num(*delivered),
            num(dead)
        );
    }
    h.push_str("</table></section></div>");

    // The latest dead letters.
    let _ = write!(
        h,
        "<section><h2>Latest dead letters</h2><p class=muted>The newest {DEAD_SHOWN}. <code>aiq-braze-sync queue dead</code> lists them all; <code>queue retry-dead</code> and <code>queue purge-dead</code> act on them.</p>"
    );
    if v.dead.is_empty() {
        h.push_str("<p id=no-dead>None.</p>");
    } else {
        h.push_str("<table id=dead><tr><th>id</th><th>kind</th><th>user</th><th>Braze's reason</th><th>object sent</th></tr>");
        for r in v.dead {
            let object = r
                .object
                .as_ref()
                .map_or_else(|| r.what.clone(), |o| o.to_string());
            let _ = write!(
                h,
                "<tr><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                r.id,
                esc(&r.kind),
                esc(&r.user),
                esc(r.reason.as_deref().unwrap_or("")),
                esc(&object)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section></main></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_grouped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(num(1234567), "1\u{2009}234\u{2009}567");
        assert_eq!(num(12), "12");
        assert_eq!(age(61_000), "1 min 1 s");
    }
}
