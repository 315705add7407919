//! Log output (`--log-format`): the production JSON format, one flat JSON object per line
//! (`docs/logging.md` lists its fields), or text for humans. Tests install the same JSON
//! subscriber, so the lines they search for secret values are the lines production writes.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The production JSON subscriber: each event is one object with `timestamp`, `level`, `target`,
/// `message` and the event's own fields at the top level (not nested under `fields`), and no
/// span fields (the webhook opens no spans). An event field named like one of the four fixed
/// keys would repeat a key: `tests/docs.rs` parses the real binary's output strictly, and checks
/// every event in src/ against docs/logging.md, to keep that from happening.
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .finish()
}

/// Installs the subscriber for `format` (`json` or `text`) on stderr, filtered by `RUST_LOG`
/// (default `info`). An already installed subscriber (e.g. in a test binary) is kept.
pub fn init(format: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        "json" => {
            let _ = json_subscriber(filter, std::io::stderr).try_init();
        }
        "text" => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init();
        }
        other => anyhow::bail!("--log-format must be `json` or `text`, not `{other}`"),
    }
    Ok(())
}
