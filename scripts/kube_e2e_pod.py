#!/usr/bin/env python3
"""Prints the command line of a Deployment's container, as a kubelet would run it, NUL-separated.

Used by scripts/kube-e2e.sh to run the installed webhook Deployment as a local process (there is no
kubelet): the container's args with $(VAR) expanded from its env, its env (values, fieldRefs,
Secret and ConfigMap keys) as VAR=value words for `env`, and its Secret and ConfigMap volumes
written from the API into <state>/mounts/<volume>/, with the mount paths in args and env rewritten
to those directories. The image's entrypoint is the webhook binary (see the Dockerfile).

usage: kube_e2e_pod.py STATE_DIR NAMESPACE DEPLOYMENT  (reads bin= and webhook= from STATE_DIR/vars)
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

POD_NAME = "secrets-webhook-local"


def main():
    state, ns, name = sys.argv[1:4]
    vars_ = dict(
        line.split("=", 1) for line in open(os.path.join(state, "vars")).read().splitlines() if "=" in line
    )
    kubectl = [os.path.join(vars_["bin"], "kubectl"), "--kubeconfig", os.path.join(state, "admin.kubeconfig")]

    def get(kind, obj, optional=False):
        out = subprocess.run(kubectl + ["-n", ns, "get", kind, obj, "-o", "json"], capture_output=True)
        if out.returncode != 0:
            # An optional volume whose object does not exist is an empty directory, as the kubelet mounts it.
            if optional and b"NotFound" in out.stderr:
                return {}
            sys.exit(f"kube_e2e_pod: kubectl get {kind} {obj}: {out.stderr.decode().strip()}")
        return json.loads(out.stdout)

    deployment = get("deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if container.get("command"):
        sys.exit("kube_e2e_pod: the container overrides the image's entrypoint; not supported")

    mounts_root = os.path.join(state, "mounts")
    shutil.rmtree(mounts_root, ignore_errors=True)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    path_map = []  # (mountPath, local dir)
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        local = os.path.join(mounts_root, mount["name"])
        os.makedirs(local, exist_ok=True)
        if "secret" in volume:
            secret = get("secret", volume["secret"]["secretName"], volume["secret"].get("optional", False))
            data = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
        elif "configMap" in volume:
            config = get("configmap", volume["configMap"]["name"], volume["configMap"].get("optional", False))
            data = {k: v.encode() for k, v in config.get("data", {}).items()}
        elif "emptyDir" in volume:
            data = {}
        else:
            sys.exit(f"kube_e2e_pod: volume {mount['name']}: only secret, configMap and emptyDir volumes are supported")
        for key, value in data.items():
            with open(os.path.join(local, key), "wb") as f:
                f.write(value)
        if mount.get("subPath"):
            local = os.path.join(local, mount["subPath"])
        path_map.append((mount["mountPath"], local))
    path_map.sort(key=lambda p: -len(p[0]))

    def local_path(word):
        for mount_path, local in path_map:
            if word == mount_path or word.startswith(mount_path.rstrip("/") + "/"):
                return local + word[len(mount_path):]
        return word

    field_refs = {
        "metadata.namespace": ns,
        "metadata.name": POD_NAME,
        "spec.serviceAccountName": pod.get("serviceAccountName", "default"),
    }
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
        else:
            source = item["valueFrom"]
            if "fieldRef" in source:
                value = field_refs[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = base64.b64decode(get("secret", ref["name"])["data"][ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = get("configmap", ref["name"])["data"][ref["key"]]
            else:
                sys.exit(f"kube_e2e_pod: env {item['name']}: unsupported valueFrom")
        env[item["name"]] = local_path(expand(value, env))

    args = [local_path(expand(a, env)) for a in container.get("args", [])]
    words = [f"{k}={v}" for k, v in env.items()] + [vars_["webhook"]] + args
    sys.stdout.write("".join(w + "\0" for w in words))


def expand(value, env):
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


if __name__ == "__main__":
    main()
