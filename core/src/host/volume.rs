//! What the host engine knows about each volume, and the watermark.

use core::time::Duration;

use crate::time::Instant;
use crate::wire::{Slot, Uuid};

/// Sizes on the wire are multiples of this many bytes.
pub const SIZE_ALIGN: u64 = 512;

/// Where a request stands after it was written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    /// Written; no reply yet. Resent when its deadline passes.
    Sent,
    /// The SPM parked it ("waiting for space"): the host keeps polling until
    /// a final reply replaces the parked one, and resends only every
    /// `remind_interval` (which rewrites, and so repairs, its area).
    WaitingForSpace,
    /// The SPM extended the volume to `size`; the host waits for the caller
    /// to refresh its view of the volume ([`super::Host::handle_refreshed`]).
    /// The deadline is when [`super::HostEvent::Refresh`] is repeated.
    Extended {
        /// The size the reply names.
        size: u64,
    },
}

/// A request the host wrote and has not finished with: it holds its slot
/// until its final reply was consumed (and, for `extended`, the volume was
/// refreshed).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InFlight {
    /// The inbox slot, 1..=31.
    pub slot: Slot,
    /// The request's sequence number in the host's current generation.
    pub sequence: u64,
    /// The absolute size asked for.
    pub target: u64,
    /// The volume's size when the request was made (the record's
    /// informational `current_size`).
    pub current_size: u64,
    /// Whether the record carries the PAUSED flag.
    pub paused: bool,
    /// When the request was first handed out for writing (resends keep it).
    pub sent: Instant,
    /// [`Phase::Sent`]: when it is resent; [`Phase::Extended`]: when the
    /// refresh is asked for again. Unused while waiting for space.
    pub deadline: Instant,
    /// The current resend (or refresh reminder) interval; doubles each
    /// time up to the configured maximum.
    pub backoff: Duration,
    /// Where the request stands.
    pub phase: Phase,
    /// The slot holds a final reply that answers this very request but
    /// that the host may not act on (stale under its outbox header, or
    /// from an older epoch than the newest seen). An SPM treats the request
    /// as done, so resending it would never be answered: at the deadline a
    /// new request (a new sequence number) replaces it instead.
    pub renew: bool,
}

impl InFlight {
    /// Whether the host still expects a reply to this request (and so
    /// polls the outbox for it).
    pub fn awaits_reply(&self) -> bool {
        matches!(self.phase, Phase::Sent | Phase::WaitingForSpace)
    }
}

/// A copy of what the engine knows about one volume.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VolumeState {
    /// The volume.
    pub id: Uuid,
    /// The guest-visible size.
    pub virtual_size: u64,
    /// The largest size the volume may reach: virtual size plus format
    /// overhead, a multiple of 512.
    pub limit: u64,
    /// The volume's size as last refreshed. Only ever raised.
    pub physical: u64,
    /// The highest offset the guest has written, as last reported. Only
    /// ever raised.
    pub allocation: u64,
    /// The guest is paused for lack of space (`allocation >= physical`).
    pub paused: bool,
    /// The volume needs a request but no slot is free (or the engine has
    /// not started yet); it is sent as soon as one frees.
    pub pending: bool,
    /// The SPM rejected a request for this volume: it will never be met,
    /// so the volume sends no more requests (remove and add it again once
    /// the cause is fixed).
    pub rejected: bool,
    /// The SPM answered `segments_full`: the volume asks no more until a
    /// refresh changes its size.
    pub segments_full: bool,
    /// After a `failed` reply: no new request before this instant.
    pub retry_at: Option<Instant>,
    /// The request in flight, if any.
    pub request: Option<InFlight>,
}

impl VolumeState {
    /// Whether free space is below the watermark `threshold` (or the guest
    /// has run out of space) and the volume can still grow.
    pub(crate) fn needs_extension(&self, threshold: u64) -> bool {
        if self.physical >= self.limit {
            return false;
        }
        let free = self.physical.saturating_sub(self.allocation);
        free < threshold || self.allocation >= self.physical
    }

    /// The target of a new request: one chunk more, at most the limit,
    /// rounded up to 512 bytes. `None` if that would not grow the volume.
    pub(crate) fn target(&self, chunk_size: u64) -> Option<u64> {
        let wanted = self.physical.saturating_add(chunk_size).min(self.limit);
        let target = wanted.div_ceil(SIZE_ALIGN).checked_mul(SIZE_ALIGN)?;
        (target > self.physical && target <= self.limit).then_some(target)
    }
}

/// The watermark: extension is needed when free space falls below
/// `chunk_size * (100 - utilization_percent) / 100`.
pub(crate) fn threshold(chunk_size: u64, utilization_percent: u8) -> u64 {
    let spare = 100u128.saturating_sub(u128::from(utilization_percent));
    let t = u128::from(chunk_size).saturating_mul(spare) / 100;
    u64::try_from(t).unwrap_or(u64::MAX)
}
