//! A volume served over NBD to qemu's own tools: a qcow2 image on a thin
//! volume mapped onto two LUN files, filled past its physical size, then
//! extended. Needs qemu-img and qemu-io (qemu-utils); without them each
//! test prints `skipped:` and passes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use spmbox::io::device::Device;
use spmbox::io::mapping::{Mapping, Run};
use spmbox::vm::export::VolumeExport;
use spmbox::vm::nbd::Server;

const MIB: u64 = 1 << 20;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

/// Why qemu's tools cannot be used here, if they cannot.
fn no_qemu() -> Option<&'static str> {
    for tool in ["qemu-img", "qemu-io"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some("qemu-img not found (apt-get install qemu-utils)");
        }
    }
    None
}

fn run(device: &Path, offset: u64, len: u64) -> Run {
    Run {
        device: device.to_owned(),
        offset,
        len,
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `--image-opts` for export `name` on `socket`, under `format`.
fn image_opts(format: &str, socket: &Path, name: &str) -> String {
    format!(
        "driver={format},file.driver=nbd,file.server.type=unix,file.server.path={},file.export={name}",
        socket.display()
    )
}

/// Runs qemu-io with these commands on the image; its output.
fn qemu_io(opts: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--image-opts").arg(opts);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().expect("run qemu-io");
    text(&out)
}

/// Two 16 MiB LUN files in a temporary directory.
struct Luns {
    dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn luns() -> Luns {
    let dir = tempdir();
    let a = dir.path().join("lun-a");
    let b = dir.path().join("lun-b");
    for p in [&a, &b] {
        Device::create_file(p, 16 * MIB).expect("create LUN file");
    }
    Luns { dir, a, b }
}

fn bytes(path: &Path, from: u64, len: u64) -> Vec<u8> {
    let all = fs::read(path).expect("read LUN file");
    all[from as usize..(from + len) as usize].to_vec()
}

#[test]
fn qcow2_on_a_thin_volume_fills_up_pauses_on_enospc_and_goes_on_after_extension() {
    if let Some(why) = no_qemu() {
        eprintln!("skipped: {why}");
        return;
    }
    let l = luns();
    let socket = l.dir.path().join("vol.sock");
    // 6 MiB physical: 3 MiB on a at 1 MiB, 3 MiB on b at 2 MiB.
    let map = Mapping::new(vec![run(&l.a, MIB, 3 * MIB), run(&l.b, 2 * MIB, 3 * MIB)]);
    let export = Arc::new(VolumeExport::new(map, 1024 * MIB + 8 * MIB));
    let server = Server::serve(&socket, "vol", export.clone()).expect("serve");

    let url = format!("nbd+unix:///vol?socket={}", socket.display());
    let out = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", &url, "1G"])
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", text(&out));

    let qcow2 = image_opts("qcow2", &socket, "vol");
    let out = qemu_io(&qcow2, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    assert!(!out.contains("failed"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");

    // 8 MiB more data does not fit in 6 MiB physical.
    let out = qemu_io(&qcow2, &["write -P 0xcd 1M 8M"]);
    assert!(out.contains("No space left on device"), "{out}");
    assert!(export.no_space_errors() > 0);
    assert!(export.highest_written() > export.physical());

    // Extended: 4 MiB more on a, 3 MiB more on b (13 MiB).
    let longer = Mapping::new(vec![
        run(&l.a, MIB, 3 * MIB),
        run(&l.b, 2 * MIB, 3 * MIB),
        run(&l.a, 4 * MIB, 4 * MIB),
        run(&l.b, 5 * MIB, 3 * MIB),
    ]);
    export.set_map(longer).expect("longer map");
    let out = qemu_io(&qcow2, &["write -P 0xcd 1M 8M"]);
    assert!(!out.contains("failed"), "{out}");
    let out = qemu_io(&qcow2, &["read -P 0xab 0 1M", "read -P 0xcd 1M 8M"]);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    assert!(out.contains("read 8388608/8388608 bytes"), "{out}");

    let out = Command::new("qemu-img")
        .args(["check", "--image-opts", &qcow2])
        .output()
        .expect("run qemu-img check");
    assert!(out.status.success(), "qemu-img check: {}", text(&out));
    assert!(
        text(&out).contains("No errors were found"),
        "{}",
        text(&out)
    );
    // Each tool's connection ends when the tool exits.
    for _ in 0..500 {
        if server.connections() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 0);
}

#[test]
fn a_raw_export_places_bytes_on_the_luns_where_the_map_says() {
    if let Some(why) = no_qemu() {
        eprintln!("skipped: {why}");
        return;
    }
    let l = luns();
    let socket = l.dir.path().join("raw.sock");
    // Volume 0..1M on a at 3M, 1M..3M on b at 8M.
    let map = Mapping::new(vec![run(&l.a, 3 * MIB, MIB), run(&l.b, 8 * MIB, 2 * MIB)]);
    let export = Arc::new(VolumeExport::new(map, 3 * MIB));
    let _server = Server::serve(&socket, "raw", export).expect("serve");
    let raw = image_opts("raw", &socket, "raw");
    let out = qemu_io(
        &raw,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 2M",
            // Unaligned, across the runs' boundary: qemu aligns it.
            "write -P 0x33 1048000 1000",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(bytes(&l.a, 3 * MIB, 1048000).iter().all(|&b| b == 0x11));
    assert!(
        bytes(&l.a, 3 * MIB + 1048000, 576)
            .iter()
            .all(|&b| b == 0x33)
    );
    assert!(bytes(&l.b, 8 * MIB, 424).iter().all(|&b| b == 0x33));
    assert!(
        bytes(&l.b, 8 * MIB + 424, 2 * MIB - 424)
            .iter()
            .all(|&b| b == 0x22)
    );
    // Nothing outside the runs was touched.
    assert!(bytes(&l.a, 0, 3 * MIB).iter().all(|&b| b == 0));
    assert!(bytes(&l.a, 4 * MIB, 12 * MIB).iter().all(|&b| b == 0));
    assert!(bytes(&l.b, 0, 8 * MIB).iter().all(|&b| b == 0));
    assert!(bytes(&l.b, 10 * MIB, 6 * MIB).iter().all(|&b| b == 0));
}

/// MiB/s of `qemu-img bench` writing 1 MiB requests with `-t none`.
fn bench(opts: &str, count: u32) -> Option<f64> {
    let start = Instant::now();
    let out = Command::new("qemu-img")
        .args(["bench", "-w", "-t", "none", "-n", "-c"])
        .arg(count.to_string())
        .args(["-s", "1M", "--image-opts", opts])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("qemu-img bench failed: {}", text(&out));
        return None;
    }
    Some(f64::from(count) / start.elapsed().as_secs_f64())
}

/// Prints write throughput through the export beside a raw file; asserts
/// nothing about speed.
#[test]
fn measure_write_throughput_through_the_export() {
    if let Some(why) = no_qemu() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempdir();
    let a = dir.path().join("lun-a");
    let b = dir.path().join("lun-b");
    let file = dir.path().join("plain");
    for p in [&a, &b, &file] {
        Device::create_file(p, 64 * MIB).expect("create file");
    }
    let map = Mapping::new(vec![run(&a, 0, 64 * MIB), run(&b, 0, 64 * MIB)]);
    let socket = dir.path().join("bench.sock");
    let _server = Server::serve(
        &socket,
        "bench",
        Arc::new(VolumeExport::new(map, 128 * MIB)),
    )
    .expect("serve");
    let count = 2000;
    let nbd = bench(&image_opts("raw", &socket, "bench"), count);
    let plain = bench(
        &format!(
            "driver=raw,file.driver=file,file.filename={}",
            file.display()
        ),
        count,
    );
    println!(
        "qemu-img bench -w -t none -s 1M -c {count}: through NBD onto 2 LUN files {} MiB/s, \
         a raw file directly {} MiB/s",
        nbd.map_or("n/a".into(), |v| format!("{v:.0}")),
        plain.map_or("n/a".into(), |v| format!("{v:.0}")),
    );
}
