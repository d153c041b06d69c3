#!/usr/bin/env python3
"""Builds the spmbox format test vectors (the version in VERSION) from docs/format.md alone.

This is a second implementation of the on-disk format, independent of the
Rust code in core/src/wire/: it encodes every record from the tables of
docs/format.md (sections 2, 4 and 5), decodes it again with the reading
procedure of section 6 (and 6.1 for areas), checks that the outcome is the
one each vector was built to show, and writes

    tests/vectors/*.bin          one file per record or host area
    tests/vectors/manifest.json  what a reader must make of each file

Usage: python3 tests/vectors/generate.py [--out DIR]

Without --out the files are written next to this script (replacing the
committed vectors; *.bin files that are no longer generated are removed).
The output is deterministic: running it twice gives identical bytes.

The manifest renders records and defect details the way `spmbox::json`
does (see tests/vectors/README.md); docs/format.md names the fields and
verdicts, spmbox::json fixes their JSON spelling.

Python 3 standard library only.
"""

import argparse
import json
import os
import struct
import sys

# --------------------------------------------------------------------------
# Section 2: conventions.

RECORD_LEN = 128
BLOCK = 4096
SLOTS = 31  # records 1..31 of a host area
MAGIC = b"SPMB"
VERSION = 4
INBOX_OFFSET = 0x10000
MAX_HOSTS = 2000


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32/ISCSI: reflected poly 0x82F63B78, init and xorout 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283, "CRC32C check value"


def uuid_bytes(text):
    """UUID text -> 16 bytes in the order of the text form (section 2)."""
    parts = text.split("-")
    assert [len(p) for p in parts] == [8, 4, 4, 4, 12], text
    raw = bytes.fromhex("".join(parts))
    assert len(raw) == 16
    return raw


def uuid_text(raw):
    h = raw.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


NIL = "00000000-0000-0000-0000-000000000000"

# --------------------------------------------------------------------------
# Sections 4 and 5: layouts. (offset, size, field); every other byte of the
# record is reserved. Sizes map to little-endian struct codes.

PREFIX_FIELDS = [
    (0, 4, "crc"),
    (4, 4, "magic"),
    (8, 1, "kind"),
    (9, 1, "version"),
    (10, 2, "host_id"),
    (12, 2, "index"),
    (16, 16, "domain"),
]

KINDS = {
    1: "superblock",
    2: "spm_header",
    3: "doorbell",
    4: "inbox_header",
    5: "request",
    6: "outbox_header",
    7: "reply",
    8: "hold",
}
KIND_CODE = {name: code for code, name in KINDS.items()}

LAYOUT = {
    "superblock": [
        (32, 4, "sector_size"),
        (36, 2, "max_hosts"),
        (38, 2, "slots_per_area"),
        (40, 4, "area_size"),
        (44, 4, "record_size"),
        (48, 8, "inbox_offset"),
        (56, 8, "outbox_offset"),
        (64, 8, "mailbox_size"),
    ],
    "spm_header": [
        (32, 8, "epoch"),
        (40, 2, "spm_id"),
        (42, 1, "state"),
        (44, 4, "heartbeat_interval_ms"),
        (48, 8, "heartbeat"),
        (56, 8, "owner"),
        (64, 8, "pool_commit"),
        (72, 8, "release_commit"),
    ],
    "doorbell": [
        (32, 2, "ringer"),
        (34, 2, "rings"),
        (40, 8, "generation"),
        (48, 8, "sequence"),
    ],
    "inbox_header": [
        (32, 8, "generation"),
        (40, 8, "owner"),
        (48, 8, "heartbeat"),
        (56, 4, "heartbeat_interval_ms"),
        (60, 8, "release_ack"),
    ],
    "request": [
        (32, 8, "generation"),
        (40, 8, "sequence"),
        (48, 16, "volume"),
        (64, 8, "target_size"),
        (72, 8, "current_size"),
        (80, 4, "flags"),
    ],
    "outbox_header": [(32, 8, "epoch"), (40, 8, "generation")],
    "reply": [
        (32, 8, "generation"),
        (40, 8, "sequence"),
        (48, 16, "volume"),
        (64, 8, "target_size"),
        (72, 8, "size"),
        (80, 8, "epoch"),
        (88, 1, "status"),
        (89, 1, "reason"),
        (92, 4, "detail"),
    ],
    "hold": [
        (32, 8, "generation"),
        (40, 1, "count"),
        (48, 64, "volumes"),
    ],
}
HOLD_VOLUMES = 4

# The reserved rows as section 5 lists them, to check the layouts above.
SPEC_RESERVED = {
    "superblock": [(72, 128)],
    "spm_header": [(43, 44), (80, 128)],
    "doorbell": [(36, 40), (56, 128)],
    "inbox_header": [(68, 128)],
    "request": [(84, 128)],
    "outbox_header": [(48, 128)],
    "reply": [(90, 92), (96, 128)],
    "hold": [(41, 48), (112, 128)],
}

CODE = {1: "B", 2: "H", 4: "I", 8: "Q", 16: "16s", 64: "64s"}


def reserved_offsets(kind):
    """Every reserved byte of a kind: prefix 14..16 and the payload gaps."""
    used = set()
    for off, size, _ in PREFIX_FIELDS + LAYOUT[kind]:
        for b in range(off, off + size):
            assert b not in used, (kind, b)
            used.add(b)
    return [b for b in range(RECORD_LEN) if b not in used]


def _ranges(offsets):
    out = []
    for b in offsets:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


for _kind in LAYOUT:
    assert _ranges(reserved_offsets(_kind)) == [(14, 16)] + SPEC_RESERVED[_kind], _kind


def get(data, off, size):
    return struct.unpack_from("<" + CODE[size], data, off)[0]


