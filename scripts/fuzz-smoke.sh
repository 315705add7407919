#!/usr/bin/env bash
# CI smoke run of the cargo-fuzz targets (docs/fuzzing.md): builds them and runs each for a short,
# bounded time, starting from the committed seeds. Fails on any crash, panic or invariant failure.
#
#   scripts/fuzz-smoke.sh                 # 20 s per target
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh
#
# Needs: a Rust toolchain (stable works: RUSTC_BOOTSTRAP=1 unlocks the nightly-only flags
# cargo-fuzz passes), a C++ compiler (libfuzzer-sys builds libFuzzer), network to crates.io the
# first time. Installs cargo-fuzz (pinned) the first time (about 1-2 minutes of compiling).
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
targets=(review_decode refs_grammar plan_patch)
export RUSTC_BOOTSTRAP=1
# Fuzz builds use other flags than the main crate's: keep them out of its target dir.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"

# cargo-fuzz, pinned and installed once outside git, keyed by version (FUZZ_TOOLS moves it).
version=0.13.2
tools="${FUZZ_TOOLS:-$HOME/.cache/secrets-webhook/cargo-fuzz-$version}"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
    echo "installing cargo-fuzz $version"
    # Built in cargo's own temporary directory, not the fuzz target dir.
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version "$version" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"

# Debug build without a sanitizer: the crate forbids `unsafe`, so AddressSanitizer adds little,
# and a release ASan build of this dependency tree takes ~20 CPU-minutes; panics and invariant
# failures are caught either way. FUZZ_BUILD_FLAGS="" gives the full optimized ASan build.
read -r -a build_flags <<< "${FUZZ_BUILD_FLAGS---dev --sanitizer none}"
cargo fuzz build "${build_flags[@]}"

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
    cargo fuzz run "${build_flags[@]}" "$target" "$corpus" "seeds/$target" -- \
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
