//! What several integration tests share: loop devices over files, the
//! check that says why they cannot be made here, and running the binary
//! with a deadline.
//!
//! Each test file that uses it says `mod common;`; not every file uses
//! every part.
#![allow(dead_code)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Why loop-device tests cannot run here, if they cannot: they need root,
/// `losetup` and the kernel's loop driver.
pub fn loop_devices_missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (loop devices)".into());
    }
    if !Command::new("losetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("needs losetup (util-linux)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop device support: /dev/loop-control is missing".into());
    }
    None
}

/// A loop device over a backing file; made writable again (if a test set
/// it read-only) and detached on drop.
pub struct Loop {
    /// The device node, `/dev/loopN`.
    pub dev: PathBuf,
    read_only: Cell<bool>,
}

impl Loop {
    /// Attaches `file` with `sector_size`-byte logical sectors.
    pub fn attach(file: &Path, sector_size: u32) -> Loop {
        Loop::losetup(file, &["--sector-size", &sector_size.to_string()])
    }

    /// Attaches `file` with direct I/O on the backing file (512-byte
    /// sectors), as shared storage behaves: no page cache in between.
    pub fn attach_direct_io(file: &Path) -> Loop {
        Loop::losetup(file, &["--direct-io=on"])
    }

    fn losetup(file: &Path, options: &[&str]) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .args(options)
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).expect("losetup output is UTF-8");
        Loop {
            dev: PathBuf::from(dev.trim()),
            read_only: Cell::new(false),
        }
    }

    /// Makes the device read-only (writes fail with EPERM) or writable.
    pub fn set_read_only(&self, ro: bool) {
        let out = Command::new("blockdev")
            .arg(if ro { "--setro" } else { "--setrw" })
            .arg(&self.dev)
            .output()
            .expect("run blockdev");
        assert!(
            out.status.success(),
            "blockdev failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.read_only.set(ro);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.read_only.get() {
            let _ = Command::new("blockdev")
                .arg("--setrw")
                .arg(&self.dev)
                .status();
        }
        let status = Command::new("losetup").arg("-d").arg(&self.dev).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not detach {}", self.dev.display());
        }
    }
}

/// Runs `spmbox` with `args` and `SPMBOX_RUN_DIR` set to `run_dir` (so no
/// other test's SPM control socket is found); one still running after a
/// minute is killed (a refusal is immediate, a run without one finishes in
/// seconds).
pub fn spmbox(run_dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spmbox"))
        .args(args)
        .env("SPMBOX_RUN_DIR", run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run spmbox");
    let deadline = Instant::now() + Duration::from_secs(60);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("wait for spmbox")
}
