//! The raw record layouts: fixed, little-endian, unaligned, no padding.
//!
//! Every record is [`RECORD_LEN`] bytes and starts with the same 32-byte
//! [`Prefix`]. The layouts are `zerocopy` views; their sizes and field
//! offsets are asserted at compile time at the bottom of this file, so a
//! layout cannot drift from `docs/format.md` without the build failing.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::RECORD_LEN;

/// The 32 bytes every record starts with.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct Prefix {
    /// CRC32C of bytes 4..128 of the record.
    pub crc: U32,
    /// [`super::MAGIC`].
    pub magic: [u8; 4],
    pub kind: u8,
    pub version: u8,
    /// Host the record belongs to; 0 for domain-wide records.
    pub host_id: U16,
    /// Record index within its 4 KiB block: 0 for headers, 1..=31 for slots.
    pub index: U16,
    pub reserved: [u8; 2],
    pub domain: [u8; 16],
}

/// Superblock payload (kind 1).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawSuperblock {
    pub prefix: Prefix,
    pub sector_size: U32,
    pub max_hosts: U16,
    pub slots_per_area: U16,
    pub area_size: U32,
    pub record_size: U32,
    pub inbox_offset: U64,
    pub outbox_offset: U64,
    pub mailbox_size: U64,
    pub reserved: [u8; 56],
}

/// SPM header payload (kind 2).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawSpmHeader {
    pub prefix: Prefix,
    pub epoch: U64,
    pub spm_id: U16,
    pub state: u8,
    pub reserved0: u8,
    pub heartbeat_interval_ms: U32,
    pub heartbeat: U64,
    pub owner: U64,
    pub pool_commit: U64,
    pub release_commit: U64,
    pub reserved: [u8; 48],
}

/// Doorbell payload (kind 3).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawDoorbell {
    pub prefix: Prefix,
    pub ringer: U16,
    pub rings: U16,
    pub reserved0: [u8; 4],
    pub generation: U64,
    pub sequence: U64,
    pub reserved: [u8; 72],
}

/// Inbox area header payload (kind 4).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawInboxHeader {
    pub prefix: Prefix,
    pub generation: U64,
    pub owner: U64,
    pub heartbeat: U64,
    pub heartbeat_interval_ms: U32,
    pub release_ack: U64,
    pub reserved: [u8; 60],
}

/// Extension request payload (kind 5).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawRequest {
    pub prefix: Prefix,
    pub generation: U64,
    pub sequence: U64,
    pub volume: [u8; 16],
    pub target_size: U64,
    pub current_size: U64,
    pub flags: U32,
    pub reserved: [u8; 44],
}

/// Outbox area header payload (kind 6).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawOutboxHeader {
    pub prefix: Prefix,
    pub epoch: U64,
    pub generation: U64,
    pub reserved: [u8; 80],
}

/// Reply payload (kind 7).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawReply {
    pub prefix: Prefix,
    pub generation: U64,
    pub sequence: U64,
    pub volume: [u8; 16],
    pub target_size: U64,
    pub size: U64,
    pub epoch: U64,
    pub status: u8,
    pub reason: u8,
    pub reserved0: [u8; 2],
    pub detail: U32,
    pub reserved: [u8; 32],
}

/// Hold record payload (kind 8).
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHold {
    pub prefix: Prefix,
    pub generation: U64,
    pub count: u8,
    pub reserved0: [u8; 7],
    pub volumes: [[u8; 16]; super::HOLD_VOLUMES],
    pub reserved: [u8; 16],
}

/// Byte ranges of every reserved field, by record kind, for the
/// "reserved bytes must be zero" check and for reporting the first
/// offending byte.
#[allow(clippy::single_range_in_vec_init)] // a list of ranges, one of them
pub(crate) mod reserved {
    use core::ops::Range;
    /// Reserved bytes of the common prefix.
    pub const PREFIX: Range<usize> = 14..16;
    /// Reserved ranges of each kind's payload.
    pub const SUPERBLOCK: &[Range<usize>] = &[72..128];
    /// SPM header.
    pub const SPM_HEADER: &[Range<usize>] = &[43..44, 80..128];
    /// Doorbell.
    pub const DOORBELL: &[Range<usize>] = &[36..40, 56..128];
    /// Inbox header.
    pub const INBOX_HEADER: &[Range<usize>] = &[68..128];
    /// Request.
    pub const REQUEST: &[Range<usize>] = &[84..128];
    /// Outbox header.
    pub const OUTBOX_HEADER: &[Range<usize>] = &[48..128];
    /// Reply.
    pub const REPLY: &[Range<usize>] = &[90..92, 96..128];
    /// Hold.
    pub const HOLD: &[Range<usize>] = &[41..48, 112..128];
}