def put(buf, off, size, value):
    struct.pack_into("<" + CODE[size], buf, off, value)


def seal(buf):
    """Stores the CRC32C of bytes 4..128 in bytes 0..4."""
    buf = bytearray(buf)
    put(buf, 0, 4, crc32c(bytes(buf[4:RECORD_LEN])))
    return bytes(buf)


def encode(kind, domain, host_id, index, fields, magic=MAGIC, version=VERSION, code=None):
    """A sealed record of `kind`; fields not given are 0."""
    buf = bytearray(RECORD_LEN)
    put(buf, 4, 4, int.from_bytes(magic, "little"))
    put(buf, 8, 1, KIND_CODE[kind] if code is None else code)
    put(buf, 9, 1, version)
    put(buf, 10, 2, host_id)
    put(buf, 12, 2, index)
    put(buf, 16, 16, uuid_bytes(domain))
    layout = {name: (off, size) for off, size, name in LAYOUT[kind]}
    for name, value in fields.items():
        off, size = layout[name]
        if size == 16:
            value = uuid_bytes(value)
        if size == 64:  # the hold record's four UUIDs, nil after the list
            value = b"".join(uuid_bytes(v) for v in value).ljust(64, b"\0")
        put(buf, off, size, value)
    return seal(buf)


def patched(data, off, size, value, reseal=True):
    """`data` with one value changed, resealed unless told otherwise."""
    buf = bytearray(data)
    put(buf, off, size, value)
    return seal(buf) if reseal else bytes(buf)


# --------------------------------------------------------------------------
# Section 6: reading a record, and the JSON spmbox::json renders.

STATUS = {1: "extended", 2: "waiting_for_space", 3: "rejected", 4: "failed"}
REASON = {1: "unknown_volume", 2: "over_limit", 3: "malformed", 4: "segments_full"}
SPM_STATE = {0: "vacant", 1: "active"}


class Ambiguous(Exception):
    """A vector that the spec does not give exactly one verdict for."""


def field_rules(kind, f):
    """Section 5: the names of every field that breaks its rules."""
    bad = []

    def rule(ok, name):
        if not ok:
            bad.append(name)

    hosts = range(1, MAX_HOSTS + 1)
    rule(f["domain"] != bytes(16), "domain")  # section 4: never nil
    if kind in ("superblock", "spm_header", "doorbell"):
        rule(f["host_id"] == 0, "host_id")
        rule(f["index"] == 0, "index")
    elif kind in ("inbox_header", "outbox_header"):
        rule(f["host_id"] in hosts, "host_id")
        rule(f["index"] == 0, "index")
    else:
        rule(f["host_id"] in hosts, "host_id")
        rule(f["index"] in range(1, SLOTS + 1), "index")

    def size_rule(name):
        rule(f[name] != 0 and f[name] % 512 == 0, name)

    if kind == "superblock":
        n = f["max_hosts"]
        rule(f["sector_size"] in (512, 4096), "sector_size")
        rule(n in hosts, "max_hosts")
        rule(f["slots_per_area"] == 31, "slots_per_area")
        rule(f["area_size"] == 4096, "area_size")
        rule(f["record_size"] == 128, "record_size")
        rule(f["inbox_offset"] == 65536, "inbox_offset")
        outbox = 65536 + n * 4096
        rule(f["outbox_offset"] == outbox, "outbox_offset")
        # "outbox_offset + max_hosts x 4096": the formula's outbox_offset
        # (see the README's note on this sentence).
        rule(f["mailbox_size"] == outbox + n * 4096, "mailbox_size")
    elif kind == "spm_header":
        rule(f["spm_id"] <= MAX_HOSTS, "spm_id")
        rule(f["state"] in (0, 1), "state")
        if f["state"] == 1:
            rule(f["epoch"] >= 1, "epoch")
            rule(f["heartbeat_interval_ms"] >= 1, "heartbeat_interval_ms")
            rule(f["owner"] != 0, "owner")
    elif kind == "doorbell":
        rule(f["ringer"] in hosts, "ringer")
        rule(f["generation"] >= 1, "generation")
        rule(f["sequence"] >= 1, "sequence")
        rule(f["rings"] >= 1, "rings")
    elif kind == "inbox_header":
        rule(f["generation"] >= 1, "generation")
        if f["heartbeat_interval_ms"] != 0:
            rule(f["owner"] != 0, "owner")
    elif kind == "request":
        rule(f["generation"] >= 1, "generation")
        rule(f["sequence"] >= 1, "sequence")
        rule(f["volume"] != bytes(16), "volume")
        size_rule("target_size")
        rule(f["flags"] & ~1 == 0, "flags")
    elif kind == "outbox_header":
        rule(f["epoch"] >= 1, "epoch")
        rule(f["generation"] >= 1, "generation")
    elif kind == "reply":
        status = f["status"]
        rule(f["generation"] >= 1, "generation")
        rule(f["sequence"] >= 1, "sequence")
        rule(f["volume"] != bytes(16), "volume")
        size_rule("target_size")
        rule(f["epoch"] >= 1, "epoch")
        rule(status in STATUS, "status")
        if status == 3:
            rule(f["reason"] in REASON, "reason")
        else:
            rule(f["reason"] == 0, "reason")
        if status != 4:
            rule(f["detail"] == 0, "detail")
        if status == 1:
            rule(f["size"] >= f["target_size"], "size")
    elif kind == "hold":
        count = f["count"]
        rule(f["generation"] >= 1, "generation")
        rule(1 <= count <= HOLD_VOLUMES, "count")
        vols = [f["volumes"][16 * i:16 * (i + 1)] for i in range(HOLD_VOLUMES)]
        listed = vols[:count]
        rule(
            all(v != bytes(16) for v in listed)
            and len(set(listed)) == len(listed)
            and all(v == bytes(16) for v in vols[count:]),
            "volumes",
        )
    return bad


