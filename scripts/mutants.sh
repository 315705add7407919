#!/usr/bin/env bash
# Mutation testing of the security-critical code with cargo-mutants (docs/testing.md, "Mutation
# testing"). Each scope mutates a few files and runs only the test targets that exercise them.
#
#   bash scripts/mutants.sh guard           # the guard: small enough for CI
#   bash scripts/mutants.sh all             # every scope below, one after the other (nightly)
#   bash scripts/mutants.sh authz refs ...  # some scopes
#
# Scopes: guard identity authz stores refs plan vault. Exits non-zero when a mutant survives (is
# "missed"): either a test is missing, or the mutant is harmless and belongs in .cargo/mutants.toml
# with the reason. Needs OpenBao for the vault scope (BAO_BIN or .venv-bao, as `cargo test`).
#
# cargo-mutants is installed once, outside git, keyed by version; its builds go to their own
# target directory (MUTANTS_TARGET_DIR, default target/mutants) so they neither wait for nor undo
# the usual `cargo test` build. One job at a time: the build dominates and the machine is small.
set -euo pipefail
cd "$(dirname "$0")/.."

version=27.1.0
tools="${MUTANTS_TOOLS:-$HOME/.cache/secrets-webhook/cargo-mutants-$version}"
if [ ! -x "$tools/bin/cargo-mutants" ]; then
  cargo install cargo-mutants --version "$version" --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$PWD/target/mutants}"
if [ -z "${BAO_BIN:-}" ] && [ -x .venv-bao/bin/bao ]; then
  export BAO_BIN="$PWD/.venv-bao/bin/bao"
fi

scope() {
  case "$1" in
    guard) echo "-f src/admission/guard.rs -C=--lib -C=--test=authz -C=--test=admission" ;;
    identity) echo "-f src/admission/identity.rs -C=--lib -C=--test=authz -C=--test=cluster" ;;
    authz) echo "-f src/authz/ras.rs -f src/authz/sar.rs -f src/authz/cache.rs -f src/authz/mod.rs -C=--lib -C=--test=authz" ;;
    stores) echo "-f src/backends/kubernetes.rs -f src/backends/local.rs -C=--lib -C=--test=kube_stores -C=--test=admission" ;;
    refs) echo "-f src/refs/mod.rs -C=--lib -C=--test=admission" ;;
    plan) echo "-f src/plan/mod.rs -F generated_name|spark_var|legacy_var|declare_before|EnvEditor.*position|set_reference|without_confs|secret_var|conf_args -C=--lib -C=--test=admission" ;;
    vault) echo "-f src/backends/vault/mod.rs -f src/backends/vault/materialize.rs -F deliver|write|ensure|check_credential_refs|bundle_of|conn|upsert|retain|remove|is_definitive|available -C=--lib -C=--test=vault -C=--test=cluster -C=--test=leaks" ;;
    *) echo "unknown scope $1 (guard identity authz stores refs plan vault all)" >&2; exit 2 ;;
  esac
}

scopes=("$@")
[ ${#scopes[@]} -gt 0 ] || scopes=(guard)
[ "${scopes[0]}" != all ] || scopes=(guard identity authz stores refs plan vault)
failed=0
for s in "${scopes[@]}"; do
  # shellcheck disable=SC2046 # the scope's words are separate arguments on purpose
  args=$(scope "$s")
  read -r -a argv <<<"$args"
  echo "== mutants: $s ($args)"
  out="target/mutants-out/$s"
  mkdir -p "$out"
  started=$(date +%s)
  if ! cargo mutants -j 1 --timeout 180 -o "$out" "${argv[@]}"; then
    failed=1
  fi
  echo "== $s: $(( $(date +%s) - started ))s; missed: $(wc -l < "$out/mutants.out/missed.txt")"
done
exit "$failed"
