#!/usr/bin/env python3
"""Builds the builtin pool's test vectors from docs/pool-format.md alone.

A second implementation of the pool's on-disk state, independent of the
Rust code in core/src/pool/ and host-shell/src/backend/builtin.rs: it
encodes metadata copies (section 3 of docs/pool-format.md) and LUN labels
(section 2), reads them back with the reading procedure of section 4,
replays the allocation rule of section 6 for the states it builds from a
history of operations, checks that each outcome is the one the vector was
built to show, and writes

    tests/vectors/pool/*.bin          one metadata copy or LUN label per file
    tests/vectors/pool/manifest.json  what a reader must make of each file

Usage: python3 tests/vectors/generate_pool.py [--out DIR]

Without --out the files are written to tests/vectors/pool/ (replacing the
committed vectors; *.bin files that are no longer generated are removed).
The output is deterministic.

Python 3 standard library only.
"""

import argparse
import json
import os
import struct
import sys

# --------------------------------------------------------------------------
# Section 1: constants and limits.

MIB = 1 << 20
ALIGN = MIB
MIN_EXTENT_SIZE = MIB
MAX_EXTENT_SIZE = 16 << 30
DEFAULT_EXTENT_SIZE = 128 * MIB
SECTOR = 512
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1

LUNS, LVS, SEGS = 16, 1024, 32
HEADER_LEN = 64
MAGIC = b"SPMP"
VERSION = 3
VERSION_2 = 2
VERSION_1 = 1
RESERVED = [(9, 16), (28, 32)]
# Header bytes an older version reserved (zero) that version 3 uses:
# release_seq and moving (version 1), moving (version 2).
RESERVED_IN = {VERSION: [], VERSION_2: [(48, 64)], VERSION_1: [(40, 64)]}

LABEL_LEN = 4096
LABEL_MAGIC = b"SPMBLUN1"
LUN_DATA_OFFSET = ALIGN


def varint_max(bits):
    return (bits + 6) // 7


def varint_len(n):
    out = 1
    while n >> 7:
        n >>= 7
        out += 1
    return out


def max_copy_len(luns, lvs, segs):
    lun = 16 + varint_max(32) + varint_max(32)
    seg = varint_max(16) + varint_max(32) + varint_max(32)
    vol = 16 + varint_max(64) + varint_len(segs) + segs * seg
    return HEADER_LEN + varint_len(luns) + varint_len(lvs) + luns * lun + lvs * vol


MAX_COPY_LEN = max_copy_len(LUNS, LVS, SEGS)
MAX_PAYLOAD_LEN = MAX_COPY_LEN - HEADER_LEN
COPY_SIZE = (MAX_COPY_LEN + 4095) // 4096 * 4096
assert (MAX_COPY_LEN, COPY_SIZE) == (454115, 454656)


def mailbox_size(max_hosts):
    return 0x10000 + 2 * max_hosts * 4096


def metadata_offset(max_hosts):
    return (mailbox_size(max_hosts) + ALIGN - 1) // ALIGN * ALIGN


# --------------------------------------------------------------------------
# CRC32C (docs/format.md section 2).


def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC = _crc_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def uuid_bytes(text):
    raw = bytes.fromhex(text.replace("-", ""))
    assert len(raw) == 16
    return raw


def uuid_text(raw):
    h = raw.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def uuid_n(n, prefix="c0"):
    """A made-up UUID: `prefix`, then n in the last bytes."""
    raw = bytes.fromhex(prefix) + b"\x11" * (12 - len(bytes.fromhex(prefix))) + n.to_bytes(4, "big")
    return uuid_text(raw)


NIL = "00000000-0000-0000-0000-000000000000"

# --------------------------------------------------------------------------
# Section 3.3: the payload.


def varint(n):
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_payload(luns, volumes):
    out = bytearray(varint(len(luns)))
    for lun in luns:
        out += uuid_bytes(lun["id"]) + varint(lun["extents"]) + varint(lun["used"])
    out += varint(len(volumes))
    for v in volumes:
        out += uuid_bytes(v["id"]) + varint(v["virtual_size"]) + varint(len(v["segments"]))
        for s in v["segments"]:
            out += varint(s["lun"]) + varint(s["first_extent"]) + varint(s["extents"])
    return bytes(out)


