#!/usr/bin/env python
"""Benchmark: streams served at a per-stream frame rate as trackers are added, and recovery after kill -9.

A local Ray cluster (token authentication on) with pass-through trackers (``--delay-ms`` per frame stands
in for the model: each frame costs that much of a tracker's frame budget) and ``--streams`` synthetic
cameras at ``--fps`` (real captures in threads of this process, real ZeroMQ). Trackers are added one at a
time up to ``--trackers``; after each, once the registry has rebalanced, every stream's result rate is
measured for ``--window`` seconds by a subscriber to all trackers' results. A stream is *served* when it
gets at least 90 % of ``--fps``; ``stream_equivalents`` is the total result rate over ``--fps``. The one
tracker step is the baseline of the same run (``speedup``: stream equivalents over the baseline's).

Then one tracker is killed with SIGKILL: ``recovery_s`` is the time from the kill until every stream it
held has a result again from another tracker (``moved_after_s``: until the registry had moved the last).
Progress goes to stderr; the last line of stdout is one JSON object.

    python scripts/bench_cluster.py                                  # 16 streams at 5 fps, 30 ms a frame, 1-4 trackers
    python scripts/bench_cluster.py --streams 8 --fps 10 --delay-ms 40 --trackers 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from streamer.capture import run_capture
from streamer.cluster.cluster import Cluster
from streamer.cluster.tracker_actor import TrackerOptions
from streamer.topics import RESULT, parse_topic
from streamer.transport import drain, results_subscriber


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--fps", type=float, default=5.0, help="frame rate of every camera")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="pass-through tracker's time per frame")
    parser.add_argument("--trackers", type=int, default=4, help="trackers added one at a time, 1 to this")
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured after each step")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds allowed for rebalancing before measuring")
    parser.add_argument("--size", default="64x48", help="camera frame size")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_base(count: int) -> int:
    """A base port with ``count`` free loopback ports after it."""
    for base in range(30000, 60000, 97):
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port block")


class ResultCounter:
    """Subscribes to every tracker's results; records when each stream's results arrive."""

    def __init__(self) -> None:
        self.endpoints: list[str] = []
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        current: list[str] = []
        sock = None
        while not self._stop.is_set():
            if self.endpoints != current:
                current = list(self.endpoints)
                if sock is not None:
                    sock.close(linger=0)
                sock = results_subscriber(current)
            if sock is None:
                time.sleep(0.05)
                continue
            for parts in drain(sock, timeout_ms=100):
                prefix, stream = parse_topic(bytes(parts[0]))
                if prefix == RESULT and stream is not None:
                    self.arrivals[stream].append(time.monotonic())
        if sock is not None:
            sock.close(linger=0)

    def rates(self, start: float, end: float, streams: list[str]) -> dict[str, float]:
        return {s: sum(start <= t < end for t in self.arrivals[s]) / (end - start) for s in streams}

    def first_after(self, stream: str, t: float) -> float | None:
        return next((a for a in self.arrivals[stream] if a > t), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def measure_step(cluster: Cluster, counter: ResultCounter, args: argparse.Namespace, names: list[str]) -> dict:
    counter.endpoints = sorted({t["results_endpoint"] for t in cluster.route_map()["trackers"].values()})
    time.sleep(args.settle)
    start = time.monotonic()
    time.sleep(args.window)
    rates = counter.rates(start, time.monotonic(), names)
    health = cluster.health()
    served = sum(rate >= 0.9 * args.fps for rate in rates.values())
    return {
        "trackers": len(cluster.trackers),
        "served": served,
        "stream_equivalents": round(sum(rates.values()) / args.fps, 2),
        "fps_min": round(min(rates.values()), 2),
        "fps_median": round(sorted(rates.values())[len(rates) // 2], 2),
        "streams_per_tracker": {n: len(t["streams"]) for n, t in health["trackers"].items()},
        "load_per_tracker": {n: t["load"] for n, t in health["trackers"].items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = [f"cam{i}" for i in range(args.streams)]
    base = free_base(2 * args.trackers + args.streams)
    stop = threading.Event()
    cameras = {name: f"tcp://127.0.0.1:{base + 2 * args.trackers + i}" for i, name in enumerate(names)}
    for name, endpoint in cameras.items():
        spec = f"synthetic:{args.size}@{args.fps:g}"
        threading.Thread(
            target=run_capture, args=(spec, endpoint, name), kwargs={"stop_event": stop}, daemon=True
        ).start()
    options = TrackerOptions(model="passthrough", passthrough_delay_s=args.delay_ms / 1000.0, log_level="WARNING")
    started = time.monotonic()
    cluster = Cluster(options, base_port=base, num_cpus=2)
    ray_init_s = time.monotonic() - started
    counter = ResultCounter()
    steps = []
    try:
        cluster.add_tracker()
        cluster.wait_until_up(timeout_s=120)
        for name, endpoint in cameras.items():
            cluster.add_stream(name, endpoint)
        for count in range(1, args.trackers + 1):
            if count > 1:
                cluster.add_tracker()
                cluster.wait_until_up(timeout_s=120)
            steps.append(measure_step(cluster, counter, args, names))
            log(f"{count} trackers: {steps[-1]}")
        victim = max(cluster.trackers, key=lambda n: len(cluster.health()["trackers"][n]["streams"]))
        moved = cluster.health()["trackers"][victim]["streams"]
        os.kill(cluster.tracker_info(victim)["pid"], signal.SIGKILL)
        killed, killed_wall = time.monotonic(), time.time()
        deadline = killed + 30.0
        while time.monotonic() < deadline and not all(counter.first_after(s, killed + 0.3) for s in moved):
            time.sleep(0.05)
        resumed = [counter.first_after(s, killed + 0.3) for s in moved]
        moves = [m for m in cluster.health()["moves"] if m["t"] >= killed_wall and m["stream"] in moved]
    finally:
        counter.stop()
        cluster.close()
        stop.set()
    baseline = steps[0]["stream_equivalents"] or 1e-9
    report = {
        "benchmark": "cluster",
        "streams": args.streams,
        "fps": args.fps,
        "delay_ms": args.delay_ms,
        "capacity_per_tracker_streams": round(1000.0 / (args.delay_ms * args.fps), 2),
        "ray_init_s": round(ray_init_s, 2),
        "steps": steps,
        "speedup": [round(step["stream_equivalents"] / baseline, 2) for step in steps],
        "killed": victim,
        "killed_streams": len(moved),
        "recovery_s": None if None in resumed else round(max(resumed) - killed, 2),  # type: ignore[type-var]
        "moved_after_s": round(max(m["t"] for m in moves) - killed_wall, 2) if moves else None,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
