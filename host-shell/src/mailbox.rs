//! A mailbox on a device: opening one (superblock checked against the
//! device) and formatting one.

use std::path::{Path, PathBuf};

use spmbox_core::wire::{
    AREA_SIZE, Defect, Geometry, MAGIC, RECORD_LEN, SpmHeader, SpmState, Superblock, Uuid,
};

use crate::device::{Access, AlignedBuf, Device, DeviceError, DeviceKind};
use crate::units::Bytes;

/// Errors of opening or formatting a mailbox. Each names the device and
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The device layer failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// No superblock at all: zeroes or another format.
    #[error("{path} is not an spmbox mailbox: {why}; {hint}")]
    NotAMailbox {
        /// The device.
        path: PathBuf,
        /// What was found instead.
        why: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A superblock that is ours but unusable.
    #[error(
        "the superblock of {path} (offset 0) is damaged: {defect}; the mailbox cannot be used safely. \
         Stop all hosts and the SPM, then re-create it with `spmbox format --force` \
         (pending requests are lost; hosts resend them)"
    )]
    DamagedSuperblock {
        /// The device.
        path: PathBuf,
        /// What is wrong with it.
        defect: Defect,
    },
    /// A superblock of a format version this program does not know.
    #[error(
        "{path} holds an spmbox mailbox of format version {version}; this spmbox reads version {}. \
         Use the spmbox release that formatted it",
        spmbox_core::wire::FORMAT_VERSION
    )]
    UnsupportedVersion {
        /// The device.
        path: PathBuf,
        /// The version found.
        version: u8,
    },
    /// The device's sector size does not fit the mailbox's.
    #[error("{path} has {device}-byte logical sectors, but {what} {mailbox}-byte sectors; {hint}")]
    SectorSizeMismatch {
        /// The device.
        path: PathBuf,
        /// The device's logical sector size (or file system DIO alignment).
        device: u32,
        /// The mailbox's sector size.
        mailbox: u32,
        /// "its mailbox was formatted for" or "--sector-size asks for".
        what: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// The device is smaller than the mailbox.
    #[error("{path} is {} but {what} {}; {hint}", Bytes(*size), Bytes(*needed))]
    TooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The mailbox's size.
        needed: u64,
        /// "its superblock says the mailbox needs" or "a mailbox for N hosts needs".
        what: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// `format` found a mailbox and was not told to overwrite it.
    #[error(
        "{path} already holds an spmbox mailbox{detail}; formatting would lose every request and \
         reply in it. Pass --force to overwrite it"
    )]
    WouldOverwrite {
        /// The device.
        path: PathBuf,
        /// What the existing mailbox is.
        detail: String,
    },
    /// `format` found data that is not an spmbox mailbox and was not told
    /// to overwrite it.
    #[error(
        "{path} holds {found}, not an spmbox mailbox; formatting would destroy it. \
         Check the path, or pass --force to overwrite it"
    )]
    HoldsOtherData {
        /// The device.
        path: PathBuf,
        /// What was found: a LUN label, a damaged superblock, nonzero data.
        found: String,
    },
    /// `format` (even with --force) found the domain on the device live.
    #[error(
        "{path} is the device of a live storage domain: {why}. Formatting it now would give \
         the SPM and the hosts a domain they do not know. Stop the SPM (and the hosts) first; \
         --force does not override this"
    )]
    Live {
        /// The device.
        path: PathBuf,
        /// What shows that the domain is live.
        why: String,
    },
    /// The domain lock could not be taken (not because another process
    /// holds it).
    #[error("{0}")]
    Lock(String),
    /// `--hosts` or `--sector-size` out of range.
    #[error("{0}")]
    Geometry(#[from] spmbox_core::wire::GeometryError),
    /// A value that should always be writable was refused: a bug.
    #[error("internal error: {0}; please report this with the command that caused it")]
    Internal(String),
    /// The random source failed.
    #[error("cannot read random bytes for a new domain UUID: {0}; pass --domain UUID")]
    Random(rustix::io::Errno),
}

