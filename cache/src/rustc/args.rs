//! Classifying a rustc command line: cacheable (with everything the key and the outputs need), or
//! pass-through with a reason. Flags we do not know are never guessed at: they pass through.

use std::ffi::OsString;

/// What the wrapper does with one rustc call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Cacheable(Box<RustcArgs>),
    /// Run the real compiler unchanged; the reason is counted in `ferry stats`.
    Passthrough(String),
}

/// A parsed, cacheable rustc command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RustcArgs {
    /// The arguments as given (minus a leading `+toolchain`), to run rustc with.
    pub args: Vec<String>,
    /// Canonical `flag=value` form of every argument, in order: the key's view of the command line.
    pub normalized: Vec<String>,
    pub input: String,
    pub crate_name: String,
    pub crate_types: Vec<String>,
    /// `(kind, explicit path)`; `link` when `--emit` is absent.
    pub emit: Vec<(String, Option<String>)>,
    pub out_dir: Option<String>,
    pub output: Option<String>,
    pub extra_filename: String,
    pub target: Option<String>,
    /// `--extern name=path` files (path-less externs such as `proc_macro` are skipped).
    pub externs: Vec<(String, String)>,
    /// `-L [kind=]path`
    pub search_paths: Vec<(String, String)>,
    /// Names from `-l [kind[:modifiers]=]name[:rename]`, with their kind.
    pub libs: Vec<(String, String)>,
    /// `-C linker=...`
    pub linker: Option<String>,
    /// `--json=...` values, e.g. `artifacts`.
    pub json: Vec<String>,
    /// `-C target-cpu=native` is given: the code depends on this machine's CPU.
    pub native_cpu: bool,
    /// `--remap-path-prefix FROM=TO` pairs.
    pub remaps: Vec<(String, String)>,
}

/// Flags that take a value (as `--flag value`, `--flag=value`, or for short ones `-Xvalue`).
const VALUED: &[&str] = &[
    "--crate-name",
    "--edition",
    "--error-format",
    "--json",
    "--crate-type",
    "--emit",
    "--out-dir",
    "--extern",
    "--cap-lints",
    "--target",
    "--cfg",
    "--check-cfg",
    "--diagnostic-width",
    "--color",
    "--remap-path-prefix",
    "--codegen",
    "--force-warn",
    "--allow",
    "--warn",
    "--deny",
    "--forbid",
    "-o",
    "-L",
    "-l",
    "-C",
    "-A",
    "-W",
    "-D",
    "-F",
];

/// Flags without a value that do not change what is read or written.
const SWITCHES: &[&str] = &["--test", "-O", "-g", "--verbose", "-v"];

/// Flags that always pass through, with the reason counted.
const PASSTHROUGH: &[(&str, &str)] = &[
    ("--print", "query"),
    ("--explain", "query"),
    ("-V", "query"),
    ("-vV", "query"),
    ("--version", "query"),
    ("-h", "query"),
    ("--help", "query"),
    ("--sysroot", "sysroot"),
    ("-Z", "unstable-flag"),
];

/// `-C` options whose effects we cannot capture (files outside the outputs, or non-determinism).
const CODEGEN_PASSTHROUGH: &[(&str, &str)] = &[
    ("incremental", "incremental"),
    ("save-temps", "save-temps"),
    ("profile-generate", "profile-guided"),
    ("profile-use", "profile-guided"),
    ("split-debuginfo", "split-debuginfo"),
];

pub fn classify(raw: &[OsString]) -> Classified {
    let mut args = Vec::with_capacity(raw.len());
    for a in raw {
        match a.to_str() {
            Some(s) => args.push(s.to_owned()),
            None => return Classified::Passthrough("non-utf8-argument".into()),
        }
    }
    match parse(args) {
        Ok(parsed) => Classified::Cacheable(Box::new(parsed)),
        Err(reason) => Classified::Passthrough(reason),
    }
}