def render(kind, f):
    """The record as spmbox::json::record renders it."""
    out = {"kind": kind, "domain": uuid_text(f["domain"])}
    if kind in ("inbox_header", "request", "outbox_header", "reply", "hold"):
        out["host_id"] = f["host_id"]
    if kind in ("request", "reply", "hold"):
        out["slot"] = f["index"]
    for _, _, name in LAYOUT[kind]:
        value = f[name]
        if name == "volumes":
            value = [uuid_text(value[16 * i:16 * (i + 1)]) for i in range(f["count"])]
        elif isinstance(value, bytes):
            value = uuid_text(value)
        out[name] = value
    if kind == "spm_header":
        out["state"] = SPM_STATE[f["state"]]
    if kind == "request":
        del out["flags"]
        out["paused"] = bool(f["flags"] & 1)
    if kind == "reply":
        out["status"] = STATUS[f["status"]]
        out["reason"] = REASON.get(f["reason"]) if f["status"] == 3 else None
    return out


def read(data, kind, place=None):
    """Section 6, steps 1..11, reading `data` where `kind` belongs.

    place: (domain text, host_id, index), or None to skip steps 8 and 9.
    Returns (verdict, details): ("empty", None), ("valid", record JSON) or
    (defect name, defect details as spmbox::json renders them).
    """
    if len(data) != RECORD_LEN:  # 1
        return "length", {"len": len(data)}
    if data == bytes(RECORD_LEN):  # 2
        return "empty", None
    if data[4:8] != MAGIC:  # 3
        return "bad_magic", {}
    stored, computed = get(data, 0, 4), crc32c(data[4:])
    if stored != computed:  # 4
        return "checksum", {"stored": f"0x{stored:08x}", "computed": f"0x{computed:08x}"}
    if data[9] != VERSION:  # 5
        return "unsupported_version", {"version": data[9]}
    if data[8] not in KINDS:  # 6
        return "unknown_kind", {"code": data[8]}
    found = KINDS[data[8]]
    if found != kind:  # 7
        return "wrong_kind", {"expected": kind, "found": found}
    f = {name: get(data, off, size) for off, size, name in PREFIX_FIELDS + LAYOUT[kind]}
    if place is not None:
        domain, host_id, index = place
        if f["domain"] != uuid_bytes(domain):  # 8
            return "foreign", {"domain": uuid_text(f["domain"])}
        if (f["host_id"], f["index"]) != (host_id, index):  # 9
            return "misdirected", {"host_id": f["host_id"], "index": f["index"]}
    nonzero = [b for b in reserved_offsets(kind) if data[b] != 0]
    if nonzero:  # 10
        if len(nonzero) > 1:
            raise Ambiguous(f"several nonzero reserved bytes: {nonzero}")
        return "reserved_not_zero", {"offset": nonzero[0]}
    bad = field_rules(kind, f)
    if bad:  # 11
        if len(bad) > 1:
            raise Ambiguous(f"several fields break their rules: {bad}")
        return "invalid_field", {"field": bad[0]}
    return "valid", render(kind, f)


# --------------------------------------------------------------------------
# Record builders. Each returns (bytes, the JSON a valid record renders as).

DOMAIN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
OTHER_DOMAIN = "c0ffee00-1234-4abc-8def-00000000d0d0"
VOLUME = "a8098c1a-f86e-41d1-80ed-12b4c0d1e2f3"
VOLUME2 = "e7f1d2c3-b4a5-4968-8776-655443322110"
VOLUME3 = "5b1c0de2-7a3f-4e8d-9c21-0a1b2c3d4e5f"
VOLUME4 = "9f8e7d6c-5b4a-4392-8170-fedcba987654"
NIL_FREE = "0d15ea5e-0000-4000-8000-00000000cafe"
GIB = 1 << 30
MIB = 1 << 20
HOST = 7


def superblock(sector_size, max_hosts, domain=DOMAIN, host_id=0, **over):
    outbox = INBOX_OFFSET + max_hosts * BLOCK
    f = {
        "sector_size": sector_size,
        "max_hosts": max_hosts,
        "slots_per_area": SLOTS,
        "area_size": BLOCK,
        "record_size": RECORD_LEN,
        "inbox_offset": INBOX_OFFSET,
        "outbox_offset": outbox,
        "mailbox_size": outbox + max_hosts * BLOCK,
    }
    f.update(over)
    data = encode("superblock", domain, host_id, 0, f)
    return data, dict({"kind": "superblock", "domain": domain}, **f)


def spm_header(epoch, spm_id, state, interval, heartbeat, owner=0, pool_commit=0,
               release_commit=0, domain=DOMAIN):
    f = {
        "epoch": epoch,
        "spm_id": spm_id,
        "state": state,
        "heartbeat_interval_ms": interval,
        "heartbeat": heartbeat,
        "owner": owner,
        "pool_commit": pool_commit,
        "release_commit": release_commit,
    }
    data = encode("spm_header", domain, 0, 0, f)
    return data, dict(f, kind="spm_header", domain=domain, state=SPM_STATE.get(state))


def doorbell(ringer, generation, sequence, rings=1, domain=DOMAIN):
    f = {"ringer": ringer, "generation": generation, "sequence": sequence, "rings": rings}
    return encode("doorbell", domain, 0, 0, f), dict(f, kind="doorbell", domain=domain)


