"""Peer connections to viewers and the composited video they receive.

One ``CompositedTrack`` draws each result onto the frame it was computed for; ``SharedVideo``
(``streamer.gateway.encoding``) encodes it once per frame, and every viewer's sender gets the same
encoded packets: a viewer costs no encode, a slow one skips to a keyframe for itself and slows no one
else. Per frame a viewer actually gets, its data channel carries the objects' metadata (ids, boxes,
scores).

Offers are hostile input: one must ask for video (``check_offer``), and a viewer holds its slot
only while its peer connection is on its way to connect (``connect_timeout_s``) or connected.
When viewers leave, the memory their connections held is given back (``streamer.gateway.memory``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import av
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streamer.compositor import CompositeStyle, banner_frame, color_hex, composite
from streamer.gateway.encoding import (
    VIDEO_TIME_BASE,
    PacketTrack,
    SharedVideo,
    negotiated_codec,
    prefer_codecs,
    route_keyframe_requests,
)
from streamer.gateway.feed import FeedItem, FeedState, FeedStatus, ResultFeed
from streamer.gateway.ice import gather_on
from streamer.gateway.memory import release_memory
from streamer.gateway.prompts import PromptForwarder

log = logging.getLogger(__name__)

DEFAULT_SIZE = (640, 360)
# Metadata is dropped, not queued, for a viewer whose data channel is this far behind.
MAX_CHANNEL_BACKLOG = 256 * 1024
# An offer from a browser has one video and one data section and a few candidates per network
# interface; far more is an attack on the ICE agent (every candidate pair gets checked).
MAX_MEDIA_SECTIONS = 8
MAX_CANDIDATES = 64
# Viewers leaving close together are given back their memory in one go, once their teardown is over.
RELEASE_MEMORY_AFTER_S = 1.0
BANNER_TITLES = {
    FeedState.LOADING: "Loading the model",
    FeedState.SOURCE_FAILING: "Source failing",
    FeedState.NO_SIGNAL: "No signal",
    FeedState.TRACKER_OFFLINE: "Tracker offline",
}


class CompositedTrack(MediaStreamTrack):
    """The shared outbound video: each new result composited onto its own frame.

    While the feed is not live it sends a banner frame (at ``banner_fps``, at the last frame
    size) instead of freezing on the last image. It does no work until ``set_demand(True)``.
    Frames come out in I420, ready for the encoder; each one's ``opaque`` is the ``FeedItem`` it shows
    (``None`` for a banner).
    """

    kind = "video"

    def __init__(self, feed: ResultFeed, style: CompositeStyle = CompositeStyle(), banner_fps: float = 10.0) -> None:
        super().__init__()
        self._feed = feed
        self._style = style
        self._banner_interval = 1.0 / banner_fps
        self._demand = asyncio.Event()
        self._seen = 0
        self._size = DEFAULT_SIZE
        self._t0 = time.monotonic()
        self._last_pts = -1
        self._next_banner = 0.0
        self.frames_composited = 0
        # One thread draws every frame: OpenCV 5 keeps a copy of its text font (about 5.7 MB) in each
        # thread that ever draws text, so drawing in the shared pool would leave one per pool thread.
        self._drawing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compositor")

    def set_demand(self, wanted: bool) -> None:
        """Produce frames only while someone watches (the relay would otherwise pull forever)."""
        if wanted:
            self._demand.set()
        else:
            self._demand.clear()

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        while self.readyState == "live":
            await self._demand.wait()
            if self._feed.state.shows_results:
                shown = await self._next_shown()
                if shown is not None and self.readyState == "live":  # stop() shuts the drawing thread
                    return await loop.run_in_executor(self._drawing, self._render, shown)
            elif time.monotonic() < self._next_banner:
                await asyncio.sleep(self._next_banner - time.monotonic())
            else:
                self._next_banner = time.monotonic() + self._banner_interval
                status = self._feed.status
                banner = banner_frame(*self._size, BANNER_TITLES[status.state], status.detail[:120])
                return self._video_frame(banner, None)
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._demand.set()  # wake a pending recv so it sees the stop
        self._drawing.shutdown(wait=False)

    async def _next_shown(self) -> Any:
        """What the next frame shows (waiting up to a banner interval), or ``None``: a new result with its frame."""
        item = await self._feed.wait_after(self._seen, timeout=self._banner_interval)
        if item is None:
            return None
        self._seen = item.number
        return item if item.frame is not None else None

    def _render(self, item: FeedItem) -> av.VideoFrame:
        assert item.frame is not None
        height, width = item.frame.shape[:2]
        self._size = (width, height)
        self.frames_composited += 1
        return self._video_frame(composite(item.frame, item.message.objects, self._style), item)

    def _video_frame(self, rgb: np.ndarray, item: FeedItem | None) -> av.VideoFrame:
        # I420 wants even sizes; an odd last row or column is dropped. OpenCV converts with the same BT.601
        # limited-range matrix as swscale, several times faster.
        height, width = rgb.shape[:2]
        rgb = rgb[: height - height % 2, : width - width % 2]
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        frame.opaque = item
        # Presentation time follows the wall clock at send time, strictly increasing.
        pts = max(int((time.monotonic() - self._t0) * VIDEO_TIME_BASE.denominator), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame


def objects_message(item: FeedItem, fps: float, camera_fps: float | None = None) -> dict[str, Any]:
    """The data channel's per-frame ``objects`` message (no masks; ``color`` extends docs/interfaces.md);
    ``fps`` is the results' rate, ``camera_fps`` the camera's (when the tracker knows it)."""
    m = item.message
    return {
        "type": "objects",
        "seq": m.seq,
        "frame_index": m.frame_index,
        "t_capture": m.t_capture,
        "latency_ms": round((time.time() - m.t_capture) * 1000.0, 1),
        "fps": round(fps, 2),
        "camera_fps": None if camera_fps is None else round(camera_fps, 2),
        "width": m.width,
        "height": m.height,
        "objects": [
            {
                "obj_id": o.obj_id,
                "score": round(float(o.score), 4),
                "bbox": [int(v) for v in o.bbox],
                "label": o.label,
                "color": color_hex(o.obj_id),  # the mask's colour, for the page's swatch
            }
            for o in m.objects
        ],
    }


class ObjectsText:
    """The per-frame ``objects`` message as JSON text, made once per frame for every viewer showing it;
    ``describe`` makes it from what the frame shows (a ``FeedItem`` for the exact view)."""

    def __init__(
        self, feed: ResultFeed, describe: Callable[[Any, float, float | None], dict] = objects_message
    ) -> None:
        self._feed = feed
        self._describe = describe
        self._number = -1
        self._text = ""

    def __call__(self, item: Any) -> str:
        if item.number != self._number:
            message = self._describe(item, self._feed.fps, self._feed.status.camera_fps)
            self._number, self._text = item.number, json.dumps(message)
        return self._text


def check_offer(sdp: str) -> None:
    """Refuse (``ValueError`` naming the problem) an offer that cannot make a viewer.

    It must parse, stay within ``MAX_MEDIA_SECTIONS`` and ``MAX_CANDIDATES``, and ask to receive video:
    an offer without video would hold a viewer's slot while never showing anything.
    """
    try:
        description = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser fails with ValueError, AssertionError, IndexError...
        raise ValueError(f"sdp: cannot parse the offer ({type(exc).__name__}: {str(exc)[:100]})") from None
    if len(description.media) > MAX_MEDIA_SECTIONS:
        raise ValueError(f"sdp: {len(description.media)} media sections, at most {MAX_MEDIA_SECTIONS}")
    candidates = sum(len(m.ice_candidates) for m in description.media)
    if candidates > MAX_CANDIDATES:
        raise ValueError(f"sdp: {candidates} ICE candidates, at most {MAX_CANDIDATES}")
    receives = (None, "recvonly", "sendrecv")  # the offerer's direction; none given means sendrecv
    if not any(m.kind == "video" and m.port != 0 and m.direction in receives for m in description.media):
        raise ValueError(
            "sdp: the offer receives no video; add a video transceiver "
            "(addTransceiver('video', {direction: 'recvonly'}))"
        )


VIEWS = ("exact", "smooth")


@dataclass(frozen=True)
class View:
    """One way of watching: its shared video (one encode per frame) and its per-frame metadata text."""

    video: SharedVideo
    objects_text: ObjectsText


class ViewerSession:
    """One operator: a peer connection, its video track and its ``prompts`` data channel.

    ``connected`` is set once the peer connection has connected.
    """

    def __init__(
        self, pc: RTCPeerConnection, feed: ResultFeed, prompts: PromptForwarder, views: dict[str, View]
    ) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.pc = pc
        self.frames_sent = 0
        self.codec: str | None = None  # settled by the answer
        self.view = "exact"  # a client that does not choose (a robot, a script) gets results on their frames
        self._views = views
        self._feed = feed
        self._prompts = prompts
        self._objects_text = views[self.view].objects_text
        self._channel: RTCDataChannel | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.video = PacketTrack(self.on_frame)
        self._unsubscribe = feed.add_listener(self._on_state)
        # Tracker events (a prompt failed when applied, objects re-acquired after a restart) reach every viewer.
        self._unsubscribe_events = feed.add_event_listener(
            lambda event: self._send(prompts.event_message(event), always=True)
        )
        pc.on("datachannel", self._on_datachannel)

    def on_frame(self, item: FeedItem | None) -> None:
        """Count a frame sent and send the metadata of the result it shows (banners have none)."""
        self.frames_sent += 1
        if item is not None:
            self._send_text(self._objects_text(item))

    async def close(self) -> None:
        """Close the peer connection and stop answering prompts (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._unsubscribe_events()
        for task in list(self._tasks):
            if task is not asyncio.current_task():  # the watchdog closes its own session
                task.cancel()
        self.video.stop()  # a sender that never started would not stop it
        await self.pc.close()

    def choose_view(self, name: object) -> dict[str, Any]:
        """Watch the ``exact`` or ``smooth`` view from the next keyframe on; the answer for the ``view`` channel."""
        if name not in self._views:
            why = "" if name in VIEWS else f"must be one of {', '.join(VIEWS)}; "
            error = f"view: {why}this gateway offers {', '.join(self._views)} (smooth needs --frames-endpoint)"
            return {"type": "view", "ok": False, "view": self.view, "error": error}
        old, new = self._views[self.view], self._views[str(name)]
        if new is not old and self.codec is not None and self.video.readyState == "live":
            old.video.unsubscribe(self.video)
            new.video.subscribe(self.video, self.codec)
            self._objects_text = new.objects_text
        self.view = str(name)
        return {"type": "view", "ok": True, "view": self.view, "error": None}

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == "view":  # plain text: "exact" or "smooth"; each answered on the channel
            channel.on("message", lambda text: channel.send(json.dumps(self.choose_view(_view_name(text)))))
            return
        if channel.label != "prompts":
            return
        self._channel = channel
        channel.on("message", self._on_message)
        self._on_state(self._feed.status)  # the current state, so the page can show it at once

    def run_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` for this session; cancelled when the session closes."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_message(self, message: str | bytes) -> None:
        self.run_task(self._answer(message))

    async def _answer(self, message: str | bytes) -> None:
        self._send(await self._prompts.handle(message), always=True)

    def _on_state(self, status: FeedStatus) -> None:
        self._send({"type": "status", **status.to_json(), "views": list(self._views)}, always=True)

    def _send(self, payload: dict[str, Any], always: bool = False) -> None:
        self._send_text(json.dumps(payload), always)

    def _send_text(self, text: str, always: bool = False) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        if not always and channel.bufferedAmount > MAX_CHANNEL_BACKLOG:
            return
        channel.send(text)


def _view_name(text: str | bytes) -> str | None:
    """A view channel message's view name (bounded: anything long or not text names no view)."""
    return text.strip() if isinstance(text, str) and len(text) <= 16 else None


class TooManyViewers(Exception):
    """Raised by ``Broadcaster.answer`` when ``max_viewers`` are connected."""


class Broadcaster:
    """Answers viewers' offers and keeps their sessions; all share one ``CompositedTrack`` and one encode
    per frame (``video``; ``video_bitrate`` in bits/s, ``None``: by frame size).

    A session holds one of ``max_viewers`` slots from its offer until its peer connection fails or
    closes, or has not connected within ``connect_timeout_s``.
    """

    def __init__(
        self,
        feed: ResultFeed,
        prompts: PromptForwarder,
        *,
        style: CompositeStyle = CompositeStyle(),
        banner_fps: float = 10.0,
        ice_hosts: Sequence[str] = ("127.0.0.1",),
        ice_servers: Sequence[str] = (),
        max_viewers: int = 8,
        connect_timeout_s: float = 5.0,
        video_bitrate: int | None = None,
        smooth: View | None = None,
    ) -> None:
        self.track = CompositedTrack(feed, style, banner_fps)
        self.video = SharedVideo(self.track, video_bitrate)
        self.views = {"exact": View(self.video, ObjectsText(feed))}
        if smooth is not None:  # the camera's frames with the newest masks: streamer.gateway.camera
            self.views["smooth"] = smooth
        self.sessions: set[ViewerSession] = set()
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self.expired = 0  # sessions closed for not connecting in time
        # Every peer connection made, until garbage collected: open ones and closed ones not yet freed.
        self.peer_connections: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()
        self._release: asyncio.Task[None] | None = None
        self._closed = False
        self._frames_sent_closed = 0  # by sessions gone, so the total only grows
        self._feed = feed
        self._prompts = prompts
        self._ice_hosts = tuple(ice_hosts)
        self._ice_servers = [RTCIceServer(url) for url in ice_servers]

    @property
    def frames_sent(self) -> int:
        """Frames handed to viewers' encoders since start."""
        return self._frames_sent_closed + sum(s.frames_sent for s in self.sessions)

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Create a session for ``offer`` (with its candidates gathered) and return the answer.

        Raises ``ValueError`` naming the problem for an offer that cannot make a viewer, and
        ``TooManyViewers`` when every slot is taken.
        """
        check_offer(offer.sdp)
        if len(self.sessions) >= self.max_viewers:
            raise TooManyViewers(f"{len(self.sessions)} viewers connected, the limit is {self.max_viewers}")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        self.peer_connections.add(pc)
        session = ViewerSession(pc, self._feed, self._prompts, self.views)
        self.sessions.add(session)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                session.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                await self._drop(session)

        try:
            transceiver = pc.addTransceiver(session.video, direction="sendonly")
            prefer_codecs(transceiver)  # before the offer is applied: that is when the codecs are settled
            await pc.setRemoteDescription(offer)
            with gather_on(self._ice_hosts):
                await pc.setLocalDescription(await pc.createAnswer())
            codec = session.codec = negotiated_codec(pc.localDescription.sdp, transceiver.mid)
            self.views[session.view].video.subscribe(session.video, codec)
            route_keyframe_requests(transceiver.sender, session.video)
        except Exception as exc:
            await self._drop(session)
            if isinstance(exc, ValueError):
                raise
            # Anything else aiortc trips over in a hostile offer is still the offer's fault.
            raise ValueError(f"{type(exc).__name__}: {str(exc)[:100]}") from exc
        session.run_task(self._close_unless_connected(session))
        log.info("viewer %s: answered, video %s (%d viewers)", session.id, codec, len(self.sessions))
        return pc.localDescription

    async def close(self) -> None:
        """Close every peer connection and stop the shared track."""
        self._closed = True
        await asyncio.gather(*(self._drop(s) for s in list(self.sessions)), return_exceptions=True)
        if self._release is not None:
            self._release.cancel()
        for view in self.views.values():
            # The source first: a stopped source ends the encoding loop's pending recv by itself, so the
            # close never rests on that recv honouring a cancellation (Python 3.11's wait_for, which the
            # recv waits in, can swallow one that races with its wait completing).
            view.video.source.stop()
            await view.video.close()

    async def _close_unless_connected(self, session: ViewerSession) -> None:
        try:
            await asyncio.wait_for(session.connected.wait(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            self.expired += 1
            log.info("viewer %s: not connected within %.1f s; closing it", session.id, self.connect_timeout_s)
            await self._drop(session)

    async def _drop(self, session: ViewerSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._frames_sent_closed += session.frames_sent
            log.info("viewer %s: closed (%d viewers)", session.id, len(self.sessions))
        await session.close()
        if not self._closed and (self._release is None or self._release.done()):
            self._release = asyncio.ensure_future(self._release_memory())

    async def _release_memory(self) -> None:
        await asyncio.sleep(RELEASE_MEMORY_AFTER_S)
        release_memory()
