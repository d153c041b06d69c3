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

mod fleet;
mod lvm;
mod report;
mod spm;
mod vm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant as StdInstant};

use serde_json::{Value, json};
use spmbox_core::host::{Host, HostConfig};
use spmbox_core::pool::max_size;
use spmbox_core::spm::{Spm, SpmConfig};
use spmbox_core::wire::{AREA_SIZE, Uuid};

use crate::backend::builtin::{self, BuiltinMaps, CreateOptions};
use crate::backend::{BackendError, SpmBackend};
use crate::cli::args::BenchArgs;
use crate::cli::commands::{CommandError, EXIT_OK};
use crate::io::device::{Access, AlignedBuf};
use crate::io::mailbox::{self, FormatOptions};
use crate::stats::{percentile, round};
use fleet::{FLEET_CHUNK, Fleet};
use lvm::whole_extension_lvm;
use report::{Dist, merge, svg, table};
use spm::{Backend, SpmRun, SpmThread, scan, thread_cpu_seconds};
use vm::vm_bench;

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(e.to_string())
}

/// Allocates `len` bytes of `file` (as a LUN's blocks are, unlike a sparse
/// file's, whose first writes would also write file system metadata).
fn preallocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
        .map_err(std::io::Error::from)
}

/// A fresh mailbox for `hosts` on `device` (the no-op SPM's domain). A
/// file made for it is written whole first: a LUN's blocks are there from
/// the start, while a new file's first writes would also allocate blocks
/// (and an early burst would measure the file system).
fn fresh_mailbox(device: &Path, hosts: u16) -> Result<(), BackendError> {
    if !device.exists() {
        let size = spmbox_core::wire::Geometry::new(hosts, 512)
            .map_err(err)?
            .mailbox_size();
        let file = std::fs::File::create_new(device)
            .and_then(|f| {
                use std::io::Write;
                let mut w = std::io::BufWriter::new(&f);
                let zeros = vec![0u8; 1 << 20];
                let mut left = size;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    w.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                w.flush()?;
                drop(w);
                f.sync_all()?;
                Ok(f)
            })
            .map_err(|e| BackendError::io(format!("cannot make {}", device.display()), e))?;
        drop(file);
    }
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
/// (cycling over the hosts), then `rounds` bursts of `burst` hosts at
/// once.
fn round_trip(
    device: &Path,
    run_dir: &Path,
    hosts: u16,
    samples: usize,
    burst: usize,
    rounds: usize,
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
        fleet.answer_all(deadline, "round trips")?;
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
        // Hosts at once, as on their own machines: their areas written
        // together, their rings at the same moment, so that the doorbell
        // keeps one of each pass's rings (see the fleet's batched mode).
        fleet.batch(true)?;
        for round in 0..rounds {
            for k in 0..senders {
                fleet.ask((k * n / senders + round) % n);
            }
            fleet.answer_all(deadline, "burst round trips")?;
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

/// Round trips of one host that fills all 31 slots of its area at once,
/// `rounds` times, on a mailbox of `hosts` with a fresh SPM: the SPM takes
/// at most 8 requests of one host at a time (docs/protocol.md 1.3) and
/// reads the host's area again as each is answered, so the 31st waits for
/// three rounds of answers, not for a full scan or a resend.
fn all_slots(
    device: &Path,
    run_dir: &Path,
    hosts: u16,
    rounds: usize,
) -> Result<(Value, Vec<f64>), BackendError> {
    let slots = usize::from(spmbox_core::wire::SLOTS_PER_AREA);
    fresh_mailbox(device, hosts)?;
    let spm = SpmThread::start(device, run_dir, Backend::Noop)?;
    let mut volumes = Vec::new();
    for _ in 0..slots {
        volumes.push((mailbox::random_uuid()?, 1u64 << 40, fleet::FLEET_CHUNK));
    }
    let mut fleet = Fleet::with_volumes(device, vec![(hosts, volumes)])?;
    let deadline = StdInstant::now() + Duration::from_secs(120);
    let mut samples = Vec::new();
    for _ in 0..rounds {
        for v in 0..slots {
            fleet.ask_volume(0, v);
        }
        fleet.answer_all(deadline, "the round trips of one host using all its slots")?;
        samples.append(&mut fleet.round_trips);
    }
    drop(fleet);
    spm.stop()?;
    let mut row = json!({"hosts": hosts, "senders": 1, "slots": slots, "backend": "noop"});
    merge(
        &mut row,
        Dist {
            samples: samples.clone(),
        }
        .summary(),
    );
    Ok((row, samples))
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
            vols.push((mailbox::random_uuid()?, 1u64 << 40, FLEET_CHUNK));
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
    fleet.batch(false)?;
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
        .map_err(|e| BackendError::io(format!("cannot make {}", lun.display()), e))?;
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
            let v = mailbox::random_uuid()?;
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
        no_spm_warning: crate::daemon::host::NO_SPM_WARNING,
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
        .map_err(|e| BackendError::io(format!("cannot make {}", lun.display()), e))?;
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
    let volume = mailbox::random_uuid()?;
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

/// MiB/s of `bytes` written from the start of `path` in `write_size`
/// O_DIRECT writes of one buffer, then synced.
fn raw_write_rate(path: &Path, bytes: u64, write_size: usize) -> Result<f64, BackendError> {
    let device = crate::io::device::Device::open(path, Access::ReadWrite)?;
    let mut buf = AlignedBuf::zeroed(write_size, device.dio_mem_align().max(4096));
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let started = StdInstant::now();
    let mut at = 0;
    while at + write_size as u64 <= bytes {
        device.write_at(at, &buf)?;
        at += write_size as u64;
    }
    device.sync_data()?;
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
        .map_err(|e| BackendError::io(format!("cannot make {}", lun.display()), e))?;
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
                let v = mailbox::random_uuid()?;
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
pub fn run(options: &BenchArgs) -> Result<ExitCode, CommandError> {
    let dir = tempfile::Builder::new()
        .prefix("spmbox-bench-")
        .tempdir()
        .map_err(|e| BackendError::io("cannot make a temporary directory", e))?;
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir)?;
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
            for (row, samples) in round_trip(
                &device_for(hosts),
                &run_dir,
                hosts,
                samples,
                burst,
                if q { 3 } else { 10 },
            )? {
                sets.push((
                    format!("round trip, {hosts} hosts, {} at once", row["senders"]),
                    samples,
                ));
                rt.push(row);
            }
        }
        say("round trip, one host using all its slots");
        let (row, samples) = all_slots(&device_for(250), &run_dir, 250, if q { 3 } else { 20 })?;
        sets.push(("round trip, one host, all 31 slots".into(), samples));
        rt.push(row);
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
            .map_err(|e| BackendError::io(format!("cannot write {}", path.display()), e))?;
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
