//! Everything about a C, C++, Objective-C or assembler compile (gcc, clang and their drivers) that
//! decides its cache keys: which calls are cached ([`classify`]), what they write
//! ([`CcArgs::outputs`], [`is_extra_output`]), and the pre-key ([`pre_key`]).
//!
//! The rest of the recipe is the one rustc's compiles use ([`crate::rustc::recipe`]): what the
//! compile was observed reading — the driver, `cc1`/`cc1plus`, `as`, every shared library they
//! load, plugins, specs, every header by content, every include-path probe that found nothing,
//! the variables they looked up — is its manifest, and a hit needs all of it unchanged. That is
//! ccache's direct mode (no preprocessor run on a hit) with the header list observed instead of
//! taken from the compiler's dependency output, so nothing the compiler looked at can be missed.
//!
//! Only a single-source compile (`-c`, one source, an output file) is cached; anything else
//! (linking, `-E`, `-S`, several sources, stdin, a response file, an option not known here) runs
//! the compiler unchanged, with the reason counted. Unknown options are never guessed at.

use std::ffi::OsString;
use std::path::Path;

use crate::key::KeyBuilder;
use crate::rustc::recipe::Bases;

/// What the wrapper does with one C-family compiler call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Cacheable(Box<CcArgs>),
    /// Run the real compiler unchanged; the reason is counted in `ferry stats`.
    Passthrough(String),
}

/// The language of a compile, for `ferry stats` (the driver decides it; the key holds the
/// arguments and source that make it decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    C,
    Cxx,
    ObjC,
    Asm,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::C => "c",
            Language::Cxx => "c++",
            Language::ObjC => "objective-c",
            Language::Asm => "assembler",
        }
    }
}

/// A parsed, cacheable compiler command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcArgs {
    /// The arguments as given, to run the compiler with; the key holds them all, in order.
    pub args: Vec<String>,
    /// The one source file, as given.
    pub source: String,
    /// The object file, as given by `-o`, or the driver's default (the source's name with `.o`, in
    /// the current directory).
    pub object: String,
    /// A dependency file named with `-MF`. (One written at the driver's default place, with
    /// `-MD`/`-MMD` alone, is found among what the compile wrote: [`is_extra_output`].)
    pub dep_file: Option<String>,
    pub language: Language,
    /// `-march=native`, `-mtune=native` or `-mcpu=native`: the code depends on this machine's CPU.
    pub native_cpu: bool,
    /// An option that decides diagnostics' colour is given (else the wrapper decides: see
    /// [`colour_argument`]).
    pub colour_given: bool,
}

impl CcArgs {
    /// The outputs known before compiling: the object and an `-MF` file (none executable).
    pub fn outputs(&self) -> Vec<(String, bool)> {
        let mut out = vec![(self.object.clone(), false)];
        if let Some(d) = &self.dep_file {
            out.push((d.clone(), false));
        }
        out.sort();
        out
    }

    /// A name for logs and `ferry explain`: the source file.
    pub fn name(&self) -> &str {
        &self.source
    }
}

/// Suffixes of files a compile writes beside its object on request, under names its driver
/// decides: dependency files at the default place (`-MD`), split debug info (`-gsplit-dwarf`),
/// coverage notes (`--coverage`), stack usage (`-fstack-usage`), call graphs (`-fcallgraph-info`).
pub const EXTRA_SUFFIXES: &[&str] = &["d", "dwo", "gcno", "su", "ci"];

/// Whether `path`, written by the compile, is one of its extra outputs: in the object's directory
/// or the current directory, named after the object or the source (the drivers differ) with a
/// suffix of [`EXTRA_SUFFIXES`]. Anything else it leaves behind is a side effect, and the result is
/// not stored. Paths are as the compile named them, relative to the current directory `cwd`.
pub fn is_extra_output(args: &CcArgs, cwd: &Path, path: &Path) -> bool {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else { return false };
    if !EXTRA_SUFFIXES.contains(&ext) {
        return false;
    }
    let object = cwd.join(&args.object);
    let stems = [Path::new(&args.object).file_stem(), Path::new(&args.source).file_stem()];
    let dirs = [object.parent(), Some(cwd)];
    let path = cwd.join(path);
    dirs.iter().flatten().any(|d| path.parent() == Some(*d))
        && stems.iter().flatten().any(|s| path.file_stem() == Some(*s))
}

/// The compiler names a masquerade directory holds (`ferry setup`), each linked when a compiler
/// of that name is installed.
pub const COMPILER_NAMES: [&str; 6] = ["cc", "c++", "gcc", "g++", "clang", "clang++"];

