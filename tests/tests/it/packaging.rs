//! The packaging examples are real: `packaging/examples/*.toml` pass `ferry-scheduler
//! --check-config` and `ferry-worker --check-config` with TLS material made by the
//! very commands `packaging/README.md` gives (run with the real `openssl`), the scheduler prints
//! the summary the README shows, the client's example loads without a configuration error, and
//! broken variants are refused with one line naming the file and the key.
//!
//! The examples name files under `/etc/ferry/`; the tests copy each example with only that prefix
//! replaced by a temp dir (asserted), and give the data directory as `--data-dir` (a flag beats
//! the file), so the rest of each file is checked as it is.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_tests::{World, bin, ok};

/// What the tests put in place of the examples' `REPLACE-ME-` token prefix.
const PLACED: &str = "9f3c1e7a5b2d8064-";

/// Where the examples expect the certificates and keys.
const ETC: &str = "/etc/ferry/";

/// Variables the daemons read: none may come from the environment the tests run in.
const DAEMON_VARS: [&str; 11] = [
    "FERRY_LISTEN",
    "FERRY_DATA_DIR",
    "FERRY_SCHEDULER",
    "FERRY_TOKEN",
    "FERRY_CA",
    "FERRY_SHARED_CACHE",
    "FERRY_SHARED_CACHE_SIZE",
    "FERRY_SHARED_KEY_FILE",
    "FERRY_WRITER_KEY_FILE",
    "FERRY_TRUST_FILE",
    "FERRY_HTTP",
];

#[test]
fn the_scheduler_example_passes_its_check_and_prints_what_the_readme_shows() {
    let site = Site::new();
    let config = site.example("scheduler.toml");
    let out = site.check("ferry-scheduler", &config, &[]);
    let summary = ok(out);
    assert!(!summary.contains(PLACED), "a token was printed:\n{summary}");
    let data_dir = site.data_dir("ferry-scheduler");
    assert!(!data_dir.exists(), "the check created {}", data_dir.display());
    // As the README shows it: the paths as they are on the scheduler.
    let as_installed = summary
        .replace(&config.display().to_string(), "/etc/ferry/scheduler.toml")
        .replace(&data_dir.display().to_string(), "/var/lib/ferry-scheduler");
    assert_eq!(as_installed.trim_end(), readme_block("The scheduler's check prints").trim_end());
}

#[test]
fn the_worker_examples_pass_their_check() {
    let site = Site::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    for (name, slots) in [("worker-a", cpus.as_str()), ("worker-b", "4")] {
        let config = site.example(&format!("{name}.toml"));
        let summary = ok(site.check("ferry-worker", &config, &[]));
        assert!(!summary.contains(PLACED), "a token was printed:\n{summary}");
        let lines: Vec<&str> = summary.lines().collect();
        let etc = site.etc.display();
        let data_dir = site.data_dir("ferry-worker");
        for expected in [
            format!("ferry-worker: configuration ok ({})", config.display()),
            format!("scheduler: https://scheduler.example.net:7700 (tls, ca {etc}/ca.pem, token set)"),
            format!("listen: 0.0.0.0:7701 (clients use {name}.example.net:7701)"),
            format!("id: {name}"),
            format!("slots: {slots}"),
            format!("data dir: {}", data_dir.display()),
            "tls: on".to_owned(),
            format!(
                "shared cache: the scheduler's, signed by a key made at the first start in {}/writer.key",
                data_dir.display()
            ),
            "http: off".to_owned(),
        ] {
            assert!(lines.contains(&expected.as_str()), "{name}: no line '{expected}' in:\n{summary}");
        }
        // The start-up check ran: bubblewrap found, a trial job run in a real sandbox.
        let sandbox = lines.iter().find(|l| l.starts_with("sandbox: bubblewrap ")).expect("a sandbox line");
        assert!(sandbox.contains("jobs run as"), "{sandbox}");
        assert!(!data_dir.exists(), "the check created {}", data_dir.display());
    }
}

#[test]
fn the_client_example_loads_without_a_configuration_error() {
    let mut site = Site::new();
    let config = site.example("client.toml");
    site.world.set("FERRY_CONFIG", &config);
    let mut cmd = site.world.command(bin("ferry"));
    for var in DAEMON_VARS {
        cmd.env_remove(var);
    }
    let out = cmd.args(["stats", "--json"]).output().expect("ferry runs");
    let stdout = ok(out.clone());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("configuration error"), "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats JSON");
    let errors = &stats["config_errors"];
    assert!(errors.is_null() || errors.as_object().is_some_and(|m| m.is_empty()), "{errors}");
}

