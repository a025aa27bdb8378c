#!/usr/bin/env python
"""Benchmark: glass-to-glass latency, delivered fps and CPU of the whole pipeline, for several viewers.

For each frame size, model and number of viewers it starts capture, tracker and gateway as three processes
over ipc:// (what ``sam3-stream run`` starts), connects ``N`` aiortc clients like the operator page, and
measures from the capture stamp (``t_capture``) to the moment each client has the frame decoded, the fps
each client gets, and the CPU each process spends (percent of one core; ``viewers`` is this process, which
decodes every client's video).

``--objects N`` makes the pass-through tracker report N moving masks of varied sizes (the tracker's
``--passthrough-objects N``), so masks travel the wire and get composited and encoded as a model's would.
``--baseline-tree DIR`` runs every configuration a second time with the code of another checkout (e.g. a
worktree of main: ``git worktree add /tmp/base main``), in the same run, alternating with this one so
both see the same load. A tree whose tracker has no ``--passthrough-objects`` gets the same moving masks
from a stand-in tracker built on its own ``TrackerService``.

Matching a decoded frame to its capture time: the frames come from an image folder of ``N`` pictures
(the synthetic pattern) each carrying its index as a barcode, so capture publishes picture
``seq mod N`` as frame ``seq``. The client reads the barcode back from the decoded frame's luma, and
the data channel's per-frame ``objects`` messages give ``t_capture`` of every ``seq`` sent; the frame
is the newest capture of that picture before it was decoded. Each bit is a bright/dark pair of
cells, read by comparing the two, so a mask tinted over the code does not flip it; two copies and a
complement byte catch the rest (frames whose code cannot be read, e.g. under a tag, are counted, not
guessed).

Prints progress to stderr and one JSON object as the last line of stdout: per configuration p50, p95,
p99 (ms, over every viewer's frames), the lowest and mean viewer fps, and CPU percent per process; per
size the gateway's CPU with the most viewers over its CPU with the fewest, the model's overhead (model -
passthrough) when a model is measured, and with a baseline both trees' figures side by side.

    python scripts/bench_pipeline.py --sizes 1920x1080 --objects 10 --viewers 4 --baseline-tree /tmp/base
    python scripts/bench_pipeline.py --sizes 1280x720 --objects 10 --viewers 1,8
    python scripts/bench_pipeline.py --models passthrough,tiny-random --sizes 640x480 --objects 0 --viewers 1
    python scripts/bench_pipeline.py --models demo --prompt '' --clicks 3 --sizes 640x480 --viewers 1  # demo's live fps
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.gateway.ice import gather_on
from streamer.sources import SyntheticSource

REPO = Path(__file__).resolve().parents[1]
PICTURES = 60  # 2 s of pictures at 30 fps: far longer than any latency, so "newest capture" is unambiguous
CODE_BITS = 8
STREAM = "cam0"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# The barcode: CODE_BITS of the index and CODE_BITS of its complement, each bit a (bright, dark) pair


def _cell(width: int) -> int:
    return max(8, width // 80)


def _code_rows(height: int, cell: int) -> list[int]:
    return [cell, height - 2 * cell]  # top and bottom copies (tags are drawn above boxes' top left)


def paint_code(frame: np.ndarray, index: int) -> None:
    height, width = frame.shape[:2]
    cell = _cell(width)
    bits = [(index >> b) & 1 for b in range(CODE_BITS)] + [1 - ((index >> b) & 1) for b in range(CODE_BITS)]
    for y in _code_rows(height, cell):
        for i, bit in enumerate(bits):
            x = cell + 2 * i * cell
            frame[y : y + cell, x : x + cell] = 255 if bit else 0
            frame[y : y + cell, x + cell : x + 2 * cell] = 0 if bit else 255


def read_code(luma: np.ndarray) -> int | None:
    """The picture index painted by :func:`paint_code`, or ``None`` when no copy reads consistently."""
    height, width = luma.shape
    cell = _cell(width)
    inset = cell // 4
    for y in _code_rows(height, cell):
        band = luma[y + inset : y + cell - inset].astype(np.int32)
        means = [band[:, x + inset : x + cell - inset].mean() for x in range(cell, cell + 4 * CODE_BITS * cell, cell)]
        bits = [int(means[2 * i] > means[2 * i + 1]) for i in range(2 * CODE_BITS)]
        value = sum(bit << b for b, bit in enumerate(bits[:CODE_BITS]))
        if all(bits[b] != bits[CODE_BITS + b] for b in range(CODE_BITS)) and value < PICTURES:
            return value
    return None


def make_pictures(folder: Path, width: int, height: int) -> None:
    """The barcoded pictures, as BMP: reading one back costs capture a copy, not a decompression."""
    source = SyntheticSource(width, height, 30.0)
    for index in range(PICTURES):
        frame = source.frame(index).copy()
        paint_code(frame, index)
        cv2.imwrite(str(folder / f"{index:04d}.bmp"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


# --------------------------------------------------------------------------------------------------
# The clients


@dataclass
class Measurement:
    """What one client saw: decoded frames (time, picture index) and ``seq -> t_capture`` from metadata."""

    decoded: list[tuple[float, int | None]] = field(default_factory=list)
    captured: dict[int, float] = field(default_factory=dict)

    def latencies(self) -> np.ndarray:
        by_picture: dict[int, list[float]] = {}
        for seq, t_capture in self.captured.items():
            by_picture.setdefault(seq % PICTURES, []).append(t_capture)
        out = []
        for t_decoded, index in self.decoded:
            if index is None:
                continue
            earlier = [t for t in by_picture.get(index, []) if t <= t_decoded]
            if earlier:
                out.append(t_decoded - max(earlier))
        return np.array(out)


class Client:
    """One viewer: an aiortc peer connection receiving the video and the per-frame metadata."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("prompts")
        self.pc.addTransceiver("video", direction="recvonly")
        loop = asyncio.get_running_loop()
        self.track: asyncio.Future[Any] = loop.create_future()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.pc.on("track", lambda track: self.track.done() or self.track.set_result(track))
        self.channel.on("open", lambda: self.opened.done() or self.opened.set_result(None))
        self.channel.on("message", self._on_message)
        self.result = Measurement()
        self.counting = False

    async def connect(self, url: str) -> None:
        with gather_on(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
            async with http.post(f"{url}offer", json=offer) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"the gateway refused a viewer: {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(self.opened, 20)

    def click(self, clicks: Sequence[tuple[int, int]]) -> None:
        """One object per click, as an operator would add them."""
        for k, (x, y) in enumerate(clicks):
            prompt = {"points": [[x, y]], "point_labels": [1]}
            self.channel.send(json.dumps({"op": "add_prompt", "id": f"click{k}", "prompt": prompt}))

    async def watch(self, stop: asyncio.Event) -> None:
        """Decode frames until ``stop``; while :attr:`counting`, read each one's barcode."""
        track = await asyncio.wait_for(self.track, 20)
        while not stop.is_set():
            frame = await asyncio.wait_for(track.recv(), 10)
            if self.counting:
                self.result.decoded.append((time.time(), read_code(luma(frame))))

    def _on_message(self, text: str) -> None:
        message = json.loads(text)
        if message.get("type") == "objects":
            self.result.captured[message["seq"]] = message["t_capture"]


def luma(frame: Any) -> np.ndarray:
    """The Y plane of a decoded yuv420p frame, as a view (no conversion: only the barcode's rows are read)."""
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, : frame.width]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


