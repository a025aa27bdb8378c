#!/usr/bin/env python
"""Benchmark: the video predictor on a file vs transformers' own video session, same model, video, prompt.

One generated H.264 video (moving shapes), a text prompt on frame 0, forward through every frame:

- ``propagate``: ``Sam3VideoPredictor.propagate_in_video`` (frames decoded on demand, outputs the model
  will not read again dropped) vs ``Sam3VideoModel.propagate_in_video_iterator`` on a session that holds
  the whole preprocessed video (transformers' documented offline flow; same preprocessing), both with
  masks brought to the video's size. The baseline's up-front decode and preprocessing is timed apart.
- ``end_to_end``: decode, track, draw, encode H.264, three ways: ``streamer.segment.segment_video`` in
  this process (what ``sam3-stream segment-video`` runs); a queued video job through the real HTTP
  service (``sam3-stream api`` started on loopback with a temporary data directory: POST
  /api/ai/queue with the video as a data: URI, poll GET /api/ai/queue/{id}, download the result);
  and the same pipeline written on transformers' session (decode all, preprocess all, propagate,
  draw, encode), the baseline.
- state bytes held when propagation ends (sessions, cached frames; the baseline's preprocessed video),
  and whether both sides show the same objects and masks on every frame.
- ``memory``: the predictor alone on a longer 1080p video: growth of the process's resident memory while
  it propagates, against what holding the decoded video would take.

Rounds alternate the order of the sides (shared machines are noisy); medians are reported.
Progress goes to stderr, one JSON object to the last line of stdout.

    python scripts/bench_files.py --model tiny-random --frames 60
    python scripts/bench_files.py --model full-random --device cuda --frames 60 --width 1280 --height 720
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from models import Sam3VideoPredictor, load_models
from models.loading import Sam3Models
from models.memory import state_bytes
from models.preprocess import frame_to_pixels
from models.sessions import add_text_prompt
from models.tiny import moving_shapes
from models.video_session import text_objects
from streamer.compositor import composite
from streamer.segment import FilePrompt, encode_image, segment_video
from streamer.video_writer import Mp4Writer

Masks = list[dict[int, bytes]]  # per frame: obj_id -> packed mask bits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random, full-random, a hub id or a local folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--text", default="person", help="the text prompt")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per measurement (order alternates)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    parser.add_argument("--memory-frames", type=int, default=150, help="frames of the 1080p memory run (0 skips it)")
    return parser.parse_args(argv)


def _sync(models: Sam3Models) -> None:
    if models.device.type == "cuda":
        torch.cuda.synchronize()


def _packed(objects) -> dict[int, bytes]:
    return {o.obj_id: np.packbits(o.mask).tobytes() for o in objects}


# ------------------------------------------------------------------------------------------- predictor


def predictor_propagate(predictor: Sam3VideoPredictor, video: Path, text: str) -> tuple[dict[str, Any], Masks]:
    session_id = predictor.start_session(video)["session_id"]
    try:
        masks: Masks = []
        _sync(predictor.models)
        start = time.perf_counter()  # add_prompt runs frame 0, which propagation then does not run again
        predictor.add_prompt(session_id, 0, text=text)
        for response in predictor.propagate_in_video(session_id, "forward"):
            masks.append(_packed(response["outputs"].objects))
        _sync(predictor.models)
        elapsed = time.perf_counter() - start
        session = predictor._sessions[session_id]
        held = state_bytes(session.text, session.geometry, session.pixels._recent, session.frames._cache)
    finally:
        predictor.close_session(session_id)
    return {"seconds": elapsed, "fps": len(masks) / elapsed, "state_bytes": held}, masks


def predictor_end_to_end(predictor: Sam3VideoPredictor, video: Path, text: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    summary = segment_video(predictor, video, out, FilePrompt(texts=(text,)))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "fps": summary.frames / elapsed}


# ------------------------------------------------------------------------------------------ baseline


def _decode_all(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _baseline_session(models: Sam3Models, frames: list[np.ndarray], text: str) -> Sam3VideoInferenceSession:
    """transformers' offline flow: the whole video preprocessed into the session up front."""
    pixels = torch.cat([frame_to_pixels(f, models.image_size, models.device, models.dtype) for f in frames])
    height, width = frames[0].shape[:2]
    session = Sam3VideoInferenceSession(
        video=pixels,
        video_height=height,
        video_width=width,
        inference_device=models.device,
        inference_state_device=models.device,
        video_storage_device=models.device,
        dtype=models.dtype,
    )
    add_text_prompt(session, models.tokenizer, text)
    return session


