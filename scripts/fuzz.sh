#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of fuzz/ (libFuzzer) on stable Rust.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 300 s, every target)
#
# 0 seconds builds, replays the regressions and runs each corpus input once, without fuzzing.
# FUZZ_PROFILE=quick builds with fuzz/Cargo.toml's quicker profile (./test.sh's short runs).
#
# Builds the fuzz crate in release mode with the instrumentation cargo-fuzz passes (minus its
# nightly-only AddressSanitizer; the targets' unsafe code is the project's own few blocks),
# in a target directory outside the clone. Then, for each target: replays every input under
# fuzz/regressions/TARGET/ (inputs that once crashed it), then fuzzes for SECONDS starting
# from fuzz/corpus/TARGET/, copied to a temporary directory so the committed corpus does not
# grow, with fuzz/dicts/TARGET.dict as its dictionary where there is one. Exits non-zero on
# the first crash (a panic, an abort, a run over 30 s or over 2 GiB), naming the target and
# the input that crashed it (saved under fuzz/artifacts/TARGET/, which git ignores); a crash
# found is fixed in the project's code and its input added to fuzz/regressions/TARGET/.
#
# The layout is cargo-fuzz's, so with a nightly toolchain and cargo-fuzz installed
# `cargo fuzz run TARGET` (from the repository's root) works on it too.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

seconds="${1:-300}"
shift || true
case "$seconds" in
    '' | *[!0-9]*) echo "fuzz.sh: SECONDS_PER_TARGET must be a number, not '$seconds'" >&2; exit 2 ;;
esac
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no fuzz target '$t' in fuzz/fuzz_targets" >&2; exit 2; }
done

# cargo-fuzz's flags (coverage level 4, 8-bit counters, PC table, comparisons traced for the
# mutator, stack depth), with debug assertions and overflow checks on. They must reach only
# the target's code, not build scripts or proc macros: hence an explicit --target.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/enspeed/fuzz-target}"
host="$(rustc -vV | sed -n 's/^host: //p')"
bins=()
for t in "${targets[@]}"; do
    bins+=(--bin "$t")
done
echo "fuzz.sh: building ${targets[*]}" >&2
profile="${FUZZ_PROFILE:-release}"
(cd fuzz && cargo build --profile "$profile" --target "$host" "${bins[@]}" ${FUZZ_CARGO_FLAGS:-})
bindir="$CARGO_TARGET_DIR/$host/$profile"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

crashed() {
    echo "fuzz.sh: target $1 crashed on $2" >&2
    exit 1
}

for t in "${targets[@]}"; do
    bin="$bindir/$t"
    artifacts="$root/fuzz/artifacts/$t"
    mkdir -p "$artifacts"
    regressions=()
    if [ -d "fuzz/regressions/$t" ]; then
        while IFS= read -r -d '' f; do
            regressions+=("$f")
        done < <(find "fuzz/regressions/$t" -type f -print0 | sort -z)
    fi
    if [ ${#regressions[@]} -gt 0 ]; then
        echo "fuzz.sh: $t: replaying ${#regressions[@]} regression inputs" >&2
        for f in "${regressions[@]}"; do
            "$bin" -rss_limit_mb=2048 -timeout=30 "$f" >"$work/replay.log" 2>&1 || {
                tail -n 40 "$work/replay.log" >&2
                crashed "$t" "$root/$f"
            }
        done
    fi

    corpus="$work/corpus-$t"
    mkdir -p "$corpus"
    [ -d "fuzz/corpus/$t" ] && cp -r "fuzz/corpus/$t/." "$corpus/"
    seeds=("$corpus")
    [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
    echo "fuzz.sh: $t: fuzzing for $seconds s" >&2
    log="$work/$t.log"
    # libFuzzer takes a total time of 0 as no limit at all.
    if [ "$seconds" -eq 0 ]; then
        limit=-runs=0
    else
        limit=-max_total_time="$seconds"
    fi
    # A target whose input is text has the words it is made of in fuzz/dicts/TARGET.dict.
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
    status=0
    "$bin" "$limit" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 "${dict[@]}" \
        -artifact_prefix="$artifacts/" "${seeds[@]}" >"$log" 2>&1 || status=$?
    # The coverage and speed libFuzzer reached: its last status line and final statistics.
    grep -E '^#[0-9]+\s+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 >&2 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added)' "$log" >&2 || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log" >&2
        input="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        crashed "$t" "${input:-(no input saved; see the log above)}"
    fi
done
echo "fuzz.sh: ${#targets[@]} targets ran ${seconds} s each, no crash" >&2
echo "fuzz: ${#targets[@]} passed, 0 failed"
