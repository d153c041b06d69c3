//! The SPM as firmware: spmbox-core's SPM engine in its driver, with the
//! reference pool, on a Cortex-M4F (qemu's `mps2-an386`), serving the
//! hosts of a domain whose device is a file on the machine that runs qemu
//! (semihosting file I/O, [`disk`]).
//!
//! It does what `spmbox spm` does, in the same order (docs/firmware.md):
//! take over the SPM header with a higher epoch, load the pool from the
//! newer valid metadata copy, then loop: reads, jobs on the pool, the
//! commit (the pool metadata written to the copy [`pool::commit_place`]
//! names before `handle_committed`, so no reply of a batch is written
//! before the batch is on disk), completions of parked requests only for
//! a pool that is on disk, writes, events, and the command file
//! (`<domain>.cmd`: `add-lun <uuid> <extents>`, `stop`).
//!
//! Semihosting command line: `<domain path> [spm id]`.
#![no_std]
#![no_main]

mod clock;
mod command;
mod disk;
mod stack;

use core::time::Duration;

use cortex_m_rt::entry;
use defmt::{error, info, warn};
use defmt_semihosting as _;
use semihosting::process::exit;
use spmbox_core::driver::SpmDriver;
use spmbox_core::pool::{self, DefaultPool, Extend, METADATA_COPY_SIZE, PoolError};
use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmEvent};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    AREA_SIZE, Epoch, Geometry, HostId, RECORD_LEN, SPM_HEADER_OFFSET, SUPERBLOCK_OFFSET,
    SpmHeader, SpmState, Superblock,
};
use static_cell::{ConstStaticCell, StaticCell};

use crate::clock::Clock;
use crate::command::Command;
use crate::disk::{Disk, DiskError};
use spmbox_core::driver::BlockDevice as _;

/// Requests the SPM's queue holds: its window over the mailbox (any
/// number of hosts; more wait on disk for the next scan).
pub const QUEUE: usize = 256;
/// Hosts read per read of a scan: the driver's buffer holds two areas of
/// each (inbox and outbox view), 128 KiB at 16.
pub const CHUNK_HOSTS: u16 = 16;
/// The driver's buffer: one sector and the chunk's areas, for the largest
/// sector size; no mirror of the outbox areas (8 MiB at 2000 hosts), so
/// each reply's sector is read, patched and written.
pub const DRIVER_BUFFER: usize = 4096 + 2 * CHUNK_HOSTS as usize * AREA_SIZE;
/// How often the command file is looked for.
pub const COMMAND_INTERVAL: Duration = Duration::from_millis(250);
/// How long a failed read, commit or write waits before it is tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// The longest the loop sleeps without looking at the engine.
pub const MAX_SLEEP_MS: u64 = 50;
/// Bytes of the semihosting command line.
const CMDLINE_MAX: usize = 256;

/// The engine in its driver on the domain file.
type Driver = SpmDriver<Disk, &'static mut [u8], QUEUE>;

static POOL: StaticCell<DefaultPool> = StaticCell::new();
static COPY_A: ConstStaticCell<[u8; METADATA_COPY_SIZE]> =
    ConstStaticCell::new([0; METADATA_COPY_SIZE]);
static COPY_B: ConstStaticCell<[u8; METADATA_COPY_SIZE]> =
    ConstStaticCell::new([0; METADATA_COPY_SIZE]);
static DRIVER_BUF: ConstStaticCell<[u8; DRIVER_BUFFER]> = ConstStaticCell::new([0; DRIVER_BUFFER]);
static DRIVER: StaticCell<Option<Driver>> = StaticCell::new();

#[entry]
fn main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(()) => 1,
    };
    let (used, size) = stack::peak();
    info!(
        "firmware: peak stack {=usize} of {=usize} bytes in the loop (since start-up)",
        used, size
    );
    exit(code)
}

/// The core does not panic on any input (it is fuzzed for that); should
/// anything else, the firmware says so and exits with 101.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    error!("firmware: panic");
    exit(101)
}

/// What the firmware measured, logged at the end.
#[derive(Default, defmt::Format)]
struct Summary {
    jobs: u64,
    commits: u64,
    replies: u64,
    luns_added: u64,
}

