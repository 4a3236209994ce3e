//! Generated projects: the demo's offline sample workspace, and the benchmark's dependency graph of
//! published crates.

use std::fs;
use std::path::Path;

/// A 9-crate workspace with no registry dependencies: a proc-macro, a build script writing into
/// `OUT_DIR`, a build script compiling C with the system's `cc` (as cc-rs does), `include_str!`,
/// `env!`, a chain of libraries and a binary.
pub fn write_workspace(root: &Path) -> anyhow::Result<()> {
    let file = |rel: &str, text: &str| -> anyhow::Result<()> {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent"))?;
        fs::write(path, text)?;
        Ok(())
    };
    file(
        "Cargo.toml",
        "[workspace]\nresolver = \"2\"\nmembers = [\"macros\", \"gen\", \"native\", \"text\", \"env\", \"l1\", \"l2\", \"l3\", \"app\"]\n",
    )?;
    let krate = |name: &str, deps: &[&str], extra: &str| {
        let mut toml =
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n{extra}\n[dependencies]\n");
        for d in deps {
            toml.push_str(&format!("{d} = {{ path = \"../{d}\" }}\n"));
        }
        file(&format!("{name}/Cargo.toml"), &toml)
    };
    krate("macros", &[], "[lib]\nproc-macro = true\n")?;
    file(
        "macros/src/lib.rs",
        "use proc_macro::TokenStream;\n#[proc_macro]\npub fn answer(_: TokenStream) -> TokenStream { \"42u64\".parse().unwrap() }\n",
    )?;
    krate("gen", &[], "build = \"build.rs\"\n")?;
    file(
        "gen/build.rs",
        "fn main() {\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
         std::fs::write(format!(\"{out}/gen.rs\"), \"pub fn generated() -> u64 { 7 }\").unwrap();\n}\n",
    )?;
    file("gen/src/lib.rs", "include!(concat!(env!(\"OUT_DIR\"), \"/gen.rs\"));\n")?;
    krate("native", &[], "build = \"build.rs\"\n")?;
    file(
        "native/build.rs",
        "use std::process::Command;\n\
         fn main() {\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
         println!(\"cargo:rerun-if-changed=native.c\");\n    \
         let cc = Command::new(\"cc\").args([\"-O2\", \"-fPIC\", \"-c\", \"native.c\", \"-o\"]).arg(format!(\"{out}/native.o\")).status().unwrap();\n    \
         assert!(cc.success());\n    \
         let ar = Command::new(\"ar\").arg(\"crs\").arg(format!(\"{out}/libnative.a\")).arg(format!(\"{out}/native.o\")).status().unwrap();\n    \
         assert!(ar.success());\n    \
         println!(\"cargo:rustc-link-search=native={out}\");\n    println!(\"cargo:rustc-link-lib=static=native\");\n}\n",
    )?;
    file("native/native.c", "unsigned long long native_value(void) { return 5; }\n")?;
    file(
        "native/src/lib.rs",
        "unsafe extern \"C\" { fn native_value() -> u64; }\npub fn value() -> u64 { unsafe { native_value() } }\n",
    )?;
    krate("text", &[], "")?;
    file("text/src/lib.rs", "pub const TEXT: &str = include_str!(\"text.txt\");\n")?;
    file("text/src/text.txt", "hello from include_str\n")?;
    krate("env", &[], "")?;
    file("env/src/lib.rs", "pub fn package() -> &'static str { env!(\"CARGO_PKG_NAME\") }\n")?;
    krate("l1", &["gen"], "")?;
    file("l1/src/lib.rs", "pub fn l1() -> u64 { gen::generated() + 1 }\n")?;
    krate("l2", &["l1", "macros"], "")?;
    file("l2/src/lib.rs", "pub fn l2() -> u64 { l1::l1() + macros::answer!() }\n")?;
    krate("l3", &["l2"], "")?;
    file("l3/src/lib.rs", "pub fn l3() -> u64 { l2::l2() * 2 }\n")?;
    krate("app", &["l3", "text", "env", "native"], "")?;
    file(
        "app/src/main.rs",
        "fn main() { println!(\"{} {} {} {}\", l3::l3(), text::TEXT.trim(), env::package(), native::value()); }\n",
    )?;
    Ok(())
}

/// A binary crate depending on published crates: several dozen packages with proc-macros (serde,
/// clap, thiserror, tracing derives) and build scripts (serde, libc, proc-macro2, anyhow, ...).
pub fn write_registry_project(root: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(root.join("src"))?;
    fs::write(
        root.join("Cargo.toml"),
        r#"[package]
name = "benchgraph"
version = "0.1.0"
edition = "2021"

[dependencies]
anyhow = "1"
clap = { version = "4", features = ["derive"] }
libc = "0.2"
log = "0.4"
rand = "0.8"
regex = "1"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
thiserror = "2"
tracing = "0.1"
tracing-subscriber = { version = "0.3", features = ["env-filter"] }
"#,
    )?;
    fs::write(
        root.join("src/main.rs"),
        r#"use clap::Parser;

#[derive(Parser, Debug, serde::Serialize)]
struct Args {
    #[arg(long, default_value_t = 3)]
    n: u32,
}

#[derive(thiserror::Error, Debug)]
#[error("bad input")]
struct Bad;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let re = regex::Regex::new(r"\d+")?;
    let x: u32 = rand::random::<u32>() % 10 + args.n;
    tracing::info!(x, "start");
    log::info!("pid {}", unsafe { libc::getpid() });
    println!("{} {}", serde_json::to_string(&args)?, re.is_match(&x.to_string()));
    if x > 1000 { return Err(Bad.into()); }
    Ok(())
}
"#,
    )?;
    Ok(())
}
