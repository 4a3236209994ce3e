//! A dep-info file rustc wrote (a worker's, sent back as an output).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferry_cache::rustc::depinfo::parse(text);
        let _ = ferry_cache::rustc::depinfo::env_values(text);
    }
});