fn run() -> Result<(), ()> {
    let Some(peripherals) = cortex_m::Peripherals::take() else {
        error!("firmware: the core peripherals were taken already");
        return Err(());
    };
    let mut clock = Clock::start(peripherals.SYST);

    // The command line: the domain file, then the SPM id.
    let mut line = [0u8; CMDLINE_MAX];
    let line = cmdline(&mut line);
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let _program = words.next();
    let Some(domain_path) = words.next() else {
        error!("firmware: no domain path on the semihosting command line (arg=<path>)");
        return Err(());
    };
    let spm_id = words
        .next()
        .and_then(|w| core::str::from_utf8(w).ok())
        .and_then(|w| w.parse::<u16>().ok())
        .map_or(HostId::NONE, HostId::new);
    let paths = Paths::of(domain_path).ok_or_else(|| {
        error!(
            "firmware: the domain path is longer than {=usize} bytes",
            disk::PATH_MAX
        );
    })?;

    // The superblock names the domain and its geometry.
    let mut sector = [0u8; 4096];
    let mut probe = Disk::open(disk::c(&paths.domain), 512).map_err(|e| {
        error!("firmware: cannot open the domain file: {}", e);
    })?;
    probe
        .read_at(SUPERBLOCK_OFFSET, &mut sector[..512])
        .map_err(|e| error!("firmware: cannot read the superblock: {}", e))?;
    let superblock = match Superblock::decode(&sector[..RECORD_LEN]) {
        Ok(Some(s)) => s,
        _ => {
            error!(
                "firmware: the domain file holds no valid superblock; create it with `spmbox pool create`"
            );
            return Err(());
        }
    };
    let geometry: Geometry = superblock.geometry;
    let domain = superblock.domain;
    drop(probe);
    let mut disk = Disk::open(disk::c(&paths.domain), geometry.sector_size())
        .map_err(|e| error!("firmware: cannot open the domain file: {}", e))?;
    let meta = pool::metadata_offset(&geometry);
    let needed = meta + 2 * METADATA_COPY_SIZE as u64;
    match disk.len() {
        Ok(len) if len >= needed => {}
        Ok(len) => {
            error!(
                "firmware: the domain file is {=u64} bytes; with its pool metadata it needs {=u64}",
                len, needed
            );
            return Err(());
        }
        Err(e) => {
            error!("firmware: cannot size the domain file: {}", e);
            return Err(());
        }
    }
    info!(
        "firmware: domain {}: {=u16} hosts, {=u32}-byte sectors",
        Id(domain),
        geometry.max_hosts(),
        geometry.sector_size()
    );

    // Only one SPM may serve the domain: an active header whose heartbeat
    // moves belongs to a live SPM.
    let config = SpmConfig::default();
    let found = live_check(&mut disk, &mut clock, &geometry, &mut sector)?;
    let found = with_highest_epoch(&mut disk, &geometry, found, domain)?;

    // The pool, from the newer valid copy.
    let copy_a = COPY_A.take();
    let copy_b = COPY_B.take();
    disk.read_at(meta, copy_a)
        .and_then(|()| disk.read_at(meta + METADATA_COPY_SIZE as u64, copy_b))
        .map_err(|e| error!("firmware: cannot read the pool metadata: {}", e))?;
    let pool = POOL.init_with(|| match DefaultPool::new(pool::DEFAULT_EXTENT_SIZE) {
        Ok(p) => p,
        Err(_) => unreachable_pool(),
    });
    let mut seq = match pool.decode_into(copy_a, copy_b) {
        Ok(seq) => seq,
        Err(e) => {
            error!("firmware: the pool metadata cannot be read: {}", e);
            return Err(());
        }
    };
    if let Some(h) = found.as_ref()
        && h.pool_commit > seq
    {
        error!(
            "firmware: the SPM header says commit {=u64} was made durable, the newest valid copy is {=u64}: refusing to run on a rolled-back pool",
            h.pool_commit, seq
        );
        return Err(());
    }
    let mut found = found;
    if let Some(h) = found.as_mut() {
        h.pool_commit = seq;
    }
    info!(
        "firmware: pool commit {=u64}: {=usize} LUNs, {=u64} of {=u64} extents free",
        seq,
        pool.luns().len(),
        pool.free_extents(),
        pool.total_extents()
    );

    // The engine in its driver.
    let owner = random_owner(&mut clock);
    let start = Start {
        now: clock.now(),
        domain,
        geometry,
        spm_id,
        owner,
        found,
        config,
    };
    let Some(driver) = start_driver(start, disk) else {
        return Err(());
    };
    driver.engine_mut().set_pool_commit(seq);
    info!(
        "firmware: SPM started: epoch {=u64}, SPM id {=u16}; state: Spm<{=usize}> {=usize} bytes, pool {=usize} bytes, driver {=usize} bytes with a {=usize}-byte buffer, two metadata copies of {=usize} bytes",
        driver.engine().epoch().get(),
        spm_id.get(),
        QUEUE,
        core::mem::size_of::<Spm<QUEUE>>(),
        core::mem::size_of::<DefaultPool>(),
        core::mem::size_of::<Driver>(),
        DRIVER_BUFFER,
        METADATA_COPY_SIZE
    );

    let mut summary = Summary::default();
    // An add-lun whose commit failed: the pool in memory is ahead of the
    // disk until a commit succeeds; no completion goes out before.
    let mut commit_owed = false;
    // A volume named as being moved (a `pool remove-lun` cut short): this
    // SPM moves nothing, so the name goes with its first commit, and hosts
    // waiting to open the volume go on (docs/pool-format.md 6.7).
    if !pool.moving().is_nil() {
        warn!(
            "firmware: the pool named volume {} as being moved (a LUN removal was cut short); clearing it",
            pool.moving()
        );
        let _ = pool.set_moving(spmbox_core::wire::Uuid::NIL);
        commit_owed = true;
    }
    let mut dirty = false;
    let mut withdrawn = driver.engine().withdrawn();
    let mut retry_at = Instant::ZERO;
    let mut next_command = Instant::ZERO;
    let mut stop = false;
    let mut first_look = true;
    let (used, size) = stack::peak();
    info!(
        "firmware: peak stack {=usize} of {=usize} bytes at start-up",
        used, size
    );
    stack::repaint();
    loop {
        let now = clock.now();
        let retrying = now < retry_at;
        // Reads.
        if !retrying && let Err(e) = driver.read(now) {
            warn!("firmware: reading the mailbox failed: {}; retrying", e);
            retry_at = now + RETRY_INTERVAL;
        }
        // Jobs on the pool.
        while let Some(job) = driver.engine_mut().poll_job() {
            // As `spmbox spm`'s builtin backend: only an extension that
            // allocated changes what the next commit must write.
            let extended = pool.extend(job.volume, job.target_size, job.urgent);
            match extended {
                Ok(Extend::Extended { .. }) => dirty = true,
                Err(PoolError::SegmentsFull) => warn!(
                    "firmware: volume {} cannot grow: its map holds the most segments the pool keeps; the host is answered segments_full",
                    Id(job.volume)
                ),
                _ => {}
            }
            let size = pool.volume(job.volume).map_or(0, |v| v.size);
            let result = JobResult::from_pool(extended, size);
            summary.jobs += 1;
            driver
                .engine_mut()
                .handle_job_result(clock.now(), job.volume, result);
        }
        // The commit: the driver reads the SPM header back first; the
        // metadata is on disk before `handle_committed` lets the batch's
        // replies out.
        if commit_owed {
            driver.engine_mut().request_commit();
        }
        if !retrying {
            match driver.poll_commit(clock.now()) {
                Err(e) => {
                    warn!(
                        "firmware: reading the SPM header before a commit failed: {}; retrying",
                        e
                    );
                    retry_at = now + RETRY_INTERVAL;
                }
                Ok(None) => {}
                Ok(Some(_)) => {
                    let next = if dirty || commit_owed { seq + 1 } else { seq };
                    let done = if next == seq {
                        Ok(())
                    } else {
                        commit(driver.device_mut(), &geometry, pool, next, copy_a)
                    };
                    match done {
                        Ok(()) => {
                            if next != seq {
                                summary.commits += 1;
                            }
                            seq = next;
                            dirty = false;
                            commit_owed = false;
                            driver.engine_mut().handle_committed(clock.now(), seq);
                        }
                        Err(e) => {
                            warn!(
                                "firmware: committing the pool metadata failed: {}; retrying",
                                e
                            );
                            retry_at = now + RETRY_INTERVAL;
                            driver.engine_mut().handle_commit_failed(clock.now());
                        }
                    }
                }
            }
        }
        if driver.engine().is_deposed() {
            break;
        }
        // Requests their hosts withdrew leave the parked list before any
        // capacity can serve them.
        if driver.engine().withdrawn() != withdrawn {
            withdrawn = driver.engine().withdrawn();
            let engine = driver.engine();
            pool.withdraw_parked(|volume| engine.waiting(volume));
        }
        // Completions only of a pool that is on disk.
        if !driver.engine().commit_pending() && !commit_owed {
            while let Some(c) = pool.poll_completed() {
                info!(
                    "firmware: parked request of {} completed at {=u64}",
                    Id(c.volume),
                    c.size
                );
                driver
                    .engine_mut()
                    .handle_capacity(clock.now(), c.volume, c.size);
            }
        }
        // Writes.
        if !retrying && let Err(e) = driver.write() {
            warn!("firmware: writing replies failed: {}; retrying", e);
            retry_at = now + RETRY_INTERVAL;
        }
        // Events.
        while let Some(event) = driver.engine_mut().poll_event() {
            match event {
                SpmEvent::Answered { .. } => summary.replies += 1,
                SpmEvent::FullScan => {}
                other => info!("firmware: {}", other),
            }
        }
        if driver.engine().is_deposed() {
            break;
        }
        // The command file.
        let now = clock.now();
        if now >= next_command && !driver.engine().commit_pending() {
            next_command = now + COMMAND_INTERVAL;
            let cmd = if core::mem::take(&mut first_look) {
                command::leftover(&paths).or_else(|| command::take(&paths))
            } else {
                command::take(&paths)
            };
            if let Some(cmd) = cmd {
                let reply = match cmd {
                    Command::Stop => {
                        stop = true;
                        command::Reply::ok(format_args!("stopping"))
                    }
                    Command::AddLun { lun, extents } => {
                        let r = add_lun(
                            pool,
                            driver,
                            &geometry,
                            &mut seq,
                            copy_a,
                            &mut commit_owed,
                            lun,
                            extents,
                        );
                        if r.is_ok() {
                            summary.luns_added += 1;
                        }
                        r
                    }
                    Command::StaleStop => command::Reply::error(format_args!(
                        "a `stop` taken by an earlier run of the firmware was dropped"
                    )),
                    Command::Unknown => command::Reply::error(format_args!(
                        "unknown command: the firmware takes `add-lun <lun-uuid> <extents>` or `stop`"
                    )),
                };
                command::answer(&paths, &reply);
            }
        }
        if stop {
            break;
        }
        let next = driver.engine().poll_timeout();
        let next = if retrying { Some(retry_at) } else { next };
        clock.sleep_until(next.map(|t| t.min(next_command)), MAX_SLEEP_MS);
    }
    let stats = driver.engine().stats();
    info!(
        "firmware: stopping: {} engine {} disk {}",
        summary,
        stats,
        driver.stats()
    );
    if driver.engine().is_deposed() {
        error!("firmware: another SPM took over the domain; this one stood down without writing");
        return Err(());
    }
    match driver.stop(clock.now()) {
        Ok(true) => {
            info!("firmware: SPM stopped; the SPM header is vacant");
            Ok(())
        }
        Ok(false) => {
            error!("firmware: another SPM took over the domain; this one stood down");
            Err(())
        }
        Err(e) => {
            error!(
                "firmware: stopping failed: {}; the next SPM takes over once the heartbeat stops",
                e
            );
            Err(())
        }
    }
}

