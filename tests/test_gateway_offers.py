"""Hostile and careless viewers against the gateway's ``/offer``: real aiortc peers, real HTTP, real ZeroMQ.

Offers that cannot make a viewer are refused with a 400 naming the problem and hold no slot; a peer
that never connects loses its slot after ``connect_timeout_s``; bodies are typed and bounded; and
viewers coming and going leave no memory, peer connections or tasks behind in the gateway process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from helpers import (
    FIRST_OBJECT,
    FakeTracker,
    Viewer,
    fetch_json,
    free_port,
    gateway,
    launched,
    post_json,
    run,
    shows_object,
    wait_json,
)

from streamer.gateway.ice import gather_on
from streamer.gateway.webrtc import MAX_CANDIDATES

MIB = 1024 * 1024
# An SDP with no media section at all: before the fix each one took a viewer's slot for good.
NO_MEDIA_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def settled(health: dict) -> bool:
    """No viewer holds a slot, and every peer connection the gateway made has been freed."""
    return health["viewers"] == 0 and health["peer_connections"] == 0


async def data_channel_only_offer() -> str:
    """A real aiortc offer with a data channel and no video."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("prompts")
    with gather_on(["127.0.0.1"]):
        await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_offers_without_video_are_refused_and_take_no_slot() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker) as url:
            for sdp in [NO_MEDIA_SDP] * 8 + [await data_channel_only_offer()]:
                status, answer = await post_json(f"{url}/offer", {"sdp": sdp, "type": "offer"})
                assert status == 400 and answer["error"].startswith("sdp: the offer receives no video"), answer
            _, health = await fetch_json(f"{url}/health")
            assert health["viewers"] == 0 and health["peer_connections"] == 0, health
            viewer = Viewer()  # all 8 slots are still free
            try:
                await viewer.connect(url)
                obj_id, cx, cy, _ = FIRST_OBJECT
                await viewer.frame_where(lambda im: shows_object(im, obj_id, cx, cy))
            finally:
                await viewer.close()

    run(body())


def test_a_peer_that_never_connects_loses_its_slot() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker, max_viewers=2, connect_timeout_s=1.0) as url:
            stuck = [Viewer(), Viewer()]  # offer, then never apply the answer: ICE never starts
            try:
                for viewer in stuck:
                    status, answer = await viewer.offer(url)
                    assert status == 200, answer
                refused = Viewer()
                status, answer = await refused.offer(url)
                await refused.close()
                assert status == 503 and answer["error"].startswith("viewers:"), answer
                health = await wait_json(f"{url}/health", lambda h: h["viewers"] == 0, timeout=4)
                assert health["viewers_expired"] == 2, health
            finally:
                for viewer in stuck:
                    await viewer.close()

            # Both slots are free again; one that leaves frees its slot at once.
            first, second = Viewer(), Viewer()
            try:
                await first.connect(url)
                await first.frame()
                await first.close()
                await wait_json(f"{url}/health", lambda h: h["viewers"] == 0, timeout=3)
                await second.connect(url)
                await second.frame()
                await asyncio.sleep(1.5)  # past connect_timeout_s: a connected viewer keeps its slot
                _, health = await fetch_json(f"{url}/health")
                assert health["viewers"] == 1 and health["viewers_expired"] == 2, health
                await second.frame()
            finally:
                await first.close()
                await second.close()

    run(body())


async def post_raw(url: str, data: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=data, headers={"Content-Type": content_type}) as response,
    ):
        return response.status, await response.json()


