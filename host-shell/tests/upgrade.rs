//! `spmbox upgrade`, through the real binary: a version-2 or version-3
//! mailbox with real state in it becomes version 4 keeping every request, reply,
//! generation, epoch and pool commit; a second run changes nothing; a
//! damaged record is left as it was; a version-1 mailbox and a live host
//! lease are refused without a byte written.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use spmbox_core::wire::{
    AREA_SIZE, CRC32C, DOORBELL_OFFSET, Doorbell, Epoch, Generation, HostId, InboxHeader,
    OutboxHeader, RECORD_LEN, Reply, ReplyStatus, Request, SPM_HEADER_OFFSET, Slot, SpmHeader,
    SpmState, Superblock, Uuid,
};

const HOSTS: u64 = 4;
const INBOX: u64 = 0x10000;
const OUTBOX: u64 = INBOX + HOSTS * AREA_SIZE as u64;
const VOLUME: Uuid = Uuid([0x5a; 16]);

/// A temporary directory with the mailbox `dom` and a run directory of its
/// own (no SPM's control socket of another test is found).
struct Setup {
    dir: tempfile::TempDir,
    run: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
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

    fn dom(&self) -> PathBuf {
        self.dir.path().join("dom")
    }

    fn dom_str(&self) -> String {
        self.dom().to_str().unwrap().to_owned()
    }

    /// Runs a command (see [`common::spmbox`]).
    fn cli(&self, args: &[&str]) -> Output {
        common::spmbox(self.run.path(), args)
    }

    /// `spmbox format` for 4 hosts with `sector_size`; returns the domain.
    fn format(&self, sector_size: &str) -> Uuid {
        let dom = self.dom_str();
        let out = self.cli(&[
            "format",
            "--device",
            &dom,
            "--hosts",
            "4",
            "--sector-size",
            sector_size,
        ]);
        assert!(out.status.success(), "format: {}", text(&out.stderr));
        let bytes = fs::read(self.dom()).unwrap();
        Superblock::decode(&bytes[..RECORD_LEN])
            .unwrap()
            .unwrap()
            .domain
    }

    fn upgrade(&self, json: bool) -> Output {
        let dom = self.dom_str();
        let mut args = vec!["upgrade", "--device", dom.as_str()];
        if json {
            args.push("--json");
        }
        self.cli(&args)
    }

    fn inspect_json(&self) -> (Option<i32>, Value) {
        let dom = self.dom_str();
        let out = self.cli(&["inspect", "--device", &dom, "--json"]);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), v)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_record(path: &Path, offset: u64, record: &[u8; RECORD_LEN]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(record, offset).unwrap();
}

/// Seals `record` with the CRC32C of bytes 4..128.
fn seal(record: &mut [u8]) {
    let crc = CRC32C.checksum(&record[4..RECORD_LEN]);
    record[..4].copy_from_slice(&crc.to_le_bytes());
}

/// Writes the state of a domain that ran: an SPM header (epoch 5, pool
/// commit 7, the SPM stopped), host 1's inbox header (generation 3, a
/// lease of 200 ms whose holder is gone), a request and its reply in slot
/// 1, the outbox header, and a doorbell naming the request.
fn write_state(path: &Path, domain: Uuid) {
    let spm = SpmHeader {
        domain,
        epoch: Epoch::new(5),
        spm_id: HostId::new(0),
        state: SpmState::Vacant,
        heartbeat_interval_ms: 1000,
        heartbeat: 41,
        owner: 0x1234_5678_9abc_def1,
        pool_commit: 7,
        release_commit: 0,
    };
    let inbox = InboxHeader {
        domain,
        host_id: HostId::new(1),
        generation: Generation::new(3),
        owner: 0x0bad_cafe_0000_0001,
        heartbeat: 17,
        heartbeat_interval_ms: 200,
        release_ack: 0,
    };
    let request = Request {
        domain,
        host_id: HostId::new(1),
        slot: Slot::new(1),
        generation: Generation::new(3),
        sequence: 9,
        volume: VOLUME,
        target_size: 256 << 20,
        current_size: 128 << 20,
        paused: true,
    };
    let outbox = OutboxHeader {
        domain,
        host_id: HostId::new(1),
        epoch: Epoch::new(5),
        generation: Generation::new(3),
    };
    let reply = Reply::answering(&request, ReplyStatus::Extended, 256 << 20, Epoch::new(5));
    let doorbell = Doorbell {
        domain,
        ringer: HostId::new(1),
        generation: Generation::new(3),
        sequence: 9,
        rings: 1,
    };
    write_record(path, SPM_HEADER_OFFSET, &spm.to_bytes().unwrap());
    write_record(path, DOORBELL_OFFSET, &doorbell.to_bytes().unwrap());
    write_record(path, INBOX, &inbox.to_bytes().unwrap());
    write_record(path, INBOX + 128, &request.to_bytes().unwrap());
    write_record(path, OUTBOX, &outbox.to_bytes().unwrap());
    write_record(path, OUTBOX + 128, &reply.to_bytes().unwrap());
}

