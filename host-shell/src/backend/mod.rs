//! What the daemons need from a storage backend (the builtin pool or lvm2).
//!
//! The SPM side extends volumes and adds capacity; the host side reads a
//! volume's current map. Both backends give the same answers for the same
//! situation, so the daemons do not know which one runs.

pub mod builtin;
pub mod lvm;
pub mod lvm_glue;

use std::path::Path;

use spmbox_core::spm::JobResult;
use spmbox_core::wire::Uuid;

use crate::io::mailbox::MailboxError;
use crate::io::mapping::Mapping;

/// An error of a backend, with what to do about it in the message. The
/// flag says the device holds no usable mailbox (exit status 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String, pub(crate) bool);

impl BackendError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> BackendError {
        BackendError(message.into(), false)
    }

    /// Whether the device holds no usable mailbox (see
    /// [`MailboxError::is_no_usable_mailbox`]).
    pub fn is_no_usable_mailbox(&self) -> bool {
        self.1
    }
}

impl From<MailboxError> for BackendError {
    fn from(e: MailboxError) -> BackendError {
        BackendError(e.to_string(), e.is_no_usable_mailbox())
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

    /// The sequence number of the newest durable metadata commit (builtin
    /// pool); 0 for a backend that keeps its own (lvm2). The SPM header
    /// carries it, a second place to notice a pool rolled back to an older
    /// copy.
    fn committed_sequence(&self) -> u64 {
        0
    }
}

/// A host's side of a backend: where a volume's bytes are.
pub trait VolumeMaps {
    /// The volume's current map, refreshed from shared storage (builtin:
    /// the committed metadata; lvm: `lvchange --refresh` or lvm2's report).
    fn refresh(&mut self, volume: Uuid) -> Result<Mapping, BackendError>;

    /// The volume's virtual size and limit, for the host engine.
    fn sizes(&mut self, volume: Uuid) -> Result<VolumeReport, BackendError>;
}
