#!/usr/bin/env bash
# End-to-end test of the firmware SPM: a domain on files, the firmware
# (core/firmware) under qemu-system-arm (mps2-an386) as the domain's only
# SPM, reaching the domain file through semihosting, and `spmbox host`
# processes on Linux with guests writing verifiable data. The pool is too
# small on purpose: the guests pause, a LUN is added through the
# firmware's command file (`spmbox pool add-lun --firmware`), they resume,
# and every byte is read back. Exits 0 only if all of that held; the last
# line is the summary.
#
#   bash core/firmware/run.sh            # builds what it needs
#   SPMBOX=path/to/spmbox FIRMWARE=path/to/elf bash core/firmware/run.sh
#   KEEP=1 ...                           # keep the directory and logs
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

HOSTS=3 VOLUMES_PER_HOST=2
EXTENT=4M VIRTUAL=32M INITIAL=4M CHUNK=4M RATE=16M
LUN1_EXTENTS=14          # 6 volumes of 32M need ~54 extents: they pause
PAUSE_WAIT=40 FINISH_WAIT=90

fail() { echo "run.sh: $*" >&2; echo "firmware e2e: FAILED: $*"; exit 1; }
command -v qemu-system-arm >/dev/null || fail "qemu-system-arm is not installed"
command -v defmt-print >/dev/null || fail "defmt-print is not installed (cargo install defmt-print)"

if [ -z "${SPMBOX:-}" ]; then
  (cd "$root" && cargo build -q --release -p spmbox -j 2)
  SPMBOX="$root/target/release/spmbox"
fi
if [ -z "${FIRMWARE:-}" ]; then
  (cd "$here" && cargo build -q --release -j 2)
  FIRMWARE="$here/target/thumbv7em-none-eabihf/release/spmbox-firmware"
fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/spmbox-fw-XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
start=$SECONDS
mb() { numfmt --from=iec "$1"; }

# 1. The domain: 250 host ids, LUN 1 too small, LUN 2 for later.
truncate -s $(( $(mb 1M) + LUN1_EXTENTS * $(mb $EXTENT) )) "$dir/lun1"
truncate -s $(( $(mb 1M) + HOSTS * VOLUMES_PER_HOST * ($(mb $VIRTUAL) * 2) )) "$dir/lun2"
"$SPMBOX" pool create --device "$dir/domain" --hosts 250 --extent-size $EXTENT --lun "$dir/lun1" \
  > "$dir/create.log" 2>&1 || { cat "$dir/create.log"; fail "pool create failed"; }
volumes=()
for _ in $(seq $((HOSTS * VOLUMES_PER_HOST))); do
  volumes+=("$("$SPMBOX" volume create --device "$dir/domain" --virtual-size $VIRTUAL --initial-size $INITIAL 2>>"$dir/create.log")")
done

# 2. The firmware SPM under qemu: semihosting file I/O on the host's
#    files, its defmt log on stdout decoded by defmt-print.
qemu-system-arm -machine mps2-an386 -cpu cortex-m4 -nographic -monitor none -serial none \
  -semihosting-config "enable=on,target=native,arg=spmbox-firmware,arg=$dir/domain" \
  -kernel "$FIRMWARE" 2> "$dir/qemu.err" \
  | defmt-print -e "$FIRMWARE" > "$dir/firmware.log" 2>&1 &
qemu_pid=$!
pids+=("$qemu_pid")
for _ in $(seq 100); do
  grep -q "SPM started" "$dir/firmware.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "SPM started" "$dir/firmware.log" || { cat "$dir/firmware.log" "$dir/qemu.err"; fail "the firmware did not start"; }

# 3. The hosts, their guests writing until each volume is full.
for h in $(seq $HOSTS); do
  args=()
  for v in $(seq $((VOLUMES_PER_HOST * (h - 1))) $((VOLUMES_PER_HOST * h - 1))); do
    args+=(--volume "${volumes[$v]}")
  done
  SPMBOX_RUN_DIR="$dir/run" "$SPMBOX" -v host --device "$dir/domain" --host-id "$h" \
    --rate $RATE --chunk-size $CHUNK --exit-when-done --json-events "${args[@]}" \
    > "$dir/host$h.json" 2> "$dir/host$h.log" &
  pids+=($!)
