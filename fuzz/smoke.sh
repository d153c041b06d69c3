#!/usr/bin/env bash
# Smoke-fuzzes every cargo-fuzz target of spmbox for a short while.
#
# Usage: fuzz/smoke.sh [SECONDS_PER_TARGET]     (default 20)
#
# Builds all targets once, then for each target listed by `cargo fuzz list`
# starts from a fresh working corpus (fuzz/corpus/<target>/, a copy of the
# committed seeds in fuzz/seeds/<target>/) and fuzzes it for the given
# time. Prints one line per target:
#
#   fuzz <target>: <N> executions in <S> s, no findings
#
# and exits nonzero, naming the artifact (the input that fails), as soon as
# a target finds a crash, a failed assertion, a timeout or an OOM. Needs the
# nightly toolchain and cargo-fuzz; installs nothing. Works from any
# directory.
#
# Targets are built and run with debug assertions on (`--debug-assertions`),
# so the core's own invariant checks (the pool's and the queue's, which
# release builds compile out) fail a run as soon as an input breaks one, and
# integer overflow panics instead of wrapping.
set -euo pipefail

usage() {
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
}

[[ $# -le 1 ]] || usage
seconds=${1:-20}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || usage

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# cargo-fuzz finds its project from the directory that holds fuzz/.
cd "$fuzz_dir/.."
fuzz=(cargo +nightly fuzz)
# For `build` and `run` alike: `run` rebuilds if its flags differ.
flags=(--debug-assertions)

logs=$(mktemp -d "${TMPDIR:-/tmp}/spmbox-fuzz-smoke.XXXXXX")
keep_logs=0
cleanup() {
    if [[ $keep_logs == 0 ]]; then
        rm -rf -- "$logs"
    fi
}
trap cleanup EXIT

mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir "$fuzz_dir")
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "smoke.sh: cargo fuzz list found no targets in $fuzz_dir" >&2
    exit 1
fi

# Build first, so that the time limit is spent fuzzing, not compiling.
"${fuzz[@]}" build "${flags[@]}" --fuzz-dir "$fuzz_dir" >&2

for target in "${targets[@]}"; do
    corpus="$fuzz_dir/corpus/$target"
    seeds="$fuzz_dir/seeds/$target"
    rm -rf -- "$corpus"
    mkdir -p -- "$corpus"
    if [[ -d $seeds ]]; then
        cp -- "$seeds"/* "$corpus"/
    else
        echo "smoke.sh: warning: no seeds for $target in $seeds" >&2
    fi

    log="$logs/$target.log"
    echo "fuzz $target: fuzzing for $seconds s (log: $log)" >&2
    status=0
    "${fuzz[@]}" run "${flags[@]}" --fuzz-dir "$fuzz_dir" "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?

    if [[ $status -ne 0 ]]; then
        keep_logs=1
        # libFuzzer: "artifact_prefix='...'; Test unit written to <path>".
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        tail -n 60 "$log" >&2
        echo >&2
        if [[ -n $artifact ]]; then
            [[ $artifact = /* ]] || artifact="$PWD/$artifact"
            echo "fuzz $target: FINDING (exit status $status); artifact: $artifact" >&2
            echo "reproduce: cargo +nightly fuzz run ${flags[*]} --fuzz-dir $fuzz_dir $target $artifact" >&2
        else
            echo "fuzz $target: cargo fuzz run failed (exit status $status), no artifact; log: $log" >&2
        fi
        exit 1
    fi

    runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)
    # libFuzzer's last words: "Done <N> runs in <S> second(s)".
    secs=$(sed -n 's/^Done [0-9][0-9]* runs in \([0-9][0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    if [[ -z $runs ]]; then
        keep_logs=1
        tail -n 20 "$log" >&2
        echo "fuzz $target: no final stats in the log ($log)" >&2
        exit 1
    fi
    echo "fuzz $target: $runs executions in ${secs:-$seconds} s, no findings"
done
