"""Why a child of ``sam3-stream run`` ended, when a restart would not help: it *refused* to start (bad
arguments, a model it cannot load: ``run`` stops) or it *finished* (a video file played to its end without
``--loop``: it is not restarted, the others go on). Each note is a file the supervisor names in the child's
environment; exit statuses are not read, since a crash can produce any of them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["FINISHED_ENV", "REFUSAL_ENV", "read_note", "report_finished", "report_refusal"]

REFUSAL_ENV = "SAM3_STREAM_REFUSAL_FILE"
FINISHED_ENV = "SAM3_STREAM_FINISHED_FILE"
MAX_NOTE_CHARS = 2000


def _write(env: str, text: str) -> None:
    path = os.environ.get(env)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(text[:MAX_NOTE_CHARS] + "\n", encoding="utf-8")


def report_refusal(reason: str) -> None:
    """Tell a supervising ``sam3-stream run`` that this process refuses to start (it then stops, not restarts)."""
    _write(REFUSAL_ENV, reason)


def report_finished(what: str) -> None:
    """Tell a supervising ``sam3-stream run`` that this process is done (it is not restarted)."""
    _write(FINISHED_ENV, what)


def read_note(path: Path | None) -> str | None:
    """The note in ``path`` (``"no reason given"`` when empty), or ``None`` when there is none."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or "no reason given"
    except OSError:
        return None
