//! The host engine: watermark, requests, replies, pause and resume.
//!
//! A sans-I/O state machine for one host id in one storage domain. It never
//! reads a clock or a device: the caller (the `spmbox host` daemon, or a
//! simulation) hands in what happened and the current [`Instant`], performs
//! the reads and writes the engine asks for, and feeds back what it read.
//!
//! ```text
//!   Host::new ─> add_volume* ─> start(now, own inbox area, own outbox area)
//!
//!   handle_allocation(now, volume, allocation)   <── the guest wrote
//!   handle_outbox(now, outbox area bytes)        <── a HostRead done
//!   handle_refreshed(now, volume, physical)      <── the LV map re-read
//!   handle_spm_header(now, record)               <── epoch, release_commit
//!   handle_all_refreshed(now, release_commit)    <── every map re-read
//!   handle_timeout(now)                          <── poll_timeout() reached
//!
//!   poll_write()    ──> HostWrite { offset, record }  (in this order!)
//!   poll_read(now)  ──> HostRead::OutboxArea { offset }
//!   poll_event()    ──> HostEvent
//!   poll_timeout()  ──> Instant
//! ```
//!
//! # Writing
//! Every write is one 128-byte record at an absolute mailbox offset; the
//! caller writes the sector that holds it (read-modify-write on its own
//! area, which nobody else writes). Writes MUST be done one after the other
//! in the order [`Host::poll_write`] hands them out, each completing before
//! the next: after [`Host::start`] the new inbox header comes first, alone,
//! and a doorbell always comes after the request it announces. Writes to
//! the same slot are coalesced: a slot handed out once carries its newest
//! content (a request, or all zero once the slot is freed).
//!
//! # The life of a request (docs/format.md, section 8)
//! 1. The guest's allocation crosses the watermark: free space
//!    `physical - allocation` falls below
//!    `chunk_size * (100 - utilization_percent) / 100`. The engine takes a
//!    free slot, writes a request for `min(physical + chunk_size, limit)`
//!    (rounded up to 512) with the next sequence number, and rings the
//!    doorbell. One request per volume at a time; with no free slot the
//!    volume is *pending* and is served first-come (paused guests first)
//!    when a slot frees.
//! 2. While requests await a reply, the engine asks to read its outbox area
//!    (fast at first, backing off to `poll_interval`), and never otherwise.
//!    A reply is accepted only if it is valid, of the outbox header's
//!    generation, answers the exact request (slot, generation, sequence,
//!    volume, target) and is not from an epoch older than the newest seen. Without a reply the request is
//!    rewritten (same record) after `resend_timeout`, doubling up to
//!    `max_resend_timeout`.
//! 3. `waiting_for_space` parks the request: polling goes on (that is how
//!    the host learns that capacity arrived) and the request is rewritten
//!    only every `remind_interval`, which repairs a damaged area.
//! 4. `extended`: the engine asks the caller to refresh its view of the
//!    volume ([`HostEvent::Refresh`], repeated with backoff until done) and
//!    raises `physical` only when [`Host::handle_refreshed`] says so. Then
//!    the slot is written empty, a paused guest resumes, and the watermark
//!    is checked again.
//! 5. `rejected` frees the slot; the volume asks no more. `rejected` for
//!    `segments_full` also frees the slot and says
//!    [`HostEvent::SegmentsFull`]: the volume asks no more until a refresh
//!    changes its size. `failed` frees the slot; the volume may ask again
//!    after `resend_timeout`.
//!
//! A final reply that answers the request exactly but may not be acted on
//! (stale under its outbox header, or from an older epoch, as when a
//! deposed SPM answers late) is a dead end for a resend: every SPM treats
//! a request with a final reply as done. So at its resend deadline such a
//! request is *renewed* instead: a new request (new sequence number) for
//! the same volume in the same slot, with the backoff still running.
//!
//! # Holds and the release acknowledgement (docs/protocol.md, section 9)
//! Every tracked volume is listed in a hold record (kind 8) of the current
//! generation: volume `i` (in the order added) in slot `31 - i / 4`, so
//! the hold records fill the highest slots, 31 downward, and requests use
//! only the slots below [`Host::request_slots`]. `VOLUMES` is at most
//! [`MAX_HELD_VOLUMES`] (checked at compile time), so at least 15 slots
//! stay for requests. The hold records are written at start (after the
//! new inbox header) and whenever [`Host::add_volume`] or
//! [`Host::remove_volume`] changes them, highest slot first, so that a
//! volume that moves to a higher slot is listed there before its old place
//! is rewritten. The caller opens a volume only after its hold record was
//! written and made durable ([`Host::holds_pending`] says when), and
//! removes a volume only after its last I/O completed.
//!
//! The SPM header is read every `spm_header_interval` once started, idle
//! or not, host id `h` of `n` at `(h - 1) / n` of the interval after the
//! first (so hosts started together do not read in one burst). When its `release_commit` is above the host's `release_ack`
//! (kept in the inbox header, and across restarts), the engine says
//! [`HostEvent::RefreshAll`] once (again after `max_resend_timeout` if it
//! is still not done): the caller re-reads the map of every volume it
//! holds from pool metadata at least that new, stops a guest whose volume
//! the metadata no longer has, and calls [`Host::handle_all_refreshed`],
//! which raises `release_ack` and writes the inbox header. At start the
//! ack found in the old inbox header is kept: the maps a new incarnation
//! reads are newer than anything it acknowledged before, and the first
//! SPM header read asks for a refresh if the SPM released extents since.
//!
//! # Restart
//! [`Host::start`] reads the host's own areas. The new generation is one
//! more than the highest generation found anywhere in them (inbox header,
//! requests, outbox header, replies, valid or stale), so a torn header
//! cannot make it reuse one. Requests still needed (a known volume, no
//! final reply, a target above the volume's size and within its limit) are
//! rewritten in their slots with the new generation and fresh sequence
//! numbers; every other non-empty slot is written empty.

mod volume;

#[cfg(test)]
mod tests;

use core::fmt;
use core::time::Duration;

use crate::time::Instant;
use crate::wire::{
    DOORBELL_OFFSET, Doorbell, Epoch, Generation, Geometry, HOLD_VOLUMES, Hold, HoldArea, HostId,
    InboxArea, InboxHeader, OutboxArea, RECORD_LEN, RECORDS_PER_AREA, RejectReason, Reply,
    ReplyStatus, Request, SLOTS_PER_AREA, Slot, SlotState, SpmHeader, Uuid,
};

pub use volume::{InFlight, Phase, SIZE_ALIGN, VolumeState};

/// Events kept until polled; past that the oldest are dropped (counted).
pub const EVENTS: usize = 64;
/// Writes that can wait to be handed out: the inbox header and one per
/// slot (writes to the same slot are coalesced). The doorbell is kept
/// apart.
pub const WRITES: usize = RECORDS_PER_AREA;
/// The most volumes a host engine tracks (and so holds): 64, listed in 16
/// hold records, so that at least 15 of the 31 slots stay for requests.
/// `Host<VOLUMES>` refuses to build with more:
///
/// ```
/// use spmbox_core::host::{Host, HostConfig};
/// use spmbox_core::wire::{Geometry, HostId, Uuid};
/// let g = Geometry::new(8, 512).unwrap();
/// let host = Host::<64>::new(Uuid([1; 16]), HostId::new(1), g, HostConfig::default());
/// assert_eq!(host.unwrap().request_slots(), 15);
/// ```
///
/// ```compile_fail,E0080
/// use spmbox_core::host::{Host, HostConfig};
/// use spmbox_core::wire::{Geometry, HostId, Uuid};
/// let g = Geometry::new(8, 512).unwrap();
/// let _ = Host::<65>::new(Uuid([1; 16]), HostId::new(1), g, HostConfig::default());
/// ```
pub const MAX_HELD_VOLUMES: usize = 64;
/// Slots always left for requests.
pub const MIN_REQUEST_SLOTS: u16 = 15;

const _: () = assert!(
    MAX_HELD_VOLUMES.div_ceil(HOLD_VOLUMES) + MIN_REQUEST_SLOTS as usize <= SLOTS_PER_AREA as usize
);

const SLOTS: usize = SLOTS_PER_AREA as usize;
const RECORD: u64 = RECORD_LEN as u64;

