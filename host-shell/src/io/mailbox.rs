//! A mailbox on a device: opening one (superblock checked against the
//! device) and formatting one.

use std::path::{Path, PathBuf};

use spmbox_core::wire::{
    AREA_SIZE, Defect, Epoch, Geometry, INBOX_OFFSET, MAGIC, RECORD_LEN, SUPERBLOCK_BACKUP_OFFSET,
    SUPERBLOCK_OFFSET, SpmHeader, Superblock, Uuid,
};

use crate::io::device::{Access, AlignedBuf, Device, DeviceError, DeviceKind};
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
        "the superblock of {path} (offset 0) is damaged: {defect}, and so is its backup (offset \
         0xF000); the mailbox cannot be used safely. Rewrite both, keeping the domain, with \
         `spmbox repair --device {path} --hosts N --sector-size S` (N and S as the domain was \
         made; the domain UUID is read from the SPM header, or give --domain UUID); the pool \
         metadata, the LUNs and every request stay as they are",
        path = path.display()
    )]
    DamagedSuperblock {
        /// The device.
        path: PathBuf,
        /// What is wrong with it.
        defect: Defect,
    },
    /// A superblock of a format version this program does not know: what
    /// to do depends on the version (see [`unsupported_version`]).
    #[error("{}", unsupported_version(path, *version))]
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
    /// `upgrade` found the domain on the device live.
    #[error(
        "{path} is the device of a live storage domain: {why}. `spmbox upgrade` rewrites the \
         records the SPM and the hosts read and write: stop the SPM (`systemctl stop \
         spmbox-spm@NAME`) and every host (`systemctl stop spmbox-host@NAME` on each) first, \
         then run it again. Nothing was written",
        path = path.display()
    )]
    LiveUpgrade {
        /// The device.
        path: PathBuf,
        /// What shows that the domain is live.
        why: String,
    },
    /// `upgrade` cannot tell what the mailbox is; the message says why.
    /// Nothing was written.
    #[error("{0}")]
    CannotUpgrade(String),
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
    /// `repair` cannot tell what the superblock should be; the message says
    /// what to give. Nothing was written.
    #[error("{0}")]
    CannotRepair(String),
    /// The random source failed.
    #[error("cannot read random bytes for a new domain UUID: {0}; pass --domain UUID")]
    Random(rustix::io::Errno),
}

/// The format versions `spmbox upgrade` converts from, in place. Their
/// record layouts are the current one's but for fields that were reserved
/// (zero) in them and whose format value is zero now, and the doorbell's
/// `rings` (version 3), which version 2 lacks.
pub const UPGRADABLE_FROM: [u8; 2] = [2, 3];

/// Whether `spmbox upgrade` converts format `version` in place.
pub fn upgradable(version: u8) -> bool {
    UPGRADABLE_FROM.contains(&version)
}

/// The message of [`MailboxError::UnsupportedVersion`]: from the version
/// `spmbox upgrade` converts, run it; from an older one, write a new
/// mailbox keeping the domain; from a newer one, use a newer spmbox.
fn unsupported_version(path: &Path, version: u8) -> String {
    use spmbox_core::wire::FORMAT_VERSION;
    let path = path.display();
    let head = format!(
        "{path} holds an spmbox mailbox of format version {version}; this spmbox reads and writes \
         version {FORMAT_VERSION}"
    );
    if upgradable(version) {
        format!(
            "{head}. Convert it in place, keeping the SPM's epoch and pool commit and every \
             request and reply: stop the SPM and every host, then run `spmbox upgrade --device \
             {path}` and start them again with this spmbox"
        )
    } else if version < FORMAT_VERSION {
        format!(
            "{head}. A version-{version} mailbox is not converted in place: stop the SPM and \
             every host and write a version-{FORMAT_VERSION} mailbox over it keeping the domain: \
             `spmbox format --device {path} --hosts N --sector-size S --domain UUID --force` (the \
             pool metadata and the LUNs are kept; requests in flight are sent again by the hosts)"
        )
    } else {
        format!("{head}. Use a newer spmbox, one that reads version {version}")
    }
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
    let primary = read_superblock_at(device, SUPERBLOCK_OFFSET, len);
    if matches!(
        primary,
        Ok(_) | Err(MailboxError::UnsupportedVersion { .. })
    ) {
        return primary;
    }
    if device.size() >= INBOX_OFFSET
        && let Ok(backup) = read_superblock_at(device, SUPERBLOCK_BACKUP_OFFSET, len)
    {
        let why = primary.err().map_or_else(String::new, |e| e.to_string());
        tracing::warn!(
            "{why} -- using the superblock's backup at offset 0xF000 (domain {}). Repair the \
             superblock with `spmbox repair --device {}`",
            backup.domain,
            path.display()
        );
        return Ok(backup);
    }
    primary
}