impl MailboxError {
    /// Whether the error says the device holds no usable mailbox: none at
    /// all, a damaged or foreign superblock, one that does not fit the
    /// device, or (for `format`) other data in its place. Commands exit
    /// with status 4 for these.
    pub fn is_no_usable_mailbox(&self) -> bool {
        matches!(
            self,
            MailboxError::NotAMailbox { .. }
                | MailboxError::DamagedSuperblock { .. }
                | MailboxError::UnsupportedVersion { .. }
                | MailboxError::SectorSizeMismatch { .. }
                | MailboxError::TooSmall { .. }
                | MailboxError::HoldsOtherData { .. }
        )
    }
}

/// An open mailbox: the device and its validated superblock.
#[derive(Debug)]
pub struct Mailbox {
    device: Device,
    superblock: Superblock,
}

impl Mailbox {
    /// Opens the mailbox on `path`: reads the superblock, checks it and
    /// checks that the device fits it (sector size, size).
    pub fn open(path: &Path, access: Access) -> Result<Mailbox, MailboxError> {
        let device = Device::open(path, access)?;
        let superblock = read_superblock(&device)?;
        check_sector_size(
            &device,
            superblock.geometry.sector_size(),
            "its mailbox was formatted for",
        )?;
        let needed = superblock.geometry.mailbox_size();
        if device.size() < needed {
            return Err(MailboxError::TooSmall {
                path: path.to_owned(),
                size: device.size(),
                needed,
                what: "its superblock says the mailbox needs".into(),
                hint: "the device was truncated or is not the one that was formatted",
            });
        }
        Ok(Mailbox { device, superblock })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.superblock.geometry
    }

