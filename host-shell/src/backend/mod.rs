//! What the daemons need from a storage backend (the builtin pool or lvm2).
//!
//! The SPM side extends volumes and adds capacity; the host side reads a
//! volume's current map. Both backends give the same answers for the same
//! situation, so the daemons do not know which one runs.

pub mod builtin;
pub mod lvm;
pub mod lvm_glue;

use std::path::{Path, PathBuf};

use spmbox_core::host::HostError;
use spmbox_core::pool::PoolError;
use spmbox_core::spm::{JobResult, SpmError};
use spmbox_core::wire::{GeometryError, Uuid};

use crate::daemon::guest::GuestError;
use crate::io::device::DeviceError;
use crate::io::mailbox::MailboxError;
use crate::io::mapping::Mapping;

/// An error of a backend (or of a daemon or command built on one), with
/// what to do about it in the message. Where the error comes from a typed
/// layer the variant keeps it, so callers can match on it and see its
/// source; text composed here is [`BackendError::Other`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Opening, reading or writing the mailbox failed.
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    /// I/O on a device (domain device or LUN) failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The builtin pool refused an operation.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A domain geometry (hosts, sector size) out of range.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// The SPM engine refused its configuration.
    #[error(transparent)]
    Spm(#[from] SpmError),
    /// The host engine refused its configuration.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A guest, a recovery or a verification failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A system call outside the device layer failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A system call outside the device layer failed; `what` says what
    /// was being done.
    #[error("{what}: {source}")]
    IoContext {
        /// What was being done, naming the file or socket.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// I/O on a device failed; `what` says what was being done.
    #[error("{what}: {source}")]
    DeviceContext {
        /// What was being done, naming the device or LUN.
        what: String,
        /// Why it failed.
        #[source]
        source: DeviceError,
    },
    /// A message composed from context.
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> BackendError {
        BackendError::Other(message.into())
    }

    /// `what` failed because of `source`; shown as `what: source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> BackendError {
        BackendError::IoContext {
            what: what.into(),
            source,
        }
    }

    /// `what` failed because of `source`; shown as `what: source`.
    pub fn device(what: impl Into<String>, source: DeviceError) -> BackendError {
        BackendError::DeviceContext {
            what: what.into(),
            source,
        }
    }

    /// Whether the device holds no usable mailbox (see
    /// [`MailboxError::is_no_usable_mailbox`]).
    pub fn is_no_usable_mailbox(&self) -> bool {
        match self {
            BackendError::Mailbox(e) => e.is_no_usable_mailbox(),
            _ => false,
        }
    }
}

/// A volume as a backend reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VolumeReport {
    /// The volume.
    #[serde(serialize_with = "crate::cli::json::uuid")]
    pub id: Uuid,
    /// Its virtual (guest-visible) size.
    pub virtual_size: u64,
    /// Its physical size now.
    pub size: u64,
    /// The largest size it may reach (virtual size plus format overhead).
    pub limit: u64,
}

/// The pool as a backend reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PoolReport {
    /// `builtin` or `lvm`.
    pub backend: &'static str,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents in all LUNs.
    pub total_extents: u64,
    /// Extents no volume holds.
    pub free_extents: u64,
    /// LUNs (PVs), by name or UUID.
    pub luns: Vec<String>,
    /// Volumes.
    pub volumes: Vec<VolumeReport>,
    /// Parked requests: volume and target size.
    pub parked: Vec<(String, u64)>,
    /// Where each volume's extents are, by volume UUID: runs of extents
    /// on one LUN, in the volume's order.
    pub segments: std::collections::BTreeMap<String, Vec<SegmentReport>>,
    /// Extents taken from volumes (deleted, reduced) that are not free
    /// yet: live hosts have not all acknowledged their release.
    pub released_extents: u64,
    /// The volume the pool names as being moved to other extents (a
    /// `pool remove-lun` under way, or cut short): hosts do not open it
    /// until it is no longer named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving: Option<String>,
}

/// A run of a volume's extents on one LUN.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SegmentReport {
    /// The LUN (PV), by name or UUID.
    pub lun: String,
    /// Its first extent on the LUN.
    pub first_extent: u64,
    /// How many extents.
    pub extents: u64,
}

/// How full the pool is: [`PoolReport`]'s figures without its lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents in all LUNs.
    pub total_extents: u64,
    /// Extents no volume holds.
    pub free_extents: u64,
}

impl PoolUsage {
    /// Extents volumes hold.
    pub fn used_extents(&self) -> u64 {
        self.total_extents.saturating_sub(self.free_extents)
    }
}

/// The SPM's side of a backend. Every method may block on storage.
pub trait SpmBackend {
    /// Extends `volume` to the absolute size `target` (all or nothing),
    /// or parks the request when there is no room (`JobResult::NoSpace`;
    /// it completes later through [`SpmBackend::take_completed`]). The
    /// change need not be durable until [`SpmBackend::commit`].
    fn extend(&mut self, volume: Uuid, target: u64, urgent: bool) -> JobResult;

    /// Makes every change since the last commit durable. The daemon calls
    /// it before it writes any reply about those changes.
    fn commit(&mut self) -> Result<(), BackendError>;

