//! What a memcached server answers, and a head item it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_cache::fuzzing::memcached_reply(data));
