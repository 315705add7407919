//! Log lines on stderr (JSON or text). Any field may carry request-derived text (uids, names, user
//! names, error texts that quote a peer), so every field is clipped as it is formatted: a huge
//! value is never even rendered whole. Warnings and errors are rate-limited per call site, so a
//! peer that triggers one on every connection (HTTP/2 rapid reset, refused bodies) cannot flood
//! the log: a few lines per window, then one line that says how many were left out.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Bytes kept of one field (uids, names, namespaces, user names are far shorter when real).
pub const FIELD_MAX: usize = 256;
/// Bytes kept of the message and of `error` fields (a denial lists up to ten problems).
pub const MESSAGE_MAX: usize = 4096;
/// Bytes of fields after which the remaining fields of a line are left out; with the clipping
/// above, no line comes near 64 KiB.
const LINE_FIELDS_MAX: usize = 16 * 1024;
/// Warnings and errors per call site per window; later ones are counted, not written.
const BURST: u32 = 5;
const WINDOW: Duration = Duration::from_secs(10);

/// Installs the subscriber for `serve`: level from `RUST_LOG` (default `info`), `json` or `text`.
/// An already installed subscriber (e.g. in a test binary) is kept.
pub fn init(format: &str) -> anyhow::Result<()> {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let json = match format {
        "json" => true,
        "text" => false,
        other => anyhow::bail!(
            "--log-format must be `json` or `text`, not `{}`",
            clip(other, 64).0
        ),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = subscriber(json, filter, std::io::stderr).try_init();
    Ok(())
}

/// The production JSON subscriber writing to `writer`: tests install it to search the lines
/// production writes (`docs/logging.md` lists their fields).
pub fn json_subscriber<W>(
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    subscriber(true, filter, writer)
}

fn subscriber<W>(
    json: bool,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    let layer = tracing_subscriber::fmt::layer()
        .event_format(Lines::new(json))
        .with_writer(writer)
        // A suppressed warning is a formatting "error"; it must not be reported as one.
        .log_internal_errors(false);
    tracing_subscriber::registry().with(filter).with(layer)
}

/// The event formatter: one line per event, fields clipped, warnings rate-limited.
pub struct Lines {
    json: bool,
    limiter: Limiter,
}

impl Lines {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            limiter: Limiter::default(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // `Err` writes nothing (the layer is built with `log_internal_errors(false)`).
        let suppressed = self.limiter.admit(meta).ok_or(fmt::Error)?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        if suppressed > 0 {
            fields.push("suppressed", Value::Raw(suppressed.to_string()));
        }
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let line = if self.json {
            json_line(&timestamp, meta, &fields)
        } else {
            text_line(&timestamp, meta, &fields)
        };
        writer.write_str(&line)
    }
}

enum Value {
    /// Text, already clipped.
    Text(String),
    /// A number or boolean, written as is.
    Raw(String),
}

#[derive(Default)]
struct Fields {
    fields: Vec<(&'static str, Value)>,
    /// Bytes recorded so far; past [`LINE_FIELDS_MAX`] further fields are dropped.
    bytes: usize,
    dropped: usize,
}

impl Fields {
    fn push(&mut self, name: &'static str, value: Value) {
        let len = match &value {
            Value::Text(s) | Value::Raw(s) => s.len(),
        };
        if self.bytes + len > LINE_FIELDS_MAX {
            self.dropped += 1;
            return;
        }
        self.bytes += len;
        self.fields.push((name, value));
    }

    fn text(&mut self, field: &Field, render: impl FnOnce(&mut Clipper<'_>) -> fmt::Result) {
        let max = match field.name() {
            "message" | "error" => MESSAGE_MAX,
            _ => FIELD_MAX,
        };
        let mut out = String::new();
        let mut clipper = Clipper {
            out: &mut out,
            room: max,
            clipped: false,
        };
        // An error here only means the value was cut: what fit is kept.
        let _ = render(&mut clipper);
        if clipper.clipped {
            out.push_str("…[clipped]");
        }
        self.push(field.name(), Value::Text(out));
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, |c| c.write_str(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, |c| write!(c, "{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, |c| write!(c, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field.name(), Value::Raw(value.to_string()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field.name(), Value::Raw(value.to_string()));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let text = if value.is_finite() {
            value.to_string()
        } else {
            format!("\"{value}\"")
        };
        self.push(field.name(), Value::Raw(text));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field.name(), Value::Raw(value.to_string()));
    }
}

/// A `fmt::Write` that keeps at most `room` bytes (on a character boundary) and then fails, which
/// stops the formatting of the value: a 3 MB uid costs 256 bytes, not 3 MB.
struct Clipper<'a> {
    out: &'a mut String,
    room: usize,
    clipped: bool,
}

impl fmt::Write for Clipper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() <= self.room {
            self.out.push_str(s);
            self.room -= s.len();
            return Ok(());
        }
        let (kept, _) = clip(s, self.room);
        self.out.push_str(kept);
        self.room = 0;
        self.clipped = true;
        Err(fmt::Error)
    }
}