    /// Parked requests that added capacity has met since the last call:
    /// `(volume, size)`. Committed before they are returned.
    fn take_completed(&mut self) -> Vec<(Uuid, u64)>;

    /// Brings the parked requests in line with what still waits in the
    /// mailbox: `still_waiting(volume)` is the SPM engine's
    /// `(largest target, any guest paused)` for the volume, `None` if no
    /// request for it waits any more. A parked entry nobody waits for is
    /// dropped; one that asks for more is lowered (never raised); one the
    /// volume already satisfies completes through
    /// [`SpmBackend::take_completed`]. The daemon calls it whenever the
    /// engine's `withdrawn()` count changes, so capacity never extends a
    /// volume for a request its host withdrew.
    fn withdraw_parked(&mut self, still_waiting: &dyn Fn(Uuid) -> Option<(u64, bool)>);

    /// Adds the LUN at `path` to the pool, labelling or initializing it,
    /// then serves parked requests (urgent first). Committed on return.
    fn add_lun(&mut self, path: &Path) -> Result<String, BackendError>;

    /// Creates a volume of `virtual_size` with `initial_size` bytes
    /// allocated (rounded up to whole extents). Committed on return.
    fn create_volume(
        &mut self,
        id: Uuid,
        virtual_size: u64,
        initial_size: u64,
    ) -> Result<VolumeReport, BackendError>;

    /// Looks for capacity added outside the daemon (say, `vgextend` run by
    /// hand) and serves parked requests with it. Called at every full
    /// scan; cheap when nothing changed.
    fn poll_capacity(&mut self) -> Result<(), BackendError>;

    /// The pool now.
    fn report(&self) -> PoolReport;

    /// How full the pool is now, from what the backend keeps in memory
    /// (no I/O, no lvm2 command). The SPM looks after every commit and
    /// admin request, so this costs no copy of the volume list.
    fn usage(&self) -> PoolUsage {
        let r = self.report();
        PoolUsage {
            extent_size: r.extent_size,
            total_extents: r.total_extents,
            free_extents: r.free_extents,
        }
    }

    /// The sequence number of the newest durable metadata commit (builtin
    /// pool); 0 for a backend that keeps its own (lvm2). The SPM header
    /// carries it, a second place to notice a pool rolled back to an older
    /// copy.
    fn committed_sequence(&self) -> u64 {
        0
    }

    /// Deletes volume `id`; refused while a request for it is parked. Its
    /// extents are *released*: no other volume gets them before
    /// [`SpmBackend::reclaim`] is told every live host acknowledged the
    /// release. Committed on return. The caller has checked that no live
    /// host holds the volume.
    fn delete_volume(&mut self, id: Uuid) -> Result<Released, BackendError>;

    /// Shrinks volume `id` to `size` bytes (rounded up to whole extents, at
    /// least one); the extents past it are released as by
    /// [`SpmBackend::delete_volume`]. Committed on return.
    fn reduce_volume(
        &mut self,
        id: Uuid,
        size: u64,
    ) -> Result<(VolumeReport, Released), BackendError>;

    /// The newest release every live host has acknowledged is `acked`:
    /// what was released at or before it may be handed out again. Returns
    /// the extents that became free.
    fn reclaim(&mut self, acked: u64) -> u64;

    /// The newest release not yet reclaimed, if any.
    fn release_pending(&self) -> Option<u64>;

    /// The sequence number of the newest release (0: none): the SPM header
    /// carries it as `release_commit` for the hosts.
    fn release_seq(&self) -> u64;

    /// Discard extents once they are free again (reclaimed): punch holes
    /// in LUN files, `BLKDISCARD` on LUN devices. `search`: where the LUNs
    /// are (builtin pool), besides where the backend looks by default.
    fn set_discard(&mut self, search: Vec<PathBuf>);

    /// The SPM header names release `seq`: a backend that numbers its
    /// releases itself (lvm2) numbers the next one above it.
    fn note_release_commit(&mut self, seq: u64) {
        let _ = seq;
    }

    /// Where the LUNs are besides where the backend looks by default
    /// (builtin pool: `--lun-search`), for copying extents and discards.
    fn set_lun_search(&mut self, search: Vec<PathBuf>) {
        let _ = search;
    }

    /// Moving segments off a LUN and dropping it (`pool remove-lun`), for a
    /// backend that copies extents itself (the builtin pool); `None` for
    /// one that does not (lvm2, whose `pvmove` is run by hand).
    fn lun_mover(&mut self) -> Option<&mut dyn LunMover> {
        None
    }

    /// Removes LUN `lun` (a path) from the pool at once, for a backend
    /// without [`SpmBackend::lun_mover`]: refused while any extent on it is
    /// held or released. Returns what was done.
    fn remove_empty_lun(&mut self, lun: &str) -> Result<String, BackendError> {
        let _ = lun;
        Err(BackendError::new(
            "this backend cannot remove a LUN. Nothing was changed",
        ))
    }
}