async def measure(
    url: str,
    viewers: int,
    pids: dict[str, int],
    warmup_s: float,
    seconds: float,
    clicks: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """Connect ``viewers`` clients (the first sends ``clicks``), let them settle, then measure for ``seconds``."""
    clients = [Client() for _ in range(viewers)]
    stop = asyncio.Event()
    watching: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(c.connect(url) for c in clients))
        clients[0].click(clicks)
        watching = [asyncio.ensure_future(c.watch(stop)) for c in clients]
        await asyncio.sleep(warmup_s)
        for task in watching:
            if task.done():
                task.result()  # a client that failed during warm-up fails the run
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ours, start = sum(os.times()[:2]), time.monotonic()
        for c in clients:
            c.counting = True
        await asyncio.sleep(seconds)
        for c in clients:
            c.counting = False
        elapsed = time.monotonic() - start
        cpu = {name: (cpu_seconds(pid) - before[name]) / elapsed * 100.0 for name, pid in pids.items()}
        cpu["viewers"] = (sum(os.times()[:2]) - ours) / elapsed * 100.0
        stop.set()
        for task in watching:
            if task.done():
                task.result()
    finally:
        stop.set()
        for task in watching:
            task.cancel()
        await asyncio.gather(*watching, return_exceptions=True)
        await asyncio.gather(*(c.pc.close() for c in clients), return_exceptions=True)
    latencies = np.concatenate([c.result.latencies() for c in clients]) * 1000.0
    fps = [len(c.result.decoded) / elapsed for c in clients]
    if latencies.size == 0:
        raise RuntimeError("no decoded frame could be matched to its capture")
    return {
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "fps_min": round(min(fps), 1),
        "fps_mean": round(float(np.mean(fps)), 1),
        "frames": sum(len(c.result.decoded) for c in clients),
        "matched": int(latencies.size),
        "cpu_percent": {name: round(value, 1) for name, value in cpu.items()},
    }


