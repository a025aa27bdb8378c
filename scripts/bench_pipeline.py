#!/usr/bin/env python
"""Benchmark: glass-to-glass latency and delivered fps of the whole pipeline.

For each resolution and each model (``passthrough``: no model, the pipeline's own overhead; a real
model, by default ``tiny-random`` with the text prompt "person") it runs ``sam3-stream run`` (capture,
tracker and gateway as three processes over ipc://), connects an aiortc client like the operator page,
and measures from the capture stamp (``t_capture``) to the moment the client has the frame decoded.

Matching a decoded frame to its capture time: the frames come from an image folder of ``N`` pictures
(the synthetic pattern) each carrying its index as a barcode, so capture publishes picture
``seq mod N`` as frame ``seq``. The client reads the barcode back from the decoded frame's luma, and
the data channel's per-frame ``objects`` messages give ``t_capture`` of every ``seq`` sent; the frame
is the newest capture of that picture before it was decoded. Each bit is a bright/dark pair of
cells, read by comparing the two, so a mask tinted over the code does not flip it; two copies and a
complement byte catch the rest (frames whose code cannot be read are counted, not guessed).

Prints progress to stderr and one JSON object as the last line of stdout: per configuration p50,
p95, p99 (ms), fps, frames, and per resolution the overhead of the model (model - passthrough).

    python scripts/bench_pipeline.py --seconds 10
    python scripts/bench_pipeline.py --model facebook/sam3 --device cuda --sizes 1280x720
    python scripts/bench_pipeline.py --model demo --prompt '' --clicks 3 --sizes 640x480   # the demo's live fps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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
PICTURES = 90  # 3 s of pictures at 30 fps: far longer than any latency, so "newest capture" is unambiguous
CODE_BITS = 8


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
    source = SyntheticSource(width, height, 30.0)
    for index in range(PICTURES):
        frame = source.frame(index).copy()
        paint_code(frame, index)
        cv2.imwrite(
            str(folder / f"{index:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
        )


# --------------------------------------------------------------------------------------------------
# The client


@dataclass
class Measurement:
    """What one client saw: decoded frames (time, picture index) and ``seq -> t_capture`` from metadata."""

    decoded: list[tuple[float, int | None]] = field(default_factory=list)
    captured: dict[int, float] = field(default_factory=dict)

    def latencies(self) -> np.ndarray:
        by_picture: dict[int, list[tuple[float, int]]] = {}
        for seq, t_capture in self.captured.items():
            by_picture.setdefault(seq % PICTURES, []).append((t_capture, seq))
        out = []
        for t_decoded, index in self.decoded:
            if index is None:
                continue
            earlier = [t for t, _ in by_picture.get(index, []) if t <= t_decoded]
            if earlier:
                out.append(t_decoded - max(earlier))
        return np.array(out)


async def measure(url: str, warmup_s: float, seconds: float, clicks: Sequence[tuple[int, int]] = ()) -> Measurement:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("prompts")
    pc.addTransceiver("video", direction="recvonly")
    track_future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track_future.done() or track_future.set_result(track))
    channel.on("open", lambda: opened.done() or opened.set_result(None))
    result = Measurement()
    counting = False

    @channel.on("message")
    def on_message(text: str) -> None:
        message = json.loads(text)
        if message.get("type") == "objects":
            result.captured[message["seq"]] = message["t_capture"]

    try:
        with gather_on(["127.0.0.1"]):
            await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
            async with http.post(f"{url}offer", json=offer) as response:
                answer = await response.json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(opened, 20)
        for k, (x, y) in enumerate(clicks):  # one object per click, as an operator would add them
            prompt = {"points": [[x, y]], "point_labels": [1]}
            channel.send(json.dumps({"op": "add_prompt", "id": f"click{k}", "prompt": prompt}))
        track = await asyncio.wait_for(track_future, 20)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < warmup_s + seconds:
            frame = await asyncio.wait_for(track.recv(), 10)
            t_decoded = time.time()
            if not counting and elapsed >= warmup_s:
                counting = True
            if counting:
                luma = frame.to_ndarray(format="gray")
                result.decoded.append((t_decoded, read_code(luma)))
    finally:
        await pc.close()
    return result


# --------------------------------------------------------------------------------------------------
# The pipeline


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


def run_configuration(
    folder: Path,
    model: str,
    prompt: str | None,
    args: argparse.Namespace,
    log_dir: Path,
    clicks: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [
        sys.executable,
        "-m",
        "streamer.cli",
        "run",
        "--model",
        model,
        "--device",
        args.device,
        "--source",
        str(folder),
        "--loop",
        "--fps",
        str(args.fps),
        "--http-port",
        str(port),
    ]
    if prompt:
        command += ["--prompt", prompt]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO)}
    log_path = log_dir / f"{folder.name}-{model.replace('/', '_')}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO
        )
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not ((health := _health(url)) and health["state"] == "live"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{model} at {folder.name} did not go live; see {log_path}")
            time.sleep(0.2)
        measurement = asyncio.run(measure(url, args.warmup, args.seconds, clicks))
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])  # the folder goes with the run
        raise
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    latencies = measurement.latencies() * 1000.0
    frames = len(measurement.decoded)
    if latencies.size == 0:
        raise RuntimeError(f"no decoded frame of {model} at {folder.name} could be matched; see {log_path}")
    return {
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "fps": round(frames / args.seconds, 1),
        "frames": frames,
        "matched": int(latencies.size),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="the model to compare with passthrough")
    parser.add_argument("--prompt", default="person", help="text prompt for the model ('' for none)")
    parser.add_argument(
        "--clicks", type=int, default=0, help="click this many of the scene's objects (largest first) on the model"
    )
    parser.add_argument("--device", default="auto", help="tracker device (default: cuda if any)")
    parser.add_argument("--sizes", default="640x480,1280x720", help="comma-separated WxH list")
    parser.add_argument("--fps", type=float, default=30.0, help="capture rate")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds to settle before measuring")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for a live feed")
    args = parser.parse_args(argv)
    args.size_list = []
    for text in args.sizes.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
        if not match:
            parser.error(f"--sizes: {text!r} is not WxH")
        args.size_list.append((int(match[1]), int(match[2])))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "seconds": args.seconds,
        "capture_fps": args.fps,
        "model": args.model,
        "prompt": args.prompt or None,
        "clicks": args.clicks,
        "configurations": {},
        "overhead": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for width, height in args.size_list:
            folder = Path(tmp) / f"{width}x{height}"
            folder.mkdir()
            make_pictures(folder, width, height)
            runs = {}
            shot = SyntheticSource(width, height, 30.0).scene_frame(0)
            largest = sorted(shot.instances, key=lambda inst: -inst.area)[: args.clicks]
            clicks = [inst.interior_point() for inst in largest]
            for model, prompt, points in (("passthrough", None, []), (args.model, args.prompt or None, clicks)):
                name = f"{width}x{height}/{model}"
                print(f"{name}: running ...", file=sys.stderr, flush=True)
                runs[model] = report["configurations"][name] = run_configuration(
                    folder, model, prompt, args, Path(tmp), points
                )
                print(f"{name}: {runs[model]}", file=sys.stderr, flush=True)
            base, full = runs["passthrough"], runs[args.model]
            report["overhead"][f"{width}x{height}"] = {
                key: round(full[key] - base[key], 1) for key in ("p50_ms", "p95_ms", "p99_ms", "fps")
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