#[test]
fn the_examples_tokens_agree() {
    let scheduler = example_text("scheduler.toml");
    let roles = token_roles(&scheduler);
    assert_eq!(roles.len(), 4, "{roles:?}");
    for (file, role) in
        [("worker-a.toml", "[\"worker\"]"), ("worker-b.toml", "[\"worker\"]"), ("client.toml", "[\"client\"]")]
    {
        let text = example_text(file);
        let token = quoted_value(&text, "token").unwrap_or_else(|| panic!("{file} has no token"));
        let held = roles.iter().find(|(t, _)| *t == token).map(|(_, r)| r.as_str());
        assert_eq!(held, Some(role), "{file}'s token in scheduler.toml");
    }
}

#[test]
fn the_scheduler_check_refuses_a_broken_configuration_in_one_line() {
    let site = Site::new();
    let unknown_role =
        site.edited("scheduler.toml", "unknown-role", |t| t.replacen("[\"client\"]", "[\"clients\"]", 1));
    let out = site.check("ferry-scheduler", &unknown_role, &[]);
    refused(
        &out,
        1,
        &[&format!("ferry-scheduler: error: {}: key 'tokens': unknown role 'clients'", unknown_role.display())],
    );

    // The example as shipped, its tokens never made: public values, refused.
    let placeholders = site.edited("scheduler.toml", "placeholders", |t| t.replace(PLACED, "REPLACE-ME-"));
    let out = site.check("ferry-scheduler", &placeholders, &[]);
    refused(
        &out,
        1,
        &[
            &format!("ferry-scheduler: error: {}: key 'tokens'", placeholders.display()),
            "placeholder 'REPLACE-ME-…'",
            "openssl rand -hex 32",
        ],
    );
    // One token listed twice with different roles is not merged silently.
    let twice = site.edited("scheduler.toml", "twice", |t| {
        let token = quoted_value(&t, "token").expect("a token").to_owned();
        t + &format!("\n[[tokens]]\ntoken = \"{token}\"\nroles = [\"admin\"]\n")
    });
    let out = site.check("ferry-scheduler", &twice, &[]);
    refused(&out, 1, &[&format!("{}: key 'tokens'", twice.display()), "entries 0 and 4 have the same token"]);

    let missing_key = site.edited("scheduler.toml", "missing-key", |t| t.replace("scheduler.key", "missing.key"));
    let out = site.check("ferry-scheduler", &missing_key, &[]);
    refused(
        &out,
        1,
        &[
            &format!("ferry-scheduler: error: {}: key 'tls.key': cannot read", missing_key.display()),
            "missing.key: No such file or directory",
            "; check the path",
        ],
    );

    let foreign_key = site.edited("scheduler.toml", "foreign-key", |t| t.replace("scheduler.key", "worker-a.key"));
    let out = site.check("ferry-scheduler", &foreign_key, &[]);
    refused(&out, 1, &[&format!("{}: keys 'tls.cert', 'tls.key'", foreign_key.display()), "not a usable pair"]);

    let no_tls = site.edited("scheduler.toml", "no-tls", without_tls);
    let out = site.check("ferry-scheduler", &no_tls, &[]);
    refused(
        &out,
        1,
        &[
            &format!("ferry-scheduler: error: {}: key 'listen'", no_tls.display()),
            "refusing to listen on 0.0.0.0:7700 without TLS and tokens",
        ],
    );
}

