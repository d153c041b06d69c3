//! The deterministic simulation: hosts and the SPM sharing one faulty disk.
//!
//! One seed drives everything: the mailbox size (up to 2000 hosts), how many
//! hosts are active and with how many volumes, the guests' write rates, the
//! faults of the shared disk (torn, lost, misdirected and bit-flipped
//! writes), crashes and restarts of hosts and of the SPM at any write, an
//! SPM failover while the old SPM still writes late replies, and a pool
//! that runs out of space until LUNs are added. Some seeds restart the SPM
//! as two engines at once from the same SPM header, each with its own owner
//! and pool ([`Scenario::twin_spms_at`]; the engine reads the SPM header
//! back before every commit and commits only while it names that SPM), or
//! damage the superblock and sometimes its backup ([`SuperblockDamage`];
//! every start reads the superblock, else its backup, else refuses). Some
//! seeds lose one pool metadata commit or write it at the other copy's
//! place, and restart the SPM after it ([`MetadataFault`]).
//!
//! Every SPM start makes the daemon's rollback check
//! (`check_no_rollback` in the host shell's `daemon/spm.rs`), modelled
//! here in [`Sim::rollback_findings`]: it refuses when the newest valid
//! metadata copy is older than the SPM header's `pool_commit`, or when an
//! extended reply (valid or stale) in any outbox names a volume the pool
//! lacks or a size above the pool's. A refusal is counted
//! ([`Report::rollbacks_refused`]) and the operator's recovery follows: the
//! commit the SPM believed durable (the simulation keeps it) is written
//! back to its copy and the SPM starts again. If the check still refuses,
//! a host was told of a size the SPM never committed, and the run fails.
//!
//! What the checks compare against, once commits can be lost: the
//! simulation keeps the last commit an SPM made (its record of what the
//! SPM believed durable). While the metadata on disk is older than that
//! record (a lost or misplaced commit not yet overwritten by a later one),
//! the checks of sizes (a host told of a size, no volume shrinks, passes
//! its limit or grows past what was asked, no guest writes past its
//! volume) use the SPM's record instead of the disk: the disk is wrong
//! there by the fault itself, and the SPM cannot know. The extents of the
//! faulty commit count as committed for [`check_extent_history`] from the
//! moment the SPM believed it landed. Everything else stays checked on the
//! disk, and once the disk holds the record again (the next commit, or the
//! operator's restore), the size checks are back on the disk. An SPM start
//! that finds no trace of the lost commit on disk (no header write and no
//! reply carried it out before the restart) loads the older pool, as the
//! daemon does; nobody was told of the lost commit, so the simulation
//! forgets it too (its sizes and extents are taken back from the checks'
//! records).
//!
//! The engines and their drivers are the real ones
//! (`spmbox_core::{spm, host, pool, driver}`): every SPM is an
//! [`SpmDriver`] and every host a [`HostDriver`], each on its own
//! [`SimDev`] handle of the shared [`SimDisk`]. So the inbox mirror, sector
//! read-modify-write, merged reply writes, the doorbell after the area,
//! the fencing read before a commit, the hosts' reads of the SPM header and
//! the mapping of pool results to job results are the core's. The
//! simulation plays the rest of the shell: it runs extension jobs on the
//! pool ([`run_pool_job`]), makes each commit the engine hands out
//! (`poll_commit`) durable in the pool's metadata (two copies) before it
//! calls `handle_committed`, adds LUNs through `request_commit`, refreshes a
//! host's view of a volume by reading the committed metadata, and moves
//! simulated time to the next instant any of them wants to be woken. A node
//! that crashes (at any of its writes) is dropped with its driver and
//! engine; it starts again from what is on disk. A host evicted by its own
//! lost inbox header write exits and starts again, as the daemon does.
//!
//! Some seeds give volumes a life after their guests are done
//! ([`Lifecycle`]): hosts close them, and the SPM deletes or reduces them
//! through a model of the daemon's admin path (refused while a hold record
//! on disk lists the volume), publishes the release in its header, and
//! reclaims the released extents once every host's inbox header
//! acknowledges it. Every guest writes through the map its host last read
//! ([`Snapshot`]), and the checks follow each physical extent: no guest
//! writes an extent another volume owns, no pool hands out an extent a
//! host still maps for another volume, and an extent changes owner in the
//! committed metadata only after a release its old holders acknowledged.
//!
//! Some of those seeds also remove a LUN ([`LunRemoval`]): the SPM moves
//! the segments on it volume by volume under the `moving` handshake (a
//! durable commit naming the volume, then a read of the hold records),
//! and hosts open closed volumes again meanwhile (the hold record first,
//! then a metadata read, waiting while it names the volume as `moving`).
//! Every guest write is numbered and followed to the physical extent it
//! landed on (and copied with a move): a guest that takes a map must read
//! its last write to each extent back through it.
//!
//! Safety is checked after every step ([`Sim::check_safety`]); liveness once
//! the faults have stopped and enough capacity was added
//! (the run must become quiet, every guest done and none paused, within
//! `settle` of the faults stopping and capacity being added). A failure names the seed and the command that
//! replays it.

pub mod disk;
pub mod rng;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use spmbox_core::driver::{HostDriver, SpmDriver};
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::pool::{self, Pool};
use spmbox_core::spm::{JobResult, Spm, SpmConfig, run_pool_job};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    AREA_SIZE, Epoch, Geometry, HoldArea, HostId, InboxArea, RECORD_LEN, SPM_HEADER_OFFSET,
    SUPERBLOCK_BACKUP_OFFSET, SUPERBLOCK_OFFSET, SlotState, SpmHeader, Superblock, Uuid,
};

pub use disk::{Faults, Node, Observed, SimDev, SimDisk};
pub use rng::Rng;

/// The pool the simulation runs: 8 LUNs, 64 volumes (12 hosts with 4
/// each at most) of up to 64 segments, 64 parked requests.
pub type SimPool = Pool<8, 64, 64, 64>;
/// The SPM's queue window in the simulation.
pub const QUEUE: usize = 128;
/// Volumes per host engine.
pub const HOST_VOLUMES: usize = 4;
/// The extent size of the simulated pool.
pub const EXTENT: u64 = 1 << 20;
const COPY: usize = SimPool::MAX_COPY_LEN.next_multiple_of(4096);

/// What a run does; [`Scenario::from_seed`] derives it all from a seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed.
    pub seed: u64,
    /// Host ids of the mailbox (its size).
    pub max_hosts: u16,
    /// Hosts that run guests (spread over 1..=max_hosts).
    pub active_hosts: u16,
    /// Volumes per active host.
    pub volumes_per_host: u8,
    /// Disk faults while faults are on.
    pub faults: Faults,
    /// Chance per write that the writer crashes there, per million.
    pub crash_ppm: u32,
    /// Start a second SPM at this time, the old one still writing.
    pub failover_at: Option<Duration>,
    /// Faults and crashes stop at this time.
    pub faults_until: Duration,
    /// Capacity is added at this time (the pool is short of space before).
    pub add_capacity_at: Duration,
    /// The run ends this long after the later of the two, unless all is
    /// quiet before; liveness must hold by then.
    pub settle: Duration,
    /// Deliberately break the backend (for the test that the simulation
    /// catches a broken invariant).
    pub bug: Option<Bug>,
    /// A host takes back a parked request (see [`Withdraw`]).
    pub withdraw: Option<Withdraw>,
    /// At this time the SPM restarts as two engines at once from the same
    /// SPM header (two paths to one LUN), each with its own owner and its
    /// own pool loaded from disk; they settle and one stands down.
    pub twin_spms_at: Option<Duration>,
    /// The superblock is damaged (see [`SuperblockDamage`]).
    pub superblock_damage: Option<SuperblockDamage>,
    /// A pool metadata commit is lost or misplaced, and the SPM restarts
    /// after it (see [`MetadataFault`]).
    pub metadata_fault: Option<MetadataFault>,
    /// Volumes are closed, deleted and reduced (see [`Lifecycle`]).
    pub lifecycle: Option<Lifecycle>,
    /// The operator removes a LUN, and hosts open closed volumes again
    /// (see [`LunRemoval`]); only with a life cycle.
    pub lun_removal: Option<LunRemoval>,
}

/// The operator removes a LUN from the pool, through a model of the SPM
/// daemon's path (docs/pool-format.md): from `from` on, once capacity was
/// added, it adds a spare LUN as large as the one to remove (so that the
/// others can take its extents), then tries the removal every while
/// until one finishes. An attempt drains the LUN and is refused up front
/// while a volume with a segment on it is held or parked; else it moves
/// the segments volume by volume: a durable commit names the volume as
/// `moving`, then the hold records are read from disk (a holder refuses:
/// `moving` is cleared in a commit and the attempt ends), then each
/// segment's data is copied and the segment relocated in a commit; last a
/// commit clears `moving`. With no segment left, once the released runs
/// on the LUN are reclaimed, the LUN is dropped in a commit. Meanwhile
/// hosts open closed volumes again, the way the host shell does: the hold
/// record first, durable, then a read of the committed metadata, waiting
/// while it names the volume as `moving`, then the map of that read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LunRemoval {
    /// The first attempt, at the earliest.
    pub from: Duration,
    /// Remove the first LUN (which every volume started on), else the
    /// one capacity added.
    pub first_lun: bool,
    /// Chance per removal step, in percent, that a host opens a closed
    /// volume again.
    pub reopen_percent: u8,
}

/// The life of volumes after their guests are done. From `from` on, every
/// `every`, the operator acts once: a host closes a volume whose guest is
/// done (`remove_volume`), or the SPM deletes or reduces a closed volume
/// through the daemon's admin path (refused while a live host holds the
/// volume or a request for it is parked), and with `probe_percent`
/// chance it also tries to delete a volume a host holds, which must be
/// refused. The SPM reclaims released extents once every live host has
/// acknowledged their release. A run with a life cycle is quiet only once
/// every volume is closed and deleted or reduced, and nothing released
/// waits to be reclaimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    /// The operator's first action.
    pub from: Duration,
    /// Between two of its actions.
    pub every: Duration,
    /// Chance per action, in percent, of a delete tried on a held volume.
    pub probe_percent: u8,
}

/// The first metadata commit at or after `at` (that can be, see below) is
/// written wrong while the SPM believes it landed: lost (the copy keeps
/// its old bytes) or, with `misplaced`, written at the other copy's place
/// (which then fails its checks as misplaced, so the disk falls back two
/// commits). `restart_after` later the SPM restarts, and its start makes
/// the daemon's rollback check. A misplaced commit is held back until the
/// copy at its own place (two commits old) is valid, so that one copy
/// always decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataFault {
    /// From when.
    pub at: Duration,
    /// Written at the other copy's place instead of lost.
    pub misplaced: bool,
    /// The SPM restarts this long after the faulty commit.
    pub restart_after: Duration,
}

/// Damage to the superblock block at `at` (a bit flip, or a stray write
/// that zeroes it), and with `backup_too` to its backup at 0xF000 as well;
/// the SPM and one host restart right after, so that they read it. An
/// operator repairs both copies once the faults stop (`spmbox repair`).
/// Until then a reader uses the backup when the superblock fails its
/// checks, and refuses to start when both do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SuperblockDamage {
    /// When.
    pub at: Duration,
    /// The backup is damaged too.
    pub backup_too: bool,
}

/// A host withdraws a request the SPM parked: from `at` on, at the first
/// step where the live pool holds a parked request, the host of that
/// volume restarts without it (its inbox area emptied) and at once again
/// with a chunk of one extent, so that it asks for less under its new
/// generation. With `restart_spm`, the SPM restarts right after. Either
/// way capacity added later must extend the volume only as far as the
/// host still asks ([`Sim::check_extension`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Withdraw {
    /// From when.
    pub at: Duration,
    /// Restart the SPM after the host.
    pub restart_spm: bool,
}

/// A deliberate bug, to show that the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The backend answers "extended" to the target without extending.
    ReplyWithoutExtending,
    /// The backend tells the engine its metadata commit landed before it
    /// writes it (the replies go out first), so a crash forgets an
    /// extension a host was told about.
    ReplyBeforeCommit,
    /// The pool gives an LV its extents but forgets to mark them used on
    /// their LUN, so it hands them out again.
    PoolForgetsExtentsUsed,
    /// Two SPMs started at one epoch draw the same owner, so the settle
    /// cannot tell them apart: both act, each on its own pool.
    TwinsShareOwner,
    /// A starting SPM skips the rollback check (the pool commit in the
    /// SPM header and the replies in the outboxes) and loads whatever
    /// metadata is newest on disk.
    SpmSkipsRollbackCheck,
    /// The admin path deletes volumes that hosts hold (it skips the hold
    /// records). Not unsafe alone: the hosts stop the guests of volumes
    /// the metadata lost before they acknowledge the release.
    DeleteHeldVolumes,
    /// As [`Bug::DeleteHeldVolumes`], and the SPM reclaims released
    /// extents without waiting for the hosts' acknowledgements.
    ReclaimIgnoresAcks,
    /// A host opening a volume takes its map without waiting while the
    /// metadata names the volume as `moving` ([`LunRemoval`]).
    OpenIgnoresMoving,
    /// The SPM moves a volume's segments without reading the hold
    /// records after its `moving` commit ([`LunRemoval`]).
    MoveSkipsHolds,
}

impl Scenario {
    /// A scenario of mixed size with every fault kind, from `seed`.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = Rng::new(seed);
        let max_hosts = match rng.below(20) {
            0 => 2000,
            1..=3 => 250,
            _ => rng.between(1, 16) as u16,
        };
        let active_hosts = (rng.between(1, 12) as u16).min(max_hosts);
        let faulty = rng.below(4) != 0;
        Scenario {
            seed,
            max_hosts,
            active_hosts,
            volumes_per_host: rng.between(1, HOST_VOLUMES as u64) as u8,
            faults: if faulty {
                Faults::all(rng.between(2_000, 30_000) as u32)
            } else {
                Faults::NONE
            },
            crash_ppm: if faulty {
                rng.between(0, 3_000) as u32
            } else {
                0
            },
            failover_at: (rng.below(3) == 0)
                .then(|| Duration::from_millis(rng.between(100, 20_000))),
            faults_until: Duration::from_millis(rng.between(1_000, 30_000)),
            add_capacity_at: Duration::from_millis(rng.between(500, 40_000)),
            settle: Duration::from_secs(180),
            bug: None,
            withdraw: None,
            twin_spms_at: (rng.below(8) == 0)
                .then(|| Duration::from_millis(rng.between(200, 20_000))),
            superblock_damage: (rng.below(8) == 0).then(|| SuperblockDamage {
                at: Duration::from_millis(rng.between(100, 20_000)),
                backup_too: rng.below(3) == 0,
            }),
            metadata_fault: (rng.below(8) == 0).then(|| MetadataFault {
                at: Duration::from_millis(rng.between(200, 20_000)),
                misplaced: rng.below(2) == 0,
                // Half at the next instant, before a later commit can
                // overwrite the wrong copy.
                restart_after: Duration::from_millis(if rng.below(2) == 0 {
                    0
                } else {
                    rng.between(1, 3_000)
                }),
            }),
            // Drawn from a generator of its own, so that the seeds without
            // a life cycle keep every other choice they had.
            lifecycle: {
                let mut life = Rng::new(seed ^ 0x11FE_C1C1_E5EE_D000);
                (life.below(3) == 0).then(|| Lifecycle {
                    from: Duration::from_millis(life.between(50, 8_000)),
                    every: Duration::from_millis(life.between(20, 400)),
                    probe_percent: life.between(0, 30) as u8,
                })
            },
            lun_removal: {
                let mut life = Rng::new(seed ^ 0x1E40_7E1F_0A11_BEEF);
                let lifecycle = Rng::new(seed ^ 0x11FE_C1C1_E5EE_D000).below(3) == 0;
                (lifecycle && life.below(3) != 0).then(|| LunRemoval {
                    from: Duration::from_millis(life.between(0, 20_000)),
                    first_lun: life.below(2) == 0,
                    reopen_percent: life.between(5, 60) as u8,
                })
            },
        }
    }

    /// The command that replays this scenario.
    pub fn replay_command(&self) -> String {
        format!(
            "SPMBOX_SIM_SEED={} cargo test -p spmbox-tests --test sim -- --nocapture replay",
            self.seed
        )
    }
}

