//! Toolchain identity end to end: `ferry toolchain package` and `ferry toolchain list` on the real
//! installed toolchain and on real copies of it (linked into the real rustup for the proxy cases), and
//! `unpack_archive` on archives crafted to be hostile. What is checked is what DESIGN.md
//! ("Identities") promises: one toolchain has one id wherever it lives and however it is selected;
//! any changed byte gives a new id; the archive is deterministic; the store heals itself; unpacking
//! trusts nothing and a refusal leaves nothing behind.
//!
//! Archiving the real toolchain costs seconds, so a test builds an archive only where it needs one.
//! The helpers at the bottom keep each test to a few declarative lines.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_tests::{World, bin, installed_sysroot, ok};
use ferry_toolchains::{
    ARCHIVE_MANIFEST_PATH, Error, Manifest, ManifestEntry, ManifestKind, ToolchainId, UnpackLimits, unpack_archive,
};
use serde_json::Value;
use tempfile::TempDir;

// ---- identity and determinism ------------------------------------------------------------------

#[test]
fn packaging_twice_gives_one_id_and_identical_archive_bytes() {
    let (one, two) = (World::new(), World::new());
    let first = package(&one, &[]);
    let second = package(&two, &[]);
    assert_package_json(&first);
    assert_eq!(first["built"], true);
    assert_eq!(first["id"], second["id"]);
    assert_eq!(file_blake3(&archive_of(&first)), file_blake3(&archive_of(&second)), "two archives of one toolchain");

    let again = package(&one, &[]);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["built"], false, "packaging again into the same store rebuilt the archive");
}

#[test]
fn a_copy_elsewhere_has_the_same_id_however_rustup_selects_it() {
    let world = World::new();
    let original = package(&world, &[]);
    let copy = ToolchainCopy::new();
    let direct = package(&world, &["--rustc", utf8(&copy.rustc())]);
    assert_eq!(direct["id"], original["id"], "the id depends on where the toolchain is installed");
    assert_eq!(direct["built"], false, "one id, one archive");
    assert_eq!(direct["root"], utf8(&copy.root));

    let linked = RustupLink::new(&copy.root);
    let proxy = rustup_proxy();
    let proxy = ["--rustc", utf8(&proxy)];
    let project = world.path().join("project");
    write_toolchain_file(&project, &format!("channel = \"{}\"", linked.name));
    let elsewhere = world.path().join("elsewhere");
    write_toolchain_file(&elsewhere, "channel = \"stable\"");
    let legacy = world.path().join("legacy");
    fs::create_dir(&legacy).expect("mkdir");
    fs::write(legacy.join("rust-toolchain"), format!("{}\n", linked.name)).expect("write rust-toolchain");
    let by_path = world.path().join("by-path");
    write_toolchain_file(&by_path, &format!("path = \"{}\"", copy.root.display()));

    // Each selection also beats the next rule down, as with rustup: `+name` over RUSTUP_TOOLCHAIN
    // over a toolchain file over the default.
    let plus = format!("+{}", linked.name);
    let by_plus = package_with(&world, &[proxy[0], proxy[1], &plus], |cmd| {
        cmd.env("RUSTUP_TOOLCHAIN", "stable").current_dir(&elsewhere);
    });
    let by_env = package_with(&world, &proxy, |cmd| {
        cmd.env("RUSTUP_TOOLCHAIN", &linked.name).current_dir(&elsewhere);
    });
    let by_file = package_with(&world, &proxy, |cmd| {
        cmd.env_remove("RUSTUP_TOOLCHAIN").current_dir(&project);
    });
    let by_file_above = package_with(&world, &proxy, |cmd| {
        cmd.env_remove("RUSTUP_TOOLCHAIN").current_dir(project.join("src"));
    });
    let by_legacy_file = package_with(&world, &proxy, |cmd| {
        cmd.env_remove("RUSTUP_TOOLCHAIN").current_dir(&legacy);
    });
    let by_path_file = package_with(&world, &proxy, |cmd| {
        cmd.env_remove("RUSTUP_TOOLCHAIN").current_dir(&by_path);
    });
    assert_eq!(by_path_file["root"], utf8(&copy.root), "selected by a toolchain file's path");
    assert_eq!(by_path_file["id"], original["id"], "selected by a toolchain file's path");
    let selections = [
        ("+name", by_plus),
        ("RUSTUP_TOOLCHAIN", by_env),
        ("rust-toolchain.toml", by_file),
        ("rust-toolchain.toml in a parent dir", by_file_above),
        ("a legacy rust-toolchain file", by_legacy_file),
    ];
    for (how, json) in selections {
        assert_eq!(json["root"], utf8(&copy.root), "selected by {how}");
        assert_eq!(json["resolved_via"], format!("rustup:{}", linked.name), "selected by {how}");
        assert_eq!(json["id"], original["id"], "selected by {how}");
    }
}

