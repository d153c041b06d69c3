//! spmbox: the Linux shell around `spmbox-core`.
//!
//! The core knows the formats and the protocol, and its drivers decide
//! every I/O step; this crate opens block devices and files with O_DIRECT,
//! runs the daemons and serves the commands of the `spmbox` binary.
//! `main.rs` only parses arguments. The parts, from the disk up (see
//! docs/architecture.md):
//!
//! - [`io`]: the device, the mailbox on it, volume maps;
//! - [`backend`]: where volumes get their space (the builtin pool, lvm2);
//! - [`daemon`]: the SPM and host daemons, leases, guests, metrics;
//! - [`vm`]: real VMs on the volumes (qemu, QMP, NBD);
//! - [`cli`]: the commands, their output and logging;
//! - [`bench`](mod@bench): the measurements of docs/performance.md;
//! - [`units`] and [`stats`]: small helpers every part uses.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod daemon;
pub mod io;
pub mod stats;
pub mod units;
pub mod vm;

/// The JSON form of on-disk records is public: the test vectors check it.
pub use cli::json;
