//! The interposer loaded into real processes: a shell running real programs, and a statically
//! linked program built here with the installed rustc. Each test reads the log back.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_observe::{Record, environment, install, parse};

/// Runs `program args` observed, with `env` added; returns its exit status and the records.
fn observed(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, Vec<Record>) {
    let interposer = install(&dir.join("lib")).expect("install");
    let log = dir.join("log");
    std::fs::write(&log, b"").expect("log");
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).envs(environment(&interposer, &log, None, std::process::id()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    assert!(out.stderr.is_empty() || !out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), parse(&std::fs::read(&log).expect("read log")).expect("parses"))
}

#[test]
fn a_shell_and_its_children_are_observed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    std::fs::write(dir.join("input.txt"), "x").unwrap();
    std::fs::create_dir(dir.join("listed")).unwrap();
    // ls looks up QUOTING_STYLE with getenv (printenv would scan `environ`, which is not observed).
    let script = "cat input.txt > out.txt; test -e missing.txt; ls listed > /dev/null; mkdir made";
    let (ok, records) = observed(&dir, "/bin/sh", &["-c", script], &[("QUOTING_STYLE", "literal")]);
    assert!(ok);
    let has = |r: Record| assert!(records.contains(&r), "{r:?} missing from {records:#?}");
    has(Record::Read(dir.join("input.txt")));
    has(Record::Wrote(dir.join("out.txt")));
    has(Record::Absent(dir.join("missing.txt")));
    has(Record::Listed(dir.join("listed")));
    has(Record::Env(OsString::from("QUOTING_STYLE")));
    has(Record::MadeDir(dir.join("made")));
    let cat = records.iter().find_map(|r| match r {
        Record::Exec { resolved, .. } if resolved.ends_with("cat") => Some(resolved.clone()),
        _ => None,
    });
    assert!(cat.is_some(), "no exec of cat in {records:#?}");
    // Child processes (not the first one) record their shared libraries.
    assert!(records.iter().any(|r| matches!(r, Record::Mapped(p) if p.to_string_lossy().contains("libc.so"))));
    assert!(!records.iter().any(|r| matches!(r, Record::Incomplete { .. })), "{records:#?}");
}

#[test]
fn a_statically_linked_child_makes_the_observation_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    std::fs::write(dir.join("hello.rs"), "fn main() {}\n").unwrap();
    let built = Command::new("rustc")
        .args(["-C", "target-feature=+crt-static", "-o", "hello", "hello.rs"])
        .current_dir(&dir)
        .env_remove("RUSTC_WRAPPER")
        .status()
        .expect("rustc runs");
    assert!(built.success());
    let hello: PathBuf = dir.join("hello");
    let (ok, records) = observed(&dir, "/bin/sh", &["-c", "./hello"], &[]);
    assert!(ok);
    let incomplete = records
        .iter()
        .any(|r| matches!(r, Record::Incomplete { reason, detail } if reason == "static-executable" && Path::new(detail) == hello));
    assert!(incomplete, "{records:#?}");
}

#[test]
fn a_child_without_the_interposer_in_its_environment_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let (ok, records) = observed(&dir, "/bin/sh", &["-c", "env -u LD_PRELOAD /bin/true"], &[]);
    assert!(ok);
    let flagged = records
        .iter()
        .any(|r| matches!(r, Record::Incomplete { reason, .. } if reason == "environment-drops-observer"));
    assert!(flagged, "{records:#?}");
}
