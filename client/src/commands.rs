//! The command-line face of `ferry`: `toolchain package|list` and `stats`. Glue over the library
//! crates; output is a small aligned table, or JSON with `--json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_toolchains::{LocalStore, resolve_compiler};

use crate::config::Config;
use crate::stats::Stats;

#[derive(Subcommand, Debug)]
pub enum ToolchainCommand {
    /// Identify a toolchain and build its archive into the local store
    Package(PackageArgs),
    /// Package a toolchain and upload it to the scheduler (skipped when it is already there)
    Upload(PackageArgs),
    /// List toolchains
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct PackageArgs {
    /// The rustc to package (default: `RUSTC`, else `rustc` from PATH, as cargo resolves it)
    #[arg(long, value_name = "PATH")]
    rustc: Option<PathBuf>,
    /// Include the standard library of this target too (repeatable); the host is always included
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
    /// A rustup toolchain name, as in `cargo +nightly` (only when rustc is a rustup proxy)
    #[arg(value_name = "+TOOLCHAIN")]
    plus: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// List the local store instead of the scheduler's
    #[arg(long)]
    local: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct WriterKeyArgs {
    /// Make the key (in `FERRY_WRITER_KEY_FILE`, by default `<cache dir>/writer.key`) when there
    /// is none yet, instead of failing
    #[arg(long)]
    create: bool,
}

#[derive(Args, Debug)]
pub struct SetupArgs {
    /// Where to make the links (default: `<cache dir>/bin`)
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Only compiles of this crate (its --crate-name)
    #[arg(long = "crate", value_name = "NAME")]
    krate: Option<String>,
    /// How many recorded compiles to show, newest first
    #[arg(long, value_name = "N", default_value_t = 1)]
    last: usize,
    /// One line per recorded compile
    #[arg(long)]
    list: bool,
    /// Show only what differs between two compiles: each a record file (from any machine's
    /// <cache dir>/explain/) or a cache dir (its newest record, of --crate if given)
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    diff: Option<Vec<PathBuf>>,
    /// The hits verification found wrong (FERRY_VERIFY): what differed, and the parts of the
    /// entry's key that differ from the fresh compile's
    #[arg(long)]
    mismatches: bool,
    /// A compiler command to explain now, without compiling (after --)
    #[arg(last = true, value_name = "RUSTC ARGS")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    json: bool,
    /// Reset every counter to zero
    #[arg(long)]
    zero: bool,
}

pub fn toolchain(cmd: ToolchainCommand) -> anyhow::Result<()> {
    let config = Config::load_reporting()?;
    crate::logging::init(&config);
    match cmd {
        ToolchainCommand::Package(args) => package(&config, args),
        ToolchainCommand::Upload(args) => upload(&config, args),
        ToolchainCommand::List(args) if args.local => list(&config, args),
        ToolchainCommand::List(args) => list_cluster(&config, args),
    }
}

fn package(config: &Config, args: PackageArgs) -> anyhow::Result<()> {
    let (compiler, packaged) = package_only(config, &args)?;
    print_packaged(&compiler, &packaged, args.json);
    Ok(())
}

fn package_only(
    config: &Config,
    args: &PackageArgs,
) -> anyhow::Result<(ferry_toolchains::Compiler, ferry_toolchains::Packaged)> {
    let plus = match &args.plus {
        Some(p) => {
            Some(p.strip_prefix('+').with_context(|| format!("unexpected argument '{p}' (did you mean +{p}?)"))?)
        }
        None => None,
    };
    let rustc = args
        .rustc
        .clone()
        .or_else(|| std::env::var_os("RUSTC").filter(|s| !s.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("rustc"));
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let compiler = resolve_compiler(&rustc, plus, &cwd)?;
    let store = LocalStore::open(&config.cache_dir)?;
    store.check_writable()?;
    let packaged = store.package(&compiler, &args.targets)?;
    Ok((compiler, packaged))
}

fn print_packaged(compiler: &ferry_toolchains::Compiler, packaged: &ferry_toolchains::Packaged, json: bool) {
    let t = &packaged.identified;
    if json {
        let json = serde_json::json!({
            "id": t.id.to_hex(),
            "files": t.files,
            "bytes": t.bytes,
            "archive": packaged.archive,
            "archive_bytes": packaged.archive_bytes,
            "built": packaged.built,
            "rustc_version": t.probe.version,
            "release": t.probe.release,
            "host": t.probe.host,
            "targets": t.targets,
            "rustc": compiler.rustc,
            "root": compiler.root,
            "resolved_via": compiler.via,
        });
        outln!("{json}");
    } else {
        let state = if packaged.built { "built" } else { "already in the store" };
        outln!("id        {}", t.id);
        outln!("rustc     {} ({})", t.probe.version, compiler.root.display());
        outln!("targets   {}", t.targets.join(", "));
        outln!("files     {} ({})", t.files, human_bytes(t.bytes));
        outln!("archive   {} ({}, {state})", packaged.archive.display(), human_bytes(packaged.archive_bytes));
    }
}

fn upload(config: &Config, args: PackageArgs) -> anyhow::Result<()> {
    let (_, packaged) = package_only(config, &args)?;
    let id = packaged.identified.id;
    let sent = runtime()?.block_on(async {
        let mut client = crate::cluster::scheduler(config).await?;
        crate::cluster::upload(&mut client, &packaged).await
    })?;
    // The toolchain is on the scheduler: should the scheduler evict it later, the next compile
    // uploads it again at once instead of taking the last attempt's marker for a failure.
    let marker = crate::files::toolchain_upload_lock(&config.cache_dir, &id).with_extension("started");
    let _ = std::fs::remove_file(marker);
    if args.json {
        outln!("{}", serde_json::json!({ "id": id.to_hex(), "uploaded": sent > 0, "bytes_sent": sent }));
    } else if sent > 0 {
        outln!("uploaded toolchain {id} ({})", human_bytes(sent));
    } else {
        outln!("toolchain {id} is already on the scheduler");
    }
    Ok(())
}

fn list_cluster(config: &Config, args: ListArgs) -> anyhow::Result<()> {
    let list = runtime()?.block_on(async {
        let mut client = crate::cluster::scheduler(config).await?;
        let r = client.list_toolchains(ferry_proto::v1::ListToolchainsRequest {}).await;
        r.map_err(crate::cluster::status).map(|r| r.into_inner())
    })?;
    if args.json {
        let items: Vec<serde_json::Value> = list
            .toolchains
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": crate::cluster::hex(&t.id),
                    "rustc_version": t.rustc_version,
                    "targets": t.targets,
                    "bytes": t.bytes,
                    "uploaded": t.uploaded,
                    "last_used": t.last_used,
                    "workers": t.workers,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    if list.toolchains.is_empty() {
        outln!("no toolchains on the scheduler; upload one with 'ferry toolchain upload'");
        return Ok(());
    }
    outln!("{:<16}  {:<40}  {:>9}  {:<10}  WORKERS", "ID", "RUSTC", "ARCHIVE", "UPLOADED");
    for t in &list.toolchains {
        outln!(
            "{:<16}  {:<40}  {:>9}  {:<10}  {}",
            &crate::cluster::hex(&t.id)[..16],
            t.rustc_version,
            human_bytes(t.bytes),
            date(t.uploaded),
            t.workers.join(",")
        );
    }
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let config = Config::load_reporting()?;
    let s = runtime()?.block_on(async {
        let mut client = crate::cluster::scheduler(&config).await?;
        let r = client.status(ferry_proto::v1::StatusRequest {}).await;
        r.map_err(crate::cluster::status).map(|r| r.into_inner())
    })?;
    if args.json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id,
                    "address": w.address,
                    "slots": w.slots,
                    "busy": w.busy,
                    "toolchains": w.toolchains.iter().map(|t| crate::cluster::hex(&Some(t.clone()))).collect::<Vec<_>>(),
                    "version": w.version,
                    "last_seen_ms": w.last_seen_ms,
                    "failures": w.failures,
                    "last_error": w.last_error,
                    "quarantined_ms": w.quarantined_ms,
                })
            })
            .collect();
        let json = serde_json::json!({
            "workers": workers,
            "queued": s.queued,
            "running": s.running,
            "jobs_done": s.jobs_done,
            "jobs_failed": s.jobs_failed,
            "shared_corrupt_entries": s.shared_corrupt_entries,
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    outln!(
        "{} workers, {} jobs running, {} queued, {} done, {} failed; {} corrupt shared cache entries removed",
        s.workers.len(),
        s.running,
        s.queued,
        s.jobs_done,
        s.jobs_failed,
        s.shared_corrupt_entries
    );
    if !s.workers.is_empty() {
        outln!(
            "{:<20}  {:<22}  {:>5}  {:>5}  {:>10}  {:>8}  TOOLCHAINS",
            "WORKER",
            "ADDRESS",
            "SLOTS",
            "BUSY",
            "LAST SEEN",
            "FAILURES"
        );
    }
    for w in &s.workers {
        let toolchains: Vec<String> =
            w.toolchains.iter().map(|t| crate::cluster::hex(&Some(t.clone()))[..16].to_owned()).collect();
        outln!(
            "{:<20}  {:<22}  {:>5}  {:>5}  {:>8}ms  {:>8}  {}",
            w.id,
            w.address,
            w.slots,
            w.busy,
            w.last_seen_ms,
            w.failures,
            toolchains.join(",")
        );
        if w.quarantined_ms > 0 {
            outln!("  quarantined for {} s more: its jobs kept failing", w.quarantined_ms.div_ceil(1000));
        }
        if !w.last_error.is_empty() {
            outln!("  last error: {}", w.last_error);
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

fn list(config: &Config, args: ListArgs) -> anyhow::Result<()> {
    let store = LocalStore::open(&config.cache_dir)?;
    let all = store.list()?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        outln!("no toolchains in {}", config.cache_dir.display());
        return Ok(());
    }
    outln!("{:<16}  {:<40}  {:>9}  {:>9}  {:<10}  TARGETS", "ID", "RUSTC", "FILES", "ARCHIVE", "PACKAGED");
    for t in all {
        outln!(
            "{:<16}  {:<40}  {:>9}  {:>9}  {:<10}  {}",
            &t.id[..16],
            t.rustc_version,
            human_bytes(t.bytes),
            human_bytes(t.archive_bytes),
            date(t.packaged_at),
            t.targets.join(",")
        );
    }
    Ok(())
}

pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let config = Config::load_reporting()?;
    let path = config.stats_path();
    // Counters include the shared-tier publishes that finish after a build returns.
    crate::compile::wait_for_publishers(&config.cache_dir, std::time::Duration::from_secs(30));
    if args.zero {
        Stats::zero(&path)?;
        outln!("statistics zeroed");
        return Ok(());
    }
    let stats = Stats::read(&path);
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        out!("{}", stats.table());
    }
    Ok(())
}

/// Prints this machine's writer key (the public half): the line a trust file lists for a CI
/// writer that publishes to a Redis or memcached tier.
pub fn writer_key(args: WriterKeyArgs) -> anyhow::Result<()> {
    let config = Config::load_reporting()?;
    let path = &config.writer_key_file;
    let signer = match ferry_cache::Signer::read(path) {
        Ok(signer) => signer,
        Err(_) if args.create && !path.exists() => ferry_cache::Signer::create(path).map_err(anyhow::Error::msg)?,
        Err(e) if path.exists() => anyhow::bail!("{e}"),
        Err(e) => anyhow::bail!("{e} ('ferry writer-key --create' makes one)"),
    };
    outln!("{} {}", signer.public(), hostname());
    Ok(())
}

/// `ferry setup`: links named after the compilers in `PATH`, pointing at this ferry. A directory
/// of them first in `PATH` makes every C and C++ compile a build starts (cc-rs in build scripts,
/// make, CMake, autotools) go through ferry, which runs the next compiler of that name in `PATH`.
pub fn setup(args: SetupArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = match args.dir {
        Some(d) => d,
        None => Config::load_reporting()?.cache_dir.join("bin"),
    };
    let me = std::env::current_exe().and_then(std::fs::canonicalize).context("finding ferry's own path")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = Vec::new();
    for name in ferry_cache::cc::COMPILER_NAMES {
        let link = dir.join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if !m.file_type().is_symlink() => {
                anyhow::bail!("{} exists and is not a link: remove it or choose another --dir", link.display())
            }
            Ok(_) => std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?,
            Err(_) => {}
        }
        if crate::compile::cc::find_compiler(std::path::Path::new(name)).is_none() {
            continue;
        }
        std::os::unix::fs::symlink(&me, &link).with_context(|| format!("making {}", link.display()))?;
        made.push(name);
    }
    if made.is_empty() {
        anyhow::bail!("no C or C++ compiler ({}) in PATH: nothing to link", ferry_cache::cc::COMPILER_NAMES.join(", "));
    }
    outln!("made {} → {}: {}", dir.display(), me.display(), made.join(" "));
    outln!("put the directory first in PATH (beside RUSTC_WRAPPER=ferry), e.g. in your shell's profile:");
    outln!("  export PATH=\"{}:$PATH\"", dir.display());
    Ok(())
}

/// This machine's name, as the kernel has it (empty when it cannot be read): for the scheduler's
/// fair queue and the name a writer key registers under.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    use crate::explain;
    if !args.command.is_empty() {
        for record in crate::compile::explain_command(&args.command)? {
            outln!("{}", explain::render(&record));
        }
        return Ok(());
    }
    if let Some(specs) = &args.diff {
        let a = explain::load(&specs[0], args.krate.as_deref())?;
        let b = explain::load(&specs[1], args.krate.as_deref())?;
        outln!("A: {} ({}, {})\nB: {} ({}, {})", a.krate, a.cwd, a.outcome, b.krate, b.cwd, b.outcome);
        out!("{}", explain::diff(&a, &b));
        return Ok(());
    }
    let config = Config::load_reporting()?;
    if args.mismatches {
        let found = crate::compile::mismatches(&config.cache_dir);
        let found: Vec<_> = found.iter().filter(|(_, m)| args.krate.as_deref().is_none_or(|k| m.krate == k)).collect();
        if found.is_empty() {
            outln!("no verified hit has differed (records are kept in {})", config.cache_dir.join("verify").display());
        }
        for (path, m) in found.iter().take(if args.list { usize::MAX } else { args.last.max(1) }) {
            outln!(
                "{}
crate {} ({} tier, {}): {} differed",
                path.display(),
                m.krate,
                m.tier,
                date(m.time),
                m.differ.join(", ")
            );
            match &m.removed_from[..] {
                [] => outln!("the entry could not be removed here"),
                tiers => outln!("the entry was removed from the {} tier", tiers.join(" and ")),
            }
            if m.fresh_exit != Some(0) || !m.fresh_stderr.is_empty() {
                outln!("the fresh compile exited {:?}; its stderr:\n{}", m.fresh_exit, m.fresh_stderr);
            }
            if m.differ.iter().any(|d| d == "stderr") {
                outln!("the replayed stderr:\n{}", m.replayed_stderr);
            }
            if m.hit.result_key == m.fresh.result_key {
                outln!("both keys are the same: the compile is not deterministic, or the entry was made wrong");
            }
            outln!("A: the entry's key  B: the fresh compile's key (its own observation)");
            out!("{}", explain::diff(&m.hit, &m.fresh));
        }
        return Ok(());
    }
    let records = explain::records(&config.cache_dir, args.krate.as_deref());
    if records.is_empty() {
        anyhow::bail!(
            "no recorded compiles in {} (the wrapper records the last {} there)",
            config.cache_dir.join("explain").display(),
            explain::KEEP
        );
    }
    for (path, record) in records.iter().take(if args.list { usize::MAX } else { args.last }) {
        if args.list {
            outln!("{}  {:<24} {}", path.display(), record.krate, record.outcome);
        } else {
            outln!("{}\n{}", path.display(), explain::render(record));
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// `YYYY-MM-DD` of a Unix time, without a date crate (civil-from-days, proleptic Gregorian).
fn date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_795_219_200), "2026-11-21");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
