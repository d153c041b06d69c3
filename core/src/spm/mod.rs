//! The SPM engine: reads the inbox, runs extension jobs, writes replies.
//!
//! A sans-I/O state machine. The caller (the `spmbox spm` daemon, array
//! firmware, or a simulation) does the I/O it asks for and feeds back what
//! it read; the engine never blocks and never reads a clock.
//!
//! ```text
//!   poll_io(now) ──> ReadDoorbell / ReadHosts{first,count} / ReadSpmHeader
//!   handle_doorbell / handle_hosts / handle_spm_header  <── bytes read
//!   poll_job() ──> Job{volume, target, urgent}   handle_job_result <── backend
//!   handle_capacity(volume, size)  <── parked request completed by the pool
//!   withdrawn() / waiting(volume) ──> the pool's parked list follows the disk
//!   poll_write() ──> SpmWrite{offset, record}   (SPM header, outbox records)
//!   poll_event() ──> SpmEvent                    poll_timeout() ──> Instant
//! ```
//!
//! # Reading
//! - The doorbell is read every `doorbell_interval`. When it changes, the
//!   ringer's areas are read at once (a *targeted read*).
//! - Every host's areas are read every `full_scan_interval` (a *full
//!   scan*), and at start. The doorbell is a hint; the full scan bounds how
//!   long a request whose ring was lost waits.
//! - When the queue was full during a scan, requests wait on disk; when a
//!   full scan found new requests for at least a quarter of the queue,
//!   more are likely on their way. Either way, once the queue has drained
//!   to half, the next full scan is brought forward (at most one per
//!   `doorbell_interval`): a backlog, or a storm of requests, is worked
//!   off at the speed of the backend rather than one window per full
//!   scan, and each such scan reads no more than it finds work for.
//! - A host's inbox and outbox areas are always read together. A request
//!   whose outbox slot already holds a final reply answering it is done;
//!   one that has "waiting for space" is parked. So the engine needs no
//!   memory of what it answered: an SPM that restarts, or a new SPM,
//!   rebuilds everything from the mailbox and answers every pending
//!   request. Answering a request twice is harmless (absolute targets).
//! - A request that leaves the disk before it is answered (the host
//!   emptied or rewrote its slot) leaves the queue at the next read of
//!   that host. If it was parked, the backend may still hold it:
//!   [`Spm::withdrawn`] then changes, and the caller hands
//!   [`Spm::waiting`] to the backend (`Pool::withdraw_parked`), which
//!   drops or lowers its parked entry. So what added capacity extends
//!   follows from the mailbox as last read, whether or not the SPM
//!   restarted in between.
//!
//! # Queue
//! See `queue.rs`: a bounded window over the mailbox, one job per volume
//! (largest target wins), paused guests first, hosts round robin, a
//! per-host cap. A request the queue cannot take stays on disk.
//!
//! # Writing
//! Replies go to the slot of the host's outbox area that matches the
//! request's inbox slot. Before the first reply to a host, the outbox
//! header is written with this SPM's epoch and the request's generation.
//! Writes are whole 128-byte records at absolute mailbox offsets; the caller
//! writes the sector that holds each (it is the only writer of those
//! sectors).
//!
//! # Epochs, owners and failover
//! `Spm::new` takes the SPM header found on disk and runs with its epoch
//! plus one, under an `owner`: a random nonzero number the caller draws
//! for this SPM instance. Its first write is its SPM header. It then
//! *settles*: it reads nothing else, runs no job and writes no reply until
//! it has read its own header back, [`settle`] (one and a half heartbeat
//! intervals) after writing it. Two SPMs that start at once take the same
//! epoch; the header holds the owner of whichever wrote last, so the other
//! reads back a foreign owner and stands down before it acted: two SPMs
//! never both act at one epoch (unless one stalls between reading the
//! header and writing its own for longer than the settle time, which the
//! lease documentation covers). Every `heartbeat_interval` it reads the
//! header back: a header of a higher epoch, or of its own epoch with
//! another owner, *deposes* it: it stops reading, running jobs and
//! writing, and says so with [`SpmEvent::Deposed`]. A header of a lower
//! epoch, or a damaged one, means its own write was lost or an older SPM
//! wrote late: it writes its header again and settles again. Hosts ignore
//! replies from an epoch older than the newest they have seen.

// The queue is the engine's own; tests, fuzzers and the simulation reach
// it with the `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub mod queue;
#[cfg(not(any(test, feature = "testing")))]
#[allow(dead_code)] // what only tests and fuzzers inspect
mod queue;
pub use queue::{Job, Refused};

use core::time::Duration;

use crate::time::Instant;
use crate::wire::{
    Defect, Doorbell, Epoch, Geometry, HostId, InboxArea, Location, MAX_HOSTS, OutboxArea,
    OutboxHeader, RECORD_LEN, RejectReason, Reply, ReplyStatus, Request, SPM_HEADER_OFFSET, Slot,
    SlotState, SpmHeader, SpmState, Uuid,
};
use queue::{EntryState, RequestQueue};

/// Defective records reported per full scan; the rest are only counted.
pub const DEFECT_REPORTS_PER_SCAN: u32 = 16;
/// Queue refusals reported per full scan; the rest are only counted.
pub const REFUSAL_REPORTS_PER_SCAN: u32 = 16;
/// Targeted reads that can wait at once; past that, a full scan is due.
pub const TARGETED_READS: usize = 64;
/// Hosts a full scan reads per step: a scan of a large mailbox is handed
/// out in steps of this many hosts (at most 512 KiB of areas each), with
/// the doorbell, targeted reads, jobs and replies in between, so that a
/// request that arrives during a scan of 2000 hosts waits for one step,
/// not for the whole scan.
pub const SCAN_STEP_HOSTS: u16 = 64;
/// How long a batch that opened during a full scan may wait for the scan's
/// later steps before it is committed: a scan of 2000 hosts takes tens of
/// steps, and committing after each would pay a durable write per step;
/// waiting for the whole scan would hold a reply for all of it.
pub const SCAN_BATCH_WAIT: Duration = Duration::from_millis(4);
/// Events kept until polled; past that the oldest are dropped (counted).
pub const EVENTS: usize = 64;
/// Words of the bit set of hosts with requests the per-host cap left on
/// disk: one bit per host id, 0..=[`MAX_HOSTS`].
const CAPPED_WORDS: usize = (MAX_HOSTS as usize + 1).div_ceil(32);
/// Fencing: once this many heartbeat intervals have passed without a read
/// of the SPM header that names this SPM, it writes nothing until such a
/// read (see [`Spm::handle_timeout`]). Another SPM takes over only after
/// the heartbeat has not moved for 2.5 intervals, so an SPM that stalled
/// longer than this reads the header before its next write.
pub const FENCE_HEARTBEATS: u32 = 2;

