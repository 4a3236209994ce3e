//! Logging to a file, never to the build's output. Off unless `FERRY_LOG` (or `log.level`) is set.

use std::fs::OpenOptions;
use std::sync::Mutex;

use crate::config::Config;

/// Starts file logging if configured. Failure to open the log file silently disables logging:
/// a log problem must never disturb a build.
pub fn init(config: &Config) {
    let Some(filter) = &config.log else { return };
    if let Some(parent) = config.log_file.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let Ok(file) = OpenOptions::new().create(true).append(true).open(&config.log_file) else { return };
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
