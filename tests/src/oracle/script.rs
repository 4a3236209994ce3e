//! A sequence as a bash script anyone can run (`FERRY=target/release/ferry bash found.sh`): the
//! workspace, each step, and each build done plainly and through ferry and compared as the
//! oracle compares them. It exits 1 with `FAIL: ...` at the first difference, 0 with `OK`.

use std::fmt::Write;

use super::generate::{Mount, Sequence, Step};

const PRELUDE: &str = r#"set -u
FERRY=${FERRY:?set FERRY to the ferry binary to check}
W=${1:-$(mktemp -d)}; umount -l "$W/cache" 2>/dev/null; rm -rf "$W"; mkdir -p "$W"; chmod 755 "$W"
P=$W/a/ws; O=$W/b/elsewhere/checkout
BASE_PATH=$PATH; BASE_HOME=$HOME
BASE_CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}; BASE_RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
mkdir -p "$W"/home-a "$W"/home-b "$W"/tmp-a "$W"/tmp-b "$W"/bin-a "$W"/cargo-home-b "$W"/targets/plain "$W"/targets/ferry "$W"/sides/plain "$W"/sides/ferry "$W"/cache "$P"
: > "$W/ferry.toml"
[ "$(id -u)" = 0 ] && mount -t tmpfs -o size=2g ferry-oracle "$W/cache" && MOUNTED=1 || MOUNTED=0
declare -A V=(); BASEDIRS=0; TOOLCHAIN=; ROOM=; CACHE_FAILURES=__CACHE_FAILURES__; VERIFY=__VERIFY__; CLUSTER=__CLUSTER__
if [ "$CLUSTER" = 1 ]; then
  BIN=$(dirname "$FERRY"); mkdir -p "$W/daemons"
  "$BIN/ferry-scheduler" --listen 127.0.0.1:0 --data-dir "$W/daemons/scheduler" > "$W/daemons/s.out" 2> "$W/daemons/s.log" & SPID=$!
  for _ in $(seq 100); do grep -q "listening on" "$W/daemons/s.out" 2>/dev/null && break; sleep 0.1; done
  SCHEDULER=http://$(sed -n 's/^listening on //p' "$W/daemons/s.out")
  "$BIN/ferry-worker" --scheduler "$SCHEDULER" --listen 127.0.0.1:0 --slots 2 --data-dir "$W/daemons/worker" > /dev/null 2> "$W/daemons/w.log" & WPID=$!
  trap 'kill $SPID $WPID 2>/dev/null' EXIT
  FERRY_SCHEDULER=$SCHEDULER FERRY_CACHE_DIR="$W/cache" "$FERRY" toolchain upload > /dev/null; sleep 5
