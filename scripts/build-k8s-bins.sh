#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl, etcd, etcdctl and helm from the Go module
# proxy, using the pinned wrapper modules in tests/e2e/k8s-bins/. Outputs go to a cache outside git,
# keyed by the wrapper modules' content, so a second run takes seconds. Prints the bin directory.
#   K8S_E2E_CACHE   cache root (default ~/.cache/secrets-webhook-e2e)
#   --no-build      only print the directory if it is already built; else exit 3
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
mods="$repo/tests/e2e/k8s-bins"
K8S_VERSION=v1.37.2
key=$(cat "$mods"/go.mod "$mods"/go.sum "$mods"/etcd/go.mod "$mods"/etcd/go.sum "$mods"/helm/go.mod "$mods"/helm/go.sum "$0" | sha256sum | cut -c1-16)
cache="${K8S_E2E_CACHE:-$HOME/.cache/secrets-webhook-e2e}"
bin="$cache/bin-$K8S_VERSION-$key"
want=(kube-apiserver kube-controller-manager kubectl etcd etcdctl helm)
have=1
for b in "${want[@]}"; do [ -x "$bin/$b" ] || have=0; done
if [ "$have" = 1 ]; then echo "$bin"; exit 0; fi
if [ "${1:-}" = --no-build ]; then
  echo "build-k8s-bins: not built yet ($bin); run scripts/build-k8s-bins.sh (a cold build takes ~20 min)" >&2
  exit 3
fi

mkdir -p "$bin.tmp"
export CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldf="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitTreeState=clean"
build() { # dir out pkg [tags]
  local dir=$1 out=$2 pkg=$3 tags=${4:-}
  [ -x "$bin.tmp/$out" ] && return 0
  echo "building $out ($pkg)" >&2
  (cd "$dir" && go build -trimpath ${tags:+-tags "$tags"} -ldflags "$ldf" -o "$bin.tmp/$out" "$pkg") >&2
}
build "$mods" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver selinux,notest,grpcnotrace
build "$mods" kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager selinux,notest,grpcnotrace
build "$mods" kubectl k8s.io/kubernetes/cmd/kubectl
ldf="-s -w"
build "$mods/etcd" etcd go.etcd.io/etcd/server/v3
build "$mods/etcd" etcdctl go.etcd.io/etcd/etcdctl/v3
ldf="-s -w -X helm.sh/helm/v4/internal/version.version=v4.3.2"
build "$mods/helm" helm helm.sh/helm/v4/cmd/helm
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "$bin"
