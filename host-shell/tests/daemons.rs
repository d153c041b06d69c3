//! The daemons through the real binary: an SPM and hosts as separate
//! processes sharing only the domain's files (or loop devices as root),
//! guests writing verifiable data, a pool that runs out and a LUN added,
//! processes killed with SIGKILL at random moments.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Loop, loop_devices_missing};
use serde_json::Value;
use spmbox::backend::VolumeMaps;
use spmbox::backend::builtin::{BuiltinMaps, Domain};
use spmbox::daemon::guest::{self, Devices};
use spmbox_core::wire::Uuid;

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn run(args: &[&str], env_run: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .env("SPMBOX_RUN_DIR", env_run)
        .output()
        .expect("run spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

/// A child process, killed on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn term(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the domain lives.
#[derive(Clone, Copy, Debug)]
enum Storage {
    /// Files in a temporary directory.
    Files,
    /// Loop devices with this logical sector size over such files.
    Loops(u32),
    /// Loop devices (512-byte sectors) as the PVs of a real lvm2 volume
    /// group: the lvm backend.
    Lvm,
}

/// Why lvm2 tests cannot run here, if they cannot.
fn lvm_missing() -> Option<String> {
    if let Some(why) = loop_devices_missing() {
        return Some(why);
    }
    if !Command::new("lvm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("needs lvm2 (apt-get install lvm2)".into());
    }
    None
}

/// A domain on files (or loop devices) in a temporary directory.
struct Setup {
    dir: tempfile::TempDir,
    device: PathBuf,
    run: PathBuf,
    control: PathBuf,
    luns: Vec<PathBuf>,
    /// Where hosts and the verifier find the LUNs.
    lun_search: Vec<PathBuf>,
    logs: u32,
    /// Backend arguments every command gets (`--backend lvm ...`).
    backend: Vec<String>,
    /// The lvm backend's volume group, removed on drop.
    _lvm: Option<spmbox::backend::lvm::VgRemoval>,
    /// Detached after every process (declared before `Setup`) is gone.
    _loops: Vec<Loop>,
}

impl Setup {
    fn new(luns_mib: &[u64], extent_mib: u64) -> Setup {
        Setup::on(Storage::Files, luns_mib, extent_mib)
    }

    fn on(storage: Storage, luns_mib: &[u64], extent_mib: u64) -> Setup {
        let dir = tempdir();
        let run_dir = dir.path().join("run");
        fs::create_dir_all(&run_dir).unwrap();
        let file = |name: &str, size: u64| {
            let p = dir.path().join(name);
            fs::File::create(&p).unwrap().set_len(size).unwrap();
            p
        };
        let mut files = vec![file(
            "domain",
            if matches!(storage, Storage::Files) {
                0
            } else {
                16 * MIB
            },
        )];
        for (i, size) in luns_mib.iter().enumerate() {
            files.push(file(&format!("lun{}", i + 1), size * MIB));
        }
        let mut loops = Vec::new();
        let mut backend = Vec::new();
        let mut lvm = None;
        let (device, luns, lun_search) = match storage {
            Storage::Files => {
                // `pool create` makes the domain file itself.
                fs::remove_file(&files[0]).unwrap();
                (
                    files[0].clone(),
                    files[1..].to_vec(),
                    vec![dir.path().to_owned()],
                )
            }
            Storage::Loops(sector) => {
                loops = files.iter().map(|f| Loop::attach(f, sector)).collect();
                let devs: Vec<PathBuf> = loops.iter().map(|l| l.dev.clone()).collect();
                (devs[0].clone(), devs[1..].to_vec(), devs[1..].to_vec())
            }
            Storage::Lvm => {
                loops = files.iter().map(|f| Loop::attach(f, 512)).collect();
                let devs: Vec<PathBuf> = loops.iter().map(|l| l.dev.clone()).collect();
                let vg = format!("spmboxtest{}", std::process::id());
                backend = vec![
                    "--backend".to_owned(),
                    "lvm".into(),
                    "--vg".into(),
                    vg.clone(),
                ];
                for pv in &devs[1..] {
                    backend.push("--pv".into());
                    backend.push(pv.display().to_string());
                }
                lvm = Some(spmbox::backend::lvm::VgRemoval {
                    vg,
                    pvs: devs[1..].to_vec(),
                });
                (devs[0].clone(), devs[1..].to_vec(), Vec::new())
            }
        };
        let s = Setup {
            control: run_dir.join("spm.sock"),
            dir,
            device,
            run: run_dir,
            luns,
            lun_search,
            logs: 0,
            backend,
            _lvm: lvm,
            _loops: loops,
        };
        let extent = format!("{extent_mib}M");
        let out = s.cli(&[
            "pool",
            "create",
            "--device",
            s.device.to_str().unwrap(),
            "--lun",
            s.luns[0].to_str().unwrap(),
            "--hosts",
            "16",
            "--extent-size",
            &extent,
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        s
    }

    /// Runs a command; those that take a backend get this setup's.
    fn cli(&self, args: &[&str]) -> Output {
        let takes_backend = matches!(args.first(), Some(&"pool" | &"volume" | &"spm" | &"host"));
        let mut all: Vec<&str> = args.to_vec();
        if takes_backend {
            all.extend(self.backend.iter().map(String::as_str));
        }
        run(&all, &self.run)
    }

    fn log(&mut self, name: &str) -> fs::File {
        self.logs += 1;
        fs::File::create(self.dir.path().join(format!("{name}.{}.log", self.logs))).unwrap()
    }

    fn spawn_spm(&mut self) -> Proc {
        self.spawn_spm_with(&[])
    }

    /// The SPM with more flags.
    fn spawn_spm_with(&mut self, extra: &[&str]) -> Proc {
        let log = self.log("spm");
        let child = Command::new(bin())
            .args(["-vv", "spm", "--device"])
            .arg(&self.device)
            .arg("--control")
            .arg(&self.control)
            .args(&self.backend)
            .args(extra)
            .env("SPMBOX_RUN_DIR", &self.run)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spm");
        Proc {
            name: "spm".into(),
            child,
        }
    }

    /// Starts the SPM and waits until its control socket answers.
    fn start_spm(&mut self) -> Proc {
        let mut spm = self.spawn_spm();
        self.wait_ready(&mut spm);
        spm
    }

    /// Waits until the SPM's control socket answers.
    fn wait_ready(&self, spm: &mut Proc) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&[
                "status",
                "--device",
                self.device.to_str().unwrap(),
                "--control",
                self.control.to_str().unwrap(),
                "--json",
            ]);
            if out.status.success() && self.control.exists() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                // Only the new SPM's own answer counts: after a SIGKILL
                // the header on disk still says active.
                if v["spm"]["state"] == "active" && v["pool_source"] == "spm" {
                    return;
                }
            }
            assert!(spm.alive(), "the SPM exited: {}", self.logs_text());
            assert!(
                Instant::now() < deadline,
                "the SPM did not start: {}",
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_volume(&self, virtual_mib: u64, initial_mib: u64) -> Uuid {
        let out = self.cli(&[
            "volume",
            "create",
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--virtual-size",
            &format!("{virtual_mib}M"),
            "--initial-size",
            &format!("{initial_mib}M"),
        ]);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        Uuid::parse_str(text(&out.stdout).trim()).expect("a UUID")
    }

    fn add_lun(&self, lun: &Path) -> Output {
        self.cli(&[
            "pool",
            "add-lun",
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--lun",
            lun.to_str().unwrap(),
        ])
    }

    fn start_host(&mut self, host: u16, volumes: &[Uuid], rate: &str, chunk: &str) -> Proc {
        let log = self.log(&format!("host{host}"));
        let events = self.log(&format!("host{host}-events"));
        let mut cmd = Command::new(bin());
        cmd.args(["-v", "host", "--device"])
            .arg(&self.device)
            .args([
                "--host-id",
                &host.to_string(),
                "--rate",
                rate,
                "--chunk-size",
                chunk,
            ])
            .args(["--exit-when-done", "--json-events"])
            .env("SPMBOX_RUN_DIR", &self.run)
            .stdout(events)
            .stderr(log);
        for v in volumes {
            cmd.args(["--volume", &v.to_string()]);
        }
        for p in &self.lun_search {
            cmd.arg("--lun-search").arg(p);
        }
        cmd.args(&self.backend);
        Proc {
            name: format!("host{host}"),
            child: cmd.spawn().expect("spawn host"),
        }
    }

    /// Every event the hosts printed, across restarts.
    fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut paths: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("-events."))
            .collect();
        paths.sort();
        for p in paths {
            for line in fs::read_to_string(p).unwrap_or_default().lines() {
                if let Ok(v) = serde_json::from_str(line) {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Every SPM's log, whole, in the order they started.
    fn spm_logs(&self) -> String {
        let mut paths: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("spm."))
            })
            .collect();
        paths.sort_by_key(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.split('.').nth(1).and_then(|n| n.parse::<u32>().ok())
        });
        paths
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    fn logs_text(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        paths.sort();
        for p in paths {
            let t = fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            out += &format!("\n--- {} (last lines)\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }

    /// Reads back every volume: (bytes verified, data errors).
    fn verify(&self, volumes: &[Uuid], upto: u64) -> (u64, u64, Vec<String>) {
        let mut maps: Box<dyn VolumeMaps> = match &self._lvm {
            Some(lvm) => spmbox::backend::lvm_glue::maps(&lvm.vg, &lvm.pvs).unwrap(),
            None => Box::new(BuiltinMaps::open(&self.device, self.lun_search.clone()).unwrap()),
        };
        let mut devices = Devices::new();
        let (mut bytes, mut errors, mut first) = (0, 0, Vec::new());
        for v in volumes {
            let map = maps.refresh(*v).unwrap();
            let r = guest::verify(*v, &map, &mut devices, upto.min(map.size)).unwrap();
            bytes += r.bytes_verified;
            errors += r.error_count;
            first.extend(
                r.errors
                    .iter()
                    .take(3)
                    .map(|b| format!("{v} at {}: {}", b.offset, b.defect)),
            );
        }
        (bytes, errors, first)
    }

    /// The committed pool keeps its invariants (no extent in two volumes).
    fn check_pool(&self) {
        if let Some(lvm) = &self._lvm {
            // lvm2's own check of its metadata.
            let lvm = spmbox::backend::lvm::Lvm::new(&lvm.vg, &lvm.pvs).unwrap();
            lvm.run("vgck", &[lvm.vg()]).expect("vgck");
            return;
        }
        let domain = Domain::open(&self.device, spmbox::io::device::Access::ReadOnly).unwrap();
        let (pool, _) = domain.read_pool().expect("the pool metadata decodes");
        pool.check_invariants().expect("pool invariants");
    }
}

fn wait_all(procs: &mut [Proc], timeout: Duration, setup: &Setup) {
    let deadline = Instant::now() + timeout;
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait().unwrap() {
                Some(status) => {
                    assert!(
                        status.success(),
                        "{} exited with {status}: {}",
                        p.name,
                        setup.logs_text()
                    );
                    break;
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "{} did not finish in {timeout:?}: {}",
                        p.name,
                        setup.logs_text()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[test]
fn the_demo_pauses_resumes_and_verifies_every_byte() {
    let run_dir = tempdir();
    let out = Command::new(bin())
        .args(["demo", "--json"])
        .env("SPMBOX_RUN_DIR", run_dir.path())
        .output()
        .expect("run demo");
    assert!(
        out.status.success(),
        "demo failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "extensions",
        "pauses",
        "resumes",
        "bytes_verified",
        "latency_ms_p50",
        "latency_ms_p99",
        "data_errors",
    ] {
        assert!(v.get(key).is_some(), "no {key} in {v}");
    }
    assert!(v["pauses"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["pauses"], v["resumes"], "{v}");
    assert_eq!(v["data_errors"], 0, "{v}");
    assert_eq!(v["bytes_verified"].as_u64().unwrap(), 6 * 96 * MIB, "{v}");
}

/// Two guests fill a pool of 24 MiB, pause, and resume when a LUN is
/// added through the running SPM; every byte is then read back.
fn pause_and_resume(mut s: Setup) {
    let mut spm = s.start_spm();
    let volumes = [s.create_volume(64, 4), s.create_volume(64, 4)];
    let mut host = s.start_host(1, &volumes, "64M", "8M");
    // Wait for both guests to pause on the exhausted pool.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.events().iter().filter(|e| e["event"] == "paused").count() < 2 {
        assert!(host.alive(), "host exited: {}", s.logs_text());
        assert!(
            Instant::now() < deadline,
            "guests never paused: {}",
            s.logs_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The guests may pause before the SPM has answered (it acts once it
    // read its own header back): wait for the requests to be parked.
    let parked = |status: &Value| {
        status["requests"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["state"] == "waiting for space"))
            && status["pool"]["parked"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
    };
    let status = loop {
        let out = s.cli(&[
            "status",
            "--device",
            s.device.to_str().unwrap(),
            "--control",
            s.control.to_str().unwrap(),
            "--json",
        ]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        if parked(&status) || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(parked(&status), "status shows no parked request: {status}");
    let lun2 = s.luns[1].clone();
    let out = s.add_lun(&lun2);
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    wait_all(std::slice::from_mut(&mut host), Duration::from_secs(60), &s);
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let events = s.events();
    let count = |what: &str| events.iter().filter(|e| e["event"] == what).count();
    assert_eq!(count("paused"), count("resumed"), "{events:?}");
    assert_eq!(count("done"), 2);
    let (bytes, errors, first) = s.verify(&volumes, 64 * MIB);
    assert_eq!((bytes, errors), (2 * 64 * MIB, 0), "{first:?}");
    s.check_pool();
    // The pool that ran out was warned about (at 80 % at least: the
    // extension that would fill it needs more than is left), and the
    // added LUN brought usage back under every threshold.
    let log = s.spm_logs();
    let reached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("pool usage reached "))
        .collect();
    assert!(!reached.is_empty(), "{log}");
    let under: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pool usage back under"))
        .collect();
    assert!(
        under.len() == 1 && under[0].contains("back under 80 %"),
        "{under:?}"
    );
    // A clean stop leaves the SPM header vacant.
    let status = s.cli(&[
        "status",
        "--device",
        s.device.to_str().unwrap(),
        "--control",
        s.control.to_str().unwrap(),
        "--json",
    ]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["spm"]["state"], "vacant", "{status}");
}

#[test]
fn guests_pause_when_the_pool_is_full_and_resume_when_a_lun_is_added() {
    pause_and_resume(Setup::new(&[24, 200], 4));
}

#[test]
fn with_the_lvm_backend_guests_pause_and_resume() {
    if let Some(why) = lvm_missing() {
        eprintln!("skipped: with_the_lvm_backend_guests_pause_and_resume: {why}");
        return;
    }
    pause_and_resume(Setup::on(Storage::Lvm, &[24, 200], 4));
}

#[test]
fn on_loop_devices_with_512_byte_sectors_guests_pause_and_resume() {
    if let Some(why) = loop_devices_missing() {
        eprintln!("skipped: on_loop_devices_with_512_byte_sectors_guests_pause_and_resume: {why}");
        return;
    }
    pause_and_resume(Setup::on(Storage::Loops(512), &[24, 200], 4));
}

#[test]
fn on_loop_devices_with_4096_byte_sectors_guests_pause_and_resume() {
    if let Some(why) = loop_devices_missing() {
        eprintln!("skipped: on_loop_devices_with_4096_byte_sectors_guests_pause_and_resume: {why}");
        return;
    }
    pause_and_resume(Setup::on(Storage::Loops(4096), &[24, 200], 4));
}

#[test]
fn a_second_spm_is_refused_and_a_dead_one_is_taken_over_with_a_higher_epoch() {
    let mut s = Setup::new(&[64], 4);
    let mut first = s.start_spm();
    // A second SPM while the first runs: refused, nothing changed.
    let out = Command::new(bin())
        .args(["spm", "--device", s.device.to_str().unwrap(), "--control"])
        .arg(&s.control)
        .env("SPMBOX_RUN_DIR", &s.run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("another SPM"),
        "{}",
        text(&out.stderr)
    );
    let epoch = |s: &Setup| -> u64 {
        let out = s.cli(&[
            "status",
            "--device",
            s.device.to_str().unwrap(),
            "--control",
            s.control.to_str().unwrap(),
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["spm"]["epoch"].as_u64().unwrap()
    };
    let before = epoch(&s);
    assert!(first.alive(), "the running SPM must not be disturbed");
    // SIGKILL: the header still says active; a new SPM waits out the
    // heartbeat, then takes over with the next epoch.
    first.kill9();
    let mut second = s.start_spm();
    assert_eq!(epoch(&s), before + 1);
    assert!(second.term().success());
}

/// A new SPM takes an epoch above every epoch a host may have seen: in
/// the SPM header, in an outbox header, and in a reply. Here a reply of
/// epoch 9 sits in an outbox whose header (and the SPM header) a lost
/// write left at a lower epoch; a host that counted it would ignore an
/// SPM of epoch 2.
#[test]
fn a_new_spm_takes_an_epoch_above_every_reply_it_finds() {
    use spmbox_core::wire::{
        Epoch, Generation, HostId, RECORD_LEN, Reply, ReplyStatus, Request, Slot, Superblock,
    };
    let mut s = Setup::new(&[64], 4);
    let mut image = fs::read(&s.device).unwrap();
    let superblock = Superblock::decode(&image[..RECORD_LEN]).unwrap().unwrap();
    let geometry = superblock.geometry;
    let request = Request {
        domain: superblock.domain,
        host_id: HostId::new(3),
        slot: Slot::new(5),
        generation: Generation::new(2),
        sequence: 4,
        volume: Uuid([0x77; 16]),
        target_size: 1 << 30,
        current_size: 1 << 29,
        paused: false,
    };
    let reply = Reply::answering(
        &request,
        ReplyStatus::Failed { code: 5 },
        1 << 29,
        Epoch::new(9),
    );
    let at = geometry.outbox_area(HostId::new(3)).unwrap() as usize + 5 * RECORD_LEN;
    image[at..at + RECORD_LEN].copy_from_slice(&reply.to_bytes().unwrap());
    fs::write(&s.device, &image).unwrap();
    let mut spm = s.start_spm();
    let out = s.cli(&[
        "status",
        "--device",
        s.device.to_str().unwrap(),
        "--control",
        s.control.to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spm"]["epoch"].as_u64(), Some(10), "{v}");
    assert!(spm.term().success());
}

#[test]
fn sigkill_of_spm_and_hosts_under_load_loses_nothing() {
    let mut s = Setup::new(&[40, 400], 4);
    let mut spm = s.start_spm();
    let volumes: Vec<Uuid> = (0..4).map(|_| s.create_volume(64, 4)).collect();
    let assignment = [
        (1u16, vec![volumes[0], volumes[1]]),
        (2u16, vec![volumes[2], volumes[3]]),
    ];
    let mut hosts: Vec<Proc> = assignment
        .iter()
        .map(|(h, v)| s.start_host(*h, v, "24M", "8M"))
        .collect();
    // A small deterministic generator: the run is the same every time.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let start = Instant::now();
    let mut kills = 0;
    let mut lun_added = false;
    while start.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(300 + rand(900)));
        if !lun_added && start.elapsed() > Duration::from_secs(5) {
            // Through the SPM if it runs, else directly under the lock;
            // retried while a restarting SPM holds the lock.
            let lun2 = s.luns[1].clone();
            for _ in 0..100 {
                if s.add_lun(&lun2).status.success() {
                    lun_added = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(lun_added, "add-lun never succeeded: {}", s.logs_text());
        }
        match rand(3) {
            0 => {
                spm.kill9();
                std::thread::sleep(Duration::from_millis(rand(300)));
                spm = s.spawn_spm();
            }
            k => {
                let i = (k - 1) as usize;
                if hosts[i].alive() {
                    hosts[i].kill9();
                    std::thread::sleep(Duration::from_millis(rand(300)));
                    let (h, v) = &assignment[i];
                    hosts[i] = s.start_host(*h, v, "24M", "8M");
                }
            }
        }
        kills += 1;
        // An SPM that lost a start-up race for the lock is started again.
        if !spm.alive() {
            spm = s.spawn_spm();
        }
    }
    assert!(lun_added);
    // Let everything finish.
    let deadline = Instant::now() + Duration::from_secs(120);
    while hosts.iter_mut().any(|h| h.alive()) {
        if !spm.alive() {
            spm = s.spawn_spm();
        }
        assert!(
            Instant::now() < deadline,
            "hosts did not finish: {}",
            s.logs_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for h in &mut hosts {
        let status = h.child.wait().unwrap();
        assert!(status.success(), "{} failed: {}", h.name, s.logs_text());
    }
    let _ = spm.term();
    let (bytes, errors, first) = s.verify(&volumes, 64 * MIB);
    assert_eq!(errors, 0, "{first:?}");
    assert_eq!(bytes, 4 * 64 * MIB, "every byte of every guest is there");
    s.check_pool();
    println!("chaos: {kills} SIGKILLs, every byte verified ({bytes} bytes)");
}

/// A free loopback port (bound and released; the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16, deadline: Instant) -> String {
    use std::io::{Read as _, Write as _};
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
            let mut page = String::new();
            let _ = s.read_to_string(&mut page);
            // The first page is published within a second of start.
            if page.contains("# TYPE") {
                return page;
            }
        }
        assert!(Instant::now() < deadline, "no metrics on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_spm_and_a_host_serve_prometheus_metrics() {
    let mut s = Setup::new(&[64], 4);
    let (spm_port, host_port) = (free_port(), free_port());
    let log = s.log("spm");
    let mut spm = Proc {
        name: "spm".into(),
        child: Command::new(bin())
            .args(["spm", "--device"])
            .arg(&s.device)
            .arg("--control")
            .arg(&s.control)
            .args(["--metrics", &format!("127.0.0.1:{spm_port}")])
            .env("SPMBOX_RUN_DIR", &s.run)
            .stderr(log)
            .spawn()
            .unwrap(),
    };
    let volume = s.create_volume(32, 4);
    let log = s.log("host1");
    let mut host = Proc {
        name: "host1".into(),
        child: Command::new(bin())
            .args(["host", "--device"])
            .arg(&s.device)
            .args([
                "--host-id",
                "1",
                "--volume",
                &volume.to_string(),
                "--chunk-size",
                "4M",
            ])
            .args([
                "--rate",
                "8M",
                "--metrics",
                &format!("127.0.0.1:{host_port}"),
            ])
            .env("SPMBOX_RUN_DIR", &s.run)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    };
    // Wait until the host has extended at least once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = scrape(host_port, deadline);
        if !page.contains("spmbox_host_extensions_total 0\n") {
            break page;
        }
        assert!(host.alive(), "host exited: {}", s.logs_text());
        assert!(
            Instant::now() < deadline,
            "no extension: {page}{}",
            s.logs_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.contains("spmbox_host_extension_seconds_bucket{le=\"+Inf\"}"),
        "{page}"
    );
    assert!(
        page.contains(&format!(
            "spmbox_volume_physical_bytes{{volume=\"{volume}\"}}"
        )),
        "{page}"
    );
    let page = scrape(spm_port, deadline);
    assert!(
        page.contains("# TYPE spmbox_spm_jobs_total counter"),
        "{page}"
    );
    assert!(
        page.contains("spmbox_pool_extents{state=\"total\"} "),
        "{page}"
    );
    // A non-loopback address is refused before anything starts.
    let out = s.cli(&[
        "spm",
        "--device",
        s.device.to_str().unwrap(),
        "--metrics",
        "0.0.0.0:9464",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a loopback address"),
        "{}",
        text(&out.stderr)
    );
    assert!(host.term().success());
    assert!(spm.term().success());
}

#[test]
fn an_spm_that_waits_for_the_domain_lock_sees_what_the_holder_committed() {
    use spmbox::backend::SpmBackend as _;
    let mut s = Setup::new(&[64], 4);
    // Hold the lock as an admin command would, and let the SPM start
    // meanwhile: it must load the pool only once it has the lock.
    let lock = spmbox::daemon::spm::lock_domain(&s.device, || Ok(())).unwrap();
    let mut spm = s.spawn_spm();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        spm.alive(),
        "the SPM gave up instead of waiting: {}",
        s.logs_text()
    );
    let volume = Uuid([0x42; 16]);
    let mut direct = spmbox::backend::builtin::BuiltinSpm::open(&s.device).unwrap();
    direct.create_volume(volume, 32 * MIB, 4 * MIB).unwrap();
    drop(direct);
    drop(lock);
    s.wait_ready(&mut spm);
    let out = s.cli(&[
        "status",
        "--device",
        s.device.to_str().unwrap(),
        "--control",
        s.control.to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pool_source"], "spm", "{v}");
    let ids: Vec<&str> = v["pool"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, [volume.to_string()], "{v}");
    assert!(spm.term().success());
}

/// The lines of `log` that say a pool usage threshold was reached, and
/// which threshold each names.
fn usage_warnings(log: &str) -> Vec<(u32, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("pool usage reached ").nth(1)?;
            let t = rest.split(' ').next()?.parse().ok()?;
            Some((t, l.to_string()))
        })
        .collect()
}

/// Scrapes the SPM's metrics until the page has every one of `wanted`.
fn scrape_until(port: u16, wanted: &[&str], s: &Setup) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = scrape(port, deadline);
        if wanted.iter().all(|w| page.contains(w)) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics never showed {wanted:?}: {page}{}",
            s.logs_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A pool of 10 extents filled one 4 MiB extension at a time: the SPM
/// warns once at 80 %, once at 90 % (85 % is passed in the same step, so
/// only the higher is said), once at 95 % when it is full, with the
/// figures and what to do; the metrics show the usage; an added LUN
/// brings it back under, said once at info level.
#[test]
fn the_spm_warns_once_per_usage_threshold_and_once_back_under() {
    let mut s = Setup::new(&[41, 200], 4);
    let port = free_port();
    let mut spm = s.spawn_spm_with(&["--metrics", &format!("127.0.0.1:{port}")]);
    s.wait_ready(&mut spm);
    let device = s.device.to_str().unwrap().to_owned();
    let status = s.cli(&["status", "--device", &device, "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pool"]["total_extents"], 10, "{status}");
    // 1 extent of 10: nothing to say.
    let volume = s.create_volume(64, 4);
    let mut host = s.start_host(1, &[volume], "32M", "4M");
    let deadline = Instant::now() + Duration::from_secs(30);
    while usage_warnings(&s.spm_logs()).len() < 3 {
        assert!(host.alive(), "host exited: {}", s.logs_text());
        assert!(
            Instant::now() < deadline,
            "no warning at 95 %: {}",
            s.spm_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let warnings = usage_warnings(&s.spm_logs());
    let thresholds: Vec<u32> = warnings.iter().map(|(t, _)| *t).collect();
    assert_eq!(thresholds, [80, 90, 95], "{warnings:#?}");
    let add_lun = format!("add a LUN (spmbox pool add-lun --device {device} --lun PATH)");
    for ((_, line), figures) in warnings.iter().zip([
        "80.0 % used, 33554432 bytes (32.0 MiB) of 41943040 bytes (40.0 MiB), \
         8388608 bytes (8.0 MiB) free",
        "90.0 % used, 37748736 bytes (36.0 MiB) of 41943040 bytes (40.0 MiB), \
         4194304 bytes (4.0 MiB) free",
        "100.0 % used, 41943040 bytes (40.0 MiB) of 41943040 bytes (40.0 MiB), 0 bytes free",
    ]) {
        assert!(line.contains(" WARN "), "{line}");
        assert!(line.contains("spm{domain="), "{line}");
        assert!(line.contains(figures), "{line}");
        assert!(line.contains(&add_lun), "{line}");
    }
    scrape_until(
        port,
        &[
            "\nspmbox_pool_used_ratio 1\n",
            "\nspmbox_pool_warn_threshold_ratio 0.95\n",
        ],
        &s,
    );
    // The guest pauses on the full pool; the LUN's 49 extents bring
    // usage to 11 of 59 extents once the parked request is served.
    let lun2 = s.luns[1].clone();
    let out = s.add_lun(&lun2);
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    let back = loop {
        let log = s.spm_logs();
        if let Some(line) = log.lines().find(|l| l.contains("pool usage back under")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "never back under: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(back.contains(" INFO "), "{back}");
    assert!(
        back.contains(
            "pool usage back under 80 %: 18.6 % used, 46137344 bytes (44.0 MiB) of \
             247463936 bytes (236.0 MiB), 201326592 bytes (192.0 MiB) free"
        ),
        "{back}"
    );
    scrape_until(port, &["\nspmbox_pool_warn_threshold_ratio 0\n"], &s);
    wait_all(std::slice::from_mut(&mut host), Duration::from_secs(60), &s);
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    // The guest's 64 MiB need 17 of the 59 extents: no more warnings,
    // one line back under.
    let log = s.spm_logs();
    assert_eq!(usage_warnings(&log).len(), 3, "{log}");
    assert_eq!(log.matches("pool usage back under").count(), 1, "{log}");
}

/// An SPM that starts on a pool already past a threshold warns once, at
/// start, about the highest; the thresholds come from a configuration
/// file, and `--pool-warn none` turns the warnings off.
#[test]
fn an_spm_starting_on_a_full_pool_warns_once_with_the_thresholds_of_its_config() {
    let mut s = Setup::new(&[41], 4);
    // 9 of 10 extents, given out with no SPM running.
    s.create_volume(64, 36);
    let config = s.dir.path().join("domain1.toml");
    fs::write(&config, "[spm]\npool-warn = [50, 70, 90]\n").unwrap();
    let mut spm = s.spawn_spm_with(&["--config", config.to_str().unwrap()]);
    s.wait_ready(&mut spm);
    std::thread::sleep(Duration::from_millis(300));
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let warnings = usage_warnings(&s.spm_logs());
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].0, 90, "{warnings:#?}");
    assert!(
        warnings[0]
            .1
            .contains("90.0 % used, 37748736 bytes (36.0 MiB) of 41943040 bytes"),
        "{warnings:#?}"
    );
    // Off: no warning, from the command line over the file.
    let mut spm = s.spawn_spm_with(&["--config", config.to_str().unwrap(), "--pool-warn", "none"]);
    s.wait_ready(&mut spm);
    std::thread::sleep(Duration::from_millis(300));
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let log = s.spm_logs();
    assert_eq!(usage_warnings(&log).len(), 1, "{log}");
    assert_eq!(log.matches("SPM started").count(), 2, "{log}");
}

/// A bad --pool-warn, on the command line or in a file, is refused before
/// anything is opened: exit status 2, the flag and what it takes named,
/// the domain untouched and no control socket.
#[test]
fn a_bad_pool_warn_is_refused_at_start_and_nothing_is_written() {
    let s = Setup::new(&[41], 4);
    let device = s.device.to_str().unwrap();
    let before = fs::read(&s.device).unwrap();
    let config = s.dir.path().join("domain1.toml");
    fs::write(&config, "[spm]\n\npool-warn = [90, 80]\n").unwrap();
    let config = config.to_str().unwrap();
    for (args, says) in [
        (
            vec!["spm", "--device", device, "--pool-warn", "80,101"],
            "\"101\" is not a percentage from 1 to 100",
        ),
        (
            vec!["spm", "--device", device, "--pool-warn", "90,80"],
            "80 comes after 90",
        ),
        (
            vec!["spm", "--device", device, "--pool-warn", "80,"],
            "an empty item",
        ),
        (
            vec!["spm", "--device", device, "--config", config],
            "80 comes after 90",
        ),
        (vec!["config", "check", config], "80 comes after 90"),
    ] {
        let out = s.cli(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("spmbox: error: "), "{args:?}: {err}");
        assert!(err.contains("'--pool-warn <PERCENTS>'"), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            err.contains("give percentages from 1 to 100 in increasing order"),
            "{args:?}: {err}"
        );
        if args.contains(&"--config") || args[0] == "config" {
            assert!(
                err.contains(&format!("{config}, line 3: ")),
                "{args:?}: {err}"
            );
        }
    }
    assert_eq!(fs::read(&s.device).unwrap(), before, "the domain changed");
    assert!(!s.control.exists());
    assert_eq!(
        fs::read_dir(&s.run).unwrap().count(),
        0,
        "the run directory"
    );
    // What `config check` shows for good values.
    fs::write(config, "[spm]\npool-warn = []\n").unwrap();
    let out = s.cli(&["config", "check", config]);
    assert!(
        text(&out.stdout).contains("spmbox spm gets: --pool-warn none"),
        "{}",
        text(&out.stderr)
    );
}

impl Setup {
    /// `volume list --json` (through the SPM when one listens).
    fn volume_list(&self) -> Value {
        let out = self.cli(&[
            "volume",
            "list",
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "volume list: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("volume list prints JSON")
    }

    /// `volume delete` or `volume reduce` of `id`, `--json`.
    fn shrink(&self, what: &str, id: Uuid, to: Option<&str>) -> Output {
        let id = id.to_string();
        let mut args = vec![
            "volume",
            what,
            id.as_str(),
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--json",
        ];
        if let Some(to) = to {
            args.extend(["--to", to]);
        }
        self.cli(&args)
    }

    /// Polls `volume list` until `done` holds of it (at most 20 s).
    fn list_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.volume_list();
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen in 20 s; last list {v}{}",
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn listed(list: &Value, id: Uuid) -> Option<&Value> {
    list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id.to_string())
}

/// Deletes and reduces volumes without an SPM and through one, while a
/// host holds another: held volumes are refused, released extents come
/// back once the host acknowledged, and the pool stays consistent.
fn volume_life(mut s: Setup) {
    // Without an SPM: the command changes the pool itself.
    let a = s.create_volume(32, 8);
    let b = s.create_volume(32, 8);
    let c = s.create_volume(32, 16);
    let list = s.volume_list();
    let total = list["total_extents"].as_u64().unwrap();
    let free = list["free_extents"].as_u64().unwrap();
    assert_eq!(total - free, 2 + 2 + 4, "{list}");
    for (id, extents) in [(a, 2), (b, 2), (c, 4)] {
        let v = listed(&list, id).unwrap_or_else(|| panic!("{id} listed: {list}"));
        assert_eq!(v["physical_size"], extents * 4 * MIB, "{v}");
        assert_eq!(v["held_by"], serde_json::json!([]), "{v}");
        {
            let in_segments: u64 = v["segments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["extents"].as_u64().unwrap())
                .sum();
            assert_eq!(in_segments, extents, "{v}");
        }
    }
    let out = s.shrink("delete", b, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["released"]["extents"], 2, "{answer}");
    let out = s.shrink("reduce", c, Some("5M"));
    assert!(out.status.success(), "reduce: {}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["size"],
        8 * MIB,
        "5M rounds up to 2 extents: {answer}"
    );
    assert_eq!(answer["released"]["extents"], 2, "{answer}");
    let out = s.shrink("reduce", c, Some("12M"));
    assert!(
        !out.status.success(),
        "reducing to more than it has is refused"
    );
    assert!(
        text(&out.stderr).contains("Nothing was changed"),
        "{}",
        text(&out.stderr)
    );
    let list = s.volume_list();
    assert!(listed(&list, b).is_none(), "{list}");
    assert_eq!(
        listed(&list, c).unwrap()["physical_size"],
        8 * MIB,
        "{list}"
    );

    // Through the SPM, with a host that holds volume a.
    let mut spm = s.start_spm();
    // Released extents no live host holds come back at once.
    s.list_until("extents released without an SPM free again", |l| {
        l["released_extents"] == 0 && l["free_extents"].as_u64() == Some(total - 4)
    });
    let e = s.create_volume(32, 4);
    let mut host = s.start_host(1, &[a, e], "1M", "4M");
    s.list_until("volume a held by host 1", |l| {
        listed(l, a).is_some_and(|v| v["held_by"][0]["host"] == 1)
    });
    for (what, to) in [("delete", None), ("reduce", Some("4M"))] {
        let out = s.shrink(what, a, to);
        assert!(!out.status.success(), "{what} of a held volume is refused");
        let err = text(&out.stderr);
        assert!(
            err.contains("host 1 holds it open") && err.contains("Nothing was changed"),
            "{err}"
        );
    }
    // c is held by nobody: deleted at once; its extents come back once
    // host 1 (live) has acknowledged the release.
    let out = s.shrink("delete", c, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let release = serde_json::from_slice::<Value>(&out.stdout).unwrap()["released"]["release"]
        .as_u64()
        .unwrap();
    assert!(release > 0);
    s.list_until("c's extents free again after host 1 acknowledged", |l| {
        l["released_extents"] == 0 && listed(l, c).is_none()
    });
    assert!(
        s.spm_logs().contains("released extents are free again"),
        "{}",
        s.spm_logs()
    );
    assert!(host.alive(), "host 1 runs on: {}", s.logs_text());
    // Host 1 grows e (its replies say so), then stops; then a and e can go.
    s.list_until("volume e extended", |l| {
        listed(l, e).is_some_and(|v| v["physical_size"].as_u64() > Some(4 * MIB))
    });
    host.term();
    let out = s.shrink("delete", a, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    // The extended replies about the deleted and the reduced volume are
    // emptied first: a restarted SPM does not take them for a pool rolled
    // back, with the SPM's delete and with one made without an SPM.
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let out = s.shrink("reduce", e, Some("4M"));
    assert!(out.status.success(), "reduce: {}", text(&out.stderr));
    let mut spm = s.start_spm();
    let out = s.shrink("delete", e, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    let list = s.list_until("every extent free", |l| {
        l["released_extents"] == 0 && l["free_extents"].as_u64() == Some(total)
    });
    assert_eq!(list["volumes"], serde_json::json!([]), "{list}");
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let mut spm = s.start_spm();
    spm.term();
    s.check_pool();
}

#[test]
fn volumes_are_deleted_and_reduced_only_when_no_host_holds_them() {
    volume_life(Setup::new(&[64], 4));
}

#[test]
fn with_the_lvm_backend_volumes_are_deleted_and_reduced_only_when_no_host_holds_them() {
    if let Some(why) = lvm_missing() {
        eprintln!(
            "skipped: with_the_lvm_backend_volumes_are_deleted_and_reduced_only_when_no_host_holds_them: {why}"
        );
        return;
    }
    volume_life(Setup::on(Storage::Lvm, &[64], 4));
}

/// Four volumes that grow at the same time, one 1 MiB extent per request,
/// each reach their whole virtual size: allocation keeps every volume's
/// extents together, so no segment table fills (before, volumes growing
/// together interleaved their extents, and each stopped at 32 segments).
#[test]
fn volumes_growing_together_by_one_small_extent_each_reach_their_limit() {
    let mut s = Setup::new(&[256], 1);
    let mut spm = s.start_spm();
    let volumes: Vec<Uuid> = (0..4).map(|_| s.create_volume(48, 1)).collect();
    let mut host = s.start_host(1, &volumes, "32M", "1M");
    wait_all(std::slice::from_mut(&mut host), Duration::from_secs(90), &s);
    let events = s.events();
    let count = |what: &str| events.iter().filter(|e| e["event"] == what).count();
    assert_eq!(count("done"), 4, "{events:?}");
    assert_eq!(count("paused"), count("resumed"), "{events:?}");
    let list = s.volume_list();
    for id in &volumes {
        let v = listed(&list, *id).unwrap();
        assert!(v["physical_size"].as_u64().unwrap() >= 48 * MIB, "{v}");
        let segments = v["segments"].as_array().unwrap().len();
        assert!(
            segments <= 4,
            "volume {id} grew in {segments} segments: {v}"
        );
    }
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let (bytes, errors, first) = s.verify(&volumes, 48 * MIB);
    assert_eq!((bytes, errors), (4 * 48 * MIB, 0), "{first:?}");
    s.check_pool();
}

/// With `spm --discard`, the extents of a deleted volume are discarded
/// once they come back to the pool: their bytes on the LUN file read back
/// as zeroes, and the other volume's bytes are kept.
#[test]
fn with_discard_a_deleted_volumes_extents_read_back_as_zeroes() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut s = Setup::new(&[64], 4);
    let gone = s.create_volume(32, 8);
    let kept = s.create_volume(32, 8);
    let list = s.volume_list();
    let extent = 4 * MIB;
    // Where each volume's first extent lies in the LUN file (data starts
    // after the 1 MiB label area).
    let at = |id: Uuid| {
        MIB + listed(&list, id).unwrap()["segments"][0]["first_extent"]
            .as_u64()
            .unwrap()
            * extent
    };
    let mut lun = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&s.luns[0])
        .unwrap();
    for (id, byte) in [(gone, 0xAAu8), (kept, 0xBB)] {
        lun.seek(SeekFrom::Start(at(id))).unwrap();
        lun.write_all(&vec![byte; extent as usize]).unwrap();
    }
    lun.sync_all().unwrap();
    let mut spm = s.spawn_spm_with(&["--discard"]);
    s.wait_ready(&mut spm);
    let out = s.shrink("delete", gone, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    s.list_until("the deleted volume's extents free", |l| {
        l["released_extents"] == 0
    });
    let read = |lun: &mut fs::File, from: u64| {
        let mut b = vec![0u8; extent as usize];
        lun.seek(SeekFrom::Start(from)).unwrap();
        lun.read_exact(&mut b).unwrap();
        b
    };
    assert!(
        read(&mut lun, at(gone)).iter().all(|&b| b == 0),
        "discarded"
    );
    assert!(read(&mut lun, at(kept)).iter().all(|&b| b == 0xBB), "kept");
    assert!(
        s.spm_logs().contains("discarded 2 reclaimed extents"),
        "{}",
        s.spm_logs()
    );
    spm.term();
}

impl Setup {
    /// `pool remove-lun LUN`, with `--json` or not.
    fn remove_lun(&self, lun: &str, json: bool) -> Output {
        let mut args = vec![
            "pool",
            "remove-lun",
            lun,
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        self.cli(&args)
    }

    /// The LUN each of `volume`'s segments lies on, from `volume list`.
    fn luns_of(&self, list: &Value, volume: Uuid) -> Vec<String> {
        listed(list, volume).unwrap_or_else(|| panic!("{volume} listed: {list}"))["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["lun"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// `pool remove-lun` through the SPM and without one: refused (nothing
/// changed) for the only LUN and while a host holds a volume on it; else
/// every segment is copied to the other LUN, the data reads back whole
/// through the new maps, and the LUN leaves the pool with its label wiped.
#[test]
fn a_lun_is_removed_with_its_volumes_data_moved_and_refused_while_a_host_holds_one() {
    let mut s = Setup::new(&[128, 128], 4);
    let (lun1, lun2) = (s.luns[0].clone(), s.luns[1].clone());
    let lun1_id = spmbox::backend::builtin::read_label(&lun1)
        .unwrap()
        .unwrap()
        .lun
        .to_string();
    let out = s.remove_lun(&lun1_id, true);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("only LUN") && err.contains("Nothing was changed"),
        "{err}"
    );
    // Two volumes written whole by a host that then stops, and a third
    // that a host keeps open.
    let a = s.create_volume(32, 4);
    let b = s.create_volume(32, 4);
    let c = s.create_volume(16, 8);
    let mut spm = s.start_spm();
    let mut writer = s.start_host(1, &[a, b], "64M", "4M");
    wait_all(
        std::slice::from_mut(&mut writer),
        Duration::from_secs(60),
        &s,
    );
    let out = s.add_lun(&lun2);
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    let mut holder = s.start_host(2, &[c], "64k", "4M");
    s.list_until("volume c held by host 2", |l| {
        listed(l, c).is_some_and(|v| v["held_by"][0]["host"] == 2)
    });
    let before = s.volume_list();
    let out = s.remove_lun(lun1.to_str().unwrap(), true);
    assert!(!out.status.success(), "refused while host 2 holds c");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{c} (host 2)")) && err.contains("Nothing was changed"),
        "{err}"
    );
    assert_eq!(
        s.volume_list()["volumes"],
        before["volumes"],
        "nothing moved"
    );
    holder.term();
    // Through the SPM, by path.
    let out = s.remove_lun(lun1.to_str().unwrap(), true);
    assert!(
        out.status.success(),
        "remove-lun: {}{}",
        text(&out.stderr),
        s.logs_text()
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["state"], "done", "{answer}");
    assert_eq!(answer["lun"], lun1_id, "{answer}");
    let list = s.volume_list();
    let moved: u64 = [a, b, c]
        .iter()
        .map(|v| {
            listed(&list, *v).unwrap()["physical_size"]
                .as_u64()
                .unwrap()
                / (4 * MIB)
        })
        .sum();
    assert_eq!(answer["moved_extents"], moved, "{answer} {list}");
    assert_eq!(
        list["total_extents"].as_u64(),
        Some(31),
        "one LUN left: {list}"
    );
    for v in [a, b, c] {
        assert!(
            s.luns_of(&list, v).iter().all(|l| *l != lun1_id),
            "{v} still on LUN 1: {list}"
        );
    }
    assert!(
        spmbox::backend::builtin::read_label(&lun1)
            .unwrap()
            .is_none(),
        "LUN 1's label is wiped"
    );
    let (bytes, errors, first) = s.verify(&[a, b], 32 * MIB);
    assert_eq!((bytes, errors), (64 * MIB, 0), "{first:?}");
    let status = text(
        &s.cli(&[
            "status",
            "--device",
            s.device.to_str().unwrap(),
            "--control",
            s.control.to_str().unwrap(),
        ])
        .stdout,
    );
    assert!(
        status.contains(&format!(
            "remove-lun {lun1_id}: done, {moved} of {moved} extents"
        )),
        "{status}"
    );
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    s.check_pool();

    // Without an SPM: LUN 1 comes back, LUN 2 goes (by UUID), with text
    // output.
    let out = s.add_lun(&lun1);
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    let lun2_id = spmbox::backend::builtin::read_label(&lun2)
        .unwrap()
        .unwrap()
        .lun
        .to_string();
    let out = s.remove_lun(&lun2_id, false);
    assert!(out.status.success(), "remove-lun: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("LUN {lun2_id} removed from the pool")),
        "{}",
        text(&out.stdout)
    );
    let list = s.volume_list();
    for v in [a, b, c] {
        assert!(
            s.luns_of(&list, v).iter().all(|l| *l != lun2_id),
            "{v} still on LUN 2: {list}"
        );
    }
    let (bytes, errors, first) = s.verify(&[a, b], 32 * MIB);
    assert_eq!((bytes, errors), (64 * MIB, 0), "{first:?}");
    s.check_pool();
}

/// With lvm2, `pool remove-lun` removes an empty PV (`vgreduce`), through
/// the SPM and without one, and refuses one with extents of a volume on
/// it, naming the LVs and `pvmove`, or the only PV; nothing is changed
/// when it refuses.
#[test]
fn with_the_lvm_backend_an_empty_pv_is_removed_and_one_in_use_refused() {
    if let Some(why) = lvm_missing() {
        eprintln!(
            "skipped: with_the_lvm_backend_an_empty_pv_is_removed_and_one_in_use_refused: {why}"
        );
        return;
    }
    let mut s = Setup::on(Storage::Lvm, &[64, 64], 4);
    let (pv1, pv2) = (
        s.luns[0].to_str().unwrap().to_owned(),
        s.luns[1].to_str().unwrap().to_owned(),
    );
    let a = s.create_volume(32, 8);
    let refused = |out: Output, says: &str| {
        assert!(!out.status.success(), "refused: {says}");
        let err = text(&out.stderr);
        assert!(
            err.contains(says) && err.contains("Nothing was changed"),
            "{err}"
        );
    };
    refused(s.remove_lun(&pv1, true), "the only PV");
    let out = s.add_lun(&s.luns[1].clone());
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    let total = s.volume_list()["total_extents"].as_u64().unwrap();
    refused(
        s.remove_lun(&pv1, true),
        &format!("LVs {a} have extents on it"),
    );
    assert!(text(&s.remove_lun(&pv1, true).stderr).contains(&format!("pvmove {pv1}")));
    // Without an SPM.
    let out = s.remove_lun(&pv2, true);
    assert!(out.status.success(), "remove-lun: {}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["state"], "done", "{answer}");
    let list = s.volume_list();
    assert!(list["total_extents"].as_u64().unwrap() < total, "{list}");
    // Through the SPM: the volume goes, then its PV.
    let out = s.add_lun(&s.luns[1].clone());
    assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    let mut spm = s.start_spm();
    let out = s.shrink("delete", a, None);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    s.list_until("a's extents free", |l| l["released_extents"] == 0);
    let out = s.remove_lun(&pv1, false);
    assert!(out.status.success(), "remove-lun: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("PV {pv1} removed from volume group")),
        "{}",
        text(&out.stdout)
    );
    let list = s.volume_list();
    assert!(list["total_extents"].as_u64().unwrap() < total, "{list}");
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    s.check_pool();
}

/// A host does not start the guest of a volume the pool names as being
/// moved (a `pool remove-lun` copies it); an SPM that starts clears a name
/// left by a removal cut short, and the guest then starts.
#[test]
fn a_host_waits_for_a_volume_being_moved_until_an_spm_clears_it() {
    let mut s = Setup::new(&[64], 4);
    let v = s.create_volume(16, 4);
    {
        let domain = Domain::open(&s.device, spmbox::io::device::Access::ReadWrite).unwrap();
        let (mut pool, seq) = domain.read_pool().unwrap();
        pool.set_moving(v).unwrap();
        domain.write_pool(&pool, seq + 1).unwrap();
    }
    let mut host = s.start_host(1, &[v], "16M", "4M");
    let log = || {
        fs::read_dir(s.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("host1."))
            .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("the SPM is moving this volume") {
        assert!(Instant::now() < deadline, "host log: {}", log());
        assert!(host.alive(), "host: {}", s.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(listed(&s.volume_list(), v).unwrap()["moving"], true);
    assert!(
        !s.events().iter().any(|e| e["event"] == "started"),
        "the guest started while its volume was named moving: {:?}",
        s.events()
    );
    let mut spm = s.start_spm();
    wait_all(std::slice::from_mut(&mut host), Duration::from_secs(60), &s);
    assert!(
        s.spm_logs()
            .contains(&format!("the pool named volume {v} as being moved")),
        "{}",
        s.spm_logs()
    );
    assert!(s.events().iter().any(|e| e["event"] == "done"));
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    let domain = Domain::open(&s.device, spmbox::io::device::Access::ReadOnly).unwrap();
    assert!(domain.read_pool().unwrap().0.moving().is_nil());
    let (bytes, errors, first) = s.verify(&[v], 16 * MIB);
    assert_eq!((bytes, errors), (16 * MIB, 0), "{first:?}");
}

/// `volume reduce` without --to keeps what the guest wrote, read from the
/// volume, plus one extent, and refuses a volume whose content it cannot
/// read, changing nothing.
#[test]
fn a_volume_is_reduced_to_what_its_guest_wrote_plus_one_extent() {
    let mut s = Setup::new(&[128], 4);
    let v = s.create_volume(64, 4);
    let blank = s.create_volume(64, 12);
    let mut spm = s.start_spm();
    let log = s.log("host1");
    let status = Command::new(bin())
        .args(["host", "--device"])
        .arg(&s.device)
        .args(["--host-id", "1", "--rate", "64M", "--chunk-size", "16M"])
        .args(["--guest-bytes", "10M", "--exit-when-done"])
        .args(["--volume", &v.to_string()])
        .env("SPMBOX_RUN_DIR", &s.run)
        .stderr(log)
        .status()
        .unwrap();
    assert!(status.success(), "host: {}", s.logs_text());
    let before = listed(&s.volume_list(), v).unwrap()["physical_size"]
        .as_u64()
        .unwrap();
    let out = s.shrink("reduce", blank, None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot tell what the guest of volume")
            && err.contains("give --to")
            && err.contains("Nothing was changed"),
        "{err}"
    );
    let out = s.shrink("reduce", v, None);
    assert!(out.status.success(), "reduce: {}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["written"], 10 * MIB, "{answer}");
    assert_eq!(answer["content"], "test_data", "{answer}");
    assert_eq!(
        answer["size"],
        16 * MIB,
        "10 MiB is 3 extents, and one more: {answer}"
    );
    assert_eq!(
        answer["released"]["extents"].as_u64().unwrap(),
        (before - 16 * MIB) / (4 * MIB),
        "{answer}"
    );
    let (bytes, errors, first) = s.verify(&[v], 10 * MIB);
    assert_eq!((bytes, errors), (10 * MIB, 0), "{first:?}");
    assert!(spm.term().success(), "SPM: {}", s.logs_text());
    s.check_pool();
}
