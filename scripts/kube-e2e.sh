#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 with secrets-webhook installed, for end-to-end tests
# and for trying the webhook by hand (docs/testing.md, "The real control plane").
#
#   scripts/kube-e2e.sh up      etcd, kube-apiserver, kube-controller-manager, the project's Helm
#                               chart, the webhook as a local process; prints `export KUBECONFIG=…`
#   scripts/kube-e2e.sh down    stops what `up` started (by process id) and removes the state
#   scripts/kube-e2e.sh env     prints the exports again
#   scripts/kube-e2e.sh webhook-stop | webhook-start
#                               stop, or (re)start, the webhook process only (the way a kubelet
#                               would restart the Deployment's pod after an upgrade)
#
# Environment:
#   KUBE_E2E_DIR        state directory (default <repo>/.kube-e2e, git-ignored)
#   KUBE_E2E_BIN        directory with kube-apiserver, kube-controller-manager, kubectl, etcd, helm
#                       (default: what scripts/build-k8s-bins.sh prints; it builds them if needed)
#   KUBE_E2E_NO_BUILD   1: never build the binaries; exit 3 when they are not built
#   WEBHOOK_BIN         the secrets-webhook binary (default: `cargo build` and target/debug)
#   KUBE_E2E_OWNER_PID  when that process exits, `down` runs by itself (the test harness sets it)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$repo/scripts/kube-e2e.sh"
state="${KUBE_E2E_DIR:-$repo/.kube-e2e}"
NS=iomete-system