fn parse(args: Vec<String>) -> Result<RustcArgs, String> {
    let mut r = RustcArgs::default();
    let mut inputs = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg.starts_with('@') {
            return Err("response-file".into());
        }
        if arg == "-" {
            return Err("stdin-input".into());
        }
        if !arg.starts_with('-') {
            inputs.push(arg.to_owned());
            r.normalized.push(arg.to_owned());
            continue;
        }
        if let Some((_, reason)) = PASSTHROUGH.iter().find(|(flag, _)| matches_flag(arg, flag)) {
            return Err((*reason).into());
        }
        if SWITCHES.contains(&arg) {
            if arg == "--test" {
                r.crate_types.push("bin".into());
            }
            r.normalized.push(arg.to_owned());
            continue;
        }
        let Some((flag, value)) = split_valued(arg, &args, &mut i)? else {
            return Err("unknown-flag".into());
        };
        let flag = if flag == "--codegen" { "-C" } else { flag };
        r.normalized.push(format!("{flag}={value}"));
        match flag {
            "--crate-name" => r.crate_name = value,
            // `lib` is rustc's default library kind, which is rlib.
            "--crate-type" => {
                r.crate_types.extend(value.split(',').map(|t| if t == "lib" { "rlib" } else { t }.to_owned()))
            }
            "--emit" => {
                for kind in value.split(',') {
                    let (k, p) = match kind.split_once('=') {
                        Some((k, p)) => (k, Some(p.to_owned())),
                        None => (kind, None),
                    };
                    if !matches!(k, "link" | "metadata" | "dep-info" | "obj" | "asm" | "llvm-ir" | "llvm-bc" | "mir") {
                        return Err("unknown-emit".into());
                    }
                    r.emit.push((k.to_owned(), p));
                }
            }
            "--out-dir" => r.out_dir = Some(value),
            "-o" => r.output = Some(value),
            "--target" => {
                if value.ends_with(".json") || value.contains('/') {
                    return Err("custom-target".into());
                }
                r.target = Some(value);
            }
            "--extern" => {
                if let Some((name, path)) = value.split_once('=') {
                    let name = name.rsplit(':').next().unwrap_or(name);
                    r.externs.push((name.to_owned(), path.to_owned()));
                }
            }
            "-L" => {
                let (kind, path) = value.split_once('=').unwrap_or(("all", &value));
                r.search_paths.push((kind.to_owned(), path.to_owned()));
            }
            "-l" => {
                let (kind, name) = value.split_once('=').unwrap_or(("dylib", &value));
                let kind = kind.split(':').next().unwrap_or(kind);
                let name = name.split(':').next().unwrap_or(name);
                r.libs.push((kind.to_owned(), name.to_owned()));
            }
            "-C" => {
                let (key, val) = value.split_once('=').unwrap_or((&value, ""));
                if let Some((_, reason)) = CODEGEN_PASSTHROUGH.iter().find(|(k, _)| *k == key)
                    && !(key == "split-debuginfo" && val == "off")
                {
                    return Err((*reason).into());
                }
                match key {
                    "extra-filename" => r.extra_filename = val.to_owned(),
                    "linker" => r.linker = Some(val.to_owned()),
                    "target-cpu" if val == "native" => r.native_cpu = true,
                    _ => {}
                }
            }
            "--json" => r.json.extend(value.split(',').map(str::to_owned)),
            "--remap-path-prefix" => {
                if let Some((from, to)) = value.split_once('=') {
                    r.remaps.push((from.to_owned(), to.to_owned()));
                }
            }
            _ => {}
        }
    }
    match inputs.len() {
        0 => return Err("no-input".into()),
        1 => r.input = inputs.pop().expect("one input"),
        _ => return Err("multiple-inputs".into()),
    }
    if r.crate_name.is_empty() {
        return Err("no-crate-name".into());
    }
    if r.crate_types.is_empty() {
        return Err("no-crate-type".into());
    }
    r.crate_types.sort();
    r.crate_types.dedup();
    if r.emit.is_empty() {
        r.emit.push(("link".into(), None));
    }
    if r.output.is_some() && (r.emit.len() > 1 || r.crate_types.len() > 1) {
        return Err("output-with-several-outputs".into());
    }
    r.args = args;
    Ok(r)
}

/// `--flag` exactly, `--flag=...`, or for a short flag `-Xsomething`.
fn matches_flag(arg: &str, flag: &str) -> bool {
    arg == flag
        || arg
            .strip_prefix(flag)
            .is_some_and(|rest| rest.starts_with('=') || (!flag.starts_with("--") && flag.len() == 2))
}

