"""The gateway end to end on loopback: a real aiortc client, real ZeroMQ sockets playing the tracker.

``FakeTracker`` and ``Viewer`` are shared with ``test_browser.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import aiohttp
import numpy as np
import zmq
import zmq.asyncio
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.compositor import BANNER_BACKGROUND, color_for
from streamer.gateway import GatewayConfig, create_app
from streamer.gateway.feed import FeedState, ResultFeed
from streamer.gateway.ice import gather_on
from streamer.protocol import PromptAnswer, PromptRequest, ResultMessage, StatusMessage, WireObject, encode_result, encode_status
from streamer.transport import ControlServer, bound_endpoint, results_publisher

T = TypeVar("T")
WIDTH, HEIGHT = 320, 240
BACKGROUND = 90
FIRST_OBJECT = (1, 100, 120, 40)  # obj_id, centre x, centre y, radius


def run(coro: Awaitable[T], timeout: float = 40.0) -> T:
    """Run one test's coroutine with a hard deadline (no pytest-asyncio needed)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


class FakeTracker:
    """Plays the tracker on real sockets: PUB results + status heartbeats, ROUTER answering prompts
    (through ``streamer.transport``'s socket factories and ``ControlServer``, as the tracker does).

    Objects are discs: a click makes (or moves) one of radius 20 centred on the click, a box one
    inscribed in the box.
    ``publishing`` / ``heartbeats`` switch the two kinds of traffic off and on.
    """

    def __init__(self, stream: str = "cam0", fps: float = 30.0, heartbeat_s: float = 0.25) -> None:
        self.stream, self.fps, self.heartbeat_s = stream, fps, heartbeat_s
        self.context = zmq.asyncio.Context()
        self.pub = results_publisher("tcp://127.0.0.1:*", context=self.context)
        self.results_endpoint = bound_endpoint(self.pub)
        self.control = ControlServer("tcp://127.0.0.1:*")
        self.control_endpoint = self.control.endpoint
        obj_id, cx, cy, r = FIRST_OBJECT
        self.objects: dict[int, tuple[float, float, float]] = {obj_id: (cx, cy, r)}
        self.labels: dict[int, str] = {obj_id: "thing"}  # as if found by the text prompt "thing"
        self.requests: list[PromptRequest] = []
        self.publishing = True
        self.heartbeats = True
        self.seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FakeTracker:
        self._tasks = [asyncio.create_task(t()) for t in (self._publish, self._heartbeat, self._answer)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pub.close()
        self.control.close()
        self.context.term()

    def result(self) -> tuple[ResultMessage, np.ndarray]:
        frame = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
        frame[:, :, 2] = np.linspace(70, 110, WIDTH, dtype=np.uint8)  # a little texture for the encoder
        objects = []
        for obj_id, (cx, cy, r) in self.objects.items():
            mask = disc(cx, cy, r)
            ys, xs = np.nonzero(mask)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append(WireObject(obj_id, 0.9, bbox, mask, self.labels.get(obj_id)))
        now = time.time()
        message = ResultMessage(self.stream, self.seq, self.seq, now - 0.01, WIDTH, HEIGHT,
                                {"received": now, "tracked": now, "published": now}, {"track": 0.005}, objects)
        self.seq += 1
        return message, frame

    async def _publish(self) -> None:
        while True:
            if self.publishing:
                await self.pub.send_multipart(encode_result(*self.result()), copy=False)
            await asyncio.sleep(1.0 / self.fps)

    async def _heartbeat(self) -> None:
        while True:
            if self.heartbeats:
                info = {"last_seq": self.seq, "last_frame_t": time.time(), "fps": self.fps}
                await self.pub.send_multipart(encode_status(StatusMessage("fake", time.time(), {self.stream: info})))
            await asyncio.sleep(self.heartbeat_s)

    async def _answer(self) -> None:
        while True:
            for envelope, request, _ in self.control.poll_requests(0):
                if isinstance(request, PromptRequest):  # malformed ones were answered by ControlServer
                    self.requests.append(request)
                    self.control.reply(envelope, self.apply(request))
            await asyncio.sleep(0.005)

    def apply(self, request: PromptRequest) -> PromptAnswer:
        if request.op == "reset_session":
            self.objects.clear()
            self.labels.clear()
            return PromptAnswer(request.request_id, True)
        if request.op == "remove_prompt":
            found = [i for i, label in self.labels.items() if label == request.text]
            if not found:
                return PromptAnswer(request.request_id, False, f"text: {request.text!r} is not an active prompt")
            for obj_id in found:
                self.objects.pop(obj_id, None)
                self.labels.pop(obj_id)
            return PromptAnswer(request.request_id, True, obj_ids=found)
        if request.op == "remove_object":
            if self.objects.pop(request.obj_id, None) is None:
                return PromptAnswer(request.request_id, False, f"obj_id: unknown object {request.obj_id}")
            return PromptAnswer(request.request_id, True, obj_ids=[request.obj_id])
        prompt = request.prompt
        assert prompt is not None
        obj_id = prompt.obj_id if prompt.obj_id is not None else max(self.objects, default=0) + 1
        if prompt.points:
            x, y = prompt.points[-1]
            self.objects[obj_id] = (x, y, 20)
        elif prompt.bounding_boxes:
            cx, cy, w, h = prompt.bounding_boxes[0]
            self.objects[obj_id] = (cx * WIDTH, cy * HEIGHT, min(w * WIDTH, h * HEIGHT) / 2)
        else:
            return PromptAnswer(request.request_id, False, "text: the fake tracker takes clicks and boxes only")
        return PromptAnswer(request.request_id, True, obj_ids=[obj_id])


@contextlib.asynccontextmanager
async def gateway(tracker: FakeTracker, port: int = 0, **overrides: Any) -> AsyncIterator[str]:
    """The gateway app served on loopback (a free port unless given); yields its base URL."""
    config = replace(GatewayConfig(results_endpoint=tracker.results_endpoint,
                                   control_endpoint=tracker.control_endpoint, stream_id=tracker.stream,
                                   prompt_timeout_s=1.0), **overrides)
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Viewer:
    """A real aiortc client of the gateway: receives the video and talks on the prompts channel."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("prompts")
        self.statuses: list[str] = []
        self.objects: dict[str, Any] | None = None
        self._track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._answers: dict[str | None, asyncio.Future[dict[str, Any]]] = {}
        self._count = 0
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.on("track", lambda track: self._track.done() or self._track.set_result(track))
        self.channel.on("message", self._on_message)

    async def connect(self, base_url: str) -> None:
        opened = asyncio.get_running_loop().create_future()
        self.channel.on("open", lambda: opened.done() or opened.set_result(None))
        with gather_on(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
            async with http.post(f"{base_url}/offer", json=offer) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(opened, 10)

    async def frame(self) -> np.ndarray:
        track = await asyncio.wait_for(self._track, 10)
        return (await asyncio.wait_for(track.recv(), 5)).to_ndarray(format="rgb24")

    async def frame_where(self, predicate: Any, timeout: float = 8.0) -> np.ndarray:
        deadline = time.monotonic() + timeout
        while True:
            image = await self.frame()
            if predicate(image):
                return image
            assert time.monotonic() < deadline, "no frame matched in time"

    async def send_raw(self, text: str, request_id: str | None) -> dict[str, Any]:
        """Send ``text`` and wait for the answer carrying ``request_id``."""
        future = self._answers[request_id] = asyncio.get_running_loop().create_future()
        self.channel.send(text)
        return await asyncio.wait_for(future, 10)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self._count += 1
        message = {**message, "id": f"t{self._count}"}
        return await self.send_raw(json.dumps(message), message["id"])

    async def wait_status(self, state: str, timeout: float = 6.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.statuses or self.statuses[-1] != state:
            assert time.monotonic() < deadline, f"state {state!r} not reached; saw {self.statuses}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()

    def _on_message(self, text: str) -> None:
        message = json.loads(text)
        if message["type"] == "answer":
            future = self._answers.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message)
        elif message["type"] == "status":
            self.statuses.append(message["state"])
        elif message["type"] == "objects":
            self.objects = message


def expected_tint(obj_id: int, alpha: float = 0.45) -> np.ndarray:
    return (1 - alpha) * BACKGROUND + alpha * np.array(color_for(obj_id))


def shows_object(image: np.ndarray, obj_id: int, x: int, y: int, tolerance: float = 30) -> bool:
    """The pixel at (x, y) carries the object's tint (up to video coding loss)."""
    return bool(np.abs(image[y, x, :2].astype(float) - expected_tint(obj_id)[:2]).max() < tolerance)


def is_banner(image: np.ndarray) -> bool:
    return bool(np.median(np.abs(image.astype(float) - BANNER_BACKGROUND)) < 12)


def test_viewer_receives_composited_frames_and_metadata() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker) as url:
            viewer = Viewer()
            try:
                await viewer.connect(url)
                obj_id, cx, cy, r = FIRST_OBJECT
                image = await viewer.frame_where(lambda im: shows_object(im, obj_id, cx, cy))
                assert image.shape == (HEIGHT, WIDTH, 3)
                # Away from the object (and its tag) the frame is the tracker's own pixels.
                assert np.abs(image[200, 280, :2].astype(int) - BACKGROUND).max() < 20
                assert viewer.objects is not None
                (obj,) = viewer.objects["objects"]
                assert obj["obj_id"] == obj_id and obj["label"] == "thing" and "mask" not in obj
                assert obj["bbox"] == [cx - r, cy - r, cx + r + 1, cy + r + 1]
                assert viewer.objects["width"] == WIDTH and 0 < viewer.objects["latency_ms"] < 1000
                assert viewer.statuses and viewer.statuses[-1] == "live"
            finally:
                await viewer.close()

    run(body())


