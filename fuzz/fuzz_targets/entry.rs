//! A cache entry from any tier (a shared tier's server may be hostile): decoded, checked as a
//! stream, its signature checked (against a trusted key, and against none), and a compile
//! result's payload decoded.
#![no_main]

use ferry_cache::{CacheKey, CompileOutput, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = CacheKey(data.get(..32).and_then(|k| k.try_into().ok()).unwrap_or([0; 32]));
    let _ = Entry::decode(data, &key);
    let _ = Entry::check(data, &key);
    let _ = ferry_cache::check_stream(data, data.len() as u64, &key);
    let _ = ferry_cache::verify(data, &ferry_cache::Trust::default());
    let writer = ferry_cache::WriterKey([9; 32]);
    let _ = ferry_cache::verify(data, &ferry_cache::Trust { trusted: [writer].into(), revoked: Default::default() });
    let _ = CompileOutput::decode(data);
});
