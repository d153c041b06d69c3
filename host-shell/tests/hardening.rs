//! Hostile and careless use through the real binary: slow, endless and
//! too many control clients, run directories that are not the SPM's own,
//! signals at awkward moments, and arguments that would exhaust memory or
//! leave files behind.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spmbox::daemon::control::{CONTROL_CONNECTIONS, CONTROL_REQUEST_MAX, control_request};

const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
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
struct Proc(Child);

impl Proc {
    fn term(&self) {
        let pid = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }

    /// Waits up to `limit` for the process to exit.
    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.0.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A builtin-pool domain on files, with the SPM's run directory inside.
struct Domain {
    _dir: tempfile::TempDir,
    device: PathBuf,
    run: PathBuf,
}

impl Domain {
    fn new() -> Domain {
        let dir = tempdir();
        let lun = dir.path().join("lun1");
        fs::File::create(&lun).unwrap().set_len(64 * MIB).unwrap();
        let device = dir.path().join("domain");
        let out = Command::new(bin())
            .args(["pool", "create", "--hosts", "4", "--extent-size", "4M"])
            .arg("--device")
            .arg(&device)
            .arg("--lun")
            .arg(&lun)
            .output()
            .unwrap();
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        let run = dir.path().join("run");
        Domain {
            _dir: dir,
            device,
            run,
        }
    }

    fn control(&self) -> PathBuf {
        self.run.join("spm.sock")
    }

