//! Real VMs on thin volumes, through the real binary: qemu runs a guest
//! whose disk is a qcow2 image on a spmbox volume (exported over NBD by its
//! host); the guest writes verifiable data, qemu reports the write
//! threshold, pauses the VM on ENOSPC when the pool is exhausted, and the
//! host resumes it once the volume was extended. Every test checks the
//! data twice: the guest reads back what it wrote, and the host reads the
//! image back through qcow2 after the VM exits.
//!
//! Needs qemu-system-x86, qemu-utils, a kernel with virtio modules and
//! busybox-static; without them each test prints `skipped: <why>`.

mod common;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Loop, loop_devices_missing};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Why VMs cannot run here, if they cannot.
fn vms_missing() -> Option<String> {
    spmbox::vm::image::find_tools().err().map(|e| e.to_string())
}

macro_rules! need_vms {
    ($name:expr) => {
        if let Some(why) = vms_missing() {
            eprintln!("skipped: {}: {why}", $name);
            return;
        }
    };
}

/// Why lvm2 on loop devices cannot run here, if it cannot.
fn lvm_missing() -> Option<String> {
    if let Some(why) = loop_devices_missing() {
        return Some(why);
    }
    let ok = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok("lvm", "version") {
        return Some("needs lvm2 (apt-get install lvm2)".into());
    }
    None
}