# --------------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class Tree:
    """A checkout whose ``streamer`` runs the pipeline: ``name`` in the report and its folder."""

    name: str
    path: Path

    def env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(self.path)}

    def has_passthrough_objects(self) -> bool:
        """Whether its tracker takes ``--passthrough-objects``."""
        help_text = subprocess.run(
            [sys.executable, "-m", "streamer.cli", "track", "--help"],
            env=self.env(),
            cwd=self.path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return "--passthrough-objects" in help_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}health", timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def pipeline_commands(
    tree: Tree, folder: Path, model: str, prompt: str | None, args: argparse.Namespace, sockets: Path, port: int
) -> dict[str, list[str]]:
    """The capture, tracker and gateway command lines, meeting on ipc:// sockets in ``sockets``."""
    frames, results, control = (f"ipc://{sockets}/{name}" for name in ("frames", "results", "control"))
    cli = [sys.executable, "-m", "streamer.cli"]
    quiet = ["--log-level", "WARNING"]
    capture = [*cli, "capture", *quiet, "--source", str(folder), "--loop", "--fps", str(args.fps)]
    capture += ["--frames-endpoint", frames, "--stream-id", STREAM]
    endpoints = ["--frames-endpoint", frames, "--results-endpoint", results, "--control-endpoint", control]
    tracker = [*cli, "track", *quiet, "--model", model, "--device", args.device, *endpoints]
    if prompt:
        tracker += ["--prompt", prompt]
    if model == "passthrough" and args.objects:
        if tree.has_passthrough_objects():
            tracker += ["--passthrough-objects", str(args.objects)]
        else:
            tracker = [sys.executable, str(Path(__file__).resolve()), "--stand-in-tracker", *endpoints]
            tracker += ["--objects", str(args.objects)]
    gateway = [*cli, "serve", *quiet, "--results-endpoint", results, "--control-endpoint", control]
    gateway += ["--stream-id", STREAM, "--http-port", str(port), "--max-viewers", str(max(8, max(args.viewer_counts)))]
    return {"capture": capture, "tracker": tracker, "gateway": gateway}


