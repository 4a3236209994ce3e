//! Logging to a file, never to the build's output. Off unless `FERRY_LOG` (or `log.level`) is set.

use std::fs::OpenOptions;
use std::sync::Mutex;

use crate::config::Config;

/// Starts file logging if configured, or at `warn` when a setting could not be used (so that
/// reaches the log even with logging off). Failure to open the log file silently disables
/// logging: a log problem must never disturb a build.
pub fn init(config: &Config) {
    let warn = "warn".to_owned();
    let Some(filter) = config.log.as_ref().or((!config.problems.is_empty()).then_some(&warn)) else { return };
    if let Some(parent) = config.log_file.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let Ok(file) = OpenOptions::new().create(true).append(true).open(&config.log_file) else { return };
    // A filter that does not parse logs at `info` (and says so once logging runs).
    let parsed = tracing_subscriber::EnvFilter::try_new(filter);
    let bad_filter = parsed.is_err();
    let filter = parsed.unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    if bad_filter {
        tracing::warn!(filter = %config.log.as_deref().unwrap_or_default(), "the log filter (FERRY_LOG or log.level) does not parse; logging at info");
    }
}
