"""Which streams a tracker serves and where their frames come from, when a registry decides it.

A tracker run by hand serves every stream whose frames reach it. A tracker in a cluster
(``sam3-stream cluster``) serves the streams a registry assigns it: each with the frames endpoint of
its capture, which the tracker connects to while it holds the stream. Ray's threads assign and
release; the tracker's own thread reads the result (:meth:`StreamAssignments.take_change`) between
frames, so only that thread touches its sockets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["AssignmentChange", "StreamAssignments"]


@dataclass(frozen=True)
class AssignmentChange:
    """What changed since the last look: endpoints to connect and to disconnect, streams let go."""

    connect: frozenset[str]
    disconnect: frozenset[str]
    released: frozenset[str]


class StreamAssignments:
    """Stream name -> frames endpoint, thread-safe. Several streams may share one capture endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, str] = {}
        self._connected: set[str] = set()  # endpoints as the tracker thread last saw them
        self._released: set[str] = set()

    def assign(self, stream: str, frames_endpoint: str) -> None:
        """Serve ``stream``, reading its frames from ``frames_endpoint``."""
        with self._lock:
            self._streams[stream] = frames_endpoint
            self._released.discard(stream)

    def release(self, stream: str) -> bool:
        """Stop serving ``stream``; ``False`` if it was not assigned."""
        with self._lock:
            if self._streams.pop(stream, None) is None:
                return False
            self._released.add(stream)
            return True

    def holds(self, stream: str) -> bool:
        """Whether ``stream`` is assigned (its frames are tracked)."""
        with self._lock:
            return stream in self._streams

    def streams(self) -> dict[str, str]:
        """A copy of the assignments: stream -> frames endpoint."""
        with self._lock:
            return dict(self._streams)

    def endpoints(self) -> list[str]:
        """The frames endpoints of the assigned streams, each once."""
        with self._lock:
            return sorted(set(self._streams.values()))

    def take_change(self) -> AssignmentChange | None:
        """For the tracker thread: what to connect, disconnect and drop since its last call (``None``: nothing)."""
        with self._lock:
            wanted = set(self._streams.values())
            if wanted == self._connected and not self._released:
                return None
            change = AssignmentChange(
                frozenset(wanted - self._connected), frozenset(self._connected - wanted), frozenset(self._released)
            )
            self._connected, self._released = wanted, set()
            return change
