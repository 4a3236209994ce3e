//! The interposer loaded into real processes: a shell running real programs, a C program built
//! here with `cc` that calls libc the way a proc-macro or a build tool would, and a statically
//! linked program built here with the installed rustc. Each test reads the log back.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_observe::{Origin, Record, environment, install, parse, unaccounted};

/// Runs `program args` observed, with `env` added; returns its exit status and the records.
fn observed(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, Vec<Record>) {
    observed_with(dir, program, args, env, &[])
}

/// The variables that choose a locale: without them glibc's `setlocale(LC_ALL, "")` (which
/// coreutils call first thing) picks the built-in C locale and reads no locale files.
fn locale_variables() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k == "LANG" || k == "LANGUAGE" || k.starts_with("LC_"))
        .collect()
}

/// [`observed`], with the variables `remove` taken out of the environment.
fn observed_with(
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    remove: &[String],
) -> (bool, Vec<Record>) {
    let interposer = install(&dir.join("lib")).expect("install");
    let log = dir.join("log");
    std::fs::write(&log, b"").expect("log");
    let mut cmd = Command::new(program);
    for k in remove {
        cmd.env_remove(k);
    }
    cmd.args(args).current_dir(dir).envs(environment(&interposer, &log, None, std::process::id()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("runs");
    let pid = child.id();
    let out = child.wait_with_output().expect("runs");
    assert!(out.stderr.is_empty() || !out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records = parse(&std::fs::read(&log).expect("read log")).expect("parses");
    // Every process writes its executable and pid first; the first process is the one started here.
    assert!(matches!(records.first(), Some(Record::Exe { pid: p, .. }) if *p == pid), "pid {pid} first: {records:#?}");
    (out.status.success(), records)
}

/// A statically linked program (`static` in `dir`), built with the installed rustc.
fn static_program(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("static.rs"), "fn main() {}\n").unwrap();
    let built = Command::new("rustc")
        .args(["-C", "target-feature=+crt-static", "-o", "static", "static.rs"])
        .current_dir(dir)
        .env_remove("RUSTC_WRAPPER")
        .status()
        .expect("rustc runs");
    assert!(built.success());
    dir.join("static")
}

/// Is there a `! why what` record (`what` compared as a path: `/d/./static` is `/d/static`)?
fn incomplete(records: &[Record], why: &str, what: &str) -> bool {
    records.iter().any(
        |r| matches!(r, Record::Incomplete { reason, detail } if reason == why && Path::new(detail) == Path::new(what)),
    )
}

#[test]
fn a_shell_and_its_children_are_observed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    std::fs::write(dir.join("input.txt"), "x").unwrap();
    std::fs::create_dir(dir.join("listed")).unwrap();
    // ls looks up QUOTING_STYLE with getenv (printenv would scan `environ`, which is not observed).
    let script = "cat input.txt > out.txt; test -e missing.txt; ls listed > /dev/null; mkdir made";
    // coreutils call `setlocale(LC_ALL, "")`: with a locale named in the environment (this
    // environment may have LANG=C.UTF-8) glibc loads it from files it opens itself, and the
    // observation is rightly incomplete (`! locale-data`). The shell runs in the C locale here.
    let (ok, records) =
        observed_with(&dir, "/bin/sh", &["-c", script], &[("QUOTING_STYLE", "literal")], &locale_variables());
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
    // Every program the shell started wrote to the log.
    assert_eq!(unaccounted(&records), None, "{records:#?}");
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
    let mut cmd = Command::new("/bin/sh");
    // cat runs in the C locale (see a_shell_and_its_children_are_observed).
    for k in locale_variables() {
        cmd.env_remove(k);
    }
    let out = cmd
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
    let hello = static_program(&dir);
    let (ok, records) = observed(&dir, "/bin/sh", &["-c", "./static"], &[]);
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
#include <errno.h>
#include <fcntl.h>
#include <iconv.h>
#include <locale.h>
#include <netdb.h>
#include <pwd.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <arpa/inet.h>
extern char **environ;

/* The exit code of a child, or 128 when it did not exit. */
static int waited(pid_t pid) {
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return 128;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* This environment plus PROBE_MARK=yes; `drop` leaves LD_PRELOAD out; `lose` points the log
   somewhere that cannot be opened (the observer is still preloaded). */
enum edit { KEEP, DROP, LOSE };
static char **edited(enum edit how) {
    static char *env[4096];
    int n = 0;
    for (char **e = environ; *e && n < 4090; e++) {
        if (how == DROP && !strncmp(*e, "LD_PRELOAD=", 11)) continue;
        if (how == LOSE && !strncmp(*e, "FERRY_OBSERVE_LOG=", 18)) continue;
        env[n++] = *e;
    }
    if (how == LOSE) env[n++] = "FERRY_OBSERVE_LOG=/nonexistent/ferry-observe.log";
    env[n++] = "PROBE_MARK=yes";
    env[n] = NULL;
    return env;
}

int main(int argc, char **argv) {
    /* Started through execl*: argv[2..] must be "1", "2", ... as passed. */
    if (argc > 1 && (!strcmp(argv[1], "args") || !strcmp(argv[1], "args-env"))) {
        for (int i = 2; i < argc; i++) {
            char want[16];
            snprintf(want, sizeof want, "%d", i - 1);
            if (strcmp(argv[i], want)) return 20;
        }
        if (!strcmp(argv[1], "args-env") && !getenv("PROBE_MARK")) return 21;
        return argc >= 11 ? 0 : 22; /* more words than argument registers */
    }
    const char *self = argv[0];
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
        /* The execl family: a static program, one whose environment drops the observer, and this
           program again with more arguments than there are argument registers. */
        else if (!strcmp(a, "execl")) {
            pid_t pid = fork();
            if (pid == 0) { execl("./static", "static", (char *)NULL); _exit(7); }
            if (waited(pid)) return 10;
        }
        else if (!strcmp(a, "execle")) {
            pid_t pid = fork();
            if (pid == 0) { execle("./static", "static", (char *)NULL, edited(KEEP)); _exit(7); }
            if (waited(pid)) return 11;
        }
        else if (!strcmp(a, "execle-drop")) {
            pid_t pid = fork();
            if (pid == 0) { execle("/bin/true", "true", (char *)NULL, edited(DROP)); _exit(7); }
            if (waited(pid)) return 12;
        }
        else if (!strcmp(a, "execl-args")) {
            pid_t pid = fork();
            if (pid == 0) { execl(self, "probe", "args", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", (char *)NULL); _exit(7); }
            if (waited(pid)) return 13;
        }
        else if (!strcmp(a, "execlp-args")) {
            pid_t pid = fork();
            if (pid == 0) { execlp("probe", "probe", "args", "1", "2", "3", "4", "5", "6", "7", "8", "9", (char *)NULL); _exit(7); }
            if (waited(pid)) return 14;
        }
        else if (!strcmp(a, "execle-args")) {
            pid_t pid = fork();
            if (pid == 0) {
                execle(self, "probe", "args-env", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", (char *)NULL, edited(KEEP));
                _exit(7);
            }
            if (waited(pid)) return 15;
        }
        /* An exec that fails (the file is not executable) returns -1 with errno, here. */
        else if (!strcmp(a, "execl-fail")) {
            errno = 0;
            if (execl("./db", "db", (char *)NULL) != -1 || errno != EACCES) return 16;
            errno = 0;
            if (execle("./db", "db", "1", "2", "3", "4", "5", "6", "7", "8", "9", (char *)NULL, edited(KEEP)) != -1
                || errno != EACCES) return 17;
            pid_t pid; char *args[] = {"db", NULL};
            if (posix_spawn(&pid, "./db", NULL, NULL, args, environ) != EACCES) return 28;
        }
        /* Programs whose environment keeps the observer but names a log they cannot open. */
        else if (!strcmp(a, "lose-exec")) {
            pid_t pid = fork();
            if (pid == 0) { char *args[] = {"true", NULL}; execve("/bin/true", args, edited(LOSE)); _exit(7); }
            if (waited(pid)) return 18;
        }
        else if (!strcmp(a, "lose-spawn")) {
            pid_t pid; char *args[] = {"true", NULL};
            if (posix_spawn(&pid, "/bin/true", NULL, NULL, args, edited(LOSE)) || waited(pid)) return 19;
        }
        else if (!strcmp(a, "spawn-many")) {
            for (int n = 0; n < 100; n++) {
                pid_t pid; char *args[] = {"true", NULL};
                if (posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ) || waited(pid)) return 23;
            }
            /* No place for the pid: the child's is recorded all the same. */
            char *args[] = {"true", NULL};
            int status;
            if (posix_spawn(NULL, "/bin/true", NULL, NULL, args, environ) || wait(&status) < 0) return 27;
        }
        /* What glibc reads on its own. */
        else if (!strcmp(a, "getpwuid")) { if (!getpwuid(getuid())) return 24; }
        else if (!strcmp(a, "getaddrinfo")) {
            struct addrinfo *res;
            if (getaddrinfo("localhost", "80", NULL, &res) == 0) freeaddrinfo(res);
        }
        else if (!strcmp(a, "iconv")) {
            iconv_t cd = iconv_open("UTF-8", "LATIN1");
            if (cd == (iconv_t)-1) return 25;
            iconv_close(cd);
        }
        else if (!strcmp(a, "setlocale")) { setlocale(LC_ALL, ""); }
        else if (!strcmp(a, "setlocale-c")) { if (!setlocale(LC_ALL, "C")) return 26; }
        else return 2;
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
    static_program(&dir);
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

/// The `x` records of `program` (resolved path).
fn execs_of<'a>(records: &'a [Record], program: &Path) -> Vec<&'a Record> {
    records.iter().filter(|r| matches!(r, Record::Exec { resolved, .. } if resolved == program)).collect()
}

#[test]
fn programs_started_with_execl_and_execle_are_seen() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    let probe = probe.to_str().unwrap();
    let program = static_program(&dir);
    let static_path = program.to_str().unwrap();
    for how in ["execl", "execle"] {
        let (ok, records) = observed(&dir, probe, &[how], &[]);
        assert!(ok, "{how}: {records:#?}");
        let execs = execs_of(&records, &program);
        assert!(
            matches!(execs[..], [Record::Exec { name, spawned: false, .. }] if name == "./static"),
            "{how}: {records:#?}"
        );
        assert!(incomplete(&records, "static-executable", static_path), "{how}: {records:#?}");
        // Already incomplete: not also a program that never wrote to the log.
        assert_eq!(unaccounted(&records), None, "{how}");
    }
    let (ok, records) = observed(&dir, probe, &["execle-drop"], &[]);
    assert!(ok, "{records:#?}");
    assert!(incomplete(&records, "environment-drops-observer", "/bin/true"), "{records:#?}");
    assert_eq!(execs_of(&records, Path::new("/bin/true")).len(), 1, "{records:#?}");
}

#[test]
fn execl_execlp_and_execle_pass_every_argument_and_report_a_failed_exec() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    let path = format!("{}:/usr/bin:/bin", dir.display());
    // More arguments than argument registers: the rest are on the caller's stack (and for
    // execle the environment after them); the probe started again checks each one.
    for how in ["execl-args", "execlp-args", "execle-args"] {
        let (ok, records) = observed(&dir, probe.to_str().unwrap(), &[how], &[("PATH", &path)]);
        assert!(ok, "{how}: {records:#?}");
        let execs = execs_of(&records, &probe);
        let [Record::Exec { name, pid, spawned: false, .. }] = execs[..] else { panic!("{how}: {records:#?}") };
        let expected = if how == "execlp-args" { "probe" } else { probe.to_str().unwrap() };
        assert_eq!(name, expected);
        // The probe started again wrote its X with the pid the x record named.
        let exes = records.iter().filter(|r| matches!(r, Record::Exe { path, pid: p } if *path == probe && p == pid));
        assert_eq!(exes.count(), 1, "{how}: {records:#?}");
        assert_eq!(unaccounted(&records), None, "{how}");
    }
    // A failed exec returns -1 with errno (checked by the probe) and writes `f` with its pid,
    // after the `x` with the same pid; so does a failed spawn (no child: the caller's pid).
    std::fs::write(dir.join("db"), "not a program").unwrap();
    let (ok, records) = observed(&dir, probe.to_str().unwrap(), &["execl-fail"], &[]);
    assert!(ok, "{records:#?}");
    let Some(Record::Exe { pid: own, .. }) = records.first() else { unreachable!() };
    let x = |r: &Record| matches!(r, Record::Exec { resolved, pid, .. } if *resolved == dir.join("db") && pid == own);
    let f = |r: &Record| matches!(r, Record::ExecFailed { pid } if pid == own);
    let order: Vec<char> = records
        .iter()
        .filter_map(|r| {
            if x(r) {
                Some('x')
            } else if f(r) {
                Some('f')
            } else {
                None
            }
        })
        .collect();
    assert_eq!(order, ['x', 'f', 'x', 'f', 'x', 'f'], "{records:#?}");
    assert_eq!(unaccounted(&records), None);
}

#[test]
fn a_program_that_cannot_open_the_log_is_unaccounted() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    for how in ["lose-exec", "lose-spawn"] {
        let (ok, records) = observed(&dir, probe.to_str().unwrap(), &[how], &[]);
        assert!(ok, "{how}: {records:#?}");
        // Its environment still names the observer: nothing is flagged where it starts...
        assert!(!records.iter().any(|r| matches!(r, Record::Incomplete { .. })), "{how}: {records:#?}");
        // ... but the x record for it is answered by no X.
        let execs = execs_of(&records, Path::new("/bin/true"));
        let [Record::Exec { pid, spawned, .. }] = execs[..] else { panic!("{how}: {records:#?}") };
        assert_eq!(*spawned, how == "lose-spawn");
        let found = unaccounted(&records);
        assert_eq!(found, Some(format!("/bin/true (pid {pid}) was started and never wrote to the observation log")));
    }
}

#[test]
fn spawned_children_are_accounted_whichever_record_is_written_first() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    // A spawned child often writes its X before its parent, back from posix_spawn, writes the x
    // (the last spawn passes no place for the pid).
    let (ok, records) = observed(&dir, probe.to_str().unwrap(), &["spawn-many"], &[]);
    assert!(ok, "{records:#?}");
    let spawned: Vec<u32> = records
        .iter()
        .filter_map(|r| match r {
            Record::Exec { pid, spawned: true, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    assert_eq!(spawned.len(), 101);
    for pid in &spawned {
        let exes = records.iter().filter(|r| matches!(r, Record::Exe { pid: p, .. } if p == pid));
        assert_eq!(exes.count(), 1, "pid {pid}: {records:#?}");
    }
    assert_eq!(unaccounted(&records), None);
}

#[test]
fn name_service_lookups_make_the_observation_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    for function in ["getpwuid", "getaddrinfo"] {
        let (ok, records) = observed(&dir, probe.to_str().unwrap(), &[function], &[]);
        assert!(ok, "{function}: {records:#?}");
        assert!(incomplete(&records, "name-service", function), "{function}: {records:#?}");
    }
}

#[test]
fn locale_and_conversion_data_make_the_observation_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let probe = probe(&dir);
    let probe = probe.to_str().unwrap();
    let (ok, records) = observed(&dir, probe, &["iconv"], &[]);
    assert!(ok, "{records:#?}");
    assert!(incomplete(&records, "locale-data", "iconv_open"), "{records:#?}");
    // A locale the environment names is loaded from files (C.UTF-8 too; if it is not installed,
    // it was looked for there): incomplete.
    let (ok, records) = observed_with(&dir, probe, &["setlocale"], &[("LANG", "C.UTF-8")], &locale_variables());
    assert!(ok, "{records:#?}");
    assert!(incomplete(&records, "locale-data", "setlocale"), "{records:#?}");
    // None named: glibc's built-in C locale, no files; which variables it read are lookups.
    let (ok, records) = observed_with(&dir, probe, &["setlocale", "setlocale-c"], &[], &locale_variables());
    assert!(ok, "{records:#?}");
    assert!(!records.iter().any(|r| matches!(r, Record::Incomplete { .. })), "{records:#?}");
    for name in ["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES"] {
        assert!(records.contains(&Record::Env { name: name.into(), by: Origin::Compiler }), "{name}: {records:#?}");
    }
}