def inbox_header(generation, owner=0, heartbeat=0, interval=0, release_ack=0, host_id=HOST,
                 domain=DOMAIN):
    f = {
        "generation": generation,
        "owner": owner,
        "heartbeat": heartbeat,
        "heartbeat_interval_ms": interval,
        "release_ack": release_ack,
    }
    data = encode("inbox_header", domain, host_id, 0, f)
    json_ = {"kind": "inbox_header", "domain": domain, "host_id": host_id}
    return data, dict(json_, **f)


def outbox_header(epoch, generation, host_id=HOST, domain=DOMAIN):
    f = {"epoch": epoch, "generation": generation}
    data = encode("outbox_header", domain, host_id, 0, f)
    return data, dict(f, kind="outbox_header", domain=domain, host_id=host_id)


def request(
    slot=3,
    generation=2,
    sequence=9,
    volume=VOLUME,
    target_size=2 * GIB,
    current_size=1 * GIB,
    paused=False,
    flags=None,
    host_id=HOST,
    domain=DOMAIN,
):
    f = {
        "generation": generation,
        "sequence": sequence,
        "volume": volume,
        "target_size": target_size,
        "current_size": current_size,
        "flags": (1 if paused else 0) if flags is None else flags,
    }
    data = encode("request", domain, host_id, slot, f)
    json_ = dict(f, kind="request", domain=domain, host_id=host_id, slot=slot, paused=paused)
    del json_["flags"]
    return data, json_


def reply(
    status,
    reason=0,
    detail=0,
    size=2 * GIB + MIB,
    slot=3,
    generation=2,
    sequence=9,
    volume=VOLUME,
    target_size=2 * GIB,
    epoch=4,
    host_id=HOST,
    domain=DOMAIN,
):
    f = {
        "generation": generation,
        "sequence": sequence,
        "volume": volume,
        "target_size": target_size,
        "size": size,
        "epoch": epoch,
        "status": status,
        "reason": reason,
        "detail": detail,
    }
    data = encode("reply", domain, host_id, slot, f)
    json_ = dict(f, kind="reply", domain=domain, host_id=host_id, slot=slot)
    json_["status"] = STATUS.get(status)
    json_["reason"] = REASON.get(reason) if status == 3 else None
    return data, json_


def hold(volumes, count=None, slot=31, generation=2, host_id=HOST, domain=DOMAIN):
    """A hold record listing `volumes` (UUID texts, nil ones included as
    given), `count` of them (default: all)."""
    count = len(volumes) if count is None else count
    f = {"generation": generation, "count": count, "volumes": volumes}
    data = encode("hold", domain, host_id, slot, f)
    json_ = dict(f, kind="hold", domain=domain, host_id=host_id, slot=slot)
    json_["volumes"] = list(volumes[:count])
    return data, json_


def at(kind, host_id=0, index=0, domain=DOMAIN):
    return {"kind": kind, "domain": domain, "host_id": host_id, "index": index}


AT_REQUEST = at("request", HOST, 3)
AT_REPLY = at("reply", HOST, 3)
AT_HOLD = at("hold", HOST, 31)
AT_SUPERBLOCK = at("superblock")
AT_SPM_HEADER = at("spm_header")

# --------------------------------------------------------------------------
# The record vectors.

RECORDS = []


def vector(file, description, where, data, verdict, want=None, without_place=None):
    """Declares a record vector. `want`: the record JSON (valid) or the
    defect details (defects) it was built to show; `without_place`: the
    verdict expected when decoded without a place, if it differs."""
    RECORDS.append((file, description, where, data, verdict, want, without_place))


# Valid records, one of every kind, every reply status and reason.
_d, _j = superblock(512, 250)
vector(
    "superblock-512-250.bin",
    "Superblock of a 250-host mailbox made for 512-byte sectors (mailbox_size 2113536).",
    AT_SUPERBLOCK, _d, "valid", _j,
)
_d, _j = superblock(4096, 2000)
vector(
    "superblock-4096-2000.bin",
    "Superblock of the largest mailbox: 2000 hosts, 4096-byte sectors (mailbox_size 16449536).",
    AT_SUPERBLOCK, _d, "valid", _j,
)
_d, _j = spm_header(0, 0, 0, 0, 0)
vector(
    "spm-header-vacant.bin",
    "SPM header as spmbox format writes it: vacant, epoch 0, spm_id 0, no heartbeat.",
    AT_SPM_HEADER, _d, "valid", _j,
)
_d, _j = spm_header(3, 1, 1, 1000, 42, owner=0x0123456789ABCDEF, pool_commit=17,
                    release_commit=0x0102030405060708)
vector(
    "spm-header-active.bin",
    "Active SPM header: host 1 is SPM in epoch 3, heartbeat 42, every 1000 ms, owner "
    "0x0123456789abcdef, pool metadata commit 17, release commit 0x0102030405060708.",
    AT_SPM_HEADER, _d, "valid", _j,
)
_d, _j = spm_header(3, 1, 1, 1000, 42)
vector(
    "spm-header-active-owner-0.bin",
    "An active SPM header without an owner.",
    AT_SPM_HEADER, _d, "invalid_field", {"field": "owner"},
)
_d, _j = doorbell(HOST, 2, 9)
vector(
    "doorbell.bin",
    "Doorbell rung by host 7, generation 2, for its request with sequence 9 (its first ring).",
    at("doorbell"), _d, "valid", _j,
)
_d, _j = doorbell(HOST, 2, 9, rings=3)
vector(
    "doorbell-rung-again.bin",
    "Doorbell rung by host 7 for the third time since it wrote its request with sequence 9.",
    at("doorbell"), _d, "valid", _j,
)
_d, _j = inbox_header(2)
vector(
    "inbox-header.bin",
    "Inbox header of host 7, generation 2, no lease on the host id (heartbeat interval 0).",
    at("inbox_header", HOST, 0), _d, "valid", _j,
)
_d, _j = inbox_header(2, owner=0xFEEDFACECAFEBEEF, heartbeat=5, interval=1000,
                      release_ack=0x1112131415161718)
