//! Records the target triple ferry is built for, so the toolchain crate can guess a rustc's host
//! without running it.
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=FERRY_BUILD_TARGET={target}");
}
