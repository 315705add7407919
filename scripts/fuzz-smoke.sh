#!/usr/bin/env bash
# CI smoke run of the cargo-fuzz targets (docs/fuzzing.md): builds them and runs each for a short,
# bounded time, starting from the committed seeds. Fails on any crash, panic or invariant failure.
#
#   scripts/fuzz-smoke.sh                 # 20 s per target
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh
#
# Needs: a Rust toolchain (stable works: RUSTC_BOOTSTRAP=1 unlocks the nightly-only flags
# cargo-fuzz passes), a C++ compiler (libfuzzer-sys builds libFuzzer), network to crates.io the
# first time. Installs cargo-fuzz if missing (about 1-2 minutes of compiling).
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
targets=(review_decode refs_grammar plan_patch)
export RUSTC_BOOTSTRAP=1
# Fuzz builds use other flags than the main crate's: keep them out of its target dir.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cargo fuzz build

status=0
for target in "${targets[@]}"; do
    corpus="$(mktemp -d)"
    dict=()
    if [[ -f "dicts/$target.dict" ]]; then
        dict=("-dict=dicts/$target.dict")
    fi
    echo "== $target: ${seconds}s"
    log="$corpus.log"
    rc=0
    cargo fuzz run "$target" "$corpus" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 "${dict[@]}" >"$log" 2>&1 || rc=$?
    grep -E '^Done [0-9]+ runs' "$log" || true
    if [[ "$rc" -ne 0 ]]; then
        grep -E -A20 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -60 || true
        echo "== $target FAILED: input saved in fuzz/artifacts/$target/ (replay: cargo fuzz run $target <file>)"
        status=1
    fi
    rm -f "$log"
    rm -rf "$corpus"
done
exit "$status"
