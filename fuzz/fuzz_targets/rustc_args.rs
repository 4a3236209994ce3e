//! A rustc command line (cargo, or whatever runs the wrapper): NUL-separated arguments.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = data.split(|&b| b == 0).map(|a| OsString::from_vec(a.to_vec())).collect();
    if let ferry_cache::rustc::Classified::Cacheable(r) = ferry_cache::rustc::classify(&args) {
        let _ = r.outputs();
        let _ = r.dep_info_path();
    }
});
