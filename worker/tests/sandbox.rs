//! The sandbox against the real `bwrap` and the real installed rustc. Each attack is a proc-macro
//! built on the host with plain rustc and loaded by a compile inside the sandbox, exactly as a
//! client's macro would be; the attack must make the compile fail (the macro panics with the error
//! it met, or dies of a limit), the limit must be reported where one applies, and a benign compile
//! must still work afterwards.
//!
//! When the tests run as root the jobs run as `nobody`, who cannot reach a toolchain under
//! `/root`: the toolchain is then hard-linked (the worker's unpacked-toolchain store, in effect)
//! into a directory nobody can reach, and mounted at its original path as usual.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_worker::{Limit, SandboxConfig, SandboxError, SandboxJob, SandboxOutcome, Stream, run};
use tempfile::TempDir;

#[test]
fn benign_compile_streams_its_output_and_writes_its_outputs() {
    let job = Job::with_macro(
        r#"println!("hello on stdout");
        eprintln!("hello on stderr");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        "pub fn answer() -> u32 { 42 }".parse().unwrap()"#,
    );
    fs::write(job.tree.path().join("job/lib.rs"), "evil::evil!();\nfn unused() {}\n").unwrap();
    let run = job.run(&config());
    run.assert_success();
    assert!(run.stdout.contains("hello on stdout"), "{run:?}");
    assert!(run.stderr.contains("hello on stderr"), "{run:?}");
    assert!(run.stderr.contains("function `unused` is never used"), "{run:?}");
    let rlib = job.output("libevil_user.rlib");
    assert!(rlib.is_file(), "no {} after {run:?}", rlib.display());
    if is_root() {
        assert_eq!(fs::metadata(&rlib).unwrap().uid(), 65534, "a root worker's jobs run as nobody");
    }
    // Streamed as it came, not when rustc exited: the macro slept after printing.
    let early = run.ended - run.first_stdout.expect("stdout chunk");
    assert!(early >= Duration::from_millis(1000), "stdout arrived only {early:?} before the end");
}

#[test]
fn network_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let job = Job::with_macro(&format!(
        r#"match std::net::TcpStream::connect_timeout(&"{address}".parse().unwrap(), std::time::Duration::from_secs(5)) {{
            Ok(_) => "pub fn connected() {{}}".parse().unwrap(),
            Err(e) => panic!("connect {address}: {{e}}"),
        }}"#
    ));
    let run = job.run(&config());
    run.assert_failed_without_limit();
    assert!(run.stderr.contains(&format!("connect {address}: Connection refused")), "{run:?}");
    listener.set_nonblocking(true).unwrap();
    assert_eq!(listener.accept().unwrap_err().kind(), std::io::ErrorKind::WouldBlock, "the listener was reached");
    assert_benign_still_works(&config());
}

