"""One video encode per frame, whatever the number of viewers.

:class:`SharedVideo` pulls each composited frame once and encodes it once per codec in use (H.264
through PyAV's libx264 for nearly every browser, VP8 for one that lacks H.264), into an
:class:`EncodedStream`. Each viewer's :class:`PacketTrack` hands its ``RTCRtpSender`` the stream's
``av.Packet`` objects themselves: aiortc's sender packs an already-encoded packet into RTP without
encoding it again (``Encoder.pack``), so a viewer costs its packetization and encryption only.

Frames of an inter-coded stream depend on the ones before, so a viewer must get them in order from a
keyframe on. A viewer that joins, or falls ``MAX_LAG_FRAMES`` behind (a slow viewer), waits for a
keyframe and skips everything until then: it drops frames for itself only. Keyframes are made when
asked for (a new or lagging viewer, or a viewer's PLI or FIR), at most one per ``keyframe_gap_s``: a
request within the gap is served when the gap ends, so one viewer cannot force a keyframe storm on all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

H264 = "video/H264"
VP8 = "video/VP8"
CODECS = (H264, VP8)  # in order of preference
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)  # RTP's video clock
# A viewer this many frames behind the newest (about 0.2 s at 30 fps) skips to a fresh keyframe.
MAX_LAG_FRAMES = 6
# Frames kept for viewers catching up: enough to start a new viewer on a recent keyframe.
HISTORY_FRAMES = 32
KEYFRAME_GAP_S = 0.5
# Below this many bits per pixel per second a 1080p picture of moving masks turns to mush; more only costs
# bandwidth (libx264's ultrafast preset spends about the same CPU whatever the rate).
BITS_PER_PIXEL_SECOND = 1.5
MIN_BITRATE, MAX_BITRATE = 500_000, 8_000_000
# A periodic keyframe as well, so a viewer whose PLI got lost still recovers.
KEYFRAME_INTERVAL_FRAMES = 300


def default_bitrate(width: int, height: int) -> int:
    """Bits per second for a ``width x height`` stream: about 1.4 Mb/s at 720p, 3.1 Mb/s at 1080p."""
    return int(min(max(width * height * BITS_PER_PIXEL_SECOND, MIN_BITRATE), MAX_BITRATE))


@dataclass(frozen=True)
class EncodedFrame:
    """One composited frame, encoded: ``number`` counts the stream's frames from 1; ``item`` is what the
    frame shows (the viewers' metadata), whatever the caller attached."""

    number: int
    packet: av.Packet
    keyframe: bool
    item: Any


class VideoEncoder:
    """One PyAV encoder (``H264`` or ``VP8``) set for low latency: no B-frames, no look-ahead, one packet
    per frame, a keyframe when asked. It is re-opened (starting with a keyframe) when the frame size changes.
    """

    def __init__(self, codec: str, bitrate: int | None = None) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec: {codec!r} is not one of {', '.join(CODECS)}")
        self.codec = codec
        self.bitrate = bitrate
        self._context: av.VideoCodecContext | None = None

    def encode(self, frame: av.VideoFrame, keyframe: bool = False) -> tuple[av.Packet, bool] | None:
        """The packet of ``frame`` (its ``pts`` and ``time_base``) and whether it is a keyframe, or ``None``."""
        context = self._context
        if context is None or (context.width, context.height) != (frame.width, frame.height):
            context = self._context = self._open(frame.width, frame.height)
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        packets = context.encode(frame)
        if not packets:
            return None
        packet = packets[0] if len(packets) == 1 else av.Packet(b"".join(bytes(p) for p in packets))
        packet.pts, packet.time_base = frame.pts, frame.time_base
        return packet, any(p.is_keyframe for p in packets)

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        context = av.CodecContext.create("libx264" if self.codec == H264 else "libvpx", "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.time_base = VIDEO_TIME_BASE
        context.framerate = fractions.Fraction(30, 1)  # a rate-control hint; frames come when results do
        context.bit_rate = self.bitrate or default_bitrate(width, height)
        context.gop_size = KEYFRAME_INTERVAL_FRAMES
        if self.codec == H264:
            # Baseline (what every browser decodes), nothing that delays output, and an IDR when forced.
            context.profile = "Baseline"
            context.options = {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1"}
        else:
            context.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "error-resilient": "1"}
        return context


class EncodedStream:
    """The encoded frames of one codec that every viewer of that codec shares, and its keyframe requests."""

    def __init__(self, codec: str, bitrate: int | None = None, keyframe_gap_s: float = KEYFRAME_GAP_S) -> None:
        self.codec = codec
        self.encoder = VideoEncoder(codec, bitrate)
        self.keyframe_gap_s = keyframe_gap_s
        self.viewers = 0
        self.frames_encoded = 0
        self.keyframes = 0
        self.keyframe_requests = 0  # asked for by new or lagging viewers and by PLI/FIR
        self.encode_seconds = 0.0
        self._frames: deque[EncodedFrame] = deque(maxlen=HISTORY_FRAMES)
        self._keyframe_wanted = False
        self._last_forced = -math.inf  # monotonic
        self._published = asyncio.Event()
        # Encoders write into their own state: one thread per stream keeps them in order.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"encode-{codec.split('/')[1]}")

    @property
    def newest(self) -> int:
        """Number of the newest frame (0 before the first)."""
        return self._frames[-1].number if self._frames else 0

    def frame(self, number: int) -> EncodedFrame | None:
        """Frame ``number`` if it is still in the history."""
        if not self._frames or not self._frames[0].number <= number <= self._frames[-1].number:
            return None
        return self._frames[number - self._frames[0].number]

    def keyframe_after(self, number: int) -> EncodedFrame | None:
        """The newest keyframe numbered above ``number`` still in the history."""
        for frame in reversed(self._frames):
            if frame.number <= number:
                return None
            if frame.keyframe:
                return frame
        return None

    def request_keyframe(self) -> None:
        """Make a keyframe soon: with the next frame, or once ``keyframe_gap_s`` has passed since the last
        forced one (requests meanwhile are served by that one keyframe)."""
        self.keyframe_requests += 1
        self._keyframe_wanted = True

    async def encode(self, frame: av.VideoFrame, item: Any) -> None:
        """Encode ``frame`` (in this stream's thread) and publish it to the viewers."""
        keyframe = self._keyframe_wanted and time.monotonic() - self._last_forced >= self.keyframe_gap_s
        if keyframe:
            self._keyframe_wanted = False
            self._last_forced = time.monotonic()
        start = time.perf_counter()
        encoded = await asyncio.get_running_loop().run_in_executor(self._thread, self.encoder.encode, frame, keyframe)
        self.encode_seconds += time.perf_counter() - start
        if encoded is None:
            return
        packet, is_keyframe = encoded
        if is_keyframe:
            self.keyframes += 1
            self._keyframe_wanted = False  # a natural keyframe serves a pending request too
        self.frames_encoded += 1
        self._frames.append(EncodedFrame(self.frames_encoded, packet, is_keyframe, item))
        self.wake()

    async def wait_after(self, number: int) -> None:
        """Return once a frame newer than ``number`` is published, or :meth:`wake` is called."""
        if self.newest <= number:
            await self._published.wait()

    def wake(self) -> None:
        """Wake every waiter (a new frame, or a viewer leaving)."""
        self._published.set()
        self._published = asyncio.Event()

    def stats(self) -> dict[str, Any]:
        """Counters for ``/health``: viewers, frames, keyframes and requests, mean encode milliseconds."""
        mean = self.encode_seconds / self.frames_encoded * 1000.0 if self.frames_encoded else None
        return {
            "viewers": self.viewers,
            "frames_encoded": self.frames_encoded,
            "keyframes": self.keyframes,
            "keyframe_requests": self.keyframe_requests,
            "encode_ms": None if mean is None else round(mean, 2),
        }

    def close(self) -> None:
        """Let the encoder's thread go (a frame being encoded finishes first)."""
        self._thread.shutdown(wait=False)


class PacketTrack(MediaStreamTrack):
    """One viewer's video: a shared stream's packets, in order from a keyframe on.

    Made before its codec is known (it goes into the viewer's peer connection before the answer), it
    gets its stream from :meth:`SharedVideo.subscribe`. ``on_frame(item)`` hears of each frame handed
    to the viewer's sender; :attr:`skips` counts the times this viewer fell behind and skipped to a keyframe.
    """

    kind = "video"

    def __init__(self, on_frame: Callable[[Any], None]) -> None:
        super().__init__()
        self.stream: EncodedStream | None = None
        self.skips = 0
        self._on_frame = on_frame
        self._leave: Callable[[PacketTrack], None] | None = None
        self._sent = 0  # number of the last frame handed out
        self._in_order = False  # a keyframe and every frame since were handed out
        self._asked = False  # asked for a keyframe and not yet got one

    def join(self, stream: EncodedStream, leave: Callable[[PacketTrack], None]) -> None:
        """Take ``stream``'s frames from now on, from its next keyframe; ``leave(self)`` is called once when
        the track stops (or moves to another stream: see :meth:`SharedVideo.unsubscribe`)."""
        previous = self.stream
        self.stream, self._leave = stream, leave
        self._sent, self._in_order, self._asked = 0, False, False  # frame numbers are the old stream's
        if previous is not None:
            previous.wake()  # a recv waiting on the old stream looks again

    async def recv(self) -> av.Packet:
        while self.readyState == "live" and self.stream is not None:
            frame = self._next(self.stream)
            if frame is not None:
                self._sent = frame.number
                self._on_frame(frame.item)
                return frame.packet
            await self.stream.wait_after(self._sent if self._in_order else self.stream.newest)
        raise MediaStreamError

    def request_keyframe(self) -> None:
        """The viewer lost pictures (its PLI or FIR): ask the stream for a keyframe."""
        if self.stream is not None:
            self.stream.request_keyframe()

    def stop(self) -> None:
        if self.readyState != "live":
            return
        super().stop()
        if self.stream is not None and self._leave is not None:
            self._leave(self)
            self.stream.wake()  # a pending recv sees the stop

    def _next(self, stream: EncodedStream) -> EncodedFrame | None:
        newest = stream.newest
        if self._in_order:
            if self._sent >= newest:
                return None
            frame = stream.frame(self._sent + 1)
            if frame is not None and newest - frame.number < MAX_LAG_FRAMES:
                return frame
            self._in_order = False  # too far behind: start again from a keyframe
            self.skips += 1
        key = stream.keyframe_after(self._sent)
        if key is not None and newest - key.number < MAX_LAG_FRAMES:
            self._in_order, self._asked = True, False
            return key
        if not self._asked:
            self._asked = True
            stream.request_keyframe()
        return None


class SharedVideo:
    """Encodes each frame of ``source`` once per codec some viewer uses, while any viewer watches.

    ``source`` is a track whose ``recv()`` gives ``av.VideoFrame``\\ s (``opaque``: what the frame shows)
    and that has ``set_demand(bool)``. The next frame is composited while this one is encoded.
    """

    def __init__(self, source: Any, bitrate: int | None = None, keyframe_gap_s: float = KEYFRAME_GAP_S) -> None:
        self.source = source
        self.bitrate = bitrate
        self.keyframe_gap_s = keyframe_gap_s
        self.streams: dict[str, EncodedStream] = {}
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, track: PacketTrack, codec: str) -> None:
        """Feed ``track`` with the stream of ``codec`` (``H264`` or ``VP8``) until the track stops."""
        stream = self.streams.get(codec)
        if stream is None:
            stream = self.streams[codec] = EncodedStream(codec, self.bitrate, self.keyframe_gap_s)
        stream.viewers += 1
        track.join(stream, self._unsubscribe)
        self.source.set_demand(True)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def unsubscribe(self, track: PacketTrack) -> None:
        """Stop feeding ``track`` (it is about to join another ``SharedVideo``: a viewer switching views)."""
        if track.stream is not None and track.stream in self.streams.values():
            self._unsubscribe(track)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per codec in use, :meth:`EncodedStream.stats`."""
        return {codec.split("/")[1]: stream.stats() for codec, stream in self.streams.items()}

    async def close(self) -> None:
        """Stop encoding and let every encoder go."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()

    def _unsubscribe(self, track: PacketTrack) -> None:
        stream = track.stream
        assert stream is not None
        stream.viewers -= 1
        if stream.viewers <= 0 and self.streams.get(stream.codec) is stream:
            del self.streams[stream.codec]  # its encoder, history and thread go with it
            stream.close()
        if not self.streams:
            self.source.set_demand(False)

    async def _run(self) -> None:
        upcoming = asyncio.ensure_future(self.source.recv())
        try:
            while True:
                frame = await upcoming
                upcoming = asyncio.ensure_future(self.source.recv())
                streams = list(self.streams.values())
                if not streams:
                    continue  # the last viewer left while this frame was composited; recv waits for the next
                # Each encoder marks its frame (picture type); a second codec gets a copy of its own.
                frames = [frame] + [_copy(frame) for _ in streams[1:]]
                results = await asyncio.gather(
                    *(s.encode(f, frame.opaque) for s, f in zip(streams, frames, strict=True)), return_exceptions=True
                )
                for stream, result in zip(streams, results, strict=True):
                    if isinstance(result, Exception):  # one bad frame must not end the video
                        log.warning("video %s: encoding failed: %r", stream.codec, result)
        except MediaStreamError:
            pass  # the source stopped
        finally:
            upcoming.cancel()


def _copy(frame: av.VideoFrame) -> av.VideoFrame:
    copy = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)
    copy.pts, copy.time_base, copy.opaque = frame.pts, frame.time_base, frame.opaque
    return copy