#[test]
fn the_worker_check_refuses_a_broken_configuration_in_one_line() {
    let site = Site::new();
    let no_tls = site.edited("worker-a.toml", "no-tls", without_tls);
    let out = site.check("ferry-worker", &no_tls, &[]);
    refused(
        &out,
        1,
        &[
            &format!("ferry-worker: error: {}: key 'listen'", no_tls.display()),
            "refusing to listen on 0.0.0.0:7701 without TLS",
        ],
    );

    let missing_ca = site.edited("worker-a.toml", "missing-ca", |t| t.replace("ca.pem", "missing-ca.pem"));
    let out = site.check("ferry-worker", &missing_ca, &[]);
    refused(&out, 1, &[&format!("ferry-worker: error: {}: key 'ca' (or FERRY_CA): cannot read", missing_ca.display())]);

    let placeholder = site.edited("worker-a.toml", "placeholder", |t| t.replace(PLACED, "REPLACE-ME-"));
    let out = site.check("ferry-worker", &placeholder, &[]);
    refused(
        &out,
        1,
        &[&format!("ferry-worker: error: {}: key 'token' (or FERRY_TOKEN)", placeholder.display()), "placeholder"],
    );

    // An address its certificate does not name: every client's TLS would refuse it (a silent
    // black hole of `worker-unreachable` fallbacks), so the check refuses it first.
    let elsewhere =
        site.edited("worker-a.toml", "elsewhere", |t| t.replace("worker-a.example.net:7701", "10.9.8.7:7701"));
    let out = site.check("ferry-worker", &elsewhere, &[]);
    refused(
        &out,
        1,
        &[
            &format!("ferry-worker: error: {}: keys 'advertise', 'tls.cert'", elsewhere.display()),
            "the certificate does not name '10.9.8.7'",
            "subjectAltName DNS:10.9.8.7 or IP:10.9.8.7",
        ],
    );

    // Without `advertise`, clients connect to the listen address: the certificate must name it.
    let bound = site.edited("worker-a.toml", "bound", |t| {
        t.replace("advertise = \"worker-a.example.net:7701\"", "").replace("0.0.0.0:7701", "127.0.0.1:7701")
    });
    let out = site.check("ferry-worker", &bound, &[]);
    refused(
        &out,
        1,
        &[&format!("{}: keys 'listen', 'tls.cert'", bound.display()), "the certificate does not name '127.0.0.1'"],
    );

    let old_tokens = site.edited("worker-a.toml", "old-tokens", |t| {
        t + "\n[[tokens]]\ntoken = \"0123456789abcdef0\"\nroles = [\"client\"]\n"
    });
    let out = site.check("ferry-worker", &old_tokens, &[]);
    refused(&out, 1, &[&format!("{}: key 'tokens' is not used by workers any more", old_tokens.display())]);

    // A worker that cannot run jobs: the same line and exit code as a start.
    let empty = site.world.path().join("empty-path");
    fs::create_dir_all(&empty).expect("mkdir");
    let out = site.check("ferry-worker", &site.example("worker-a.toml"), &[("PATH", &empty)]);
    refused(
        &out,
        2,
        &["ferry-worker: cannot run jobs: bubblewrap ('bwrap') is not installed or not on PATH; install it"],
    );
}

// ---- helpers ------------------------------------------------------------------------------------

/// A temp dir standing for the machines' `/etc/ferry`, filled by the README's commands.
struct Site {
    world: World,
    /// What the examples call `/etc/ferry`.
    etc: PathBuf,
}

impl Site {
    fn new() -> Site {
        let mut world = World::new();
        // Only the checks' own lines on stderr.
        world.set("FERRY_LOG", "warn");
        let etc = world.path().join("etc-ferry");
        fs::create_dir_all(&etc).expect("mkdir");
        let commands = readme_block("packaging.rs runs the next block");
        ok(Command::new("sh").args(["-eu", "-c", &commands]).current_dir(&etc).output().expect("sh runs"));
        for file in ["ca.pem", "scheduler.pem", "scheduler.key", "worker-a.pem", "worker-a.key"] {
            assert!(etc.join(file).is_file(), "the README's commands made no {file}");
        }
        Site { world, etc }
    }

    /// The example with `/etc/ferry/` pointing at this site and nothing else changed, written
    /// into the temp dir.
    fn example(&self, name: &str) -> PathBuf {
        self.edited(name, "as-is", |text| text)
    }

    /// The example as [`Site::example`] makes it, then changed by `edit`.
    fn edited(&self, name: &str, variant: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let original = example_text(name);
        // The tokens made as the guide says (one value per placeholder, the same in every file).
        let moved = original.replace(ETC, &format!("{}/", self.etc.display())).replace("REPLACE-ME-", PLACED);
        for (before, after) in original.lines().zip(moved.lines()) {
            let changed = before.contains(ETC) || before.contains("REPLACE-ME-");
            assert!(before == after || changed, "{name}: the rewrite changed '{before}'");
        }
        // Nothing else would need rewriting: the only other absolute paths are data directories,
        // which the check gets as --data-dir.
        for line in original.lines().filter(|l| !l.trim_start().starts_with('#')) {
            if let Some(path) = line.split('"').nth(1).filter(|v| v.starts_with('/')) {
                assert!(path.starts_with(ETC) || path.starts_with("/var/lib/ferry-"), "{name}: '{path}'");
            }
        }
        let path = self.world.path().join(format!("{variant}-{name}"));
        fs::write(&path, edit(moved)).expect("write config");
        path
    }