#[test]
fn any_changed_byte_gives_a_new_id_and_reverting_it_the_old_one() {
    let world = World::new();
    let copy = ToolchainCopy::new();
    let id = || package(&world, &["--rustc", utf8(&copy.rustc())])["id"].clone();
    let rlib = copy.smallest_rlib();
    let offset = copy.len(&rlib) / 2;
    let byte = copy.byte_at(&rlib, offset);
    let original = id();

    copy.write_in_place(&rlib, offset, !byte);
    let changed = id();
    assert_ne!(changed, original, "an in-place change (same inode, size and mtime) kept the old id");
    copy.write_in_place(&rlib, offset, byte);
    assert_eq!(id(), original, "the reverted file did not give the old id back");

    copy.write_by_replacing(&rlib, offset, !byte);
    assert_eq!(id(), changed, "a replaced file (new inode, same size and mtime) did not get its content's id");
    copy.write_by_replacing(&rlib, offset, byte);
    assert_eq!(id(), original, "the reverted file did not give the old id back");
}

// ---- the store: concurrency and self-healing ---------------------------------------------------

#[test]
fn concurrent_packaging_agrees_and_builds_one_archive() {
    let world = World::new();
    let outputs = run_all((0..8).map(|_| package_command(&world, &[])).collect(), Duration::from_secs(240));
    let results: Vec<Value> = outputs.into_iter().map(json_of).collect();
    let ids: BTreeSet<&str> = results.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(ids.len(), 1, "concurrent processes disagree on the id: {ids:?}");
    assert_eq!(results.iter().filter(|r| r["built"] == true).count(), 1, "the archive was not built exactly once");

    let archives = store_files(&world).into_iter().filter(|p| utf8(p).ends_with(".tar.gz")).collect::<Vec<_>>();
    assert_eq!(archives, [archive_of(&results[0])]);
    read_map(&world);
    assert_nothing_half_written(&world.cache_dir());
}

#[test]
fn a_damaged_store_heals_itself() {
    let world = World::new();
    let fresh = package(&world, &[]);
    let archive = archive_of(&fresh);
    let good = file_blake3(&archive);
    let damages: [(&str, Damage); 3] = [
        ("truncated", |p| {
            let file = OpenOptions::new().write(true).open(p).expect("open archive");
            file.set_len(file.metadata().expect("stat").len() / 2).expect("truncate");
        }),
        ("one-byte-flipped", |p| {
            let mut bytes = fs::read(p).expect("read archive");
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
            fs::write(p, bytes).expect("write archive");
        }),
        ("deleted", |p| fs::remove_file(p).expect("delete archive")),
    ];
    for (what, damage) in damages {
        damage(&archive);
        assert!(world.cache_dir().join("toolchains/map.json").is_file(), "the map is kept");
        let healed = package(&world, &[]);
        assert_eq!(healed["id"], fresh["id"], "{what} archive");
        assert_eq!(healed["built"], true, "a {what} archive was used");
        assert_eq!(file_blake3(&archive), good, "the archive rebuilt after {what} differs from a fresh one");
    }

    fs::write(world.cache_dir().join("toolchains/map.json"), "{\"toolchains\": [garbage").expect("write map");
    let after = package(&world, &[]);
    assert_eq!(after["id"], fresh["id"], "a garbage map changed the id");
    assert_eq!(after["built"], false, "the archive was fine; only the map was damaged");
    assert!(read_map(&world)["toolchains"].as_object().is_some_and(|t| t.len() == 1), "the map was not rewritten");
}

// ---- unpacking ---------------------------------------------------------------------------------

#[test]
fn a_packaged_archive_unpacks_to_a_working_toolchain_with_the_same_id() {
    let world = World::new();
    let packaged = package(&world, &[]);
    let id: ToolchainId = packaged["id"].as_str().expect("id").parse().expect("id is hex");
    let dest = world.path().join("unpacked/toolchain");
    let archive = File::open(archive_of(&packaged)).expect("open archive");
    let manifest = unpack_archive(archive, &dest, &id, &UnpackLimits::default()).expect("the archive unpacks");
    assert_eq!(manifest.id(), id);
    assert_eq!(Some(manifest.entries.len() as u64), packaged["files"].as_u64());
    assert_tree_is(&dest, &manifest);

    assert!(fs::metadata(dest.join("bin/rustc")).expect("bin/rustc").permissions().mode() & 0o111 != 0);
    let version = ok(Command::new(dest.join("bin/rustc")).arg("-vV").output().expect("unpacked rustc runs"));
    assert!(version.contains("release:"), "unpacked rustc -vV printed:\n{version}");
    let repackaged = package(&world, &["--rustc", utf8(&dest.join("bin/rustc"))]);
    assert_eq!(repackaged["id"], packaged["id"], "the unpacked toolchain is not the same toolchain");
    assert_eq!(repackaged["built"], false);
}

