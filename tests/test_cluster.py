"""Trackers on a local Ray cluster started by the test: 3 pass-through trackers, 6 synthetic cameras
(real captures in threads, real ZeroMQ), a robot following the map (``examples/robot_consumer.py``, a real
process), a tracker killed with SIGKILL, a fourth added, one removed, the registry itself killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

pytest.importorskip("ray")

from aiohttp import web  # noqa: E402
from helpers import REPO, fetch_json, free_port_block, post_json, run, wait_for  # noqa: E402

from models import Prompt  # noqa: E402
from streamer.capture import run_capture  # noqa: E402
from streamer.cluster.cluster import Cluster  # noqa: E402
from streamer.cluster.command import make_app  # noqa: E402
from streamer.cluster.registry import REBALANCE_MARGIN  # noqa: E402
from streamer.cluster.tracker_actor import TrackerOptions  # noqa: E402
from streamer.gateway import GatewayConfig, create_app  # noqa: E402
from streamer.protocol import PromptRequest  # noqa: E402
from streamer.transport import PromptClient  # noqa: E402

STREAMS = [f"cam{i}" for i in range(6)]
RECOVERY_BUDGET_S = 5.0
ROBOT = REPO / "examples" / "robot_consumer.py"


class Robot:
    """``examples/robot_consumer.py --map-url``: records when it printed a result of each stream."""

    def __init__(self, map_url: str) -> None:
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROBOT), "--map-url", map_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stream = line.split(" ", 1)[0]
            if stream in STREAMS:
                self.seen[stream].append(time.monotonic())

    def first_after(self, stream: str, t: float) -> float | None:
        return next((s for s in self.seen[stream] if s > t), None)

    def longest_gap(self, stream: str, start: float, end: float) -> float:
        times = [start] + [s for s in self.seen[stream] if start < s < end] + [end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class AppThread:
    """An aiohttp app on a loopback port, served by its own event loop in a thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(10)
        self.port = free_port_block(1)
        asyncio.run_coroutine_threadsafe(web.TCPSite(self.runner, "127.0.0.1", self.port).start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, dict[str, str]]]:
    ports = free_port_block(8 + len(STREAMS))
    stop = threading.Event()
    cameras = {name: f"tcp://127.0.0.1:{ports + 8 + i}" for i, name in enumerate(STREAMS)}
    threads = [
        threading.Thread(
            target=run_capture, args=("synthetic:64x48@10", endpoint, name), kwargs={"stop_event": stop}, daemon=True
        )
        for name, endpoint in cameras.items()
    ]
    for thread in threads:
        thread.start()
    # 10 ms a frame stands in for the model: each camera uses ~10 % of a tracker's frame budget.
    options = TrackerOptions(model="passthrough", passthrough_delay_s=0.01, log_level="WARNING")
    cluster = Cluster(options, base_port=ports, num_cpus=2, dead_after_s=1.5)
    try:
        for _ in range(3):
            cluster.add_tracker()
        cluster.wait_until_up(timeout_s=60)
        for name, endpoint in cameras.items():
            cluster.add_stream(name, endpoint)
        yield cluster, cameras
    finally:
        cluster.close()
        stop.set()
        for thread in threads:
            thread.join(5)


def settled(cluster: Cluster, trackers: int) -> bool:
    """``trackers`` trackers up and no move for a second."""
    health = cluster.health()
    up = sum(t["state"] == "up" for t in health["trackers"].values())
    return up == trackers and all(time.time() - m["t"] > 1.0 for m in health["moves"])


def holders(cluster: Cluster) -> dict[str, list[str]]:
    return {name: t["streams"] for name, t in cluster.health()["trackers"].items() if t["state"] == "up"}