def test_prompts_forwarded_and_malformed_ones_answered() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker) as url:
            viewer = Viewer()
            try:
                await viewer.connect(url)
                await viewer.wait_status("live")
                click = {"op": "add_prompt", "prompt": {"points": [[250, 60]], "point_labels": [1]}}
                answer = await viewer.request(click)
                assert answer == {"type": "answer", "id": "t1", "ok": True, "error": None, "obj_ids": [2]}
                request = tracker.requests[-1]
                assert request.stream == "cam0" and request.op == "add_prompt"
                assert request.prompt is not None and request.prompt.points == ((250.0, 60.0),)
                await viewer.frame_where(lambda im: shows_object(im, 2, 250, 60))

                # Refused by the gateway, each naming the field; none reaches the tracker.
                forwarded = len(tracker.requests)
                answer = await viewer.send_raw("{not json", None)
                assert answer["ok"] is False and answer["error"].startswith("message:")
                answer = await viewer.request({"op": "add_prompt", "prompt": {"points": [[1]], "point_labels": [1]}})
                assert answer["ok"] is False and answer["error"].startswith("points:"), answer
                answer = await viewer.request({"op": "add_prompt", "prompt": {"points": [[900, 10]], "point_labels": [1]}})
                assert answer["ok"] is False and answer["error"].startswith("points:"), answer  # outside the frame
                answer = await viewer.request({"op": "explode"})
                assert answer["ok"] is False and answer["error"].startswith("op:"), answer
                answer = await viewer.request({"op": "remove_object", "obj_id": "two"})
                assert answer["ok"] is False and answer["error"].startswith("obj_id:"), answer
                answer = await viewer.request({"op": "remove_prompt", "text": ""})
                assert answer["ok"] is False and answer["error"].startswith("text:"), answer
                answer = await viewer.request({"op": "add_prompt", "prompt": {"text": "x" * 300}})
                assert answer["ok"] is False and answer["error"].startswith("text:"), answer
                assert len(tracker.requests) == forwarded

                # The tracker's own rejection comes back as it is, and the connection still works.
                answer = await viewer.request({"op": "remove_object", "obj_id": 9})
                assert answer["ok"] is False and answer["error"] == "obj_id: unknown object 9"
                answer = await viewer.request({"op": "remove_object", "obj_id": 2})
                assert answer["ok"] is True and answer["obj_ids"] == [2]
                answer = await viewer.request({"op": "remove_prompt", "text": "thing"})
                assert answer["ok"] is True and answer["obj_ids"] == [1] and tracker.requests[-1].text == "thing"
                answer = await viewer.request({"op": "reset_session"})
                assert answer["ok"] is True and tracker.objects == {}
            finally:
                await viewer.close()

    run(body())


