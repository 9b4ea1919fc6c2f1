//! The operations plane: the admin API (list, disconnect, forget and
//! notify clients) and the Prometheus metrics.

pub(crate) mod admin;
pub(crate) mod metrics;