/// How the host engine decides and paces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HostConfig {
    /// How much a volume grows per request, in bytes; at least 1. Default
    /// 256 MiB, ten times smaller than VDSM's 2.5 GiB.
    pub chunk_size: u64,
    /// VDSM's knob, 0..=100: a volume asks for more when free space falls
    /// below `chunk_size * (100 - utilization_percent) / 100`. Default 50
    /// (ask when less than half a chunk is left).
    pub utilization_percent: u8,
    /// How often the outbox is read while requests await a reply; nonzero.
    /// Default 2 ms.
    pub poll_interval: Duration,
    /// How soon the outbox is first read after a request is sent while
    /// none awaited a reply: an SPM that reads the doorbell often answers
    /// within a millisecond, so the host reads at this interval at first
    /// and backs off as the wait lasts (half the time waited so far,
    /// between this and `poll_interval`): about five more reads per wait.
    /// At least `poll_interval` turns it off. Default 250 µs.
    pub fast_poll_interval: Duration,
    /// How long a request waits for a reply before it is rewritten (and
    /// the doorbell rung again); doubles per resend. Nonzero. Default 2 s.
    pub resend_timeout: Duration,
    /// The longest resend interval; at least `resend_timeout`. Default 30 s.
    pub max_resend_timeout: Duration,
    /// How often a parked request ("waiting for space") is rewritten, same
    /// record. The rewrite repairs anything that damaged the host's area and
    /// reminds an SPM that lost track of the request, so a paused guest
    /// whose request sat in a damaged area still resumes soon after
    /// capacity arrives. Keep it below the SPM's full-scan interval.
    /// Nonzero. Default 10 s.
    pub remind_interval: Duration,
    /// How soon the doorbell is rung again while a request awaits its
    /// reply; doubles per ring up to `resend_timeout`. The doorbell holds
    /// one ring: another host's ring written within the same SPM doorbell
    /// interval replaces this one, and the ring again recovers from that
    /// in milliseconds instead of a resend timeout. Each wait is stretched
    /// by up to 15/16 by a hash of the host id and the request's sequence,
    /// so that hosts whose rings collided do not ring again in step and
    /// collide again. Costs one sector write per ring. Zero turns it off.
    /// Default 5 ms (one doorbell read at the SPM's slowest pace while
    /// busy, 20 at its fastest): a lost ring is rung again after 5 to
    /// 9.7 ms, and when many rang at once, the first rings again tell the
    /// SPM that rings collide (docs/protocol.md 1.2). Below 5 ms
    /// ([`RING_AGAIN_AFTER`](crate::spm::RING_AGAIN_AFTER)) the SPM may
    /// take a ring again as a lost ring and scan every host needlessly.
    pub ring_retry: Duration,
    /// How often the host raises the heartbeat in its inbox header (the
    /// builtin lease on its host id): each time it first reads the header
    /// back, and stops for good ([`HostEvent::Evicted`]) if another
    /// process's owner is there. Zero: no builtin lease (the header says
    /// so with an interval of 0; use it where sanlock holds host ids).
    /// Default 1 s.
    pub lease_interval: Duration,
    /// How often the SPM header is read while requests await a reply (and
    /// before the first outbox read of such a wait): it tells the newest
    /// SPM epoch, below which replies are ignored. Nonzero. Default 1 s.
    pub spm_header_interval: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            chunk_size: 256 << 20,
            utilization_percent: 50,
            poll_interval: Duration::from_millis(2),
            fast_poll_interval: Duration::from_micros(250),
            resend_timeout: Duration::from_secs(2),
            max_resend_timeout: Duration::from_secs(30),
            remind_interval: Duration::from_secs(10),
            ring_retry: Duration::from_millis(5),
            lease_interval: Duration::from_secs(1),
            spm_header_interval: Duration::from_secs(1),
        }
    }
}

/// Why the engine refuses a call. Nothing changes when it does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum HostError {
    /// The domain is the nil UUID.
    NilDomain,
    /// The host id is not 1..=max_hosts of the geometry.
    HostId,
    /// `chunk_size` is 0.
    ChunkSize,
    /// `utilization_percent` is above 100.
    UtilizationPercent,
    /// `poll_interval` is zero.
    PollInterval,
    /// `spm_header_interval` is zero.
    SpmHeaderInterval,
    /// `resend_timeout` is zero or above `max_resend_timeout`.
    ResendTimeout,
    /// `remind_interval` is zero.
    RemindInterval,
    /// The volume is the nil UUID.
    NilVolume,
    /// The host already tracks `VOLUMES` volumes.
    TooManyVolumes,
    /// The host already tracks this volume.
    DuplicateVolume,
    /// The host does not track this volume.
    UnknownVolume,
    /// The sizes make no sense: virtual size 0, a limit below the virtual
    /// size, or a limit that is not a multiple of 512.
    InconsistentSizes,
    /// [`Host::start`] was called before.
    AlreadyStarted,
    /// An area passed to [`Host::start`] is not 4096 bytes long.
    AreaLength,
    /// The generation found on disk cannot be raised.
    GenerationExhausted,
    /// The owner passed to [`Host::start`] is 0 while the builtin lease is
    /// on.
    Owner,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostError::NilDomain => "the domain is the nil UUID",
            HostError::HostId => "the host id is not a host id of this mailbox",
            HostError::ChunkSize => "the chunk size must be at least 1 byte",
            HostError::UtilizationPercent => "the utilization percentage must be 0..=100",
            HostError::PollInterval => "the poll interval must not be zero",
            HostError::SpmHeaderInterval => "the SPM header interval must not be zero",
            HostError::ResendTimeout => {
                "the resend timeout must be nonzero and at most the maximum resend timeout"
            }
            HostError::RemindInterval => "the remind interval must not be zero",
            HostError::NilVolume => "the volume is the nil UUID",
            HostError::TooManyVolumes => "the host tracks as many volumes as it can",
            HostError::DuplicateVolume => "the host already tracks this volume",
            HostError::UnknownVolume => "the host does not track this volume",
            HostError::InconsistentSizes => {
                "inconsistent sizes: the virtual size must be nonzero and the limit at least the virtual size and a multiple of 512"
            }
            HostError::AlreadyStarted => "the host engine has already started",
            HostError::AreaLength => "a host area must be exactly 4096 bytes",
            HostError::GenerationExhausted => "the host generation cannot be raised any further",
            HostError::Owner => "the host owner must be a nonzero random number",
        })
    }
}

impl core::error::Error for HostError {}

/// A record to write at an absolute byte offset of the mailbox.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HostWrite {
    /// Where the 128-byte record goes.
    pub offset: u64,
    /// The record (all zero for an empty slot).
    pub record: [u8; RECORD_LEN],
}

/// A read the engine asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HostRead {
    /// Read the host's 4096-byte outbox area at `offset` and pass it to
    /// [`Host::handle_outbox`].
    OutboxArea {
        /// Where the area starts.
        offset: u64,
    },
    /// Read the 128-byte inbox header record at `offset` (the sector that
    /// holds it) and pass it to [`Host::handle_inbox_header`]: the
    /// builtin lease's check before each heartbeat.
    InboxHeader {
        /// Where the record is.
        offset: u64,
    },
    /// Read the SPM header record (at
    /// [`SPM_HEADER_OFFSET`](crate::wire::SPM_HEADER_OFFSET)) and pass it
    /// to [`Host::handle_spm_header`]: the newest SPM epoch, while replies
    /// are awaited.
    SpmHeader,
}