#[test]
fn host_files_are_invisible() {
    assert!(fs::read_to_string("/etc/hostname").is_ok(), "the host has /etc/hostname");
    // The worker's data dirs: readable by anyone on the host, so only the sandbox hides them.
    let data_tmp = world_readable_dir(tempfile::tempdir().unwrap());
    let data_target = world_readable_dir(tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap());
    let secrets = [data_tmp.path().join("secret"), data_target.path().join("secret")];
    for secret in &secrets {
        fs::write(secret, "worker secret").unwrap();
        fs::set_permissions(secret, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let paths = ["/etc/hostname".to_owned(), path_str(&secrets[0]), path_str(&secrets[1])];
    let job = Job::with_macro(&format!(
        r#"let mut errors = Vec::new();
        for path in {paths:?} {{
            match std::fs::read_to_string(path) {{
                Ok(text) => return format!("pub const LEAKED: &str = {{text:?}};").parse().unwrap(),
                Err(e) => errors.push(format!("read {{path}}: {{e}}")),
            }}
        }}
        panic!("{{}}", errors.join("; "))"#
    ));
    let run = job.run(&config());
    run.assert_failed_without_limit();
    for path in &paths {
        assert!(run.stderr.contains(&format!("read {path}: No such file or directory")), "{path}: {run:?}");
    }
    assert_benign_still_works(&config());
}

#[test]
fn nothing_outside_the_tree_is_writable() {
    // Writable by anyone on the host, so only the sandbox protects it.
    let outside = world_writable_dir(tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap());
    let marker = format!("ferry-sandbox-evil-{}", std::process::id());
    let targets = [format!("/usr/{marker}"), format!("/{marker}"), path_str(&outside.path().join(&marker))];
    let job = Job::with_macro(&format!(
        r#"let targets = {targets:?};
        let errors: Vec<String> = targets.iter()
            .filter_map(|path| std::fs::write(path, "evil").err().map(|e| format!("write {{path}}: {{e}}")))
            .collect();
        if errors.len() < targets.len() {{
            return "pub fn wrote() {{}}".parse().unwrap();
        }}
        panic!("{{}}", errors.join("; "))"#
    ));
    let run = job.run(&config());
    run.assert_failed_without_limit();
    assert!(run.stderr.contains(&format!("write /usr/{marker}: Read-only file system")), "{run:?}");
    assert!(run.stderr.contains(&format!("write /{marker}: Read-only file system")), "{run:?}");
    for target in &targets {
        assert!(!Path::new(target).exists(), "{target} was created on the host");
    }
    assert_benign_still_works(&config());
}

#[test]
fn a_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind() {
    // A sleep duration no other process uses, to find leftovers by their command line.
    let marker = (1_000_000 + std::process::id()).to_string();
    let job = Job::with_macro(&format!(
        r#"let mut children = Vec::new();
        while children.len() < 1000 {{
            match std::process::Command::new("/usr/bin/sleep").arg("{marker}").spawn() {{
                Ok(child) => children.push(child),
                Err(e) => panic!("spawn after {{}} children: {{e}}", children.len()),
            }}
        }}
        "pub fn unbounded() {{}}".parse().unwrap()"#
    ));
    // The count is per uid, system-wide: leave room for concurrent tests' jobs and for bwrap
    // zombies the host's init has not reaped yet.
    let config = SandboxConfig { max_processes: 128, ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::Processes);
    let spawned: usize =
        run.stderr.split("spawn after ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap();
    assert!(spawned < 128, "{spawned} children under a limit of 128: {run:?}");
    assert!(run.stderr.contains("Resource temporarily unavailable"), "{run:?}");
    let leftovers = processes_with(&["/usr/bin/sleep", &marker]);
    assert!(leftovers.is_empty(), "sleep processes left behind: {leftovers:?}");
    assert_benign_still_works(&self::config());
}

#[test]
fn spinning_forever_hits_the_cpu_limit() {
    let job = Job::with_macro(
        r#"let mut n = 0u64;
        loop { n = std::hint::black_box(n.wrapping_add(1)); }"#,
    );
    let config = SandboxConfig { cpu_secs: 2, ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::Cpu);
    assert_eq!(run.outcome.exit_code, Some(128 + libc::SIGXCPU), "{run:?}");
    assert_benign_still_works(&self::config());
}

#[test]
fn ignoring_sigxcpu_still_hits_the_cpu_limit() {
    // The hard limit (5 s above the soft one) ends it with SIGKILL; the CPU time tells it apart.
    let job = Job::with_macro(
        r#"extern "C" { fn signal(signum: i32, handler: usize) -> usize; }
        unsafe { signal(24, 1) }; // SIGXCPU, SIG_IGN
        let mut n = 0u64;
        loop { n = std::hint::black_box(n.wrapping_add(1)); }"#,
    );
    let config = SandboxConfig { cpu_secs: 1, ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::Cpu);
    assert_eq!(run.outcome.exit_code, Some(128 + libc::SIGKILL), "{run:?}");
}

#[test]
fn sleeping_forever_hits_the_wall_clock_and_everything_is_killed() {
    let job = Job::with_macro(r#"loop { std::thread::sleep(std::time::Duration::from_secs(1000)); }"#);
    let config = SandboxConfig { wall_clock: Duration::from_secs(2), ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::WallClock);
    assert_eq!(run.outcome.signal, Some(libc::SIGKILL), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(4), "returned after {:?}", run.elapsed);
    let leftovers = processes_with(&[&job.marker]);
    assert!(leftovers.is_empty(), "rustc left behind: {leftovers:?}");
    assert_benign_still_works(&self::config());
}

#[test]
fn allocating_without_bound_hits_the_memory_limit() {
    // rustc compiles a small crate under 512 MiB of address space; 2 GiB leaves it room. The
    // macro stops at 4 GiB (and the compile then succeeds), so a missing limit fails the test
    // without exhausting the machine.
    let job = Job::with_macro(
        r#"let mut blocks = Vec::new();
        while blocks.len() < 64 { blocks.push(vec![1u8; 64 << 20]); }
        "pub fn unbounded() {}".parse().unwrap()"#,
    );
    let config = SandboxConfig { memory_bytes: 2 << 30, ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::Memory);
    assert!(run.stderr.contains("memory allocation of 67108864 bytes failed"), "{run:?}");
    assert_benign_still_works(&self::config());
}

/// Six processes of 200 MiB each (held until all six have filled theirs, so they overlap whatever
/// the load) stay under a per-process `RLIMIT_AS` of 1 GiB, but not under a
/// job cgroup of 1 GiB: with cgroups the job is stopped by its group (an OOM kill, reported as
/// `Memory`); with rlimits alone it would succeed. Needs root (cgroups); CI runs as root.
#[test]
fn processes_together_hit_the_job_memory_limit() {
    if !is_root() {
        eprintln!("skipped: a job cgroup needs root");
        return;
    }
    let job = Job::with_macro(
        r#"let dir = format!("/tmp/ferry-barrier-{}", std::process::id());
        std::fs::create_dir_all(&dir).unwrap();
        let children: Vec<_> = (0..6)
            .map(|i| std::process::Command::new("/usr/bin/bash")
                .args(["-o", "pipefail", "-c", "n=$1; /usr/bin/dd if=/dev/zero bs=200M count=1 status=none | { /usr/bin/head -c 1 > /dev/null; : > $2/filled.$n; for t in $(/usr/bin/seq 50); do f=($2/filled.*); [ ${#f[@]} -ge 6 ] && break; /usr/bin/sleep 0.1; done; /usr/bin/cat > /dev/null; }", "_", &i.to_string(), &dir])
                .spawn().unwrap())
            .collect();
        for mut child in children {
            let status = child.wait().unwrap();
            assert!(status.success(), "a child failed: {status}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        "pub fn fits() {}".parse().unwrap()"#,
    );
    let groups = ferry_worker::JobCgroups::setup().expect("a root worker here can create job cgroups");
    let unlimited = SandboxConfig { memory_bytes: 1 << 30, ..config() };
    // Without the group: every process fits its own rlimit, so the compile succeeds.
    job.run(&unlimited).assert_success();
    let limited = SandboxConfig { cgroups: Some(groups), ..unlimited };
    let run = job.run(&limited);
    run.assert_limit(Limit::Memory);
    assert_benign_still_works(&limited);
}

#[test]
fn a_big_file_hits_the_file_size_limit() {
    let job = Job::with_macro(
        r#"std::fs::create_dir_all("/job/out").unwrap();
        std::fs::write("/job/out/big.bin", vec![7u8; 20 << 20]).unwrap();
        "pub fn wrote() {}".parse().unwrap()"#,
    );
    let config = SandboxConfig { file_size_bytes: 10 << 20, ..config() };
    let run = job.run(&config);
    run.assert_limit(Limit::FileSize);
    let written = fs::metadata(job.output("big.bin")).map(|m| m.len()).unwrap_or(0);
    assert!(written <= 10 << 20, "wrote {written} bytes");
    assert_benign_still_works(&self::config());
}

#[test]
fn only_the_given_environment_is_visible() {
    assert!(std::env::var_os("PATH").is_some(), "the test process has an environment to leak");
    let job = Job::with_macro(r#"panic!("env: {:?}", std::env::vars().collect::<Vec<_>>())"#);
    let env = [("FERRY_ALLOWED".to_owned(), "yes".to_owned())];
    let run = job.run_with(&config(), &env);
    run.assert_failed_without_limit();
    // bwrap itself sets PWD to the working directory.
    assert!(run.stderr.contains(r#"env: [("FERRY_ALLOWED", "yes"), ("PWD", "/job")]"#), "{run:?}");
}

#[test]
fn the_toolchain_is_visible_under_a_tree_directory() {
    // The toolchain is bound after the tree, so a tree dir on its mount path does not hide it.
    let tree = tempfile::tempdir().unwrap();
    fs::create_dir_all(tree.path().join("opt/job")).unwrap();
    fs::write(tree.path().join("opt/job/lib.rs"), "pub fn answer() -> u32 { 42 }").unwrap();
    let program = "/opt/ferry/toolchain/bin/rustc";
    let args = strings(&["--crate-type", "lib", "--edition", "2021", "/opt/job/lib.rs", "--out-dir", "/opt/job/out"]);
    let job = SandboxJob {
        program,
        args: &args,
        cwd: "/opt/job",
        env: &[],
        toolchain: (&toolchain().host, "/opt/ferry/toolchain"),
        tree: tree.path(),
        binds: &[],
    };
    let outcome = run(&config(), &job, &mut |_, _| {}).unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    assert!(tree.path().join("opt/job/out/liblib.rlib").is_file());
}

#[test]
fn a_project_and_a_toolchain_under_usr_local_join_the_hosts_usr_local() {
    // The host's /usr/local has something of its own the job can still see beside its files.
    let own = fs::read_dir("/usr/local").unwrap().flatten().find(|e| e.path().is_dir()).map(|e| e.file_name());
    let own = own.expect("a directory in the host's /usr/local");
    let tree = tempfile::tempdir().unwrap();
    fs::create_dir_all(tree.path().join("usr/local/src/job")).unwrap();
    fs::write(tree.path().join("usr/local/src/job/lib.rs"), "pub fn answer() -> u32 { 42 }\n").unwrap();
    let program = "/usr/local/rustup/toolchains/test/bin/rustc";
    let listing = format!("/usr/local/{}", own.to_string_lossy());
    let args = strings(&[
        "--crate-type",
        "lib",
        "--edition",
        "2021",
        "/usr/local/src/job/lib.rs",
        "--out-dir",
        "/usr/local/src/job/out",
    ]);
    let job = SandboxJob {
        program,
        args: &args,
        cwd: "/usr/local/src/job",
        env: &[],
        toolchain: (&toolchain().host, "/usr/local/rustup/toolchains/test"),
        tree: tree.path(),
        binds: &[],
    };
    let mut stderr = Vec::new();
    let outcome = run(&config(), &job, &mut |_, b| stderr.extend_from_slice(b)).unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}: {}", String::from_utf8_lossy(&stderr));
    assert!(tree.path().join("usr/local/src/job/out/liblib.rlib").is_file());
    // And the host's own entry is there, as the host has it.
    let ls = SandboxJob { program: "/usr/bin/ls", args: &strings(&["-d", &listing]), ..job };
    let mut out = Vec::new();
    let outcome = run(&config(), &ls, &mut |_, b| out.extend_from_slice(b)).unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}: {}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).contains(&listing), "{}", String::from_utf8_lossy(&out));
}

#[test]
fn bad_jobs_are_refused_before_anything_runs() {
    let check = |tree: &Path, program: &str, cwd: &str, config: &SandboxConfig| {
        let args = Vec::new();
        let job = SandboxJob {
            program,
            args: &args,
            cwd,
            env: &[],
            toolchain: (&toolchain().host, &toolchain().sysroot),
            tree,
            binds: &[],
        };
        let mut called = false;
        let result = run(config, &job, &mut |_, _| called = true);
        assert!(!called, "the job ran");
        assert_eq!(fs::metadata(tree).unwrap().uid(), current_uid(), "the tree was chowned");
        result.unwrap_err()
    };
    let good = tempfile::tempdir().unwrap();
    fs::create_dir(good.path().join("job")).unwrap();
    let rustc = toolchain().rustc_inside();
    let error = check(good.path(), "bin/rustc", "/job", &config());
    assert!(matches!(&error, SandboxError::NotAbsolute { what: "program", value } if value == "bin/rustc"), "{error}");
    let error = check(good.path(), &rustc, "job", &config());
    assert!(matches!(&error, SandboxError::NotAbsolute { what: "working directory", .. }), "{error}");
    assert_eq!(error.to_string(), "the job's working directory must be an absolute path, got 'job'");

    for name in ["lib", "etc"] {
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir(tree.path().join(name)).unwrap();
        let error = check(tree.path(), &rustc, "/", &config());
        assert!(matches!(&error, SandboxError::ReservedName { name: n } if n == name), "{error}");
        assert_eq!(error.to_string(), format!("tree entry '{name}' would shadow the system directory '/{name}'"));
    }
    // Under /usr, only /usr/local.
    let tree = tempfile::tempdir().unwrap();
    fs::create_dir_all(tree.path().join("usr/share")).unwrap();
    let error = check(tree.path(), &rustc, "/", &config());
    assert!(matches!(&error, SandboxError::UsrOutsideLocal { path } if path.ends_with("usr/share")), "{error}");

    let tree = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", tree.path().join("job")).unwrap();
    let error = check(tree.path(), &rustc, "/job", &config());
    assert!(matches!(&error, SandboxError::SymlinkInTree { path } if path.ends_with("job")), "{error}");

    let missing = SandboxConfig { bwrap: "/nonexistent/bwrap".into(), ..config() };
    let error = check(good.path(), &rustc, "/job", &missing);
    assert!(matches!(&error, SandboxError::BwrapNotFound { path } if path == Path::new("/nonexistent/bwrap")));
    assert!(error.to_string().contains("'/nonexistent/bwrap'"), "{error}");
}

#[test]
fn a_sandbox_that_cannot_start_is_an_error_not_a_compile_failure() {
    let job = Job::plain();
    let args = Vec::new();
    let sandbox_job = SandboxJob {
        program: "/bin/true",
        args: &args,
        cwd: "/no/such/dir",
        env: &[],
        toolchain: (&toolchain().host, &toolchain().sysroot),
        tree: job.tree.path(),
        binds: &[],
    };
    let mut stderr = Vec::new();
    let error = run(&config(), &sandbox_job, &mut |_, b| stderr.extend_from_slice(b)).unwrap_err();
    assert!(matches!(&error, SandboxError::Setup { message } if message.contains("/no/such/dir")), "{error}");
    assert!(stderr.is_empty(), "bwrap's message was passed on as the job's output");
}

// ---- helpers ----

/// The tests' config: production defaults but a wall clock short enough to stop a hung test.
fn config() -> SandboxConfig {
    SandboxConfig { wall_clock: Duration::from_secs(60), ..SandboxConfig::default() }
}

/// A job's tree with `/job/lib.rs`, and maybe a proc-macro `evil` at `/job/libevil.so`.
struct Job {
    tree: TempDir,
    with_macro: bool,
    /// Unique text in the job's command line, to find its processes on the host.
    marker: String,
}

/// What one sandboxed run produced.
#[derive(Debug)]
struct Run {
    outcome: SandboxOutcome,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    first_stdout: Option<Instant>,
    ended: Instant,
}

impl Job {
    fn plain() -> Job {
        Job::new(None)
    }

    /// A proc-macro whose body is `body` (returning a TokenStream), invoked by `/job/lib.rs`.
    fn with_macro(body: &str) -> Job {
        Job::new(Some(body))
    }

    fn new(body: Option<&str>) -> Job {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let tree = tempfile::tempdir().unwrap();
        let dir = tree.path().join("job");
        fs::create_dir(&dir).unwrap();
        let marker = format!("ferry_test_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let lib = match body {
            Some(body) => {
                let source = format!(
                    "extern crate proc_macro;\n#[proc_macro]\n\
                     pub fn evil(_: proc_macro::TokenStream) -> proc_macro::TokenStream {{\n{body}\n}}\n"
                );
                let macro_dir = tempfile::tempdir().unwrap();
                let src = macro_dir.path().join("evil.rs");
                fs::write(&src, source).unwrap();
                let output = Command::new(toolchain().host.join("bin/rustc"))
                    .args(["--crate-type", "proc-macro", "--edition", "2021"])
                    .arg(&src)
                    .arg("-o")
                    .arg(dir.join("libevil.so"))
                    .output()
                    .unwrap();
                assert!(output.status.success(), "macro build failed: {}", String::from_utf8_lossy(&output.stderr));
                "evil::evil!();\n"
            }
            None => "pub fn answer() -> u32 { 42 }\n",
        };
        fs::write(dir.join("lib.rs"), lib).unwrap();
        Job { tree, with_macro: body.is_some(), marker }
    }

    fn output(&self, name: &str) -> PathBuf {
        self.tree.path().join("job/out").join(name)
    }

    fn run(&self, config: &SandboxConfig) -> Run {
        self.run_with(config, &[])
    }

    /// Compiles `/job/lib.rs` (crate `evil_user`) in the sandbox with the toolchain's rustc.
    fn run_with(&self, config: &SandboxConfig, env: &[(String, String)]) -> Run {
        let mut args = strings(&["--crate-type", "lib", "--crate-name", "evil_user", "--edition", "2021"]);
        args.push(format!("--cfg={}", self.marker));
        if self.with_macro {
            args.extend(strings(&["--extern", "evil=/job/libevil.so"]));
        }
        args.extend(strings(&["/job/lib.rs", "--out-dir", "/job/out"]));
        let rustc = toolchain().rustc_inside();
        let job = SandboxJob {
            program: &rustc,
            args: &args,
            cwd: "/job",
            env,
            toolchain: (&toolchain().host, &toolchain().sysroot),
            tree: self.tree.path(),
            binds: &[],
        };
        let (mut stdout, mut stderr, mut first_stdout) = (Vec::new(), Vec::new(), None);
        let start = Instant::now();
        let outcome = run(config, &job, &mut |stream, chunk| match stream {
            Stream::Stdout => {
                first_stdout.get_or_insert_with(Instant::now);
                stdout.extend_from_slice(chunk);
            }
            Stream::Stderr => stderr.extend_from_slice(chunk),
        })
        .unwrap();
        let ended = Instant::now();
        Run {
            outcome,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            elapsed: ended - start,
            first_stdout,
            ended,
        }
    }
}

impl Run {
    fn assert_success(&self) {
        assert_eq!((self.outcome.exit_code, self.outcome.limit), (Some(0), None), "{self:?}");
    }

    fn assert_failed_without_limit(&self) {
        assert_ne!(self.outcome.exit_code, Some(0), "{self:?}");
        assert_eq!(self.outcome.limit, None, "{self:?}");
        assert!(self.stderr.contains("proc macro panicked"), "the macro did not run: {self:?}");
    }

    fn assert_limit(&self, limit: Limit) {
        assert_ne!(self.outcome.exit_code, Some(0), "{self:?}");
        assert_eq!(self.outcome.limit, Some(limit), "{self:?}");
    }
}

fn assert_benign_still_works(config: &SandboxConfig) {
    let job = Job::plain();
    job.run(config).assert_success();
    assert!(job.output("libevil_user.rlib").is_file());
}

/// The installed toolchain: its sysroot (where jobs see it) and a host directory the job's user
/// can reach holding it.
struct Toolchain {
    sysroot: String,
    host: PathBuf,
}

impl Toolchain {
    fn rustc_inside(&self) -> String {
        format!("{}/bin/rustc", self.sysroot)
    }
}

fn toolchain() -> &'static Toolchain {
    static TOOLCHAIN: OnceLock<Toolchain> = OnceLock::new();
    TOOLCHAIN.get_or_init(|| {
        let rustc = |arg: &str| {
            let output = Command::new("rustc").arg(arg).output().expect("rustc runs");
            assert!(output.status.success());
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        let sysroot = rustc("--print=sysroot");
        if !is_root() {
            return Toolchain { host: PathBuf::from(&sysroot), sysroot };
        }
        // nobody cannot enter /root: hard-link (or copy) what rustc needs where it can.
        let version = rustc("-vV");
        let commit = version.lines().find_map(|l| l.strip_prefix("commit-hash: ")).unwrap_or("unknown");
        let target_tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let base = if reachable_by_all(&target_tmp) { target_tmp } else { std::env::temp_dir() };
        let host = base.join(format!("ferry-worker-toolchain-{commit}"));
        if !host.join("complete").exists() {
            let staging = tempfile::tempdir_in(&base).unwrap();
            let sysroot_path = Path::new(&sysroot);
            link_tree(&sysroot_path.join("lib"), &staging.path().join("lib"));
            fs::create_dir(staging.path().join("bin")).unwrap();
            link_file(&sysroot_path.join("bin/rustc"), &staging.path().join("bin/rustc"));
            fs::write(staging.path().join("complete"), "").unwrap();
            fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755)).unwrap();
            let staging = staging.keep();
            if fs::rename(&staging, &host).is_err() {
                fs::remove_dir_all(&staging).unwrap(); // another test process made it first
            }
        }
        Toolchain { sysroot, host }
    })
}

fn link_tree(from: &Path, to: &Path) {
    fs::create_dir(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            link_tree(&source, &target);
        } else {
            link_file(&source, &target);
        }
    }
}

fn link_file(from: &Path, to: &Path) {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap();
    }
}

fn reachable_by_all(path: &Path) -> bool {
    path.ancestors().all(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

fn world_readable_dir(dir: TempDir) -> TempDir {
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn world_writable_dir(dir: TempDir) -> TempDir {
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Host processes whose command line contains all of `parts` as whole arguments or substrings.
fn processes_with(parts: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if parts.iter().all(|p| cmdline.contains(p)) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

fn is_root() -> bool {
    current_uid() == 0
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}
