//! A host and an SPM, each in its driver, on one in-memory disk whose
//! starting bytes and whose faults (failed reads and writes, torn, lost,
//! misdirected and bit-flipped writes) come from the input.
//!
//! Checks that neither driver nor engine panics, whatever the disk holds
//! and whatever the disk does, and that the host is never told a size the
//! SPM's backend did not reach and commit: every `Refresh` names a size at
//! most the largest size the backend committed for the volume.
#![no_main]

use std::cell::RefCell;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::driver::{HostDriver, SpmDriver};
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::spm::{JobResult, Spm, SpmConfig};
use spmbox_core::testing::{Faults, MemDisk, Shared, WriteFault};
use spmbox_core::time::Instant;
use spmbox_core::wire::{Geometry, HostId, Uuid};

const DOMAIN: Uuid = Uuid([0xd0; 16]);
const VOLUME: Uuid = Uuid([7; 16]);
const GIB: u64 = 1 << 30;
const HOSTS: u16 = 4;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fault {
    None,
    FailRead,
    FailWrite,
    Torn(u8),
    Lost,
    Misdirected(u16),
    BitFlip(u16, u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bytes written over the mailbox at start, at (offset, byte).
    damage: Vec<(u16, u8)>,
    /// One fault decision per I/O, in order; none once they run out.
    faults: Vec<Fault>,
    /// Milliseconds between steps.
    gaps: Vec<u8>,
    /// Whether the SPM keeps a mirror of the outbox areas.
    mirror: bool,
}

struct Plan {
    faults: Vec<Fault>,
    next: usize,
    sectors: u64,
}

impl Plan {
    fn take(&mut self) -> Fault {
        let f = self.faults.get(self.next).copied().unwrap_or(Fault::None);
        self.next += 1;
        f
    }
}

impl Faults for Plan {
    fn write(&mut self, _offset: u64, _len: usize) -> WriteFault {
        match self.take() {
            Fault::FailWrite => WriteFault::Fail,
            Fault::Torn(n) => WriteFault::Torn {
                sectors: usize::from(n % 9),
            },
            Fault::Lost => WriteFault::Lost,
            Fault::Misdirected(s) => WriteFault::Misdirected {
                offset: u64::from(s) % self.sectors * 512,
            },
            Fault::BitFlip(byte, bit) => WriteFault::BitFlip {
                byte: usize::from(byte),
                bit,
            },
            Fault::None | Fault::FailRead => WriteFault::None,
        }
    }
    fn read_fails(&mut self, _offset: u64, _len: usize) -> bool {
        matches!(self.take(), Fault::FailRead)
    }
}

type Disk = MemDisk<Vec<u8>, Plan>;

fuzz_target!(|input: Input| {
    let g = Geometry::new(HOSTS, 512).unwrap();
    let len = g.mailbox_size() as usize;
    let mut bytes = vec![0u8; len];
    for &(at, b) in input.damage.iter().take(64) {
        bytes[usize::from(at) % len] = b;
    }
    let plan = Plan {
        faults: input.faults.clone(),
        next: 0,
        sectors: len as u64 / 512,
    };
    let disk = RefCell::new(MemDisk::new(bytes, 512, plan));

    let mut host: Host<2> = Host::new(DOMAIN, HostId::new(2), g, HostConfig::default()).unwrap();
    host.add_volume(VOLUME, 100 * GIB, 110 * GIB, GIB, 0)
        .unwrap();
    let hb = vec![0u8; HostDriver::<Shared<'_, Disk>, Vec<u8>, 2>::BUFFER_LEN];
    let mut host = HostDriver::new(Shared(&disk), host, hb).unwrap();
    let mut now = Instant::ZERO;
    let mut started = false;
    for _ in 0..8 {
        if let Ok(r) = host.start(now, 9) {
            started = r.is_ok();
            break;
        }
    }
    if !started {
        return;
    }
    let spm: Spm<16> =
        Spm::new(now, DOMAIN, g, HostId::NONE, 1, None, SpmConfig::default()).unwrap();
    let sb = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 16>::buffer_len(&g, 2, input.mirror)];
    let mut spm = SpmDriver::new(Shared(&disk), spm, sb, 2, input.mirror).unwrap();

    // The backend: sizes it reached, and the largest it committed.
    let mut size = GIB;
    let mut committed = GIB;
    let mut physical = GIB;
    let mut gaps = input.gaps.iter().cycle();
    for step in 0..400u32 {
        if step == 0 || step % 100 == 50 {
            host.engine_mut()
                .handle_allocation(now, VOLUME, physical.saturating_sub(1 << 20));
        }
        let _ = host.step(now);
        while let Some(e) = host.engine_mut().poll_event() {
            if let HostEvent::Refresh { volume, size: to } = e {
                assert!(
                    to <= committed,
                    "the host was told {to}, but the backend committed only {committed}"
                );
                physical = physical.max(to);
                host.engine_mut().handle_refreshed(now, volume, to);
            }
        }
        let _ = spm.read(now);
        while let Some(job) = spm.engine_mut().poll_job() {
            size = size.max(job.target_size);
            spm.engine_mut()
                .handle_job_result(now, job.volume, JobResult::Extended { size });
        }
        if let Ok(Some(_)) = spm.poll_commit(now) {
            committed = size;
            spm.engine_mut().handle_committed(now, u64::from(step));
        }
        let _ = spm.write();
        while spm.engine_mut().poll_event().is_some() {}
        let gap = gaps.next().copied().unwrap_or(5);
        now = now + Duration::from_millis(u64::from(gap % 50) + 1);
    }
    let _ = spm.stop(now);
    let _ = host.release();
});
