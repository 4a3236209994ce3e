//! What a Redis server answers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_cache::fuzzing::resp_reply(data));
