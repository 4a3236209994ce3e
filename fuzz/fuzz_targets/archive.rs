//! A toolchain archive from the network (an upload to the scheduler, a fetch by a worker).
#![no_main]

use ferry_toolchains::{ToolchainId, UnpackLimits, verify_archive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = UnpackLimits { max_file_bytes: 1 << 20, max_total_bytes: 4 << 20, max_entries: 1000 };
    let _ = verify_archive(data, &ToolchainId([7; 32]), &limits);
});
