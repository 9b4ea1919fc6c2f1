//! The `pgrelay` command's parts, also used by its integration tests.

pub mod admin_cmd;
pub mod bench;
pub mod client_cmd;
pub mod demo;
pub mod serve_cmd;
pub mod store_cmd;
pub mod verify;
