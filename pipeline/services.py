"""The run-wide services stages ask for (``Stage.services``), made once per run.

Why the runner makes them. A per-host bound or a robots.txt read once per
run only holds if every task of the run shares one book of hosts, and
stages never import Ray: so a stage names what it needs, as data, and the
runner makes it for the way the run executes. In process, the service is
the object itself; on Ray, the host gate is one actor
(:class:`~stages.common.hostshare.ShareGate`) that lends each worker
process shares of a host's connections, and what the stage gets is a small
handle that pickles with it to every task and answers the gate's calls from
its process's :class:`~stages.common.hostshare_client.ShareClient`.

* ``host_gate``: a :class:`~stages.common.hostgate.HostGate` for the
  ``Limits`` the stage gives.
* ``work_store``: :class:`WorkStore`, small files under ``OUT/_work/<name>/``
  (local or object storage), which a resume and every node see.
"""

from __future__ import annotations

import secrets
import threading

from pairforge.manifests import layout, storage
from pairforge.stages.common.hostgate import HostGate
from pairforge.stages.common.hostshare import ShareGate
from pairforge.stages.common.hostshare_client import ShareClient


class WorkStore:
    """Small files under the run's work folder; names are the stage's own
    (safe, derived from data it hashed), contents are data, never code."""

    def __init__(self, root):
        self.root = root

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        storage.write_atomic(self.root / name, data, fsync=False)


class _ActorCalls:
    """The gate actor's calls as plain methods (what a ShareClient talks to)."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        import ray

        method = getattr(self.actor, name)
        if name == "watch":  # a long poll is not retried into a gate that was shut down
            method = method.options(max_task_retries=0)
        return lambda *args: ray.get(method.remote(*args))


#: this process's share clients, one per gate actor (tasks of one worker process share it)
_CLIENTS: dict[str, ShareClient] = {}
_CLIENTS_LOCK = threading.Lock()


class RayGate:
    """The run's :class:`ShareGate` actor as a stage sees it: the
    :class:`HostGate` calls, answered by this process's
    :class:`ShareClient` (slots lent by the actor; no actor call a request)."""

    def __init__(self, actor, limits, key: str):
        self.actor, self.limits, self.key = actor, limits, key

    def _client(self) -> ShareClient:
        with _CLIENTS_LOCK:
            c = _CLIENTS.get(self.key)
            if c is None:
                c = _CLIENTS[self.key] = ShareClient(_ActorCalls(self.actor), self.limits)
            return c

    def open(self, threads: int = 0) -> None:
        self._client().open(threads)

    def close(self, threads: int = 0) -> None:
        self._client().close(threads)

    def acquire(self, asks, budget, wait=0.0, rows=None):
        return self._client().acquire(asks, budget, wait, rows)

    def release(self, host, outcome="ok", retry_after=None, status=0, again=False):
        return self._client().release(host, outcome, retry_after, status, again)

    def set_interval(self, host, seconds):
        self._client().set_interval(host, seconds)

    def claim_robots(self, origins):
        return self._client().claim_robots(origins)

    def robots_done(self, origin, host, outcome):
        self._client().robots_done(origin, host, outcome)

    def stats(self, top: int = 20):
        return _ActorCalls(self.actor).stats(top)


def _head_node(ray) -> str:
    """The id of the cluster's head node (the driver's node when none says so)."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in (node.get("Resources") or {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


class Services:
    """The services of one run's stages; ``close`` ends them."""

    def __init__(self, out, on_ray: bool):
        self.out, self.on_ray = out, on_ray
        self.gates: dict[str, object] = {}
        self._actors: list = []

    def attach(self, stages) -> None:
        for st in stages:
            for name, arg in st.services().items():
                st.attach(name, self._make(name, arg, st))

    def _make(self, name: str, arg, stage):
        if name == "work_store":
            return WorkStore(layout.work_dir(self.out) / str(arg))
        if name == "host_gate":
            if stage.name not in self.gates:
                self.gates[stage.name] = self._gate(arg)
            return self.gates[stage.name]
        raise ValueError(f"stage {stage.name} asks for an unknown service {name!r}")

    def _gate(self, limits):
        if not self.on_ray:
            return HostGate(limits)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = (
            ray.remote(ShareGate)
            .options(
                num_cpus=0,
                # each process's share client keeps one long poll open here
                max_concurrency=1024,
                name=f"pairforge-hostgate-{id(self):x}",
                # on the head node, which lives as long as the cluster (a worker
                # node may go); restarted with an empty book if it dies anyway,
                # and the calls in flight then are retried
                scheduling_strategy=NodeAffinitySchedulingStrategy(_head_node(ray), soft=True),
                max_restarts=-1,
                max_task_retries=-1,
            )
            .remote(limits)
        )
        self._actors.append(actor)
        return RayGate(actor, limits, secrets.token_hex(8))

    def stats(self) -> dict:
        """Per stage with a host gate: its per-host figures."""
        return {name: gate.stats() for name, gate in self.gates.items()}

    def close(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
        self._actors.clear()
