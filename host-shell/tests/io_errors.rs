//! I/O errors under running daemons, through the real binary: a domain
//! device set read-only under a running SPM (writes fail with EPERM), and
//! the file system under a host's LUN file filling up (ENOSPC). The
//! daemons must survive, answer once the storage heals, answer nothing
//! before it is committed, and lose no byte a guest wrote.
//!
//! Needs root, `losetup`, `blockdev`, `mkfs.ext4` and `mount`; without
//! them every test prints `skipped: <why>` and passes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Loop;
use serde_json::Value;
use spmbox::backend::VolumeMaps;
use spmbox::backend::builtin::BuiltinMaps;
use spmbox::daemon::guest::{self, Devices};
use spmbox_core::wire::Uuid;

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Why these tests cannot run here, if they cannot.
fn missing(tools: &[&str]) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root".into());
    }
    for tool in tools {
        let found = std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths)
                .chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")])
                .any(|d| d.join(tool).exists())
        });
        if !found {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

fn sh(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        text(&out.stderr)
    );
    out
}

/// A child process, killed on drop.
struct Proc(Child);

impl Proc {
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    fn term(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.0.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A small ext4 file system on a loop device, mounted; unmounted on drop.
struct SmallFs {
    mount: PathBuf,
    _loop: Loop,
}

impl SmallFs {
    fn new(image: &Path, mount: &Path, size: u64) -> SmallFs {
        fs::File::create(image).unwrap().set_len(size).unwrap();
        let dev = Loop::attach(image, 512);
        sh("mkfs.ext4", &["-q", "-F", dev.dev.to_str().unwrap()]);
        fs::create_dir_all(mount).unwrap();
        sh(
            "mount",
            &[dev.dev.to_str().unwrap(), mount.to_str().unwrap()],
        );
        SmallFs {
            mount: mount.to_owned(),
            _loop: dev,
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// A domain: its device, LUNs, run directory and logs.
struct Domain {
    dir: tempfile::TempDir,
    device: PathBuf,
    run: PathBuf,
    control: PathBuf,
    lun_search: Vec<PathBuf>,
    logs: u32,
}

impl Domain {
    /// A domain on `device` with one LUN `lun` (both must exist).
    fn create(dir: tempfile::TempDir, device: PathBuf, lun: &Path, search: PathBuf) -> Domain {
        let run = dir.path().join("run");
        fs::create_dir_all(&run).unwrap();
        let d = Domain {
            control: run.join("spm.sock"),
            dir,
            device,
            run,
            lun_search: vec![search],
            logs: 0,
        };
        let out = d.cli(&[
            "pool",
            "create",
            "--device",
            d.device.to_str().unwrap(),
            "--lun",
            lun.to_str().unwrap(),
            "--hosts",
            "4",
            "--extent-size",
            "1M",
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        d
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("SPMBOX_RUN_DIR", &self.run)
            .output()
            .expect("run spmbox")
    }

    fn log(&mut self, name: &str) -> fs::File {
        self.logs += 1;
        fs::File::create(self.dir.path().join(format!("{name}.{}.log", self.logs))).unwrap()
    }

    fn read_logs(&self, prefix: &str) -> String {
        let mut paths: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "log")
                    && p.file_name().unwrap().to_string_lossy().starts_with(prefix)
            })
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The last lines of every log, for failure messages.
    fn logs_text(&self) -> String {
        let mut out = String::new();
        for prefix in ["spm", "host", "events"] {
            let all = self.read_logs(prefix);
            let lines: Vec<&str> = all.lines().collect();
            out += &format!("\n--- {prefix} logs (last lines)\n");
            out += &lines[lines.len().saturating_sub(15)..].join("\n");
        }
        out
    }

    fn spawn_spm(&mut self) -> Proc {
        let log = self.log("spm");
        Proc(
            Command::new(bin())
                .args(["-vv", "spm", "--device"])
                .arg(&self.device)
                .arg("--control")
                .arg(&self.control)
                .env("SPMBOX_RUN_DIR", &self.run)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn spm"),
        )
    }

    /// Starts the SPM and waits until it answers on its control socket.
    fn start_spm(&mut self) -> Proc {
        let mut spm = self.spawn_spm();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.status();
            if out["spm"]["state"] == "active" && out["pool_source"] == "spm" {
                return spm;
            }
            assert!(spm.alive(), "the SPM exited: {}", self.logs_text());
            assert!(Instant::now() < deadline, "no SPM: {}", self.logs_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Value {
        let out = self.cli(&[
            "status",
            "--device",
            self.device.to_str().unwrap(),
            "--control",
            self.control.to_str().unwrap(),
            "--json",
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn create_volume_cmd(&self, virtual_mib: u64, initial_mib: u64) -> Output {
        self.cli(&[
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
        ])
    }

    fn create_volume(&self, virtual_mib: u64, initial_mib: u64) -> Uuid {
        let out = self.create_volume_cmd(virtual_mib, initial_mib);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        Uuid::parse_str(text(&out.stdout).trim()).expect("a UUID")
    }

    fn start_host(&mut self, host: u16, volumes: &[Uuid], rate: &str) -> Proc {
        let log = self.log(&format!("host{host}"));
        let events = self.log(&format!("events{host}"));
        let mut cmd = Command::new(bin());
        cmd.args(["-v", "host", "--device"])
            .arg(&self.device)
            .args(["--host-id", &host.to_string(), "--rate", rate])
            .args(["--chunk-size", "2M", "--write-size", "64K"])
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
        Proc(cmd.spawn().expect("spawn host"))
    }

    fn events(&self) -> Vec<Value> {
        self.read_logs("events")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every byte the guests wrote, read back: (bytes verified, errors).
    fn verify(&self, volumes: &[Uuid], upto: u64) -> (u64, u64) {
        let mut maps = BuiltinMaps::open(&self.device, self.lun_search.clone()).unwrap();
        let mut devices = Devices::new();
        let (mut bytes, mut errors) = (0, 0);
        for v in volumes {
            let map = maps.refresh(*v).unwrap();
            let r = guest::verify(*v, &map, &mut devices, upto.min(map.size)).unwrap();
            bytes += r.bytes_verified;
            errors += r.error_count;
        }
        (bytes, errors)
    }

    fn wait_exit(&self, p: &mut Proc, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not finish: {}",
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A domain whose device and LUN are loop devices over files.
fn loop_domain() -> (Domain, Loop, Loop) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let dev_file = dir.path().join("domain");
    let lun_file = dir.path().join("lun1");
    fs::File::create(&dev_file)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    fs::File::create(&lun_file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let dev = Loop::attach(&dev_file, 512);
    let lun = Loop::attach(&lun_file, 512);
    let d = Domain::create(dir, dev.dev.clone(), &lun.dev, lun.dev.clone());
    (d, dev, lun)
}

/// Every extension the SPM answered was logged as committed before its
/// reply: a `reply to host H slot S: extended at N ... volume=V` line comes
/// after a `job to ...: extended to N ... volume=V` line.
fn assert_no_reply_before_its_commit(log: &str) {
    let mut committed: Vec<(String, u64)> = Vec::new();
    let mut replies = 0;
    let volume_of = |line: &str| -> String {
        let rest = line.split("volume=").nth(1).expect("a volume field");
        rest.split_whitespace().next().unwrap().to_string()
    };
    let first_number = |text: &str| -> u64 { text.split(' ').next().unwrap().parse().unwrap() };
    for line in log.lines() {
        if line.contains(": job to ")
            && let Some(size) = line.split(": extended to ").nth(1)
        {
            committed.push((volume_of(line), first_number(size)));
        }
        if line.contains(": reply to host ")
            && let Some(at) = line.split(": extended at ").nth(1)
        {
            replies += 1;
            let (volume, size) = (volume_of(line), first_number(at));
            assert!(
                committed.iter().any(|(v, s)| *v == volume && *s >= size),
                "reply before its commit: {line}"
            );
        }
    }
    assert!(replies > 0, "no extension was answered");
}

#[test]
fn an_spm_whose_domain_device_turns_read_only_survives_and_answers_once_it_heals() {
    if let Some(why) = missing(&["losetup", "blockdev"]) {
        eprintln!("skipped: read-only domain device under the SPM: {why}");
        return;
    }
    let (mut d, dev, _lun) = loop_domain();
    let mut spm = d.start_spm();
    let volume = d.create_volume(16, 1);
    dev.set_read_only(true);
    // The host starts against the read-only device too: its inbox writes
    // fail and are retried.
    let mut host = d.start_host(1, &[volume], "16M");
    std::thread::sleep(Duration::from_secs(3));
    assert!(spm.alive(), "the SPM died: {}", d.logs_text());
    assert!(host.alive(), "the host died: {}", d.logs_text());
    assert!(
        !d.events().iter().any(|e| e["event"] == "extended"),
        "an extension was answered while the device was read-only"
    );
    // An admin request is refused at once with what is wrong.
    let out = d.create_volume_cmd(8, 1);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the domain device is failing")
            && text(&out.stderr).contains("retrying"),
        "{}",
        text(&out.stderr)
    );
    dev.set_read_only(false);
    let status = d.wait_exit(&mut host, Duration::from_secs(60), "the host");
    assert!(status.success(), "host: {}", d.logs_text());
    let spm_log = d.read_logs("spm");
    assert!(spm_log.contains("failed: "), "{spm_log}");
    assert!(spm_log.contains("works again after"), "{spm_log}");
    assert_no_reply_before_its_commit(&spm_log);
    assert!(spm.term().success(), "SPM: {}", d.logs_text());
    assert_eq!(d.status()["spm"]["state"], "vacant");
    assert_eq!(d.verify(&[volume], 16 * MIB), (16 * MIB, 0));
}

#[test]
fn sigterm_during_an_error_streak_stops_the_spm_and_the_next_one_answers() {
    if let Some(why) = missing(&["losetup", "blockdev"]) {
        eprintln!("skipped: SIGTERM during an error streak: {why}");
        return;
    }
    let (mut d, dev, _lun) = loop_domain();
    let mut spm = d.start_spm();
    let volume = d.create_volume(16, 1);
    let mut host = d.start_host(1, &[volume], "16M");
    // Let extensions flow, then fail every write.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.events().iter().any(|e| e["event"] == "extended") {
        assert!(Instant::now() < deadline, "{}", d.logs_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    dev.set_read_only(true);
    std::thread::sleep(Duration::from_secs(2));
    let status = {
        let pid = rustix::process::Pid::from_child(&spm.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        d.wait_exit(&mut spm, Duration::from_secs(10), "the SPM after SIGTERM")
    };
    assert!(!status.success(), "the SPM could not vacate its header");
    assert!(
        d.read_logs("spm")
            .contains("stopped without writing the last replies"),
        "{}",
        d.logs_text()
    );
    assert!(host.alive(), "the host died: {}", d.logs_text());
    dev.set_read_only(false);
    // The next SPM takes over once the heartbeat has stopped, and answers
    // what the first could not.
    let mut next = d.start_spm();
    let status = d.wait_exit(&mut host, Duration::from_secs(60), "the host");
    assert!(status.success(), "host: {}", d.logs_text());
    assert_no_reply_before_its_commit(&d.read_logs("spm"));
    assert!(next.term().success(), "SPM: {}", d.logs_text());
    assert_eq!(d.verify(&[volume], 16 * MIB), (16 * MIB, 0));
}

#[test]
fn a_guest_whose_lun_file_system_fills_up_waits_and_loses_nothing() {
    if let Some(why) = missing(&["losetup", "mkfs.ext4", "mount", "umount", "fallocate"]) {
        eprintln!("skipped: a full file system under a LUN file: {why}");
        return;
    }
    // Dropped in reverse: the domain's files, the file system unmounted,
    // then its image.
    let fs_dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let small = SmallFs::new(
        &fs_dir.path().join("fs.img"),
        &fs_dir.path().join("mnt"),
        96 * MIB,
    );
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    // A sparse LUN file; the file system holds the volume, but not beside
    // the filler below.
    let lun = small.mount.join("lun1");
    fs::File::create(&lun).unwrap().set_len(64 * MIB).unwrap();
    let device = dir.path().join("domain");
    let search = small.mount.clone();
    let mut d = Domain::create(dir, device, &lun, search);
    let mut spm = d.start_spm();
    let volume = d.create_volume(32, 1);
    // Fill the file system, leaving a few MiB for the guest's first
    // writes.
    let filler = small.mount.join("filler");
    let free = rustix::fs::statvfs(&small.mount).unwrap();
    let leave = 4 * MIB;
    let fill = (free.f_bavail * free.f_frsize).saturating_sub(leave);
    sh(
        "fallocate",
        &["-l", &fill.to_string(), filler.to_str().unwrap()],
    );
    let mut host = d.start_host(1, &[volume], "32M");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d
        .read_logs("host")
        .contains("is full: free space or preallocate LUN files")
    {
        assert!(host.alive(), "the host died: {}", d.logs_text());
        assert!(Instant::now() < deadline, "no ENOSPC: {}", d.logs_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.read_logs("host").contains(lun.to_str().unwrap()),
        "the log names the LUN file"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(host.alive(), "the host died: {}", d.logs_text());
    // The host's status file counts the guest as paused, with why.
    let status_file = fs::read_dir(&d.run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("host-") && name.ends_with(".json")
        })
        .expect("the host's status file");
    let s: Value = serde_json::from_str(&fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(s["volumes"][0]["paused"], true, "{s}");
    assert!(s["volumes"][0]["io_error"].is_string(), "{s}");
    fs::remove_file(&filler).unwrap();
    let status = d.wait_exit(&mut host, Duration::from_secs(60), "the host");
    assert!(status.success(), "host: {}", d.logs_text());
    assert!(d.read_logs("host").contains("writes again after"));
    assert!(spm.term().success(), "SPM: {}", d.logs_text());
    assert_eq!(d.verify(&[volume], 32 * MIB), (32 * MIB, 0));
}
