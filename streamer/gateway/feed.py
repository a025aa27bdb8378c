"""The gateway's subscription to the tracker's results endpoint (results, events, status heartbeats).

A SUB socket drains everything that arrived after each poll and keeps only the newest result of
the stream it follows (the ZeroMQ guide's latest-value pattern), so a gateway that falls behind
skips results instead of showing old ones. Events are never skipped: each goes to the listeners.
It subscribes to the heartbeats and to its stream's events and results with their frames only
(``streamer.topics``: every stream's until it knows which one it follows), so the tracker sends it
nothing it would not show; masks are decoded by their bounding boxes, for the compositor.

The feed's state follows the tracker's heartbeats, not the age of the last result; each comes with a
``detail`` in words (the cause), shown to the operator:

- ``tracker_offline``: nothing from the tracker (heartbeat, result or event) for ``offline_after_s``.
  A slow tracker that dies is offline 1.5 s later, however long its frames take.
- ``loading``: the tracker's heartbeats say it is loading its model.
- ``source_failing``: the capture says its source delivers no frames, and why ("camera 7 not present").
- ``no_signal``: the tracker is up but listened ``no_signal_after_s`` without a frame of this stream
  (time it spends tracking does not count: frames wait in its socket meanwhile, so a slow model or a
  long text prompt never reads as no signal).
- ``slow``: frames reach the tracker, but results come at under ``SLOW_RATIO`` of the camera's rate.
- ``live``: frames reach the tracker and results keep up with the camera.

A tracker that does not report when frames arrive (protocol version 1) is judged by its results.
Heartbeats carry the tracker process's ``instance`` id: when it changes, the tracker restarted, and
listeners get a ``tracker_restarted`` event (the tracker itself says which prompts it re-applied).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import zmq.asyncio

from streamer.healing import CHECK_INTERVAL_S, HealingSocket
from streamer.protocol import (
    EventMessage,
    ProtocolError,
    ResultMessage,
    StatusMessage,
    decode_event,
    decode_result,
    decode_status,
    peek_kind,
)
from streamer.security import SocketSecurity
from streamer.topics import parse_topic, subscriptions
from streamer.transport import OnCreated, drain_async, resubscribe, results_subscriber

log = logging.getLogger(__name__)

FPS_WINDOW_S = 5.0  # long enough to see a slow tracker's rate
STATE_CHECK_S = 0.1
# Results at under this share of the camera's rate make the feed "slow"; back to "live" above
# KEEPS_UP_RATIO (apart, so that a rate near the line does not flip the state every check).
SLOW_RATIO = 0.8
KEEPS_UP_RATIO = 0.9


class FeedState(str, Enum):
    """What the viewers should see: the live feed (``live``, ``slow``), or a banner saying why there is none."""

    LIVE = "live"
    SLOW = "slow"
    LOADING = "loading"
    SOURCE_FAILING = "source_failing"
    NO_SIGNAL = "no_signal"
    TRACKER_OFFLINE = "tracker_offline"

    @property
    def shows_results(self) -> bool:
        """Whether results come (the video shows them) rather than a banner."""
        return self in (FeedState.LIVE, FeedState.SLOW)


@dataclass(frozen=True)
class FeedStatus:
    """The feed's state with its cause in words (``detail``) and what the operator should know of it."""

    state: FeedState
    detail: str
    stream: str | None = None
    source: str | None = None  # the capture's description of its source
    model: str | None = None  # what the tracker loaded (or loads)
    camera_fps: float | None = None  # the source's rate, as the tracker measures it

    def to_json(self) -> dict:
        """The data channel's ``status`` message and ``/health``'s fields."""
        return {
            "state": self.state.value,
            "detail": self.detail,
            "stream": self.stream,
            "source": self.source,
            "model": self.model,
            "camera_fps": None if self.camera_fps is None else round(self.camera_fps, 2),
        }


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


