//! A storage domain with the builtin pool: where its parts live on shared
//! storage, how LUNs are labelled and found, and the builtin backend.
//!
//! ```text
//!  domain device:  [ mailbox (docs/format.md) ][ pad to 1 MiB ][ copy A ][ copy B ]
//!  each data LUN:  [ label (4 KiB) ][ pad to 1 MiB ][ extent 0 ][ extent 1 ] ...
//! ```
//!
//! The pool metadata copies follow the mailbox on the same device, at the
//! first MiB boundary after it, each [`METADATA_COPY_SIZE`] bytes
//! (core's `pool` module docs give their format). A data LUN starts with a
//! label that names the domain and the LUN's UUID; extents start at
//! [`LUN_DATA_OFFSET`]. Hosts find a LUN by reading the labels of the
//! files and block devices on their LUN search paths, so a LUN may have a
//! different path on every host, as SAN devices do.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use spmbox_core::pool::{self, CopyDefect, DefaultPool, Extend, METADATA_COPY_SIZE, PoolError};
use spmbox_core::spm::JobResult;
use spmbox_core::wire::{CRC32C, Geometry, Uuid};

use crate::backend::{
    BackendError, LunMover, PoolReport, PoolUsage, Released, Relocation, SegmentReport, SpmBackend,
    VolumeMaps, VolumeReport,
};
use crate::io::device::{Access, AlignedBuf, Device, DeviceKind};
use crate::io::mailbox::{self, Mailbox};
use crate::io::mapping::{Mapping, Run};
use crate::units::Bytes;

/// The pool type the daemons run: 16 LUNs, 1024 volumes of 32 segments,
/// 256 parked requests.
pub type DomainPool = DefaultPool;

/// Metadata copies and LUN data start on MiB boundaries.
pub const ALIGN: u64 = pool::METADATA_ALIGN;
/// Where a data LUN's first extent starts.
pub const LUN_DATA_OFFSET: u64 = ALIGN;
/// The label block at the start of every data LUN.
pub const LABEL_LEN: usize = 4096;
/// Bytes 0..8 of a LUN label.
pub const LABEL_MAGIC: [u8; 8] = *b"SPMBLUN1";

/// Where the pool metadata copies start on the domain device.
pub fn metadata_offset(geometry: Geometry) -> u64 {
    pool::metadata_offset(&geometry)
}

/// The size a domain device must have at least.
pub fn domain_size(geometry: Geometry) -> u64 {
    metadata_offset(geometry) + 2 * METADATA_COPY_SIZE as u64
}

/// A data LUN's label.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SPMBLUN1` |
/// | 8 | 16 | domain UUID |
/// | 24 | 16 | LUN UUID |
/// | 40 | 8 | data offset (bytes, LE): where extent 0 starts |
/// | 48 | 8 | extent size (bytes, LE) |
/// | 56 | 4 | extents (LE) |
/// | 60 | 4 | CRC32C of bytes 0..60 (LE) |
///
/// The rest of the 4 KiB block is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LunLabel {
    /// The domain the LUN belongs to.
    pub domain: Uuid,
    /// The LUN's UUID (as the pool metadata names it).
    pub lun: Uuid,
    /// Where extent 0 starts on the device.
    pub data_offset: u64,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents on the LUN.
    pub extents: u32,
}

impl LunLabel {
    /// The label as its 4 KiB block.
    pub fn to_block(&self) -> [u8; LABEL_LEN] {
        let mut b = [0u8; LABEL_LEN];
        b[0..8].copy_from_slice(&LABEL_MAGIC);
        b[8..24].copy_from_slice(&self.domain.0);
        b[24..40].copy_from_slice(&self.lun.0);
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.extent_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.extents.to_le_bytes());
        let crc = CRC32C.checksum(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a label block; `None` if it is not a valid spmbox LUN label.
    pub fn parse(block: &[u8]) -> Option<LunLabel> {
        let b = block.get(..64)?;
        if b[0..8] != LABEL_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
        if crc != CRC32C.checksum(&b[0..60]) {
            return None;
        }
        let u64_at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        Some(LunLabel {
            domain: Uuid(b[8..24].try_into().ok()?),
            lun: Uuid(b[24..40].try_into().ok()?),
            data_offset: u64_at(40)?,
            extent_size: u64_at(48)?,
            extents: u32::from_le_bytes(b[56..60].try_into().ok()?),
        })
    }
}

/// Reads the label of the device at `path`: `Ok(None)` if it has none.
pub fn read_label(path: &Path) -> Result<Option<LunLabel>, BackendError> {
    Ok(read_label_and_size(path)?.0)
}

/// Reads the label of the device at `path` (`None` if it has none) and
/// its size now.
fn read_label_and_size(path: &Path) -> Result<(Option<LunLabel>, u64), BackendError> {
    let device = Device::open(path, Access::ReadOnly)
        .map_err(|e| BackendError::device("cannot read LUN label", e))?;
    if device.size() < LABEL_LEN as u64 {
        return Ok((None, device.size()));
    }
    let mut buf = AlignedBuf::zeroed(LABEL_LEN, device.dio_mem_align());
    device
        .read_at(0, &mut buf)
        .map_err(|e| BackendError::device("cannot read LUN label", e))?;
    Ok((LunLabel::parse(&buf), device.size()))
}

/// The bytes a LUN must have for its label: the data offset plus every
/// extent the label counts.
pub fn label_needs(label: &LunLabel) -> u64 {
    u64::from(label.extents)
        .saturating_mul(label.extent_size)
        .saturating_add(label.data_offset)
}

/// Checks that the LUN at `path`, of `size` bytes now, holds every extent
/// its label counts, and (`pool_extents`) at least the extents the pool
/// metadata gives it. A LUN that fails either was truncated, or its label
/// was rewritten, or the path is another device: nothing may be mapped on
/// it or written to it, or the guests' data in the missing range is lost
/// (a write past the end of a file grows it back with zeroes).
pub fn check_lun_size(
    path: &Path,
    label: &LunLabel,
    size: u64,
    pool_extents: Option<u32>,
) -> Result<(), BackendError> {
    let needed = label_needs(label);
    if size < needed {
        return Err(BackendError::new(format!(
            "LUN {} on {} is {}, but its label needs {} ({} extents of {} after {}): \
             the device was truncated, or the path is not the whole LUN. Nothing is written \
             to it: restore the LUN to its full size, or give the right device (--lun-search, \
             --lun)",
            label.lun,
            path.display(),
            Bytes(size),
            Bytes(needed),
            label.extents,
            Bytes(label.extent_size),
            Bytes(label.data_offset)
        )));
    }
    if let Some(used) = pool_extents
        && label.extents < used
    {
        return Err(BackendError::new(format!(
            "LUN {} on {}: its label counts {} extents, but the pool metadata gives it {} \
             ({} at least): the label was rewritten or the device is not that LUN. Nothing \
             is written to it: restore the LUN and its label, or give the right device \
             with --lun-search",
            label.lun,
            path.display(),
            label.extents,
            used,
            Bytes(
                u64::from(used)
                    .saturating_mul(label.extent_size)
                    .saturating_add(label.data_offset)
            )
        )));
    }
    Ok(())
}

/// What identifies the storage behind a path: a block device by its
/// device number, a file by its file system and inode. Two paths with the
/// same identity (symlinks, hard links, `/dev/disk/by-id` names of one
/// device) are the same storage; anything else is not, even if it shows
/// the same bytes (a loop device over a file, a multipath device and its
/// member paths, a copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageId {
    /// A block device: its device number.
    Block(u64),
    /// A regular file: its file system's device number and its inode.
    File(u64, u64),
}