class PayloadError(Exception):
    pass


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise PayloadError("ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self, bits):
        value = 0
        for i in range(varint_max(bits)):
            b = self.take(1)[0]
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if value >> bits:
                    raise PayloadError("over the type's range")
                if i + 1 != varint_len(value):
                    raise PayloadError("not the shortest form")
                return value
        raise PayloadError("longer than the type allows")

    def count(self, limit):
        n = self.varint(64)
        if n > limit:
            raise PayloadError("list over its limit")
        return n


def decode_payload(data):
    r = Reader(data)
    luns = []
    for _ in range(r.count(LUNS)):
        luns.append({"id": uuid_text(r.take(16)), "extents": r.varint(32), "used": r.varint(32)})
    volumes = []
    for _ in range(r.count(LVS)):
        v = {"id": uuid_text(r.take(16)), "virtual_size": r.varint(64), "segments": []}
        for _ in range(r.count(SEGS)):
            v["segments"].append({"lun": r.varint(16), "first_extent": r.varint(32),
                                  "extents": r.varint(32)})
        volumes.append(v)
    if r.pos != len(data):
        raise PayloadError("bytes left over")
    return luns, volumes


# --------------------------------------------------------------------------
# Section 5: the rules of a state.


def valid_extent_size(e):
    return MIN_EXTENT_SIZE <= e <= MAX_EXTENT_SIZE and e & (e - 1) == 0


def max_size(virtual_size, e):
    if not valid_extent_size(e):
        return None
    total = virtual_size + virtual_size // 10 + e
    total = (total + e - 1) // e * e
    return total if total <= U64 else None


def first_broken(extent_size, luns, volumes):
    """The first broken rule, in the order of section 5, or None."""
    for i, lun in enumerate(luns):
        if lun["id"] == NIL:
            return {"invariant": "nil_id"}
        if any(l["id"] == lun["id"] for l in luns[:i]):
            return {"invariant": "duplicate_lun", "lun": i}
        if lun["extents"] == 0 or lun["used"] > lun["extents"] or lun["extents"] * extent_size > U64:
            return {"invariant": "lun_bounds", "lun": i}
    previous = None
    for v in volumes:
        vid = v["id"]
        if vid == NIL:
            return {"invariant": "nil_id"}
        if previous is not None and uuid_bytes(previous) >= uuid_bytes(vid):
            return {"invariant": "volume_order", "volume": vid}
        previous = vid
        vs = v["virtual_size"]
        limit = max_size(vs, extent_size)
        if vs == 0 or vs % SECTOR or limit is None:
            return {"invariant": "virtual_size", "volume": vid}
        for pos, s in enumerate(v["segments"]):
            if not (s["extents"] > 0 and s["lun"] < len(luns)
                    and s["first_extent"] + s["extents"] <= luns[s["lun"]]["used"]):
                return {"invariant": "segment_bounds", "volume": vid, "segment": pos}
        extents = sum(s["extents"] for s in v["segments"])
        if extents == 0:
            return {"invariant": "empty_volume", "volume": vid}
        if extents * extent_size > limit:
            return {"invariant": "over_limit", "volume": vid}
    # No extent owned twice: the first overlapping pair, pairwise in order.
    flat = [(vi, v["id"], s) for vi, v in enumerate(volumes) for s in v["segments"]]
    for i, (_, a, sa) in enumerate(flat):
        for _, b, sb in flat[i + 1:]:
            if (sa["lun"] == sb["lun"] and sa["first_extent"] < sb["first_extent"] + sb["extents"]
                    and sb["first_extent"] < sa["first_extent"] + sa["extents"]):
                return {"invariant": "overlap", "a": a, "b": b, "lun": sa["lun"]}
    return None


# --------------------------------------------------------------------------
# Section 3: a metadata copy.


def encode_copy(seq, extent_size, luns, volumes, payload=None, release_seq=0, moving=bytes(16),
                **over):
    """A sealed copy; `moving` is the 16 bytes of the volume being moved
    (nil: none); `over` patches header fields before sealing (magic,
    version, payload_len, reserved={offset: value}); `crc` replaces the
    sealed CRC."""
    if payload is None:
        payload = encode_payload(luns, volumes)
    head = bytearray(HEADER_LEN)
    head[4:8] = over.get("magic", MAGIC)
    head[8] = over.get("version", VERSION)
    struct.pack_into("<Q", head, 16, seq)
    struct.pack_into("<I", head, 24, over.get("payload_len", len(payload)))
    struct.pack_into("<Q", head, 32, extent_size)
    struct.pack_into("<Q", head, 40, release_seq)
    assert len(moving) == 16
    head[48:64] = moving
    for off, value in over.get("reserved", {}).items():
        head[off] = value
    struct.pack_into("<I", head, 0, crc32c(bytes(head[4:]) + payload))
    if "crc" in over:
        struct.pack_into("<I", head, 0, over["crc"])
    return bytes(head) + payload


def open_copy(data, place):
    """Section 4, steps 1 to 9: (header, None) or (None, defect)."""
    if len(data) < HEADER_LEN:
        return None, {"verdict": "too_short", "len": len(data)}
    head = data[:HEADER_LEN]
    if not any(head):
        return None, {"verdict": "empty"}
    if head[4:8] != MAGIC:
        return None, {"verdict": "bad_magic"}
    (payload_len,) = struct.unpack_from("<I", head, 24)
    if payload_len > MAX_PAYLOAD_LEN or HEADER_LEN + payload_len > len(data):
        return None, {"verdict": "payload_length", "payload_len": payload_len}
    payload = data[HEADER_LEN:HEADER_LEN + payload_len]
    (stored,) = struct.unpack_from("<I", head, 0)
    computed = crc32c(head[4:] + payload)
    if stored != computed:
        return None, {"verdict": "checksum", "stored": stored, "computed": computed}
    if head[8] not in RESERVED_IN:
        return None, {"verdict": "unsupported_version", "version": head[8]}
    reserved = RESERVED + RESERVED_IN[head[8]]
    for start, end in sorted(reserved):
        for off in range(start, end):
            if head[off]:
                return None, {"verdict": "reserved_not_zero", "offset": off}
    (extent_size,) = struct.unpack_from("<Q", head, 32)
    if not valid_extent_size(extent_size):
        return None, {"verdict": "extent_size", "extent_size": extent_size}
    (seq,) = struct.unpack_from("<Q", head, 16)
    if seq % 2 != place:
        return None, {"verdict": "misplaced", "seq": seq}
    (release_seq,) = struct.unpack_from("<Q", head, 40)
    # Any 16 bytes: a UUID the payload lacks names no volume.
    moving = uuid_text(head[48:64])
    return {"seq": seq, "extent_size": extent_size, "release_seq": release_seq,
            "moving": moving, "payload": payload}, None


def load(header):
    """Section 4, steps 10 and 11: (pool, None) or (None, defect)."""
    try:
        luns, volumes = decode_payload(header["payload"])
    except PayloadError:
        return None, {"verdict": "payload"}
    broken = first_broken(header["extent_size"], luns, volumes)
    if broken:
        return None, dict(verdict="inconsistent", **broken)
    return {"seq": header["seq"], "extent_size": header["extent_size"],
            "release_seq": header["release_seq"], "moving": header["moving"], "luns": luns,
            "volumes": volumes}, None


def read_copy(data, place):
    header, defect = open_copy(data, place)
    return (None, defect) if defect else load(header)


def read_pair(a, b):
    """Section 4.1: (winner "A"/"B", pool) or (None, {"a": defect, "b": defect})."""
    ha, da = open_copy(a, 0)
    hb, db = open_copy(b, 1)
    order = [("A", ha, da), ("B", hb, db)]
    if hb and (not ha or hb["seq"] > ha["seq"]):
        order.reverse()
    defects = {}
    for name, header, defect in order:
        if header:
            pool, defect = load(header)
            if pool:
                return name, pool
        defects[name.lower()] = defect
    return None, defects


# --------------------------------------------------------------------------
# Section 6: allocation, replayed from a history of operations.


class Pool:
    def __init__(self, extent_size):
        self.e = extent_size
        self.luns = []
        self.volumes = {}
        self.parked = []
        # Released runs: {"lun", "first", "extents", "seq"}, seq None until
        # the commit that writes the release is stamped.
        self.released = []
        self.release_seq = 0

    def extents_for(self, size):
        return (size + self.e - 1) // self.e

    def free_runs(self):
        """Section 6.2: the maximal runs of free extents, (lun, first, length)."""
        runs = []
        for i, lun in enumerate(self.luns):
            taken = [(s["first_extent"], s["first_extent"] + s["extents"])
                     for v in self.volumes.values() for s in v["segments"] if s["lun"] == i]
            taken += [(r["first"], r["first"] + r["extents"]) for r in self.released if r["lun"] == i]
            at = 0
            for start, end in sorted(taken) + [(lun["extents"], lun["extents"])]:
                if start > at:
                    runs.append((i, at, start - at))
                at = max(at, end)
        return runs

    def follows_last_segment(self, lun, a):
        return any(v["segments"] and v["segments"][-1]["lun"] == lun
                   and v["segments"][-1]["first_extent"] + v["segments"][-1]["extents"] == a
                   for v in self.volumes.values())

    def allocate(self, segments, need):
        """Section 6.3, all or nothing; returns None or the reason."""
        runs = self.free_runs()
        if sum(n for _, _, n in runs) < need:
            return "no_space"
        rest, grow, grown, new = need, 0, None, []
        if segments:
            last = segments[-1]
            end = last["first_extent"] + last["extents"]
            grown = next((r for r in runs if r[0] == last["lun"] and r[1] == end), None)
            if grown:
                grow = min(rest, grown[2])
                rest -= grow
        others = sorted((r for r in runs if r != grown), key=lambda r: (-r[2], r[0], r[1]))
        if rest and others[0][2] >= rest:
            lun, a, n = others[0]
            start = a + min(n // 2, n - rest) if a > 0 and self.follows_last_segment(lun, a) else a
            new.append((lun, start, rest))
        elif rest:
            for lun, a, n in others:
                take = min(rest, n)
                new.append((lun, a, take))
                rest -= take
                if rest == 0:
                    break
        if len(segments) + len(new) > SEGS:
            return "segments_full"
        if grow:
            segments[-1]["extents"] += grow
            self.raise_used(segments[-1])
        for lun, first, n in new:
            last = segments[-1] if segments else None
            if last and last["lun"] == lun and last["first_extent"] + last["extents"] == first:
                last["extents"] += n
            else:
                segments.append({"lun": lun, "first_extent": first, "extents": n})
            self.raise_used(segments[-1])
        return None

    def raise_used(self, s):
        lun = self.luns[s["lun"]]
        lun["used"] = max(lun["used"], s["first_extent"] + s["extents"])

    def serve_parked(self):
        """Urgent first, then in order; stop at the first that does not fit."""
        while self.parked:
            p = next((p for p in self.parked if p["urgent"]), self.parked[0])
            v = self.volumes[p["volume"]]
            need = self.extents_for(p["target"]) - sum(s["extents"] for s in v["segments"])
            if need > 0:
                why = self.allocate(v["segments"], need)
                if why == "no_space":
                    return
            self.parked.remove(p)

    def add_lun(self, id, extents):
        self.luns.append({"id": id, "extents": extents, "used": 0})
        self.serve_parked()

    def create_volume(self, id, virtual_size, initial_size):
        assert id not in self.volumes
        assert initial_size <= max_size(virtual_size, self.e)
        v = {"id": id, "virtual_size": virtual_size, "segments": []}
        assert self.allocate(v["segments"], max(1, self.extents_for(initial_size))) is None
        self.volumes[id] = v

    def extend(self, id, target, urgent=False):
        v = self.volumes[id]
        have = sum(s["extents"] for s in v["segments"])
        assert target <= max_size(v["virtual_size"], self.e)
        need = self.extents_for(target) - have
        if need <= 0:
            return "extended"
        why = self.allocate(v["segments"], need)
        if why == "no_space":
            old = next((p for p in self.parked if p["volume"] == id), None)
            if old:
                old["target"] = max(old["target"], target)
                old["urgent"] |= urgent
            else:
                self.parked.append({"volume": id, "target": target, "urgent": urgent})
            return "parked"
        assert why is None, why
        return "extended"

    def release(self, lun, first, extents):
        self.released.append({"lun": lun, "first": first, "extents": extents, "seq": None})

    def delete_volume(self, id):
        """Section 6.6."""
        assert not any(p["volume"] == id for p in self.parked)
        for s in self.volumes.pop(id)["segments"]:
            self.release(s["lun"], s["first_extent"], s["extents"])

    def reduce_volume(self, id, size):
        assert size > 0 and size % SECTOR == 0
        assert not any(p["volume"] == id for p in self.parked)
        segments = self.volumes[id]["segments"]
        cut = sum(s["extents"] for s in segments) - self.extents_for(size)
        assert cut >= 0
        while cut:
            last = segments[-1]
            take = min(cut, last["extents"])
            last["extents"] -= take
            self.release(last["lun"], last["first_extent"] + last["extents"], take)
            if last["extents"] == 0:
                segments.pop()
            cut -= take

    def commit(self, seq):
        """The commit `seq` that wrote the pending releases is durable."""
        pending = [r for r in self.released if r["seq"] is None]
        for r in pending:
            r["seq"] = seq
        if pending:
            self.release_seq = seq

    def reclaim(self, acked):
        self.released = [r for r in self.released if r["seq"] is None or r["seq"] > acked]
        self.serve_parked()

    def release_seq_for(self, seq):
        """The `release_seq` commit `seq` writes."""
        return seq if any(r["seq"] is None for r in self.released) else self.release_seq

    def state(self):
        vols = [self.volumes[k] for k in sorted(self.volumes, key=uuid_bytes)]
        return json.loads(json.dumps((self.luns, vols)))


def replay_pool(extent_size, history):
    pool = Pool(extent_size)
    for op in history:
        getattr(pool, op[0])(*op[1:])
    return pool


def replay(extent_size, history):
    return replay_pool(extent_size, history).state()


# --------------------------------------------------------------------------
# Section 2: LUN labels.


def encode_label(domain, lun, data_offset, extent_size, extents, magic=LABEL_MAGIC, crc=None,
                 tail=None):
    b = bytearray(LABEL_LEN)
    b[0:8] = magic
    b[8:24] = uuid_bytes(domain)
    b[24:40] = uuid_bytes(lun)
    struct.pack_into("<QQI", b, 40, data_offset, extent_size, extents)
    struct.pack_into("<I", b, 60, crc32c(bytes(b[0:60])) if crc is None else crc)
    if tail:
        b[tail[0]] = tail[1]
    return bytes(b)


def read_label(b):
    if len(b) < 64 or b[0:8] != LABEL_MAGIC:
        return None, "bad_magic"
    if struct.unpack_from("<I", b, 60)[0] != crc32c(b[0:60]):
        return None, "checksum"
    data_offset, extent_size, extents = struct.unpack_from("<QQI", b, 40)
    return {"domain": uuid_text(b[8:24]), "lun": uuid_text(b[24:40]),
            "data_offset": data_offset, "extent_size": extent_size, "extents": extents}, "valid"


# --------------------------------------------------------------------------
# The vectors.

DOMAIN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
L0 = "6b1f0c2e-9a51-4c3d-8e7f-0a1b2c3d4e50"
L1 = "6b1f0c2e-9a51-4c3d-8e7f-0a1b2c3d4e51"
L2 = "6b1f0c2e-9a51-4c3d-8e7f-0a1b2c3d4e52"
V1 = "a8098c1a-f86e-41d1-80ed-12b4c0d1e2f3"
V2 = "e7f1d2c3-b4a5-4697-8899-aabbccddeeff"
V3 = "1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5"
GIB = 1 << 30

FRESH = [("add_lun", L0, 800), ("add_lun", L1, 1600)]
SEVERAL = [
    ("add_lun", L0, 10),
    ("add_lun", L1, 20),
    ("create_volume", V1, 10 * GIB, 1 * GIB),
    ("create_volume", V2, 5 * GIB, 512 * MIB),
    ("extend", V1, 2 * GIB),
    ("extend", V2, 1 * GIB),
    ("extend", V2, 1536 * MIB),
    ("extend", V1, 5 * GIB, True),
    ("add_lun", L2, 30),
    ("create_volume", V3, 1 * GIB, 0),
]
SEVERAL_B = SEVERAL + [("extend", V3, 256 * MIB)]
SEVERAL_C = SEVERAL_B + [("extend", V2, 2 * GIB)]
# Commit 9 deletes a volume: its extents are released, release_seq 9.
RELEASED_A = SEVERAL_C + [("delete_volume", V2)]
# Commit 9 is durable; commit 10 reduces a volume; hosts acknowledge 9:
# the deleted volume's extents are free again (the reduced tail is not)
# and commit 11 grows a volume into them.
RELEASED_B = RELEASED_A + [
    ("commit", 9),
    ("reduce_volume", V1, 3 * GIB),
    ("commit", 10),
    ("reclaim", 9),
    ("extend", V3, 1 * GIB),
]

COPIES = []  # (file, description, place, data, expected outcome, history)


def copy(file, description, place, data, history=None):
    COPIES.append((file, description, place, data, history))


def state(extent_size, history):
    return replay(extent_size, history)


def committed(seq, extent_size, history, **over):
    """The copy commit `seq` writes after `history`."""
    pool = replay_pool(extent_size, history)
    return encode_copy(seq, extent_size, *pool.state(), release_seq=pool.release_seq_for(seq),
                       **over)


def simple(luns, volumes):
    """LUNs as (id, extents, used); volumes as (id, virtual, [(lun, first, n)])."""
    return ([{"id": i, "extents": e, "used": u} for i, e, u in luns],
            [{"id": i, "virtual_size": vs,
              "segments": [{"lun": l, "first_extent": f, "extents": n} for l, f, n in segs]}
             for i, vs, segs in volumes])


def largest_virtual(e):
    """The largest whole-sector virtual size whose limit fits a u64."""
    v = (U64 - 2 * e) * 10 // 11 // SECTOR * SECTOR
    while max_size(v + SECTOR, e) is not None:
        v += SECTOR
    while max_size(v, e) is None:
        v -= SECTOR
    return v


def build_copies():
    E = DEFAULT_EXTENT_SIZE
    copy("fresh-no-luns.bin", "A pool just created without LUNs: seq 0, nothing in it.",
         0, encode_copy(0, E, [], []), [])
    copy("fresh.bin", "A pool just created with two LUNs: seq 0 in copy A.",
         0, encode_copy(0, E, *state(E, FRESH)), FRESH)
    copy("several-a.bin",
         "Three LUNs and three volumes, one of four segments (a parked extension served by a new LUN), commit 6.",
         0, encode_copy(6, E, *state(E, SEVERAL)), SEVERAL)
    copy("several-b.bin", "The next commit (7, copy B): the last segment of a volume grew in place.",
         1, encode_copy(7, E, *state(E, SEVERAL_B)), SEVERAL_B)
    copy("several-c.bin", "The commit after (8, copy A): a volume got a new segment.",
         0, encode_copy(8, E, *state(E, SEVERAL_C)), SEVERAL_C)
    copy("released-a.bin", "Commit 9 (copy B) deletes a volume: release_seq 9.",
         1, committed(9, E, RELEASED_A), RELEASED_A)
    copy("released-b.bin",
         "Commit 11 (copy B): a volume reduced at commit 10 (release_seq 10), another grown into the extents commit 9 released once hosts acknowledged 9.",
         1, committed(11, E, RELEASED_B), RELEASED_B)
    copy("version-1.bin", "Commit 6 as version 1 wrote it: still read, release_seq 0 and moving nil.",
         0, encode_copy(6, E, *state(E, SEVERAL), version=VERSION_1))
    copy("version-2.bin", "Commit 9 as version 2 wrote it: still read, release_seq 9 and moving nil.",
         1, committed(9, E, RELEASED_A, version=VERSION_2))
    copy("moving.bin",
         "Commit 8 (copy A) naming one of its volumes as moving: an SPM is moving its segments.",
         0, encode_copy(8, E, *state(E, SEVERAL_C), moving=uuid_bytes(V2)))
    copy("moving-unknown.bin",
         "Commit 8 naming as moving a UUID none of its volumes has: valid, it names no volume.",
         0, encode_copy(8, E, *state(E, SEVERAL_C), moving=uuid_bytes(uuid_n(99))))

    # The largest fields: every varint at its longest.
    e = MIB
    big = largest_virtual(e)
    luns = [(uuid_n(i, "d0"), U32, 0) for i in range(16)]
    luns[0] = (luns[0][0], U32, U32)
    luns[15] = (luns[15][0], U32, U32)
    lo, hi = "00000000-0000-0000-0000-000000000001", "ffffffff-ffff-ffff-ffff-ffffffffffff"
    vols = [(lo, big, [(0, 0, U32 - 1)]), (hi, big, [(0, U32 - 1, 1), (15, 0, U32)])]
    copy("largest-fields.bin",
         "16 LUNs of 2^32-1 extents of 1 MiB, the largest seq (odd: copy B), virtual sizes and extent numbers.",
         1, encode_copy(U64, e, *simple(luns, vols)))
    e16 = MAX_EXTENT_SIZE
    n = U64 // e16
    copy("extent-size-16g.bin", "The largest extent size, 16 GiB, on a LUN of the most extents that fit a u64 of bytes.",
         0, encode_copy(2, e16, *simple([(L0, n, 1)], [(V1, 16 * GIB, [(0, 0, 1)])])))
    copy("extent-size-1m.bin", "The smallest extent size, 1 MiB.",
         1, encode_copy(1, MIB, *simple([(L0, 4, 1)], [(V1, 512, [(0, 0, 1)])])))

    # At and over the limits.
    l16 = [(uuid_n(i, "d1"), 1, 0) for i in range(16)]
    copy("luns-16.bin", "16 LUNs, the most.", 0, encode_copy(0, E, *simple(l16, [])))
    l17 = l16 + [(uuid_n(16, "d1"), 1, 0)]
    copy("luns-17.bin", "17 LUNs, one more than a reader accepts.", 0, encode_copy(0, E, *simple(l17, [])))
    s32 = [(0, i, 1) for i in range(32)]
    copy("segments-32.bin", "A volume of 32 one-extent segments, the most.",
         0, encode_copy(0, E, *simple([(L0, 40, 32)], [(V1, 10 * GIB, s32)])))
    copy("segments-33.bin", "A volume of 33 segments, one more than a reader accepts.",
         0, encode_copy(0, E, *simple([(L0, 40, 33)], [(V1, 10 * GIB, s32 + [(0, 32, 1)])])))
    v1024 = [(uuid_n(i, "e0"), 512, [(0, i, 1)]) for i in range(1024)]
    copy("volumes-1024.bin", "1024 volumes, the most.",
         0, encode_copy(0, E, *simple([(L0, 2000, 1024)], v1024)))
    v1025 = v1024 + [(uuid_n(1024, "e0"), 512, [(0, 1024, 1)])]
    copy("volumes-1025.bin", "1025 volumes, one more than a reader accepts.",
         0, encode_copy(0, E, *simple([(L0, 2000, 1025)], v1025)))

    # Header defects.
    good_luns, good_vols = state(E, SEVERAL)
    good = encode_copy(6, E, good_luns, good_vols)
    copy("empty.bin", "A copy never written: 4096 zero bytes.", 0, bytes(4096))
    copy("bad-magic.bin", "Magic SPMQ instead of SPMP (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, magic=b"SPMQ"))
    copy("bad-crc.bin", "Commit 6 with one payload bit flipped: the CRC does not match.", 0,
         good[:80] + bytes([good[80] ^ 0x01]) + good[81:])
    copy("version-4.bin", "Version 4 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, version=4))
    copy("reserved-9.bin", "Reserved byte 9 is 1 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, reserved={9: 1}))
    copy("reserved-28.bin", "Reserved byte 28 is 1 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, reserved={28: 1}))
    copy("reserved-48.bin",
         "A version 2 copy whose byte 48 (reserved in version 2, moving in 3) is 0x80 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, version=VERSION_2, reserved={48: 0x80}))
    copy("version-1-reserved-40.bin",
         "A version 1 copy whose byte 40 (reserved in version 1, release_seq in 2 and 3) is 0x80 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, version=VERSION_1, reserved={40: 0x80}))
    copy("version-1-reserved-50.bin",
         "A version 1 copy whose byte 50 (reserved in version 1, moving in 3) is 1 (sealed).", 0,
         encode_copy(6, E, good_luns, good_vols, version=VERSION_1, reserved={50: 1}))
    copy("release-seq-any.bin", "A copy with release_seq 2^64 - 1: any value is valid.", 0,
         encode_copy(6, E, good_luns, good_vols, release_seq=U64))
    copy("extent-size-3m.bin", "Extent size 3 MiB, not a power of two.", 0,
         encode_copy(0, 3 * MIB, [], []))
    copy("extent-size-512k.bin", "Extent size 512 KiB, below the smallest.", 0,
         encode_copy(0, 512 << 10, [], []))
    copy("extent-size-32g.bin", "Extent size 32 GiB, above the largest.", 0,
         encode_copy(0, 32 << 30, [], []))
    copy("misplaced-7-in-a.bin", "Commit 7 (odd) read as copy A: written to the wrong place.", 0,
         encode_copy(7, E, *state(E, SEVERAL_B)))
    copy("misplaced-6-in-b.bin", "Commit 6 (even) read as copy B.", 1, good)
    copy("payload-len-past-copy.bin",
         "payload_len 454593: past the end of the copy's 454656 bytes.", 0,
         encode_copy(6, E, good_luns, good_vols, payload_len=COPY_SIZE - HEADER_LEN + 1))
    copy("payload-len-over-limit.bin",
         "payload_len 454052: within the copy but over the most a payload can take.", 0,
         encode_copy(6, E, good_luns, good_vols, payload_len=MAX_PAYLOAD_LEN + 1))
    copy("payload-len-past-file.bin",
         "payload_len one more than the payload written (the copy's next byte is zero): the CRC does not match.",
         0, encode_copy(6, E, good_luns, good_vols, payload_len=len(good) - HEADER_LEN + 1))

    # Payload defects (all sealed with a correct CRC).
    p = encode_payload(good_luns, good_vols)
    copy("payload-trailing-byte.bin", "A zero byte after the payload, counted in payload_len.", 0,
         encode_copy(6, E, None, None, payload=p + b"\x00"))
    copy("payload-truncated.bin", "The payload's last byte cut off.", 0,
         encode_copy(6, E, None, None, payload=p[:-1]))
    # LUN 0's extents (10) written as 0x8a 0x00: two bytes for a one-byte value.
    assert p[17] == 10
    copy("payload-overlong-varint.bin",
         "LUN 0's extent count 10 written in two bytes (0x8a 0x00) instead of one.", 0,
         encode_copy(6, E, None, None, payload=p[:17] + b"\x8a\x00" + p[18:]))
    overlong_count = b"\x80\x80\x80\x80\x80\x00"
    copy("payload-overlong-count.bin",
         "An empty pool whose LUN count 0 is written in six bytes.", 0,
         encode_copy(0, E, None, None, payload=overlong_count + b"\x00"))
    copy("payload-varint-too-long.bin",
         "A LUN's extent count as a six-byte varint, longer than any u32.", 0,
         encode_copy(0, E, None, None,
                     payload=b"\x01" + uuid_bytes(L0) + b"\x81\x80\x80\x80\x80\x00" + b"\x00\x00"))
    copy("payload-u32-over-range.bin",
         "A LUN's extent count 2^32 (five bytes, last 0x10): over a u32.", 0,
         encode_copy(0, E, None, None,
                     payload=b"\x01" + uuid_bytes(L0) + b"\x80\x80\x80\x80\x10" + b"\x00\x00"))
    seg_over = (b"\x01" + uuid_bytes(L0) + b"\x01\x01" + b"\x01" + uuid_bytes(V1) + varint(GIB)
                + b"\x01" + b"\x80\x80\x04" + b"\x00\x01")
    copy("payload-u16-over-range.bin",
         "A segment's LUN index 65536 (0x80 0x80 0x04): over a u16.", 0,
         encode_copy(0, E, None, None, payload=seg_over))

    # Broken rules of a state (section 5).
    def bad(file, description, luns, vols, e=E, seq=0):
        copy(file, description, 0, encode_copy(seq, e, *simple(luns, vols)))

    bad("owned-twice.bin", "Extent 1 of LUN 0 belongs to two volumes (extent 3 to none).",
        [(L0, 10, 4)], [(V1, GIB, [(0, 0, 2)]), (V2, GIB, [(0, 1, 2)])])
    bad("owned-twice-same-volume.bin", "A volume's two segments share extent 1.",
        [(L0, 10, 4)], [(V1, GIB, [(0, 0, 2), (0, 1, 2)])])
    bad("segment-past-used.bin", "A segment runs to extent 5 of a LUN used up to 4.",
        [(L0, 10, 4)], [(V1, GIB, [(0, 0, 5)])])
    bad("segment-unknown-lun.bin", "A segment on LUN 1 of a pool with one LUN.",
        [(L0, 10, 1)], [(V1, GIB, [(1, 0, 1)])])
    bad("segment-empty.bin", "A segment of zero extents.",
        [(L0, 10, 1)], [(V1, GIB, [(0, 0, 1), (0, 1, 0)])])
    bad("volumes-out-of-order.bin", "Two volumes in descending UUID order.",
        [(L0, 10, 2)], [(V2, GIB, [(0, 0, 1)]), (V1, GIB, [(0, 1, 1)])])
    bad("volume-twice.bin", "The same volume UUID twice.",
        [(L0, 10, 2)], [(V1, GIB, [(0, 0, 1)]), (V1, GIB, [(0, 1, 1)])])
    bad("volume-nil.bin", "A volume with the nil UUID.",
        [(L0, 10, 1)], [(NIL, GIB, [(0, 0, 1)])])
    bad("lun-nil.bin", "A LUN with the nil UUID.", [(NIL, 10, 0)], [])
    bad("lun-twice.bin", "Two LUNs with the same UUID.", [(L0, 10, 0), (L0, 5, 0)], [])
    bad("lun-no-extents.bin", "A LUN of zero extents.", [(L0, 0, 0)], [])
    bad("lun-used-past-end.bin", "A LUN used up to 11 of its 10 extents.",
        [(L0, 10, 11)], [(V1, 10 * GIB, [(0, 0, 11)])])
    bad("lun-too-large.bin", "2^30 extents of 16 GiB: more bytes than a u64 holds.",
        [(L0, 1 << 30, 0)], [], e=MAX_EXTENT_SIZE)
    copy("used-above-segments.bin",
         "LUN 0 used up to 3, its segments hold 2: extent 2 is free or released (valid since version 2).",
         0, encode_copy(0, E, *simple([(L0, 10, 3)], [(V1, GIB, [(0, 0, 2)])])))
    bad("volume-no-segments.bin", "A volume that owns no extents.",
        [(L0, 10, 0)], [(V1, GIB, [])])
    bad("volume-over-limit.bin",
        "A volume of 1 GiB virtual with 11 extents of 128 MiB (its limit is 10).",
        [(L0, 20, 11)], [(V1, GIB, [(0, 0, 11)])])
    bad("virtual-size-odd.bin", "A virtual size of 1000 bytes, not whole sectors.",
        [(L0, 10, 1)], [(V1, 1000, [(0, 0, 1)])])
    bad("virtual-size-zero.bin", "A virtual size of 0.",
        [(L0, 10, 1)], [(V1, 0, [(0, 0, 1)])])
    bad("virtual-size-no-limit.bin", "A virtual size whose limit does not fit a u64.",
        [(L0, 10, 1)], [(V1, U64 // SECTOR * SECTOR, [(0, 0, 1)])])
    # The newest copy of a pair, sealed but breaking a rule.
    l, v = state(E, SEVERAL_C)
    l[2]["used"] -= 1
    copy("several-c-bad.bin", "Commit 8 with LUN 2's high-water mark one too low.", 0,
         encode_copy(8, E, l, v))
    torn = encode_copy(8, E, *state(E, SEVERAL_C))
    copy("several-c-torn.bin", "Commit 8 torn: its last 20 bytes are still zero.", 0,
         torn[:-20] + bytes(20))


PAIRS = [
    ("fresh.bin", None, "A pool just created: copy A, copy B zero."),
    (None, None, "Neither copy written."),
    ("several-a.bin", "several-b.bin", "Commits 6 and 7: B is newer."),
    ("several-c.bin", "several-b.bin", "Commits 8 and 7: A is newer."),
    ("several-c-torn.bin", "several-b.bin", "Commit 8 torn: commit 7 in B wins."),
    ("several-c-bad.bin", "several-b.bin", "Commit 8 breaks a rule: commit 7 in B wins."),
    ("several-c.bin", "released-a.bin", "Commits 8 and 9: B is newer."),
    ("several-c.bin", "version-2.bin", "Commit 8 and commit 9 as version 2 wrote it: B is newer."),
    ("moving.bin", "several-b.bin", "Commits 8 (naming a volume as moving) and 7: A is newer."),
    ("several-a.bin", "misplaced-6-in-b.bin", "B holds an even commit: A wins."),
    ("misplaced-7-in-a.bin", "several-b.bin", "A holds an odd commit: B wins."),
    (None, "several-b.bin", "Copy A zero: B wins."),
    ("bad-crc.bin", "largest-fields.bin", "A damaged: B wins."),
    ("bad-crc.bin", "misplaced-6-in-b.bin", "Both defective: no pool."),
    ("payload-overlong-varint.bin", None, "A's payload is not in its shortest form: no pool."),
]

LABELS = [
    ("label.bin", "A LUN label.", encode_label(DOMAIN, L0, LUN_DATA_OFFSET, DEFAULT_EXTENT_SIZE, 800)),
    ("label-largest.bin", "A label with every number at its largest.",
     encode_label(DOMAIN, L1, U64, U64, U32)),
    ("label-bad-crc.bin", "A label whose CRC does not match.",
     encode_label(DOMAIN, L0, LUN_DATA_OFFSET, DEFAULT_EXTENT_SIZE, 800, crc=0x12345678)),
    ("label-bad-magic.bin", "SPMBLUN2 instead of SPMBLUN1 (CRC correct).",
     encode_label(DOMAIN, L0, LUN_DATA_OFFSET, DEFAULT_EXTENT_SIZE, 800, magic=b"SPMBLUN2")),
    ("label-tail-nonzero.bin", "A label whose byte 4095 is not zero: still a label.",
     encode_label(DOMAIN, L0, LUN_DATA_OFFSET, DEFAULT_EXTENT_SIZE, 800, tail=(4095, 0xFF))),
    ("label-zero.bin", "4096 zero bytes: no label.", bytes(LABEL_LEN)),
]

# What each vector was built to show: file -> verdict (and invariant).
EXPECT = {
    "luns-17.bin": "payload", "segments-33.bin": "payload", "volumes-1025.bin": "payload",
    "empty.bin": "empty", "bad-magic.bin": "bad_magic",
    "bad-crc.bin": "checksum", "version-4.bin": "unsupported_version",
    "reserved-9.bin": "reserved_not_zero", "reserved-48.bin": "reserved_not_zero",
    "reserved-28.bin": "reserved_not_zero", "version-1-reserved-40.bin": "reserved_not_zero",
    "version-1-reserved-50.bin": "reserved_not_zero",
    "extent-size-3m.bin": "extent_size", "extent-size-512k.bin": "extent_size",
    "extent-size-32g.bin": "extent_size", "misplaced-7-in-a.bin": "misplaced",
    "misplaced-6-in-b.bin": "misplaced", "payload-len-past-copy.bin": "payload_length",
    "payload-len-over-limit.bin": "payload_length", "payload-len-past-file.bin": "checksum",
    "payload-trailing-byte.bin": "payload", "payload-truncated.bin": "payload",
    "payload-overlong-varint.bin": "payload", "payload-overlong-count.bin": "payload",
    "payload-varint-too-long.bin": "payload", "payload-u32-over-range.bin": "payload",
    "payload-u16-over-range.bin": "payload",
    "owned-twice.bin": "overlap", "owned-twice-same-volume.bin": "overlap",
    "segment-past-used.bin": "segment_bounds", "segment-unknown-lun.bin": "segment_bounds",
    "segment-empty.bin": "segment_bounds", "volumes-out-of-order.bin": "volume_order",
    "volume-twice.bin": "volume_order", "volume-nil.bin": "nil_id", "lun-nil.bin": "nil_id",
    "lun-twice.bin": "duplicate_lun", "lun-no-extents.bin": "lun_bounds",
    "lun-used-past-end.bin": "lun_bounds", "lun-too-large.bin": "lun_bounds",
    "volume-no-segments.bin": "empty_volume",
    "volume-over-limit.bin": "over_limit", "virtual-size-odd.bin": "virtual_size",
    "virtual-size-zero.bin": "virtual_size", "virtual-size-no-limit.bin": "virtual_size",
    "several-c-bad.bin": "segment_bounds", "several-c-torn.bin": "checksum",
}


def region(data):
    """The copy as a reader finds it on the device: the file's bytes, then
    zeroes to the end of the copy's space."""
    return data + bytes(max(0, COPY_SIZE - len(data)))


def copy_entries():
    entries = []
    for file, description, place, data, history in COPIES:
        pool, defect = read_copy(region(data), place)
        entry = {"file": file, "description": description, "place": "AB"[place]}
        if pool:
            assert file not in EXPECT, (file, "valid")
            entry["verdict"] = "valid"
            entry["pool"] = pool
            if history is not None:
                assert replay(pool["extent_size"], history) == [pool["luns"], pool["volumes"]]
                entry["history"] = [list(op) for op in history]
            # Encoding the state again gives the same bytes (a version 1
            # or 2 copy is written back as version 3).
            again = encode_copy(pool["seq"], pool["extent_size"], pool["luns"], pool["volumes"],
                                release_seq=pool["release_seq"],
                                moving=uuid_bytes(pool["moving"]))
            assert again == data or data[8] in (VERSION_1, VERSION_2)
        else:
            verdict = defect["verdict"]
            want = EXPECT.get(file)
            got = defect.get("invariant", verdict)
            assert want == got, (file, want, defect)
            entry["verdict"] = verdict
            entry["defect"] = {k: v for k, v in defect.items() if k != "verdict"}
        entries.append(entry)
    return entries


def pair_entries():
    data = {file: d for file, _, _, d, _ in COPIES}
    entries = []
    for a, b, description in PAIRS:
        ca = region(data[a]) if a else bytes(COPY_SIZE)
        cb = region(data[b]) if b else bytes(COPY_SIZE)
        winner, out = read_pair(ca, cb)
        entry = {"a": a, "b": b, "description": description, "winner": winner}
        if winner:
            entry["seq"] = out["seq"]
        else:
            entry["defects"] = out
        entries.append(entry)
    return entries


def label_entries():
    entries = []
    for file, description, data in LABELS:
        label, verdict = read_label(data)
        entry = {"file": file, "description": description, "verdict": verdict}
        if label:
            entry["label"] = label
        entries.append(entry)
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "pool"),
                        help="directory to write the vectors to (default: tests/vectors/pool)")
    args = parser.parse_args()
    build_copies()
    assert crc32c(b"123456789") == 0xE3069283
    manifest = {
        "metadata_copy_size": COPY_SIZE,
        "limits": {"luns": LUNS, "volumes": LVS, "segments": SEGS,
                   "max_payload_len": MAX_PAYLOAD_LEN},
        "layouts": [
            {"max_hosts": h, "mailbox_size": mailbox_size(h),
             "copy_a": metadata_offset(h), "copy_b": metadata_offset(h) + COPY_SIZE,
             "domain_size": metadata_offset(h) + 2 * COPY_SIZE}
            for h in (1, 250, 2000)
        ],
        "copies": copy_entries(),
        "pairs": pair_entries(),
        "labels": label_entries(),
    }
    files = [(f, d) for f, _, _, d, _ in COPIES] + [(f, d) for f, _, d in LABELS]
    names = [f for f, _ in files]
    assert len(set(names)) == len(names)
    os.makedirs(args.out, exist_ok=True)
    for file, data in files:
        with open(os.path.join(args.out, file), "wb") as f:
            f.write(data)
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".bin") and name not in names:
            os.remove(os.path.join(args.out, name))
            print(f"removed {name}: no longer generated", file=sys.stderr)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    with open(os.path.join(args.out, "manifest.json"), "wb") as f:
        f.write(text.encode("utf-8"))
    print(f"wrote {len(COPIES)} metadata copies, {len(LABELS)} labels and manifest.json "
          f"to {args.out}")


if __name__ == "__main__":
    main()
