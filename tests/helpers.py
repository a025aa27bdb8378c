"""Shared test helpers, one module for every test file (fixtures are in ``conftest.py``). Sections:

- masks and frames: a disc mask, its reference box, a small encoded frame, a coroutine run with a deadline;
- gateway: a fake tracker on real ZeroMQ sockets, a real aiortc viewer, the gateway app on loopback;
- hostile peers speaking raw bytes on a ZeroMQ endpoint;
- processes: ``python -m streamer.cli`` as child processes, free ports, waiting with a deadline;
- files served over HTTP on loopback, generated videos, the ``sam3-stream api`` server process;
- browser: the operator page in a real headless Chromium;
- pipeline: ``sam3-stream run`` as real processes;
- tracker service: ``sam3-stream track`` as a real process, with the test's ends of its sockets.

Test modules import from here, never from one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import av
import cv2
import numpy as np
import pytest
import requests
import zmq
import zmq.asyncio
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from models.tiny import moving_shapes
from streamer.compositor import BANNER_BACKGROUND, color_for
from streamer.config import Endpoints
from streamer.gateway import GatewayConfig, create_app
from streamer.gateway.ice import gather_on
from streamer.protocol import (
    EventMessage,
    FrameHeader,
    PromptAnswer,
    PromptRequest,
    ResultMessage,
    StatusMessage,
    WireObject,
    decode_answer,
    decode_event,
    decode_result,
    decode_status,
    encode_event,
    encode_frame,
    encode_result,
    encode_status,
    new_request_id,
    peek_kind,
)
from streamer.transport import (
    ControlServer,
    PromptClient,
    bound_endpoint,
    control_requester,
    frames_publisher,
    results_publisher,
    results_subscriber,
)

T = TypeVar("T")
WIDTH, HEIGHT = 320, 240  # the fake tracker's frames
BACKGROUND = 90
FIRST_OBJECT = (1, 100, 120, 40)  # obj_id, centre x, centre y, radius
# Feed states in which results come: a tracker slower than the camera (a loaded test box) is "slow".
RESULTS_FLOWING = ("live", "slow")


# --------------------------------------------------------------------------------------------------
# Masks and frames, and a coroutine run with a deadline


def run(coro: Awaitable[T], timeout: float = 40.0) -> T:
    """Run one test's coroutine with a hard deadline (no pytest-asyncio needed)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def disc(cx: float, cy: float, r: float, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """A boolean mask of ``shape`` (height, width): the disc of radius ``r`` centred on (``cx``, ``cy``)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a non-empty mask's pixels, computed the plain way (a reference for the
    package's own box code)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def encoded_frame(stream: str, seq: int, w: int = 8, h: int = 6) -> list:
    """A small frame of ``stream`` as a capture publishes it (wire parts), every pixel ``seq % 256``."""
    pixels = np.full((h, w, 3), seq % 256, np.uint8)
    return encode_frame(FrameHeader(stream, seq, time.time(), w, h), pixels)


# --------------------------------------------------------------------------------------------------
# Gateway: a fake tracker on real sockets, a real aiortc viewer, the gateway app on loopback


class FakeTracker:
    """Plays the tracker on real sockets: PUB results + status heartbeats, ROUTER answering prompts
    (through ``streamer.transport``'s socket factories and ``ControlServer``, as the tracker does).

    Objects are discs: a click makes (or moves) one of radius 20 centred on the click, a box one
    inscribed in the box.
    ``publishing`` / ``heartbeats`` switch the two kinds of traffic off and on; the heartbeats say frames
    reach the tracker while ``receiving`` (``None``: while publishing); ``instance`` is the process id
    its heartbeats carry (change it to play a restart); :meth:`send_event` publishes an event. With
    ``moving`` a bright bar crosses the frames, so that every frame's picture differs.
    ``state`` (``loading`` / ``serving``), ``source``, ``source_error`` and ``camera_fps`` are what its
    heartbeats say of the tracker and the capture (``camera_fps`` ``None``: not said). With ``camera``
    it also plays the capture: frames at ``camera_fps`` on ``frames_endpoint``, each result naming the
    newest one's seq (a tracker slower than its camera).
    """

    def __init__(
        self,
        stream: str = "cam0",
        fps: float = 30.0,
        heartbeat_s: float = 0.25,
        camera_fps: float | None = None,
        camera: bool = False,
    ) -> None:
        self.stream, self.fps, self.heartbeat_s = stream, fps, heartbeat_s
        self.context = zmq.asyncio.Context()
        self.pub = results_publisher("tcp://127.0.0.1:*", context=self.context)
        self.frames = frames_publisher("tcp://127.0.0.1:*", context=self.context) if camera else None
        self.frames_endpoint = bound_endpoint(self.frames) if self.frames is not None else None
        self.camera_seq = 0
        self.results_endpoint = bound_endpoint(self.pub)
        self.control = ControlServer("tcp://127.0.0.1:*")
        self.control_endpoint = self.control.endpoint
        obj_id, cx, cy, r = FIRST_OBJECT
        self.objects: dict[int, tuple[float, float, float]] = {obj_id: (cx, cy, r)}
        self.labels: dict[int, str] = {obj_id: "thing"}  # as if found by the text prompt "thing"
        self.requests: list[PromptRequest] = []
        self.publishing = True
        self.heartbeats = True
        self.moving = False
        self.receiving: bool | None = None
        self.instance = "fake-1"
        self.state = "serving"
        self.source = "synthetic 320x240@30"
        self.source_error: str | None = None
        self.camera_fps = camera_fps
        self.frames_received = 0
        self.last_received_t: float | None = None
        self.seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FakeTracker:
        tasks = (self._publish, self._heartbeat, self._answer) + ((self._capture,) if self.frames is not None else ())
        self._tasks = [asyncio.create_task(t()) for t in tasks]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pub.close()
        if self.frames is not None:
            self.frames.close()
        self.control.close()
        self.context.term()

    @staticmethod
    def picture() -> np.ndarray:
        frame = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
        frame[:, :, 2] = np.linspace(70, 110, WIDTH, dtype=np.uint8)  # a little texture for the encoder
        return frame

    async def _capture(self) -> None:
        assert self.frames is not None
        while True:
            header = FrameHeader(self.stream, self.camera_seq, time.time(), WIDTH, HEIGHT)
            await self.frames.send_multipart(encode_frame(header, self.picture()), copy=False)
            self.camera_seq += 1
            await asyncio.sleep(1.0 / (self.camera_fps or 10.0))

    def result(self) -> tuple[ResultMessage, np.ndarray]:
        frame = self.picture()
        if self.moving:
            x = (self.seq * 6) % (WIDTH - 8)
            frame[:, x : x + 8] = 230
        objects = []
        for obj_id, (cx, cy, r) in self.objects.items():
            mask = disc(cx, cy, r)
            objects.append(WireObject(obj_id, 0.9, box_of(mask), mask, self.labels.get(obj_id)))
        now = time.time()
        message = ResultMessage(
            self.stream,
            max(self.camera_seq - 1, 0) if self.frames is not None else self.seq,  # the newest camera frame's
            self.seq,
            now - 0.01,
            WIDTH,
            HEIGHT,
            {"received": now, "tracked": now, "published": now},
            {"track": 0.005},
            objects,
        )
        self.seq += 1
        return message, frame

    async def _publish(self) -> None:
        while True:
            if self.publishing:
                await self.pub.send_multipart(encode_result(*self.result()), copy=False)
            await asyncio.sleep(1.0 / self.fps)

    async def _heartbeat(self) -> None:
        while True:
            if self.receiving or (self.receiving is None and self.publishing):
                self.frames_received += 1
                self.last_received_t = time.time()
            if self.heartbeats:
                info = {
                    "last_seq": self.seq,
                    "last_frame_t": time.time(),
                    "fps": self.fps,
                    "frames_received": self.frames_received,
                    "last_received_t": self.last_received_t,
                    "source": self.source,
                    "source_error": self.source_error,
                    "source_fps": self.camera_fps,
                }
                status = StatusMessage(
                    "fake", time.time(), {self.stream: info}, self.instance, self.state, "fake-model"
                )
                await self.pub.send_multipart(encode_status(status))
            await asyncio.sleep(self.heartbeat_s)

    async def send_event(self, event: EventMessage) -> None:
        await self.pub.send_multipart(encode_event(event))

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
        return PromptAnswer(request.request_id, True, obj_ids=[obj_id], frame_index=self.seq)


@contextlib.asynccontextmanager
async def gateway(tracker: FakeTracker, port: int = 0, **overrides: Any) -> AsyncIterator[str]:
    """The gateway app served on loopback (a free port unless given); yields its base URL."""
    config = replace(
        GatewayConfig(
            results_endpoint=tracker.results_endpoint,
            control_endpoint=tracker.control_endpoint,
            stream_id=tracker.stream,
            prompt_timeout_s=1.0,
        ),
        **overrides,
    )
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def live_viewer(tracker: FakeTracker, **overrides: Any) -> AsyncIterator[Viewer]:
    """A viewer connected to a gateway in front of ``tracker`` (see :func:`gateway`), once the feed is live."""
    async with gateway(tracker, **overrides) as url:
        viewer = Viewer()
        try:
            await viewer.connect(url)
            await viewer.wait_status("live")
            yield viewer
        finally:
            await viewer.close()


class Viewer:
    """A real aiortc client of the gateway: receives the video and talks on the prompts channel.

    ``codecs`` (e.g. ``["video/VP8"]``) limits the video codecs it offers, like a browser lacking H.264.
    """

    def __init__(self, codecs: list[str] | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("prompts")
        self.statuses: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.objects: dict[str, Any] | None = None
        self._track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._answers: dict[str | None, asyncio.Future[dict[str, Any]]] = {}
        self._count = 0
        self.transceiver = self.pc.addTransceiver("video", direction="recvonly")
        if codecs is not None:
            capabilities = RTCRtpReceiver.getCapabilities("video").codecs
            self.transceiver.setCodecPreferences([c for c in capabilities if c.mimeType in codecs])
        self.pc.on("track", lambda track: self._track.done() or self._track.set_result(track))
        self.channel.on("message", self._on_message)

    async def connect(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        """Offer, apply the answer and wait until the data channel is open."""
        opened = asyncio.get_running_loop().create_future()
        self.channel.on("open", lambda: opened.done() or opened.set_result(None))
        status, answer = await self.offer(base_url, headers)
        assert status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(opened, 10)

    async def offer(self, base_url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """POST this viewer's offer (candidates gathered); the HTTP status and JSON body. Applying the
        answer is left to the caller: a viewer that never does holds a slot without ever connecting."""
        with gather_on(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
        return await post_json(f"{base_url}/offer", offer, headers)

    async def frame(self) -> np.ndarray:
        return (await self.video_frame()).to_ndarray(format="rgb24")

    async def video_frame(self) -> Any:
        """The next decoded ``av.VideoFrame`` (``key_frame`` tells a keyframe)."""
        track = await asyncio.wait_for(self._track, 10)
        return await asyncio.wait_for(track.recv(), 5)

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

    @property
    def codec(self) -> str:
        """The video codec the gateway's answer settled on."""
        return self._answered_video().rtp.codecs[0].mimeType

    async def send_pli(self) -> None:
        """Tell the gateway this viewer lost pictures (an RTCP picture loss indication), as a decoder in
        trouble does. aiortc sends one only on real loss, so this calls its receiver's own method for it."""
        await self.transceiver.receiver._send_rtcp_pli(self._answered_video().ssrc[0].ssrc)

    def _answered_video(self) -> Any:
        media = aiortc_sdp.SessionDescription.parse(self.pc.remoteDescription.sdp).media
        return next(m for m in media if m.kind == "video")

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
        elif message["type"] == "event":
            self.events.append(message)

    async def wait_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event of that type received (waiting up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if e["event"] == event]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {event!r} event; saw {self.events}"
            await asyncio.sleep(0.05)


async def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the HTTP status and the JSON answer."""
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def fetch_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET ``url``; the HTTP status and the JSON answer."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.json()


async def wait_json(url: str, predicate: Any, timeout: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """GET ``url`` until its JSON satisfies ``predicate`` (waiting for the server to come up too); fails with
    the last answer after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    answer: dict[str, Any] | None = None
    while True:
        with contextlib.suppress(aiohttp.ClientConnectionError):
            _, answer = await fetch_json(url, headers)
            if predicate(answer):
                return answer
        assert time.monotonic() < deadline, f"{url}: condition not met in {timeout} s; last answer {answer}"
        await asyncio.sleep(0.1)


def expected_tint(obj_id: int, alpha: float = 0.45) -> np.ndarray:
    return (1 - alpha) * BACKGROUND + alpha * np.array(color_for(obj_id))


def shows_object(image: np.ndarray, obj_id: int, x: int, y: int, tolerance: float = 30) -> bool:
    """The pixel at (x, y) carries the object's tint (up to video coding loss)."""
    return bool(np.abs(image[y, x, :2].astype(float) - expected_tint(obj_id)[:2]).max() < tolerance)


def is_banner(image: np.ndarray) -> bool:
    return bool(np.median(np.abs(image.astype(float) - BANNER_BACKGROUND)) < 12)


# --------------------------------------------------------------------------------------------------
# Hostile peers: raw bytes on a ZeroMQ endpoint

# A ZMTP 3.0 greeting (signature, version 3.0, mechanism NULL, as-server 0, filler): libzmq takes the peer
# for a ZeroMQ one and goes on to the handshake.
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def zmtp_ready(socket_type: bytes) -> bytes:
    """The NULL mechanism's READY command announcing ``socket_type`` (b"PUB", b"SUB", b"REQ"...)."""
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return bytes([0x04, len(body)]) + body


def hostile_payload(kind: str, socket_type: bytes = b"PUB") -> bytes:
    """What a hostile peer sends: ``http`` (not ZeroMQ at all), ``broken-handshake`` (a ZMTP greeting, then
    a malformed command), or ``oversized-part`` (a clean handshake as ``socket_type``, then a message part
    declared 2^63-1 bytes long, far over any MAXMSGSIZE)."""
    if kind == "http":
        return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 4
    if kind == "broken-handshake":
        return ZMTP_GREETING + b"\x04\xff" + b"junk" * 100
    if kind == "oversized-part":
        return ZMTP_GREETING + zmtp_ready(socket_type) + b"\x02" + struct.pack(">Q", 2**63 - 1)
    raise ValueError(f"kind: unknown hostile payload {kind!r}")


HOSTILE_KINDS = ("http", "broken-handshake", "oversized-part")


def _raw_socket(endpoint: str) -> tuple[socket.socket, object]:
    if endpoint.startswith("tcp://"):
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        return socket.socket(socket.AF_INET), (host, int(port))
    assert endpoint.startswith("ipc://"), endpoint
    return socket.socket(socket.AF_UNIX), endpoint[len("ipc://") :]


class HostileServer:
    """Binds a ZeroMQ endpoint with a plain socket (where a capture or tracker should be) and answers every
    connection with ``payload``; :attr:`served` counts them. Use as a context manager."""

    def __init__(self, endpoint: str, payload: bytes) -> None:
        self.endpoint, self.payload, self.served = endpoint, payload, 0
        self._stop = threading.Event()
        self._listener, address = _raw_socket(endpoint)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:  # a ZeroMQ listener closed just before lets go of its address asynchronously
            try:
                if isinstance(address, str) and os.path.exists(address):
                    os.unlink(address)
                self._listener.bind(address)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    self._listener.close()
                    raise
                time.sleep(0.05)
        self._address = address
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        if isinstance(self._address, str) and os.path.exists(self._address):
            os.unlink(self._address)

    def wait_served(self, count: int, timeout: float = 5.0, while_waiting: Any = None) -> None:
        """Wait until ``count`` connections were served, calling ``while_waiting()`` meanwhile."""
        deadline = time.monotonic() + timeout
        while self.served < count:
            assert time.monotonic() < deadline, f"only {self.served} of {count} connections reached {self.endpoint}"
            if while_waiting is not None:
                while_waiting()
            time.sleep(0.02)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                send_and_linger(conn, self.payload)
            self.served += 1


def send_and_linger(conn: socket.socket, payload: bytes, linger_s: float = 0.2) -> None:
    """Send ``payload`` (the peer may hang up midway), then read until it closes or ``linger_s`` passes."""
    with contextlib.suppress(OSError):
        conn.sendall(payload)
        conn.settimeout(linger_s)
        while conn.recv(65536):
            pass


def hostile_client(endpoint: str, payload: bytes) -> None:
    """Connect to a bound ZeroMQ endpoint with a plain socket, send ``payload`` and hang up."""
    conn, address = _raw_socket(endpoint)
    with conn:
        conn.settimeout(5)
        conn.connect(address)
        send_and_linger(conn, payload)


# --------------------------------------------------------------------------------------------------
# Processes: the CLI as child processes, free ports, waiting with a deadline

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """Children import this checkout and run torch on one thread (FACTS.md: ~20x faster on 2 cores)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m streamer.cli ARGS`` run to its end from the repository (``env``: :func:`child_env` unless
    given); its exit status and output, as text."""
    return subprocess.run(
        [sys.executable, "-m", "streamer.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env or child_env(),
        timeout=timeout,
    )


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
    """Ask ``proc`` to stop with ``sig``, kill it if it has not within ``timeout``; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def launched(args: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """``python -m streamer.cli ARGS`` with output to ``log_path``; stopped (and any child of it killed)
    when the block ends, whatever happens in it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=child_env(),
        )
    try:
        yield proc
    finally:
        children = children_of(proc.pid)
        stop_process(proc)
        for pid in children:  # only if the supervisor failed to: these are our grandchildren by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def children_of(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` (pid -> command line), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if ppid == pid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_endpoint() -> str:
    """A ZeroMQ endpoint on a loopback port nothing listens on now."""
    return f"tcp://127.0.0.1:{free_port()}"


def free_endpoint(kind: str, folder: str) -> str:
    """An endpoint nothing is bound to: a free loopback port (``tcp``), or a socket path in ``folder`` (``ipc``)."""
    if kind == "ipc":
        return f"ipc://{folder}/endpoint"
    return free_tcp_endpoint()


def free_port_block(count: int, first: int = 20000, last: int = 40000) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on now (a random block)."""
    import random

    for _ in range(200):
        base = random.randrange(first, last - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {count} free ports found")


def wait_for(
    probe: Callable[[], T | None], timeout: float, what: str, log_path: Path | None = None, poll: float = 0.1
) -> T:
    """Call ``probe`` every ``poll`` seconds until it returns something truthy, and return that; fail (with
    the log's tail) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n--- log ---\n{tail}")
        time.sleep(poll)


def get_json(url: str) -> dict | None:
    """GET ``url`` as JSON, or ``None`` while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Files over HTTP, generated videos, the api server


def write_video(
    path: Path, frames: Iterable[np.ndarray], fps: int = 10, codec: str = "libx264", gop: int | None = None
) -> Path:
    """Encode RGB frames into a video file (the container follows the extension). ``gop``: frames between
    keyframes (H.264 also gets B-frames then, so decode order differs from presentation order)."""
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = frame.shape[1], frame.shape[0], "yuv420p"
                if gop is not None:
                    stream.gop_size = gop
                    if codec == "libx264":
                        stream.options = {"g": str(gop), "keyint_min": str(gop), "bf": "2"}
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is not None:
            container.mux(stream.encode())
    return path


def index_frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Frames that tell their own index (up to 144): the left half's grey level codes ``k // 12``, the
    right half's ``k % 12``, 20 levels apart (far beyond codec rounding)."""
    frames = []
    for k in range(count):
        frame = np.empty((height, width, 3), np.uint8)
        frame[:, : width // 2] = 10 + 20 * (k // 12 % 12)
        frame[:, width // 2 :] = 10 + 20 * (k % 12)
        frames.append(frame)
    return frames


def frame_index_of(frame: np.ndarray) -> int:
    """The index an :func:`index_frames` frame shows (read from the middle of each half)."""
    height, width = frame.shape[:2]
    rows = slice(height // 4, 3 * height // 4)
    left = float(frame[rows, width // 8 : 3 * width // 8].mean())
    right = float(frame[rows, 5 * width // 8 : 7 * width // 8].mean())
    return round((left - 10) / 20) * 12 + round((right - 10) / 20)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on loopback (a free port); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def decode_video(data: bytes, path: Path) -> tuple[str, list[np.ndarray]]:
    """The codec name and RGB frames of a video given as bytes (written to ``path`` to decode)."""
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


class ApiServer:
    """``sam3-stream api`` as a real process on loopback (a free port), started on a data directory."""

    def __init__(self, data_dir: Path, *args: str, model: str = "tiny-random") -> None:
        self.data_dir = data_dir
        self.argv = [
            sys.executable,
            "-m",
            "streamer.cli",
            "api",
            "--model",
            model,
            "--device",
            "cpu",
            "--http-port",
            "0",
            "--data-dir",
            str(data_dir),
            *args,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.output: list[str] = []

    def start(self, timeout: float = 120.0) -> ApiServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env
        )
        found = threading.Event()

        def pump() -> None:  # keeps reading, so a chatty server never blocks on a full pipe
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                match = re.search(r"serving on (http://\S+?)/? ", line)
                if match:
                    self.url = match.group(1).rstrip("/")
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("api server did not start:\n" + "".join(self.output[-40:]))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig`` (SIGKILL: a crash) and reap the process; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_generation(
    base: str, generation_id: str, statuses: Iterable[str], timeout: float = 60.0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Poll ``GET /api/ai/queue/{id}`` until its status is one of ``statuses``; returns that view."""
    deadline = time.monotonic() + timeout
    wanted = set(statuses)
    while True:
        view = requests.get(f"{base}/api/ai/queue/{generation_id}", headers=headers, timeout=10).json()
        if view["status"] in wanted:
            return view
        assert time.monotonic() < deadline, f"generation {generation_id} stuck at {view}"
        time.sleep(0.1)


class EventListener:
    """Reads ``GET /api/events`` the way the hosted service's docs do (requests, line by line), in a thread;
    collects the ``media_generation_completed`` payloads."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []
        self._response = requests.get(f"{base}/api/events", headers=headers, stream=True, timeout=60)
        assert self._response.status_code == 200, self._response.text
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.wait(lambda: self.comments, 10)  # the stream is live once its first comment arrived

    def _read(self) -> None:
        event_name = None
        with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
            for line in self._response.iter_lines(decode_unicode=True):
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event: "):
                    event_name = line.removeprefix("event: ")
                elif line.startswith("data: ") and event_name == "media_generation_completed":
                    self.events.append(json.loads(line.removeprefix("data: ")))

    def wait(self, condition: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (result := condition()):
            assert time.monotonic() < deadline, f"events: condition not met; got {self.events}"
            time.sleep(0.05)
        return result

    def event_for(self, generation_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(lambda: next((e for e in self.events if e["generation_id"] == generation_id), None), timeout)

    def close(self) -> None:
        # Shut the socket down: closing the response alone leaves the reader blocked until the next keep-alive.
        connection = self._response.raw.connection
        if connection is not None and connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        self._response.close()
        self._thread.join(5)


class StalledHub:
    """A model hub on loopback that knows one model and never delivers its files (as on a network that
    stalls mid-download): with ``HF_ENDPOINT`` set to :attr:`url` a load of ``repo_id`` hangs in its first
    download, however long the test needs it to. :attr:`file_requests` counts the requests held."""

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id
        self.file_requests = 0
        self._release = threading.Event()
        hub = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] == f"/api/models/{hub.repo_id}":
                    body = json.dumps({"id": hub.repo_id, "sha": "0" * 40, "private": False}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if "/resolve/" not in self.path:  # other API calls the client makes: nothing to say
                    self.send_error(404)
                    return
                hub.file_requests += 1
                hub._release.wait(120)  # held until the hub closes

            do_HEAD = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> StalledHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --------------------------------------------------------------------------------------------------
# Browser: the operator page in a real headless Chromium (driven by Playwright)

CHROMIUM = Path("/usr/bin/chromium")
# A browser test module's marks (``pytestmark``); it also calls ``pytest.importorskip("playwright.async_api")``.
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed"),
]
# FACTS.md: what headless Chromium needs for WebRTC on a loopback-only box (Playwright adds --headless).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]

PLAYING = """() => {
  const v = document.getElementById("video");
  return v.readyState >= 2 && v.videoWidth > 0 && !v.paused && v.currentTime > 0;
}"""
# The video element's box and the picture's size: enough to redo object-fit: contain's letterboxing.
GEOMETRY = """() => {
  const v = document.getElementById("video");
  const r = v.getBoundingClientRect();
  return {left: r.left, top: r.top, width: r.width, height: r.height, vw: v.videoWidth, vh: v.videoHeight};
}"""


def to_page(geometry: dict[str, Any], x: float, y: float) -> tuple[float, float]:
    """Frame pixel (x, y) -> page coordinates of its centre, inside the letterboxed video."""
    scale = min(geometry["width"] / geometry["vw"], geometry["height"] / geometry["vh"])
    left = geometry["left"] + (geometry["width"] - geometry["vw"] * scale) / 2
    top = geometry["top"] + (geometry["height"] - geometry["vh"] * scale) / 2
    return left + (x + 0.5) * scale, top + (y + 0.5) * scale


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Wait (without blocking the event loop) until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def chromium_page(pw: Any, profile: Path) -> AsyncIterator[Any]:
    """A page in a fresh headless Chromium; page errors fail the test."""
    # A wide viewport: the 4:3 video is letterboxed left and right, so the click mapping matters.
    browser = await pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 560},
    )
    try:
        page = browser.pages[0] if browser.pages else await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        assert not errors, errors
    finally:
        await browser.close()


async def wait_playing(page: Any) -> None:
    """Wait until the page's video plays and its feed state says results come."""
    await page.wait_for_function(PLAYING, timeout=15000)
    await page.wait_for_selector("#state.live, #state.slow", timeout=5000)  # results come


@contextlib.asynccontextmanager
async def operator_page(pw: Any, url: str, profile: Path) -> AsyncIterator[Any]:
    """The operator page in a fresh headless Chromium, once its video plays."""
    async with chromium_page(pw, profile) as page:
        await page.goto(url)
        await wait_playing(page)
        yield page


async def geometry_of(page: Any) -> dict[str, Any]:
    """The page's :data:`GEOMETRY`, checked: the fake tracker's frame size, letterboxed left and right."""
    geometry = await page.evaluate(GEOMETRY)
    assert (geometry["vw"], geometry["vh"]) == (WIDTH, HEIGHT)
    assert geometry["width"] / geometry["height"] > WIDTH / HEIGHT + 0.1, "expected letterboxing"
    return geometry


async def first_object_tinted(page: Any, geometry: dict[str, Any]) -> np.ndarray:
    """Assert the page shows the fake tracker's first object tinted where it is; returns the screenshot (BGR)."""
    obj_id, cx, cy, _ = FIRST_OBJECT
    shot = cv2.imdecode(np.frombuffer(await page.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    px, py = (round(v) for v in to_page(geometry, cx, cy))
    pixel = shot[py, px, ::-1].astype(float)  # BGR -> RGB
    assert np.abs(pixel[:2] - expected_tint(obj_id)[:2]).max() < 40, pixel
    return shot


@contextlib.asynccontextmanager
async def page_of(tracker: FakeTracker, profile: Path, **overrides: Any) -> AsyncIterator[tuple[Any, str]]:
    """The operator page (once its video plays) of a gateway in front of ``tracker``, and the gateway's URL."""
    from playwright.async_api import async_playwright  # only the browser tests need Playwright

    async with (
        gateway(tracker, **overrides) as url,
        async_playwright() as pw,
        operator_page(pw, url, profile) as page,
    ):
        yield page, url


# --------------------------------------------------------------------------------------------------
# Pipeline: ``sam3-stream run`` (capture -> tracker -> gateway) as real processes

PIPELINE_WIDTH, PIPELINE_HEIGHT = 160, 120  # the synthetic camera of the pipeline tests


@dataclass
class Pipeline:
    """A running ``sam3-stream run`` and where its page is."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def child(self, command: str) -> int:
        """Pid of the child running ``sam3-stream COMMAND``."""
        pids = [pid for pid, cmd in children_of(self.proc.pid).items() if f"streamer.cli {command} " in cmd]
        assert len(pids) == 1, children_of(self.proc.pid)
        return pids[0]


@contextlib.contextmanager
def running_pipeline(args: list[str], log_path: Path, timeout: float = 60.0) -> Iterator[Pipeline]:
    """``sam3-stream ARGS`` (a ``run``) :func:`launched`, once it printed its page's URL and its ``/health``
    says results flow (each waited for up to ``timeout`` s)."""
    with launched(args, log_path) as proc:
        url = wait_for(
            lambda: (m := re.search(r"open (http://\S+/)", log_path.read_text())) and m[1],
            timeout,
            "the page URL",
            log_path,
        )
        wait_for(
            lambda: (h := get_json(f"{url}health")) and h["state"] in RESULTS_FLOWING, timeout, "a live feed", log_path
        )
        yield Pipeline(proc, url.rstrip("/"), log_path)


async def watch(viewer: Viewer, until: Callable[[Viewer], object], timeout: float, what: str) -> None:
    """Keep receiving video frames until ``until(viewer)`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not until(viewer):
        assert time.monotonic() < deadline, (
            f"{what}: not seen in {timeout} s (statuses {viewer.statuses}, objects {viewer.objects})"
        )
        await viewer.frame()


def object_ids(viewer: Viewer) -> set[int]:
    """The ids of the objects in the viewer's newest metadata."""
    return {o["obj_id"] for o in (viewer.objects or {}).get("objects", [])}


# --------------------------------------------------------------------------------------------------
# Tracker service: ``sam3-stream track`` as a real process, the test playing camera, robot and operator

TRACKER_WIDTH, TRACKER_HEIGHT = 160, 120  # the frames the tests send a tracker (unless they say)


@dataclass
class Tracker:
    """A running tracker process and the test's ends of its three sockets."""

    endpoints: Endpoints
    log_path: Path
    pub: zmq.Socket
    sub: zmq.Socket
    control: PromptClient
    sent: dict[tuple[str, int], np.ndarray]
    proc: subprocess.Popen | None = None
    events: list[EventMessage] = field(default_factory=list)  # every event received so far

    def kill(self) -> None:
        """SIGKILL the tracker process (a crash); the block then ends without asking it to stop."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def send(self, stream: str, seq: int, pixels: np.ndarray | None = None, t_capture: float | None = None) -> None:
        """Publish frame ``seq`` of ``stream`` (moving shapes unless ``pixels``), as a camera does."""
        pixels = moving_shapes(seq, TRACKER_WIDTH, TRACKER_HEIGHT) if pixels is None else pixels
        header = FrameHeader(
            stream, seq, time.time() if t_capture is None else t_capture, pixels.shape[1], pixels.shape[0]
        )
        self.sent[(stream, seq)] = pixels
        self.pub.send_multipart(encode_frame(header, pixels), copy=False)

    def request(self, stream: str, op: str, **fields: object) -> PromptAnswer:
        """Send a control request through the lazy-pirate client; its answer."""
        return self.control.request(PromptRequest(new_request_id(), stream, op, **fields))  # type: ignore[arg-type]

    def raw(self, body: bytes, timeout: float = 5.0) -> PromptAnswer:
        """Send ``body`` as it is on a fresh REQ socket and return the answer."""
        sock = control_requester(self.endpoints.control, context=self.pub.context)
        try:
            sock.send(body)
            assert sock.poll(int(timeout * 1000)), "no answer"
            return decode_answer([sock.recv()])
        finally:
            sock.close(linger=0)

    def status(self, stream: str, timeout: float = 3.0) -> dict:
        """The stream's fields of the newest heartbeat that lists it (older ones queued meanwhile are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = [s for s in self.receive(0.6)[1] if stream in s.streams]
            if listing:
                return listing[-1].streams[stream]
        pytest.fail(f"no heartbeat lists {stream}")

    def receive(self, timeout: float) -> tuple[list[tuple[ResultMessage, np.ndarray | None]], list[StatusMessage]]:
        """Everything published within ``timeout`` seconds."""
        results, statuses = [], []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000)):
                parts = self.sub.recv_multipart()
                kind = peek_kind(parts)
                if kind == "result":
                    results.append(decode_result(parts))
                elif kind == "event":
                    self.events.append(decode_event(parts))
                else:
                    statuses.append(decode_status(parts))
        return results, statuses

    def stream_results(
        self,
        streams: dict[str, int],
        frames: int,
        fps: float = 15.0,
    ) -> dict[str, list[tuple[ResultMessage, np.ndarray | None]]]:
        """Send ``frames`` frames of each stream (seq from ``streams[name]``) and collect their results."""
        out: dict[str, list] = {name: [] for name in streams}
        for k in range(frames):
            for name, first in streams.items():
                self.send(name, first + k)
            for message, frame in self.receive(1.0 / fps)[0]:
                out.setdefault(message.stream, []).append((message, frame))
        for message, frame in self.receive(1.0)[0]:  # the last frames' results
            out.setdefault(message.stream, []).append((message, frame))
        return out

    def until_result(self, stream: str, seq: int, timeout: float = 30.0) -> None:
        """Send frames of ``stream`` until one comes back (the tracker knows the stream then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(stream, seq)
            results, _ = self.receive(0.2)
            if any(m.stream == stream for m, _ in results):
                return
        pytest.fail(f"no result for stream {stream} within {timeout} s\n{self.log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def running_tracker(*options: str, log_path: Path) -> Iterator[Tracker]:
    """``sam3-stream track OPTIONS`` on ipc:// endpoints of a fresh folder, with the test's sockets."""
    folder = tempfile.mkdtemp(prefix="trk-")  # not tmp_path: ipc:// paths must stay short
    endpoints = Endpoints.ipc_in(folder)
    ctx = zmq.Context()
    pub = frames_publisher(endpoints.frames, context=ctx)  # the camera binds; the tracker connects
    args = [
        "track",
        "--frames-endpoint",
        endpoints.frames,
        "--results-endpoint",
        endpoints.results,
        "--control-endpoint",
        endpoints.control,
        *options,
    ]
    try:
        with launched(args, log_path) as proc:
            sub = results_subscriber(endpoints.results, frames=True, context=ctx)  # as the gateway subscribes
            control = PromptClient(endpoints.control, timeout_s=5.0, retries=2, context=ctx)
            tracker = Tracker(endpoints, log_path, pub, sub, control, {}, proc)
            try:
                # The first heartbeat says the model is loaded and the sockets are up.
                wait_for(lambda: proc.poll() is not None or tracker.receive(0.3)[1], 90, "a heartbeat", log_path)
                assert proc.poll() is None, log_path.read_text()
                yield tracker
                assert proc.poll() is None or proc.returncode == -signal.SIGKILL, (
                    f"the tracker died:\n{log_path.read_text()[-3000:]}"
                )
            finally:
                control.close()
                sub.close()
    finally:
        pub.close()
        ctx.term()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def camera(
    tracker: Tracker, stream: str = "cam0", fps: float = 20.0, size: tuple[int, int] = (TRACKER_WIDTH, TRACKER_HEIGHT)
) -> Iterator[None]:
    """Frames of ``stream`` at ``fps`` from a thread (the only user of the frames socket meanwhile)."""
    stop = threading.Event()
    frame = np.full((size[1], size[0], 3), 90, np.uint8)

    def send_frames() -> None:
        seq = 0
        while not stop.is_set():
            tracker.send(stream, seq, frame)
            seq += 1
            stop.wait(1.0 / fps)

    thread = threading.Thread(target=send_frames, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def settled(tracker: Tracker, stream: str = "cam0", timeout: float = 30.0) -> dict:
    """The stream's heartbeat once no prompt is waiting to be applied."""
    return wait_for(
        lambda: (s := tracker.status(stream)) and s["prompts_queued"] == 0 and s,
        timeout,
        "prompts applied",
        tracker.log_path,
    )
