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
# The three Kubernetes commands in one `go build`: the packages they share are compiled once and the
# three links run in parallel (one invocation each left the second core idle during every link).
# All three get the release build's tags (kubectl included, as upstream builds it). Outputs already
# in $bin.tmp (a run cut short) are not rebuilt.
k8s=(kube-apiserver kube-controller-manager kubectl)
need=0
for b in "${k8s[@]}"; do [ -x "$bin.tmp/$b" ] || need=1; done
if [ "$need" = 1 ]; then
  echo "building ${k8s[*]}" >&2
  (cd "$mods" && go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldf" -o "$bin.tmp/" \
    "${k8s[@]/#/k8s.io/kubernetes/cmd/}") >&2
fi
build() { # dir out pkg ldflags
  [ -x "$bin.tmp/$2" ] && return 0
  echo "building $2 ($3)" >&2
  (cd "$1" && go build -trimpath -ldflags "$4" -o "$bin.tmp/$2" "$3") >&2
}
build "$mods/etcd" etcd go.etcd.io/etcd/server/v3 "-s -w"
build "$mods/etcd" etcdctl go.etcd.io/etcd/etcdctl/v3 "-s -w"
build "$mods/helm" helm helm.sh/helm/v4/cmd/helm "-s -w -X helm.sh/helm/v4/internal/version.version=v4.3.2"
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "$bin"
