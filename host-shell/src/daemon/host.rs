//! `spmbox host`: one host's engine, its guests, and the volume maps.
//!
//! Each guest is a thread that writes verifiable data (see
//! [`crate::daemon::guest`]) through its volume's current map at a set rate. What
//! the guests have written is the allocation the host engine sees. A guest
//! that reaches the end of its volume blocks (nothing is dropped): the
//! engine marks it paused and asks for an extension; when the reply comes,
//! the host refreshes the volume's map from shared storage, hands the
//! longer map to the guest, and the guest goes on.
//!
//! The main loop does the engine's I/O: it keeps the host's inbox area in
//! memory and writes the whole 4 KiB area whenever a record in it changes
//! (docs/protocol.md 2.5), rings the doorbell by writing its sector, reads
//! the outbox area while replies are awaited, and reads the SPM header
//! every second so that replies from an older epoch are ignored.
//!
//! Every completed extension is logged with its timing, split as VDSM
//! does: `total` (the engine decided to ask, to the map refreshed) is
//! `wait` (until the request is on disk: the host's own queue and write)
//! plus `extend` (request on disk to reply read: the SPM's queue, its
//! extension and commit, and the mailbox round trip) plus `refresh`
//! (reply read to map refreshed).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use spmbox_core::driver::HostDriver;
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::wire::{HostId, InboxHeader, RECORD_LEN, Uuid};

use crate::backend::{BackendError, VolumeMaps};
use crate::daemon::guest::{self, Devices, Guest, GuestError, Pacer, Step};
use crate::daemon::{Clock, IO_RETRY_FIRST, IO_RETRY_MAX, Retry};
use crate::io::device::{Access, AlignedBuf, Device, DeviceError};
use crate::io::mailbox::Mailbox;
use crate::io::mapping::Mapping;
use crate::units::{Bytes, Elapsed};

/// Volumes one host runs at most.
pub const HOST_VOLUMES: usize = 64;

/// What `spmbox host` is asked to do.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The domain device.
    pub device: PathBuf,
    /// This host's id.
    pub host_id: u16,
    /// The volumes whose guests run here.
    pub volumes: Vec<Uuid>,
    /// The engine's knobs.
    pub config: HostConfig,
    /// Each guest's write rate, bytes per second (0: as fast as it can).
    pub rate: u64,
    /// Bytes per guest write.
    pub write_size: u64,
    /// How much each guest writes in all; `None`: its virtual size.
    pub guest_bytes: Option<u64>,
    /// Stop once every guest is done and nothing is in flight.
    pub exit_when_done: bool,
    /// Print one JSON object per event on stdout.
    pub json_events: bool,
    /// Write a status file here every second.
    pub status_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this loopback address.
    pub metrics: Option<String>,
    /// Run a real VM (qemu) on each volume instead of a simulated guest.
    pub vm: Option<crate::vm::VmOptions>,
    /// Keep every extension's latency in [`HostSummary::latencies_ms`]
    /// (for `spmbox bench`, whose runs are bounded); the daemon keeps only
    /// the fixed-size histogram.
    pub keep_latencies: bool,
    /// After how long without any answer to a request the host warns that
    /// no SPM seems to serve the domain (`--no-spm-warning`).
    pub no_spm_warning: Duration,
}

/// What the host did, when it stops.
#[derive(Debug, Default, Clone)]
pub struct HostSummary {
    /// Extensions completed.
    pub extensions: u64,
    /// Guest pauses.
    pub pauses: u64,
    /// Guest resumes.
    pub resumes: u64,
    /// Bytes the guests wrote in this run.
    pub bytes_written: u64,
    /// Every extension's total latency, milliseconds, if
    /// [`HostOptions::keep_latencies`]; else empty.
    pub latencies_ms: Vec<f64>,
    /// Every extension's total latency, seconds, in fixed buckets.
    pub extension_seconds: crate::daemon::metrics::Histogram,
    /// What qemu reported, summed over the VMs (with `--vm`).
    pub vm: crate::vm::VmCounts,
    /// VMs whose guest or image check found a data error.
    pub vm_failures: Vec<String>,
    /// With `--vm`: milliseconds from each `BLOCK_WRITE_THRESHOLD` to the
    /// volume refreshed (and the threshold armed again).
    pub threshold_to_refresh_ms: Vec<f64>,
    /// With `--vm`: when each VM paused on ENOSPC was resumed.
    pub vm_resumed_at: Vec<std::time::Instant>,
    /// With `--vm`: what each guest measured of its own writes, MiB/s.
    pub vm_write_mib_per_s: Vec<f64>,
}

/// A guest's shared state: its map, and a signal when the map grows.
struct GuestSlot {
    map: Mutex<Mapping>,
    grown: Condvar,
    /// Held by the guest thread across each write; set to true, the guest
    /// writes no more. Whoever sets it holds the lock, so no write is in
    /// flight once it is set.
    halted: Mutex<bool>,
}

enum Msg {
    Allocation(Uuid, u64, u64),
    Done(Uuid, u64),
    Failed(Uuid, String),
    /// A guest write keeps failing (`Some`: the error) or works again.
    Stalled(Uuid, Option<String>),
    /// A message from the QMP connection of the volume's VM.
    Vm(Uuid, crate::vm::qmp::QmpMessage),
}

/// Per-volume bookkeeping of the main loop.
struct VolumeRun {
    slot: Arc<GuestSlot>,
    /// When the area holding the volume's request was last written (the
    /// request sent, or resent), on the engine's clock.
    written: Option<spmbox_core::time::Instant>,
    /// When the reply was read.
    reply_seen: Option<spmbox_core::time::Instant>,
    done: bool,
    allocation: u64,
    paused: bool,
    /// The error while the guest's writes keep failing; it waits and
    /// retries, and counts as paused.
    stalled: Option<String>,
    /// The volume's real VM (with `--vm`), instead of a guest thread.
    vm: Option<Box<crate::vm::Vm>>,
    /// When qemu reported the write threshold crossed, until the refresh.
    threshold_at: Option<std::time::Instant>,
}