/// What the engine starts from.
struct Start {
    now: Instant,
    domain: spmbox_core::wire::Uuid,
    geometry: Geometry,
    spm_id: HostId,
    owner: u64,
    found: Option<SpmHeader>,
    config: SpmConfig,
}

/// Builds the engine and its driver straight into their static (the
/// engine is 31 KB, the driver 41 KB: built in `run`'s frame and moved,
/// they would stay on the stack for as long as the SPM runs).
#[inline(never)]
fn start_driver(s: Start, disk: Disk) -> Option<&'static mut Driver> {
    let buffer: &'static mut [u8] = DRIVER_BUF.take();
    DRIVER
        .init_with(|| {
            let engine = Spm::<QUEUE>::new(
                s.now,
                s.domain,
                s.geometry,
                s.spm_id,
                s.owner,
                s.found.as_ref(),
                s.config,
            )
            .map_err(|e| error!("firmware: cannot start the SPM engine: {}", e))
            .ok()?;
            SpmDriver::new(disk, engine, buffer, CHUNK_HOSTS, false)
                .map_err(|e| error!("firmware: cannot start the driver: {}", e))
                .ok()
        })
        .as_mut()
}

/// A UUID in its usual text form in the log.
struct Id(spmbox_core::wire::Uuid);

impl defmt::Format for Id {
    fn format(&self, f: defmt::Formatter<'_>) {
        for (i, b) in self.0.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                defmt::write!(f, "-");
            }
            defmt::write!(f, "{=u8:02x}", *b);
        }
    }
}