/// Error numbers a [`JobResult::Failed`] carries into a reply's `code`
/// (Linux errno values; docs/format.md, the reply record).
pub mod errno {
    /// The backend failed (an I/O error, a tool that failed, anything not
    /// more specific). The host retries later.
    pub const EIO: u32 = 5;
    /// The backend cannot take the request now (its parked list is full);
    /// the request stays in the mailbox and is retried.
    pub const EAGAIN: u32 = 11;
}

/// How many full scans brought forward by colliding rings may run back to
/// back after a quiet spell; after that they come at most one per
/// [`SpmConfig::busy_scan_interval`] on average. A burst of rings after a
/// quiet spell is so scanned for at once, while a steady stream of
/// collisions reads no more than the interval allows.
pub const BUSY_SCAN_BURST: u32 = 2;

/// A ring rung again (the doorbell's `rings` 2 or more) is taken as a sign
/// that the ringer's earlier ring was overwritten unread only when the
/// doorbell was read no longer than this before: hosts ring again no sooner
/// than this after their earlier ring (`HostConfig::ring_retry`'s
/// default), so a read that recent came after the earlier ring and did
/// not find it. An SPM reading slowly (idle) may simply not have read
/// the earlier ring before it was rung again.
pub const RING_AGAIN_AFTER: Duration = Duration::from_millis(5);

/// How the SPM engine paces itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SpmConfig {
    /// How often the doorbell is read.
    pub doorbell_interval: Duration,
    /// How often every host's areas are read.
    pub full_scan_interval: Duration,
    /// How often the SPM header is read back and the heartbeat bumped.
    pub heartbeat_interval: Duration,
    /// The most queue entries one host may hold.
    pub per_host_cap: usize,
    /// The most jobs running at once.
    pub max_jobs: usize,
    /// The average time between full scans while rings collide. The
    /// doorbell holds one ring, so when two doorbell reads in a row each
    /// find a new ring, the doorbell changed between two reads (a fraction
    /// of a millisecond apart, right after a ring): rings are arriving at
    /// least as fast as they are read and some were likely overwritten.
    /// The next full scan is then brought forward: at once while the
    /// allowance of [`BUSY_SCAN_BURST`] scans lasts, which refills by one
    /// scan per this interval. Rings from hosts that ask one after
    /// another, each read before the next is written, bring nothing
    /// forward. Zero turns it off. Default 50 ms.
    pub busy_scan_interval: Duration,
    /// How often the doorbell is read once no new ring has been seen for
    /// `idle_after`: an idle SPM then costs less, and the first ring after
    /// a quiet spell waits at most this long. At most `doorbell_interval`
    /// turns it off. Default 40 ms.
    pub idle_doorbell_interval: Duration,
    /// How long without a new ring makes the SPM idle. Default 5 s.
    pub idle_after: Duration,
    /// How soon the doorbell is read again right after a new ring: rings
    /// come in bursts (a guest's neighbours, a host's next volume, the
    /// next request of a busy host), so the SPM reads the doorbell at this
    /// interval just after a ring and backs off as the quiet lasts: the
    /// interval is half the time since the last new ring, between this and
    /// `doorbell_interval`. That costs about ten reads per quiet spell and
    /// takes a ring that follows another within milliseconds in a fraction
    /// of a millisecond. At least `doorbell_interval` turns it off.
    /// Default 250 µs.
    pub fast_doorbell_interval: Duration,
}

impl Default for SpmConfig {
    fn default() -> Self {
        Self {
            doorbell_interval: Duration::from_millis(5),
            full_scan_interval: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(1),
            per_host_cap: 8,
            max_jobs: 4,
            busy_scan_interval: Duration::from_millis(50),
            idle_doorbell_interval: Duration::from_millis(40),
            idle_after: Duration::from_secs(5),
            fast_doorbell_interval: Duration::from_micros(250),
        }
    }
}

/// A read the engine asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SpmIo {
    /// Read the doorbell record and pass it to [`Spm::handle_doorbell`].
    ReadDoorbell,
    /// Read the inbox and outbox areas of hosts `first_host ..
    /// first_host + count` and pass them to [`Spm::handle_hosts`].
    ReadHosts {
        /// The first host.
        first_host: HostId,
        /// How many hosts.
        count: u16,
    },
    /// Read the SPM header record and pass it to [`Spm::handle_spm_header`].
    ReadSpmHeader,
}

/// A record to write at an absolute offset of the mailbox.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SpmWrite {
    /// Where the record goes.
    pub offset: u64,
    /// The record.
    pub record: [u8; RECORD_LEN],
}

/// What the backend did with a [`Job`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum JobResult {
    /// The volume is now `size` bytes (at least the target, or less if
    /// only some requests could be met... never: the backend extends all
    /// or nothing).
    Extended {
        /// The volume's size.
        size: u64,
    },
    /// No room; the backend parked the request and will report it through
    /// [`Spm::handle_capacity`] when capacity is added.
    NoSpace {
        /// The volume's current size.
        size: u64,
    },
    /// The volume does not exist.
    UnknownVolume,
    /// The target is beyond the volume's limit.
    OverLimit {
        /// The volume's current size.
        size: u64,
    },
    /// The request makes no sense to the backend.
    Malformed,
    /// The volume's map holds as many segments as the pool keeps per
    /// volume and the extension cannot be placed contiguously: it grows no
    /// further (until it is reduced or moved).
    SegmentsFull {
        /// The volume's current size.
        size: u64,
    },
    /// The backend failed with this error number.
    Failed {
        /// The error number.
        code: u32,
    },
}

impl JobResult {
    /// The one mapping from what the reference pool's
    /// [`Pool::extend`](crate::pool::Pool::extend) returned to a job
    /// result. `size` is the volume's size in the pool after the call (a
    /// refusal reports it).
    pub fn from_pool(
        result: Result<crate::pool::Extend, crate::pool::PoolError>,
        size: u64,
    ) -> JobResult {
        use crate::pool::{Extend, PoolError};
        match result {
            Ok(Extend::Extended { size }) => JobResult::Extended { size },
            Ok(Extend::Parked { size }) => JobResult::NoSpace { size },
            Err(PoolError::UnknownVolume) => JobResult::UnknownVolume,
            Err(PoolError::OverLimit { .. }) => JobResult::OverLimit { size },
            Err(PoolError::InvalidSize { .. }) => JobResult::Malformed,
            Err(PoolError::SegmentsFull) => JobResult::SegmentsFull { size },
            // The parked list is full: the request stays in the mailbox
            // and is retried.
            Err(PoolError::ParkedFull) => JobResult::Failed {
                code: errno::EAGAIN,
            },
            Err(_) => JobResult::Failed { code: errno::EIO },
        }
    }
}

/// Runs `job` on the reference pool: the extension, and the job result
/// for [`Spm::handle_job_result`].
pub fn run_pool_job<const LUNS: usize, const LVS: usize, const SEGS: usize, const PARKED: usize>(
    pool: &mut crate::pool::Pool<LUNS, LVS, SEGS, PARKED>,
    job: &Job,
) -> JobResult {
    let result = pool.extend(job.volume, job.target_size, job.urgent);
    let size = pool.volume(job.volume).map_or(0, |v| v.size);
    JobResult::from_pool(result, size)
}