StateListener = Callable[[FeedStatus], None]
EventListener = Callable[[EventMessage], None]


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
        self._event_listeners: list[EventListener] = []
        self._new_item = asyncio.Condition()
        self._arrivals: deque[float] = deque()
        self._last_result: float | None = None  # monotonic
        self._last_sign_of_life: float | None = None  # monotonic: any message from the tracker
        self._status: StatusMessage | None = None  # the newest heartbeat
        self._status_received = 0.0  # monotonic, when it arrived
        self.instance: str | None = None  # the tracker process's, from its heartbeats
        self.tracker_restarts = 0
        self.stream_moves = 0  # times the stream moved to another tracker (a cluster's map said so)
        self._retarget: tuple[str, str | None] | None = None  # (endpoint, tracker) to follow next
        self.state = FeedState.TRACKER_OFFLINE
        self.status = FeedStatus(FeedState.TRACKER_OFFLINE, "no heartbeat from the tracker yet")
        self.latest: FeedItem | None = None
        self.results_received = 0
        # The stream followed: the configured one, else the first one results arrive for.
        self.stream: str | None = stream_id
        self._topics: list[bytes] = []  # what the socket is subscribed to

    async def start(self) -> None:
        """Connect and start receiving; returns at once (the tracker may come up later)."""
        self._socket = HealingSocket(self._subscribe, f"results {self.endpoint}")
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch_state())]

    def _subscribe(self, on_created: OnCreated) -> zmq.asyncio.Socket:
        """A fresh socket subscribed to what this feed uses (a healed socket is made afresh too)."""
        streams = None if self.stream is None else [self.stream]
        sock = results_subscriber(
            self.endpoint,
            frames=True,
            streams=streams,
            context=self._context,
            security=self._security,
            on_created=on_created,
        )
        self._topics = subscriptions(streams, frames=True)
        return sock

    def _follow_stream(self) -> None:
        """Narrow the subscription to the stream now followed (the tracker then sends no other stream)."""
        wanted = subscriptions(None if self.stream is None else [self.stream], frames=True)
        if self._socket is not None and wanted != self._topics:
            resubscribe(self._socket.socket, self._topics, wanted)
            self._topics = wanted

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
        """Call ``listener(status)`` whenever the state, its cause or what it names changes; returns a
        function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add_event_listener(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` for every event of the followed stream; returns the unsubscriber."""
        self._event_listeners.append(listener)
        return lambda: self._event_listeners.remove(listener) if listener in self._event_listeners else None

    def retarget(self, endpoint: str, tracker: str | None = None) -> None:
        """Follow the stream on another tracker's results ``endpoint`` (it moved; ``tracker`` names the new
        holder, ``None`` when this is the first route known); the socket is re-created within 0.25 s."""
        self._retarget = (endpoint, tracker)

    @property
    def stream_status(self) -> dict | None:
        """The followed stream's fields of the newest heartbeat (``protocol.STREAM_STATUS_FIELDS``)."""
        if self._status is None or self.stream is None:
            return None
        return self._status.streams.get(self.stream)

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
            if self._retarget is not None:
                self._follow_move(*self._retarget)
            self._socket.check()  # a tracker that sent garbage or an oversized part: a fresh socket
            for parts in await drain_async(self._socket.socket, timeout_ms=int(CHECK_INTERVAL_S * 1000)):
                try:
                    kind = peek_kind(parts)
                    if kind == "status":
                        self._on_status(decode_status(parts))
                    elif kind == "event":
                        self._on_event(decode_event(parts))
                except ProtocolError as exc:
                    log.warning("results %s: dropped a malformed message: %s", self.endpoint, exc)
                    continue
                self._last_sign_of_life = time.monotonic()  # a heartbeat, a result or an event
                if kind == "result":
                    results.append(parts)
            # Newest first, decoding (masks cost milliseconds: off the event loop) until one is ours.
            for index in range(len(results) - 1, -1, -1):
                try:
                    message, frame = await loop.run_in_executor(None, _decode_for_compositor, results[index])
                except ProtocolError as exc:
                    log.warning("results %s: dropped a malformed result: %s", self.endpoint, exc)
                    continue
                if self.stream is None or message.stream == self.stream:
                    # The older ones drained with it were the tracker's results too, skipped only because
                    # this gateway fell behind: they count in the rate, so it never calls the tracker slow.
                    older = sum(_stream_of(parts) == message.stream for parts in results[:index])
                    await self._accept(message, frame, arrived=1 + older)
                    break
            self._update_state()

    def _follow_move(self, endpoint: str, tracker: str | None) -> None:
        assert self._socket is not None
        self._retarget, self.endpoint = None, endpoint
        self._socket.renew()  # its factory reads self.endpoint
        self.instance, self._status = None, None  # the new holder's heartbeats are not a restart
        if tracker is None:
            return
        self.stream_moves += 1
        log.info("feed: stream %s moved to tracker %s (%s)", self.stream, tracker, endpoint)
        self._emit(
            EventMessage(
                self.stream or "",
                "stream_moved",
                f"the stream moved to tracker {tracker}; it re-applies this stream's prompts on its next frame",
                time.time(),
            )
        )

    def _on_status(self, status: StatusMessage) -> None:
        if status.instance and self.instance is not None and status.instance != self.instance:
            self.tracker_restarts += 1
            log.warning("feed %s: the tracker restarted (instance %s)", self.endpoint, status.instance)
            self._emit(
                EventMessage(
                    self.stream or "",
                    "tracker_restarted",
                    f"the tracker {status.tracker} restarted; it re-applies this stream's prompts on its next frame",
                    status.t,
                )
            )
        self.instance = status.instance or self.instance
        self._status, self._status_received = status, time.monotonic()
        if self.stream is None:  # follow the first stream whose frames reach the tracker
            receiving = [name for name, info in sorted(status.streams.items()) if info.get("frames_received")]
            # Else one whose capture speaks (failing, say): its state is what this gateway can show.
            speaking = [name for name, info in sorted(status.streams.items()) if info.get("source") is not None]
            self.stream = (receiving or speaking or [None])[0]
            self._follow_stream()

    def _on_event(self, event: EventMessage) -> None:
        if self.stream is None or event.stream == self.stream:
            self._emit(event)

    def _emit(self, event: EventMessage) -> None:
        for listener in list(self._event_listeners):
            try:
                listener(event)
            except Exception:  # one viewer's trouble must not stop the feed
                log.exception("feed %s: an event listener failed", self.endpoint)

    async def _accept(self, message: ResultMessage, frame: np.ndarray | None, arrived: int = 1) -> None:
        """Show ``message``, the newest of ``arrived`` results of its stream that came since the last one."""
        now = time.monotonic()
        if self.stream is None:
            self.stream = message.stream
            self._follow_stream()
        self._last_result = now
        self._arrivals.extend([now] * arrived)
        self._forget_old_arrivals(now)
        self.results_received += arrived
        async with self._new_item:
            self.latest = FeedItem(self.results_received, message, frame, time.time())
            self._new_item.notify_all()

    async def _watch_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_CHECK_S)
            self._update_state()

    def _update_state(self) -> None:
        status = self._judge(time.monotonic())
        if status == self.status:
            return
        if status.state != self.state:
            log.info("feed %s: %s -> %s (%s)", self.endpoint, self.state.value, status.state.value, status.detail)
        self.state, self.status = status.state, status
        for listener in list(self._listeners):
            listener(status)

    def _judge(self, now: float) -> FeedStatus:
        """The state with its cause, from the newest heartbeat and the results' rate."""
        heartbeat, info = self._status, self.stream_status or {}
        named = {
            "stream": self.stream,
            "source": info.get("source"),
            "model": (heartbeat.model or heartbeat.tracker) if heartbeat else None,
            "camera_fps": info.get("source_fps"),
        }
        if self._last_sign_of_life is None or now - self._last_sign_of_life > self._offline_after:
            silence = "yet" if self._last_sign_of_life is None else f"for over {self._offline_after:g} s"
            return FeedStatus(FeedState.TRACKER_OFFLINE, f"no heartbeat from the tracker {silence}", **named)
        if heartbeat is not None and heartbeat.state == "loading":
            return FeedStatus(FeedState.LOADING, f"the tracker is loading {heartbeat.model or 'its model'}", **named)
        if info.get("source_error"):
            return FeedStatus(FeedState.SOURCE_FAILING, str(info["source_error"]), **named)
        if not self._frames_reach_tracker(now):
            return FeedStatus(
                FeedState.NO_SIGNAL,
                f"the tracker is running but gets no frames of {self.stream or 'any stream'}",
                **named,
            )
        camera = info.get("source_fps")
        if camera:
            ratio = self.fps / camera
            slow = ratio < KEEPS_UP_RATIO if self.state is FeedState.SLOW else ratio < SLOW_RATIO
            if slow:
                return FeedStatus(FeedState.SLOW, "the tracker is slower than the camera", **named)
        return FeedStatus(FeedState.LIVE, "frames reach the tracker and its results keep up", **named)

    def _frames_reach_tracker(self, now: float) -> bool:
        """Whether the heartbeats say the tracker listened less than ``no_signal_after_s`` without a frame."""
        info = self.stream_status
        if self._status is None or info is None or "frames_received" not in info:
            # A tracker that does not say (protocol 1) is judged by its results.
            return self._last_result is not None and now - self._last_result <= self._no_signal_after
        silent = info.get("frames_silent_s")
        if silent is not None:  # time spent tracking is left out by the tracker itself
            return silent <= self._no_signal_after
        received_t = info.get("last_received_t")  # a tracker of before frames_silent_s
        if received_t is None:
            return False
        age = (self._status.t - received_t) + (now - self._status_received)
        return age <= self._no_signal_after

    def _forget_old_arrivals(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0] > FPS_WINDOW_S:
            self._arrivals.popleft()


# Masks by their bounding boxes: what the compositor draws, at the box's cost rather than the frame's.
_decode_for_compositor = functools.partial(decode_result, box_masks=True)


def _stream_of(parts: list) -> str | None:
    """The stream a result's topic names, read without decoding it (``None`` for a malformed topic)."""
    try:
        return parse_topic(bytes(parts[0]))[1]
    except (ValueError, IndexError):
        return None
