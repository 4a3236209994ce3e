//! The small DSL the end-to-end tests are written in: find the built binaries, make isolated
//! environments (their own cache dir, HOME and config), run `ferry` and read what it says.
//! Everything runs for real: the installed rustc, cargo, processes on loopback.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a binary built by this workspace (`ferry`, later `ferry-scheduler`, `ferry-worker`).
/// The test command builds them first (`cargo build --workspace`); a missing one is a clear panic.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// The sysroot of the `rustc` on PATH: the real installed toolchain.
pub fn installed_sysroot() -> PathBuf {
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().expect("rustc runs");
    assert!(out.status.success(), "rustc --print sysroot failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// An isolated world for one test: a temp dir holding a cache dir, a HOME and work space.
#[derive(Debug)]
pub struct World {
    pub dir: tempfile::TempDir,
    /// Extra environment for every command run through [`World::command`].
    pub env: Vec<(String, String)>,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new().prefix("ferry-test-").tempdir().expect("temp dir");
        let cache = dir.path().join("cache");
        let env = vec![
            ("FERRY_CACHE_DIR".to_owned(), cache.display().to_string()),
            // A config file the test controls (empty unless written): no user config leaks in.
            ("FERRY_CONFIG".to_owned(), dir.path().join("ferry.toml").display().to_string()),
            ("CARGO_INCREMENTAL".to_owned(), "0".to_owned()),
            ("FERRY_LOG".to_owned(), "debug".to_owned()),
        ];
        std::fs::write(dir.path().join("ferry.toml"), "").expect("write config");
        World { dir, env }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn set(&mut self, key: &str, value: impl AsRef<OsStr>) -> &mut Self {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value));
        self
    }

    /// A command with this world's environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `ferry ARGS` and returns its output (whatever the exit status).
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command(bin("ferry")).args(args).output().expect("ferry runs")
    }

    /// Runs `ferry ARGS`, asserts success, returns stdout.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(out.status.success(), "ferry {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `ferry ARGS --json`-style commands and parses stdout as JSON.
    pub fn ferry_json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ferry_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ferry {args:?} printed bad JSON ({e}):\n{text}"))
    }

    /// `ferry stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        self.ferry_json(&["stats", "--json"])
    }
}

/// Asserts a command succeeded, showing its output if not; returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
