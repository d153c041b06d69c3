//! Structured records (built with `arbitrary`) through emit and decode.
//!
//! For a record value of any kind, with arbitrary field values, checks that:
//! - `emit` succeeds exactly when docs/format.md allows every field (an
//!   independent model), and then writes exactly the bytes the model's
//!   encoder writes; when it refuses, the field it names does break its
//!   rule, and the buffer (pre-filled with a pattern) is left untouched;
//! - `emit`, `to_bytes` and `Record::emit` agree;
//! - what `emit` wrote decodes (typed and `Record::decode`) to exactly the
//!   same value, and parses to it at its own location;
//! - flipping any one bit of the emitted record (the bit is chosen by the
//!   input) makes every decoder fail: `BadMagic` for a bit of the magic,
//!   `Checksum` otherwise (CRC32C detects every single-bit error).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::wire::{
    Defect, Doorbell, Epoch, Generation, Geometry, Hold, HostId, InboxHeader, OutboxHeader, Record,
    RejectReason, Reply, ReplyStatus, Request, SpmHeader, SpmState, Superblock, Uuid,
};
use spmbox_fuzz::{
    LEN, Typed, Verdict, assert_geometry_error, assert_verdict, crc32c, kind_outcome, le32,
    put_prefix, put16, put32, put64, seal, verdict, with_typed,
};

#[derive(Arbitrary, Debug)]
struct Input {
    spec: Spec,
    /// Which of the 1024 bits of the emitted record to flip.
    flip: u16,
    /// The pattern the output buffer is filled with before `emit`.
    fill: u8,
}

/// Mirrors the fields of each record type.
#[derive(Arbitrary, Debug)]
enum Spec {
    Superblock {
        domain: [u8; 16],
        max_hosts: Host,
        sector_size: Sector,
    },
    SpmHeader {
        domain: [u8; 16],
        epoch: u64,
        spm_id: Host,
        active: bool,
        heartbeat_interval_ms: u32,
        heartbeat: u64,
        owner: u64,
        pool_commit: u64,
        release_commit: u64,
    },
    Doorbell {
        domain: [u8; 16],
        ringer: Host,
        generation: u64,
        sequence: u64,
        rings: u16,
    },
    InboxHeader {
        domain: [u8; 16],
        host_id: Host,
        generation: u64,
        owner: u64,
        heartbeat: u64,
        heartbeat_interval_ms: u32,
        release_ack: u64,
    },
    Request {
        domain: [u8; 16],
        host_id: Host,
        slot: Slot,
        generation: u64,
        sequence: u64,
        volume: [u8; 16],
        target_size: Size,
        current_size: u64,
        paused: bool,
    },
    OutboxHeader {
        domain: [u8; 16],
        host_id: Host,
        epoch: u64,
        generation: u64,
    },
    Reply {
        domain: [u8; 16],
        host_id: Host,
        slot: Slot,
        generation: u64,
        sequence: u64,
        volume: [u8; 16],
        target_size: Size,
        size: Size,
        epoch: u64,
        status: Status,
    },
    Hold {
        domain: [u8; 16],
        host_id: Host,
        slot: Slot,
        generation: u64,
        count: u8,
        volumes: [[u8; 16]; 4],
    },
}

/// A host id: often one in 1..=2000, so that valid records are common.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Host {
    Valid(u16),
    Raw(u16),
}

impl Host {
    fn get(self) -> u16 {
        match self {
            Host::Valid(n) => n % 2000 + 1,
            Host::Raw(n) => n,
        }
    }
}

/// A slot number: often one in 1..=31.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Slot {
    Valid(u16),
    Raw(u16),
}

impl Slot {
    fn get(self) -> u16 {
        match self {
            Slot::Valid(n) => n % 31 + 1,
            Slot::Raw(n) => n,
        }
    }
}

/// A sector size: mostly a supported one.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sector {
    S512,
    S4096,
    Other(u32),
}

impl Sector {
    fn get(self) -> u32 {
        match self {
            Sector::S512 => 512,
            Sector::S4096 => 4096,
            Sector::Other(v) => v,
        }
    }
}

/// A byte size: often whole sectors, since the format wants those.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    Sectors(u32),
    Bytes(u64),
}