/// Is this program (by its file name) a C-family compiler driver? `cc`, `c++`, `gcc`, `g++`,
/// `clang`, `clang++`, with a target prefix (`aarch64-linux-gnu-gcc`) or a version suffix
/// (`gcc-14`, `clang++-19`).
pub fn is_c_compiler(program: &Path) -> bool {
    let Some(name) = program.file_name().and_then(|n| n.to_str()) else { return false };
    // Without a version suffix: `gcc-14` → `gcc`, `clang-19` → `clang`.
    let name = match name.rsplit_once('-') {
        Some((head, version)) if !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.') => head,
        _ => name,
    };
    let base = name.rsplit('-').next().unwrap_or(name);
    matches!(base, "cc" | "c++" | "gcc" | "g++" | "clang" | "clang++")
}

/// Source suffixes and the language each one is.
const SOURCES: &[(&str, Language)] = &[
    ("c", Language::C),
    ("i", Language::C),
    ("cc", Language::Cxx),
    ("cp", Language::Cxx),
    ("cxx", Language::Cxx),
    ("cpp", Language::Cxx),
    ("CPP", Language::Cxx),
    ("c++", Language::Cxx),
    ("C", Language::Cxx),
    ("ii", Language::Cxx),
    ("m", Language::ObjC),
    ("mm", Language::ObjC),
    ("M", Language::ObjC),
    ("s", Language::Asm),
    ("S", Language::Asm),
    ("sx", Language::Asm),
];

/// Options followed by a separate value (also accepted joined, `-Ipath`, where the driver accepts
/// that). All are keyed as given; the files they name are observed when read.
const VALUED: &[&str] = &[
    "-o",
    "-I",
    "-D",
    "-U",
    "-x",
    "-MF",
    "-MT",
    "-MQ",
    "-include",
    "-imacros",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-isysroot",
    "--sysroot",
    "-imultilib",
    "-target",
    "-arch",
    "--param",
    "-Xclang",
    "-Xpreprocessor",
    "-Xassembler",
    "-mllvm",
    "-B",
    "-L",
    "-l",
    "-gcc-toolchain",
];

/// Options without a value, or joined with theirs, known not to change what is written where.
const KNOWN_PREFIXES: &[&str] = &[
    "-f",
    "-m",
    "-W",
    "-O",
    "-g",
    "-std=",
    "--std=",
    "-D",
    "-U",
    "-I",
    "-L",
    "-l",
    "-B",
    "-w",
    "-pedantic",
    "-ansi",
    "-pipe",
    "-pthread",
    "-nostdinc",
    "-nostdlib",
    "-p",
    "--coverage",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-include",
    "-imacros",
    "--sysroot=",
    "-isysroot",
    "--target=",
    "--param=",
    "-MP",
    "-MG",
    "-integrated-as",
    "-no-integrated-as",
    "-specs=",
    "-static",
    "-shared",
    "-rdynamic",
    "-Xclang",
    "-undef",
    "-trigraphs",
    "-traditional",
    "-C",
    "-P",
    "-H",
    "-Q",
    "-x",
    "-MF",
    "-MT",
    "-MQ",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-imultilib",
    "-march=",
    "-mtune=",
    "-mcpu=",
];

/// Options (exactly, or as a prefix) that always pass through, with the reason counted.
const PASSTHROUGH: &[(&str, &str)] = &[
    ("-E", "preprocess-only"),
    ("-S", "assembly-output"),
    ("-fsyntax-only", "syntax-only"),
    ("-M", "dependencies-only"),
    ("-MM", "dependencies-only"),
    ("-###", "query"),
    ("-v", "query"),
    ("--version", "query"),
    ("--help", "query"),
    ("-dumpversion", "query"),
    ("-dumpmachine", "query"),
    ("-dumpfullversion", "query"),
    ("-dumpspecs", "query"),
    ("-print-", "query"),
    ("--print-", "query"),
    ("-save-temps", "save-temps"),
    ("-fdump-", "dump-files"),
    ("-aux-info", "side-files"),
    ("-ftime-report", "timing"),
];

