//! `spmbox status` tells the truth: live and dead hosts and SPMs from
//! their heartbeats in the mailbox (not from files a dead process left),
//! "no SPM is serving this domain", requests with their age; and a host
//! warns when no SPM answers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Domain {
    dir: tempfile::TempDir,
}

impl Domain {
    fn new() -> Domain {
        Domain::with_lun(64 << 20)
    }

    fn with_lun(size: u64) -> Domain {
        let dir = tempdir();
        fs::create_dir(dir.path().join("run")).unwrap();
        fs::File::create(dir.path().join("lun1"))
            .unwrap()
            .set_len(size)
            .unwrap();
        let d = Domain { dir };
        let out = d.run(&[
            "pool",
            "create",
            "--hosts",
            "4",
            "--extent-size",
            "1M",
            "--lun",
            &d.p("lun1"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    }

    fn p(&self, name: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        path.to_str().unwrap().to_string()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .args(["--device", &self.p("dom")])
            .env("SPMBOX_RUN_DIR", self.dir.path().join("run"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let log = fs::File::create(self.dir.path().join(log)).unwrap();
        Proc(
            self.cmd(args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn status_text(&self) -> String {
        let out = self.run(&["status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#}");
        }
    }
}

fn path_exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn status_tells_live_from_dead_hosts_and_spms() {
    let d = Domain::new();
    // No SPM ever ran.
    let s = d.status();
    assert_eq!(s["serving"], false, "{s:#}");
    assert!(
        s["no_spm"]
            .as_str()
            .unwrap()
            .contains("no SPM is serving this domain"),
        "{s:#}"
    );
    assert!(d.status_text().contains("no SPM is serving this domain"));

    let mut spm = d.spawn(&["spm"], "spm.log");
    let s = d.wait_for("the SPM serving", |s| s["serving"] == true);
    assert_eq!(s["spm"]["heartbeat_moved"], true, "{s:#}");
    assert!(s["spm"]["last_seen"].is_string(), "{s:#}");
    assert!(s["watched_ms"].as_u64().unwrap() >= 1000, "{s:#}");
    let out = d.run(&[
        "volume",
        "create",
        "--virtual-size",
        "64M",
        "--initial-size",
        "1M",
    ]);
    assert!(out.status.success());
    let volume = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let mut host = d.spawn(
        &[
            "host",
            "--host-id",
            "2",
            "--volume",
            &volume,
            "--rate",
            "1M",
            "--chunk-size",
            "1M",
        ],
        "host.log",
    );
    let s = d.wait_for("host 2 alive with its report", |s| {
        s["hosts"][0]["state"] == "alive"
            && s["host_reports"].as_array().is_some_and(|r| r.len() == 1)
    });
    assert_eq!(s["hosts"][0]["host"], 2);
    assert_eq!(s["hosts"][0]["alive"], true);
    assert!(s["hosts"][0]["last_seen"].is_string(), "{s:#}");
    assert!(
        d.status_text()
            .contains("host 2 generation 1: alive, last seen")
    );

    // SIGKILL: its status file stays behind, the mailbox tells.
    let _ = host.0.kill();
    let _ = host.0.wait();
    assert!(path_exists(&d.dir.path().join("run")), "run dir");
    let s = d.status();
    assert_eq!(s["hosts"][0]["state"], "silent", "{s:#}");
    assert_eq!(s["hosts"][0]["alive"], false, "{s:#}");
    assert!(s["hosts"][0]["silent_for_ms_at_least"].as_u64().unwrap() >= 1000);
    assert_eq!(
        s["host_reports"],
        serde_json::json!([]),
        "a dead host's report: {s:#}"
    );
    let text = d.status_text();
    assert!(text.contains("host 2 generation 1: NOT ALIVE"), "{text}");
    assert!(text.contains("hosts: 1 (0 alive)"), "{text}");

    // SIGKILL of the SPM: the header still says active.
    let _ = spm.0.kill();
    let _ = spm.0.wait();
    let s = d.status();
    assert_eq!(s["spm"]["state"], "active", "{s:#}");
    assert_eq!(s["serving"], false, "{s:#}");
    let why = s["no_spm"].as_str().unwrap();
    assert!(
        why.contains("no SPM is serving this domain") && why.contains("dead or hung"),
        "{why}"
    );
}

#[test]
fn requests_show_their_age_and_a_host_warns_when_no_spm_answers() {
    let d = Domain::new();
    let out = d.run(&[
        "volume",
        "create",
        "--virtual-size",
        "64M",
        "--initial-size",
        "1M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let volume = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // No SPM: the host's first request stays unanswered.
    let _host = d.spawn(
        &[
            "host",
            "--host-id",
            "1",
            "--volume",
            &volume,
            "--rate",
            "0",
            "--chunk-size",
            "1M",
            "--no-spm-warning",
            "2s",
        ],
        "host.log",
    );
    let s = d.wait_for("a request in flight for a while", |s| {
        s["requests"][0]["age_ms_at_least"].as_u64().unwrap_or(0) >= 1000
    });
    assert_eq!(s["requests"][0]["state"], "in flight", "{s:#}");
    assert!(d.status_text().contains(": in flight for at least "));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log("host.log").contains("no SPM has answered for") {
        assert!(
            Instant::now() < deadline,
            "no warning:\n{}",
            d.log("host.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        d.log("host.log").matches("no SPM has answered").count(),
        1,
        "warned more than once:\n{}",
        d.log("host.log")
    );
}

#[test]
fn parked_requests_show_how_long_they_have_waited_for_space() {
    // 1 MiB of label space and 4 extents of 1 MiB: the volume outgrows it.
    let d = Domain::with_lun(5 << 20);
    let _spm = d.spawn(&["spm"], "spm.log");
    d.wait_for("the SPM serving", |s| s["serving"] == true);
    let out = d.run(&[
        "volume",
        "create",
        "--virtual-size",
        "64M",
        "--initial-size",
        "1M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let volume = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let _host = d.spawn(
        &[
            "host",
            "--host-id",
            "1",
            "--volume",
            &volume,
            "--rate",
            "0",
            "--chunk-size",
            "1M",
        ],
        "host.log",
    );
    let s = d.wait_for("a parked request a second old", |s| {
        s["parked_age_ms"][volume.as_str()].as_u64().unwrap_or(0) >= 1000
    });
    assert_eq!(s["pool"]["parked"][0][0], volume.as_str(), "{s:#}");
    let text = d.status_text();
    assert!(
        text.contains(&format!("parked: volume {volume} to ")) && text.contains(", for "),
        "{text}"
    );
}