/// Reads and decodes the superblock record at `offset` (0, or the backup).
fn read_superblock_at(
    device: &Device,
    offset: u64,
    len: usize,
) -> Result<Superblock, MailboxError> {
    let path = device.path().to_owned();
    let mut buf = AlignedBuf::zeroed(len, device.dio_mem_align());
    device.read_at(offset, &mut buf)?;
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
    use crate::daemon::{control, spm};
    if std::fs::metadata(path).is_err() {
        return Ok(IdleLock { _file: None });
    }
    let live = |why: String| MailboxError::Live {
        path: path.to_owned(),
        why,
    };
    let held = std::cell::Cell::new(false);
    let file = spm::lock_domain(path, || {
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
        let socket = control::default_control(domain);
        if let Ok(Some(_)) = control::control_request(&socket, &serde_json::json!({"op": "status"}))
        {
            return Err(live(format!(
                "the SPM of domain {domain} answers on its control socket {}",
                socket.display()
            )));
        }
        spm::check_no_live_spm(&mailbox, &std::sync::atomic::AtomicBool::new(false))
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
    // new one put them), so that the new domain never loads the old pool;
    // kept when `--domain` names the domain the device holds already (the
    // mailbox is rewritten for that same domain, as from format version 1).
    let same_domain = options.domain.is_some() && options.domain == held_domain(device)?;
    if let Some(old) = existing.filter(|_| !same_domain) {
        let mut ranges = vec![geometry];
        ranges.extend(old.map(|o| o.geometry));
        for g in ranges {
            let at = crate::backend::builtin::metadata_offset(g);
            let len = crate::backend::builtin::domain_size(g) - at;
            if at + len <= device.size() {
                device.write_at(at, &AlignedBuf::zeroed(len as usize, align))?;
            }
        }
    }
    // 3. A vacant SPM header at epoch 0.
    let spm = SpmHeader::vacant(domain, Epoch::ZERO);
    write_block_record(
        device,
        spmbox_core::wire::SPM_HEADER_OFFSET,
        &spm.to_bytes().map_err(field_bug)?,
    )?;
    device.sync_data()?;
    // 4. The superblock, last: its backup, then the superblock itself.
    write_superblocks(device, &superblock)?;
    Ok(superblock)
}

/// The domain UUID a device's superblock (or its backup) names, whatever
/// its format version or checksum: the prefix of every version keeps the
/// magic and the domain where they are. `None` without the magic.
fn held_domain(device: &Device) -> Result<Option<Uuid>, MailboxError> {
    let len = AREA_SIZE.max(device.sector_size() as usize);
    for offset in [SUPERBLOCK_OFFSET, SUPERBLOCK_BACKUP_OFFSET] {
        if offset + len as u64 > device.size() {
            continue;
        }
        let mut buf = AlignedBuf::zeroed(len, device.dio_mem_align());
        device.read_at(offset, &mut buf)?;
        if buf[4..8] == MAGIC {
            let mut domain = [0u8; 16];
            domain.copy_from_slice(&buf[16..32]);
            return Ok(Some(Uuid(domain)));
        }
    }
    Ok(None)
}

/// Writes `superblock` to its backup block and then to block 0, each made
/// durable before the next.
fn write_superblocks(device: &Device, superblock: &Superblock) -> Result<(), MailboxError> {
    let record = superblock.to_bytes().map_err(field_bug)?;
    write_block_record(device, SUPERBLOCK_BACKUP_OFFSET, &record)?;
    device.sync_data()?;
    write_block_record(device, SUPERBLOCK_OFFSET, &record)?;
    device.sync_data()?;
    Ok(())
}

/// What `repair` rewrote the superblock from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairedFrom {
    /// Both copies were valid and equal: nothing was written.
    Intact,
    /// The superblock at offset 0.
    Primary,
    /// The backup at offset 0xF000.
    Backup,
    /// Neither copy: the geometry given and the domain of the SPM header
    /// (or the one given).
    Given,
}

/// Rewrites a damaged superblock or backup from the intact copy; with both
/// damaged, from `hosts`, `sector_size` and the domain UUID of the SPM
/// header (or `domain`). Writes nothing but the two superblock blocks, so
/// the pool metadata, the LUNs and every request and reply stay as they
/// are. Refuses when the two copies are valid but differ, or when a given
/// value contradicts a valid copy.
pub fn repair(
    path: &Path,
    hosts: Option<u16>,
    sector_size: Option<u32>,
    domain: Option<Uuid>,
) -> Result<(Superblock, RepairedFrom), MailboxError> {
    let device = Device::open(path, Access::ReadWrite)?;
    let len = AREA_SIZE.max(device.sector_size() as usize);
    let primary = read_superblock_at(&device, SUPERBLOCK_OFFSET, len);
    let backup = if device.size() >= INBOX_OFFSET {
        Some(read_superblock_at(&device, SUPERBLOCK_BACKUP_OFFSET, len))
    } else {
        None
    };
    // A copy of another format version is not damaged: rewriting it as
    // this version would leave every other record of the old version
    // (and `spmbox upgrade` would then find nothing to convert).
    for copy in [Some(&primary), backup.as_ref()].into_iter().flatten() {
        if let Err(MailboxError::UnsupportedVersion { version, .. }) = copy {
            return Err(MailboxError::UnsupportedVersion {
                path: path.to_owned(),
                version: *version,
            });
        }
    }
    let primary = primary.ok();
    let backup = backup.and_then(Result::ok);
    let (superblock, from) = match (primary, backup) {
        (Some(p), Some(b)) if p == b => (p, RepairedFrom::Intact),
        (Some(p), Some(b)) => {
            return Err(MailboxError::CannotRepair(format!(
                "the superblock of {} (domain {}, {} hosts) and its backup (domain {}, {} hosts) \
                 are both valid but differ; find out which is right before anything is rewritten",
                path.display(),
                p.domain,
                p.geometry.max_hosts(),
                b.domain,
                b.geometry.max_hosts()
            )));
        }
        (Some(p), None) => (p, RepairedFrom::Primary),
        (None, Some(b)) => (b, RepairedFrom::Backup),
        (None, None) => {
            let found = {
                let mut buf = AlignedBuf::zeroed(len, device.dio_mem_align());
                device.read_at(spmbox_core::wire::SPM_HEADER_OFFSET, &mut buf)?;
                match SpmHeader::decode(&buf[..RECORD_LEN]) {
                    // Both superblocks lost, and the SPM header says the
                    // mailbox is of another version: as above.
                    Err(Defect::UnsupportedVersion { version }) => {
                        return Err(MailboxError::UnsupportedVersion {
                            path: path.to_owned(),
                            version,
                        });
                    }
                    found => found.ok().flatten().map(|h| h.domain),
                }
            };
            let domain = domain.or(found).ok_or_else(|| {
                MailboxError::CannotRepair(format!(
                    "neither the superblock of {} nor its backup is intact, and the SPM header \
                     names no domain: give the domain UUID with --domain (`spmbox status` on a \
                     host's records, or the LUN labels, show it)",
                    path.display()
                ))
            })?;
            let (Some(hosts), Some(sector)) = (hosts, sector_size) else {
                return Err(MailboxError::CannotRepair(format!(
                    "neither the superblock of {} nor its backup is intact: give --hosts and \
                     --sector-size as the domain was made",
                    path.display()
                )));
            };
            let geometry = Geometry::new(hosts, sector)?;
            check_sector_size(&device, sector, "--sector-size asks for")?;
            (Superblock { domain, geometry }, RepairedFrom::Given)
        }
    };
    let contradicts = hosts.is_some_and(|h| h != superblock.geometry.max_hosts())
        || sector_size.is_some_and(|s| s != superblock.geometry.sector_size())
        || domain.is_some_and(|d| d != superblock.domain);
    if contradicts && from != RepairedFrom::Given {
        return Err(MailboxError::CannotRepair(format!(
            "{} has an intact superblock copy (domain {}, {} hosts, {}-byte sectors) that the \
             values given contradict; nothing was written",
            path.display(),
            superblock.domain,
            superblock.geometry.max_hosts(),
            superblock.geometry.sector_size()
        )));
    }
    if from != RepairedFrom::Intact {
        write_superblocks(&device, &superblock)?;
    }
    Ok((superblock, from))
}

/// What `upgrade` did.
#[derive(Debug, Clone)]
pub struct Upgraded {
    /// The superblock (of the new version when converted).
    pub superblock: Superblock,
    /// The version found: one of [`UPGRADABLE_FROM`], or the current one (then
    /// nothing was written).
    pub from_version: u8,
    /// The version now.
    pub to_version: u8,
    /// Valid records of the old version rewritten as the new one (a
    /// doorbell cleared not counted).
    pub records_rewritten: usize,
    /// A valid doorbell of the old version was written empty.
    pub doorbell_cleared: bool,
    /// Records left as they were because they are defective in the old
    /// version (a bad checksum, another version, a wrong place or value).
    pub defective_left: usize,
    /// Records of the new version found already (an earlier run was
    /// interrupted), left as they were.
    pub already_new: usize,
    /// The superblock or its backup is not a valid copy of the new
    /// version now (it was damaged before): `spmbox repair` rewrites it.
    pub superblock_needs_repair: bool,
    /// The SPM header as it is now: its epoch and pool commit are kept.
    pub spm_header: Result<Option<SpmHeader>, Defect>,
}

impl Upgraded {
    /// Nothing done yet to the mailbox of `superblock`, found at
    /// `from_version`.
    fn nothing(
        superblock: Superblock,
        from_version: u8,
        spm_header: Result<Option<SpmHeader>, Defect>,
    ) -> Upgraded {
        Upgraded {
            superblock,
            from_version,
            to_version: spmbox_core::wire::FORMAT_VERSION,
            records_rewritten: 0,
            doorbell_cleared: false,
            defective_left: 0,
            already_new: 0,
            superblock_needs_repair: false,
            spm_header,
        }
    }
}

/// The longest `upgrade` watches the heartbeats of a domain's SPM and hosts.
pub const UPGRADE_WATCH_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Converts the mailbox on `path` from a format version of
/// [`UPGRADABLE_FROM`] (2 or 3) to the current one in place, keeping the
/// SPM header (its epoch and pool commit), every request and reply and
/// every generation. The fields new in version 4 (`release_commit`,
/// `release_ack`) were reserved, so they are 0: their format value.
///
/// Refuses, writing nothing: a live domain (the domain lock held, an SPM
/// answering on its control socket, or an SPM or a host whose heartbeat
/// moves, see [`check_no_live_heartbeat`]); a mailbox of any other version
/// ([`MailboxError::UnsupportedVersion`]); no usable superblock. A mailbox
/// of the current version is left as it is.
///
/// Every record of the old version that is valid (its checksum, magic and
/// version byte, and, converted, valid at its place for a reader of the
/// new version) is rewritten with the new version byte and checksum; a
/// version-2 doorbell, whose `rings` field (new in version 3) must not be
/// 0, is written empty instead (it is only a hint: the SPM's full scans
/// find every request).
/// Empty records, records of the new version and defective ones stay as
/// they are, byte for byte.
///
/// Crash safety. The mailbox is read once; only the sectors that change
/// are written back, in three steps, each made durable before the next:
/// (1) the SPM header, the doorbell and the host areas, (2) the superblock's
/// backup, (3) the superblock. Every record lies within one sector and is
/// written whole or not at all, and every record written is either its old
/// bytes or the same fields under the new version. So a crash at any point
/// leaves each record either as it was or converted, with nothing lost:
/// - before (2) completes, the superblock (or, if it is damaged, its
///   backup) is still of the old version: every reader of the new version
///   refuses the mailbox, none of the old acts on the records already
///   converted (they are of an unknown version to it), and running
///   `spmbox upgrade` again converts what is left: records of the new
///   version are left as they are, the doorbell is empty or cleared again;
/// - after (2), before (3): the backup is of the new version and every
///   other record is converted and durable; the superblock at offset 0 is
///   still of the old version, so readers refuse the mailbox, and running
///   `spmbox upgrade` again converts the superblock alone;
/// - after (3) the upgrade is complete, and a run again finds the new
///   version and writes nothing.
///
/// Nothing else writes the mailbox meanwhile: the SPM and the hosts are
/// stopped (checked as far as can be seen), and no spmbox daemon of either
/// version runs on a mailbox whose superblock is not of its version.
pub fn upgrade(path: &Path) -> Result<Upgraded, MailboxError> {
    let live = |e: MailboxError| match e {
        MailboxError::Live { path, why } => MailboxError::LiveUpgrade { path, why },
        other => other,
    };
    let _lock = lock_idle(path).map_err(live)?;
    let device = Device::open(path, Access::ReadOnly)?;
    let found = find_superblock_any_version(&device)?;
    let superblock = match found.version {
        spmbox_core::wire::FORMAT_VERSION => {
            drop(device);
            return already_upgraded(path);
        }
        version if upgradable(version) => found.superblock.ok_or_else(|| {
            MailboxError::Internal("a superblock of the old version without a geometry".into())
        })?,
        version => {
            return Err(MailboxError::UnsupportedVersion {
                path: path.to_owned(),
                version,
            });
        }
    };
    let geometry = superblock.geometry;
    check_sector_size(
        &device,
        geometry.sector_size(),
        "its mailbox was formatted for",
    )?;
    if device.size() < geometry.mailbox_size() {
        return Err(MailboxError::TooSmall {
            path: path.to_owned(),
            size: device.size(),
            needed: geometry.mailbox_size(),
            what: "its superblock says the mailbox needs".into(),
            hint: "the device was truncated or is not the one that was formatted",
        });
    }
    check_no_live_control_socket(path, superblock.domain)?;
    check_no_live_heartbeat(&device, &superblock)?;

    // Read everything once, convert in memory.
    let len = usize::try_from(geometry.mailbox_size()).unwrap_or(usize::MAX);
    let mut image = AlignedBuf::zeroed(len, device.dio_mem_align());
    device.read_at(0, &mut image)?;
    let before = image.to_vec();
    let mut done = Upgraded::nothing(superblock, found.version, Ok(None));
    for (offset, at, kind) in record_places(&superblock) {
        let start = offset as usize;
        let Some(record) = image.get_mut(start..start + RECORD_LEN) else {
            continue;
        };
        match convert_record(record, &at, kind, found.version) {
            Converted::Empty => {}
            Converted::AlreadyNew => done.already_new += 1,
            Converted::Rewritten => done.records_rewritten += 1,
            Converted::DoorbellCleared => done.doorbell_cleared = true,
            Converted::Defective => done.defective_left += 1,
        }
    }
    let at0 = spmbox_core::wire::Location {
        domain: superblock.domain,
        host_id: spmbox_core::wire::HostId::NONE,
        index: 0,
    };
    let head = |offset: u64| &image[offset as usize..offset as usize + RECORD_LEN];
    let superblock = match Superblock::parse(head(SUPERBLOCK_OFFSET), &at0) {
        Ok(Some(primary)) => primary,
        _ => Superblock::parse(head(SUPERBLOCK_BACKUP_OFFSET), &at0)
            .ok()
            .flatten()
            .ok_or_else(|| {
                MailboxError::Internal(
                    "neither superblock copy converted; nothing was written".into(),
                )
            })?,
    };
    done.superblock = superblock;
    done.superblock_needs_repair = [SUPERBLOCK_OFFSET, SUPERBLOCK_BACKUP_OFFSET]
        .iter()
        .any(|&at| Superblock::parse(head(at), &at0) != Ok(Some(superblock)));
    done.spm_header = SpmHeader::parse(head(spmbox_core::wire::SPM_HEADER_OFFSET), &at0);

    // Write back the sectors that changed: the host areas, the SPM header
    // and the doorbell; then the backup; then the superblock.
    let device = Device::open(path, Access::ReadWrite)?;
    let sector = geometry.sector_size() as usize;
    let superblock_block = SUPERBLOCK_OFFSET as usize..AREA_SIZE;
    let backup_block = SUPERBLOCK_BACKUP_OFFSET as usize..INBOX_OFFSET as usize;
    let steps: [&dyn Fn(usize) -> bool; 3] = [
        &|at| !superblock_block.contains(&at) && !backup_block.contains(&at),
        &|at| backup_block.contains(&at),
        &|at| superblock_block.contains(&at),
    ];
    for step in steps {
        let mut wrote = false;
        let mut run: Option<std::ops::Range<usize>> = None;
        for at in (0..len).step_by(sector) {
            let changed = step(at) && image[at..at + sector] != before[at..at + sector];
            match (&mut run, changed) {
                (Some(r), true) if r.end == at => r.end = at + sector,
                (_, true) => {
                    if let Some(r) = run.take() {
                        device.write_from(r.start as u64, &image, r)?;
                    }
                    run = Some(at..at + sector);
                    wrote = true;
                }
                (_, false) => {}
            }
        }
        if let Some(r) = run.take() {
            device.write_from(r.start as u64, &image, r)?;
        }
        if wrote {
            device.sync_data()?;
        }
    }
    Ok(done)
}

/// `upgrade` on a mailbox of the current version: what it holds, nothing
/// written.
fn already_upgraded(path: &Path) -> Result<Upgraded, MailboxError> {
    let mailbox = Mailbox::open(path, Access::ReadOnly)?;
    let sector = mailbox.geometry().sector_size() as usize;
    let buf = mailbox.read(spmbox_core::wire::SPM_HEADER_OFFSET, sector)?;
    let at0 = spmbox_core::wire::Location {
        domain: mailbox.superblock().domain,
        host_id: spmbox_core::wire::HostId::NONE,
        index: 0,
    };
    Ok(Upgraded::nothing(
        *mailbox.superblock(),
        spmbox_core::wire::FORMAT_VERSION,
        SpmHeader::parse(&buf[..RECORD_LEN], &at0),
    ))
}

/// A superblock copy of any version: its version byte, and its domain
/// and geometry where the layout is known.
struct AnyVersion {
    version: u8,
    superblock: Option<Superblock>,
}

/// The superblock (or, if it is damaged, its backup) of any version whose
/// checksum is right: its version byte, and for the current version and
/// the versions of [`UPGRADABLE_FROM`] its domain and geometry, checked as a reader of the
/// current version checks them. Neither copy usable: the error `open`
/// gives. Two valid copies that differ: refused.
fn find_superblock_any_version(device: &Device) -> Result<AnyVersion, MailboxError> {
    let len = AREA_SIZE.max(device.sector_size() as usize);
    let copy = |offset: u64| -> Result<Option<AnyVersion>, MailboxError> {
        if offset + len as u64 > device.size() || device.size() < INBOX_OFFSET {
            return Ok(None);
        }
        let mut buf = AlignedBuf::zeroed(len, device.dio_mem_align());
        device.read_at(offset, &mut buf)?;
        let record = &buf[..RECORD_LEN];
        if !checksum_ok(record) {
            return Ok(None);
        }
        let version = record[9];
        let mut as_current = [0u8; RECORD_LEN];
        as_current.copy_from_slice(record);
        if upgradable(version) {
            as_current[9] = spmbox_core::wire::FORMAT_VERSION;
            seal(&mut as_current);
        }
        match Superblock::decode(&as_current) {
            Ok(Some(superblock)) => Ok(Some(AnyVersion {
                version,
                superblock: Some(superblock),
            })),
            // Another version: its layout is unknown, its version byte is
            // all that counts.
            Err(Defect::UnsupportedVersion { .. }) if record[8] == 1 => Ok(Some(AnyVersion {
                version,
                superblock: None,
            })),
            _ => Ok(None),
        }
    };
    let primary = copy(SUPERBLOCK_OFFSET)?;
    let backup = copy(SUPERBLOCK_BACKUP_OFFSET)?;
    if let (Some(p), Some(b)) = (&primary, &backup)
        && let (Some(p), Some(b)) = (p.superblock, b.superblock)
        && p != b
    {
        return Err(MailboxError::CannotUpgrade(format!(
            "the superblock of {} (domain {}, {} hosts) and its backup (domain {}, {} hosts) are \
             both valid but differ; find out which is right before anything is rewritten \
             (`spmbox inspect` shows both). Nothing was written",
            device.path().display(),
            p.domain,
            p.geometry.max_hosts(),
            b.domain,
            b.geometry.max_hosts()
        )));
    }
    if let Some(found) = primary {
        return Ok(found);
    }
    if let Some(found) = backup {
        tracing::warn!(
            "the superblock of {} (offset 0) is damaged; using its backup at offset 0xF000 \
             (format version {})",
            device.path().display(),
            found.version
        );
        return Ok(found);
    }
    match read_superblock(device) {
        Err(e) => Err(e),
        Ok(_) => Err(MailboxError::Internal(
            "a superblock readable only as the current version".into(),
        )),
    }
}

/// Whether `record` carries the magic and a right checksum (of any
/// version: the prefix's first ten bytes are the same in all).
fn checksum_ok(record: &[u8]) -> bool {
    record.len() == RECORD_LEN
        && record[4..8] == MAGIC
        && record[..4]
            == spmbox_core::wire::CRC32C
                .checksum(&record[4..])
                .to_le_bytes()
}

/// Seals `record` with the checksum of its bytes 4..128.
fn seal(record: &mut [u8; RECORD_LEN]) {
    let crc = spmbox_core::wire::CRC32C.checksum(&record[4..]);
    record[..4].copy_from_slice(&crc.to_le_bytes());
}

/// Every record `upgrade` looks at: its offset, the place a reader checks
/// it against, and the kind that belongs there.
fn record_places(
    superblock: &Superblock,
) -> Vec<(u64, spmbox_core::wire::Location, spmbox_core::wire::Kind)> {
    use spmbox_core::wire::{HostId, Kind, Location};
    let g = superblock.geometry;
    let domain = superblock.domain;
    let at = |host_id: HostId, index: u16| Location {
        domain,
        host_id,
        index,
    };
    let mut places = vec![
        (SUPERBLOCK_OFFSET, at(HostId::NONE, 0), Kind::Superblock),
        (
            spmbox_core::wire::SPM_HEADER_OFFSET,
            at(HostId::NONE, 0),
            Kind::SpmHeader,
        ),
        (
            spmbox_core::wire::DOORBELL_OFFSET,
            at(HostId::NONE, 0),
            Kind::Doorbell,
        ),
        (
            SUPERBLOCK_BACKUP_OFFSET,
            at(HostId::NONE, 0),
            Kind::Superblock,
        ),
    ];
    for host in g.hosts() {
        let areas = [
            (g.inbox_area(host), Kind::InboxHeader, Kind::Request),
            (g.outbox_area(host), Kind::OutboxHeader, Kind::Reply),
        ];
        for (area, header, slot) in areas {
            let Some(area) = area else { continue };
            for index in 0..spmbox_core::wire::RECORDS_PER_AREA as u16 {
                let kind = if index == 0 { header } else { slot };
                places.push((
                    area + u64::from(index) * RECORD_LEN as u64,
                    at(host, index),
                    kind,
                ));
            }
        }
    }
    places
}

/// What `upgrade` made of one record.
enum Converted {
    Empty,
    AlreadyNew,
    Rewritten,
    DoorbellCleared,
    Defective,
}

/// Converts `record` in place if it is a valid record of version `from`
/// (one of [`UPGRADABLE_FROM`]) of `kind` at `at`; leaves it as it is
/// otherwise. A version-2 doorbell is cleared instead (its `rings` would
/// be 0); every other record keeps its bytes but the version and the
/// checksum: the fields that are new since (`rings`, `release_commit`,
/// `release_ack`) were reserved, so zero, which is their format value.
fn convert_record(
    record: &mut [u8],
    at: &spmbox_core::wire::Location,
    kind: spmbox_core::wire::Kind,
    from: u8,
) -> Converted {
    use spmbox_core::wire::{FORMAT_VERSION, Kind, Record};
    if record.iter().all(|&b| b == 0) {
        return Converted::Empty;
    }
    if !checksum_ok(record) {
        return Converted::Defective;
    }
    match record[9] {
        FORMAT_VERSION => return Converted::AlreadyNew,
        version if version == from => {}
        _ => return Converted::Defective,
    }
    let mut new = [0u8; RECORD_LEN];
    new.copy_from_slice(record);
    new[9] = FORMAT_VERSION;
    let clear_doorbell = kind == Kind::Doorbell && from == 2;
    if clear_doorbell {
        // `rings` (34..36) was reserved, so zero; the new version needs at
        // least 1. Checked as if it had rung once; written empty.
        if new[34..36] != [0, 0] {
            return Converted::Defective;
        }
        new[34..36].copy_from_slice(&1u16.to_le_bytes());
    }
    seal(&mut new);
    match Record::parse(&new, at) {
        Ok(Some(r)) if r.kind() == kind => {}
        _ => return Converted::Defective,
    }
    if clear_doorbell {
        record.fill(0);
        Converted::DoorbellCleared
    } else {
        record.copy_from_slice(&new);
        Converted::Rewritten
    }
}

/// Refuses while an SPM answers on the domain's control socket.
fn check_no_live_control_socket(path: &Path, domain: Uuid) -> Result<(), MailboxError> {
    use crate::daemon::control;
    let socket = control::default_control(domain);
    if let Ok(Some(_)) = control::control_request(&socket, &serde_json::json!({"op": "status"})) {
        return Err(MailboxError::LiveUpgrade {
            path: path.to_owned(),
            why: format!(
                "the SPM of domain {domain} answers on its control socket {}",
                socket.display()
            ),
        });
    }
    Ok(())
}

/// Refuses while the SPM header says *active* and its heartbeat moves, or
/// while an inbox header names a lease (a nonzero `heartbeat_interval_ms`)
/// whose heartbeat moves: each is watched for two and a half of its
/// intervals, all at once, at most [`UPGRADE_WATCH_MAX`], as a starting
/// SPM and host watch theirs (`daemon::spm::check_no_live_spm`,
/// `daemon::host`'s `check_host_id_free`). Reads the records by their
/// bytes, since the layouts of the SPM header and the inbox header are the
/// same in the versions of [`UPGRADABLE_FROM`] and the current version
/// (but for fields that were reserved), whose decoders
/// refuse the old one. Hosts under sanlock (interval 0) cannot be seen.
fn check_no_live_heartbeat(device: &Device, superblock: &Superblock) -> Result<(), MailboxError> {
    use spmbox_core::wire::{FORMAT_VERSION, Kind, SPM_HEADER_OFFSET};
    use std::time::{Duration, Instant};
    let g = superblock.geometry;
    let sector = g.sector_size() as usize;
    let read = |offset: u64| -> Result<[u8; RECORD_LEN], MailboxError> {
        let mut buf = AlignedBuf::zeroed(sector, device.dio_mem_align());
        device.read_at(offset, &mut buf)?;
        let mut record = [0u8; RECORD_LEN];
        record.copy_from_slice(&buf[..RECORD_LEN]);
        Ok(record)
    };
    let lease = |record: &[u8; RECORD_LEN], kind: Kind, interval_at: usize| -> Option<u32> {
        let ours = checksum_ok(record)
            && record[8] == kind as u8
            && (upgradable(record[9]) || record[9] == FORMAT_VERSION)
            && record[16..32] == superblock.domain.0;
        let mut interval = [0u8; 4];
        interval.copy_from_slice(&record[interval_at..interval_at + 4]);
        let interval = u32::from_le_bytes(interval);
        (ours && interval != 0).then_some(interval)
    };
    // (offset, host id or 0 for the SPM, first bytes, interval)
    let mut watched: Vec<(u64, u16, [u8; RECORD_LEN], u32)> = Vec::new();
    let spm = read(SPM_HEADER_OFFSET)?;
    // The SPM header: state (42) active, interval at 44.
    if spm[42] == 1
        && let Some(interval) = lease(&spm, Kind::SpmHeader, 44)
    {
        watched.push((SPM_HEADER_OFFSET, 0, spm, interval));
    }
    let inbox_len = g.region_len() as usize;
    let mut inbox = AlignedBuf::zeroed(inbox_len, device.dio_mem_align());
    device.read_at(g.inbox_offset(), &mut inbox)?;
    for host in g.hosts() {
        let Some(at) = g.inbox_area(host) else {
            continue;
        };
        let start = (at - g.inbox_offset()) as usize;
        let mut header = [0u8; RECORD_LEN];
        header.copy_from_slice(&inbox[start..start + RECORD_LEN]);
        // The inbox header: interval at 56.
        if let Some(interval) = lease(&header, Kind::InboxHeader, 56) {
            watched.push((at, host.get(), header, interval));
        }
    }
    let Some(longest) = watched.iter().map(|w| w.3).max() else {
        return Ok(());
    };
    let watch = (Duration::from_millis(u64::from(longest)) * 5 / 2).min(UPGRADE_WATCH_MAX);
    tracing::info!(
        "{} heartbeat(s) to watch for {} before the upgrade",
        watched.len(),
        crate::units::Elapsed(watch)
    );
    let mut moved = vec![false; watched.len()];
    let until = Instant::now() + watch;
    while Instant::now() < until && moved.iter().any(|m| !m) {
        std::thread::sleep(Duration::from_millis(50));
        for (i, (offset, _, first, _)) in watched.iter().enumerate() {
            if !moved[i] && read(*offset)? != *first {
                moved[i] = true;
            }
        }
    }
    let spm_moved = watched.iter().zip(&moved).any(|(w, &m)| m && w.1 == 0);
    let hosts: Vec<String> = watched
        .iter()
        .zip(&moved)
        .filter(|(w, m)| **m && w.1 != 0)
        .map(|(w, _)| w.1.to_string())
        .collect();
    let mut why = Vec::new();
    if spm_moved {
        why.push(format!(
            "the SPM header says active and its heartbeat moved while watched for {}: an SPM \
             serves the domain",
            crate::units::Elapsed(watch)
        ));
    }
    match hosts.len() {
        0 => {}
        1 => why.push(format!(
            "host {} holds its host id: the heartbeat in its inbox header moved while watched \
             for {}",
            hosts[0],
            crate::units::Elapsed(watch)
        )),
        _ => why.push(format!(
            "hosts {} hold their host ids: the heartbeats in their inbox headers moved while \
             watched for {}",
            hosts.join(", "),
            crate::units::Elapsed(watch)
        )),
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(MailboxError::LiveUpgrade {
            path: device.path().to_owned(),
            why: why.join("; "),
        })
    }
}

/// A value built from a valid geometry and domain is always emittable; if
/// not, that is a bug, reported rather than panicked on.
fn field_bug(field: spmbox_core::wire::Field) -> MailboxError {
    MailboxError::CannotRepair(format!("refused to emit a record: field {field}"))
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
/// Refuses a device that already holds a mailbox (valid or with a damaged
/// superblock): `format` and `pool create` without `--force`.
pub fn refuse_existing(device: &Device) -> Result<(), MailboxError> {
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

/// A random nonzero number from the kernel's random source: the owner of
/// an SPM instance or of a host id (the builtin lease).
pub fn random_owner() -> Result<u64, MailboxError> {
    let uuid = random_uuid()?;
    let mut b = [0u8; 8];
    b.copy_from_slice(&uuid.0[8..16]);
    Ok(u64::from_le_bytes(b) | 1)
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
            && let Some(label) = crate::backend::builtin::LunLabel::parse(&buf)
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