/// A simulated guest writing sequentially into one volume.
#[derive(Clone, Debug)]
struct Guest {
    volume: Uuid,
    host_id: u16,
    virtual_size: u64,
    limit: u64,
    /// Highest byte written.
    allocation: u64,
    /// The size the host shell last refreshed the volume's map to: the
    /// guest can write below it and nowhere else.
    mapped: u64,
    /// Bytes per write tick.
    rate: u64,
    paused: bool,
    paused_since: Option<Instant>,
    /// Its host closed the volume ([`Lifecycle`]): the guest writes no
    /// more, and the operator deletes or reduces the volume.
    closed: Option<Fate>,
    /// The map (segments) the host last refreshed the volume to, while the
    /// volume is open: every guest write goes through it.
    map: Option<Snapshot>,
    /// The host is opening the volume (its hold record written first,
    /// then the metadata read): the next read is due then. The guest
    /// writes nothing until the open took a map.
    opening: Option<Instant>,
    /// This open waited on `moving` once.
    waited: bool,
    /// The write count of the guest's last write to each of its extents
    /// (by position in the volume): what it must read back.
    versions: HashMap<u64, u64>,
    /// Times the volume was opened again after a close.
    reopens: u8,
}

/// What the operator does with a closed volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Delete it.
    Delete,
    /// Reduce it to this many bytes (the guest's allocation rounded up to
    /// extents, and a margin).
    Reduce(u64),
}

/// A volume's map as a host read it from committed metadata.
#[derive(Clone, Debug)]
struct Snapshot {
    segments: Vec<pool::Segment>,
    /// The pool's LUNs when it was read (a segment's `lun` indexes them):
    /// hosts find LUNs by UUID, so a map stays right when a LUN before
    /// them is dropped.
    luns: Vec<Uuid>,
    /// The sequence number of the metadata it was read from.
    seq: u64,
}

impl Snapshot {
    /// The physical extent (LUN, extent) of the volume's extent `k`.
    fn extent(&self, k: u64) -> Option<Phys> {
        let mut k = k;
        for s in &self.segments {
            if k < u64::from(s.extents) {
                return Some((self.lun(s.lun), s.first_extent + k as u32));
            }
            k -= u64::from(s.extents);
        }
        None
    }

    fn extents(&self) -> impl Iterator<Item = Phys> + '_ {
        self.segments.iter().flat_map(|s| {
            let lun = self.lun(s.lun);
            (s.first_extent..s.first_extent.saturating_add(s.extents)).map(move |e| (lun, e))
        })
    }

    fn lun(&self, index: u16) -> Uuid {
        self.luns
            .get(usize::from(index))
            .copied()
            .unwrap_or(Uuid::NIL)
    }
}

/// A host's driver and engine.
type HostDrv = HostDriver<SimDev, Vec<u8>, HOST_VOLUMES>;
/// An SPM's driver and engine.
type SpmDrv = SpmDriver<SimDev, Vec<u8>, QUEUE>;

struct HostNode {
    host_id: u16,
    /// The driver and its engine; `None` while the host is down.
    driver: Option<HostDrv>,
    restart_at: Option<Instant>,
    /// Counts the host's starts.
    incarnation: u64,
}

struct SpmNode {
    driver: SpmDrv,
    /// The pool, for the SPM that holds the lease; `None` for an old SPM
    /// that lost it (it may still flush replies it computed before; its
    /// commits fail).
    pool: Option<SimPool>,
    seq: u64,
    /// [`Bug::ReplyBeforeCommit`]: the backend told the engine a commit
    /// was made that it writes only after the replies.
    unwritten_commit: bool,
    /// The engine's `withdrawn()` count this node's pool last followed.
    withdrawn_seen: u64,
    /// The pool holds a LUN the operator added that no commit carries yet.
    lun_pending: bool,
    /// A commit failed: the next is tried at this time.
    commit_retry_at: Option<Instant>,
}

/// How often the SPM reclaims released extents while some wait.
const RECLAIM_INTERVAL: Duration = Duration::from_millis(5);

/// How long an SPM whose commit failed waits before it tries again.
const COMMIT_RETRY: Duration = Duration::from_millis(100);

/// One of the SPM engines that may run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// The SPM (the first of two twins).
    Live,
    /// The second of two SPMs started at one epoch.
    Twin,
    /// An old SPM that lost the lease in a failover.
    Old,
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Simulated time at the end.
    pub end: Duration,
    /// Extensions hosts completed.
    pub extensions: u64,
    /// Guest pauses and resumes.
    pub pauses: u64,
    /// Resumes.
    pub resumes: u64,
    /// Crashes of hosts and of the SPM.
    pub crashes: u64,
    /// Faults the disk injected.
    pub faults: disk::FaultCounts,
    /// Steps taken.
    pub steps: u64,
    /// Parked requests a host withdrew ([`Withdraw`]).
    pub withdrawals: u64,
    /// SPMs that read another SPM's header back and stood down.
    pub spms_deposed: u64,
    /// SPMs that found the SPM header not theirs just before a metadata
    /// commit and stood down without committing.
    pub stood_down_before_commit: u64,
    /// Starts that found the superblock damaged and used its backup.
    pub superblock_backup_reads: u64,
    /// Starts refused because the superblock and its backup were damaged.
    pub superblock_refusals: u64,
    /// Metadata commits lost or misplaced ([`MetadataFault`]).
    pub metadata_faults: u64,
    /// SPM starts the rollback check refused (each followed by the
    /// operator's restore of the commit the SPM believed durable).
    pub rollbacks_refused: u64,
    /// Hosts that read another owner back from their inbox header and
    /// stopped (their own header write was lost); each starts again.
    pub evictions: u64,
    /// Volumes closed by their host ([`Lifecycle`]).
    pub closes: u64,
    /// Volumes the SPM deleted.
    pub deletes: u64,
    /// Volumes the SPM reduced.
    pub reduces: u64,
    /// Deletes of open volumes refused because a live host holds them.
    pub refused_held: u64,
    /// Deletes and reduces of closed volumes refused because the hold
    /// record on disk still listed them (the host's rewrite not landed).
    pub refused_closing: u64,
    /// Deletes and reduces refused because a request for the volume was
    /// parked.
    pub refused_parked: u64,
    /// Deletes and reduces that emptied replies promising the volume more
    /// than it keeps, before their commit.
    pub replies_retracted: u64,
    /// Deletes tried on a held volume that the admin path did not refuse
    /// because no hold record on disk showed it (a lost, torn or
    /// misdirected write hid it until the host's next write of its area):
    /// the delete goes on, as the daemon's would, and the host stops the
    /// guest when its refresh finds the volume gone.
    pub holds_unseen: u64,
    /// The same, while the host had just started a new generation and not
    /// yet written its hold records (its header, written first, makes the
    /// old ones stale): its guests run on meanwhile.
    pub holds_unseen_starting: u64,
    /// Released extents the SPM reclaimed.
    pub reclaimed: u64,
    /// Guests stopped because the metadata no longer had their volume.
    pub stopped: u64,
    /// SPM starts whose pool counts extents as released (the floor at the
    /// metadata's `release_seq`: free extents below the high-water mark
    /// after a delete or reduce, reclaimed before the restart or not).
    pub starts_with_released: u64,
    /// Release commits hosts acknowledged.
    pub acks: u64,
    /// LUN removals the operator started ([`LunRemoval`]): the LUN drained.
    pub lun_removals_started: u64,
    /// LUN removals that ended with the LUN dropped in a commit.
    pub lun_removals_finished: u64,
    /// LUN removals refused: up front (a volume on the LUN held or
    /// parked), or after a `moving` commit when the hold records showed a
    /// holder.
    pub lun_removals_refused: u64,
    /// Of those, refused after the `moving` commit.
    pub moves_refused_held: u64,
    /// LUN removals the SPM's restart or stand-down cut short.
    pub lun_removals_interrupted: u64,
    /// Segments copied and relocated.
    pub segments_moved: u64,
    /// Volumes a host opened again after closing them.
    pub reopens: u64,
    /// Of those, opens that found the volume named as `moving` and waited.
    pub reopens_waited: u64,
    /// Moves refused because a host writes through the volume's map while
    /// no hold record on disk shows it (a disk fault or a crash in the
    /// middle of the hold write hid it): the daemon would move it.
    pub moves_hold_unseen: u64,
    /// SPM starts that found `moving` set and cleared it.
    pub moving_cleared_at_start: u64,
}

/// A failed check, with everything needed to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The scenario.
    pub scenario: Box<Scenario>,
    /// Simulated time.
    pub at: Duration,
    /// What broke.
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {:?}: {}\n  scenario: {:?}\n  replay: {}",
            self.scenario.seed,
            self.at,
            self.what,
            self.scenario,
            self.scenario.replay_command()
        )
    }
}

/// The simulation state.
pub struct Sim {
    scenario: Scenario,
    rng: Rng,
    /// The shared disk; every node's driver holds a handle on it.
    disk: Rc<RefCell<SimDisk>>,
    /// What the disk saw hosts ask and the SPM read.
    observed: Rc<RefCell<Observed>>,
    domain: Uuid,
    now: Instant,
    spm: Option<SpmNode>,
    twin: Option<SpmNode>,
    old_spm: Option<SpmNode>,
    spm_restart_at: Option<Instant>,
    hosts: Vec<HostNode>,
    guests: Vec<Guest>,
    next_guest_tick: Instant,
    capacity_added: bool,
    /// When capacity was added, if faults had stopped by then: from then
    /// on, every guest paused before must resume within one full scan.
    capacity_added_quietly: Option<Instant>,
    failed_over: bool,
    /// The largest size each volume was ever committed at.
    committed_max: HashMap<Uuid, u64>,
    initial: HashMap<Uuid, u64>,
    report: Report,
    /// The committed pool decoded at a disk version, and the disk version
    /// whose committed pool passed the invariant checks.
    committed_cache: RefCell<Option<(u64, Option<Committed>)>>,
    committed_checked: Option<u64>,
    /// The live pool changed since its invariants were last checked.
    live_dirty: bool,
    /// The highest epoch any SPM started with (the lease's generation).
    lease_epoch: u64,
    /// Hosts that restarted with a chunk of one extent ([`Withdraw`]).
    small_chunk: Vec<u16>,
    /// The next time to try adding capacity, when the SPM was not ready.
    capacity_retry_at: Option<Instant>,
    twins_started: bool,
    /// Which volume every extent was committed to, and which extents a
    /// commit released: an extent committed to two volumes over time
    /// without a release acknowledged in between is a double allocation
    /// even when each committed pool is consistent.
    extent_history: ExtentHistory,
    /// Per epoch, the owner of the SPM that committed at it.
    committers: HashMap<u64, u64>,
    /// The (epoch, owner) of every SPM that was deposed.
    deposed: Vec<(u64, u64)>,
    superblock_damaged: bool,
    superblock_repaired: bool,
    /// The last commit an SPM made and believed durable: its sequence and
    /// encoded copy.
    believed: (u64, Vec<u8>),
    /// The pool of `believed`, kept while the disk may lag behind it (from
    /// a [`MetadataFault`] until a commit or a restore lands).
    believed_pool: Option<Rc<SimPool>>,
    /// `extent_history` and `committed_max` as they were before the faulty
    /// commit, while the disk lags behind `believed`.
    before_fault: Option<(ExtentHistory, HashMap<Uuid, u64>)>,
    metadata_faulted: bool,
    /// When the SPM restarts after the [`MetadataFault`].
    metadata_restart_at: Option<Instant>,
    /// Random choices of the [`Lifecycle`] and of the guests' rewrites,
    /// apart from `rng` so that they change nothing else.
    life_rng: Rng,
    /// The operator's next action ([`Lifecycle`]).
    next_op_at: Option<Instant>,
    /// The SPM's next reclaim of released extents.
    next_reclaim_at: Instant,
    /// Which volume's guest last wrote each physical extent.
    written: HashMap<Phys, Uuid>,
    /// The owner of every extent in the live pools and the committed pool,
    /// and what they were computed from.
    owners: Vec<(&'static str, Owners)>,
    owners_of: Option<u64>,
    owners_stale: bool,
    /// A guest's map snapshot changed since the maps were last checked.
    maps_dirty: bool,
    /// The size the operator deleted (0) or reduced each volume to.
    shrunk: HashMap<Uuid, u64>,
    /// What each physical extent holds: the volume and write count of the
    /// guest write that last landed there, or that a move copied there.
    data: HashMap<Phys, (Uuid, u64)>,
    /// Guest writes so far.
    write_seq: u64,
    /// The LUN removal under way ([`LunRemoval`]).
    removal: Option<Removal>,
    /// Random choices of the LUN removal and the reopens.
    removal_rng: Rng,
    /// The next step of the LUN removal.
    removal_next_at: Option<Instant>,
    /// The LUN is gone from the committed pool.
    removal_finished: bool,
}

/// The UUID of the spare LUN the operator adds before a removal.
const SPARE_LUN: Uuid = Uuid([0x3c; 16]);

/// How often a host opening a volume reads the metadata again while it
/// names the volume as `moving`.
const MOVING_RECHECK: Duration = Duration::from_millis(200);

/// A LUN removal under way, on the pool of the SPM `spm` (epoch, owner).
#[derive(Clone, Copy, Debug)]
struct Removal {
    lun: Uuid,
    spm: (u64, u64),
    phase: Phase,
    /// A commit was asked for when the SPM's sequence was this: the next
    /// phase waits until a later commit landed.
    awaiting: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Adding the spare LUN.
    Spare,
    /// Draining: plan the next segment to move.
    Plan,
    /// `moving = volume` is durable: read the holds.
    Marked(Uuid),
    /// Moving the volume's segments, one per commit.
    Copy(Uuid),
    /// A segment's data copied (the copy takes until the next step): it is
    /// relocated next, in a commit.
    Copied(pool::Relocation),
    /// A holder refused the move: `moving` cleared, the attempt ends.
    Refused,
    /// No segment left: waiting for the released runs to be reclaimed.
    Reclaim,
    /// The LUN dropped: waiting for its commit.
    Dropped,
}

/// The committed pool and its sequence number.
type Committed = (Rc<SimPool>, u64);

/// The volume each extent (LUN, extent) belongs to in one pool.
type Owners = HashMap<Phys, Uuid>;

/// A physical extent: its LUN's UUID (indices shift when a LUN is
/// dropped) and its index on the LUN.
type Phys = (Uuid, u32);

/// Every extent's committed owner over time: an extent changes owner only
/// after its old owner released it in a commit and every host that held
/// the old owner then acknowledged that release or started again.
#[derive(Clone, Debug, Default)]
struct ExtentHistory {
    /// The last volume each extent (LUN, extent) was committed to.
    owner: HashMap<Phys, Uuid>,
    /// Extents a commit took from that owner: by which commit, and which
    /// hosts (index, incarnation) held the owner then.
    released: HashMap<Phys, Release>,
    /// The newest commit seen: a pool at or below it is an older view (a
    /// rolled-back disk, a restarted SPM's commit that reuses a lost
    /// commit's number), whose missing extents are no release.
    seq: u64,
}

/// A release seen in a committed pool.
#[derive(Clone, Debug)]
struct Release {
    seq: u64,
    holders: Vec<(usize, u64)>,
}

const GUEST_TICK: Duration = Duration::from_millis(10);

fn at(d: Duration) -> Instant {
    Instant::ZERO + d
}

fn since_zero(i: Instant) -> Duration {
    i.saturating_since(Instant::ZERO)
}

impl Sim {
    /// Sets up the domain: mailbox, pool (short of space), volumes, hosts.
    pub fn new(scenario: Scenario) -> Sim {
        let mut rng = Rng::new(scenario.seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let geometry = Geometry::new(
            scenario.max_hosts,
            if rng.below(2) == 0 { 512 } else { 4096 },
        )
        .expect("scenario geometry");
        let disk = SimDisk::new(
            geometry,
            2 * COPY,
            Rng::new(scenario.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD15C),
        );
        let domain = Uuid([0x5a; 16]);
        let mut pool = SimPool::new(EXTENT).expect("pool");
        let mut guests = Vec::new();
        let hosts = Vec::new();
        let mut initial = HashMap::new();
        // Active hosts spread over the whole id range.
        let stride = (scenario.max_hosts / scenario.active_hosts).max(1);
        let mut total_initial = 0;
        let mut specs = Vec::new();
        for k in 0..scenario.active_hosts {
            let host_id = (1 + k * stride).min(scenario.max_hosts);
            for v in 0..scenario.volumes_per_host {
                let virtual_size = rng.between(8, 48) * EXTENT;
                let initial_size = 2 * EXTENT;
                let mut id = [0u8; 16];
                id[..2].copy_from_slice(&host_id.to_be_bytes());
                id[2] = v;
                id[15] = 1;
                specs.push((host_id, Uuid(id), virtual_size, initial_size));
                total_initial += initial_size / EXTENT;
            }
        }
        // Room for the initial sizes and a little more: guests will run out.
        let first_lun = (total_initial + rng.between(0, 2 * specs.len() as u64)) as u32;
        pool.add_lun(Uuid([0x10; 16]), first_lun.max(1))
            .expect("first LUN");
        for &(host_id, id, virtual_size, initial_size) in &specs {
            pool.create_volume(id, virtual_size, initial_size)
                .expect("volume");
            let limit = pool.volume(id).expect("volume").limit;
            initial.insert(id, initial_size);
            guests.push(Guest {
                volume: id,
                host_id,
                virtual_size,
                limit,
                allocation: 0,
                mapped: initial_size,
                rate: rng.between(EXTENT / 64, EXTENT / 4),
                paused: false,
                paused_since: None,
                closed: None,
                map: None,
                opening: None,
                waited: false,
                versions: HashMap::new(),
                reopens: 0,
            });
        }
        let scenario_seed = scenario.seed;
        let lifecycle = scenario.lifecycle;
        let removal = scenario.lun_removal;
        let mut sim = Sim {
            scenario,
            rng,
            disk: Rc::new(RefCell::new(disk)),
            observed: Rc::new(RefCell::new(Observed::default())),
            domain,
            now: Instant::ZERO,
            spm: None,
            old_spm: None,
            spm_restart_at: None,
            hosts,
            guests,
            next_guest_tick: Instant::ZERO,
            capacity_added: false,
            capacity_added_quietly: None,
            failed_over: false,
            committed_max: HashMap::new(),
            initial,
            report: Report::default(),
            committed_cache: RefCell::new(None),
            committed_checked: None,
            live_dirty: true,
            lease_epoch: 0,
            small_chunk: Vec::new(),
            twin: None,
            capacity_retry_at: None,
            twins_started: false,
            extent_history: ExtentHistory::default(),
            committers: HashMap::new(),
            deposed: Vec::new(),
            superblock_damaged: false,
            superblock_repaired: false,
            believed: (0, Vec::new()),
            believed_pool: None,
            before_fault: None,
            metadata_faulted: false,
            metadata_restart_at: None,
            life_rng: Rng::new(scenario_seed ^ 0x6C1F_E0F0_0D5E_ED11),
            next_op_at: lifecycle.map(|l| at(l.from)),
            next_reclaim_at: Instant::ZERO,
            written: HashMap::new(),
            owners: Vec::new(),
            owners_of: None,
            owners_stale: true,
            maps_dirty: true,
            shrunk: HashMap::new(),
            data: HashMap::new(),
            write_seq: 0,
            removal: None,
            removal_rng: Rng::new(scenario_seed ^ 0x7E40_5E11_AB1E_0001),
            removal_next_at: removal.map(|r| at(r.from)),
            removal_finished: false,
        };
        sim.write_superblock_and_metadata(&pool);
        let mut ids: Vec<u16> = specs.iter().map(|s| s.0).collect();
        ids.dedup();
        for host_id in ids {
            sim.hosts.push(HostNode {
                host_id,
                driver: None,
                restart_at: Some(Instant::ZERO),
                incarnation: 0,
            });
        }
        sim.start_spm()
            .expect("the superblock is intact at the start");
        sim
    }

    fn write_superblock_and_metadata(&mut self, pool: &SimPool) {
        let sb = spmbox_core::wire::Superblock {
            domain: self.domain,
            geometry: self.geometry(),
        };
        let mut block = vec![0u8; AREA_SIZE];
        block[..RECORD_LEN].copy_from_slice(&sb.to_bytes().expect("superblock"));
        self.put(SUPERBLOCK_OFFSET, &block);
        self.put(SUPERBLOCK_BACKUP_OFFSET, &block);
        let mut buf = vec![0u8; COPY];
        pool.encode(1, &mut buf).expect("encode");
        self.put(self.meta_offset(pool::next_copy(1)), &buf);
        self.believed = (1, buf);
        for v in pool.volumes() {
            self.committed_max.insert(v.id, v.size);
        }
    }

    fn geometry(&self) -> Geometry {
        self.disk.borrow().geometry()
    }

    /// `len` bytes of the disk at `offset`.
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        self.disk.borrow().read(offset, len).to_vec()
    }