def run_configuration(
    tree: Tree,
    folder: Path,
    model: str,
    prompt: str | None,
    viewers: int,
    args: argparse.Namespace,
    log_dir: Path,
    clicks: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    sockets = Path(tempfile.mkdtemp(prefix="bp-"))  # short: ipc:// paths are limited to ~100 bytes
    commands = pipeline_commands(tree, folder, model, prompt, args, sockets, port)
    log_path = log_dir / f"{tree.name}-{folder.name}-{model.replace('/', '_')}-{viewers}.log"
    procs: dict[str, subprocess.Popen] = {}
    try:
        with open(log_path, "wb") as log:
            for name, command in commands.items():
                # cwd: ``python -m`` puts the working folder first on sys.path, before PYTHONPATH.
                procs[name] = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=tree.env(),
                    cwd=tree.path,
                )
        deadline = time.monotonic() + args.startup_timeout
        while not ((health := _health(url)) and health["state"] == "live"):
            dead = [name for name, p in procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{tree.name} {model} at {folder.name} did not go live ({dead} exited): {log_path}")
            time.sleep(0.2)
        pids = {name: p.pid for name, p in procs.items()}
        return asyncio.run(measure(url, viewers, pids, args.warmup, args.seconds, clicks))
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])  # the folder goes with the run
        raise
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# A stand-in tracker for trees whose pass-through tracker draws no moving objects