/// `DefaultPool::new` fails only for an invalid extent size, and
/// `DEFAULT_EXTENT_SIZE` is valid.
fn unreachable_pool() -> DefaultPool {
    error!("firmware: the reference pool refused its default extent size");
    exit(1)
}

/// The domain file and the command files beside it.
pub struct Paths {
    domain: disk::Path,
    command: disk::Path,
    taken: disk::Path,
    reply: disk::Path,
    reply_tmp: disk::Path,
}

impl Paths {
    fn of(domain: &[u8]) -> Option<Paths> {
        Some(Paths {
            domain: disk::path(domain, b"")?,
            command: disk::path(domain, command::COMMAND_SUFFIX)?,
            taken: disk::path(domain, command::TAKEN_SUFFIX)?,
            reply: disk::path(domain, command::REPLY_SUFFIX)?,
            reply_tmp: disk::path(domain, command::REPLY_TMP_SUFFIX)?,
        })
    }
}

/// Reads the semihosting command line into `buf`.
fn cmdline(buf: &mut [u8; CMDLINE_MAX]) -> &[u8] {
    let mut raw = [core::mem::MaybeUninit::<u8>::uninit(); CMDLINE_MAX];
    let n = match semihosting::sys::arm_compat::sys_get_cmdline_uninit(&mut raw) {
        Ok(line) => {
            let n = line.len().min(CMDLINE_MAX);
            buf[..n].copy_from_slice(&line[..n]);
            n
        }
        Err(_) => 0,
    };
    &buf[..n]
}