def test_offer_bodies_are_typed_bounded_and_validated() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker, max_body_bytes=16 * 1024) as url:
            offer_url = f"{url}/offer"
            viewer = Viewer()
            await viewer.offer(url)  # never connects: its slot expires
            await viewer.close()
            real_offer = {"sdp": viewer.pc.localDescription.sdp, "type": "offer"}
            refusals: list[tuple[tuple[int, dict], int, str]] = [
                (await post_raw(offer_url, json.dumps(real_offer), "text/plain"), 415, "content-type:"),
                (await post_raw(offer_url, "sdp=x", "application/x-www-form-urlencoded"), 415, "content-type:"),
                (await post_raw(offer_url, "x" * 17 * 1024), 413, "offer: the body is larger than 16384 bytes"),
                (await post_raw(offer_url, "[" * 8000 + "]" * 8000), 400, "offer: JSON nested too deeply"),
                (await post_raw(offer_url, b"\xff\xfe{"), 400, "offer:"),
                (await post_raw(offer_url, '{"sdp": 5, "type": "offer"}'), 400, "offer:"),
                (await post_raw(offer_url, '{"sdp": "v=0 garbage", "type": "offer"}'), 400, "sdp: cannot parse"),
                (await post_raw(offer_url, '{"sdp": "m=\\r\\n", "type": "offer"}'), 400, "sdp: cannot parse"),
            ]

            # A body sent in chunks, with no length announced, is cut off at the same limit.
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(40):
                    yield b" " * 1024

            async with (
                aiohttp.ClientSession() as http,
                http.post(offer_url, data=chunks(), headers={"Content-Type": "application/json"}) as response,
            ):
                refusals.append(((response.status, await response.json()), 413, "offer: the body is larger"))

            # Hundreds of candidates would keep the ICE agent checking pairs.
            candidate = "a=candidate:1 1 UDP 2122252543 127.0.0.1 {port} typ host\r\n"
            extra = "".join(candidate.format(port=20000 + i) for i in range(MAX_CANDIDATES + 1))
            sdp = real_offer["sdp"].replace("a=end-of-candidates", extra + "a=end-of-candidates", 1)
            refusals.append((await post_json(offer_url, {"sdp": sdp, "type": "offer"}), 400, "sdp:"))

            for (status, answer), expected_status, prefix in refusals:
                assert status == expected_status and answer["error"].startswith(prefix), (answer, prefix)
            assert "candidates" in refusals[-1][0][1]["error"]
            await wait_json(f"{url}/health", settled, timeout=8)  # and the gateway still answers

    run(body())


@pytest.mark.timeout(180)
def test_viewers_coming_and_going_leave_nothing_behind(tmp_path: Path) -> None:
    """20 cycles of 3 real viewers against the gateway process: its resident memory, peer connections
    and tasks return to what they were after a first warm-up cycle."""
    cycles, per_cycle, frames = 20, 3, 5

    async def cycle(url: str) -> None:
        viewers = [Viewer() for _ in range(per_cycle)]
        try:
            await asyncio.gather(*(v.connect(url) for v in viewers))
            for _ in range(frames):
                await asyncio.gather(*(v.frame() for v in viewers))
        finally:
            await asyncio.gather(*(v.close() for v in viewers))

    async def body() -> None:
        async with FakeTracker() as tracker:
            port = free_port()
            args = ["serve", "--log-level", "WARNING", "--http-port", str(port), "--stream-id", tracker.stream]
            args += ["--results-endpoint", tracker.results_endpoint, "--control-endpoint", tracker.control_endpoint]
            with launched(args, tmp_path / "gateway.log"):
                url = f"http://127.0.0.1:{port}"
                await wait_json(f"{url}/health", lambda h: h["state"] == "live", timeout=30)
                for _ in range(2):  # codecs, DTLS and the encoders' threads start once per process
                    await cycle(url)
                baseline = await wait_json(f"{url}/health", settled, timeout=10)
                await asyncio.sleep(2)  # the memory of the last viewers to leave is given back after a second
                baseline = await wait_json(f"{url}/health", settled, timeout=10)
                peak = 0
                started = time.monotonic()
                for _ in range(cycles):
                    await cycle(url)
                    peak = max(peak, (await fetch_json(f"{url}/health"))[1]["resident_bytes"])
                spent = time.monotonic() - started
                limit = baseline["resident_bytes"] + 10 * MIB
                after = await wait_json(
                    f"{url}/health",
                    lambda h: settled(h) and h["tasks"] <= baseline["tasks"] and h["resident_bytes"] <= limit,
                    timeout=10,
                )
                print(
                    f"\ngateway RSS: {baseline['resident_bytes'] / MIB:.0f} MiB after warm-up, peak "
                    f"{peak / MIB:.0f} MiB, {after['resident_bytes'] / MIB:.0f} MiB after {cycles} cycles of "
                    f"{per_cycle} viewers ({spent:.0f} s); tasks {baseline['tasks']} -> {after['tasks']}"
                )
                assert after["frames_sent"] >= cycles * per_cycle * frames

    run(body(), timeout=170)