/// Turns every nonempty record of the mailbox in `bytes` into one of
/// format version `version`: byte 9 set, the doorbell's `rings` (bytes
/// 34..36, reserved before version 3) zeroed for version 2, the CRC sealed
/// again. (The fields new in version 4 are 0 in the state written.)
fn to_version(bytes: &mut [u8], version: u8) {
    for (i, record) in bytes.chunks_exact_mut(RECORD_LEN).enumerate() {
        if record.iter().all(|&b| b == 0) {
            continue;
        }
        record[9] = version;
        if (i * RECORD_LEN) as u64 == DOORBELL_OFFSET && version < 3 {
            record[34..36].fill(0);
        }
        seal(record);
    }
}

/// A version-4 mailbox with the state of [`write_state`]: its bytes.
fn v4_mailbox(s: &Setup, sector_size: &str) -> Vec<u8> {
    let domain = s.format(sector_size);
    write_state(&s.dom(), domain);
    let (code, v) = s.inspect_json();
    assert_eq!(code, Some(0), "the state written is valid: {v}");
    fs::read(s.dom()).unwrap()
}

/// The same mailbox turned into version 2; returns its bytes.
fn make_v2(s: &Setup, v4: &[u8]) -> Vec<u8> {
    make_version(s, v4, 2)
}

/// The same mailbox turned into `version`; returns its bytes.
fn make_version(s: &Setup, v4: &[u8], version: u8) -> Vec<u8> {
    let mut old = v4.to_vec();
    to_version(&mut old, version);
    fs::write(s.dom(), &old).unwrap();
    old
}

#[test]
fn a_version_2_mailbox_is_upgraded_keeping_its_state_and_a_second_run_changes_nothing() {
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "4096");
    make_v2(&s, &v4);

    // A version-4 reader refuses it and says what to do.
    let dom = s.dom_str();
    let refused = s.cli(&["inspect", "--device", &dom]);
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    let err = text(&refused.stderr);
    assert!(
        err.contains(&format!("spmbox upgrade --device {dom}")) && err.contains("version 2"),
        "{err}"
    );

    let out = s.upgrade(false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("upgraded {dom} from format version 2 to 4"))
            && said.contains("7 records rewritten")
            && said.contains("the doorbell cleared")
            && said.contains("epoch 5")
            && said.contains("pool commit 7"),
        "{said}"
    );

    // Byte for byte the version-4 mailbox it came from, but the doorbell.
    let after = fs::read(s.dom()).unwrap();
    let mut expected = v4.clone();
    let bell = DOORBELL_OFFSET as usize;
    expected[bell..bell + RECORD_LEN].fill(0);
    assert!(
        after == expected,
        "the upgraded bytes differ from the v4 ones"
    );

    let (code, v) = s.inspect_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["spm_header"]["record"]["epoch"], 5, "{v}");
    assert_eq!(v["spm_header"]["record"]["pool_commit"], 7, "{v}");
    assert_eq!(v["doorbell"]["state"], "empty", "{v}");
    let host = &v["hosts"][0];
    assert_eq!(host["host_id"], 1, "{v}");
    assert_eq!(host["inbox"]["header"]["record"]["generation"], 3, "{v}");
    let request = &host["inbox"]["slots"][0];
    assert_eq!(request["state"], "valid", "{v}");
    assert_eq!(request["record"]["sequence"], 9, "{v}");
    assert_eq!(request["record"]["target_size"], 256u64 << 20, "{v}");
    assert_eq!(request["record"]["paused"], true, "{v}");
    let reply = &host["outbox"]["slots"][0];
    assert_eq!(reply["state"], "valid", "{v}");
    assert_eq!(reply["record"]["status"], "extended", "{v}");
    assert_eq!(reply["record"]["epoch"], 5, "{v}");
    assert_eq!(reply["record"]["volume"], VOLUME.to_string(), "{v}");
    assert_eq!(host["outbox"]["header"]["record"]["generation"], 3, "{v}");

    // Again: nothing to do, nothing written.
    let again = s.upgrade(false);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("already version 4"),
        "{}",
        text(&again.stdout)
    );
    assert!(fs::read(s.dom()).unwrap() == after, "a second run wrote");
}

