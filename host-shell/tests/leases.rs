//! The builtin leases (no sanlock), attacked through the binary: two SPMs
//! or two hosts on one domain that cannot see each other's lock because
//! each reaches the domain through another path (the domain file, and a
//! loop device over that file), each with its own run directory, as two
//! machines would.
//!
//! Every race ends with the same checks: the hosts finished without
//! aborting, exactly one SPM ran jobs, the committed pool holds no extent
//! in two places, every volume grew to its end and every byte its guest
//! wrote reads back.
//!
//! What the builtin lease cannot protect against, and these tests do not
//! try: a process that stalls between reading a header and writing its
//! own for longer than the settle time (1.5 heartbeat intervals). An SPM
//! that read a vacant (or dead) SPM header, then stalled, then wrote its
//! header after another SPM had settled and started committing, takes the
//! same epoch: the other reads back a foreign owner and stands down, but
//! the stalled one loaded the pool before that SPM's commits and will
//! hand out the extents they gave. Likewise a running SPM stalled between
//! its pre-commit read of the SPM header and the commit itself (or
//! between its heartbeat read and the header write) commits (or writes)
//! once after its lease ended. No watchdog kills a stalled process;
//! sanlock with wdmd does (docs/operations.md, section 7).
//!
//! Needs root and losetup; prints `skipped: ...` and passes otherwise.
//! SPMBOX_LEASE_RACES sets how many times each SPM race runs (default 3).

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Loop, loop_devices_missing};
use serde_json::Value;
use spmbox::backend::VolumeMaps;
use spmbox::backend::builtin::{BuiltinMaps, Domain};
use spmbox::daemon::guest::{self, Devices};
use spmbox_core::wire::Uuid;

const MIB: u64 = 1 << 20;
/// Each volume's virtual size; the guests write all of it.
const VOLUME: u64 = 24 * MIB;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

macro_rules! skip_unless_ready {
    ($name:expr) => {
        if let Some(why) = loop_devices_missing() {
            eprintln!("skipped: {}: {why}", $name);
            return;
        }
    };
}