die() { echo "kube-e2e: $*" >&2; exit 1; }
log() { echo "kube-e2e: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# processes: started detached (own session), stopped by the pid recorded at start

start_proc() { # name binary args...
  local name=$1; shift
  setsid "$@" > "$state/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/pids/$name"
  echo "$1" > "$state/pids/$name.exe"
}

# The pid still runs the binary we started (pids are recycled).
proc_alive() { # name
  local pidf="$state/pids/$1" pid exe
  [ -f "$pidf" ] || return 1
  pid=$(cat "$pidf")
  [ -d "/proc/$pid" ] || return 1
  exe=$(cat "$pidf.exe" 2>/dev/null || true)
  [ -z "$exe" ] || { tr '\0' '\n' < "/proc/$pid/cmdline"; } 2> /dev/null | head -1 | grep -qxF "$exe"
}

stop_proc() { # name
  local name=$1 pid i
  if proc_alive "$name"; then
    pid=$(cat "$state/pids/$name")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      proc_alive "$name" || break
      sleep 0.1
    done
    if proc_alive "$name"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$state/pids/$name" "$state/pids/$name.exe"
}

free_ports() { # n: prints n distinct free TCP ports on 127.0.0.1
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# An HTTP GET that succeeds on a 2xx (python3 rather than curl: one tool less to need).
http_ok() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"
}

wait_for() { # what seconds command...  (what = a process name from start_proc: fail early if it died)
  local what=$1 secs=$2; shift 2
  local until=$(( $(date +%s) + secs ))
  until "$@" > /dev/null 2>&1; do
    [ "$(date +%s)" -lt "$until" ] || { log "$what: not within ${secs}s"; return 1; }
    if [ -f "$state/pids/$what.exe" ] && ! proc_alive "$what"; then log "$what exited"; return 1; fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------------------------
# certificates (openssl; ECDSA P-256)

pki() {
  local d="$state/pki"
  mkdir -p "$d"
  key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2> /dev/null; }
  ca() { # name cn
    key "$d/$1.key"
    openssl req -x509 -new -key "$d/$1.key" -sha256 -days 30 -subj "/CN=$2" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$d/$1.crt" 2> /dev/null
  }
  leaf() { # name ca subject extensions...
    local name=$1 ca=$2 subj=$3; shift 3
    key "$d/$name.key"
    openssl req -new -key "$d/$name.key" -subj "$subj" -out "$d/$name.csr" 2> /dev/null
    printf '%s\n' "$@" > "$d/$name.ext"
    openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.crt" -CAkey "$d/$ca.key" -CAcreateserial \
      -days 30 -sha256 -extfile "$d/$name.ext" -out "$d/$name.crt" 2> /dev/null
    rm -f "$d/$name.csr" "$d/$name.ext"
  }
  ca ca "kube-e2e CA"
  leaf apiserver ca "/CN=kube-apiserver" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  leaf admin ca "/O=system:masters/CN=kube-e2e-admin" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
  leaf controller-manager ca "/CN=system:kube-controller-manager" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
  # Service-account token signing key.
  key "$d/sa.key"
  openssl ec -in "$d/sa.key" -pubout -out "$d/sa.pub" 2> /dev/null
  # The webhook's own CA and serving certificate (the caBundle of its registration), for the
  # address the API server calls.
  ca webhook-ca "secrets-webhook e2e CA"
  leaf webhook webhook-ca "/CN=secrets-webhook.$NS.svc" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:secrets-webhook.$NS.svc"
}

kubeconfig() { # file server user-entry-yaml
  cat > "$1" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: kube-e2e
  cluster:
    server: $2
    certificate-authority: $state/pki/ca.crt
users:
- name: user
  user:
$3
contexts:
- name: kube-e2e
  context: {cluster: kube-e2e, user: user}
current-context: kube-e2e
YAML
}

# ---------------------------------------------------------------------------------------------

bins() {
  if [ -n "${KUBE_E2E_BIN:-}" ]; then echo "$KUBE_E2E_BIN"; return; fi
  if [ "${KUBE_E2E_NO_BUILD:-}" = 1 ]; then
    bash "$repo/scripts/build-k8s-bins.sh" --no-build
  else
    bash "$repo/scripts/build-k8s-bins.sh"
  fi
}

webhook_bin() {
  if [ -n "${WEBHOOK_BIN:-}" ]; then echo "$WEBHOOK_BIN"; return; fi
  (cd "$repo" && cargo build --quiet --bin secrets-webhook >&2)
  echo "${CARGO_TARGET_DIR:-$repo/target}/debug/secrets-webhook"
}

print_env() {
  [ -f "$state/env" ] || die "not up (no $state/env); run: scripts/kube-e2e.sh up"
  cat "$state/env"
}

cmd_webhook_stop() {
  stop_proc webhook
}

# Starts the webhook the way the kubelet would run the installed Deployment's pod: its args, env
# and mounted Secret/ConfigMap files as stored in the API, its ServiceAccount's token.
cmd_webhook_start() {
  # shellcheck disable=SC1091
  . "$state/vars"
  stop_proc webhook
  python3 "$repo/scripts/kube_e2e_pod.py" "$state" "$NS" secrets-webhook > "$state/webhook.cmd"
  mapfile -d '' argv < "$state/webhook.cmd"
  [ "${#argv[@]}" -gt 0 ] || die "could not read the webhook Deployment"
  # The pod's listen addresses are its own (0.0.0.0:8443/8080); here they are free local ports.
  # `env -i`: nothing from this shell (no in-cluster variables); `env` execs the webhook.
  start_proc webhook env -i PATH="$PATH" HOME="$state" KUBECONFIG="$state/webhook.kubeconfig" \
    RUST_LOG="${WEBHOOK_RUST_LOG:-info}" "${argv[@]}" \
    --listen "127.0.0.1:$WEBHOOK_PORT" --admin-listen "127.0.0.1:$WEBHOOK_ADMIN_PORT"
  echo "$webhook" > "$state/pids/webhook.exe"
  wait_for webhook 60 http_ok "http://127.0.0.1:$WEBHOOK_ADMIN_PORT/readyz" || true
}

registered() { # the API server calls the webhook: a direct reference to a managed store is denied
  local rc=0
  "$bin/kubectl" --kubeconfig "$state/admin.kubeconfig" -n "$NS" create --dry-run=server -o name -f - \
    > /dev/null 2> "$state/probe.err" <<YAML || rc=$?
apiVersion: v1
kind: Pod
metadata: {name: kube-e2e-probe}
spec:
  containers:
  - name: c
    image: busybox
    env:
    - name: X
      valueFrom: {secretKeyRef: {name: iomete-secret-store-kube-e2e-probe, key: probe}}
YAML
  [ "$rc" != 0 ] && grep -q 'admission webhook "pods.secrets.iomete.com" denied' "$state/probe.err"
}

cmd_up() {
  if [ -f "$state/env" ] && proc_alive apiserver; then
    log "already up ($state)"; print_env; return 0
  fi
  rm -rf "$state"
  mkdir -p "$state/pids" "$state/logs" "$state/etcd"
  # A failed `up` stops what it started and keeps the logs.
  trap 'rc=$?; if [ "$rc" != 0 ]; then log "up failed; stopped what it started, logs in $state/logs"; stop_all; fi' EXIT
  bin=$(bins) || { rc=$?; [ "$rc" = 3 ] && exit 3; die "no Kubernetes binaries (scripts/build-k8s-bins.sh failed)"; }
  local webhook
  webhook=$(webhook_bin)
  [ -x "$webhook" ] || die "no webhook binary at $webhook"
  command -v openssl > /dev/null || die "openssl is needed to generate the certificates"

  read -r ETCD_PORT ETCD_PEER_PORT API_PORT WEBHOOK_PORT WEBHOOK_ADMIN_PORT <<< "$(free_ports 5)"
  cat > "$state/vars" <<VARS
bin=$bin
webhook=$webhook
ETCD_PORT=$ETCD_PORT
API_PORT=$API_PORT
WEBHOOK_PORT=$WEBHOOK_PORT
WEBHOOK_ADMIN_PORT=$WEBHOOK_ADMIN_PORT
VARS
  pki
  local server="https://127.0.0.1:$API_PORT"
  kubeconfig "$state/admin.kubeconfig" "$server" "    client-certificate: $state/pki/admin.crt
    client-key: $state/pki/admin.key"
  kubeconfig "$state/controller-manager.kubeconfig" "$server" "    client-certificate: $state/pki/controller-manager.crt
    client-key: $state/pki/controller-manager.key"

  if [ -n "${KUBE_E2E_OWNER_PID:-}" ]; then
    # Runs `down` once the owner (a test binary) exits, however it exits.
    setsid bash -c 'while kill -0 "$1" 2> /dev/null; do sleep 1; done; exec bash "$2" down' \
      _ "$KUBE_E2E_OWNER_PID" "$self" > /dev/null 2>&1 < /dev/null &
    echo $! > "$state/pids/watchdog"
  fi

  log "etcd on 127.0.0.1:$ETCD_PORT"
  start_proc etcd "$bin/etcd" --data-dir="$state/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="default=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level=warn
  wait_for etcd 30 http_ok "http://127.0.0.1:$ETCD_PORT/health" || { tail -20 "$state/logs/etcd.log" >&2; exit 1; }

  # Audit: every request of the webhook's ServiceAccount (metadata only: never a body), so tests
  # can check that each call it makes is allowed by the shipped RBAC.
  cat > "$state/audit-policy.yaml" <<YAML
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["system:serviceaccount:$NS:secrets-webhook"]
- level: None
YAML
  log "kube-apiserver on $server"
  start_proc apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$API_PORT" --advertise-address=127.0.0.1 \
    --cert-dir="$state/pki" \
    --tls-cert-file="$state/pki/apiserver.crt" --tls-private-key-file="$state/pki/apiserver.key" \
    --client-ca-file="$state/pki/ca.crt" \
    --service-account-issuer="$server" \
    --service-account-key-file="$state/pki/sa.pub" \
    --service-account-signing-key-file="$state/pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --profiling=false \
    --audit-policy-file="$state/audit-policy.yaml" --audit-log-path="$state/logs/audit.log" \
    --v=1
  local admin=("$bin/kubectl" --kubeconfig "$state/admin.kubeconfig")
  wait_for apiserver 120 "${admin[@]}" get --raw /readyz \
    || { tail -30 "$state/logs/apiserver.log" >&2; exit 1; }

  log "kube-controller-manager (garbage collector, namespaces, service accounts and their tokens)"
  start_proc controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$state/controller-manager.kubeconfig" \
    --controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller \
    --service-account-private-key-file="$state/pki/sa.key" \
    --root-ca-file="$state/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --secure-port=0 --v=1

  "${admin[@]}" create namespace "$NS" > /dev/null
  wait_for "ServiceAccount $NS/default" 60 "${admin[@]}" -n "$NS" get serviceaccount default \
    || { tail -30 "$state/logs/controller-manager.log" >&2; exit 1; }

  install_manifests

  # The ServiceAccount's own token, as the kubelet would mount it: the webhook has exactly the
  # RBAC that the manifests grant it.
  local sa token
  sa=$("${admin[@]}" -n "$NS" get deployment secrets-webhook -o jsonpath='{.spec.template.spec.serviceAccountName}')
  token=$("${admin[@]}" -n "$NS" create token "$sa" --duration=24h)
  kubeconfig "$state/webhook.kubeconfig" "$server" "    token: $token"
  chmod 600 "$state/webhook.kubeconfig"

  cmd_webhook_start
  http_ok "http://127.0.0.1:$WEBHOOK_ADMIN_PORT/readyz" > /dev/null \
    || { tail -30 "$state/logs/webhook.log" >&2; die "the webhook did not become ready"; }
  wait_for "webhook registration" 60 registered \
    || { cat "$state/probe.err" >&2; die "the API server does not call the webhook"; }

  cat > "$state/env" <<ENV
export KUBECONFIG=$state/admin.kubeconfig
export KUBE_E2E_DIR=$state
export KUBE_E2E_BIN=$bin
export KUBE_E2E_WEBHOOK_ADMIN=http://127.0.0.1:$WEBHOOK_ADMIN_PORT
ENV
  log "up: webhook https://127.0.0.1:$WEBHOOK_PORT/mutate, metrics http://127.0.0.1:$WEBHOOK_ADMIN_PORT/metrics, logs $state/logs/"
  print_env
}

# The project's chart (generated from manifests/, docs/install.md) in self-managed certificate mode,
# changed only in the webhook's clientConfig: a local URL and the caBundle of its certificate. The
# TLS Secret is created as the install docs say; the local webhook process reads it from the API
# like a kubelet mounting it.
install_manifests() {
  local admin=("$bin/kubectl" --kubeconfig "$state/admin.kubeconfig")
  "${admin[@]}" -n "$NS" create secret tls secrets-webhook-tls \
    --cert="$state/pki/webhook.crt" --key="$state/pki/webhook.key" > /dev/null
  # The stamp signing key, created as docs/install.md says.
  "${admin[@]}" -n "$NS" create secret generic secrets-webhook-signing-key \
    --from-literal=current="$(head -c 32 /dev/urandom | base64)" > /dev/null
  helm upgrade --install secrets-webhook "$repo/charts/secrets-webhook" --namespace "$NS" \
    --set certificate.mode=self-managed \
    --set webhook.url="https://127.0.0.1:$WEBHOOK_PORT/mutate" \
    --set webhook.caBundle="$(base64 -w0 < "$state/pki/webhook-ca.crt")" \
    > "$state/logs/helm.log"
}

helm() {
  HELM_CACHE_HOME="$state/helm/cache" HELM_CONFIG_HOME="$state/helm/config" HELM_DATA_HOME="$state/helm/data" \
    "$bin/helm" --kubeconfig "$state/admin.kubeconfig" "$@"
}

stop_all() {
  for p in webhook controller-manager apiserver etcd; do stop_proc "$p"; done
}

cmd_down() {
  [ -d "$state" ] || return 0
  stop_all
  # The watchdog may be the caller: stop it last, and not ourselves.
  if [ -f "$state/pids/watchdog" ] && [ "$(cat "$state/pids/watchdog")" != "$$" ] \
     && [ "$(cat "$state/pids/watchdog")" != "$PPID" ]; then
    kill "$(cat "$state/pids/watchdog")" 2> /dev/null || true
  fi
  rm -rf "$state"
  log "down"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) print_env ;;
  webhook-stop) cmd_webhook_stop ;;
  webhook-start)
    # shellcheck disable=SC1091
    . "$state/vars"; cmd_webhook_start ;;
  *) echo "usage: $0 up | down | env | webhook-stop | webhook-start" >&2; exit 2 ;;
esac
