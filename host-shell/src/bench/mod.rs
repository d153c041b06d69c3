//! `spmbox bench`: the figures of docs/performance.md, measured here.
//!
//! Every figure comes from the real daemons' code against a real device
//! with `O_DIRECT`: the SPM daemon ([`crate::daemon::spm::run`]) runs in a
//! thread; hosts are either full host daemons with guests
//! ([`crate::daemon::host::run`]) or, where hundreds or thousands of hosts
//! are needed, a *fleet*: host engines driven from one thread that writes
//! each host's inbox area, rings the doorbell and reads outbox areas just
//! as the host daemon does. Percentiles are taken over all samples.
//!
//! | section | what | backend |
//! |---|---|---|
//! | `round_trip` | request on disk to reply read, one sender at a time and many at once | no-op |
//! | `whole_extension` | the host decided to ask, to its map refreshed (host daemon, guests writing) | builtin |
//! | `throughput` | extensions answered per second, every host keeping a request in flight | no-op |
//! | `idle` | SPM CPU (percent of a core) and bytes read per second with no requests | no-op |
//! | `write_rate` | one guest writing as fast as it can with 256 MiB chunks: rate and pauses | builtin |
//! | `scan` | the core engine reading a 2000-host mailbox image: empty, 1 % busy, all busy | none (memory) |

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use serde_json::{Value, json};
use spmbox_core::driver::{BlockDevice, HostDriver};
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::pool::max_size;
use spmbox_core::spm::{JobResult, Spm, SpmConfig};
use spmbox_core::testing::{MemDisk, NoFaults};
use spmbox_core::wire::{AREA_SIZE, DOORBELL_OFFSET, Geometry, RECORD_LEN, Uuid};

use crate::backend::builtin::{self, BuiltinMaps, CreateOptions};
use crate::backend::{BackendError, PoolReport, SpmBackend};
use crate::cli::commands::{CommandError, EXIT_OK};
use crate::daemon::Clock;
use crate::daemon::spm::{self, SpmOptions};
use crate::io::device::{Access, AlignedBuf, Device};
use crate::io::mailbox::{self, FormatOptions, Mailbox};
use crate::stats::{percentile, round};
use crate::units::Bytes;

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(e.to_string())
}

/// A latency distribution, milliseconds.
#[derive(Debug, Clone, Default)]
struct Dist {
    samples: Vec<f64>,
}

impl Dist {
    fn summary(&self) -> Value {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        json!({
            "samples": s.len(),
            "p50_ms": round(percentile(&s, 50.0), 3),
            "p99_ms": round(percentile(&s, 99.0), 3),
            "max_ms": round(s.last().copied().unwrap_or(0.0), 3),
        })
    }
}

/// An SPM backend that extends every volume to whatever is asked, at once
/// and durably: the mailbox round trip with nothing behind it.
#[derive(Debug, Default)]
pub struct NoopBackend;

impl SpmBackend for NoopBackend {
    fn extend(&mut self, _volume: Uuid, target: u64, _urgent: bool) -> JobResult {
        JobResult::Extended { size: target }
    }
    fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn take_completed(&mut self) -> Vec<(Uuid, u64)> {
        Vec::new()
    }
    fn withdraw_parked(&mut self, _still_waiting: &dyn Fn(Uuid) -> Option<(u64, bool)>) {
        // Nothing is ever parked here.
    }
    fn add_lun(&mut self, _path: &Path) -> Result<String, BackendError> {
        Err(BackendError::new("the no-op backend has no LUNs"))
    }
    fn create_volume(
        &mut self,
        _id: Uuid,
        _virtual_size: u64,
        _initial_size: u64,
    ) -> Result<crate::backend::VolumeReport, BackendError> {
        Err(BackendError::new("the no-op backend has no volumes"))
    }
    fn poll_capacity(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn report(&self) -> PoolReport {
        PoolReport {
            backend: "noop",
            extent_size: 1 << 20,
            total_extents: 0,
            free_extents: 0,
            luns: Vec::new(),
            volumes: Vec::new(),
            parked: Vec::new(),
        }
    }
}

/// The backend of an [`SpmThread`].
enum Backend {
    Noop,
    Builtin,
    Lvm { vg: String, pvs: Vec<PathBuf> },
}

/// An SPM daemon running in a thread until dropped.
struct SpmThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<SpmRun, String>>>,
}

