//! The `spmbox format` and `spmbox inspect` commands, through the real
//! binary, on files (and loop devices when running as root).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{Loop, loop_devices_missing};
use serde_json::Value;
use spmbox::cli::inspect;
use spmbox_core::wire::{
    Epoch, Generation, Geometry, HostId, InboxHeader, OutboxHeader, Reply, ReplyStatus, Request,
    Slot, SlotState, Superblock, Uuid,
};

const DOMAIN: &str = "5b0c1d2e-3f40-4152-8364-758697a8b9ca";
const VOLUME: Uuid = Uuid([0x77; 16]);

fn spmbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spmbox"))
        .args(args)
        .output()
        .expect("run spmbox")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temporary directory on a file system with O_DIRECT (not tmpfs on old
/// kernels): the system temp dir, else /var/tmp.
fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

fn format(path: &Path, hosts: &str) -> Output {
    spmbox(&[
        "format",
        "--device",
        path.to_str().unwrap(),
        "--hosts",
        hosts,
        "--domain",
        DOMAIN,
    ])
}

fn inspect_json(path: &Path) -> (Option<i32>, Value) {
    let out = spmbox(&["inspect", "--device", path.to_str().unwrap(), "--json"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), json)
}

fn domain() -> Uuid {
    Uuid::parse_str(DOMAIN).unwrap()
}

fn request() -> Request {
    Request {
        domain: domain(),
        host_id: HostId::new(2),
        slot: Slot::new(3),
        generation: Generation::new(4),
        sequence: 17,
        volume: VOLUME,
        target_size: 3 << 30,
        current_size: 2 << 30,
        paused: false,
    }
}

/// Writes host 2's inbox header and a request in slot 3, and the SPM's
/// outbox header and a waiting-for-space reply, as a host and the SPM would.
fn put_mail(path: &Path, geometry: &Geometry) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    let r = request();
    let inbox = geometry.inbox_area(HostId::new(2)).unwrap();
    let outbox = geometry.outbox_area(HostId::new(2)).unwrap();
    let header = InboxHeader {
        domain: r.domain,
        host_id: HostId::new(2),
        generation: Generation::new(4),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 0,
    };
    let reply = Reply {
        domain: r.domain,
        host_id: HostId::new(2),
        slot: Slot::new(3),
        generation: Generation::new(4),
        sequence: 17,
        volume: VOLUME,
        target_size: r.target_size,
        size: r.current_size,
        epoch: Epoch::new(1),
        status: ReplyStatus::WaitingForSpace,
    };
    let oheader = OutboxHeader {
        domain: r.domain,
        host_id: HostId::new(2),
        epoch: Epoch::new(1),
        generation: Generation::new(4),
    };
    file.write_all_at(&header.to_bytes().unwrap(), inbox)
        .unwrap();
    file.write_all_at(&r.to_bytes().unwrap(), inbox + 3 * 128)
        .unwrap();
    file.write_all_at(&oheader.to_bytes().unwrap(), outbox)
        .unwrap();
    file.write_all_at(&reply.to_bytes().unwrap(), outbox + 3 * 128)
        .unwrap();
    file.sync_all().unwrap();
}

#[test]
fn format_creates_a_file_of_exactly_the_mailbox_size_that_inspects_clean() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    let out = format(&path, "250");
    assert!(out.status.success(), "format failed: {}", stderr(&out));
    assert!(stdout(&out).contains(DOMAIN), "{}", stdout(&out));
    assert_eq!(fs::metadata(&path).unwrap().len(), 2_113_536);

    let (code, json) = inspect_json(&path);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["valid"], true);
    assert_eq!(json["superblock"]["domain"], DOMAIN);
    assert_eq!(json["superblock"]["max_hosts"], 250);
    assert_eq!(json["spm_header"]["state"], "valid");
    assert_eq!(json["spm_header"]["record"]["state"], "vacant");
    assert_eq!(json["doorbell"]["state"], "empty");
    assert_eq!(json["hosts"].as_array().map(Vec::len), Some(0));
}

#[test]
fn format_refuses_to_overwrite_a_mailbox_without_force() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    put_mail(&path, &Geometry::new(4, 512).unwrap());
    let before = fs::read(&path).unwrap();

    let out = format(&path, "4");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already holds an spmbox mailbox"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refused format changed the device"
    );

    let out = spmbox(&[
        "format",
        "--device",
        path.to_str().unwrap(),
        "--hosts",
        "4",
        "--force",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, json) = inspect_json(&path);
    assert_eq!(code, Some(0));
    assert_ne!(json["superblock"]["domain"], DOMAIN, "a new random domain");
    assert_eq!(
        json["hosts"].as_array().map(Vec::len),
        Some(0),
        "the old mail is gone"
    );
}