    /// Starts `spmbox spm` with its socket in the run directory.
    fn spawn_spm(&self) -> Proc {
        Proc(
            Command::new(bin())
                .arg("spm")
                .arg("--device")
                .arg(&self.device)
                .arg("--control")
                .arg(self.control())
                .env("SPMBOX_RUN_DIR", &self.run)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Starts the SPM and waits until its control socket answers.
    fn start_spm(&self) -> Proc {
        let spm = self.spawn_spm();
        self.wait_listening();
        spm
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = control_request(&self.control(), &json!({"op": "status"})) {
                return;
            }
            assert!(Instant::now() < deadline, "the SPM did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Output {
        Command::new(bin())
            .arg("status")
            .arg("--device")
            .arg(&self.device)
            .arg("--control")
            .arg(self.control())
            .env("SPMBOX_RUN_DIR", &self.run)
            .output()
            .unwrap()
    }

    fn spm_header_state(&self) -> String {
        let out = Command::new(bin())
            .args(["inspect", "--json", "--device"])
            .arg(&self.device)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json");
        v["spm_header"]["record"]["state"]
            .as_str()
            .unwrap_or("none")
            .to_owned()
    }
}

/// Reads the one answer line the SPM sends on `stream` (waiting at most
/// `limit`), or `None` if it closes without one.
fn answer(stream: &UnixStream, limit: Duration) -> Option<Value> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
        _ => None,
    }
}

/// Whether the SPM has closed or answered `stream` (without waiting).
fn answered_or_closed(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = (&*stream).read(&mut b);
    stream.set_nonblocking(false).unwrap();
    !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_client_sending_a_byte_at_a_time_does_not_hold_up_status() {
    let d = Domain::new();
    let _spm = d.start_spm();
    let slow = UnixStream::connect(d.control()).unwrap();
    let trickling = Arc::new(AtomicBool::new(true));
    let (flag, writer) = (trickling.clone(), slow.try_clone().unwrap());
    let trickle = std::thread::spawn(move || {
        for _ in 0..8 {
            if !flag.load(Ordering::Relaxed) || (&writer).write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let out = d.status();
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    assert!(
        !answered_or_closed(&slow),
        "status was answered only after the slow client's connection ended"
    );
    trickling.store(false, Ordering::Relaxed);
    trickle.join().unwrap();
}

#[test]
fn status_of_a_stopped_spm_falls_back_to_the_disk_within_seconds() {
    let d = Domain::new();
    let spm = d.start_spm();
    let pid = rustix::process::Pid::from_child(&spm.0);
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let started = Instant::now();
    let out = d.status();
    let took = started.elapsed();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("as committed"),
        "{}",
        text(&out.stdout)
    );
    // Not a performance figure: the old code waited the socket's 60 s.
    assert!(took < Duration::from_secs(30), "status took {took:?}");
}

#[test]
fn a_request_line_not_finished_within_the_deadline_is_answered_with_an_error() {
    let d = Domain::new();
    let _spm = d.start_spm();
    let slow = UnixStream::connect(d.control()).unwrap();
    let writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // A byte every half second for up to 15 s, each well within a
        // per-read timeout; the request as a whole must still end.
        for _ in 0..30 {
            if (&writer).write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let got = answer(&slow, Duration::from_secs(15)).expect("an answer before 15 s");
    assert_eq!(got["ok"], json!(false));
    let error = got["error"].as_str().unwrap();
    assert!(error.contains("no whole request line within"), "{error}");
    drop(slow);
    trickle.join().unwrap();
}

#[test]
fn a_request_longer_than_the_limit_is_answered_with_an_error_and_closed() {
    let d = Domain::new();
    let _spm = d.start_spm();
    let stream = UnixStream::connect(d.control()).unwrap();
    let writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        // 64 MiB without a newline; the SPM stops reading long before.
        let block = vec![b'a'; 1 << 20];
        for _ in 0..64 {
            if (&writer).write_all(&block).is_err() {
                return true;
            }
        }
        false
    });
    let got = answer(&stream, Duration::from_secs(10)).expect("an answer");
    assert_eq!(got["ok"], json!(false));
    let error = got["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("longer than {CONTROL_REQUEST_MAX} bytes")),
        "{error}"
    );
    assert!(flood.join().unwrap(), "the SPM read all 64 MiB");
    let out = d.status();
    assert!(out.status.success(), "status: {}", text(&out.stderr));
}

#[test]
fn connections_past_the_cap_are_refused_at_once() {
    let d = Domain::new();
    let _spm = d.start_spm();
    let idle: Vec<UnixStream> = (0..CONTROL_CONNECTIONS)
        .map(|_| UnixStream::connect(d.control()).unwrap())
        .collect();
    // Let the SPM accept them all.
    std::thread::sleep(Duration::from_millis(500));
    let one_more = UnixStream::connect(d.control()).unwrap();
    let got = answer(&one_more, Duration::from_secs(3)).expect("an answer at once");
    assert_eq!(got["ok"], json!(false));
    let error = got["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "serving {CONTROL_CONNECTIONS} control connections"
        )),
        "{error}"
    );
    drop(idle);
    // Once the idle clients are gone, requests are served again.
    d.wait_listening();
}

#[test]
fn the_run_directory_is_created_for_the_spm_user_alone() {
    let d = Domain::new();
    let _spm = d.start_spm();
    let mode = fs::metadata(&d.run).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "run directory mode {mode:o}");
}

#[test]
fn a_run_directory_others_may_write_to_is_refused_and_nothing_is_written() {
    let d = Domain::new();
    fs::create_dir(&d.run).unwrap();
    fs::set_permissions(&d.run, fs::Permissions::from_mode(0o777)).unwrap();
    let before = fs::read(&d.device).unwrap();
    let mut spm = d.spawn_spm();
    let status = spm.exit_within(Duration::from_secs(10)).expect("refused");
    let err = spm.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&d.run.display().to_string()), "{err}");
    assert!(err.contains("writable by group or others"), "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    assert!(!d.control().exists());
    assert_eq!(fs::read(&d.device).unwrap(), before);
}

#[test]
fn a_run_directory_of_another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root to give a directory to another user");
        return;
    }
    let d = Domain::new();
    fs::create_dir(&d.run).unwrap();
    fs::set_permissions(&d.run, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&d.run, Some(65534), Some(65534)).unwrap();
    assert_eq!(fs::metadata(&d.run).unwrap().uid(), 65534);
    let before = fs::read(&d.device).unwrap();
    let mut spm = d.spawn_spm();
    let status = spm.exit_within(Duration::from_secs(10)).expect("refused");
    let err = spm.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&d.run.display().to_string()), "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(!d.control().exists());
    assert_eq!(fs::read(&d.device).unwrap(), before);
}

