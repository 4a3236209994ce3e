//! `ferry-scheduler`: binds, prints `listening on ADDR` as its first stdout line (so scripts and
//! tests can use port 0), and serves until SIGINT/SIGTERM.

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
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    ferry_proto::daemon::init_logging();
    ferry_proto::daemon::exit("ferry-scheduler", serve(args))
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    let mut config = SchedulerConfig::load(args.config.as_deref(), args.listen, args.data_dir)?;
    config.http = args.http.or(config.http);
    let check = |addr| config.check_exposure(addr).map_err(|e| format!("{e:#}"));
    let listener = ferry_proto::daemon::bind_and_announce(&config.listen, check).await.map_err(anyhow::Error::msg)?;
    let shutdown = ferry_proto::daemon::shutdown_on_signals()?;
    run(config, listener, shutdown).await
}
