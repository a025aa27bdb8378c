"""One tracker service in a Ray actor, serving the streams the registry assigns it.

The actor's process binds the tracker's results and control endpoints (as ``sam3-stream track`` does),
loads the model once, and runs the tracker loop in a thread; Ray's calls (``assign``, ``release``,
``report``) reach it through :class:`streamer.assignments.StreamAssignments` and the thread-safe prompt
store, never through the sockets. Ray restarts an actor whose process dies: the new one binds the same
endpoints with a new ``instance`` id and no streams, and the registry moves the streams it had.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamer import security
from streamer.assignments import StreamAssignments
from streamer.keys import KeyFolder
from streamer.prompt_queue import PromptLimits
from streamer.prompt_store import PromptStore
from streamer.tracker_service import TrackerService
from streamer.tracking import tracker_factory

__all__ = ["TrackerActor", "TrackerOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackerOptions:
    """What every tracker actor of a cluster runs (``sam3-stream track``'s options)."""

    model: str = "passthrough"
    device: str | None = None
    prompts: tuple[str, ...] = ()
    passthrough_delay_s: float = 0.0
    passthrough_object: bool = False
    keys_path: str | None = None  # CURVE keys for tcp:// sockets (a folder on every tracker host)
    insecure: bool = False
    max_streams: int = 64
    log_level: str = "INFO"


class TrackerActor:
    """A tracker service serving assigned streams; wrapped by ``ray.remote`` in :mod:`streamer.cluster.cluster`."""

    def __init__(self, name: str, results_endpoint: str, control_endpoint: str, options: TrackerOptions) -> None:
        """Bind ``results_endpoint`` and ``control_endpoint`` (``{node_ip}`` in them: this host's address in the
        Ray cluster), load the model, start tracking. ``ValueError`` for an endpoint exposed without keys."""
        logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if "{node_ip}" in results_endpoint + control_endpoint:
            import ray

            node_ip = ray.util.get_node_ip_address()
            results_endpoint = results_endpoint.replace("{node_ip}", node_ip)
            control_endpoint = control_endpoint.replace("{node_ip}", node_ip)
        keys = KeyFolder.open(options.keys_path) if options.keys_path else None
        security.check_exposure(
            [results_endpoint, control_endpoint], keys, options.insecure, "read the results and drive the tracker"
        )
        self.name = name
        self.endpoints = {"results_endpoint": results_endpoint, "control_endpoint": control_endpoint}
        self.assignments = StreamAssignments()
        self.service = TrackerService(
            results_endpoint,
            control_endpoint,
            prompts=options.prompts,
            name=name,
            max_streams=options.max_streams,
            limits=PromptLimits(),
            store=PromptStore(),  # the registry keeps the copy that outlives this process
            keys=keys,
            assignments=self.assignments,
        )
        make_tracker = tracker_factory(
            options.model,
            options.device,
            passthrough_delay_s=options.passthrough_delay_s,
            passthrough_object=options.passthrough_object,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(make_tracker,), name=f"tracker {name}", daemon=True)
        self._thread.start()
        log.info("tracker %s ready (pid %d, instance %s): %s", name, os.getpid(), self.service.instance, self.endpoints)

    def _serve(self, make_tracker: Any) -> None:
        try:
            self.service.serve(make_tracker, [], self._stop.is_set)
        except Exception:  # the actor then answers reports with the failure: the registry moves its streams
            log.exception("tracker %s: the tracking loop failed", self.name)

    def info(self) -> dict[str, Any]:
        """Who this is: name, ``instance`` (new at every start), host, pid, endpoints."""
        return {
            "name": self.name,
            "instance": self.service.instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **self.endpoints,
        }

    def assign(self, stream: str, frames_endpoint: str, prompts: Sequence[dict] | None = None) -> None:
        """Serve ``stream`` from ``frames_endpoint``, first re-applying ``prompts`` (a store export) if given."""
        if prompts is not None:
            self.service.store.import_stream(stream, prompts)
        self.assignments.assign(stream, frames_endpoint)

    def release(self, stream: str) -> list[dict] | None:
        """Stop serving ``stream``; returns its active prompts for the next holder."""
        prompts = self.service.store.export_stream(stream)
        self.assignments.release(stream)
        return prompts

    def report(self) -> dict[str, Any]:
        """Load and state for the registry: ``instance``, whether the loop runs, and per assigned stream its
        frames endpoint, heartbeat counters, ``busy_s`` (seconds of tracking so far) and active prompts."""
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"tracker {self.name}: the tracking loop stopped")
        stats = self.service.stream_stats()
        streams = {
            stream: {
                "frames_endpoint": endpoint,
                "stats": stats.get(stream),
                "prompts": self.service.store.export_stream(stream),
            }
            for stream, endpoint in self.assignments.streams().items()
        }
        return {"instance": self.service.instance, "streams": streams}

    def stop(self) -> None:
        """Stop the loop and close the sockets (before the actor is killed on removal)."""
        self._stop.set()
        self._thread.join(5.0)
        self.service.close()
