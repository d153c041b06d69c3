//! `spmbox spm`: the SPM engine against the shared device.
//!
//! One loop does everything, in this order each turn: the reads the engine
//! asks for (doorbell, SPM header, host areas); the extension jobs, run on
//! the backend and committed together (one metadata commit per batch, made
//! before any reply about it); completions of parked requests; the writes
//! (replies and the SPM header, each written as the whole sector that holds
//! it, read-modify-write: the SPM is the only writer of those sectors);
//! admin requests from the control socket; then sleep until the engine's
//! next deadline.
//!
//! Start-up refuses to run beside another SPM: an exclusive lock on the
//! domain device stops a second SPM on this machine, and an SPM header
//! that says *active* is watched for a few heartbeats; if it moves, an SPM
//! runs elsewhere and this one refuses. A header whose heartbeat has
//! stopped (a crashed SPM) is taken over with the next epoch. Before every
//! metadata commit the SPM header is read back, so an SPM that was stalled
//! while another took over stands down without committing.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmEvent, SpmIo};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    DOORBELL_OFFSET, RECORD_LEN, SPM_HEADER_OFFSET, SpmHeader, SpmState, Uuid,
};

use crate::backend::{BackendError, SpmBackend};
use crate::device::Access;
use crate::mailbox::Mailbox;
use crate::spm_io::SpmDisk;
use crate::units::Bytes;

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
/// 20 ms keeps within [`BUSY_SCAN_READ_RATE`] and a whole extension
/// within 50 ms even when rings collide.
pub const BUSY_SCAN_FLOOR: Duration = Duration::from_millis(20);

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
}

/// A clock for the engines: microseconds since the daemon started.
#[derive(Clone, Copy, Debug)]
pub struct Clock(std::time::Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock(std::time::Instant::now())
    }

    /// Now, for the engines.
    pub fn now(&self) -> Instant {
        Instant(u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// How long until `at`.
    pub fn until(&self, at: Instant) -> Duration {
        Duration::from_micros(at.0.saturating_sub(self.now().0))
    }
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
        .map_err(|e| BackendError::new(format!("cannot open {}: {e}", path.display())))?;
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
                    "another SPM (or an admin command) on this machine has held {} for {:?}; \
                     stop it first (`spmbox status` shows the running SPM)",
                    path.display(),
                    LOCK_PATIENCE
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
    let buf = mailbox
        .read(SPM_HEADER_OFFSET, sector)
        .map_err(|e| BackendError::new(e.to_string()))?;
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
        "the SPM header says SPM {} (epoch {}) is active; watching its heartbeat for {:?} before taking over",
        h.spm_id,
        h.epoch,
        wait
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

/// The SPM header to start from, its epoch raised to the highest epoch in
/// any outbox header: a predecessor's header write may have been lost, and
/// hosts ignore replies from an epoch older than one they have seen.
fn with_highest_epoch(
    mailbox: &Mailbox,
    found: Option<SpmHeader>,
) -> Result<Option<SpmHeader>, BackendError> {
    let g = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let outboxes = mailbox
        .read(
            g.outbox_offset(),
            usize::from(g.max_hosts()) * spmbox_core::wire::AREA_SIZE,
        )
        .map_err(|e| BackendError::new(e.to_string()))?;
    let highest = spmbox_core::wire::areas::<spmbox_core::wire::Reply>(&outboxes, domain, 1)
        .filter_map(|area| area.header().ok().flatten())
        .map(|h| h.epoch)
        .max()
        .unwrap_or(0);
    Ok(match found {
        Some(mut h) => {
            h.epoch = h.epoch.max(highest);
            Some(h)
        }
        None if highest > 0 => Some(SpmHeader {
            domain,
            epoch: highest,
            spm_id: 0,
            state: SpmState::Vacant,
            heartbeat_interval_ms: 1000,
            heartbeat: 0,
        }),
        None => None,
    })
}

/// The default control socket of a domain.
pub fn default_control(domain: Uuid) -> PathBuf {
    run_dir().join(format!("spm-{domain}.sock"))
}

/// Where daemons keep sockets and status files: `$SPMBOX_RUN_DIR`, else
/// `/run/spmbox` for root, else `$XDG_RUNTIME_DIR/spmbox`, else
/// `/tmp/spmbox-<uid>`.
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPMBOX_RUN_DIR") {
        return PathBuf::from(dir);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/spmbox");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("spmbox");
    }
    PathBuf::from(format!("/tmp/spmbox-{}", uid.as_raw()))
}