/// The identity of the storage at `path` (symlinks followed).
pub fn storage_id(path: &Path) -> std::io::Result<StorageId> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = std::fs::metadata(path)?;
    Ok(if meta.file_type().is_block_device() {
        StorageId::Block(meta.rdev())
    } else {
        StorageId::File(meta.dev(), meta.ino())
    })
}

/// Labels the LUN at `path` for `domain` (or returns the label it already
/// has for this domain). Refuses a LUN of another domain, one too small for
/// a single extent, or one that holds other data without `force`.
pub fn label_lun(
    path: &Path,
    domain: Uuid,
    extent_size: u64,
    force: bool,
) -> Result<LunLabel, BackendError> {
    let device = Device::open(path, Access::ReadWrite)
        .map_err(|e| BackendError::device("cannot open LUN", e))?;
    let mut buf = AlignedBuf::zeroed(LABEL_LEN, device.dio_mem_align());
    device
        .read_at(0, &mut buf)
        .map_err(|e| BackendError::device("cannot read LUN", e))?;
    if let Some(label) = LunLabel::parse(&buf) {
        if label.domain == domain {
            return Ok(label);
        }
        if !force {
            return Err(BackendError::new(format!(
                "{} is a LUN of another domain ({}); pass --force to take it over (its data is lost)",
                path.display(),
                label.domain
            )));
        }
    } else if buf.iter().any(|&b| b != 0) && !force {
        return Err(BackendError::new(format!(
            "{} holds data in its first 4 KiB (not an spmbox LUN label); \
             check the path, or pass --force to use it anyway (its data is lost)",
            path.display()
        )));
    }
    let extents = device.size().saturating_sub(LUN_DATA_OFFSET) / extent_size;
    let extents = u32::try_from(extents).unwrap_or(u32::MAX);
    if extents == 0 {
        return Err(BackendError::new(format!(
            "{} is {}, too small for one extent of {} after its {} label area; use a larger LUN",
            path.display(),
            Bytes(device.size()),
            Bytes(extent_size),
            Bytes(LUN_DATA_OFFSET)
        )));
    }
    let label = LunLabel {
        domain,
        lun: mailbox::random_uuid()?,
        data_offset: LUN_DATA_OFFSET,
        extent_size,
        extents,
    };
    buf.copy_from_slice(&label.to_block());
    device
        .write_at(0, &buf)
        .and_then(|()| device.sync_data())
        .map_err(|e| BackendError::device("cannot write LUN label", e))?;
    Ok(label)
}

/// A LUN found on the search paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundLun {
    /// The first path (in search order) that reaches it.
    pub path: PathBuf,
    /// Its label.
    pub label: LunLabel,
    /// Its size when it was found.
    pub size: u64,
    /// Its storage.
    pub id: StorageId,
    /// Paths to other storage that carries the same LUN UUID (copies,
    /// loop devices over it, ...): while there are any, the LUN is
    /// ambiguous and nothing is mapped on it.
    pub others: Vec<PathBuf>,
}

impl FoundLun {
    /// The LUN, or an error naming every path that carries its UUID if
    /// more than one storage does.
    pub fn unambiguous(&self) -> Result<&FoundLun, BackendError> {
        if self.others.is_empty() {
            return Ok(self);
        }
        let mut all = vec![self.path.display().to_string()];
        all.extend(self.others.iter().map(|p| p.display().to_string()));
        Err(BackendError::new(format!(
            "LUN {} is ambiguous: {} are different devices or files that carry its label \
             (a copy, or a loop device over it); nothing is mapped on it. Take the copies \
             off the LUN search path, or pass --lun-search with the one that is the LUN",
            self.label.lun,
            all.join(" and ")
        )))
    }
}

/// Finds the LUNs of `domain` on the search paths: each path is a file or
/// block device, or a directory whose files and block devices are looked
/// at (not recursively). Unreadable entries are skipped. Paths that reach
/// the same storage ([`StorageId`]) count once; a LUN UUID on two
/// different storages is recorded in [`FoundLun::others`].
pub fn find_luns(domain: Uuid, search: &[PathBuf]) -> HashMap<Uuid, FoundLun> {
    let mut found: HashMap<Uuid, FoundLun> = HashMap::new();
    let mut candidates = Vec::new();
    for path in search {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                names.sort();
                candidates.extend(names);
            }
            Err(_) => candidates.push(path.clone()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        use std::os::unix::fs::FileTypeExt as _;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            continue;
        }
        let Ok(id) = storage_id(&path) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        if let Ok((Some(label), size)) = read_label_and_size(&path)
            && label.domain == domain
        {
            match found.entry(label.lun) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    e.get_mut().others.push(path);
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(FoundLun {
                        path,
                        label,
                        size,
                        id,
                        others: Vec::new(),
                    });
                }
            }
        }
    }
    found
}

