//! The `pgrelay` subcommands, one module each (`pgrelay bench` lives in
//! `crate::bench`, behind the `bench` feature).

pub mod admin;
pub mod capture;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod doctor;
pub mod eventlog_host;
pub mod migrate;
pub mod serve;
pub mod tls;
pub mod verify;
pub mod web_demo;