/// A batch of job results the backend must make durable before any of
/// them is answered: [`Spm::poll_commit`] hands it out once the SPM header
/// was read back naming this SPM, and [`Spm::handle_committed`] (or
/// [`Spm::handle_commit_failed`]) takes the outcome.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SpmCommit {
    /// Jobs whose results the batch holds (0 for a commit asked with
    /// [`Spm::request_commit`]).
    pub jobs: usize,
}

/// Where the current batch of jobs stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Batch {
    /// No result waits for a commit.
    Idle,
    /// Results are in; more jobs may still be handed out.
    Open,
    /// Closed (no more jobs); the fencing read is not asked yet.
    Closed,
    /// Closed; waiting for the SPM header to be read back.
    Fence,
    /// The header was read back naming this SPM: the commit may be made.
    Ready,
    /// Handed out by `poll_commit`; waiting for its outcome.
    Committing,
}

/// Something worth logging.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SpmEvent {
    /// A full scan was handed out.
    FullScan,
    /// A record in a host area is defective (rate-limited).
    Defective {
        /// The host.
        host_id: HostId,
        /// Inbox (true) or outbox.
        inbox: bool,
        /// Record index (0 header, 1..=31 slot).
        index: u16,
        /// What is wrong.
        defect: Defect,
    },
    /// The queue could not take a request (rate-limited); it stays on disk.
    Refused {
        /// The host.
        host_id: HostId,
        /// The slot.
        slot: Slot,
        /// Why.
        why: Refused,
    },
    /// A reply was handed out for writing.
    Answered {
        /// The host.
        host_id: HostId,
        /// The slot.
        slot: Slot,
        /// The volume.
        volume: Uuid,
        /// The status.
        status: ReplyStatus,
        /// The volume's size.
        size: u64,
    },
    /// The doorbell record is defective, or names a host this mailbox
    /// does not have (`Defect::InvalidField` of `Field::Ringer`). Reported
    /// once until the doorbell changes; rings are only a hint, so the full
    /// scans still find every request.
    DoorbellDefective {
        /// What is wrong.
        defect: Defect,
    },
    /// Another SPM holds a higher epoch; this one has stopped.
    Deposed {
        /// The other SPM's epoch.
        epoch: Epoch,
        /// The other SPM's id.
        spm_id: HostId,
    },
}

/// Counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SpmStats {
    /// Full scans handed out.
    pub full_scans: u64,
    /// Targeted reads handed out.
    pub targeted_reads: u64,
    /// Full scans brought forward because rings collided.
    pub busy_scans: u64,
    /// Full scans brought forward once the queue drained after a scan
    /// found it full or a full scan found it busy.
    pub backlog_scans: u64,
    /// Jobs handed out.
    pub jobs: u64,
    /// Replies handed out.
    pub replies: u64,
    /// Defective records seen.
    pub defective: u64,
    /// Stale records seen.
    pub stale: u64,
    /// Requests the queue refused (they stay on disk).
    pub refused: u64,
    /// Events dropped because nobody polled them.
    pub events_dropped: u64,
}

/// How long an SPM waits after writing its header before it reads it
/// back and acts: one and a half heartbeat intervals, longer than the gap
/// between any other starter's read of the header and its write.
pub fn settle(config: &SpmConfig) -> Duration {
    config.heartbeat_interval + config.heartbeat_interval / 2
}

/// Why [`Spm::new`] refuses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SpmError {
    /// The SPM header's epoch cannot be raised.
    EpochExhausted,
    /// The SPM id is not 0..=max_hosts.
    SpmId,
    /// The owner is 0 (draw a random nonzero number).
    Owner,
}

impl core::fmt::Display for SpmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SpmError::EpochExhausted => f.write_str("the SPM epoch cannot be raised any further"),
            SpmError::SpmId => f.write_str("the SPM id is not a host id of this mailbox (or 0)"),
            SpmError::Owner => f.write_str("the SPM owner must be a nonzero random number"),
        }
    }
}

impl core::error::Error for SpmError {}

/// The SPM header a new SPM hands [`Spm::new`]: `found` (the header on
/// disk, `None` if empty or damaged) with its epoch raised to `floor`, or,
/// when nothing was found and `floor` is above 0, a vacant header at
/// `floor`. [`Spm::new`] then runs one epoch above it. `floor` is the
/// newest epoch in the outbox areas
/// ([`crate::driver::newest_outbox_epoch`]) and any epoch a lease manager
/// requires: the new SPM's epoch must be above every epoch a host may
/// have seen (docs/format.md, section 8).
pub fn start_header(found: Option<SpmHeader>, floor: Epoch, domain: Uuid) -> Option<SpmHeader> {
    match found {
        Some(mut h) => {
            h.epoch = h.epoch.max(floor);
            Some(h)
        }
        None if floor > Epoch::ZERO => Some(SpmHeader::vacant(domain, floor)),
        None => None,
    }
}