def test_streams_placed_killed_tracker_recovered_with_prompts_fourth_added(cluster) -> None:
    cluster, cameras = cluster
    api = AppThread(make_app(cluster, dict(cameras)))
    robot = Robot(f"{api.url}/map")
    try:
        # Balanced: 2 streams per tracker, and the robot, following the map, hears all six.
        assert sorted(len(s) for s in holders(cluster).values()) == [2, 2, 2]
        wait_for(lambda: all(robot.seen[s] for s in STREAMS), 20, "the robot hears every stream")

        # A click and a concept on one of t0's streams, through whichever tracker the map names.
        stream = holders(cluster)["t0"][0]
        route = cluster.route_map()["streams"][stream]
        with PromptClient(route["control_endpoint"], timeout_s=3) as client:
            click = client.request(
                PromptRequest("c1", stream, "add_prompt", prompt=Prompt(points=[[10, 10]], point_labels=[1]))
            )
            concept = client.request(PromptRequest("c2", stream, "add_prompt", prompt=Prompt(text="person")))
        assert click.ok and concept.ok, (click, concept)
        wait_for(lambda: cluster.health()["streams"][stream]["prompts"] == 2, 5, "the registry holds their copy")

        # kill -9 of t0's process: its streams resume elsewhere within 5 s, with their prompts.
        moved = holders(cluster)["t0"]
        os.kill(cluster.tracker_info("t0")["pid"], signal.SIGKILL)
        killed = time.monotonic()
        resumed = {
            s: wait_for(lambda s=s: robot.first_after(s, killed + 0.3), RECOVERY_BUDGET_S + 5, f"{s} resumes")
            for s in moved
        }
        recovery = max(resumed.values()) - killed
        assert recovery < RECOVERY_BUDGET_S, resumed
        new_route = cluster.route_map()["streams"][stream]  # t0 is back by now: it may hold it again
        with PromptClient(new_route["control_endpoint"], timeout_s=3) as client:
            # The clicked object kept its id and the concept is active on the new holder.
            assert client.request(PromptRequest("c3", stream, "remove_object", obj_id=click.obj_ids[0])).ok
            assert client.request(PromptRequest("c4", stream, "remove_prompt", text="person")).ok
        health = run(fetch_json(f"{api.url}/health"))[1]
        assert any(m["reason"].startswith("tracker t0 lost") and m["stream"] in moved for m in health["moves"])
        assert health["counters"]["tracker_failures"] >= 1

        # A fourth tracker (over HTTP): the cluster rebalances; streams that stay put are not interrupted.
        wait_for(lambda: settled(cluster, 3), 15, "t0 back (Ray restarted it) and the cluster settled", poll=0.2)
        before = {s: t for t, streams in holders(cluster).items() for s in streams}
        posted = time.monotonic()
        status, added = run(post_json(f"{api.url}/trackers", {}))
        assert status == 201, added
        wait_for(lambda: len(holders(cluster).get(added["name"], [])) >= 1, 30, "the new tracker gets streams")
        time.sleep(2.0)
        # Balanced by measured frame budget, as the registry promises: it moves a stream only while that
        # narrows the gap by more than REBALANCE_MARGIN (its allowance for costs re-measured on a busy box),
        # so the spread of loads stays within the largest stream's cost plus that margin; nobody is idle.
        health = cluster.health()
        loads = [t["load"] for t in health["trackers"].values()]
        largest = max(s["cost"] or 0.0 for s in health["streams"].values())
        assert len(loads) == 4 and max(loads) - min(loads) <= largest + REBALANCE_MARGIN, health["trackers"]
        assert all(t["streams"] for t in health["trackers"].values()), health["trackers"]
        after = {s: t for t, streams in holders(cluster).items() for s in streams}
        for s in STREAMS:
            if before[s] == after[s]:
                assert robot.longest_gap(s, posted, time.monotonic()) < 1.0, s

        # Removing a tracker drains it first; the robot still hears every stream.
        drained = holders(cluster)[added["name"]]
        status, removed = run(post_json(f"{api.url}/trackers", {"name": "bad name!"}))
        assert status == 400 and removed["error"].startswith("name:")
        moves = cluster.remove_tracker(added["name"])
        assert sorted(m["stream"] for m in moves) == sorted(drained)
        assert all("drained" in m["reason"] for m in moves)
        now = time.monotonic()
        wait_for(lambda: all(robot.first_after(s, now) for s in STREAMS), 10, "every stream after the drain")
        metrics = run(_text(f"{api.url}/metrics"))
        assert "sam3_cluster_moves_total" in metrics and 'sam3_cluster_trackers{state="up"} 3' in metrics
    finally:
        robot.stop()
        api.close()