#[test]
fn unpack_refuses_unsafe_paths() {
    let manifest = [file("lib/evil", b"evil")];
    let absolute = format!("/tmp/ferry-test-absolute-entry-{}", std::process::id());
    let err = refused(&manifest, &[raw_file(&absolute, b"evil")]);
    assert_refused(&err, &absolute, "absolute path");
    assert!(!Path::new(&absolute).exists(), "{absolute} was written");
    let err = refused(&manifest, &[raw_file("lib/../../evil", b"evil")]);
    assert_refused(&err, "lib/../../evil", "'..' path component");
}

#[test]
fn unpack_refuses_symlinks_out_of_the_root() {
    let err = refused(&[symlink("lib/x", "../../etc")], &[raw_symlink("lib/x", "../../etc")]);
    assert_refused(&err, "lib/x", "leaves the toolchain");
    let err = refused(&[symlink("lib/x", "/etc")], &[raw_symlink("lib/x", "/etc")]);
    assert_refused(&err, "lib/x", "leaves the toolchain");
    // A file written through an earlier (harmless-looking) symlink.
    let manifest = [symlink("lib/up", ".."), file("lib/up/bin/rustc", b"evil")];
    let err = refused(&manifest, &[raw_symlink("lib/up", ".."), raw_file("lib/up/bin/rustc", b"evil")]);
    assert_refused(&err, "lib/up/bin/rustc", "through a symlink");
    // A symlink placed under an earlier symlink, each lexically inside the root.
    let manifest = [symlink("lib/up", ".."), symlink("lib/up/out", "../..")];
    let err = refused(&manifest, &[raw_symlink("lib/up", ".."), raw_symlink("lib/up/out", "../..")]);
    assert_refused(&err, "lib/up/out", "through a symlink");
}

/// `lib/q -> p/..` looks inside the root on its own (`lib/p/..` is `lib`), but `lib/p -> ..` is the
/// root, so `lib/q` is the root's parent: the chain leaves the toolchain.
#[test]
fn unpack_refuses_a_symlink_whose_target_goes_through_an_earlier_symlink() {
    let manifest = [symlink("lib/p", ".."), symlink("lib/q", "p/..")];
    let err = refused(&manifest, &[raw_symlink("lib/p", ".."), raw_symlink("lib/q", "p/..")]);
    assert_refused(&err, "lib/q", "");
}

/// The same chain in the other order: `lib/a -> z/..` is unpacked before `lib/z -> ..` exists.
#[test]
fn unpack_refuses_a_symlink_whose_target_goes_through_a_later_symlink() {
    let manifest = [symlink("lib/a", "z/.."), symlink("lib/z", "..")];
    let err = refused(&manifest, &[raw_symlink("lib/a", "z/.."), raw_symlink("lib/z", "..")]);
    assert!(matches!(&err, Error::UnsafeEntry { entry, .. } if entry == "lib/a" || entry == "lib/z"), "{err:?}");
}

#[test]
fn unpack_refuses_hard_links_devices_and_fifos() {
    let manifest = [file("lib/node", b"")];
    let err = refused(&manifest, &[raw("lib/node", tar::EntryType::Link, Some("bin/rustc"))]);
    assert_refused(&err, "lib/node", "hard links are not allowed");
    let err = refused(&manifest, &[raw("lib/node", tar::EntryType::Char, None)]);
    assert_refused(&err, "lib/node", "device files are not allowed");
    let err = refused(&manifest, &[raw("lib/node", tar::EntryType::Block, None)]);
    assert_refused(&err, "lib/node", "device files are not allowed");
    let err = refused(&manifest, &[raw("lib/node", tar::EntryType::Fifo, None)]);
    assert_refused(&err, "lib/node", "fifos are not allowed");
}

#[test]
fn unpack_enforces_its_limits() {
    let limits = UnpackLimits { max_file_bytes: 8, ..UnpackLimits::default() };
    let manifest = [file("lib/big", b"123456789")];
    let err = refused_with(&manifest, &[raw_file("lib/big", b"123456789")], &limits, None);
    assert_refused(&err, "lib/big", "9 bytes is over the per-file limit of 8");

    let limits = UnpackLimits { max_total_bytes: 10, ..UnpackLimits::default() };
    let manifest = [file("lib/a", b"123456"), file("lib/b", b"123456")];
    let entries = [raw_file("lib/a", b"123456"), raw_file("lib/b", b"123456")];
    let err = refused_with(&manifest, &entries, &limits, None);
    assert_refused(&err, "lib/b", "exceeds the total limit of 10 bytes");

    let limits = UnpackLimits { max_entries: 1, ..UnpackLimits::default() };
    let err = refused_with(&manifest, &entries, &limits, None);
    assert!(matches!(&err, Error::CorruptArchive { reason } if reason.contains("over the limit of 1")), "{err:?}");
}

