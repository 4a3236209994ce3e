//! `ferry-scheduler`: binds, prints `listening on ADDR` as its first stdout line (so scripts and
//! tests can use port 0), and serves until SIGINT/SIGTERM. With `--check-config` it loads the
//! configuration as a start would, checks what can be checked without serving, prints the effective
//! settings and exits (0, or non-zero with the one-line error a start would give): a service
//! manager's pre-start step, or an operator's check after editing the file.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use ferry_scheduler::{SchedulerConfig, run};

#[derive(Parser, Debug)]
#[command(name = "ferry-scheduler", version, about = "ferry's scheduler: allocates workers, stores toolchains")]
struct Args {
    /// TOML configuration file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7700; port 0 picks a free port)
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Where toolchain archives are stored (default ~/.local/share/ferry-scheduler)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics and a status page at / on this address (off by default)
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Check the configuration (file, environment, flags; TLS files, tokens, the listen address,
    /// the data directory) without serving, print the effective settings and exit
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    ferry_proto::daemon::init_logging();
    let result = if args.check_config { check_config(args) } else { serve(args) };
    ferry_proto::daemon::exit("ferry-scheduler", result)
}

/// The configuration a start with these arguments would use.
fn load(args: Args) -> anyhow::Result<SchedulerConfig> {
    let mut config = SchedulerConfig::load(args.config.as_deref(), args.listen, args.data_dir)?;
    config.http = args.http.or(config.http);
    Ok(config)
}

fn check_config(args: Args) -> anyhow::Result<()> {
    let config = load(args)?;
    config.check()?;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", config.summary().join("\n")).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    let config = load(args)?;
    let check = |addr| config.check_exposure(addr).map_err(|e| format!("{e:#}"));
    let listener = ferry_proto::daemon::bind_and_announce(&config.listen, check).await.map_err(anyhow::Error::msg)?;
    let shutdown = ferry_proto::daemon::shutdown_on_signals()?;
    run(config, listener, shutdown).await
}