vector(
    "inbox-header-leased.bin",
    "Inbox header of host 7, generation 2, its host id held by owner 0xfeedfacecafebeef, "
    "heartbeat 5, every 1000 ms, release commit 0x1112131415161718 acknowledged.",
    at("inbox_header", HOST, 0), _d, "valid", _j,
)
_d, _j = inbox_header(2, heartbeat=5, interval=1000)
vector(
    "inbox-header-leased-owner-0.bin",
    "Inbox header with a heartbeat interval but no owner.",
    at("inbox_header", HOST, 0), _d, "invalid_field", {"field": "owner"},
)
VALID_REQUEST, _j = request()
vector(
    "request-valid.bin",
    "Request of host 7, slot 3, generation 2, sequence 9: extend the volume to 2 GiB (it is 1 GiB).",
    AT_REQUEST, VALID_REQUEST, "valid", _j,
)
_d, _j = request(slot=4, sequence=10, volume=VOLUME2, target_size=3 * GIB,
                 current_size=2 * GIB - 4096, paused=True)
vector(
    "request-paused.bin",
    "Request of host 7, slot 4, with the PAUSED flag: its guest is paused for lack of space.",
    at("request", HOST, 4), _d, "valid", _j,
)
_d, _j = outbox_header(4, 2)
vector(
    "outbox-header.bin",
    "Outbox header of host 7: SPM epoch 4 serves generation 2.",
    at("outbox_header", HOST, 0), _d, "valid", _j,
)
VALID_REPLY, _j = reply(1)
vector(
    "reply-extended.bin",
    "Reply in host 7's slot 3: extended to 2 GiB + 1 MiB, at least the 2 GiB target.",
    AT_REPLY, VALID_REPLY, "valid", _j,
)
_d, _j = reply(2, size=1 * GIB)
vector(
    "reply-waiting-for-space.bin",
    "Reply waiting_for_space: the pool is full, the request is parked (not final).",
    AT_REPLY, _d, "valid", _j,
)
for _code, _name, _size in [(1, "unknown-volume", 0), (2, "over-limit", 1 * GIB), (3, "malformed", 0),
                            (4, "segments-full", 1 * GIB)]:
    _d, _j = reply(3, reason=_code, size=_size)
    vector(
        f"reply-rejected-{_name}.bin",
        f"Reply rejected, reason {_code} ({REASON[_code]}).",
        AT_REPLY, _d, "valid", _j,
    )
_d, _j = reply(4, detail=28, size=1 * GIB)
vector(
    "reply-failed-enospc.bin",
    "Reply failed with the backend's error number 28 (ENOSPC).",
    AT_REPLY, _d, "valid", _j,
)
_d, _j = hold([VOLUME, VOLUME2])
vector(
    "hold-valid.bin",
    "Hold record of host 7 in slot 31, generation 2: it holds two volumes open.",
    AT_HOLD, _d, "valid", _j,
)
_d, _j = hold([VOLUME, VOLUME2, VOLUME3, VOLUME4], slot=30)
vector(
    "hold-four-volumes.bin",
    "Hold record of host 7 in slot 30 listing four volumes, as many as one record holds.",
    at("hold", HOST, 30), _d, "valid", _j,
)

# Empty.
vector("empty.bin", "128 zero bytes: an empty slot, not a defect.", AT_REQUEST,
       bytes(RECORD_LEN), "empty")

# Steps 1..7.
vector(
    "request-127-bytes.bin",
    "The first 127 bytes of a valid request: not a record at all.",
    AT_REQUEST, VALID_REQUEST[:127], "length", {"len": 127},
)
vector(
    "request-bad-magic.bin",
    "A valid request whose magic was overwritten with 'LVM2' (CRC not updated): bad magic is checked before the checksum.",
    AT_REQUEST, VALID_REQUEST[:4] + b"LVM2" + VALID_REQUEST[8:], "bad_magic", {},
)
_flip = bytearray(VALID_REQUEST)
_flip[41] ^= 0x04  # a bit of the sequence
vector(
    "request-checksum.bin",
    "A valid request with one bit of byte 41 (sequence) flipped.",
    AT_REQUEST, bytes(_flip), "checksum",
)
_other, _ = request(sequence=12, target_size=4 * GIB, current_size=2 * GIB)
vector(
    "request-torn.bin",
    "Torn write: bytes 0..64 of one valid request of host 7 slot 3 and bytes 64..128 of another for the same slot.",
    AT_REQUEST, VALID_REQUEST[:64] + _other[64:], "checksum",
)
vector(
    "request-version-3.bin",
    "A request with version 3 (the previous format) and a correct CRC.",
    AT_REQUEST, patched(VALID_REQUEST, 9, 1, 3), "unsupported_version", {"version": 3},
)
vector(
    "request-version-5.bin",
    "A request with version 5 and a correct CRC.",
    AT_REQUEST, patched(VALID_REQUEST, 9, 1, 5), "unsupported_version", {"version": 5},
)
vector(
    "request-version-5-kind-9.bin",
    "Version 5 and kind 9 with a correct CRC: the version is checked before the kind.",
    AT_REQUEST, patched(patched(VALID_REQUEST, 9, 1, 5), 8, 1, 9), "unsupported_version",
    {"version": 5},
)
vector(
    "request-kind-9.bin",
    "A record of kind 9 (no kind of this version) with a correct CRC.",
    AT_REQUEST, patched(VALID_REQUEST, 8, 1, 9), "unknown_kind", {"code": 9},
)
vector(
    "request-slot-holds-reply.bin",
    "A valid reply read where host 7's request for slot 3 belongs.",
    AT_REQUEST, VALID_REPLY, "wrong_kind", {"expected": "request", "found": "reply"},
)
vector(
    "request-slot-holds-hold.bin",
    "A valid hold record read as a request (a reader that scans for requests skips it: section 6.1).",
    AT_REQUEST, patched(hold([VOLUME])[0], 12, 2, 3), "wrong_kind",
    {"expected": "request", "found": "hold"},
)
vector(
    "request-slot-holds-foreign-reply.bin",
    "A valid reply of another domain where a request belongs: the kind is checked before the domain.",
    AT_REQUEST, reply(1, domain=OTHER_DOMAIN)[0], "wrong_kind",
    {"expected": "request", "found": "reply"},
)

