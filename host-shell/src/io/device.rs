//! Direct block I/O on the mailbox device.
//!
//! The mailbox lives on storage that several hosts share, so every read
//! must see what is on the storage now, and every write must reach the
//! storage rather than sit in this host's page cache. This module opens the
//! device (a block device, or a regular file standing in for one) with
//! `O_DIRECT`, which bypasses the page cache, and does whole-sector
//! `pread`/`pwrite` on it.
//!
//! # Why aligned buffers
//!
//! The kernel only accepts direct I/O whose file offset and length are
//! multiples of the device's logical sector size, and whose memory buffer
//! starts at a suitably aligned address. Ordinary `Vec<u8>` memory gives no
//! such guarantee, so I/O goes through [`AlignedBuf`], a zero-filled heap
//! buffer whose start is aligned (4096 bytes by default). [`Device::read_at`]
//! and [`Device::write_at`] check offset, length, buffer alignment and range
//! before any system call, and return a [`DeviceError`] naming the device
//! instead of letting the kernel answer with a bare `EINVAL`.
//!
//! # How the sector size is found
//!
//! - Block device: the kernel's logical block size (`BLKSSZGET` ioctl); the
//!   size comes from seeking to the end of the device.
//! - Regular file: the direct-I/O offset alignment that the file system
//!   reports through `statx(STATX_DIOALIGN)` (Linux 6.1 and later, on file
//!   systems that implement it). When it is not reported, 4096 bytes is
//!   assumed: it is a multiple of every logical sector size in common use
//!   (512 and 4096), so I/O aligned to it is accepted on any of them.
//!
//! The memory alignment buffers need ([`Device::dio_mem_align`]) also comes
//! from `statx`, never less than 512 bytes, and 4096 bytes when unknown.
//!
//! File systems without direct I/O (tmpfs before Linux 6.6 is the usual one)
//! refuse the `O_DIRECT` open with `EINVAL`; that is reported as
//! [`DeviceError::DirectIoUnsupported`].
//! There is deliberately no fallback to buffered I/O: a mailbox read through
//! a page cache could miss other hosts' writes.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, StatxFlags};
use rustix::io::Errno;

/// Buffer alignment used by [`AlignedBuf::new`]; enough for any device.
pub const DEFAULT_ALIGN: usize = 4096;

/// Smallest alignment an [`AlignedBuf`] may have.
pub const MIN_ALIGN: usize = 512;

/// Sector size and memory alignment assumed when the kernel does not say.
const FALLBACK_ALIGN: u32 = 4096;

/// A zero-filled heap buffer whose first byte sits at an aligned address,
/// as `O_DIRECT` requires.
///
/// The length and alignment are fixed at creation and the memory is never
/// reallocated, so the alignment holds for the buffer's whole life.
pub struct AlignedBuf {
    storage: Box<[u8]>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// Allocates `len` zero bytes starting at a multiple of `align`.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two of at least [`MIN_ALIGN`] (512), or
    /// if `len + align` overflows `usize`.
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        assert!(
            align.is_power_of_two() && align >= MIN_ALIGN,
            "AlignedBuf alignment must be a power of two of at least {MIN_ALIGN} bytes, got {align}"
        );
        // Over-allocate so that an aligned window of `len` bytes fits.
        let total = len
            .checked_add(align - 1)
            .expect("AlignedBuf length overflows usize");
        let storage = vec![0u8; total].into_boxed_slice();
        let start = storage.as_ptr().align_offset(align);
        assert!(start < align, "cannot align a heap buffer to {align} bytes");
        AlignedBuf {
            storage,
            start,
            len,
            align,
        }
    }

    /// Allocates `len` zero bytes aligned to [`DEFAULT_ALIGN`] (4096).
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len, DEFAULT_ALIGN)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has length zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment guaranteed for the buffer's start address.
    pub fn align(&self) -> usize {
        self.align
    }

    /// The longest length [`Self::set_len`] takes: what the allocation
    /// holds past the aligned start.
    pub fn capacity(&self) -> usize {
        self.storage.len() - self.start
    }

    /// Makes the buffer `len` bytes long without a new allocation, so one
    /// buffer can be reused for requests of many sizes. Bytes past the old
    /// length keep whatever they held (zero, or earlier contents). Returns
    /// false, changing nothing, if `len` is over [`Self::capacity`].
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        self.len = len;
        true
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish_non_exhaustive()
    }
}