#[test]
fn a_damaged_record_is_left_as_it_was_and_counted() {
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "512");
    let mut v2 = make_v2(&s, &v4);
    // One flipped byte in the reply (its target size): its CRC fails.
    let at = (OUTBOX + 128 + 60) as usize;
    v2[at] ^= 0x10;
    fs::write(s.dom(), &v2).unwrap();

    let out = s.upgrade(true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("upgrade --json");
    assert_eq!(v["from_version"], 2, "{v}");
    assert_eq!(v["to_version"], 4, "{v}");
    assert_eq!(v["records_rewritten"], 6, "{v}");
    assert_eq!(v["doorbell_cleared"], true, "{v}");
    assert_eq!(v["defective_left"], 1, "{v}");
    assert_eq!(v["epoch"], 5, "{v}");
    assert_eq!(v["pool_commit"], 7, "{v}");

    let after = fs::read(s.dom()).unwrap();
    let reply = (OUTBOX + 128) as usize;
    assert_eq!(
        after[reply..reply + RECORD_LEN],
        v2[reply..reply + RECORD_LEN],
        "the damaged reply was changed"
    );
    // Everything else is the version-4 mailbox (the doorbell cleared).
    let mut expected = v4.clone();
    expected[DOORBELL_OFFSET as usize..DOORBELL_OFFSET as usize + RECORD_LEN].fill(0);
    expected[reply..reply + RECORD_LEN].copy_from_slice(&v2[reply..reply + RECORD_LEN]);
    assert!(after == expected, "other bytes differ from the v4 ones");

    // inspect lists it, as it would any damaged record.
    let (code, v) = s.inspect_json();
    assert_eq!(code, Some(3), "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["offset"], OUTBOX + 128, "{v}");
    assert_eq!(problems[0]["verdict"], "checksum", "{v}");
}

#[test]
fn a_version_1_mailbox_is_refused_naming_format_force() {
    let s = Setup::new();
    let mut v1 = v4_mailbox(&s, "4096");
    to_version(&mut v1, 1);
    fs::write(s.dom(), &v1).unwrap();

    let out = s.upgrade(false);

    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("version 1")
            && err.contains("spmbox format --device")
            && err.contains("--force"),
        "{err}"
    );
    assert!(fs::read(s.dom()).unwrap() == v1, "bytes changed");
}

#[test]
fn a_live_host_lease_is_refused_with_its_host_id() {
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "4096");
    let domain = s.format_domain(&v4);
    make_v2(&s, &v4);
    // Host 2 holds its id: a lease of 100 ms whose heartbeat a thread
    // raises every 40 ms.
    let header_at = INBOX + AREA_SIZE as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let (stop, path) = (Arc::clone(&stop), s.dom());
        std::thread::spawn(move || {
            let mut heartbeat = 1u64;
            let mut last = [0u8; RECORD_LEN];
            while !stop.load(Ordering::Relaxed) {
                let header = InboxHeader {
                    domain,
                    host_id: HostId::new(2),
                    generation: Generation::new(1),
                    owner: 0xfeed,
                    heartbeat,
                    heartbeat_interval_ms: 100,
                    release_ack: 0,
                };
                last = header.to_bytes().unwrap();
                to_version(&mut last, 2);
                write_record(&path, header_at, &last);
                heartbeat += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            last
        })
    };
    std::thread::sleep(Duration::from_millis(100));

    let out = s.upgrade(false);

    stop.store(true, Ordering::Relaxed);
    let last = beat.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("host 2") && err.contains("spmbox-host@"),
        "{err}"
    );
    // Nothing written: the version-2 mailbox with the last heartbeat.
    let mut expected = fs::read(s.dom()).unwrap();
    let mut v2 = v4.clone();
    to_version(&mut v2, 2);
    let h = header_at as usize;
    assert_eq!(expected[h..h + RECORD_LEN], last);
    expected[h..h + RECORD_LEN].fill(0);
    assert!(expected == v2, "bytes other than the heartbeat changed");
}

impl Setup {
    /// The domain of a mailbox's bytes.
    fn format_domain(&self, bytes: &[u8]) -> Uuid {
        Superblock::decode(&bytes[..RECORD_LEN])
            .unwrap()
            .unwrap()
            .domain
    }
}

