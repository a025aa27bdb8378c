"""The "smooth" view: video at the camera's rate, the newest masks drawn on newer frames, marked as held.

With a tracker slower than the camera the exact view (``CompositedTrack``: each result on its own frame)
runs at the tracker's rate. The smooth view reads the captures' frames socket itself (``CameraFeed``, only
while a viewer watches it) and draws the newest result's masks on every newer camera frame; a frame whose
masks were computed on an earlier one is tagged "held" with how many frames earlier, on the picture and
in the per-frame metadata (``HeldFrame``), so nobody mistakes them for masks of that frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import cv2
import numpy as np
import zmq.asyncio

from streamer.compositor import CompositeStyle, composite
from streamer.gateway.feed import FeedItem, ResultFeed
from streamer.gateway.webrtc import CompositedTrack, objects_message
from streamer.protocol import FrameHeader, ProtocolError, peek_frames_kind
from streamer.security import SocketSecurity
from streamer.transport import drain_async, frames_subscriber, latest_per_stream

log = logging.getLogger(__name__)

_POLL_MS = 100


@dataclass(frozen=True)
class CameraFrame:
    """One camera frame as the capture sent it; ``number`` counts frames taken (from 1)."""

    number: int
    header: FrameHeader
    pixels: np.ndarray


@dataclass(frozen=True)
class HeldFrame:
    """What a smooth-view frame shows: a camera frame and the result whose masks are drawn on it (``None``
    before the first). ``held`` when the masks were computed on an earlier frame."""

    number: int
    camera: FrameHeader
    item: FeedItem | None
    pixels: np.ndarray  # the camera frame's

    @property
    def held(self) -> bool:
        return self.item is not None and self.item.message.seq != self.camera.seq


class CameraFeed:
    """The newest frame of the followed stream, from the captures' frames socket (latest-value), read only
    while :meth:`want` says a viewer needs it; ``stream`` names the stream to keep (the results' one)."""

    def __init__(
        self,
        endpoint: str,
        stream: Callable[[], str | None],
        *,
        context: zmq.asyncio.Context | None = None,
        security: SocketSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._stream = stream
        self._context = context
        self._security = security
        self._task: asyncio.Task[None] | None = None
        self._new_frame = asyncio.Condition()
        self.latest: CameraFrame | None = None
        self.frames_taken = 0

    def want(self, wanted: bool) -> None:
        """Read frames while ``wanted`` (a smooth viewer watches); stop reading and close the socket otherwise."""
        if wanted and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._receive())
        elif not wanted and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def wait_after(self, number: int, timeout: float) -> CameraFrame | None:
        """The newest frame if newer than ``number``, waiting up to ``timeout`` seconds for one."""
        async with self._new_frame:
            try:
                await asyncio.wait_for(
                    self._new_frame.wait_for(lambda: self.latest is not None and self.latest.number > number), timeout
                )
            except asyncio.TimeoutError:
                return None
            return self.latest

    async def _receive(self) -> None:
        context = self._context or zmq.asyncio.Context.instance()
        sock = frames_subscriber(self.endpoint, context=context, security=self._security)
        try:
            while True:
                messages = await drain_async(sock, timeout_ms=_POLL_MS)
                frames = [parts for parts in messages if _is_frame(parts)]  # the captures' source words aside
                stream = self._stream()
                newest = latest_per_stream(frames).get(stream) if stream is not None else None
                if newest is not None:
                    async with self._new_frame:
                        self.frames_taken += 1
                        self.latest = CameraFrame(self.frames_taken, *newest)
                        self._new_frame.notify_all()
        finally:
            sock.close(linger=0)


def _is_frame(parts: list) -> bool:
    try:
        return peek_frames_kind(parts) == "frame"
    except ProtocolError:
        return True  # latest_per_stream counts and logs it as malformed


class SmoothTrack(CompositedTrack):
    """The smooth view's shared video: every new camera frame with the newest result's masks, tagged when
    held. Banners (no results) are the exact view's own."""

    def __init__(
        self, feed: ResultFeed, camera: CameraFeed, style: CompositeStyle = CompositeStyle(), banner_fps: float = 10.0
    ) -> None:
        super().__init__(feed, style, banner_fps)
        self._camera = camera
        self._camera_seen = 0

    def set_demand(self, wanted: bool) -> None:
        super().set_demand(wanted)
        self._camera.want(wanted)

    async def _next_shown(self) -> HeldFrame | None:
        frame = await self._camera.wait_after(self._camera_seen, timeout=self._banner_interval)
        if frame is None:
            return None
        self._camera_seen = frame.number
        return HeldFrame(frame.number, frame.header, self._feed.latest, frame.pixels)

    def _render(self, held: HeldFrame) -> av.VideoFrame:  # type: ignore[override]
        pixels = held.pixels
        height, width = pixels.shape[:2]
        self._size = (width, height)
        self.frames_composited += 1
        item = held.item
        same_size = item is not None and (item.message.width, item.message.height) == (width, height)
        out = composite(pixels, item.message.objects if same_size and item is not None else [], self._style)
        if held.held and item is not None:
            behind = held.camera.seq - item.message.seq
            _tag(out, f"masks held from {behind} frame{'s' if behind != 1 else ''} earlier")
        return self._video_frame(out, held)


def held_objects_message(held: HeldFrame, fps: float, camera_fps: float | None) -> dict[str, Any]:
    """The per-frame ``objects`` message of a smooth-view frame: the camera frame's ``seq`` (what a click
    on it names), the newest result's objects, ``masks_seq`` (the frame they were computed on) and ``held``."""
    camera = held.camera
    if held.item is not None:
        message = objects_message(held.item, fps, camera_fps)
        message["masks_seq"] = held.item.message.seq
    else:
        message = {"type": "objects", "frame_index": None, "fps": round(fps, 2), "objects": [], "masks_seq": None}
        message["camera_fps"] = None if camera_fps is None else round(camera_fps, 2)
    message.update(
        seq=camera.seq,
        t_capture=camera.t_capture,
        latency_ms=round((time.time() - camera.t_capture) * 1000.0, 1),
        width=camera.width,
        height=camera.height,
        held=held.held,
    )
    return message


def _tag(image: np.ndarray, text: str) -> None:
    """A dark label in the top-left corner, so a held picture says so."""
    scale = max(0.4, image.shape[1] / 1280)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(image, (4, 4), (12 + w, 12 + h + base), (20, 20, 24), -1)
    cv2.putText(image, text, (8, 8 + h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 210, 80), 1, cv2.LINE_AA)