/// After how long without any answer to a request a host warns that no
/// SPM seems to serve the domain, by default.
pub const NO_SPM_WARNING: Duration = Duration::from_secs(30);

/// Requests sent and not answered at all (not even "waiting for space"),
/// by volume and sequence, since when: a host warns once when the oldest
/// passes [`HostOptions::no_spm_warning`], and says so when answers come again.
struct Unanswered {
    since: HashMap<(Uuid, u64), std::time::Instant>,
    warned: bool,
    after: Duration,
}

impl Unanswered {
    fn check(&mut self, engine: &Host<HOST_VOLUMES>, domain: Uuid) {
        let now = std::time::Instant::now();
        let sent: Vec<(Uuid, u64)> = engine
            .volumes()
            .filter_map(|v| {
                v.request
                    .filter(|f| f.phase == spmbox_core::host::Phase::Sent)
                    .map(|f| (v.id, f.sequence))
            })
            .collect();
        self.since.retain(|k, _| sent.contains(k));
        for k in sent {
            self.since.entry(k).or_insert(now);
        }
        let oldest = self.since.values().min().map(|t| now - *t);
        match oldest {
            Some(age) if age >= self.after && !self.warned => {
                self.warned = true;
                tracing::warn!(
                    "no SPM has answered for {}: {} request(s) wait without any answer; is an \
                     SPM running for domain {domain}? (`spmbox status --device ...` tells; \
                     systemctl status spmbox-spm@NAME on its machine)",
                    Elapsed(age),
                    self.since.len()
                );
            }
            None if self.warned => {
                self.warned = false;
                tracing::info!("an SPM answers again");
            }
            _ => {}
        }
    }
}

