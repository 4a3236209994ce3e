//! The `ferry` binary. Two faces: as `RUSTC_WRAPPER` (`ferry /path/to/rustc ARGS...`) it is the
//! compiler wrapper, whose stdout and stderr belong to the compiler; otherwise it is the command line
//! (`ferry toolchain ...`, `ferry stats`). This file only decides which face and dispatches.

/// `println!` for the command line's output: a closed stdout (`ferry stats | head`) ends the
/// process quietly with the status a SIGPIPE gives (141), where `println!` would panic. (SIGPIPE
/// itself stays ignored, as Rust sets it: a TLS peer that closes the connection must be an error
/// the command reports, not a signal that kills it without a word.)
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(141);
        }
    }};
}

/// `print!` for the command line's output (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(141);
        }
    }};
}

mod cluster;
mod commands;
mod compile;
mod config;
mod digests;
mod explain;
mod files;
mod logging;
mod phases;
mod process;
mod reason;
mod shared;
mod stats;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Subcommand names; anything else as the first argument means wrapper mode.
const SUBCOMMANDS: &[&str] = &["toolchain", "stats", "status", "explain", "writer-key", "setup", "help"];

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "A distributed compilation scheduler and toolchain-exact build cache",
    after_help = "Wrapper mode: set RUSTC_WRAPPER=ferry (and CARGO_INCREMENTAL=0) and cargo runs \
                  'ferry /path/to/rustc ARGS...' for every compile; ferry answers from its cache, \
                  sends misses to the cluster when FERRY_SCHEDULER is set, or compiles here. \
                  It never writes to the build's output: see 'ferry stats' and the log \
                  (FERRY_LOG=info, FERRY_LOG_FILE)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Package and list compiler toolchains
    #[command(subcommand)]
    Toolchain(commands::ToolchainCommand),
    /// Show or reset the counters of all wrapper processes
    Stats(commands::StatsArgs),
    /// Show the cluster: workers, slots, load, toolchains, queue
    Status(commands::StatusArgs),
    /// Show every part of a compile's cache key, or what differs between two compiles
    Explain(commands::ExplainArgs),
    /// Print this machine's writer key (public half) for a trust file
    WriterKey(commands::WriterKeyArgs),
    /// Make the compiler links (cc, c++, gcc, g++, clang, clang++ → ferry) that put C and C++
    /// compiles through ferry when their directory comes first in PATH
    Setup(commands::SetupArgs),
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // Masquerade: a link named after a compiler (`cc` → ferry) is that compiler, wrapped.
    let me = std::path::Path::new(&args[0]);
    if me.file_name().is_some_and(|n| !n.to_string_lossy().starts_with("ferry")) && ferry_cache::cc::is_c_compiler(me) {
        return compile::cc::wrap(&args);
    }
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if args.len() > 1 && !SUBCOMMANDS.contains(&first) && !first.starts_with('-') {
        return compile::wrap(&args[1..]);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Toolchain(cmd) => commands::toolchain(cmd),
        Command::Stats(args) => commands::stats(args),
        Command::Status(args) => commands::status(args),
        Command::Explain(args) => commands::explain(args),
        Command::WriterKey(args) => commands::writer_key(args),
        Command::Setup(args) => commands::setup(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
