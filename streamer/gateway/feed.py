"""The gateway's subscription to the tracker's results endpoint (results + status heartbeats).

A SUB socket drains everything that arrived after each poll and keeps only the newest result of
the stream it follows (the ZeroMQ guide's latest-value pattern), so a gateway that falls behind
skips results instead of showing old ones.

Status heartbeats tell a silent stream ("no signal": the tracker is up, no results) from a silent
tracker ("tracker offline": not even heartbeats). "No results" means none for
``no_signal_after_s``, or for a few typical gaps between results when the tracker is slower than
that (a model at 0.5 fps is slow, not without signal).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import zmq.asyncio

from streamer.healing import CHECK_INTERVAL_S, HealingSocket
from streamer.protocol import ProtocolError, ResultMessage, decode_result, peek_kind
from streamer.security import SocketSecurity
from streamer.transport import drain_async, results_subscriber

log = logging.getLogger(__name__)

FPS_WINDOW_S = 5.0  # long enough to see a slow tracker's rate
STATE_CHECK_S = 0.1
# A tracker slower than 1 fps is slow, not silent: "no signal" waits this many typical gaps between
# results (an average of recent gaps, each counted as at most GAP_CAP_S so one outage fades fast).
GAP_SLACK = 2.5
GAP_CAP_S = 10.0
GAP_WEIGHT = 0.3


class FeedState(str, Enum):
    """What the viewers should see: the live feed, or a banner saying why there is none."""

    LIVE = "live"
    NO_SIGNAL = "no_signal"
    TRACKER_OFFLINE = "tracker_offline"


@dataclass(frozen=True)
class FeedItem:
    """One result with the frame it was computed on; ``number`` counts results received (from 1)."""

    number: int
    message: ResultMessage
    frame: np.ndarray | None
    received: float  # unix seconds, comparable with message.t_capture

    @property
    def latency_s(self) -> float:
        """Capture to arrival at the gateway."""
        return self.received - self.message.t_capture


StateListener = Callable[[FeedState], None]


class ResultFeed:
    """Follows one stream's results from a tracker and tracks the feed's state, fps and latency."""

    def __init__(
        self,
        endpoint: str,
        stream_id: str | None = None,
        *,
        no_signal_after_s: float = 1.0,
        offline_after_s: float = 1.5,
        context: zmq.asyncio.Context | None = None,
        security: SocketSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._security = security
        self._no_signal_after = no_signal_after_s
        self._offline_after = offline_after_s
        self._own_context = context is None
        self._context = zmq.asyncio.Context() if context is None else context
        self._socket: HealingSocket[zmq.asyncio.Socket] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[StateListener] = []
        self._new_item = asyncio.Condition()
        self._arrivals: deque[float] = deque()
        self._last_result: float | None = None  # monotonic
        self._typical_gap = 0.0  # seconds between results, a moving average
        self._last_sign_of_life: float | None = None  # monotonic; results count as heartbeats
        self.state = FeedState.TRACKER_OFFLINE
        self.latest: FeedItem | None = None
        self.results_received = 0
        # The stream followed: the configured one, else the first one results arrive for.
        self.stream: str | None = stream_id

    async def start(self) -> None:
        """Connect and start receiving; returns at once (the tracker may come up later)."""
        self._socket = HealingSocket(
            lambda: results_subscriber(self.endpoint, context=self._context, security=self._security),
            f"results {self.endpoint}",
        )
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch_state())]

    async def close(self) -> None:
        """Stop the tasks and close the socket."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._own_context:
            self._context.term()

    def add_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(state)`` on every state change; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def fps(self) -> float:
        """Results received per second over the last few seconds (falls to 0 when they stop)."""
        now = time.monotonic()
        self._forget_old_arrivals(now)
        if len(self._arrivals) < 2:
            return 0.0
        return (len(self._arrivals) - 1) / max(now - self._arrivals[0], 1e-6)

    @property
    def latency_s(self) -> float | None:
        """Capture-to-gateway latency of the newest result, or ``None`` before the first."""
        return self.latest.latency_s if self.latest else None

    async def wait_after(self, number: int, timeout: float) -> FeedItem | None:
        """The newest item if it is newer than ``number``, waiting up to ``timeout`` s for one."""
        async with self._new_item:
            try:
                await asyncio.wait_for(
                    self._new_item.wait_for(lambda: self.latest is not None and self.latest.number > number),
                    timeout,
                )
            except asyncio.TimeoutError:
                return None
            return self.latest

    async def _receive(self) -> None:
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        while True:
            results = []
            self._socket.check()  # a tracker that sent garbage or an oversized part: a fresh socket
            for parts in await drain_async(self._socket.socket, timeout_ms=int(CHECK_INTERVAL_S * 1000)):
                try:
                    kind = peek_kind(parts)
                except ProtocolError as exc:
                    log.warning("results %s: dropped a malformed message: %s", self.endpoint, exc)
                    continue
                self._last_sign_of_life = time.monotonic()  # a heartbeat, or a result of any stream
                if kind == "result":
                    results.append(parts)
            # Newest first, decoding (masks cost milliseconds: off the event loop) until one is ours.
            for parts in reversed(results):
                try:
                    message, frame = await loop.run_in_executor(None, decode_result, parts)
                except ProtocolError as exc:
                    log.warning("results %s: dropped a malformed result: %s", self.endpoint, exc)
                    continue
                if self.stream is None or message.stream == self.stream:
                    await self._accept(message, frame)
                    break
            self._update_state()

    async def _accept(self, message: ResultMessage, frame: np.ndarray | None) -> None:
        now = time.monotonic()
        if self._last_result is not None:
            gap = min(now - self._last_result, GAP_CAP_S)
            self._typical_gap = (
                gap if self.results_received == 1 else ((1 - GAP_WEIGHT) * self._typical_gap + GAP_WEIGHT * gap)
            )
        self.stream = message.stream
        self._last_result = now
        self._arrivals.append(now)
        self._forget_old_arrivals(now)
        self.results_received += 1
        async with self._new_item:
            self.latest = FeedItem(self.results_received, message, frame, time.time())
            self._new_item.notify_all()

    async def _watch_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_CHECK_S)
            self._update_state()

    def _update_state(self) -> None:
        now = time.monotonic()
        no_signal_after = max(self._no_signal_after, GAP_SLACK * self._typical_gap)
        if self._last_result is not None and now - self._last_result <= no_signal_after:
            state = FeedState.LIVE
        elif self._last_sign_of_life is not None and now - self._last_sign_of_life <= self._offline_after:
            state = FeedState.NO_SIGNAL
        else:
            state = FeedState.TRACKER_OFFLINE
        if state != self.state:
            log.info("feed %s: %s -> %s", self.endpoint, self.state.value, state.value)
            self.state = state
            for listener in list(self._listeners):
                listener(state)

    def _forget_old_arrivals(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0] > FPS_WINDOW_S:
            self._arrivals.popleft()
