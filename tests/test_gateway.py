"""The gateway end to end on loopback: a real aiortc client, real ZeroMQ sockets playing the tracker."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import zmq
from helpers import (
    BACKGROUND,
    FIRST_OBJECT,
    HEIGHT,
    WIDTH,
    FakeTracker,
    Viewer,
    fetch_json,
    gateway,
    is_banner,
    run,
    shows_object,
)

from streamer.gateway.feed import FeedState, ResultFeed


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
                # The metadata rides the data channel, which may arrive a moment after the picture.
                deadline = time.monotonic() + 5
                while viewer.objects is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
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
                answer = await viewer.request(
                    {"op": "add_prompt", "prompt": {"points": [[900, 10]], "point_labels": [1]}}
                )
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
                _, health = await fetch_json(f"{url}/health")
                assert health["viewers"] == 2
                third = Viewer()
                status, answer = await third.offer(url)
                await third.close()
                assert status == 503 and answer["error"].startswith("viewers:"), answer
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
            async with http.post(f"{url}/offer", data="nope", headers={"Content-Type": "application/json"}) as response:
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