/// What kind of file a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block device such as `/dev/sdb` or `/dev/loop0`.
    BlockDevice,
    /// A regular file on a file system that supports direct I/O.
    File,
}

/// How to open a [`Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (`O_RDONLY`).
    ReadOnly,
    /// Reads and writes (`O_RDWR`).
    ReadWrite,
}

/// A block device or regular file opened for direct (`O_DIRECT`) I/O in
/// whole sectors.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
    path: PathBuf,
    kind: DeviceKind,
    sector_size: u32,
    size: u64,
    mem_align: usize,
}

impl Device {
    /// Opens the block device or regular file at `path` with `O_DIRECT`
    /// and detects its sector size, size and buffer alignment.
    ///
    /// Directories, character devices, FIFOs and sockets are refused with
    /// [`DeviceError::NotABlockDeviceOrFile`] before anything is opened.
    pub fn open(path: &Path, access: Access) -> Result<Device, DeviceError> {
        let st = rustix::fs::stat(path).map_err(|source| DeviceError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Checked before opening: a FIFO would block the open, and other
        // kinds would fail with an unhelpful EINVAL.
        kind_of(path, st.st_mode)?;
        let fd = open_direct(path, access)?;
        let st = rustix::fs::fstat(&fd).map_err(|source| stat_error(path, source))?;
        // Checked again in case the path was replaced in between.
        let kind = kind_of(path, st.st_mode)?;
        let (sector_size, size, mem_align) = match kind {
            DeviceKind::BlockDevice => block_geometry(path, &fd)?,
            DeviceKind::File => file_geometry(&fd, st.st_size),
        };
        tracing::debug!(path = %path.display(), ?kind, sector_size, size, mem_align, "opened device");
        Ok(Device {
            fd,
            path: path.to_owned(),
            kind,
            sector_size,
            size,
            mem_align,
        })
    }

    /// Creates a new regular file of exactly `size` bytes (sparse, reading
    /// as zeroes) and opens it read-write with `O_DIRECT`.
    ///
    /// The file is created exclusively with mode 0644 (before the umask):
    /// if `path` exists, [`DeviceError::AlreadyExists`] is returned and the
    /// existing file is left untouched. If a later step fails (for example
    /// the file system does not support direct I/O), the new file is
    /// removed again.
    pub fn create_file(path: &Path, size: u64) -> Result<Device, DeviceError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o644)).map_err(|source| {
            let path = path.to_owned();
            match source {
                Errno::EXIST => DeviceError::AlreadyExists { path },
                _ => DeviceError::Create { path, source },
            }
        })?;
        let result = rustix::fs::ftruncate(&fd, size)
            .map_err(|source| DeviceError::SetLength {
                path: path.to_owned(),
                size,
                source,
            })
            .and_then(|()| {
                drop(fd);
                Device::open(path, Access::ReadWrite)
            });
        if result.is_err() {
            // Best effort: we created the file, so we remove it.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device or a regular file.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The logical sector size in bytes: offsets and lengths of all I/O
    /// must be multiples of it.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The size in bytes, as found when the device was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A regular file's size now (it may have been truncated or grown
    /// since it was opened); a block device's size as opened.
    pub fn current_size(&self) -> u64 {
        match self.kind {
            DeviceKind::File => rustix::fs::fstat(&self.fd)
                .map(|st| u64::try_from(st.st_size).unwrap_or(0))
                .unwrap_or(self.size),
            DeviceKind::BlockDevice => self.size,
        }
    }

    /// The alignment, in bytes, that I/O buffers must have (at least 512).
    pub fn dio_mem_align(&self) -> usize {
        self.mem_align
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    ///
    /// `offset` and the length must be multiples of [`Self::sector_size`],
    /// the buffer must be aligned to [`Self::dio_mem_align`], and the range
    /// must lie within [`Self::size`]; this is checked before any I/O.
    /// Reaching end of file before the buffer is full is
    /// [`DeviceError::ShortRead`].
    pub fn read_at(&self, offset: u64, buf: &mut AlignedBuf) -> Result<(), DeviceError> {
        let len = buf.len();
        self.read_into(offset, buf, 0..len)
    }

    /// Reads `range.len()` bytes at `offset` into `buf[range]`, under the
    /// rules of [`Self::read_at`]; `range.start` must keep the alignment
    /// (a multiple of [`Self::dio_mem_align`]). A long-lived buffer can so
    /// take reads of any size without a new allocation.
    pub fn read_into(
        &self,
        offset: u64,
        buf: &mut AlignedBuf,
        range: std::ops::Range<usize>,
    ) -> Result<(), DeviceError> {
        self.check_range(offset, buf, &range)?;
        self.read_slice(offset, &mut buf[range])
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, a slice whose first
    /// byte sits at a multiple of [`Self::dio_mem_align`] (a part of an
    /// [`AlignedBuf`]), under the rules of [`Self::read_at`].
    pub fn read_slice(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.as_ptr(), buf.len())?;
        let len = buf.len();
        let mut done = 0;
        while done < len {
            match rustix::io::pread(&self.fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(self.short_read(offset, len, done)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(source) => return Err(self.read_error(offset, len, source)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, under the same rules as
    /// [`Self::read_at`]. The data is not durable until
    /// [`Self::sync_data`] returns.
    pub fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DeviceError> {
        self.write_from(offset, buf, 0..buf.len())
    }

    /// Writes `buf[range]` at `offset`, under the rules of
    /// [`Self::read_into`].
    pub fn write_from(
        &self,
        offset: u64,
        buf: &AlignedBuf,
        range: std::ops::Range<usize>,
    ) -> Result<(), DeviceError> {
        self.check_range(offset, buf, &range)?;
        self.write_slice(offset, &buf[range])
    }

    /// Writes all of `buf` at `offset`, under the rules of
    /// [`Self::read_slice`].
    pub fn write_slice(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.as_ptr(), buf.len())?;
        let len = buf.len();
        let mut done = 0;
        while done < len {
            match rustix::io::pwrite(&self.fd, &buf[done..], offset + done as u64) {
                Ok(0) => return Err(self.short_write(offset, len, done)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(source) => return Err(self.write_error(offset, len, source)),
            }
        }
        Ok(())
    }

    /// Flushes written data to stable storage (`fdatasync`).
    pub fn sync_data(&self) -> Result<(), DeviceError> {
        rustix::fs::fdatasync(&self.fd).map_err(|source| DeviceError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// Checks an I/O request against the device's rules before doing it.
    /// `range` lies within `buf`, which is aligned for direct I/O.
    fn check_range(
        &self,
        offset: u64,
        buf: &AlignedBuf,
        range: &std::ops::Range<usize>,
    ) -> Result<(), DeviceError> {
        if range.end > buf.len() || range.start > range.end {
            return Err(DeviceError::Unaligned {
                path: self.path.clone(),
                offset,
                len: range.len() as u64,
                sector_size: self.sector_size,
            });
        }
        // The buffer's own alignment, not only where it happens to sit.
        if buf.align() % self.mem_align != 0 || range.start % self.mem_align != 0 {
            return Err(DeviceError::UnalignedBuffer {
                path: self.path.clone(),
                align: buf.align(),
                required: self.mem_align,
            });
        }
        Ok(())
    }

    /// An I/O of `len` bytes at `offset` from memory at `at`: whole
    /// sectors, memory aligned for direct I/O, within the device.
    fn check(&self, offset: u64, at: *const u8, len: usize) -> Result<(), DeviceError> {
        let len = len as u64;
        let sector = u64::from(self.sector_size);
        if offset % sector != 0 || len % sector != 0 {
            return Err(DeviceError::Unaligned {
                path: self.path.clone(),
                offset,
                len,
                sector_size: self.sector_size,
            });
        }
        let misalign = (at as usize) % self.mem_align;
        if misalign != 0 {
            return Err(DeviceError::UnalignedBuffer {
                path: self.path.clone(),
                align: 1 << (at as usize).trailing_zeros(),
                required: self.mem_align,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn short_read(&self, offset: u64, len: usize, got: usize) -> DeviceError {
        DeviceError::ShortRead {
            path: self.path.clone(),
            offset,
            len: len as u64,
            got: got as u64,
        }
    }

    fn short_write(&self, offset: u64, len: usize, written: usize) -> DeviceError {
        DeviceError::ShortWrite {
            path: self.path.clone(),
            offset,
            len: len as u64,
            written: written as u64,
        }
    }

    fn read_error(&self, offset: u64, len: usize, source: Errno) -> DeviceError {
        DeviceError::Read {
            path: self.path.clone(),
            offset,
            len: len as u64,
            source,
        }
    }

    fn write_error(&self, offset: u64, len: usize, source: Errno) -> DeviceError {
        DeviceError::Write {
            path: self.path.clone(),
            offset,
            len: len as u64,
            source,
        }
    }
}

/// Classifies a file mode, refusing anything but block devices and regular
/// files.
fn kind_of(path: &Path, mode: u32) -> Result<DeviceKind, DeviceError> {
    let what = match FileType::from_raw_mode(mode) {
        FileType::BlockDevice => return Ok(DeviceKind::BlockDevice),
        FileType::RegularFile => return Ok(DeviceKind::File),
        FileType::Directory => "a directory",
        FileType::CharacterDevice => "a character device",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::Symlink => "a symbolic link",
        _ => "an unknown kind of file",
    };
    Err(DeviceError::NotABlockDeviceOrFile {
        path: path.to_owned(),
        what,
    })
}

/// Opens `path` with `O_DIRECT`, mapping `EINVAL` to
/// [`DeviceError::DirectIoUnsupported`].
fn open_direct(path: &Path, access: Access) -> Result<OwnedFd, DeviceError> {
    let rw = match access {
        Access::ReadOnly => OFlags::RDONLY,
        Access::ReadWrite => OFlags::RDWR,
    };
    let flags = rw | OFlags::DIRECT | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::empty()).map_err(|source| {
        let path = path.to_owned();
        match source {
            Errno::INVAL => DeviceError::DirectIoUnsupported { path },
            _ => DeviceError::Open { path, source },
        }
    })
}

/// Sector size, size and memory alignment of a block device.
fn block_geometry(path: &Path, fd: &OwnedFd) -> Result<(u32, u64, usize), DeviceError> {
    let sector_size = rustix::fs::ioctl_blksszget(fd).map_err(|source| stat_error(path, source))?;
    let size = rustix::fs::seek(fd, SeekFrom::End(0)).map_err(|source| stat_error(path, source))?;
    let mem_align = dio_align(fd).map_or(FALLBACK_ALIGN, |(mem, _)| mem);
    Ok((
        sector_size.max(MIN_ALIGN as u32),
        size,
        at_least_min(mem_align),
    ))
}

/// Sector size, size and memory alignment of a regular file.
fn file_geometry(fd: &OwnedFd, st_size: i64) -> (u32, u64, usize) {
    let (mem_align, sector_size) = dio_align(fd).unwrap_or((FALLBACK_ALIGN, FALLBACK_ALIGN));
    let size = u64::try_from(st_size).unwrap_or(0);
    (
        sector_size.max(MIN_ALIGN as u32),
        size,
        at_least_min(mem_align),
    )
}

/// The `(memory, offset)` direct-I/O alignments reported by `statx`, if
/// the kernel and file system report usable ones.
fn dio_align(fd: &OwnedFd) -> Option<(u32, u32)> {
    let stx = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    let reported = StatxFlags::from_bits_retain(stx.stx_mask).contains(StatxFlags::DIOALIGN);
    let (mem, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    let usable = |v: u32| v.is_power_of_two();
    (reported && usable(mem) && usable(offset)).then_some((mem, offset))
}

fn at_least_min(align: u32) -> usize {
    (align as usize).max(MIN_ALIGN)
}

fn stat_error(path: &Path, source: Errno) -> DeviceError {
    DeviceError::Stat {
        path: path.to_owned(),
        source,
    }
}

/// What to do about a failed open or create.
fn open_hint(errno: &Errno) -> &'static str {
    match *errno {
        Errno::ACCESS | Errno::PERM => {
            "; run spmbox as a user allowed to read and write the device (for example root)"
        }
        Errno::NOENT => "; check the path (does it, or its parent directory, exist?)",
        Errno::ROFS => "; the file system is mounted read-only",
        Errno::NXIO | Errno::NODEV => "; the device is not present",
        Errno::BUSY => "; the device is in use exclusively by something else",
        _ => "",
    }
}

/// An error from the direct-I/O device layer. Every variant names the
/// device; I/O variants also name the offset and length.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device could not be opened (or stat'ed before opening).
    #[error("cannot open {}: {source}{}", .path.display(), open_hint(.source))]
    Open {
        /// The device path.
        path: PathBuf,
        /// The error from the kernel.
        source: Errno,
    },

    /// A new mailbox file could not be created.
    #[error("cannot create {}: {source}{}", .path.display(), open_hint(.source))]
    Create {
        /// The file path.
        path: PathBuf,
        /// The error from the kernel.
        source: Errno,
    },

    /// The file system refused `O_DIRECT`.
    #[error(
        "cannot open {}: the file system does not support direct I/O (O_DIRECT); \
         tmpfs (often /tmp or /dev/shm) on kernels before Linux 6.6 is a common cause, \
         as are virtual file systems such as /proc; put the mailbox on ext4 or xfs, \
         or on a block device",
        .path.display()
    )]
    DirectIoUnsupported {
        /// The device path.
        path: PathBuf,
    },

    /// [`Device::create_file`] found something at the path already.
    #[error("{} already exists; remove it or choose another path", .path.display())]
    AlreadyExists {
        /// The file path.
        path: PathBuf,
    },

    /// The path is neither a block device nor a regular file.
    #[error(
        "{} is {what}, not a block device or regular file; \
         give the path of a block device (such as /dev/sdb) or of a mailbox file",
        .path.display()
    )]
    NotABlockDeviceOrFile {
        /// The device path.
        path: PathBuf,
        /// What the path is instead, such as "a directory".
        what: &'static str,
    },

    /// A new file could not be given its length.
    #[error(
        "cannot set the length of {} to {size} bytes: {source}; check free space and quotas",
        .path.display()
    )]
    SetLength {
        /// The file path.
        path: PathBuf,
        /// The requested length in bytes.
        size: u64,
        /// The error from the kernel.
        source: Errno,
    },

    /// An I/O request's offset or length is not a whole number of sectors
    /// (a bug in the caller).
    #[error(
        "I/O on {} at offset {offset} ({offset:#x}) length {len} is not aligned to its \
         {sector_size}-byte sector size (this is a bug in spmbox)",
        .path.display()
    )]
    Unaligned {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The device's logical sector size.
        sector_size: u32,
    },

    /// An I/O buffer is less aligned than the device needs (a bug in the
    /// caller).
    #[error(
        "I/O buffer for {} is aligned to {align} bytes but the device needs {required} \
         (this is a bug in spmbox)",
        .path.display()
    )]
    UnalignedBuffer {
        /// The device path.
        path: PathBuf,
        /// The buffer's alignment.
        align: usize,
        /// The alignment the device needs.
        required: usize,
    },

    /// An I/O request reaches past the end of the device.
    #[error(
        "I/O on {} at offset {offset} ({offset:#x}) length {len} goes past its end \
         ({size} bytes); is the mailbox on the right device, and was it resized?",
        .path.display()
    )]
    OutOfRange {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The device size in bytes.
        size: u64,
    },

    /// The kernel failed a read.
    #[error(
        "cannot read {len} bytes from {} at offset {offset} ({offset:#x}): {source}; \
         check the device and the kernel log",
        .path.display()
    )]
    Read {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The error from the kernel.
        source: Errno,
    },

    /// The kernel failed a write.
    #[error(
        "cannot write {len} bytes to {} at offset {offset} ({offset:#x}): {source}; \
         check the device and the kernel log",
        .path.display()
    )]
    Write {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// The error from the kernel.
        source: Errno,
    },

    /// End of file came before the requested bytes were read.
    #[error(
        "{} ended after {got} of {len} bytes read at offset {offset} ({offset:#x}): \
         it is shorter than expected; was it truncated or resized while in use?",
        .path.display()
    )]
    ShortRead {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// Bytes read before end of file.
        got: u64,
    },

    /// The kernel stopped accepting data before the whole buffer was
    /// written.
    #[error(
        "{} accepted only {written} of {len} bytes written at offset {offset} ({offset:#x}); \
         check the device and the kernel log",
        .path.display()
    )]
    ShortWrite {
        /// The device path.
        path: PathBuf,
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// Bytes written before the device stopped accepting data.
        written: u64,
    },

    /// `fdatasync` failed: recent writes may not be durable.
    #[error(
        "cannot flush {} to stable storage: {source}; recent writes may be lost, \
         check the device and the kernel log",
        .path.display()
    )]
    Sync {
        /// The device path.
        path: PathBuf,
        /// The error from the kernel.
        source: Errno,
    },

    /// The device's type, size or sector size could not be read.
    #[error("cannot read the size or sector size of {}: {source}", .path.display())]
    Stat {
        /// The device path.
        path: PathBuf,
        /// The error from the kernel.
        source: Errno,
    },
}