# --------------------------------------------------------------------------------------------------
# aiortc glue: codec preference, the codec an answer settled on, keyframe requests from RTCP


def prefer_codecs(transceiver: RTCRtpTransceiver) -> None:
    """Offer H.264 first, then VP8 (with retransmission), before the remote description is applied."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs

    def rank(codec: Any) -> tuple[int, bool]:
        # Constrained baseline ("42e0..") before baseline: the profile libx264's Baseline output fits best.
        return CODECS.index(codec.mimeType), not str(codec.parameters.get("profile-level-id")).startswith("42e")

    ranked = sorted((c for c in capabilities if c.mimeType in CODECS), key=rank)
    transceiver.setCodecPreferences(ranked + [c for c in capabilities if c.mimeType == "video/rtx"])


def negotiated_codec(answer_sdp: str, mid: str | None) -> str:
    """The video codec our answer settled on for the media section ``mid`` (its first codec).

    ``ValueError`` when that section has no codec we encode.
    """
    description = aiortc_sdp.SessionDescription.parse(answer_sdp)
    for media in description.media:
        if media.kind == "video" and (mid is None or media.rtp.muxId == mid) and media.rtp.codecs:
            codec = media.rtp.codecs[0].mimeType
            if codec in CODECS:
                return codec
            break
    raise ValueError(f"sdp: the offer accepts none of the video codecs {', '.join(CODECS)}")


# RTCRtpSender answers a PLI or FIR by calling its _send_keyframe(), which only flags its own encoder; a
# sender fed packets has none, so the request is routed to the shared stream instead. Checked at import,
# so an aiortc that renames it fails loudly here rather than silently ignoring viewers' requests.
assert callable(getattr(RTCRtpSender, "_send_keyframe", None)), "aiortc's RTCRtpSender has no _send_keyframe"


def route_keyframe_requests(sender: RTCRtpSender, track: PacketTrack) -> None:
    """Make ``sender``'s PLI and FIR requests reach ``track``'s shared stream."""
    sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]