// Compile-time checks: every layout is exactly one record, and every field
// sits where docs/format.md says it does.
macro_rules! assert_layout {
    ($ty:ty { $($field:ident $(. $sub:ident)* @ $off:expr),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == RECORD_LEN);
            assert!(core::mem::align_of::<$ty>() == 1);
            $( assert!(core::mem::offset_of!($ty, $field $(. $sub)*) == $off); )*
        };
    };
}

const _: () = assert!(core::mem::size_of::<Prefix>() == 32);
const _: () = {
    assert!(core::mem::offset_of!(Prefix, crc) == 0);
    assert!(core::mem::offset_of!(Prefix, magic) == 4);
    assert!(core::mem::offset_of!(Prefix, kind) == 8);
    assert!(core::mem::offset_of!(Prefix, version) == 9);
    assert!(core::mem::offset_of!(Prefix, host_id) == 10);
    assert!(core::mem::offset_of!(Prefix, index) == 12);
    assert!(core::mem::offset_of!(Prefix, reserved) == 14);
    assert!(core::mem::offset_of!(Prefix, domain) == 16);
};

assert_layout!(RawSuperblock {
    prefix @ 0, sector_size @ 32, max_hosts @ 36, slots_per_area @ 38,
    area_size @ 40, record_size @ 44, inbox_offset @ 48, outbox_offset @ 56,
    mailbox_size @ 64, reserved @ 72,
});
assert_layout!(RawSpmHeader {
    prefix @ 0, epoch @ 32, spm_id @ 40, state @ 42, reserved0 @ 43,
    heartbeat_interval_ms @ 44, heartbeat @ 48, owner @ 56, pool_commit @ 64,
    release_commit @ 72, reserved @ 80,
});
assert_layout!(RawDoorbell {
    prefix @ 0, ringer @ 32, rings @ 34, reserved0 @ 36, generation @ 40, sequence @ 48,
    reserved @ 56,
});
assert_layout!(RawInboxHeader {
    prefix @ 0, generation @ 32, owner @ 40, heartbeat @ 48,
    heartbeat_interval_ms @ 56, release_ack @ 60, reserved @ 68,
});
assert_layout!(RawRequest {
    prefix @ 0, generation @ 32, sequence @ 40, volume @ 48, target_size @ 64,
    current_size @ 72, flags @ 80, reserved @ 84,
});
assert_layout!(RawOutboxHeader { prefix @ 0, epoch @ 32, generation @ 40, reserved @ 48 });
assert_layout!(RawReply {
    prefix @ 0, generation @ 32, sequence @ 40, volume @ 48, target_size @ 64,
    size @ 72, epoch @ 80, status @ 88, reason @ 89, reserved0 @ 90,
    detail @ 92, reserved @ 96,
});
assert_layout!(RawHold {
    prefix @ 0, generation @ 32, count @ 40, reserved0 @ 41, volumes @ 48, reserved @ 112,
});

// The reserved ranges above agree with the layouts.
const _: () = {
    use core::mem::offset_of;
    assert!(reserved::SUPERBLOCK[0].start == offset_of!(RawSuperblock, reserved));
    assert!(reserved::SPM_HEADER[0].start == offset_of!(RawSpmHeader, reserved0));
    assert!(reserved::SPM_HEADER[1].start == offset_of!(RawSpmHeader, reserved));
    assert!(reserved::DOORBELL[0].start == offset_of!(RawDoorbell, reserved0));
    assert!(reserved::DOORBELL[1].start == offset_of!(RawDoorbell, reserved));
    assert!(reserved::INBOX_HEADER[0].start == offset_of!(RawInboxHeader, reserved));
    assert!(reserved::REQUEST[0].start == offset_of!(RawRequest, reserved));
    assert!(reserved::OUTBOX_HEADER[0].start == offset_of!(RawOutboxHeader, reserved));
    assert!(reserved::REPLY[0].start == offset_of!(RawReply, reserved0));
    assert!(reserved::REPLY[1].start == offset_of!(RawReply, reserved));
    assert!(reserved::HOLD[0].start == offset_of!(RawHold, reserved0));
    assert!(reserved::HOLD[1].start == offset_of!(RawHold, reserved));
};
