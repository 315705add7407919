"""Spawns one JupyterHub single-user server with the real KubeSpawner (PyPI), without a Hub, the
way KubeSpawner's own tests drive it; run by tests/e2e.rs as the hub's ServiceAccount (KUBECONFIG).

usage: kubespawner_spawn.py NAMESPACE USERNAME ANNOTATIONS_JSON
Prints one JSON line: {"created": <the pod as the API server stored it> | null, "error": str | null}.
There is no kubelet, so the server never starts: the pod as created is what matters.
"""

import asyncio
import json
import sys
from unittest.mock import Mock

from jupyterhub.objects import Hub, Server
from kubespawner import KubeSpawner
from traitlets.config import Config


class MockUser(Mock):
    server = Server()

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.id = 1

    @property
    def escaped_name(self):
        return self.name

    @property
    def url(self):
        return self.server.url


class MockOrmSpawner(Mock):
    name = ""
    server = None


async def main(namespace, username, annotations):
    c = Config()
    c.KubeSpawner.namespace = namespace
    c.KubeSpawner.start_timeout = 3
    c.KubeSpawner.events_enabled = False
    c.KubeSpawner.image = "quay.io/jupyterhub/k8s-singleuser-sample:4.4.0"
    c.KubeSpawner.extra_annotations = annotations
    spawner = KubeSpawner(
        config=c,
        hub=Hub(),
        user=MockUser(username),
        orm_spawner=MockOrmSpawner(),
        api_token="e2e-not-a-real-token",
        oauth_client_id="jupyterhub-user-" + username,
        _mock=True,
    )
    created = None
    create = spawner.api.create_namespaced_pod

    async def recording_create(*args, **kwargs):
        nonlocal created
        pod = await create(*args, **kwargs)
        created = spawner.api.api_client.sanitize_for_serialization(pod)
        return pod

    spawner.api.create_namespaced_pod = recording_create
    error = None
    try:
        await spawner.start()
    except Exception as e:  # noqa: BLE001 - the outcome is reported, not handled
        error = f"{type(e).__name__}: {e}"
    try:
        await spawner.stop(now=True)
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps({"created": created, "error": error}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
