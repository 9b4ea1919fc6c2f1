//! The `pgrelay` command's parts, also used by its integration tests.

#[cfg(feature = "bench")]
pub mod bench;
pub mod cmd;