    /// The record at `offset`.
    fn record(&self, offset: u64) -> Vec<u8> {
        self.read(offset, RECORD_LEN)
    }

    /// Writes without faults (setup, and the operator's and the
    /// simulation's own faults).
    fn put(&self, offset: u64, data: &[u8]) {
        self.disk.borrow_mut().put(offset, data);
    }

    /// A handle on the disk for a node's driver.
    fn device(&self, node: Node, may_crash: bool) -> SimDev {
        SimDev::new(
            self.disk.clone(),
            self.observed.clone(),
            self.domain,
            node,
            may_crash,
        )
    }

    fn meta_offset(&self, copy: usize) -> u64 {
        self.geometry().mailbox_size() + (copy * COPY) as u64
    }

    /// The pool as committed on disk (what a host's refresh reads).
    fn committed(&self) -> Option<Committed> {
        let version = self.disk.borrow().version();
        if let Some((v, found)) = self.committed_cache.borrow().as_ref()
            && *v == version
        {
            return found.clone();
        }
        let disk = self.disk.borrow();
        let a = disk.read(self.meta_offset(0), COPY);
        let b = disk.read(self.meta_offset(1), COPY);
        let found = SimPool::decode(a, b)
            .ok()
            .map(|(pool, seq)| (Rc::new(pool), seq));
        *self.committed_cache.borrow_mut() = Some((version, found.clone()));
        found
    }

    /// The pool the size checks hold hosts and guests to: the committed
    /// pool on disk, or the last commit the SPM made while the disk lags
    /// behind it after a [`MetadataFault`].
    fn reference(&self) -> Option<Committed> {
        let disk = self.committed()?;
        match &self.believed_pool {
            Some(pool) if disk.1 < self.believed.0 => Some((pool.clone(), self.believed.0)),
            _ => Some(disk),
        }
    }

    /// The daemon's rollback check at SPM start (`check_no_rollback`):
    /// what it finds, if anything. `found` is the SPM header the SPM takes
    /// over from.
    fn rollback_findings(&self, found: Option<&SpmHeader>) -> Vec<String> {
        let Some((pool, committed)) = self.committed() else {
            return vec!["no pool metadata copy decodes".into()];
        };
        let mut findings = Vec::new();
        if let Some(h) = found.filter(|h| h.pool_commit > committed) {
            findings.push(format!(
                "the SPM header says pool metadata commit {} was made durable, but the newest \
                 valid copy is commit {committed}",
                h.pool_commit
            ));
        }
        let g = self.geometry();
        let outboxes = self.read(g.outbox_offset(), usize::from(g.max_hosts()) * AREA_SIZE);
        for area in spmbox_core::wire::areas::<spmbox_core::wire::Reply>(
            &outboxes,
            self.domain,
            HostId::new(1),
        ) {
            for (slot, state) in area.slots() {
                let (spmbox_core::wire::SlotState::Valid(r)
                | spmbox_core::wire::SlotState::Stale(r)) = state
                else {
                    continue;
                };
                if r.status != spmbox_core::wire::ReplyStatus::Extended {
                    continue;
                }
                let have = pool.volume(r.volume).map(|v| v.size);
                if have.is_some_and(|size| size >= r.size) {
                    continue;
                }
                // A reply older than the volume's delete or reduce that
                // is still there: the daemon empties such replies before
                // the change (`retract_replies`, modelled in `admin`), but
                // the disk may have lost or torn that write; the daemon
                // would then refuse to start, a false alarm its operator
                // overrides, so the model lets it pass.
                if self.shrunk.get(&r.volume).copied() == Some(have.unwrap_or(0)) {
                    continue;
                }
                findings.push(format!(
                    "host {} slot {slot} was told (epoch {}) that volume {} is {} bytes, but the \
                     pool has {have:?}",
                    r.host_id, r.epoch, r.volume, r.size
                ));
            }
        }
        findings
    }

    /// The rollback check of a starting SPM, and the operator's recovery
    /// when it refuses: the commit the SPM believed durable is written back
    /// to its copy, and the SPM starts on it.
    fn check_no_rollback(&mut self, found: Option<&SpmHeader>) -> Result<(), String> {
        let findings = self.rollback_findings(found);
        let behind = self
            .committed()
            .is_some_and(|(_, seq)| seq < self.believed.0);
        if findings.is_empty() {
            if behind {
                // No trace of the lost commit: the SPM loads the older
                // pool, as the daemon does, and nobody was told of it.
                let (_, seq) = self.committed().expect("decodes");
                let bytes = self.read(self.meta_offset(pool::next_copy(seq)), COPY);
                self.believed = (seq, bytes);
                self.believed_pool = None;
                if let Some((history, max)) = self.before_fault.take() {
                    self.extent_history = history;
                    self.committed_max = max;
                    self.committed_checked = None;
                }
                // The commits after the one loaded are forgotten: the next
                // SPM numbers its commits from it again, and each of them
                // may release extents.
                self.extent_history.seq = self.extent_history.seq.min(seq);
                // Releases of the forgotten commits did not happen.
                self.extent_history.released.retain(|_, r| r.seq <= seq);
            }
            return Ok(());
        }
        if self.scenario.bug == Some(Bug::SpmSkipsRollbackCheck) {
            return Ok(());
        }
        self.report.rollbacks_refused += 1;
        let (seq, bytes) = &self.believed;
        let offset = self.meta_offset(pool::next_copy(*seq));
        let bytes = bytes.clone();
        self.put(offset, &bytes);
        let again = self.rollback_findings(found);
        if !again.is_empty() {
            return Err(format!(
                "the SPM refused to start (rollback check: {}) and still refuses with the last \
                 commit it made ({}) restored: {}",
                findings.join("; "),
                self.believed.0,
                again.join("; ")
            ));
        }
        self.believed_pool = None;
        self.before_fault = None;
        Ok(())
    }

    /// Reads the superblock as the daemons do: the one at offset 0, else
    /// its backup at 0xF000. `Ok(None)`: both fail their checks, and the
    /// start is refused (counted). A superblock that decodes but names
    /// another domain or geometry than the domain's is a failure: nothing
    /// may act on it.
    fn read_superblock(&mut self, who: &str) -> Result<Option<Superblock>, String> {
        let read = |at| Superblock::decode(&self.record(at)).ok().flatten();
        let found = match read(SUPERBLOCK_OFFSET) {
            Some(sb) => Some(sb),
            None => {
                let backup = read(SUPERBLOCK_BACKUP_OFFSET);
                if backup.is_some() {
                    self.report.superblock_backup_reads += 1;
                } else {
                    self.report.superblock_refusals += 1;
                }
                backup
            }
        };
        if let Some(sb) = found
            && (sb.domain != self.domain || sb.geometry != self.geometry())
        {
            return Err(format!(
                "{who} started on a superblock naming domain {} with {} hosts of {}-byte \
                 sectors, not the domain's",
                sb.domain,
                sb.geometry.max_hosts(),
                sb.geometry.sector_size()
            ));
        }
        Ok(found)
    }

    /// Starts the SPM, unless the superblock cannot be read (then it tries
    /// again a second later).
    fn start_spm(&mut self) -> Result<(), String> {
        let Some(sb) = self.read_superblock("the SPM")? else {
            self.spm_restart_at = Some(self.now + Duration::from_secs(1));
            return Ok(());
        };
        let found = self.found_spm_header();
        self.check_no_rollback(found.as_ref())?;
        let owner = self.rng.next_u64() | 1;
        self.spm = Some(self.spm_node(sb, found.as_ref(), owner, SpmConfig::default()));
        self.check_new_epoch(found.as_ref())
    }

    /// Starts two SPMs at once from the same SPM header, as two paths to one
    /// LUN would: each with its own owner (the same one under
    /// [`Bug::TwinsShareOwner`]) and its own pool loaded from disk.
    fn start_twins(&mut self) -> Result<(), String> {
        let Some(sb) = self.read_superblock("the SPM")? else {
            self.spm_restart_at = Some(self.now + Duration::from_secs(1));
            return Ok(());
        };
        let found = self.found_spm_header();
        self.check_no_rollback(found.as_ref())?;
        let owner = self.rng.next_u64() | 1;
        let twin_owner = if self.scenario.bug == Some(Bug::TwinsShareOwner) {
            owner
        } else {
            self.rng.next_u64() | 1
        };
        self.spm = Some(self.spm_node(sb, found.as_ref(), owner, SpmConfig::default()));
        // Two daemons on two paths never read at the same instants nor
        // run the same batches: the twin polls the doorbell at its own
        // pace and runs one job at a time, so that two acting SPMs would
        // extend volumes in different orders from the same pool.
        let config = SpmConfig {
            doorbell_interval: Duration::from_millis(7),
            max_jobs: 1,
            ..SpmConfig::default()
        };
        self.twin = Some(self.spm_node(sb, found.as_ref(), twin_owner, config));
        self.check_new_epoch(found.as_ref())
    }

    /// The SPM header a starting SPM takes over from, as every runner
    /// finds it: the header on disk raised to the newest epoch in any
    /// outbox area (`newest_outbox_epoch`, `start_header`), and to the
    /// lease's.
    fn found_spm_header(&self) -> Option<SpmHeader> {
        let found = SpmHeader::decode(&self.record(SPM_HEADER_OFFSET))
            .ok()
            .flatten();
        // The lease that makes an SPM (sanlock's, in oVirt) carries a
        // generation that only grows: a new SPM starts above every SPM that
        // ever ran, even when the SPM header it reads is older (a lost or
        // damaged header write). Without it, seed 9834: after a lost header
        // write the new SPM took the epoch the old one already had, and the
        // old one, which still ran, deposed it.
        let floor = self
            .newest_epoch_on_disk()
            .max(Epoch::new(self.lease_epoch));
        spmbox_core::spm::start_header(found, floor, self.domain)
    }

    /// The newest epoch in any outbox header or reply on disk, read as the
    /// runners read it.
    fn newest_epoch_on_disk(&self) -> Epoch {
        let geometry = self.geometry();
        let mut device = self.device(Node::Spm { notes_reads: false }, false);
        let mut buffer = vec![0u8; 16 * spmbox_core::wire::AREA_SIZE];
        spmbox_core::driver::newest_outbox_epoch(&mut device, &geometry, self.domain, &mut buffer)
            .expect("a device that cannot crash reads the outbox")
            .unwrap_or(Epoch::ZERO)
    }

    /// A new SPM's epoch is above every epoch a host may have seen: in
    /// the SPM header it took over from and in every outbox header and
    /// reply, valid or stale (docs/protocol.md 8, S1).
    fn check_new_epoch(&self, found: Option<&SpmHeader>) -> Result<(), String> {
        let Some(epoch) = self.spm.as_ref().map(|s| s.driver.engine().epoch()) else {
            return Ok(());
        };
        let on_disk = self.newest_epoch_on_disk();
        let header = found.map_or(Epoch::ZERO, |h| h.epoch);
        if epoch <= on_disk || epoch <= header {
            return Err(format!(
                "a new SPM took epoch {epoch}, not above the newest on disk \
                 (outbox {on_disk}, SPM header {header})"
            ));
        }
        Ok(())
    }