fn emit(json_events: bool, value: Value) {
    if json_events {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

/// Runs the host until `stop` is set (or, with `exit_when_done`, until
/// every guest has written all it should and no request is in flight).
pub fn run(
    options: &HostOptions,
    maps: &mut dyn VolumeMaps,
    stop: Arc<AtomicBool>,
) -> Result<HostSummary, BackendError> {
    let mailbox = Mailbox::open(&options.device, Access::ReadWrite)?;
    let geometry = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let host_id = options.host_id;
    // Every line this daemon logs (the core's too) names the domain and
    // host id.
    let span = tracing::info_span!("host", %domain, host = host_id);
    let _entered = span.enter();
    let (Some(inbox_offset), Some(_)) = (
        geometry.inbox_area(HostId::new(host_id)),
        geometry.outbox_area(HostId::new(host_id)),
    ) else {
        return Err(BackendError::new(format!(
            "host id {host_id} is not a host of this domain (it serves hosts 1..={})",
            geometry.max_hosts()
        )));
    };
    if options.volumes.len() > HOST_VOLUMES {
        return Err(BackendError::new(format!(
            "a host runs at most {HOST_VOLUMES} volumes"
        )));
    }
    let clock = Clock::start();
    let mut engine =
        Host::<HOST_VOLUMES>::new(domain, HostId::new(host_id), geometry, options.config)?;
    let mut devices = Devices::new();
    let mut starts = Vec::new();
    for &volume in &options.volumes {
        let sizes = maps.sizes(volume)?;
        let map = maps.refresh(volume)?;
        // A VM's allocation is what qemu reports once it is attached.
        let allocation = if options.vm.is_some() {
            0
        } else {
            guest::recover_allocation(volume, &map, &mut devices)?
        };
        engine
            .add_volume(
                volume,
                sizes.virtual_size,
                sizes.limit,
                map.size,
                allocation,
            )
            .map_err(|e| BackendError::new(format!("volume {volume}: {e}")))?;
        tracing::info!(
            %volume,
            "volume: virtual {}, physical {}, guest has written {}",
            Bytes(sizes.virtual_size),
            Bytes(map.size),
            Bytes(allocation)
        );
        let total = options
            .guest_bytes
            .unwrap_or(sizes.virtual_size)
            .min(sizes.virtual_size);
        starts.push((volume, map, allocation, total - total % guest::BLOCK));
    }
    let sector = geometry.sector_size() as usize;
    if !options.config.lease_interval.is_zero() {
        check_host_id_free(&mailbox, domain, host_id, inbox_offset, &stop)?;
    }
    // The core's driver does the mailbox I/O: the inbox area written whole
    // from its mirror, the doorbell after it, the reads the engine asks
    // for (its outbox area, its inbox header, the SPM header).
    let device = mailbox.device();
    let buffer = AlignedBuf::zeroed(
        HostDriver::<&Device, AlignedBuf, HOST_VOLUMES>::BUFFER_LEN,
        device.dio_mem_align(),
    );
    let mut driver = Box::new(
        HostDriver::new(device, engine, buffer)
            .map_err(|e| BackendError::new(format!("cannot start the host's driver: {e}")))?,
    );
    let owner = crate::io::mailbox::random_owner()?;
    driver.start(clock.now(), owner)??;
    // The inbox header and the hold records of every volume, durable
    // before any guest writes (docs/protocol.md, section 9).
    retry_at_start(&stop, || driver.write())?;
    retry_at_start(&stop, || device.sync_data())?;
    if !options.config.lease_interval.is_zero() {
        // The header with this process's owner is written: wait longer
        // than a heartbeat, and read it back: another process that started
        // at the same moment with the same host id either overwrote it
        // (this one stops before any guest wrote) or saw it and refused.
        let settle = options.config.lease_interval * 3 / 2;
        let until = std::time::Instant::now() + settle;
        while std::time::Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Err(BackendError::new("stopped before start-up finished"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let header = retry_at_start(&stop, || {
            let mut buf = AlignedBuf::zeroed(sector, device.dio_mem_align());
            device.read_at(inbox_offset, &mut buf).map(|()| buf)
        })?;
        driver
            .engine_mut()
            .handle_inbox_header(clock.now(), &header[..RECORD_LEN]);
        if driver.engine().is_evicted() {
            return Err(BackendError::new(format!(
                "another process took host id {host_id} while this one started (its owner \
                 replaced this one's in the inbox header); run each host id on one host only"
            )));
        }
    }
    // The holds are durable: a volume an SPM is moving now (its pool
    // names it) is waited for, and every map is read again, so that no
    // guest writes through a map read before the holds were (a move
    // committed in between; docs/pool-format.md 6.7).
    wait_not_moving(maps, &options.volumes, &stop)?;
    for start in starts.iter_mut() {
        start.1 = maps.refresh(start.0)?;
    }
    let generation = driver.engine().generation();
    tracing::info!(
        "host {host_id} started: generation {generation}, {} volumes",
        options.volumes.len()
    );
    emit(
        options.json_events,
        json!({"event": "started", "host": host_id, "generation": generation}),
    );

    // Guests: real VMs, or threads.
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut runs: HashMap<Uuid, VolumeRun> = HashMap::new();
    let mut threads = Vec::new();
    let vm_setup = options
        .vm
        .as_ref()
        .map(crate::vm::VmSetup::prepare)
        .transpose()?;
    for (volume, map, allocation, total) in starts {
        let slot = Arc::new(GuestSlot {
            map: Mutex::new(map.clone()),
            grown: Condvar::new(),
            halted: Mutex::new(false),
        });
        let vm = match &vm_setup {
            Some(setup) => {
                let sizes = maps.sizes(volume)?;
                let tx = Mutex::new(tx.clone());
                let notify = Arc::new(move |m| {
                    if let Ok(tx) = tx.lock() {
                        let _ = tx.send(Msg::Vm(volume, m));
                    }
                });
                let mut vm = crate::vm::Vm::start(
                    setup,
                    volume,
                    generation.get(),
                    map,
                    sizes.virtual_size,
                    sizes.limit,
                    notify,
                )?;
                vm.arm(driver.engine().write_threshold(volume));
                emit(
                    options.json_events,
                    json!({"event": "vm_started", "host": host_id, "volume": volume.to_string(), "state": vm.state.name()}),
                );
                Some(Box::new(vm))
            }
            None => None,
        };
        let is_vm = vm.is_some();
        let done = vm.as_ref().is_some_and(|v| v.is_done());
        runs.insert(
            volume,
            VolumeRun {
                slot: slot.clone(),
                written: None,
                reply_seen: None,
                done,
                allocation,
                paused: false,
                stalled: None,
                vm,
                threshold_at: None,
            },
        );
        if is_vm {
            continue;
        }
        let tx = tx.clone();
        let stop = stop.clone();
        let (rate, write_size) = (options.rate, options.write_size);
        let span = span.clone();
        threads.push(std::thread::spawn(move || {
            let _entered = span.enter();
            run_guest(
                volume,
                generation.get(),
                allocation,
                total,
                rate,
                write_size,
                &slot,
                &tx,
                &stop,
            )
        }));
    }
    drop(tx);

    let exporter = options
        .metrics
        .as_deref()
        .map(crate::daemon::metrics::Exporter::serve)
        .transpose()?;
    let mut notifier = crate::daemon::notify::Notifier::new();
    notifier.ready(&format!(
        "host {host_id} of domain {domain}, generation {generation}, {} volumes",
        options.volumes.len()
    ));
    let mut summary = HostSummary::default();
    let mut next_status = std::time::Instant::now();
    let mut unanswered = Unanswered {
        since: HashMap::new(),
        warned: false,
        after: options.no_spm_warning,
    };
    // Mailbox I/O that fails is retried with backoff; the driver keeps
    // what failed (the inbox area, the ring, a read) and does it first.
    let mut io = Retry::new("the host's mailbox I/O");
    let result = (|| -> Result<(), BackendError> {
        loop {
            notifier.tick();
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let now = clock.now();
            let deadline = driver.engine().poll_timeout();
            let mut wait = deadline.map_or(Duration::from_millis(100), |t| clock.until(t));
            if let Some(retry) = io.until_next()
                && driver.writes_pending()
            {
                wait = wait.min(retry);
            }
            let first = if wait.is_zero() {
                rx.try_recv().ok()
            } else {
                match rx.recv_timeout(wait.min(Duration::from_millis(100))) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(wait.min(Duration::from_millis(100)));
                        None
                    }
                }
            };
            let now = clock.now().max(now);
            for msg in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match msg {
                    Msg::Allocation(volume, allocation, bytes) => {
                        summary.bytes_written += bytes;
                        if let Some(r) = runs.get_mut(&volume) {
                            r.allocation = allocation;
                        }
                        driver
                            .engine_mut()
                            .handle_allocation(now, volume, allocation);
                    }
                    Msg::Done(volume, allocation) => {
                        if let Some(r) = runs.get_mut(&volume) {
                            r.done = true;
                            r.allocation = allocation;
                        }
                        tracing::info!(%volume, "guest is done: wrote {}", Bytes(allocation));
                        emit(
                            options.json_events,
                            json!({"event": "done", "host": host_id, "volume": volume.to_string(), "allocation": allocation}),
                        );
                    }
                    Msg::Failed(volume, what) => {
                        return Err(BackendError::new(format!("guest of {volume}: {what}")));
                    }
                    Msg::Stalled(volume, error) => {
                        if let Some(r) = runs.get_mut(&volume) {
                            r.stalled = error;
                        }
                    }
                    Msg::Vm(volume, message) => {
                        if let (Some(r), Some(setup)) = (runs.get_mut(&volume), &vm_setup) {
                            vm_message(
                                volume,
                                message,
                                r,
                                setup,
                                driver.engine_mut(),
                                options,
                                now,
                            )?;
                        }
                    }
                }
            }
            // VMs: the allocation qemu reports (the poll behind the
            // threshold event), and a paused VM resumed once its volume
            // has room.
            for (volume, r) in runs.iter_mut() {
                let threshold = driver.engine().write_threshold(*volume);
                let Some(vm) = r.vm.as_mut() else {
                    continue;
                };
                if vm.poll_check().is_some() {
                    vm_finished(*volume, r, &mut summary, options);
                    continue;
                }
                if let Some(highest) = vm.poll(threshold)
                    && highest > r.allocation
                {
                    r.allocation = highest;
                    driver.engine_mut().handle_allocation(now, *volume, highest);
                }
                if vm.resume_if_room() {
                    summary.vm_resumed_at.push(std::time::Instant::now());
                    emit(
                        options.json_events,
                        json!({"event": "vm_resumed", "host": host_id, "volume": volume.to_string()}),
                    );
                }
            }
            // The engine's timers, its writes (the inbox area, then the
            // ring), its reads; what fails is done again after the backoff.
            if io.ready() {
                match driver.step(now) {
                    Ok(()) => {
                        io.succeeded();
                        let written = clock.now();
                        for (volume, run) in runs.iter_mut() {
                            let waiting = driver
                                .engine()
                                .volume(*volume)
                                .is_some_and(|v| v.request.is_some());
                            if waiting && run.written.is_none() {
                                run.written = Some(written);
                            }
                        }
                    }
                    Err(e) => io_failed(&mut io, e)?,
                }
            }
            // Events.
            while let Some(event) = driver.engine_mut().poll_event() {
                handle_event(
                    event,
                    options,
                    driver.engine_mut(),
                    maps,
                    &mut runs,
                    &mut summary,
                    &clock,
                )?;
            }
            // A request that ended without an extension (rejected,
            // failed) leaves no timestamps for the next one.
            for (volume, run) in runs.iter_mut() {
                if driver
                    .engine()
                    .volume(*volume)
                    .is_none_or(|v| v.request.is_none())
                {
                    run.written = None;
                    run.reply_seen = None;
                }
            }
            if let Some(path) = &options.status_file
                && std::time::Instant::now() >= next_status
            {
                next_status = std::time::Instant::now() + Duration::from_secs(1);
                write_status(path, host_id, driver.engine(), &runs);
                if let Some(exporter) = &exporter {
                    exporter.publish(host_metrics(driver.engine(), &runs, &summary));
                }
            }
            unanswered.check(driver.engine(), domain);
            if options.exit_when_done
                && runs.values().all(|r| r.done)
                && driver.engine().in_flight() == 0
            {
                return Ok(());
            }
        }
    })();
    notifier.stopping();
    stop.store(true, Ordering::Relaxed);
    for r in runs.values() {
        r.slot.grown.notify_all();
    }
    for t in threads {
        let _ = t.join();
    }
    // A clean stop releases the host id: the next process with it need not
    // watch for a live one. The writes still due go first.
    if result.is_ok()
        && let Err(e) = driver.release()
    {
        tracing::warn!("could not release host id {host_id} in the inbox header: {e}");
    }
    if let Some(path) = &options.status_file {
        write_status(path, host_id, driver.engine(), &runs);
    }
    for vm in runs.values().filter_map(|r| r.vm.as_ref()) {
        let c = vm.counts;
        summary.vm.threshold_events += c.threshold_events;
        summary.vm.enospc_pauses += c.enospc_pauses;
        summary.vm.resumes += c.resumes;
        summary.vm.restarts += c.restarts;
        if !vm.is_done() {
            tracing::info!(
                "volume {}: its VM keeps running (qemu {}); a host daemon started again attaches \
                 to it",
                vm.volume,
                vm.state.name()
            );
        }
    }
    result.map(|()| summary)
}

/// How often a host that waits for a volume being moved reads the pool.
const MOVING_POLL: Duration = Duration::from_millis(200);

/// Waits while the pool names one of `volumes` as being moved (read again
/// every [`MOVING_POLL`]); the caller's hold records are durable.
fn wait_not_moving(
    maps: &mut dyn VolumeMaps,
    volumes: &[Uuid],
    stop: &AtomicBool,
) -> Result<(), BackendError> {
    let mut told = false;
    loop {
        let moving = maps.moving()?;
        if moving.is_nil() || !volumes.contains(&moving) {
            return Ok(());
        }
        if !told {
            told = true;
            tracing::info!(
                volume = %moving,
                "the SPM is moving this volume to another LUN (`pool remove-lun`); its guest \
                 starts once the move is committed"
            );
        }
        if stop.load(Ordering::Relaxed) {
            return Err(BackendError::new(
                "stopped while waiting for a volume being moved",
            ));
        }
        std::thread::sleep(MOVING_POLL);
    }
}

/// Acts on a QMP message of a volume's VM: the allocation qemu reports
/// goes to the engine; a pause on ENOSPC makes the volume out of space (its
/// request urgent); an exit starts qemu again or the image check
/// ([`vm_finished`] ends the volume's run once that is done).
fn vm_message(
    volume: Uuid,
    message: crate::vm::qmp::QmpMessage,
    run: &mut VolumeRun,
    setup: &crate::vm::VmSetup,
    engine: &mut Host<HOST_VOLUMES>,
    options: &HostOptions,
    now: spmbox_core::time::Instant,
) -> Result<(), BackendError> {
    use crate::vm::VmAction;
    let host = options.host_id;
    let Some(vm) = run.vm.as_mut() else {
        return Ok(());
    };
    let before = vm.counts;
    match vm.handle(message) {
        VmAction::None => {}
        VmAction::Allocation(allocation) => {
            if allocation > run.allocation {
                run.allocation = allocation;
            }
            run.threshold_at.get_or_insert_with(std::time::Instant::now);
            engine.handle_allocation(now, volume, allocation);
            emit(
                options.json_events,
                json!({"event": "vm_threshold", "host": host, "volume": volume.to_string(), "allocation": allocation}),
            );
        }
        VmAction::OutOfSpace => {
            // The failed write ends past the volume: for the engine the
            // guest has used all of it, so it is paused and its request
            // urgent.
            let physical = vm.export().physical();
            run.allocation = run.allocation.max(physical);
            engine.handle_allocation(now, volume, physical);
            if vm.counts.enospc_pauses > before.enospc_pauses {
                emit(
                    options.json_events,
                    json!({"event": "vm_paused", "host": host, "volume": volume.to_string(), "reason": "enospc", "physical": physical}),
                );
            }
        }
        VmAction::Exited => {
            if vm.after_exit(setup)? {
                emit(
                    options.json_events,
                    json!({"event": "vm_restarted", "host": host, "volume": volume.to_string()}),
                );
            }
        }
    }
    Ok(())
}

/// A VM whose image check is done: logs the guest's result and the
/// check, counts them, and ends the volume's run.
fn vm_finished(
    volume: Uuid,
    run: &mut VolumeRun,
    summary: &mut HostSummary,
    options: &HostOptions,
) {
    let Some(vm) = run.vm.as_ref() else {
        return;
    };
    let result = vm.result();
    let mut failure = None;
    match &result {
        Some(r) if r.errors == 0 => tracing::info!(
            "volume {volume}: the VM finished: wrote {}, read back and verified {}, no errors",
            Bytes(r.written),
            Bytes(r.verified)
        ),
        Some(r) => {
            failure = Some(format!(
                "volume {volume}: the guest found {} bad blocks (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ))
        }
        None => failure = Some(format!("volume {volume}: the VM exited without a result")),
    }
    match &vm.image_check {
        Some(Ok(blocks)) => tracing::info!(
            "volume {volume}: the image read back through qcow2 holds {blocks} good blocks"
        ),
        Some(Err(e)) => {
            failure.get_or_insert(format!("volume {volume}: image check: {e}"));
        }
        None => {}
    }
    if let Some(f) = &failure {
        tracing::error!("{f}");
        summary.vm_failures.push(f.clone());
    }
    if let Some(r) = &result {
        summary.bytes_written += r.written;
        if r.write_seconds > 0.0 {
            summary
                .vm_write_mib_per_s
                .push(r.written as f64 / r.write_seconds / (1u64 << 20) as f64);
        }
    }
    run.done = true;
    emit(
        options.json_events,
        json!({"event": "vm_exited", "host": options.host_id, "volume": volume.to_string(),
               "vm": vm.status_json(), "ok": failure.is_none()}),
    );
}

/// Runs `io` until it succeeds, retrying errors that can heal with the
/// daemon's backoff (logged once per streak), until `stop`.
fn retry_at_start<T>(
    stop: &AtomicBool,
    mut io: impl FnMut() -> Result<T, DeviceError>,
) -> Result<T, BackendError> {
    let mut retry = Retry::new("the host's start-up mailbox I/O");
    loop {
        match io() {
            Ok(v) => {
                retry.succeeded();
                return Ok(v);
            }
            Err(e) => io_failed(&mut retry, e)?,
        }
        while !retry.ready() {
            if stop.load(Ordering::Relaxed) {
                return Err(BackendError::new("stopped before start-up finished"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The builtin lease on a host id: refuses to start while another live
/// process holds it. A header whose heartbeat interval is nonzero names a
/// holder; its heartbeat is watched for two and a half intervals (at most
/// [`HOST_LEASE_WATCH_MAX`]): if anything in the header moves, the host id
/// is in use.
fn check_host_id_free(
    mailbox: &Mailbox,
    domain: Uuid,
    host_id: u16,
    inbox_offset: u64,
    stop: &AtomicBool,
) -> Result<(), BackendError> {
    let sector = mailbox.geometry().sector_size() as usize;
    let at = spmbox_core::wire::Location {
        domain,
        host_id: HostId::new(host_id),
        index: 0,
    };
    let read = || -> Result<Option<InboxHeader>, BackendError> {
        let buf = mailbox.read(inbox_offset, sector)?;
        Ok(InboxHeader::parse(&buf[..RECORD_LEN], &at).ok().flatten())
    };
    let Some(first) = read()?.filter(|h| h.heartbeat_interval_ms != 0) else {
        return Ok(());
    };
    let interval = Duration::from_millis(u64::from(first.heartbeat_interval_ms));
    let watch = (interval * 5 / 2).min(HOST_LEASE_WATCH_MAX);
    tracing::info!(
        "host id {host_id} was held (owner {:#x}, generation {}); watching its heartbeat for {}",
        first.owner,
        first.generation,
        Elapsed(watch)
    );
    let until = std::time::Instant::now() + watch;
    while std::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(BackendError::new("stopped before start-up finished"));
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = read()?;
        if now != Some(first) {
            let now = now.unwrap_or(first);
            return Err(BackendError::new(format!(
                "host id {host_id} is in use by another live process: its heartbeat in the inbox \
                 header moved (owner {:#x}, heartbeat {} -> {}); run each host id on one host \
                 only, or stop that process first",
                now.owner, first.heartbeat, now.heartbeat
            )));
        }
    }
    tracing::info!("the heartbeat of host id {host_id} did not move: its holder is gone");
    Ok(())
}

/// The longest a starting host watches another holder's heartbeat.
pub const HOST_LEASE_WATCH_MAX: Duration = Duration::from_secs(10);

/// Counts a failed mailbox I/O in `io` if retrying can heal it; else the
/// host stops with the error.
fn io_failed(io: &mut Retry, e: DeviceError) -> Result<(), BackendError> {
    if e.is_transient() {
        io.failed(&e);
        Ok(())
    } else {
        Err(BackendError::new(format!(
            "{e}; this error does not heal by retrying, so the host stops"
        )))
    }
}

#[allow(clippy::too_many_arguments)]
fn run_guest(
    volume: Uuid,
    generation: u64,
    allocation: u64,
    total: u64,
    rate: u64,
    write_size: u64,
    slot: &GuestSlot,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
) {
    let mut guest = Guest::new(volume, generation, allocation, total, write_size);
    let mut devices = Devices::new();
    let mut pacer = Pacer::new(rate);
    // While writes fail: since when, retries, the next wait.
    let mut stall: Option<(std::time::Instant, u64, Duration)> = None;
    while !stop.load(Ordering::Relaxed) {
        let map = match slot.map.lock() {
            Ok(m) => m.clone(),
            Err(_) => return,
        };
        let delay = pacer.delay(std::time::Instant::now(), write_size);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let Ok(halted) = slot.halted.lock() else {
            return;
        };
        if *halted {
            return;
        }
        let step = guest.write_next(&map, &mut devices);
        drop(halted);
        match step {
            Ok(Step::Wrote { bytes, allocation }) => {
                if tx.send(Msg::Allocation(volume, allocation, bytes)).is_err() {
                    return;
                }
            }
            Ok(Step::Full) => {
                let _ = tx.send(Msg::Allocation(volume, guest.allocation(), 0));
                // Paused: block until the map grows.
                let Ok(mut m) = slot.map.lock() else { return };
                while m.size <= guest.allocation() && !stop.load(Ordering::Relaxed) {
                    m = match slot.grown.wait_timeout(m, Duration::from_millis(100)) {
                        Ok((m, _)) => m,
                        Err(_) => return,
                    };
                }
            }
            Ok(Step::Done) => {
                let _ = tx.send(Msg::Done(volume, guest.allocation()));
                return;
            }
            Err(GuestError::Device(e)) if e.is_transient() => {
                // Nothing is lost: the same range is written again.
                let what = stall_message(volume, &e);
                if stall.is_none() {
                    tracing::error!("{what}");
                    let _ = tx.send(Msg::Stalled(volume, Some(what)));
                }
                let s = stall.get_or_insert((std::time::Instant::now(), 0, IO_RETRY_FIRST));
                let until = std::time::Instant::now() + s.2;
                while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(s.2));
                }
                s.1 += 1;
                s.2 = (s.2 * 2).min(IO_RETRY_MAX);
                continue;
            }
            Err(e) => {
                let _ = tx.send(Msg::Failed(
                    volume,
                    format!("{e}; this error does not heal by retrying, so the host stops"),
                ));
                return;
            }
        }
        if let Some((since, retries, _)) = stall.take() {
            tracing::warn!(
                %volume,
                "the guest writes again after {:.3} s of errors and {retries} retries",
                since.elapsed().as_secs_f64()
            );
            let _ = tx.send(Msg::Stalled(volume, None));
        }
    }
}

/// What an operator reads when a guest's writes fail and it waits.
fn stall_message(volume: Uuid, e: &DeviceError) -> String {
    let path = e.path().display();
    let file = e.path().metadata().is_ok_and(|m| m.is_file());
    if e.is_no_space() && file {
        format!(
            "the file system under LUN file {path} is full: free space or preallocate LUN files; \
             the guest of volume {volume} waits and retries ({e})"
        )
    } else if e.is_no_space() {
        format!(
            "LUN {path} is out of space: give the storage under it more space; \
             the guest of volume {volume} waits and retries ({e})"
        )
    } else {
        format!("the guest of volume {volume} waits and retries: {e}")
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn handle_event(
    event: HostEvent,
    options: &HostOptions,
    engine: &mut Host<HOST_VOLUMES>,
    maps: &mut dyn VolumeMaps,
    runs: &mut HashMap<Uuid, VolumeRun>,
    summary: &mut HostSummary,
    clock: &Clock,
) -> Result<(), BackendError> {
    let host = options.host_id;
    let json_events = options.json_events;
    match event {
        HostEvent::Evicted { owner } => {
            return Err(BackendError::new(format!(
                "another process (owner {owner:#x}) took host id {host}: this one stopped its \
                 guests and writes nothing more; run each host id on one host only"
            )));
        }
        HostEvent::Refresh { volume, size } => {
            let Some(run) = runs.get_mut(&volume) else {
                return Ok(());
            };
            run.reply_seen.get_or_insert_with(|| clock.now());
            let map = match maps.refresh(volume) {
                Ok(map) => map,
                Err(e) => {
                    tracing::warn!(%volume, "refreshing the volume failed (retried): {e}");
                    return Ok(());
                }
            };
            if map.size < size {
                tracing::warn!(
                    %volume,
                    "the reply says {} but the map shows {}; refreshing again",
                    Bytes(size),
                    Bytes(map.size)
                );
                return Ok(());
            }
            apply_map(volume, run, map, engine, summary, clock, options)?;
        }
        HostEvent::RefreshAll { release_commit } => {
            refresh_all(release_commit, options, engine, maps, runs, summary, clock)?;
        }
        HostEvent::SegmentsFull { volume, size } => {
            let guest = match runs.get(&volume).map(|r| r.vm.is_some()) {
                Some(true) => "its VM stays paused once it runs out of space",
                _ => "its guest stops writing when it reaches the end",
            };
            tracing::error!(
                %volume,
                "volume {volume} cannot grow past {}: its segment table is full (its map holds \
                 as many segments as the pool keeps per volume, and the pool cannot place the \
                 extension next to its last segment). The host asks no more for it and {guest}. \
                 Reduce or move the volume (`spmbox volume reduce`) so that its extents are \
                 contiguous again, and give new domains a larger extent size",
                Bytes(size)
            );
            emit(
                json_events,
                json!({"event": "segments_full", "host": host, "volume": volume.to_string(), "size": size}),
            );
        }
        HostEvent::Extended {
            volume,
            size,
            latency,
        } => {
            summary.extensions += 1;
            let run = runs.get_mut(&volume);
            // VDSM's breakdown, on the engine's clock: total = wait +
            // extend + refresh.
            let now = clock.now();
            let sent = now - latency;
            let (written, reply) = match run {
                Some(r) => (r.written.take(), r.reply_seen.take()),
                None => (None, None),
            };
            let written = written.unwrap_or(sent).max(sent);
            let reply = reply.unwrap_or(now).max(written);
            let wait = written.saturating_since(sent);
            let extend = reply.saturating_since(written);
            let refresh = now.saturating_since(reply);
            summary.extension_seconds.record(latency.as_secs_f64());
            if options.keep_latencies {
                summary.latencies_ms.push(ms(latency));
            }
            // The core logs the extension; its breakdown is for debugging.
            tracing::debug!(
                %volume,
                "extension timings: to {}: total {:.3} ms, wait {:.3} ms, extend {:.3} ms, \
                 refresh {:.3} ms",
                Bytes(size),
                ms(latency),
                ms(wait),
                ms(extend),
                ms(refresh)
            );
            emit(
                json_events,
                json!({"event": "extended", "host": host, "volume": volume.to_string(), "size": size,
                       "total_ms": ms(latency), "wait_ms": ms(wait), "extend_ms": ms(extend),
                       "refresh_ms": ms(refresh)}),
            );
        }
        HostEvent::Paused { volume } => {
            summary.pauses += 1;
            if let Some(r) = runs.get_mut(&volume) {
                r.paused = true;
            }
            // The core logs the pause.
            emit(
                json_events,
                json!({"event": "paused", "host": host, "volume": volume.to_string()}),
            );
        }
        HostEvent::Resumed { volume } => {
            summary.resumes += 1;
            if let Some(r) = runs.get_mut(&volume) {
                r.paused = false;
            }
            // The core logs the resume.
            emit(
                json_events,
                json!({"event": "resumed", "host": host, "volume": volume.to_string()}),
            );
        }
        HostEvent::WaitingForSpace { volume } => {
            // The core logs the wait.
            emit(
                json_events,
                json!({"event": "waiting_for_space", "host": host, "volume": volume.to_string()}),
            );
        }
        HostEvent::Rejected { volume, reason } => {
            // The core logs the rejection.
            emit(
                json_events,
                json!({"event": "rejected", "host": host, "volume": volume.to_string(), "reason": reason.name()}),
            );
        }
        HostEvent::Failed { volume, code } => {
            // The core logs the failure.
            emit(
                json_events,
                json!({"event": "failed", "host": host, "volume": volume.to_string(), "code": code}),
            );
        }
        HostEvent::Resent { volume, sequence } => {
            tracing::info!(%volume, "no reply yet: request {sequence} written again");
        }
        HostEvent::SlotsExhausted => {
            tracing::warn!(
                "all {} request slots of the inbox area are in use; more requests wait in memory",
                engine.request_slots()
            );
        }
        // An event of a newer core that this shell does not act on yet.
        _ => tracing::debug!("a host engine event this version does not act on"),
    }
    Ok(())
}

/// Installs `map`, just re-read, as the map `volume`'s guest writes
/// through, and tells the engine its size.
fn apply_map(
    volume: Uuid,
    run: &mut VolumeRun,
    map: Mapping,
    engine: &mut Host<HOST_VOLUMES>,
    summary: &mut HostSummary,
    clock: &Clock,
    options: &HostOptions,
) -> Result<(), BackendError> {
    {
        let mut current = run
            .slot
            .map
            .lock()
            .map_err(|_| BackendError::new("a guest thread died"))?;
        if !current.is_prefix_of(&map) {
            return Err(BackendError::new(format!(
                "volume {volume}: the refreshed map moves bytes the guest already wrote; \
                 the pool is inconsistent: stop and run `spmbox status`"
            )));
        }
        *current = map.clone();
    }
    run.slot.grown.notify_all();
    engine.handle_refreshed(clock.now(), volume, map.size);
    if let Some(vm) = run.vm.as_mut() {
        let resumed = vm.counts.resumes;
        vm.refreshed(map, engine.write_threshold(volume))?;
        if let Some(at) = run.threshold_at.take() {
            summary
                .threshold_to_refresh_ms
                .push(at.elapsed().as_secs_f64() * 1e3);
        }
        if vm.counts.resumes > resumed {
            summary.vm_resumed_at.push(std::time::Instant::now());
            emit(
                options.json_events,
                json!({"event": "vm_resumed", "host": options.host_id, "volume": volume.to_string()}),
            );
        }
    }
    Ok(())
}

/// An SPM released extents in pool commit `release_commit`: every map is
/// read again, and only then is the commit acknowledged. A volume whose
/// map cannot be read again (the metadata no longer has it, or reading
/// failed) may not be written through its old map: its guest is stopped
/// (a VM stops the host) and the volume removed before the
/// acknowledgement.
fn refresh_all(
    release_commit: u64,
    options: &HostOptions,
    engine: &mut Host<HOST_VOLUMES>,
    maps: &mut dyn VolumeMaps,
    runs: &mut HashMap<Uuid, VolumeRun>,
    summary: &mut HostSummary,
    clock: &Clock,
) -> Result<(), BackendError> {
    let volumes: Vec<Uuid> = engine.volumes().map(|v| v.id).collect();
    for volume in volumes {
        match maps.refresh(volume) {
            Ok(map) => {
                if let Some(run) = runs.get_mut(&volume) {
                    apply_map(volume, run, map, engine, summary, clock, options)?;
                } else {
                    engine.handle_refreshed(clock.now(), volume, map.size);
                }
            }
            Err(e) => {
                let why = format!(
                    "volume {volume}: an SPM released extents (pool commit {release_commit}) and \
                     the volume's map cannot be read again ({e}); if the volume was deleted, take \
                     it off this host"
                );
                if runs.get(&volume).is_some_and(|r| r.vm.is_some()) {
                    return Err(BackendError::new(format!(
                        "{why}. Its VM is stopped with this host, so that nothing is written \
                         through its old map"
                    )));
                }
                if let Some(run) = runs.remove(&volume) {
                    // Taking the lock waits for the write in flight.
                    let mut halted = run
                        .slot
                        .halted
                        .lock()
                        .map_err(|_| BackendError::new("a guest thread died"))?;
                    *halted = true;
                    run.slot.grown.notify_all();
                }
                tracing::error!(
                    %volume,
                    "{why}. Its guest is stopped: it writes nothing more through its old map"
                );
                emit(
                    options.json_events,
                    json!({"event": "volume_stopped", "host": options.host_id, "volume": volume.to_string(), "release_commit": release_commit}),
                );
                engine
                    .remove_volume(clock.now(), volume)
                    .map_err(|e| BackendError::new(format!("volume {volume}: {e}")))?;
            }
        }
    }
    engine.handle_all_refreshed(clock.now(), release_commit);
    emit(
        options.json_events,
        json!({"event": "release_acked", "host": options.host_id, "release_commit": release_commit}),
    );
    Ok(())
}

/// The host's metrics page.
fn host_metrics(
    engine: &Host<HOST_VOLUMES>,
    runs: &HashMap<Uuid, VolumeRun>,
    summary: &HostSummary,
) -> crate::daemon::metrics::Text {
    let mut t = crate::daemon::metrics::Text::new();
    t.counter(
        "spmbox_host_extensions_total",
        "Extensions completed.",
        summary.extensions,
    );
    t.counter(
        "spmbox_host_pauses_total",
        "Guest pauses (out of space).",
        summary.pauses,
    );
    t.counter(
        "spmbox_host_resumes_total",
        "Guest resumes.",
        summary.resumes,
    );
    t.counter(
        "spmbox_host_guest_written_bytes_total",
        "Bytes the guests wrote in this run.",
        summary.bytes_written,
    );
    t.histogram(
        "spmbox_host_extension_seconds",
        "Whole extension: the host decided to ask, to the map refreshed.",
        &summary.extension_seconds,
    );
    let mut physical = Vec::new();
    let mut allocation = Vec::new();
    let mut paused = Vec::new();
    for v in engine.volumes() {
        let label = format!("volume=\"{}\"", v.id);
        let run = runs.get(&v.id);
        physical.push((label.clone(), v.physical as f64));
        allocation.push((
            label.clone(),
            run.map_or(v.allocation, |r| r.allocation) as f64,
        ));
        paused.push((
            label,
            f64::from(u8::from(
                run.is_some_and(|r| r.paused || r.stalled.is_some()),
            )),
        ));
    }
    t.gauges(
        "spmbox_volume_physical_bytes",
        "The volume's physical size as this host sees it.",
        &physical,
    );
    t.gauges(
        "spmbox_volume_allocation_bytes",
        "Bytes the volume's guest has written.",
        &allocation,
    );
    t.gauges(
        "spmbox_volume_paused",
        "1 while the volume's guest is paused.",
        &paused,
    );
    t
}

fn write_status(
    path: &std::path::Path,
    host_id: u16,
    engine: &Host<HOST_VOLUMES>,
    runs: &HashMap<Uuid, VolumeRun>,
) {
    let volumes: Vec<Value> = engine
        .volumes()
        .map(|v| {
            let run = runs.get(&v.id);
            json!({
                "id": v.id.to_string(),
                "virtual_size": v.virtual_size,
                "physical": v.physical,
                "allocation": run.map_or(v.allocation, |r| r.allocation),
                "paused": run.is_some_and(|r| r.paused || r.stalled.is_some()),
                "io_error": run.and_then(|r| r.stalled.clone()),
                "guest_done": run.is_some_and(|r| r.done),
                "in_flight": v.request.map(|f| json!({"target": f.target, "sequence": f.sequence, "phase": phase_name(f.phase)})),
                "vm": run.and_then(|r| r.vm.as_ref()).map(|vm| vm.status_json()),
            })
        })
        .collect();
    let status = json!({
        "host": host_id,
        "pid": std::process::id(),
        "generation": engine.generation(),
        "volumes": volumes,
    });
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, status.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// A request's phase as the host's status file names it.
fn phase_name(phase: spmbox_core::host::Phase) -> &'static str {
    match phase {
        spmbox_core::host::Phase::Sent => "sent",
        spmbox_core::host::Phase::WaitingForSpace => "waiting_for_space",
        spmbox_core::host::Phase::Extended { .. } => "extended",
    }
}