def _load_moving_objects() -> Any:
    """This checkout's ``streamer.moving_objects``, loaded by path into a process importing another tree's
    ``streamer`` (whose package lacks it and the ``streamer.masks`` it imports)."""
    for name in ("streamer.masks", "streamer.moving_objects"):
        spec = importlib.util.spec_from_file_location(name, REPO / (name.replace(".", "/") + ".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["streamer.moving_objects"]


def stand_in_tracker(args: argparse.Namespace) -> None:
    """Serve the tree's own ``TrackerService`` with a tracker reporting ``args.objects`` moving masks."""
    import logging

    from streamer.signals import StopSignals  # the tree's, as are the two below
    from streamer.tracker_service import TrackerService
    from streamer.tracking import PassThroughTracker

    moving_objects = _load_moving_objects().moving_objects
    logging.basicConfig(level=logging.WARNING)

    class MovingObjectsTracker(PassThroughTracker):
        """The tree's own pass-through tracker (prompts, ids, its whole interface), reporting the moving masks."""

        def track(self, frame: np.ndarray, timestamp: float | None = None) -> Any:
            result = super().track(frame, timestamp)
            height, width = frame.shape[:2]
            result.objects = moving_objects(args.objects, result.frame_index, width, height)
            return result

    with StopSignals() as stop, TrackerService(args.results_endpoint, args.control_endpoint) as service:
        service.serve(MovingObjectsTracker, [args.frames_endpoint], lambda: stop.requested)


# --------------------------------------------------------------------------------------------------
# Main


def _sizes(text: str, parser: argparse.ArgumentParser) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not match:
            parser.error(f"--sizes: {item!r} is not WxH")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="passthrough", help="comma-separated: passthrough, tiny-random, ...")
    parser.add_argument("--prompt", default="person", help="text prompt for a real model ('' for none)")
    parser.add_argument(
        "--clicks", type=int, default=0, help="click this many of the scene's objects (largest first) on a real model"
    )
    parser.add_argument("--device", default="auto", help="tracker device (default: cuda if any)")
    parser.add_argument("--sizes", default="1920x1080", help="comma-separated WxH list (default %(default)s)")
    parser.add_argument("--objects", type=int, default=10, help="moving masks the pass-through tracker reports")
    parser.add_argument("--viewers", default="4", help="comma-separated numbers of viewers (default %(default)s)")
    parser.add_argument("--fps", type=float, default=30.0, help="capture rate")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds to settle before measuring")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for a live feed")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="another checkout to run side by side")
    parser.add_argument("--stand-in-tracker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--frames-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--results-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--control-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size_list = _sizes(args.sizes, parser)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.viewer_counts = sorted({int(v) for v in args.viewers.split(",")})
    except ValueError:
        parser.error(f"--viewers: {args.viewers!r} is not a list of numbers")
    if args.objects < 0 or not args.viewer_counts or min(args.viewer_counts) < 1:
        parser.error("--objects must be >= 0 and --viewers >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stand_in_tracker:
        stand_in_tracker(args)
        return
    trees = [Tree("ours", REPO)]
    if args.baseline_tree is not None:
        trees.insert(0, Tree("baseline", args.baseline_tree.resolve()))
    report: dict[str, Any] = {
        "seconds": args.seconds,
        "capture_fps": args.fps,
        "objects": args.objects,
        "models": args.model_list,
        "prompt": args.prompt or None,
        "clicks": args.clicks,
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "trees": {tree.name: str(tree.path) for tree in trees},
        "configurations": {},
        "gateway_cpu_ratio": {},
        "overhead": {},
        "side_by_side": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for width, height in args.size_list:
            folder = Path(tmp) / f"{width}x{height}"
            folder.mkdir()
            make_pictures(folder, width, height)
            shot = SyntheticSource(width, height, 30.0).scene_frame(0)
            largest = sorted(shot.instances, key=lambda inst: -inst.area)[: args.clicks]
            for model in args.model_list:
                prompt = None if model == "passthrough" else (args.prompt or None)
                clicks = [] if model == "passthrough" else [inst.interior_point() for inst in largest]
                for viewers in args.viewer_counts:
                    pair = f"{width}x{height}/{model}/{viewers}v"
                    for tree in trees:  # the trees alternate, so that both see the same load
                        name = f"{tree.name}/{pair}"
                        print(f"{name}: running ...", file=sys.stderr, flush=True)
                        run = run_configuration(tree, folder, model, prompt, viewers, args, Path(tmp), clicks)
                        report["configurations"][name] = run
                        print(f"{name}: {run}", file=sys.stderr, flush=True)
                    if len(trees) > 1:
                        report["side_by_side"][pair] = {
                            tree.name: _headline(report["configurations"][f"{tree.name}/{pair}"]) for tree in trees
                        }
            _summaries(report, trees, args, width, height)
            shutil.rmtree(folder)
    print(json.dumps(report))


def _headline(run: dict[str, Any]) -> dict[str, Any]:
    headline = {k: run[k] for k in ("p50_ms", "p99_ms", "fps_min")}
    return {**headline, "gateway_cpu": run["cpu_percent"]["gateway"], "tracker_cpu": run["cpu_percent"]["tracker"]}


def _summaries(report: dict[str, Any], trees: list[Tree], args: argparse.Namespace, width: int, height: int) -> None:
    size = f"{width}x{height}"
    runs = report["configurations"]
    for tree in trees:
        fewest, most = args.viewer_counts[0], args.viewer_counts[-1]
        for model in args.model_list:
            if most > fewest:
                low = runs[f"{tree.name}/{size}/{model}/{fewest}v"]["cpu_percent"]["gateway"]
                high = runs[f"{tree.name}/{size}/{model}/{most}v"]["cpu_percent"]["gateway"]
                key = f"{tree.name}/{size}/{model}/{most}v_over_{fewest}v"
                report["gateway_cpu_ratio"][key] = round(high / max(low, 1e-6), 2)
        models = [m for m in args.model_list if m != "passthrough"]
        if "passthrough" in args.model_list and models:
            base = runs[f"{tree.name}/{size}/passthrough/{fewest}v"]
            for model in models:
                full = runs[f"{tree.name}/{size}/{model}/{fewest}v"]
                report["overhead"][f"{tree.name}/{size}/{model}"] = {
                    key: round(full[key] - base[key], 1) for key in ("p50_ms", "p95_ms", "p99_ms", "fps_mean")
                }


if __name__ == "__main__":
    main()
