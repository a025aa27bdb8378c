#!/usr/bin/env python
"""Benchmark: ``StreamingTracker`` with objects batched, unbatched, and transformers' own session.

Streams N synthetic frames with moving objects, prompted the same way on frame 0, through:
- ``batched``: ``StreamingTracker`` as shipped (the shared encoder, the rolling memory bank and the
  tracker's per-object work batched);
- ``unbatched``: the same with ``TrackerConfig(batch_objects=False)`` (transformers' per-object loop);
- ``baseline``: transformers' unmodified streaming session (``--skip-baseline`` leaves it out): for
  clicks, ``Sam3TrackerVideoModel`` with its own image encoder, prompted through transformers'
  processor code; for text, ``Sam3VideoModel``.
Every frame goes to each contender in turn, order rotating, so machine noise hits all alike.
``StreamingTracker``'s runs also report the median of its stage timings (preprocess, encode, track,
postprocess).

``--objects`` takes one or more counts of clicked objects; all counts race in the same run, and the
JSON's ``curve`` gives median frame time and fps per count for each contender, plus the
8-to-1-object ratio of median frame time when both counts ran. Prints progress to stderr and one
JSON object as the last line of stdout.

    python scripts/bench_tracker.py --objects 1 2 4 8 16 32 --frames 300 --skip-baseline  # object curve
    python scripts/bench_tracker.py --model tiny-random --frames 5000                      # memory vs baseline
    python scripts/bench_tracker.py --model full-random --device cuda --dtype bf16 --objects 1 4 16 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from models import Prompt, StreamingTracker, TrackerConfig, load_models
from models.hf_internals import points_processor
from models.loading import Sam3Models
from models.memory import state_bytes
from models.preprocess import boxes_from_masks, frame_to_pixels, masks_to_frame
from models.sessions import add_text_prompt
from models.tiny import click_prompts, moving_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random, full-random, a hub id or a local folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--frames", type=int, default=2000, help="frames per run")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workload", choices=("points", "text"), default="points")
    parser.add_argument(
        "--objects", type=int, nargs="+", default=[2], help="click objects in the points workload; several: a curve"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core, as the tracker service runs; "
        "1: figures that hold on a shared box)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="leave out transformers' own session")
    parser.add_argument("--skip-unbatched", action="store_true", help="leave out the unbatched StreamingTracker")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    if any(n < 1 for n in args.objects):
        parser.error("--objects: every count must be >= 1")
    return args


def checkpoints(frames: int) -> list[int]:
    return sorted({c for c in (100, 1000, frames) if c <= frames})


class Contender:
    """One side of the comparison: a per-frame step, a state probe, and what was measured."""

    def __init__(
        self, name: str, step: Callable[[int, np.ndarray], dict[str, float] | None], measure_state: Callable[[], int]
    ) -> None:
        self.name, self.step, self.measure_state = name, step, measure_state
        self.latencies: list[float] = []
        self.stages: dict[str, list[float]] = {}  # the tracker's own stage timings, where it reports them
        self.states: dict[str, int] = {}

    def summary(self, frames: int) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1e3
        tenth = max(len(ms) // 10, 1)
        out = {
            "fps": frames / (ms.sum() / 1e3),
            "latency_ms": {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "latency_ms_first_10pct_p50": float(np.median(ms[:tenth])),
            "latency_ms_last_10pct_p50": float(np.median(ms[-tenth:])),
            "state_bytes": self.states,
        }
        if self.stages:
            out["stage_ms_p50"] = {k: round(float(np.median(v)) * 1e3, 3) for k, v in self.stages.items()}
        return out


def race(contenders: list[Contender], args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, Any]:
    """Feed every frame to each contender in turn, so machine noise hits all of them alike.

    The order rotates every frame: whoever runs second finds the weights warm in the CPU caches.
    """
    marks = checkpoints(args.frames)
    for index in range(args.frames):
        frame = moving_shapes(index, args.width, args.height)
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            start = time.perf_counter()
            stages = contender.step(index, frame)
            sync()
            contender.latencies.append(time.perf_counter() - start)
            for stage, seconds in (stages or {}).items():
                contender.stages.setdefault(stage, []).append(seconds)
            if index + 1 in marks:
                contender.states[str(index + 1)] = contender.measure_state()
        if (index + 1) % 500 == 0:
            last = ", ".join(f"{c.name} {c.latencies[-1] * 1e3:.1f} ms" for c in contenders)
            print(f"{index + 1}/{args.frames} frames: {last}", file=sys.stderr, flush=True)
    return {c.name: c.summary(args.frames) for c in contenders}


def prompts_for(args: argparse.Namespace, objects: int) -> list[Prompt]:
    return click_prompts(objects, args.width, args.height) if args.workload == "points" else [Prompt(text="person")]


def streaming_contender(name: str, models: Sam3Models, config: TrackerConfig, prompts: list[Prompt]) -> Contender:
    tracker = StreamingTracker(models, config)

    def step(index: int, frame: np.ndarray) -> dict[str, float]:
        if index == 0:
            height, width = frame.shape[:2]
            for prompt in prompts:
                tracker.add_prompt(prompt, frame_size=(width, height))
        return tracker.track(frame, timestamp=float(index)).timings

    return Contender(name, step, tracker.state_bytes)


def baseline_contender(models: Sam3Models, source: str, args: argparse.Namespace, prompts: list[Prompt]) -> Contender:
    """transformers' own session as its docs show for streaming, with our pre/post-processing
    (transformers' image processors need torchvision), producing the same masks and boxes as ours."""
    from transformers import Sam3TrackerVideoModel
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    device, dtype, size = models.device, models.dtype, models.image_size
    kwargs = {
        "inference_device": device,
        "inference_state_device": device,
        "video_storage_device": device,
        "dtype": dtype,
    }
    if args.workload == "points":
        if source in ("tiny-random", "full-random"):
            # The same weights as ours: the video model's tracker plus its shared image encoder.
            model = Sam3TrackerVideoModel(models.tracker_model.config).to(device, dtype).eval()
            model.load_state_dict(_tracker_state_dict(models), strict=True)
        else:
            model = Sam3TrackerVideoModel.from_pretrained(source, dtype=dtype).to(device).eval()
        session = Sam3TrackerVideoInferenceSession(**kwargs)
    else:
        model = models.video_model
        session = Sam3VideoInferenceSession(**kwargs)
        add_text_prompt(session, models.tokenizer, "person")

    @torch.inference_mode()
    def step(index: int, frame: np.ndarray) -> None:
        pixels = frame_to_pixels(frame, size, device, dtype)
        if index == 0 and args.workload == "points":
            # One click per object, all in one call (transformers replaces the set of prompted objects).
            points_processor(size).add_inputs_to_inference_session(
                session,
                frame_idx=0,
                obj_ids=list(range(len(prompts))),
                input_points=[[[list(p.points[0])] for p in prompts]],
                input_labels=[[[1] for _ in prompts]],
                original_size=frame.shape[:2],
            )
        out = model(inference_session=session, frame=pixels, frame_idx=index)
        logits = out.pred_masks[:, 0] if args.workload == "points" else _stack(out.obj_id_to_mask, device)
        # The same outputs StreamingTracker gives: masks and boxes at frame resolution, on the host.
        masks = masks_to_frame(logits, args.height, args.width)
        boxes, _ = boxes_from_masks(masks)
        masks.cpu().numpy(), boxes.cpu().numpy()

    return Contender("baseline", step, lambda: state_bytes(session))


def _stack(obj_id_to_mask: dict[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    if not obj_id_to_mask:
        return torch.zeros(0, 1, 1, device=device)
    return torch.cat([obj_id_to_mask[i] for i in sorted(obj_id_to_mask)], dim=0)


def _tracker_state_dict(models: Sam3Models) -> dict[str, torch.Tensor]:
    """The standalone tracker's weights from the video model, as transformers' checkpoint mapping does."""
    video = models.video_model.state_dict()
    out = {k[len("tracker_model.") :]: v for k, v in video.items() if k.startswith("tracker_model.")}
    out.update(
        {
            "vision_encoder.backbone." + k[len("detector_model.vision_encoder.backbone.") :]: v
            for k, v in video.items()
            if k.startswith("detector_model.vision_encoder.backbone.")
        }
    )
    out.update(
        {
            "vision_encoder.neck." + k[len("tracker_neck.") :]: v
            for k, v in video.items()
            if k.startswith("tracker_neck.")
        }
    )
    return out


def ratios(ours: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    out = {"fps": ours["fps"] / baseline["fps"]}
    for q in ("p50", "p95", "p99"):
        out[f"latency_{q}"] = ours["latency_ms"][q] / baseline["latency_ms"][q]
    for frame, value in ours["state_bytes"].items():
        out[f"state_bytes_at_{frame}"] = value / baseline["state_bytes"][frame]
    return out


def contenders_for(models: Sam3Models, args: argparse.Namespace, objects: int) -> list[Contender]:
    """Batched, unbatched and baseline (as asked) at one object count, named ``<kind>@<objects>``."""
    prompts = prompts_for(args, objects)
    contenders = [streaming_contender("batched", models, TrackerConfig(), prompts)]
    if not args.skip_unbatched:
        contenders.append(streaming_contender("unbatched", models, TrackerConfig(batch_objects=False), prompts))
    if not args.skip_baseline:
        contenders.append(baseline_contender(models, args.model, args, prompts))
    for contender in contenders:
        contender.name = f"{contender.name}@{objects}"
    return contenders


def report_run(results: dict[str, Any], objects: int, args: argparse.Namespace) -> dict[str, Any]:
    """One object count's results, with ours-to-others ratios."""
    run: dict[str, Any] = {"objects": objects if args.workload == "points" else "text: person"}
    for kind in ("batched", "unbatched", "baseline"):
        if f"{kind}@{objects}" in results:
            run[kind] = results[f"{kind}@{objects}"]
    for other in ("unbatched", "baseline"):
        if other in run:
            run[f"batched_vs_{other}"] = ratios(run["batched"], run[other])
    states = run["batched"]["state_bytes"]
    if "1000" in states:
        run["batched_state_flat_from_1000"] = abs(states[str(args.frames)] - states["1000"]) <= 0.05 * states["1000"]
    return run


def curve(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median frame time and fps per object count, per contender; and the 8-to-1-object ratio."""
    names = [n for n in ("batched", "unbatched", "baseline") if n in runs[0]]
    out: dict[str, Any] = {"objects": [r["objects"] for r in runs]}
    for name in names:
        out[f"{name}_p50_ms"] = [round(r[name]["latency_ms"]["p50"], 3) for r in runs]
        out[f"{name}_fps"] = [round(r[name]["fps"], 2) for r in runs]
    by_count = {r["objects"]: r for r in runs}
    if 1 in by_count and 8 in by_count:
        for name in names:
            p50 = by_count[8][name]["latency_ms"]["p50"] / by_count[1][name]["latency_ms"]["p50"]
            out[f"{name}_p50_8_over_1"] = round(p50, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)  # the batched tracker upsamples masks with OpenCV on CPU
    models = load_models(args.model, device=args.device, dtype=args.dtype)
    sync = torch.cuda.synchronize if models.device.type == "cuda" else (lambda: None)
    counts = args.objects if args.workload == "points" else [1]
    report: dict[str, Any] = {
        "model": args.model,
        "device": str(models.device),
        "dtype": str(models.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "workload": args.workload,
        "frames": args.frames,
        "frame_size": [args.width, args.height],
    }
    # Every object count races in the same run, frame by frame, so the curve compares like with like.
    contenders = [c for objects in counts for c in contenders_for(models, args, objects)]
    results = race(contenders, args, sync)
    runs = [report_run(results, objects, args) for objects in counts]
    report["runs"] = runs
    report["curve"] = curve(runs)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
