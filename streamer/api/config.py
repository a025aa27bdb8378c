"""The API server's settings, in one place for the CLI, the app factory and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_HTTP_HOST = "127.0.0.1"
API_HTTP_PORT = 8090
MODEL_IMAGE = "sam-3-image"  # the model names the hosted services' clients send
MODEL_VIDEO = "sam-3-video"


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/sam3-stream/api`` (``~/.cache/sam3-stream/api`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sam3-stream" / "api"


@dataclass(frozen=True)
class ApiConfig:
    """Where the server listens, what it keeps where, and every bound it enforces.

    - ``token``: required as ``Authorization: Bearer`` or ``x-api-key`` when set; without one the
      server only binds loopback addresses unless ``insecure``.
    - ``allow_private_urls``: input URLs resolving to loopback, private or link-local addresses are
      refused unless set (the server must not become a proxy into its own network).
    - ``max_video_seconds`` / ``max_upload_mb``: longer videos and larger inputs get HTTP 413.
    - ``max_queue``: queued plus running jobs; more get HTTP 429.
    - ``keep_results_hours``: finished jobs and their files are deleted this long after they end.
    - ``max_event_clients``: concurrent ``GET /api/events`` streams; more get HTTP 429.
    - ``download_timeout_s``: the whole download of one input URL.
    - ``sync_timeout_s``: how long a synchronous route waits for its job before answering 504
      (the job goes on; its result stays at its ``result_url``).
    """

    data_dir: Path
    http_host: str = API_HTTP_HOST
    http_port: int = API_HTTP_PORT
    token: str | None = None
    insecure: bool = False
    allow_private_urls: bool = False
    max_video_seconds: float = 300.0
    max_upload_mb: float = 200.0
    max_queue: int = 64
    keep_results_hours: float = 24.0
    max_event_clients: int = 16
    download_timeout_s: float = 60.0
    sync_timeout_s: float = 3600.0
    keepalive_s: float = 15.0
    cleanup_interval_s: float = 300.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