fn races() -> usize {
    std::env::var("SPMBOX_LEASE_RACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// A child process, killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(&self.child)
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(self.pid(), signal).expect("signal");
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn term(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.child.wait().expect("wait")
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Extension jobs this process committed (an SPM logs each at -v).
    fn jobs(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(": job to "))
            .count()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly.
        let _ = rustix::process::kill_process(self.pid(), rustix::process::Signal::CONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One machine: a path to the domain and its own spmbox run directory
/// (so its own control socket), sharing nothing else with the other.
struct Machine {
    device: PathBuf,
    run: PathBuf,
}

impl Machine {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).env("SPMBOX_RUN_DIR", &self.run);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run spmbox")
    }

    fn spawn(&self, args: &[&str], log: PathBuf) -> Proc {
        let child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn spmbox");
        Proc { child, log }
    }

    fn device(&self) -> &str {
        self.device.to_str().unwrap()
    }

    fn spm(&self, d: &TestDomain, name: &str) -> Proc {
        let args = [
            "-v",
            "spm",
            "--device",
            self.device(),
            "--doorbell-interval",
            "5ms",
            "--full-scan-interval",
            "1s",
        ];
        self.spawn(&args, d.log(name))
    }

    /// A host whose guests write their whole volumes at `rate` per second
    /// (0: unlimited), then exits.
    fn host(&self, d: &TestDomain, host_id: &str, volumes: &[Uuid], rate: &str) -> Proc {
        let volumes: Vec<String> = volumes.iter().map(Uuid::to_string).collect();
        let lun = d.dir.path().to_str().unwrap();
        let mut args = vec![
            "-v",
            "host",
            "--device",
            self.device(),
            "--host-id",
            host_id,
            "--rate",
            rate,
            "--write-size",
            "256K",
            "--chunk-size",
            "2M",
            "--lun-search",
            lun,
            "--exit-when-done",
        ];
        for v in &volumes {
            args.extend(["--volume", v.as_str()]);
        }
        self.spawn(&args, d.log(&format!("host{host_id}")))
    }

    fn status(&self) -> Value {
        let out = self.run(&["status", "--device", self.device(), "--json"]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A builtin domain in a file, four volumes, and two machines: `a`
/// reaches the domain through the file, `b` through a loop device over
/// it.
struct TestDomain {
    volumes: Vec<Uuid>,
    a: Machine,
    b: Machine,
    // Detached before the directory goes, after every process is gone
    // (tests declare their processes after the domain).
    _loop: Loop,
    dir: tempfile::TempDir,
}

impl TestDomain {
    fn new() -> TestDomain {
        let dir = tempfile::tempdir()
            .or_else(|_| tempfile::tempdir_in("/var/tmp"))
            .unwrap();
        let device = dir.path().join("mbox");
        let lun = dir.path().join("lun1");
        fs::File::create(&lun).unwrap().set_len(130 * MIB).unwrap();
        let out = Command::new(bin())
            .args(["pool", "create", "--device", device.to_str().unwrap()])
            .args(["--lun", lun.to_str().unwrap(), "--hosts", "8"])
            .args(["--extent-size", "1M"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        let mut volumes = Vec::new();
        for _ in 0..4 {
            let out = Command::new(bin())
                .args(["volume", "create", "--device", device.to_str().unwrap()])
                .args(["--virtual-size", "24M", "--initial-size", "1M"])
                .env("SPMBOX_RUN_DIR", dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "volume create: {}", text(&out.stderr));
            volumes.push(Uuid::parse_str(text(&out.stdout).trim()).unwrap());
        }
        let lp = Loop::attach_direct_io(&device);
        let machine = |name: &str, device: PathBuf| {
            let run = dir.path().join(format!("run-{name}"));
            fs::create_dir_all(&run).unwrap();
            Machine { device, run }
        };
        TestDomain {
            volumes,
            a: machine("a", device),
            b: machine("b", lp.dev.clone()),
            _loop: lp,
            dir,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Host 1 on machine a (the first two volumes), host 2 on machine b
    /// (the other two).
    fn hosts(&self, rate: &str) -> [Proc; 2] {
        [
            self.a.host(self, "1", &self.volumes[..2], rate),
            self.b.host(self, "2", &self.volumes[2..], rate),
        ]
    }

    /// The SPM header as on disk. Read with a run directory of its own:
    /// `status` asks a running SPM through its control socket, and one
    /// that is stopped would keep it waiting.
    fn spm_header(&self) -> Value {
        let observer = Machine {
            device: self.a.device.clone(),
            run: self.dir.path().join("run-observer"),
        };
        fs::create_dir_all(&observer.run).unwrap();
        observer.status()["spm"].clone()
    }

    /// The hosts finish, the pool on disk is sound and holds no extent
    /// twice, every volume reached its end and every guest byte reads
    /// back.
    fn check(&self, hosts: &mut [Proc], run: usize, spms: &[&Proc]) {
        let logs = |hosts: &[Proc]| {
            spms.iter()
                .copied()
                .chain(hosts)
                .map(|p| format!("--- {}\n{}", p.log.display(), p.log()))
                .collect::<String>()
        };
        for i in 0..hosts.len() {
            let status = hosts[i].wait_for(Duration::from_secs(120));
            assert!(
                status.is_some_and(|s| s.success()),
                "run {run}: a host did not finish ({status:?}): {}",
                logs(hosts)
            );
        }
        let domain = Domain::open(&self.a.device, spmbox::io::device::Access::ReadOnly).unwrap();
        let (pool, _) = domain.read_pool().unwrap();
        pool.check_invariants().expect("pool invariants");
        let mut owned: Vec<(u16, u32, u32, Uuid)> = Vec::new();
        for v in pool.volumes() {
            for s in pool.segments(v.id).unwrap() {
                owned.push((s.lun, s.first_extent, s.extents, v.id));
            }
        }
        owned.sort();
        for pair in owned.windows(2) {
            let ((lun0, first0, n0, v0), (lun1, first1, _, v1)) = (pair[0], pair[1]);
            assert!(
                lun0 != lun1 || first0 + n0 <= first1,
                "run {run}: LUN {lun0} extent {first1} belongs to volume {v0} and volume {v1}"
            );
        }
        let mut maps = BuiltinMaps::open(&self.a.device, vec![self.dir.path().to_owned()]).unwrap();
        let mut devices = Devices::new();
        for v in &self.volumes {
            let map = maps.refresh(*v).unwrap();
            assert!(
                map.size >= VOLUME,
                "run {run}: volume {v} did not grow to its end: {}",
                logs(hosts)
            );
            let r = guest::verify(*v, &map, &mut devices, VOLUME).unwrap();
            assert_eq!(
                r.error_count,
                0,
                "run {run}: volume {v}: {:?}",
                r.errors.first()
            );
        }
    }
}

/// Waits until `f` holds, for up to `timeout`.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Of two SPMs that raced, the one that still runs once the race is
/// decided. The other exited with an error saying another SPM runs or
/// took over, and committed no job; the survivor ran them all.
fn one_spm_survives(run: usize, spms: [&mut Proc; 2]) -> &mut Proc {
    let [p, q] = spms;
    // Two watches of a dead header's heartbeat (2.5 s) and a settle
    // (1.5 s) decide any race; the hosts ran far longer.
    let decided = wait_until(Duration::from_secs(20), || !p.alive() || !q.alive());
    let (p_alive, q_alive) = (p.alive(), q.alive());
    assert!(
        decided && p_alive != q_alive,
        "run {run}: exactly one SPM must still run (first {}, second {}):\n{}\n{}",
        if p_alive { "running" } else { "exited" },
        if q_alive { "running" } else { "exited" },
        p.log(),
        q.log()
    );
    let (winner, loser) = if p_alive { (p, q) } else { (q, p) };
    let status = loser.child.wait().unwrap();
    let log = loser.log();
    assert_eq!(status.code(), Some(1), "run {run}: {log}");
    assert!(
        log.contains("another SPM is running") || log.contains("another SPM took over"),
        "run {run}: the loser must say why it stopped: {log}"
    );
    assert_eq!(loser.jobs(), 0, "run {run}: the loser ran jobs: {log}");
    assert!(winner.jobs() > 0, "run {run}: {}", winner.log());
    winner
}

/// Two SPMs started at once on a fresh domain, one through the file and
/// one through the loop device, while hosts on both paths extend.
#[test]
fn two_spms_started_at_once_through_two_paths_never_allocate_an_extent_twice() {
    skip_unless_ready!("two_spms_started_at_once_through_two_paths_never_allocate_an_extent_twice");
    for run in 0..races() {
        let d = TestDomain::new();
        let mut spm1 = d.a.spm(&d, "spm1");
        let mut spm2 = d.b.spm(&d, "spm2");
        let mut hosts = d.hosts("0");
        d.check(&mut hosts, run, &[&spm1, &spm2]);
        let winner = one_spm_survives(run, [&mut spm1, &mut spm2]);
        assert!(winner.term().success(), "run {run}: {}", winner.log());
    }
}

/// An SPM killed with SIGKILL leaves its header active; two SPMs started
/// at once through two paths both watch its heartbeat, both find it
/// dead, both take the next epoch: one of them serves.
#[test]
fn two_spms_taking_over_from_a_killed_one_through_two_paths_never_allocate_an_extent_twice() {
    skip_unless_ready!(
        "two_spms_taking_over_from_a_killed_one_through_two_paths_never_allocate_an_extent_twice"
    );
    for run in 0..races() {
        let d = TestDomain::new();
        let mut hosts = d.hosts("4M");
        let mut spm0 = d.a.spm(&d, "spm0");
        assert!(
            wait_until(Duration::from_secs(30), || spm0.jobs() > 0),
            "run {run}: the first SPM ran no job: {}",
            spm0.log()
        );
        spm0.kill9();
        let dead = d.spm_header();
        assert_eq!(dead["state"], "active", "run {run}: {dead}");
        let mut spm1 = d.a.spm(&d, "spm1");
        let mut spm2 = d.b.spm(&d, "spm2");
        d.check(&mut hosts, run, &[&spm0, &spm1, &spm2]);
        let winner = one_spm_survives(run, [&mut spm1, &mut spm2]);
        assert!(
            winner.log().contains("did not move: that SPM is gone"),
            "run {run}: {}",
            winner.log()
        );
        let header = d.spm_header();
        assert_eq!(
            header["epoch"].as_u64(),
            dead["epoch"].as_u64().map(|e| e + 1),
            "run {run}: {header}"
        );
        assert!(winner.term().success(), "run {run}: {}", winner.log());
    }
}

/// An SPM stopped (SIGSTOP) for longer than its lease looks dead: an SPM
/// on another path takes over. Continued, the first must stand down
/// without committing anything: its heartbeat read-back, its fence before
/// writing and its check of the SPM header before every commit all find
/// the newer epoch.
#[test]
fn an_spm_stopped_longer_than_its_lease_stands_down_when_continued() {
    skip_unless_ready!("an_spm_stopped_longer_than_its_lease_stands_down_when_continued");
    let d = TestDomain::new();
    let mut hosts = d.hosts("4M");
    let mut spm1 = d.a.spm(&d, "spm1");
    assert!(
        wait_until(Duration::from_secs(30), || spm1.jobs() > 0),
        "the first SPM ran no job: {}",
        spm1.log()
    );
    spm1.signal(rustix::process::Signal::STOP);
    let stopped = Instant::now();
    let epoch = d.spm_header()["epoch"].as_u64().unwrap();
    let mut spm2 = d.b.spm(&d, "spm2");
    assert!(
        wait_until(Duration::from_secs(20), || spm2.jobs() > 0),
        "the second SPM did not take over: {}",
        spm2.log()
    );
    assert_eq!(d.spm_header()["epoch"].as_u64(), Some(epoch + 1));
    // At least 5 s in all: twice the 2.5 s a taker watches a heartbeat.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed()));
    let jobs_before = spm1.jobs();
    spm1.signal(rustix::process::Signal::CONT);
    let status = spm1.wait_for(Duration::from_secs(10));
    let log = spm1.log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the first SPM did not stand down ({status:?}): {log}"
    );
    assert!(
        log.contains("another SPM took over") || log.contains("no longer names this SPM"),
        "{log}"
    );
    assert_eq!(
        spm1.jobs(),
        jobs_before,
        "it committed after SIGCONT: {log}"
    );
    assert!(spm2.alive(), "the second SPM stopped: {}", spm2.log());
    d.check(&mut hosts, 0, &[&spm1, &spm2]);
    assert_eq!(d.spm_header()["epoch"].as_u64(), Some(epoch + 1));
    assert!(spm2.term().success(), "{}", spm2.log());
}

/// A host that runs without an SPM: its guests fill what they have and
/// pause, it keeps its host id's heartbeat.
fn idle_host(m: &Machine, d: &TestDomain, host_id: &str, name: &str) -> Proc {
    let args = [
        "-v",
        "host",
        "--device",
        m.device(),
        "--host-id",
        host_id,
        "--volume",
        &d.volumes[0].to_string(),
        "--rate",
        "1M",
        "--chunk-size",
        "2M",
        "--lun-search",
        d.dir.path().to_str().unwrap(),
    ];
    m.spawn(&args, d.log(name))
}

fn started(p: &Proc, host_id: &str) -> bool {
    p.log().contains(&format!("host {host_id} started"))
}

#[test]
fn a_host_id_in_use_is_refused_through_either_path() {
    skip_unless_ready!("a_host_id_in_use_is_refused_through_either_path");
    let d = TestDomain::new();
    let mut first = idle_host(&d.a, &d, "3", "host-first");
    assert!(
        wait_until(Duration::from_secs(20), || started(&first, "3")),
        "{}",
        first.log()
    );
    for (m, name) in [(&d.a, "host-same-path"), (&d.b, "host-other-path")] {
        let mut second = idle_host(m, &d, "3", name);
        let status = second.wait_for(Duration::from_secs(20));
        let log = second.log();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{name}: {log}");
        assert!(
            log.contains("host id 3 is in use by another live process"),
            "{name}: {log}"
        );
        assert!(!started(&second, "3"), "{name}: {log}");
    }
    assert!(first.alive(), "the first host stopped: {}", first.log());
    assert!(first.term().success(), "{}", first.log());
}

#[test]
fn a_host_id_whose_holder_was_killed_is_taken_after_the_watch() {
    skip_unless_ready!("a_host_id_whose_holder_was_killed_is_taken_after_the_watch");
    let d = TestDomain::new();
    let mut first = idle_host(&d.a, &d, "3", "host-first");
    assert!(
        wait_until(Duration::from_secs(20), || started(&first, "3")),
        "{}",
        first.log()
    );
    first.kill9();
    let mut second = idle_host(&d.b, &d, "3", "host-second");
    assert!(
        wait_until(Duration::from_secs(20), || started(&second, "3")),
        "{}",
        second.log()
    );
    let log = second.log();
    assert!(log.contains("watching its heartbeat"), "{log}");
    assert!(
        log.contains("the heartbeat of host id 3 did not move"),
        "{log}"
    );
    assert!(second.alive(), "{log}");
    assert!(second.term().success(), "{}", second.log());
}

#[test]
fn a_host_id_released_by_a_clean_stop_is_taken_at_once() {
    skip_unless_ready!("a_host_id_released_by_a_clean_stop_is_taken_at_once");
    let d = TestDomain::new();
    let mut first = idle_host(&d.a, &d, "3", "host-first");
    assert!(
        wait_until(Duration::from_secs(20), || started(&first, "3")),
        "{}",
        first.log()
    );
    assert!(first.term().success(), "{}", first.log());
    let mut second = idle_host(&d.b, &d, "3", "host-second");
    assert!(
        wait_until(Duration::from_secs(20), || started(&second, "3")),
        "{}",
        second.log()
    );
    let log = second.log();
    assert!(!log.contains("watching its heartbeat"), "{log}");
    assert!(second.alive(), "{log}");
    assert!(second.term().success(), "{}", second.log());
}
