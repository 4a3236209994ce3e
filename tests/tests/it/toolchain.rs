//! Toolchain identity end to end (being written).
