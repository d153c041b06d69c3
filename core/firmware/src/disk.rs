//! The domain's device as the firmware reaches it: a file on the machine
//! that runs qemu, through ARM semihosting (SYS_OPEN, SYS_SEEK, SYS_READ,
//! SYS_WRITE, SYS_FLEN, SYS_RENAME, SYS_REMOVE), via the `semihosting`
//! crate's safe file API. On an array this module is the storage driver:
//! a SCSI or NVMe path to the LUN that holds the domain.

use core::ffi::CStr;

use semihosting::fs::{File, OpenOptions};
use semihosting::io::{Read as _, Seek as _, SeekFrom, Write as _};
use spmbox_core::driver::BlockDevice;

/// The longest path the firmware takes (with the suffix of the command
/// and reply files and the terminating NUL).
pub const PATH_MAX: usize = 256;

/// A NUL-terminated path.
pub type Path = heapless::Vec<u8, PATH_MAX>;

/// `base` followed by `suffix`, NUL-terminated; `None` if it is too long
/// or holds a NUL.
pub fn path(base: &[u8], suffix: &[u8]) -> Option<Path> {
    let mut p = Path::new();
    p.extend_from_slice(base).ok()?;
    p.extend_from_slice(suffix).ok()?;
    p.push(0).ok()?;
    CStr::from_bytes_with_nul(&p).ok()?;
    Some(p)
}

/// The path as a C string (an empty one if it is not NUL-terminated).
pub fn c(p: &Path) -> &CStr {
    CStr::from_bytes_with_nul(p).unwrap_or(c"")
}

/// Why a semihosting file operation failed: the host's errno, or a
/// request the firmware cannot pass (an offset beyond 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum DiskError {
    /// The host's errno (0 if it gave none).
    Host(i32),
    /// The file ended before the read did.
    ShortRead,
    /// The offset does not fit SYS_SEEK's 32-bit argument.
    Offset,
}

impl From<semihosting::io::Error> for DiskError {
    fn from(e: semihosting::io::Error) -> Self {
        match e.kind() {
            semihosting::io::ErrorKind::UnexpectedEof => DiskError::ShortRead,
            _ => DiskError::Host(e.raw_os_error().unwrap_or(0)),
        }
    }
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskError::Host(errno) => write!(f, "the host's file I/O failed (errno {errno})"),
            DiskError::ShortRead => write!(f, "the file ended before the read did"),
            DiskError::Offset => write!(f, "the offset does not fit semihosting's 32 bits"),
        }
    }
}

impl core::error::Error for DiskError {}

impl embedded_io::Error for DiskError {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            DiskError::Host(_) => embedded_io::ErrorKind::Other,
            DiskError::ShortRead => embedded_io::ErrorKind::InvalidData,
            DiskError::Offset => embedded_io::ErrorKind::InvalidInput,
        }
    }
}

/// The domain file, opened read-write.
pub struct Disk {
    file: File,
    sector: u32,
}

impl Disk {
    /// Opens the file at `path` for reading and writing, with the
    /// mailbox's sector size.
    pub fn open(path: &CStr, sector: u32) -> Result<Disk, DiskError> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Disk { file, sector })
    }

    /// The file's length.
    pub fn len(&self) -> Result<u64, DiskError> {
        Ok(self.file.metadata()?.len())
    }

    fn seek(&mut self, offset: u64) -> Result<(), DiskError> {
        if u32::try_from(offset).is_err() {
            return Err(DiskError::Offset);
        }
        self.file.seek(SeekFrom::Start(offset))?;
        Ok(())
    }
}

impl embedded_io::ErrorType for Disk {
    type Error = DiskError;
}

impl BlockDevice for Disk {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.seek(offset)?;
        self.file.read_exact(buf)?;
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.seek(offset)?;
        self.file.write_all(buf)?;
        Ok(())
    }
    /// Semihosting has no fsync: qemu's write(2) has handed the data to
    /// the host's page cache, which hosts reading with O_DIRECT see (the
    /// kernel writes dirty pages back before a direct read). It survives
    /// a crash of qemu, not of the machine; on an array this is where the
    /// write cache is flushed (SYNCHRONIZE CACHE, an NVMe flush).
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// Reads the whole small file at `path` into `out`: its length, or
/// `None` if it cannot be opened (it does not exist) or read.
pub fn read_small(path: &CStr, out: &mut [u8]) -> Option<usize> {
    let mut file = File::open(path).ok()?;
    let mut n = 0;
    while n < out.len() {
        match file.read(&mut out[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    Some(n)
}

/// Writes `text` to `tmp` and renames it to `path`, so that a reader sees
/// the whole file or none.
pub fn write_small(tmp: &CStr, path: &CStr, text: &[u8]) -> Result<(), DiskError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    file.write_all(text)?;
    drop(file);
    semihosting::fs::rename(tmp, path)?;
    Ok(())
}

/// Renames `from` to `to` (atomic on the host).
pub fn rename(from: &CStr, to: &CStr) -> Result<(), DiskError> {
    semihosting::fs::rename(from, to)?;
    Ok(())
}

/// Removes `path`.
pub fn remove(path: &CStr) -> Result<(), DiskError> {
    semihosting::fs::remove_file(path)?;
    Ok(())
}