def test_control_api_refuses_bad_input_naming_the_field(cluster) -> None:
    cluster, cameras = cluster
    api = AppThread(make_app(cluster, dict(cameras)))
    try:
        for body, field in (
            ({"name": "x", "frames_endpoint": "http://evil"}, "frames_endpoint"),
            ({"name": "", "frames_endpoint": "tcp://127.0.0.1:1"}, "stream"),
            ({"name": ["x"], "frames_endpoint": "tcp://127.0.0.1:1"}, "stream"),
            ({"name": "cam0", "frames_endpoint": "tcp://127.0.0.1:2"}, "stream"),  # declared with another
        ):
            status, answer = run(post_json(f"{api.url}/streams", body))
            assert status == 400 and answer["error"].startswith(f"{field}:"), answer
        status, answer = run(_post_raw(f"{api.url}/streams", b"[" * 10000))
        assert status == 400 and answer["error"].startswith("body:")
        status, answer = run(_delete(f"{api.url}/trackers/nope"))
        assert status == 404 and answer["error"].startswith("tracker:")
    finally:
        api.close()


def test_gateway_follows_its_stream_to_another_tracker(cluster) -> None:
    cluster, cameras = cluster
    api = AppThread(make_app(cluster, dict(cameras)))
    stream = "cam0"
    config = GatewayConfig(stream_id=stream, map_url=f"{api.url}/map", http_port=0)
    gateway = AppThread(create_app(config))
    try:
        health = f"{gateway.url}/health"
        first = wait_for(lambda: run(fetch_json(health))[1]["results_received"] > 5, 20, "results via the map")
        assert first
        holder = cluster.route_map()["streams"][stream]["tracker"]
        cluster.remove_tracker(holder)  # drained: the stream moves
        seen = run(fetch_json(health))[1]["results_received"]

        def moved_and_live() -> dict | None:
            state = run(fetch_json(health))[1]
            return state if state["stream_moves"] >= 1 and state["results_received"] > seen + 5 else None

        state = wait_for(moved_and_live, 10, "the gateway follows the move", poll=0.2)
        # Results flow from the new tracker: live, or slow when that tracker lags the camera on a loaded box.
        assert state["state"] in ("live", "slow") and state["stream"] == stream, state
        assert state["results_endpoint"] == cluster.route_map()["streams"][stream]["results_endpoint"]
        assert "sam3_gateway_stream_moves_total 1" in run(_text(f"{gateway.url}/metrics"))
    finally:
        gateway.close()
        api.close()


def test_registry_restarted_by_ray_rebuilds_its_map_from_the_trackers(cluster) -> None:
    cluster, _cameras = cluster
    before = {s: r["tracker"] for s, r in cluster.route_map()["streams"].items()}
    os.kill(cluster.health()["pid"], signal.SIGKILL)
    time.sleep(0.5)

    def rebuilt() -> bool:
        try:
            routes = cluster.route_map()["streams"]
        except Exception:  # Ray retries calls across the restart; one may still fail meanwhile
            return False
        return {s: r["tracker"] for s, r in routes.items()} == before

    wait_for(rebuilt, 30, "the same map after the registry restarted", poll=0.5)
    assert cluster.health()["counters"].get("moves", 0) == 0  # nothing moved: rebuilt, not re-placed


async def _text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def _post_raw(url: str, body: bytes) -> tuple[int, dict]:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def _delete(url: str) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.delete(url) as response:
        return response.status, await response.json()
