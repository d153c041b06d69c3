//! The driver: runs the engines against a block device.
//!
//! The engines ([`crate::spm::Spm`], [`crate::host::Host`]) say which
//! records to read and write; this module does those reads and writes on
//! a [`BlockDevice`] the way the mailbox needs them done, so that the
//! `spmbox` daemons, the benchmark, the simulation and array firmware all
//! drive the mailbox with the same code:
//!
//! - [`SpmDriver`]: the SPM's reads (doorbell, SPM header, host areas in
//!   chunks, an outbox area only where its inbox holds a request), its
//!   *mirror* of the outbox areas (it is their only writer, so what it
//!   last read or wrote is what they hold: replies are written without
//!   reading first, and nearby dirty sectors go out in one write), the
//!   fencing read before writes and commits, and the retry of a read or
//!   write that failed.
//! - [`HostDriver`]: the host's inbox area written whole from its mirror
//!   (it is the area's only writer), the doorbell written only after the
//!   area it announces is on disk, and the reads the engine asks for.
//!
//! Neither allocates: the caller hands each driver one byte buffer
//! ([`SpmDriver::buffer_len`], [`HostDriver::BUFFER_LEN`]), aligned as its
//! device needs for direct I/O (the driver passes the device only
//! sub-slices that start at multiples of the sector size). Neither reads
//! a clock: every step takes `now`.
//!
//! The order of writes durability needs (docs/protocol.md, "The driver"):
//! - host: the inbox area before the doorbell that announces it;
//! - SPM: the SPM header read back naming this SPM before every commit of
//!   the backend ([`SpmDriver::poll_commit`]), the commit durable before
//!   any reply of its batch is written ([`crate::spm::Spm::poll_write`]
//!   holds them), and the SPM header read again before any write after a
//!   stall ([`crate::spm::Spm::handle_timeout`]).
//!
//! An I/O error leaves nothing half-done in the driver's state: a read
//! that failed is done again first at the next step, records taken from
//! the engine but not yet written stay staged (newer records for the same
//! place replace them), and every sector is written whole from what the
//! driver holds, so writing again after a partial write repairs it.

mod host;
mod spm;

pub use host::HostDriver;
pub use spm::{MERGE_GAP, OUTBOX_GAP, SpmDriver, newest_outbox_epoch};

/// A block device holding the mailbox: reads and writes of whole sectors
/// at byte offsets.
///
/// `embedded-io`'s `Read`/`Write`/`Seek` describe a stream with a cursor;
/// the mailbox needs positioned reads and writes of whole sectors (a
/// `pread`/`pwrite`, a SCSI READ/WRITE of an LBA range, a flash page
/// read), so this trait is its own, and takes its error type from
/// `embedded-io` ([`embedded_io::ErrorType`]), whose
/// [`embedded_io::Error::kind`] tells a caller whether retrying can help.
///
/// The driver only passes offsets and lengths that are multiples of
/// [`BlockDevice::sector_size`], and buffers that start at such a multiple
/// within the buffer the caller handed the driver.
pub trait BlockDevice: embedded_io::ErrorType {
    /// The device's logical sector size in bytes (512 or 4096); the
    /// mailbox's geometry must use the same.
    fn sector_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes `buf` at `offset`. A write may be torn at sector boundaries
    /// by a crash (each sector lands whole or not at all).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error>;
    /// Makes every write done so far durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        (**self).flush()
    }
}

/// What a driver did on its device: calls and bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IoStats {
    /// Read calls.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write calls.
    pub writes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

/// A device with its statistics.
#[derive(Debug)]
struct Counted<D> {
    device: D,
    stats: IoStats,
}

impl<D: BlockDevice> Counted<D> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D::Error> {
        self.stats.reads = self.stats.reads.wrapping_add(1);
        self.stats.read_bytes = self.stats.read_bytes.wrapping_add(buf.len() as u64);
        self.device.read_at(offset, buf)
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), D::Error> {
        self.stats.writes = self.stats.writes.wrapping_add(1);
        self.stats.written_bytes = self.stats.written_bytes.wrapping_add(buf.len() as u64);
        self.device.write_at(offset, buf)
    }
}

/// Why a driver cannot be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum DriverError {
    /// The buffer is shorter than the driver needs (see
    /// [`SpmDriver::buffer_len`], [`HostDriver::BUFFER_LEN`]).
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The device's sector size is not the mailbox's.
    SectorSize {
        /// The device's.
        device: u32,
        /// The mailbox geometry's.
        mailbox: u32,
    },
}

impl core::fmt::Display for DriverError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DriverError::BufferTooSmall { needed } => {
                write!(
                    f,
                    "the driver's buffer is too small: it needs {needed} bytes"
                )
            }
            DriverError::SectorSize { device, mailbox } => write!(
                f,
                "the device has {device}-byte sectors but the mailbox was formatted for {mailbox}"
            ),
        }
    }
}

impl core::error::Error for DriverError {}

/// Why a read before an engine starts failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum StartError<E> {
    /// The buffer or the device does not fit the mailbox.
    Driver(DriverError),
    /// The device failed.
    Io(E),
}

impl<E: core::fmt::Display> core::fmt::Display for StartError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::Driver(e) => e.fmt(f),
            StartError::Io(e) => write!(f, "cannot read the mailbox: {e}"),
        }
    }
}

impl<E: core::fmt::Debug + core::fmt::Display> core::error::Error for StartError<E> {}

/// The next `len` bytes of a buffer being divided, from `*at` on.
fn carve(at: &mut usize, len: usize) -> core::ops::Range<usize> {
    let r = *at..*at + len;
    *at += len;
    r
}

#[cfg(test)]
mod tests;
