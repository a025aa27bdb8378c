"""Default endpoints of the three ZeroMQ sockets and of the gateway's HTTP server.

Standalone processes meet on tcp:// (capture on a robot, tracker on a GPU server); ``sam3-stream run``
puts all three in one private folder on ipc://.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FRAMES_PORT = 5555
RESULTS_PORT = 5556
CONTROL_PORT = 5557
GATEWAY_HTTP_HOST = "127.0.0.1"
GATEWAY_HTTP_PORT = 8080


@dataclass(frozen=True)
class Endpoints:
    """Where the frames (capture PUB), results (tracker PUB) and control (tracker ROUTER) sockets live."""

    frames: str
    results: str
    control: str

    @classmethod
    def tcp_defaults(cls, host: str = "127.0.0.1") -> Endpoints:
        """tcp://host:5555 (frames), :5556 (results), :5557 (control)."""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return cls(*(f"tcp://{host}:{port}" for port in (FRAMES_PORT, RESULTS_PORT, CONTROL_PORT)))

    @classmethod
    def ipc_in(cls, directory: str | Path) -> Endpoints:
        """ipc:// sockets named frames, results and control inside ``directory`` (made when bound)."""
        base = Path(directory).absolute()
        return cls(*(f"ipc://{base / name}" for name in ("frames", "results", "control")))
