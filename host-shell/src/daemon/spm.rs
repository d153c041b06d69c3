//! `spmbox spm`: the SPM engine against the shared device.
//!
//! One loop does everything, in this order each turn: the reads the engine
//! asks for (doorbell, SPM header, host areas); the extension jobs, run on
//! the backend and committed together (one metadata commit per batch, made
//! before any reply about it); completions of parked requests; the writes
//! (replies and the SPM header, each written as the whole sector that holds
//! it, read-modify-write: the SPM is the only writer of those sectors);
//! admin requests from the control socket; then sleep until the engine's
//! next deadline. At start and after every commit, admin request and full
//! scan the pool's usage is held against the `--pool-warn` thresholds
//! ([`crate::daemon::pool_usage`]).
//!
//! Start-up refuses to run beside another SPM: an exclusive lock on the
//! domain device stops a second SPM on this machine, and an SPM header
//! that says *active* is watched for a few heartbeats; if it moves, an SPM
//! runs elsewhere and this one refuses. A header whose heartbeat has
//! stopped (a crashed SPM) is taken over with the next epoch. Before every
//! metadata commit the SPM header is read back, so an SPM that was stalled
//! while another took over stands down without committing.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use spmbox_core::driver::SpmDriver;
use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmEvent};
use spmbox_core::wire::{
    Epoch, HostId, RECORD_LEN, ReplyStatus, SPM_HEADER_OFFSET, SpmHeader, SpmState, Uuid,
};

use crate::backend::{BackendError, SpmBackend};
use crate::daemon::control::{ControlMsg, ControlServer, control_request, private_dir};
use crate::daemon::pool_usage::{Crossing, PoolWarn, UsageWatch, percent_text};
use crate::daemon::remove_lun::Removal;
use crate::daemon::{Clock, Retry};
use crate::io::device::{Access, AlignedBuf, Device};
use crate::io::mailbox::Mailbox;
use crate::units::{Bytes, Elapsed};

/// The SPM's queue window: requests beyond it wait on disk.
pub const QUEUE: usize = 1024;

/// The most jobs the daemon runs per batch (one backend commit covers a
/// batch).
pub const BATCH: usize = 256;

/// A batch takes no more jobs once its extensions have taken this long.
pub const BATCH_EXTEND_BUDGET: Duration = Duration::from_millis(5);

/// The engine's pacing for the daemon: `doorbell_interval` and
/// `full_scan_interval` as given, batches of [`BATCH`] jobs, busy scans
/// from [`BUSY_SCAN_FLOOR`] (raised by [`BUSY_SCAN_READ_RATE`] in
/// [`run`]), the rest the engine's defaults.
pub fn daemon_config(doorbell_interval: Duration, full_scan_interval: Duration) -> SpmConfig {
    SpmConfig {
        doorbell_interval,
        full_scan_interval,
        max_jobs: BATCH,
        busy_scan_interval: BUSY_SCAN_FLOOR,
        ..SpmConfig::default()
    }
}

/// The shortest time between full scans brought forward by colliding
/// rings. A lost ring waits for such a scan unless its host's ring again
/// gets through first; at 250 hosts a full scan reads about 1 MiB, so
/// 8 ms keeps within [`BUSY_SCAN_READ_RATE`] (which alone would allow
/// 7.6 ms). At 20 ms, bursts of rings that came every 20 ms (the bench's
/// 250-host burst rounds) each waited for the allowance: p99 19 to 24 ms,
/// against 11.6 to 14 ms at 8 ms (docs/performance.md). Smaller mailboxes,
/// whose scans are cheaper still, keep this floor.
pub const BUSY_SCAN_FLOOR: Duration = Duration::from_millis(8);

/// The most bytes per second that full scans brought forward by colliding
/// doorbell rings may read on average.
pub const BUSY_SCAN_READ_RATE: u64 = 128 << 20;

/// What `spmbox spm` is asked to do.
#[derive(Debug, Clone)]
pub struct SpmOptions {
    /// The domain device.
    pub device: PathBuf,
    /// The engine's pacing.
    pub config: SpmConfig,
    /// The SPM's host id (0: not one of the hosts).
    pub spm_id: u16,
    /// The control socket.
    pub control: PathBuf,
    /// Serve Prometheus metrics on this loopback address.
    pub metrics: Option<String>,
    /// The version of the SPM lease this SPM holds (sanlock); 0 without
    /// one. The epoch is at least this.
    pub lease_version: u64,
    /// Start on pool metadata older than what SPMs already answered
    /// ([`check_no_rollback`] says what it found, as warnings).
    pub accept_metadata_rollback: bool,
    /// Warn when pool usage reaches these thresholds.
    pub pool_warn: PoolWarn,
    /// Discard reclaimed extents; the LUN search path (builtin pool).
    pub discard: Option<Vec<PathBuf>>,
    /// Where the builtin pool's LUNs are, besides the domain device's
    /// directory (for `pool remove-lun`'s copies).
    pub lun_search: Vec<PathBuf>,
}

/// How long the SPM and admin commands wait for the domain lock while
/// someone else holds it: an admin command holds it for milliseconds, an
/// SPM that is starting until its control socket listens.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(10);

