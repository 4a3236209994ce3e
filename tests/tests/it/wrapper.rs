//! The compiler wrapper end to end (being written).
