//! `cargo xtask bench c`: C and C++ through ferry, as ratios to plain builds of the same run.
//!
//! 1. A crate graph whose build scripts compile C through cc-rs (rusqlite with bundled SQLite,
//!    and zstd): `cargo build -j2` plain, through ferry cold and warm (`RUSTC_WRAPPER` and the
//!    masquerade links of `ferry setup` first in `PATH`), and through sccache when it is installed.
//! 2. The same C sources (zstd's library, SQLite's amalgamation) built with `make -j2` from a
//!    generated Makefile: plain gcc, ferry cold and warm, ccache cold and warm (its own cache dir).
//! 3. One warm hit of a small C file, wrapper start to exit: ferry beside ccache's direct mode.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::{median, ms, ratio, secs};
use crate::which;

pub fn c() -> anyhow::Result<()> {
    let ferry = crate::build_ferry()?;
    let tmp = tempfile::Builder::new().prefix("ferry-bench-c-").tempdir()?;
    let project = tmp.path().join("graph");
    write_project(&project)?;
    let links = tmp.path().join("ferry-bin");
    let setup =
        Command::new(&ferry).args(["setup", "--dir"]).arg(&links).env("FERRY_CACHE_DIR", tmp.path()).output()?;
    if !setup.status.success() {
        bail!("ferry setup failed: {}", String::from_utf8_lossy(&setup.stderr));
    }
    let masquerade_path = format!("{}:{}", links.display(), std::env::var("PATH")?);
    let cache = tmp.path().join("cache");

    println!("== c: cargo build -j2 (debug) of a crate graph whose build scripts compile C (rusqlite bundled, zstd)");
    let target = project.join("target");
    let cargo = |name: &str, env: &[(&str, &str)]| -> anyhow::Result<Duration> {
        if target.exists() {
            fs::remove_dir_all(&target)?;
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-j2", "--offline", "--quiet"])
            .current_dir(&project)
            .env("CARGO_INCREMENTAL", "0")
            .env("FERRY_CACHE_DIR", &cache)
            .env_remove("RUSTC_WRAPPER")
            .envs(env.iter().copied());
        let t = Instant::now();
        if !cmd.status()?.success() {
            bail!("cargo build '{name}' failed");
        }
        Ok(t.elapsed())
    };
    let ferry_text = ferry.display().to_string();
    let through_ferry = [("RUSTC_WRAPPER", ferry_text.as_str()), ("PATH", masquerade_path.as_str())];
    let plain1 = cargo("plain1", &[])?;
    let cold = cargo("ferry cold", &through_ferry)?;
    Command::new(&ferry).arg("stats").env("FERRY_CACHE_DIR", &cache).output()?;
    Command::new(&ferry).args(["stats", "--zero"]).env("FERRY_CACHE_DIR", &cache).output()?;
    let warm = cargo("ferry warm", &through_ferry)?;
    let stats = stats(&ferry, &cache)?;
    let sccache = match which("sccache") {
        Some(sccache) => {
            let dir = tmp.path().join("sccache");
            let text = sccache.display().to_string();
            let env = [("RUSTC_WRAPPER", text.as_str()), ("SCCACHE_DIR", dir.to_str().context("utf-8")?)];
            let cold = cargo("sccache cold", &env)?;
            let warm = cargo("sccache warm", &env)?;
            let _ = Command::new(&sccache).arg("--stop-server").output();
            Some((cold, warm))
        }
        None => None,
    };
    let plain2 = cargo("plain2", &[])?;
    let plain = (plain1 + plain2) / 2;
    println!("  plain:       {:.2} s (mean of {:.2} s and {:.2} s)", secs(plain), secs(plain1), secs(plain2));
    println!("  ferry cold:  {:.2} s = {:.3}x plain (goal <= 1.05x)", secs(cold), ratio(cold, plain));
    println!("  ferry warm:  {:.2} s = {:.3}x plain (goal <= 0.12x)", secs(warm), ratio(warm, plain));
    println!(
        "    warm hits: rust {} c {}; misses {}",
        stats["hits_by_language"]["rust"], stats["hits_by_language"]["c"], stats["misses"]
    );
    match sccache {
        Some((c, w)) => {
            println!("  sccache cold: {:.2} s = {:.3}x plain", secs(c), ratio(c, plain));
            println!("  sccache warm: {:.2} s = {:.3}x plain", secs(w), ratio(w, plain));
        }
        None => println!("  sccache: not installed (cargo install sccache), not measured"),
    }

    let sources = c_sources(&project, &tmp.path().join("make"))?;
    println!("== c: make -j2 of {} C and assembler files (zstd's library, SQLite's amalgamation), -O2", sources.count);
    let make = |name: &str, cc: &str, env: &[(&str, &Path)]| -> anyhow::Result<Duration> {
        let out = sources.dir.join("out");
        if out.exists() {
            fs::remove_dir_all(&out)?;
        }
        let mut cmd = Command::new("make");
        cmd.args(["-j2", "--quiet", &format!("CC={cc}")])
            .current_dir(&sources.dir)
            .env("FERRY_CACHE_DIR", &cache)
            .envs(env.iter().copied());
        let t = Instant::now();
        if !cmd.status()?.success() {
            bail!("make '{name}' failed");
        }
        Ok(t.elapsed())
    };
    let ccache_dir = tmp.path().join("ccache");
    let ccache_env = [("CCACHE_DIR", ccache_dir.as_path())];
    let plain1 = make("plain1", "gcc", &[])?;
    let ferry_gcc = format!("{ferry_text} gcc");
    let cold = make("ferry cold", &ferry_gcc, &[])?;
    Command::new(&ferry).arg("stats").env("FERRY_CACHE_DIR", &cache).output()?;
    let warm = make("ferry warm", &ferry_gcc, &[])?;
    let ccache = which("ccache");
    let ccache_times = match &ccache {
        Some(ccache) => {
            let cc = format!("{} gcc", ccache.display());
            Some((make("ccache cold", &cc, &ccache_env)?, make("ccache warm", &cc, &ccache_env)?))
        }
        None => None,
    };
    let plain2 = make("plain2", "gcc", &[])?;
    let plain = (plain1 + plain2) / 2;
    println!("  plain:       {:.2} s (mean of {:.2} s and {:.2} s)", secs(plain), secs(plain1), secs(plain2));
    println!("  ferry cold:  {:.2} s = {:.3}x plain (goal <= 1.05x)", secs(cold), ratio(cold, plain));
    println!("  ferry warm:  {:.2} s = {:.3}x plain (goal <= 0.10x)", secs(warm), ratio(warm, plain));
    match ccache_times {
        Some((c, w)) => {
            println!("  ccache cold: {:.2} s = {:.3}x plain", secs(c), ratio(c, plain));
            println!(
                "  ccache warm: {:.2} s = {:.3}x plain; ferry warm / ccache warm = {:.2} (goal <= 0.6)",
                secs(w),
                ratio(w, plain),
                ratio(warm, w)
            );
        }
        None => println!("  ccache: not installed (apt-get install ccache), not measured"),
    }

    // One warm hit of a small file, 21 times each, alternately.
    let small = tmp.path().join("small");
    fs::create_dir_all(&small)?;
    fs::write(small.join("s.c"), "#include <string.h>\nint s(const char *a) { return (int)strlen(a); }\n")?;
    let hit = |program: &Path, args: &[&str], env: &[(&str, &Path)]| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let out = Command::new(program)
            .args(args)
            .args(["-O2", "-c", "s.c", "-o", "s.o"])
            .current_dir(&small)
            .env("FERRY_CACHE_DIR", &cache)
            .envs(env.iter().copied())
            .output()?;
        if !out.status.success() {
            bail!("{} failed: {}", program.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(t.elapsed())
    };
    let (mut ferry_hits, mut ccache_hits) = (Vec::new(), Vec::new());
    hit(&ferry, &["gcc"], &[])?;
    if let Some(ccache) = &ccache {
        hit(ccache, &["gcc"], &ccache_env)?;
    }
    for _ in 0..21 {
        ferry_hits.push(hit(&ferry, &["gcc"], &[])?);
        if let Some(ccache) = &ccache {
            ccache_hits.push(hit(ccache, &["gcc"], &ccache_env)?);
        }
    }
    let ferry_hit = median(&mut ferry_hits);
    if ccache_hits.is_empty() {
        println!("  one warm hit of a small C file: ferry {:.2} ms (ccache not installed)", ms(ferry_hit));
    } else {
        let ccache_hit = median(&mut ccache_hits);
        println!(
            "  one warm hit of a small C file, median of 21, start to exit: ferry {:.2} ms, ccache {:.2} ms \
             (goal: ferry <= ccache)",
            ms(ferry_hit),
            ms(ccache_hit)
        );
    }
    Ok(())
}

/// The benchmark's crate graph: a binary using rusqlite (SQLite compiled from its bundled C) and
/// zstd (its C library compiled by zstd-sys), fetched from crates.io once.
fn write_project(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"cgraph\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n\
         rusqlite = { version = \"0.32\", features = [\"bundled\"] }\nzstd = \"0.13\"\n",
    )?;
    fs::write(
        dir.join("src/main.rs"),
        "fn main() {\n    let db = rusqlite::Connection::open_in_memory().unwrap();\n    \
         let n: i64 = db.query_row(\"select 6 * 7\", [], |r| r.get(0)).unwrap();\n    \
         let packed = zstd::encode_all(&b\"ferry ferry ferry\"[..], 3).unwrap();\n    \
         println!(\"{n} {}\", packed.len());\n}\n",
    )?;
    let fetch = Command::new(env!("CARGO")).arg("fetch").current_dir(dir).status()?;
    if !fetch.success() {
        bail!("cargo fetch failed (the benchmark needs crates.io once)");
    }
    Ok(())
}

/// The C sources of the graph's -sys crates, copied beside a Makefile that compiles each into
/// `out/` and links nothing.
struct Sources {
    dir: PathBuf,
    count: usize,
}

fn c_sources(project: &Path, dir: &Path) -> anyhow::Result<Sources> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(project)
        .output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata")?;
    let package_dir = |name: &str| -> anyhow::Result<PathBuf> {
        let packages = meta["packages"].as_array().context("packages")?;
        let p = packages.iter().find(|p| p["name"] == name).with_context(|| format!("no {name} in the graph"))?;
        Ok(Path::new(p["manifest_path"].as_str().context("manifest_path")?).parent().context("dir")?.to_owned())
    };
    let zstd = package_dir("zstd-sys")?.join("zstd/lib");
    let sqlite = package_dir("libsqlite3-sys")?.join("sqlite3/sqlite3.c");
    let mut files = Vec::new();
    for sub in ["common", "compress", "decompress", "dictBuilder"] {
        for entry in fs::read_dir(zstd.join(sub))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "c" || e == "S") {
                let rel = Path::new("zstd").join(sub).join(path.file_name().context("name")?);
                fs::create_dir_all(dir.join(rel.parent().context("parent")?))?;
                fs::copy(&path, dir.join(&rel))?;
                files.push(rel);
            }
        }
        for entry in fs::read_dir(zstd.join(sub))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "h") {
                fs::copy(&path, dir.join("zstd").join(sub).join(path.file_name().context("name")?))?;
            }
        }
    }
    for header in ["zstd.h", "zdict.h", "zstd_errors.h"] {
        fs::copy(zstd.join(header), dir.join("zstd").join(header))?;
    }
    fs::create_dir_all(dir.join("sqlite"))?;
    fs::copy(&sqlite, dir.join("sqlite/sqlite3.c"))?;
    fs::copy(sqlite.with_file_name("sqlite3.h"), dir.join("sqlite/sqlite3.h"))?;
    files.push(PathBuf::from("sqlite/sqlite3.c"));
    files.sort();
    let objects: Vec<String> = files.iter().map(|f| format!("out/{}.o", f.display())).collect();
    let makefile = format!(
        "OBJS = {}\nall: $(OBJS)\nout/%.c.o: %.c\n\t@mkdir -p $(dir $@)\n\t$(CC) -O2 -Izstd -Izstd/common -MMD -c $< -o $@\n\
         out/%.S.o: %.S\n\t@mkdir -p $(dir $@)\n\t$(CC) -O2 -Izstd -Izstd/common -MMD -c $< -o $@\n",
        objects.join(" ")
    );
    fs::write(dir.join("Makefile"), makefile)?;
    Ok(Sources { dir: dir.to_owned(), count: files.len() })
}

fn stats(ferry: &Path, cache: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(ferry).args(["stats", "--json"]).env("FERRY_CACHE_DIR", cache).output()?;
    Ok(serde_json::from_slice(&out.stdout)?)
}