/// The default LUN search path for a domain device: its directory if it
/// is a file, nothing for a block device.
pub fn default_search(device: &Path, kind: DeviceKind) -> Vec<PathBuf> {
    match kind {
        DeviceKind::File => device
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_owned()
                }
            })
            .into_iter()
            .collect(),
        DeviceKind::BlockDevice => Vec::new(),
    }
}

/// A pool metadata copy checked on its own: its offset on the domain
/// device, and its commit sequence or why it is not used.
pub type CopyCheck = (u64, Result<u64, CopyDefect>);

/// The open domain device: mailbox plus metadata copies.
pub struct Domain {
    mailbox: Mailbox,
    meta: u64,
    geometry: Geometry,
}

impl Domain {
    /// Opens the domain whose mailbox is on `path` and checks that the
    /// device has room for the metadata copies after it.
    pub fn open(path: &Path, access: Access) -> Result<Domain, BackendError> {
        let mailbox = Mailbox::open(path, access)?;
        let g = mailbox.geometry();
        let needed = domain_size(g);
        if mailbox.device().size() < needed {
            return Err(BackendError::new(format!(
                "{} holds a mailbox but no pool metadata: it is {}, a domain with {} hosts needs {}; \
                 create the domain with `spmbox pool create`",
                path.display(),
                Bytes(mailbox.device().size()),
                g.max_hosts(),
                Bytes(needed)
            )));
        }
        Ok(Domain {
            meta: metadata_offset(g),
            geometry: g,
            mailbox,
        })
    }

    /// The mailbox.
    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    /// The domain's UUID.
    pub fn id(&self) -> Uuid {
        self.mailbox.superblock().domain
    }

    /// Reads the pool from its newest valid metadata copy: the pool and
    /// the copy's sequence number.
    pub fn read_pool(&self) -> Result<(Box<DomainPool>, u64), BackendError> {
        let len = METADATA_COPY_SIZE;
        let a = self.mailbox.read(self.meta, len)?;
        let b = self.mailbox.read(self.meta + len as u64, len)?;
        let mut pool = Box::new(DomainPool::new(pool::DEFAULT_EXTENT_SIZE)?);
        let seq = pool.decode_into(&a, &b).map_err(|e| {
            BackendError::new(format!(
                "the pool metadata on {} cannot be read: {e}; restore the device or recreate the domain",
                self.mailbox.device().path().display()
            ))
        })?;
        Ok((pool, seq))
    }

    /// Each pool metadata copy checked on its own: its offset on the
    /// domain device, and its commit sequence or why it is not used (an
    /// empty copy is `CopyDefect::Empty`).
    pub fn check_copies(&self) -> Result<[CopyCheck; 2], BackendError> {
        let len = METADATA_COPY_SIZE;
        let mut out = [(0, Err(CopyDefect::Empty)); 2];
        for (place, slot) in out.iter_mut().enumerate() {
            let offset = self.meta + (place * len) as u64;
            let copy = self.mailbox.read(offset, len)?;
            let mut pool = Box::new(DomainPool::new(pool::DEFAULT_EXTENT_SIZE)?);
            let (a, b): (&[u8], &[u8]) = if place == 0 {
                (&copy, &[])
            } else {
                (&[], &copy)
            };
            let state = match pool.decode_into(a, b) {
                Ok(seq) => Ok(seq),
                Err(PoolError::NoValidCopy { a, b }) => Err(if place == 0 { a } else { b }),
                Err(_) => Err(CopyDefect::Payload),
            };
            *slot = (offset, state);
        }
        Ok(out)
    }

    /// Writes `pool` as commit `seq` (to copy `seq % 2`) and makes it
    /// durable.
    pub fn write_pool(&self, pool: &DomainPool, seq: u64) -> Result<(), BackendError> {
        let device = self.mailbox.device();
        let mut buf = AlignedBuf::zeroed(METADATA_COPY_SIZE, device.dio_mem_align());
        let used = pool
            .encode(seq, &mut buf)
            .map_err(|e| BackendError::new(format!("cannot encode the pool metadata: {e}")))?;
        let (offset, len) = pool::commit_place(&self.geometry, seq, used);
        let out = if len == METADATA_COPY_SIZE {
            buf
        } else {
            let mut part = AlignedBuf::zeroed(len, device.dio_mem_align());
            part.copy_from_slice(&buf[..len]);
            part
        };
        device
            .write_at(offset, &out)
            .and_then(|()| device.sync_data())
            .map_err(|e| BackendError::device("cannot commit the pool metadata", e))
    }

    /// Zeroes both copies whole: a new pool must not lose to a left-over
    /// copy, and on a file every block of the metadata is then allocated,
    /// so that a commit overwrites in place and its sync has no file
    /// system metadata to write.
    fn zero_copies(&self) -> Result<(), BackendError> {
        let device = self.mailbox.device();
        let buf = AlignedBuf::zeroed(2 * METADATA_COPY_SIZE, device.dio_mem_align());
        device
            .write_at(self.meta, &buf)
            .and_then(|()| device.sync_data())
            .map_err(BackendError::from)
    }
}

/// What `pool create` is asked to do.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Hosts 1..=hosts.
    pub hosts: u16,
    /// Sector size; `None`: the device's.
    pub sector_size: Option<u32>,
    /// Domain UUID; `None`: a new one.
    pub domain: Option<Uuid>,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Overwrite an existing mailbox or LUN labels.
    pub force: bool,
}