/// A nonzero number for this instance of the SPM: 8 bytes of the host's
/// `/dev/urandom` (an array takes its TRNG), else the clock.
fn random_owner(clock: &mut Clock) -> u64 {
    let mut b = [0u8; 8];
    let n = disk::read_small(c"/dev/urandom", &mut b).unwrap_or(0);
    let v = if n == 8 {
        u64::from_le_bytes(b)
    } else {
        clock.now().as_micros() ^ 0x5350_4d62_6f78_0001
    };
    v.max(1)
}

/// Waits 2.5 heartbeats when the SPM header says an SPM is active: if its
/// heartbeat moves, that SPM lives and the firmware refuses to start.
fn live_check(
    disk: &mut Disk,
    clock: &mut Clock,
    geometry: &Geometry,
    sector: &mut [u8; 4096],
) -> Result<Option<SpmHeader>, ()> {
    let len = geometry.sector_size() as usize;
    let mut read = |disk: &mut Disk| -> Result<Option<SpmHeader>, ()> {
        disk.read_at(SPM_HEADER_OFFSET, &mut sector[..len])
            .map_err(|e| error!("firmware: cannot read the SPM header: {}", e))?;
        Ok(SpmHeader::decode(&sector[..RECORD_LEN]).ok().flatten())
    };
    let first = read(disk)?;
    let Some(h) = first.filter(|h| h.state == SpmState::Active) else {
        return Ok(first);
    };
    let wait_ms = (u64::from(h.heartbeat_interval_ms.max(1)) * 5 / 2).min(10_000);
    warn!(
        "firmware: the SPM header says SPM {=u16} (epoch {=u64}) is active; watching its heartbeat for {=u64} ms",
        h.spm_id.get(),
        h.epoch.get(),
        wait_ms
    );
    let deadline = clock.now().as_micros() + wait_ms * 1000;
    while clock.now().as_micros() < deadline {
        clock.sleep_until(None, 50);
        let now = read(disk)?;
        if now != first {
            error!(
                "firmware: another SPM is running (its heartbeat moves); only one SPM may serve a domain: stop it first"
            );
            return Err(());
        }
    }
    warn!("firmware: that SPM is gone; taking over");
    Ok(first)
}