/// The SPM engine with a queue window of `QUEUE` requests.
#[derive(Debug)]
pub struct Spm<const QUEUE: usize> {
    domain: Uuid,
    geometry: Geometry,
    config: SpmConfig,
    spm_id: HostId,
    owner: u64,
    epoch: Epoch,
    heartbeat: u64,
    pool_commit: u64,
    /// The newest pool commit that released extents, as the SPM header
    /// carries it.
    release_commit: u64,
    header_write: bool,
    /// The header was read back with this SPM's epoch and owner since it
    /// was last written anew: the SPM may act.
    confirmed: bool,
    deposed: bool,
    queue: RequestQueue<QUEUE>,
    jobs_running: usize,
    /// Jobs handed out in the current batch.
    batch_jobs: usize,
    batch: Batch,
    /// When the open batch got its first result, and the latest time the
    /// engine was told of.
    batch_opened: Instant,
    now_seen: Instant,
    /// The fencing read of the SPM header was handed out and not yet
    /// handled.
    header_asked: bool,
    /// No read of the SPM header named this SPM for
    /// [`FENCE_HEARTBEATS`] heartbeat intervals: nothing is written until
    /// one does.
    fenced: bool,
    /// When a read of the SPM header last named this SPM.
    last_own_header: Instant,
    next_doorbell: Instant,
    next_scan: Instant,
    next_heartbeat: Instant,
    targeted: heapless::Deque<HostId, TARGETED_READS>,
    last_doorbell: Option<Doorbell>,
    /// The defect of the doorbell last reported, so that a doorbell that
    /// stays defective is reported once.
    doorbell_defect: Option<Defect>,
    /// When the last full scan was handed out.
    last_full_scan: Instant,
    /// The allowance of full scans brought forward by colliding rings:
    /// one more may start at `busy_allowance - (BUSY_SCAN_BURST - 1) *
    /// busy_scan_interval` (a scan takes one interval off it).
    busy_allowance: Instant,
    /// A read other than a scan step was handed out while a full scan
    /// runs: the next read is the scan's next step, so that a doorbell
    /// read often during a burst of rings, and the targeted reads the
    /// rings ask for, do not hold the scan back.
    step_owed: bool,
    /// When the doorbell last showed a new ring (or the engine started).
    last_ring: Instant,
    /// The last doorbell read found a new ring.
    last_read_rang: bool,
    /// When the doorbell was last read.
    last_doorbell_read: Instant,
    /// A scan since the last full scan found the queue full (requests
    /// wait on disk), or the last full scan was busy: scan again once the
    /// queue has room.
    backlog: bool,
    /// The scan due at `next_scan` was brought forward by colliding rings:
    /// if a scan still runs then, it starts over where it is.
    busy_due: bool,
    /// Requests the running read queued anew.
    found: usize,
    /// The scan step handed out last, until it is read: its finds count
    /// in `scan_found`.
    step_out: Option<(HostId, u16)>,
    /// Requests the running full scan's steps queued anew. A batch waits
    /// for the scan's later steps only once its earlier ones found
    /// something: a scan that finds nothing (most scans, and those set off
    /// by rings that only seemed to collide) holds no reply back.
    scan_found: usize,
    scan_cursor: u16,
    /// The full scan in progress: the next host to read (0-based) and how
    /// many are left to read.
    scan_next: u16,
    scan_left: u16,
    /// Where the next full scan starts (0-based): it moves by a step each
    /// scan, so that a nearly full queue is not always filled by the
    /// lowest host ids.
    scan_origin: u16,
    /// The last step of a full scan was handed out: once it is read, the
    /// scan's finds tell whether a backlog is likely.
    scan_closing: bool,
    defect_reports: u32,
    refusal_reports: u32,
    events: heapless::Deque<SpmEvent, EVENTS>,
    stats: SpmStats,
    /// "No space" results for which no request was running any more: the
    /// backend parked something nobody asks for (part of `withdrawn`).
    orphan_parks: u64,
    /// Hosts with a request the per-host cap left on disk: the host's
    /// areas are read again as soon as one of its entries leaves the
    /// queue, so a host that uses more slots than the cap waits for
    /// answers, not for the next full scan.
    capped: [u32; CAPPED_WORDS],
}

impl<const QUEUE: usize> Spm<QUEUE> {
    /// An SPM for the mailbox of `domain` with `geometry`, taking over from
    /// whatever `found` (the SPM header on disk, `None` if empty) says,
    /// with the next epoch, as `owner` (a random nonzero number drawn for
    /// this instance). Its first write is its SPM header; it acts once it
    /// has read that header back after [`settle`].
    pub fn new(
        now: Instant,
        domain: Uuid,
        geometry: Geometry,
        spm_id: HostId,
        owner: u64,
        found: Option<&SpmHeader>,
        config: SpmConfig,
    ) -> Result<Self, SpmError> {
        if spm_id.get() > geometry.max_hosts() {
            return Err(SpmError::SpmId);
        }
        if owner == 0 {
            return Err(SpmError::Owner);
        }
        let epoch = found
            .map_or(Epoch::ZERO, |h| h.epoch)
            .next()
            .ok_or(SpmError::EpochExhausted)?;
        info!("spm: starting with epoch {}", epoch);
        Ok(Self {
            domain,
            geometry,
            config,
            spm_id,
            owner,
            epoch,
            heartbeat: 0,
            pool_commit: found.map_or(0, |h| h.pool_commit),
            release_commit: found.map_or(0, |h| h.release_commit),
            header_write: true,
            confirmed: false,
            deposed: false,
            queue: RequestQueue::new(config.per_host_cap),
            jobs_running: 0,
            batch_jobs: 0,
            batch: Batch::Idle,
            batch_opened: now,
            now_seen: now,
            header_asked: false,
            fenced: false,
            last_own_header: now,
            next_doorbell: now,
            next_scan: now,
            next_heartbeat: now + settle(&config),
            targeted: heapless::Deque::new(),
            last_doorbell: None,
            doorbell_defect: None,
            last_full_scan: Instant::ZERO,
            busy_allowance: Instant::ZERO,
            step_owed: false,
            last_ring: now,
            last_read_rang: false,
            last_doorbell_read: Instant::ZERO,
            backlog: false,
            busy_due: false,
            found: 0,
            step_out: None,
            scan_found: 0,
            scan_cursor: 0,
            scan_next: 0,
            scan_left: 0,
            scan_origin: 0,
            scan_closing: false,
            defect_reports: 0,
            refusal_reports: 0,
            events: heapless::Deque::new(),
            stats: SpmStats::default(),
            orphan_parks: 0,
            capped: [0; CAPPED_WORDS],
        })
    }

    /// The mailbox geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// This SPM's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// This SPM instance's owner number.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Whether the header was read back as this SPM's since it was last
    /// written anew: only then does the SPM read hosts, run jobs and reply.
    pub fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// The newest pool metadata commit the backend made durable; the SPM
    /// header carries it from the next header write on (a second place for
    /// it, so that a pool rolled back to an older copy is noticed).
    pub fn set_pool_commit(&mut self, sequence: u64) {
        self.pool_commit = self.pool_commit.max(sequence);
    }

    /// The pool commit the SPM header carries.
    pub fn pool_commit(&self) -> u64 {
        self.pool_commit
    }

    /// The newest pool commit that released extents (took them from a
    /// volume), once it is durable; the SPM header carries it from the next
    /// header write on, and hosts acknowledge it in their inbox headers'
    /// `release_ack`. Only ever raised: the header found at start is the
    /// floor, so pass the pool metadata's value at start too.
    pub fn set_release_commit(&mut self, sequence: u64) {
        self.release_commit = self.release_commit.max(sequence);
    }

    /// The release commit the SPM header carries.
    pub fn release_commit(&self) -> u64 {
        self.release_commit
    }

    /// Whether another SPM has taken over.
    pub fn is_deposed(&self) -> bool {
        self.deposed
    }

