//! `ferry-worker`: binds, prints `listening on ADDR` as its first stdout line, registers with the
//! scheduler (reconnecting with backoff whenever it goes away) and runs jobs until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use ferry_worker::{Overrides, WorkerConfig, serve as run_worker};

#[derive(Parser, Debug)]
#[command(name = "ferry-worker", version, about = "ferry's worker: runs compile jobs in a sandbox")]
struct Args {
    /// The scheduler, e.g. http://127.0.0.1:7700
    #[arg(long, value_name = "URL")]
    scheduler: Option<String>,
    /// Address to listen on for jobs (default 127.0.0.1:0)
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Jobs run at once (default: the number of CPUs)
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
    /// TOML configuration file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where blobs, toolchains and job directories live (default ~/.local/share/ferry-worker)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    ferry_proto::daemon::init_logging();
    ferry_proto::daemon::exit("ferry-worker", serve(args))
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    let flags =
        Overrides { scheduler: args.scheduler, listen: args.listen, slots: args.slots, data_dir: args.data_dir };
    let config = WorkerConfig::load(args.config.as_deref(), flags)?;
    let tokens_required = matches!(config.tokens, ferry_proto::Tokens::Required(_));
    let check = |addr| ferry_proto::check_exposure(addr, config.tls.is_some(), tokens_required, config.insecure);
    let listener = ferry_proto::daemon::bind_and_announce(&config.listen, check).await.map_err(anyhow::Error::msg)?;
    let shutdown = ferry_proto::daemon::shutdown_on_signals()?;
    run_worker(config, listener, shutdown).await
}
