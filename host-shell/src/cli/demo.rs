//! `spmbox demo`: a whole domain on temporary files, no root, no lvm2.
//!
//! The demo runs the real binary as separate processes sharing only the
//! domain's files, as hosts on a SAN share only LUNs: it creates a domain
//! whose first LUN is too small for what the guests will write, starts the
//! SPM and three hosts with two guests each, shows progress once a second,
//! adds a LUN once every guest has paused for lack of space (or after a
//! while), waits for every guest to finish, stops the SPM, and reads back
//! and checks every byte the guests wrote.
//!
//! With `--vm` the guests are real VMs: qemu runs each on a qcow2 image on
//! its volume, exported over NBD by its host; the hosts arm qemu's write
//! threshold, qemu pauses the VMs on ENOSPC when the pool is exhausted and
//! the hosts resume them after the LUN is added. Each VM reads back and
//! checks what it wrote, and its host checks the image again through the
//! qcow2 layer after the VM exits.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spmbox_core::wire::Uuid;

use crate::backend::builtin::{self, BuiltinMaps, CreateOptions};
use crate::backend::{BackendError, VolumeMaps};
use crate::cli::args::DemoArgs;
use crate::cli::commands::{CommandError, EXIT_ERROR, EXIT_OK};
use crate::daemon::guest::{self, Devices};
use crate::units::Bytes;

const HOSTS: u16 = 3;
const VOLUMES_PER_HOST: usize = 2;
const EXTENT: u64 = 4 << 20;
const VIRTUAL: u64 = 96 << 20;
const INITIAL: u64 = 8 << 20;
const CHUNK: &str = "16M";
const RATE: &str = "48M";
/// The first LUN: room for the initial extents and a little more.
const FIRST_LUN_EXTENTS: u64 = 24;
/// How long the demo waits for every guest to pause before it adds the LUN.
const PAUSE_WAIT: Duration = Duration::from_secs(20);
/// How long the guests get to finish after the LUN is added.
const FINISH_WAIT: Duration = Duration::from_secs(120);
/// With `--vm`: VMs per host (host 1 runs two).
const VM_VOLUMES: [usize; 3] = [2, 1, 1];
/// With `--vm`: each volume's virtual size, and what its VM writes.
const VM_VIRTUAL: u64 = 64 << 20;
const VM_GUEST_BYTES: &str = "40M";
/// With `--vm`: each VM's write rate (TCG guests on few cores).
const VM_RATE: &str = "16M";
/// With `--vm`: how long the VMs get to pause (they boot first).
const VM_PAUSE_WAIT: Duration = Duration::from_secs(60);

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first 8 characters of a volume id.
fn short(v: &Value) -> String {
    v.as_str().unwrap_or("?").chars().take(8).collect()
}

fn spmbox() -> Result<PathBuf, CommandError> {
    Ok(std::env::current_exe()?)
}

fn sparse(path: &Path, size: u64) -> Result<(), CommandError> {
    let f = std::fs::File::create_new(path)?;
    f.set_len(size)?;
    Ok(())
}

#[derive(Default, Clone, Copy)]
struct HostCount {
    extensions: u64,
    pauses: u64,
    resumes: u64,
    paused_now: u64,
    done: u64,
    thresholds: u64,
    vm_failures: u64,
    /// Bytes the VMs that finished without an error read back good.
    vm_verified: u64,
}