    /// Whether the SPM is fenced ([`Spm::handle_timeout`]): it writes
    /// nothing until a read of the SPM header names it again.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// How many requests the queue holds, for status displays.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The queue, for tests and the simulation (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn queue(&self) -> &RequestQueue<QUEUE> {
        &self.queue
    }

    /// Counters.
    pub fn stats(&self) -> SpmStats {
        self.stats
    }

    /// A count that changes whenever a request that was parked (or whose
    /// job was running) left the mailbox before it was answered: the host
    /// emptied its slot, rewrote it under a new generation, or asks for
    /// less. When it changes, the caller hands [`Spm::waiting`] to the
    /// pool (`Pool::withdraw_parked`), so that capacity added later
    /// serves only what the mailbox still asks for.
    pub fn withdrawn(&self) -> u64 {
        self.queue.withdrawn().wrapping_add(self.orphan_parks)
    }

    /// What the requests for `volume` that wait for capacity (or whose job
    /// runs) still ask: `(largest target, any guest paused)`, or `None`.
    pub fn waiting(&self, volume: Uuid) -> Option<(u64, bool)> {
        self.queue.waiting(volume)
    }

    /// Jobs handed out and not yet reported back.
    pub fn jobs_running(&self) -> usize {
        self.jobs_running
    }

    fn event(&mut self, event: SpmEvent) {
        if self.events.is_full() {
            let _ = self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        let _ = self.events.push_back(event);
    }

    /// The next read to do, if one is due at `now`.
    #[must_use]
    pub fn poll_io(&mut self, now: Instant) -> Option<SpmIo> {
        if self.deposed {
            return None;
        }
        self.now_seen = self.now_seen.max(now);
        self.handle_timeout(now);
        if (self.fenced || (self.batch == Batch::Fence && self.confirmed)) && !self.header_asked {
            // Fencing: the header is read before the next write, and
            // before every commit attempt.
            self.header_asked = true;
            return Some(SpmIo::ReadSpmHeader);
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.config.heartbeat_interval;
            return Some(SpmIo::ReadSpmHeader);
        }
        if !self.confirmed {
            return None;
        }
        if self.scan_closing {
            self.scan_closing = false;
            if self.found >= QUEUE / 4 {
                // A busy full scan: more requests are likely on their way.
                self.backlog = true;
            }
        }
        if self.backlog_due() {
            // Requests wait on disk and the queue has room for them.
            self.backlog = false;
            let at = (self.last_full_scan + self.config.doorbell_interval).max(now);
            if at < self.next_scan {
                self.next_scan = at;
                self.stats.backlog_scans += 1;
            }
        }
        if now >= self.next_scan && (self.scan_left == 0 || self.busy_due) {
            // A scan brought forward by colliding rings while one runs
            // starts over at the running one's place: what the running
            // scan has passed may have been written since, and the rest
            // is read by the new one.
            let restart = self.scan_left > 0;
            self.busy_due = false;
            self.next_scan = now + self.config.full_scan_interval;
            self.last_full_scan = now;
            // The scan reads every host: the rings waiting for a read of
            // their own are covered.
            self.targeted.clear();
            self.defect_reports = 0;
            self.refusal_reports = 0;
            self.found = 0;
            self.scan_found = 0;
            let hosts = self.geometry.max_hosts();
            self.scan_left = hosts;
            if !restart {
                self.scan_next = self.scan_origin % hosts.max(1);
                self.scan_origin = (self.scan_next + SCAN_STEP_HOSTS) % hosts.max(1);
            }
            self.stats.full_scans += 1;
            self.event(SpmEvent::FullScan);
        }
        if self.step_owed && self.scan_left > 0 {
            return Some(self.scan_step());
        }
        if let Some(host) = self.targeted.pop_front() {
            self.stats.targeted_reads += 1;
            self.step_owed = self.scan_left > 0;
            return Some(SpmIo::ReadHosts {
                first_host: host,
                count: 1,
            });
        }
        if now >= self.next_doorbell {
            let quiet = now.saturating_since(self.last_ring);
            let interval = if quiet >= self.config.idle_after {
                self.config
                    .idle_doorbell_interval
                    .max(self.config.doorbell_interval)
            } else {
                (quiet / 2)
                    .max(self.config.fast_doorbell_interval)
                    .min(self.config.doorbell_interval)
            };
            self.next_doorbell = now + interval;
            self.step_owed = self.scan_left > 0;
            return Some(SpmIo::ReadDoorbell);
        }
        if self.scan_left > 0 {
            return Some(self.scan_step());
        }
        None
    }

    /// The next step of the running full scan (`scan_left` is nonzero).
    fn scan_step(&mut self) -> SpmIo {
        self.step_owed = false;
        let hosts = self.geometry.max_hosts();
        let count = SCAN_STEP_HOSTS
            .min(self.scan_left)
            .min(hosts.saturating_sub(self.scan_next))
            .max(1);
        let first_host = HostId::new(self.scan_next + 1);
        self.scan_left = self.scan_left.saturating_sub(count);
        self.scan_next = (self.scan_next + count) % hosts.max(1);
        self.scan_closing = self.scan_left == 0;
        self.step_out = Some((first_host, count));
        SpmIo::ReadHosts { first_host, count }
    }

    /// Time has passed: an SPM that has not read its own header back for
    /// [`FENCE_HEARTBEATS`] heartbeat intervals (it stalled, or its reads
    /// failed) is *fenced*: [`Spm::poll_write`] gives nothing and
    /// [`Spm::poll_io`] asks for the SPM header first. A newer SPM may have
    /// taken over meanwhile; writing before looking could overwrite its
    /// replies. [`Spm::poll_io`] calls this itself.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deposed || !self.confirmed || self.fenced {
            return;
        }
        let fence = self
            .config
            .heartbeat_interval
            .checked_mul(FENCE_HEARTBEATS)
            .unwrap_or(Duration::MAX);
        if now.saturating_since(self.last_own_header) > fence {
            warn!("spm: no read of the SPM header named this SPM lately; fenced until one does");
            self.fenced = true;
            self.header_asked = false;
        }
    }

    /// Requests are likely waiting on disk and the queue has room.
    /// An open batch waits for the later steps of a full scan in progress
    /// whose earlier steps found requests (the later ones may add jobs to
    /// it), for at most [`SCAN_BATCH_WAIT`].
    fn batch_waits_for_scan(&self) -> bool {
        (self.scan_left > 0 || self.scan_closing)
            && self.scan_found > 0
            && self.now_seen.saturating_since(self.batch_opened) < SCAN_BATCH_WAIT
    }

    fn backlog_due(&self) -> bool {
        self.backlog && self.queue.len() <= QUEUE / 2
    }

    /// When the engine next wants `poll_io` called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.deposed {
            return None;
        }
        if !self.confirmed {
            return Some(self.next_heartbeat);
        }
        let soonest = self
            .next_doorbell
            .min(self.next_scan)
            .min(self.next_heartbeat);
        let commit_due = match self.batch {
            Batch::Open => self.jobs_running == 0 && !self.batch_waits_for_scan(),
            Batch::Closed | Batch::Ready => true,
            Batch::Fence => !self.header_asked,
            Batch::Idle | Batch::Committing => false,
        };
        let fence_due = self.fenced && !self.header_asked;
        Some(
            if self.targeted.is_empty()
                && self.scan_left == 0
                && !self.scan_closing
                && !self.backlog_due()
                && !commit_due
                && !fence_due
            {
                soonest
            } else {
                Instant::ZERO
            },
        )
    }

    /// The doorbell record as read.
    pub fn handle_doorbell(&mut self, now: Instant, bytes: &[u8]) {
        // Whether the read before this one found a new ring; this one
        // counts only if it finds one too.
        let streak = core::mem::take(&mut self.last_read_rang);
        let read_lately = now.saturating_since(self.last_doorbell_read) <= RING_AGAIN_AFTER;
        self.last_doorbell_read = now;
        let at = Location {
            domain: self.domain,
            host_id: HostId::NONE,
            index: 0,
        };
        let bell = match Doorbell::parse(bytes, &at) {
            Ok(Some(bell)) if self.geometry.inbox_area(bell.ringer).is_some() => bell,
            // Empty: no host rang since the mailbox was made.
            Ok(None) => return,
            // A hint only: the full scan covers what a ring would announce.
            Ok(Some(_)) => {
                self.doorbell_defective(Defect::InvalidField {
                    field: crate::wire::Field::Ringer,
                });
                return;
            }
            Err(defect) => {
                self.doorbell_defective(defect);
                return;
            }
        };
        self.doorbell_defect = None;
        if self.last_doorbell == Some(bell) {
            return;
        }
        // Two reads in a row, at most RING_AGAIN_AFTER apart, with a new
        // ring: the doorbell changed between them, and rings may have been
        // overwritten unread. A ring rung
        // again (`rings` 2 or more) for a request this SPM does not hold
        // says the same: its earlier ring went unread.
        let close = self.last_doorbell.is_some() && streak && read_lately;
        // A ringer the running full scan has yet to read is covered by it;
        // every host whose ring was lost rings again, so one behind the
        // scan says so for itself.
        let lost = bell.rings >= 2
            && read_lately
            && !self.scan_will_read(bell.ringer)
            && !self.queue.entries().iter().any(|e| {
                e.request.host_id == bell.ringer
                    && e.request.generation == bell.generation
                    && e.request.sequence == bell.sequence
            });
        self.last_read_rang = true;
        self.last_doorbell = Some(bell);
        self.last_ring = now;
        // Out of idle at once: the next read comes fast (rings come in bursts).
        self.next_doorbell = self.next_doorbell.min(
            now + self
                .config
                .fast_doorbell_interval
                .min(self.config.doorbell_interval),
        );
        let busy = self.config.busy_scan_interval;
        if (close || lost) && !busy.is_zero() {
            // Rings collide: scan at once while the allowance lasts, and
            // no more often than `busy` on average.
            let tolerance = busy
                .checked_mul(BUSY_SCAN_BURST.saturating_sub(1))
                .unwrap_or(Duration::MAX);
            let at = (self.busy_allowance - tolerance).max(now);
            if at < self.next_scan {
                self.next_scan = at;
                self.busy_due = true;
                self.busy_allowance = self.busy_allowance.max(at) + busy;
                self.stats.busy_scans += 1;
            }
        }
        if self.targeted.iter().any(|&h| h == bell.ringer) {
            return;
        }
        if self.targeted.push_back(bell.ringer).is_err() {
            // Too many waiting: a full scan reads them all.
            self.targeted.clear();
            self.next_scan = Instant::ZERO;
        }
    }

    /// Whether the running full scan has yet to read `host`.
    fn scan_will_read(&self, host: HostId) -> bool {
        let hosts = self.geometry.max_hosts();
        let Some(i) = host.get().checked_sub(1) else {
            return false;
        };
        if self.scan_left == 0 || i >= hosts {
            return false;
        }
        let ahead = if i >= self.scan_next {
            i - self.scan_next
        } else {
            hosts - self.scan_next + i
        };
        ahead < self.scan_left
    }

    /// The inbox and outbox areas of hosts `first_host ..` as read: equal
    /// runs of whole 4 KiB areas (extra bytes and hosts past the mailbox's
    /// last are ignored).
    pub fn handle_hosts(&mut self, now: Instant, first_host: HostId, inbox: &[u8], outbox: &[u8]) {
        let _ = now;
        if self.deposed {
            return;
        }
        let count = (inbox.len().min(outbox.len()) / crate::wire::AREA_SIZE) as u16;
        if count == 0 {
            return;
        }
        let step = self.step_out == Some((first_host, count));
        if step {
            self.step_out = None;
        }
        let found_before = self.found;
        // Start at a rotating host so that a nearly full queue is not always
        // filled by the lowest host ids.
        self.scan_cursor = self.scan_cursor.wrapping_add(1);
        let start = self.scan_cursor % count;
        for k in 0..count {
            let i = (start + k) % count;
            let Some(host_id) = first_host.get().checked_add(i) else {
                continue;
            };
            if host_id == 0 || host_id > self.geometry.max_hosts() {
                continue;
            }
            let from = usize::from(i) * crate::wire::AREA_SIZE;
            let to = from + crate::wire::AREA_SIZE;
            let (Some(ib), Some(ob)) = (inbox.get(from..to), outbox.get(from..to)) else {
                continue;
            };
            self.handle_host(HostId::new(host_id), ib, ob);
        }
        if step {
            self.scan_found += self.found.saturating_sub(found_before);
        }
    }

    fn handle_host(&mut self, host_id: HostId, inbox_bytes: &[u8], outbox_bytes: &[u8]) {
        let (Some(inbox), Some(outbox)) = (
            InboxArea::new(inbox_bytes, self.domain, host_id),
            OutboxArea::new(outbox_bytes, self.domain, host_id),
        ) else {
            return;
        };
        if let Err(defect) = inbox.header() {
            self.report_defect(host_id, true, 0, defect);
        }
        let outbox_header = match outbox.header() {
            Ok(h) => h,
            Err(defect) => {
                self.report_defect(host_id, false, 0, defect);
                None
            }
        };
        for (slot, state) in inbox.slots() {
            match state {
                SlotState::Empty => {}
                SlotState::Stale(_) => self.stats.stale += 1,
                SlotState::Defective(defect) => {
                    self.report_defect(host_id, true, slot.get(), defect)
                }
                SlotState::Valid(request) => {
                    let reply = match outbox.slot(slot) {
                        Some(SlotState::Valid(r)) | Some(SlotState::Stale(r)) => Some(r),
                        _ => None,
                    };
                    self.consider(request, reply, outbox_header);
                }
            }
        }
        // Requests that left the disk (the host consumed a reply or
        // rewrote its area) leave the queue, unless a reply is still owed.
        self.queue.retain_host(
            host_id,
            |queued| matches!(inbox.slot(queued.slot), Some(SlotState::Valid(r)) if r == *queued),
        );
    }

    fn consider(&mut self, request: Request, reply: Option<Reply>, header: Option<OutboxHeader>) {
        let answered = reply.filter(|r| r.answers(&request));
        if answered.is_some_and(|r| r.status.is_final()) {
            return;
        }
        match self.queue.offer(request) {
            Ok(queue::Offered::Known) => {}
            Ok(_) => {
                self.found += 1;
                let header_ok = header
                    .is_some_and(|h| h.epoch == self.epoch && h.generation == request.generation);
                let waiting = answered.is_some_and(|r| r.status == ReplyStatus::WaitingForSpace);
                // A new entry is the last one (the queue appends).
                if let Some(e) = self.queue.entries_mut().last_mut().filter(|e| {
                    e.request.host_id == request.host_id && e.request.slot == request.slot
                }) {
                    e.header_needed = !header_ok;
                    e.waiting_sent = waiting;
                }
            }
            Err(why) => {
                self.stats.refused += 1;
                self.backlog |= why == Refused::Full;
                if why == Refused::HostCap {
                    self.set_capped(request.host_id, true);
                }
                if self.refusal_reports < REFUSAL_REPORTS_PER_SCAN {
                    self.refusal_reports += 1;
                    self.event(SpmEvent::Refused {
                        host_id: request.host_id,
                        slot: request.slot,
                        why,
                    });
                }
            }
        }
    }

    fn doorbell_defective(&mut self, defect: Defect) {
        if self.doorbell_defect == Some(defect) {
            return;
        }
        self.doorbell_defect = Some(defect);
        self.stats.defective += 1;
        warn!("spm: the doorbell is defective: {}", defect);
        self.event(SpmEvent::DoorbellDefective { defect });
    }

    fn set_capped(&mut self, host_id: HostId, on: bool) {
        let i = usize::from(host_id.get());
        if let Some(word) = self.capped.get_mut(i / 32) {
            let bit = 1u32 << (i % 32);
            if on {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    /// An entry of `host_id` left the queue: if the cap left requests of
    /// that host on disk, read its areas again at once.
    fn read_again_if_capped(&mut self, host_id: HostId) {
        let i = usize::from(host_id.get());
        let capped = self
            .capped
            .get(i / 32)
            .is_some_and(|w| w & (1u32 << (i % 32)) != 0);
        if !capped {
            return;
        }
        self.set_capped(host_id, false);
        if self.targeted.iter().any(|&h| h == host_id) {
            return;
        }
        if self.targeted.push_back(host_id).is_err() {
            // Too many waiting: a full scan reads them all.
            self.targeted.clear();
            self.next_scan = Instant::ZERO;
        }
    }

    fn report_defect(&mut self, host_id: HostId, inbox: bool, index: u16, defect: Defect) {
        self.stats.defective += 1;
        if self.defect_reports < DEFECT_REPORTS_PER_SCAN {
            self.defect_reports += 1;
            warn!("spm: host {} record {} is defective", host_id, index);
            self.event(SpmEvent::Defective {
                host_id,
                inbox,
                index,
                defect,
            });
        }
    }

    /// The SPM header as read back: detects a newer SPM, else schedules the
    /// heartbeat.
    pub fn handle_spm_header(&mut self, now: Instant, bytes: &[u8]) {
        if self.deposed {
            return;
        }
        let at = Location {
            domain: self.domain,
            host_id: HostId::NONE,
            index: 0,
        };
        let found = SpmHeader::parse(bytes, &at).ok().flatten();
        let ours = found.is_some_and(|h| h.epoch == self.epoch && h.owner == self.owner);
        if let Some(h) = found.filter(|h| !ours && h.epoch >= self.epoch) {
            warn!("spm: deposed by epoch {}", h.epoch);
            self.deposed = true;
            self.event(SpmEvent::Deposed {
                epoch: h.epoch,
                spm_id: h.spm_id,
            });
            return;
        }
        self.header_asked = false;
        self.fenced = false;
        if !ours {
            // Our header write was lost or torn, or an older SPM wrote
            // late: write it again and settle again before acting.
            warn!("spm: the SPM header is not ours; writing it again");
            self.confirmed = false;
            self.next_heartbeat = now + settle(&self.config);
        } else {
            self.last_own_header = now;
            if !self.confirmed {
                self.confirmed = true;
                self.next_doorbell = now;
                self.next_scan = now;
                self.last_ring = now;
            }
            if self.batch == Batch::Fence {
                self.batch = Batch::Ready;
            }
        }
        self.heartbeat = self.heartbeat.wrapping_add(1);
        self.header_write = true;
    }

    /// The next job for the backend, if any may start.
    #[must_use]
    pub fn poll_job(&mut self) -> Option<Job> {
        let max = self.config.max_jobs.max(1);
        if self.deposed
            || !self.confirmed
            || !matches!(self.batch, Batch::Idle | Batch::Open)
            || self.jobs_running >= max
            || self.batch_jobs >= max
        {
            return None;
        }
        let job = self.queue.next_job()?;
        self.jobs_running += 1;
        self.batch_jobs += 1;
        self.stats.jobs += 1;
        debug_assert!(self.jobs_running <= self.batch_jobs);
        Some(job)
    }

    /// What the backend did with the job for `volume`. The result is
    /// answered only once the batch it belongs to is committed
    /// ([`Spm::poll_commit`]).
    pub fn handle_job_result(&mut self, now: Instant, volume: Uuid, result: JobResult) {
        let _ = now;
        if self.jobs_running == 0 || !matches!(self.batch, Batch::Idle | Batch::Open) {
            // A result for no job handed out: the caller's bug; nothing in
            // the engine's state may change on it.
            debug_assert!(false, "a job result without a running job");
            return;
        }
        self.jobs_running -= 1;
        self.now_seen = self.now_seen.max(now);
        if self.batch == Batch::Idle {
            self.batch_opened = now;
        }
        self.batch = Batch::Open;
        let mut answered = false;
        for e in self.queue.entries_mut().iter_mut() {
            if e.request.volume != volume || e.state != EntryState::Running {
                continue;
            }
            answered = true;
            let target = e.request.target_size;
            let reply = match result {
                JobResult::Extended { size } if size >= target => {
                    Some((ReplyStatus::Extended, size))
                }
                JobResult::Extended { .. } => {
                    e.state = EntryState::Queued;
                    None
                }
                JobResult::NoSpace { size } => {
                    e.state = EntryState::Parked;
                    (!e.waiting_sent).then_some((ReplyStatus::WaitingForSpace, size))
                }
                JobResult::UnknownVolume => {
                    Some((ReplyStatus::Rejected(RejectReason::UnknownVolume), 0))
                }
                JobResult::OverLimit { size } => {
                    Some((ReplyStatus::Rejected(RejectReason::OverLimit), size))
                }
                JobResult::Malformed => Some((ReplyStatus::Rejected(RejectReason::Malformed), 0)),
                JobResult::SegmentsFull { size } => {
                    Some((ReplyStatus::Rejected(RejectReason::SegmentsFull), size))
                }
                JobResult::Failed { code } => Some((ReplyStatus::Failed { code }, 0)),
            };
            if reply.is_some() {
                e.reply = reply;
            }
        }
        if !answered && matches!(result, JobResult::NoSpace { .. }) {
            // Its requests left the disk while the job ran.
            self.orphan_parks = self.orphan_parks.wrapping_add(1);
        }
    }

    /// The next commit to make, if one is due: the results handed in since
    /// the last commit (once no job runs any more), or a commit asked with
    /// [`Spm::request_commit`].
    ///
    /// A batch closes at the first call after its last running job
    /// reported (no more jobs join it), or once `max_jobs` jobs were handed
    /// out. The engine then asks, through [`Spm::poll_io`], to read the SPM
    /// header back; only when that read names this SPM does this return
    /// the commit. So a commit is always made right after a read showed no
    /// other SPM took over. Make the backend's state durable, then call
    /// [`Spm::handle_committed`] (or [`Spm::handle_commit_failed`]). No
    /// reply of the batch is released by [`Spm::poll_write`] before that.
    #[must_use]
    pub fn poll_commit(&mut self) -> Option<SpmCommit> {
        if self.deposed {
            return None;
        }
        match self.batch {
            Batch::Open if self.jobs_running == 0 && !self.batch_waits_for_scan() => {
                self.batch = Batch::Fence;
                self.header_asked = false;
                None
            }
            Batch::Closed => {
                self.batch = Batch::Fence;
                self.header_asked = false;
                None
            }
            Batch::Ready => {
                self.batch = Batch::Committing;
                Some(SpmCommit {
                    jobs: self.batch_jobs,
                })
            }
            _ => None,
        }
    }

    /// Asks for a commit with no job in it (the backend's state changed
    /// outside a job, and a change that failed part way must be made
    /// durable before anything more is answered). It goes through the same
    /// fencing read as a batch. Joins the running batch if there is one.
    pub fn request_commit(&mut self) {
        if self.batch == Batch::Idle {
            self.batch = Batch::Closed;
        }
    }

    /// Whether a batch waits for its commit: no new job starts and no reply
    /// of it is written until [`Spm::handle_committed`].
    pub fn commit_pending(&self) -> bool {
        self.batch != Batch::Idle
    }

    /// The commit [`Spm::poll_commit`] handed out is durable, as pool
    /// metadata commit `sequence` (0 if the backend keeps no sequence): its
    /// replies may go out, and the SPM header carries `sequence` from its
    /// next write on.
    pub fn handle_committed(&mut self, now: Instant, sequence: u64) {
        let _ = now;
        if self.batch != Batch::Committing {
            debug_assert!(false, "handle_committed without a commit handed out");
            return;
        }
        self.batch = Batch::Idle;
        self.batch_jobs = 0;
        self.pool_commit = self.pool_commit.max(sequence);
    }

    /// The commit [`Spm::poll_commit`] handed out failed: nothing of the
    /// batch is answered. The next [`Spm::poll_commit`] reads the SPM header
    /// again before it hands the commit out again.
    pub fn handle_commit_failed(&mut self, now: Instant) {
        let _ = now;
        if self.batch != Batch::Committing {
            debug_assert!(false, "handle_commit_failed without a commit handed out");
            return;
        }
        self.batch = Batch::Closed;
    }

    /// The backend completed a parked extension: `volume` is now `size`.
    pub fn handle_capacity(&mut self, now: Instant, volume: Uuid, size: u64) {
        let _ = now;
        for e in self.queue.entries_mut().iter_mut() {
            if e.request.volume != volume || e.state != EntryState::Parked {
                continue;
            }
            if size >= e.request.target_size {
                e.reply = Some((ReplyStatus::Extended, size));
            } else {
                e.state = EntryState::Queued;
            }
        }
    }

    /// For a graceful stop: the SPM header that says no SPM holds the
    /// mailbox (state vacant, this epoch), and the engine stops as if
    /// deposed. Write it after the replies still waiting in
    /// [`Spm::poll_write`]. `None` if another SPM took over (its header
    /// must stay), or while the SPM is fenced: a newer SPM may hold the
    /// header, so it is read first (`SpmDriver::stop` does).
    #[must_use]
    pub fn vacate(&mut self) -> Option<SpmWrite> {
        if self.deposed || self.fenced {
            return None;
        }
        self.deposed = true;
        info!("spm: stopping; epoch {} vacates the mailbox", self.epoch);
        let header = SpmHeader {
            domain: self.domain,
            epoch: self.epoch,
            spm_id: self.spm_id,
            state: SpmState::Vacant,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
            heartbeat: self.heartbeat,
            owner: self.owner,
            pool_commit: self.pool_commit,
            release_commit: self.release_commit,
        };
        header.to_bytes().ok().map(|record| SpmWrite {
            offset: SPM_HEADER_OFFSET,
            record,
        })
    }

    /// The next record to write.
    #[must_use]
    pub fn poll_write(&mut self) -> Option<SpmWrite> {
        if self.deposed || self.fenced {
            // Fenced: not even the header, which a newer SPM may hold.
            return None;
        }
        if self.header_write {
            self.header_write = false;
            let header = SpmHeader {
                domain: self.domain,
                epoch: self.epoch,
                spm_id: self.spm_id,
                state: SpmState::Active,
                heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
                heartbeat: self.heartbeat,
                owner: self.owner,
                pool_commit: self.pool_commit,
                release_commit: self.release_commit,
            };
            if let Ok(record) = header.to_bytes() {
                return Some(SpmWrite {
                    offset: SPM_HEADER_OFFSET,
                    record,
                });
            }
        }
        if !self.confirmed || self.fenced || self.batch != Batch::Idle {
            return None;
        }
        let epoch = self.epoch;
        let (host_id, generation, needs_header) = {
            let e = self.queue.entries().iter().find(|e| e.reply.is_some())?;
            (e.request.host_id, e.request.generation, e.header_needed)
        };
        let outbox = self.geometry.outbox_area(host_id)?;
        if needs_header {
            for e in self.queue.entries_mut().iter_mut() {
                if e.request.host_id == host_id && e.request.generation == generation {
                    e.header_needed = false;
                }
            }
            let header = OutboxHeader {
                domain: self.domain,
                host_id,
                epoch,
                generation,
            };
            return header.to_bytes().ok().map(|record| SpmWrite {
                offset: outbox,
                record,
            });
        }
        let i = self
            .queue
            .entries()
            .iter()
            .position(|e| e.reply.is_some())?;
        let e = *self.queue.entries().get(i)?;
        let (status, size) = e.reply?;
        let r = e.request;
        let reply = Reply::answering(&r, status, size, epoch);
        // Encoded before the queue changes: a reply that cannot be encoded
        // is a bug, and its request must stay queued rather than vanish.
        let Ok(record) = reply.to_bytes() else {
            debug_assert!(false, "a reply built from a valid request encodes");
            return None;
        };
        if status.is_final() {
            self.queue.remove(r.host_id, r.slot);
            self.read_again_if_capped(r.host_id);
        } else if let Some(entry) = self.queue.entries_mut().get_mut(i) {
            entry.reply = None;
            entry.waiting_sent = true;
        }
        self.stats.replies += 1;
        self.event(SpmEvent::Answered {
            host_id: r.host_id,
            slot: r.slot,
            volume: r.volume,
            status,
            size,
        });
        Some(SpmWrite {
            offset: outbox + u64::from(r.slot.get()) * RECORD_LEN as u64,
            record,
        })
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SpmEvent> {
        self.events.pop_front()
    }
}