/// Splits a valued flag into (flag, value), consuming the next argument when needed.
fn split_valued<'a>(arg: &'a str, args: &[String], i: &mut usize) -> Result<Option<(&'a str, String)>, String> {
    for flag in VALUED {
        if arg == *flag {
            let value = args.get(*i).ok_or_else(|| "missing-flag-value".to_string())?.clone();
            *i += 1;
            return Ok(Some((flag, value)));
        }
        if let Some(rest) = arg.strip_prefix(flag) {
            if let Some(v) = rest.strip_prefix('=') {
                return Ok(Some((flag, v.to_owned())));
            }
            if flag.len() == 2 && !rest.is_empty() {
                return Ok(Some((flag, rest.to_owned())));
            }
        }
    }
    Ok(None)
}

/// Arguments that cannot change an output and so are not keyed: the terminal width cargo passes
/// when it runs on a terminal (it only wraps rendered diagnostics).
const UNKEYED: &[&str] = &["--diagnostic-width="];

impl RustcArgs {
    /// The arguments as the key sees them: [`RustcArgs::normalized`] without those that cannot
    /// change an output (`--diagnostic-width`).
    pub fn keyed(&self) -> Vec<&str> {
        self.normalized.iter().map(String::as_str).filter(|a| !UNKEYED.iter().any(|u| a.starts_with(u))).collect()
    }

    /// The `FROM` sides of `--remap-path-prefix`: paths under them never reach an output as-is.
    pub fn remapped_prefixes(&self) -> Vec<&str> {
        self.remaps.iter().map(|(from, _)| from.as_str()).collect()
    }

    /// The crate-search directories (`-L`, any kind), as given.
    pub fn search_dirs(&self) -> impl Iterator<Item = &str> {
        self.search_paths.iter().map(|(_, dir)| dir.as_str())
    }

