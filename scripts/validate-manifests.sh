#!/usr/bin/env bash
# Renders every kustomization under manifests/ (base, overlays, each component on top of an
# overlay) and the Helm chart charts/secrets-webhook (in each mode), and validates the output and
# the example manifests:
#   - Kubernetes kinds against the API's OpenAPI schemas (kubernetes-validate --strict, which also
#     rejects unknown fields);
#   - secrets.iomete.com objects (VaultConfig, ResourceBundle) against the CRDs in manifests/base/crds;
#   - cert-manager and spark-operator kinds are not checked (no schema here): listed, not failed.
# Exits non-zero on the first invalid manifest or rendering error.
#
# Needs: kubectl with built-in kustomize (v5; Debian's kubernetes-client 1.20 is too old for
# components) and helm (both built by scripts/build-k8s-bins.sh), python3, and `pip install kubernetes-validate==1.37.0` (brings PyYAML and jsonschema).
# K8S_VERSIONS selects the schemas (default: 1.30.0, the oldest supported — matchConditions GA and the
# preStop sleep action — and 1.33.0, the API level the code is built against).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
k8s_versions="${K8S_VERSIONS:-1.30.0 1.33.0}"

die() { echo "validate-manifests: $*" >&2; exit 1; }
command -v kubectl >/dev/null || die "kubectl not found (it renders the kustomizations)"
command -v kubernetes-validate >/dev/null || die "kubernetes-validate not found: pip install kubernetes-validate==1.37.0"

# Scratch space inside the repo: kustomize refuses absolute paths to other kustomizations.
work="$(mktemp -d "$root/manifests/.validate.XXXXXX")"
trap 'rm -rf "$work"' EXIT
out="$work/rendered"
mkdir -p "$out"

render() { # render NAME DIR
  echo "render $1"
  kubectl kustomize "$2" > "$out/$1.yaml" || die "kubectl kustomize $2 failed"
  [ -s "$out/$1.yaml" ] || die "kubectl kustomize $2 rendered nothing"
}

render base "$root/manifests/base"
for overlay in "$root"/manifests/overlays/*/; do
  render "overlay-$(basename "$overlay")" "$overlay"
done
# Each component on top of the self-managed overlay, the way an installation would use it.
for component in "$root"/manifests/components/*/; do
  name="$(basename "$component")"
  dir="$work/with-$name"
  mkdir -p "$dir"
  cat > "$dir/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../overlays/self-managed]
components: [../../components/$name]
YAML
  render "component-$name" "$dir"
done

# The Helm chart (generated from these manifests, tests/chart.rs), rendered with each mode's values.
command -v helm >/dev/null || die "helm not found (scripts/build-k8s-bins.sh builds it)"
chart_render() { # NAME helm-args...
  local name=$1; shift
  echo "render chart $name"
  HELM_CACHE_HOME="$work/helm" HELM_CONFIG_HOME="$work/helm" HELM_DATA_HOME="$work/helm" \
    helm template secrets-webhook "$root/charts/secrets-webhook" --namespace iomete-system --include-crds "$@" \
    > "$out/chart-$name.yaml" || die "helm template ($name) failed"
}
chart_render cert-manager
chart_render self-managed --set certificate.mode=self-managed --set webhook.caBundle=UkVQTEFDRS1NRQ==
chart_render feature-disabled-sar --set features.secretsV2.enabled=false --set authorizer=subject-access-review \
  --set webhook.url=https://webhook.example.com:8443/mutate

examples=()
for f in "$root"/examples/*.yaml; do
  # Only Kubernetes objects (the JupyterHub Helm values and the local dev config are not).
  if grep -q '^apiVersion:' "$f" && grep -q '^kind:' "$f"; then examples+=("$f"); fi
done

for version in $k8s_versions; do
  echo "kubernetes-validate --strict against Kubernetes $version"
  status=0
  kubernetes-validate --strict --quiet -k "$version" "$out"/*.yaml "${examples[@]}" > "$work/kv.log" 2>&1 \
    || status=$?
  # Kinds without a schema here (cert-manager, spark-operator) only warn: list the other lines.
  # The CRDs' own kinds are checked below.
  grep -v "Couldn't find schema for kind \(Certificate\|Issuer\|SparkApplication\|VaultConfig\|ResourceBundle\) " \
    "$work/kv.log" || true
  [ "$status" -eq 0 ] || die "a manifest does not match the Kubernetes $version schema (see ERROR lines above)"
done

python3 "$root/scripts/validate_custom_resources.py" "$root/manifests/base/crds" "$out"/*.yaml "${examples[@]}" \
  || die "a custom resource does not match its CRD"

echo "validate-manifests: all manifests valid"