/// The core's driver ([`spmbox_core::driver`]) reads and writes the
/// mailbox through a shared reference to the device: `pread`/`pwrite`
/// need no exclusive access.
impl embedded_io::ErrorType for &Device {
    type Error = DeviceError;
}

impl spmbox_core::driver::BlockDevice for &Device {
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.read_slice(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.write_slice(offset, buf)
    }
    fn flush(&mut self) -> Result<(), DeviceError> {
        self.sync_data()
    }
}

impl embedded_io::Error for DeviceError {
    fn kind(&self) -> embedded_io::ErrorKind {
        use embedded_io::ErrorKind;
        match self {
            DeviceError::Unaligned { .. }
            | DeviceError::UnalignedBuffer { .. }
            | DeviceError::OutOfRange { .. } => ErrorKind::InvalidInput,
            DeviceError::ShortRead { .. } => ErrorKind::InvalidData,
            DeviceError::ShortWrite { .. } => ErrorKind::WriteZero,
            _ => match self.errno() {
                Some(Errno::NOENT) => ErrorKind::NotFound,
                Some(Errno::ACCESS | Errno::PERM | Errno::ROFS) => ErrorKind::PermissionDenied,
                Some(Errno::INTR) => ErrorKind::Interrupted,
                Some(Errno::OPNOTSUPP) => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
        }
    }
}

impl DeviceError {
    /// The kernel's error number, for errors the kernel returned.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            DeviceError::Open { source, .. }
            | DeviceError::Create { source, .. }
            | DeviceError::SetLength { source, .. }
            | DeviceError::Read { source, .. }
            | DeviceError::Write { source, .. }
            | DeviceError::Sync { source, .. }
            | DeviceError::Stat { source, .. } => Some(*source),
            _ => None,
        }
    }

    /// The path of the device or file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DeviceError::Open { path, .. }
            | DeviceError::Create { path, .. }
            | DeviceError::DirectIoUnsupported { path }
            | DeviceError::AlreadyExists { path }
            | DeviceError::NotABlockDeviceOrFile { path, .. }
            | DeviceError::SetLength { path, .. }
            | DeviceError::Unaligned { path, .. }
            | DeviceError::UnalignedBuffer { path, .. }
            | DeviceError::OutOfRange { path, .. }
            | DeviceError::Read { path, .. }
            | DeviceError::Write { path, .. }
            | DeviceError::ShortRead { path, .. }
            | DeviceError::ShortWrite { path, .. }
            | DeviceError::Sync { path, .. }
            | DeviceError::Stat { path, .. } => path,
        }
    }

    /// Whether retrying the same I/O later may succeed: a read, write or
    /// flush the kernel failed for a reason that can heal (EIO from a
    /// path down, ENOSPC from a full file system, EROFS or EPERM from a
    /// device set read-only, a device briefly gone), and a write the
    /// device stopped accepting part way. Never so: a request spmbox got
    /// wrong (misaligned, past the end, EINVAL, EBADF, EFAULT), a device
    /// shorter than its mailbox, and every error of opening a device.
    pub fn is_transient(&self) -> bool {
        match self {
            DeviceError::Read { source, .. }
            | DeviceError::Write { source, .. }
            | DeviceError::Sync { source, .. } => !matches!(
                *source,
                Errno::INVAL | Errno::BADF | Errno::FAULT | Errno::OPNOTSUPP | Errno::ISDIR
            ),
            DeviceError::ShortWrite { .. } => true,
            _ => false,
        }
    }

    /// Whether the file system under the file is full (ENOSPC, EDQUOT, or
    /// a write it stopped accepting part way).
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), Some(Errno::NOSPC | Errno::DQUOT))
            || matches!(self, DeviceError::ShortWrite { .. })
    }
}

#[cfg(test)]
mod tests;