fi
vars() { # checkout
  ARGS=(PATH="$BASE_PATH" HOME="$BASE_HOME" CARGO_HOME="$BASE_CARGO_HOME" RUSTUP_HOME="$BASE_RUSTUP_HOME" CARGO_INCREMENTAL=0)
  [ "$BASEDIRS" = 1 ] && ARGS+=(RUSTFLAGS="--remap-path-prefix=$1=/checkout")
  [ -n "$TOOLCHAIN" ] && ARGS+=(RUSTUP_TOOLCHAIN="$TOOLCHAIN")
  for k in "${!V[@]}"; do ARGS+=("$k=${V[$k]}"); done
  if [ -n "$ROOM" ]; then
    local left=$(( $(getconf ARG_MAX) - 4096 - ROOM - 2048 )) i=0 n
    while [ $left -gt 64 ]; do n=$(( left < 100000 ? left : 100000 )); ARGS+=("ORACLE_FILL_$i=$(head -c $((n - 30)) /dev/zero | tr '\0' x)"); left=$((left - n)); i=$((i + 1)); done
  fi
}
links() { # plain|ferry: compiler links first in PATH, ferry's or the compilers' own, one name
  local a n c path=
  if [ "$(cat "$W/cc-bin/.side" 2>/dev/null)" != "$1" ]; then
    rm -rf "$W/cc-bin"
    if [ "$1" = ferry ]; then "$FERRY" setup --dir "$W/cc-bin" > /dev/null
    else mkdir -p "$W/cc-bin"; for n in __COMPILERS__; do
      c=$(PATH=$BASE_PATH command -v $n) && ln -s "$c" "$W/cc-bin/$n"; done; fi
    printf %s "$1" > "$W/cc-bin/.side"
  fi
  for a in "${ARGS[@]}"; do case $a in PATH=*) path=${a#PATH=} ;; esac; done
  [ -n "$path" ] && ARGS+=(PATH="$W/cc-bin:$path")
}
ferry_vars() { # checkout
  ARGS+=(RUSTC_WRAPPER="$FERRY" FERRY_CACHE_DIR="$W/cache" FERRY_CONFIG="$W/ferry.toml" FERRY_LOG=info)
  [ "$BASEDIRS" = 1 ] && ARGS+=(FERRY_BASEDIRS="$1")
  [ "$CACHE_FAILURES" = 1 ] && ARGS+=(FERRY_CACHE_FAILURES=1)
  [ "$VERIFY" = 1 ] && ARGS+=(FERRY_VERIFY=1)
  [ "$CLUSTER" = 1 ] && ARGS+=(FERRY_SCHEDULER="$SCHEDULER")
}
build() { # plain|ferry
  local side=$1; rm -rf "$P/target" "$P/side"; mv "$W/targets/$side" "$P/target"; mv "$W/sides/$side" "$P/side"
  vars "$P"; [ "$side" = ferry ] && ferry_vars "$P"
  links "$side"
  (cd "$P" && env -i "${ARGS[@]}" cargo build --offline --message-format=json) > "$W/$side.out" 2> "$W/$side.err"
  echo $? > "$W/$side.status"
  [ "$side" = ferry ] && FERRY_CACHE_DIR="$W/cache" "$FERRY" stats > /dev/null 2>&1
  mv "$P/side" "$W/sides/$side" 2>/dev/null || mkdir -p "$W/sides/$side"
  mv "$P/target" "$W/targets/$side"
}
twin() {
  rm -rf "$W/twin"; cp -a "$P" "$W/twin"; rm -rf "$W/twin/target"
  vars "$W/twin"; ferry_vars "$W/twin"; links ferry
  (cd "$W/twin" && env -i "${ARGS[@]}" CARGO_TARGET_DIR="$W/twin/target" cargo build --offline) > /dev/null 2>&1
}
diagnostics() {
  python3 -c 'import json,sys
out=[]
for l in sys.stdin:
  try: v=json.loads(l)
  except Exception: continue
  if v.get("reason")=="compiler-message": out.append(v["message"].get("rendered") or "")
print("\n".join(sorted(out)))' < "$1"
}
compare() { # step number
  local x=( -r --exclude=.fingerprint --exclude=incremental --exclude=.cargo-lock --exclude=invoked.timestamp )
  [ "$(cat "$W/plain.status")" = "$(cat "$W/ferry.status")" ] || { echo "FAIL: step $1: the plain build exited $(cat "$W/plain.status"), the ferry build $(cat "$W/ferry.status")"; exit 1; }
  [ "$(diagnostics "$W/plain.out")" = "$(diagnostics "$W/ferry.out")" ] || { echo "FAIL: step $1: the diagnostics differ"; exit 1; }
  diff -r "$W/sides/plain" "$W/sides/ferry" > /dev/null 2>&1 || { echo "FAIL: step $1: the files written beside the workspace differ"; exit 1; }
  diff "${x[@]}" -q "$W/targets/plain/debug" "$W/targets/ferry/debug" > "$W/diff" || { echo "FAIL: step $1: $(head -1 "$W/diff")"; exit 1; }
  if [ "$(cat "$W/plain.status")" = 0 ]; then
    [ "$(env -i "$W/targets/plain/debug/app")" = "$(env -i "$W/targets/ferry/debug/app")" ] || { echo "FAIL: step $1: the program prints other things"; exit 1; }
  fi
}
"#;

/// The script for a sequence's setup and `steps` (a prefix or a shrunk subset of its steps).
pub fn render(seq: &Sequence, steps: &[Step], header: &str) -> String {
    let mut s = String::from("#!/usr/bin/env bash\n");
    for line in header.lines() {
        let _ = writeln!(s, "# {line}");
    }
    let flag = |b: bool| if b { "1" } else { "0" };
    let prelude = PRELUDE
        .replace("__CACHE_FAILURES__", flag(seq.cache_failures))
        .replace("__VERIFY__", flag(seq.verify))
        .replace("__CLUSTER__", flag(seq.cluster))
        .replace("__COMPILERS__", &ferry_cache::cc::COMPILER_NAMES.join(" "));
    s.push_str(&prelude);
    let mut builds = 0;
    for step in seq.setup.iter().chain(steps) {
        s.push_str(&line(step, &mut builds));
    }
    s.push_str("[ \"$MOUNTED\" = 1 ] && mount -o remount,rw,exec \"$W/cache\"\n");
    s.push_str("m=$(FERRY_CACHE_DIR=\"$W/cache\" \"$FERRY\" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get(\"verify_mismatches\", 0))')\n");
    s.push_str("mkdir -p \"$W/kept\"; cp -a \"$W/cache/verify\" \"$W/kept/\" 2>/dev/null\n");
    s.push_str("[ \"$MOUNTED\" = 1 ] && umount -l \"$W/cache\"\n");
    s.push_str("[ \"$m\" = 0 ] || { echo \"FAIL: verification reported $m mismatch(es); see: FERRY_CACHE_DIR=$W/kept $FERRY explain --mismatches\"; exit 1; }\necho OK\n");
    s
}