/// Takes an exclusive lock on the domain device; the lock lasts as long as
/// the returned file. While another process holds it, `busy` is called
/// every 50 ms (an error from it ends the wait) for up to
/// [`LOCK_PATIENCE`].
pub fn lock_domain(
    path: &Path,
    mut busy: impl FnMut() -> Result<(), BackendError>,
) -> Result<std::fs::File, BackendError> {
    let file = std::fs::File::open(path)
        .map_err(|e| BackendError::io(format!("cannot open {}", path.display()), e))?;
    let started = std::time::Instant::now();
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if started.elapsed() < LOCK_PATIENCE => {
                busy()?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(BackendError::new(format!(
                    "another SPM (or an admin command) on this machine has held {} for {}; \
                     stop it first (`spmbox status` shows the running SPM)",
                    path.display(),
                    Elapsed(LOCK_PATIENCE)
                )));
            }
            Err(e) => {
                return Err(BackendError::new(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

/// Reads the SPM header.
pub fn read_spm_header(mailbox: &Mailbox) -> Result<Option<SpmHeader>, BackendError> {
    let sector = mailbox.geometry().sector_size() as usize;
    let buf = mailbox.read(SPM_HEADER_OFFSET, sector)?;
    Ok(SpmHeader::decode(&buf[..RECORD_LEN]).ok().flatten())
}

/// Waits a few heartbeats to see whether the SPM the header names is
/// alive. Returns the header to take over from, or an error if it lives.
pub fn check_no_live_spm(
    mailbox: &Mailbox,
    stop: &AtomicBool,
) -> Result<Option<SpmHeader>, BackendError> {
    let first = read_spm_header(mailbox)?;
    let Some(h) = first.filter(|h| h.state == SpmState::Active) else {
        return Ok(first);
    };
    let interval = Duration::from_millis(u64::from(h.heartbeat_interval_ms.max(1)));
    let wait = (interval * 5 / 2).min(Duration::from_secs(10));
    tracing::warn!(
        "the SPM header says SPM {} (epoch {}) is active; watching its heartbeat for {} before taking over",
        h.spm_id,
        h.epoch,
        Elapsed(wait)
    );
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return Err(BackendError::new("stopped before start-up finished"));
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = read_spm_header(mailbox)?;
        if now != first {
            let now = now.unwrap_or(h);
            return Err(BackendError::new(format!(
                "another SPM is running: SPM {} at epoch {} (heartbeat {} -> {}); \
                 only one SPM may serve a domain: stop that one first",
                now.spm_id, now.epoch, h.heartbeat, now.heartbeat
            )));
        }
    }
    tracing::warn!(
        "the heartbeat of epoch {} did not move: that SPM is gone; taking over",
        h.epoch
    );
    Ok(first)
}

/// The SPM header to start from, its epoch raised to the newest epoch in
/// any outbox area (a header or a reply): a predecessor's header write may
/// have been lost, and hosts ignore replies from an epoch older than one
/// they have seen.
fn with_highest_epoch(
    mailbox: &Mailbox,
    found: Option<SpmHeader>,
) -> Result<Option<SpmHeader>, BackendError> {
    let geometry = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let device = mailbox.device();
    // 64 areas per read: 256 KiB.
    let mut buffer = AlignedBuf::zeroed(64 * spmbox_core::wire::AREA_SIZE, device.dio_mem_align());
    let newest =
        spmbox_core::driver::newest_outbox_epoch(&mut &*device, &geometry, domain, buffer.as_mut())
            .map_err(|e| {
                BackendError::new(format!("cannot read the outbox areas at start: {e}"))
            })?;
    Ok(spmbox_core::spm::start_header(
        found,
        newest.unwrap_or(Epoch::ZERO),
        domain,
    ))
}

/// The most rollback findings one error lists; the rest are counted.
const ROLLBACK_FINDINGS: usize = 8;

/// Refuses to run on a pool older than what SPMs already answered: the
/// newest valid metadata commit below the one the SPM header says was made
/// durable (the newest copy was damaged, or its write was lost), or an
/// *extended* reply in any outbox slot (valid or stale) that names a
/// volume the pool lacks or a size above the pool's. Such a pool would
/// hand out again extents that volumes hold and have written. With
/// `accept`, the findings are warnings.
pub fn check_no_rollback(
    mailbox: &Mailbox,
    backend: &dyn SpmBackend,
    found: Option<&SpmHeader>,
    accept: bool,
) -> Result<(), BackendError> {
    let committed = backend.committed_sequence();
    let mut findings = Vec::new();
    if let Some(h) = found.filter(|h| h.pool_commit > committed) {
        findings.push(format!(
            "the SPM header says pool metadata commit {} was made durable, but the newest valid \
             copy is commit {committed}",
            h.pool_commit
        ));
    }
    let sizes: std::collections::HashMap<Uuid, u64> = backend
        .report()
        .volumes
        .iter()
        .map(|v| (v.id, v.size))
        .collect();
    let g = mailbox.geometry();
    let outboxes = mailbox.read(
        g.outbox_offset(),
        usize::from(g.max_hosts()) * spmbox_core::wire::AREA_SIZE,
    )?;
    let domain = mailbox.superblock().domain;
    let mut more = 0usize;
    for area in
        spmbox_core::wire::areas::<spmbox_core::wire::Reply>(&outboxes, domain, HostId::new(1))
    {
        for (slot, state) in area.slots() {
            let (spmbox_core::wire::SlotState::Valid(r) | spmbox_core::wire::SlotState::Stale(r)) =
                state
            else {
                continue;
            };
            if r.status != spmbox_core::wire::ReplyStatus::Extended {
                continue;
            }
            let have = sizes.get(&r.volume).copied();
            if have.is_some_and(|size| size >= r.size) {
                continue;
            }
            if findings.len() >= ROLLBACK_FINDINGS {
                more += 1;
                continue;
            }
            findings.push(format!(
                "host {} slot {slot} was told (epoch {}) that volume {} is {}, but the pool {}",
                r.host_id,
                r.epoch,
                r.volume,
                Bytes(r.size),
                have.map_or("has no such volume".to_string(), |s| format!(
                    "has it at {}",
                    Bytes(s)
                ))
            ));
        }
    }
    if more > 0 {
        findings.push(format!("{more} more such replies"));
    }
    if findings.is_empty() {
        return Ok(());
    }
    let device = mailbox.device().path().display();
    if accept {
        for f in &findings {
            tracing::warn!("--accept-metadata-rollback: {f}");
        }
        tracing::warn!(
            "starting on the older pool metadata of {device} as --accept-metadata-rollback asks: \
             extents given out since may be handed out again"
        );
        return Ok(());
    }
    Err(BackendError::new(format!(
        "the pool metadata on {device} is older than what SPMs already answered: {}. Starting on \
         it would hand out again extents that volumes hold and have written, so nothing was \
         started and nothing changed. `spmbox inspect --device {device}` shows both metadata \
         copies. Restore the domain device from a backup if you can; otherwise, knowing that \
         data written since into those extents may be overwritten, start the SPM with \
         --accept-metadata-rollback (docs/operations.md, \"Damaged or rolled-back pool \
         metadata\")",
        findings.join("; ")
    )))
}

/// The live hosts that hold a volume open, as far as the caller can tell:
/// [`admin`] refuses to delete or reduce a volume any of them holds.
pub type LiveHolders<'a> = &'a mut dyn FnMut(Uuid) -> Result<Vec<u16>, BackendError>;

/// The volume UUID of an admin request.
fn request_volume(request: &Value, op: &str) -> Result<Uuid, BackendError> {
    request["id"]
        .as_str()
        .and_then(Uuid::parse_str)
        .ok_or_else(|| BackendError::new(format!("{op} needs a volume UUID")))
}

/// Refuses to take extents from `volume` while a live host holds it open:
/// its guest writes through a map that has them.
fn refuse_held(volume: Uuid, what: &str, holders: LiveHolders<'_>) -> Result<(), BackendError> {
    let hosts = holders(volume)?;
    if hosts.is_empty() {
        return Ok(());
    }
    Err(BackendError::new(format!(
        "cannot {what} volume {volume}: {} hold{} it open (a hold record in {} \
         inbox area), and a guest there writes through its map. Stop the VM or the `spmbox \
         host` that uses it, then run this again; a host that died holds nothing once its \
         lease has expired ({} heartbeat intervals). Nothing was changed",
        crate::daemon::release::host_list(&hosts),
        if hosts.len() == 1 { "s" } else { "" },
        if hosts.len() == 1 { "its" } else { "their" },
        crate::daemon::release::LEASE_EXPIRY
    )))
}

/// Empties every reply in the mailbox that says a volume was extended past
/// a size (`(volume, keep)`), durably: done before a volume is deleted
/// (keep 0) or reduced, so that no reply promises what the pool no longer
/// keeps (the rollback check at the next SPM start would take it for a
/// pool rolled back). Returns how many replies it emptied.
pub type Retract<'a> = &'a mut dyn FnMut(Uuid, u64) -> Result<usize, BackendError>;

/// What a delete or reduce of `id` to `keep` bytes (0: delete) would be
/// refused for by the pool, checked before anything is written.
fn precheck(backend: &dyn SpmBackend, id: Uuid, keep: u64, what: &str) -> Result<(), BackendError> {
    let report = backend.report();
    let v = report.volumes.iter().find(|v| v.id == id).ok_or_else(|| {
        BackendError::new(format!(
            "cannot {what} volume {id}: the pool has no such volume (`spmbox volume list` \
             shows them). Nothing was changed"
        ))
    })?;
    if report.parked.iter().any(|(p, _)| *p == id.to_string()) {
        return Err(BackendError::new(format!(
            "cannot {what} volume {id}: a host waits for it to grow (a parked request); stop \
             that host's guest first. Nothing was changed"
        )));
    }
    if keep > v.size {
        return Err(BackendError::new(format!(
            "cannot {what} volume {id} to {}: it has only {} (`spmbox volume list`). Nothing \
             was changed",
            Bytes(keep),
            Bytes(v.size)
        )));
    }
    Ok(())
}

/// Runs admin request `request` against `backend`. `holders` is asked
/// before a volume is deleted or reduced, and `retract` empties the
/// replies that promise more than the pool keeps after it.
pub fn admin(
    backend: &mut dyn SpmBackend,
    request: &Value,
    holders: LiveHolders<'_>,
    retract: Retract<'_>,
) -> Value {
    let result = (|| -> Result<Value, BackendError> {
        match request["op"].as_str() {
            Some("delete_volume") => {
                let id = request_volume(request, "delete_volume")?;
                refuse_held(id, "delete", holders)?;
                precheck(backend, id, 0, "delete")?;
                let retracted = retract(id, 0)?;
                if retracted > 0 {
                    tracing::info!(
                        "{retracted} replies about volume {id} emptied before its delete"
                    );
                }
                let released = backend.delete_volume(id)?;
                Ok(json!({ "released": released, "extent_size": backend.usage().extent_size }))
            }
            Some("reduce_volume") => {
                let id = request_volume(request, "reduce_volume")?;
                let size = request["size"]
                    .as_u64()
                    .ok_or_else(|| BackendError::new("reduce_volume needs size"))?;
                refuse_held(id, "reduce", holders)?;
                if size == 0 || size % 512 != 0 {
                    return Err(BackendError::new(format!(
                        "cannot reduce volume {id} to {size} bytes: give a nonzero multiple of \
                         512. Nothing was changed"
                    )));
                }
                let extent = backend.usage().extent_size.max(1);
                // `margin_extents`: that many extents more than `size`
                // (`volume reduce` without --to), never more than it has.
                let margin = request["margin_extents"].as_u64().unwrap_or(0);
                let size = match margin {
                    0 => size,
                    m => {
                        let has = backend
                            .report()
                            .volumes
                            .iter()
                            .find(|v| v.id == id)
                            .map_or(u64::MAX, |v| v.size);
                        (size.div_ceil(extent) + m).saturating_mul(extent).min(has)
                    }
                };
                let keep = size.div_ceil(extent).max(1) * extent;
                precheck(backend, id, size, "reduce")?;
                let retracted = retract(id, keep)?;
                if retracted > 0 {
                    tracing::info!(
                        "{retracted} replies about volume {id} emptied before its reduce to {}",
                        Bytes(keep)
                    );
                }
                let (volume, released) = backend.reduce_volume(id, size)?;
                Ok(json!({ "volume": volume, "released": released,
                           "extent_size": backend.usage().extent_size }))
            }
            Some("add_lun") => {
                let path = request["path"]
                    .as_str()
                    .ok_or_else(|| BackendError::new("add_lun needs a path"))?;
                let message = backend.add_lun(Path::new(path))?;
                Ok(json!({ "message": message }))
            }
            Some("create_volume") => {
                let id = request["id"]
                    .as_str()
                    .and_then(Uuid::parse_str)
                    .ok_or_else(|| BackendError::new("create_volume needs a volume UUID"))?;
                let virtual_size = request["virtual_size"]
                    .as_u64()
                    .ok_or_else(|| BackendError::new("create_volume needs virtual_size"))?;
                let initial = request["initial_size"].as_u64().unwrap_or(0);
                let v = backend.create_volume(id, virtual_size, initial)?;
                Ok(json!({ "volume": v }))
            }
            Some("status") => Ok(json!({ "pool": backend.report() })),
            other => Err(BackendError::new(format!("unknown request {other:?}"))),
        }
    })();
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

/// Counters the daemon reports when it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpmSummary {
    /// Jobs run on the backend.
    pub jobs: u64,
    /// Metadata commits.
    pub commits: u64,
    /// Time spent in them, seconds.
    pub commit_seconds: f64,
    /// Time the backend spent extending (lvextend for the lvm backend),
    /// seconds, over `jobs` jobs.
    pub extend_seconds: f64,
    /// Replies written.
    pub replies: u64,
    /// The engine's counters.
    pub engine: spmbox_core::spm::SpmStats,
    /// The mailbox reads and writes.
    pub disk: spmbox_core::driver::IoStats,
}

/// Runs the SPM until `stop` is set or another SPM takes over.
///
/// `open_backend` is called only once this SPM holds the domain lock and
/// knows no other SPM is live: a backend loaded earlier could miss a
/// change an admin command committed in between, and commit over it.
pub fn run(
    options: &SpmOptions,
    open_backend: &dyn Fn() -> Result<Box<dyn SpmBackend>, BackendError>,
    stop: Arc<AtomicBool>,
) -> Result<SpmSummary, BackendError> {
    let mailbox = Mailbox::open(&options.device, Access::ReadWrite)?;
    // Every line this daemon logs (the core's too) names the domain, and
    // the epoch once it is chosen.
    let span = tracing::info_span!(
        "spm",
        domain = %mailbox.superblock().domain,
        epoch = tracing::field::Empty
    );
    let _entered = span.enter();
    // Checked first, so that a bad address or run directory changes
    // nothing.
    if let Some(dir) = options
        .control
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        private_dir(dir)?;
    }
    let exporter = options
        .metrics
        .as_deref()
        .map(crate::daemon::metrics::Exporter::serve)
        .transpose()?;
    let mut told = false;
    let _lock = lock_domain(&options.device, || {
        if stop.load(Ordering::Relaxed) {
            return Err(BackendError::new(format!(
                "stopped by a signal while waiting for the domain lock on {}; nothing was written",
                options.device.display()
            )));
        }
        if !told {
            told = true;
            tracing::info!(
                "another process on this machine holds the domain lock on {}; waiting up to {}",
                options.device.display(),
                Elapsed(LOCK_PATIENCE)
            );
        }
        match control_request(&options.control, &serde_json::json!({"op": "status"})) {
            Ok(Some(_)) => Err(BackendError::new(format!(
                "another SPM is running on this machine: its control socket {} answers; \
                 stop it first",
                options.control.display()
            ))),
            _ => Ok(()),
        }
    })?;
    let found = check_no_live_spm(&mailbox, &stop)?;
    let geometry = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let found = with_highest_epoch(&mailbox, found)?;
    let found = crate::daemon::sanlock::raise_epoch(found, options.lease_version, domain);
    let mut backend = open_backend()?;
    let mut found = found;
    check_no_rollback(
        &mailbox,
        backend.as_ref(),
        found.as_ref(),
        options.accept_metadata_rollback,
    )?;
    if let Some(h) = found.as_mut() {
        // The header carries the commit this SPM runs on from now on (an
        // accepted rollback lowers it).
        h.pool_commit = backend.committed_sequence();
        // Releases go on being numbered above the newest the hosts saw.
        backend.note_release_commit(h.release_commit);
    }
    if let Some(search) = &options.discard {
        backend.set_discard(search.clone());
    }
    backend.set_lun_search(options.lun_search.clone());
    if let Some(mover) = backend.lun_mover() {
        let moving = mover.moving();
        if !moving.is_nil() {
            // A removal cut short: no copy goes on, so hosts may open the
            // volume again (its map is the committed one).
            mover.set_moving(Uuid::NIL)?;
            tracing::warn!(
                "the pool named volume {moving} as being moved: a `pool remove-lun` was cut \
                 short. What it moved stays moved; run it again to finish"
            );
        }
    }
    let backend = backend.as_mut();
    let clock = Clock::start();
    // Scans brought forward by colliding rings read at most
    // BUSY_SCAN_READ_RATE on average: every 8 ms (the floor) at 250
    // hosts, every 61 ms at 2000. A scan reads every inbox area, and the
    // outbox areas only of hosts with requests.
    let mut config = options.config;
    let scan_bytes = u64::from(geometry.max_hosts()) * spmbox_core::wire::AREA_SIZE as u64;
    if !config.busy_scan_interval.is_zero() {
        config.busy_scan_interval = config.busy_scan_interval.max(Duration::from_secs_f64(
            scan_bytes as f64 / BUSY_SCAN_READ_RATE as f64,
        ));
    }
    let owner = crate::io::mailbox::random_owner()?;
    let engine = Spm::<QUEUE>::new(
        clock.now(),
        domain,
        geometry,
        HostId::new(options.spm_id),
        owner,
        found.as_ref(),
        config,
    )?;
    // The core's driver does the mailbox I/O: a full scan reads every
    // host in one read, and the outbox areas are mirrored so replies are
    // written without reading first.
    let device = mailbox.device();
    let buffer = AlignedBuf::zeroed(
        SpmDriver::<&Device, AlignedBuf, QUEUE>::buffer_len(&geometry, geometry.max_hosts(), true),
        device.dio_mem_align(),
    );
    let mut driver = Box::new(
        SpmDriver::new(device, engine, buffer, geometry.max_hosts(), true)
            .map_err(|e| BackendError::new(format!("cannot start the SPM's driver: {e}")))?,
    );
    driver
        .engine_mut()
        .set_pool_commit(backend.committed_sequence());
    let _ = std::fs::remove_file(&options.control);
    let listener = UnixListener::bind(&options.control).map_err(|e| {
        BackendError::new(format!(
            "cannot listen on {}: {e}; pass --control PATH",
            options.control.display()
        ))
    })?;
    let _remove_socket = RemoveOnDrop(options.control.clone());
    let (control_tx, control_rx) = std::sync::mpsc::channel::<ControlMsg>();
    let _control = ControlServer::start(listener, control_tx)?;
    span.record("epoch", driver.engine().epoch().get());
    tracing::info!(
        "SPM started: {} hosts, doorbell every {}, full scan every {}, control socket {}",
        geometry.max_hosts(),
        Elapsed(options.config.doorbell_interval),
        Elapsed(options.config.full_scan_interval),
        options.control.display()
    );
    // A pool already past a threshold warns now, once.
    let mut usage = UsageWatch::new(options.pool_warn.clone());
    watch_usage(&mut usage, backend, &options.device);
    let mut notifier = crate::daemon::notify::Notifier::new();
    notifier.ready(&format!(
        "SPM of domain {domain}, epoch {}",
        driver.engine().epoch()
    ));
    let mut parked = ParkedAges::default();
    let mut summary = SpmSummary::default();
    let mut next_metrics = std::time::Instant::now();
    let mut batch_seconds = crate::daemon::metrics::Histogram::new();
    // I/O errors of the domain device are retried (see `Retry`); the
    // driver keeps what failed and does it first at the next attempt: a
    // read, a commit (its batch unanswered until it is durable; no new
    // job starts meanwhile), the records still to be written.
    let mut reads = Retry::new("reading the mailbox");
    let mut commits = Retry::new("committing the pool metadata");
    let mut write_retry = Retry::new("writing replies and the SPM header");
    // The results of the batch waiting for its commit, for the log.
    let mut batch: Option<Batch> = None;
    // An admin request failed part way: the pool in memory may be ahead
    // of the disk until a commit succeeds.
    let mut commit_owed = false;
    let mut withdrawn = driver.engine().withdrawn();
    // Hosts, their holds and acknowledgements, read when needed.
    let mut watch = crate::daemon::release::HostWatch::new(
        (options.lease_version > 0)
            .then(|| crate::daemon::sanlock::Area::of(&options.device, geometry)),
    );
    driver
        .engine_mut()
        .set_release_commit(backend.release_seq());
    // The LUN removal under way, or the last one (for `status`).
    let mut removal: Option<Removal> = None;
    loop {
        notifier.tick();
        if let Some(exporter) = &exporter
            && std::time::Instant::now() >= next_metrics
        {
            next_metrics = std::time::Instant::now() + Duration::from_secs(1);
            exporter.publish(spm_metrics(
                driver.engine(),
                backend,
                &summary,
                &batch_seconds,
                &usage,
            ));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = clock.now();
        // Reads.
        if reads.ready() {
            match driver.read(now) {
                Ok(()) => reads.succeeded(),
                Err(e) if e.is_transient() => reads.failed(&e),
                Err(e) => return Err(fatal_io(e)),
            }
        }
        // Jobs. The engine closes a batch at BATCH jobs; the daemon also
        // stops taking jobs once the batch's extensions took
        // BATCH_EXTEND_BUDGET: the builtin pool extends in microseconds
        // and batches share one commit, while an lvextend takes tens of
        // milliseconds and each is answered as soon as it is done.
        let mut had_jobs = false;
        let started = std::time::Instant::now();
        // While a LUN removal copies a segment, its destination is free in
        // the pool: nothing is allocated until the move is committed.
        let copying = removal.as_ref().is_some_and(Removal::copying);
        while !copying && let Some(job) = driver.engine_mut().poll_job() {
            had_jobs = true;
            let result = backend.extend(job.volume, job.target_size, job.urgent);
            driver
                .engine_mut()
                .handle_job_result(clock.now(), job.volume, result);
            let b = batch.get_or_insert_with(|| Batch {
                results: Vec::new(),
                started,
                extended: Duration::ZERO,
            });
            b.results.push((job.volume, job.target_size, result));
            if started.elapsed() >= BATCH_EXTEND_BUDGET {
                break;
            }
        }
        if had_jobs {
            let took = started.elapsed();
            summary.extend_seconds += took.as_secs_f64();
            if let Some(b) = batch.as_mut() {
                b.extended += took;
            }
        }
        // The commit: the driver reads the SPM header back first (a
        // stalled SPM must not commit over a newer one); no reply of the
        // batch is written before the backend made it durable.
        if commit_owed {
            driver.engine_mut().request_commit();
        }
        if commits.ready() {
            match driver.poll_commit(clock.now()) {
                Err(e) if e.is_transient() => commits.failed(&e),
                Err(e) => return Err(fatal_io(e)),
                Ok(None) => {}
                Ok(Some(_)) => {
                    let commit_started = std::time::Instant::now();
                    match backend.commit() {
                        Err(e) => {
                            commits.failed(&e);
                            driver.engine_mut().handle_commit_failed(clock.now());
                        }
                        Ok(()) => {
                            commits.succeeded();
                            commit_owed = false;
                            driver
                                .engine_mut()
                                .handle_committed(clock.now(), backend.committed_sequence());
                            watch_usage(&mut usage, backend, &options.device);
                            if let Some(batch) = batch.take() {
                                summary.commits += 1;
                                summary.commit_seconds += commit_started.elapsed().as_secs_f64();
                                let committed = batch.started.elapsed();
                                batch_seconds.record(committed.as_secs_f64());
                                let size = batch.results.len();
                                for (volume, target, result) in batch.results {
                                    summary.jobs += 1;
                                    tracing::info!(
                                        %volume,
                                        "job to {}: {} (extend {:.3} ms, with commit {:.3} ms, batch of {})",
                                        Bytes(target),
                                        JobText(result),
                                        batch.extended.as_secs_f64() * 1e3,
                                        committed.as_secs_f64() * 1e3,
                                        size
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        if driver.engine().is_deposed() {
            break;
        }
        // Parked requests their hosts withdrew leave the backend before
        // any capacity (an add-lun below, a full scan's look) can serve
        // them.
        if driver.engine().withdrawn() != withdrawn {
            withdrawn = driver.engine().withdrawn();
            let engine = driver.engine();
            backend.withdraw_parked(&|volume| engine.waiting(volume));
        }
        // Completions only of a pool that is on disk.
        if !driver.engine().commit_pending() && !commit_owed {
            for (volume, size) in backend.take_completed() {
                parked.since.remove(&volume);
                tracing::info!(
                    %volume,
                    "capacity: parked request completed at {}",
                    Bytes(size)
                );
                driver
                    .engine_mut()
                    .handle_capacity(clock.now(), volume, size);
            }
        }
        // Writes: what failed before goes first.
        if write_retry.ready() {
            match driver.write() {
                Ok(()) => write_retry.succeeded(),
                Err(e) if e.is_transient() => write_retry.failed(&e),
                Err(e) => return Err(fatal_io(e)),
            }
        }
        // Events.
        while let Some(event) = driver.engine_mut().poll_event() {
            log_event(&event, &mut summary);
            parked.note(&event);
            if matches!(event, SpmEvent::FullScan) {
                match backend.poll_capacity() {
                    // Capacity added by hand (lvm2's vgextend).
                    Ok(()) => watch_usage(&mut usage, backend, &options.device),
                    Err(e) => tracing::warn!("looking for new capacity failed: {e}"),
                }
            }
        }
        if driver.engine().is_deposed() {
            break;
        }
        // Released extents go back to the pool once every live host has
        // acknowledged their release (it refreshed its maps).
        if let Some(pending) = backend.release_pending()
            && !copying
            && std::time::Instant::now() >= watch.next_check
        {
            match watch.check(&mailbox, pending) {
                Ok(acked) => {
                    let freed = backend.reclaim(acked);
                    if freed > 0 {
                        tracing::info!(
                            "{freed} released extents are free again: every live host \
                             acknowledged release {}",
                            acked.min(pending)
                        );
                        watch_usage(&mut usage, backend, &options.device);
                    }
                }
                Err(e) => tracing::warn!(
                    "reading the hosts' acknowledgements of released extents failed \
                     (retried): {e}"
                ),
            }
        }
        // A LUN removal goes one step further.
        if let Some(r) = removal.as_mut().filter(|r| !r.ended())
            && let Some(mover) = backend.lun_mover()
        {
            let recheck = watch.recheck_wait();
            r.step(mover, recheck, &mut |v| watch.live_holders(&mailbox, v));
            publish_commits(&mut driver, backend);
            if r.ended() {
                watch_usage(&mut usage, backend, &options.device);
            }
        }
        let failing = [&reads, &commits, &write_retry]
            .into_iter()
            .find_map(|r| r.failing());
        // Admin requests; completions of an add-lun come out on the next
        // turn at once.
        while let Ok((request, reply)) = control_rx.try_recv() {
            tracing::info!("control: {request}");
            let answer = serve_admin(
                backend,
                &request,
                failing,
                &mut commit_owed,
                &mut removal,
                &mut |v| watch.live_holders(&mailbox, v),
                &mut |v, keep| retract_replies(&mut driver, domain, v, keep),
            );
            let _ = reply.send(parked.add_ages(&request, answer));
            publish_commits(&mut driver, backend);
            // An added LUN (or a new volume's extents).
            watch_usage(&mut usage, backend, &options.device);
        }
        let next = driver.engine().poll_timeout();
        let wait = [&reads, &commits, &write_retry]
            .into_iter()
            .filter_map(Retry::until_next)
            .fold(
                next.map_or(Duration::from_millis(50), |t| clock.until(t)),
                Duration::min,
            );
        // After a batch, the queue may hold the next one: no wait. An admin
        // request ends the wait at once.
        if !wait.is_zero()
            && !had_jobs
            && !removal.as_ref().is_some_and(|r| r.busy())
            && let Ok((request, reply)) =
                control_rx.recv_timeout(wait.min(Duration::from_millis(50)))
        {
            tracing::info!("control: {request}");
            let answer = serve_admin(
                backend,
                &request,
                failing,
                &mut commit_owed,
                &mut removal,
                &mut |v| watch.live_holders(&mailbox, v),
                &mut |v, keep| retract_replies(&mut driver, domain, v, keep),
            );
            let _ = reply.send(parked.add_ages(&request, answer));
            publish_commits(&mut driver, backend);
            // An added LUN (or a new volume's extents).
            watch_usage(&mut usage, backend, &options.device);
        }
    }
    notifier.stopping();
    summary.engine = driver.engine().stats();
    // The core logs being deposed; the error says what it means.
    if driver.engine().is_deposed() {
        return Err(BackendError::new(
            "another SPM took over the domain (the SPM header names a higher epoch, or this \
             epoch under another owner); this SPM stood down without committing",
        ));
    }
    // Graceful stop: the replies still due, then the vacant header; what
    // is not committed is not answered (the next SPM answers it from the
    // mailbox). During an I/O error streak this is one more attempt.
    if let Some(batch) = &batch {
        tracing::warn!(
            "stopping with {} extensions not committed: they are not answered; \
             the next SPM answers those requests from the mailbox",
            batch.results.len()
        );
    }
    match driver.stop(clock.now()) {
        Ok(true) => {}
        Ok(false) => {
            tracing::error!(
                "another SPM took over the domain; this one stands down without writing"
            );
        }
        Err(e) => {
            return Err(BackendError::new(format!(
                "stopped without writing the last replies and marking the SPM header vacant: \
                 {e}; the next SPM takes over once the heartbeat has not moved for 2.5 \
                 heartbeat intervals, and answers what is left"
            )));
        }
    }
    tracing::info!(
        "SPM stopped: {} jobs, {} commits, {} replies",
        summary.jobs,
        summary.commits,
        summary.replies
    );
    summary.engine = driver.engine().stats();
    summary.disk = driver.stats();
    Ok(summary)
}

/// The SPM header carries the pool's newest durable commit and release
/// from its next write on.
fn publish_commits(driver: &mut SpmDriver<&Device, AlignedBuf, QUEUE>, backend: &dyn SpmBackend) {
    let engine = driver.engine_mut();
    engine.set_pool_commit(backend.committed_sequence());
    engine.set_release_commit(backend.release_seq());
}

/// [`SpmDriver::retract_replies`], written and made durable.
fn retract_replies(
    driver: &mut SpmDriver<&Device, AlignedBuf, QUEUE>,
    domain: Uuid,
    volume: Uuid,
    keep: u64,
) -> Result<usize, BackendError> {
    use spmbox_core::driver::BlockDevice as _;
    let io = |e: crate::io::device::DeviceError| {
        BackendError::new(format!(
            "emptying the replies about volume {volume} failed: {e}; nothing was changed in \
             the pool, run the command again"
        ))
    };
    let n = driver.retract_replies(domain, volume, keep).map_err(io)?;
    if n > 0 {
        driver.write().map_err(io)?;
        driver.device_mut().flush().map_err(io)?;
    }
    Ok(n)
}

/// A batch of jobs run on the backend, waiting for its commit.
struct Batch {
    results: Vec<(Uuid, u64, JobResult)>,
    started: std::time::Instant,
    extended: Duration,
}

/// An error of the domain device that retrying cannot heal.
fn fatal_io(e: crate::io::device::DeviceError) -> BackendError {
    BackendError::new(format!(
        "{e}; this error does not heal by retrying, so the SPM stops"
    ))
}

/// Answers an admin request. While an I/O of the domain device keeps
/// failing, requests that change the pool are refused at once (their
/// commit could not be made), and after a change that failed part way
/// the pool is committed again before anything more is answered.
/// Since when each volume's request has been parked (answered *waiting
/// for space*), for `status`: a request is parked from its first such
/// reply until a final reply or the capacity that completes it.
#[derive(Default)]
struct ParkedAges {
    since: HashMap<Uuid, std::time::Instant>,
}

impl ParkedAges {
    fn note(&mut self, event: &SpmEvent) {
        if let SpmEvent::Answered { volume, status, .. } = event {
            if *status == ReplyStatus::WaitingForSpace {
                self.since
                    .entry(*volume)
                    .or_insert_with(std::time::Instant::now);
            } else {
                self.since.remove(volume);
            }
        }
    }

    /// A status answer with `parked_age_ms`: each parked volume's age.
    fn add_ages(&self, request: &Value, mut answer: Value) -> Value {
        if request["op"] == "status" && answer["ok"] == json!(true) {
            let ages: serde_json::Map<String, Value> = self
                .since
                .iter()
                .map(|(v, t)| (v.to_string(), json!(t.elapsed().as_millis() as u64)))
                .collect();
            answer["parked_age_ms"] = Value::Object(ages);
        }
        answer
    }
}

fn serve_admin(
    backend: &mut dyn SpmBackend,
    request: &Value,
    failing: Option<&str>,
    commit_owed: &mut bool,
    removal: &mut Option<Removal>,
    holders: LiveHolders<'_>,
    retract: Retract<'_>,
) -> Value {
    let changes = request["op"].as_str() != Some("status");
    if changes && let Some(error) = failing {
        return json!({
            "ok": false,
            "error": format!(
                "the domain device is failing: {error}; retrying; \
                 the SPM goes on once it works again, then run this command again"
            ),
        });
    }
    if changes && let Some(r) = removal.as_ref().filter(|r| !r.ended()) {
        return json!({
            "ok": false,
            "error": format!(
                "LUN {} is being removed ({} of {} extents moved); the pool takes no other \
                 change until that ends (`spmbox status` shows how far it is). Nothing was \
                 changed",
                r.lun, r.moved, r.total
            ),
        });
    }
    if request["op"] == "remove_lun" {
        return start_removal(backend, request, removal, holders);
    }
    let mut answer = admin(backend, request, holders, retract);
    if request["op"] == "status"
        && answer["ok"] == json!(true)
        && let Some(r) = removal.as_ref()
    {
        answer["removal"] = r.report();
    }
    if changes && answer["ok"] != json!(true) {
        *commit_owed = true;
    }
    answer
}

/// Starts `pool remove-lun` (request `{"op": "remove_lun", "lun": ...}`);
/// the SPM's loop carries it out step by step.
fn start_removal(
    backend: &mut dyn SpmBackend,
    request: &Value,
    removal: &mut Option<Removal>,
    holders: LiveHolders<'_>,
) -> Value {
    let result = (|| -> Result<Value, BackendError> {
        let lun = request["lun"]
            .as_str()
            .ok_or_else(|| BackendError::new("remove_lun needs a LUN (UUID or path)"))?;
        let luns = backend.report().luns.len();
        let Some(mover) = backend.lun_mover() else {
            return empty_lun_removed(backend, lun);
        };
        let r = Removal::start(mover, lun, luns, holders)?;
        let report = r.report();
        *removal = Some(r);
        Ok(json!({ "removal": report }))
    })();
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": e.to_string() }),
    }
}

/// `pool remove-lun` on a backend that removes only an empty LUN (lvm2):
/// done at once; the answer has the shape of a finished removal.
pub fn empty_lun_removed(backend: &mut dyn SpmBackend, lun: &str) -> Result<Value, BackendError> {
    let message = backend.remove_empty_lun(lun)?;
    tracing::info!("{message}");
    Ok(json!({ "removal": {
        "lun": lun, "state": "done", "total_extents": 0, "moved_extents": 0,
        "moved_segments": 0, "extent_size": backend.usage().extent_size, "seconds": 0.0,
        "message": message,
    }}))
}

/// Logs what the pool's usage now calls for: a warning when it reached a
/// threshold, a line when it is back under one.
fn watch_usage(watch: &mut UsageWatch, backend: &dyn SpmBackend, device: &Path) {
    let u = backend.usage();
    let (used, total) = (u.used_extents(), u.total_extents);
    let Some(crossing) = watch.update(used, total) else {
        return;
    };
    let bytes = |extents: u64| Bytes(extents.saturating_mul(u.extent_size));
    match crossing {
        Crossing::Reached(t) => tracing::warn!(
            "pool usage reached {t} %: {} % used, {} of {}, {} free; guests pause when it runs \
             out: add a LUN (spmbox pool add-lun --device {} --lun PATH)",
            percent_text(used, total),
            bytes(used),
            bytes(total),
            bytes(u.free_extents),
            device.display()
        ),
        Crossing::BackUnder(t) => tracing::info!(
            "pool usage back under {t} %: {} % used, {} of {}, {} free",
            percent_text(used, total),
            bytes(used),
            bytes(total),
            bytes(u.free_extents)
        ),
    }
}

/// The SPM's metrics page.
fn spm_metrics(
    engine: &Spm<QUEUE>,
    backend: &dyn SpmBackend,
    summary: &SpmSummary,
    batch_seconds: &crate::daemon::metrics::Histogram,
    usage: &UsageWatch,
) -> crate::daemon::metrics::Text {
    let stats = engine.stats();
    let pool = backend.report();
    let mut t = crate::daemon::metrics::Text::new();
    t.gauges(
        "spmbox_spm_epoch",
        "The SPM's epoch.",
        &[(String::new(), engine.epoch().get() as f64)],
    );
    t.counter(
        "spmbox_spm_jobs_total",
        "Extension jobs run on the backend.",
        summary.jobs,
    );
    t.counter(
        "spmbox_spm_commits_total",
        "Backend commits (batches of jobs).",
        summary.commits,
    );
    t.counter(
        "spmbox_spm_replies_total",
        "Replies written.",
        stats.replies,
    );
    t.counter(
        "spmbox_spm_full_scans_total",
        "Full scans of every host's areas.",
        stats.full_scans,
    );
    t.counter(
        "spmbox_spm_targeted_reads_total",
        "Reads of the areas a doorbell ring named.",
        stats.targeted_reads,
    );
    t.counter(
        "spmbox_spm_defective_records_total",
        "Defective records seen.",
        stats.defective,
    );
    t.counter(
        "spmbox_spm_queue_refused_total",
        "Requests the full queue left on disk for a later scan.",
        stats.refused,
    );
    t.gauges(
        "spmbox_spm_queue_length",
        "Requests in the SPM's queue.",
        &[(String::new(), engine.queue_len() as f64)],
    );
    t.histogram(
        "spmbox_spm_batch_seconds",
        "Time to extend and commit one batch of jobs.",
        batch_seconds,
    );
    t.gauges(
        "spmbox_pool_extents",
        "Extents of the pool, by state.",
        &[
            ("state=\"free\"".into(), pool.free_extents as f64),
            ("state=\"total\"".into(), pool.total_extents as f64),
        ],
    );
    t.gauges(
        "spmbox_pool_used_ratio",
        "Extents volumes hold, as a fraction of the pool's (0 for a pool of none).",
        &[(
            String::new(),
            if pool.total_extents == 0 {
                0.0
            } else {
                pool.total_extents.saturating_sub(pool.free_extents) as f64
                    / pool.total_extents as f64
            },
        )],
    );
    t.gauges(
        "spmbox_pool_warn_threshold_ratio",
        "The highest --pool-warn threshold usage has reached, as a fraction (0: none).",
        &[(
            String::new(),
            usage.reached().map_or(0.0, |p| f64::from(p) / 100.0),
        )],
    );
    t.gauges(
        "spmbox_pool_parked_requests",
        "Requests waiting for capacity.",
        &[(String::new(), pool.parked.len() as f64)],
    );
    t
}

fn log_event(event: &SpmEvent, summary: &mut SpmSummary) {
    match event {
        SpmEvent::FullScan => tracing::debug!("full scan"),
        // The core logs defective records, a defective doorbell and being
        // deposed.
        SpmEvent::Defective { .. }
        | SpmEvent::DoorbellDefective { .. }
        | SpmEvent::Deposed { .. } => {}
        SpmEvent::Refused { host_id, slot, why } => tracing::info!(
            "host {host_id} slot {slot} waits on disk: {}",
            match why {
                spmbox_core::spm::Refused::Full => "the request queue is full",
                spmbox_core::spm::Refused::HostCap => "the host has its share of the queue",
                _ => "host id or slot out of range",
            }
        ),
        SpmEvent::Answered {
            host_id,
            slot,
            volume,
            status,
            size,
        } => {
            summary.replies += 1;
            tracing::info!(
                %volume,
                "reply to host {host_id} slot {slot}: {} at {}",
                status.name(),
                Bytes(*size)
            );
        }
        // An event of a newer core that this shell does not act on yet.
        _ => tracing::debug!("an SPM engine event this version does not act on"),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the backend did with a job, in words.
struct JobText(spmbox_core::spm::JobResult);

impl std::fmt::Display for JobText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use spmbox_core::spm::JobResult;
        match self.0 {
            JobResult::Extended { size } => write!(f, "extended to {}", Bytes(size)),
            JobResult::NoSpace { size } => write!(f, "no space, parked at {}", Bytes(size)),
            JobResult::UnknownVolume => f.write_str("unknown volume"),
            JobResult::OverLimit { size } => {
                write!(f, "over the volume's limit, stays at {}", Bytes(size))
            }
            JobResult::Malformed => f.write_str("malformed request"),
            JobResult::SegmentsFull { size } => {
                write!(f, "segment table full, stays at {}", Bytes(size))
            }
            JobResult::Failed { code } => write!(f, "failed with error {code}"),
        }
    }
}
