//! The daemons: `spmbox spm` and `spmbox host`, the sanlock leases that
//! guard them, the simulated guests a host runs, and their metrics.

pub mod guest;
pub mod host;
pub mod metrics;
pub mod sanlock;
pub mod spm;
