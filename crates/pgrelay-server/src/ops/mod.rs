//! The operations plane: the admin API (list, disconnect, forget and
//! notify clients), the Prometheus metrics, and the checks of `pgrelay
//! doctor`.

pub(crate) mod admin;
pub mod doctor;
pub(crate) mod exposition;
pub(crate) mod metrics;