# Steps 8..9.
vector(
    "request-foreign.bin",
    "A valid request of another storage domain, for host 7 slot 3.",
    AT_REQUEST, request(domain=OTHER_DOMAIN)[0], "foreign", {"domain": OTHER_DOMAIN},
    without_place="valid",
)
vector(
    "request-foreign-host-8.bin",
    "A valid request of another domain naming host 8: the domain is checked before host and index.",
    AT_REQUEST, request(domain=OTHER_DOMAIN, host_id=8)[0], "foreign",
    {"domain": OTHER_DOMAIN}, without_place="valid",
)
vector(
    "request-host-8-in-host-7.bin",
    "A valid request of this domain for host 8, slot 3, read in host 7's area at slot 3.",
    AT_REQUEST, request(host_id=8)[0], "misdirected", {"host_id": 8, "index": 3},
    without_place="valid",
)
vector(
    "request-slot-4-at-slot-3.bin",
    "A valid request of host 7 for slot 4, read at slot 3.",
    AT_REQUEST, request(slot=4)[0], "misdirected", {"host_id": 7, "index": 4},
    without_place="valid",
)
vector(
    "request-host-8-target-0.bin",
    "A request for host 8 with target_size 0 read in host 7's area: the place is checked before the fields.",
    AT_REQUEST, request(host_id=8, target_size=0)[0], "misdirected", {"host_id": 8, "index": 3},
    without_place="invalid_field",
)
vector(
    "superblock-host-id-1.bin",
    "A superblock naming host 1 (it must name host 0), read at the superblock's place: misdirected; decoded without a place: invalid_field host_id.",
    AT_SUPERBLOCK, superblock(512, 250, host_id=1)[0], "misdirected", {"host_id": 1, "index": 0},
    without_place="invalid_field",
)

# Step 10.
vector(
    "request-reserved-prefix-14.bin",
    "A request with prefix byte 14 (reserved) set to 0x01, correct CRC.",
    AT_REQUEST, patched(VALID_REQUEST, 14, 1, 1), "reserved_not_zero", {"offset": 14},
)
vector(
    "request-reserved-payload-100.bin",
    "A request with reserved payload byte 100 set to 0x5a, correct CRC.",
    AT_REQUEST, patched(VALID_REQUEST, 100, 1, 0x5A), "reserved_not_zero", {"offset": 100},
)
vector(
    "request-reserved-and-generation-0.bin",
    "Reserved byte 84 nonzero and generation 0: reserved bytes are checked before field rules.",
    AT_REQUEST, patched(request(generation=0)[0], 84, 1, 1), "reserved_not_zero", {"offset": 84},
)