    /// The arguments with every output moved into `dir` under its own file name (`--out-dir`,
    /// `-o` and `--emit` paths rewritten), for a second compile beside the first one (ferry's
    /// verification of a hit); [`RustcArgs::outputs`] of the result are `dir/<file name>`.
    pub fn with_outputs_in(&self, dir: &str) -> Vec<String> {
        let moved = |p: &str| {
            let name = std::path::Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned());
            format!("{dir}/{}", name.unwrap_or_default())
        };
        let emit = |v: &str| {
            v.split(',')
                .map(|k| match k.split_once('=') {
                    Some((kind, path)) => format!("{kind}={}", moved(path)),
                    None => k.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut out = Vec::with_capacity(self.args.len());
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--out-dir" => {
                    out.push(a.clone());
                    if it.next().is_some() {
                        out.push(dir.to_owned());
                    }
                }
                "-o" => {
                    out.push(a.clone());
                    if let Some(v) = it.next() {
                        out.push(moved(v));
                    }
                }
                "--emit" => {
                    out.push(a.clone());
                    if let Some(v) = it.next() {
                        out.push(emit(v));
                    }
                }
                _ if a.starts_with("--out-dir=") => out.push(format!("--out-dir={dir}")),
                _ if a.starts_with("--emit=") => out.push(format!("--emit={}", emit(&a["--emit=".len()..]))),
                _ if a.starts_with("-o=") => out.push(format!("-o={}", moved(&a[3..]))),
                _ if a.starts_with("-o") && a.len() > 2 => out.push(format!("-o{}", moved(&a[2..]))),
                _ => out.push(a.clone()),
            }
        }
        out
    }

    /// True when producing this crate runs the linker (so the linker is part of the key).
    pub fn links(&self) -> bool {
        self.emit.iter().any(|(k, _)| k == "link")
            && self.crate_types.iter().any(|t| matches!(t.as_str(), "bin" | "dylib" | "cdylib" | "proc-macro"))
    }

    /// Is dep-info among the outputs cargo asked for?
    pub fn dep_info_path(&self) -> Option<String> {
        self.emit
            .iter()
            .find(|(k, _)| k == "dep-info")
            .map(|(_, p)| p.clone().unwrap_or_else(|| self.default_path("dep-info", "")))
    }

    /// Every file rustc will write for this call, as rustc names them (relative to the cwd or
    /// absolute). Only Linux file naming is known; other targets that link pass through earlier.
    pub fn outputs(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for (kind, path) in &self.emit {
            if let Some(p) = path {
                out.push((p.clone(), false));
                continue;
            }
            if kind == "link" {
                for t in &self.crate_types {
                    // The linker makes programs and shared objects executable (rustc's own mode).
                    let executable = matches!(t.as_str(), "bin" | "dylib" | "cdylib" | "proc-macro");
                    out.push((self.default_path(kind, t), executable));
                }
            } else {
                out.push((self.default_path(kind, ""), false));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn default_path(&self, kind: &str, crate_type: &str) -> String {
        if let Some(o) = &self.output {
            return o.clone();
        }
        let stem = format!("{}{}", self.crate_name, self.extra_filename);
        let name = match (kind, crate_type) {
            ("link", "rlib") => format!("lib{stem}.rlib"),
            ("link", "bin") => stem,
            ("link", "staticlib") => format!("lib{stem}.a"),
            ("link", _) => format!("lib{stem}.so"),
            ("metadata", _) => format!("lib{stem}.rmeta"),
            ("dep-info", _) => format!("{stem}.d"),
            ("obj", _) => format!("{stem}.o"),
            ("asm", _) => format!("{stem}.s"),
            ("llvm-ir", _) => format!("{stem}.ll"),
            ("llvm-bc", _) => format!("{stem}.bc"),
            _ => format!("{stem}.mir"),
        };
        match &self.out_dir {
            Some(dir) => format!("{}/{name}", dir.trim_end_matches('/')),
            None => name,
        }
    }
}

#[cfg(test)]
mod moved_outputs {
    use super::*;

    #[test]
    fn every_output_moves_into_the_directory_under_its_own_name() {
        let parse = |line: &str| match classify(&line.split_whitespace().map(OsString::from).collect::<Vec<_>>()) {
            Classified::Cacheable(r) => r,
            Classified::Passthrough(why) => panic!("{why}"),
        };
        let r = parse(
            "--crate-name a --crate-type lib --emit=dep-info,metadata,link -C extra-filename=-1 --out-dir /t/deps src/lib.rs",
        );
        let moved = parse(&r.with_outputs_in("/v").join(" "));
        let names = |r: &RustcArgs| r.outputs().into_iter().map(|(p, _)| p).collect::<Vec<_>>();
        assert_eq!(names(&moved), ["/v/a-1.d", "/v/liba-1.rlib", "/v/liba-1.rmeta"]);
        assert_eq!(names(&r), ["/t/deps/a-1.d", "/t/deps/liba-1.rlib", "/t/deps/liba-1.rmeta"]);
        let r = parse("--crate-name b --crate-type bin --emit link=out/b,dep-info=out/b.d src/main.rs");
        let expected =
            ["--crate-name", "b", "--crate-type", "bin", "--emit", "link=/v/b,dep-info=/v/b.d", "src/main.rs"];
        assert_eq!(r.with_outputs_in("/v"), expected);
        let r = parse("--crate-name c --crate-type bin -o out/c src/main.rs");
        assert_eq!(r.with_outputs_in("/v"), ["--crate-name", "c", "--crate-type", "bin", "-o", "/v/c", "src/main.rs"]);
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(cmdline: &str, expect: Expect) {
        let args: Vec<OsString> = cmdline.split_whitespace().map(OsString::from).collect();
        let actual = match classify(&args) {
            Classified::Passthrough(reason) => format!("passthrough: {reason}"),
            Classified::Cacheable(r) => {
                let outputs: Vec<String> =
                    r.outputs().into_iter().map(|(p, x)| if x { format!("{p} (x)") } else { p }).collect();
                format!(
                    "cacheable {} {:?} links={} externs={:?} libs={:?}\noutputs: {}\nkey: {}",
                    r.crate_name,
                    r.crate_types,
                    r.links(),
                    r.externs,
                    r.libs,
                    outputs.join(" "),
                    r.normalized.join(" ")
                )
            }
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn cargo_lib() {
        check(
            "--crate-name foo --edition=2021 src/lib.rs --error-format=json --json=diagnostic-rendered-ansi,artifacts \
             --crate-type lib --emit=dep-info,metadata,link -C embed-bitcode=no -C debuginfo=2 \
             -C metadata=ab -C extra-filename=-ab --out-dir /t/deps -L dependency=/t/deps \
             --extern bar=/t/deps/libbar-1.rmeta --cap-lints allow",
            expect![[r#"
                cacheable foo ["rlib"] links=false externs=[("bar", "/t/deps/libbar-1.rmeta")] libs=[]
                outputs: /t/deps/foo-ab.d /t/deps/libfoo-ab.rlib /t/deps/libfoo-ab.rmeta
                key: --crate-name=foo --edition=2021 src/lib.rs --error-format=json --json=diagnostic-rendered-ansi,artifacts --crate-type=lib --emit=dep-info,metadata,link -C=embed-bitcode=no -C=debuginfo=2 -C=metadata=ab -C=extra-filename=-ab --out-dir=/t/deps -L=dependency=/t/deps --extern=bar=/t/deps/libbar-1.rmeta --cap-lints=allow"#]],
        );
    }

    #[test]
    fn bins_proc_macros_and_native_libs() {
        check(
            "--crate-name app src/main.rs --crate-type bin --emit=dep-info,link -Clinker=clang \
             --out-dir out -lstatic=z -l dylib=ssl:+verbatim -Lnative=/usr/lib",
            expect![[r#"
                cacheable app ["bin"] links=true externs=[] libs=[("static", "z"), ("dylib", "ssl")]
                outputs: out/app (x) out/app.d
                key: --crate-name=app src/main.rs --crate-type=bin --emit=dep-info,link -C=linker=clang --out-dir=out -l=static=z -l=dylib=ssl:+verbatim -L=native=/usr/lib"#]],
        );
        check(
            "--crate-name m m.rs --crate-type proc-macro --extern proc_macro -o out/libm.so",
            expect![[r#"
                cacheable m ["proc-macro"] links=true externs=[] libs=[]
                outputs: out/libm.so (x)
                key: --crate-name=m m.rs --crate-type=proc-macro --extern=proc_macro -o=out/libm.so"#]],
        );
    }

    #[test]
    fn long_lint_flags_as_cargo_passes_them() {
        check(
            "--crate-name regex_syntax --edition=2021 src/lib.rs --allow=unexpected_cfgs --cap-lints allow \
             --crate-type lib --emit=dep-info,metadata,link --warn missing_docs --deny=warnings --out-dir /t",
            expect![[r#"
                cacheable regex_syntax ["rlib"] links=false externs=[] libs=[]
                outputs: /t/libregex_syntax.rlib /t/libregex_syntax.rmeta /t/regex_syntax.d
                key: --crate-name=regex_syntax --edition=2021 src/lib.rs --allow=unexpected_cfgs --cap-lints=allow --crate-type=lib --emit=dep-info,metadata,link --warn=missing_docs --deny=warnings --out-dir=/t"#]],
        );
    }

    #[test]
    fn pass_through_reasons() {
        check("-vV", expect!["passthrough: query"]);
        check("- --crate-name ___ --print=file-names --crate-type bin", expect!["passthrough: stdin-input"]);
        check("--crate-name a a.rs --crate-type lib --print cfg", expect!["passthrough: query"]);
        check("--crate-name a a.rs --crate-type lib -C incremental=/i", expect!["passthrough: incremental"]);
        check("--crate-name a a.rs --crate-type lib -Cincremental=/i", expect!["passthrough: incremental"]);
        check("--crate-name a a.rs --crate-type lib -Zunpretty=x", expect!["passthrough: unstable-flag"]);
        check("--crate-name a a.rs --crate-type lib --frobnicate", expect!["passthrough: unknown-flag"]);
        check("--crate-name a a.rs b.rs --crate-type lib", expect!["passthrough: multiple-inputs"]);
        check("--crate-name a a.rs", expect!["passthrough: no-crate-type"]);
        check("a.rs --crate-type lib", expect!["passthrough: no-crate-name"]);
        check("@args.txt", expect!["passthrough: response-file"]);
        check("--crate-name a a.rs --crate-type lib --target my.json", expect!["passthrough: custom-target"]);
        check("--crate-name a a.rs --crate-type lib --emit=link,weird", expect!["passthrough: unknown-emit"]);
        check("--crate-name a a.rs --crate-type lib --out-dir", expect!["passthrough: missing-flag-value"]);
        check(
            "--crate-name a a.rs --crate-type lib -C split-debuginfo=packed",
            expect!["passthrough: split-debuginfo"],
        );
    }
}