def _baseline_frames(models: Sam3Models, session: Sam3VideoInferenceSession, height: int, width: int):
    with torch.inference_mode():
        for out in models.video_model.propagate_in_video_iterator(session, start_frame_idx=0):
            yield out.frame_idx, text_objects(out, session, height, width)


def baseline_propagate(models: Sam3Models, video: Path, text: str) -> tuple[dict[str, Any], Masks]:
    start = time.perf_counter()
    frames = _decode_all(video)
    session = _baseline_session(models, frames, text)
    _sync(models)
    loaded = time.perf_counter()
    height, width = frames[0].shape[:2]
    masks = [_packed(objects) for _, objects in _baseline_frames(models, session, height, width)]
    _sync(models)
    elapsed = time.perf_counter() - loaded
    result = {
        "seconds": elapsed,
        "fps": len(masks) / elapsed,
        "decode_and_preprocess_seconds": loaded - start,
        "fps_including_decode": len(masks) / (elapsed + loaded - start),
        "state_bytes": state_bytes(session),
    }
    return result, masks


def baseline_end_to_end(models: Sam3Models, video: Path, text: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    frames = _decode_all(video)
    session = _baseline_session(models, frames, text)
    height, width = frames[0].shape[:2]
    with av.open(str(video)) as container:
        rate = float(container.streams.video[0].average_rate)
    with Mp4Writer(out, width, height, rate) as writer:
        for index, objects in _baseline_frames(models, session, height, width):
            writer.write(composite(frames[index], objects))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "fps": len(frames) / elapsed}


# ------------------------------------------------------------------------------------- HTTP service

POLL_S = 0.02  # how often the queued job's status is asked for
SERVER_START_S = 600.0


@contextlib.contextmanager
def api_server(model: str, device: str | None, threads: int, data_dir: Path) -> Iterator[str]:
    """``sam3-stream api`` on a free loopback port, as a separate process; yields its base URL."""
    argv = [sys.executable, "-m", "streamer.cli", "api", "--log-level", "WARNING", "--model", model]
    argv += ["--http-port", "0", "--data-dir", str(data_dir)] + (["--device", device] if device else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}  # torch threads as here
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_S
        assert proc.stdout is not None
        for line in proc.stdout:  # it prints one line, once it listens
            if "serving on " in line:
                yield line.split("serving on ", 1)[1].split()[0].rstrip("/")
                return
            if time.monotonic() > deadline:
                break
        raise SystemExit(f"sam3-stream api did not start (exit status {proc.poll()}); its log is above")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def queued_job(base: str, video: Path, text: str, frames: int, out: Path) -> dict[str, Any]:
    """One video job end to end through the service: queue it, poll until it ends, download the result."""
    start = time.perf_counter()
    uri = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode("ascii")
    body = {"model": "sam-3-video", "input_video": uri, "prompt": text}
    generation_id = json.loads(_http("POST", f"{base}/api/ai/queue", body))["generations"][0]["generation_id"]
    polls = 0
    while True:
        view = json.loads(_http("GET", f"{base}/api/ai/queue/{generation_id}"))
        polls += 1
        if view["status"] not in ("queued", "running"):
            break
        time.sleep(POLL_S)
    if view["status"] != "succeeded":
        raise SystemExit(f"queued job {generation_id} {view['status']}: {view['error_message']}")
    out.write_bytes(_http("GET", view["result_url"]))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "fps": frames / elapsed, "polls": polls, "result_bytes": out.stat().st_size}


