#!/usr/bin/env python
"""Benchmark: milliseconds to composite one frame, on one core, by frame size and number of objects.

The objects are the pass-through tracker's moving ellipses (``streamer.moving_objects``) on a noisy frame,
given to the compositor as full-frame masks (what ``models`` returns) and as masks by their boxes (what the
gateway decodes from the wire). With ``--baseline-tree DIR`` the same full-frame case is also timed with
the compositor of another checkout (``DIR``: e.g. a worktree of main), in a subprocess, in the same run.

Prints one JSON object as the last line: per size, ms per frame (median of ``--runs``) for each case, and
``speedup`` (baseline / ours) when a baseline was timed.

    python scripts/bench_compositor.py --sizes 1920x1080 --objects 10 --baseline-tree /work/main
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def time_ms(work: Callable[[], Any], runs: int) -> float:
    """Median milliseconds of ``runs`` calls of ``work`` after one warm-up call."""
    work()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        samples.append((time.perf_counter() - start) * 1e3)
    return round(float(np.median(samples)), 2)


def scene(width: int, height: int, objects: int) -> tuple[np.ndarray, list[Any]]:
    from streamer.moving_objects import moving_objects

    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return frame, moving_objects(objects, 45, width, height)


def time_here(frame: np.ndarray, objects: list[Any], runs: int) -> float:
    """Full-frame masks through whichever ``streamer.compositor`` this process imports."""
    from streamer.compositor import composite

    return time_ms(lambda: composite(frame, objects), runs)


def time_baseline(tree: Path, frame: np.ndarray, objects: list[Any], runs: int) -> float:
    """:func:`time_here` in a subprocess importing ``streamer`` from ``tree``."""
    plain = [(o.obj_id, o.score, tuple(o.bbox), o.mask, o.label) for o in objects]
    with tempfile.NamedTemporaryFile(suffix=".pickle") as data:
        pickle.dump((frame, plain, runs), data)
        data.flush()
        env = {**os.environ, "PYTHONPATH": str(tree)}
        output = subprocess.run(
            [sys.executable, __file__, "--child", data.name], env=env, check=True, capture_output=True, text=True
        ).stdout
    return float(output.strip().splitlines()[-1])


def child(path: str) -> None:
    from types import SimpleNamespace

    cv2.setNumThreads(1)
    with open(path, "rb") as data:
        frame, plain, runs = pickle.load(data)
    objects = [SimpleNamespace(obj_id=i, score=s, bbox=b, mask=m, label=label) for i, s, b, m, label in plain]
    print(time_here(frame, objects, runs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1280x720,1920x1080", help="comma-separated WxH list")
    parser.add_argument("--objects", type=int, default=10, help="objects per frame")
    parser.add_argument("--runs", type=int, default=30, help="frames timed per case")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="another checkout to time too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    from streamer.compositor import composite
    from streamer.moving_objects import moving_object_masks

    cv2.setNumThreads(1)  # "on one core": OpenCV would otherwise spread some operations over threads
    report: dict[str, Any] = {"objects": args.objects, "runs": args.runs, "threads": 1, "sizes": {}}
    for text in args.sizes.split(","):
        width, height = (int(v) for v in text.lower().split("x"))
        frame, objects = scene(width, height, args.objects)
        boxed = [
            dataclasses.replace(o, mask=region)
            for o, (_, region) in zip(objects, moving_object_masks(args.objects, 45, width, height), strict=True)
        ]
        row: dict[str, Any] = {
            "full_masks_ms": time_here(frame, objects, args.runs),
            "box_masks_ms": time_ms(lambda f=frame, b=boxed: composite(f, b), args.runs),
        }
        if args.baseline_tree is not None:
            row["baseline_full_masks_ms"] = time_baseline(args.baseline_tree, frame, objects, args.runs)
            row["speedup"] = round(row["baseline_full_masks_ms"] / row["full_masks_ms"], 1)
        report["sizes"][f"{width}x{height}"] = row
        print(f"{width}x{height}: {row}", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