/// The header to start from, its epoch raised to the newest epoch in any
/// outbox header or reply (a predecessor's header write may have been
/// lost after it replied), as every runner does it (the core's
/// `newest_outbox_epoch` and `start_header`).
fn with_highest_epoch(
    disk: &mut Disk,
    geometry: &Geometry,
    found: Option<SpmHeader>,
    domain: spmbox_core::wire::Uuid,
) -> Result<Option<SpmHeader>, ()> {
    let mut area = [0u8; AREA_SIZE];
    let newest = spmbox_core::driver::newest_outbox_epoch(disk, geometry, domain, &mut area)
        .map_err(|e| error!("firmware: cannot read the outbox areas: {}", e))?;
    Ok(spmbox_core::spm::start_header(
        found,
        newest.unwrap_or(Epoch::ZERO),
        domain,
    ))
}

/// Writes the pool as commit `seq` to its copy and makes it durable.
fn commit(
    disk: &mut Disk,
    geometry: &Geometry,
    pool: &DefaultPool,
    seq: u64,
    buf: &mut [u8; METADATA_COPY_SIZE],
) -> Result<(), DiskError> {
    let used = match pool.encode(seq, buf) {
        Ok(n) => n,
        Err(e) => {
            // A bug (an invariant broken): nothing is written.
            error!("firmware: cannot encode the pool metadata: {}", e);
            return Err(DiskError::Host(0));
        }
    };
    let (offset, len) = pool::commit_place(geometry, seq, used);
    // `commit_place` never names more than METADATA_COPY_SIZE bytes.
    let bytes = buf.get(..len).ok_or(DiskError::Offset)?;
    disk.write_at(offset, bytes)?;
    disk.flush()
}

/// Adds a LUN to the pool and commits it; parked requests it serves come
/// out as completions once the commit is on disk.
#[allow(clippy::too_many_arguments)]
fn add_lun(
    pool: &mut DefaultPool,
    driver: &mut Driver,
    geometry: &Geometry,
    seq: &mut u64,
    buf: &mut [u8; METADATA_COPY_SIZE],
    commit_owed: &mut bool,
    lun: spmbox_core::wire::Uuid,
    extents: u32,
) -> command::Reply {
    if pool.luns().iter().any(|l| l.id == lun) {
        return command::Reply::ok(format_args!("LUN {} is in the pool already", lun));
    }
    if let Err(e) = pool.add_lun(lun, extents) {
        return command::Reply::error(format_args!("cannot add LUN {}: {}", lun, e));
    }
    let next = *seq + 1;
    match commit(driver.device_mut(), geometry, pool, next, buf) {
        Ok(()) => {
            *seq = next;
            driver.engine_mut().set_pool_commit(next);
            info!(
                "firmware: LUN {} of {=u32} extents added (commit {=u64})",
                Id(lun),
                extents,
                next
            );
            command::Reply::ok(format_args!(
                "LUN {} ({} extents) added by the firmware SPM",
                lun, extents
            ))
        }
        Err(e) => {
            *commit_owed = true;
            warn!(
                "firmware: the commit of LUN {} failed: {}; retrying",
                lun, e
            );
            command::Reply::error(format_args!(
                "LUN {} is in the pool in memory but its commit failed ({:?}); the firmware retries \
                 the commit and serves nothing from the LUN before it is on disk",
                lun, e
            ))
        }
    }
}