/// Runs the demo; with `--vm`, real VMs instead of simulated guests.
pub fn run(args: &DemoArgs) -> Result<ExitCode, CommandError> {
    let DemoArgs {
        json: json_out,
        keep,
        vm,
    } = *args;
    let started = Instant::now();
    if vm {
        crate::vm::image::find_tools().map_err(|e| CommandError::Missing(e.to_string()))?;
    }
    let per_host = |host: u16| {
        if vm {
            VM_VOLUMES[usize::from(host - 1) % VM_VOLUMES.len()]
        } else {
            VOLUMES_PER_HOST
        }
    };
    let virtual_size = if vm { VM_VIRTUAL } else { VIRTUAL };
    let guests: u64 = (1..=HOSTS).map(|h| per_host(h) as u64).sum();
    let tmp = tempfile::Builder::new().prefix("spmbox-demo-").tempdir()?;
    let dir = tmp.path().to_owned();
    let say = |line: String| {
        if !json_out {
            println!("{line}");
        }
    };
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir)?;

    // 1. The domain: a first LUN too small for what the guests write.
    let device = dir.join("domain");
    let lun1 = dir.join("lun1");
    let lun2 = dir.join("lun2");
    sparse(&lun1, builtin::LUN_DATA_OFFSET + FIRST_LUN_EXTENTS * EXTENT)?;
    let needed = guests * (virtual_size + virtual_size / 10 + 2 * EXTENT);
    sparse(&lun2, builtin::LUN_DATA_OFFSET + needed)?;
    let (domain_id, _) = builtin::create(
        &device,
        std::slice::from_ref(&lun1),
        &CreateOptions {
            hosts: 250,
            sector_size: None,
            domain: None,
            extent_size: EXTENT,
            force: false,
        },
    )?;
    say(format!(
        "domain {domain_id} in {}: 250 host ids, LUN 1 of {} extents of {}",
        dir.display(),
        FIRST_LUN_EXTENTS,
        Bytes(EXTENT)
    ));

    // 2. The SPM.
    let exe = spmbox()?;
    let mut children = Children(Vec::new());
    let log = |name: &str| -> Result<std::fs::File, CommandError> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
    };
    let control = run_dir.join("spm.sock");
    let spm = Command::new(&exe)
        .args(["-v", "spm", "--device"])
        .arg(&device)
        .arg("--control")
        .arg(&control)
        .env("SPMBOX_RUN_DIR", &run_dir)
        .stdout(Stdio::null())
        .stderr(log("spm")?)
        .spawn()?;
    children.0.push(("spm".into(), spm));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !control.exists() {
        if Instant::now() > deadline {
            return Err(BackendError::new(format!(
                "the SPM did not start within 15 s; see {}",
                dir.join("spm.log").display()
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut vm_boot: Option<crate::vm::VmSetup> = None;
    // 3. Volumes, through the running SPM.
    let mut volumes: Vec<(u16, Uuid)> = Vec::new();
    for host in 1..=HOSTS {
        for _ in 0..per_host(host) {
            let id = crate::io::mailbox::random_uuid()?;
            crate::daemon::control::control_request(
                &control,
                &json!({"op": "create_volume", "id": id.to_string(), "virtual_size": virtual_size, "initial_size": INITIAL}),
            )?;
            volumes.push((host, id));
        }
    }
    if vm {
        say(format!(
            "{} volumes of {} virtual, {} allocated; {} hosts running {} VMs, each writing \
             {VM_GUEST_BYTES} at {VM_RATE}/s to a qcow2 image on its volume",
            volumes.len(),
            Bytes(virtual_size),
            Bytes(INITIAL),
            HOSTS,
            guests
        ));
        // One initramfs for every host (they find it in the cache).
        let setup = crate::vm::VmSetup::prepare(&crate::vm::VmOptions {
            dir: run_dir.join("vm-image"),
            kernel: None,
            initrd: None,
            rate: 0,
            write_size: 0,
            guest_bytes: None,
        })?;
        say(format!(
            "        VM: kernel {}, initramfs {}",
            setup.kernel().display(),
            setup.initramfs().display()
        ));
        vm_boot = Some(setup);
    } else {
        say(format!(
            "{} volumes of {} virtual, {} allocated; {} hosts with {} guests each writing {RATE}/s",
            volumes.len(),
            Bytes(VIRTUAL),
            Bytes(INITIAL),
            HOSTS,
            VOLUMES_PER_HOST
        ));
    }

    // 4. Hosts, reporting events as JSON lines.
    let (tx, rx) = mpsc::channel::<(u16, Value)>();
    for host in 1..=HOSTS {
        let mut cmd = Command::new(&exe);
        cmd.args(["-v", "host", "--device"])
            .arg(&device)
            .args([
                "--host-id",
                &host.to_string(),
                "--rate",
                if vm { VM_RATE } else { RATE },
                "--chunk-size",
                CHUNK,
            ])
            .args(["--exit-when-done", "--json-events"])
            .env("SPMBOX_RUN_DIR", &run_dir)
            .stdout(Stdio::piped())
            .stderr(log(&format!("host{host}"))?);
        for (_, v) in volumes.iter().filter(|(h, _)| *h == host) {
            cmd.args(["--volume", &v.to_string()]);
        }
        if let Some(setup) = &vm_boot {
            cmd.args(["--vm", "--guest-bytes", VM_GUEST_BYTES, "--vm-initrd"])
                .arg(setup.initramfs())
                .arg("--vm-kernel")
                .arg(setup.kernel());
        }
        let mut child = cmd.spawn()?;
        let out = child.stdout.take();
        children.0.push((format!("host{host}"), child));
        let tx = tx.clone();
        if let Some(out) = out {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && tx.send((host, v)).is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
    drop(tx);

    // 5. Watch: add the LUN once every guest paused, wait for the rest.
    let mut counts = vec![HostCount::default(); usize::from(HOSTS) + 1];
    let mut latencies = crate::stats::Percentiles::new();
    let mut lun_added: Option<Instant> = None;
    let total_guests = volumes.len() as u64;
    let mut last_print = Instant::now();
    let watch_start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((host, v)) => {
                let c = &mut counts[usize::from(host)];
                match v["event"].as_str() {
                    Some("extended") => {
                        c.extensions += 1;
                        if let Some(ms) = v["total_ms"].as_f64() {
                            latencies.record(ms);
                        }
                    }
                    // A VM's pauses are the ones qemu reports.
                    Some("paused") if !vm => {
                        c.pauses += 1;
                        c.paused_now += 1;
                    }
                    Some("resumed") if !vm => {
                        c.resumes += 1;
                        c.paused_now = c.paused_now.saturating_sub(1);
                    }
                    Some("done") => c.done += 1,
                    Some("vm_paused") => {
                        c.pauses += 1;
                        c.paused_now += 1;
                        say(format!(
                            "{:>5.1}s  host {host}: qemu paused the VM of {} (ENOSPC at {})",
                            started.elapsed().as_secs_f64(),
                            short(&v["volume"]),
                            Bytes(v["physical"].as_u64().unwrap_or(0))
                        ));
                    }
                    Some("vm_resumed") => {
                        c.resumes += 1;
                        c.paused_now = c.paused_now.saturating_sub(1);
                        say(format!(
                            "{:>5.1}s  host {host}: the VM of {} resumed (cont)",
                            started.elapsed().as_secs_f64(),
                            short(&v["volume"])
                        ));
                    }
                    Some("vm_threshold") => c.thresholds += 1,
                    Some("vm_exited") => {
                        c.done += 1;
                        let ok = v["ok"].as_bool().unwrap_or(false);
                        let r = &v["vm"]["result"];
                        if ok {
                            c.vm_verified += r["verified"].as_u64().unwrap_or(0);
                        } else {
                            c.vm_failures += 1;
                        }
                        say(format!(
                            "{:>5.1}s  host {host}: the VM of {} finished: wrote {}, verified {}, \
                             {} errors; image check through qcow2: {}",
                            started.elapsed().as_secs_f64(),
                            short(&v["volume"]),
                            Bytes(r["written"].as_u64().unwrap_or(0)),
                            Bytes(r["verified"].as_u64().unwrap_or(0)),
                            r["errors"].as_u64().unwrap_or(0),
                            match &v["vm"]["image_check"] {
                                Value::Object(c) if c["ok"] == true => "ok".to_owned(),
                                Value::Object(c) =>
                                    c["error"].as_str().unwrap_or("failed").to_owned(),
                                _ => "not run".to_owned(),
                            }
                        ));
                    }
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let paused: u64 = counts.iter().map(|c| c.paused_now).sum();
        let done: u64 = counts.iter().map(|c| c.done).sum();
        let pause_wait = if vm { VM_PAUSE_WAIT } else { PAUSE_WAIT };
        if lun_added.is_none()
            && (paused + done >= total_guests && paused > 0 || watch_start.elapsed() > pause_wait)
        {
            say(format!(
                "{:>5.1}s  pool exhausted: {paused} of {total_guests} guests paused; adding LUN 2",
                started.elapsed().as_secs_f64()
            ));
            let lun = std::fs::canonicalize(&lun2)?;
            let answer = crate::daemon::control::control_request(
                &control,
                &json!({"op": "add_lun", "path": lun}),
            )?;
            say(format!(
                "        {}",
                answer
                    .as_ref()
                    .and_then(|a| a["message"].as_str())
                    .unwrap_or("LUN added")
            ));
            lun_added = Some(Instant::now());
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let line: Vec<String> = (1..=HOSTS)
                .map(|h| {
                    let c = counts[usize::from(h)];
                    format!(
                        "host {h}: {}{} ext {} paused {} resumed{}",
                        if vm {
                            format!("{} thr ", c.thresholds)
                        } else {
                            String::new()
                        },
                        c.extensions,
                        c.pauses,
                        c.resumes,
                        if c.paused_now > 0 {
                            format!(" ({} waiting)", c.paused_now)
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            say(format!(
                "{:>5.1}s  {}",
                started.elapsed().as_secs_f64(),
                line.join(" | ")
            ));
        }
        if lun_added.is_some_and(|t| t.elapsed() > FINISH_WAIT) {
            return Err(BackendError::new(format!(
                "the guests did not finish within {FINISH_WAIT:?} of the LUN being added; logs in {}",
                dir.display()
            ))
            .into());
        }
    }
    // Hosts have exited (their stdout closed); collect their status.
    let mut failed = Vec::new();
    for (name, child) in children.0.iter_mut().filter(|(n, _)| n != "spm") {
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("{name} exited with {status}"));
        }
    }
    // Stop the SPM gracefully.
    if let Some((_, spm)) = children.0.iter_mut().find(|(n, _)| n == "spm") {
        let pid = rustix::process::Pid::from_child(spm);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let status = spm.wait()?;
        if !status.success() {
            failed.push(format!("the SPM exited with {status}"));
        }
    }
    children.0.clear();

    // 6. Read back every byte.
    let mut maps = BuiltinMaps::open(&device, vec![dir.clone()])?;
    let mut devices = Devices::new();
    let mut bytes_verified = 0u64;
    let mut data_errors = 0u64;
    let mut first_errors = Vec::new();
    for (_, volume) in volumes.iter().filter(|_| !vm) {
        let map = maps.refresh(*volume)?;
        let upto = VIRTUAL.min(map.size);
        let report = guest::verify(*volume, &map, &mut devices, upto)
            .map_err(crate::backend::BackendError::from)?;
        bytes_verified += report.bytes_verified;
        data_errors += report.error_count;
        for bad in report.errors.iter().take(3) {
            first_errors.push(format!(
                "volume {volume} offset {}: {}",
                bad.offset, bad.defect
            ));
        }
    }
    let extensions: u64 = counts.iter().map(|c| c.extensions).sum();
    let pauses: u64 = counts.iter().map(|c| c.pauses).sum();
    let resumes: u64 = counts.iter().map(|c| c.resumes).sum();
    if vm {
        // Each VM read back what it wrote and its host checked the image
        // through qcow2; a failure of either is a data error here.
        data_errors += counts.iter().map(|c| c.vm_failures).sum::<u64>();
        bytes_verified = counts.iter().map(|c| c.vm_verified).sum();
    }
    let mut summary = json!({
        "domain": domain_id.to_string(),
        "hosts": HOSTS,
        "volumes": volumes.len(),
        "extensions": extensions,
        "pauses": pauses,
        "resumes": resumes,
        "bytes_verified": bytes_verified,
        "latency_ms_p50": latencies.percentile(50.0),
        "latency_ms_p99": latencies.percentile(99.0),
        "data_errors": data_errors,
        "process_failures": failed,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "kept": if keep { Some(dir.display().to_string()) } else { None },
    });
    if vm {
        summary["vms"] = json!(volumes.len());
        summary["enospc_pauses"] = json!(pauses);
        summary["threshold_events"] = json!(counts.iter().map(|c| c.thresholds).sum::<u64>());
    }
    if json_out {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?
        )?;
    } else {
        println!(
            "summary: {extensions} extensions, {pauses} pauses, {resumes} resumes; \
             extension latency p50 {:.1} ms, p99 {:.1} ms",
            latencies.percentile(50.0),
            latencies.percentile(99.0)
        );
        println!(
            "verified {} written by {} {}: {data_errors} data errors",
            Bytes(bytes_verified),
            volumes.len(),
            if vm {
                "VMs (each read back in the VM, and through qcow2 by its host)"
            } else {
                "guests"
            }
        );
        for e in &first_errors {
            println!("  {e}");
        }
        for f in &failed {
            println!("  {f}");
        }
        if keep {
            println!("kept {} (logs: spm.log, host1.log, ...)", dir.display());
        }
    }
    if keep {
        let _ = tmp.keep();
    }
    let ok = data_errors == 0 && failed.is_empty() && pauses > 0 && resumes == pauses;
    Ok(ExitCode::from(if ok { EXIT_OK } else { EXIT_ERROR }))
}
