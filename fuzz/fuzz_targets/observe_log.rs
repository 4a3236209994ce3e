//! An observation log: on a worker it is written by the job inside its sandbox.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_observe::parse(data);
});
