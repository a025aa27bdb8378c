"""Following the registry's map from outside Ray: which tracker holds a stream, and its endpoints.

The ``cluster`` command serves the map at ``GET /map`` (JSON, see :meth:`Registry.route_map`). A robot
or a gateway names a stream, fetches the map, subscribes to that tracker's results and sends prompts to
its control endpoint; when the stream moves (a tracker died, the cluster was rebalanced) the map says
so and the client re-points its sockets: a short gap, then the same stream. Nothing here needs Ray.

The map comes over a socket, so it is read like any other hostile input: bounded, and every field
checked (``ValueError`` naming the field).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamer.healing import CauseLog, HealingSocket
from streamer.transport import results_subscriber

__all__ = ["MAX_MAP_BYTES", "MapSubscriber", "Route", "RouteMap", "fetch_map", "parse_map"]

MAX_MAP_BYTES = 4 * 1024 * 1024  # thousands of streams
MAX_ENDPOINT_CHARS = 256


@dataclass(frozen=True)
class Route:
    """Where a stream is served: its tracker and that tracker's results and control endpoints."""

    stream: str
    tracker: str
    results_endpoint: str
    control_endpoint: str


@dataclass(frozen=True)
class RouteMap:
    """A version of the map: routes of the streams placed now, and every tracker's results endpoint."""

    version: int
    routes: dict[str, Route]
    results_endpoints: tuple[str, ...]

    def route(self, stream: str) -> Route | None:
        """The stream's route, or ``None`` while it is not placed (no tracker up, or being moved)."""
        return self.routes.get(stream)


def _endpoint(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://")) or len(value) > MAX_ENDPOINT_CHARS:
        raise ValueError(f"{path}: expected a tcp:// or ipc:// endpoint, got {str(value)[:80]!r}")
    return value


def parse_map(body: bytes | str) -> RouteMap:
    """Parse ``GET /map``'s body; ``ValueError`` naming the field for anything malformed."""
    if len(body) > MAX_MAP_BYTES:
        raise ValueError(f"map: larger than {MAX_MAP_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"map: not JSON ({str(exc)[:80]})") from exc
    if not isinstance(data, dict):
        raise ValueError("map: expected an object")
    version, streams, trackers = data.get("version"), data.get("streams"), data.get("trackers")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version: expected an integer >= 0, got {str(version)[:40]!r}")
    if not isinstance(streams, dict) or not isinstance(trackers, dict):
        raise ValueError("streams, trackers: expected objects")
    routes = {}
    for name, route in streams.items():
        if not isinstance(route, dict):
            raise ValueError(f"streams.{name[:80]}: expected an object")
        if route.get("tracker") is None:
            continue  # not placed right now
        if not isinstance(route["tracker"], str):
            raise ValueError(f"streams.{name[:80]}.tracker: expected a string")
        routes[name] = Route(
            name,
            route["tracker"],
            _endpoint(f"streams.{name[:80]}.results_endpoint", route.get("results_endpoint")),
            _endpoint(f"streams.{name[:80]}.control_endpoint", route.get("control_endpoint")),
        )
    results = []
    for name, tracker in trackers.items():
        if not isinstance(tracker, dict):
            raise ValueError(f"trackers.{name[:80]}: expected an object")
        if tracker.get("results_endpoint") is not None:
            results.append(_endpoint(f"trackers.{name[:80]}.results_endpoint", tracker["results_endpoint"]))
    return RouteMap(version, routes, tuple(sorted(set(results))))


def fetch_map(url: str, timeout_s: float = 2.0) -> RouteMap:
    """``GET`` the map at ``url`` (``http://127.0.0.1:8470/map``); ``OSError`` if unreachable, ``ValueError``
    if malformed."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"map_url: expected an http:// or https:// URL, got {url[:80]!r}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
        body = response.read(MAX_MAP_BYTES + 1)
    return parse_map(body)


class MapSubscriber:
    """A results SUB connected to every tracker's results endpoint in the map, following the map.

    Each tracker publishes only the streams it holds, so a subscriber to all of them keeps receiving a
    stream wherever it moves (filter by ``result.stream``). The map is fetched every ``refresh_s``; when
    its trackers' endpoints change the socket is re-created (the healing socket's ``renew``). Call
    :meth:`check` from the thread that reads :attr:`socket`, at least every ``refresh_s``.
    """

    def __init__(
        self,
        map_url: str,
        *,
        streams: Sequence[str] | None = None,
        frames: bool = False,
        security: Any = None,
        refresh_s: float = 0.5,
    ) -> None:
        """Follow ``map_url``; ``streams`` (``None``: all) and ``frames`` as :func:`results_subscriber` takes them."""
        self.map_url, self.refresh_s = map_url, refresh_s
        self.route_map: RouteMap | None = None
        self._endpoints: tuple[str, ...] = ()
        self._next_fetch = 0.0
        self._errors = CauseLog(f"map {map_url}")
        self._healing = HealingSocket(
            lambda watch: results_subscriber(
                list(self._endpoints), frames=frames, streams=streams, security=security, on_created=watch
            ),
            f"results of {map_url}",
        )

    @property
    def socket(self) -> Any:
        """The SUB socket to read (a new one after :meth:`check` returned ``True``)."""
        return self._healing.socket

    def check(self) -> bool:
        """Refresh the map when due and heal the socket; ``True`` when the socket was re-created."""
        renewed = self._healing.check()
        now = time.monotonic()
        if now >= self._next_fetch:
            self._next_fetch = now + self.refresh_s
            try:
                self.route_map = fetch_map(self.map_url, timeout_s=self.refresh_s * 4)
            except (OSError, ValueError) as exc:  # the cluster command restarting: keep the last map
                self._errors.count("map not fetched", detail=str(exc))
                self._errors.flush()
                return renewed
            if self.route_map.results_endpoints != self._endpoints:
                self._endpoints = self.route_map.results_endpoints
                self._healing.renew()
                return True
        return renewed

    def close(self) -> None:
        """Close the socket."""
        self._healing.close()
