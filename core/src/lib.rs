//! spmbox-core: the storage mailbox's on-disk formats and engines.
//!
//! Hosts that run virtual machines on thin logical volumes ask the Storage
//! Pool Manager (SPM) to extend those volumes through a *mailbox*: a small
//! region of the shared block device in which every host owns one 4 KiB area
//! to write requests to (the inbox) and one area the SPM writes replies to
//! (the outbox). Hosts and the SPM share nothing but that storage.
//!
//! This crate is the part of spmbox that runs anywhere, including the
//! firmware of a storage array that acts as the SPM:
//!
//! - `#![no_std]`, no allocator, `#![forbid(unsafe_code)]`;
//! - no I/O, no clock, no threads: callers hand in bytes and get back bytes;
//! - no panics on any input: every parser returns a value that says what the
//!   bytes are (empty, valid, or defective and why), and the parsers are
//!   fuzzed.
//!
//! # Modules
//!
//! - [`wire`]: every on-disk record (superblock, SPM header, doorbell, host
//!   area headers, request and reply slots), the mailbox geometry, and scans
//!   of whole host areas. The byte-level specification is `docs/format.md`;
//!   this module and that document say the same thing.
//! - [`spm`]: the SPM engine and its bounded, fair request queue.
//! - [`host`]: the host engine: watermark, requests, replies, pause and
//!   resume, recovery after a restart.
//! - [`pool`]: the reference thin pool (LUNs, extents, thin volumes, parked
//!   requests, crash-safe metadata), the builtin backend and firmware's.
//! - [`driver`]: runs the engines against a block device: the mirrors,
//!   merged and ordered writes, the doorbell, fencing and commit reads.
//! - [`time`]: the caller-supplied clock the engines run on.
//! - `testing` (feature `testing`): an in-memory block device with
//!   injected faults, for tests, the simulation and the fuzzers.
//!
//! The engines are sans-I/O state machines: inputs are `handle_*(.., now)`,
//! outputs `poll_*()`; `docs/protocol.md` describes their behaviour.
//!
//! # Logging
//!
//! With the `log` feature the crate logs through the `log` facade (hosts);
//! with the `defmt` feature through `defmt` (firmware); with neither it logs
//! nothing and costs nothing. Enabling both is a compile error.
//!
//! # Checksums
//!
//! Every record carries a CRC-32C. By default it is computed byte-wise from
//! a 1 KiB table, which suits firmware. The `fast-crc` feature switches to
//! slice-by-16 (a 16 KiB table), several times faster for a host polling
//! its outbox or an SPM scanning 2000 hosts; the values are the same.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// Must come first: the logging macros are used by the modules below.
#[macro_use]
mod fmt;

pub mod driver;
pub mod host;
pub mod pool;
pub mod spm;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod wire;