    /// An SPM: its engine in a driver on the shared disk, and its pool
    /// loaded from the metadata on disk. Each SPM reads hosts in chunks
    /// of its own size and keeps a mirror of the outbox areas or not, as
    /// a daemon and array firmware would.
    fn spm_node(
        &mut self,
        sb: Superblock,
        found: Option<&SpmHeader>,
        owner: u64,
        config: SpmConfig,
    ) -> SpmNode {
        let (pool, seq) = self.committed().expect("pool metadata must always decode");
        let engine = Spm::new(
            self.now,
            sb.domain,
            sb.geometry,
            HostId::NONE,
            owner,
            found,
            config,
        )
        .expect("spm");
        self.lease_epoch = self.lease_epoch.max(engine.epoch().get());
        let withdrawn_seen = engine.withdrawn();
        let mut pool = Rc::unwrap_or_clone(pool);
        if self.scenario.bug == Some(Bug::PoolForgetsExtentsUsed) {
            pool.inject_forget_extents_used();
        }
        // The newest release it knows goes out with its first header.
        if pool.released_extents() > 0 {
            self.report.starts_with_released += 1;
        }
        let mut engine = engine;
        engine.set_release_commit(pool.release_seq());
        // A move cut short by the last SPM's end: the new SPM clears
        // `moving` in a commit (the copies it made are forgotten; the
        // segments stay where the metadata has them).
        if !pool.moving().is_nil() {
            let _ = pool.set_moving(Uuid::NIL);
            engine.request_commit();
            self.report.moving_cleared_at_start += 1;
        }
        self.live_dirty = true;
        self.owners_stale = true;
        let hosts = sb.geometry.max_hosts();
        let chunk = if self.rng.below(2) == 0 {
            hosts
        } else {
            self.rng.between(1, u64::from(hosts)) as u16
        };
        let mirror = self.rng.below(4) != 0;
        let buffer = vec![0u8; SpmDrv::buffer_len(&sb.geometry, chunk, mirror)];
        let device = self.device(Node::Spm { notes_reads: true }, true);
        let driver = SpmDriver::new(device, engine, buffer, chunk, mirror).expect("spm driver");
        SpmNode {
            driver,
            pool: Some(pool),
            seq,
            unwritten_commit: false,
            withdrawn_seen,
            lun_pending: false,
            commit_retry_at: None,
        }
    }

    fn spm_pool(&self, which: Which) -> Option<&SimPool> {
        match which {
            Which::Live => self.spm.as_ref(),
            Which::Twin => self.twin.as_ref(),
            Which::Old => self.old_spm.as_ref(),
        }
        .and_then(|n| n.pool.as_ref())
    }

    fn node(&mut self, which: Which) -> Option<&mut SpmNode> {
        match which {
            Which::Live => self.spm.as_mut(),
            Which::Twin => self.twin.as_mut(),
            Which::Old => self.old_spm.as_mut(),
        }
    }

    fn slot(&mut self, which: Which) -> &mut Option<SpmNode> {
        match which {
            Which::Live => &mut self.spm,
            Which::Twin => &mut self.twin,
            Which::Old => &mut self.old_spm,
        }
    }

    /// Ends an SPM that read another SPM's header back (the daemon exits),
    /// remembering it; the twin left standing becomes the SPM.
    fn reap_deposed(&mut self) {
        for which in [Which::Live, Which::Twin] {
            if let Some(node) = self.slot(which).take_if(|n| n.driver.engine().is_deposed()) {
                self.report.spms_deposed += 1;
                let engine = node.driver.engine();
                self.deposed.push((engine.epoch().get(), engine.owner()));
            }
        }
        if self.spm.is_none() {
            self.spm = self.twin.take();
            self.live_dirty = true;
            self.owners_stale = true;
        }
    }

    fn faults_on(&self) -> bool {
        since_zero(self.now) < self.scenario.faults_until
    }

    fn crash_here(&mut self) -> bool {
        self.faults_on() && self.rng.chance(self.scenario.crash_ppm)
    }

    /// Runs to the end; returns the report or the first failed check.
    pub fn run(mut self) -> Result<Report, Failure> {
        let quiet_after = self
            .scenario
            .faults_until
            .max(self.scenario.add_capacity_at);
        let end = quiet_after + self.scenario.settle;
        loop {
            {
                let on = self.faults_on();
                let mut disk = self.disk.borrow_mut();
                disk.set_faults(if on {
                    self.scenario.faults
                } else {
                    Faults::NONE
                });
                disk.crash_ppm = if on { self.scenario.crash_ppm } else { 0 };
            }
            self.step().map_err(|what| self.fail(what))?;
            self.check_safety().map_err(|what| self.fail(what))?;
            self.report.steps += 1;
            let now = since_zero(self.now);
            if now >= quiet_after && self.quiet() {
                break;
            }
            if now >= end {
                return Err(self.fail(self.liveness_problem()));
            }
            self.now = self.next_instant().max(self.now + Duration::from_micros(1));
        }
        self.report.end = since_zero(self.now);
        self.report.faults = self.disk.borrow().counts();
        Ok(self.report)
    }

    fn fail(&self, what: String) -> Failure {
        Failure {
            scenario: Box::new(self.scenario.clone()),
            at: since_zero(self.now),
            what,
        }
    }