#[test]
fn format_refuses_a_device_that_is_too_small_and_leaves_it_alone() {
    let dir = tempdir();
    let path = dir.path().join("small");
    fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let out = format(&path, "2000");
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(
        err.contains("a mailbox for 2000 hosts needs 16449536 bytes"),
        "{err}"
    );
    assert_eq!(fs::read(&path).unwrap(), vec![0u8; 1 << 20]);
}

#[test]
fn format_rejects_arguments_that_make_no_sense() {
    let dir = tempdir();
    let path = dir.path().join("m");
    let p = path.to_str().unwrap();
    for args in [
        vec!["format", "--device", p, "--hosts", "0"],
        vec!["format", "--device", p, "--hosts", "2001"],
        vec![
            "format",
            "--device",
            p,
            "--hosts",
            "3",
            "--sector-size",
            "1024",
        ],
        vec![
            "format",
            "--device",
            p,
            "--hosts",
            "3",
            "--domain",
            "not-a-uuid",
        ],
        vec![
            "format",
            "--device",
            p,
            "--hosts",
            "3",
            "--domain",
            "00000000-0000-0000-0000-000000000000",
        ],
    ] {
        let out = spmbox(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!path.exists(), "{args:?} created the file");
    }
}

#[test]
fn inspect_says_in_one_line_when_a_device_is_not_a_mailbox() {
    let dir = tempdir();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("zeroes", vec![0u8; 1 << 20], "all zero"),
        (
            "garbage",
            (0..1 << 20)
                .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            "not the spmbox magic",
        ),
        ("text", b"hello\n".repeat(2000), "not the spmbox magic"),
    ];
    for (name, bytes, why) in cases {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let out = spmbox(&["inspect", "--device", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(4), "{name}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(
            err.contains("is not an spmbox mailbox") && err.contains(why),
            "{name}: {err}"
        );
        assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn inspect_lists_requests_and_replies() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    put_mail(&path, &Geometry::new(4, 512).unwrap());

    let (code, json) = inspect_json(&path);
    assert_eq!(code, Some(0), "{json}");
    let host = &json["hosts"][0];
    assert_eq!(host["host_id"], 2);
    assert_eq!(host["inbox"]["header"]["record"]["generation"], 4);
    assert_eq!(host["inbox"]["slots"][0]["slot"], 3);
    assert_eq!(host["inbox"]["slots"][0]["state"], "valid");
    assert_eq!(
        host["inbox"]["slots"][0]["record"]["target_size"],
        3u64 << 30
    );
    assert_eq!(
        host["outbox"]["slots"][0]["record"]["status"],
        "waiting_for_space"
    );
    assert_eq!(json["summary"]["requests"], 1);

    let out = spmbox(&["inspect", "--device", path.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(
        text.contains("host 2: inbox generation 4, release ack 0; outbox epoch 1, generation 4"),
        "{text}"
    );
    assert!(
        text.contains("inbox slot  3: request seq 17 gen 4"),
        "{text}"
    );
}

#[test]
fn inspect_reports_a_flipped_byte_at_its_place_with_exit_status_3() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    let g = Geometry::new(4, 512).unwrap();
    put_mail(&path, &g);
    let offset = g.inbox_area(HostId::new(2)).unwrap() + 3 * 128 + 70;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], offset).unwrap();
    file.sync_all().unwrap();

    let out = spmbox(&["inspect", "--device", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let record = offset - 70;
    let expected = format!("host 2 inbox slot 3 (offset {record} = {record:#x}): checksum");
    assert!(stdout(&out).contains(&expected), "{}", stdout(&out));
    assert!(
        !stdout(&out).contains("inbox slot  3: request"),
        "shown as a request: {}",
        stdout(&out)
    );
}

#[test]
fn inspect_reports_each_zero_only_region_once_with_its_count_of_nonzero_bytes() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Three bytes in the first reserved block, one in the second, and two
    // in the unused records of the doorbell block.
    for offset in [0x3010u64, 0x3011, 0x3ff0, 0x4800, 0x2080, 0x2fff] {
        file.write_all_at(&[0xa5], offset).unwrap();
    }
    file.sync_all().unwrap();
    let (code, v) = inspect_json(&path);
    assert_eq!(code, Some(3));
    let found: Vec<(u64, u64)> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["verdict"] == "nonzero_unused")
        .map(|p| {
            (
                p["offset"].as_u64().unwrap(),
                p["nonzero_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(found, vec![(0x2080, 2), (0x3010, 3), (0x4800, 1)], "{v}");
}

#[test]
fn inspect_host_filter_and_out_of_range_host() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    put_mail(&path, &Geometry::new(4, 512).unwrap());
    let p = path.to_str().unwrap();
    let out = spmbox(&["inspect", "--device", p, "--host", "1", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hosts"][0]["host_id"], 1);
    assert_eq!(json["summary"]["requests"], 0);
    let out = spmbox(&["inspect", "--device", p, "--host", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("host ids 1..=4"), "{}", stderr(&out));
}

/// Flipping any single byte of a mailbox with a request in it is reported
/// at the place of the byte, and never yields a valid request other than
/// the one that was written.
#[test]
fn every_single_byte_flip_is_reported_and_never_seen_as_a_valid_request() {
    let dir = tempdir();
    let path = dir.path().join("mailbox");
    assert!(format(&path, "4").status.success());
    let g = Geometry::new(4, 512).unwrap();
    put_mail(&path, &g);
    let image = fs::read(&path).unwrap();
    let superblock = Superblock::decode(&image[..128]).unwrap().unwrap();
    let clean = inspect::audit(&image, &superblock, None);
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);

    let mut image = image;
    for offset in 0..image.len() {
        for flip in [0x01u8, 0xff] {
            image[offset] ^= flip;
            let report = inspect::audit(&image, &superblock, None);
            image[offset] ^= flip;

            let place = g.locate(offset as u64).unwrap();
            let record_start = offset as u64 - u64::from(place.byte);
            let hit = report.problems.iter().any(|p| {
                p.place.offset == offset as u64 || (p.record && p.place.offset == record_start)
            });
            assert!(
                hit,
                "flip {flip:#x} at {place} not reported: {:?}",
                report.problems
            );
            for host in &report.hosts {
                for (_, state) in &host.requests {
                    if let SlotState::Valid(r) = state {
                        assert_eq!(*r, request(), "flip at {place} produced a valid request");
                    }
                }
            }
        }
    }
}

#[test]
fn on_loop_devices_the_sector_size_must_match() {
    if let Some(why) = loop_devices_missing() {
        println!("skipped: on_loop_devices_the_sector_size_must_match: {why}");
        return;
    }
    let dir = tempdir();
    let backing = dir.path().join("lun");
    fs::write(&backing, vec![0u8; 4 << 20]).unwrap();
    let lun = Loop::attach(&backing, 4096);
    let dev = lun.dev.to_str().unwrap();

    let out = spmbox(&[
        "format",
        "--device",
        dev,
        "--hosts",
        "100",
        "--sector-size",
        "512",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("4096-byte logical sectors"),
        "{}",
        stderr(&out)
    );

    let out = spmbox(&["format", "--device", dev, "--hosts", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, json) = inspect_json(&lun.dev);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["superblock"]["sector_size"], 4096);
    drop(lun);

    // The same bytes seen through a 512-byte-sector device do not fit.
    let lun = Loop::attach(&backing, 512);
    let out = spmbox(&["inspect", "--device", lun.dev.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("formatted for 4096-byte sectors"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_error_starts_with_one_prefix() {
    let dir = tempdir();
    let junk = dir.path().join("junk");
    fs::write(&junk, vec![0x5a; 1 << 20]).unwrap();
    // The parser's own refusal (a required flag missing), a refusal of
    // the command, and an unknown flag.
    for args in [
        vec!["status"],
        vec!["status", "--device", junk.to_str().unwrap()],
        vec!["status", "--device", "x", "--no-such-flag"],
    ] {
        let out = spmbox(&args);
        let err = stderr(&out);
        assert!(
            err.starts_with("spmbox: error: "),
            "{args:?}: stderr does not start with the prefix: {err:?}"
        );
        assert_eq!(err.matches("error:").count(), 1, "{args:?}: {err:?}");
    }
    // Help and version are not errors.
    let out = spmbox(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("spmbox "), "{}", stdout(&out));
}

#[test]
fn status_on_a_device_that_is_not_a_mailbox_exits_4() {
    let dir = tempdir();
    let junk = dir.path().join("junk");
    fs::write(&junk, vec![0x5a; 1 << 20]).unwrap();
    let zero = dir.path().join("zero");
    fs::write(&zero, vec![0; 1 << 20]).unwrap();
    for path in [&junk, &zero] {
        for json in [false, true] {
            let mut args = vec!["status", "--device", path.to_str().unwrap()];
            if json {
                args.push("--json");
            }
            let out = spmbox(&args);
            assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("not an spmbox mailbox"),
                "{}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn size_flags_are_checked_before_anything_is_opened() {
    // The device does not exist: a size refusal must come first, with
    // exit status 2, and name the flag's value.
    let volume = "5b0c1d2e-3f40-4152-8364-758697a8b9cb";
    let host = |flag: &'static str, value: &'static str| {
        vec![
            "host",
            "--device",
            "/nonexistent/dom",
            "--host-id",
            "1",
            "--volume",
            volume,
            flag,
            value,
        ]
    };
    for args in [
        host("--chunk-size", "0"),
        host("--chunk-size", "1"),
        host("--chunk-size", "1000K"),
        host("--write-size", "0"),
        host("--write-size", "6K"),
        host("--write-size", "128M"),
        host("--guest-bytes", "0"),
        host("--utilization", "101"),
        vec![
            "pool",
            "create",
            "--device",
            "/nonexistent/dom",
            "--lun",
            "/nonexistent/lun",
            "--hosts",
            "4",
            "--extent-size",
            "0",
        ],
        vec![
            "pool",
            "create",
            "--device",
            "/nonexistent/dom",
            "--lun",
            "/nonexistent/lun",
            "--hosts",
            "4",
            "--extent-size",
            "3M",
        ],
        vec![
            "volume",
            "create",
            "--device",
            "/nonexistent/dom",
            "--virtual-size",
            "1000",
        ],
        vec![
            "volume",
            "create",
            "--device",
            "/nonexistent/dom",
            "--virtual-size",
            "0",
        ],
    ] {
        let out = spmbox(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("spmbox: error: invalid value"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("/nonexistent"), "{args:?}: {err}");
    }
}

#[test]
fn pool_create_on_a_domain_says_so_before_judging_the_luns() {
    let dir = tempdir();
    let dom = dir.path().join("dom");
    let lun = dir.path().join("lun");
    let small = dir.path().join("small");
    fs::File::create(&lun).unwrap().set_len(64 << 20).unwrap();
    fs::File::create(&small).unwrap().set_len(1 << 20).unwrap();
    let create = |lun: &Path| {
        spmbox(&[
            "pool",
            "create",
            "--device",
            dom.to_str().unwrap(),
            "--lun",
            lun.to_str().unwrap(),
            "--hosts",
            "4",
            "--extent-size",
            "1M",
        ])
    };
    let out = create(&lun);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A LUN that is too small, and the domain's own LUN (labelled): the
    // device's mailbox is the cause named.
    for lun in [&small, &lun] {
        let out = create(lun);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("already holds an spmbox mailbox"), "{err}");
        assert!(!err.contains("too small"), "{err}");
    }
}

#[test]
fn config_files_give_the_daemons_flags_and_the_command_line_wins() {
    let dir = tempdir();
    let global = dir.path().join("spmbox.toml");
    let domain = dir.path().join("domain1.toml");
    fs::write(
        &global,
        "# defaults\n[log]\nlevel = \"info\"\n\n[host]\nchunk-size = \"64M\"\n",
    )
    .unwrap();
    fs::write(
        &domain,
        "[host]\ndevice = \"/nonexistent/dom\"\nhost-id = 2\nvolume = [\"5b0c1d2e-3f40-4152-8364-758697a8b9cb\"]\nchunk-size = \"0\"\n",
    )
    .unwrap();
    let (g, d) = (global.to_str().unwrap(), domain.to_str().unwrap());
    // The domain file's bad value is refused with its file and line, by
    // `config check` and by the daemon alike.
    let out = spmbox(&["config", "check", g, d]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{d}, line 5: ")),
        "{}",
        stderr(&out)
    );
    let out = spmbox(&["host", "--config", g, "--config", d]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{d}, line 5: ")),
        "{}",
        stderr(&out)
    );
    // A flag wins over the file: the host gets as far as the device.
    let out = spmbox(&["host", "--config", g, "--config", d, "--chunk-size", "1M"]);
    assert!(
        stderr(&out).contains("/nonexistent/dom"),
        "{}",
        stderr(&out)
    );
    // The global file alone is fine, and shows what each daemon gets.
    let out = spmbox(&["config", "check", g]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("spmbox host gets: --chunk-size 64M"),
        "{}",
        stdout(&out)
    );
    // An unknown key, with its line.
    fs::write(
        &domain,
        "[spm]\ndevice = \"/dev/x\"\nscan-interval = \"1s\"\n",
    )
    .unwrap();
    let out = spmbox(&["config", "check", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!(
            "spmbox: error: {d}, line 3: unknown key `scan-interval` in [spm]"
        )),
        "{}",
        stderr(&out)
    );
    let out = spmbox(&["spm", "--config", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("line 3: unknown key"),
        "{}",
        stderr(&out)
    );
}