/// Creates a domain: the mailbox and empty pool metadata on `device`
/// (created as a file if it does not exist), and labels every LUN.
/// Checks everything it can before it writes anything.
pub fn create(
    device: &Path,
    luns: &[PathBuf],
    options: &CreateOptions,
) -> Result<(Uuid, Vec<LunLabel>), BackendError> {
    if !pool::valid_extent_size(options.extent_size) {
        return Err(BackendError::new(format!(
            "--extent-size {} is not a valid extent size: use a power of two of at least {}",
            Bytes(options.extent_size),
            Bytes(pool::MIN_EXTENT_SIZE)
        )));
    }
    let mut probe = DomainPool::new(options.extent_size)?;
    if luns.len() > 16 {
        return Err(BackendError::new("a domain holds at most 16 LUNs"));
    }
    // A mailbox already on the device is the real cause when its LUNs
    // are refused too (they carry its labels): say it first.
    if !options.force && device.exists() {
        let d = Device::open(device, Access::ReadOnly)?;
        mailbox::refuse_existing(&d)?;
    }
    // Check the LUNs before anything is written.
    let mut ids: Vec<(StorageId, &PathBuf)> = Vec::new();
    let mut kept: Vec<(Uuid, &PathBuf)> = Vec::new();
    for lun in luns {
        let d = Device::open(lun, Access::ReadOnly)
            .map_err(|e| BackendError::device("cannot use LUN", e))?;
        let id = storage_id(lun)
            .map_err(|e| BackendError::io(format!("cannot stat {}", lun.display()), e))?;
        if let Some((_, first)) = ids.iter().find(|(other, _)| *other == id) {
            return Err(BackendError::new(format!(
                "--lun {} and --lun {} are the same storage; give each LUN once",
                first.display(),
                lun.display()
            )));
        }
        ids.push((id, lun));
        // A label of the domain being created is kept: two of them with
        // one LUN UUID would be one LUN to the hosts.
        if let Some(label) = read_label(lun)?
            && Some(label.domain) == options.domain
        {
            if let Some((_, first)) = kept.iter().find(|(u, _)| *u == label.lun) {
                return Err(BackendError::new(format!(
                    "{} and {} carry the label of the same LUN {}: one is a copy of the other. \
                     Give only the LUN, or wipe the copy's first 4 KiB",
                    first.display(),
                    lun.display(),
                    label.lun
                )));
            }
            kept.push((label.lun, lun));
        }
        if d.size() < LUN_DATA_OFFSET + options.extent_size {
            return Err(BackendError::new(format!(
                "LUN {} is {}, too small for one extent of {}; use a larger LUN or a smaller --extent-size",
                lun.display(),
                Bytes(d.size()),
                Bytes(options.extent_size)
            )));
        }
        if !options.force
            && let Some(label) = read_label(lun)?
        {
            return Err(BackendError::new(format!(
                "{} is already a LUN of domain {}; pass --force to reuse it (its data is lost)",
                lun.display(),
                label.domain
            )));
        }
    }
    let sector = options.sector_size.unwrap_or(512);
    let geometry = Geometry::new(options.hosts, sector)?;
    let size = domain_size(geometry);
    if !device.exists() {
        let file = File::create_new(device)
            .map_err(|e| BackendError::io(format!("cannot create {}", device.display()), e))?;
        file.set_len(size)
            .map_err(|e| BackendError::io(format!("cannot size {}", device.display()), e))?;
    } else {
        let d = Device::open(device, Access::ReadOnly)?;
        if d.size() < size {
            return Err(BackendError::new(format!(
                "{} is {}; a domain for {} hosts needs {} (mailbox and two pool metadata copies)",
                device.display(),
                Bytes(d.size()),
                options.hosts,
                Bytes(size)
            )));
        }
        // Other data where the mailbox and the metadata copies go; a
        // mailbox is for `format` to refuse.
        if !options.force
            && let Err(mailbox::MailboxError::NotAMailbox { .. }) =
                Mailbox::open(device, Access::ReadOnly)
        {
            mailbox::refuse_other_data(&d, size)?;
        }
    }
    let lock = mailbox::lock_idle(device)?;
    let formatted = mailbox::format_locked(
        device,
        &mailbox::FormatOptions {
            hosts: options.hosts,
            sector_size: options.sector_size,
            domain: options.domain,
            force: options.force,
        },
        &lock,
    )?;
    let domain_id = formatted.superblock.domain;
    let domain = Domain::open(device, Access::ReadWrite)?;
    let mut labels = Vec::new();
    for lun in luns {
        let label = label_lun(lun, domain_id, options.extent_size, true)?;
        probe
            .add_lun(label.lun, label.extents)
            .map_err(|e| BackendError::new(format!("cannot add {}: {e}", lun.display())))?;
        labels.push(label);
    }
    domain.zero_copies()?;
    domain.write_pool(&probe, 0)?;
    drop(lock);
    Ok((domain_id, labels))
}

/// The builtin backend on the SPM side: the core pool, committed to the
/// domain device.
pub struct BuiltinSpm {
    domain: Domain,
    pool: Box<DomainPool>,
    seq: u64,
    dirty: bool,
    /// Where to look for LUNs to discard reclaimed extents on; `None`:
    /// no discards.
    discard: Option<Vec<PathBuf>>,
    /// Where to look for LUNs to copy extents between (`pool remove-lun`).
    search: Vec<PathBuf>,
    /// LUNs found on `search`, by UUID: a copy goes on in 8 MiB steps and
    /// looks its two LUNs up at each one.
    places: HashMap<Uuid, (PathBuf, LunLabel)>,
}

/// The extents of `pool` that are free and may hold an earlier volume's
/// data: (LUN index, first extent, extents) in LUN and extent order.
fn dirty_free_runs(pool: &DomainPool) -> Vec<(u16, u64, u64)> {
    let mut out = Vec::new();
    pool.free_runs_below_used(|r| {
        out.push((r.lun, u64::from(r.first), u64::from(r.extents)));
    });
    out.sort_unstable();
    out
}

/// The extents in `after` that are not in `before` (both sorted runs).
fn newly_free(before: &[(u16, u64, u64)], after: &[(u16, u64, u64)]) -> Vec<(u16, u64, u64)> {
    let mut out = Vec::new();
    for &(lun, first, extents) in after {
        // Cut the run by every earlier-free run on the same LUN.
        let mut pieces = vec![(first, first + extents)];
        for &(_, f, n) in before.iter().filter(|b| b.0 == lun) {
            let (cut_from, cut_to) = (f, f + n);
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| {
                    let mut keep = Vec::new();
                    if cut_to <= a || cut_from >= b {
                        keep.push((a, b));
                    } else {
                        if a < cut_from {
                            keep.push((a, cut_from));
                        }
                        if cut_to < b {
                            keep.push((cut_to, b));
                        }
                    }
                    keep
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(a, b)| (lun, a, b - a)));
    }
    out
}