/// What happened, for the caller to act on or log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum HostEvent {
    /// The SPM extended `volume` to `size`: refresh the view of the volume
    /// (LVM: `lvchange --refresh`; builtin pool: re-read its map) and call
    /// [`Host::handle_refreshed`]. Repeated with backoff until done.
    Refresh {
        /// The volume.
        volume: Uuid,
        /// The size the SPM reports.
        size: u64,
    },
    /// The volume was refreshed after an extension.
    Extended {
        /// The volume.
        volume: Uuid,
        /// Its size now.
        size: u64,
        /// From the request being handed out to the refresh.
        latency: Duration,
    },
    /// The guest ran out of space (`allocation >= physical`).
    Paused {
        /// The volume.
        volume: Uuid,
    },
    /// The guest has space again after being paused.
    Resumed {
        /// The volume.
        volume: Uuid,
    },
    /// Another process wrote its owner into this host's inbox header: it
    /// holds the host id now. The engine writes and reads nothing more;
    /// the caller must stop (and stop the guests) at once.
    Evicted {
        /// The owner found in the header.
        owner: u64,
    },
    /// The SPM parked the request until capacity is added.
    WaitingForSpace {
        /// The volume.
        volume: Uuid,
    },
    /// The SPM will never meet the request; the volume asks no more.
    Rejected {
        /// The volume.
        volume: Uuid,
        /// Why.
        reason: RejectReason,
    },
    /// The SPM's backend failed; the volume may ask again later.
    Failed {
        /// The volume.
        volume: Uuid,
        /// The backend's error number.
        code: u32,
    },
    /// A request was rewritten unchanged (no reply in time, or to set its
    /// PAUSED flag).
    Resent {
        /// The volume.
        volume: Uuid,
        /// The request's sequence number.
        sequence: u64,
    },
    /// Every slot is taken; a volume waits for one.
    SlotsExhausted,
    /// The SPM header says an SPM released extents in pool commit
    /// `release_commit`, newer than this host acknowledged: re-read the map
    /// of every volume held from pool metadata at least that new (a volume
    /// the metadata no longer has: stop its guest, then remove it), then
    /// call [`Host::handle_all_refreshed`]. Said once per new value, and
    /// again after `max_resend_timeout` while not done.
    RefreshAll {
        /// The SPM header's `release_commit`.
        release_commit: u64,
    },
    /// The SPM answered `rejected` / `segments_full`: the volume's map
    /// holds as many segments as the pool keeps, so it cannot grow. Final:
    /// the volume asks no more until a refresh changes its size; a paused
    /// guest stays paused.
    SegmentsFull {
        /// The volume.
        volume: Uuid,
        /// Its size, as the SPM reports it.
        size: u64,
    },
}

/// Counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HostStats {
    /// New requests handed out (each with a new sequence number),
    /// including requests rewritten at start.
    pub requests_sent: u64,
    /// Requests rewritten with their sequence kept.
    pub resends: u64,
    /// Replies acted on.
    pub replies_accepted: u64,
    /// Records found in a slot that awaits a reply and not acted on,
    /// counted per outbox read: defective ones, replies to a later or
    /// different request than the one in flight, stale ones, and answers
    /// from an older epoch. The reply to the slot's previous request
    /// (an older generation or sequence), which the SPM leaves in place
    /// until it answers, is not counted.
    pub replies_ignored: u64,
    /// Outbox reads handed out.
    pub outbox_reads: u64,
    /// Doorbell rings repeated while a request awaited its reply.
    pub rings_repeated: u64,
    /// Events dropped because nobody polled them.
    pub events_dropped: u64,
}

/// A write waiting to be handed out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Intent {
    /// The inbox header of the current generation.
    Header,
    /// A slot's current content: its request, or all zero.
    Slot(Slot),
}

/// One tracked volume.
#[derive(Clone, Copy, Debug)]
struct Volume {
    state: VolumeState,
    /// When it became pending (first come, first served).
    pending_order: u64,
    /// Added after start: check the watermark at the next timeout.
    check_due: bool,
}

/// Where slot `slot` (1..=31) is kept in per-slot arrays; out of range for
/// anything else.
fn slot_index(slot: Slot) -> usize {
    usize::from(slot.get()).wrapping_sub(1)
}

fn slot_bit(slot: Slot) -> u32 {
    1u32.checked_shl(u32::from(slot.get())).unwrap_or(0)
}

/// The host engine for up to `VOLUMES` volumes.
#[derive(Debug)]
pub struct Host<const VOLUMES: usize> {
    domain: Uuid,
    host_id: HostId,
    geometry: Geometry,
    inbox_offset: u64,
    outbox_offset: u64,
    config: HostConfig,
    threshold: u64,
    /// 0 until started.
    generation: Generation,
    /// This process's lease owner number (0: no builtin lease).
    owner: u64,
    /// The lease heartbeat written in the inbox header.
    heartbeat: u64,
    /// When the inbox header is next read back (the lease), if on.
    next_lease: Option<Instant>,
    /// Another process holds the host id: nothing more is done.
    evicted: bool,
    next_sequence: u64,
    newest_epoch: Epoch,
    volumes: heapless::Vec<Volume, VOLUMES>,
    /// Slots (bit n = slot n) that hold a finished request and are to be
    /// written empty. They may be reused before that write is handed out.
    clearing: u32,
    writes: heapless::Deque<Intent, WRITES>,
    /// The sequence to ring the doorbell with, after the queued writes.
    ring: Option<u64>,
    /// Rings written since a request record was last written, the one in
    /// `ring` included (the doorbell's `rings`).
    rings: u16,
    /// When to ring again, and the interval after that, while a request
    /// awaits its reply ([`HostConfig::ring_retry`]).
    ring_again: Option<(Instant, Duration)>,
    next_read: Instant,
    /// When the current wait for replies began (a request was sent while
    /// none awaited one): the outbox is read fast at first.
    wait_started: Instant,
    /// When the SPM header is next read while replies are awaited.
    next_spm_header: Instant,
    /// The newest `release_commit` this host applied (its inbox header's
    /// `release_ack`).
    release_ack: u64,
    /// The newest `release_commit` read in the SPM header.
    release_seen: u64,
    /// The `release_commit` [`HostEvent::RefreshAll`] was last said for,
    /// and when.
    refresh_all_asked: Option<(u64, Instant)>,
    last_now: Instant,
    pending_counter: u64,
    events: heapless::Deque<HostEvent, EVENTS>,
    stats: HostStats,
}

impl<const VOLUMES: usize> Host<VOLUMES> {
    /// Hold records needed for `VOLUMES` volumes.
    const HOLD_SLOTS: u16 = {
        assert!(
            VOLUMES <= MAX_HELD_VOLUMES,
            "a host engine holds at most MAX_HELD_VOLUMES volumes"
        );
        VOLUMES.div_ceil(HOLD_VOLUMES) as u16
    };
    /// Slots 1..=`REQUEST_SLOTS` take requests; the ones above, holds.
    const REQUEST_SLOTS: u16 = SLOTS_PER_AREA - Self::HOLD_SLOTS;

    /// An engine for host `host_id` of the mailbox of `domain`. It writes
    /// nothing until [`Host::start`].
    pub fn new(
        domain: Uuid,
        host_id: HostId,
        geometry: Geometry,
        config: HostConfig,
    ) -> Result<Self, HostError> {
        // Evaluated here so that a `VOLUMES` above MAX_HELD_VOLUMES fails
        // to build.
        let _ = Self::REQUEST_SLOTS;
        if domain.is_nil() {
            return Err(HostError::NilDomain);
        }
        let (Some(inbox_offset), Some(outbox_offset)) =
            (geometry.inbox_area(host_id), geometry.outbox_area(host_id))
        else {
            return Err(HostError::HostId);
        };
        if config.chunk_size == 0 {
            return Err(HostError::ChunkSize);
        }
        if config.utilization_percent > 100 {
            return Err(HostError::UtilizationPercent);
        }
        if config.poll_interval.is_zero() {
            return Err(HostError::PollInterval);
        }
        if config.spm_header_interval.is_zero() {
            return Err(HostError::SpmHeaderInterval);
        }
        if config.resend_timeout.is_zero() || config.resend_timeout > config.max_resend_timeout {
            return Err(HostError::ResendTimeout);
        }
        if config.remind_interval.is_zero() {
            return Err(HostError::RemindInterval);
        }
        Ok(Self {
            domain,
            host_id,
            geometry,
            inbox_offset,
            outbox_offset,
            config,
            threshold: volume::threshold(config.chunk_size, config.utilization_percent),
            generation: Generation::new(0),
            owner: 0,
            heartbeat: 0,
            next_lease: None,
            evicted: false,
            next_sequence: 1,
            newest_epoch: Epoch::ZERO,
            volumes: heapless::Vec::new(),
            clearing: 0,
            writes: heapless::Deque::new(),
            ring: None,
            rings: 0,
            ring_again: None,
            next_read: Instant::ZERO,
            wait_started: Instant::ZERO,
            next_spm_header: Instant::ZERO,
            release_ack: 0,
            release_seen: 0,
            refresh_all_asked: None,
            last_now: Instant::ZERO,
            pending_counter: 0,
            events: heapless::Deque::new(),
            stats: HostStats::default(),
        })
    }

    // ----------------------------------------------------------------- queries

    /// This host's id.
    pub fn host_id(&self) -> HostId {
        self.host_id
    }