def test_prompt_without_tracker_answer_times_out_cleanly() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker:
            silent = tracker.context.socket(zmq.ROUTER)  # binds but never answers
            silent.setsockopt(zmq.LINGER, 0)
            port = silent.bind_to_random_port("tcp://127.0.0.1")
            try:
                async with gateway(tracker, control_endpoint=f"tcp://127.0.0.1:{port}", prompt_timeout_s=0.3) as url:
                    viewer = Viewer()
                    try:
                        await viewer.connect(url)
                        answer = await viewer.request({"op": "reset_session"})
                        assert answer["ok"] is False and answer["error"].startswith("tracker:"), answer
                        assert (await viewer.request({"op": "explode"}))["error"].startswith("op:")
                    finally:
                        await viewer.close()
            finally:
                silent.close()

    run(body())


def test_banners_when_results_or_tracker_stop_and_recovery() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker) as url:
            viewer = Viewer()
            try:
                await viewer.connect(url)
                obj_id, cx, cy, _ = FIRST_OBJECT
                await viewer.frame_where(lambda im: shows_object(im, obj_id, cx, cy))

                tracker.publishing = False  # heartbeats go on: "no signal"
                await viewer.wait_status("no_signal")
                await viewer.frame_where(is_banner)
                tracker.heartbeats = False  # silence: "tracker offline"
                await viewer.wait_status("tracker_offline")
                banner = await viewer.frame_where(is_banner)
                assert banner.shape == (HEIGHT, WIDTH, 3), "the banner keeps the last frame size"
                async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as response:
                    assert (await response.json())["state"] == "tracker_offline"

                tracker.publishing = tracker.heartbeats = True
                await viewer.wait_status("live")
                await viewer.frame_where(lambda im: shows_object(im, obj_id, cx, cy))
            finally:
                await viewer.close()

    run(body())


