//! Logging: a `tracing` subscriber with an env filter (`RUST_LOG`, default `capd_inplace=info`) and
//! text or JSON output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The subscriber could not be installed (one is already set).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the log subscriber: {0}")]
pub struct Error(String);

/// The server logs what it does; the CLI shows progress itself and logs only problems.
pub const SERVER_FILTER: &str = "capd_inplace=info,tower_http=info";
pub const CLI_FILTER: &str = "capd_inplace=warn";

/// Installs the global subscriber with `default_filter` unless `RUST_LOG` is set. Logs go to
/// stderr so stdout stays for CLI output; colours only on a terminal, so log files stay plain.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), Error> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| Error(err.to_string()))
}
