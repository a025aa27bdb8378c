"""Starting or joining a Ray cluster and making the registry and tracker actors (the ``cluster`` command,
the tests and ``scripts/bench_cluster.py`` all go through :class:`Cluster`).

Ray's token authentication is always on: ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) names the
cluster's token; a local cluster started here without one gets a fresh random token, kept in this
process's environment (inherited by Ray's processes, never logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from typing import Any

import ray

from streamer.cluster.registry import REGISTRY_NAME, TRACKER_PREFIX, Registry
from streamer.cluster.tracker_actor import TrackerActor, TrackerOptions

__all__ = ["NAMESPACE", "Cluster", "enable_token_auth"]

log = logging.getLogger(__name__)

NAMESPACE = "sam3-stream"
CALL_TIMEOUT_S = 30.0  # a control call (add, remove) that takes longer than this failed


def enable_token_auth() -> bool:
    """Turn on Ray's token authentication for this process and those it starts; ``True`` when a token was
    made here (no ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` was given)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    made = not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if made:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads RAY_AUTH_MODE into its config when imported (ours is imported by now): without a refresh the
    # head starts with authentication on and this driver connects without a token (seen with Ray 2.60).
    # Ray's own test utilities refresh it this way (ray._private.authentication_test_utils).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return made


class Cluster:
    """A registry actor and tracker actors on a Ray cluster (started here, or joined at ``address``).

    Tracker ``i`` binds results on ``base_port + 2 i`` and control on ``base_port + 2 i + 1`` of ``host``
    (``"{node_ip}"``: the address of the node Ray puts it on), so a tracker Ray restarts binds the same
    endpoints. ``num_gpus`` per tracker: 1 puts one tracker on each GPU.
    """

    def __init__(
        self,
        options: TrackerOptions,
        *,
        address: str | None = None,
        host: str = "127.0.0.1",
        base_port: int = 5600,
        num_cpus: int | None = None,
        num_gpus: float = 0.0,
        poll_s: float = 0.25,
        dead_after_s: float = 1.0,
    ) -> None:
        self.options, self.host, self.base_port, self.num_gpus = options, host, base_port, num_gpus
        made_token = enable_token_auth()
        if address is None:
            log.info("starting a local Ray cluster (token authentication on%s)", ", new token" if made_token else "")
        ray.init(
            address=address,
            namespace=NAMESPACE,
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
        self._trackers: dict[str, Any] = {}
        self._slots: dict[str, int] = {}
        self.registry = (
            ray.remote(Registry)
            .options(
                name=REGISTRY_NAME,
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=8,
                num_cpus=0,
                get_if_exists=True,
            )
            .remote(poll_s, dead_after_s)
        )
        ray.get(self.registry.route_map.remote(), timeout=CALL_TIMEOUT_S)  # constructed before any tracker exists

    def add_tracker(self, name: str | None = None) -> str:
        """Start a tracker actor (Ray restarts it if its process dies) and hand it to the registry."""
        slot = next(i for i in range(len(self._slots) + 1) if i not in self._slots.values())
        name = name or f"t{slot}"
        if name in self._trackers:
            raise ValueError(f"tracker: {name!r} already exists")
        results = f"tcp://{self.host}:{self.base_port + 2 * slot}"
        control = f"tcp://{self.host}:{self.base_port + 2 * slot + 1}"
        actor = (
            ray.remote(TrackerActor)
            .options(
                name=TRACKER_PREFIX + name,
                max_restarts=-1,
                max_task_retries=0,  # a dead tracker's calls fail at once: the registry moves its streams
                max_concurrency=4,
                num_cpus=0,
                num_gpus=self.num_gpus,
            )
            .remote(name, results, control, self.options)
        )
        self._trackers[name], self._slots[name] = actor, slot
        ray.get(self.registry.add_tracker.remote(name), timeout=CALL_TIMEOUT_S)
        return name

    def remove_tracker(self, name: str) -> list[dict]:
        """Drain ``name`` (its streams move to the others), then stop it for good; returns the moves."""
        if name not in self._trackers:
            raise ValueError(f"tracker: unknown tracker {name!r} (known: {', '.join(sorted(self._trackers))})")
        moves = ray.get(self.registry.remove_tracker.remote(name), timeout=CALL_TIMEOUT_S)
        actor = self._trackers.pop(name)
        del self._slots[name]
        try:
            ray.get(actor.stop.remote(), timeout=10)
        except ray.exceptions.RayError as exc:
            log.info("tracker %s did not stop cleanly: %s", name, exc)
        ray.kill(actor, no_restart=True)
        return moves

    def add_stream(self, name: str, frames_endpoint: str) -> str | None:
        """Declare a stream whose capture publishes on ``frames_endpoint``; returns the tracker it went to."""
        return ray.get(self.registry.add_stream.remote(name, frames_endpoint), timeout=CALL_TIMEOUT_S)

    def remove_stream(self, name: str) -> None:
        """Stop serving a stream."""
        ray.get(self.registry.remove_stream.remote(name), timeout=CALL_TIMEOUT_S)

    def route_map(self) -> dict[str, Any]:
        """The registry's stream -> tracker map (see :meth:`Registry.route_map`)."""
        return ray.get(self.registry.route_map.remote(), timeout=CALL_TIMEOUT_S)

    def health(self) -> dict[str, Any]:
        """The registry's view: trackers, streams, moves, counters (see :meth:`Registry.health`)."""
        return ray.get(self.registry.health.remote(), timeout=CALL_TIMEOUT_S)

    def tracker_info(self, name: str) -> dict[str, Any]:
        """The tracker actor's own ``info()`` (pid, instance, endpoints)."""
        return ray.get(self._trackers[name].info.remote(), timeout=CALL_TIMEOUT_S)

    def gpus(self) -> float:
        """GPUs in the Ray cluster (0 on a CPU-only one)."""
        return float(ray.cluster_resources().get("GPU", 0.0))

    def wait_until_up(self, timeout_s: float = 300.0) -> None:
        """Wait until every tracker started here has loaded its model and the registry has heard it.

        Raises what a tracker's constructor raised (a model it cannot load, an endpoint exposed without keys),
        or ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        for name, actor in self._trackers.items():
            try:
                ray.get(actor.info.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as exc:
                raise TimeoutError(f"tracker {name}: not up after {timeout_s:.0f} s") from exc
        while True:
            states = {name: t["state"] for name, t in self.health()["trackers"].items() if name in self._trackers}
            if all(state == "up" for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"trackers not up after {timeout_s:.0f} s: {states}")
            time.sleep(0.1)

    @property
    def trackers(self) -> list[str]:
        """Names of the trackers started here."""
        return list(self._trackers)

    def close(self) -> None:
        """Stop every actor and disconnect from Ray (a local cluster started here shuts down)."""
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.registry.stop.remote(), timeout=5)
        for actor in self._trackers.values():
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actor.stop.remote(), timeout=5)
            ray.kill(actor, no_restart=True)
        ray.kill(self.registry, no_restart=True)
        self._trackers.clear()
        ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