#[test]
fn unpack_refuses_content_that_disagrees_with_the_manifest() {
    let err = refused(&[file("lib/a", b"hello")], &[raw_file("lib/a", b"jello")]);
    assert_refused(&err, "lib/a", "content does not match the manifest");
    let err = refused(&[file("lib/a", b"hello")], &[raw_file("lib/a", b"hell")]);
    assert_refused(&err, "lib/a", "size differs from the manifest");
    let err = refused(&[file("lib/a", b"hello")], &[raw_symlink("lib/a", "b")]);
    assert_refused(&err, "lib/a", "entry kind differs from the manifest");
    let err = refused(&[symlink("lib/a", "b")], &[raw_symlink("lib/a", "c")]);
    assert_refused(&err, "lib/a", "symlink target differs from the manifest");

    let err = refused(&[file("lib/a", b"a")], &[raw_file("lib/a", b"a"), raw_file("lib/b", b"b")]);
    assert_refused(&err, "lib/b", "not listed in the manifest");

    let err = refused(&[file("lib/a", b"a"), file("lib/b", b"b")], &[raw_file("lib/a", b"a")]);
    assert!(matches!(&err, Error::CorruptArchive { reason } if reason.contains("'lib/b' is missing")), "{err:?}");

    let manifest = [file("lib/a", b"a")];
    let other = ToolchainId([7; 32]);
    let err = refused_with(&manifest, &[raw_file("lib/a", b"a")], &UnpackLimits::default(), Some(other));
    let actual = Manifest { entries: manifest.to_vec() }.id();
    assert!(
        matches!(&err, Error::IdMismatch { expected, actual: a } if *expected == other.to_hex() && *a == actual.to_hex()),
        "{err:?}"
    );
    assert!(err.to_string().contains(&other.to_hex()), "{err}");
}

// ---- the command line --------------------------------------------------------------------------

#[test]
fn bad_input_is_one_clear_error_line_and_leaves_nothing_half_written() {
    let world = World::new();
    let not_executable = world.path().join("rustc");
    fs::write(&not_executable, "#!/bin/sh\n").expect("write file");
    fs::set_permissions(&not_executable, fs::Permissions::from_mode(0o644)).expect("chmod");
    // A toolchain-shaped directory whose `bin/rustc` does not answer like rustc.
    let fake = world.path().join("fake");
    fs::create_dir_all(fake.join("bin")).expect("mkdir");
    fs::create_dir_all(fake.join("lib/rustlib")).expect("mkdir");
    fs::copy("/bin/true", fake.join("bin/rustc")).expect("copy /bin/true");

    assert_fails_cleanly(&world, &["--rustc", "/nonexistent/rustc"], "/nonexistent/rustc");
    assert_fails_cleanly(&world, &["--rustc", utf8(&not_executable)], utf8(&not_executable));
    assert_fails_cleanly(&world, &["--rustc", "/bin/true"], "/bin/true");
    assert_fails_cleanly(&world, &["--rustc", utf8(&fake.join("bin/rustc"))], utf8(&fake.join("bin/rustc")));
    assert_fails_cleanly(&world, &["--target", "no-such-target-xyz"], "no-such-target-xyz");
    assert_fails_cleanly(&world, &["--target", "../../etc"], "../../etc");
}

#[test]
fn an_unusable_cache_dir_is_one_clear_error_line() {
    // Root can write anywhere, so make the cache dir a path under a regular file.
    let mut blocked = World::new();
    let file = blocked.path().join("file");
    fs::write(&file, "a regular file").expect("write file");
    let cache = file.join("cache");
    blocked.set("FERRY_CACHE_DIR", &cache);
    assert_fails_cleanly(&blocked, &[], utf8(&cache));
    assert_eq!(fs::read_to_string(&file).expect("read file"), "a regular file");
}

#[test]
fn an_unknown_rustup_toolchain_is_one_clear_error_line() {
    let mut world = World::new();
    // As in many developers' shells (and this machine's): rustup then prints a backtrace with its
    // error. Auto-install stays off so rustup never downloads anything.
    world.set("RUST_BACKTRACE", "1").set("RUSTUP_AUTO_INSTALL", "0");
    let proxy = rustup_proxy();
    let args = ["--rustc", utf8(&proxy), "+no-such-toolchain-xyz"];
    assert_fails_cleanly(&world, &args, "no-such-toolchain-xyz");
}

#[test]
fn list_shows_packaged_toolchains() {
    let world = World::new();
    let (list, list_json) = (["toolchain", "list", "--local"], ["toolchain", "list", "--local", "--json"]);
    assert!(world.ferry_ok(&list).starts_with("no toolchains in "));
    assert_eq!(world.ferry_json(&list_json), serde_json::json!([]));

    let before = now_secs();
    let packaged = package(&world, &[]);
    let listed = world.ferry_json(&list_json);
    let [entry] = listed.as_array().expect("a JSON array").as_slice() else { panic!("one toolchain: {listed}") };
    for field in ["id", "rustc_version", "targets", "bytes", "archive_bytes", "files"] {
        assert_eq!(entry[field], packaged[field], "field {field}");
    }
    let packaged_at = entry["packaged_at"].as_u64().expect("packaged_at");
    assert!((before..=now_secs()).contains(&packaged_at), "packaged_at {packaged_at}");

    let human = world.ferry_ok(&list);
    let mut lines = human.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("ID") && header.contains("RUSTC") && header.contains("TARGETS"), "{human}");
    let row = lines.next().expect("a row");
    let id = packaged["id"].as_str().expect("id");
    assert!(row.starts_with(&id[..16]) && row.contains(installed().version.as_str()), "{human}");
    assert_eq!(lines.next(), None, "{human}");
}

