//! The interposer loaded into real processes: a shell running real programs, and a statically
//! linked program built here with the installed rustc. Each test reads the log back.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_observe::{Origin, Record, environment, install, parse};

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
    has(Record::Env { name: OsString::from("QUOTING_STYLE"), by: Origin::Subprocess });
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
fn the_interposer_loads_from_memory_and_children_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let interposer = ferry_observe::Interposer::in_memory().expect("memfd");
    assert!(interposer.path.starts_with("/proc"), "{}", interposer.path.display());
    let log = dir.join("log");
    std::fs::write(&log, b"").unwrap();
    std::fs::write(dir.join("input.txt"), "x").unwrap();
    let out = Command::new("/bin/sh")
        .args(["-c", "cat input.txt"])
        .current_dir(&dir)
        .envs(environment(&interposer.path, &log, None, std::process::id()))
        .output()
        .expect("runs");
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let records = parse(&std::fs::read(&log).unwrap()).unwrap();
    assert!(records.contains(&Record::Read(dir.join("input.txt"))), "{records:#?}");
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

/// A C program built here (with the system's `cc`) that does one thing per argument, and a
/// plugin it can load: what a proc-macro does inside rustc, at the libc level.
fn probe(dir: &Path) -> PathBuf {
    let c = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <arpa/inet.h>
extern char **environ;
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "getenv")) { getenv("FROM_PROGRAM"); }
        else if (!strcmp(a, "plugin")) {
            void *h = dlopen("./libplugin.so", RTLD_NOW);
            if (!h) return 3;
            const char *(*f)(void) = (const char *(*)(void))dlsym(h, "plugin_lookup");
            f();
            int (*run)(const char *) = (int (*)(const char *))dlsym(h, "plugin_run");
            if (run("/bin/true")) return 4;
        }
        else if (!strcmp(a, "update")) { int fd = open("db", O_RDWR); if (fd < 0) return 5; close(fd); }
        else if (!strcmp(a, "create")) { int fd = open("fresh", O_RDWR | O_CREAT, 0644); if (fd < 0) return 6; close(fd); }
        else if (!strcmp(a, "execveat")) {
            if (fork() == 0) { char *args[] = {"static", NULL}; execveat(AT_FDCWD, "static", args, environ, 0); _exit(7); }
        }
        else if (!strcmp(a, "connect")) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(9) };
            inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
            connect(s, (struct sockaddr *)&addr, sizeof addr);
            close(s);
        }
    }
    return 0;
}
"#;
    let plugin = r#"
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
extern char **environ;
const char *plugin_lookup(void) { return getenv("FROM_PLUGIN"); }
int plugin_run(const char *path) {
    pid_t pid; char *args[] = {(char *)path, NULL};
    if (posix_spawn(&pid, path, NULL, NULL, args, environ)) return 1;
    int status; waitpid(pid, &status, 0); return 0;
}
"#;
    std::fs::write(dir.join("probe.c"), c).unwrap();
    std::fs::write(dir.join("plugin.c"), plugin).unwrap();
    let cc = |args: &[&str]| {
        let out = Command::new("cc").args(args).current_dir(dir).output().expect("cc runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    cc(&["-shared", "-fPIC", "-o", "libplugin.so", "plugin.c"]);
    cc(&["-o", "probe", "probe.c"]);
    dir.join("probe")
}

#[test]
fn lookups_are_told_apart_by_whose_code_made_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    let probe = probe.to_str().unwrap();
    // Started by this process: the probe is the compile's first process, like rustc.
    let (ok, records) = observed(&dir, probe, &["getenv", "plugin"], &[("GIVEN_TO_CHILD", "1")]);
    assert!(ok, "{records:#?}");
    let has = |r: Record| assert!(records.contains(&r), "{r:?} missing from {records:#?}");
    has(Record::Env { name: "FROM_PROGRAM".into(), by: Origin::Compiler });
    has(Record::Env { name: "FROM_PLUGIN".into(), by: Origin::Plugin });
    // What the loader opened for dlopen is recorded, as the libraries of a process are.
    has(Record::Mapped(dir.join("libplugin.so")));
    // A program the plugin started may read its whole environment: every variable counts.
    has(Record::Env { name: "GIVEN_TO_CHILD".into(), by: Origin::Plugin });
    assert!(
        !records.iter().any(|r| matches!(r, Record::Env { name, .. } if name == "LD_PRELOAD")),
        "the observer's own variables are not lookups: {records:#?}"
    );
    // The same program started by another one is a subprocess of the compile.
    let (ok, records) = observed(&dir, "/bin/sh", &["-c", &format!("{probe} getenv")], &[]);
    assert!(ok);
    assert!(records.contains(&Record::Env { name: "FROM_PROGRAM".into(), by: Origin::Subprocess }), "{records:#?}");
}

#[test]
fn a_file_opened_for_update_is_an_input_and_a_new_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    std::fs::write(dir.join("db"), "schema v1").unwrap();
    let (ok, records) = observed(&dir, probe.to_str().unwrap(), &["update", "create"], &[]);
    assert!(ok, "{records:#?}");
    assert!(records.contains(&Record::Updated(dir.join("db"))), "{records:#?}");
    assert!(records.contains(&Record::Wrote(dir.join("fresh"))), "{records:#?}");
    assert!(!records.contains(&Record::Updated(dir.join("fresh"))), "{records:#?}");
}

#[test]
fn execveat_of_a_static_program_and_network_use_make_it_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    std::fs::write(dir.join("static.rs"), "fn main() {}\n").unwrap();
    let built = Command::new("rustc")
        .args(["-C", "target-feature=+crt-static", "-o", "static", "static.rs"])
        .current_dir(&dir)
        .env_remove("RUSTC_WRAPPER")
        .status()
        .expect("rustc runs");
    assert!(built.success());
    let (_, records) = observed(&dir, probe.to_str().unwrap(), &["execveat", "connect"], &[]);
    let incomplete =
        |why: &str| records.iter().any(|r| matches!(r, Record::Incomplete { reason, .. } if reason == why));
    assert!(incomplete("static-executable"), "{records:#?}");
    assert!(incomplete("network-connect"), "{records:#?}");
}

#[test]
fn repeated_records_are_written_once_and_distinct_ones_always() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    // 3000 distinct paths looked for, each twice: every one is recorded, none twice.
    let script = "i=0; while [ $i -lt 3000 ]; do test -e m$i; test -e m$i; i=$((i+1)); done";
    let (ok, records) = observed(&dir, "/bin/bash", &["-c", script], &[]);
    assert!(ok);
    let absent: Vec<&Record> =
        records.iter().filter(|r| matches!(r, Record::Absent(p) if p.starts_with(&dir))).collect();
    assert_eq!(absent.len(), 3000, "each distinct record once");
}
