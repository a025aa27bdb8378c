"""One encode per frame for every viewer: real aiortc viewers of an in-process gateway, and the shared
stream's keyframe and catch-up rules on a real encoder."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import av
import numpy as np
import pytest
from helpers import HEIGHT, WIDTH, FakeTracker, Viewer, fetch_json, gateway, run

from streamer.gateway.encoding import (
    H264,
    MAX_LAG_FRAMES,
    VIDEO_TIME_BASE,
    VP8,
    EncodedStream,
    PacketTrack,
    SharedVideo,
    VideoEncoder,
)


def count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the real encoder (it still encodes); returns the counter, one slot."""
    calls = [0]
    encode = VideoEncoder.encode

    def counted(self: VideoEncoder, frame: av.VideoFrame, keyframe: bool = False) -> Any:
        calls[0] += 1
        return encode(self, frame, keyframe)

    monkeypatch.setattr(VideoEncoder, "encode", counted)
    return calls


async def decoded_hashes(viewer: Viewer, seconds: float) -> list[str]:
    """Digests of the pictures ``viewer`` decodes during ``seconds``."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(hashlib.blake2b((await viewer.frame()).tobytes(), digest_size=8).hexdigest())
    return out


def test_eight_viewers_decode_the_same_frames_from_one_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_encodes(monkeypatch)

    async def body() -> None:
        async with FakeTracker(fps=20) as tracker, gateway(tracker) as url:
            tracker.moving = True  # every frame's picture differs
            viewers = [Viewer() for _ in range(8)]
            try:
                await asyncio.gather(*(v.connect(url) for v in viewers))
                await asyncio.gather(*(v.frame() for v in viewers))  # all flowing
                assert {v.codec for v in viewers} == {H264}
                _, before = await fetch_json(f"{url}/health")
                calls_before = calls[0]
                seen = await asyncio.gather(*(decoded_hashes(v, 2.0) for v in viewers))
                _, after = await fetch_json(f"{url}/health")
            finally:
                await asyncio.gather(*(v.close() for v in viewers))
        encoded = calls[0] - calls_before
        composited = after["frames_composited"] - before["frames_composited"]
        counts = [len(s) for s in seen]
        common = set.intersection(*(set(s) for s in seen))
        print(f"\n8 viewers: {counts} frames decoded each, {len(common)} pictures common to all, {encoded} encodes")
        assert after["video"]["H264"]["viewers"] == 8
        assert min(counts) >= 20, "every viewer gets the feed (20 fps for 2 s)"
        # One encode per composited frame, not one per viewer and frame.
        assert abs(encoded - composited) <= 2 and encoded <= max(counts) + 3
        assert sum(counts) >= 6 * encoded
        # The same encoded frames decode to the same pictures in every viewer.
        assert len(common) >= 0.8 * min(counts)

    run(body(), timeout=60)


def test_a_viewer_that_sends_pli_gets_a_keyframe_and_a_storm_is_rate_limited() -> None:
    async def body() -> None:
        async with FakeTracker(fps=30) as tracker, gateway(tracker) as url:
            tracker.moving = True
            viewer = Viewer()
            try:
                await viewer.connect(url)
                assert (await viewer.video_frame()).key_frame, "a new viewer starts on a keyframe"
                for _ in range(20):  # settle: the stream makes no keyframe on its own for seconds
                    await viewer.video_frame()
                _, before = await fetch_json(f"{url}/health")
                await viewer.send_pli()
                for _ in range(30):
                    if (await viewer.video_frame()).key_frame:
                        break
                else:
                    raise AssertionError("no keyframe within 30 frames of the PLI")
                _, after = await fetch_json(f"{url}/health")
                assert after["video"]["H264"]["keyframe_requests"] > before["video"]["H264"]["keyframe_requests"]
                # A storm: 40 PLIs over 1 s make at most one keyframe per half second.
                start = after["video"]["H264"]["keyframes"]
                for _ in range(40):
                    await viewer.send_pli()
                    await asyncio.sleep(0.025)
                _, storm = await fetch_json(f"{url}/health")
            finally:
                await viewer.close()
        made = storm["video"]["H264"]["keyframes"] - start
        print(f"\nkeyframes made for 40 PLIs in 1 s: {made}")
        assert 1 <= made <= 3

    run(body(), timeout=40)


def test_a_viewer_without_h264_gets_vp8_alongside_h264_viewers() -> None:
    async def body() -> None:
        async with FakeTracker(fps=20) as tracker, gateway(tracker) as url:
            plain, vp8_only = Viewer(), Viewer(codecs=[VP8])
            try:
                await plain.connect(url)
                await vp8_only.connect(url)
                assert (plain.codec, vp8_only.codec) == (H264, VP8)
                live = (HEIGHT, WIDTH, 3)  # past the banner shown until the feed is live
                await asyncio.gather(*(v.frame_where(lambda im: im.shape == live) for v in (plain, vp8_only)))
                for _ in range(5):
                    a, b = await asyncio.gather(plain.frame(), vp8_only.frame())
                    assert a.shape == b.shape == live
                _, health = await fetch_json(f"{url}/health")
            finally:
                await plain.close()
                await vp8_only.close()
        video = health["video"]
        assert video["H264"]["viewers"] == video["VP8"]["viewers"] == 1
        assert video["H264"]["frames_encoded"] >= 5 and video["VP8"]["frames_encoded"] >= 5

    run(body(), timeout=40)


def _frame(number: int) -> av.VideoFrame:
    picture = np.full((48, 64, 3), 80, np.uint8)
    picture[:, (number * 3) % 56 : (number * 3) % 56 + 8] = 220
    frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
    frame.pts, frame.time_base = number * 3000, VIDEO_TIME_BASE
    return frame


def test_a_slow_viewer_skips_to_a_keyframe_for_itself_only() -> None:
    """Two tracks on one stream of real H.264: one reads every frame; the other stalls past MAX_LAG_FRAMES,
    then gets the next keyframe (asked for once) and never a frame that depends on one it missed."""

    async def body() -> None:
        stream = EncodedStream(H264, keyframe_gap_s=0.0)
        fast_items: list[int] = []
        slow_items: list[int] = []
        fast, slow = PacketTrack(fast_items.append), PacketTrack(slow_items.append)
        for track in (fast, slow):
            track.join(stream, lambda t: None)
        try:
            number = 0

            async def publish(count: int) -> None:
                nonlocal number
                for _ in range(count):
                    number += 1
                    await stream.encode(_frame(number), number)

            await publish(1)
            assert (await fast.recv()).is_keyframe and (await slow.recv()).is_keyframe
            for _ in range(MAX_LAG_FRAMES + 4):  # the slow one reads nothing meanwhile
                await publish(1)
                await fast.recv()
            requests = stream.keyframe_requests
            pending = asyncio.ensure_future(slow.recv())
            await asyncio.sleep(0.05)
            assert not pending.done(), "the slow viewer waits for a keyframe instead of a broken picture"
            assert stream.keyframe_requests == requests + 1 and slow.skips == 1
            await publish(1)
            await fast.recv()
            packet = await asyncio.wait_for(pending, 5)
            assert packet.is_keyframe and slow_items[-1] == number
            assert fast_items == list(range(1, number + 1)), "the fast viewer got every frame, in order"
            await publish(1)
            assert (await slow.recv()).pts == _frame(number).pts  # and the slow one is in order again
        finally:
            stream.close()

    run(body(), timeout=20)


class _HeldSource:
    """A source whose ``recv`` hands out a frame only when the test releases one (``set_demand`` recorded)."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[av.VideoFrame] = asyncio.Queue()
        self.demand: list[bool] = []

    def set_demand(self, wanted: bool) -> None:
        self.demand.append(wanted)

    async def recv(self) -> av.VideoFrame:
        return await self.frames.get()


def test_a_frame_arriving_after_the_last_viewer_left_is_dropped_and_the_next_viewer_is_fed() -> None:
    """The last viewer leaves while a frame is being composited: that frame goes nowhere, the shared
    encoding loop keeps running (it used to end on an exception nobody retrieved), a new viewer is fed."""

    async def body() -> None:
        source = _HeldSource()
        video = SharedVideo(source)
        first = PacketTrack(lambda item: None)
        video.subscribe(first, H264)
        task = video._task
        try:
            first.stop()  # leaves while the source is composing its next frame
            assert source.demand == [True, False] and not video.streams
            source.frames.put_nowait(_frame(1))
            await asyncio.sleep(0.05)
            assert task is not None and not task.done(), "the encoding loop ended"
            second = PacketTrack(lambda item: None)
            video.subscribe(second, H264)
            assert video._task is task
            source.frames.put_nowait(_frame(2))
            packet = await asyncio.wait_for(second.recv(), 5)
            assert packet.is_keyframe and packet.pts == _frame(2).pts
            second.stop()
        finally:
            await video.close()

    run(body(), timeout=20)
