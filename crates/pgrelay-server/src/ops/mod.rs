//! The operations plane: the admin API (list, disconnect, forget and
//! notify clients; client migrations), the Prometheus metrics, and the
//! checks of `pgrelay doctor`.

pub(crate) mod admin;
pub mod doctor;
pub(crate) mod exposition;
pub(crate) mod metrics;
pub(crate) mod migrations;