#[test]
fn an_interrupted_upgrade_is_finished_by_running_it_again() {
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "512");
    let mut v2 = v4.clone();
    to_version(&mut v2, 2);
    let mut done = v4.clone();
    let bell = DOORBELL_OFFSET as usize;
    done[bell..bell + RECORD_LEN].fill(0);
    let record = |at: u64| at as usize..at as usize + RECORD_LEN;
    // What a crash leaves: the version-2 mailbox with some of the
    // upgrade's writes done, in its order.
    let mut torn = v2.clone(); // host areas and SPM header partly done
    for at in [SPM_HEADER_OFFSET, INBOX, INBOX + 128] {
        torn[record(at)].copy_from_slice(&done[record(at)]);
    }
    let mut before_backup = done.clone(); // step 1 done
    for at in [0, 0xF000] {
        before_backup[record(at)].copy_from_slice(&v2[record(at)]);
    }
    let mut before_superblock = done.clone(); // steps 1 and 2 done
    before_superblock[record(0)].copy_from_slice(&v2[record(0)]);

    for (name, image, rewritten) in [
        ("torn", torn, 4),
        ("before the backup", before_backup, 2),
        ("before the superblock", before_superblock, 1),
    ] {
        fs::write(s.dom(), &image).unwrap();
        // No version-4 reader takes it meanwhile.
        let dom = s.dom_str();
        let refused = s.cli(&["inspect", "--device", &dom]);
        assert_eq!(refused.status.code(), Some(4), "{name}");

        let out = s.upgrade(true);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("upgrade --json");
        assert_eq!(v["records_rewritten"], rewritten, "{name}: {v}");
        assert_eq!(v["defective_left"], 0, "{name}: {v}");
        assert!(
            fs::read(s.dom()).unwrap() == done,
            "{name}: not the upgraded mailbox"
        );
        let (code, v) = s.inspect_json();
        assert_eq!(code, Some(0), "{name}: {v}");
    }
}

#[test]
fn repair_refuses_a_version_2_mailbox_and_names_upgrade() {
    // Repair with the geometry and domain given would otherwise write
    // version-4 superblocks over version-2 records, after which upgrade
    // says "already version 4" and every record stays unreadable.
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "4096");
    let mut v2 = make_v2(&s, &v4);
    // The primary superblock damaged: repair would rewrite it.
    v2[100] ^= 1;
    fs::write(s.dom(), &v2).unwrap();
    let dom = s.dom_str();
    let domain = Superblock::decode(&v4[..RECORD_LEN])
        .unwrap()
        .unwrap()
        .domain;
    let domain = domain.to_string();
    let out = s.cli(&[
        "repair",
        "--device",
        &dom,
        "--hosts",
        "4",
        "--sector-size",
        "4096",
        "--domain",
        &domain,
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("version 2") && err.contains(&format!("spmbox upgrade --device {dom}")),
        "{err}"
    );
    assert!(fs::read(s.dom()).unwrap() == v2, "bytes changed");
}

#[test]
fn a_version_3_mailbox_is_upgraded_with_its_doorbell_and_the_new_fields_zero() {
    let s = Setup::new();
    let v4 = v4_mailbox(&s, "512");
    make_version(&s, &v4, 3);

    let dom = s.dom_str();
    let refused = s.cli(&["inspect", "--device", &dom]);
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    let err = text(&refused.stderr);
    assert!(
        err.contains(&format!("spmbox upgrade --device {dom}")) && err.contains("version 3"),
        "{err}"
    );

    let out = s.upgrade(false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("upgraded {dom} from format version 3 to 4"))
            && said.contains("8 records rewritten")
            && !said.contains("doorbell cleared"),
        "{said}"
    );
    // Byte for byte the version-4 mailbox, doorbell included.
    assert!(
        fs::read(s.dom()).unwrap() == v4,
        "the upgraded bytes differ from the v4 ones"
    );
    let (code, v) = s.inspect_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["spm_header"]["record"]["release_commit"], 0, "{v}");
    assert_eq!(
        v["hosts"][0]["inbox"]["header"]["record"]["release_ack"], 0,
        "{v}"
    );
    assert_eq!(v["doorbell"]["record"]["sequence"], 9, "{v}");

    let again = s.upgrade(true);
    let v: Value = serde_json::from_slice(&again.stdout).expect("upgrade --json");
    assert_eq!(v["from_version"], 4, "{v}");
    assert_eq!(v["changed"], false, "{v}");
}
