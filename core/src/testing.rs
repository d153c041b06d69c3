//! Test support shared by the core's tests, the simulation and the
//! fuzzers (feature `testing`): an in-memory [`BlockDevice`] with
//! injected faults.
//!
//! [`MemDisk`] holds the bytes of a mailbox (and anything after it) in
//! whatever storage it is given (`Vec<u8>`, an array, a borrowed slice).
//! Each read and write asks its [`Faults`] what goes wrong, so a test can
//! script exact faults ([`Script`]) and a simulation can draw them from its
//! own random numbers. The device keeps the promise real disks keep and
//! no more: a sector lands whole or not at all.

use crate::driver::BlockDevice;

/// What happens to one write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum WriteFault {
    /// It lands.
    None,
    /// It fails with an error; nothing lands.
    Fail,
    /// Only its first `sectors` sectors land, and it reports success (a
    /// crash or a torn multi-sector write).
    Torn {
        /// Sectors that land.
        sectors: usize,
    },
    /// Nothing lands, and it reports success.
    Lost,
    /// It lands at `offset` instead, and reports success.
    Misdirected {
        /// Where it lands.
        offset: u64,
    },
    /// It lands with one bit flipped, and reports success.
    BitFlip {
        /// Which byte of the write.
        byte: usize,
        /// Which bit of it (0..8).
        bit: u8,
    },
}

/// Decides the faults of a [`MemDisk`].
pub trait Faults {
    /// The fate of a write of `len` bytes at `offset`.
    fn write(&mut self, offset: u64, len: usize) -> WriteFault {
        let _ = (offset, len);
        WriteFault::None
    }
    /// Whether a read of `len` bytes at `offset` fails.
    fn read_fails(&mut self, offset: u64, len: usize) -> bool {
        let _ = (offset, len);
        false
    }
}

/// No faults.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFaults;

impl Faults for NoFaults {}

/// Faults scripted by count: the next `fail_reads` reads and `fail_writes`
/// writes fail; `then` decides every other write.
#[derive(Clone, Copy, Debug)]
pub struct Script {
    /// Reads that fail, from the next on.
    pub fail_reads: u32,
    /// Writes that fail, from the next on.
    pub fail_writes: u32,
    /// What happens to the writes after those.
    pub then: WriteFault,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            fail_reads: 0,
            fail_writes: 0,
            then: WriteFault::None,
        }
    }
}

impl Faults for Script {
    fn write(&mut self, _offset: u64, _len: usize) -> WriteFault {
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return WriteFault::Fail;
        }
        self.then
    }
    fn read_fails(&mut self, _offset: u64, _len: usize) -> bool {
        if self.fail_reads > 0 {
            self.fail_reads -= 1;
            return true;
        }
        false
    }
}

/// The error of a [`MemDisk`]: an injected failure, or an access out of
/// range or not sector-aligned (a caller's bug).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum MemError {
    /// An injected fault.
    Injected,
    /// Not whole sectors, or past the end.
    OutOfRange,
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MemError::Injected => "injected I/O error",
            MemError::OutOfRange => "access out of range or not sector-aligned",
        })
    }
}

impl core::error::Error for MemError {}

impl embedded_io::Error for MemError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            MemError::Injected => embedded_io::ErrorKind::Other,
            MemError::OutOfRange => embedded_io::ErrorKind::InvalidInput,
        }
    }
}

/// Counts of a [`MemDisk`]'s traffic and faults.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MemStats {
    /// Reads.
    pub reads: u64,
    /// Writes asked for.
    pub writes: u64,
    /// Writes that failed, were torn, lost, misdirected or flipped.
    pub faults: u64,
    /// Flushes.
    pub flushes: u64,
}

/// An in-memory disk.
#[derive(Clone, Debug)]
pub struct MemDisk<S, F = NoFaults> {
    bytes: S,
    sector: u32,
    /// The fault plan.
    pub faults: F,
    /// What happened.
    pub stats: MemStats,
}

impl<S: AsRef<[u8]> + AsMut<[u8]>, F: Faults> MemDisk<S, F> {
    /// A disk of `bytes` with `sector`-byte sectors and `faults`.
    pub fn new(bytes: S, sector: u32, faults: F) -> Self {
        MemDisk {
            bytes,
            sector,
            faults,
            stats: MemStats::default(),
        }
    }

    /// The bytes, to inspect or to prepare without faults.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// The bytes, to prepare or damage without faults.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.bytes.as_mut()
    }

    fn range(&self, offset: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let s = u64::from(self.sector);
        let start = usize::try_from(offset).map_err(|_| MemError::OutOfRange)?;
        let end = start.checked_add(len).ok_or(MemError::OutOfRange)?;
        if offset % s != 0 || len as u64 % s != 0 || end > self.bytes.as_ref().len() {
            return Err(MemError::OutOfRange);
        }
        Ok(start..end)
    }
}

impl<S, F> embedded_io::ErrorType for MemDisk<S, F> {
    type Error = MemError;
}

impl<S: AsRef<[u8]> + AsMut<[u8]>, F: Faults> BlockDevice for MemDisk<S, F> {
    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(offset, buf.len())?;
        self.stats.reads += 1;
        if self.faults.read_fails(offset, buf.len()) {
            self.stats.faults += 1;
            return Err(MemError::Injected);
        }
        buf.copy_from_slice(&self.bytes.as_ref()[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        let r = self.range(offset, buf.len())?;
        self.stats.writes += 1;
        let sector = self.sector as usize;
        let fault = self.faults.write(offset, buf.len());
        if fault != WriteFault::None {
            self.stats.faults += 1;
        }
        match fault {
            WriteFault::None => self.bytes.as_mut()[r].copy_from_slice(buf),
            WriteFault::Fail => return Err(MemError::Injected),
            WriteFault::Torn { sectors } => {
                let n = (sectors * sector).min(buf.len());
                self.bytes.as_mut()[r.start..r.start + n].copy_from_slice(&buf[..n]);
            }
            WriteFault::Lost => {}
            WriteFault::Misdirected { offset } => {
                if let Ok(to) = self.range(offset, buf.len()) {
                    self.bytes.as_mut()[to].copy_from_slice(buf);
                }
            }
            WriteFault::BitFlip { byte, bit } => {
                let bytes = &mut self.bytes.as_mut()[r];
                bytes.copy_from_slice(buf);
                if let Some(b) = bytes.get_mut(byte) {
                    *b ^= 1 << (bit % 8);
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MemError> {
        self.stats.flushes += 1;
        Ok(())
    }
}

/// A handle on a device that several drivers share: an SPM and its hosts
/// on one disk, each driver owning a `Shared` of the same `RefCell`.
#[derive(Debug)]
pub struct Shared<'a, D>(pub &'a core::cell::RefCell<D>);

impl<D: BlockDevice> embedded_io::ErrorType for Shared<'_, D> {
    type Error = D::Error;
}

impl<D: BlockDevice> BlockDevice for Shared<'_, D> {
    fn sector_size(&self) -> u32 {
        self.0.borrow().sector_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D::Error> {
        self.0.borrow_mut().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), D::Error> {
        self.0.borrow_mut().write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), D::Error> {
        self.0.borrow_mut().flush()
    }
}