/// The steps of moving every segment off a LUN and dropping it, as
/// docs/pool-format.md 6.7 orders them; `crate::daemon::remove_lun`
/// drives them.
pub trait LunMover {
    /// The index and UUID of LUN `lun`, given as its UUID or as the path
    /// of its device or file (its label is read).
    fn find_lun(&self, lun: &str) -> Result<(u16, Uuid), BackendError>;

    /// Marks the LUN draining (nothing is allocated there) or not; in
    /// memory only.
    fn set_draining(&mut self, lun: u16, draining: bool) -> Result<(), BackendError>;

    /// Extents of the LUN that volumes hold, and the free extents of the
    /// other LUNs that are not draining.
    fn room(&self, lun: u16) -> (u64, u64);

    /// The volumes with a segment on the LUN.
    fn volumes_on(&self, lun: u16) -> Vec<Uuid>;

    /// The next segment to move off the LUN, and where to; `None` when
    /// none is left.
    fn next_move(&self, lun: u16) -> Result<Option<Relocation>, BackendError>;

    /// Names `volume` as being moved (nil: none) and commits it.
    fn set_moving(&mut self, volume: Uuid) -> Result<(), BackendError>;

    /// The volume being moved, as last committed; nil if none.
    fn moving(&self) -> Uuid;

    /// Copies bytes `done..` of the segment `r` moves (at most `max`) from
    /// its place to its destination; returns the bytes copied. The copy is
    /// durable once [`LunMover::finish_move`] returns.
    fn copy(&mut self, r: &Relocation, done: u64, max: u64) -> Result<u64, BackendError>;

    /// Makes the copy durable, moves the segment in the pool (its old run
    /// becomes released) and commits, naming `moving_after` as the volume
    /// being moved (nil: none) in the same commit.
    fn finish_move(&mut self, r: &Relocation, moving_after: Uuid) -> Result<(), BackendError>;

    /// Drops the LUN from the pool and commits; `Ok(false)` while released
    /// extents on it wait for the hosts' acknowledgements.
    fn drop_lun(&mut self, lun: u16) -> Result<bool, BackendError>;

    /// Bytes per extent.
    fn extent_size(&self) -> u64;
}

pub use spmbox_core::pool::Relocation;

/// What a delete or reduce released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Released {
    /// Extents taken from the volume.
    pub extents: u64,
    /// The release's sequence number: hosts acknowledge it.
    pub release: u64,
}

/// A host's side of a backend: where a volume's bytes are.
pub trait VolumeMaps {
    /// The volume's current map, refreshed from shared storage (builtin:
    /// the committed metadata; lvm: `lvchange --refresh` or lvm2's report).
    fn refresh(&mut self, volume: Uuid) -> Result<Mapping, BackendError>;

    /// The volume an SPM is moving to other extents (nil: none), from the
    /// shared storage now: a host that has not opened that volume yet
    /// waits until it is no longer named before it reads its map and
    /// opens it (docs/pool-format.md 6.7). A backend whose SPM never moves
    /// volumes answers nil.
    fn moving(&mut self) -> Result<Uuid, BackendError> {
        Ok(Uuid::NIL)
    }

    /// The volume's virtual size and limit, for the host engine.
    fn sizes(&mut self, volume: Uuid) -> Result<VolumeReport, BackendError>;
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn composed_text_shows_as_given() {
        let e = BackendError::new("add_lun needs a path");
        assert_eq!(e.to_string(), "add_lun needs a path");
        assert!(!e.is_no_usable_mailbox());
        assert!(e.source().is_none());
    }

    #[test]
    fn a_context_shows_as_what_colon_source_and_keeps_the_source() {
        let io = || std::io::Error::from_raw_os_error(2);
        let e = BackendError::io("cannot open /x", io());
        assert_eq!(e.to_string(), format!("cannot open /x: {}", io()));
        assert!(e.source().is_some());
        let device = || DeviceError::AlreadyExists {
            path: PathBuf::from("/x"),
        };
        let e = BackendError::device("cannot open LUN", device());
        assert_eq!(e.to_string(), format!("cannot open LUN: {}", device()));
        assert!(e.source().is_some());
    }

    #[test]
    fn a_typed_source_shows_as_itself() {
        let e = BackendError::from(std::io::Error::from_raw_os_error(2));
        assert_eq!(
            e.to_string(),
            std::io::Error::from_raw_os_error(2).to_string()
        );
        let e = BackendError::from(PoolError::NilId);
        assert_eq!(e.to_string(), PoolError::NilId.to_string());
    }

    #[test]
    fn only_a_mailbox_error_that_says_so_means_no_usable_mailbox() {
        let not = || MailboxError::NotAMailbox {
            path: PathBuf::from("/x"),
            why: "it is all zeroes".into(),
            hint: "format it",
        };
        let e = BackendError::from(not());
        assert_eq!(e.to_string(), not().to_string());
        assert!(e.is_no_usable_mailbox());
        let e = BackendError::from(MailboxError::Device(DeviceError::AlreadyExists {
            path: PathBuf::from("/x"),
        }));
        assert!(!e.is_no_usable_mailbox());
        assert!(!BackendError::new(not().to_string()).is_no_usable_mailbox());
    }
}