def warm_up(base: str, video: Path, text: str) -> None:
    """One synchronous image job, untimed: the server's first model calls are slower than the rest."""
    with av.open(str(video)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    png = base64.b64encode(encode_image(first, ".png")).decode("ascii")
    _http("POST", f"{base}/api/ai/images/edit", {"model": "sam-3-image", "input_image": png, "prompt": text})


# --------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def predictor_memory(predictor: Sam3VideoPredictor, video: Path, text: str, frames: int) -> dict[str, Any]:
    """Resident memory growth while the predictor propagates through ``video`` (sampled every frame)."""
    session_id = predictor.start_session(video)["session_id"]
    try:
        info = predictor.session_info(session_id)
        before = _rss_bytes()
        peak = before
        predictor.add_prompt(session_id, 0, text=text)
        for _ in predictor.propagate_in_video(session_id, "forward"):
            peak = max(peak, _rss_bytes())
    finally:
        predictor.close_session(session_id)
    frame_bytes = info["width"] * info["height"] * 3
    return {
        "frames": frames,
        "frame_size": [info["width"], info["height"]],
        "cache_frames": predictor.cache_frames,
        "peak_rss_growth_bytes": peak - before,
        "decoded_video_bytes": frame_bytes * frames,
        "peak_rss_growth_in_frames": (peak - before) / frame_bytes,
    }


# ----------------------------------------------------------------------------------------------- race


def alternate(rounds: int, sides: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Run each side ``rounds`` times, alternating which goes first; report each side's median round."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    names = list(sides)
    for round_number in range(rounds):
        for name in names if round_number % 2 == 0 else reversed(names):
            runs[name].append(sides[name]())
            print(f"  {name}: {runs[name][-1]['fps']:.2f} fps", file=sys.stderr)

    def median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
        middle = statistics.median(r["fps"] for r in results)
        return min(results, key=lambda r: abs(r["fps"] - middle))

    return {name: median_round(results) for name, results in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.frames < 1 or args.rounds < 1:
        raise SystemExit("--frames and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    models = load_models(args.model, device=args.device)
    predictor = Sam3VideoPredictor(models=models)
    report: dict[str, Any] = {
        "model": args.model,
        "device": str(models.device),
        "dtype": str(models.dtype).replace("torch.", ""),
        "frames": args.frames,
        "frame_size": [args.width, args.height],
        "prompt": {"text": args.text, "frame_index": 0, "propagation_direction": "forward"},
    }
    with tempfile.TemporaryDirectory(prefix="bench-files-") as folder:
        video = Path(folder) / "shapes.mp4"
        with Mp4Writer(video, args.width, args.height, fps=30) as writer:
            for i in range(args.frames):
                writer.write(moving_shapes(i, args.width, args.height))
        masks: dict[str, Masks] = {}

        def propagate_with(name: str, run: Callable[[], tuple[dict[str, Any], Masks]]) -> Callable[[], dict[str, Any]]:
            def side() -> dict[str, Any]:
                result, masks[name] = run()
                return result

            return side

        print("propagate_in_video", file=sys.stderr)
        propagate = alternate(
            args.rounds,
            {
                "predictor": propagate_with("predictor", lambda: predictor_propagate(predictor, video, args.text)),
                "transformers": propagate_with("transformers", lambda: baseline_propagate(models, video, args.text)),
            },
        )
        print("end to end: decode, track, draw, encode (starting sam3-stream api)", file=sys.stderr)
        with api_server(args.model, args.device, args.threads, Path(folder) / "api-data") as base:
            warm_up(base, video, args.text)
            end_to_end = alternate(
                args.rounds,
                {
                    "predictor": lambda: predictor_end_to_end(predictor, video, args.text, Path(folder) / "ours.mp4"),
                    "api_queued_job": lambda: queued_job(base, video, args.text, args.frames, Path(folder) / "api.mp4"),
                    "transformers": lambda: baseline_end_to_end(models, video, args.text, Path(folder) / "theirs.mp4"),
                },
            )
        if args.memory_frames > 0:
            print(f"memory: {args.memory_frames} frames at 1920x1080", file=sys.stderr)
            long_video = Path(folder) / "long.mp4"
            with Mp4Writer(long_video, 1920, 1080, fps=30) as writer:
                for i in range(args.memory_frames):
                    writer.write(moving_shapes(i, 1920, 1080))
            report["memory"] = predictor_memory(predictor, long_video, args.text, args.memory_frames)
    report["propagate"] = propagate
    report["end_to_end"] = end_to_end
    report["ratios"] = {
        "propagate_fps": propagate["predictor"]["fps"] / propagate["transformers"]["fps"],
        "propagate_fps_vs_baseline_including_decode": propagate["predictor"]["fps"]
        / propagate["transformers"]["fps_including_decode"],
        "end_to_end_fps": end_to_end["predictor"]["fps"] / end_to_end["transformers"]["fps"],
        "api_queued_job_fps": end_to_end["api_queued_job"]["fps"] / end_to_end["transformers"]["fps"],
        "api_queued_job_vs_in_process": end_to_end["api_queued_job"]["fps"] / end_to_end["predictor"]["fps"],
        "state_bytes": propagate["predictor"]["state_bytes"] / propagate["transformers"]["state_bytes"],
    }
    report["same_outputs"] = masks["predictor"] == masks["transformers"]
    report["objects_shown"] = sum(len(frame) for frame in masks["predictor"])
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