    /// How far into its `spm_header_interval` this host reads the SPM
    /// header: host id `h` of `n` at `(h - 1) / n` of the interval, so
    /// that hosts started together (a fleet restarted at once, or many
    /// engines in one process) spread their reads over the interval
    /// instead of reading in one burst every interval.
    fn spm_header_phase(&self) -> Duration {
        let n = u32::from(self.geometry.max_hosts().max(1));
        let h = u32::from(self.host_id.get().saturating_sub(1));
        self.config
            .spm_header_interval
            .checked_div(n)
            .and_then(|step| step.checked_mul(h))
            .unwrap_or(Duration::ZERO)
    }

    /// The mailbox geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The host's generation: 0 before [`Host::start`].
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The newest SPM epoch seen in an accepted reply or an SPM header.
    pub fn newest_epoch(&self) -> Epoch {
        self.newest_epoch
    }

    /// What the engine knows about `volume`.
    pub fn volume(&self, volume: Uuid) -> Option<VolumeState> {
        self.volumes
            .iter()
            .find(|v| v.state.id == volume)
            .map(|v| v.state)
    }

    /// The allocation at which `volume` crosses its watermark: the offset
    /// to arm a write threshold at (qemu's `block-set-write-threshold`),
    /// so the caller hears of the guest's allocation exactly when the
    /// engine would ask for more. `None` for an unknown volume or one that
    /// can grow no more.
    pub fn write_threshold(&self, volume: Uuid) -> Option<u64> {
        let v = self.volume(volume)?;
        (v.physical < v.limit).then(|| v.physical.saturating_sub(self.threshold))
    }