impl BuiltinSpm {
    /// Discards `runs` (LUN index, first extent, extents) on the LUNs found
    /// on `search`; what fails is logged and left as it is (the extents
    /// are free either way).
    fn discard_runs(&self, runs: &[(u16, u64, u64)], search: &[PathBuf]) {
        if runs.is_empty() {
            return;
        }
        let found = find_luns(self.domain.id(), search);
        let extent = self.pool.extent_size();
        let (mut done, mut failed) = (0u64, 0u64);
        for &(lun, first, extents) in runs {
            let Some(id) = self.pool.luns().get(usize::from(lun)).map(|l| l.id) else {
                continue;
            };
            let result = found
                .get(&id)
                .ok_or_else(|| {
                    BackendError::new(format!(
                        "LUN {id} is not on the LUN search path ({}); pass --lun-search",
                        search
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
                .and_then(|f| f.unambiguous())
                .and_then(|f| {
                    crate::io::discard::discard(
                        &f.path,
                        f.label.data_offset + first * extent,
                        extents * extent,
                    )
                });
            match result {
                Ok(()) => done += extents,
                Err(e) => {
                    failed += extents;
                    tracing::warn!("discarding {extents} extents of LUN {id} failed: {e}");
                }
            }
        }
        tracing::info!(
            "discarded {done} reclaimed extents ({}){}",
            Bytes(done * extent),
            if failed > 0 {
                format!("; {failed} could not be discarded")
            } else {
                String::new()
            }
        );
    }

    /// Loads the pool of the domain on `path`.
    pub fn open(path: &Path) -> Result<BuiltinSpm, BackendError> {
        let domain = Domain::open(path, Access::ReadWrite)?;
        let (pool, seq) = domain.read_pool()?;
        let device = domain.mailbox().device();
        let search = default_search(device.path(), device.kind());
        Ok(BuiltinSpm {
            domain,
            pool,
            seq,
            discard: None,
            dirty: false,
            search,
            places: HashMap::new(),
        })
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The pool.
    pub fn pool(&self) -> &DomainPool {
        &self.pool
    }
}

fn report_of(pool: &DomainPool) -> PoolReport {
    PoolReport {
        backend: "builtin",
        extent_size: pool.extent_size(),
        total_extents: pool.total_extents(),
        free_extents: pool.free_extents(),
        luns: pool.luns().iter().map(|l| l.id.to_string()).collect(),
        volumes: pool
            .volumes()
            .map(|v| VolumeReport {
                id: v.id,
                virtual_size: v.virtual_size,
                size: v.size,
                limit: v.limit,
            })
            .collect(),
        parked: pool
            .parked()
            .map(|p| (p.volume.to_string(), p.target_size))
            .collect(),
        segments: pool
            .volumes()
            .map(|v| {
                let runs = pool
                    .segments(v.id)
                    .unwrap_or_default()
                    .iter()
                    .map(|s| SegmentReport {
                        lun: pool
                            .luns()
                            .get(usize::from(s.lun))
                            .map_or_else(|| format!("#{}", s.lun), |l| l.id.to_string()),
                        first_extent: u64::from(s.first_extent),
                        extents: u64::from(s.extents),
                    })
                    .collect();
                (v.id.to_string(), runs)
            })
            .collect(),
        released_extents: pool.released_extents(),
        moving: (!pool.moving().is_nil()).then(|| pool.moving().to_string()),
    }
}

/// A pool refusal of a delete or reduce, with what to do.
fn refusal(id: Uuid, what: &str, e: PoolError) -> BackendError {
    let hint = match e {
        PoolError::UnknownVolume => " (`spmbox volume list` shows the volumes)",
        PoolError::Parked => {
            ": a host waits for it to grow (a parked request); stop that host's guest first"
        }
        PoolError::AboveSize { .. } => ": give a smaller --to",
        _ => "",
    };
    BackendError::new(format!(
        "cannot {what} volume {id}: {e}{hint}. Nothing was changed"
    ))
}

/// The pool of the domain on `path` as committed, for status displays.
pub fn committed_report(path: &Path) -> Result<PoolReport, BackendError> {
    let domain = Domain::open(path, Access::ReadOnly)?;
    let (pool, _) = domain.read_pool()?;
    Ok(report_of(&pool))
}

impl SpmBackend for BuiltinSpm {
    fn extend(&mut self, volume: Uuid, target: u64, urgent: bool) -> JobResult {
        let result = self.pool.extend(volume, target, urgent);
        if matches!(result, Ok(Extend::Extended { .. })) {
            self.dirty = true;
        }
        if let Err(PoolError::SegmentsFull) = result {
            tracing::warn!(
                "volume {volume} cannot grow to {}: its map already holds the most segments \
                 the builtin pool keeps per volume, and volumes growing at the same time \
                 interleave their extents; the host is answered segments_full. Use larger chunks \
                 (each extension is one segment) or a larger --extent-size for new domains",
                Bytes(target)
            );
        }
        JobResult::from_pool(result, self.pool.volume(volume).map_or(0, |v| v.size))
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        if !self.dirty {
            return Ok(());
        }
        let seq = self.seq + 1;
        self.domain.write_pool(&self.pool, seq)?;
        self.seq = seq;
        self.dirty = false;
        // Extents this commit released wait for the hosts from now on.
        self.pool.stamp_released(seq);
        Ok(())
    }

    fn take_completed(&mut self) -> Vec<(Uuid, u64)> {
        // Completions come from add_lun, which commits before returning.
        let mut out = Vec::new();
        while let Some(c) = self.pool.poll_completed() {
            out.push((c.volume, c.size));
        }
        out
    }

    fn withdraw_parked(&mut self, still_waiting: &dyn Fn(Uuid) -> Option<(u64, bool)>) {
        // The parked list is not part of the metadata: nothing to commit.
        let changed = self.pool.withdraw_parked(still_waiting);
        if changed > 0 {
            tracing::info!("parked: {changed} request(s) withdrawn or lowered by their hosts");
        }
    }

    fn add_lun(&mut self, path: &Path) -> Result<String, BackendError> {
        // A LUN this domain labelled already (an interrupted add-lun) keeps
        // its label: it must be whole and the only storage with that UUID
        // where hosts look by default.
        if let (Some(label), size) = read_label_and_size(path)?
            && label.domain == self.domain.id()
        {
            check_lun_size(path, &label, size, None)?;
            let device = self.domain.mailbox().device();
            let mut search = default_search(device.path(), device.kind());
            if std::fs::metadata(path).is_ok_and(|m| m.is_file())
                && let Some(dir) = path.parent()
            {
                search.push(dir.to_owned());
            }
            let id = storage_id(path)
                .map_err(|e| BackendError::io(format!("cannot stat {}", path.display()), e))?;
            if let Some(found) = find_luns(self.domain.id(), &search).get(&label.lun) {
                let mut others: Vec<&PathBuf> = found
                    .others
                    .iter()
                    .filter(|p| storage_id(p).is_ok_and(|o| o != id))
                    .collect();
                if found.id != id {
                    others.push(&found.path);
                }
                if !others.is_empty() {
                    return Err(BackendError::new(format!(
                        "{} carries the label of LUN {}, and so does {}, another device or \
                         file: hosts could not tell which is the LUN. Take the copy off the \
                         LUN search path (or wipe its label), then add the LUN again",
                        path.display(),
                        label.lun,
                        others
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    )));
                }
            }
        }
        let label = label_lun(path, self.domain.id(), self.pool.extent_size(), false)?;
        if label.extent_size != self.pool.extent_size() {
            return Err(BackendError::new(format!(
                "{} is labelled for {} extents, the pool uses {}",
                path.display(),
                Bytes(label.extent_size),
                Bytes(self.pool.extent_size())
            )));
        }
        if self.pool.luns().iter().any(|l| l.id == label.lun) {
            return Err(BackendError::new(format!(
                "{} (LUN {}) is already in the pool",
                path.display(),
                label.lun
            )));
        }
        self.pool
            .add_lun(label.lun, label.extents)
            .map_err(|e| BackendError::new(format!("cannot add {}: {e}", path.display())))?;
        self.dirty = true;
        self.commit()?;
        Ok(format!(
            "LUN {} ({}, {} extents of {}) added",
            label.lun,
            path.display(),
            label.extents,
            Bytes(label.extent_size)
        ))
    }

    fn create_volume(
        &mut self,
        id: Uuid,
        virtual_size: u64,
        initial_size: u64,
    ) -> Result<VolumeReport, BackendError> {
        self.pool
            .create_volume(id, virtual_size, initial_size)
            .map_err(|e| {
                let hint = match e {
                    PoolError::NoSpace { .. } => {
                        "; add a LUN (`spmbox pool add-lun`) or give a smaller --initial-size"
                    }
                    PoolError::OverLimit { .. } => "; give an --initial-size within it",
                    _ => "",
                };
                BackendError::new(format!("cannot create volume {id}: {e}{hint}"))
            })?;
        self.dirty = true;
        self.commit()?;
        let v = self
            .pool
            .volume(id)
            .ok_or_else(|| BackendError::new("the new volume vanished"))?;
        Ok(VolumeReport {
            id,
            virtual_size: v.virtual_size,
            size: v.size,
            limit: v.limit,
        })
    }

    fn poll_capacity(&mut self) -> Result<(), BackendError> {
        // Capacity only comes through add_lun.
        Ok(())
    }

    fn delete_volume(&mut self, id: Uuid) -> Result<Released, BackendError> {
        let extents = self
            .pool
            .delete_volume(id)
            .map_err(|e| refusal(id, "delete", e))?;
        self.dirty = true;
        self.commit()?;
        Ok(Released {
            extents,
            release: self.pool.release_seq(),
        })
    }

    fn reduce_volume(
        &mut self,
        id: Uuid,
        size: u64,
    ) -> Result<(VolumeReport, Released), BackendError> {
        let before = self.pool.volume(id).map_or(0, |v| v.size);
        let after = self
            .pool
            .reduce_volume(id, size)
            .map_err(|e| refusal(id, "reduce", e))?;
        let extents = before.saturating_sub(after) / self.pool.extent_size();
        if extents > 0 {
            self.dirty = true;
            self.commit()?;
        }
        let v = self
            .pool
            .volume(id)
            .ok_or_else(|| BackendError::new("the reduced volume vanished"))?;
        Ok((
            VolumeReport {
                id,
                virtual_size: v.virtual_size,
                size: v.size,
                limit: v.limit,
            },
            Released {
                extents,
                release: self.pool.release_seq(),
            },
        ))
    }

    fn reclaim(&mut self, acked: u64) -> u64 {
        let before = self.discard.as_ref().map(|_| dirty_free_runs(&self.pool));
        let freed = self.pool.reclaim(acked);
        if freed > 0
            && let (Some(before), Some(search)) = (before, &self.discard)
        {
            self.discard_runs(&newly_free(&before, &dirty_free_runs(&self.pool)), search);
        }
        if freed > 0 {
            // Parked requests the freed extents served: their extensions
            // are committed before take_completed hands them out.
            self.dirty = true;
            if let Err(e) = self.commit() {
                tracing::warn!("committing extensions served by reclaimed extents: {e}");
            }
        }
        freed
    }

    fn release_pending(&self) -> Option<u64> {
        (self.pool.released_extents() > 0).then(|| self.pool.release_seq())
    }

    fn set_discard(&mut self, search: Vec<PathBuf>) {
        let mut search = search;
        let device = self.domain.mailbox().device();
        search.extend(default_search(device.path(), device.kind()));
        self.discard = Some(search);
    }

    fn release_seq(&self) -> u64 {
        self.pool.release_seq()
    }

    fn set_lun_search(&mut self, search: Vec<PathBuf>) {
        let mut search = search;
        search.append(&mut self.search);
        self.search = search;
    }

    fn lun_mover(&mut self) -> Option<&mut dyn LunMover> {
        Some(self)
    }

    fn report(&self) -> PoolReport {
        report_of(&self.pool)
    }

    fn usage(&self) -> PoolUsage {
        PoolUsage {
            extent_size: self.pool.extent_size(),
            total_extents: self.pool.total_extents(),
            free_extents: self.pool.free_extents(),
        }
    }

    fn committed_sequence(&self) -> u64 {
        self.seq
    }
}

impl BuiltinSpm {
    /// The path and label of the pool's LUN at index `lun`, found on the
    /// search path (read once per LUN).
    fn lun_place(&mut self, lun: u16) -> Result<(PathBuf, LunLabel), BackendError> {
        let id = self
            .pool
            .luns()
            .get(usize::from(lun))
            .map(|l| l.id)
            .ok_or_else(|| BackendError::new(format!("the pool has no LUN index {lun}")))?;
        if let Some(place) = self.places.get(&id) {
            return Ok(place.clone());
        }
        let found = find_luns(self.domain.id(), &self.search);
        let lun = found.get(&id).ok_or_else(|| {
            BackendError::new(format!(
                "LUN {id} is not on the LUN search path ({}); pass --lun-search with the \
                 directory or device that holds it",
                self.search
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let lun = lun.unambiguous()?;
        let place = (lun.path.clone(), lun.label);
        self.places.insert(id, place.clone());
        Ok(place)
    }
}

/// Bytes one [`LunMover::copy`] step copies at most, whatever it is asked.
pub const COPY_CHUNK: u64 = 8 << 20;

impl LunMover for BuiltinSpm {
    fn find_lun(&self, lun: &str) -> Result<(u16, Uuid), BackendError> {
        let id = match Uuid::parse_str(lun) {
            Some(id) => id,
            None => {
                let label = read_label(Path::new(lun))?.ok_or_else(|| {
                    BackendError::new(format!(
                        "{lun} is neither a LUN UUID nor a device or file with an spmbox LUN \
                         label (`spmbox volume list` and `spmbox status` show the pool's LUNs). \
                         Nothing was changed"
                    ))
                })?;
                if label.domain != self.domain.id() {
                    return Err(BackendError::new(format!(
                        "{lun} is a LUN of domain {}, not of this one ({}). Nothing was changed",
                        label.domain,
                        self.domain.id()
                    )));
                }
                label.lun
            }
        };
        let index = self
            .pool
            .luns()
            .iter()
            .position(|l| l.id == id)
            .ok_or_else(|| {
                BackendError::new(format!(
                    "LUN {id} is not in the pool (its LUNs: {}). Nothing was changed",
                    self.pool
                        .luns()
                        .iter()
                        .map(|l| l.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let index =
            u16::try_from(index).map_err(|_| BackendError::new("LUN index out of range"))?;
        Ok((index, id))
    }

    fn set_draining(&mut self, lun: u16, draining: bool) -> Result<(), BackendError> {
        self.pool
            .set_draining(lun, draining)
            .map_err(|e| BackendError::new(format!("LUN index {lun}: {e}")))
    }

    fn room(&self, lun: u16) -> (u64, u64) {
        let held = self
            .pool
            .volumes()
            .filter_map(|v| self.pool.segments(v.id))
            .flat_map(|s| s.iter())
            .filter(|s| s.lun == lun)
            .map(|s| u64::from(s.extents))
            .sum();
        let mut free = 0u64;
        for (i, _) in self.pool.luns().iter().enumerate() {
            let Ok(i) = u16::try_from(i) else { continue };
            if i == lun || self.pool.is_draining(i) {
                continue;
            }
            self.pool
                .free_runs_on_lun(i, |r| free += u64::from(r.extents));
        }
        (held, free)
    }

    fn volumes_on(&self, lun: u16) -> Vec<Uuid> {
        self.pool
            .volumes()
            .filter(|v| {
                self.pool
                    .segments(v.id)
                    .is_some_and(|s| s.iter().any(|s| s.lun == lun))
            })
            .map(|v| v.id)
            .collect()
    }

    fn next_move(&self, lun: u16) -> Result<Option<Relocation>, BackendError> {
        self.pool.plan_relocation(lun).map_err(|e| match e {
            PoolError::NoSpace { needed, free } => BackendError::new(format!(
                "no free run on the other LUNs holds the next segment whole ({needed} extents; \
                 the largest free run has {free}): add a LUN (`spmbox pool add-lun`) or free \
                 space, then run this again"
            )),
            e => BackendError::new(format!("planning the next move: {e}")),
        })
    }

    fn set_moving(&mut self, volume: Uuid) -> Result<(), BackendError> {
        self.pool
            .set_moving(volume)
            .map_err(|e| BackendError::new(format!("volume {volume}: {e}")))?;
        self.dirty = true;
        self.commit()
    }

    fn moving(&self) -> Uuid {
        self.pool.moving()
    }

    fn copy(&mut self, r: &Relocation, done: u64, max: u64) -> Result<u64, BackendError> {
        let extent = self.pool.extent_size();
        let total = u64::from(r.from.extents) * extent;
        let len = total.saturating_sub(done).min(max).min(COPY_CHUNK);
        if len == 0 {
            return Ok(0);
        }
        let (src_path, src_label) = self.lun_place(r.from.lun)?;
        let (dst_path, dst_label) = self.lun_place(r.to.lun)?;
        let src = Device::open(&src_path, Access::ReadOnly).map_err(|e| {
            BackendError::device(format!("cannot open LUN {}", src_path.display()), e)
        })?;
        let dst = Device::open(&dst_path, Access::ReadWrite).map_err(|e| {
            BackendError::device(format!("cannot open LUN {}", dst_path.display()), e)
        })?;
        let from = src_label.data_offset + u64::from(r.from.first_extent) * extent + done;
        let to = dst_label.data_offset + u64::from(r.to.first_extent) * extent + done;
        let align = src.dio_mem_align().max(dst.dio_mem_align());
        let mut buf = AlignedBuf::zeroed(len as usize, align);
        src.read_at(from, &mut buf).map_err(|e| {
            BackendError::device(format!("reading {} at {from}", src_path.display()), e)
        })?;
        dst.write_at(to, &buf).map_err(|e| {
            BackendError::device(format!("writing {} at {to}", dst_path.display()), e)
        })?;
        Ok(len)
    }

    fn finish_move(&mut self, r: &Relocation, moving_after: Uuid) -> Result<(), BackendError> {
        let (dst_path, _) = self.lun_place(r.to.lun)?;
        Device::open(&dst_path, Access::ReadWrite)
            .and_then(|d| d.sync_data())
            .map_err(|e| {
                BackendError::device(
                    format!("making the copy on {} durable", dst_path.display()),
                    e,
                )
            })?;
        self.pool
            .relocate(r.volume, r.segment, r.to.lun, r.to.first_extent)
            .map_err(|e| {
                BackendError::new(format!("moving a segment of volume {}: {e}", r.volume))
            })?;
        self.pool
            .set_moving(moving_after)
            .map_err(|e| BackendError::new(format!("volume {moving_after}: {e}")))?;
        self.dirty = true;
        self.commit()
    }

    fn drop_lun(&mut self, lun: u16) -> Result<bool, BackendError> {
        let place = self.lun_place(lun).ok();
        let id = self.pool.luns().get(usize::from(lun)).map(|l| l.id);
        match self.pool.drop_lun(lun) {
            Ok(()) => {
                self.dirty = true;
                self.commit()?;
                // Its label goes too, so that nothing takes it for a LUN of
                // this domain any more (`pool add-lun` labels it again).
                let wiped = place
                    .ok_or_else(|| BackendError::new("not on the search path"))
                    .and_then(|(path, _)| {
                        let device = Device::open(&path, Access::ReadWrite)
                            .map_err(|e| BackendError::device("opening it", e))?;
                        let zero = AlignedBuf::zeroed(LABEL_LEN, device.dio_mem_align());
                        device
                            .write_at(0, &zero)
                            .and_then(|()| device.sync_data())
                            .map_err(|e| BackendError::device("writing", e))
                    });
                if let (Err(e), Some(id)) = (wiped, id) {
                    tracing::warn!(
                        "LUN {id} left the pool, but its label could not be wiped ({e}); it \
                         still reads as a LUN of this domain until `pool add-lun` takes it again"
                    );
                }
                Ok(true)
            }
            Err(PoolError::LunInUse) => Ok(false),
            Err(e) => Err(BackendError::new(format!("dropping LUN index {lun}: {e}"))),
        }
    }

    fn extent_size(&self) -> u64 {
        self.pool.extent_size()
    }
}

/// The builtin backend on a host: reads the committed metadata and finds
/// LUNs by their labels.
pub struct BuiltinMaps {
    domain: Domain,
    search: Vec<PathBuf>,
    luns: HashMap<Uuid, FoundLun>,
}

impl BuiltinMaps {
    /// A host's view of the domain on `path`, finding LUNs on `search`.
    pub fn open(path: &Path, search: Vec<PathBuf>) -> Result<BuiltinMaps, BackendError> {
        let domain = Domain::open(path, Access::ReadOnly)?;
        Ok(BuiltinMaps {
            domain,
            search,
            luns: HashMap::new(),
        })
    }

    /// The path of LUN `id`, checked now against its label and the pool
    /// (`pool_extents`: the extents the pool gives it). The search paths
    /// are read again when the LUN is not known yet or was ambiguous or
    /// too small when last looked at.
    fn lun(&mut self, id: Uuid, pool_extents: u32) -> Result<(PathBuf, LunLabel), BackendError> {
        let known = self.luns.get(&id).filter(|l| l.others.is_empty()).cloned();
        let lun = match known {
            Some(lun) => lun,
            None => {
                self.luns = find_luns(self.domain.id(), &self.search);
                self.luns.get(&id).cloned().ok_or_else(|| {
                    BackendError::new(format!(
                        "LUN {id} of the pool is not on any LUN search path ({}); \
                         pass the directory or device that holds it with --lun-search",
                        self.search
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
            }
        };
        lun.unambiguous()?;
        // The size now, not when it was found: a LUN may be cut while the
        // host runs.
        let size = Device::open(&lun.path, Access::ReadOnly)
            .map_err(|e| BackendError::device(format!("cannot open LUN {id}"), e))?
            .size();
        check_lun_size(&lun.path, &lun.label, size, Some(pool_extents))?;
        Ok((lun.path, lun.label))
    }

    /// The map of `volume` in `pool`. Every LUN it lies on is checked
    /// first (see [`check_lun_size`]); a LUN that fails leaves the volume
    /// unmapped.
    pub fn map_in(&mut self, pool: &DomainPool, volume: Uuid) -> Result<Mapping, BackendError> {
        let segments = pool
            .segments(volume)
            .ok_or_else(|| BackendError::new(format!("volume {volume} is not in the pool")))?;
        let extent = pool.extent_size();
        let mut checked: HashMap<u16, (PathBuf, LunLabel)> = HashMap::new();
        let mut runs = Vec::with_capacity(segments.len());
        for s in segments {
            let index = s.lun;
            let (path, label) = match checked.get(&index) {
                Some(found) => found.clone(),
                None => {
                    let lun = pool.luns().get(usize::from(s.lun)).ok_or_else(|| {
                        BackendError::new(format!(
                            "volume {volume} names LUN index {}, which the pool lacks",
                            s.lun
                        ))
                    })?;
                    let found = self.lun(lun.id, lun.extents)?;
                    checked.insert(index, found.clone());
                    found
                }
            };
            runs.push(Run {
                device: path,
                offset: label.data_offset + u64::from(s.first_extent) * extent,
                len: u64::from(s.extents) * extent,
            });
        }
        Ok(Mapping::new(runs))
    }
}

impl VolumeMaps for BuiltinMaps {
    fn refresh(&mut self, volume: Uuid) -> Result<Mapping, BackendError> {
        let (pool, _) = self.domain.read_pool()?;
        self.map_in(&pool, volume)
    }

    fn moving(&mut self) -> Result<Uuid, BackendError> {
        Ok(self.domain.read_pool()?.0.moving())
    }

    fn sizes(&mut self, volume: Uuid) -> Result<VolumeReport, BackendError> {
        let (pool, _) = self.domain.read_pool()?;
        let v = pool.volume(volume).ok_or_else(|| {
            BackendError::new(format!(
                "volume {volume} is not in the pool; create it with `spmbox volume create`"
            ))
        })?;
        Ok(VolumeReport {
            id: volume,
            virtual_size: v.virtual_size,
            size: v.size,
            limit: v.limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_roundtrips_and_any_flip_is_refused() {
        let label = LunLabel {
            domain: Uuid([1; 16]),
            lun: Uuid([2; 16]),
            data_offset: LUN_DATA_OFFSET,
            extent_size: 8 << 20,
            extents: 77,
        };
        let block = label.to_block();
        assert_eq!(LunLabel::parse(&block), Some(label));
        for i in 0..64 {
            let mut bad = block;
            bad[i] ^= 1;
            assert_eq!(LunLabel::parse(&bad), None, "flip at {i}");
        }
        assert_eq!(LunLabel::parse(&[0u8; LABEL_LEN]), None);
    }
}
