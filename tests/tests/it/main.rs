//! The one end-to-end test binary. Each module is one area; helpers live in `ferry_tests`.

mod c;
mod cluster;
mod exact;
mod inputs;
mod oracle;
mod packaging;
mod security;
mod toolchain;
mod wrapper;
