#!/usr/bin/env python
"""Measure a model on held-out generated sequences with the streaming tracker at default settings.

For each seed: a generated scene (``--frames`` frames at ``--width`` x ``--height``); one click and
one box per object on five still frames (single-frame IoU); one click per object on the first frame
it clearly shows, tracked to the end (J&F, identity); then, unless
``--no-text``, each shape word as a text prompt from the first frame (per-frame instance recall and
precision at mask IoU 0.5, mean IoU of the matched instances). Prints one JSON line per sequence to
stderr and one JSON object as the last line of stdout: per-sequence figures, their means, and the
issue's bars with whether each is met.

Seeds: training uses 10**6 and up, the trainer's validation 500-531 and the test suite 0-99; the
default here, 1000-1004, is held out from all of them.

    python scripts/eval_demo.py                                    # demo model, 5 sequences x 300 frames
    python scripts/eval_demo.py --seeds 2000-2009 --no-text
    python scripts/eval_demo.py --model runs/demo/clip/best --frames 120
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from models.demo_eval import evaluate_clicks, evaluate_single_frames, evaluate_text
from models.demo_scenes import SHAPES, DemoScene
from models.loading import load_models

BARS = {
    "single_frame_click_iou": 0.8,
    "clicks_jf": 0.85,
    "text_recall": 0.9,
    "text_precision": 0.9,
    "text_matched_iou": 0.8,
}


def parse_seeds(text: str) -> list[int]:
    """``"1000-1004"`` or ``"7,9,12"`` (or a mix) -> seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            lo, hi = part.split("-", 1)
            seeds.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo (default), a local folder, or a hub id")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds("1000-1004"))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--words", default=",".join(SHAPES), help="comma-separated text prompts")
    parser.add_argument("--no-text", action="store_true", help="only the click task")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _pooled(runs: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    instances, preds, matched = (sum(r[k] for r in runs) for k in ("instances", "predictions", "matched"))
    iou_sum = sum(r["matched_iou_sum"] for r in runs)
    return {
        f"{prefix}recall": matched / instances if instances else float("nan"),
        f"{prefix}precision": matched / preds if preds else float("nan"),
        f"{prefix}matched_iou": iou_sum / matched if matched else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_models(args.model, device="cpu")
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    sequences: list[dict[str, Any]] = []
    still_ious: dict[str, list[float]] = {"click": [], "box": []}  # every object of every still frame
    for seed in args.seeds:
        scene = DemoScene.random(seed, args.width, args.height, args.fps)
        entry: dict[str, Any] = {"seed": seed, "frames": args.frames}
        stills = list(range(0, args.frames, max(1, args.frames // 5)))[:5]
        for prompt in ("click", "box"):
            single = evaluate_single_frames(models, scene, stills, prompt)
            still_ious[prompt] += single.pop("ious")
            entry[f"single_frame_{prompt}"] = single
        clicks = evaluate_clicks(models, scene, args.frames)
        entry["clicks"] = {k: v for k, v in clicks.items() if k != "per_object"}
        if not args.no_text:
            entry["text"] = {word: evaluate_text(models, scene, args.frames, word) for word in words}
        print(json.dumps(entry), file=sys.stderr, flush=True)
        sequences.append(entry)
    summary: dict[str, Any] = {
        # Pooled over every object of every still frame.
        "single_frame_click_iou": _mean(still_ious["click"]),
        "single_frame_box_iou": _mean(still_ious["box"]),
        "clicks_jf": _mean([s["clicks"]["jf"] for s in sequences]),
        "clicks_j": _mean([s["clicks"]["j"] for s in sequences]),
        "clicks_f": _mean([s["clicks"]["f"] for s in sequences]),
        "clicks_found_under_own_id": _mean([s["clicks"]["found_under_own_id"] for s in sequences]),
        "clicks_ms_per_frame_median": _mean([s["clicks"]["ms_per_frame_median"] for s in sequences]),
    }
    if not args.no_text:
        # Pooled over every frame of every sequence (a word absent from a sequence adds nothing).
        texts = [t for s in sequences for t in s["text"].values()]
        summary.update(_pooled(texts, "text_"))
        summary["text_by_word"] = {word: _pooled([s["text"][word] for s in sequences]) for word in words}
    bars = {
        name: {"bar": bar, "measured": summary[name], "met": bool(summary[name] >= bar)}
        for name, bar in BARS.items()
        if name in summary
    }
    print(
        json.dumps(
            {
                "model": args.model,
                "size": [args.width, args.height],
                "sequences": sequences,
                "summary": summary,
                "bars": bars,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