    /// Every tracked volume.
    pub fn volumes(&self) -> impl Iterator<Item = VolumeState> + '_ {
        self.volumes.iter().map(|v| v.state)
    }

    /// Requests written and not finished with (awaiting a reply or a
    /// refresh); each holds a slot.
    pub fn in_flight(&self) -> usize {
        self.volumes
            .iter()
            .filter(|v| v.state.request.is_some())
            .count()
    }

    /// Counters.
    pub fn stats(&self) -> HostStats {
        self.stats
    }

    /// Slots 1..=this take requests; the slots above hold hold records.
    pub fn request_slots(&self) -> u16 {
        Self::REQUEST_SLOTS
    }

    /// The newest SPM `release_commit` this host has acknowledged (its
    /// inbox header's `release_ack`).
    pub fn release_ack(&self) -> u64 {
        self.release_ack
    }

    /// Whether a hold record still waits to be handed out by
    /// [`Host::poll_write`]: open a volume added with
    /// [`Host::add_volume`] only once this is false and the writes are
    /// durable.
    pub fn holds_pending(&self) -> bool {
        self.writes
            .iter()
            .any(|w| matches!(w, Intent::Slot(s) if s.get() > Self::REQUEST_SLOTS))
    }

    // ------------------------------------------------------------------ inputs

    /// Starts tracking a volume: `limit` is its virtual size plus format
    /// overhead (a multiple of 512), `physical` its current size and
    /// `allocation` the highest offset its guest has written. Added before
    /// [`Host::start`], its unanswered requests are recovered; added later,
    /// its watermark is checked at the next [`Host::handle_timeout`] (which
    /// [`Host::poll_timeout`] asks for at once).
    pub fn add_volume(
        &mut self,
        id: Uuid,
        virtual_size: u64,
        limit: u64,
        physical: u64,
        allocation: u64,
    ) -> Result<(), HostError> {
        if id.is_nil() {
            return Err(HostError::NilVolume);
        }
        if virtual_size == 0 || limit < virtual_size || limit % SIZE_ALIGN != 0 {
            return Err(HostError::InconsistentSizes);
        }
        if self.volumes.iter().any(|v| v.state.id == id) {
            return Err(HostError::DuplicateVolume);
        }
        let volume = Volume {
            state: VolumeState {
                id,
                virtual_size,
                limit,
                physical,
                allocation,
                paused: false,
                pending: false,
                rejected: false,
                segments_full: false,
                retry_at: None,
                request: None,
            },
            pending_order: 0,
            check_due: self.started(),
        };
        self.volumes
            .push(volume)
            .map_err(|_| HostError::TooManyVolumes)?;
        debug!("host: tracking volume {}", id);
        if self.started() {
            let last = self.volumes.len().saturating_sub(1);
            self.write_holds(last, last);
        }
        Ok(())
    }

    /// Stops tracking a volume. Its request, if any, is abandoned and its
    /// slot written empty (the SPM may still carry it out: harmless). The
    /// hold records are rewritten without it: call it only once the last
    /// I/O through the volume's map has completed.
    pub fn remove_volume(&mut self, now: Instant, id: Uuid) -> Result<(), HostError> {
        self.last_now = now;
        let i = self.index(id).ok_or(HostError::UnknownVolume)?;
        let old_len = self.volumes.len();
        let removed = self.volumes.remove(i);
        if let Some(flight) = removed.state.request {
            self.free_slot(now, flight.slot);
        }
        if self.started() {
            self.write_holds(i, old_len.saturating_sub(1));
        }
        debug!("host: no longer tracking volume {}", id);
        Ok(())
    }

    /// Recovers from the host's own inbox and outbox areas as read (4096
    /// bytes each) and starts a new generation. Call it once, after
    /// [`Host::new`] and the [`Host::add_volume`]s of the volumes the host
    /// still has. Queues the new inbox header first, then the rewritten
    /// and cleared slots, then the new requests the watermark asks for.
    ///
    /// The caller SHOULD pass the current SPM header to
    /// [`Host::handle_spm_header`] too, so that replies from older epochs
    /// are ignored from the start.
    ///
    /// `owner` is a random nonzero number drawn for this process: the
    /// inbox header carries it as the builtin lease on the host id
    /// ([`HostConfig::lease_interval`]; with the lease off it may be 0).
    /// Whether another live process holds the host id is the caller's to
    /// check before (watch the header's heartbeat): see
    /// docs/operations.md.
    pub fn start(
        &mut self,
        now: Instant,
        inbox_area: &[u8],
        outbox_area: &[u8],
        owner: u64,
    ) -> Result<(), HostError> {
        if self.started() {
            return Err(HostError::AlreadyStarted);
        }
        if owner == 0 && !self.config.lease_interval.is_zero() {
            return Err(HostError::Owner);
        }
        let inbox =
            InboxArea::new(inbox_area, self.domain, self.host_id).ok_or(HostError::AreaLength)?;
        let outbox =
            OutboxArea::new(outbox_area, self.domain, self.host_id).ok_or(HostError::AreaLength)?;
        let holds =
            HoldArea::new(inbox_area, self.domain, self.host_id).ok_or(HostError::AreaLength)?;
        let generation = Self::highest_generation(&inbox, &holds, &outbox)
            .next()
            .ok_or(HostError::GenerationExhausted)?;
        if let Ok(Some(h)) = inbox.header() {
            self.release_ack = h.release_ack;
        }
        self.last_now = now;
        self.generation = generation;
        self.owner = owner;
        self.next_lease =
            (!self.config.lease_interval.is_zero()).then(|| now + self.config.lease_interval);
        // The caller passes the SPM header it read at start; the next read
        // comes an interval later, plus this host's phase.
        self.next_spm_header = now + self.config.spm_header_interval + self.spm_header_phase();
        self.next_sequence = 1;
        info!(
            "host {}: starting generation {}",
            self.host_id, self.generation
        );
        self.push_write(Intent::Header);
        self.write_holds(
            0,
            usize::from(Self::HOLD_SLOTS).saturating_mul(HOLD_VOLUMES),
        );
        for i in 0..self.volumes.len() {
            self.update_pause(i);
        }

        // The request worth keeping per slot: a known volume, no final
        // reply, still needed. Per volume only the largest target is kept.
        let mut keep: [Option<(usize, Request)>; SLOTS] = [None; SLOTS];
        for (slot, state) in inbox.slots() {
            let (SlotState::Valid(request) | SlotState::Stale(request)) = state else {
                continue;
            };
            if slot.get() > Self::REQUEST_SLOTS {
                // A hold slot now: the watermark asks again if needed.
                continue;
            }
            let answered = matches!(
                outbox.slot(slot),
                Some(SlotState::Valid(reply) | SlotState::Stale(reply))
                    if reply.answers(&request) && reply.status.is_final()
            );
            let Some(i) = self.index(request.volume) else {
                continue;
            };
            let Some(v) = self.volumes.get(i).map(|v| v.state) else {
                continue;
            };
            let needed = request.target_size > v.physical && request.target_size <= v.limit;
            if answered || !needed {
                continue;
            }
            let better = keep
                .iter()
                .flatten()
                .all(|(j, other)| *j != i || other.target_size < request.target_size);
            if better {
                for k in keep.iter_mut() {
                    if matches!(k, Some((j, _)) if *j == i) {
                        *k = None;
                    }
                }
                if let Some(k) = keep.get_mut(slot_index(slot)) {
                    *k = Some((i, request));
                }
            }
        }
        for slot in (1..=Self::REQUEST_SLOTS).map(Slot::new) {
            let kept = keep.get(slot_index(slot)).copied().flatten();
            let empty = inbox
                .record_bytes(slot.get())
                .is_none_or(|b| b.iter().all(|&x| x == 0));
            match (kept, empty) {
                (Some((i, old)), _) => {
                    self.send_in(now, i, slot, old.target_size);
                    debug!(
                        "host: recovered request in slot {} for target {}",
                        slot, old.target_size
                    );
                }
                (None, true) => {}
                (None, false) => {
                    self.clearing |= slot_bit(slot);
                    self.push_write(Intent::Slot(slot));
                }
            }
        }
        self.check_release(now);
        for i in 0..self.volumes.len() {
            self.check_volume(now, i);
        }
        Ok(())
    }

    /// The guest of `volume` has written up to `allocation` (only ever
    /// raised; a smaller value is ignored). Pauses the guest when it has
    /// run out of space and asks for an extension when the watermark is
    /// crossed.
    pub fn handle_allocation(&mut self, now: Instant, volume: Uuid, allocation: u64) {
        self.last_now = now;
        let Some(i) = self.index(volume) else {
            debug!("host: allocation for unknown volume {}", volume);
            return;
        };
        if let Some(v) = self.volumes.get_mut(i) {
            v.state.allocation = v.state.allocation.max(allocation);
        }
        self.update_pause(i);
        self.check_volume(now, i);
    }

    /// The host's outbox area as read for a [`HostRead::OutboxArea`].
    pub fn handle_outbox(&mut self, now: Instant, outbox_area: &[u8]) {
        self.last_now = now;
        let Some(outbox) = OutboxArea::new(outbox_area, self.domain, self.host_id) else {
            warn!("host: outbox area of {} bytes ignored", outbox_area.len());
            return;
        };
        // First the newest epoch among the replies that answer a request,
        // so that the outcome does not depend on the order of the slots.
        // The header is parsed once; each slot at most twice.
        let header = outbox.header_generation();
        let mut epoch = self.newest_epoch;
        for v in self.volumes.iter() {
            if let Some(reply) = self.answer(&outbox, header, &v.state) {
                epoch = epoch.max(reply.epoch);
            }
        }
        if epoch > self.newest_epoch {
            debug!("host: SPM epoch {} seen in a reply", epoch);
            self.newest_epoch = epoch;
        }
        // A reply may free a slot that a pending volume takes at once; its
        // new request (a sequence from `first_new` on) is not looked at.
        let first_new = self.next_sequence;
        for i in 0..self.volumes.len() {
            let Some(v) = self.volumes.get(i).map(|v| v.state) else {
                continue;
            };
            let Some(flight) = v
                .request
                .filter(|f| f.awaits_reply() && f.sequence < first_new)
            else {
                continue;
            };
            let Some(state) = outbox.slot_under(flight.slot, header) else {
                continue;
            };
            match self.answer_in(&state, &v, &flight) {
                Some(reply) if reply.epoch >= self.newest_epoch => {
                    self.accept(now, i, flight, reply);
                }
                _ => self.ignore(now, state, i, &v, flight),
            }
        }
    }

    /// The caller refreshed its view of `volume`, which is now `physical`
    /// bytes (a smaller value than known is ignored). Completes an
    /// extension, resumes a paused guest that has room again and checks
    /// the watermark.
    pub fn handle_refreshed(&mut self, now: Instant, volume: Uuid, physical: u64) {
        self.last_now = now;
        let Some(i) = self.index(volume) else {
            debug!("host: refresh of unknown volume {}", volume);
            return;
        };
        let Some(v) = self.volumes.get_mut(i) else {
            return;
        };
        let state = &mut v.state;
        if physical > state.physical && state.segments_full {
            debug!("host: volume {} changed size; it may ask again", volume);
            state.segments_full = false;
        }
        state.physical = state.physical.max(physical);
        let mut done = None;
        if let Some(flight) = state.request
            && matches!(flight.phase, Phase::Extended { .. })
        {
            state.request = None;
            done = Some(flight);
        }
        let resumed = state.paused && state.allocation < state.physical;
        if resumed {
            state.paused = false;
        }
        let size = state.physical;
        if let Some(flight) = done {
            let latency = now.saturating_since(flight.sent);
            info!(
                "host: volume {} extended to {} in {} us",
                volume,
                size,
                u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)
            );
            self.event(HostEvent::Extended {
                volume,
                size,
                latency,
            });
        }
        if resumed {
            info!("host: volume {} resumed", volume);
            self.event(HostEvent::Resumed { volume });
        }
        if let Some(flight) = done {
            self.free_slot(now, flight.slot);
        }
        self.check_volume(now, i);
    }

    /// The SPM header record as read ([`HostRead::SpmHeader`]): learns its
    /// epoch (replies from older epochs are ignored from now on) and its
    /// `release_commit` (above `release_ack`: [`HostEvent::RefreshAll`]).
    /// An empty or damaged record, or one of another domain, teaches
    /// nothing.
    pub fn handle_spm_header(&mut self, now: Instant, record: &[u8]) {
        let Ok(Some(header)) = SpmHeader::decode(record) else {
            return;
        };
        if header.domain != self.domain {
            return;
        }
        if header.epoch > self.newest_epoch {
            debug!("host: SPM epoch {} seen in the SPM header", header.epoch);
            self.newest_epoch = header.epoch;
        }
        self.release_seen = self.release_seen.max(header.release_commit);
        if self.started() {
            self.last_now = now;
            self.check_release(now);
        }
    }

    /// The caller re-read the map of every volume it holds from pool
    /// metadata at least as new as `release_commit` (the value of a
    /// [`HostEvent::RefreshAll`]), and stopped and removed every volume
    /// the metadata no longer has: `release_ack` rises to it and the inbox
    /// header is written.
    pub fn handle_all_refreshed(&mut self, now: Instant, release_commit: u64) {
        self.last_now = now;
        if self.evicted || !self.started() || release_commit <= self.release_ack {
            return;
        }
        info!(
            "host {}: every held map is refreshed; acknowledging release commit {}",
            self.host_id, release_commit
        );
        self.release_ack = release_commit;
        if self
            .refresh_all_asked
            .is_some_and(|(asked, _)| asked <= release_commit)
        {
            self.refresh_all_asked = None;
        }
        self.push_write(Intent::Header);
    }

    /// The inbox header record as read back for the lease
    /// ([`HostRead::InboxHeader`]). Another process's owner (or a newer
    /// generation) there means it holds the host id now: the engine stops
    /// and says [`HostEvent::Evicted`]. Otherwise the heartbeat is raised
    /// and the header written again (which also repairs a header whose
    /// write was lost or damaged).
    pub fn handle_inbox_header(&mut self, now: Instant, record: &[u8]) {
        self.last_now = now;
        if self.evicted || !self.started() {
            return;
        }
        let at = crate::wire::Location {
            domain: self.domain,
            host_id: self.host_id,
            index: 0,
        };
        if let Ok(Some(h)) = InboxHeader::parse(record, &at)
            && (h.owner != self.owner || h.generation > self.generation)
        {
            warn!(
                "host {}: another process (owner {}) holds this host id; stopping",
                self.host_id, h.owner
            );
            self.evicted = true;
            self.writes.clear();
            self.ring = None;
            self.event(HostEvent::Evicted { owner: h.owner });
            return;
        }
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.push_write(Intent::Header);
    }

    /// Whether another process took the host id ([`HostEvent::Evicted`]).
    pub fn is_evicted(&self) -> bool {
        self.evicted
    }

    /// For a clean stop, after the writes still waiting in
    /// [`Host::poll_write`]: the inbox header that releases the host id
    /// (heartbeat interval 0), so that the next process with this host id
    /// need not watch for a live one. `None` before start or once evicted.
    #[must_use]
    pub fn release(&mut self) -> Option<HostWrite> {
        if self.evicted || !self.started() {
            return None;
        }
        self.next_lease = None;
        let record = self.inbox_header(Duration::ZERO).to_bytes().ok()?;
        Some(HostWrite {
            offset: self.inbox_offset,
            record,
        })
    }

    /// Time has passed: resends requests whose deadline passed (with
    /// backoff), repeats refresh requests, retries failed volumes and
    /// checks newly added ones.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        if !self.started() {
            return;
        }
        let cap = self.config.max_resend_timeout;
        let remind = self.config.remind_interval;
        for i in 0..self.volumes.len() {
            let Some(v) = self.volumes.get_mut(i) else {
                continue;
            };
            let mut check = core::mem::take(&mut v.check_due);
            if v.state.retry_at.is_some_and(|t| now >= t) {
                v.state.retry_at = None;
                check = true;
            }
            let id = v.state.id;
            let mut due = None;
            if let Some(flight) = v.state.request.as_mut()
                && now >= flight.deadline
            {
                flight.backoff = if flight.phase == Phase::WaitingForSpace {
                    remind
                } else {
                    flight.backoff.checked_mul(2).unwrap_or(cap).min(cap)
                };
                flight.deadline = now + flight.backoff;
                due = Some(*flight);
            }
            match due.map(|f| (f, f.phase)) {
                Some((flight, Phase::Sent)) if flight.renew => self.renew(now, i, flight),
                Some((flight, Phase::Sent)) => {
                    debug!("host: resending sequence {} for {}", flight.sequence, id);
                    self.resend(id, flight.slot, flight.sequence);
                }
                Some((_, Phase::Extended { size })) => {
                    debug!("host: volume {} still to be refreshed", id);
                    self.event(HostEvent::Refresh { volume: id, size });
                }
                Some((flight, Phase::WaitingForSpace)) => {
                    // Parked: the SPM answers when capacity comes, but a
                    // reminder every remind_interval rewrites the area,
                    // which repairs anything that damaged it, and reminds an
                    // SPM that lost track.
                    debug!(
                        "host: reminding the SPM of parked sequence {} for {}",
                        flight.sequence, id
                    );
                    self.resend(id, flight.slot, flight.sequence);
                }
                None => {}
            }
            if check {
                self.check_volume(now, i);
            }
        }
        self.ring_again_if_due(now);
    }

    // ----------------------------------------------------------------- outputs

    /// The next record to write. See the module documentation for the
    /// order the writes must be done in.
    #[must_use]
    pub fn poll_write(&mut self) -> Option<HostWrite> {
        if self.evicted {
            return None;
        }
        while let Some(intent) = self.writes.pop_front() {
            match intent {
                Intent::Header => {
                    let header = self.inbox_header(self.config.lease_interval);
                    match header.to_bytes() {
                        Ok(record) => {
                            return Some(HostWrite {
                                offset: self.inbox_offset,
                                record,
                            });
                        }
                        Err(field) => warn!("host: cannot emit inbox header: {}", field.name()),
                    }
                }
                Intent::Slot(slot) => {
                    let offset = self
                        .inbox_offset
                        .saturating_add(u64::from(slot.get()).saturating_mul(RECORD));
                    if let Some(request) = self.request_in(slot) {
                        match request.to_bytes() {
                            Ok(record) => return Some(HostWrite { offset, record }),
                            Err(field) => {
                                warn!("host: cannot emit request: {}", field.name());
                                continue;
                            }
                        }
                    }
                    if let Some(hold) = self.hold_in(slot) {
                        match hold.to_bytes() {
                            Ok(record) => return Some(HostWrite { offset, record }),
                            Err(field) => {
                                warn!("host: cannot emit hold record: {}", field.name());
                                continue;
                            }
                        }
                    }
                    self.clearing &= !slot_bit(slot);
                    return Some(HostWrite {
                        offset,
                        record: [0; RECORD_LEN],
                    });
                }
            }
        }
        let sequence = self.ring.take()?;
        let bell = Doorbell {
            domain: self.domain,
            ringer: self.host_id,
            generation: self.generation,
            sequence,
            rings: self.rings.max(1),
        };
        match bell.to_bytes() {
            Ok(record) => Some(HostWrite {
                offset: DOORBELL_OFFSET,
                record,
            }),
            Err(field) => {
                warn!("host: cannot emit doorbell: {}", field.name());
                None
            }
        }
    }

    /// The next read to do: the outbox area, while requests await a reply
    /// and `poll_interval` has passed since the last read handed out.
    #[must_use]
    pub fn poll_read(&mut self, now: Instant) -> Option<HostRead> {
        if self.evicted {
            return None;
        }
        if let Some(at) = self.next_lease
            && now >= at
        {
            self.next_lease = Some(now + self.config.lease_interval);
            return Some(HostRead::InboxHeader {
                offset: self.inbox_offset,
            });
        }
        if !self.started() {
            return None;
        }
        if now >= self.next_spm_header {
            self.next_spm_header = now + self.config.spm_header_interval;
            return Some(HostRead::SpmHeader);
        }
        if !self.awaiting_reply() || now < self.next_read {
            return None;
        }
        let waited = now.saturating_since(self.wait_started);
        self.next_read = now
            + (waited / 2)
                .max(self.config.fast_poll_interval)
                .min(self.config.poll_interval);
        self.stats.outbox_reads = self.stats.outbox_reads.saturating_add(1);
        Some(HostRead::OutboxArea {
            offset: self.outbox_offset,
        })
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    /// When the engine next wants [`Host::handle_timeout`] (and
    /// [`Host::poll_read`]) called; `None` when idle.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut soonest: Option<Instant> = None;
        if self.evicted {
            return None;
        }
        let mut at = |t: Instant| soonest = Some(soonest.map_or(t, |s| s.min(t)));
        if let Some(t) = self.next_lease {
            at(t);
        }
        if self.started() {
            at(self.next_spm_header);
        }
        if self.awaiting_reply() {
            at(self.next_read);
        }
        for v in &self.volumes {
            if v.check_due {
                at(self.last_now);
            }
            if let Some(t) = v.state.retry_at {
                at(t);
            }
            if let Some(flight) = v.state.request {
                at(flight.deadline);
            }
        }
        if let Some((t, _)) = self.ring_again
            && self.newest_unanswered().is_some()
        {
            at(t);
        }
        soonest
    }

    // ---------------------------------------------------------------- internal

    /// A ring was just queued after a request record was written: its
    /// `rings` is 1; ring again after `ring_retry` if no reply comes.
    fn ring_scheduled(&mut self, now: Instant) {
        self.rings = 1;
        let retry = self.config.ring_retry;
        let sequence = self.newest_unanswered().unwrap_or(0);
        self.ring_again = (!retry.is_zero()).then(|| (now + self.jittered(retry, sequence), retry));
    }

    /// `interval` stretched by 0 to 15/16 of itself, chosen by a hash of
    /// this host's id, the request's `sequence` and the interval: two
    /// hosts that rang at the same moment ring again at different ones.
    fn jittered(&self, interval: Duration, sequence: u64) -> Duration {
        let step = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        let h = (u64::from(self.host_id.get()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ sequence.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ step)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let sixteenths = (h >> 60) as u32;
        let extra = interval
            .checked_mul(sixteenths)
            .map_or(Duration::ZERO, |x| x / 16);
        interval.saturating_add(extra)
    }

    /// The newest request that awaits a reply and that the SPM may not
    /// have seen: sent, not parked (the SPM answered it) and not to be
    /// renewed (the SPM counts it as done).
    fn newest_unanswered(&self) -> Option<u64> {
        self.volumes
            .iter()
            .filter_map(|v| v.state.request)
            .filter(|f| f.phase == Phase::Sent && !f.renew)
            .map(|f| f.sequence)
            .max()
    }

    /// Rings again if a request still awaits its reply and the time has
    /// come; the interval doubles up to `resend_timeout`.
    fn ring_again_if_due(&mut self, now: Instant) {
        let Some((at, interval)) = self.ring_again else {
            return;
        };
        let Some(sequence) = self.newest_unanswered() else {
            self.ring_again = None;
            return;
        };
        if now < at {
            return;
        }
        if self.ring.is_none() {
            self.ring = Some(sequence);
            self.rings = self.rings.saturating_add(1);
            self.stats.rings_repeated = self.stats.rings_repeated.saturating_add(1);
        }
        let next = interval
            .checked_mul(2)
            .unwrap_or(self.config.resend_timeout)
            .min(self.config.resend_timeout)
            .max(interval);
        self.ring_again = Some((now + self.jittered(next, sequence), next));
    }

    fn started(&self) -> bool {
        self.generation.get() != 0
    }

    fn inbox_header(&self, lease_interval: Duration) -> InboxHeader {
        InboxHeader {
            domain: self.domain,
            host_id: self.host_id,
            generation: self.generation,
            owner: self.owner,
            heartbeat: self.heartbeat,
            heartbeat_interval_ms: u32::try_from(lease_interval.as_millis())
                .unwrap_or(u32::MAX)
                .max(u32::from(!lease_interval.is_zero())),
            release_ack: self.release_ack,
        }
    }

    fn index(&self, volume: Uuid) -> Option<usize> {
        self.volumes.iter().position(|v| v.state.id == volume)
    }

    fn awaiting_reply(&self) -> bool {
        self.volumes
            .iter()
            .any(|v| v.state.request.is_some_and(|f| f.awaits_reply()))
    }

    fn highest_generation(
        inbox: &InboxArea<'_>,
        holds: &HoldArea<'_>,
        outbox: &OutboxArea<'_>,
    ) -> Generation {
        let mut g = Generation::new(0);
        if let Ok(Some(h)) = inbox.header() {
            g = g.max(h.generation);
        }
        if let Ok(Some(h)) = outbox.header() {
            g = g.max(h.generation);
        }
        for (_, state) in inbox.slots() {
            if let SlotState::Valid(r) | SlotState::Stale(r) = state {
                g = g.max(r.generation);
            }
        }
        for (_, state) in holds.slots() {
            if let SlotState::Valid(r) | SlotState::Stale(r) = state {
                g = g.max(r.generation);
            }
        }
        for (_, state) in outbox.slots() {
            if let SlotState::Valid(r) | SlotState::Stale(r) = state {
                g = g.max(r.generation);
            }
        }
        g
    }

    /// The hold slot that lists volume `i`.
    fn hold_slot(i: usize) -> Slot {
        let k = u16::try_from(i / HOLD_VOLUMES).unwrap_or(u16::MAX);
        Slot::new(SLOTS_PER_AREA.saturating_sub(k))
    }

    /// The hold record for hold slot `slot`; `None` if it lists nothing.
    fn hold_in(&self, slot: Slot) -> Option<Hold> {
        let k = usize::from(SLOTS_PER_AREA.checked_sub(slot.get())?);
        if k >= usize::from(Self::HOLD_SLOTS) {
            return None;
        }
        let first = k.checked_mul(HOLD_VOLUMES)?;
        let mut held = [Uuid::NIL; HOLD_VOLUMES];
        let mut n = 0;
        for (to, v) in held.iter_mut().zip(self.volumes.iter().skip(first)) {
            *to = v.state.id;
            n += 1;
        }
        let listed = held.get(..n).filter(|l| !l.is_empty())?;
        Some(Hold::listing(
            self.domain,
            self.host_id,
            slot,
            self.generation,
            listed,
        ))
    }

    /// Queues the hold records that list volumes `first..=last` (by
    /// index), together with every hold record already queued, highest
    /// slot first: a volume that moves to a higher slot is written there
    /// before its old slot is rewritten, so it is never left unlisted.
    fn write_holds(&mut self, first: usize, last: usize) {
        let (low, high) = (Self::hold_slot(last), Self::hold_slot(first));
        let mut bits = 0u32;
        for s in low.get()..=high.get() {
            if s > Self::REQUEST_SLOTS {
                bits |= slot_bit(Slot::new(s));
            }
        }
        let mut kept: heapless::Deque<Intent, WRITES> = heapless::Deque::new();
        while let Some(w) = self.writes.pop_front() {
            match w {
                Intent::Slot(s) if s.get() > Self::REQUEST_SLOTS => bits |= slot_bit(s),
                other => {
                    let _ = kept.push_back(other);
                }
            }
        }
        self.writes = kept;
        for s in (Self::REQUEST_SLOTS + 1..=SLOTS_PER_AREA).rev() {
            let slot = Slot::new(s);
            if bits & slot_bit(slot) != 0 {
                self.push_write(Intent::Slot(slot));
            }
        }
    }

    /// Asks for [`HostEvent::RefreshAll`] if the SPM header's
    /// `release_commit` is above the ack and it was not asked for lately.
    fn check_release(&mut self, now: Instant) {
        let seen = self.release_seen;
        if seen <= self.release_ack || self.evicted {
            return;
        }
        let again = self.config.max_resend_timeout;
        let due = match self.refresh_all_asked {
            None => true,
            Some((asked, at)) => seen > asked || now.saturating_since(at) >= again,
        };
        if due {
            debug!(
                "host: the SPM released extents in commit {}; refreshing every map",
                seen
            );
            self.refresh_all_asked = Some((seen, now));
            self.event(HostEvent::RefreshAll {
                release_commit: seen,
            });
        }
    }

    fn event(&mut self, event: HostEvent) {
        if self.events.is_full() {
            let _ = self.events.pop_front();
            self.stats.events_dropped = self.stats.events_dropped.saturating_add(1);
        }
        let _ = self.events.push_back(event);
    }

    fn push_write(&mut self, intent: Intent) {
        if self.writes.iter().any(|w| *w == intent) {
            return;
        }
        if self.writes.push_back(intent).is_err() {
            // Cannot happen: one header and one entry per slot fit.
            warn!("host: write queue full");
        }
    }

    /// The request record for `slot`'s in-flight request, if any.
    fn request_in(&self, slot: Slot) -> Option<Request> {
        self.volumes.iter().find_map(|v| {
            let flight = v.state.request.filter(|f| f.slot == slot)?;
            Some(self.record(&v.state, &flight))
        })
    }

    fn record(&self, volume: &VolumeState, flight: &InFlight) -> Request {
        Request {
            domain: self.domain,
            host_id: self.host_id,
            slot: flight.slot,
            generation: self.generation,
            sequence: flight.sequence,
            volume: volume.id,
            target_size: flight.target,
            current_size: flight.current_size,
            paused: flight.paused,
        }
    }

    /// The valid reply in the slot of `volume`'s request awaiting a reply
    /// that answers exactly that request (epoch not checked).
    fn answer(
        &self,
        outbox: &OutboxArea<'_>,
        header: Option<Generation>,
        volume: &VolumeState,
    ) -> Option<Reply> {
        let flight = volume.request.filter(InFlight::awaits_reply)?;
        self.answer_in(&outbox.slot_under(flight.slot, header)?, volume, &flight)
    }

    /// The reply in `state` (what `flight`'s slot holds) if it answers the
    /// request exactly.
    fn answer_in(
        &self,
        state: &SlotState<Reply>,
        volume: &VolumeState,
        flight: &InFlight,
    ) -> Option<Reply> {
        match state {
            SlotState::Valid(reply) if reply.answers(&self.record(volume, flight)) => Some(*reply),
            _ => None,
        }
    }

    /// Slot `flight.slot` holds no reply the host may act on. If it holds
    /// a final answer to this very request all the same (stale, or from an
    /// older epoch), the request is renewed with a new sequence within
    /// `resend_timeout`.
    fn ignore(
        &mut self,
        now: Instant,
        state: SlotState<Reply>,
        i: usize,
        v: &VolumeState,
        flight: InFlight,
    ) {
        let reply = match state {
            SlotState::Empty => return,
            SlotState::Valid(r) | SlotState::Stale(r) => Some(r),
            SlotState::Defective(_) => None,
        };
        // The SPM leaves the reply to the slot's previous request in place
        // until it answers this one: that is not worth counting.
        let left_over =
            reply.is_some_and(|r| (r.generation, r.sequence) < (self.generation, flight.sequence));
        if left_over {
            return;
        }
        self.stats.replies_ignored = self.stats.replies_ignored.saturating_add(1);
        let request = self.record(v, &flight);
        let unusable_answer = reply.is_some_and(|r| r.answers(&request) && r.status.is_final());
        if !unusable_answer || flight.renew {
            return;
        }
        if let Some(f) = self
            .volumes
            .get_mut(i)
            .and_then(|v| v.state.request.as_mut())
        {
            warn!(
                "host: slot {} holds a stale or old-epoch answer; asking again",
                flight.slot
            );
            f.renew = true;
            // No answer can come to this sequence: renew within the first
            // resend timeout, not after a backoff grown while waiting.
            if f.awaits_reply() {
                f.phase = Phase::Sent;
                f.backoff = self.config.resend_timeout;
                f.deadline = f.deadline.min(now + f.backoff);
            }
        }
    }

    fn accept(&mut self, now: Instant, i: usize, flight: InFlight, reply: Reply) {
        let Some(v) = self.volumes.get_mut(i) else {
            return;
        };
        let volume = v.state.id;
        match reply.status {
            ReplyStatus::Extended => {
                if let Some(f) = v.state.request.as_mut() {
                    f.phase = Phase::Extended { size: reply.size };
                    f.backoff = self.config.resend_timeout;
                    f.deadline = now + f.backoff;
                }
                self.stats.replies_accepted = self.stats.replies_accepted.saturating_add(1);
                debug!("host: volume {} extended to {}", volume, reply.size);
                self.event(HostEvent::Refresh {
                    volume,
                    size: reply.size,
                });
            }
            ReplyStatus::WaitingForSpace => {
                if flight.phase == Phase::WaitingForSpace {
                    return;
                }
                if let Some(f) = v.state.request.as_mut() {
                    f.phase = Phase::WaitingForSpace;
                    f.backoff = self.config.remind_interval;
                    f.deadline = now + f.backoff;
                }
                self.stats.replies_accepted = self.stats.replies_accepted.saturating_add(1);
                info!("host: volume {} waits for space", volume);
                self.event(HostEvent::WaitingForSpace { volume });
            }
            ReplyStatus::Rejected(RejectReason::SegmentsFull) => {
                v.state.request = None;
                v.state.segments_full = true;
                self.stats.replies_accepted = self.stats.replies_accepted.saturating_add(1);
                warn!(
                    "host: volume {} cannot grow past {}: its segment table is full",
                    volume, reply.size
                );
                self.event(HostEvent::SegmentsFull {
                    volume,
                    size: reply.size,
                });
                self.free_slot(now, flight.slot);
            }
            ReplyStatus::Rejected(reason) => {
                v.state.request = None;
                v.state.rejected = true;
                self.stats.replies_accepted = self.stats.replies_accepted.saturating_add(1);
                warn!("host: request for {} rejected: {}", volume, reason.name());
                self.event(HostEvent::Rejected { volume, reason });
                self.free_slot(now, flight.slot);
            }
            ReplyStatus::Failed { code } => {
                v.state.request = None;
                v.state.retry_at = Some(now + self.config.resend_timeout);
                self.stats.replies_accepted = self.stats.replies_accepted.saturating_add(1);
                warn!("host: request for {} failed with {}", volume, code);
                self.event(HostEvent::Failed { volume, code });
                self.free_slot(now, flight.slot);
            }
        }
    }

    /// Pauses the guest of volume `i` if it ran out of space; sets the
    /// PAUSED flag of its request awaiting a reply (a resend).
    fn update_pause(&mut self, i: usize) {
        let Some(v) = self.volumes.get_mut(i) else {
            return;
        };
        let state = &mut v.state;
        if state.paused || state.allocation < state.physical {
            return;
        }
        state.paused = true;
        let id = state.id;
        let mut rewrite = None;
        if let Some(flight) = state.request.as_mut()
            && flight.awaits_reply()
            && !flight.paused
        {
            flight.paused = true;
            rewrite = Some((flight.slot, flight.sequence));
        }
        info!("host: volume {} paused", id);
        self.event(HostEvent::Paused { volume: id });
        if let Some((slot, sequence)) = rewrite {
            self.resend(id, slot, sequence);
        }
    }

    fn resend(&mut self, volume: Uuid, slot: Slot, sequence: u64) {
        self.push_write(Intent::Slot(slot));
        self.ring = Some(sequence);
        self.ring_scheduled(self.last_now);
        self.stats.resends = self.stats.resends.saturating_add(1);
        self.event(HostEvent::Resent { volume, sequence });
    }

    /// Sends a request for volume `i` if it needs one and may.
    fn check_volume(&mut self, now: Instant, i: usize) {
        if !self.started() {
            return;
        }
        let threshold = self.threshold;
        let Some(v) = self.volumes.get_mut(i) else {
            return;
        };
        let state = &mut v.state;
        if state.request.is_some() || state.pending || state.rejected || state.segments_full {
            return;
        }
        if let Some(t) = state.retry_at {
            if now < t {
                return;
            }
            state.retry_at = None;
        }
        if !state.needs_extension(threshold) {
            return;
        }
        match self.free_slot_number() {
            Some(slot) => self.send(now, i, slot),
            None => {
                self.pending_counter = self.pending_counter.wrapping_add(1);
                if let Some(v) = self.volumes.get_mut(i) {
                    v.state.pending = true;
                    v.pending_order = self.pending_counter;
                    debug!("host: no free slot for volume {}", v.state.id);
                }
                self.event(HostEvent::SlotsExhausted);
            }
        }
    }

    /// A slot no request holds: one already empty if any, else one about
    /// to be written empty (its empty write is then skipped).
    fn free_slot_number(&self) -> Option<Slot> {
        let busy = self
            .volumes
            .iter()
            .filter_map(|v| v.state.request)
            .fold(0u32, |bits, f| bits | slot_bit(f.slot));
        let free = |clearing_ok: bool| {
            (1..=Self::REQUEST_SLOTS).map(Slot::new).find(|&s| {
                busy & slot_bit(s) == 0 && (clearing_ok || self.clearing & slot_bit(s) == 0)
            })
        };
        free(false).or_else(|| free(true))
    }

    /// Writes a new request for volume `i` in `slot`, for the volume's
    /// current watermark target.
    fn send(&mut self, now: Instant, i: usize, slot: Slot) {
        let chunk = self.config.chunk_size;
        let Some(target) = self.volumes.get(i).and_then(|v| v.state.target(chunk)) else {
            return;
        };
        self.send_in(now, i, slot, target);
    }

    /// Writes a new request for volume `i` in `slot` for `target`.
    fn send_in(&mut self, now: Instant, i: usize, slot: Slot, target: u64) {
        let Some(sequence) = Some(self.next_sequence).filter(|&s| s != u64::MAX) else {
            warn!("host: sequence numbers exhausted");
            return;
        };
        let was_idle = !self.awaiting_reply();
        let backoff = self.config.resend_timeout;
        let Some(v) = self.volumes.get_mut(i) else {
            return;
        };
        v.state.pending = false;
        v.state.request = Some(InFlight {
            slot,
            sequence,
            target,
            current_size: v.state.physical,
            paused: v.state.paused,
            sent: now,
            deadline: now + backoff,
            backoff,
            phase: Phase::Sent,
            renew: false,
        });
        debug!(
            "host: volume {} asks for {} in slot {}",
            v.state.id, target, slot
        );
        self.next_sequence = sequence.saturating_add(1);
        self.clearing &= !slot_bit(slot);
        self.push_write(Intent::Slot(slot));
        self.ring = Some(sequence);
        self.ring_scheduled(now);
        self.stats.requests_sent = self.stats.requests_sent.saturating_add(1);
        if was_idle {
            // The SPM header first: its epoch, fresh for this wait.
            self.next_spm_header = now;
            self.wait_started = now;
            self.next_read = now
                + self
                    .config
                    .fast_poll_interval
                    .min(self.config.poll_interval);
        }
    }

    /// Replaces volume `i`'s request by a new one in the same slot, keeping
    /// its backoff running (so that renewing cannot turn into a storm).
    fn renew(&mut self, now: Instant, i: usize, old: InFlight) {
        if let Some(v) = self.volumes.get_mut(i) {
            v.state.request = None;
        }
        self.send(now, i, old.slot);
        match self
            .volumes
            .get_mut(i)
            .and_then(|v| v.state.request.as_mut())
        {
            Some(new) => {
                new.backoff = old.backoff;
                new.deadline = now + old.backoff;
            }
            None => self.free_slot(now, old.slot),
        }
    }

    /// The request in `slot` is finished with: write the slot empty, and
    /// give it to a pending volume if one waits.
    fn free_slot(&mut self, now: Instant, slot: Slot) {
        self.clearing |= slot_bit(slot);
        self.push_write(Intent::Slot(slot));
        // Paused guests first, then first come, first served.
        while let Some(i) = self
            .volumes
            .iter()
            .enumerate()
            .filter(|(_, v)| v.state.pending)
            .min_by_key(|(_, v)| (!v.state.paused, v.pending_order))
            .map(|(i, _)| i)
        {
            if let Some(v) = self.volumes.get_mut(i) {
                v.state.pending = false;
            }
            self.check_volume(now, i);
            if self
                .volumes
                .get(i)
                .is_some_and(|v| v.state.request.is_some() || v.state.pending)
            {
                break;
            }
        }
    }
}