/// Classifies a C-family compiler's arguments (the program itself not included).
pub fn classify(raw: &[OsString]) -> Classified {
    let pass = |why: &str| Classified::Passthrough(why.to_owned());
    let mut args = Vec::with_capacity(raw.len());
    for a in raw {
        match a.to_str() {
            Some(s) => args.push(s.to_owned()),
            None => return pass("non-utf8-argument"),
        }
    }
    let (mut compile, mut output, mut dep_file, mut sources) = (false, None, None, Vec::new());
    let (mut language, mut native_cpu, mut colour_given, mut deps) = (None, false, false, false);
    let mut unknown = false;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg == "-" {
            return pass("stdin");
        }
        if arg.starts_with('@') {
            return pass("response-file");
        }
        if !arg.starts_with('-') {
            sources.push(arg.to_owned());
            continue;
        }
        if let Some((_, why)) = PASSTHROUGH.iter().find(|(p, _)| {
            arg == *p
                || (p.ends_with('-') && arg.starts_with(p))
                || (arg.starts_with(p) && arg[p.len()..].starts_with('='))
        }) {
            return pass(why);
        }
        if arg == "-c" {
            compile = true;
            continue;
        }
        if matches!(arg, "-MD" | "-MMD") {
            deps = true;
            continue;
        }
        if arg.ends_with("=native") && ["-march=", "-mtune=", "-mcpu="].iter().any(|p| arg.starts_with(p)) {
            native_cpu = true;
        }
        if arg.contains("diagnostics-color") || arg.contains("color-diagnostics") {
            colour_given = true;
        }
        if VALUED.contains(&arg) {
            let Some(value) = args.get(i) else { return pass("missing-value") };
            i += 1;
            match arg {
                "-o" => output = Some(value.clone()),
                "-MF" => dep_file = Some(value.clone()),
                "-x" => language = Some(value.clone()),
                _ => {}
            }
            continue;
        }
        if let Some(value) = arg.strip_prefix("-o") {
            output = Some(value.to_owned());
            continue;
        }
        if let Some(value) = arg.strip_prefix("-MF") {
            dep_file = Some(value.to_owned());
            continue;
        }
        if let Some(value) = arg.strip_prefix("-x") {
            language = Some(value.to_owned());
            continue;
        }
        // Judged once the whole line is read: a link (no `-c`) passes through as a link.
        unknown |= !KNOWN_PREFIXES.iter().any(|p| arg.starts_with(p));
    }
    if !compile {
        return pass(if sources.is_empty() { "no-input" } else { "not-compile-only" });
    }
    if unknown {
        return pass("unknown-option");
    }
    let source = match sources.as_slice() {
        [one] => one.clone(),
        [] => return pass("no-input"),
        _ => return pass("several-sources"),
    };
    let by_suffix = Path::new(&source)
        .extension()
        .and_then(|e| e.to_str())
        .and_then(|e| SOURCES.iter().find(|(s, _)| *s == e).map(|(_, l)| *l));
    let language = match language.as_deref() {
        None => match by_suffix {
            Some(l) => l,
            None => return pass("not-a-source"),
        },
        Some("c" | "c-header" | "cpp-output") => Language::C,
        Some("c++" | "c++-header" | "c++-cpp-output") => Language::Cxx,
        Some("objective-c" | "objective-c++" | "objective-c-header" | "objective-c++-header") => Language::ObjC,
        Some("assembler" | "assembler-with-cpp") => Language::Asm,
        Some(_) => return pass("unknown-language"),
    };
    let object = match output {
        Some(o) if o == "-" => return pass("output-to-stdout"),
        Some(o) if o.is_empty() => return pass("missing-value"),
        Some(o) => o,
        None => {
            let stem = Path::new(&source).file_stem().and_then(|s| s.to_str()).unwrap_or("a");
            format!("{stem}.o")
        }
    };
    if dep_file.is_some() && !deps {
        // `-MF` without `-MD`/`-MMD` belongs to `-M`, which passed through above.
        dep_file = None;
    }
    Classified::Cacheable(Box::new(CcArgs { args, source, object, dep_file, language, native_cpu, colour_given }))
}

/// The argument that gives a compile the diagnostics' colour it would have had writing to this
/// wrapper's stderr: a compile that runs with its stderr in a pipe (as a wrapped one does) prints
/// no colour, so when the wrapper's stderr is a terminal it asks for colour explicitly, and the
/// argument is keyed like any other.
pub fn colour_argument(args: &CcArgs, stderr_is_terminal: bool) -> Option<&'static str> {
    (stderr_is_terminal && !args.colour_given).then_some("-fdiagnostics-color=always")
}

/// What a C pre-key covers; the caller gathers it.
#[derive(Debug)]
pub struct PreKeyParts<'a> {
    /// The driver as named (`gcc`, `/usr/bin/clang-19`) and the blake3 of the file it runs, hex.
    pub driver: &'a str,
    pub driver_digest: &'a str,
    pub cwd: &'a str,
    pub args: &'a CcArgs,
    /// An argument the wrapper adds (see [`colour_argument`]).
    pub added: Option<&'a str>,
    /// What `-march=native` and the like mean on this machine, when given.
    pub native_cpu: Option<&'a str>,
}