/// A running `spmbox host --vm --json-events`: its events as they come.
struct HostProc {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl HostProc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A domain on files (or, for lvm, loop devices) with one host's VMs.
struct VmDomain {
    dir: tempfile::TempDir,
    device: PathBuf,
    run: PathBuf,
    control: PathBuf,
    luns: Vec<PathBuf>,
    backend: Vec<String>,
    logs: u32,
    _lvm: Option<spmbox::backend::lvm::VgRemoval>,
    _loops: Vec<Loop>,
}

impl Drop for VmDomain {
    fn drop(&mut self) {
        // qemu is daemonized (VMs outlive their host daemon): stop every
        // VM this domain started.
        for pid in qemu_pids(&self.run) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// The pids in the VMs' pid files under `run`.
fn qemu_pids(run: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for host in fs::read_dir(run).into_iter().flatten().flatten() {
        for vm in fs::read_dir(host.path()).into_iter().flatten().flatten() {
            if let Ok(t) = fs::read_to_string(vm.path().join("qemu.pid"))
                && let Ok(pid) = t.trim().parse()
            {
                pids.push(pid);
            }
        }
    }
    pids
}

impl VmDomain {
    /// LUN sizes in MiB; extents of 4 MiB. The first LUN makes the pool;
    /// the others are there to add.
    fn new(luns_mib: &[u64], lvm: bool) -> VmDomain {
        let dir = tempfile::tempdir()
            .or_else(|_| tempfile::tempdir_in("/var/tmp"))
            .expect("temp dir");
        let run = dir.path().join("run");
        fs::create_dir_all(&run).unwrap();
        let file = |name: &str, size: u64| {
            let p = dir.path().join(name);
            fs::File::create(&p).unwrap().set_len(size).unwrap();
            p
        };
        let mut luns: Vec<PathBuf> = luns_mib
            .iter()
            .enumerate()
            .map(|(i, m)| file(&format!("lun{}", i + 1), m * MIB))
            .collect();
        let mut device = dir.path().join("domain");
        let mut loops = Vec::new();
        let mut backend = Vec::new();
        let mut vg_removal = None;
        if lvm {
            let domain = file("domain", 16 * MIB);
            loops.push(Loop::attach(&domain, 512));
            for l in &luns {
                loops.push(Loop::attach(l, 512));
            }
            device = loops[0].dev.clone();
            luns = loops[1..].iter().map(|l| l.dev.clone()).collect();
            let vg = format!("spmboxvm{}", std::process::id());
            backend = vec!["--backend".into(), "lvm".into(), "--vg".into(), vg.clone()];
            for pv in &luns {
                backend.push("--pv".into());
                backend.push(pv.display().to_string());
            }
            vg_removal = Some(spmbox::backend::lvm::VgRemoval {
                vg,
                pvs: luns.clone(),
            });
        }
        let d = VmDomain {
            control: run.join("spm.sock"),
            dir,
            device,
            run,
            luns,
            backend,
            logs: 0,
            _lvm: vg_removal,
            _loops: loops,
        };
        let out = d.cli(&[
            "pool",
            "create",
            "--device",
            d.path(),
            "--lun",
            d.luns[0].to_str().unwrap(),
            "--hosts",
            "4",
            "--extent-size",
            "4M",
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        d
    }

    fn path(&self) -> &str {
        self.device.to_str().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let takes_backend = matches!(args.first(), Some(&"pool" | &"volume" | &"spm" | &"host"));
        let mut all: Vec<&str> = args.to_vec();
        if takes_backend {
            all.extend(self.backend.iter().map(String::as_str));
        }
        Command::new(bin())
            .args(&all)
            .env("SPMBOX_RUN_DIR", &self.run)
            .output()
            .expect("run spmbox")
    }

    fn log(&mut self, name: &str) -> fs::File {
        self.logs += 1;
        fs::File::create(self.dir.path().join(format!("{name}.{}.log", self.logs))).unwrap()
    }

    /// The tail of every log, and every VM's console.
    fn logs_text(&self) -> String {
        let mut paths: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        for host in fs::read_dir(&self.run).into_iter().flatten().flatten() {
            for vm in fs::read_dir(host.path()).into_iter().flatten().flatten() {
                paths.push(vm.path().join("serial.log"));
            }
        }
        paths.sort();
        let mut out = String::new();
        for p in paths {
            let t = fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            out += &format!("\n--- {}\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }

    fn start_spm(&mut self) -> Proc {
        let log = self.log("spm");
        let spm = Proc(
            Command::new(bin())
                .args(["-vv", "spm", "--device", self.path(), "--control"])
                .arg(&self.control)
                .args(["--full-scan-interval", "300ms"])
                .args(&self.backend)
                .env("SPMBOX_RUN_DIR", &self.run)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn spm"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&[
                "status",
                "--device",
                self.path(),
                "--control",
                self.control.to_str().unwrap(),
                "--json",
            ]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v["spm"]["state"] == "active" && v["pool_source"] == "spm" {
                return spm;
            }
            assert!(
                Instant::now() < deadline,
                "the SPM did not start: {}",
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_volume(&self, virtual_mib: u64, initial_mib: u64) -> String {
        let out = self.cli(&[
            "volume",
            "create",
            "--device",
            self.path(),
            "--control",
            self.control.to_str().unwrap(),
            "--virtual-size",
            &format!("{virtual_mib}M"),
            "--initial-size",
            &format!("{initial_mib}M"),
        ]);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// Host 1 running a VM on each volume; each guest writes `guest_mib`
    /// at `rate`; the host exits when every VM is done.
    fn start_host(
        &mut self,
        volumes: &[&str],
        guest_mib: u64,
        rate: &str,
        chunk: &str,
    ) -> HostProc {
        let log = self.log("host1");
        let mut cmd = Command::new(bin());
        cmd.args([
            "-v",
            "host",
            "--device",
            self.path(),
            "--host-id",
            "1",
            "--vm",
        ])
        .args(["--guest-bytes", &format!("{guest_mib}M"), "--rate", rate])
        .args(["--chunk-size", chunk, "--exit-when-done", "--json-events"])
        .args(&self.backend)
        .env("SPMBOX_RUN_DIR", &self.run)
        .stdout(Stdio::piped())
        .stderr(log);
        if self.backend.is_empty() {
            cmd.arg("--lun-search").arg(self.dir.path());
        }
        for v in volumes {
            cmd.args(["--volume", v]);
        }
        let mut child = cmd.spawn().expect("spawn host");
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        HostProc { child, events }
    }

    /// Waits up to `seconds` for `what` in `host`'s events.
    fn wait_for(&self, host: &HostProc, what: &str, seconds: u64, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while !done(&host.events()) {
            assert!(
                Instant::now() < deadline,
                "waited {seconds} s for {what}; events: {:#?}\n{}",
                host.events(),
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the host to exit by itself (every VM done) and checks
    /// that it succeeded.
    fn wait_exit(&self, host: &mut HostProc, seconds: u64) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Some(status) = host.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the host exited with {status}: {}",
                    self.logs_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the host did not finish in {seconds} s; events: {:#?}\n{}",
                host.events(),
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn add_lun(&self, lun: &Path) {
        let out = self.cli(&[
            "pool",
            "add-lun",
            "--device",
            self.path(),
            "--control",
            self.control.to_str().unwrap(),
            "--lun",
            lun.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    }
}

/// Every VM that exited finished with no data error, in the guest and
/// through qcow2, having written `mib`.
fn assert_vms_verified(d: &VmDomain, events: &[Value], vms: usize, mib: u64) {
    let exited: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "vm_exited")
        .collect();
    assert_eq!(exited.len(), vms, "events: {events:#?}\n{}", d.logs_text());
    for e in exited {
        let vm = &e["vm"];
        assert_eq!(e["ok"], true, "{e:#}\n{}", d.logs_text());
        assert_eq!(vm["result"]["errors"], 0, "{e:#}");
        assert_eq!(vm["result"]["verified"], mib * MIB, "{e:#}");
        assert_eq!(vm["image_check"]["ok"], true, "{e:#}");
    }
}

#[test]
fn a_vm_fills_a_thin_volume_through_many_extensions_without_a_pause() {
    need_vms!("a_vm_fills_a_thin_volume_through_many_extensions_without_a_pause");
    let mut d = VmDomain::new(&[256], false);
    let _spm = d.start_spm();
    let v = d.create_volume(64, 4);
    let mut host = d.start_host(&[&v], 40, "8M", "8M");
    d.wait_exit(&mut host, 120);
    let events = host.events();
    assert_vms_verified(&d, &events, 1, 40);
    let extended = host.count("extended");
    assert!(
        extended >= 4,
        "40 MiB on a 4 MiB volume in 8 MiB chunks takes at least 4 extensions: {extended}"
    );
    assert!(host.count("vm_threshold") >= 4, "{events:#?}");
    assert_eq!(host.count("vm_paused"), 0, "{events:#?}\n{}", d.logs_text());
}

/// One VM writing 32 MiB into a volume of 8 MiB on a pool of 16 MiB (LUN
/// 2, 128 MiB, is there to add), paused by qemu on ENOSPC. The locals are
/// bound in the order they must be dropped in reverse.
fn a_vm_paused_on_a_full_pool(lvm: bool) -> (VmDomain, Proc, String, HostProc) {
    let mut d = VmDomain::new(&[20, 128], lvm);
    let spm = d.start_spm();
    let v = d.create_volume(64, 8);
    let host = d.start_host(&[&v], 32, "16M", "8M");
    d.wait_for(&host, "qemu to pause the VM on ENOSPC", 90, |e| {
        e.iter().any(|e| e["event"] == "vm_paused")
    });
    (d, spm, v, host)
}

#[test]
fn a_vm_paused_on_enospc_resumes_after_a_lun_is_added() {
    need_vms!("a_vm_paused_on_enospc_resumes_after_a_lun_is_added");
    let (d, _spm, _v, mut host) = a_vm_paused_on_a_full_pool(false);
    // `spmbox status` shows it (the host writes its status every second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = d.cli(&["status", "--device", d.path(), "--json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let vm_state = &status["host_reports"][0]["volumes"][0]["vm"]["state"];
        if vm_state == "paused-enospc" {
            let out = d.cli(&["status", "--device", d.path()]);
            assert!(
                text(&out.stdout).contains("VM paused by qemu (ENOSPC"),
                "{}",
                text(&out.stdout)
            );
            break;
        }
        assert!(Instant::now() < deadline, "{status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.add_lun(&d.luns[1].clone());
    d.wait_exit(&mut host, 120);
    let events = host.events();
    assert_vms_verified(&d, &events, 1, 32);
    assert!(host.count("vm_paused") >= 1);
    assert_eq!(
        host.count("vm_paused"),
        host.count("vm_resumed"),
        "{events:#?}"
    );
}

#[test]
fn a_host_killed_while_its_vm_is_paused_resumes_it_after_restart() {
    need_vms!("a_host_killed_while_its_vm_is_paused_resumes_it_after_restart");
    let (mut d, _spm, v, mut host) = a_vm_paused_on_a_full_pool(false);
    host.kill9();
    let pids = qemu_pids(&d.run);
    assert_eq!(pids.len(), 1, "one qemu");
    // The VM outlives its host daemon, paused.
    let pid = rustix::process::Pid::from_raw(pids[0]).unwrap();
    assert!(
        rustix::process::test_kill_process(pid).is_ok(),
        "qemu died with its host"
    );
    let mut host = d.start_host(&[&v], 32, "16M", "8M");
    d.wait_for(&host, "the restarted host to attach to the VM", 30, |e| {
        e.iter().any(|e| e["event"] == "vm_started")
    });
    let started = host.events();
    let started = started.iter().find(|e| e["event"] == "vm_started").unwrap();
    assert_eq!(
        started["state"], "paused-enospc",
        "the restarted host found the VM qemu paused: {started}"
    );
    assert_eq!(qemu_pids(&d.run), pids, "the same qemu, not a new one");
    d.add_lun(&d.luns[1].clone());
    d.wait_exit(&mut host, 120);
    let events = host.events();
    assert_vms_verified(&d, &events, 1, 32);
    assert!(host.count("vm_resumed") >= 1, "{events:#?}");
}

#[test]
fn vms_finish_when_the_spm_is_killed_during_the_storm() {
    need_vms!("vms_finish_when_the_spm_is_killed_during_the_storm");
    let mut d = VmDomain::new(&[256], false);
    let mut spm = d.start_spm();
    let a = d.create_volume(64, 4);
    let b = d.create_volume(64, 4);
    let mut host = d.start_host(&[&a, &b], 32, "16M", "4M");
    d.wait_for(&host, "the first extensions", 90, |e| {
        e.iter().filter(|e| e["event"] == "extended").count() >= 2
    });
    drop(std::mem::replace(
        &mut spm,
        Proc(Command::new("true").spawn().unwrap()),
    ));
    std::thread::sleep(Duration::from_secs(1));
    let _spm = d.start_spm();
    d.wait_exit(&mut host, 150);
    assert_vms_verified(&d, &host.events(), 2, 32);
}

#[test]
fn with_the_lvm_backend_a_vm_pauses_and_resumes() {
    need_vms!("with_the_lvm_backend_a_vm_pauses_and_resumes");
    if let Some(why) = lvm_missing() {
        eprintln!("skipped: with_the_lvm_backend_a_vm_pauses_and_resumes: {why}");
        return;
    }
    let (d, _spm, _v, mut host) = a_vm_paused_on_a_full_pool(true);
    d.add_lun(&d.luns[1].clone());
    d.wait_exit(&mut host, 120);
    assert_vms_verified(&d, &host.events(), 1, 32);
}

#[test]
fn a_vm_whose_qemu_is_killed_is_started_again_and_finishes() {
    need_vms!("a_vm_whose_qemu_is_killed_is_started_again_and_finishes");
    let mut d = VmDomain::new(&[256], false);
    let _spm = d.start_spm();
    let v = d.create_volume(64, 4);
    let mut host = d.start_host(&[&v], 40, "8M", "8M");
    d.wait_for(&host, "the VM to be writing", 60, |e| {
        e.iter().filter(|e| e["event"] == "extended").count() >= 2
    });
    let pids = qemu_pids(&d.run);
    assert_eq!(pids.len(), 1, "one qemu");
    let pid = rustix::process::Pid::from_raw(pids[0]).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    d.wait_exit(&mut host, 120);
    let events = host.events();
    assert_eq!(host.count("vm_restarted"), 1, "{events:#?}");
    assert_vms_verified(&d, &events, 1, 40);
}