// ---- helpers: running ferry --------------------------------------------------------------------

/// `ferry toolchain package --json EXTRA...`, with the installed rustc unless EXTRA names one.
fn package_command(world: &World, extra: &[&str]) -> Command {
    let mut cmd = world.command(bin("ferry"));
    cmd.args(["toolchain", "package", "--json"]);
    if !extra.contains(&"--rustc") {
        cmd.arg("--rustc").arg(&installed().rustc);
    }
    cmd.args(extra);
    cmd
}

/// Runs [`package_command`], asserts success and returns the JSON it printed.
fn package(world: &World, extra: &[&str]) -> Value {
    package_with(world, extra, |_| {})
}

/// Like [`package`], with the command adjusted first (environment, working directory).
fn package_with(world: &World, extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Value {
    let mut cmd = package_command(world, extra);
    adjust(&mut cmd);
    json_of(cmd.output().expect("ferry runs"))
}

fn json_of(out: Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// Runs every command at once; a process still running after `limit` (a deadlock) is killed and
/// fails the test rather than hanging it.
fn run_all(commands: Vec<Command>, limit: Duration) -> Vec<Output> {
    let (tx, rx) = mpsc::channel();
    let mut pids = Vec::new();
    for (i, mut cmd) in commands.into_iter().enumerate() {
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("process starts");
        pids.push(child.id());
        let tx = tx.clone();
        std::thread::spawn(move || tx.send((i, child.wait_with_output())));
    }
    let deadline = Instant::now() + limit;
    let mut outputs: Vec<Option<Output>> = pids.iter().map(|_| None).collect();
    while outputs.iter().any(Option::is_none) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, out)) => outputs[i] = Some(out.expect("wait for process")),
            Err(_) => {
                for (pid, _) in pids.iter().zip(&outputs).filter(|(_, out)| out.is_none()) {
                    // SAFETY: kill(2) on a child this test started and has not yet reaped.
                    unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
                }
                panic!("processes still running after {limit:?}");
            }
        }
    }
    outputs.into_iter().map(|o| o.expect("every process finished")).collect()
}

/// Runs a `package` that must fail: exit status, one `ferry: error:` line on stderr quoting `named`,
/// nothing on stdout, and nothing half-written in the cache dir.
fn assert_fails_cleanly(world: &World, extra: &[&str], named: &str) {
    let out = package_command(world, extra).output().expect("ferry runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "package {extra:?} succeeded");
    assert!(out.stdout.is_empty(), "package {extra:?} printed: {}", String::from_utf8_lossy(&out.stdout));
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    assert!(line.starts_with("ferry: error: ") && !line.contains('\n'), "not one error line:\n{stderr}");
    assert!(line.contains(&format!("'{named}'")), "the error does not quote '{named}': {line}");
    assert!(line.matches("(os error").count() <= 1, "the error repeats its cause: {line}");
    assert_nothing_half_written(&world.cache_dir());
}

// ---- helpers: the store ------------------------------------------------------------------------

/// Something done to a stored archive.
type Damage = fn(&Path);

/// The `archive` path of a `package --json` result, checked against its `archive_bytes`.
fn archive_of(json: &Value) -> PathBuf {
    let path = PathBuf::from(json["archive"].as_str().expect("archive"));
    let len = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
    assert_eq!(Some(len), json["archive_bytes"].as_u64(), "archive_bytes");
    path
}

fn assert_package_json(json: &Value) {
    let id = json["id"].as_str().expect("id");
    assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "id '{id}'");
    assert!(json["files"].as_u64().is_some_and(|n| n > 1), "files: {json}");
    assert!(json["bytes"].as_u64().is_some_and(|n| n > 1 << 20), "bytes: {json}");
    assert!(archive_of(json).ends_with(format!("{id}.tar.gz")), "archive: {json}");
    assert_eq!(json["rustc_version"], installed().version, "rustc_version");
    assert_eq!(json["targets"], serde_json::json!([installed().host]), "targets");
}

fn read_map(world: &World) -> Value {
    let path = world.cache_dir().join("toolchains/map.json");
    serde_json::from_slice(&fs::read(&path).expect("map.json exists")).expect("map.json is JSON")
}

/// Files under `<cache>/toolchains/archives`.
fn store_files(world: &World) -> Vec<PathBuf> {
    let dir = world.cache_dir().join("toolchains/archives");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir).expect("archives dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files
}

