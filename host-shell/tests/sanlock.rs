//! `--lease sanlock`: the SPM role and host ids protected by sanlock on the
//! domain device. Each "machine" is its own sanlock daemon (its own
//! SANLOCK_RUN_DIR) and its own spmbox run directory; the domain is a file,
//! and the second machine reaches it through a loop device over that file.
//!
//! Needs root, the `sanlock` binary, a C compiler (the daemon runs with
//! the LD_PRELOAD shim in sanlock_setrlimit_shim.c, since it cannot raise
//! RLIMIT_MEMLOCK without CAP_SYS_RESOURCE) and losetup; prints
//! `skipped: ...` and passes otherwise. SPMBOX_SANLOCK_RACES sets how many
//! times the race runs (default 3).

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

/// sanlock's I/O timeout in the tests: joining a lockspace takes about 3 s.
const IO_TIMEOUT: &str = "1";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn works(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why these tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if let Some(why) = loop_devices_missing() {
        return Some(why);
    }
    if !works("sanlock", "version") {
        return Some("needs the sanlock binary (package sanlock)".into());
    }
    if !works("cc", "--version") {
        return Some("needs a C compiler for the sanlock setrlimit shim".into());
    }
    None
}

macro_rules! skip_unless_ready {
    ($name:expr) => {
        if let Some(why) = missing() {
            eprintln!("skipped: {}: {why}", $name);
            return;
        }
    };
}

/// A child process, killed on drop.
struct Proc(Child);

impl Proc {
    fn term(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.0.wait().expect("wait")
    }

    fn wait_for(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One machine: a sanlock daemon with its own run directory, and the
/// spmbox run directory of the processes on it.
struct Machine {
    sanlock_run: PathBuf,
    spmbox_run: PathBuf,
    _daemon: Proc,
}

impl Machine {
    fn start(dir: &Path, name: &str) -> Machine {
        let shim = dir.join("setrlimit_shim.so");
        if !shim.exists() {
            let source =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sanlock_setrlimit_shim.c");
            let out = Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(&shim)
                .arg(&source)
                .arg("-ldl")
                .output()
                .expect("run cc");
            assert!(out.status.success(), "cc: {}", text(&out.stderr));
        }
        let sanlock_run = dir.join(format!("{name}-sanlock"));
        let spmbox_run = dir.join(format!("{name}-spmbox"));
        fs::create_dir_all(&sanlock_run).unwrap();
        fs::create_dir_all(&spmbox_run).unwrap();
        let log = fs::File::create(dir.join(format!("{name}-sanlock.log"))).unwrap();
        let daemon = Command::new("sanlock")
            .args([
                "daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root",
            ])
            .args(["-G", "root"])
            .env("SANLOCK_RUN_DIR", &sanlock_run)
            .env("LD_PRELOAD", &shim)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sanlock daemon");
        let m = Machine {
            sanlock_run,
            spmbox_run,
            _daemon: Proc(daemon),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !m.sanlock_run.join("sanlock.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "the sanlock daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("SANLOCK_RUN_DIR", &self.sanlock_run)
            .env("SPMBOX_RUN_DIR", &self.spmbox_run);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run spmbox")
    }

    fn spawn(&self, args: &[&str], log: &Path) -> Proc {
        Proc(
            self.cmd(args)
                .stdout(fs::File::create(log.with_extension("out")).unwrap())
                .stderr(fs::File::create(log).unwrap())
                .spawn()
                .expect("spawn spmbox"),
        )
    }
}

/// A domain on files with sanlock leases, and one volume per entry of
/// `volumes` (virtual MiB).
struct TestDomain {
    dir: tempfile::TempDir,
    device: PathBuf,
    volumes: Vec<Uuid>,
}

fn lease_args() -> [&'static str; 4] {
    ["--lease", "sanlock", "--sanlock-io-timeout", IO_TIMEOUT]
}

fn create_domain(volumes: usize) -> TestDomain {
    let dir = tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .unwrap();
    let device = dir.path().join("mbox");
    let lun = dir.path().join("lun1");
    fs::File::create(&lun).unwrap().set_len(130 << 20).unwrap();
    let mut args = vec![
        "pool",
        "create",
        "--device",
        device.to_str().unwrap(),
        "--lun",
        lun.to_str().unwrap(),
        "--hosts",
        "8",
        "--extent-size",
        "1M",
    ];
    args.extend(lease_args());
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "pool create: {}", text(&out.stderr));
    let mut ids = Vec::new();
    for _ in 0..volumes {
        let out = Command::new(bin())
            .args(["volume", "create", "--device", device.to_str().unwrap()])
            .args(["--virtual-size", "24M", "--initial-size", "1M"])
            .env("SPMBOX_RUN_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        ids.push(Uuid::parse_str(text(&out.stdout).trim()).unwrap());
    }
    TestDomain {
        dir,
        device,
        volumes: ids,
    }
}

fn spm_args<'a>(device: &'a str, spm_id: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "-v",
        "spm",
        "--device",
        device,
        "--spm-id",
        spm_id,
        "--doorbell-interval",
        "5ms",
        "--full-scan-interval",
        "1s",
    ];
    a.extend(lease_args());
    a
}

fn host_args<'a>(
    device: &'a str,
    host: &'a str,
    volumes: &'a [String],
    lun: &'a str,
) -> Vec<&'a str> {
    let mut a = vec![
        "-v",
        "host",
        "--device",
        device,
        "--host-id",
        host,
        "--rate",
        "0",
        "--chunk-size",
        "2M",
        "--lun-search",
        lun,
        "--exit-when-done",
    ];
    for v in volumes {
        a.extend(["--volume", v.as_str()]);
    }
    a.extend(lease_args());
    a
}

