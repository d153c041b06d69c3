//! What the commands refuse, through the real binary: a LUN whose copy is
//! on the search path, a truncated LUN, `format` over data that is not a
//! mailbox or under a live domain, and the exit status of every command
//! on a device without a usable mailbox.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spmbox::backend::builtin::{LUN_DATA_OFFSET, LunLabel};
use spmbox_core::wire::Uuid;

const MIB: u64 = 1 << 20;

/// A domain on files in a temporary directory: `dom` (the domain device)
/// and `lun1` (64 MiB, 63 extents of 1 MiB), its own run directory.
struct Setup {
    dir: tempfile::TempDir,
    run: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let s = Setup::bare();
        s.make_file("lun1", 64 * MIB);
        let out = s.cli(&[
            "pool",
            "create",
            "--device",
            s.p("dom"),
            "--lun",
            s.p("lun1"),
            "--hosts",
            "4",
            "--extent-size",
            "1M",
        ]);
        assert!(out.status.success(), "pool create: {}", text(&out.stderr));
        s
    }

    fn bare() -> Setup {
        let tmp = || {
            tempfile::tempdir()
                .or_else(|_| tempfile::tempdir_in("/var/tmp"))
                .expect("temp dir")
        };
        Setup {
            dir: tmp(),
            run: tmp(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> &str {
        // Leaked once per name and test: the tests are short-lived.
        Box::leak(
            self.path(name)
                .to_str()
                .unwrap()
                .to_owned()
                .into_boxed_str(),
        )
    }

    fn make_file(&self, name: &str, size: u64) {
        fs::File::create(self.path(name))
            .unwrap()
            .set_len(size)
            .unwrap();
    }

    /// Runs a command (see [`common::spmbox`]).
    fn cli(&self, args: &[&str]) -> Output {
        common::spmbox(self.run.path(), args)
    }

    fn create_volume(&self, initial: &str) -> String {
        let out = self.cli(&[
            "volume",
            "create",
            "--device",
            self.p("dom"),
            "--virtual-size",
            "16M",
            "--initial-size",
            initial,
        ]);
        assert!(out.status.success(), "volume create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// Runs a host whose guest writes `bytes` into `volume` and exits.
    fn host(&self, volume: &str, bytes: &str) -> Output {
        self.cli(&[
            "host",
            "--device",
            self.p("dom"),
            "--host-id",
            "1",
            "--volume",
            volume,
            "--rate",
            "0",
            "--guest-bytes",
            bytes,
            // No SPM runs: ask for nothing while 512 KiB are free.
            "--chunk-size",
            "1M",
            "--exit-when-done",
        ])
    }

    fn domain(&self) -> Uuid {
        let out = self.cli(&["status", "--device", self.p("dom"), "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
        Uuid::parse_str(v["domain"].as_str().unwrap()).unwrap()
    }

    fn label(&self, name: &str) -> LunLabel {
        let block = fs::read(self.path(name)).unwrap();
        LunLabel::parse(&block[..4096]).expect("a LUN label")
    }

    fn write_label(&self, name: &str, label: &LunLabel) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .unwrap();
        file.write_all_at(&label.to_block(), 0).unwrap();
    }

    /// Starts the SPM and waits until its control socket answers.
    fn start_spm(&self) -> Spm {
        let child = Command::new(env!("CARGO_BIN_EXE_spmbox"))
            .args(["spm", "--device", self.p("dom")])
            .env("SPMBOX_RUN_DIR", self.run.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn spm");
        let mut spm = Spm(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["status", "--device", self.p("dom"), "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v["pool_source"] == "spm" {
                return spm;
            }
            assert!(
                matches!(spm.0.try_wait(), Ok(None)),
                "the SPM exited at start"
            );
            assert!(Instant::now() < deadline, "the SPM did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The SPM process, killed on drop.
struct Spm(Child);

impl Drop for Spm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

// ---- 1. LUN identity --------------------------------------------------

#[test]
fn a_host_refuses_a_lun_whose_copy_is_on_the_search_path() {
    let s = Setup::new();
    let volume = s.create_volume("4M");
    // "a-copy" sorts before "lun1": the old search took it.
    fs::copy(s.path("lun1"), s.path("a-copy")).unwrap();
    let copy_before = fs::read(s.path("a-copy")).unwrap();

    let out = s.host(&volume, "1M");

    assert!(!out.status.success(), "the host ran on an ambiguous LUN");
    let err = text(&out.stderr);
    assert!(
        err.contains(s.p("a-copy")) && err.contains(s.p("lun1")),
        "{err}"
    );
    assert!(err.contains("--lun-search"), "{err}");
    assert_eq!(fs::read(s.path("a-copy")).unwrap(), copy_before);
}

#[test]
fn a_symlink_or_hard_link_to_a_lun_is_the_same_lun() {
    let s = Setup::new();
    let volume = s.create_volume("4M");
    std::os::unix::fs::symlink(s.path("lun1"), s.path("a-link")).unwrap();
    fs::hard_link(s.path("lun1"), s.path("b-hard")).unwrap();

    let out = s.host(&volume, "2M");

    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn add_lun_refuses_a_labelled_lun_whose_copy_is_on_the_search_path() {
    let s = Setup::new();
    // A LUN this domain labelled (an add-lun interrupted after labelling),
    // and a copy of it.
    s.make_file("lun2", 16 * MIB);
    let label = LunLabel {
        domain: s.domain(),
        lun: Uuid([0x42; 16]),
        data_offset: LUN_DATA_OFFSET,
        extent_size: MIB,
        extents: 15,
    };
    s.write_label("lun2", &label);
    fs::copy(s.path("lun2"), s.path("lun2-copy")).unwrap();

    let out = s.cli(&[
        "pool",
        "add-lun",
        "--device",
        s.p("dom"),
        "--lun",
        s.p("lun2"),
    ]);

    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(s.p("lun2-copy")) && err.contains(s.p("lun2")),
        "{err}"
    );
    let status = s.cli(&["status", "--device", s.p("dom"), "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["pool"]["luns"].as_array().unwrap().len(), 1);
}

#[test]
fn pool_create_refuses_the_same_lun_twice() {
    let s = Setup::bare();
    s.make_file("lun1", 16 * MIB);
    std::os::unix::fs::symlink(s.path("lun1"), s.path("lun1-link")).unwrap();

    let out = s.cli(&[
        "pool",
        "create",
        "--device",
        s.p("dom"),
        "--lun",
        s.p("lun1"),
        "--lun",
        s.p("lun1-link"),
        "--hosts",
        "4",
        "--extent-size",
        "1M",
    ]);

    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("same"), "{err}");
    assert!(!s.path("dom").exists());
    assert!(fs::read(s.path("lun1")).unwrap().iter().all(|&b| b == 0));
}

// ---- 2. Truncated LUNs ------------------------------------------------

#[test]
fn a_host_refuses_a_lun_shorter_than_its_label_and_writes_nothing() {
    let s = Setup::new();
    let volume = s.create_volume("4M");
    // The volume's 4 extents are still there; the rest of the LUN is cut.
    fs::OpenOptions::new()
        .write(true)
        .open(s.path("lun1"))
        .unwrap()
        .set_len(LUN_DATA_OFFSET + 4 * MIB)
        .unwrap();
    let before = fs::read(s.path("lun1")).unwrap();

    let out = s.host(&volume, "1M");

    assert!(!out.status.success(), "the host ran on a truncated LUN");
    let err = text(&out.stderr);
    assert!(err.contains(s.p("lun1")), "{err}");
    assert!(err.contains("5.0 MiB") && err.contains("64.0 MiB"), "{err}");
    assert_eq!(fs::read(s.path("lun1")).unwrap(), before);
}

#[test]
fn a_lun_file_truncated_while_the_guest_writes_is_not_grown_back() {
    let s = Setup::new();
    let volume = s.create_volume("8M");
    // A guest that writes 8 MiB at 1 MiB/s: the LUN is cut under it.
    let mut host = Command::new(env!("CARGO_BIN_EXE_spmbox"))
        .args([
            "host",
            "--device",
            s.p("dom"),
            "--host-id",
            "1",
            "--volume",
            &volume,
            "--rate",
            "1M",
            "--write-size",
            "256K",
            "--guest-bytes",
            "8M",
            "--chunk-size",
            "1M",
            "--exit-when-done",
        ])
        .env("SPMBOX_RUN_DIR", s.run.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn host");
    std::thread::sleep(Duration::from_secs(3));
    let cut = LUN_DATA_OFFSET + 2 * MIB;
    fs::OpenOptions::new()
        .write(true)
        .open(s.path("lun1"))
        .unwrap()
        .set_len(cut)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(host.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = host.kill();
    let out = host.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the host went on writing to a cut LUN"
    );
    let err = text(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(
        fs::metadata(s.path("lun1")).unwrap().len(),
        cut,
        "the LUN file was grown back"
    );
}

#[test]
fn a_host_refuses_a_lun_whose_label_has_fewer_extents_than_the_pool() {
    let s = Setup::new();
    let volume = s.create_volume("4M");
    let mut label = s.label("lun1");
    label.extents = 8;
    s.write_label("lun1", &label);

    let out = s.host(&volume, "1M");

    assert!(!out.status.success(), "the host ran on a shrunk label");
    let err = text(&out.stderr);
    assert!(err.contains("8 extents") && err.contains("63"), "{err}");
}

#[test]
fn add_lun_refuses_a_labelled_lun_shorter_than_its_label() {
    let s = Setup::new();
    s.make_file("lun2", 8 * MIB);
    let label = LunLabel {
        domain: s.domain(),
        lun: Uuid([0x43; 16]),
        data_offset: LUN_DATA_OFFSET,
        extent_size: MIB,
        extents: 31,
    };
    s.write_label("lun2", &label);

    let out = s.cli(&[
        "pool",
        "add-lun",
        "--device",
        s.p("dom"),
        "--lun",
        s.p("lun2"),
    ]);

    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(s.p("lun2")) && err.contains("8.0 MiB") && err.contains("32.0 MiB"),
        "{err}"
    );
}

// ---- 3. What format refuses -------------------------------------------

fn format(s: &Setup, name: &str, force: bool) -> Output {
    let mut args = vec!["format", "--device", s.p(name), "--hosts", "4"];
    if force {
        args.push("--force");
    }
    s.cli(&args)
}

#[test]
fn format_refuses_a_file_of_other_data_and_changes_nothing() {
    let s = Setup::bare();
    let data = random_bytes(MIB as usize);
    fs::write(s.path("data"), &data).unwrap();

    let out = format(&s, "data", false);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("nonzero data at offset 0") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(s.path("data")).unwrap(), data);
}

#[test]
fn format_refuses_data_after_a_zero_first_block() {
    let s = Setup::bare();
    s.make_file("data", MIB);
    fs::OpenOptions::new()
        .write(true)
        .open(s.path("data"))
        .unwrap()
        .write_all_at(b"x", 70_000)
        .unwrap();

    let out = format(&s, "data", false);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("offset 70000"));
}

#[test]
fn format_refuses_a_data_lun_and_names_its_domain() {
    let s = Setup::new();
    let domain = s.domain();
    let before = fs::read(s.path("lun1")).unwrap();

    let out = format(&s, "lun1", false);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&domain.to_string()) && err.contains("LUN"),
        "{err}"
    );
    assert_eq!(fs::read(s.path("lun1")).unwrap(), before);
}

#[test]
fn format_accepts_an_all_zero_file_and_other_data_with_force() {
    let s = Setup::bare();
    s.make_file("zero", MIB);
    fs::write(s.path("data"), random_bytes(MIB as usize)).unwrap();

    assert!(format(&s, "zero", false).status.success());
    assert!(format(&s, "data", true).status.success());
}

#[test]
fn pool_create_refuses_a_domain_device_of_other_data() {
    let s = Setup::bare();
    s.make_file("lun1", 16 * MIB);
    let data = random_bytes(8 * MIB as usize);
    fs::write(s.path("dom"), &data).unwrap();

    let out = s.cli(&[
        "pool",
        "create",
        "--device",
        s.p("dom"),
        "--lun",
        s.p("lun1"),
        "--hosts",
        "4",
        "--extent-size",
        "1M",
    ]);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(fs::read(s.path("dom")).unwrap(), data);
    assert!(fs::read(s.path("lun1")).unwrap().iter().all(|&b| b == 0));
}

// ---- 4. format under a live domain ------------------------------------

#[test]
fn format_force_refuses_while_the_spm_runs() {
    let s = Setup::new();
    let _spm = s.start_spm();
    let before = fs::read(s.path("dom")).unwrap();

    let out = format(&s, "dom", true);

    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("live") && err.contains("Stop the SPM"),
        "{err}"
    );
    assert_eq!(fs::read(s.path("dom")).unwrap(), before);
}

#[test]
fn pool_create_force_refuses_while_the_spm_runs() {
    let s = Setup::new();
    s.make_file("lun2", 16 * MIB);
    let _spm = s.start_spm();
    let before = fs::read(s.path("dom")).unwrap();

    let out = s.cli(&[
        "pool",
        "create",
        "--device",
        s.p("dom"),
        "--lun",
        s.p("lun2"),
        "--hosts",
        "4",
        "--extent-size",
        "1M",
        "--force",
    ]);

    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(fs::read(s.path("dom")).unwrap(), before);
    assert!(fs::read(s.path("lun2")).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn format_force_over_a_domain_leaves_no_pool_metadata_for_the_new_one() {
    let s = Setup::new();
    let old = s.create_volume("2M");

    let out = format(&s, "dom", true);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let status = s.cli(&["status", "--device", s.p("dom"), "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(v["pool"], Value::Null, "the old pool is still there: {v}");
    assert!(!text(&status.stdout).contains(&old));
}

// ---- 5. Exit status 4: no usable mailbox ------------------------------

#[test]
fn every_command_exits_4_on_a_damaged_superblock() {
    let s = Setup::new();
    let volume = s.create_volume("2M");
    s.make_file("lun2", 16 * MIB);
    // Flip a bit of the domain UUID of the superblock and of its backup:
    // both checksums fail.
    flip_bit(&s.path("dom"), 20);
    flip_bit(&s.path("dom"), BACKUP + 20);
    let dom = s.p("dom");

    let commands: [&[&str]; 7] = [
        &["status", "--device", dom],
        &["volume", "create", "--device", dom, "--virtual-size", "4M"],
        &["pool", "add-lun", "--device", dom, "--lun", s.p("lun2")],
        &["inspect", "--device", dom],
        &["format", "--device", dom, "--hosts", "4"],
        &["spm", "--device", dom],
        &[
            "host",
            "--device",
            dom,
            "--host-id",
            "1",
            "--volume",
            &volume,
        ],
    ];
    for args in commands {
        let out = s.cli(args);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("damaged"), "{args:?}");
    }
}

/// Where the superblock's backup block is (docs/format.md section 3).
const BACKUP: u64 = 0xF000;

fn flip_bit(path: &std::path::Path, at: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at).unwrap();
}

#[test]
fn a_damaged_superblock_is_read_from_its_backup_and_repaired_keeping_the_domain() {
    let s = Setup::new();
    let volume = s.create_volume("2M");
    let dom = s.p("dom");
    let before = s.cli(&["status", "--device", dom, "--json"]);
    assert!(before.status.success(), "{}", text(&before.stderr));
    flip_bit(&s.path("dom"), 20);

    // Every reader goes on from the backup, and says so.
    let status = s.cli(&["status", "--device", dom, "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stderr).contains("backup"),
        "{}",
        text(&status.stderr)
    );
    assert!(text(&status.stdout).contains(&volume));
    // inspect lists the damaged superblock.
    let inspect = s.cli(&["inspect", "--device", dom]);
    assert_eq!(inspect.status.code(), Some(3), "{}", text(&inspect.stdout));
    assert!(text(&inspect.stdout).contains("superblock"));

    let repair = s.cli(&["repair", "--device", dom]);
    assert!(repair.status.success(), "{}", text(&repair.stderr));
    assert!(text(&repair.stdout).contains("rewritten from its backup"));
    let inspect = s.cli(&["inspect", "--device", dom]);
    assert_eq!(inspect.status.code(), Some(0), "{}", text(&inspect.stdout));
    let after = s.cli(&["status", "--device", dom, "--json"]);
    let domain = |out: &std::process::Output| {
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["domain"].clone()
    };
    assert_eq!(domain(&before), domain(&after), "the domain is kept");
    assert!(text(&after.stdout).contains(&volume), "the pool is kept");
}

#[test]
fn repair_with_both_copies_damaged_takes_the_domain_from_the_spm_header() {
    let s = Setup::new();
    let volume = s.create_volume("2M");
    let dom = s.p("dom");
    let before = s.cli(&["status", "--device", dom, "--json"]);
    flip_bit(&s.path("dom"), 20);
    flip_bit(&s.path("dom"), BACKUP + 20);
    let refused = s.cli(&["repair", "--device", dom]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--hosts"),
        "{}",
        text(&refused.stderr)
    );

    let out = s.cli(&[
        "repair",
        "--device",
        dom,
        "--hosts",
        "4",
        "--sector-size",
        "512",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = s.cli(&["status", "--device", dom, "--json"]);
    assert!(after.status.success(), "{}", text(&after.stderr));
    let domain = |out: &std::process::Output| {
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["domain"].clone()
    };
    assert_eq!(domain(&before), domain(&after));
    assert!(text(&after.stdout).contains(&volume));
}

#[test]
fn spm_with_a_control_socket_exits_4_on_a_foreign_device() {
    let s = Setup::bare();
    fs::write(s.path("data"), random_bytes(4 * MIB as usize)).unwrap();
    let control = s.run.path().join("spm.sock");

    let out = s.cli(&[
        "spm",
        "--device",
        s.p("data"),
        "--control",
        control.to_str().unwrap(),
    ]);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
}