/// What an SPM thread did.
#[derive(Debug, Default, Clone, Copy)]
struct SpmRun {
    /// CPU time of its thread, seconds.
    cpu: f64,
    summary: spm::SpmSummary,
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

impl SpmThread {
    fn start(device: &Path, run_dir: &Path, backend: Backend) -> Result<SpmThread, BackendError> {
        let stop = Arc::new(AtomicBool::new(false));
        let options = SpmOptions {
            device: device.to_owned(),
            config: spm::daemon_config(
                SpmConfig::default().doorbell_interval,
                SpmConfig::default().full_scan_interval,
            ),
            spm_id: 0,
            control: run_dir.join(format!("spm-{}.sock", std::process::id())),
            metrics: None,
            lease_version: 0,
            accept_metadata_rollback: false,
        };
        let flag = stop.clone();
        let path = device.to_owned();
        let thread = std::thread::spawn(move || {
            let open = || -> Result<Box<dyn SpmBackend>, BackendError> {
                match &backend {
                    Backend::Noop => Ok(Box::new(NoopBackend)),
                    Backend::Builtin => Ok(Box::new(builtin::BuiltinSpm::open(&path)?)),
                    Backend::Lvm { vg, pvs } => crate::backend::lvm_glue::spm_backend(vg, pvs),
                }
            };
            spm::run(&options, &open, flag)
                .map(|summary| SpmRun {
                    cpu: thread_cpu_seconds(),
                    summary,
                })
                .map_err(|e| e.to_string())
        });
        let spm = SpmThread {
            stop,
            thread: Some(thread),
        };
        // Wait until the SPM header says active.
        let mailbox = Mailbox::open(device, Access::ReadOnly).map_err(err)?;
        let started = StdInstant::now();
        loop {
            if let Some(h) = spm::read_spm_header(&mailbox)?
                && h.state == spmbox_core::wire::SpmState::Active
                && h.heartbeat > 0
            {
                return Ok(spm);
            }
            if spm.thread.as_ref().is_some_and(|t| t.is_finished())
                || started.elapsed() > Duration::from_secs(30)
            {
                return Err(BackendError::new("the SPM did not start"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the SPM; returns what it did.
    fn stop(mut self) -> Result<SpmRun, BackendError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(run))) => Ok(run),
            Some(Ok(Err(e))) => Err(BackendError::new(format!("the SPM failed: {e}"))),
            Some(Err(_)) => Err(BackendError::new("the SPM thread panicked")),
            None => Ok(SpmRun::default()),
        }
    }
}

impl Drop for SpmThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes one fleet request asks for.
const FLEET_CHUNK: u64 = 1 << 20;

/// The most volumes one fleet host drives.
const FLEET_VOLUMES: usize = 8;

/// A volume of a fleet host.
struct FleetVolume {
    id: Uuid,
    physical: u64,
    /// When its request went on disk.
    sent: Option<StdInstant>,
}

/// One host of a fleet: the core's host driver on a [`FleetDisk`].
struct FleetHost {
    driver: Box<HostDriver<FleetDisk, AlignedBuf, FLEET_VOLUMES>>,
    volumes: Vec<FleetVolume>,
}

/// Host engines driven from one thread, as host daemons would drive them.
struct Fleet {
    mailbox: Mailbox,
    clock: Clock,
    hosts: Vec<FleetHost>,
    /// Round trips, milliseconds: request on disk to reply read.
    round_trips: Vec<f64>,
    /// Requests answered with anything but an extension.
    refused: u64,
    /// The device every host's driver writes through.
    io: Rc<FleetIo>,
    /// Hands a pass's rings to a [`Ringer`] thread (see [`FleetIo`]).
    batched: Option<Ringer>,
    /// CPU time of the last [`keep_asking`], seconds.
    cpu: f64,
}

/// The mailbox device as the fleet's host drivers see it.
///
/// Unbatched (latency runs), every write goes to the device as a host
/// daemon's would. Batched (throughput runs), the inbox areas a pass
/// wrote are kept in `inboxes` and written as runs of adjacent areas,
/// and the rings are handed to a [`Ringer`] thread: one thread simulates
/// every host here, and thousands of separate writes a second would
/// measure that thread's I/O rather than the SPM; the SPM sees the same
/// bytes, areas before the rings that announce them.
struct FleetIo {
    device: Device,
    inbox_offset: u64,
    batched: Cell<bool>,
    /// Every inbox area of the mailbox, as the fleet's hosts wrote them.
    inboxes: RefCell<AlignedBuf>,
    /// Areas written in this pass (batched).
    dirty: RefCell<Vec<usize>>,
    /// Rings of this pass, with their host's area (batched).
    rings: RefCell<Vec<(usize, [u8; RECORD_LEN])>>,
}

/// One fleet host's handle on [`FleetIo`].
struct FleetDisk {
    io: Rc<FleetIo>,
    /// The host's inbox area, as an index.
    area: usize,
}

impl embedded_io::ErrorType for FleetDisk {
    type Error = crate::io::device::DeviceError;
}

impl BlockDevice for FleetDisk {
    fn sector_size(&self) -> u32 {
        self.io.device.sector_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.io.device.read_slice(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let io = &self.io;
        if !io.batched.get() {
            return io.device.write_slice(offset, buf);
        }
        if offset == DOORBELL_OFFSET {
            let mut record = [0; RECORD_LEN];
            record.copy_from_slice(&buf[..RECORD_LEN]);
            io.rings.borrow_mut().push((self.area, record));
            return Ok(());
        }
        let at = (offset - io.inbox_offset) as usize;
        io.inboxes.borrow_mut()[at..at + buf.len()].copy_from_slice(buf);
        io.dirty.borrow_mut().push(self.area);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.io.device.sync_data()
    }
}

/// Rings waiting to be written, keyed by their host's inbox area place.
type RingQueue = std::collections::VecDeque<(usize, [u8; RECORD_LEN])>;

/// Writes the doorbell rings it is given, one after another, in its own
/// thread, as thousands of hosts ringing on their own would: each ring is
/// written unless the same host rang again before it was (the newer ring
/// takes its place), and rings that follow each other faster than the
/// SPM reads the doorbell overwrite each other on disk, as they would.
struct Ringer {
    pending: Arc<std::sync::Mutex<RingQueue>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ringer {
    fn start(mailbox: &Mailbox) -> Result<Ringer, BackendError> {
        let device = crate::io::device::Device::open(mailbox.device().path(), Access::ReadWrite)
            .map_err(err)?;
        let sector = mailbox.geometry().sector_size() as usize;
        let pending = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pending.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = AlignedBuf::zeroed(sector, device.dio_mem_align());
            while !s.load(Ordering::Relaxed) {
                let next: Option<(usize, [u8; RECORD_LEN])> =
                    p.lock().ok().and_then(|mut q| q.pop_front());
                match next {
                    Some((_, record)) => {
                        buf[..RECORD_LEN].copy_from_slice(&record);
                        // A lost ring is a hint lost: the SPM's scans
                        // cover it.
                        let _ = device.write_at(DOORBELL_OFFSET, &buf);
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Ok(Ringer {
            pending,
            stop,
            thread: Some(thread),
        })
    }

    /// Rings of hosts (keyed by their inbox area's place).
    fn ring(&self, rings: &[(usize, [u8; RECORD_LEN])]) {
        if let Ok(mut q) = self.pending.lock() {
            for &(host, record) in rings {
                match q.iter_mut().find(|(h, _)| *h == host) {
                    Some(slot) => slot.1 = record,
                    None => q.push_back((host, record)),
                }
            }
        }
    }
}

impl Drop for Ringer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A volume a fleet host drives: its id, virtual size and current size.
type FleetVolumeSpec = (Uuid, u64, u64);

impl Fleet {
    /// A fleet of hosts `ids`, each with one volume of its own (the no-op
    /// SPM extends whatever is asked).
    fn new(device: &Path, ids: impl Iterator<Item = u16>) -> Result<Fleet, BackendError> {
        let mut hosts = Vec::new();
        for id in ids {
            let v = mailbox::random_uuid().map_err(err)?;
            hosts.push((id, vec![(v, 1u64 << 40, FLEET_CHUNK)]));
        }
        Fleet::with_volumes(device, hosts)
    }

    /// A fleet of the given hosts, each with its volumes (at most
    /// [`FLEET_VOLUMES`]).
    fn with_volumes(
        device: &Path,
        hosts: Vec<(u16, Vec<FleetVolumeSpec>)>,
    ) -> Result<Fleet, BackendError> {
        let mailbox = Mailbox::open(device, Access::ReadWrite).map_err(err)?;
        let geometry = mailbox.geometry();
        let domain = mailbox.superblock().domain;
        let clock = Clock::start();
        // The fleet stands in for many hosts' requests and replies in one
        // process; each of its engines keeps no builtin host-id lease.
        let config = HostConfig {
            chunk_size: FLEET_CHUNK,
            lease_interval: std::time::Duration::ZERO,
            ..HostConfig::default()
        };
        let inboxes = mailbox
            .read(
                geometry.inbox_offset(),
                usize::from(geometry.max_hosts()) * AREA_SIZE,
            )
            .map_err(err)?;
        let io = Rc::new(FleetIo {
            device: Device::open(device, Access::ReadWrite).map_err(err)?,
            inbox_offset: geometry.inbox_offset(),
            batched: Cell::new(false),
            inboxes: RefCell::new(inboxes),
            dirty: RefCell::new(Vec::new()),
            rings: RefCell::new(Vec::new()),
        });
        let align = io.device.dio_mem_align();
        let mut fleet = Vec::new();
        for (id, specs) in hosts {
            let Some(inbox) = geometry.inbox_area(id) else {
                continue;
            };
            let mut engine = Host::new(domain, id, geometry, config).map_err(err)?;
            let mut volumes = Vec::new();
            for (v, virtual_size, size) in specs.into_iter().take(FLEET_VOLUMES) {
                let limit = max_size(virtual_size, 1 << 20).unwrap_or(u64::MAX);
                engine
                    .add_volume(v, virtual_size, limit, size, 0)
                    .map_err(err)?;
                volumes.push(FleetVolume {
                    id: v,
                    physical: size,
                    sent: None,
                });
            }
            let disk = FleetDisk {
                io: io.clone(),
                area: ((inbox - geometry.inbox_offset()) as usize) / AREA_SIZE,
            };
            let buffer = AlignedBuf::zeroed(
                HostDriver::<FleetDisk, AlignedBuf, FLEET_VOLUMES>::BUFFER_LEN,
                align,
            );
            let mut driver = Box::new(
                HostDriver::new(disk, engine, buffer)
                    .map_err(|e| BackendError::new(format!("fleet host {id}: {e:?}")))?,
            );
            driver.start(clock.now(), 1).map_err(err)?.map_err(err)?;
            fleet.push(FleetHost { driver, volumes });
        }
        Ok(Fleet {
            mailbox,
            clock,
            hosts: fleet,
            round_trips: Vec::new(),
            refused: 0,
            io,
            batched: None,
            cpu: 0.0,
        })
    }

    /// Batched writes and rings from now on (see [`FleetIo`]).
    fn batch(&mut self) -> Result<(), BackendError> {
        self.batched = Some(Ringer::start(&self.mailbox)?);
        self.io.batched.set(true);
        Ok(())
    }

    /// Host `i`'s guest on its first volume crosses its watermark.
    fn ask(&mut self, i: usize) {
        self.ask_volume(i, 0);
    }

    /// Host `i`'s guest on volume `v` crosses its watermark.
    fn ask_volume(&mut self, i: usize, v: usize) {
        let now = self.clock.now();
        let h = &mut self.hosts[i];
        let Some(vol) = h.volumes.get(v) else {
            return;
        };
        h.driver
            .engine_mut()
            .handle_allocation(now, vol.id, vol.physical.saturating_sub(4096));
    }

    /// Every host's writes: its inbox area, then its doorbell ring.
    fn flush(&mut self) -> Result<(), BackendError> {
        for h in &mut self.hosts {
            h.driver.write().map_err(err)?;
            let now = StdInstant::now();
            for v in &mut h.volumes {
                if v.sent.is_none()
                    && h.driver
                        .engine()
                        .volume(v.id)
                        .is_some_and(|s| s.request.is_some())
                {
                    v.sent = Some(now);
                }
            }
        }
        let Some(ringer) = &self.batched else {
            return Ok(());
        };
        // The pass's areas as runs of adjacent areas, then its rings.
        let mut dirty = std::mem::take(&mut *self.io.dirty.borrow_mut());
        dirty.sort_unstable();
        dirty.dedup();
        let inboxes = self.io.inboxes.borrow();
        let mut k = 0;
        while k < dirty.len() {
            let first = dirty[k];
            let mut end = first + 1;
            k += 1;
            while k < dirty.len() && dirty[k] == end {
                end += 1;
                k += 1;
            }
            let (from, to) = (first * AREA_SIZE, end * AREA_SIZE);
            self.io
                .device
                .write_from(self.io.inbox_offset + from as u64, &inboxes, from..to)
                .map_err(err)?;
        }
        ringer.ring(&std::mem::take(&mut *self.io.rings.borrow_mut()));
        Ok(())
    }

    /// Does the reads each host's engine asks for (its outbox area while
    /// it waits for a reply, the SPM header) and completes the extensions
    /// whose replies arrived. Returns how many completed.
    fn poll(&mut self) -> Result<usize, BackendError> {
        let mut completed = 0;
        for h in &mut self.hosts {
            let now = self.clock.now();
            h.driver.engine_mut().handle_timeout(now);
            h.driver.read(now).map_err(err)?;
            let read_at = StdInstant::now();
            while let Some(event) = h.driver.engine_mut().poll_event() {
                match event {
                    HostEvent::Refresh { volume, size } => {
                        if let Some(v) = h.volumes.iter_mut().find(|v| v.id == volume) {
                            if let Some(sent) = v.sent.take() {
                                self.round_trips
                                    .push(read_at.duration_since(sent).as_secs_f64() * 1e3);
                            }
                            v.physical = v.physical.max(size);
                        }
                        h.driver.engine_mut().handle_refreshed(now, volume, size);
                    }
                    HostEvent::Extended { .. } => completed += 1,
                    HostEvent::Failed { volume, .. } | HostEvent::Rejected { volume, .. } => {
                        self.refused += 1;
                        if let Some(v) = h.volumes.iter_mut().find(|v| v.id == volume) {
                            v.sent = None;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(completed)
    }

    fn in_flight(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.driver.engine().in_flight())
            .sum()
    }
}

/// Allocates `len` bytes of `file` (as a LUN's blocks are, unlike a sparse
/// file's, whose first writes would also write file system metadata).
fn preallocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
        .map_err(std::io::Error::from)
}

/// A fresh mailbox for `hosts` on `device` (the no-op SPM's domain).
fn fresh_mailbox(device: &Path, hosts: u16) -> Result<(), BackendError> {
    mailbox::format(
        device,
        &FormatOptions {
            hosts,
            sector_size: None,
            domain: None,
            force: true,
        },
    )
    .map_err(err)?;
    Ok(())
}

/// Round trips with `hosts` configured: `samples` requests one at a time
/// (cycling over the hosts), then bursts of `burst` hosts at once.
fn round_trip(
    device: &Path,
    run_dir: &Path,
    hosts: u16,
    samples: usize,
    burst: usize,
) -> Result<Vec<(Value, Vec<f64>)>, BackendError> {
    fresh_mailbox(device, hosts)?;
    let spm = SpmThread::start(device, run_dir, Backend::Noop)?;
    let mut fleet = Fleet::new(device, 1..=hosts)?;
    let n = fleet.hosts.len();
    let mut one = Vec::new();
    let deadline = StdInstant::now() + Duration::from_secs(120);
    for s in 0..samples {
        // Spread the senders over the mailbox, last host included.
        let i = (s * 7919 + n - 1) % n;
        fleet.ask(i);
        fleet.flush()?;
        while fleet.in_flight() > 0 {
            fleet.poll()?;
            fleet.flush()?;
            if StdInstant::now() > deadline {
                return Err(BackendError::new("round trips did not complete in 120 s"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        one.append(&mut fleet.round_trips);
    }
    let mut first = json!({"hosts": hosts, "senders": 1, "backend": "noop"});
    merge(
        &mut first,
        Dist {
            samples: one.clone(),
        }
        .summary(),
    );
    let mut out = vec![(first, one)];
    if burst > 1 {
        let senders = burst.min(n);
        let mut many = Vec::new();
        for round in 0..3 {
            for k in 0..senders {
                fleet.ask((k * n / senders + round) % n);
            }
            fleet.flush()?;
            while fleet.in_flight() > 0 {
                fleet.poll()?;
                fleet.flush()?;
                if StdInstant::now() > deadline {
                    return Err(BackendError::new(
                        "burst round trips did not complete in 120 s",
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            many.append(&mut fleet.round_trips);
        }
        let mut v = json!({"hosts": hosts, "senders": senders, "backend": "noop"});
        merge(
            &mut v,
            Dist {
                samples: many.clone(),
            }
            .summary(),
        );
        out.push((v, many));
    }
    drop(fleet);
    spm.stop()?;
    Ok(out)
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// Extensions per second with `hosts` each keeping
/// `volumes_per_host` requests in flight, no-op backend, for `seconds`.
fn throughput(
    device: &Path,
    run_dir: &Path,
    hosts: u16,
    volumes_per_host: usize,
    seconds: f64,
) -> Result<Value, BackendError> {
    fresh_mailbox(device, hosts)?;
    let spm = SpmThread::start(device, run_dir, Backend::Noop)?;
    let mut specs = Vec::new();
    for id in 1..=hosts {
        let mut vols = Vec::new();
        for _ in 0..volumes_per_host {
            vols.push((
                mailbox::random_uuid().map_err(err)?,
                1u64 << 40,
                FLEET_CHUNK,
            ));
        }
        specs.push((id, vols));
    }
    let mut fleet = Fleet::with_volumes(device, specs)?;
    let (done, elapsed) = keep_asking(&mut fleet, seconds, None)?;
    let run = spm.stop()?;
    Ok(tput_row(
        "noop",
        hosts,
        volumes_per_host,
        &fleet,
        done,
        elapsed,
        &run,
    ))
}

/// Every volume of the fleet asks again as soon as its request is
/// answered, for `seconds` or until `total` extensions completed. Returns
/// the extensions completed and the seconds from the first request to the
/// last poll.
fn keep_asking(
    fleet: &mut Fleet,
    seconds: f64,
    total: Option<u64>,
) -> Result<(u64, f64), BackendError> {
    fleet.batch()?;
    let started = StdInstant::now();
    let cpu0 = thread_cpu_seconds();
    let mut done = 0u64;
    loop {
        // Every volume whose request was answered asks again at once.
        for i in 0..fleet.hosts.len() {
            for v in 0..fleet.hosts[i].volumes.len() {
                let h = &fleet.hosts[i];
                let vol = &h.volumes[v];
                if h.driver
                    .engine()
                    .volume(vol.id)
                    .is_some_and(|s| s.request.is_none())
                {
                    fleet.ask_volume(i, v);
                }
            }
        }
        fleet.flush()?;
        std::thread::sleep(Duration::from_micros(500));
        done += fleet.poll()? as u64;
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed >= seconds || total.is_some_and(|t| done >= t) {
            fleet.cpu = thread_cpu_seconds() - cpu0;
            return Ok((done, elapsed));
        }
    }
}

/// A row of the `throughput` section.
fn tput_row(
    backend: &str,
    hosts: u16,
    volumes_per_host: usize,
    fleet: &Fleet,
    done: u64,
    elapsed: f64,
    run: &SpmRun,
) -> Value {
    let spm_cpu = run.cpu;
    let (e, d) = (run.summary.engine, run.summary.disk);
    let per = |x: u64| round(x as f64 / done.max(1) as f64, 2);
    json!({
        "backend": backend,
        "hosts": hosts,
        "sending_hosts": fleet.hosts.len(),
        "volumes_per_host": volumes_per_host,
        "seconds": round(elapsed, 2),
        "extensions": done,
        "not_extended": fleet.refused,
        "client_cpu_percent": round(fleet.cpu / elapsed * 100.0, 1),
        "extensions_per_s": round(done as f64 / elapsed, 1),
        "spm_cpu_percent": round(spm_cpu / elapsed * 100.0, 1),
        "spm_cpu_us_per_extension": round(spm_cpu / done.max(1) as f64 * 1e6, 1),
        "extensions_per_spm_cpu_s": round(done as f64 / spm_cpu.max(1e-9), 0),
        "spm_commits": run.summary.commits,
        "spm_commit_ms_mean": round(run.summary.commit_seconds * 1e3 / run.summary.commits.max(1) as f64, 3),
        "spm_commit_seconds": round(run.summary.commit_seconds, 2),
        "spm_full_scans": e.full_scans,
        "spm_busy_scans": e.busy_scans,
        "spm_backlog_scans": e.backlog_scans,
        "spm_targeted_reads": e.targeted_reads,
        "spm_read_bytes_per_extension": per(d.read_bytes),
        "spm_reads_per_extension": per(d.reads),
        "spm_writes_per_extension": per(d.writes),
    })
}

/// Extensions per second with the builtin pool: `volumes` volumes, one on
/// each of hosts 1..=volumes of a `hosts`-host mailbox, each grown 1 MiB at
/// a time from 1 MiB to its limit (29 extensions; a volume holds at most
/// 32 segments, and interleaved extensions each start a new one).
fn throughput_builtin(
    dir: &Path,
    run_dir: &Path,
    hosts: u16,
    volumes: u16,
) -> Result<Value, BackendError> {
    let device = dir.join("tput-domain");
    let lun = dir.join("tput-lun");
    let _ = std::fs::remove_file(&device);
    let _ = std::fs::remove_file(&lun);
    let extent = FLEET_CHUNK;
    let virtual_size = 26 << 20;
    let limit = max_size(virtual_size, extent).unwrap_or(virtual_size);
    let per_volume = (limit - extent) / extent;
    // Sparse: nothing writes the volumes' data here.
    let lun_size = u64::from(volumes) * limit + (64 << 20);
    std::fs::File::create(&lun)
        .and_then(|f| f.set_len(lun_size))
        .map_err(|e| BackendError::new(format!("cannot make {}: {e}", lun.display())))?;
    builtin::create(
        &device,
        std::slice::from_ref(&lun),
        &CreateOptions {
            hosts,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
    )?;
    let mut specs = Vec::new();
    {
        let mut b = builtin::BuiltinSpm::open(&device)?;
        for h in 1..=volumes {
            let v = mailbox::random_uuid().map_err(err)?;
            b.create_volume(v, virtual_size, extent)?;
            specs.push((h, vec![(v, virtual_size, extent)]));
        }
    }
    let spm = SpmThread::start(&device, run_dir, Backend::Builtin)?;
    let mut fleet = Fleet::with_volumes(&device, specs)?;
    let total = u64::from(volumes) * per_volume;
    let (done, elapsed) = keep_asking(&mut fleet, 120.0, Some(total))?;
    let run = spm.stop()?;
    let _ = std::fs::remove_file(&lun);
    let _ = std::fs::remove_file(&device);
    Ok(tput_row("builtin", hosts, 1, &fleet, done, elapsed, &run))
}

/// CPU time of this process, seconds.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Bytes this process has read with read/pread so far (`rchar`).
fn bytes_read() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("rchar:").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// The SPM's idle cost at default settings with `hosts` configured.
fn idle(device: &Path, run_dir: &Path, hosts: u16, seconds: f64) -> Result<Value, BackendError> {
    fresh_mailbox(device, hosts)?;
    let spm = SpmThread::start(device, run_dir, Backend::Noop)?;
    // Idle means no ring for idle_after: the doorbell is then read at the
    // idle interval.
    std::thread::sleep(SpmConfig::default().idle_after + Duration::from_millis(500));
    let (cpu0, read0, t0) = (cpu_seconds(), bytes_read(), StdInstant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (cpu1, read1, elapsed) = (cpu_seconds(), bytes_read(), t0.elapsed().as_secs_f64());
    spm.stop()?;
    // An idle full scan reads the inbox areas only (no slot in use, so no
    // outbox is read). A window shorter than the scan interval holds no
    // scan: its share is added.
    let full_scan = u64::from(hosts) * AREA_SIZE as u64;
    let interval = SpmConfig::default().full_scan_interval.as_secs_f64();
    let measured = (read1 - read0) as f64 / elapsed;
    let steady = if elapsed < interval {
        measured + full_scan as f64 / interval
    } else {
        measured
    };
    Ok(json!({
        "hosts": hosts,
        "seconds": round(elapsed, 1),
        "cpu_percent": round((cpu1 - cpu0) / elapsed * 100.0, 3),
        "measured_read_bytes_per_s": round(measured, 0),
        "read_bytes_per_s": round(steady, 0),
        "full_scan_bytes": full_scan,
        "full_scan_interval_s": interval,
    }))
}

/// Host daemon options for the benchmark's guests: watermark at 50 %,
/// `chunk` per request, guests writing `bytes` each at `rate` (0: as fast
/// as they can) in `write_size` writes, the host exiting when they are
/// done.
fn guest_host_options(
    device: PathBuf,
    host_id: u16,
    volumes: Vec<Uuid>,
    chunk: u64,
    rate: u64,
    write_size: u64,
    bytes: u64,
) -> crate::daemon::host::HostOptions {
    crate::daemon::host::HostOptions {
        device,
        host_id,
        volumes,
        config: HostConfig {
            chunk_size: chunk,
            utilization_percent: 50,
            ..HostConfig::default()
        },
        rate,
        write_size,
        guest_bytes: Some(bytes),
        exit_when_done: true,
        json_events: false,
        status_file: None,
        vm: None,
        metrics: None,
        keep_latencies: true,
    }
}

/// One guest writing as fast as it can through a host daemon, with the
/// builtin pool and `chunk` per request.
fn write_rate(dir: &Path, run_dir: &Path, chunk: u64, total: u64) -> Result<Value, BackendError> {
    let device = dir.join("rate-domain");
    let lun = dir.join("rate-lun");
    let _ = std::fs::remove_file(&device);
    let _ = std::fs::remove_file(&lun);
    let extent = 128 << 20;
    let lun_size = (total + 4 * chunk).next_multiple_of(extent) + 2 * extent;
    std::fs::File::create(&lun)
        .and_then(|f| preallocate(&f, lun_size))
        .map_err(|e| BackendError::new(format!("cannot make {}: {e}", lun.display())))?;
    builtin::create(
        &device,
        std::slice::from_ref(&lun),
        &CreateOptions {
            hosts: 16,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
    )?;
    let volume = mailbox::random_uuid().map_err(err)?;
    {
        let mut b = builtin::BuiltinSpm::open(&device)?;
        b.create_volume(volume, total, chunk)?;
    }
    let spm = SpmThread::start(&device, run_dir, Backend::Builtin)?;
    let mut maps = BuiltinMaps::open(&device, vec![dir.to_owned()])?;
    let options = guest_host_options(device.clone(), 1, vec![volume], chunk, 0, 4 << 20, total);
    let started = StdInstant::now();
    let summary = crate::daemon::host::run(&options, &mut maps, Arc::new(AtomicBool::new(false)))?;
    let elapsed = started.elapsed().as_secs_f64();
    spm.stop()?;
    // The same writes with no mailbox, no pool and no data to make: what
    // the device gives this thread.
    let device_rate = raw_write_rate(&lun, total.min(2 << 30), 4 << 20)?;
    let fill_rate = fill_rate(256 << 20);
    let _ = std::fs::remove_file(&lun);
    let _ = std::fs::remove_file(&device);
    let mut lat = summary.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    Ok(json!({
        "chunk_size": chunk,
        "bytes": summary.bytes_written,
        "seconds": round(elapsed, 2),
        "mib_per_s": round(summary.bytes_written as f64 / elapsed / (1 << 20) as f64, 1),
        "pauses": summary.pauses,
        "extensions": summary.extensions,
        "extension_p50_ms": round(percentile(&lat, 50.0), 3),
        "extension_p99_ms": round(percentile(&lat, 99.0), 3),
        "device_mib_per_s": round(device_rate, 1),
        "fill_mib_per_s": round(fill_rate, 1),
    }))
}

/// What a VM bench run measured.
struct VmRun {
    summary: crate::daemon::host::HostSummary,
    /// When the LUN was added (the paused run), else `None`.
    lun_added: Option<StdInstant>,
    seconds: f64,
}

/// One host daemon (in this process) running a VM on each of `volumes`
/// volumes of `virtual_size` (initial `initial`), LUN 1 of `lun1` bytes.
/// With `lun2`, that LUN is added once every VM has paused on ENOSPC.
#[allow(clippy::too_many_arguments)]
fn vm_run(
    dir: &Path,
    run_dir: &Path,
    name: &str,
    volumes: usize,
    virtual_size: u64,
    initial: u64,
    lun1: u64,
    lun2: Option<u64>,
    vm: crate::vm::VmOptions,
    chunk: u64,
) -> Result<VmRun, BackendError> {
    let extent = 4 << 20;
    let device = dir.join(format!("{name}-domain"));
    let luns = [
        dir.join(format!("{name}-lun1")),
        dir.join(format!("{name}-lun2")),
    ];
    for (lun, size) in luns.iter().zip([Some(lun1), lun2]) {
        if let Some(size) = size {
            std::fs::File::create(lun)
                .and_then(|f| preallocate(&f, builtin::LUN_DATA_OFFSET + size))
                .map_err(|e| BackendError::new(format!("cannot make {}: {e}", lun.display())))?;
        }
    }
    builtin::create(
        &device,
        std::slice::from_ref(&luns[0]),
        &CreateOptions {
            hosts: 16,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
    )?;
    let mut ids = Vec::new();
    {
        let mut b = builtin::BuiltinSpm::open(&device)?;
        for _ in 0..volumes {
            let id = mailbox::random_uuid().map_err(err)?;
            b.create_volume(id, virtual_size, initial)?;
            ids.push(id);
        }
    }
    let spm = SpmThread::start(&device, run_dir, Backend::Builtin)?;
    let control = run_dir.join(format!("spm-{}.sock", std::process::id()));
    let mut maps = BuiltinMaps::open(&device, vec![dir.to_owned()])?;
    let status = run_dir.join(format!("{name}-host.json"));
    let mut options = guest_host_options(device.clone(), 1, ids, chunk, vm.rate, vm.write_size, 0);
    options.guest_bytes = vm.guest_bytes;
    options.status_file = Some(status.clone());
    options.vm = Some(vm);
    let stop = Arc::new(AtomicBool::new(false));
    let started = StdInstant::now();
    let host = std::thread::spawn(move || {
        crate::daemon::host::run(&options, &mut maps, stop).map_err(|e| e.to_string())
    });
    let mut lun_added = None;
    if lun2.is_some() {
        // Every VM paused on ENOSPC (in the host's status file), then the LUN.
        let deadline = StdInstant::now() + Duration::from_secs(180);
        loop {
            let paused = std::fs::read_to_string(&status)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| {
                    v["volumes"].as_array().map(|vs| {
                        vs.iter()
                            .filter(|v| v["vm"]["state"] == "paused-enospc")
                            .count()
                    })
                })
                .unwrap_or(0);
            if paused == volumes {
                break;
            }
            if host.is_finished() || StdInstant::now() > deadline {
                return Err(BackendError::new(format!(
                    "bench: the VMs did not all pause on ENOSPC ({paused} of {volumes})"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let lun = std::fs::canonicalize(&luns[1]).map_err(err)?;
        lun_added = Some(StdInstant::now());
        spm::control_request(&control, &json!({"op": "add_lun", "path": lun}))?;
    }
    let summary = match host.join() {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(BackendError::new(format!("bench: the VM host failed: {e}"))),
        Err(_) => return Err(BackendError::new("bench: the VM host thread panicked")),
    };
    let seconds = started.elapsed().as_secs_f64();
    spm.stop()?;
    if !summary.vm_failures.is_empty() {
        return Err(BackendError::new(format!(
            "bench: VM data errors: {}",
            summary.vm_failures.join("; ")
        )));
    }
    for p in luns.iter().chain([&device]) {
        let _ = std::fs::remove_file(p);
    }
    Ok(VmRun {
        summary,
        lun_added,
        seconds,
    })
}

/// The VM section: the time from qemu's write-threshold event to the
/// refreshed volume; one VM writing as fast as it can through a thin
/// volume that keeps extending, beside the same VM on a preallocated raw
/// file; the time from a LUN added to every paused VM running again.
fn vm_bench(dir: &Path, run_dir: &Path, quick: bool) -> Result<Value, BackendError> {
    let tools = match crate::vm::image::find_tools() {
        Ok(t) => t,
        Err(e) => return Ok(json!({"skipped": e.to_string()})),
    };
    let vm_dir = run_dir.join("vm");
    let setup = crate::vm::VmSetup::prepare(&crate::vm::VmOptions {
        dir: vm_dir.clone(),
        kernel: None,
        initrd: None,
        rate: 0,
        write_size: 0,
        guest_bytes: None,
    })?;
    let options = |rate: u64, bytes: u64| crate::vm::VmOptions {
        dir: vm_dir.clone(),
        kernel: None,
        initrd: Some(setup.initramfs().to_owned()),
        rate,
        write_size: 1 << 20,
        guest_bytes: Some(bytes),
    };
    let bytes: u64 = if quick { 96 << 20 } else { 384 << 20 };
    // 1. Threshold to refresh, and the write rate: one VM as fast as it
    // can, 32 MiB chunks on an 8 MiB volume, room for everything; then
    // 2. the same guest on a preallocated raw file on the same file
    // system. The raw rate moves by a third from run to run on a shared
    // machine, so the full run alternates them three times and reports
    // the medians beside every round.
    let rounds = if quick { 1 } else { 3 };
    let mut lat = Vec::new();
    let (mut thin_rates, mut raw_rates, mut qcow2_rates) = (Vec::new(), Vec::new(), Vec::new());
    let mut counts = crate::vm::VmCounts::default();
    let (mut extensions, mut seconds) = (0, 0.0);
    for round in 0..rounds {
        let thin = vm_run(
            dir,
            run_dir,
            &format!("vm-thin-{round}"),
            1,
            bytes + (64 << 20),
            8 << 20,
            2 * bytes + (256 << 20),
            None,
            options(0, bytes),
            32 << 20,
        )?;
        lat.extend_from_slice(&thin.summary.threshold_to_refresh_ms);
        thin_rates.push(
            thin.summary
                .vm_write_mib_per_s
                .first()
                .copied()
                .unwrap_or(0.0),
        );
        let c = thin.summary.vm;
        counts.enospc_pauses += c.enospc_pauses;
        counts.threshold_events += c.threshold_events;
        extensions += thin.summary.extensions;
        seconds += thin.seconds;
        raw_rates.push(vm_file_rate(&tools, setup.initramfs(), dir, bytes, false)?);
        qcow2_rates.push(vm_file_rate(&tools, setup.initramfs(), dir, bytes, true)?);
    }
    lat.sort_by(f64::total_cmp);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (thin_rate, raw_rate) = (median(&thin_rates), median(&raw_rates));
    let per_round = |v: &[f64]| v.iter().map(|x| round(*x, 1)).collect::<Vec<_>>();
    // 3. Two VMs paused on ENOSPC; a LUN added; every VM running again.
    let paused = vm_run(
        dir,
        run_dir,
        "vm-paused",
        2,
        64 << 20,
        8 << 20,
        24 << 20,
        Some(256 << 20),
        options(16 << 20, 32 << 20),
        8 << 20,
    )?;
    let resumed_ms = match (paused.lun_added, paused.summary.vm_resumed_at.iter().max()) {
        (Some(added), Some(last)) => last.saturating_duration_since(added).as_secs_f64() * 1e3,
        _ => f64::NAN,
    };
    Ok(json!({
        "threshold_to_refresh": {
            "p50_ms": round(percentile(&lat, 50.0), 1),
            "p99_ms": round(percentile(&lat, 99.0), 1),
            "max_ms": round(lat.last().copied().unwrap_or(f64::NAN), 1),
            "samples": lat.len(),
            "vdsm_min_avg_max_ms": [770, 1150, 1390],
        },
        "write_rate": {
            "bytes": bytes,
            "rounds": rounds,
            "thin_mib_per_s": round(thin_rate, 1),
            "raw_mib_per_s": round(raw_rate, 1),
            "ratio": round(thin_rate / raw_rate, 3),
            "thin_rounds_mib_per_s": per_round(&thin_rates),
            "raw_rounds_mib_per_s": per_round(&raw_rates),
            "qcow2_file_mib_per_s": round(median(&qcow2_rates), 1),
            "qcow2_file_rounds_mib_per_s": per_round(&qcow2_rates),
            "enospc_pauses": counts.enospc_pauses,
            "threshold_events": counts.threshold_events,
            "extensions": extensions,
            "seconds": round(seconds, 1),
        },
        "lun_added_to_resumed": {
            "vms": 2,
            "enospc_pauses": paused.summary.vm.enospc_pauses,
            "resumes": paused.summary.vm.resumes,
            "all_running_ms": round(resumed_ms, 1),
        },
    }))
}

/// The guest's own write rate, MiB/s, on a file of this file system: the
/// same VM, kernel and workload with no thin volume and no NBD; the file
/// a preallocated raw image, or (`qcow2`) a new qcow2 image growing on
/// the file system, which tells the cost of qcow2 itself.
fn vm_file_rate(
    tools: &crate::vm::image::VmTools,
    initramfs: &Path,
    dir: &Path,
    bytes: u64,
    qcow2: bool,
) -> Result<f64, BackendError> {
    let raw = dir.join("vm-file.img");
    let _ = std::fs::remove_file(&raw);
    if qcow2 {
        let out = std::process::Command::new(&tools.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&raw)
            .arg((bytes + (64 << 20)).to_string())
            .output()
            .map_err(|e| BackendError::new(format!("running qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(BackendError::new(format!(
                "bench: qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    } else {
        std::fs::File::create(&raw)
            .and_then(|f| preallocate(&f, bytes))
            .map_err(|e| BackendError::new(format!("cannot make {}: {e}", raw.display())))?;
    }
    let serial = dir.join("vm-raw.serial");
    let params = crate::vm::image::GuestParams {
        volume: Uuid([0x5a; 16]),
        generation: 1,
        bytes,
        rate: 0,
        write_size: 1 << 20,
    };
    let cmdline = crate::vm::image::kernel_cmdline(&params);
    let status = std::process::Command::new(&tools.qemu)
        .args(crate::vm::image::qemu_base_args(
            tools, initramfs, &cmdline, &serial,
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format={},if=none,id=d0,cache=none,aio=threads",
            raw.display(),
            if qcow2 { "qcow2" } else { "raw" }
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| BackendError::new(format!("running qemu: {e}")))?;
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let _ = std::fs::remove_file(&raw);
    let result = crate::vm::image::parse_result(&log).ok_or_else(|| {
        BackendError::new(format!(
            "bench: the VM on a file printed no result (qemu {status}); console: {}",
            log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    })?;
    if result.errors != 0 || result.write_seconds <= 0.0 {
        return Err(BackendError::new(format!(
            "bench: the VM on a file: {} errors",
            result.errors
        )));
    }
    Ok(result.written as f64 / result.write_seconds / (1u64 << 20) as f64)
}

/// MiB/s of `bytes` written from the start of `path` in `write_size`
/// O_DIRECT writes of one buffer, then synced.
fn raw_write_rate(path: &Path, bytes: u64, write_size: usize) -> Result<f64, BackendError> {
    let device = crate::io::device::Device::open(path, Access::ReadWrite).map_err(err)?;
    let mut buf = AlignedBuf::zeroed(write_size, device.dio_mem_align().max(4096));
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let started = StdInstant::now();
    let mut at = 0;
    while at + write_size as u64 <= bytes {
        device.write_at(at, &buf).map_err(err)?;
        at += write_size as u64;
    }
    device.sync_data().map_err(err)?;
    Ok(at as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64)
}

/// MiB/s at which one thread makes guest data (pattern and checksum per
/// block), with no I/O.
fn fill_rate(bytes: u64) -> f64 {
    let block = crate::daemon::guest::BLOCK as usize;
    let mut buf = vec![0u8; block];
    let volume = Uuid([7; 16]);
    let started = StdInstant::now();
    let mut offset = 0;
    while offset < bytes {
        crate::daemon::guest::fill_block(&mut buf, volume, offset, 1);
        offset += block as u64;
    }
    std::hint::black_box(&buf);
    offset as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// How fast the whole-extension guests write.
const GUEST_RATE: u64 = 8 << 20;
/// Extent and chunk size of the whole-extension domains.
const GUEST_EXTENT: u64 = 4 << 20;
/// Virtual size of a whole-extension volume.
const GUEST_VOLUME: u64 = 256 << 20;
/// Extensions per volume per round: a volume holds at most 32 segments,
/// and volumes growing together interleave their extents, so each
/// extension is a segment.
const ROUND_EXTENSIONS: u64 = 28;

/// Whole extensions with the builtin pool: guests on `hosts` host daemons
/// (threads) writing at `rate`, small chunks so that extensions are many.
fn whole_extension(
    dir: &Path,
    run_dir: &Path,
    hosts: u16,
    volumes_per_host: u64,
    seconds: f64,
) -> Result<(Value, Vec<f64>), BackendError> {
    // Each round on a fresh domain, within the segment limit.
    let per_round = ROUND_EXTENSIONS * GUEST_EXTENT;
    let total = (GUEST_RATE as f64 * seconds) as u64;
    let rounds = total.div_ceil(per_round).max(1);
    let mut all = Vec::new();
    for round in 0..rounds {
        let bytes = if round + 1 == rounds {
            total.saturating_sub(round * per_round)
        } else {
            per_round
        };
        all.extend(whole_extension_round(
            dir,
            run_dir,
            hosts,
            volumes_per_host,
            bytes.clamp(GUEST_EXTENT, per_round),
        )?);
    }
    let mut v = json!({
        "backend": "builtin",
        "hosts": hosts,
        "volumes": u64::from(hosts) * volumes_per_host,
        "rounds": rounds,
    });
    merge(
        &mut v,
        Dist {
            samples: all.clone(),
        }
        .summary(),
    );
    Ok((v, all))
}

/// One round of [`whole_extension`]: guests writing `bytes` each at
/// 8 MiB/s on a fresh domain. Returns the latencies, milliseconds.
fn whole_extension_round(
    dir: &Path,
    run_dir: &Path,
    hosts: u16,
    volumes_per_host: u64,
    bytes: u64,
) -> Result<Vec<f64>, BackendError> {
    let device = dir.join("ext-domain");
    let lun = dir.join("ext-lun");
    let _ = std::fs::remove_file(&device);
    let _ = std::fs::remove_file(&lun);
    let extent = GUEST_EXTENT;
    let per_volume = GUEST_VOLUME;
    let lun_size = per_volume * 2 * volumes_per_host * u64::from(hosts) + (64 << 20);
    std::fs::File::create(&lun)
        .and_then(|f| preallocate(&f, lun_size))
        .map_err(|e| BackendError::new(format!("cannot make {}: {e}", lun.display())))?;
    builtin::create(
        &device,
        std::slice::from_ref(&lun),
        &CreateOptions {
            hosts: 250,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
    )?;
    let mut assignment = Vec::new();
    {
        let mut b = builtin::BuiltinSpm::open(&device)?;
        for h in 1..=hosts {
            let mut vols = Vec::new();
            for _ in 0..volumes_per_host {
                let v = mailbox::random_uuid().map_err(err)?;
                b.create_volume(v, per_volume, extent)?;
                vols.push(v);
            }
            assignment.push((h, vols));
        }
    }
    let spm = SpmThread::start(&device, run_dir, Backend::Builtin)?;
    // Guests write 8 MiB/s each with 4 MiB chunks: about one extension
    // per volume every half second.
    let rate = GUEST_RATE;
    let bytes = bytes.min(per_volume).next_multiple_of(4096);
    let mut threads = Vec::new();
    for (h, vols) in assignment {
        let device = device.clone();
        let search = vec![dir.to_owned()];
        threads.push(std::thread::spawn(move || -> Result<Vec<f64>, String> {
            let mut maps = BuiltinMaps::open(&device, search).map_err(|e| e.to_string())?;
            let options = guest_host_options(device, h, vols, extent, rate, 256 << 10, bytes);
            crate::daemon::host::run(&options, &mut maps, Arc::new(AtomicBool::new(false)))
                .map(|s| s.latencies_ms)
                .map_err(|e| e.to_string())
        }));
    }
    let mut all = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(l)) => all.extend(l),
            Ok(Err(e)) => return Err(BackendError::new(format!("a host failed: {e}"))),
            Err(_) => return Err(BackendError::new("a host thread panicked")),
        }
    }
    spm.stop()?;
    let _ = std::fs::remove_file(&lun);
    let _ = std::fs::remove_file(&device);
    Ok(all)
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice, BackendError> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "512"])
            .arg(file)
            .output()
            .map_err(|e| BackendError::new(format!("cannot run losetup: {e}")))?;
        if !out.status.success() {
            return Err(BackendError::new(format!(
                "losetup {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(LoopDevice(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// Why the lvm row cannot run here, if it cannot.
fn lvm_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (loop devices and lvm2)".into());
    }
    let works = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works("losetup", "--version") {
        return Some("needs losetup (util-linux)".into());
    }
    if !works("lvm", "version") {
        return Some("needs lvm2 (apt-get install lvm2)".into());
    }
    None
}

/// The whole extension with the lvm backend: one host, one guest, a real
/// lvm2 volume group on a loop device (metadata only where the kernel has
/// no device-mapper: the guest writes through the segment map `lvs`
/// reports). Beside it, lvextend's own time as the SPM measured it.
fn whole_extension_lvm(
    dir: &Path,
    run_dir: &Path,
    seconds: f64,
) -> Result<(Value, Vec<f64>), BackendError> {
    if let Some(why) = lvm_unavailable() {
        return Ok((json!({"backend": "lvm", "skipped": why}), Vec::new()));
    }
    let domain_file = dir.join("lvm-domain");
    let lun_file = dir.join("lvm-lun");
    let extent = GUEST_EXTENT;
    let per_volume = GUEST_VOLUME;
    for (f, size) in [
        (&domain_file, 16u64 << 20),
        (&lun_file, 2 * per_volume + (64 << 20)),
    ] {
        std::fs::File::create(f)
            .and_then(|file| preallocate(&file, size))
            .map_err(|e| BackendError::new(format!("cannot make {}: {e}", f.display())))?;
    }
    let domain_loop = LoopDevice::attach(&domain_file)?;
    let lun_loop = LoopDevice::attach(&lun_file)?;
    let vg = format!("spmboxbench{}", std::process::id());
    let pvs = vec![lun_loop.0.clone()];
    let _cleanup = crate::backend::lvm::VgRemoval {
        vg: vg.clone(),
        pvs: pvs.clone(),
    };
    crate::backend::lvm_glue::create(
        &domain_loop.0,
        &pvs,
        &CreateOptions {
            hosts: 250,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
        &vg,
        &pvs,
    )?;
    let volume = mailbox::random_uuid().map_err(err)?;
    crate::backend::lvm_glue::spm_backend(&vg, &pvs)?.create_volume(volume, per_volume, extent)?;
    let spm = SpmThread::start(
        &domain_loop.0,
        run_dir,
        Backend::Lvm {
            vg: vg.clone(),
            pvs: pvs.clone(),
        },
    )?;
    let mut maps = crate::backend::lvm_glue::maps(&vg, &pvs)?;
    // Fewer extensions than the builtin rows: each is an lvextend and a
    // refresh of the map from lvm2's metadata.
    let rate = GUEST_RATE;
    let bytes = ((rate as f64 * seconds) as u64).clamp(8 * extent, ROUND_EXTENSIONS * extent);
    let options = guest_host_options(
        domain_loop.0.clone(),
        1,
        vec![volume],
        extent,
        rate,
        256 << 10,
        bytes,
    );
    let summary =
        crate::daemon::host::run(&options, maps.as_mut(), Arc::new(AtomicBool::new(false)))?;
    let run = spm.stop()?;
    let lat = summary.latencies_ms;
    let mut v = json!({
        "backend": "lvm",
        "hosts": 1,
        "volumes": 1,
        "rounds": 1,
        "device_mapper": crate::backend::lvm::device_mapper_present(),
        "lvextend_ms_mean": round(run.summary.extend_seconds * 1e3 / run.summary.jobs.max(1) as f64, 3),
        "commit_ms_mean": round(run.summary.commit_seconds * 1e3 / run.summary.commits.max(1) as f64, 3),
    });
    merge(
        &mut v,
        Dist {
            samples: lat.clone(),
        }
        .summary(),
    );
    Ok((v, lat))
}

/// The core engine reading a 2000-host mailbox image from memory.
fn scan(fraction_busy: f64, label: &str, repeats: usize) -> Result<Value, BackendError> {
    let hosts = 2000u16;
    let geometry = Geometry::new(hosts, 512).map_err(err)?;
    let domain = Uuid([0x5a; 16]);
    let area_bytes = usize::from(hosts) * AREA_SIZE;
    let mut image = MemDisk::new(
        vec![0u8; geometry.mailbox_size() as usize],
        geometry.sector_size(),
        NoFaults,
    );
    let outbox = vec![0u8; area_bytes];
    let busy = ((f64::from(hosts) * fraction_busy).round() as usize).min(usize::from(hosts));
    let clock = Clock::start();
    let config = HostConfig {
        chunk_size: FLEET_CHUNK,
        lease_interval: std::time::Duration::ZERO,
        ..HostConfig::default()
    };
    for k in 0..busy {
        let id = (k * usize::from(hosts) / busy.max(1)) as u16 + 1;
        let mut engine = Box::new(Host::<1>::new(domain, id, geometry, config).map_err(err)?);
        let volume = Uuid([
            (k % 251) as u8 + 1,
            (k / 251) as u8 + 1,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
        ]);
        engine
            .add_volume(volume, 1 << 40, 1 << 41, FLEET_CHUNK, 0)
            .map_err(err)?;
        // The request goes on an in-memory disk through the core's host
        // driver, as a host daemon writes it.
        let mut driver = HostDriver::new(&mut image, *engine, vec![0u8; 3 * AREA_SIZE])
            .map_err(|e| BackendError::new(format!("scan image: {e:?}")))?;
        driver.start(clock.now(), 1).map_err(err)?.map_err(err)?;
        driver
            .engine_mut()
            .handle_allocation(clock.now(), volume, FLEET_CHUNK - 4096);
        driver.write().map_err(err)?;
    }
    let at = geometry.inbox_offset() as usize;
    let inbox = &image.bytes()[at..at + area_bytes];
    let mut times = Vec::new();
    for _ in 0..repeats {
        let mut spm: Box<Spm<1024>> = Box::new(
            Spm::new(
                clock.now(),
                domain,
                geometry,
                0,
                1,
                None,
                SpmConfig::default(),
            )
            .map_err(err)?,
        );
        let t = StdInstant::now();
        spm.handle_hosts(clock.now(), 1, inbox, &outbox);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let queued = spm.queue().len();
        if queued < busy.min(1024) {
            return Err(BackendError::new(format!(
                "scan queued {queued} requests of {busy}: the benchmark's image is wrong"
            )));
        }
    }
    times.sort_by(f64::total_cmp);
    let p50 = percentile(&times, 50.0);
    Ok(json!({
        "hosts": hosts,
        "busy": label,
        "busy_hosts": busy,
        "scan_p50_ms": round(p50, 3),
        "scans_per_s": round(1e3 / p50, 1),
        "mib_per_s": round(2.0 * area_bytes as f64 / (1 << 20) as f64 / (p50 / 1e3), 1),
    }))
}

/// Static memory of the engines on this machine.
fn memory() -> Value {
    json!({
        "spm_1024_bytes": size_of::<Spm<1024>>(),
        "spm_256_bytes": size_of::<Spm<256>>(),
        "host_64_bytes": size_of::<Host<64>>(),
        "default_pool_bytes": size_of::<spmbox_core::pool::DefaultPool>(),
        "note": "size_of on this machine; .ci/run prints the thumbv7em code size",
    })
}

/// A cumulative distribution plot of the latency sets, as SVG.
fn svg(sets: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 40.0);
    let (lo, hi) = (0.1f64.log10(), 10_000f64.log10());
    let x = |ms: f64| left + (ms.max(0.1).log10() - lo) / (hi - lo) * (w - left - 20.0);
    let y = |q: f64| (h - bottom) - q * (h - bottom - 20.0);
    let colors = [
        "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        out += &format!(
            "<line x1=\"{0:.1}\" y1=\"20\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{ms} ms</text>\n",
            x(ms),
            h - bottom,
            h - bottom + 15.0
        );
    }
    for q in [0.0, 0.5, 0.99, 1.0] {
        out += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            w - 20.0,
            left - 5.0,
            y(q) + 4.0
        );
    }
    // VDSM's published ranges, for scale.
    for (k, (label, from, to)) in [
        ("VDSM round trip (events): 0.5-1.0 s", 500.0, 1000.0),
        ("VDSM whole extension: 0.77-1.39 s", 770.0, 1390.0),
    ]
    .into_iter()
    .enumerate()
    {
        out += &format!(
            "<rect x=\"{:.1}\" y=\"20\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#999\" fill-opacity=\"0.15\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{label}</text>\n",
            x(from),
            x(to) - x(from),
            h - bottom - 20.0,
            w - 25.0,
            h - bottom - 30.0 - 14.0 * k as f64
        );
    }
    for (i, (name, samples)) in sets.iter().enumerate() {
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let step = (s.len() / 400).max(1);
        let points: Vec<String> = s
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k == s.len() - 1)
            .map(|(k, ms)| format!("{:.1},{:.1}", x(*ms), y((k + 1) as f64 / s.len() as f64)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{name} ({} samples)</text>\n",
            points.join(" "),
            left + 10.0,
            35.0 + 14.0 * i as f64,
            s.len()
        );
    }
    out += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency (log scale); vertical: fraction of samples at or below</text>\n</svg>\n",
        w / 2.0,
        h - 5.0
    );
    out
}

/// What `spmbox bench` is asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The mailbox device for the no-op runs; default a temporary file.
    pub device: Option<PathBuf>,
    /// About a minute instead of several.
    pub quick: bool,
    /// One JSON object on stdout.
    pub json: bool,
    /// Write the latency plot here.
    pub svg: Option<PathBuf>,
    /// The sections to run; empty: all.
    pub only: Vec<Section>,
}

/// A section of the report (its JSON key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Section {
    /// `round_trip`.
    RoundTrip,
    /// `whole_extension`.
    WholeExtension,
    /// `throughput`.
    Throughput,
    /// `idle`.
    Idle,
    /// `write_rate`.
    WriteRate,
    /// `scan`.
    Scan,
    /// `memory`.
    Memory,
    /// `vm`: real VMs (qemu) on thin volumes.
    Vm,
}

/// `spmbox bench`.
pub fn run(options: &BenchOptions) -> Result<ExitCode, CommandError> {
    let dir = tempfile::Builder::new()
        .prefix("spmbox-bench-")
        .tempdir()
        .map_err(|e| BackendError::new(format!("cannot make a temporary directory: {e}")))?;
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| BackendError::new(e.to_string()))?;
    // The given device is formatted over for each configuration; by
    // default each gets its own file, made at the right size.
    let device_for = |hosts: u16| {
        options
            .device
            .clone()
            .unwrap_or_else(|| dir.path().join(format!("mailbox-{hosts}")))
    };
    let q = options.quick;
    let say = |what: &str| {
        if !options.json {
            eprintln!("bench: {what}");
        }
    };
    let want = |s: Section| options.only.is_empty() || options.only.contains(&s);
    let started = StdInstant::now();
    let mut sets: Vec<(String, Vec<f64>)> = Vec::new();
    let mut report = json!({
        "version": 1,
        "quick": q,
        "device": options.device.as_ref().map_or("temporary files".into(), |d| d.display().to_string()),
    });
    let mut put = |key: &str, v: Value| {
        if let Some(o) = report.as_object_mut() {
            o.insert(key.into(), v);
        }
    };
    if want(Section::RoundTrip) {
        let mut rt = Vec::new();
        for (hosts, samples, burst) in [
            (1u16, if q { 200 } else { 2000 }, 0usize),
            (250, if q { 200 } else { 2000 }, 250),
            (2000, if q { 200 } else { 2000 }, 250),
        ] {
            say(&format!("round trip, {hosts} hosts"));
            for (row, samples) in round_trip(&device_for(hosts), &run_dir, hosts, samples, burst)? {
                sets.push((
                    format!("round trip, {hosts} hosts, {} at once", row["senders"]),
                    samples,
                ));
                rt.push(row);
            }
        }
        put("round_trip", Value::Array(rt));
    }
    if want(Section::WholeExtension) {
        let mut ext = Vec::new();
        for (hosts, volumes) in [(1u16, 1u64), (3, 2)] {
            say(&format!(
                "whole extension, builtin pool, {hosts} hosts x {volumes} volumes"
            ));
            let (row, samples) = whole_extension(
                dir.path(),
                &run_dir,
                hosts,
                volumes,
                if q { 6.0 } else { 30.0 },
            )?;
            sets.push((
                format!("whole extension, builtin, {hosts} x {volumes} guests"),
                samples,
            ));
            ext.push(row);
        }
        say("whole extension, lvm backend, 1 host x 1 volume");
        let (row, samples) = whole_extension_lvm(dir.path(), &run_dir, if q { 4.0 } else { 14.0 })?;
        if let Some(why) = row["skipped"].as_str() {
            say(&format!("whole extension, lvm backend: skipped: {why}"));
        } else {
            sets.push(("whole extension, lvm, 1 x 1 guest".into(), samples));
        }
        ext.push(row);
        put("whole_extension", Value::Array(ext));
    }
    if want(Section::Throughput) {
        let mut tput = Vec::new();
        for volumes in [1usize, 8] {
            say(&format!(
                "throughput, 2000 hosts x {volumes} volumes, no-op backend"
            ));
            tput.push(throughput(
                &device_for(2000),
                &run_dir,
                2000,
                volumes,
                if q { 5.0 } else { 20.0 },
            )?);
        }
        say("throughput, builtin pool, 1000 volumes on a 2000-host mailbox");
        tput.push(throughput_builtin(dir.path(), &run_dir, 2000, 1000)?);
        put("throughput", Value::Array(tput));
    }
    if want(Section::Idle) {
        let mut idles = Vec::new();
        for hosts in [250u16, 2000] {
            say(&format!("idle, {hosts} hosts"));
            // A file of its own: after the throughput runs' writes, the
            // same file's reads cost the idle SPM measurably more CPU.
            let device = options
                .device
                .clone()
                .unwrap_or_else(|| dir.path().join(format!("idle-{hosts}")));
            idles.push(idle(&device, &run_dir, hosts, if q { 5.0 } else { 31.0 })?);
        }
        put("idle", Value::Array(idles));
    }
    if want(Section::WriteRate) {
        say("guest write rate, 256 MiB chunks");
        let rate = write_rate(
            dir.path(),
            &run_dir,
            256 << 20,
            if q { 1 << 30 } else { 8 << 30 },
        )?;
        put("write_rate", rate);
    }
    if want(Section::Scan) {
        let mut scans = Vec::new();
        for (f, label) in [(0.0, "empty"), (0.01, "1%"), (1.0, "all")] {
            say(&format!("scan, {label}"));
            scans.push(scan(f, label, if q { 20 } else { 200 })?);
        }
        put("scan", Value::Array(scans));
    }
    if want(Section::Memory) {
        put("memory", memory());
    }
    if want(Section::Vm) {
        say("VMs: threshold to refresh, write rate thin vs preallocated, LUN added to resumed");
        put("vm", vm_bench(dir.path(), &run_dir, q)?);
    }
    put("seconds", json!(round(started.elapsed().as_secs_f64(), 1)));
    if let Some(path) = &options.svg {
        std::fs::write(path, svg(&sets))
            .map_err(|e| BackendError::new(format!("cannot write {}: {e}", path.display())))?;
    }
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
        );
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// One latency row of the table, in columns (a JSON value ignores width,
/// so each is made a string first).
fn latency_line(o: &mut String, label: &str, row: &Value) {
    use std::fmt::Write as _;
    let cell = |key: &str| row[key].to_string();
    let _ = writeln!(
        o,
        "{label:<44} {:>10} {:>10} {:>10} {:>8}",
        cell("p50_ms"),
        cell("p99_ms"),
        cell("max_ms"),
        cell("samples")
    );
}

fn table(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<44} {:>10} {:>10} {:>10} {:>8}",
        "latency", "p50 ms", "p99 ms", "max ms", "samples"
    );
    if r.get("round_trip").is_some() {
        let _ = writeln!(o, "round trip (no-op backend)");
    }
    for row in r["round_trip"].as_array().into_iter().flatten() {
        let label = format!(
            "  {} hosts, {} sending at once",
            row["hosts"], row["senders"]
        );
        latency_line(&mut o, &label, row);
    }
    for row in r["whole_extension"].as_array().into_iter().flatten() {
        if let Some(why) = row["skipped"].as_str() {
            let _ = writeln!(
                o,
                "whole extension ({}): skipped, {why}",
                row["backend"].as_str().unwrap_or("")
            );
            continue;
        }
        let label = format!(
            "whole extension ({}, {} hosts, {} guests)",
            row["backend"].as_str().unwrap_or(""),
            row["hosts"],
            row["volumes"]
        );
        latency_line(&mut o, &label, row);
        if let Some(lvextend) = row["lvextend_ms_mean"].as_f64() {
            let _ = writeln!(
                o,
                "  lvextend itself: {lvextend} ms on average; device-mapper: {}",
                row["device_mapper"]
            );
        }
    }
    for t in r["throughput"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "throughput, {} backend, {} of {} hosts x {} volumes: {} extensions/s ({} in {} s; SPM {} % of a core, {} per SPM CPU second)",
            t["backend"].as_str().unwrap_or(""),
            t["sending_hosts"],
            t["hosts"],
            t["volumes_per_host"],
            t["extensions_per_s"],
            t["extensions"],
            t["seconds"],
            t["spm_cpu_percent"],
            t["extensions_per_spm_cpu_s"]
        );
    }
    for row in r["idle"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "idle SPM, {} hosts: {} % of a core, {}/s read with full scans ({}/s between them)",
            row["hosts"],
            row["cpu_percent"],
            Bytes(row["read_bytes_per_s"].as_f64().unwrap_or(0.0) as u64),
            Bytes(row["measured_read_bytes_per_s"].as_f64().unwrap_or(0.0) as u64)
        );
    }
    if let Some(w) = r.get("write_rate") {
        let _ = writeln!(
            o,
            "guest write rate, {} chunks: {} MiB/s, {} pauses, {} extensions (device {} MiB/s; making the data {} MiB/s)",
            Bytes(w["chunk_size"].as_u64().unwrap_or(0)),
            w["mib_per_s"],
            w["pauses"],
            w["extensions"],
            w["device_mib_per_s"],
            w["fill_mib_per_s"]
        );
    }
    for row in r["scan"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "core scan of a 2000-host mailbox, {} busy: {} ms ({} scans/s, {} MiB/s)",
            row["busy"].as_str().unwrap_or(""),
            row["scan_p50_ms"],
            row["scans_per_s"],
            row["mib_per_s"]
        );
    }
    if let Some(m) = r.get("memory") {
        let _ = writeln!(
            o,
            "engine state: Spm<1024> {} B, Host<64> {} B, DefaultPool {} B",
            m["spm_1024_bytes"], m["host_64_bytes"], m["default_pool_bytes"]
        );
    }
    if let Some(v) = r.get("vm") {
        if let Some(why) = v["skipped"].as_str() {
            let _ = writeln!(o, "VMs: skipped, {why}");
        } else {
            let t = &v["threshold_to_refresh"];
            latency_line(&mut o, "VM: write threshold event to refreshed", t);
            let _ = writeln!(
                o,
                "{:<44} {:>10} {:>10} {:>10}",
                "  VDSM (min / avg / max)", 770, 1150, 1390
            );
            let w = &v["write_rate"];
            let _ = writeln!(
                o,
                "VM write rate (median of {}): thin volume {} MiB/s ({} ENOSPC pauses, {} \
                 extensions), preallocated raw file {} MiB/s: ratio {}; a qcow2 file {} MiB/s; \
                 rounds: thin {}, raw {}, qcow2 file {}",
                w["rounds"],
                w["thin_mib_per_s"],
                w["enospc_pauses"],
                w["extensions"],
                w["raw_mib_per_s"],
                w["ratio"],
                w["qcow2_file_mib_per_s"],
                w["thin_rounds_mib_per_s"],
                w["raw_rounds_mib_per_s"],
                w["qcow2_file_rounds_mib_per_s"]
            );
            let l = &v["lun_added_to_resumed"];
            let _ = writeln!(
                o,
                "VM: LUN added to all {} paused VMs running: {} ms",
                l["vms"], l["all_running_ms"]
            );
        }
    }
    let _ = writeln!(o, "bench took {} s", r["seconds"]);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_all_samples() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 50.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
    }

    #[test]
    fn the_plot_is_svg_with_one_line_per_set() {
        let text = svg(&[("a".into(), vec![1.0, 2.0, 30.0]), ("b".into(), vec![0.5])]);
        assert!(text.starts_with("<svg"));
        assert_eq!(text.matches("<polyline").count(), 2);
        assert!(text.trim_end().ends_with("</svg>"));
    }
}