/// No temp file anywhere under `dir`, no archive without its record, and a map (if any) that parses.
fn assert_nothing_half_written(dir: &Path) {
    for path in walk(dir) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        assert!(
            !name.contains(".tmp-") && !name.contains(".write-test-") && !name.contains(".unpack-"),
            "left behind: {}",
            path.display()
        );
        if name.ends_with(".tar.gz") {
            assert!(path.with_extension("").with_extension("json").is_file(), "archive without record: {name}");
        }
        if name == "map.json" {
            serde_json::from_slice::<Value>(&fs::read(&path).expect("read map")).expect("map.json is JSON");
        }
    }
}

/// The key leaves out what the ToolchainId covers, by rules of its own
/// (`ferry_cache::rustc::ToolchainFiles`): they must cover every file the id is made of, or a
/// toolchain file would be keyed (entries never shared), and nothing beside the set that a
/// compile can read as an input (here: a file next to the set's directories).
#[test]
fn what_the_key_leaves_out_as_toolchain_is_what_the_id_covers() {
    let installed = installed();
    let set = ferry_toolchains::ToolchainSet::collect(&installed.sysroot, &installed.host, &[]).expect("the set");
    let files = ferry_cache::rustc::ToolchainFiles { root: &installed.sysroot, host: &installed.host, targets: &[] };
    let uncovered: Vec<&str> = set.files.iter().filter(|f| !files.covers(&f.abs)).map(|f| f.rel.as_str()).collect();
    assert!(uncovered.is_empty(), "in the ToolchainId but keyed as inputs: {uncovered:?}");
    for outside in ["bin/cargo", "lib/rustlib/etc/gdb_load_rust_pretty_printers.py", "share/doc/rust/README.md"] {
        assert!(!files.covers(&installed.sysroot.join(outside)), "{outside} is left out of keys but not in the id");
    }
}

// ---- helpers: toolchains -----------------------------------------------------------------------

/// The installed toolchain (the `rustc` on PATH), probed once.
pub(crate) struct Installed {
    sysroot: PathBuf,
    rustc: PathBuf,
    pub(crate) host: String,
    /// First line of `rustc -vV`.
    version: String,
}

pub(crate) fn installed() -> &'static Installed {
    static INSTALLED: OnceLock<Installed> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let sysroot = fs::canonicalize(installed_sysroot()).expect("sysroot");
        let rustc = sysroot.join("bin/rustc");
        let text = ok(Command::new(&rustc).arg("-vV").output().expect("rustc runs"));
        let version = text.lines().next().expect("a version line").to_owned();
        let host = text.lines().find_map(|l| l.strip_prefix("host: ")).expect("a host line").to_owned();
        Installed { sysroot, rustc, host, version }
    })
}

/// A real copy (new inodes, never hard links) of what the installed toolchain's set needs:
/// `bin/rustc`, the shared libraries at the top of `lib/`, and `lib/rustlib/<host>/`, made with
/// `cp -a`. Files are only ever changed in the copy, after checking that they are the copy's own.
pub(crate) struct ToolchainCopy {
    /// Holds the copy, and beside it pristine reference copies of changed files.
    dir: TempDir,
    /// Canonical root of the copied toolchain.
    root: PathBuf,
}

impl ToolchainCopy {
    pub(crate) fn new() -> ToolchainCopy {
        ToolchainCopy::new_in(&std::env::temp_dir())
    }

    /// A copy in a new directory under `parent`.
    pub(crate) fn new_in(parent: &Path) -> ToolchainCopy {
        let dir = tempfile::Builder::new().prefix("ferry-toolchain-copy-").tempdir_in(parent).expect("temp dir");
        let root = dir.path().join("toolchain");
        let from = &installed().sysroot;
        fs::create_dir_all(root.join("bin")).expect("mkdir");
        fs::create_dir_all(root.join("lib/rustlib")).expect("mkdir");
        let mut libs = Vec::new();
        for entry in fs::read_dir(from.join("lib")).expect("read lib") {
            let entry = entry.expect("lib entry");
            if !entry.file_type().expect("file type").is_dir() && entry.file_name().to_string_lossy().contains(".so") {
                libs.push(entry.path());
            }
        }
        cp_a(&[from.join("bin/rustc")], &root.join("bin"));
        cp_a(&libs, &root.join("lib"));
        cp_a(&[from.join("lib/rustlib").join(&installed().host)], &root.join("lib/rustlib"));
        let root = fs::canonicalize(&root).expect("canonical root");
        ToolchainCopy { dir, root }
    }

    pub(crate) fn rustc(&self) -> PathBuf {
        self.root.join("bin/rustc")
    }

