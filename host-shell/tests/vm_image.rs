//! Real VMs: qemu boots this machine's kernel with the initramfs built
//! from the test's `spmbox` binary, and the in-VM workload writes a raw
//! disk image that the host then checks block by block.
//!
//! Skipped (with `skipped: <why>`) when qemu, qemu-img, a kernel with
//! virtio modules or a static busybox is missing, or the kernel cannot be
//! read.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use spmbox::vm::image::{self as vm_image, GuestParams, GuestResult, VmTools};
use spmbox_core::wire::Uuid;

const MIB: u64 = 1 << 20;

const VOLUME: Uuid = Uuid([0x5a; 16]);

fn tools() -> Option<VmTools> {
    match vm_image::find_tools() {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

/// The initramfs of the test binary, built once per target directory and
/// reused by later runs (it is cached on the binary's stamp).
fn initramfs(tools: &VmTools) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_spmbox"));
    let out = bin.with_file_name("spmbox-vm-test.initramfs");
    let t = Instant::now();
    vm_image::build_initramfs(tools, bin, &out).expect("build the initramfs");
    eprintln!(
        "initramfs: {} bytes, ready in {:.2} s",
        fs::metadata(&out).unwrap().len(),
        t.elapsed().as_secs_f64()
    );
    out
}

/// Boots one VM on raw image `disk` and returns its serial log.
fn boot(
    tools: &VmTools,
    initramfs: &Path,
    disk: &Path,
    dir: &Path,
    params: &GuestParams,
) -> String {
    let serial = dir.join("serial.log");
    let _ = fs::remove_file(&serial);
    let mut args =
        vm_image::qemu_base_args(tools, initramfs, &vm_image::kernel_cmdline(params), &serial);
    args.extend(
        [
            "-drive".to_owned(),
            format!(
                "file={},format=raw,if=none,id=d0,cache=none",
                disk.display()
            ),
            "-device".to_owned(),
            "virtio-blk-pci,drive=d0".to_owned(),
        ]
        .map(Into::into),
    );
    let t = Instant::now();
    let out = Command::new(&tools.qemu)
        .args(&args)
        .output()
        .expect("run qemu");
    let log = fs::read_to_string(&serial).unwrap_or_default();
    eprintln!(
        "VM ran {:.2} s ({:?}); serial log:\n{log}",
        t.elapsed().as_secs_f64(),
        out.status
    );
    assert!(
        out.status.success(),
        "qemu failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    log
}

fn params(bytes: u64) -> GuestParams {
    GuestParams {
        volume: VOLUME,
        generation: 3,
        bytes,
        rate: 0,
        write_size: MIB,
    }
}

fn raw_disk(dir: &Path, size: u64) -> PathBuf {
    let disk = dir.join("disk.raw");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    disk
}

fn expect_clean(result: &GuestResult, bytes: u64, resumed_from: u64) {
    assert_eq!(result.errors, 0, "{result:?}");
    assert_eq!(result.first_error, None);
    assert_eq!(result.resumed_from, resumed_from);
    assert_eq!(result.written, bytes - resumed_from);
    assert_eq!(result.verified, bytes);
}

#[test]
fn a_vm_writes_its_disk_and_the_host_finds_every_block_good() {
    let Some(tools) = tools() else { return };
    let image = initramfs(&tools);
    let dir = tempdir();
    let disk = raw_disk(dir.path(), 64 * MIB);
    let log = boot(&tools, &image, &disk, dir.path(), &params(32 * MIB));
    let result = vm_image::parse_result(&log).expect("a result line on the serial console");
    expect_clean(&result, 32 * MIB, 0);
    assert!(log.contains("spmbox-vm: wrote 16777216 of 33554432"));
    let report = vm_image::verify_raw(&disk, VOLUME, 32 * MIB).unwrap();
    assert_eq!(report.error_count, 0, "{report:?}");
    assert_eq!(report.bytes_verified, 32 * MIB);
    // Nothing was written past the end asked for.
    let after = vm_image::verify_raw(&disk, VOLUME, 32 * MIB + 4096).unwrap();
    assert_eq!(after.error_count, 1);
}

#[test]
fn a_vm_booted_again_on_its_disk_resumes_where_the_last_one_stopped() {
    let Some(tools) = tools() else { return };
    let image = initramfs(&tools);
    let dir = tempdir();
    let disk = raw_disk(dir.path(), 64 * MIB);
    let first = boot(&tools, &image, &disk, dir.path(), &params(32 * MIB));
    expect_clean(&vm_image::parse_result(&first).unwrap(), 32 * MIB, 0);
    let second = boot(&tools, &image, &disk, dir.path(), &params(48 * MIB));
    assert!(second.contains("spmbox-vm: resuming at 33554432"));
    expect_clean(
        &vm_image::parse_result(&second).unwrap(),
        48 * MIB,
        32 * MIB,
    );
    let report = vm_image::verify_raw(&disk, VOLUME, 48 * MIB).unwrap();
    assert_eq!(report.error_count, 0, "{report:?}");
}