#[test]
fn the_spm_stops_on_sigterm_after_its_socket_file_was_removed() {
    let d = Domain::new();
    let mut spm = d.start_spm();
    fs::remove_file(d.control()).unwrap();
    spm.term();
    let status = spm.exit_within(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "the SPM did not stop within 5 s of SIGTERM ({status:?})"
    );
    assert_eq!(d.spm_header_state(), "vacant");
    // The next SPM gets the domain lock at once: it does not wait.
    let mut next = d.start_spm();
    next.term();
    assert!(next.exit_within(Duration::from_secs(5)).is_some());
    let err = next.stderr();
    assert!(!err.contains("holds the domain lock"), "{err}");
}

#[test]
fn sigterm_ends_the_wait_for_the_domain_lock_and_nothing_is_written() {
    let d = Domain::new();
    let holder = fs::File::open(&d.device).unwrap();
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let before = fs::read(&d.device).unwrap();
    let mut spm = Proc(
        Command::new(bin())
            .args(["-v", "spm", "--device"])
            .arg(&d.device)
            .arg("--control")
            .arg(d.control())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Until it says it waits for the lock.
    let mut stderr = BufReader::new(spm.0.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("holds the domain lock") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    spm.term();
    let status = spm.exit_within(Duration::from_secs(5));
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{seen}{rest}");
    assert!(
        rest.contains("stopped by a signal while waiting for the domain lock"),
        "{rest}"
    );
    assert!(rest.contains("nothing was written"), "{rest}");
    assert_eq!(fs::read(&d.device).unwrap(), before);
    assert!(!d.control().exists());
}

fn host_with(d: &Domain, extra: &[&str]) -> Output {
    Command::new(bin())
        .arg("host")
        .arg("--device")
        .arg(&d.device)
        .args([
            "--host-id",
            "1",
            "--volume",
            "6f1c0000-0000-4000-8000-000000000001",
        ])
        .args(extra)
        .env("SPMBOX_RUN_DIR", &d.run)
        .output()
        .unwrap()
}

#[test]
fn a_write_size_over_the_limit_is_an_argument_error() {
    let d = Domain::new();
    let out = host_with(&d, &["--write-size", "16T"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--write-size"), "{err}");
    assert!(err.contains("at most 67108864 bytes (64.0 MiB)"), "{err}");
}

#[test]
fn a_chunk_size_of_zero_is_an_argument_error() {
    let d = Domain::new();
    let out = host_with(&d, &["--chunk-size", "0"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--chunk-size"), "{err}");
    assert!(err.contains("is not a chunk size"), "{err}");
}

const NIL: &str = "00000000-0000-0000-0000-000000000000";

#[test]
fn pool_create_refuses_the_nil_domain_uuid_and_creates_nothing() {
    let dir = tempdir();
    let lun = dir.path().join("lun1");
    fs::File::create(&lun).unwrap().set_len(64 * MIB).unwrap();
    let device = dir.path().join("domain");
    let out = Command::new(bin())
        .args(["pool", "create", "--hosts", "4", "--extent-size", "4M"])
        .args(["--domain", NIL])
        .arg("--device")
        .arg(&device)
        .arg("--lun")
        .arg(&lun)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--domain") && err.contains("nil UUID"),
        "{err}"
    );
    assert!(!device.exists(), "pool create left {}", device.display());
    assert!(fs::read(&lun).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn format_refuses_the_nil_domain_uuid_and_creates_nothing() {
    let dir = tempdir();
    let device = dir.path().join("mbox");
    let out = Command::new(bin())
        .args(["format", "--hosts", "4", "--domain", NIL, "--device"])
        .arg(&device)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nil UUID"), "{err}");
    assert!(!device.exists());
}
