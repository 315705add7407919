#!/usr/bin/env bash
# Mutation testing of the security-critical code with cargo-mutants (docs/testing.md, "Mutation
# testing"). Each scope mutates a few files and runs only the test targets that exercise them
# without a cluster (the real-apiserver tests, tests/e2e.rs and tests/isolation.rs, are too slow
# to run once per mutant).
#
#   bash scripts/mutants.sh guard identity    # the nightly scope (~20 min + ~2 h on 2 cores)
#   bash scripts/mutants.sh all               # every scope below, one after the other
#   bash scripts/mutants.sh authz refs ...    # some scopes
#
# Scopes: guard identity (stamps: its signed stamps alone; identity-rest: all but stamps) authz
# stores refs plan vault. Exits non-zero when a mutant survives ("missed"): a test is missing, or
# the mutant is harmless and belongs in .cargo/mutants.toml with the reason (docs/testing.md lists
# each). The vault scope needs OpenBao (BAO_BIN or .venv-bao).
#
# It mutates a detached git worktree of HEAD (target/mutants-tree, git-ignored), never the working
# tree: commit first. Builds go to their own target directory (MUTANTS_TARGET_DIR, default
# target/mutants-target), seeded once from target/debug without its incremental data, so only this
# crate is rebuilt per mutant. Never point it at the usual target directory: both trees are the
# same package to cargo, so a build of a mutated tree would look fresh to `cargo test` in the real
# one. One mutant at a time: the build dominates and the machine is small. cargo-mutants is
# installed once outside git, keyed by version.
# Results: target/mutants-out/<scope>/mutants.out/{caught,missed,timeout,unviable}.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

version=27.1.0
tools="${MUTANTS_TOOLS:-$HOME/.cache/secrets-webhook/cargo-mutants-$version}"
if [ ! -x "$tools/bin/cargo-mutants" ]; then
  cargo install cargo-mutants --version "$version" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$repo/target/mutants-target}"
# Cheaper mutants (docs/testing.md has the times): no debug info for this crate in the mutants
# target (the dependencies have none already, so the seeded ones stay fresh).
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0
# mold links when installed (MUTANTS_MOLD=0 to skip). `mold -run` swaps the linker under rustc, so
# RUSTFLAGS and with them the seeded dependencies' fingerprints stay as they are.
wrap=()
if [ "${MUTANTS_MOLD:-1}" != 0 ] && command -v mold >/dev/null; then
  wrap=(mold -run)
fi
if [ ! -d "$CARGO_TARGET_DIR/debug" ] && [ -d "$repo/target/debug/deps" ]; then
  mkdir -p "$CARGO_TARGET_DIR/debug"
  # -a keeps the modification times: cargo judges freshness by them, and a plain copy (new times,
  # in copy order) made cargo rebuild every dependency.
  cp -a "$repo/target/debug/deps" "$repo/target/debug/build" "$repo/target/debug/.fingerprint" \
    "$CARGO_TARGET_DIR/debug/"
fi
if [ -z "${BAO_BIN:-}" ] && [ -x .venv-bao/bin/bao ]; then
  export BAO_BIN="$repo/.venv-bao/bin/bao"
fi

tree="$repo/target/mutants-tree"
head=$(git rev-parse HEAD)
if [ ! -e "$tree/.git" ]; then
  git worktree add --detach "$tree" "$head" >/dev/null
fi
git -C "$tree" checkout --quiet --detach --force "$head"
git -C "$tree" clean --quiet -fd
# A run cut short (kill -9) leaves its last mutant in place: put HEAD back whatever happens.
trap 'git -C "$tree" checkout --quiet --force "$head"' EXIT

identity_rest() {
  for f in mod keys owner run_as trusted tokens; do printf -- ' -f src/identity/%s.rs' "$f"; done
}
tests_of() { for t in "$@"; do printf -- ' -C=--test=%s' "$t"; done; }

