//! Logging: a `tracing` subscriber with an env filter (`RUST_LOG`, default `capd_inplace=info`) and
//! text or JSON output.

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

const DEFAULT_FILTER: &str = "capd_inplace=info,tower_http=info";

/// Installs the global subscriber. Logs go to stderr so stdout stays for CLI output.
pub fn init(format: LogFormat) -> Result<(), Error> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| Error(err.to_string()))
}
