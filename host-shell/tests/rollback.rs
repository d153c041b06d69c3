//! Pool metadata that went back in time, through the real binary: a bit
//! flipped in the newest metadata copy, or a lost write of it, makes the
//! older copy the newest valid one. Extents that volumes already hold and
//! have written would then be handed out again; the SPM refuses to start
//! on such a pool, `inspect` says which copy and why, and only
//! `--accept-metadata-rollback` overrides it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A domain on files in a temporary directory (`dom`, `lun1` of 64 MiB in
/// 1 MiB extents) with one 16 MiB volume, and its own run directory.
struct Setup {
    dir: tempfile::TempDir,
    run: tempfile::TempDir,
    volume: String,
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Setup {
    fn new() -> Setup {
        let mut s = Setup {
            dir: tmp(),
            run: tmp(),
            volume: String::new(),
        };
        fs::File::create(s.path("lun1"))
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let out = s.cli(&[
            "pool",
            "create",
            "--device",
            &s.p("dom"),
            "--lun",
            &s.p("lun1"),
            "--hosts",
            "4",
            "--extent-size",
            "1M",
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        let out = s.cli(&[
            "volume",
            "create",
            "--device",
            &s.p("dom"),
            "--virtual-size",
            "16M",
            "--initial-size",
            "1M",
        ]);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        s.volume = text(&out.stdout).trim().to_owned();
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_spmbox"));
        c.args(args)
            .env("SPMBOX_RUN_DIR", self.run.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs a command to its end (killed after a minute).
    fn cli(&self, args: &[&str]) -> Output {
        let mut child = self.command(args).spawn().expect("run spmbox");
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().expect("wait for spmbox")
    }

    fn start_spm(&self, extra: &[&str]) -> Child {
        let dom = self.p("dom");
        let mut args = vec!["spm", "--device", dom.as_str()];
        args.extend_from_slice(extra);
        self.command(&args).spawn().expect("start the SPM")
    }

    /// The guest writes up to `bytes` into the volume through an SPM that
    /// extends it 1 MiB at a time; the SPM then stops cleanly.
    fn grow_to(&self, bytes: &str) {
        let mut spm = self.start_spm(&[]);
        let out = self.cli(&[
            "host",
            "--device",
            &self.p("dom"),
            "--host-id",
            "1",
            "--volume",
            &self.volume,
            "--rate",
            "0",
            "--guest-bytes",
            bytes,
            "--chunk-size",
            "1M",
            "--exit-when-done",
        ]);
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&spm),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let spm_out = spm_wait(&mut spm);
        assert!(out.status.success(), "host: {}", text(&out.stderr));
        assert!(spm_out.status.success(), "SPM: {}", text(&spm_out.stderr));
    }

    fn inspect(&self) -> (Option<i32>, Value) {
        let out = self.cli(&["inspect", "--device", &self.p("dom"), "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json");
        (out.status.code(), v)
    }

    /// The offset and commit of the newest valid metadata copy.
    fn newest_copy(&self) -> (u64, u64) {
        let (_, v) = self.inspect();
        v["pool_metadata"]["copies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "valid")
            .map(|c| (c["offset"].as_u64().unwrap(), c["commit"].as_u64().unwrap()))
            .max_by_key(|&(_, commit)| commit)
            .expect("a valid copy")
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        fs::File::open(self.path("dom"))
            .unwrap()
            .read_exact_at(&mut buf, at)
            .unwrap();
        buf
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path("dom"))
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    }
}

fn spm_wait(child: &mut Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let mut out = Output {
        status: child.wait().expect("wait"),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read as _;
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut out.stderr);
    }
    out
}

/// An SPM started on the domain that must refuse at once.
fn refused(s: &Setup) -> Output {
    let mut spm = s.start_spm(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(spm.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = matches!(spm.try_wait(), Ok(Some(_)));
    let out = spm_wait(&mut spm);
    assert!(
        exited,
        "the SPM started on a rolled-back pool: {}",
        text(&out.stderr)
    );
    assert!(!out.status.success());
    out
}

#[test]
fn a_bit_flip_in_the_newest_metadata_copy_is_reported_and_the_spm_refuses_the_older_one() {
    let s = Setup::new();
    s.grow_to("6M");
    let (offset, commit) = s.newest_copy();
    assert!(commit >= 2, "the pool was committed only {commit} times");
    let (code, _) = s.inspect();
    assert_eq!(code, Some(0), "a clean domain");

    // One flipped bit in the newest copy's payload.
    let byte = s.read(offset + 100, 1)[0];
    s.write(offset + 100, &[byte ^ 0x10]);

    let (code, v) = s.inspect();
    assert_eq!(code, Some(3), "{v}");
    let problems = v["pool_metadata"]["problems"].to_string();
    assert!(problems.contains("defective"), "{problems}");
    assert!(problems.contains("rolled back"), "{problems}");

    let out = refused(&s);
    let err = text(&out.stderr);
    assert!(
        err.contains("older than what SPMs already answered"),
        "{err}"
    );
    assert!(err.contains("--accept-metadata-rollback"), "{err}");
    // Nothing changed on disk: the copy is still the damaged one.
    assert_eq!(s.read(offset + 100, 1)[0], byte ^ 0x10);

    // The operator accepts the rollback: the SPM starts and says so.
    let mut spm = s.start_spm(&["--accept-metadata-rollback"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(matches!(spm.try_wait(), Ok(None)), "the SPM did not start");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&spm),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = spm_wait(&mut spm);
    assert!(text(&out.stderr).contains("--accept-metadata-rollback"));
}

#[test]
fn a_lost_write_of_the_newest_metadata_copy_is_caught_by_the_header_and_the_replies() {
    let s = Setup::new();
    s.grow_to("3M");
    // What both copies hold now: a later commit that is "lost" leaves
    // these bytes in place.
    let (_, v) = s.inspect();
    let base = v["pool_metadata"]["copies"][0]["offset"].as_u64().unwrap();
    let copy = spmbox_core::pool::METADATA_COPY_SIZE;
    let before = s.read(base, 2 * copy);
    s.grow_to("8M");
    let (newest, commit) = s.newest_copy();
    // The newest copy's write is lost: it holds what it held before.
    let at = (newest - base) as usize;
    s.write(newest, &before[at..at + copy]);
    let (_, older) = s.newest_copy();
    assert!(
        older < commit,
        "the lost write left commit {older}, newest was {commit}"
    );

    let (code, v) = s.inspect();
    assert_eq!(code, Some(3), "{v}");
    let err = text(&refused(&s).stderr);
    assert!(
        err.contains(&format!("commit {commit} was made durable")),
        "{err}"
    );
    assert!(
        err.contains(&s.volume),
        "the replies name the volume: {err}"
    );
}