# Step 11.
for _file, _desc, _data, _where, _field in [
    ("request-target-not-512-multiple.bin", "A request whose target_size (2 GiB + 100) is not a multiple of 512.",
     request(target_size=2 * GIB + 100)[0], AT_REQUEST, "target_size"),
    ("request-target-0.bin", "A request with target_size 0.",
     request(target_size=0)[0], AT_REQUEST, "target_size"),
    ("request-flags-bit-1.bin", "A request with flags bit 1 set (only bit 0, PAUSED, is defined).",
     request(flags=0b10)[0], AT_REQUEST, "flags"),
    ("request-generation-0.bin", "A request with generation 0.",
     request(generation=0)[0], AT_REQUEST, "generation"),
    ("request-sequence-0.bin", "A request with sequence 0.",
     request(sequence=0)[0], AT_REQUEST, "sequence"),
    ("request-volume-nil.bin", "A request naming the nil volume UUID.",
     request(volume=NIL)[0], AT_REQUEST, "volume"),
    ("reply-status-5.bin", "A reply with status 5 (only 1..4 exist).",
     reply(5)[0], AT_REPLY, "status"),
    ("reply-extended-with-reason.bin", "An extended reply carrying reason 1 (only rejected replies have one).",
     reply(1, reason=1)[0], AT_REPLY, "reason"),
    ("reply-rejected-reason-5.bin", "A rejected reply with reason 5 (only 1..4 exist).",
     reply(3, reason=5, size=0)[0], AT_REPLY, "reason"),
    ("reply-extended-below-target.bin", "An extended reply whose size is 512 bytes short of its target_size.",
     reply(1, size=2 * GIB - 512)[0], AT_REPLY, "size"),
    ("reply-waiting-with-detail.bin", "A waiting_for_space reply with detail 7 (only failed replies have one).",
     reply(2, detail=7, size=GIB)[0], AT_REPLY, "detail"),
    ("reply-epoch-0.bin", "An extended reply with epoch 0.",
     reply(1, epoch=0)[0], AT_REPLY, "epoch"),
    ("superblock-sector-size-1024.bin", "A 250-host superblock with sector_size 1024.",
     superblock(1024, 250)[0], AT_SUPERBLOCK, "sector_size"),
    ("superblock-max-hosts-0.bin", "A superblock with max_hosts 0 (derived fields follow the formulas for 0 hosts).",
     superblock(512, 0)[0], AT_SUPERBLOCK, "max_hosts"),
    ("superblock-outbox-offset-inconsistent.bin",
     "A 250-host superblock whose outbox_offset is one block past 65536 + 250 x 4096 (mailbox_size is right).",
     superblock(512, 250, outbox_offset=INBOX_OFFSET + 251 * BLOCK)[0], AT_SUPERBLOCK, "outbox_offset"),
    ("spm-header-state-2.bin", "An SPM header with state 2 (only 0 vacant and 1 active exist).",
     spm_header(3, 1, 2, 1000, 42, owner=9)[0], AT_SPM_HEADER, "state"),
    ("spm-header-active-epoch-0.bin", "An active SPM header with epoch 0 (an active header has epoch 1 or more).",
     spm_header(0, 1, 1, 1000, 42, owner=9)[0], AT_SPM_HEADER, "epoch"),
    ("spm-header-spm-id-2001.bin", "A vacant SPM header naming spm_id 2001 (host ids end at 2000).",
     spm_header(3, 2001, 0, 0, 0)[0], AT_SPM_HEADER, "spm_id"),
    ("doorbell-ringer-0.bin", "A doorbell rung by host 0.",
     doorbell(0, 2, 9)[0], at("doorbell"), "ringer"),
    ("doorbell-rings-0.bin", "A doorbell whose rings count is 0 (the first ring counts 1).",
     doorbell(HOST, 2, 9, rings=0)[0], at("doorbell"), "rings"),
    ("inbox-header-generation-0.bin", "An inbox header of host 7 with generation 0.",
     inbox_header(0)[0], at("inbox_header", HOST, 0), "generation"),
    ("outbox-header-epoch-0.bin", "An outbox header of host 7 with epoch 0.",
     outbox_header(0, 2)[0], at("outbox_header", HOST, 0), "epoch"),
    ("hold-count-0.bin", "A hold record with count 0 (it lists 1..4 volumes).",
     hold([], count=0)[0], AT_HOLD, "count"),
    ("hold-count-5.bin", "A hold record with count 5 (one record lists at most 4 volumes).",
     hold([VOLUME, VOLUME2, VOLUME3, VOLUME4], count=5)[0], AT_HOLD, "count"),
    ("hold-volume-nil.bin", "A hold record with count 2 whose second volume is nil.",
     hold([VOLUME, NIL])[0], AT_HOLD, "volumes"),
    ("hold-volume-twice.bin", "A hold record listing the same volume twice.",
     hold([VOLUME, VOLUME2, VOLUME])[0], AT_HOLD, "volumes"),
    ("hold-volume-after-count.bin", "A hold record with count 1 and a second, unlisted volume after it.",
     hold([VOLUME, VOLUME2], count=1)[0], AT_HOLD, "volumes"),
    ("hold-generation-0.bin", "A hold record with generation 0.",
     hold([VOLUME], generation=0)[0], AT_HOLD, "generation"),
    ("hold-index-0.bin", "A hold record naming record index 0 (slots are 1..31), read at index 0.",
     hold([VOLUME], slot=0)[0], at("hold", HOST, 0), "index"),
]:
    vector(_file, _desc, _where, _data, "invalid_field", {"field": _field})

# --------------------------------------------------------------------------
# Area vectors (section 3.1 and 6.1).

AREAS = []


def area(file, description, side, records, header_verdict, states):
    """records: {index: bytes}; states: {slot: state} for every non-empty
    slot, as section 6.1 says it must be read."""
    buf = bytearray(BLOCK)
    for index, data in records.items():
        assert len(data) == RECORD_LEN
        buf[index * RECORD_LEN:(index + 1) * RECORD_LEN] = data
    AREAS.append((file, description, side, bytes(buf), header_verdict, states))


_flip = bytearray(request(slot=3, generation=5, sequence=12)[0])
_flip[70] ^= 0x10  # a bit of target_size
area(
    "inbox-area-host7.bin",
    "Host 7's inbox at generation 5: slot 1 a request of generation 5, slot 2 a stale one of generation 4, slot 3 damaged.",
    "inbox",
    {
        0: inbox_header(5)[0],
        1: request(slot=1, generation=5, sequence=11)[0],
        2: request(slot=2, generation=4, sequence=10, volume=VOLUME2)[0],
        3: bytes(_flip),
    },
    "valid",
    {1: "valid", 2: "stale", 3: "checksum"},
)
area(
    "inbox-area-torn-sectors.bin",
    "Host 7 restarted as generation 6 on a 512-byte-sector device: sector 0 (header, slots 1..3) was rewritten, "
    "sectors 1..7 still hold generation-5 requests in slots 4 and 9, which are stale.",
    "inbox",
    {
        0: inbox_header(6)[0],
        1: request(slot=1, generation=6, sequence=13)[0],
        4: request(slot=4, generation=5, sequence=11)[0],
        9: request(slot=9, generation=5, sequence=12, volume=VOLUME2, paused=True)[0],
    },
    "valid",
    {1: "valid", 4: "stale", 9: "stale"},
)
area(
    "inbox-area-no-header.bin",
    "Host 7's inbox with an empty header and a request in slot 1: stale, as every slot of a headerless area.",
    "inbox",
    {1: request(slot=1, generation=1, sequence=1)[0]},
    "empty",
    {1: "stale"},
)
area(
    "inbox-area-holds.bin",
    "Host 7's inbox at generation 5 holding five volumes: hold records in slots 31 (four volumes) and "
    "30 (one), a stale hold of generation 4 in slot 29, and requests in slots 1 and 2. The holds are "
    "neither requests nor defects.",
    "inbox",
    {
        0: inbox_header(5, release_ack=3)[0],
        1: request(slot=1, generation=5, sequence=11)[0],
        2: request(slot=2, generation=5, sequence=12, volume=VOLUME2)[0],
        29: hold([VOLUME3], slot=29, generation=4)[0],
        30: hold([VOLUME4], slot=30, generation=5)[0],
        31: hold([VOLUME, VOLUME2, VOLUME3, NIL_FREE], slot=31, generation=5)[0],
    },
    "valid",
    {1: "valid", 2: "valid", 29: "stale", 30: "valid", 31: "valid"},
)
area(
    "outbox-area-host7.bin",
    "Host 7's outbox, epoch 3, generation 5: slot 1 an extended reply, slot 2 a waiting_for_space reply.",
    "outbox",
    {
        0: outbox_header(3, 5)[0],
        1: reply(1, slot=1, generation=5, sequence=11, epoch=3)[0],
        2: reply(2, slot=2, generation=5, sequence=12, volume=VOLUME2, target_size=3 * GIB,
                 size=2 * GIB, epoch=3)[0],
    },
    "valid",
    {1: "valid", 2: "valid"},
)
_damaged = bytearray(outbox_header(3, 5)[0])
_damaged[40] ^= 0x01  # generation 5 -> 4, CRC not updated
area(
    "outbox-area-damaged-header.bin",
    "Host 7's outbox whose header fails its checksum: the generation-5 reply in slot 1 is stale.",
    "outbox",
    {0: bytes(_damaged), 1: reply(1, slot=1, generation=5, sequence=11, epoch=3)[0]},
    "checksum",
    {1: "stale"},
)