/// The pre-key of a C-family compile: the driver by content, the current directory (debug info
/// names it; rebased with [`Bases`], and kept verbatim when an output holds it: see
/// [`crate::rustc::recipe::mark_verbatim`]), every argument in order, what `native` means here.
/// Everything else the compile depends on is in its manifest.
pub fn pre_key(parts: PreKeyParts<'_>, bases: &Bases) -> KeyBuilder {
    let mut k = KeyBuilder::new("cc-compile");
    bases.mark(&mut k);
    k.field("driver", parts.driver);
    k.field("driver content", parts.driver_digest);
    k.field("cwd", bases.rebase(parts.cwd));
    for (i, arg) in parts.args.args.iter().enumerate() {
        k.field(&format!("arg{i}"), bases.rebase(arg));
    }
    if let Some(added) = parts.added {
        k.field("added", added);
    }
    if let Some(native) = parts.native_cpu {
        k.field("native cpu", native);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_str(args: &[&str]) -> Classified {
        classify(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    fn cacheable(args: &[&str]) -> CcArgs {
        match classify_str(args) {
            Classified::Cacheable(a) => *a,
            Classified::Passthrough(why) => panic!("{args:?} passed through: {why}"),
        }
    }

    fn reason(args: &[&str]) -> String {
        match classify_str(args) {
            Classified::Passthrough(why) => why,
            Classified::Cacheable(a) => panic!("{args:?} is cacheable: {a:?}"),
        }
    }

    #[test]
    fn a_single_source_compile_is_cached_with_its_outputs() {
        let a = cacheable(&[
            "-O2", "-Wall", "-I", "inc", "-DX=1", "-c", "src/a.c", "-o", "out/a.o", "-MD", "-MF", "out/a.d",
        ]);
        assert_eq!(
            (a.source.as_str(), a.object.as_str(), a.dep_file.as_deref()),
            ("src/a.c", "out/a.o", Some("out/a.d"))
        );
        assert_eq!(a.outputs(), [("out/a.d".to_owned(), false), ("out/a.o".to_owned(), false)]);
        assert_eq!(a.language, Language::C);
        let b = cacheable(&["-c", "dir/x.cpp"]);
        assert_eq!((b.object.as_str(), b.language), ("x.o", Language::Cxx));
        let c = cacheable(&["-x", "c", "-c", "weird.txt", "-ofoo.o"]);
        assert_eq!((c.object.as_str(), c.language), ("foo.o", Language::C));
        assert!(cacheable(&["-march=native", "-c", "a.c"]).native_cpu);
        assert!(cacheable(&["-fdiagnostics-color=never", "-c", "a.S"]).colour_given);
    }

    #[test]
    fn everything_else_passes_through_with_a_reason() {
        assert_eq!(reason(&["a.o", "b.o", "-o", "app"]), "not-compile-only");
        assert_eq!(reason(&["-E", "a.c"]), "preprocess-only");
        assert_eq!(reason(&["-c", "a.c", "b.c"]), "several-sources");
        assert_eq!(reason(&["-c", "-"]), "stdin");
        assert_eq!(reason(&["-c", "a.c", "-o", "-"]), "output-to-stdout");
        assert_eq!(reason(&["@args.rsp"]), "response-file");
        assert_eq!(reason(&["-c", "a.c", "--frobnicate"]), "unknown-option");
        assert_eq!(reason(&["-m64", "a.o", "-nodefaultlibs", "-o", "app"]), "not-compile-only");
        assert_eq!(reason(&["-M", "a.c"]), "dependencies-only");
        assert_eq!(reason(&["-print-prog-name=cc1"]), "query");
        assert_eq!(reason(&["-c", "a.c", "-save-temps=obj"]), "save-temps");
        assert_eq!(reason(&["-c", "a.o"]), "not-a-source");
        assert_eq!(reason(&["-c", "a.c", "-o"]), "missing-value");
        assert_eq!(reason(&[]), "no-input");
    }

    #[test]
    fn compiler_names_are_recognised_with_prefixes_and_versions() {
        for yes in
            ["cc", "c++", "gcc", "g++", "clang", "clang++", "/usr/bin/gcc-14", "aarch64-linux-gnu-gcc", "clang++-19"]
        {
            assert!(is_c_compiler(Path::new(yes)), "{yes}");
        }
        for no in ["rustc", "ferry", "ld", "gcc-ar", "ccache", "x86_64-linux-gnu-gcc-ar-12", "clang-tidy"] {
            assert!(!is_c_compiler(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn extra_outputs_are_named_after_the_object_or_source_beside_it() {
        let a = cacheable(&["-c", "src/a.c", "-o", "out/a.o", "-MD", "-gsplit-dwarf"]);
        let cwd = Path::new("/w");
        assert!(is_extra_output(&a, cwd, Path::new("out/a.d")));
        assert!(is_extra_output(&a, cwd, Path::new("/w/out/a.dwo")));
        assert!(is_extra_output(&a, cwd, Path::new("a.gcno")));
        assert!(!is_extra_output(&a, cwd, Path::new("out/b.d")));
        assert!(!is_extra_output(&a, cwd, Path::new("src/a.d")));
        assert!(!is_extra_output(&a, cwd, Path::new("out/a.txt")));
    }
}