fn line(step: &Step, builds: &mut usize) -> String {
    match step {
        Step::Write { path, content, keep_mtime } => {
            let p = path_of(path);
            let write = format!("mkdir -p \"$(dirname {p})\"; rm -f {p}; printf '%s' {} > {p}", quote(content));
            if *keep_mtime {
                format!("touch -r {p} \"$W/.mtime\"; {write}; touch -r \"$W/.mtime\" {p}\n")
            } else {
                format!("{write}\n")
            }
        }
        Step::Chmod { path, executable } => {
            format!("chmod {} {}\n", if *executable { 755 } else { 644 }, path_of(path))
        }
        Step::Remove { path } => format!("rm -f {}\n", path_of(path)),
        Step::Link { path, target } => {
            let p = path_of(path);
            format!("mkdir -p \"$(dirname {p})\"; rm -f {p}; ln -s {} {p}\n", quote(target))
        }
        Step::Rename { from, to } => format!("mv {} {} 2>/dev/null\n", path_of(from), path_of(to)),
        Step::Touch { path } => format!("touch {}\n", path_of(path)),
        Step::Cc { source, output } => format!("cc -shared -fPIC -o {} {}\n", path_of(output), path_of(source)),
        Step::SetEnv { name, value: Some(v) } => format!("V[{name}]={}\n", value_of(v)),
        Step::SetEnv { name, value: None } => format!("unset 'V[{name}]'\n"),
        Step::Toolchain(t) => format!("TOOLCHAIN={}\n", t.as_deref().unwrap_or("")),
        Step::Clean => {
            "rm -rf \"$W/targets/plain\" \"$W/targets/ferry\"; mkdir -p \"$W/targets/plain\" \"$W/targets/ferry\"\n"
                .into()
        }
        Step::Relocate => "mkdir -p \"$(dirname \"$O\")\"; mv \"$P\" \"$O\"; T=$P; P=$O; O=$T; BASEDIRS=1\n".into(),
        Step::Mount(how) => {
            let opts = match how {
                Mount::Normal | Mount::Full => "remount,rw,exec",
                Mount::Noexec => "remount,rw,noexec",
                Mount::ReadOnly => "remount,ro,exec",
            };
            let mut l = String::from("if [ \"$MOUNTED\" = 1 ]; then ");
            if *how != Mount::ReadOnly {
                l.push_str("mount -o remount,rw \"$W/cache\"; rm -f \"$W/cache/.oracle-filler\"; ");
            }
            l.push_str(&format!("mount -o {opts} \"$W/cache\"; "));
            if *how == Mount::Full {
                l.push_str("dd if=/dev/zero of=\"$W/cache/.oracle-filler\" bs=1M 2>/dev/null; ");
            }
            l.push_str("fi\n");
            l
        }
        Step::ExecLimit(room) => format!("ROOM={}\n", room.map(|r| r.to_string()).unwrap_or_default()),
        Step::EditDuringBuild { path, content, delay_ms } => format!(
            "( sleep {}.{:03}; printf '%s' {} > {} ) & build ferry; wait\n",
            delay_ms / 1000,
            delay_ms % 1000,
            quote(content),
            path_of(path)
        ),
        Step::Build { twice } => {
            *builds += 1;
            let ferry = if *twice { "twin & build ferry; wait" } else { "build ferry" };
            format!("build plain; {ferry}; compare {}\n", builds)
        }
    }
}

fn path_of(p: &str) -> String {
    if p.starts_with('/') { quote(p) } else { format!("\"$P\"/{}", quote(p)) }
}

fn value_of(v: &str) -> String {
    let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`");
    let text = q(v).replace("{work}", "$W").replace("{path}", "$BASE_PATH").replace("{cargo_home}", "$BASE_CARGO_HOME");
    format!("\"{text}\"")
}

/// Bash's `$'...'` quoting: any text, byte for byte.
fn quote(text: &str) -> String {
    let mut out = String::from("$'");
    for b in text.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('\'');
    out
}