    /// The smallest `.rlib` of the host's standard library, relative to the root.
    fn smallest_rlib(&self) -> String {
        let rel = format!("lib/rustlib/{}/lib", installed().host);
        let smallest = fs::read_dir(self.root.join(&rel))
            .expect("read std lib dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rlib"))
            .min_by_key(|p| fs::metadata(p).expect("stat").len())
            .expect("an rlib");
        format!("{rel}/{}", smallest.file_name().expect("name").to_string_lossy())
    }

    pub(crate) fn len(&self, rel: &str) -> u64 {
        fs::metadata(self.root.join(rel)).expect("stat").len()
    }

    pub(crate) fn byte_at(&self, rel: &str, offset: u64) -> u8 {
        fs::read(self.root.join(rel)).expect("read")[offset as usize]
    }

    /// Writes one byte into the file itself (same inode, no truncation), then restores its mtime:
    /// only the ctime tells a cheap fingerprint that it changed.
    pub(crate) fn write_in_place(&self, rel: &str, offset: u64, byte: u8) {
        let (path, reference) = (self.own_file(rel), self.pristine(rel));
        let inode = fs::metadata(&path).expect("stat").ino();
        let mut file = OpenOptions::new().write(true).open(&path).expect("open for writing");
        file.seek(SeekFrom::Start(offset)).expect("seek");
        file.write_all(&[byte]).expect("write");
        drop(file);
        touch_like(&reference, &path);
        assert_eq!(fs::metadata(&path).expect("stat").ino(), inode, "same inode");
    }

    /// Writes a changed copy of the file beside the toolchain, gives it the original's mode and
    /// mtime, and renames it over the file (a new inode, as `rustup update` does).
    fn write_by_replacing(&self, rel: &str, offset: u64, byte: u8) {
        let (path, reference) = (self.own_file(rel), self.pristine(rel));
        let mut bytes = fs::read(&path).expect("read");
        bytes[offset as usize] = byte;
        let replacement = self.dir.path().join("replacement");
        fs::write(&replacement, bytes).expect("write replacement");
        fs::set_permissions(&replacement, fs::metadata(&path).expect("stat").permissions()).expect("chmod");
        touch_like(&reference, &replacement);
        fs::rename(&replacement, &path).expect("rename over");
    }

    /// The copy's file at `rel`, after checking it cannot be the installed toolchain's.
    fn own_file(&self, rel: &str) -> PathBuf {
        let path = self.root.join(rel);
        let (mine, theirs) = (fs::metadata(&path).expect("stat"), fs::metadata(installed().sysroot.join(rel)));
        assert!(fs::canonicalize(&path).expect("canonical").starts_with(&self.root), "{rel} leaves the copy");
        assert_eq!(mine.nlink(), 1, "{rel} is hard-linked");
        assert!(theirs.is_ok_and(|t| (t.dev(), t.ino()) != (mine.dev(), mine.ino())), "{rel} is not a copy");
        path
    }

    /// A copy of the file as it was first seen, kept outside the toolchain (for `touch -r`).
    fn pristine(&self, rel: &str) -> PathBuf {
        let pristine = self.dir.path().join("pristine").join(rel);
        if !pristine.exists() {
            fs::create_dir_all(pristine.parent().expect("parent")).expect("mkdir");
            ok(Command::new("cp").arg("-p").arg(self.root.join(rel)).arg(&pristine).output().expect("cp runs"));
        }
        pristine
    }
}

/// A toolchain linked into the real rustup under a unique name, unlinked on drop (also when the
/// test panics); for a linked toolchain `rustup toolchain uninstall` removes only the link.
struct RustupLink {
    name: String,
}

impl RustupLink {
    fn new(root: &Path) -> RustupLink {
        let name = format!("ferry-test-{}-{}", std::process::id(), now_nanos());
        let out = Command::new("rustup").args(["toolchain", "link", &name]).arg(root).output().expect("rustup runs");
        let link = RustupLink { name };
        ok(out);
        link
    }
}

impl Drop for RustupLink {
    fn drop(&mut self) {
        let _ = Command::new("rustup").args(["toolchain", "uninstall", &self.name]).output();
    }
}

