//! `ferry-worker`: checks that it can run jobs (a trial sandbox run; on failure one line naming the
//! cause and the fix, and exit code 2), binds, prints `listening on ADDR` as its first stdout line,
//! registers with the scheduler and serves jobs until SIGINT/SIGTERM. With `--check-config` it loads
//! the configuration as a start would, checks what can be checked without serving (the settings,
//! then the start-up check without lasting effects), prints the effective settings and exits: 0, or
//! the one-line error and exit code a start would give.

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use ferry_worker::{CheckFailed, Overrides, WorkerConfig, serve as run_worker};

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
    /// Serve Prometheus metrics at /metrics on this address (off by default)
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Check the configuration (file, environment, flags; TLS files, the scheduler URL, the listen
    /// address, bubblewrap, the data directory, a trial job) without serving, print the effective
    /// settings and exit
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    ferry_proto::daemon::init_logging();
    let result = if args.check_config { check_config(args) } else { serve(args) };
    ferry_proto::daemon::exit("ferry-worker", result)
}

/// The configuration a start with these arguments would use.
fn load(args: Args) -> anyhow::Result<WorkerConfig> {
    let flags = Overrides {
        scheduler: args.scheduler,
        listen: args.listen,
        slots: args.slots,
        data_dir: args.data_dir,
        http: args.http,
    };
    WorkerConfig::load(args.config.as_deref(), flags)
}

/// A worker that cannot run jobs says why in one line and exits with code 2.
fn cannot_run_jobs(failed: CheckFailed) -> ! {
    eprintln!("ferry-worker: cannot run jobs: {failed}");
    std::process::exit(2);
}

fn check_config(args: Args) -> anyhow::Result<()> {
    let config = load(args)?;
    config.check()?;
    let report = config.check_sandbox().unwrap_or_else(|failed| cannot_run_jobs(failed));
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", config.summary(&report).join("\n")).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    let mut config = load(args)?;
    // A worker that cannot run jobs must not register: every job sent to it would fail.
    let report =
        ferry_worker::self_check(&config.sandbox, &config.data_dir).unwrap_or_else(|failed| cannot_run_jobs(failed));
    tracing::info!(bwrap = %report.bwrap.display(), version = %report.bwrap_version, "sandbox check passed");
    match &report.cgroups {
        Ok(version) => tracing::info!(version, "each job runs in its own cgroup (memory, pids, cpu weight)"),
        Err(why) => tracing::warn!(
            "no cgroup per job ({why}): memory and process limits hold per process (rlimits), not per job"
        ),
    }
    match &report.disk_quota {
        Ok(()) if config.sandbox.disk_bytes > 0 => {
            tracing::info!(bytes = config.sandbox.disk_bytes, "each job's directory is a tmpfs of this size")
        }
        Ok(()) => tracing::warn!("sandbox.disk_bytes is 0: job directories have no size limit"),
        Err(why) => tracing::warn!("job directories have no size limit ({why}): only RLIMIT_FSIZE per file holds"),
    }
    config.sandbox = report.apply(&config.sandbox);
    // Every call needs a job grant from the scheduler: that is the worker's authentication.
    let check = |addr| ferry_proto::check_exposure(addr, config.tls.is_some(), true, config.insecure);
    let listener = ferry_proto::daemon::bind_and_announce(&config.listen, check).await.map_err(anyhow::Error::msg)?;
    let shutdown = ferry_proto::daemon::shutdown_on_signals()?;
    run_worker(config, listener, shutdown).await
}