    fn next_instant(&self) -> Instant {
        let mut next = self.next_guest_tick;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = next.min(t);
            }
        };
        for node in [&self.spm, &self.twin, &self.old_spm].into_iter().flatten() {
            let engine = node.driver.engine();
            let mut t = engine.poll_timeout();
            if let Some(retry) = node.commit_retry_at.filter(|_| engine.commit_pending()) {
                // A commit failed: nothing is due before it is tried again
                // but the SPM header's reads.
                t = t.map(|t| t.max(retry).min(retry.max(self.now)));
            }
            consider(t);
        }
        consider(self.spm_restart_at);
        consider(self.metadata_restart_at);
        consider(self.next_op_at);
        if !self.removal_finished {
            consider(self.removal_next_at);
        }
        for g in &self.guests {
            if g.closed.is_none() {
                consider(g.opening);
            }
        }
        if self.released_waiting() {
            consider(Some(self.next_reclaim_at));
        }
        for h in &self.hosts {
            consider(h.driver.as_ref().and_then(|d| d.engine().poll_timeout()));
            consider(h.restart_at);
        }
        if !self.capacity_added {
            let t = at(self.scenario.add_capacity_at);
            consider(Some(self.capacity_retry_at.map_or(t, |r| r.max(t))));
        }
        if let (Some(t), false) = (self.scenario.failover_at, self.failed_over) {
            consider(Some(at(t)));
        }
        if let (Some(t), false) = (self.scenario.twin_spms_at, self.twins_started) {
            consider(Some(at(t)));
        }
        if let Some(d) = self.scenario.superblock_damage {
            if !self.superblock_damaged {
                consider(Some(at(d.at)));
            } else if !self.superblock_repaired {
                consider(Some(self.superblock_repair_at(d)));
            }
        }
        next
    }

    fn superblock_repair_at(&self, d: SuperblockDamage) -> Instant {
        at(self
            .scenario
            .faults_until
            .max(d.at + Duration::from_secs(5)))
    }

    /// The [`SuperblockDamage`] fault, and its repair.
    fn superblock_fault(&mut self) -> Result<(), String> {
        let Some(d) = self.scenario.superblock_damage else {
            return Ok(());
        };
        if !self.superblock_damaged && self.now >= at(d.at) {
            self.superblock_damaged = true;
            let mut places = vec![SUPERBLOCK_OFFSET];
            if d.backup_too {
                places.push(SUPERBLOCK_BACKUP_OFFSET);
            }
            for place in places {
                let mut record = self.record(place).to_vec();
                if self.rng.below(2) == 0 {
                    // A bit flip.
                    let bit = self.rng.below(RECORD_LEN as u64 * 8) as usize;
                    record[bit / 8] ^= 1 << (bit % 8);
                } else {
                    // A stray write over the block (zeroes, or another
                    // record of the mailbox: the SPM header's).
                    record = if self.rng.below(2) == 0 {
                        vec![0; RECORD_LEN]
                    } else {
                        self.record(SPM_HEADER_OFFSET).to_vec()
                    };
                }
                self.put(place, &record);
            }
            // The SPM and one host restart and read it.
            if self.spm.take().is_some() {
                self.spm_restart_at = Some(self.now + Duration::from_millis(1));
            }
            if !self.hosts.is_empty() {
                let i = self.rng.below(self.hosts.len() as u64) as usize;
                self.hosts[i].driver = None;
                self.hosts[i].restart_at = Some(self.now + Duration::from_millis(1));
            }
        }
        if self.superblock_damaged
            && !self.superblock_repaired
            && self.now >= self.superblock_repair_at(d)
        {
            // `spmbox repair`: both blocks rewritten.
            self.superblock_repaired = true;
            let sb = Superblock {
                domain: self.domain,
                geometry: self.geometry(),
            };
            let record = sb.to_bytes().map_err(|e| format!("superblock: {e:?}"))?;
            self.put(SUPERBLOCK_OFFSET, &record);
            self.put(SUPERBLOCK_BACKUP_OFFSET, &record);
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        if !self.failed_over && self.scenario.failover_at.is_some_and(|t| self.now >= at(t)) {
            self.failed_over = true;
            if let Some(mut old) = self.spm.take() {
                old.pool = None;
                // It no longer holds the lease: what it reads says nothing
                // of what the SPM knows, and it does not crash (it is
                // stalled, not running on).
                let device = old.driver.device_mut();
                device.node = Node::Spm { notes_reads: false };
                device.may_crash = false;
                self.old_spm = Some(old);
                self.twin = None;
                self.start_spm()?;
            }
        }
        self.superblock_fault()?;
        if !self.twins_started
            && self
                .scenario
                .twin_spms_at
                .is_some_and(|t| self.now >= at(t))
        {
            self.twins_started = true;
            // The SPM restarts as two.
            self.spm = None;
            self.twin = None;
            self.spm_restart_at = None;
            self.start_twins()?;
        }
        if self.metadata_restart_at.is_some_and(|t| self.now >= t) {
            // The SPM restarts after the metadata fault.
            self.metadata_restart_at = None;
            self.spm = None;
            self.twin = None;
            self.spm_restart_at = Some(self.now);
        }
        if self.spm_restart_at.is_some_and(|t| self.now >= t) {
            self.spm_restart_at = None;
            self.start_spm()?;
        }
        self.withdraw_fault();
        if !self.capacity_added
            && self.now >= at(self.scenario.add_capacity_at)
            && self.capacity_retry_at.is_none_or(|t| self.now >= t)
        {
            self.add_capacity()?;
        }
        self.operate()?;
        self.remove_lun()?;
        self.reclaim()?;
        self.drive_spm(Which::Live)?;
        self.drive_spm(Which::Twin)?;
        self.drive_spm(Which::Old)?;
        self.reap_deposed();
        if self.spm.is_none() && self.twin.is_none() && self.spm_restart_at.is_none() {
            self.spm_restart_at = Some(self.now + Duration::from_secs(1));
        }
        for i in 0..self.hosts.len() {
            self.drive_host(i)?;
        }
        self.open_guests()?;
        if self.now >= self.next_guest_tick {
            self.next_guest_tick = self.now + GUEST_TICK;
            self.tick_guests()?;
        }
        Ok(())
    }

    fn add_capacity(&mut self) -> Result<(), String> {
        // The operator adds a LUN through the SPM that acts; while none
        // does (restarting, settling, two racing), or while a LUN added
        // before waits for its commit, the operator retries.
        self.capacity_retry_at = Some(self.now + Duration::from_millis(100));
        let ready = self
            .spm
            .as_ref()
            .is_some_and(|n| n.driver.engine().is_confirmed() && !n.lun_pending)
            && self
                .twin
                .as_ref()
                .is_none_or(|n| n.driver.engine().is_confirmed());
        if !ready {
            return Ok(());
        }
        // Enough for every volume to reach its limit.
        let Some(node) = self.spm.as_mut() else {
            return Ok(());
        };
        let Some(pool) = node.pool.as_mut() else {
            return Ok(());
        };
        self.live_dirty = true;
        self.owners_stale = true;
        let needed: u64 = pool
            .volumes()
            .map(|v| (v.limit - v.size.min(v.limit)) / EXTENT)
            .sum();
        let lun = Uuid([0x20 + pool.luns().len() as u8; 16]);
        let before = sizes(pool);
        pool.add_lun(lun, (needed + 1) as u32)
            .map_err(|e| format!("add_lun: {e:?}"))?;
        let after = sizes(pool);
        // The pool changed outside a job: the change is made durable
        // through the engine's commit, after its fencing read, before
        // anything it completed is answered (see `committed`). Should the
        // SPM crash or stand down first, the LUN is lost with its pool and
        // the operator adds it again.
        node.driver.engine_mut().request_commit();
        node.lun_pending = true;
        self.check_extension(&before, &after, "a LUN was added")
    }

    /// The commit of SPM `which` landed: the engine may release its
    /// replies, and what the pool completed is answered.
    fn committed_by(&mut self, which: Which) {
        let now = self.now;
        let quiet = !self.faults_on();
        let Some(node) = self.node(which) else {
            return;
        };
        if !node.unwritten_commit {
            let seq = node.seq;
            node.driver.engine_mut().handle_committed(now, seq);
        }
        if let Some(pool) = node.pool.as_ref() {
            // Published with the SPM's next header write.
            node.driver
                .engine_mut()
                .set_release_commit(pool.release_seq());
        }
        let lun = std::mem::take(&mut node.lun_pending);
        if let Some(pool) = node.pool.as_mut() {
            while let Some(c) = pool.poll_completed() {
                node.driver
                    .engine_mut()
                    .handle_capacity(now, c.volume, c.size);
            }
        }
        self.live_dirty = true;
        self.owners_stale = true;
        if lun {
            self.capacity_added = true;
            self.capacity_retry_at = None;
            if quiet {
                self.capacity_added_quietly = Some(now);
            }
        }
    }

    /// Makes the pool of SPM `which` durable: the commit the engine handed
    /// out with `poll_commit` (after its fencing read of the SPM header).
    /// Returns false if the SPM crashed, or has no pool any more (an old
    /// SPM that lost the lease: its commit fails).
    fn commit(&mut self, which: Which, may_crash: bool) -> Result<bool, String> {
        let crash = may_crash && self.crash_here();
        let Some(node) = self.node(which) else {
            return Ok(false);
        };
        if node.pool.is_none() {
            return Ok(false);
        }
        let engine = node.driver.engine();
        let (epoch, owner) = (engine.epoch(), engine.owner());
        if engine.is_deposed() || self.deposed.contains(&(epoch.get(), owner)) {
            return Err(format!(
                "the deposed SPM of epoch {epoch} (owner {owner:#x}) committed pool metadata"
            ));
        }
        if let Some(&other) = self.committers.get(&epoch.get())
            && other != owner
        {
            return Err(format!(
                "two SPMs committed pool metadata at epoch {epoch}: owners {other:#x} and {owner:#x}"
            ));
        }
        self.committers.insert(epoch.get(), owner);
        let Some(node) = self.node(which) else {
            return Ok(false);
        };
        let seq = node.seq + 1;
        let Some(pool) = node.pool.as_ref() else {
            return Ok(false);
        };
        let mut buf = vec![0u8; COPY];
        pool.encode(seq, &mut buf)
            .map_err(|e| format!("encode: {e:?}"))?;
        let offset = self.meta_offset(pool::next_copy(seq));
        if crash {
            // The commit is torn: only some of its sectors land.
            let sector = self.geometry().sector_size() as usize;
            let landed = self.rng.below((COPY / sector) as u64) as usize * sector;
            self.put(offset, &buf[..landed]);
            self.crash_spm(which);
            return Ok(false);
        }
        if self.metadata_fault_now(which, seq) {
            let misplaced = self.scenario.metadata_fault.is_some_and(|f| f.misplaced);
            if misplaced {
                self.put(self.meta_offset(pool::next_copy(seq + 1)), &buf);
            }
            // The SPM believes the commit landed: from now on its extents
            // count as committed (and its sizes as the reference).
            let pool = Rc::new(
                self.node(which)
                    .and_then(|n| n.pool.clone())
                    .expect("the committing SPM has a pool"),
            );
            self.before_fault = Some((self.extent_history.clone(), self.committed_max.clone()));
            let (hosts, guests) = (&self.hosts, &self.guests);
            check_extent_history(
                &pool,
                seq,
                &mut self.extent_history,
                &|v| holders_of(hosts, guests, v),
                &|r| acknowledged(hosts, r),
            )
            .map_err(|e| format!("the pool the SPM committed: {e}"))?;
            self.believed_pool = Some(pool);
        } else {
            self.put(offset, &buf);
            self.believed_pool = None;
            self.before_fault = None;
        }
        self.believed = (seq, buf);
        if let Some(node) = self.node(which) {
            node.seq = seq;
            // What the commit released counts from it.
            if let Some(pool) = node.pool.as_mut() {
                pool.stamp_released(seq);
            }
        }
        self.owners_stale = true;
        Ok(true)
    }

    /// Whether the [`MetadataFault`] strikes the commit of `seq` by SPM
    /// `which`, once; schedules the SPM's restart after it. It strikes a
    /// commit that extends a volume (losing one that only parks a request
    /// loses nothing).
    fn metadata_fault_now(&mut self, which: Which, seq: u64) -> bool {
        let Some(f) = self.scenario.metadata_fault else {
            return false;
        };
        if self.metadata_faulted || self.now < at(f.at) {
            return false;
        }
        // Kept off a LUN removal: a lost `moving` or relocation commit
        // that the SPM believes durable defeats the hosts' wait (see
        // [`LunRemoval`]).
        if self.removal.is_some() {
            return false;
        }
        let extends = match (
            self.spm_pool(which).map(sizes),
            self.committed().map(|(p, _)| sizes(&p)),
        ) {
            (Some(live), Some(disk)) => live != disk,
            _ => false,
        };
        if !extends {
            return false;
        }
        if f.misplaced {
            // The copy at its own place must stay valid: the misplaced
            // write invalidates the other one.
            let other = self.read(self.meta_offset(pool::next_copy(seq)), COPY);
            let alone = if pool::next_copy(seq) == 0 {
                SimPool::decode(&other, &[])
            } else {
                SimPool::decode(&[], &other)
            };
            if alone.is_err() {
                return false;
            }
        }
        self.metadata_faulted = true;
        self.report.metadata_faults += 1;
        self.metadata_restart_at = Some(self.now + f.restart_after);
        true
    }

    fn crash_spm(&mut self, which: Which) {
        self.report.crashes += 1;
        *self.slot(which) = None;
        if which == Which::Live {
            self.spm = self.twin.take();
        }
        if self.spm.is_none() {
            self.spm_restart_at =
                Some(self.now + Duration::from_millis(self.rng.between(10, 2_000)));
        }
    }

    /// Runs SPM `which` at this instant until it has nothing more to do, a
    /// step of its driver at a time: reads, jobs on the pool, the commit
    /// the engine hands out, writes.
    fn drive_spm(&mut self, which: Which) -> Result<(), String> {
        let now = self.now;
        let early_commit = self.scenario.bug == Some(Bug::ReplyBeforeCommit) && which != Which::Old;
        for _ in 0..10_000 {
            let Some(node) = self.node(which) else {
                return Ok(());
            };
            let before = progress(&node.driver);
            // Reads fail only once the node crashed, and a node crashes
            // only at a write.
            let _ = node.driver.read(now);
            self.follow_withdrawals(which);
            self.run_jobs(which)?;
            self.follow_withdrawals(which);
            let Some(node) = self.node(which) else {
                return Ok(());
            };
            let engine = node.driver.engine();
            let pending = engine.commit_pending();
            let was_deposed = engine.is_deposed();
            if pending && node.commit_retry_at.is_none_or(|t| now >= t) {
                node.commit_retry_at = None;
                match node.driver.poll_commit(now) {
                    Ok(Some(_)) if early_commit => {
                        // The broken backend: "committed" now, written
                        // after the replies (it reports the sequence
                        // already on disk, so that only the replies can
                        // give it away).
                        let seq = node.seq;
                        node.driver.engine_mut().handle_committed(now, seq);
                        node.unwritten_commit = true;
                    }
                    Ok(Some(_)) => {
                        if self.commit(which, which != Which::Old)? {
                            self.committed_by(which);
                        } else if let Some(node) = self.node(which) {
                            node.driver.engine_mut().handle_commit_failed(now);
                            node.commit_retry_at = Some(now + COMMIT_RETRY);
                        }
                    }
                    Ok(None) => {
                        if !was_deposed && node.driver.engine().is_deposed() {
                            // The fencing read found another SPM's header.
                            self.report.stood_down_before_commit += 1;
                        }
                    }
                    Err(_) => {}
                }
            }
            let Some(node) = self.node(which) else {
                return Ok(());
            };
            if node.driver.write().is_err() || node.driver.device().crashed {
                self.crash_spm(which);
                return Ok(());
            }
            if node.unwritten_commit {
                if self.commit(which, true)? {
                    self.committed_by(which);
                }
                if let Some(node) = self.node(which) {
                    node.unwritten_commit = false;
                }
            }
            let Some(node) = self.node(which) else {
                return Ok(());
            };
            if progress(&node.driver) == before {
                return Ok(());
            }
        }
        Err("the SPM engine did not settle within 10000 rounds at one instant".into())
    }

    /// Runs the jobs SPM `which` hands out on its pool, through the core's
    /// one mapping of pool results to job results.
    fn run_jobs(&mut self, which: Which) -> Result<(), String> {
        let now = self.now;
        let bug = self.scenario.bug;
        loop {
            let Some(node) = self.node(which) else {
                return Ok(());
            };
            let Some(job) = node.driver.engine_mut().poll_job() else {
                return Ok(());
            };
            let Some(pool) = node.pool.as_mut() else {
                // An old SPM without the lease: its jobs go nowhere.
                continue;
            };
            let mut grown = None;
            let result = if bug == Some(Bug::ReplyWithoutExtending) {
                JobResult::Extended {
                    size: job.target_size,
                }
            } else {
                let before = sizes(pool);
                let result = run_pool_job(pool, &job);
                grown = Some((before, sizes(pool)));
                result
            };
            node.driver
                .engine_mut()
                .handle_job_result(now, job.volume, result);
            self.live_dirty = true;
            self.owners_stale = true;
            if let Some((before, after)) = grown {
                self.check_extension(&before, &after, "a job ran")?;
            }
        }
    }

    fn start_host(&mut self, i: usize) -> Result<(), String> {
        let host_id = self.hosts[i].host_id;
        let Some(sb) = self.read_superblock(&format!("host {host_id}"))? else {
            self.hosts[i].restart_at = Some(self.now + Duration::from_secs(1));
            return Ok(());
        };
        let g = sb.geometry;
        let config = HostConfig::default();
        let config = HostConfig {
            chunk_size: if self.small_chunk.contains(&host_id) {
                EXTENT
            } else {
                4 * EXTENT
            },
            ..config
        };
        let mut engine = Host::<HOST_VOLUMES>::new(sb.domain, HostId::new(host_id), g, config)
            .map_err(|e| format!("host {host_id}: new: {e:?}"))?;
        let truth = self.committed();
        for guest in self
            .guests
            .iter_mut()
            .filter(|g| g.host_id == host_id && g.closed.is_none())
        {
            // The shell reads the volume's map on start.
            let size = truth
                .as_ref()
                .and_then(|(p, _)| p.volume(guest.volume))
                .map_or(guest.mapped, |v| v.size);
            guest.mapped = guest.mapped.max(size);
            // The volume is opened as the host shell opens it: the hold
            // record first, then the map from a metadata read after it
            // ([`Sim::open_guests`]).
            guest.map = None;
            guest.opening = Some(self.now);
            guest.waited = false;
            self.maps_dirty = true;
            engine
                .add_volume(
                    guest.volume,
                    guest.virtual_size,
                    guest.limit,
                    guest.mapped,
                    guest.allocation,
                )
                .map_err(|e| format!("host {host_id}: add_volume: {e:?}"))?;
        }
        let device = self.device(Node::Host(host_id), true);
        let mut driver = HostDriver::new(device, engine, vec![0u8; HostDrv::BUFFER_LEN])
            .map_err(|e| format!("host {host_id}: driver: {e}"))?;
        let owner = self.rng.next_u64() | 1;
        match driver.start(self.now, owner) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("host {host_id}: start: {e:?}")),
            Err(e) => return Err(format!("host {host_id}: start: {e}")),
        }
        let node = &mut self.hosts[i];
        node.driver = Some(driver);
        node.restart_at = None;
        node.incarnation += 1;
        Ok(())
    }

    fn crash_host(&mut self, i: usize) {
        self.report.crashes += 1;
        let restart = self.now + Duration::from_millis(self.rng.between(10, 2_000));
        let node = &mut self.hosts[i];
        node.driver = None;
        node.restart_at = Some(restart);
    }

    /// Runs host `i` at this instant until it has nothing more to do: a
    /// step of its driver (timers, the inbox area written whole, then the
    /// doorbell, then reads), then its events.
    fn drive_host(&mut self, i: usize) -> Result<(), String> {
        if self.hosts[i].restart_at.is_some_and(|t| self.now >= t) {
            self.start_host(i)?;
        }
        let now = self.now;
        let host_id = self.hosts[i].host_id;
        for _ in 0..10_000 {
            let Some(driver) = self.hosts[i].driver.as_mut() else {
                return Ok(());
            };
            let before = driver.stats();
            if driver.step(now).is_err() || driver.device().crashed {
                // The write it crashed at is torn away with the host.
                self.crash_host(i);
                return Ok(());
            }
            let after = driver.stats();
            let engine = driver.engine_mut();
            let events: Vec<HostEvent> = std::iter::from_fn(|| engine.poll_event()).collect();
            let idle = events.is_empty() && after == before;
            for event in events {
                self.host_event(i, event)?;
            }
            if idle {
                return Ok(());
            }
        }
        Err(format!(
            "host {host_id} did not settle within 10000 rounds at one instant"
        ))
    }

    fn host_event(&mut self, i: usize, event: HostEvent) -> Result<(), String> {
        let now = self.now;
        let host_id = self.hosts[i].host_id;
        match event {
            HostEvent::Refresh { volume, size } => {
                let size_in = |pool: Option<Committed>| {
                    pool.and_then(|(p, _)| p.volume(volume).map(|v| v.size))
                        .unwrap_or(0)
                };
                // The host's refresh reads the disk; what it was told is
                // held to what the SPM committed (see the module docs).
                let truth = size_in(self.committed());
                let committed = size_in(self.reference());
                if truth == 0 && self.shrunk.get(&volume) == Some(&0) {
                    // Deleted while held (its hold hidden): the refresh
                    // finds no volume, the guest stops and the volume goes.
                    self.stop_guest(i, volume);
                    return Ok(());
                }
                if size > committed {
                    return Err(format!(
                        "host {host_id} was told volume {volume} is {size} bytes but the pool committed {committed}"
                    ));
                }
                let map = self
                    .committed()
                    .and_then(|(p, seq)| snapshot(&p, volume, seq));
                if let Some(k) = self.guests.iter().position(|g| g.volume == volume) {
                    let g = &mut self.guests[k];
                    g.mapped = g.mapped.max(truth);
                    if g.closed.is_none() && g.opening.is_none() && map.is_some() {
                        g.map = map;
                        self.maps_dirty = true;
                        self.check_readback(k)?;
                    }
                }
                if let Some(driver) = self.hosts[i].driver.as_mut() {
                    driver.engine_mut().handle_refreshed(now, volume, truth);
                }
            }
            HostEvent::RefreshAll { release_commit } => {
                // Every map of a volume the host holds is read again from
                // the committed metadata; the release is acknowledged once
                // that metadata is at least as new as the release.
                let Some((pool, seq)) = self.committed() else {
                    return Ok(());
                };
                for k in 0..self.guests.len() {
                    let g = &mut self.guests[k];
                    if g.host_id != host_id || g.closed.is_some() || g.opening.is_some() {
                        continue;
                    }
                    match snapshot(&pool, g.volume, seq) {
                        Some(map) => {
                            g.map = Some(map);
                            self.check_readback(k)?;
                        }
                        None => {
                            // Deleted while held (a disk fault hid its
                            // hold): the guest stops, then the volume goes.
                            let volume = g.volume;
                            self.stop_guest(i, volume);
                        }
                    }
                    self.maps_dirty = true;
                }
                if seq >= release_commit
                    && let Some(d) = self.hosts[i].driver.as_mut()
                {
                    d.engine_mut().handle_all_refreshed(now, release_commit);
                    self.report.acks += 1;
                }
            }
            HostEvent::Extended { .. } => self.report.extensions += 1,
            HostEvent::Paused { .. } => self.report.pauses += 1,
            HostEvent::Resumed { .. } => self.report.resumes += 1,
            HostEvent::Evicted { .. } => {
                // Its first inbox header write was lost or torn, so the
                // read-back found its predecessor's owner (only one
                // process runs per host id here). The daemon exits, as
                // docs/operations.md (section 7.1) says, and its
                // supervisor starts it again.
                self.report.evictions += 1;
                let restart = now + Duration::from_millis(self.rng.between(10, 2_000));
                let node = &mut self.hosts[i];
                node.driver = None;
                node.restart_at = Some(restart);
            }
            _ => {}
        }
        Ok(())
    }

    /// The guest of `volume` on host `i` stops (the metadata lost its
    /// volume), then the host drops the volume.
    fn stop_guest(&mut self, i: usize, volume: Uuid) {
        if let Some(g) = self.guests.iter_mut().find(|g| g.volume == volume) {
            g.closed = Some(Fate::Delete);
            g.map = None;
            g.opening = None;
        }
        self.maps_dirty = true;
        self.report.stopped += 1;
        let now = self.now;
        if let Some(d) = self.hosts[i].driver.as_mut() {
            let _ = d.engine_mut().remove_volume(now, volume);
        }
    }

    fn tick_guests(&mut self) -> Result<(), String> {
        let now = self.now;
        for k in 0..self.guests.len() {
            let host_id = self.guests[k].host_id;
            let Some(i) = self.hosts.iter().position(|h| h.host_id == host_id) else {
                continue;
            };
            if self.guests[k].closed.is_some() || self.guests[k].opening.is_some() {
                continue;
            }
            // A volume is opened only once its hold record is written.
            if self.hosts[i]
                .driver
                .as_ref()
                .is_some_and(|d| d.engine().holds_pending())
            {
                continue;
            }
            let g = &mut self.guests[k];
            let goal = g.virtual_size;
            let before = g.allocation;
            if g.allocation < goal {
                let want = (g.allocation + g.rate).min(goal);
                let can = want.min(g.mapped);
                g.allocation = g.allocation.max(can);
                let blocked = can < want;
                if blocked && !g.paused {
                    g.paused = true;
                    g.paused_since = Some(now);
                } else if !blocked && g.paused {
                    g.paused = false;
                    g.paused_since = None;
                }
            }
            let (volume, allocation) = (g.volume, g.allocation);
            // The bytes written go through the guest's map: the new ones,
            // and a rewrite of one extent written before.
            let mut written: Vec<u64> = Vec::new();
            if allocation > before {
                written.extend(before / EXTENT..allocation.div_ceil(EXTENT));
            }
            if allocation > 0 {
                written.push(self.life_rng.below(allocation.div_ceil(EXTENT)));
            }
            let physical: Vec<(u64, Phys)> = match self.guests[k].map.as_ref() {
                Some(map) => written
                    .iter()
                    .filter_map(|&x| map.extent(x).map(|e| (x, e)))
                    .collect(),
                None => Vec::new(),
            };
            for (x, e) in physical {
                self.guest_write(volume, host_id, e)?;
                self.write_seq += 1;
                self.data.insert(e, (volume, self.write_seq));
                self.guests[k].versions.insert(x, self.write_seq);
            }
            if let Some(driver) = self.hosts[i].driver.as_mut() {
                driver
                    .engine_mut()
                    .handle_allocation(now, volume, allocation);
            }
        }
        Ok(())
    }

    /// Recomputes the owner of every extent in the live pools and the
    /// committed pool when any may have changed.
    fn refresh_owners(&mut self) {
        let version = self.disk.borrow().version();
        if !self.owners_stale && self.owners_of == Some(version) {
            return;
        }
        let mut owners = Vec::new();
        for (name, node) in [("live", &self.spm), ("twin", &self.twin)] {
            if let Some(pool) = node.as_ref().and_then(|n| n.pool.as_ref()) {
                owners.push((name, owner_map(pool)));
            }
        }
        if let Some((pool, _)) = self.committed() {
            owners.push(("committed", owner_map(&pool)));
        }
        self.owners = owners;
        self.owners_of = Some(version);
        self.owners_stale = false;
        self.maps_dirty = true;
    }

    /// The guest of `volume` on host `host_id` writes physical extent `e`
    /// (LUN, extent) through its map: no pool may give `e` to another
    /// volume, and no data another volume's guest wrote there may be
    /// overwritten while that volume still owns it.
    fn guest_write(&mut self, volume: Uuid, host_id: u16, e: Phys) -> Result<(), String> {
        self.refresh_owners();
        for (name, owners) in &self.owners {
            if let Some(&other) = owners.get(&e)
                && other != volume
            {
                return Err(format!(
                    "the guest of volume {volume} on host {host_id} wrote extent {} of LUN {}, \
                     which the {name} pool gives to volume {other}",
                    e.1, e.0
                ));
            }
        }
        if let Some(&before) = self.written.get(&e)
            && before != volume
            && self.owners.iter().any(|(_, o)| o.get(&e) == Some(&before))
        {
            return Err(format!(
                "the guest of volume {volume} on host {host_id} overwrote extent {} of LUN {}, \
                 which volume {before} still owns and whose guest wrote it",
                e.1, e.0
            ));
        }
        self.written.insert(e, volume);
        Ok(())
    }

    /// No extent is handed to a volume while a host's map of another
    /// volume still holds it: checked whenever a pool or a map changed.
    fn check_maps(&mut self) -> Result<(), String> {
        self.refresh_owners();
        if !std::mem::take(&mut self.maps_dirty) {
            return Ok(());
        }
        for g in &self.guests {
            let Some(map) = g.map.as_ref() else {
                continue;
            };
            for e in map.extents() {
                for (name, owners) in &self.owners {
                    if let Some(&other) = owners.get(&e)
                        && other != g.volume
                    {
                        return Err(format!(
                            "extent {} of LUN {} is handed to volume {other} in the {name} pool \
                             while host {} still maps it for volume {} (map of commit {})",
                            e.1, e.0, g.host_id, g.volume, map.seq
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        if self.scenario.lifecycle.is_some() && !self.lifecycle_done() {
            return false;
        }
        self.guests
            .iter()
            .all(|g| g.closed.is_some() || (g.allocation >= g.virtual_size && !g.paused))
            && self.hosts.iter().all(|h| {
                h.driver
                    .as_ref()
                    .is_some_and(|d| d.engine().in_flight() == 0)
            })
    }

    fn liveness_problem(&self) -> String {
        let stuck: Vec<String> = self
            .guests
            .iter()
            .filter(|g| g.closed.is_none() && (g.allocation < g.virtual_size || g.paused))
            .take(5)
            .map(|g| {
                let holds_pending = self
                    .hosts
                    .iter()
                    .find(|h| h.host_id == g.host_id)
                    .and_then(|h| h.driver.as_ref())
                    .map(|d| d.engine().holds_pending());
                format!(
                    "volume {} of host {}: wrote {} of {}, mapped {}, paused {}, holds pending \
                     {holds_pending:?}",
                    g.volume, g.host_id, g.allocation, g.virtual_size, g.mapped, g.paused
                )
            })
            .collect();
        let busy: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.driver.as_ref().is_none_or(|d| d.engine().in_flight() > 0))
            .take(5)
            .map(|h| {
                format!(
                    "host {} in flight {:?}",
                    h.host_id,
                    h.driver.as_ref().map(|d| d.engine().in_flight())
                )
            })
            .collect();
        let mut detail = String::new();
        if let Some(h) = self
            .hosts
            .iter()
            .find(|h| h.driver.as_ref().is_none_or(|d| d.engine().in_flight() > 0))
        {
            let g = self.geometry();
            let (ia, oa) = (
                g.inbox_area(HostId::new(h.host_id)).unwrap_or(0),
                g.outbox_area(HostId::new(h.host_id)).unwrap_or(0),
            );
            let (ib, ob) = (self.read(ia, AREA_SIZE), self.read(oa, AREA_SIZE));
            let inbox = spmbox_core::wire::InboxArea::new(&ib, self.domain, HostId::new(h.host_id));
            let outbox =
                spmbox_core::wire::OutboxArea::new(&ob, self.domain, HostId::new(h.host_id));
            if let (Some(inbox), Some(outbox)) = (inbox, outbox) {
                detail += &format!(
                    "\n  inbox header {:?}\n  outbox header {:?}",
                    inbox.header(),
                    outbox.header()
                );
                for (slot, state) in inbox
                    .slots()
                    .filter(|(_, s)| *s != spmbox_core::wire::SlotState::Empty)
                {
                    detail += &format!(
                        "\n  inbox {slot}: {state:?}\n  outbox {slot}: {:?}",
                        outbox.slot(slot)
                    );
                }
            }
            if let Some(d) = h.driver.as_ref() {
                detail += &format!(
                    "\n  host generation {} evicted {}",
                    d.engine().generation(),
                    d.engine().is_evicted()
                );
                for v in d.engine().volumes() {
                    detail += &format!("\n  host volume {v:?}");
                }
            }
            if let Some(spm) = self.spm.as_ref() {
                detail += &format!(
                    "\n  spm epoch {} stats {:?}",
                    spm.driver.engine().epoch(),
                    spm.driver.engine().stats()
                );
                for e in spm.driver.engine().queue().entries() {
                    detail += &format!("\n  queued {e:?}");
                }
                if let Some(pool) = spm.pool.as_ref() {
                    detail += &format!(
                        "\n  pool free {} parked {:?}",
                        pool.free_extents(),
                        pool.parked().collect::<Vec<_>>()
                    );
                }
            } else {
                detail += "\n  no SPM running";
            }
        }
        if self.scenario.lifecycle.is_some() && !self.lifecycle_done() {
            let committed = self.committed();
            let unhandled: Vec<String> = self
                .guests
                .iter()
                .filter(|g| {
                    let v = committed.as_ref().and_then(|(p, _)| p.volume(g.volume));
                    match g.closed {
                        None => true,
                        Some(Fate::Delete) => v.is_some(),
                        Some(Fate::Reduce(to)) => v.is_some_and(|v| v.size > to),
                    }
                })
                .take(5)
                .map(|g| format!("volume {} {:?}", g.volume, g.closed))
                .collect();
            let pool = self.spm.as_ref().and_then(|n| n.pool.as_ref());
            detail += &format!(
                "\n  life cycle: not done with {unhandled:?}; released {:?} at release seq {:?}, \
                 lowest ack on disk {}, hosts' acks {:?}",
                pool.map(|p| p.released_extents()),
                pool.map(|p| p.release_seq()),
                self.min_release_ack(),
                self.hosts
                    .iter()
                    .map(|h| h.driver.as_ref().map(|d| d.engine().release_ack()))
                    .collect::<Vec<_>>()
            );
        }
        format!(
            "liveness: not quiet {:?} after faults stopped and capacity was added; stuck guests: {stuck:?}; busy hosts: {busy:?}{detail}",
            self.scenario.settle
        )
    }

    /// Hands the live pool what still waits when the engine says parked
    /// requests left the disk (the daemon does the same).
    fn follow_withdrawals(&mut self, which: Which) {
        let now = self.now;
        let Some(node) = self.node(which) else {
            return;
        };
        let Some(pool) = node.pool.as_mut() else {
            return;
        };
        let n = node.driver.engine().withdrawn();
        if n == node.withdrawn_seen {
            return;
        }
        node.withdrawn_seen = n;
        let engine = node.driver.engine();
        pool.withdraw_parked(|v| engine.waiting(v));
        while let Some(c) = pool.poll_completed() {
            node.driver
                .engine_mut()
                .handle_capacity(now, c.volume, c.size);
        }
        self.live_dirty = true;
        self.owners_stale = true;
    }

    /// No volume grows past the largest target a host still asks for at
    /// the moment of the extension, as far as the SPM can know it (what
    /// was on disk at its last read of the host, or written since).
    fn check_extension(
        &self,
        before: &HashMap<Uuid, u64>,
        after: &HashMap<Uuid, u64>,
        when: &str,
    ) -> Result<(), String> {
        for (volume, &size) in after {
            if size <= before.get(volume).copied().unwrap_or(0) {
                continue;
            }
            let asked = self
                .observed
                .borrow()
                .requested
                .values()
                .flatten()
                .filter(|(v, _)| v == volume)
                .map(|&(_, t)| t)
                .max()
                .unwrap_or(0);
            if size > asked.div_ceil(EXTENT) * EXTENT {
                return Err(format!(
                    "volume {volume} grew to {size} bytes when {when}, but the hosts ask for at \
                     most {asked} now"
                ));
            }
        }
        Ok(())
    }

    /// The [`Withdraw`] fault, once, when its time has come and a request
    /// is parked.
    fn withdraw_fault(&mut self) {
        let Some(w) = self.scenario.withdraw else {
            return;
        };
        if self.report.withdrawals > 0 || self.capacity_added || self.now < at(w.at) {
            return;
        }
        let parked = self
            .spm
            .as_ref()
            .and_then(|n| n.pool.as_ref())
            .and_then(|p| p.parked().next());
        let Some(host_id) = parked.and_then(|p| {
            self.guests
                .iter()
                .find(|g| g.volume == p.volume)
                .map(|g| g.host_id)
        }) else {
            return;
        };
        let Some(i) = self.hosts.iter().position(|h| h.host_id == host_id) else {
            return;
        };
        let Some(inbox_at) = self.geometry().inbox_area(HostId::new(host_id)) else {
            return;
        };
        self.report.withdrawals += 1;
        // Restarted without the volume: its area holds no request.
        self.put(inbox_at, &[0; AREA_SIZE]);
        self.small_chunk.push(host_id);
        let node = &mut self.hosts[i];
        node.driver = None;
        node.restart_at = Some(self.now);
        if w.restart_spm && self.spm.is_some() {
            self.spm = None;
            self.spm_restart_at = Some(self.now + Duration::from_millis(1));
        }
    }

    /// Safety, after every step.
    pub fn check_safety(&mut self) -> Result<(), String> {
        // Both pools are checked whenever they may have changed: the live
        // one first, since every commit comes from it.
        if std::mem::take(&mut self.live_dirty) {
            for live in [&self.spm, &self.twin]
                .into_iter()
                .flatten()
                .filter_map(|n| n.pool.as_ref())
            {
                check_extent_owners(live).map_err(|e| format!("live pool: {e}"))?;
                live.check_invariants()
                    .map_err(|e| format!("live pool breaks an invariant: {e:?}"))?;
            }
        }
        self.check_maps()?;
        let Some((pool, _)) = self.committed() else {
            let why = |copy| {
                let bytes = self.read(self.meta_offset(copy), COPY);
                let alone = if copy == 0 {
                    SimPool::decode(&bytes, &[])
                } else {
                    SimPool::decode(&[], &bytes)
                };
                alone
                    .err()
                    .map_or("decodes alone".to_string(), |e| format!("{e:?}"))
            };
            return Err(format!(
                "neither pool metadata copy decodes (copy 0: {}; copy 1: {})",
                why(0),
                why(1)
            ));
        };
        let version = self.disk.borrow().version();
        if self.committed_checked != Some(version) {
            check_extent_owners(&pool).map_err(|e| format!("committed pool: {e}"))?;
            pool.check_invariants()
                .map_err(|e| format!("committed pool breaks an invariant: {e:?}"))?;
            let seq = self.committed().map_or(0, |(_, seq)| seq);
            let (hosts, guests) = (&self.hosts, &self.guests);
            check_extent_history(
                &pool,
                seq,
                &mut self.extent_history,
                &|v| holders_of(hosts, guests, v),
                &|r| acknowledged(hosts, r),
            )
            .map_err(|e| format!("committed pool: {e}"))?;
            self.committed_checked = Some(version);
        }
        // Sizes are held to the reference (see the module docs).
        let pool = self.reference().map_or(pool, |(p, _)| p);
        for v in pool.volumes() {
            let max = self.committed_max.entry(v.id).or_insert(v.size);
            // The operator's reduce lands when its commit does.
            if v.size < *max && self.shrunk.get(&v.id) != Some(&v.size) {
                return Err(format!("volume {} shrank from {} to {}", v.id, max, v.size));
            }
            *max = v.size;
            if v.size > v.limit {
                return Err(format!(
                    "volume {} is {} bytes, over its limit {}",
                    v.id, v.size, v.limit
                ));
            }
            let asked = self
                .observed
                .borrow()
                .asked_max
                .get(&v.id)
                .copied()
                .unwrap_or(0);
            let initial = self.initial.get(&v.id).copied().unwrap_or(0);
            let allowed = asked.max(initial).div_ceil(EXTENT) * EXTENT;
            if v.size > allowed {
                return Err(format!(
                    "volume {} grew to {} bytes but no host asked for more than {}",
                    v.id, v.size, asked
                ));
            }
        }
        if let Some(added) = self.capacity_added_quietly {
            let bound = SpmConfig::default().full_scan_interval;
            if self.now > added + bound {
                if let Some(g) = self
                    .guests
                    .iter()
                    // A closed guest (its host stopped it: the volume was
                    // deleted under it) no longer waits for anything.
                    .find(|g| g.closed.is_none() && g.paused_since.is_some_and(|t| t <= added))
                {
                    let host = self.hosts.iter().find(|h| h.host_id == g.host_id);
                    let view = host
                        .and_then(|h| h.driver.as_ref())
                        .and_then(|d| d.engine().volume(g.volume));
                    return Err(format!(
                        "liveness: the guest of volume {} paused before capacity was added (at {:?}) and was \
                         not resumed within one full scan ({bound:?}); host {} sees {view:?}\n  then: {}",
                        g.volume,
                        since_zero(added),
                        g.host_id,
                        self.liveness_problem()
                    ));
                }
            }
        }
        for g in &self.guests {
            let deleted = g.closed.is_some() || self.shrunk.get(&g.volume) == Some(&0);
            let Some(size) = pool
                .volume(g.volume)
                .map(|v| v.size)
                .or((!deleted).then_some(0))
            else {
                // Deleted (and closed, or about to be stopped).
                continue;
            };
            if g.allocation > size {
                return Err(format!(
                    "guest of volume {} wrote up to {} but the volume is {} bytes",
                    g.volume, g.allocation, size
                ));
            }
        }
        Ok(())
    }

    /// Whether the SPM's pools hold released extents not reclaimed yet.
    fn released_waiting(&self) -> bool {
        [&self.spm, &self.twin]
            .into_iter()
            .flatten()
            .filter_map(|n| n.pool.as_ref())
            .any(|p| p.released_extents() > 0)
    }

    /// Every volume is closed, and deleted or reduced in the committed
    /// pool; nothing released waits in the SPM's pool.
    fn lifecycle_done(&self) -> bool {
        let Some((pool, _)) = self.committed() else {
            return false;
        };
        let handled = self.guests.iter().all(|g| match g.closed {
            None => false,
            Some(Fate::Delete) => pool.volume(g.volume).is_none(),
            // (Or deleted before: only a broken admin path does it.)
            Some(Fate::Reduce(to)) => pool.volume(g.volume).is_none_or(|v| v.size <= to),
        });
        handled
            && self.spm.is_some()
            && !self.released_waiting()
            && (self.scenario.lun_removal.is_none() || self.removal_finished)
    }

    /// The operator's action, when its time has come ([`Lifecycle`]).
    fn operate(&mut self) -> Result<(), String> {
        let Some(life) = self.scenario.lifecycle else {
            return Ok(());
        };
        if self.next_op_at.is_none_or(|t| self.now < t) {
            return Ok(());
        }
        self.next_op_at = Some(self.now + life.every);
        let now = self.now;
        // A host closes a volume whose guest is done.
        let done: Vec<usize> = (0..self.guests.len())
            .filter(|&k| {
                let g = &self.guests[k];
                g.closed.is_none()
                    && g.allocation >= g.virtual_size
                    && self.hosts.iter().any(|h| {
                        h.host_id == g.host_id
                            && h.driver.as_ref().is_some_and(|d| !d.engine().is_evicted())
                    })
            })
            .collect();
        if !done.is_empty() && self.life_rng.below(2) == 0 {
            let k = done[self.life_rng.below(done.len() as u64) as usize];
            let g = &self.guests[k];
            let fate = if self.life_rng.below(3) == 0 {
                let margin = self.life_rng.below(2) * EXTENT;
                Fate::Reduce(g.allocation.div_ceil(EXTENT).max(1) * EXTENT + margin)
            } else {
                Fate::Delete
            };
            let (volume, host_id) = (g.volume, g.host_id);
            if let Some(d) = self
                .hosts
                .iter_mut()
                .find(|h| h.host_id == host_id)
                .and_then(|h| h.driver.as_mut())
            {
                // The guest stopped writing before.
                d.engine_mut()
                    .remove_volume(now, volume)
                    .map_err(|e| format!("host {host_id}: remove_volume: {e:?}"))?;
                let g = &mut self.guests[k];
                g.closed = Some(fate);
                g.map = None;
                g.opening = None;
                self.maps_dirty = true;
                self.report.closes += 1;
            }
        }
        // The SPM deletes or reduces a closed volume, through the admin
        // path of the daemon that acts.
        let ready = self
            .spm
            .as_ref()
            .is_some_and(|n| n.driver.engine().is_confirmed() && n.pool.is_some())
            && self
                .twin
                .as_ref()
                .is_none_or(|n| n.driver.engine().is_confirmed());
        if !ready {
            return Ok(());
        }
        let live = self.spm.as_ref().and_then(|n| n.pool.as_ref());
        let waiting: Vec<(Uuid, Fate)> = self
            .guests
            .iter()
            .filter_map(|g| {
                let fate = g.closed?;
                let v = live?.volume(g.volume)?;
                match fate {
                    Fate::Reduce(to) if v.size <= to => None,
                    _ => Some((g.volume, fate)),
                }
            })
            .collect();
        if !waiting.is_empty() {
            let (volume, fate) = waiting[self.life_rng.below(waiting.len() as u64) as usize];
            self.admin(volume, fate, false)?;
        }
        // Sometimes a delete of a volume a host holds, which must fail.
        if self.life_rng.below(100) < u64::from(life.probe_percent) {
            let live = self.spm.as_ref().and_then(|n| n.pool.as_ref());
            let open: Vec<Uuid> = self
                .guests
                .iter()
                .filter(|g| {
                    g.closed.is_none() && live.is_some_and(|p| p.volume(g.volume).is_some())
                })
                .map(|g| g.volume)
                .collect();
            if !open.is_empty() {
                let volume = open[self.life_rng.below(open.len() as u64) as usize];
                self.admin(volume, Fate::Delete, true)?;
            }
        }
        Ok(())
    }

    /// The host that lists `volume` in a hold record of its current
    /// generation on disk, if any. Every host of the simulation counts as
    /// live: it runs, or it will start again (its guests run on).
    fn holder_on_disk(&self, volume: Uuid) -> Option<u16> {
        let g = self.geometry();
        self.hosts.iter().map(|h| h.host_id).find(|&host_id| {
            let Some(offset) = g.inbox_area(HostId::new(host_id)) else {
                return false;
            };
            let bytes = self.read(offset, AREA_SIZE);
            let Some(area) = HoldArea::new(&bytes, self.domain, HostId::new(host_id)) else {
                return false;
            };
            area.slots().any(|(_, state)| match state {
                SlotState::Valid(hold) => hold
                    .volumes
                    .iter()
                    .take(usize::from(hold.count))
                    .any(|&v| v == volume),
                _ => false,
            })
        })
    }

    /// The daemon's admin path for a delete or reduce of `volume`: refused
    /// while a live host holds it or a request for it is parked; else done
    /// on the SPM's pool and committed the way every change outside a job
    /// is. `probe`: the volume is one a host has open, and the delete must
    /// be refused.
    fn admin(&mut self, volume: Uuid, fate: Fate, probe: bool) -> Result<(), String> {
        let skip_holds = matches!(
            self.scenario.bug,
            Some(Bug::DeleteHeldVolumes | Bug::ReclaimIgnoresAcks)
        );
        if skip_holds {
            // Straight to the pool.
        } else if self.holder_on_disk(volume).is_some() {
            if probe {
                self.report.refused_held += 1;
            } else {
                self.report.refused_closing += 1;
            }
            return Ok(());
        }
        if probe && !skip_holds {
            // No hold on disk for an open volume: the host is writing its
            // holds (a new generation), or a disk fault hid them.
            let host_id = self
                .guests
                .iter()
                .find(|g| g.volume == volume)
                .map_or(0, |g| g.host_id);
            let writing = self
                .hosts
                .iter()
                .find(|h| h.host_id == host_id)
                .and_then(|h| h.driver.as_ref())
                .is_some_and(|d| d.engine().holds_pending());
            let c = self.disk.borrow().counts();
            let faultless = c.torn + c.lost + c.misdirected + c.bitflips == 0
                && self.report.crashes == 0
                && self.report.evictions == 0;
            if faultless && !writing {
                return Err(format!(
                    "no hold record on disk lists volume {volume}, which host {host_id} holds, \
                     and no fault could have hidden it"
                ));
            }
            if writing {
                self.report.holds_unseen_starting += 1;
            } else {
                self.report.holds_unseen += 1;
            }
            // The daemon sees no holder and deletes: the host's
            // acknowledgement is what keeps the guest's data apart now (it
            // stops the guest before it acknowledges the release).
        }
        let domain = self.domain;
        let Some(node) = self.spm.as_mut() else {
            return Ok(());
        };
        let Some(pool) = node.pool.as_mut() else {
            return Ok(());
        };
        let result = match fate {
            Fate::Delete => pool.delete_volume(volume).map(|_| None),
            Fate::Reduce(to) => pool.reduce_volume(volume, to).map(Some),
        };
        match result {
            Ok(reduced) => {
                // As the daemon does, before the change is committed: the
                // replies that promise the volume more than it keeps are
                // emptied (the commit comes after this write).
                let keep = reduced.unwrap_or(0);
                if std::env::var("NORETRACT").is_err()
                    && node
                        .driver
                        .retract_replies(domain, volume, keep)
                        .is_ok_and(|n| n > 0)
                {
                    self.report.replies_retracted += 1;
                    let _ = node.driver.write();
                }
                node.driver.engine_mut().request_commit();
                self.live_dirty = true;
                self.owners_stale = true;
                match reduced {
                    Some(size) => {
                        self.report.reduces += 1;
                        // What the guest wrote past the new size is gone.
                        if let Some(g) = self.guests.iter_mut().find(|g| g.volume == volume) {
                            g.versions.retain(|&x, _| x < size / EXTENT);
                        }
                        // The volume shrinks on purpose.
                        self.committed_max.insert(volume, size);
                        self.shrunk.insert(volume, size);
                    }
                    None => {
                        self.report.deletes += 1;
                        self.committed_max.remove(&volume);
                        self.shrunk.insert(volume, 0);
                    }
                }
                Ok(())
            }
            Err(pool::PoolError::Parked) => {
                self.report.refused_parked += 1;
                Ok(())
            }
            Err(e) => Err(format!("{fate:?} of volume {volume}: {e:?}")),
        }
    }

    /// The lowest `release_ack` in the inbox headers of the live hosts, as
    /// the SPM reads them from disk (a header that does not read counts 0).
    fn min_release_ack(&self) -> u64 {
        let g = self.geometry();
        self.hosts
            .iter()
            .map(|h| {
                let Some(offset) = g.inbox_area(HostId::new(h.host_id)) else {
                    return 0;
                };
                let bytes = self.read(offset, AREA_SIZE);
                InboxArea::new(&bytes, self.domain, HostId::new(h.host_id))
                    .and_then(|a| a.header().ok().flatten())
                    .map_or(0, |h| h.release_ack)
            })
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Every few milliseconds while released extents wait, each SPM frees
    /// those every live host acknowledged; the parked requests that serves
    /// are answered after a commit.
    fn reclaim(&mut self) -> Result<(), String> {
        if self.now < self.next_reclaim_at || !self.released_waiting() {
            return Ok(());
        }
        self.next_reclaim_at = self.now + RECLAIM_INTERVAL;
        let acked = if self.scenario.bug == Some(Bug::ReclaimIgnoresAcks) {
            u64::MAX
        } else {
            self.min_release_ack()
        };
        for which in [Which::Live, Which::Twin] {
            let Some(node) = self.node(which) else {
                continue;
            };
            let Some(pool) = node.pool.as_mut() else {
                continue;
            };
            if pool.released_extents() == 0 {
                continue;
            }
            let before = sizes(pool);
            let freed = pool.reclaim(acked);
            if freed == 0 {
                continue;
            }
            let after = sizes(pool);
            if before != after {
                node.driver.engine_mut().request_commit();
            }
            self.report.reclaimed += freed;
            self.live_dirty = true;
            self.owners_stale = true;
            self.check_extension(&before, &after, "released extents were reclaimed")?;
        }
        Ok(())
    }

    /// The guest of `self.guests[k]` reads back, through the map it now
    /// has, every extent it wrote: each holds its last write (a move
    /// copied it to the new place before the map changed, and no write
    /// went to the old place after the copy).
    fn check_readback(&self, k: usize) -> Result<(), String> {
        let g = &self.guests[k];
        let Some(map) = g.map.as_ref() else {
            return Ok(());
        };
        for (&x, &version) in &g.versions {
            let Some(e) = map.extent(x) else {
                continue;
            };
            let found = self.data.get(&e).copied();
            if found != Some((g.volume, version)) {
                return Err(format!(
                    "the guest of volume {} on host {} wrote its extent {x} last as write \
                     {version}, but reads back {found:?} through its map of commit {} (extent \
                     {} of LUN {}): a write lost",
                    g.volume, g.host_id, map.seq, e.1, e.0
                ));
            }
        }
        Ok(())
    }

    /// Hosts opening volumes (after a start, or a reopen): once the hold
    /// record is durable, the committed metadata is read; while it names
    /// the volume as `moving` the host waits, else the guest takes the
    /// map of that read.
    fn open_guests(&mut self) -> Result<(), String> {
        let now = self.now;
        for k in 0..self.guests.len() {
            let g = &self.guests[k];
            if g.closed.is_some() || g.opening.is_none_or(|t| now < t) {
                continue;
            }
            let host_id = g.host_id;
            let volume = g.volume;
            let Some(i) = self.hosts.iter().position(|h| h.host_id == host_id) else {
                continue;
            };
            let pending = self.hosts[i]
                .driver
                .as_ref()
                .is_none_or(|d| d.engine().holds_pending());
            if pending {
                // The hold record is not written yet (or the host is down:
                // its start opens the volume anew).
                self.guests[k].opening = Some(now + GUEST_TICK);
                continue;
            }
            let Some((pool, seq)) = self.committed() else {
                self.guests[k].opening = Some(now + GUEST_TICK);
                continue;
            };
            if pool.moving() == volume && self.scenario.bug != Some(Bug::OpenIgnoresMoving) {
                let g = &mut self.guests[k];
                if !g.waited {
                    g.waited = true;
                    if g.reopens > 0 {
                        self.report.reopens_waited += 1;
                    }
                }
                g.opening = Some(now + MOVING_RECHECK);
                continue;
            }
            let Some(map) = snapshot(&pool, volume, seq) else {
                // Gone from the metadata: the guest stops.
                self.stop_guest(i, volume);
                continue;
            };
            let size = pool.volume(volume).map_or(0, |v| v.size);
            let g = &mut self.guests[k];
            g.map = Some(map);
            g.mapped = g.mapped.max(size);
            g.opening = None;
            self.maps_dirty = true;
            self.check_readback(k)?;
        }
        Ok(())
    }

    /// A host opens a closed volume again (not deleted), preferably the
    /// one the SPM moves: it tracks it again (`add_volume`, which rewrites
    /// its hold records), and [`Sim::open_guests`] finishes the open.
    fn reopen(&mut self) -> Result<(), String> {
        let now = self.now;
        let moving = match self.removal.map(|r| r.phase) {
            Some(Phase::Marked(v) | Phase::Copy(v)) => Some(v),
            Some(Phase::Copied(r)) => Some(r.volume),
            _ => None,
        };
        let Some((committed, _)) = self.committed() else {
            return Ok(());
        };
        let live = self.spm.as_ref().and_then(|n| n.pool.as_ref());
        let candidates: Vec<usize> = (0..self.guests.len())
            .filter(|&k| {
                let g = &self.guests[k];
                g.closed.is_some()
                    && g.reopens < 2
                    && committed.volume(g.volume).is_some()
                    && live.is_some_and(|p| p.volume(g.volume).is_some())
                    && self
                        .hosts
                        .iter()
                        .find(|h| h.host_id == g.host_id)
                        .and_then(|h| h.driver.as_ref())
                        .is_some_and(|d| !d.engine().is_evicted())
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let k = match candidates
            .iter()
            .find(|&&k| Some(self.guests[k].volume) == moving)
        {
            Some(&k) if self.removal_rng.below(2) == 0 => k,
            _ => candidates[self.removal_rng.below(candidates.len() as u64) as usize],
        };
        let size = committed
            .volume(self.guests[k].volume)
            .map_or(0, |v| v.size);
        let g = &mut self.guests[k];
        let host_id = g.host_id;
        // The guest wrote no further than the volume keeps.
        g.mapped = size;
        g.allocation = g.allocation.min(size);
        let (volume, virtual_size, limit, mapped, allocation) =
            (g.volume, g.virtual_size, g.limit, g.mapped, g.allocation);
        let Some(d) = self
            .hosts
            .iter_mut()
            .find(|h| h.host_id == host_id)
            .and_then(|h| h.driver.as_mut())
        else {
            return Ok(());
        };
        d.engine_mut()
            .add_volume(volume, virtual_size, limit, mapped, allocation)
            .map_err(|e| format!("host {host_id}: add_volume on reopen: {e:?}"))?;
        let g = &mut self.guests[k];
        g.closed = None;
        g.map = None;
        g.opening = Some(now);
        g.waited = false;
        g.paused = false;
        g.paused_since = None;
        g.reopens += 1;
        self.report.reopens += 1;
        Ok(())
    }

    /// A host writes through its map of `volume` while no hold record on
    /// disk lists it, or its open read the metadata after a hold record
    /// the disk lost.
    fn held_unseen(&self, volume: Uuid) -> bool {
        self.guests.iter().any(|g| {
            g.volume == volume
                && g.closed.is_none()
                && (g.map.is_some()
                    || g.opening.is_some()
                        && self
                            .hosts
                            .iter()
                            .find(|h| h.host_id == g.host_id)
                            .and_then(|h| h.driver.as_ref())
                            .is_some_and(|d| !d.engine().holds_pending()))
        })
    }

    /// The data of the extents of `from` (on LUN `from_lun`) copied to
    /// those of `to` (on LUN `to_lun`).
    fn copy_extents(&mut self, from: (Uuid, u32), to: (Uuid, u32), extents: u32) {
        for i in 0..extents {
            let (a, b) = ((from.0, from.1 + i), (to.0, to.1 + i));
            match self.data.get(&a).copied() {
                Some(d) => self.data.insert(b, d),
                None => self.data.remove(&b),
            };
            match self.written.get(&a).copied() {
                Some(v) => self.written.insert(b, v),
                None => self.written.remove(&b),
            };
        }
    }

    /// A step of the LUN removal ([`LunRemoval`]), and the reopens.
    fn remove_lun(&mut self) -> Result<(), String> {
        let Some(plan) = self.scenario.lun_removal else {
            return Ok(());
        };
        if self.removal_finished || self.removal_next_at.is_none_or(|t| self.now < t) {
            return Ok(());
        }
        // Steps come at uneven times, so that they interleave with the
        // hosts' opens at any point.
        let pause = if self.removal_rng.below(4) == 0 {
            self.removal_rng.between(50, 400)
        } else {
            self.removal_rng.between(1, 30)
        };
        self.removal_next_at = Some(self.now + Duration::from_millis(pause));
        if self.removal_rng.below(100) < u64::from(plan.reopen_percent) {
            self.reopen()?;
        }
        if !self.capacity_added {
            return Ok(());
        }
        let ready = self
            .spm
            .as_ref()
            .is_some_and(|n| n.driver.engine().is_confirmed() && n.pool.is_some())
            && self.twin.is_none()
            && self.believed_pool.is_none();
        let spm = self.spm.as_ref().map(|n| {
            let e = n.driver.engine();
            (e.epoch().get(), e.owner())
        });
        if let Some(r) = self.removal
            && Some(r.spm) != spm
        {
            // The SPM it ran on is gone: its pool (the drain) with it; a
            // new SPM clears `moving` at its start.
            self.removal = None;
            self.report.lun_removals_interrupted += 1;
        }
        if !ready {
            return Ok(());
        }
        let spm = spm.expect("ready");
        let Some(node) = self.spm.as_ref() else {
            return Ok(());
        };
        if let Some(r) = self.removal
            && let Some(seq) = r.awaiting
        {
            if node.seq <= seq || node.driver.engine().commit_pending() {
                return Ok(());
            }
            if let Some(r) = self.removal.as_mut() {
                r.awaiting = None;
            }
        }
        let Some(r) = self.removal else {
            return self.start_removal(plan, spm);
        };
        let Some(pool) = self.spm.as_ref().and_then(|n| n.pool.as_ref()) else {
            return Ok(());
        };
        let Some(lun) = pool.luns().iter().position(|l| l.id == r.lun) else {
            // Dropped.
            self.removal = None;
            self.removal_finished = true;
            self.report.lun_removals_finished += 1;
            return Ok(());
        };
        let lun = lun as u16;
        match r.phase {
            Phase::Spare => {
                self.removal = None;
                Ok(())
            }
            Phase::Plan => match pool.plan_relocation(lun) {
                Ok(None) => {
                    self.set_phase(Phase::Reclaim, false);
                    Ok(())
                }
                Ok(Some(relocation)) => {
                    let volume = relocation.volume;
                    self.with_pool(|p| p.set_moving(volume))?;
                    self.set_phase(Phase::Marked(volume), true);
                    Ok(())
                }
                Err(pool::PoolError::NoSpace { .. }) => self.refuse(lun, false),
                Err(e) => Err(format!("plan_relocation: {e:?}")),
            },
            Phase::Marked(volume) => {
                // `moving = volume` is durable: the hold records now.
                if self.scenario.bug != Some(Bug::MoveSkipsHolds) {
                    if self.holder_on_disk(volume).is_some() {
                        self.report.moves_refused_held += 1;
                        return self.refuse(lun, true);
                    }
                    if self.held_unseen(volume) {
                        self.report.moves_hold_unseen += 1;
                        return self.refuse(lun, true);
                    }
                }
                self.set_phase(Phase::Copy(volume), false);
                self.move_segment(lun, volume)
            }
            Phase::Copy(volume) => self.move_segment(lun, volume),
            Phase::Copied(r) => {
                // The plan still holds (a reduce or delete meanwhile may
                // have changed it): relocate; else copy again.
                if pool.plan_relocation(lun).ok().flatten() != Some(r) {
                    self.set_phase(Phase::Copy(r.volume), false);
                    return self.move_segment(lun, r.volume);
                }
                self.with_pool(|p| p.relocate(r.volume, r.segment, r.to.lun, r.to.first_extent))?;
                self.report.segments_moved += 1;
                self.set_phase(Phase::Copy(r.volume), true);
                Ok(())
            }
            Phase::Refused => {
                self.removal = None;
                self.removal_next_at = Some(self.now + self.retry_pause());
                Ok(())
            }
            Phase::Reclaim => match self.with_pool(|p| p.drop_lun(lun)) {
                Ok(()) => {
                    self.set_phase(Phase::Dropped, true);
                    Ok(())
                }
                // Released runs on it wait for the hosts' acknowledgements.
                Err(e) if e.contains("LunInUse") => Ok(()),
                Err(e) => Err(e),
            },
            Phase::Dropped => Ok(()),
        }
    }

    fn retry_pause(&mut self) -> Duration {
        Duration::from_millis(self.removal_rng.between(200, 2_000))
    }

    /// Changes the live pool; a pool error is a failure.
    fn with_pool(
        &mut self,
        change: impl FnOnce(&mut SimPool) -> Result<(), pool::PoolError>,
    ) -> Result<(), String> {
        let Some(pool) = self.spm.as_mut().and_then(|n| n.pool.as_mut()) else {
            return Err("no live pool".into());
        };
        change(pool).map_err(|e| format!("LUN removal: {e:?}"))?;
        self.live_dirty = true;
        self.owners_stale = true;
        Ok(())
    }

    /// The next phase of the removal; with `commit`, after a commit of the
    /// pool as it is now.
    fn set_phase(&mut self, phase: Phase, commit: bool) {
        let seq = self.spm.as_ref().map_or(0, |n| n.seq);
        if commit && let Some(node) = self.spm.as_mut() {
            node.driver.engine_mut().request_commit();
        }
        if let Some(r) = self.removal.as_mut() {
            r.phase = phase;
            r.awaiting = commit.then_some(seq);
        }
    }

    /// The attempt ends refused: the drain undone and, with `clear`,
    /// `moving` cleared in a commit.
    fn refuse(&mut self, lun: u16, clear: bool) -> Result<(), String> {
        self.report.lun_removals_refused += 1;
        if clear {
            self.with_pool(|p| p.set_moving(Uuid::NIL))?;
        }
        self.with_pool(|p| p.set_draining(lun, false))?;
        self.set_phase(Phase::Refused, clear);
        if !clear {
            self.removal = None;
            self.removal_next_at = Some(self.now + self.retry_pause());
        }
        Ok(())
    }

    /// Starts an attempt: the spare LUN first, then the drain, refused up
    /// front while a volume on the LUN is held or parked.
    fn start_removal(&mut self, plan: LunRemoval, spm: (u64, u64)) -> Result<(), String> {
        let Some(pool) = self.spm.as_ref().and_then(|n| n.pool.as_ref()) else {
            return Ok(());
        };
        let target = if plan.first_lun {
            pool.luns().first()
        } else {
            pool.luns().get(1)
        };
        let Some(target) = target.copied() else {
            return Ok(());
        };
        if target.id == SPARE_LUN {
            self.removal_finished = true;
            return Ok(());
        }
        if !pool.luns().iter().any(|l| l.id == SPARE_LUN) {
            let extents = target.extents;
            self.with_pool(|p| p.add_lun(SPARE_LUN, extents).map(|_| ()))?;
            self.removal = Some(Removal {
                lun: target.id,
                spm,
                phase: Phase::Spare,
                awaiting: None,
            });
            self.set_phase(Phase::Spare, true);
            return Ok(());
        }
        let lun = pool
            .luns()
            .iter()
            .position(|l| l.id == target.id)
            .unwrap_or(0) as u16;
        let on_lun: Vec<Uuid> = pool
            .volumes()
            .filter(|v| {
                pool.segments(v.id)
                    .is_some_and(|s| s.iter().any(|s| s.lun == lun))
            })
            .map(|v| v.id)
            .collect();
        let parked = pool.parked().any(|p| on_lun.contains(&p.volume));
        let held = on_lun.iter().any(|&v| self.holder_on_disk(v).is_some());
        self.report.lun_removals_started += 1;
        if parked || held {
            self.report.lun_removals_refused += 1;
            self.removal_next_at = Some(self.now + self.retry_pause());
            return Ok(());
        }
        self.with_pool(|p| p.set_draining(lun, true))?;
        self.removal = Some(Removal {
            lun: target.id,
            spm,
            phase: Phase::Plan,
            awaiting: None,
        });
        Ok(())
    }

    /// Copies the data of the next segment of `volume` off LUN `lun` (it
    /// is relocated in a commit at the next step); with none left,
    /// `moving` is cleared in a commit and the next volume planned.
    fn move_segment(&mut self, lun: u16, volume: Uuid) -> Result<(), String> {
        let Some(pool) = self.spm.as_ref().and_then(|n| n.pool.as_ref()) else {
            return Ok(());
        };
        let relocation = match pool.plan_relocation(lun) {
            Ok(r) => r.filter(|r| r.volume == volume),
            Err(pool::PoolError::NoSpace { .. }) => return self.refuse(lun, true),
            Err(e) => return Err(format!("plan_relocation: {e:?}")),
        };
        let Some(r) = relocation else {
            self.with_pool(|p| p.set_moving(Uuid::NIL))?;
            self.set_phase(Phase::Plan, true);
            return Ok(());
        };
        let id = |l: u16| pool.luns().get(usize::from(l)).map_or(Uuid::NIL, |l| l.id);
        let (from, to) = (
            (id(r.from.lun), r.from.first_extent),
            (id(r.to.lun), r.to.first_extent),
        );
        self.copy_extents(from, to, r.from.extents);
        self.set_phase(Phase::Copied(r), false);
        Ok(())
    }

    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }
}

/// What an SPM driver has done so far: it made progress when this changed.
fn progress(driver: &SpmDrv) -> impl PartialEq + use<> {
    let engine = driver.engine();
    let stats = engine.stats();
    (
        driver.stats(),
        stats.jobs,
        stats.replies,
        engine.commit_pending(),
        engine.is_confirmed(),
        engine.is_deposed(),
    )
}

/// Every volume's size in `pool`.
fn sizes(pool: &SimPool) -> HashMap<Uuid, u64> {
    pool.volumes().map(|v| (v.id, v.size)).collect()
}

/// The simulation's own check of extent ownership, independent of
/// [`Pool::check_invariants`]: every extent of every volume lies on its LUN,
/// inside the LUN's used part, and belongs to one volume only.
fn check_extent_owners(pool: &SimPool) -> Result<(), String> {
    let mut owner: HashMap<(u16, u32), Uuid> = HashMap::new();
    for v in pool.volumes() {
        for s in pool.segments(v.id).unwrap_or(&[]) {
            let Some(lun) = pool.luns().get(usize::from(s.lun)) else {
                return Err(format!(
                    "volume {} holds extents of missing LUN {}",
                    v.id, s.lun
                ));
            };
            for extent in s.first_extent..s.first_extent.saturating_add(s.extents) {
                if extent >= lun.used {
                    return Err(format!(
                        "volume {} holds extent {extent} of LUN {}, which the LUN counts as free \
                         (it has {} of {} extents used)",
                        v.id, s.lun, lun.used, lun.extents
                    ));
                }
                if let Some(other) = owner.insert((s.lun, extent), v.id) {
                    return Err(format!(
                        "extent {extent} of LUN {} belongs to both volume {other} and volume {}",
                        s.lun, v.id
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every extent's owner in `pool`.
fn owner_map(pool: &SimPool) -> Owners {
    let mut owners = HashMap::new();
    for v in pool.volumes() {
        for s in pool.segments(v.id).unwrap_or(&[]) {
            let lun = pool
                .luns()
                .get(usize::from(s.lun))
                .map_or(Uuid::NIL, |l| l.id);
            for extent in s.first_extent..s.first_extent.saturating_add(s.extents) {
                owners.insert((lun, extent), v.id);
            }
        }
    }
    owners
}

/// The map of `volume` in `pool`, committed at `seq`.
fn snapshot(pool: &SimPool, volume: Uuid, seq: u64) -> Option<Snapshot> {
    pool.segments(volume).map(|segments| Snapshot {
        segments: segments.to_vec(),
        luns: pool.luns().iter().map(|l| l.id).collect(),
        seq,
    })
}

/// An extent a committed pool gives a volume must never have been
/// committed to another volume before, in any earlier commit (by any SPM),
/// unless that volume released it in a commit (deleted or reduced: a
/// committed pool no longer gave it the extent) and every host that held
/// it then has acknowledged that release (`acknowledged`). `history` holds
/// every owner seen so far; `holders` says which hosts (index,
/// incarnation) hold a volume now. `pool` is committed at `seq`.
fn check_extent_history(
    pool: &SimPool,
    seq: u64,
    history: &mut ExtentHistory,
    holders: &dyn Fn(Uuid) -> Vec<(usize, u64)>,
    acknowledged: &dyn Fn(&Release) -> bool,
) -> Result<(), String> {
    let now = owner_map(pool);
    for (&(lun, extent), &v) in &now {
        let Some(&before) = history.owner.get(&(lun, extent)) else {
            history.owner.insert((lun, extent), v);
            continue;
        };
        if before != v {
            match history.released.get(&(lun, extent)) {
                Some(r) if acknowledged(r) => {}
                Some(r) => {
                    return Err(format!(
                        "extent {extent} of LUN {lun} was released from volume {before} in \
                         commit {} and is now committed to volume {v} before every host that \
                         held {before} acknowledged that release (hosts {:?}): given to two \
                         volumes",
                        r.seq, r.holders
                    ));
                }
                None => {
                    return Err(format!(
                        "extent {extent} of LUN {lun} was committed to volume {before} and is \
                         now committed to volume {v}: given to two volumes"
                    ));
                }
            }
        }
        history.owner.insert((lun, extent), v);
        // Only a commit newer than the release takes it back: a rolled-back
        // copy read again (older than the release) still has the old owner,
        // and the release stands once the newer commit is restored.
        if history
            .released
            .get(&(lun, extent))
            .is_some_and(|r| seq > r.seq)
        {
            history.released.remove(&(lun, extent));
        }
    }
    // What the owners no longer have is released by this commit, if it is
    // newer than every commit seen.
    if seq <= history.seq {
        return Ok(());
    }
    history.seq = seq;
    for (&e, &before) in &history.owner {
        if !now.contains_key(&e) && !history.released.contains_key(&e) {
            history.released.insert(
                e,
                Release {
                    seq,
                    holders: holders(before),
                },
            );
        }
    }
    Ok(())
}

/// The hosts (index, incarnation) whose guest of `volume` has it open.
fn holders_of(hosts: &[HostNode], guests: &[Guest], volume: Uuid) -> Vec<(usize, u64)> {
    guests
        .iter()
        .filter(|g| g.volume == volume && g.map.is_some())
        .filter_map(|g| hosts.iter().position(|h| h.host_id == g.host_id))
        .map(|i| (i, hosts[i].incarnation))
        .collect()
}

/// Every host that held a volume when `r` released its extents has
/// acknowledged that release, or started again since (and read its maps
/// anew).
fn acknowledged(hosts: &[HostNode], r: &Release) -> bool {
    r.holders.iter().all(|&(i, incarnation)| {
        let h = &hosts[i];
        h.incarnation != incarnation
            || h.driver
                .as_ref()
                .is_some_and(|d| d.engine().release_ack() >= r.seq)
    })
}

/// Runs one seed's scenario.
pub fn run_seed(seed: u64) -> Result<Report, Failure> {
    run(Scenario::from_seed(seed))
}

/// Runs a scenario on a thread of its own with room for the engines and
/// pools that unoptimized builds keep on the stack.
pub fn run(scenario: Scenario) -> Result<Report, Failure> {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || Sim::new(scenario).run())
        .expect("simulation thread")
        .join()
        .expect("the simulation panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extent_committed_to_one_volume_and_later_to_another_is_caught() {
        let (v, w) = (Uuid([1; 16]), Uuid([2; 16]));
        let pool_with = |first: Uuid, second: Uuid| {
            let mut pool = SimPool::new(EXTENT).expect("pool");
            pool.add_lun(Uuid([0x10; 16]), 8).expect("LUN");
            pool.create_volume(first, 4 * EXTENT, 2 * EXTENT)
                .expect("volume");
            pool.create_volume(second, 4 * EXTENT, 2 * EXTENT)
                .expect("volume");
            pool
        };
        let mut history = ExtentHistory::default();
        let check = |pool: &SimPool, seq, history: &mut ExtentHistory| {
            check_extent_history(pool, seq, history, &|_| Vec::new(), &|_| true)
        };
        check(&pool_with(v, w), 1, &mut history).expect("first commit");
        check(&pool_with(v, w), 2, &mut history).expect("the same again");
        // A pool rolled back or run by a second SPM gives the same
        // extents in another order: each pool alone is consistent.
        let other = pool_with(w, v);
        check_extent_owners(&other).expect("consistent alone");
        let err = check(&other, 3, &mut history).expect_err("double allocation");
        assert!(err.contains("given to two volumes"), "{err}");
    }
}
