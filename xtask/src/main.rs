//! `cargo xtask`: the benchmark harness and the demo, kept out of the product crates.
//!
//! - `cargo xtask demo`: the README's main job — builds a generated sample workspace through
//!   ferry twice (cold, then after `cargo clean`) and prints `ferry stats`.
//! - `cargo xtask bench [toolchain|wrapper|all]`: figures as ratios against a baseline measured in
//!   the same run (plain `tar -czf`, plain `cargo build`).
//!
//! When `XTASK_RECORD` is set this binary is a recording `RUSTC_WRAPPER`: it appends the call
//! (cwd, args, environment) as one JSON line to that file and execs ferry, so single hits can be
//! replayed and timed exactly as cargo ran them.

mod bench;
mod bench_cluster;
mod sample;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    if let Some(file) = std::env::var_os("XTASK_RECORD") {
        return bench::record_and_exec(Path::new(&file));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo(),
        ["bench"] | ["bench", "all"] => {
            bench::toolchain()?;
            bench::wrapper()?;
            bench_cluster::allocations()
        }
        ["bench", "cluster"] => bench_cluster::allocations(),
        ["bench", "toolchain"] => bench::toolchain(),
        ["bench", "wrapper"] => bench::wrapper(),
        _ => bail!("usage: cargo xtask demo | cargo xtask bench [toolchain|wrapper|cluster|all]"),
    }
}

/// Builds the release binaries and returns the path of `ferry`.
pub fn build_ferry() -> anyhow::Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "-p", "ferry-client"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p ferry-client failed");
    }
    Ok(workspace_root().join("target/release/ferry"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn demo() -> anyhow::Result<()> {
    let ferry = build_ferry()?;
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let project = tmp.path().join("sample");
    sample::write_workspace(&project)?;
    let cache = tmp.path().join("cache");
    let run = |what: &str| -> anyhow::Result<()> {
        println!("\n== {what}");
        let started = std::time::Instant::now();
        let status = Command::new(env!("CARGO"))
            .args(["build", "-j2", "--offline"])
            .current_dir(&project)
            .env("RUSTC_WRAPPER", &ferry)
            .env("FERRY_CACHE_DIR", &cache)
            .env("CARGO_INCREMENTAL", "0")
            .status()?;
        if !status.success() {
            bail!("cargo build failed");
        }
        println!("   ({:.2} s)", started.elapsed().as_secs_f64());
        Ok(())
    };
    let ferry_cmd = |args: &[&str]| Command::new(&ferry).args(args).env("FERRY_CACHE_DIR", &cache).status();
    ferry_cmd(&["toolchain", "package"])?;
    run("cold build through ferry (every unit compiled and stored)")?;
    Command::new(env!("CARGO")).args(["clean", "-q"]).current_dir(&project).status()?;
    run("after cargo clean: every unit is a cache hit")?;
    let out = Command::new(project.join("target/debug/app")).output()?;
    println!("\n== the cached binary runs: {}", String::from_utf8_lossy(&out.stdout).trim());
    println!("\n== ferry stats");
    ferry_cmd(&["stats"])?;
    Ok(())
}
