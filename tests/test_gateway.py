"""The gateway end to end on loopback: a real aiortc client, real ZeroMQ sockets playing the tracker."""

from __future__ import annotations

import asyncio
import json
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
    live_viewer,
    run,
    shows_object,
)

from streamer.gateway.feed import FeedState, ResultFeed
from streamer.protocol import EventMessage


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
                frame_index = answer.pop("frame_index")
                assert answer == {
                    "type": "answer",
                    "id": "t1",
                    "ok": True,
                    "error": None,
                    "obj_ids": [2],
                    "placed_on": None,  # no seq sent: the next frame
                    "requested": None,
                }
                assert isinstance(frame_index, int) and frame_index > 0, "the frame it applies before"
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


def test_state_follows_heartbeats_not_result_age() -> None:
    """A tracker slower than no_signal_after_s is live while frames reach it; when it dies it is offline
    at once, however recent its last result (regression: a dead slow tracker stayed "live")."""

    async def body() -> None:
        async with FakeTracker(fps=0.5) as tracker:  # a result every 2 s, slower than no_signal_after_s
            feed = ResultFeed(tracker.results_endpoint, tracker.stream, no_signal_after_s=1.0, offline_after_s=1.0)
            changes: list[FeedState] = []
            feed.add_listener(lambda status: changes.append(status.state))
            await feed.start()
            try:
                deadline = time.monotonic() + 5
                while feed.results_received < 1:
                    assert time.monotonic() < deadline, "no results"
                    await asyncio.sleep(0.05)
                changes.clear()
                await asyncio.sleep(3.0)
                assert feed.state is FeedState.LIVE and changes == [], changes
                assert feed.stream_status is not None and feed.stream_status["frames_received"] > 0

                tracker.receiving = False  # the camera is gone: heartbeats go on, no frame reaches the tracker
                await asyncio.sleep(1.8)
                assert changes == [FeedState.NO_SIGNAL], changes
                tracker.receiving = None
                await asyncio.sleep(0.8)
                assert changes[-1] is FeedState.LIVE, changes

                await asyncio.sleep(1.0)  # right after a result ...
                tracker.publishing = tracker.heartbeats = False  # ... the tracker dies
                started = time.monotonic()
                while feed.state is not FeedState.TRACKER_OFFLINE:
                    assert time.monotonic() - started < 2.0, f"still {feed.state} after the tracker died"
                    await asyncio.sleep(0.05)
            finally:
                await feed.close()

    run(body())


def test_a_gateway_that_falls_behind_does_not_call_the_tracker_slow(monkeypatch) -> None:
    """Results the gateway skips because it cannot decode them all still count in its rate: the page must
    not say "the tracker is slower than the camera" of a tracker that keeps up (it would be false)."""
    import streamer.gateway.feed as feed_module

    decode = feed_module._decode_for_compositor
    decoded: list[int] = []

    def slow_decode(parts: list) -> object:
        time.sleep(0.2)  # a gateway that can take 5 results a second, from a tracker sending 30
        decoded.append(1)
        return decode(parts)

    monkeypatch.setattr(feed_module, "_decode_for_compositor", slow_decode)

    async def body() -> None:
        async with FakeTracker(fps=30, camera_fps=20.0) as tracker:  # a tracker that keeps up with its camera
            feed = ResultFeed(tracker.results_endpoint, tracker.stream)
            await feed.start()
            try:
                await asyncio.sleep(3.5)
                assert len(decoded) < tracker.seq / 3, "the gateway was meant to fall behind"
                assert feed.results_received >= tracker.seq - 12, (feed.results_received, tracker.seq)
                assert feed.fps > 20, feed.fps
                assert feed.state is FeedState.LIVE, feed.status
            finally:
                await feed.close()

    run(body())


def test_data_channel_prompts_reach_the_tracker_in_the_order_sent() -> None:
    """Regression: one REQ socket per request let add-then-reset arrive as reset-then-add."""

    async def body() -> None:
        async with FakeTracker() as tracker, live_viewer(tracker) as viewer:
            click = {"op": "add_prompt", "prompt": {"points": [[250, 60]], "point_labels": [1]}}
            sent = [click if i % 2 == 0 else {"op": "reset_session"} for i in range(40)]
            before = len(tracker.requests)
            answers = await asyncio.gather(  # all sent before the first answer comes back
                *(viewer.send_raw(json.dumps({**m, "id": f"o{i}"}), f"o{i}") for i, m in enumerate(sent))
            )
            assert all(a["ok"] for a in answers), answers
            assert [r.op for r in tracker.requests[before:]] == [m["op"] for m in sent]

    run(body())


def test_nested_and_oversized_data_channel_messages_are_answered_with_their_id() -> None:
    """Regression: nested JSON got no answer at all; a 100 KB message was answered with id null."""

    async def body() -> None:
        async with FakeTracker() as tracker, live_viewer(tracker) as viewer:
            nested = '{"id": "deep", "op": ' + "[" * 5000 + "]" * 5000 + "}"
            answer = await viewer.send_raw(nested, "deep")
            assert not answer["ok"] and answer["error"] == "message: nested too deeply", answer
            big = '{"op": "add_prompt", "prompt": {"text": "' + "x" * 100_000 + '"}, "id": "big"}'
            answer = await viewer.send_raw(big, "big")
            assert not answer["ok"] and answer["error"].startswith("message: longer than 65536"), answer
            answer = await viewer.send_raw(r'{"op": "reset_session", "id": "\ud800"}', None)
            assert not answer["ok"] and answer["error"].startswith("id:"), answer
            answer = await viewer.request({"op": "remove_object", "obj_id": 2**63 - 1})
            assert answer["error"].startswith("obj_id: remove_object needs an integer between 0 and 2147483647")
            assert (await viewer.request({"op": "reset_session"}))["ok"], "the channel still works"

    run(body())


def test_tracker_events_reach_viewers_naming_their_prompt() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, live_viewer(tracker) as viewer:
            click = {"op": "add_prompt", "prompt": {"points": [[250, 60]], "point_labels": [1]}}
            answer = await viewer.request(click)
            request_id = tracker.requests[-1].request_id
            failed = EventMessage(
                "cam0", "prompt_failed", "it failed", time.time(), request_id, "add_prompt", answer["obj_ids"]
            )
            await tracker.send_event(failed)
            event = await viewer.wait_event("prompt_failed")
            assert event["id"] == answer["id"] and event["message"] == "it failed", event
            assert event["obj_ids"] == answer["obj_ids"] and event["op"] == "add_prompt"
            await tracker.send_event(EventMessage("cam9", "prompt_failed", "another stream's", time.time()))

            await asyncio.sleep(4 * tracker.heartbeat_s)  # the gateway has heard the first instance's heartbeats
            tracker.instance = "fake-2"  # the tracker restarted
            event = await viewer.wait_event("tracker_restarted")
            assert "restarted" in event["message"]
            assert [e["message"] for e in viewer.events if e["event"] == "prompt_failed"] == ["it failed"]

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