done
hosts=("${pids[@]:1}")
count() { cat "$dir"/host*.json 2>/dev/null | grep -c "\"event\":\"$1\"" || true; }

# 4. Wait for every guest to pause (or finish), then add LUN 2.
guests=$((HOSTS * VOLUMES_PER_HOST))
deadline=$((SECONDS + PAUSE_WAIT))
while :; do
  paused=$(( $(count paused) - $(count resumed) ))
  [ $((paused + $(count done))) -ge $guests ] && [ "$paused" -gt 0 ] && break
  [ $SECONDS -ge $deadline ] && break
  sleep 0.2
done
echo "$((SECONDS - start))s: $(count extended) extensions, $paused of $guests guests paused; adding LUN 2"
"$SPMBOX" pool add-lun --device "$dir/domain" --lun "$dir/lun2" --firmware --wait 30 \
  || fail "add-lun through the firmware failed"

# 5. The guests finish; the hosts exit.
deadline=$((SECONDS + FINISH_WAIT))
failed=0
for p in "${hosts[@]}"; do
  while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then
    echo "a host did not finish within ${FINISH_WAIT}s of the LUN being added" >&2
    kill "$p" 2>/dev/null || true
  fi
  wait "$p" || failed=$((failed + 1))
done

# 6. Stop the firmware: it writes what is due and the vacant SPM header.
printf 'stop\n' > "$dir/domain.cmd.tmp" && mv "$dir/domain.cmd.tmp" "$dir/domain.cmd"
for _ in $(seq 100); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$qemu_pid" 2>/dev/null && fail "the firmware did not stop"
wait "$qemu_pid" || true
grep -q "SPM stopped" "$dir/firmware.log" || { tail -20 "$dir/firmware.log"; fail "the firmware did not stop cleanly"; }
spm_state=$("$SPMBOX" status --device "$dir/domain" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spm"].get("state"))')

# 7. Every byte.
verify=$("$SPMBOX" volume verify --device "$dir/domain" --json $(printf -- '--volume %s ' "${volumes[@]}")) || true
echo "$verify" > "$dir/verify.json"

sed -n 's/.*\(firmware: \(SPM started\|stopping\|peak stack\|LUN .* added\)\)/\1/p' "$dir/firmware.log"
python3 - "$dir" "$guests" "$failed" "$spm_state" "$((SECONDS - start))" <<'PY'
import json, sys, glob
d, guests, failed, state, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
events = [json.loads(l) for f in sorted(glob.glob(d + "/host*.json")) for l in open(f) if l.startswith("{")]
kind = lambda k: [e for e in events if e.get("event") == k]
ext = sorted(e["total_ms"] for e in kind("extended"))
pct = lambda xs, p: xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")
# Extensions served at once: no `waiting_for_space` for their volume since
# its previous extension (the others waited for the LUN).
waited, direct = set(), []
for e in events:
    key = (e.get("host"), e.get("volume"))
    if e.get("event") == "waiting_for_space":
        waited.add(key)
    elif e.get("event") == "extended":
        if key not in waited:
            direct.append(e["total_ms"])
        waited.discard(key)
direct.sort()
v = json.load(open(d + "/verify.json")) if open(d + "/verify.json").read().strip() else {"bytes_verified": 0, "data_errors": -1}
pauses, resumes, done = len(kind("paused")), len(kind("resumed")), len(kind("done"))
ok = (v["data_errors"] == 0 and v["bytes_verified"] > 0 and failed == 0 and pauses > 0
      and resumes == pauses and done == guests and state.lower() == "vacant")
print(f"firmware e2e: {'ok' if ok else 'FAILED'} in {secs}s: {len(ext)} extensions answered by the firmware SPM "
      f"(round trip p50 {pct(ext, 50):.1f} ms, p99 {pct(ext, 99):.1f} ms; the {len(direct)} served at once "
      f"p50 {pct(direct, 50):.1f} ms, p99 {pct(direct, 99):.1f} ms; host-measured, SPM emulated), "
      f"{pauses} pauses, {resumes} resumes, {done}/{guests} guests done, {failed} host failures, "
      f"SPM header {state}; verified {v['bytes_verified']} bytes: {v['data_errors']} data errors")
sys.exit(0 if ok else 1)
PY