fn status_json(m: &Machine, device: &str) -> Value {
    let mut args = vec!["status", "--device", device, "--json"];
    args.extend(lease_args());
    let out = m.run(&args);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `f` holds, for up to `timeout`.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn spm_epoch(m: &Machine, device: &str) -> Option<u64> {
    let s = status_json(m, device);
    (s["spm"]["state"] == "active").then(|| s["spm"]["epoch"].as_u64())?
}

#[test]
fn a_host_id_is_refused_while_another_process_or_machine_holds_it() {
    skip_unless_ready!("a_host_id_is_refused_while_another_process_or_machine_holds_it");
    let d = create_domain(1);
    let (a, b) = (
        Machine::start(d.dir.path(), "a"),
        Machine::start(d.dir.path(), "b"),
    );
    let device = d.device.to_str().unwrap();
    let vols = [d.volumes[0].to_string()];
    let lun = d.dir.path().to_str().unwrap();
    let mut args = host_args(device, "3", &vols, lun);
    args.retain(|x| *x != "--exit-when-done");
    let mut first = a.spawn(&args, &d.dir.path().join("host-first.log"));
    assert!(
        wait_until(Duration::from_secs(20), || {
            status_json(&a, device)["leases"]["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h["host_id"] == 3))
        }),
        "host id 3 was never joined"
    );
    // A second process on the same machine.
    let out = a.run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("host id 3 of domain") && text(&out.stderr).contains("in use"),
        "{}",
        text(&out.stderr)
    );
    // Another machine, through another path.
    let lp = Loop::attach_direct_io(&d.device);
    let other = lp.dev.to_str().unwrap();
    let out = b.run(&host_args(other, "3", &vols, lun));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("held by another host"),
        "{}",
        text(&out.stderr)
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the first host died");
    assert!(first.term().success());
}

#[test]
fn a_second_spm_through_another_path_cannot_acquire_the_lease() {
    skip_unless_ready!("a_second_spm_through_another_path_cannot_acquire_the_lease");
    let d = create_domain(0);
    let (a, b) = (
        Machine::start(d.dir.path(), "a"),
        Machine::start(d.dir.path(), "b"),
    );
    let device = d.device.to_str().unwrap();
    let mut first = a.spawn(&spm_args(device, "1"), &d.dir.path().join("spm1.log"));
    assert!(wait_until(Duration::from_secs(20), || spm_epoch(
        &a, device
    )
    .is_some()));
    let lp = Loop::attach_direct_io(&d.device);
    let out = b.run(&spm_args(lp.dev.to_str().unwrap(), "2"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("another SPM holds the SPM lease")
            && text(&out.stderr).contains("held by host id 1"),
        "{}",
        text(&out.stderr)
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the first SPM died");
    assert!(first.term().success());
}

#[test]
fn the_epoch_comes_from_the_lease_version_and_grows_across_spms() {
    skip_unless_ready!("the_epoch_comes_from_the_lease_version_and_grows_across_spms");
    let d = create_domain(1);
    let a = Machine::start(d.dir.path(), "a");
    let device = d.device.to_str().unwrap();
    // A host with the SPM's host id keeps the lockspace joined between
    // SPMs, so that the sanlock CLI below can acquire the lease.
    let vols = [d.volumes[0].to_string()];
    let lun = d.dir.path().to_str().unwrap();
    let mut args = host_args(device, "1", &vols, lun);
    args.retain(|x| *x != "--exit-when-done");
    let _host = a.spawn(&args, &d.dir.path().join("host.log"));
    let mut last = 0;
    for round in 0..2 {
        let log = d.dir.path().join(format!("spm{round}.log"));
        let mut spm = a.spawn(&spm_args(device, "1"), &log);
        assert!(
            wait_until(Duration::from_secs(20), || spm_epoch(&a, device).is_some()),
            "{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        let s = status_json(&a, device);
        let epoch = s["spm"]["epoch"].as_u64().unwrap();
        let lver = s["leases"]["spm"]["lver"].as_u64().unwrap();
        assert_eq!(s["leases"]["spm"]["held"], true);
        assert_eq!(s["leases"]["spm"]["owner"], 1);
        assert_eq!(epoch, lver, "round {round}: {s}");
        assert!(epoch > last);
        last = epoch;
        assert!(spm.term().success());
        // Three SPMs that held the lease and died before they wrote the
        // header: the lease version grows, the header's epoch does not.
        let resource = format!(
            "{}:SPM:{}:{}",
            s["domain"].as_str().unwrap(),
            s["leases"]["path"].as_str().unwrap(),
            s["leases"]["resource_offset"]
        );
        for _ in 0..3 {
            // The lease is free once sanlock has finished the release.
            let acquired = wait_until(Duration::from_secs(10), || {
                Command::new("sanlock")
                    .args(["client", "command", "-r", &resource, "-c", "/bin/true"])
                    .env("SANLOCK_RUN_DIR", &a.sanlock_run)
                    .output()
                    .unwrap()
                    .status
                    .success()
            });
            assert!(
                acquired,
                "cannot acquire {resource}; host: {}",
                fs::read_to_string(d.dir.path().join("host.log")).unwrap_or_default()
            );
        }
    }
    assert!(last >= 5, "the second SPM ran at epoch {last}");
}

#[test]
fn status_shows_the_lease_holders() {
    skip_unless_ready!("status_shows_the_lease_holders");
    let d = create_domain(1);
    let a = Machine::start(d.dir.path(), "a");
    let device = d.device.to_str().unwrap();
    let vols = [d.volumes[0].to_string()];
    let lun = d.dir.path().to_str().unwrap();
    let mut spm = a.spawn(&spm_args(device, "5"), &d.dir.path().join("spm.log"));
    let mut args = host_args(device, "5", &vols, lun);
    args.retain(|x| *x != "--exit-when-done");
    let mut host = a.spawn(&args, &d.dir.path().join("host.log"));
    assert!(wait_until(Duration::from_secs(20), || {
        let s = status_json(&a, device);
        s["leases"]["spm"]["held"] == true
            && s["leases"]["hosts"]
                .as_array()
                .is_some_and(|h| h.len() == 1)
    }));
    let s = status_json(&a, device);
    assert_eq!(s["leases"]["spm"]["owner"], 5);
    let ids: Vec<u64> = s["leases"]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [5]);
    let mut args = vec!["status", "--device", device];
    args.extend(lease_args());
    let out = text(&a.run(&args).stdout);
    assert!(out.contains("SPM lease: held by host id 5"), "{out}");
    assert!(out.contains("host id 5:"), "{out}");
    assert!(host.term().success());
    assert!(spm.term().success());
    let s = status_json(&a, device);
    assert_eq!(s["leases"]["spm"]["held"], false, "{s}");
    assert_eq!(s["leases"]["hosts"], serde_json::json!([]), "{s}");
}

/// Two SPMs started at once through two paths on two machines, hosts
/// extending: one SPM serves, the other exits, and no extent is given
/// twice.
#[test]
fn two_spms_started_at_once_through_two_paths_never_allocate_an_extent_twice() {
    skip_unless_ready!("two_spms_started_at_once_through_two_paths_never_allocate_an_extent_twice");
    let runs: usize = std::env::var("SPMBOX_SANLOCK_RACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for run in 0..runs {
        let d = create_domain(2);
        let (a, b) = (
            Machine::start(d.dir.path(), "a"),
            Machine::start(d.dir.path(), "b"),
        );
        let lp = Loop::attach_direct_io(&d.device);
        let device = d.device.to_str().unwrap();
        let other = lp.dev.to_str().unwrap();
        let lun = d.dir.path().to_str().unwrap();
        let log = |n: &str| d.dir.path().join(format!("{n}.log"));
        let mut spm1 = a.spawn(&spm_args(device, "1"), &log("spm1"));
        let mut spm2 = b.spawn(&spm_args(other, "2"), &log("spm2"));
        let v1 = [d.volumes[0].to_string()];
        let v2 = [d.volumes[1].to_string()];
        let mut hosts = [
            a.spawn(&host_args(device, "1", &v1, lun), &log("host1")),
            b.spawn(&host_args(other, "2", &v2, lun), &log("host2")),
        ];
        for (i, h) in hosts.iter_mut().enumerate() {
            let status = h.wait_for(Duration::from_secs(60));
            assert!(
                status.is_some_and(|s| s.success()),
                "run {run}: host {i} did not finish: {}",
                fs::read_to_string(log(if i == 0 { "host1" } else { "host2" })).unwrap_or_default()
            );
        }
        // The loser's acquire fails once sanlock has seen the winner's
        // host id lease renewed.
        let mut exited = vec![false, false];
        wait_until(Duration::from_secs(30), || {
            exited = [&mut spm1, &mut spm2]
                .iter_mut()
                .map(|p| p.0.try_wait().unwrap().is_some())
                .collect();
            exited.iter().any(|e| *e)
        });
        assert_eq!(
            exited.iter().filter(|e| **e).count(),
            1,
            "run {run}: exactly one SPM must have exited: spm1: {}\nspm2: {}",
            fs::read_to_string(log("spm1")).unwrap_or_default(),
            fs::read_to_string(log("spm2")).unwrap_or_default()
        );
        let loser = if exited[0] { "spm1" } else { "spm2" };
        let loser_log = fs::read_to_string(log(loser)).unwrap();
        assert!(
            loser_log.contains("another SPM holds the SPM lease"),
            "run {run}: {loser_log}"
        );
        for p in [&mut spm1, &mut spm2] {
            if p.0.try_wait().unwrap().is_none() {
                assert!(p.term().success());
            }
        }
        let domain = Domain::open(&d.device, spmbox::io::device::Access::ReadOnly).unwrap();
        let (pool, _) = domain.read_pool().unwrap();
        pool.check_invariants().expect("pool invariants");
        let mut maps = BuiltinMaps::open(&d.device, vec![d.dir.path().to_owned()]).unwrap();
        let mut devices = Devices::new();
        for v in &d.volumes {
            let map = maps.refresh(*v).unwrap();
            assert!(
                map.size >= 24 << 20,
                "run {run}: volume {v} did not grow to its end"
            );
            let r = guest::verify(*v, &map, &mut devices, 24 << 20).unwrap();
            assert_eq!(
                r.error_count,
                0,
                "run {run}: volume {v}: {:?}",
                r.errors.first()
            );
        }
    }
}
