#!/usr/bin/env python
"""Benchmark: transformers' unmodified streaming session vs ``StreamingTracker``, same model and frames.

Both stream N synthetic frames with moving objects, prompted the same way on frame 0:
- ``points`` workload: click objects on ``Sam3TrackerVideoModel`` (baseline: its own session and
  image encoder; ours: the shared encoder and the rolling memory bank);
- ``text`` workload: a concept on ``Sam3VideoModel``.

Prints progress to stderr and one JSON object as the last line of stdout: fps, per-frame latency
p50/p95/p99, state bytes at frames 100, 1000 and N for each, and ours-to-baseline ratios.

    python scripts/bench_tracker.py --model tiny-random --frames 5000
    python scripts/bench_tracker.py --model full-random --device cuda --frames 300   # realistic cost
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models import Prompt, StreamingTracker, TrackerConfig, load_models
from models.loading import Sam3Models
from models.memory import state_bytes
from models.preprocess import boxes_from_masks, frame_to_pixels, masks_to_frame, prompt_to_model_points
from models.sessions import add_object_inputs, add_text_prompt, point_inputs
from models.tiny import click_prompts, moving_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random", help="tiny-random, full-random, a hub id or a local folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workload", choices=("points", "text"), default="points")
    parser.add_argument("--objects", type=int, default=2, help="click objects in the points workload")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    parser.add_argument("--skip-baseline", action="store_true", help="only run StreamingTracker")
    return parser.parse_args(argv)


def checkpoints(frames: int) -> list[int]:
    return sorted({c for c in (100, 1000, frames) if c <= frames})


class Contender:
    """One side of the comparison: a per-frame step, a state probe, and what was measured."""

    def __init__(self, name: str, step: Callable[[int, np.ndarray], Any], measure_state: Callable[[], int]) -> None:
        self.name, self.step, self.measure_state = name, step, measure_state
        self.latencies: list[float] = []
        self.states: dict[str, int] = {}

    def summary(self, frames: int) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1e3
        tenth = max(len(ms) // 10, 1)
        return {
            "fps": frames / (ms.sum() / 1e3),
            "latency_ms": {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "latency_ms_first_10pct_p50": float(np.median(ms[:tenth])),
            "latency_ms_last_10pct_p50": float(np.median(ms[-tenth:])),
            "state_bytes": self.states,
        }


def race(contenders: list[Contender], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Feed every frame to each contender in turn, so machine noise hits all of them alike.

    The order rotates every frame: whoever runs second finds the weights warm in the CPU caches.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() and args.device != "cpu" else (lambda: None)
    marks = checkpoints(args.frames)
    for index in range(args.frames):
        frame = moving_shapes(index, args.width, args.height)
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            start = time.perf_counter()
            contender.step(index, frame)
            sync()
            contender.latencies.append(time.perf_counter() - start)
            if index + 1 in marks:
                contender.states[str(index + 1)] = contender.measure_state()
        if (index + 1) % 500 == 0:
            last = ", ".join(f"{c.name} {c.latencies[-1] * 1e3:.1f} ms" for c in contenders)
            print(f"{index + 1}/{args.frames} frames: {last}", file=sys.stderr, flush=True)
    return {c.name: c.summary(args.frames) for c in contenders}


def streaming_contender(models: Sam3Models, args: argparse.Namespace) -> Contender:
    tracker = StreamingTracker(models, TrackerConfig())
    prompts = (
        click_prompts(args.objects, args.width, args.height) if args.workload == "points" else [Prompt(text="person")]
    )

    def step(index: int, frame: np.ndarray) -> None:
        if index == 0:
            for prompt in prompts:
                tracker.add_prompt(prompt, frame_size=(args.width, args.height))
        tracker.track(frame, timestamp=float(index))

    return Contender("streaming", step, tracker.state_bytes)


def baseline_contender(models: Sam3Models, source: str, args: argparse.Namespace) -> Contender:
    """transformers' own session as its docs show for streaming, with our pre/post-processing
    (transformers' processors need torchvision), producing the same masks and boxes as ours."""
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
        inputs = {}
        for obj_id, prompt in enumerate(click_prompts(args.objects, args.width, args.height)):
            coords, labels = prompt_to_model_points(prompt, args.width, args.height, size)[0]
            inputs[obj_id] = point_inputs(coords, labels, device)
    else:
        model = models.video_model
        session = Sam3VideoInferenceSession(**kwargs)
        add_text_prompt(session, models.tokenizer, "person")

    @torch.inference_mode()
    def step(index: int, frame: np.ndarray) -> None:
        pixels = frame_to_pixels(frame, size, device, dtype)
        if index == 0 and args.workload == "points":
            add_object_inputs(session, 0, inputs)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.frames < 1:
        raise SystemExit("--frames must be >= 1")
    torch.set_num_threads(args.threads)
    models = load_models(args.model, device=args.device)
    report: dict[str, Any] = {
        "model": args.model,
        "device": str(models.device),
        "dtype": str(models.dtype).replace("torch.", ""),
        "workload": args.workload,
        "objects": args.objects if args.workload == "points" else "text: person",
        "frames": args.frames,
        "frame_size": [args.width, args.height],
    }
    contenders = [streaming_contender(models, args)]
    if not args.skip_baseline:
        contenders.append(baseline_contender(models, args.model, args))
    report.update(race(contenders, args))
    if not args.skip_baseline:
        report["ratios"] = ratios(report["streaming"], report["baseline"])
    states = report["streaming"]["state_bytes"]
    if "1000" in states:
        report["streaming_state_flat_from_1000"] = (
            abs(states[str(args.frames)] - states["1000"]) <= 0.05 * states["1000"]
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
