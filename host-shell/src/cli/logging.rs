//! Log output on stderr through `tracing`; the core's `log` records are
//! forwarded to it.

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger. `verbose` counts `-v` flags; the SPMBOX_LOG
/// environment variable (a `tracing` filter) overrides it.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("SPMBOX_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
