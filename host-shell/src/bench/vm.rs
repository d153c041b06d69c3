//! The VM section: real VMs writing their disks through the host daemon.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant as StdInstant};

use serde_json::{Value, json};
use spmbox_core::wire::Uuid;

use super::spm::{Backend, SpmThread};
use super::{guest_host_options, preallocate};
use crate::backend::builtin::{self, BuiltinMaps, CreateOptions};
use crate::backend::{BackendError, SpmBackend};
use crate::daemon::control;
use crate::io::mailbox;
use crate::stats::{percentile, round};

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
                .map_err(|e| BackendError::io(format!("cannot make {}", lun.display()), e))?;
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
            let id = mailbox::random_uuid()?;
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
        let lun = std::fs::canonicalize(&luns[1])?;
        lun_added = Some(StdInstant::now());
        control::control_request(&control, &json!({"op": "add_lun", "path": lun}))?;
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
pub(super) fn vm_bench(dir: &Path, run_dir: &Path, quick: bool) -> Result<Value, BackendError> {
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
            .map_err(|e| BackendError::io("running qemu-img", e))?;
        if !out.status.success() {
            return Err(BackendError::new(format!(
                "bench: qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    } else {
        std::fs::File::create(&raw)
            .and_then(|f| preallocate(&f, bytes))
            .map_err(|e| BackendError::io(format!("cannot make {}", raw.display()), e))?;
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
        .map_err(|e| BackendError::io("running qemu", e))?;
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