# --------------------------------------------------------------------------
# Checking and writing.


def outcome(verdict, details):
    out = {"verdict": verdict}
    if verdict == "valid":
        out["record"] = details
    elif verdict != "empty":
        out["defect"] = details
    return out


def place_of(where):
    return (where["domain"], where["host_id"], where["index"])


def record_entries():
    entries, files = [], set()
    for file, description, where, data, verdict, want, without_place in RECORDS:
        assert file not in files, f"{file}: declared twice"
        files.add(file)
        try:
            got, details = read(data, where["kind"], place_of(where))
        except Ambiguous as e:
            raise SystemExit(f"{file}: ambiguous vector: {e}")
        assert got == verdict, f"{file}: built as {verdict}, reads as {got} {details}"
        if want is not None:
            assert details == want, f"{file}: reads as {details}, built as {want}"
        entry = {"file": file, "description": description, "at": where}
        entry.update(outcome(got, details))
        alone = outcome(*read(data, where["kind"]))
        if alone != outcome(got, details):
            assert alone["verdict"] == without_place, f"{file}: without a place: {alone}"
            entry["without_place"] = alone
        else:
            assert without_place is None, f"{file}: same verdict without a place"
        entries.append(entry)
    return entries, files


def area_entries():
    entries, files = [], set()
    for file, description, side, buf, header_verdict, states in AREAS:
        assert file not in files, f"{file}: declared twice"
        files.add(file)
        header_kind, slot_kind = {
            "inbox": ("inbox_header", "request"),
            "outbox": ("outbox_header", "reply"),
        }[side]
        verdict, details = read(buf[:RECORD_LEN], header_kind, (DOMAIN, HOST, 0))
        assert verdict == header_verdict, f"{file}: header reads as {verdict} {details}"
        generation = details["generation"] if verdict == "valid" else None
        slots = []
        for n in range(1, SLOTS + 1):
            data = buf[n * RECORD_LEN:(n + 1) * RECORD_LEN]
            got, rec = read(data, slot_kind, (DOMAIN, HOST, n))
            if side == "inbox" and got == "wrong_kind" and rec["found"] == "hold":
                # Section 3.1: an inbox slot holds a request or a hold record.
                got, rec = read(data, "hold", (DOMAIN, HOST, n))
            if got == "empty":
                assert n not in states, f"{file}: slot {n} is empty"
                continue
            slot = {"slot": n}
            if got == "valid":
                slot["state"] = "valid" if rec["generation"] == generation else "stale"
                if "sequence" in rec:
                    slot["sequence"] = rec["sequence"]
                slot["record"] = rec
            else:
                slot["state"] = got
                slot["defect"] = rec
            assert states.get(n) == slot["state"], f"{file}: slot {n} reads as {slot}"
            slots.append(slot)
        entries.append({
            "file": file,
            "description": description,
            "side": side,
            "domain": DOMAIN,
            "host_id": HOST,
            "header": outcome(verdict, details),
            "slots": slots,
        })
    return entries, files


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="directory to write the vectors to (default: next to this script)",
    )
    args = parser.parse_args()
    records, record_files = record_entries()
    areas, area_files = area_entries()
    assert not record_files & area_files
    manifest = {
        "format_version": VERSION,
        "crc32c_check": {"input": "123456789", "crc": crc32c(b"123456789")},
        "records": records,
        "areas": areas,
    }
    os.makedirs(args.out, exist_ok=True)
    written = set()
    for file, _, _, data, *_ in RECORDS:
        written.add(file)
        with open(os.path.join(args.out, file), "wb") as f:
            f.write(data)
    for file, _, _, buf, *_ in AREAS:
        written.add(file)
        with open(os.path.join(args.out, file), "wb") as f:
            f.write(buf)
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".bin") and name not in written:
            os.remove(os.path.join(args.out, name))
            print(f"removed {name}: no longer generated", file=sys.stderr)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    with open(os.path.join(args.out, "manifest.json"), "wb") as f:
        f.write(text.encode("utf-8"))
    print(f"wrote {len(records)} record vectors, {len(areas)} area vectors and "
          f"manifest.json to {args.out}")


if __name__ == "__main__":
    main()
