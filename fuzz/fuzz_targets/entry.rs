//! A cache entry from any tier (a shared tier's server may be hostile): decoded, checked as a
//! stream, its seal checked, and a compile result's payload decoded.
#![no_main]

use ferry_cache::{CacheKey, CompileOutput, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = CacheKey(data.get(..32).and_then(|k| k.try_into().ok()).unwrap_or([0; 32]));
    let _ = Entry::decode(data, &key);
    let _ = Entry::check(data, &key);
    let _ = ferry_cache::check_stream(data, data.len() as u64, &key);
    let _ = ferry_cache::unseal(data, &[9; 32]);
    let _ = CompileOutput::decode(data);
});