impl Size {
    fn get(self) -> u64 {
        match self {
            Size::Sectors(n) => u64::from(n) * 512,
            Size::Bytes(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Status {
    Extended,
    WaitingForSpace,
    Rejected(Reason),
    Failed(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reason {
    UnknownVolume,
    OverLimit,
    Malformed,
    SegmentsFull,
}

impl Status {
    fn get(self) -> ReplyStatus {
        match self {
            Status::Extended => ReplyStatus::Extended,
            Status::WaitingForSpace => ReplyStatus::WaitingForSpace,
            Status::Rejected(Reason::UnknownVolume) => {
                ReplyStatus::Rejected(RejectReason::UnknownVolume)
            }
            Status::Rejected(Reason::OverLimit) => ReplyStatus::Rejected(RejectReason::OverLimit),
            Status::Rejected(Reason::Malformed) => ReplyStatus::Rejected(RejectReason::Malformed),
            Status::Rejected(Reason::SegmentsFull) => {
                ReplyStatus::Rejected(RejectReason::SegmentsFull)
            }
            Status::Failed(code) => ReplyStatus::Failed { code },
        }
    }

    /// Status, reason and detail bytes (docs/format.md section 5.7).
    fn codes(self) -> (u8, u8, u32) {
        match self {
            Status::Extended => (1, 0, 0),
            Status::WaitingForSpace => (2, 0, 0),
            Status::Rejected(Reason::UnknownVolume) => (3, 1, 0),
            Status::Rejected(Reason::OverLimit) => (3, 2, 0),
            Status::Rejected(Reason::Malformed) => (3, 3, 0),
            Status::Rejected(Reason::SegmentsFull) => (3, 4, 0),
            Status::Failed(code) => (4, 0, code),
        }
    }
}

fuzz_target!(|input: Input| check(&input));

fn check(input: &Input) {
    let model = encode(&input.spec);
    let Some(record) = build(&input.spec) else {
        // Only a superblock of an unsupported geometry cannot be built; the
        // model refuses its bytes for the same field.
        let Spec::Superblock {
            max_hosts,
            sector_size,
            ..
        } = input.spec
        else {
            unreachable!()
        };
        let (max_hosts, sector_size) = (max_hosts.get(), sector_size.get());
        let err = Geometry::new(max_hosts, sector_size).unwrap_err();
        assert_geometry_error(err, max_hosts, sector_size);
        match verdict(&model, None, None) {
            Verdict::InvalidField(fields) => assert!(fields.contains(&err.field())),
            other => panic!("geometry {err:?} refused, but docs/format.md says {other:?}"),
        }
        return;
    };
    with_typed!(record, |v| roundtrip(v, &model, input));
}

fn roundtrip<T: Typed>(value: T, model: &[u8; LEN], input: &Input) {
    let name = T::KIND.name();
    let want = verdict(model, None, None);
    let mut buf = [input.fill; LEN];
    let emitted = value.emit(&mut buf);
    assert_eq!(
        value.to_bytes().map(|_| ()),
        emitted,
        "{name}: to_bytes and emit"
    );
    let mut via_record = [input.fill; LEN];
    assert_eq!(value.wrap().emit(&mut via_record), emitted);
    assert_eq!(
        via_record, buf,
        "{name}: Record::emit and emit wrote differently"
    );

    let Ok(()) = emitted else {
        let field = emitted.unwrap_err();
        assert_eq!(
            buf, [input.fill; LEN],
            "{name}: refused emit touched the buffer"
        );
        match want {
            Verdict::InvalidField(fields) => assert!(
                fields.contains(&field),
                "{name}: emit refused {field:?}, but the bad fields are {fields:?}"
            ),
            other => panic!("{name}: emit refused {field:?}, docs/format.md says {other:?}"),
        }
        return;
    };
    assert_eq!(
        want,
        Verdict::Valid(T::KIND),
        "{name}: emit wrote what docs/format.md refuses"
    );
    assert_eq!(
        &buf, model,
        "{name}: emit wrote other bytes than docs/format.md says"
    );
    assert_eq!(value.to_bytes(), Ok(buf));

    assert_eq!(
        T::decode(&buf),
        Ok(Some(value)),
        "{name}: decode(emit(v)) != v"
    );
    assert_eq!(Record::decode(&buf), Ok(Some(value.wrap())));
    let at = value.location();
    assert_eq!(
        T::parse(&buf, &at),
        Ok(Some(value)),
        "{name}: parse at own place"
    );
    assert_eq!(Record::parse(&buf, &at), Ok(Some(value.wrap())));

    // One bit flipped.
    let bit = usize::from(input.flip) % (LEN * 8);
    let mut flipped = buf;
    flipped[bit / 8] ^= 1 << (bit % 8);
    let expected = if (4..8).contains(&(bit / 8)) {
        Defect::BadMagic
    } else {
        let (stored, computed) = (le32(&flipped, 0), crc32c(&flipped[4..]));
        assert_ne!(stored, computed, "CRC32C missed a single-bit error");
        Defect::Checksum { stored, computed }
    };
    assert_eq!(
        T::decode(&flipped),
        Err(expected),
        "{name}: bit {bit} flipped"
    );
    assert_eq!(Record::decode(&flipped), Err(expected), "bit {bit} flipped");
    assert_eq!(
        T::parse(&flipped, &at),
        Err(expected),
        "{name}: bit {bit} flipped"
    );
    assert_verdict(
        name,
        kind_outcome(&T::decode(&flipped), |_| T::KIND),
        &verdict(&flipped, Some(T::KIND), None),
    );
}

/// The core value the spec describes; `None` for an unsupported geometry.
fn build(spec: &Spec) -> Option<Record> {
    Some(match *spec {
        Spec::Superblock {
            domain,
            max_hosts,
            sector_size,
        } => Record::Superblock(Superblock {
            domain: Uuid(domain),
            geometry: Geometry::new(max_hosts.get(), sector_size.get()).ok()?,
        }),
        Spec::SpmHeader {
            domain,
            epoch,
            spm_id,
            active,
            heartbeat_interval_ms,
            heartbeat,
            owner,
            pool_commit,
            release_commit,
        } => Record::SpmHeader(SpmHeader {
            domain: Uuid(domain),
            epoch: Epoch::new(epoch),
            spm_id: HostId::new(spm_id.get()),
            state: if active {
                SpmState::Active
            } else {
                SpmState::Vacant
            },
            heartbeat_interval_ms,
            heartbeat,
            owner,
            pool_commit,
            release_commit,
        }),
        Spec::Doorbell {
            domain,
            ringer,
            generation,
            sequence,
            rings,
        } => Record::Doorbell(Doorbell {
            domain: Uuid(domain),
            ringer: HostId::new(ringer.get()),
            generation: Generation::new(generation),
            sequence,
            rings,
        }),
        Spec::InboxHeader {
            domain,
            host_id,
            generation,
            owner,
            heartbeat,
            heartbeat_interval_ms,
            release_ack,
        } => Record::InboxHeader(InboxHeader {
            domain: Uuid(domain),
            host_id: HostId::new(host_id.get()),
            generation: Generation::new(generation),
            owner,
            heartbeat,
            heartbeat_interval_ms,
            release_ack,
        }),
        Spec::Request {
            domain,
            host_id,
            slot,
            generation,
            sequence,
            volume,
            target_size,
            current_size,
            paused,
        } => Record::Request(Request {
            domain: Uuid(domain),
            host_id: HostId::new(host_id.get()),
            slot: spmbox_core::wire::Slot::new(slot.get()),
            generation: Generation::new(generation),
            sequence,
            volume: Uuid(volume),
            target_size: target_size.get(),
            current_size,
            paused,
        }),
        Spec::OutboxHeader {
            domain,
            host_id,
            epoch,
            generation,
        } => Record::OutboxHeader(OutboxHeader {
            domain: Uuid(domain),
            host_id: HostId::new(host_id.get()),
            epoch: Epoch::new(epoch),
            generation: Generation::new(generation),
        }),
        Spec::Reply {
            domain,
            host_id,
            slot,
            generation,
            sequence,
            volume,
            target_size,
            size,
            epoch,
            status,
        } => Record::Reply(Reply {
            domain: Uuid(domain),
            host_id: HostId::new(host_id.get()),
            slot: spmbox_core::wire::Slot::new(slot.get()),
            generation: Generation::new(generation),
            sequence,
            volume: Uuid(volume),
            target_size: target_size.get(),
            size: size.get(),
            epoch: Epoch::new(epoch),
            status: status.get(),
        }),
        Spec::Hold {
            domain,
            host_id,
            slot,
            generation,
            count,
            volumes,
        } => Record::Hold(Hold {
            domain: Uuid(domain),
            host_id: HostId::new(host_id.get()),
            slot: spmbox_core::wire::Slot::new(slot.get()),
            generation: Generation::new(generation),
            count,
            volumes: volumes.map(Uuid),
        }),
    })
}

/// The bytes docs/format.md section 5 gives the spec, written without the
/// core (and whether or not the values are allowed).
fn encode(spec: &Spec) -> [u8; LEN] {
    let mut r = [0u8; LEN];
    match *spec {
        Spec::Superblock {
            domain,
            max_hosts,
            sector_size,
        } => {
            let hosts = u64::from(max_hosts.get());
            put_prefix(&mut r, 1, 0, 0, domain);
            put32(&mut r, 32, sector_size.get());
            put16(&mut r, 36, max_hosts.get());
            put16(&mut r, 38, 31);
            put32(&mut r, 40, 4096);
            put32(&mut r, 44, 128);
            put64(&mut r, 48, 65536);
            put64(&mut r, 56, 65536 + hosts * 4096);
            put64(&mut r, 64, 65536 + 2 * hosts * 4096);
        }
        Spec::SpmHeader {
            domain,
            epoch,
            spm_id,
            active,
            heartbeat_interval_ms,
            heartbeat,
            owner,
            pool_commit,
            release_commit,
        } => {
            put_prefix(&mut r, 2, 0, 0, domain);
            put64(&mut r, 32, epoch);
            put16(&mut r, 40, spm_id.get());
            r[42] = u8::from(active);
            put32(&mut r, 44, heartbeat_interval_ms);
            put64(&mut r, 48, heartbeat);
            put64(&mut r, 56, owner);
            put64(&mut r, 64, pool_commit);
            put64(&mut r, 72, release_commit);
        }
        Spec::Doorbell {
            domain,
            ringer,
            generation,
            sequence,
            rings,
        } => {
            put_prefix(&mut r, 3, 0, 0, domain);
            put16(&mut r, 32, ringer.get());
            put16(&mut r, 34, rings);
            put64(&mut r, 40, generation);
            put64(&mut r, 48, sequence);
        }
        Spec::InboxHeader {
            domain,
            host_id,
            generation,
            owner,
            heartbeat,
            heartbeat_interval_ms,
            release_ack,
        } => {
            put_prefix(&mut r, 4, host_id.get(), 0, domain);
            put64(&mut r, 32, generation);
            put64(&mut r, 40, owner);
            put64(&mut r, 48, heartbeat);
            put32(&mut r, 56, heartbeat_interval_ms);
            put64(&mut r, 60, release_ack);
        }
        Spec::Request {
            domain,
            host_id,
            slot,
            generation,
            sequence,
            volume,
            target_size,
            current_size,
            paused,
        } => {
            put_prefix(&mut r, 5, host_id.get(), slot.get(), domain);
            put64(&mut r, 32, generation);
            put64(&mut r, 40, sequence);
            r[48..64].copy_from_slice(&volume);
            put64(&mut r, 64, target_size.get());
            put64(&mut r, 72, current_size);
            put32(&mut r, 80, u32::from(paused));
        }
        Spec::OutboxHeader {
            domain,
            host_id,
            epoch,
            generation,
        } => {
            put_prefix(&mut r, 6, host_id.get(), 0, domain);
            put64(&mut r, 32, epoch);
            put64(&mut r, 40, generation);
        }
        Spec::Reply {
            domain,
            host_id,
            slot,
            generation,
            sequence,
            volume,
            target_size,
            size,
            epoch,
            status,
        } => {
            let (status, reason, detail) = status.codes();
            put_prefix(&mut r, 7, host_id.get(), slot.get(), domain);
            put64(&mut r, 32, generation);
            put64(&mut r, 40, sequence);
            r[48..64].copy_from_slice(&volume);
            put64(&mut r, 64, target_size.get());
            put64(&mut r, 72, size.get());
            put64(&mut r, 80, epoch);
            r[88] = status;
            r[89] = reason;
            put32(&mut r, 92, detail);
        }
        Spec::Hold {
            domain,
            host_id,
            slot,
            generation,
            count,
            volumes,
        } => {
            put_prefix(&mut r, 8, host_id.get(), slot.get(), domain);
            put64(&mut r, 32, generation);
            r[40] = count;
            for (i, v) in volumes.iter().enumerate() {
                r[48 + 16 * i..64 + 16 * i].copy_from_slice(v);
            }
        }
    }
    seal(&mut r);
    r
}
