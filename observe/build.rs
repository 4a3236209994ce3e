//! Builds `interposer/lib.rs` into `libferry_observe.so` with the rustc cargo uses, for the
//! target being built, and hands its path and a content hash to the crate.
//!
//! The interposer is a `no_std` cdylib with no dependencies, so one rustc call builds it. Its
//! precompiled `core` refers to `rust_eh_personality` from unwinding tables; nothing here ever
//! unwinds (`panic=abort`), and the symbol must not be exported (it would replace rustc's own in
//! the processes it loads into), so it is defined as a local absolute symbol at link time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let so = out.join("libferry_observe.so");
    let status = Command::new(rustc)
        .args(["--edition", "2024", "--crate-type", "cdylib", "--crate-name", "ferry_observe"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "debuginfo=0", "-C", "strip=debuginfo"])
        .args(["-C", "link-arg=-Wl,--defsym=rust_eh_personality=0", "--target", &target])
        .arg("-o")
        .arg(&so)
        .arg("interposer/lib.rs")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for the interposer");
    assert!(status.success(), "building interposer/lib.rs failed");
    let bytes = std::fs::read(&so).expect("reading the interposer");
    // FNV-1a: names the installed copy; any change of the bytes gives another name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    println!("cargo:rustc-env=FERRY_INTERPOSER={}", so.display());
    println!("cargo:rustc-env=FERRY_INTERPOSER_HASH={h:016x}");
    println!("cargo:rerun-if-changed=interposer/lib.rs");
}