    fn data_dir(&self, daemon: &str) -> PathBuf {
        self.world.path().join(format!("{daemon}-data"))
    }

    /// `DAEMON --check-config --config CONFIG --data-dir DIR` with `env` on top of the world's.
    fn check(&self, daemon: &str, config: &Path, env: &[(&str, &Path)]) -> Output {
        let mut cmd = self.world.command(bin(daemon));
        for var in DAEMON_VARS {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        cmd.arg("--check-config").arg("--config").arg(config).arg("--data-dir").arg(self.data_dir(daemon));
        cmd.output().expect("the daemon runs")
    }
}

/// Asserts `out` is a refusal: exit `code`, nothing on stdout, one line on stderr holding every
/// part.
/// The units are valid for systemd itself (`systemd-analyze verify`: unknown or misspelt
/// options, bad values, a missing binary), with `ExecStart` pointing at the binaries just built.
/// Needs `systemd-analyze` (systemd 252 on Debian 12, installed on CI); where it is missing the
/// test says so and checks nothing.
#[test]
fn the_systemd_units_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success(), "{version:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = bin("ferry-worker").parent().expect("bin dir").to_owned();
    let mut units = Vec::new();
    for name in ["ferry-scheduler.service", "ferry-worker.service"] {
        let text = fs::read_to_string(repo_root().join("packaging/systemd").join(name)).expect("unit");
        assert!(text.contains("ExecStart=/usr/local/bin/"), "{name} starts what the guide installs");
        let unit = dir.path().join(name);
        fs::write(&unit, text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()))).expect("write unit");
        units.push(unit);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Lines about the host's own units (systemd reads the dependencies too) are not ours.
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("ferry")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {said}");
}

fn refused(out: &Output, code: i32, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
    assert!(out.stdout.is_empty(), "stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line:\n{stderr}");
    for part in parts {
        assert!(stderr.contains(part), "no '{part}' in:\n{stderr}");
    }
}

/// The example's `[tls]` section gone.
fn without_tls(text: String) -> String {
    let mut out = Vec::new();
    let mut in_tls = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_tls = line == "[tls]";
        }
        if !in_tls {
            out.push(line);
        }
    }
    assert!(out.len() < text.lines().count(), "no [tls] section");
    out.join("\n") + "\n"
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn example_text(name: &str) -> String {
    let path = repo_root().join("packaging/examples").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The first fenced block after the line of `packaging/README.md` that contains `marker`.
fn readme_block(marker: &str) -> String {
    let readme = fs::read_to_string(repo_root().join("packaging/README.md")).expect("packaging/README.md");
    let mut lines = readme.lines().skip_while(|l| !l.contains(marker));
    assert!(lines.next().is_some(), "no '{marker}' in packaging/README.md");
    let mut lines = lines.skip_while(|l| !l.starts_with("```"));
    assert!(lines.next().is_some(), "no block after '{marker}' in packaging/README.md");
    lines.take_while(|l| !l.starts_with("```")).map(|l| format!("{l}\n")).collect()
}

/// The value of the first `key = "..."` line.
fn quoted_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('=')?.trim().strip_prefix('"')?.strip_suffix('"'))
}

/// Each `[[tokens]]` entry of a scheduler config: its token and its `roles` value as written.
fn token_roles(text: &str) -> Vec<(&str, String)> {
    let mut entries: Vec<(Option<&str>, Option<String>)> = Vec::new();
    for line in text.lines() {
        if line == "[[tokens]]" {
            entries.push((None, None));
        } else if let Some((token, roles)) = entries.last_mut() {
            *token = token.or_else(|| quoted_value(line, "token"));
            *roles = roles.take().or_else(|| line.strip_prefix("roles = ").map(str::to_owned));
        }
    }
    entries.into_iter().map(|(token, roles)| (token.expect("a token"), roles.expect("roles"))).collect()
}