/// The `rustc` that `which` finds, asserted to be a rustup proxy.
fn rustup_proxy() -> PathBuf {
    let path = PathBuf::from(ok(Command::new("which").arg("rustc").output().expect("which runs")).trim());
    let real = fs::canonicalize(&path).expect("canonical proxy");
    assert!(real.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rustup")), "{}", path.display());
    path
}

/// `<dir>/rust-toolchain.toml` with `selection` (`channel = ...` or `path = ...`), and an empty
/// `<dir>/src`.
fn write_toolchain_file(dir: &Path, selection: &str) {
    fs::create_dir_all(dir.join("src")).expect("mkdir");
    fs::write(dir.join("rust-toolchain.toml"), format!("[toolchain]\n{selection}\n")).expect("write");
}

fn cp_a(sources: &[PathBuf], into: &Path) {
    ok(Command::new("cp").arg("-a").args(sources).arg(into).output().expect("cp runs"));
}

fn touch_like(reference: &Path, path: &Path) {
    ok(Command::new("touch").arg("-r").arg(reference).arg(path).output().expect("touch runs"));
    let (want, got) = (fs::metadata(reference).expect("stat"), fs::metadata(path).expect("stat"));
    assert_eq!((got.len(), got.mtime(), got.mtime_nsec()), (want.len(), want.mtime(), want.mtime_nsec()));
}

// ---- helpers: crafted archives -----------------------------------------------------------------

/// One tar entry written byte for byte as given: the `tar` builder itself refuses some bad paths.
struct Raw {
    path: String,
    kind: tar::EntryType,
    link: Option<String>,
    data: Vec<u8>,
}

fn raw(path: &str, kind: tar::EntryType, link: Option<&str>) -> Raw {
    Raw { path: path.into(), kind, link: link.map(Into::into), data: Vec::new() }
}

fn raw_file(path: &str, data: &[u8]) -> Raw {
    Raw { data: data.to_vec(), ..raw(path, tar::EntryType::Regular, None) }
}

fn raw_symlink(path: &str, target: &str) -> Raw {
    raw(path, tar::EntryType::Symlink, Some(target))
}

fn file(path: &str, data: &[u8]) -> ManifestEntry {
    let (size, digest) = (data.len() as u64, *blake3::hash(data).as_bytes());
    ManifestEntry { path: path.into(), kind: ManifestKind::File { executable: false, size, digest } }
}

fn symlink(path: &str, target: &str) -> ManifestEntry {
    ManifestEntry { path: path.into(), kind: ManifestKind::Symlink { target: target.into() } }
}

/// A gzip'd tar: the manifest first, then `entries`.
fn craft(manifest: &Manifest, entries: &[Raw]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for entry in std::iter::once(&raw_file(ARCHIVE_MANIFEST_PATH, manifest.to_text().as_bytes())).chain(entries) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry.kind);
        header.set_mode(0o644);
        header.set_size(entry.data.len() as u64);
        header.set_mtime(0);
        let old = header.as_old_mut();
        old.name[..entry.path.len()].copy_from_slice(entry.path.as_bytes());
        if let Some(link) = &entry.link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        tar.append(&header, entry.data.as_slice()).expect("append entry");
    }
    tar.into_inner().expect("finish tar").finish().expect("finish gzip")
}

/// Unpacks a crafted archive whose manifest is `manifest` (expecting its id) and returns the error.
fn refused(manifest: &[ManifestEntry], entries: &[Raw]) -> Error {
    refused_with(manifest, entries, &UnpackLimits::default(), None)
}

/// Like [`refused`] with explicit limits and expected id; also checks the refusal left nothing
/// behind: no destination and no temp dir beside it.
fn refused_with(
    manifest: &[ManifestEntry],
    entries: &[Raw],
    limits: &UnpackLimits,
    expected: Option<ToolchainId>,
) -> Error {
    let manifest = Manifest { entries: manifest.to_vec() };
    let expected = expected.unwrap_or_else(|| manifest.id());
    let parent = tempfile::Builder::new().prefix("ferry-unpack-").tempdir().expect("temp dir");
    let result = unpack_archive(craft(&manifest, entries).as_slice(), &parent.path().join("tc"), &expected, limits);
    let left: Vec<_> = fs::read_dir(parent.path()).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
    let err = result.expect_err("the archive was unpacked");
    assert!(left.is_empty(), "refused ({err}) but left {left:?}");
    err
}

/// The error is a refusal of `entry` (named in the message) whose reason contains `reason`.
fn assert_refused(err: &Error, entry: &str, reason: &str) {
    assert!(
        matches!(err, Error::UnsafeEntry { entry: e, reason: r } if e == entry && r.contains(reason)),
        "expected entry '{entry}' refused ({reason}), got: {err:?}"
    );
    assert!(err.to_string().contains(&format!("'{entry}'")), "{err}");
}

/// The unpacked tree holds exactly the manifest's entries, each with its content, mode and target.
fn assert_tree_is(root: &Path, manifest: &Manifest) {
    let found: BTreeSet<String> =
        walk(root).iter().map(|p| utf8(p.strip_prefix(root).expect("under root")).to_owned()).collect();
    let listed: BTreeSet<String> = manifest.entries.iter().map(|e| e.path.clone()).collect();
    assert_eq!(found, listed);
    for entry in &manifest.entries {
        let path = root.join(&entry.path);
        match &entry.kind {
            ManifestKind::File { executable, size, digest } => {
                let meta = fs::symlink_metadata(&path).expect("stat");
                assert!(meta.is_file(), "{}", entry.path);
                assert_eq!((meta.len(), meta.mode() & 0o111 != 0), (*size, *executable), "{}", entry.path);
                assert_eq!(file_blake3(&path), blake3::Hash::from_bytes(*digest), "{}", entry.path);
            }
            ManifestKind::Symlink { target } => {
                assert_eq!(fs::read_link(&path).expect("a symlink"), Path::new(target), "{}", entry.path);
            }
        }
    }
}

// ---- helpers: files ----------------------------------------------------------------------------

/// Every non-directory under `dir` (symlinks not followed), sorted; empty when `dir` is missing.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return out };
    for entry in entries {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out.sort();
    out
}

fn file_blake3(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path).expect("open")).expect("read");
    hasher.finalize()
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()
}
