//! spmbox: the Linux shell around `spmbox-core`.
//!
//! The core knows the formats and the protocol but does no I/O; this crate
//! opens block devices and files with O_DIRECT and runs the commands of the
//! `spmbox` binary. `main.rs` only parses arguments; the work lives in the
//! modules below, named for what they do.

pub mod admin;
pub mod backend;
pub mod bench;
pub mod commands;
pub mod demo;
pub mod device;
pub mod domain;
pub mod guest;
pub mod host_daemon;
pub mod inspect;
pub mod json;
pub mod logging;
pub mod lvm;
pub mod lvm_glue;
pub mod mailbox;
pub mod mapping;
pub mod metrics;
pub mod nbd;
pub mod qmp;
pub mod sanlock;
pub mod spm_daemon;
pub mod units;
pub mod vm;
pub mod vm_guest;
pub mod vm_image;
pub mod volume_export;
