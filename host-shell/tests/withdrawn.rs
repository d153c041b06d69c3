//! A request its host withdraws while it waits for space is never carried
//! out: through the real binary, an SPM and a host as separate processes
//! on files, a full pool, the host restarted while its request is parked,
//! then a LUN added.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A child process, killed on drop.
struct Proc(Child);

impl Proc {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A domain on files: LUN 1 of two 4 MiB extents (and its label), held by volumes A and
/// B (one extent each), so the pool is full; LUN 2 (64 MiB) to add.
struct Domain {
    dir: tempfile::TempDir,
    device: PathBuf,
    control: PathBuf,
    lun2: PathBuf,
    a: String,
    b: String,
    logs: u32,
}

impl Domain {
    fn new() -> Domain {
        let dir = tempfile::tempdir()
            .or_else(|_| tempfile::tempdir_in("/var/tmp"))
            .expect("temp dir");
        fs::create_dir_all(dir.path().join("run")).unwrap();
        let lun = |name: &str, size: u64| {
            let p = dir.path().join(name);
            fs::File::create(&p).unwrap().set_len(size).unwrap();
            p
        };
        let lun1 = lun("lun1", 12 * MIB);
        let lun2 = lun("lun2", 64 * MIB);
        let mut d = Domain {
            device: dir.path().join("domain"),
            control: dir.path().join("run/spm.sock"),
            dir,
            lun2,
            a: String::new(),
            b: String::new(),
            logs: 0,
        };
        let out = d.cli(&[
            "pool",
            "create",
            "--device",
            d.path(),
            "--lun",
            lun1.to_str().unwrap(),
            "--hosts",
            "4",
            "--extent-size",
            "4M",
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        d.a = d.create_volume();
        d.b = d.create_volume();
        d
    }

    fn path(&self) -> &str {
        self.device.to_str().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("SPMBOX_RUN_DIR", self.dir.path().join("run"))
            .output()
            .expect("run spmbox")
    }

    fn create_volume(&self) -> String {
        let out = self.cli(&[
            "volume",
            "create",
            "--device",
            self.path(),
            "--virtual-size",
            "64M",
            "--initial-size",
            "4M",
        ]);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    fn log(&mut self, name: &str) -> fs::File {
        self.logs += 1;
        fs::File::create(self.dir.path().join(format!("{name}.{}.log", self.logs))).unwrap()
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
            let tail: Vec<&str> = t.lines().rev().take(12).collect();
            out += &format!("\n--- {}\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }

    /// The SPM, reading every host's area every 300 ms.
    fn start_spm(&mut self) -> Proc {
        let log = self.log("spm");
        let spm = Proc(
            Command::new(bin())
                .args(["-vv", "spm", "--device", self.path(), "--control"])
                .arg(&self.control)
                .args(["--full-scan-interval", "300ms"])
                .env("SPMBOX_RUN_DIR", self.dir.path().join("run"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn spm"),
        );
        self.wait_for("the SPM to answer", |s| s["pool_source"] == "spm");
        spm
    }

    /// Host 1 with one guest on `volume`. With utilization 100 the host
    /// asks only once the guest has filled the volume, for its size plus
    /// `chunk`; the guest writes `guest_bytes` in all.
    fn start_host(&mut self, volume: &str, chunk: &str, guest_bytes: Option<&str>) -> Proc {
        let log = self.log("host1");
        let mut cmd = Command::new(bin());
        cmd.args(["-v", "host", "--device", self.path(), "--host-id", "1"])
            .args(["--volume", volume, "--chunk-size", chunk])
            .args(["--utilization", "100", "--rate", "64M"])
            .arg("--lun-search")
            .arg(self.dir.path())
            .env("SPMBOX_RUN_DIR", self.dir.path().join("run"))
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(bytes) = guest_bytes {
            cmd.args(["--guest-bytes", bytes]);
        }
        Proc(cmd.spawn().expect("spawn host"))
    }

    fn status(&self) -> Value {
        let out = self.cli(&[
            "status",
            "--device",
            self.path(),
            "--control",
            self.control.to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json")
    }

    /// Waits up to 20 s for `what`; fails with the last status and logs.
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "waited 20 s for {what}; status: {s:#}\n{}",
                self.logs_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn add_lun2(&self) {
        let out = self.cli(&[
            "pool",
            "add-lun",
            "--device",
            self.path(),
            "--control",
            self.control.to_str().unwrap(),
            "--lun",
            self.lun2.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "add-lun: {}", text(&out.stderr));
    }

    fn size(&self, s: &Value, volume: &str) -> u64 {
        s["pool"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["id"] == volume))
            .and_then(|v| v["size"].as_u64())
            .expect("the volume in status")
    }
}

fn generation(s: &Value) -> u64 {
    s["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["host"] == 1))
        .and_then(|h| h["generation"].as_u64())
        .unwrap_or(0)
}

fn parked(s: &Value) -> Vec<(String, u64)> {
    serde_json::from_value(s["pool"]["parked"].clone()).expect("parked list")
}

/// Host 1's guest fills volume A (4 MiB) and asks for 36 MiB; the pool is
/// full, so the SPM answers "waiting for space" and parks it. Returns the
/// status then.
fn park_a_request_for_36_mib(d: &mut Domain) -> (Proc, Value) {
    let host = d.start_host(&d.a.clone(), "32M", None);
    let a = d.a.clone();
    let s = d.wait_for("the request for 36 MiB to be parked", |s| {
        parked(s) == [(a.clone(), 36 * MIB)]
            && s["requests"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["state"] == "waiting for space"))
    });
    (host, s)
}

#[test]
fn a_parked_request_whose_host_restarted_is_not_carried_out_when_a_lun_is_added() {
    let mut d = Domain::new();
    let _spm = d.start_spm();
    let (mut host, before) = park_a_request_for_36_mib(&mut d);
    // The host restarts (a new generation, its slots empty) and now runs
    // only volume B's guest, which needs nothing more.
    host.kill9();
    let _host = d.start_host(&d.b.clone(), "32M", Some("1M"));
    let s = d.wait_for("the SPM to drop the withdrawn request", |s| {
        generation(s) > generation(&before) && parked(s).is_empty()
    });
    assert_eq!(d.size(&s, &d.a), 4 * MIB);
    d.add_lun2();
    let s = d.status();
    assert_eq!(
        d.size(&s, &d.a),
        4 * MIB,
        "volume A grew for a request nobody asks for any more"
    );
    assert!(parked(&s).is_empty(), "{s:#}");
}

#[test]
fn a_host_that_asks_for_less_under_a_new_generation_gets_only_that_when_a_lun_is_added() {
    let mut d = Domain::new();
    let _spm = d.start_spm();
    let (mut host, before) = park_a_request_for_36_mib(&mut d);
    // The host restarts without volume A (its slot is emptied), then
    // once more with A and 8 MiB chunks: now it asks for 12 MiB.
    host.kill9();
    let mut host = d.start_host(&d.b.clone(), "32M", Some("1M"));
    d.wait_for("the host to empty its slot", |s| {
        generation(s) > generation(&before) && s["requests"].as_array().is_some_and(Vec::is_empty)
    });
    host.kill9();
    let _host = d.start_host(&d.a.clone(), "8M", Some("8M"));
    let s = d.wait_for("the request for 12 MiB to wait for space", |s| {
        s["requests"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["target"] == 12 * MIB && r["state"] == "waiting for space")
        })
    });
    assert_eq!(
        parked(&s),
        [(d.a.clone(), 12 * MIB)],
        "the parked list holds what the mailbox asks now"
    );
    d.add_lun2();
    let s = d.status();
    assert_eq!(
        d.size(&s, &d.a),
        12 * MIB,
        "volume A grew to the withdrawn 36 MiB instead of the 12 MiB asked now"
    );
}