def test_slow_tracker_stays_live_until_results_stop() -> None:
    async def body() -> None:
        async with FakeTracker(fps=4) as tracker:  # a result every 0.25 s, slower than no_signal_after_s
            feed = ResultFeed(tracker.results_endpoint, tracker.stream, no_signal_after_s=0.15)
            changes: list[FeedState] = []
            feed.add_listener(changes.append)
            await feed.start()
            try:
                deadline = time.monotonic() + 5
                while feed.results_received < 3:
                    assert time.monotonic() < deadline, "no results"
                    await asyncio.sleep(0.05)
                changes.clear()
                await asyncio.sleep(1.0)
                assert feed.state is FeedState.LIVE and changes == [], changes
                assert 3 < feed.fps < 5
                tracker.publishing = False
                await asyncio.sleep(1.0)
                assert changes == [FeedState.NO_SIGNAL]
            finally:
                await feed.close()

    run(body())


def test_a_viewer_that_does_not_read_does_not_slow_another() -> None:
    async def body() -> None:
        async with FakeTracker(fps=30) as tracker, gateway(tracker, max_viewers=2) as url:
            idle, busy = Viewer(), Viewer()
            try:
                await idle.connect(url)
                await busy.connect(url)
                await busy.frame()  # connected and flowing
                start, frames = time.monotonic(), 0
                while time.monotonic() - start < 2.0:
                    await busy.frame()
                    frames += 1
                fps = frames / (time.monotonic() - start)
                print(f"\nreading viewer: {fps:.1f} fps while the other reads nothing (tracker at 30 fps)")
                assert fps > 20
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{url}/health") as response:
                        assert (await response.json())["viewers"] == 2
                    third = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                    third.addTransceiver("video", direction="recvonly")
                    with gather_on(["127.0.0.1"]):
                        await third.setLocalDescription(await third.createOffer())
                    offer = {"sdp": third.localDescription.sdp, "type": "offer"}
                    async with http.post(f"{url}/offer", json=offer) as response:
                        assert response.status == 503 and "viewers" in (await response.json())["error"]
                    await third.close()
            finally:
                await idle.close()
                await busy.close()

    run(body())


def test_http_page_health_metrics_and_bad_offer() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/") as response:
                assert response.status == 200 and "<video" in await response.text()
            async with http.get(f"{url}/static/app.js") as response:
                assert response.status == 200 and "gatheringComplete" in await response.text()
            async with http.post(f"{url}/offer", data="nope") as response:
                assert response.status == 400 and (await response.json())["error"].startswith("offer:")
            async with http.post(f"{url}/offer", json={"sdp": "v=0 garbage", "type": "offer"}) as response:
                assert response.status == 400
            deadline = time.monotonic() + 5
            while True:
                async with http.get(f"{url}/health") as response:
                    health = await response.json()
                if health["state"] == "live" and health["fps"] > 10 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert health["state"] == "live" and health["stream"] == "cam0" and health["viewers"] == 0
            assert 0 < health["latency_ms"] < 1000 and health["fps"] > 10
            async with http.get(f"{url}/metrics") as response:
                text = await response.text()
            assert response.content_type == "text/plain"
            assert "# TYPE sam3_gateway_frames_sent_total counter" in text
            assert 'sam3_gateway_state{state="live"} 1' in text
            assert "sam3_gateway_latency_seconds " in text and "sam3_gateway_viewers 0" in text

    run(body())