    /// Reads `len` bytes at `offset` (both multiples of the sector size).
    pub fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, MailboxError> {
        let mut buf = AlignedBuf::zeroed(len, self.device.dio_mem_align());
        self.device.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Reads the whole mailbox into memory.
    pub fn read_all(&self) -> Result<AlignedBuf, MailboxError> {
        let len = usize::try_from(self.geometry().mailbox_size()).unwrap_or(usize::MAX);
        self.read(0, len)
    }
}

const OTHER_DATA: &str = "check the path: it holds other data, which `spmbox format` would destroy";

/// Reads and decodes the superblock of `device`, turning every way it can
/// be wrong into an error that says what the device holds instead.
fn read_superblock(device: &Device) -> Result<Superblock, MailboxError> {
    let path = device.path().to_owned();
    let len = AREA_SIZE.max(device.sector_size() as usize);
    if device.size() < len as u64 {
        return Err(MailboxError::NotAMailbox {
            path,
            why: format!(
                "it is only {}, smaller than a superblock block",
                Bytes(device.size())
            ),
            hint: OTHER_DATA,
        });
    }
    let mut buf = AlignedBuf::zeroed(len, device.dio_mem_align());
    device.read_at(0, &mut buf)?;
    let record = &buf[..RECORD_LEN];
    match Superblock::decode(record) {
        Ok(Some(superblock)) => Ok(superblock),
        Ok(None) => Err(MailboxError::NotAMailbox {
            path,
            why: "its first 128 bytes are all zero".into(),
            hint: "if it is meant to be one, create it with `spmbox format --device PATH --hosts N`",
        }),
        Err(Defect::BadMagic) => Err(MailboxError::NotAMailbox {
            path,
            why: format!(
                "bytes 4..8 are {:02x?}, not the spmbox magic {:02x?} (\"SPMB\")",
                &record[4..8],
                MAGIC
            ),
            hint: OTHER_DATA,
        }),
        Err(Defect::UnsupportedVersion { version }) => {
            Err(MailboxError::UnsupportedVersion { path, version })
        }
        Err(defect) => Err(MailboxError::DamagedSuperblock { path, defect }),
    }
}

/// Checks that a mailbox of `sector_size`-byte sectors can live on
/// `device`: a block device's logical sector size must equal it; a file's
/// direct-I/O alignment must divide it.
fn check_sector_size(
    device: &Device,
    sector_size: u32,
    what: &'static str,
) -> Result<(), MailboxError> {
    let dev = device.sector_size();
    let (ok, hint) = match device.kind() {
        DeviceKind::BlockDevice => (
            dev == sector_size,
            "a mailbox must be used on a device with the sector size it was formatted for",
        ),
        DeviceKind::File => (
            sector_size % dev == 0,
            "the file system's direct-I/O alignment must divide the mailbox's sector size",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(MailboxError::SectorSizeMismatch {
            path: device.path().to_owned(),
            device: dev,
            mailbox: sector_size,
            what,
            hint,
        })
    }
}

/// What `format` is asked to do.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Host ids 1..=hosts.
    pub hosts: u16,
    /// The sector size; `None`: the device's (a file's: its file system's
    /// direct-I/O alignment, at least 512).
    pub sector_size: Option<u32>,
    /// The domain UUID; `None`: a new random one.
    pub domain: Option<Uuid>,
    /// Overwrite an existing mailbox.
    pub force: bool,
}

/// What `format` did.
#[derive(Debug, Clone)]
pub struct Formatted {
    /// The new superblock.
    pub superblock: Superblock,
    /// Whether the file was created.
    pub created: bool,
}

/// Writes a fresh mailbox to `path`, creating the file (sized exactly) if it
/// does not exist. Refuses, changing nothing: a live domain's device (even
/// with `force`, see [`lock_idle`]); without `force`, a mailbox and any
/// other data in the space the mailbox takes (an all-zero device is
/// fine); a device that is too small or whose sector size does not fit.
/// Over a mailbox, the pool metadata copies a domain keeps after it are
/// zeroed too.
///
/// Order of writes: the superblock is zeroed first and written last, each
/// step made durable before the next, so a crash mid-format never leaves a
/// valid superblock over an unformatted mailbox.
pub fn format(path: &Path, options: &FormatOptions) -> Result<Formatted, MailboxError> {
    // Validate what can be validated before touching anything.
    Geometry::new(options.hosts, options.sector_size.unwrap_or(512))?;
    let lock = lock_idle(path)?;
    format_locked(path, options, &lock)
}

/// Proof that no SPM and no admin command serves the domain on a device:
/// the domain lock, held until this is dropped. `None` for a path that
/// does not exist yet.
#[derive(Debug)]
pub struct IdleLock {
    _file: Option<std::fs::File>,
}

/// Takes the domain lock of the device at `path` for `format` or
/// `pool create`, refusing at once (without waiting) if another process
/// holds it, if an SPM answers on the domain's control socket, or if the
/// SPM header says *active* and its heartbeat moves (watched for 2.5
/// heartbeat intervals). A path that does not exist is not live.
pub fn lock_idle(path: &Path) -> Result<IdleLock, MailboxError> {
    use crate::spm_daemon;
    if std::fs::metadata(path).is_err() {
        return Ok(IdleLock { _file: None });
    }
    let live = |why: String| MailboxError::Live {
        path: path.to_owned(),
        why,
    };
    let held = std::cell::Cell::new(false);
    let file = spm_daemon::lock_domain(path, || {
        held.set(true);
        Err(crate::backend::BackendError::new("held"))
    })
    .map_err(|e| {
        if held.get() {
            live("another process on this machine (an SPM or an admin command) holds its domain lock".into())
        } else {
            MailboxError::Lock(e.to_string())
        }
    })?;
    // Only a readable superblock names a domain whose SPM may answer.
    if let Ok(mailbox) = Mailbox::open(path, Access::ReadOnly) {
        let domain = mailbox.superblock().domain;
        let socket = spm_daemon::default_control(domain);
        if let Ok(Some(_)) =
            spm_daemon::control_request(&socket, &serde_json::json!({"op": "status"}))
        {
            return Err(live(format!(
                "the SPM of domain {domain} answers on its control socket {}",
                socket.display()
            )));
        }
        spm_daemon::check_no_live_spm(&mailbox, &std::sync::atomic::AtomicBool::new(false))
            .map_err(|e| live(e.to_string()))?;
    }
    Ok(IdleLock { _file: Some(file) })
}

/// [`format`] for a caller that holds the domain lock (`pool create`,
/// which labels LUNs and writes the pool metadata under the same lock).
pub fn format_locked(
    path: &Path,
    options: &FormatOptions,
    _lock: &IdleLock,
) -> Result<Formatted, MailboxError> {
    let probe_sector = options.sector_size.unwrap_or(512);
    Geometry::new(options.hosts, probe_sector)?;
    let domain = match options.domain {
        Some(domain) => domain,
        None => random_uuid()?,
    };

    let (device, created) = match Device::open(path, Access::ReadWrite) {
        Ok(device) => (device, false),
        Err(DeviceError::Open { source, .. }) if source == rustix::io::Errno::NOENT => {
            let sector = options.sector_size.unwrap_or(4096);
            let size = Geometry::new(options.hosts, sector)?.mailbox_size();
            (Device::create_file(path, size)?, true)
        }
        Err(e) => return Err(e.into()),
    };
    let result = format_device(&device, options, domain, created);
    if result.is_err() && created {
        // Leave nothing behind that we made.
        let _ = std::fs::remove_file(path);
    }
    result.map(|superblock| Formatted {
        superblock,
        created,
    })
}

fn format_device(
    device: &Device,
    options: &FormatOptions,
    domain: Uuid,
    created: bool,
) -> Result<Superblock, MailboxError> {
    let path = device.path().to_owned();
    let sector_size = options
        .sector_size
        .unwrap_or_else(|| device.sector_size().max(512));
    let geometry = Geometry::new(options.hosts, sector_size)?;
    check_sector_size(device, sector_size, "--sector-size asks for")?;
    let needed = geometry.mailbox_size();
    if device.size() < needed {
        return Err(MailboxError::TooSmall {
            path,
            size: device.size(),
            needed,
            what: format!("a mailbox for {} hosts needs", options.hosts),
            hint: "use a larger device, fewer --hosts, or a path that does not exist yet (format creates the file)",
        });
    }
    // What the device holds now: a superblock (valid or damaged) means the
    // space after the mailbox may hold this program's pool metadata.
    let existing = if created {
        None
    } else {
        match read_superblock(device) {
            Ok(old) => Some(Some(old)),
            Err(MailboxError::NotAMailbox { .. }) => None,
            Err(MailboxError::Device(e)) => return Err(e.into()),
            Err(_) => Some(None),
        }
    };
    if !created && !options.force {
        refuse_existing(device)?;
        if existing.is_none() {
            refuse_other_data(device, needed)?;
        }
    }

    let superblock = Superblock { domain, geometry };
    let align = device.dio_mem_align();
    // 1. Invalidate any old superblock, durably.
    let block = AlignedBuf::zeroed(AREA_SIZE.max(sector_size as usize), align);
    device.write_at(0, &block)?;
    device.sync_data()?;
    // 2. Zero the rest of the mailbox (a new file already reads as zero).
    if !created {
        let chunk_len = 1 << 20;
        let zeros = AlignedBuf::zeroed(chunk_len, align);
        let mut offset = AREA_SIZE as u64;
        while offset < needed {
            let len = (needed - offset).min(chunk_len as u64) as usize;
            if len == chunk_len {
                device.write_at(offset, &zeros)?;
            } else {
                device.write_at(offset, &AlignedBuf::zeroed(len, align))?;
            }
            offset += len as u64;
        }
    }
    // 2b. A domain's pool metadata copies (where the old geometry and the
    // new one put them), so that the new domain never loads the old pool.
    if let Some(old) = existing {
        let mut ranges = vec![geometry];
        ranges.extend(old.map(|o| o.geometry));
        for g in ranges {
            let at = crate::domain::metadata_offset(g);
            let len = crate::domain::domain_size(g) - at;
            if at + len <= device.size() {
                device.write_at(at, &AlignedBuf::zeroed(len as usize, align))?;
            }
        }
    }
    // 3. A vacant SPM header at epoch 0.
    let spm = SpmHeader {
        domain,
        epoch: 0,
        spm_id: 0,
        state: SpmState::Vacant,
        heartbeat_interval_ms: 0,
        heartbeat: 0,
    };
    write_block_record(
        device,
        spmbox_core::wire::SPM_HEADER_OFFSET,
        &spm.to_bytes().map_err(field_bug)?,
    )?;
    device.sync_data()?;
    // 4. The superblock, last.
    write_block_record(device, 0, &superblock.to_bytes().map_err(field_bug)?)?;
    device.sync_data()?;
    Ok(superblock)
}

/// A value built from a valid geometry and domain is always emittable; if
/// not, that is a bug, reported rather than panicked on.
fn field_bug(field: spmbox_core::wire::Field) -> MailboxError {
    MailboxError::Internal(format!("refused to emit a record: field {field}"))
}

/// Writes a block whose record 0 is `record` and whose rest is zero.
fn write_block_record(
    device: &Device,
    offset: u64,
    record: &[u8; RECORD_LEN],
) -> Result<(), MailboxError> {
    let mut block = AlignedBuf::zeroed(AREA_SIZE, device.dio_mem_align());
    block[..RECORD_LEN].copy_from_slice(record);
    device.write_at(offset, &block)?;
    Ok(())
}

/// Refuses to format over anything that looks like a mailbox: a valid
/// superblock, or a damaged one (the magic is there).
fn refuse_existing(device: &Device) -> Result<(), MailboxError> {
    let path = device.path().to_owned();
    match read_superblock(device) {
        Ok(existing) => Err(MailboxError::WouldOverwrite {
            path,
            detail: format!(
                " (domain {}, {} hosts, {}-byte sectors)",
                existing.domain,
                existing.geometry.max_hosts(),
                existing.geometry.sector_size()
            ),
        }),
        Err(MailboxError::NotAMailbox { .. }) => Ok(()),
        Err(MailboxError::Device(e)) => Err(e.into()),
        Err(other) => Err(MailboxError::HoldsOtherData {
            path,
            found: format!("a mailbox whose superblock cannot be used ({other})"),
        }),
    }
}

/// Refuses a device whose first `len` bytes (what `format` would write,
/// or `pool create`: the mailbox and the pool metadata) hold anything but
/// zeroes: a data LUN's label (named with its domain), or the first
/// nonzero byte's offset.
pub fn refuse_other_data(device: &Device, len: u64) -> Result<(), MailboxError> {
    let path = device.path().to_owned();
    let len = len.min(device.size());
    let align = device.dio_mem_align();
    let chunk_len: u64 = 1 << 20;
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(chunk_len);
        // Whole sectors: the device's size is a multiple of its sector.
        let mut buf = AlignedBuf::zeroed(n as usize, align);
        device.read_at(offset, &mut buf)?;
        if offset == 0
            && let Some(label) = crate::domain::LunLabel::parse(&buf)
        {
            return Err(MailboxError::HoldsOtherData {
                path,
                found: format!(
                    "the label of LUN {} of storage domain {} (a data LUN: its volumes' data \
                     would be lost)",
                    label.lun, label.domain
                ),
            });
        }
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            let at = offset + i as u64;
            return Err(MailboxError::HoldsOtherData {
                path,
                found: format!("nonzero data at offset {at} ({at:#x})"),
            });
        }
        offset += n;
    }
    Ok(())
}

/// A random (version 4) UUID from the kernel's random source.
pub fn random_uuid() -> Result<Uuid, MailboxError> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let n =
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(MailboxError::Random)?;
        filled += n;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(Uuid(bytes))
}