/// At most `max` bytes of `s`, cut on a character boundary; and whether anything was cut.
pub fn clip(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

fn json_line(timestamp: &str, meta: &tracing::Metadata<'_>, fields: &Fields) -> String {
    let mut line = String::with_capacity(128 + fields.bytes);
    line.push_str("{\"timestamp\":");
    json_string(&mut line, timestamp);
    line.push_str(",\"level\":");
    json_string(&mut line, meta.level().as_str());
    // Flat: the event's fields sit next to the fixed keys (docs/logging.md); tests/docs.rs keeps
    // fields from repeating a fixed key.
    for (name, value) in &fields.fields {
        line.push(',');
        json_string(&mut line, name);
        line.push(':');
        match value {
            Value::Text(s) => json_string(&mut line, s),
            Value::Raw(s) => line.push_str(s),
        }
    }
    if fields.dropped > 0 {
        let _ = write!(line, ",\"fields_left_out\":{}", fields.dropped);
    }
    line.push_str(",\"target\":");
    json_string(&mut line, meta.target());
    line.push_str("}\n");
    line
}

fn text_line(timestamp: &str, meta: &tracing::Metadata<'_>, fields: &Fields) -> String {
    let mut line = String::with_capacity(128 + fields.bytes);
    let _ = write!(line, "{timestamp} {:>5} {}:", meta.level(), meta.target());
    for (name, value) in &fields.fields {
        line.push(' ');
        if *name != "message" {
            line.push_str(name);
            line.push('=');
        }
        match value {
            // Control characters escaped: a value cannot start a forged line.
            Value::Text(s) => {
                for c in s.chars() {
                    if c.is_control() {
                        let _ = write!(line, "{}", c.escape_unicode());
                    } else {
                        line.push(c);
                    }
                }
            }
            Value::Raw(s) => line.push_str(s),
        }
    }
    if fields.dropped > 0 {
        let _ = write!(line, " fields_left_out={}", fields.dropped);
    }
    line.push('\n');
    line
}

/// `s` as a JSON string.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Per call site: how many warnings or errors were written in the current window, and how many
/// were left out.
#[derive(Default)]
struct Limiter {
    sites: Mutex<HashMap<tracing::callsite::Identifier, Window>>,
}

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

impl Limiter {
    /// `None`: leave this event out. `Some(n)`: write it, noting `n` left out before it.
    fn admit(&self, meta: &tracing::Metadata<'_>) -> Option<u64> {
        // Levels order by verbosity: INFO and more verbose pass unlimited.
        if *meta.level() > Level::WARN {
            return Some(0);
        }
        let now = Instant::now();
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let window = sites.entry(meta.callsite()).or_insert(Window {
            started: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            let suppressed = window.suppressed;
            *window = Window {
                started: now,
                written: 1,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if window.written < BURST {
            window.written += 1;
            Some(0)
        } else {
            window.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn capture(json: bool, emit: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .event_format(Lines::new(json))
            .with_writer(move || sink.clone())
            .log_internal_errors(false);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn request_derived_fields_are_clipped_and_lines_stay_small() {
        let uid = "u".repeat(3 * 1024 * 1024);
        let pod = "p\n".repeat(100_000);
        let message = "m".repeat(100_000);
        let lines = capture(true, || {
            tracing::info!(uid = %uid, pod = pod.as_str(), namespace = ?pod, error = %message, ops = 3, "admission");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert!(line.len() < 64 * 1024, "{} bytes", line.len());
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
        let fields = &parsed;
        let uid_logged = fields["uid"].as_str().unwrap();
        assert!(uid_logged.starts_with("uuu") && uid_logged.ends_with("…[clipped]"));
        assert!(uid_logged.len() <= FIELD_MAX + "…[clipped]".len());
        assert_eq!(fields["ops"], 3);
        assert_eq!(parsed["level"], "INFO");
        assert!(parsed["timestamp"].as_str().unwrap().ends_with('Z'));

        let lines = capture(false, || {
            tracing::info!(pod = pod.as_str(), "admission");
        });
        assert_eq!(lines.len(), 1, "a newline in a value cannot start a line");
        assert!(lines[0].contains("pod=p\\u{a}p"));
        // Escaping may grow a clipped value, boundedly (at most six bytes per byte kept).
        assert!(lines[0].len() < 7 * FIELD_MAX);
    }

    #[test]
    fn repeated_warnings_are_rate_limited_per_call_site() {
        let lines = capture(true, || {
            for i in 0..1000 {
                tracing::warn!(n = i, "the same warning");
                if i % 100 == 0 {
                    tracing::warn!("another site");
                }
                tracing::info!("information is not limited");
            }
        });
        let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
        assert_eq!(count("the same warning"), BURST as usize);
        assert_eq!(count("another site"), BURST as usize);
        assert_eq!(count("information is not limited"), 1000);
    }
}