# The files (or functions, -F) mutated, and the integration test targets run for them.
scope() {
  case "$1" in
    guard) echo "-f src/admission/guard.rs $(tests_of authz admission secret_fields)" ;;
    stamps) echo "-f src/identity/stamps.rs $(tests_of authz admission)" ;;
    identity) echo "-f src/identity/stamps.rs $(identity_rest) $(tests_of authz admission cluster api_cluster)" ;;
    # identity without stamps (which has its own scope): keys, owner, run-as, trusted controllers,
    # executor resolution and TokenReview (tokens.rs: the management API's callers, through
    # api_cluster; the broker's are in the cluster-only tests).
    identity-rest) echo "$(identity_rest) $(tests_of authz admission cluster api_cluster)" ;;
    authz) echo "-f src/authz/ras.rs -f src/authz/sar.rs -f src/authz/cache.rs -f src/authz/mod.rs \
      $(tests_of authz)" ;;
    stores) echo "-f src/backends/kubernetes.rs -f src/backends/local.rs \
      $(tests_of kube_stores cluster admission)" ;;
    refs) echo "-f src/refs/mod.rs $(tests_of admission)" ;;
    plan) echo "-f src/plan/mod.rs $(tests_of admission)" ;;
    vault) echo "-f src/backends/vault/materialize.rs -f src/backends/vault/mod.rs \
      $(tests_of vault cluster leaks)" ;;
    *) echo "unknown scope $1 (guard stamps identity identity-rest authz stores refs plan vault all)" >&2; exit 2 ;;
  esac
}

scopes=("$@")
[ ${#scopes[@]} -gt 0 ] || scopes=(guard identity)
[ "${scopes[0]}" != all ] || scopes=(guard identity authz stores refs plan vault)
failed=0
count() { cat "$@" 2>/dev/null | grep -c . || true; }
for s in "${scopes[@]}"; do
  args=$(scope "$s")
  read -r -a argv <<<"$args"
  files=() tests=()
  for a in "${argv[@]}"; do
    case "$a" in -C=*) tests+=("$a") ;; *) files+=("$a") ;; esac
  done
  out="$repo/target/mutants-out/$s"
  rm -rf "$out"
  mkdir -p "$out"
  echo "== mutants: $s (HEAD $head)"
  started=$(date +%s)
  # Two passes, the same verdicts as one: a mutant is caught when any test fails. The unit tests
  # first (one build of the crate per mutant), then the scope's integration tests only for what
  # they missed (--iterate skips what is caught or unviable), as those need the library, the
  # binary and each test target rebuilt. The tests pass on HEAD (CI ran them): no baseline run.
  # A mutant that hangs is cut at 120 s.
  mutants() {
    (cd "$tree" && "${wrap[@]}" cargo mutants --in-place --baseline=skip --timeout 120 \
      --build-timeout 900 --output "$out" "${files[@]}" "$@")
  }
  o="$out/mutants.out"
  mutants -C=--lib || true
  caught=$(count "$o/caught.txt") unviable=$(count "$o/unviable.txt") lib_caught=$caught
  if [ ${#tests[@]} -gt 0 ] && [ -n "$(cat "$o/missed.txt" "$o/timeout.txt")" ]; then
    # Moves the first pass's results to mutants.out.old. Without --lib: those tests passed.
    mutants --iterate "${tests[@]}" || true
    caught=$(( caught + $(count "$o/caught.txt") ))
    unviable=$(( unviable + $(count "$o/unviable.txt") ))
  fi
  missed=$(count "$o/missed.txt") timeout=$(count "$o/timeout.txt")
  [ "$missed" = 0 ] && [ "$timeout" = 0 ] || failed=1
  echo "== $s: $(( $(date +%s) - started ))s; caught $caught (by unit tests $lib_caught), missed \
$missed, timeout $timeout, unviable $unviable"
done
exit "$failed"