/// Sends one admin request to the SPM's control socket. `Ok(None)` if no
/// SPM listens there.
pub fn control_request(control: &Path, request: &Value) -> Result<Option<Value>, BackendError> {
    let mut stream = match UnixStream::connect(control) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(BackendError::new(format!(
                "cannot reach the SPM at {}: {e}",
                control.display()
            )));
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| BackendError::new(e.to_string()))?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| BackendError::new(format!("cannot talk to the SPM: {e}")))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| BackendError::new(format!("no answer from the SPM: {e}")))?;
    let value: Value = serde_json::from_str(&answer)
        .map_err(|e| BackendError::new(format!("the SPM answered nonsense ({e}): {answer}")))?;
    if value["ok"] == json!(true) {
        Ok(Some(value))
    } else {
        Err(BackendError::new(
            value["error"]
                .as_str()
                .unwrap_or("the SPM refused")
                .to_string(),
        ))
    }
}

/// Runs admin request `request` against `backend`.
pub fn admin(backend: &mut dyn SpmBackend, request: &Value) -> Value {
    let result = (|| -> Result<Value, BackendError> {
        match request["op"].as_str() {
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
    pub disk: crate::spm_io::DiskStats,
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
    let mailbox = Mailbox::open(&options.device, Access::ReadWrite)
        .map_err(|e| BackendError::new(e.to_string()))?;
    // Checked first, so that a bad address changes nothing.
    let exporter = options
        .metrics
        .as_deref()
        .map(crate::metrics::Exporter::serve)
        .transpose()?;
    let _lock = lock_domain(&options.device, || {
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
    let found = crate::sanlock::raise_epoch(found, options.lease_version, domain);
    let mut backend = open_backend()?;
    let backend = backend.as_mut();
    let clock = Clock::start();
    // Scans brought forward by colliding rings read at most
    // BUSY_SCAN_READ_RATE on average: every 20 ms (the floor) at 250
    // hosts, every 122 ms at 2000.
    let mut config = options.config;
    let scan_bytes = 2 * u64::from(geometry.max_hosts()) * spmbox_core::wire::AREA_SIZE as u64;
    if !config.busy_scan_interval.is_zero() {
        config.busy_scan_interval = config.busy_scan_interval.max(Duration::from_secs_f64(
            scan_bytes as f64 / BUSY_SCAN_READ_RATE as f64,
        ));
    }
    let mut engine: Box<Spm<QUEUE>> = Box::new(
        Spm::new(
            clock.now(),
            domain,
            geometry,
            options.spm_id,
            found.as_ref(),
            config,
        )
        .map_err(|e| BackendError::new(e.to_string()))?,
    );
    if let Some(dir) = options.control.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackendError::new(format!("cannot create {}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_file(&options.control);
    let listener = UnixListener::bind(&options.control).map_err(|e| {
        BackendError::new(format!(
            "cannot listen on {}: {e}; pass --control PATH",
            options.control.display()
        ))
    })?;
    let _remove_socket = RemoveOnDrop(options.control.clone());
    let (control_tx, control_rx) = std::sync::mpsc::channel::<ControlMsg>();
    let _control = ControlServer::start(listener, options.control.clone(), control_tx)?;
    tracing::info!(
        "SPM of domain {} started: epoch {}, {} hosts, doorbell every {:?}, full scan every {:?}, control socket {}",
        domain,
        engine.epoch(),
        geometry.max_hosts(),
        options.config.doorbell_interval,
        options.config.full_scan_interval,
        options.control.display()
    );
    let mut disk = SpmDisk::new(&mailbox);
    let mut summary = SpmSummary::default();
    let mut writes = Vec::new();
    let mut next_metrics = std::time::Instant::now();
    let mut job_seconds: Vec<f64> = Vec::new();
    loop {
        if let Some(exporter) = &exporter
            && std::time::Instant::now() >= next_metrics
        {
            next_metrics = std::time::Instant::now() + Duration::from_secs(1);
            exporter.publish(spm_metrics(&engine, backend, &summary, &job_seconds));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = clock.now();
        // Reads.
        while let Some(io) = engine.poll_io(now) {
            match io {
                SpmIo::ReadDoorbell => {
                    engine.handle_doorbell(now, disk.read_record(DOORBELL_OFFSET)?);
                }
                SpmIo::ReadSpmHeader => {
                    engine.handle_spm_header(now, disk.read_record(SPM_HEADER_OFFSET)?);
                }
                SpmIo::ReadHosts { first_host, count } => {
                    let (inbox, outbox) = disk.read_hosts(first_host, count)?;
                    engine.handle_hosts(now, first_host, inbox, outbox);
                }
            }
        }
        // Jobs, committed as one batch before any reply. A batch ends at
        // BATCH jobs or once its extensions took BATCH_EXTEND_BUDGET: the
        // builtin pool extends in microseconds and batches share one
        // commit, while an lvextend takes tens of milliseconds and each is
        // answered as soon as it is done.
        let started = std::time::Instant::now();
        let mut results: Vec<(Uuid, u64, JobResult)> = Vec::new();
        while let Some(job) = engine.poll_job() {
            results.push((
                job.volume,
                job.target_size,
                backend.extend(job.volume, job.target_size, job.urgent),
            ));
            if started.elapsed() >= BATCH_EXTEND_BUDGET {
                break;
            }
        }
        let had_jobs = !results.is_empty();
        if had_jobs {
            let batch = results.len();
            let extended = started.elapsed();
            summary.extend_seconds += extended.as_secs_f64();
            // Still the SPM? A stalled SPM must not commit over a newer one.
            let header = disk.read_record(SPM_HEADER_OFFSET)?;
            if let Ok(Some(h)) = SpmHeader::decode(header)
                && h.state == SpmState::Active
                && (h.epoch > engine.epoch()
                    || (h.epoch == engine.epoch() && h.spm_id != options.spm_id))
            {
                engine.handle_spm_header(now, header);
                break;
            }
            let commit_started = std::time::Instant::now();
            backend.commit()?;
            summary.commits += 1;
            summary.commit_seconds += commit_started.elapsed().as_secs_f64();
            let committed = started.elapsed();
            if exporter.is_some() {
                job_seconds.push(committed.as_secs_f64());
            }
            for (volume, target, result) in results {
                summary.jobs += 1;
                tracing::info!(
                    "job: volume {volume} to {}: {result:?} (extend {:.3} ms, with commit {:.3} ms, batch of {})",
                    Bytes(target),
                    extended.as_secs_f64() * 1e3,
                    committed.as_secs_f64() * 1e3,
                    batch
                );
                engine.handle_job_result(clock.now(), volume, result);
            }
        }
        for (volume, size) in backend.take_completed() {
            tracing::info!(
                "capacity: parked request of volume {volume} completed at {}",
                Bytes(size)
            );
            engine.handle_capacity(clock.now(), volume, size);
        }
        // Writes.
        writes.clear();
        while let Some(w) = engine.poll_write() {
            writes.push(w);
        }
        if !writes.is_empty() {
            disk.write(&writes)?;
        }
        // Events.
        while let Some(event) = engine.poll_event() {
            log_event(&event, &mut summary);
            if matches!(event, SpmEvent::FullScan)
                && let Err(e) = backend.poll_capacity()
            {
                tracing::warn!("looking for new capacity failed: {e}");
            }
        }
        if engine.is_deposed() {
            break;
        }
        // Admin requests; completions of an add-lun come out on the next
        // turn at once.
        while let Ok((request, reply)) = control_rx.try_recv() {
            tracing::info!("control: {request}");
            let _ = reply.send(admin(backend, &request));
        }
        let next = engine.poll_timeout();
        let wait = next.map_or(Duration::from_millis(50), |t| clock.until(t));
        // After a batch, the queue may hold the next one: no wait. An admin
        // request ends the wait at once.
        if !wait.is_zero()
            && !had_jobs
            && let Ok((request, reply)) =
                control_rx.recv_timeout(wait.min(Duration::from_millis(50)))
        {
            tracing::info!("control: {request}");
            let _ = reply.send(admin(backend, &request));
        }
    }
    if engine.is_deposed() {
        tracing::error!("another SPM took over the domain; this one stands down without writing");
        return Err(BackendError::new(
            "another SPM took over the domain (a higher epoch); this SPM stood down",
        ));
    }
    // Graceful stop: the replies still due, then the vacant header.
    writes.clear();
    while let Some(w) = engine.poll_write() {
        writes.push(w);
    }
    if let Some(w) = engine.vacate() {
        writes.push(w);
    }
    disk.write(&writes)?;
    tracing::info!(
        "SPM stopped: {} jobs, {} commits, {} replies",
        summary.jobs,
        summary.commits,
        summary.replies
    );
    summary.engine = engine.stats();
    summary.disk = disk.stats;
    Ok(summary)
}

/// The SPM's metrics page.
fn spm_metrics(
    engine: &Spm<QUEUE>,
    backend: &dyn SpmBackend,
    summary: &SpmSummary,
    job_seconds: &[f64],
) -> crate::metrics::Text {
    let stats = engine.stats();
    let pool = backend.report();
    let mut t = crate::metrics::Text::new();
    t.gauges(
        "spmbox_spm_epoch",
        "The SPM's epoch.",
        &[(String::new(), engine.epoch() as f64)],
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
        &[(String::new(), engine.queue().len() as f64)],
    );
    t.histogram(
        "spmbox_spm_batch_seconds",
        "Time to extend and commit one batch of jobs.",
        &crate::metrics::LATENCY_BUCKETS,
        job_seconds,
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
        "spmbox_pool_parked_requests",
        "Requests waiting for capacity.",
        &[(String::new(), pool.parked.len() as f64)],
    );
    t
}

/// An admin request from the control socket, and where its answer goes.
type ControlMsg = (Value, std::sync::mpsc::Sender<Value>);

/// The control socket's thread: it blocks in `accept`, so the daemon's
/// loop polls nothing for it; requests reach the loop over a channel and
/// wake it from its wait.
struct ControlServer {
    stop: Arc<AtomicBool>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    fn start(
        listener: UnixListener,
        path: PathBuf,
        tx: std::sync::mpsc::Sender<ControlMsg>,
    ) -> Result<ControlServer, BackendError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    match stream {
                        Ok(stream) => serve_control(stream, &tx),
                        Err(e) => tracing::warn!("control socket: {e}"),
                    }
                }
            })
            .map_err(|e| BackendError::new(format!("cannot start the control thread: {e}")))?;
        Ok(ControlServer {
            stop,
            path,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the thread from accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a control client waits for the daemon's loop to answer.
const CONTROL_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn serve_control(stream: UnixStream, tx: &std::sync::mpsc::Sender<ControlMsg>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let answer =
        match serde_json::from_str::<Value>(&line) {
            Ok(request) => {
                let (reply_tx, reply_rx) = std::sync::mpsc::channel();
                if tx.send((request, reply_tx)).is_err() {
                    json!({ "ok": false, "error": "the SPM is stopping" })
                } else {
                    reply_rx.recv_timeout(CONTROL_ANSWER_TIMEOUT).unwrap_or_else(|_| {
                    json!({ "ok": false, "error": "the SPM did not answer within 60 s" })
                })
                }
            }
            Err(e) => json!({ "ok": false, "error": format!("not a JSON request: {e}") }),
        };
    let mut out = answer.to_string();
    out.push('\n');
    let _ = (&stream).write_all(out.as_bytes());
}

fn log_event(event: &SpmEvent, summary: &mut SpmSummary) {
    match event {
        SpmEvent::FullScan => tracing::debug!("full scan"),
        SpmEvent::Defective {
            host_id,
            inbox,
            index,
            defect,
        } => tracing::warn!(
            "host {host_id} {} record {index} is defective ({defect:?}); skipped",
            if *inbox { "inbox" } else { "outbox" }
        ),
        SpmEvent::Refused { host_id, slot, why } => {
            tracing::info!("host {host_id} slot {slot} waits on disk: {why:?}")
        }
        SpmEvent::Answered {
            host_id,
            slot,
            volume,
            status,
            size,
        } => {
            summary.replies += 1;
            tracing::info!(
                "reply: host {host_id} slot {slot} volume {volume}: {status:?} at {}",
                Bytes(*size)
            );
        }
        SpmEvent::Deposed { epoch, spm_id } => {
            tracing::error!("deposed by SPM {spm_id} at epoch {epoch}")
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
