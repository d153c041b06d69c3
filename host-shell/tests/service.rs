//! The daemons as systemd services: readiness, the watchdog's keep-alive
//! and stopping through NOTIFY_SOCKET, as a `Type=notify` unit with
//! `WatchdogSec=` gives them; and the packaging files (the default
//! configuration, the domain example, the units).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

fn spmbox(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("SPMBOX_RUN_DIR", dir.join("run"))
        .output()
        .expect("run spmbox")
}

/// A daemon and what it sent to its notification socket, read as it
/// comes (as systemd does: a socket nobody reads would block the sender).
struct Daemon {
    child: Child,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let path = dir.join(format!("{name}.notify"));
        let socket = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        // systemd names the process the watchdog is for: the shell's pid,
        // which exec hands to spmbox.
        let child = Command::new("sh")
            .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", bin()])
            .args(args)
            .env("SPMBOX_RUN_DIR", dir.join("run"))
            .env("NOTIFY_SOCKET", &path)
            // A keep-alive at least every 100 ms.
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Daemon { child, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `enough` holds for what it sent (20 s at most).
    fn wait_for(&mut self, enough: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.seen();
            if enough(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "only these notifications: {seen:?}"
            );
            assert!(
                matches!(self.child.try_wait(), Ok(None)),
                "the daemon exited: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn term(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has(seen: &[String], what: &str) -> bool {
    seen.iter().any(|m| m.lines().any(|l| l == what))
}

fn keep_alives(seen: &[String]) -> usize {
    seen.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[test]
fn the_daemons_say_ready_keep_the_watchdog_fed_and_say_when_they_stop() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("run")).unwrap();
    std::fs::File::create(d.join("lun1"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (dom, lun) = (d.join("dom"), d.join("lun1"));
    let (dom, lun) = (dom.to_str().unwrap(), lun.to_str().unwrap());
    let out = spmbox(
        d,
        &[
            "pool",
            "create",
            "--device",
            dom,
            "--lun",
            lun,
            "--hosts",
            "4",
            "--extent-size",
            "1M",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut spm = Daemon::spawn(d, "spm", &["spm", "--device", dom]);
    let seen = spm.wait_for(|s| has(s, "READY=1") && keep_alives(s) >= 3);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=SPM of domain")),
        "{seen:?}"
    );
    // Ready means serving: a volume can be created at once.
    let out = spmbox(
        d,
        &["volume", "create", "--device", dom, "--virtual-size", "8M"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let volume = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let mut host = Daemon::spawn(
        d,
        "host",
        &[
            "host",
            "--device",
            dom,
            "--host-id",
            "1",
            "--volume",
            &volume,
            "--rate",
            "1M",
        ],
    );
    let seen = host.wait_for(|s| has(s, "READY=1") && keep_alives(s) >= 3);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=host 1 of domain")),
        "{seen:?}"
    );

    for daemon in [&mut host, &mut spm] {
        let status = daemon.term();
        assert!(status.success(), "{status:?}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(has(&daemon.seen(), "STOPPING=1"), "{:?}", daemon.seen());
    }
}

#[test]
fn the_packaged_configuration_and_domain_example_pass_config_check() {
    let dir = tempdir();
    let global = packaging().join("spmbox.toml");
    let example = packaging().join("domain.toml.example");
    let out = spmbox(
        dir.path(),
        &[
            "config",
            "check",
            global.to_str().unwrap(),
            example.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("spmbox spm gets: --device "), "{text}");
    assert!(text.contains("spmbox host gets: --device "), "{text}");
    assert!(text.contains("log: level info"), "{text}");
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let has_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists());
    let (true, Some(system_units)) = (has_analyze, system_units) else {
        eprintln!(
            "skipped: unit verification: needs systemd-analyze and systemd's units (apt-get install systemd)"
        );
        return;
    };
    // A root holding systemd's units, the binary and ours: the units are
    // checked as installed, without touching this machine's systemd.
    let root = tempdir();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", system_units.display()))
        .arg(&units)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::copy(bin(), root.path().join("usr/bin/spmbox")).unwrap();
    for unit in ["spmbox-spm@.service", "spmbox-host@.service"] {
        std::fs::copy(packaging().join("systemd").join(unit), units.join(unit)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(["spmbox-spm@domain1.service", "spmbox-host@domain1.service"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("spmbox"),
        "systemd-analyze has something to say about the units:\n{err}"
    );
}
