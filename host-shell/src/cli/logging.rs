//! Log output on stderr through `tracing`; the core's `log` records are
//! forwarded to it, so each event is one line whoever logs it.
//!
//! Text lines carry colour only when stderr is a terminal (never in a
//! file, a pipe or journald), and no timestamp under journald, which
//! stamps every line itself. `--log-format json` prints one JSON object
//! per line instead: `timestamp`, `level`, `message` and the event's other
//! fields (`volume`, ...), and `span` with the daemon's `domain`, `host`
//! and `epoch`.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The filter a `-v` count asks for: warnings only without one, then info,
/// debug and trace.
pub fn level_of(verbose: u8) -> &'static str {
    match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    }
}

/// Whether stderr is a stream journald reads (systemd sets JOURNAL_STREAM
/// to its device and inode).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the stderr logger at `level` (a `tracing` filter such as
/// `info`); the SPMBOX_LOG environment variable overrides it.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("SPMBOX_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text if stderr_is_journal() => {
            builder.with_ansi(false).without_time().try_init()
        }
        LogFormat::Text => builder.with_ansi(colour).try_init(),
    };
}
