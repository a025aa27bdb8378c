"""Stopping a process cleanly on SIGINT/SIGTERM, shared by every streamer process."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`requested`; a second one raises ``KeyboardInterrupt``
    (to cut short whatever blocks). Within :meth:`interruptible` the first one raises already. Outside the
    main thread it installs nothing."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.requested = False
        self._log = logger
        self._previous: dict[int, object] = {}
        self._interrupting = False

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that cannot look at :attr:`requested` (a model load: seconds to minutes) is cut short by
        the first signal, which raises ``KeyboardInterrupt`` in it; one that came before raises on entry.
        Without this, a supervisor's SIGTERM waited out the whole load, then its kill timeout."""
        if self.requested:
            raise KeyboardInterrupt
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self._log.info("%s received, stopping", signal.Signals(signum).name)
        self.requested = True
        if self._interrupting:
            raise KeyboardInterrupt
