#!/usr/bin/env python
"""Train the ``demo`` model (a small ``Sam3VideoModel``) on generated shape scenes, in stages.

- ``point``: the point/box tracker on single frames: simulated clicks, noisy boxes and correction
  clicks; SAM's losses (20 x focal + dice on the best of the output masks, L1 on the IoU head, BCE
  on the object score). Trains the shared ViT, the tracker's neck, prompt encoder and mask decoder.
- ``clip``: short clips through transformers' own video tracking code with the memory in the loop
  (memory attention, memory encoder, object pointers, occlusion scores); starts from ``point``.
- ``text``: the detector (text encoder, DETR encoder/decoder, heads) with the ViT frozen: matching
  over queries with classification, presence, box (L1 + GIoU) and mask losses; starts from ``clip``.

Runs are resumable (``--resume`` continues ``<run-dir>/checkpoint.pt``) and deterministic given
``--seed`` (the scenes of step ``k`` depend only on the seed and ``k``). Training scenes use seeds
from 10**6 on; validation uses seeds 500-531; tests and ``scripts/eval_demo.py`` use others.
Every ``--eval-every`` steps it prints validation figures and keeps the best weights in
``<run-dir>/best`` (a ``from_pretrained`` folder with the tokenizer).

    nohup nice -n 19 python scripts/train_demo.py --stage point --steps 6000 > runs/demo/point.log 2>&1 &
    python scripts/train_demo.py --stage point --resume            # continue after a stop
    python scripts/train_demo.py --stage clip --init runs/demo/point/best
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer, Sam3TrackerVideoModel, Sam3VideoModel
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

from models import hf_internals as hf
from models.demo_eval import evaluate_clicks
from models.demo_metrics import InstanceCounts, error_click, match_instances
from models.demo_scenes import SHAPES, DemoScene, SceneFrame
from models.loading import DEMO_CARD, DEMO_FOLDER, Sam3Models
from models.preprocess import frame_to_pixels
from models.results import mask_iou
from models.sessions import add_object_inputs, point_inputs
from models.tiny import DEMO, demo_video_config, small_tokenizer

STAGES = ("point", "clip", "text")
TRAIN_SEED_BASE = 10**6
VALIDATION_SEEDS = range(500, 532)
FOCAL_WEIGHT = 20.0  # SAM's mask loss weights: 20 x focal + 1 x dice (+ 1 x IoU, + 1 x object score)
# Masks are supervised at twice the decoder's 64 x 64 output: finer than the logits, cheaper than 224.
LOSS_SIZE = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default="point")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo/<stage>")
    parser.add_argument("--resume", action="store_true", help="continue <run-dir>/checkpoint.pt")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (a best/ folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=8, help="frames per step")
    parser.add_argument("--objects", type=int, default=3, help="prompted objects per frame (point stage)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 matmuls (bf16 autocast: 1.5x)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--val-frames", type=int, default=32)
    parser.add_argument("--clip-frames", type=int, default=6, help="frames per clip (clip stage)")
    parser.add_argument("--point-every", type=int, default=0, help="clip stage: every k-th step is a point step")
    parser.add_argument("--freeze-vit", action="store_true", help="clip stage: keep the shared ViT as it is")
    parser.add_argument("--reinit-memory", action="store_true", help="clip stage from --init: fresh memory path")
    parser.add_argument(
        "--trained-lr-scale", type=float, default=1.0, help="clip stage: lr factor of modules the point stage trained"
    )
    parser.add_argument("--val-sequences", type=int, default=3, help="held-out sequences tracked (clip stage)")
    parser.add_argument("--val-length", type=int, default=60, help="frames per held-out sequence (clip stage)")
    parser.add_argument(
        "--ship",
        type=Path,
        default=None,
        help="copy these weights (a best/ folder) into the package as the demo model, trained up to --stage, and exit",
    )
    parser.add_argument("--detector", type=Path, default=None, help="with --ship: the text detector from these weights")
    args = parser.parse_args(argv)
    if args.run_dir is None:
        args.run_dir = Path("runs/demo") / args.stage
    return args


# ----------------------------------------------------------------------------------------- data


class ScenePool:
    """A deterministic, slowly refreshed pool of training scenes (building one costs ~0.1 s).

    Slot ``j`` holds generation ``(step + j * period) // (slots * period)``: each slot changes once
    every ``slots * period`` steps, staggered, so the pool at any step depends only on the step.
    """

    def __init__(self, seed: int, slots: int = 24, period: int = 4) -> None:
        self.seed, self.slots, self.period = seed, slots, period
        self._cache: dict[int, DemoScene] = {}

    def scene(self, slot: int, step: int) -> DemoScene:
        generation = (step + slot * self.period) // (self.slots * self.period)
        scene_seed = TRAIN_SEED_BASE + (self.seed * 1000 + generation) * self.slots + slot
        if scene_seed not in self._cache:
            if len(self._cache) > 2 * self.slots:
                self._cache.pop(next(iter(self._cache)))
            self._cache[scene_seed] = DemoScene.random(scene_seed)
        return self._cache[scene_seed]

    def frames(self, step: int, count: int, rng: np.random.Generator) -> list[tuple[DemoScene, SceneFrame]]:
        out = []
        for _ in range(count):
            scene = self.scene(int(rng.integers(self.slots)), step)
            out.append((scene, scene.frame(int(rng.integers(0, 3600)))))
        return out


def to_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Frames -> ``B x 3 x S x S`` model input, exactly as the streaming tracker prepares them."""
    return torch.cat([frame_to_pixels(im, size, torch.device("cpu"), torch.float32) for im in images])


def mask_at(mask: np.ndarray, size: int) -> np.ndarray:
    """A frame-sized boolean mask resized to the model's ``S x S`` input (area-weighted, then > 0.5)."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5


# -------------------------------------------------------------------------------- model pieces


def tracker_feature_maps(model: Sam3VideoModel, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The tracker's three feature maps (finest first) with gradients, as ``FrameFeatures.tracker`` lays them out
    before flattening: ``conv_s0`` / ``conv_s1`` applied, the coarsest level last."""
    tokens = model.detector_model.vision_encoder.backbone(pixels).last_hidden_state
    side = int(math.isqrt(tokens.shape[1]))
    spatial = tokens.view(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
    decoder = model.tracker_model.mask_decoder
    maps = [layer(spatial) for layer in model.tracker_neck.fpn_layers[:-1]]
    return [decoder.conv_s0(maps[0]), decoder.conv_s1(maps[1]), maps[2]]


@contextmanager
def plain_single_mask(model: Sam3VideoModel) -> Iterator[None]:
    """Single-mask outputs use token 0 (SAM's training), not the inference-time stability fallback."""
    decoder = model.tracker_model.mask_decoder
    saved = decoder.dynamic_multimask_via_stability
    decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        decoder.dynamic_multimask_via_stability = saved


def decode_first_frame(
    model: Sam3VideoModel,
    maps: list[torch.Tensor],
    image_index: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder on a first (no-memory) frame, one prompt per row.

    ``coords`` ``N x P x 2`` (model pixels), ``labels`` ``N x P`` (-10 pads). Returns mask logits
    ``N x M x h x w``, predicted IoUs ``N x M`` and object-score logits ``N``.
    """
    tracker = model.tracker_model
    n = coords.shape[0]
    # A first frame adds the "no memory" embedding to the coarsest map, as transformers' tracker does.
    coarse = maps[2][image_index] + tracker.no_memory_embedding.view(1, -1, 1, 1)
    high_res = [maps[0][image_index], maps[1][image_index]]
    sparse, dense = tracker.prompt_encoder(
        input_points=coords[:, None], input_labels=labels[:, None], input_boxes=None, input_masks=None
    )
    positions = tracker.get_image_wide_positional_embeddings().repeat(n, 1, 1, 1)
    masks, iou, _tokens, scores = tracker.mask_decoder(
        image_embeddings=coarse,
        image_positional_embeddings=positions,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        high_resolution_features=high_res,
    )
    return masks[:, 0], iou[:, 0], scores.reshape(n)


# ---------------------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, truth: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: ``... x H x W`` -> ``...``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    p_t = prob * truth + (1 - prob) * (1 - truth)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * truth + (1 - alpha) * (1 - truth)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(-2)
    truth = truth.flatten(-2)
    return 1 - (2 * (prob * truth).sum(-1) + 1) / (prob.sum(-1) + truth.sum(-1) + 1)


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAM's losses for ``N x M`` candidate masks of ``N`` present objects (``truth`` ``N x S x S`` float).

    Focal and dice count for the candidate with the lowest mask loss; the IoU head learns every
    candidate's true IoU (L1). Logits are upsampled to the input size first, as the model does.
    """
    size = truth.shape[-1]
    up = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    target = truth[:, None].expand_as(up)
    focal, dice = focal_loss(up, target), dice_loss(up, target)
    combined = FOCAL_WEIGHT * focal + dice
    best = combined.argmin(dim=1, keepdim=True)
    with torch.no_grad():
        pred = up > 0
        inter = (pred & (target > 0.5)).flatten(-2).sum(-1).float()
        union = (pred | (target > 0.5)).flatten(-2).sum(-1).float()
        true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {
        "focal": focal.gather(1, best).mean(),
        "dice": dice.gather(1, best).mean(),
        "iou": (iou_pred.float() - true_iou).abs().mean(),
    }


# ------------------------------------------------------------------------------- prompt simulation


def click_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(xs)))
    return float(xs[k]), float(ys[k])


def noisy_box(mask: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The mask's box with each side moved by up to 10 % of its length (SAM's box noise), as two corners."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
    w, h = x1 - x0, y1 - y0
    jitter = rng.normal(0, 0.1, 4).clip(-0.2, 0.2) * np.array([w, h, w, h])
    size = mask.shape[0]
    box = np.clip(np.array([x0, y0, x1, y1]) + jitter, 0, size)
    return [(box[0], box[1]), (max(box[2], box[0] + 1), max(box[3], box[1] + 1))]


def correction_click(pred: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> tuple[float, float, int] | None:
    """A click on the prediction's error: half the time its centre (where a person clicks), else a
    random error pixel; label 1 on a missed part, 0 on a spurious one. ``None`` when there is no error."""
    missed, spurious = truth & ~pred, pred & ~truth
    if not missed.any() and not spurious.any():
        return None
    if rng.random() < 0.5:
        return error_click(pred, truth)
    x, y = click_in(missed | spurious, rng)
    return x, y, int(missed[int(y), int(x)])


def pad_prompts(prompts: list[list[tuple[float, float, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object ``(x, y, label)`` lists -> ``N x P x 2`` coords and ``N x P`` labels (pad label -10)."""
    longest = max(len(p) for p in prompts)
    coords = torch.zeros(len(prompts), longest, 2)
    labels = torch.full((len(prompts), longest), -10, dtype=torch.int32)
    for i, prompt in enumerate(prompts):
        for j, (x, y, label) in enumerate(prompt):
            coords[i, j, 0], coords[i, j, 1], labels[i, j] = x, y, label
    return coords, labels


# -------------------------------------------------------------------------------- point stage


class PointStage:
    """Single frames, up to ``objects`` prompted instances each, a first prompt then a correction."""

    def __init__(self, model: Sam3VideoModel, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.size = DEMO.image_size
        self.scale = DEMO.image_size / LOSS_SIZE  # loss-grid pixels -> model input pixels
        self.pool = ScenePool(args.seed)

    def trainable(self) -> list[torch.nn.Parameter]:
        m = self.model
        modules = [
            m.detector_model.vision_encoder.backbone,
            m.tracker_neck,
            m.tracker_model.prompt_encoder,
            m.tracker_model.mask_decoder,
        ]
        return [p for mod in modules for p in mod.parameters()] + [m.tracker_model.no_memory_embedding]

    def step(self, step: int) -> dict[str, float]:
        args, size = self.args, LOSS_SIZE
        rng = np.random.default_rng([args.seed, step, 1])
        shots = self.pool.frames(step, args.batch, rng)
        pixels = to_pixels([shot.image for _, shot in shots], self.size)
        truths, owners = [], []
        for b, (_scene, shot) in enumerate(shots):
            candidates = [inst for inst in shot.instances if inst.area >= 60]
            rng.shuffle(candidates)
            for inst in candidates[: args.objects]:
                small = mask_at(inst.mask, size)
                if small.sum() >= 4:
                    truths.append(small)
                    owners.append(b)
        if not truths:
            return {}
        truth = torch.from_numpy(np.stack(truths)).float()
        index = torch.tensor(owners)
        # First prompts: a click (multimask, 60 %), a noisy box (25 %) or a box and a click (15 %).
        first: list[list[tuple[float, float, int]]] = []
        for small in truths:
            draw = rng.random()
            prompt = []
            if draw >= 0.6:
                (x0, y0), (x1, y1) = noisy_box(small, rng)
                prompt += [(x0, y0, 2), (x1, y1, 3)]
            if draw < 0.6 or draw >= 0.85:
                prompt.append((*click_in(small, rng), 1))
            first.append(self._to_input(prompt))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()
        losses: dict[str, torch.Tensor] = {}
        with plain_single_mask(self.model), autocast:
            maps = tracker_feature_maps(self.model, pixels)
            single = [i for i, p in enumerate(first) if len(p) == 1]
            multi = [i for i, p in enumerate(first) if len(p) > 1]
            chosen = torch.zeros(len(first), size, size, dtype=torch.bool)
            for rows, multimask in ((single, True), (multi, False)):
                if not rows:
                    continue
                coords, labels = pad_prompts([first[i] for i in rows])
                sel = torch.tensor(rows)
                logits, iou, scores = decode_first_frame(self.model, maps, index[sel], coords, labels, multimask)
                self._add(losses, mask_losses(logits, iou, truth[sel]), scores, len(rows) / len(first))
                with torch.no_grad():  # what inference would show: the candidate with the best predicted IoU
                    pick = logits[torch.arange(len(rows)), iou.argmax(dim=1)].float()
                    chosen[sel] = F.interpolate(pick[:, None], size=(size, size), mode="bilinear")[:, 0] > 0
            # Correction: one more click on the error of what was shown, all clicks given again.
            second, rows = [], []
            for i, small in enumerate(truths):
                click = correction_click(chosen[i].numpy(), small, rng)
                if click is not None and rng.random() < 0.7:
                    second.append(first[i] + self._to_input([click]))
                    rows.append(i)
            if rows:
                coords, labels = pad_prompts(second)
                sel = torch.tensor(rows)
                logits, iou, scores = decode_first_frame(self.model, maps, index[sel], coords, labels, False)
                self._add(losses, mask_losses(logits, iou, truth[sel]), scores, 0.5 * len(rows) / len(first))
        total = sum(losses.values())
        total.backward()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["objects"] = len(truths)
        return out

    def _to_input(self, prompt: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        """Loss-grid positions -> model input coordinates: clicks are pixel indices (their centres), box
        corners (labels 2, 3) are edges already."""
        shift = {0: 0.5, 1: 0.5, 2: 0.0, 3: 0.0}
        return [((x + shift[lab]) * self.scale, (y + shift[lab]) * self.scale, lab) for x, y, lab in prompt]

    @staticmethod
    def _add(losses: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], scores: torch.Tensor, weight: float):
        parts = dict(parts)
        parts["focal"] = FOCAL_WEIGHT * parts["focal"]
        parts["score"] = F.binary_cross_entropy_with_logits(scores.float(), torch.ones_like(scores.float()))
        for key, value in parts.items():
            losses[key] = losses.get(key, 0.0) + weight * value

    @torch.no_grad()
    def validate(self, frames: int) -> dict[str, float]:
        """IoU at the frame's resolution of a centre click and of a box on every object of held-out frames."""
        size = self.size
        results: dict[str, list[float]] = {"click": [], "box": [], "click_60px": [], "click_small": []}
        for k in range(frames):
            scene = DemoScene.random(VALIDATION_SEEDS[k % len(VALIDATION_SEEDS)])
            shot = scene.frame(37 * k)
            height, width = shot.image.shape[:2]
            pixels = to_pixels([shot.image], size)
            maps = tracker_feature_maps(self.model, pixels)
            for inst in shot.instances:
                if inst.area < 200:
                    continue
                x, y = inst.interior_point()
                x0, y0, x1, y1 = inst.bbox()
                sx, sy = size / width, size / height
                prompts = {
                    "click": ([(x * sx, y * sy, 1)], True),
                    "box": ([(x0 * sx, y0 * sy, 2), (x1 * sx, y1 * sy, 3)], False),
                }
                for name, (prompt, multimask) in prompts.items():
                    coords, labels = pad_prompts([prompt])
                    logits, iou, _ = decode_first_frame(
                        self.model, maps, torch.zeros(1, dtype=torch.long), coords, labels, multimask
                    )
                    best = logits[0, int(iou[0].argmax())][None, None].float()
                    pred = F.interpolate(best, size=(height, width), mode="bilinear")[0, 0].numpy() > 0
                    score = mask_iou(pred, inst.mask)
                    results[name].append(score)
                    if name == "click":
                        diameter = scene.object_spec(inst.obj_id).size
                        if 45 <= diameter <= 75:
                            results["click_60px"].append(score)
                        if inst.area < 2500:
                            results["click_small"].append(score)
        summary = {f"val_{k}": float(np.mean(v)) for k, v in results.items() if v}
        summary["val_click_median"] = float(np.median(results["click"]))
        summary["val_objects"] = len(results["click"])
        return summary


# ---------------------------------------------------------------------------------- clip stage

# transformers' tracker runs every frame under inference mode; its undecorated function lets
# gradients reach the memory attention, the memory encoder and the object pointers.
_track_frame = Sam3TrackerVideoModel.forward.__wrapped__


@contextmanager
def recorded_decoder_outputs(tracker: Sam3TrackerVideoModel) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Record every mask-decoder output (all candidate masks, IoU predictions, object scores) while
    transformers' own code drives the tracker, which keeps only the chosen mask."""
    calls: list[tuple[torch.Tensor, ...]] = []
    decoder = tracker.mask_decoder
    original = decoder.forward

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    decoder.forward = forward
    try:
        yield calls
    finally:
        del decoder.forward


def first_prompt(mask: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float, int]]:
    """A click (60 %), a noisy box (25 %) or both (15 %), on the loss grid."""
    draw = rng.random()
    prompt: list[tuple[float, float, int]] = []
    if draw >= 0.6:
        (x0, y0), (x1, y1) = noisy_box(mask, rng)
        prompt += [(x0, y0, 2), (x1, y1, 3)]
    if draw < 0.6 or draw >= 0.85:
        prompt.append((*click_in(mask, rng), 1))
    return prompt


# The tracker's memory path, untrained after the point stage.
MEMORY_MODULES = (
    "memory_attention",
    "memory_encoder",
    "object_pointer_proj",
    "temporal_positional_encoding_projection_layer",
)


def reinit_memory(model: Sam3VideoModel) -> None:
    """PyTorch's default (fan-in scaled) init for the memory path, as SAM 2 starts from.

    transformers' init (normal, std 0.02) shrinks the mask branch of the memory encoder so much that
    every object's memory is nearly the same (3 % apart, measured), and tracking cannot tell them apart.
    """
    for name in MEMORY_MODULES:
        for module in getattr(model.tracker_model, name).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


class ClipStage(PointStage):
    """Short clips: prompts on the first frame, then tracking with the memory, every frame supervised
    (masks and IoU where the object shows, the object score everywhere: SAM's occlusion head)."""

    def trainable(self) -> list[torch.nn.Parameter]:
        m = self.model
        if self.args.freeze_vit:
            # The detector (text stage) trains on this same frozen ViT, in parallel: their weights merge.
            m.detector_model.vision_encoder.backbone.requires_grad_(False)
        memory = {id(p) for name in MEMORY_MODULES for p in getattr(m.tracker_model, name).parameters()}
        modules = [m.tracker_neck, m.tracker_model]
        if not self.args.freeze_vit:
            modules.append(m.detector_model.vision_encoder.backbone)
        params = [p for mod in modules for p in mod.parameters()]
        self.groups = [
            {"params": [p for p in params if id(p) in memory], "scale": 1.0},
            # What the point stage trained learns slower, so single frames stay sharp.
            {"params": [p for p in params if id(p) not in memory], "scale": self.args.trained_lr_scale},
        ]
        return params

    def step(self, step: int) -> dict[str, float]:
        args, size = self.args, LOSS_SIZE
        if args.point_every and step % args.point_every == 0:
            return super().step(step)  # keep the single-frame task sharp while the memory learns
        rng = np.random.default_rng([args.seed, step, 2])
        scene = self.pool.scene(int(rng.integers(self.pool.slots)), step)
        start = int(rng.integers(0, 3000))
        if rng.random() < 0.5:  # consecutive-ish frames
            offsets = np.arange(args.clip_frames) * int(rng.integers(1, 4))
        else:  # spread over up to 2.5 s, so clips hold occlusions, exits and returns
            span = int(rng.integers(args.clip_frames, 76))
            offsets = np.concatenate([[0], np.sort(rng.choice(np.arange(1, span), args.clip_frames - 1, False))])
        shots = [scene.frame(start + int(k)) for k in offsets]
        objects = [inst.obj_id for inst in shots[0].instances if inst.area >= 300]
        rng.shuffle(objects)
        objects = objects[: args.objects]
        if not objects:
            return {}
        truths = []
        for shot in shots:
            present = shot.by_id()
            truths.append(
                [mask_at(present[o].mask, size) if o in present else np.zeros((size, size), bool) for o in objects]
            )
        tracker = self.model.tracker_model
        pixels = to_pixels([shot.image for shot in shots], self.size)
        session = Sam3TrackerVideoInferenceSession(inference_device="cpu", dtype=torch.float32)
        first = {}
        for k, small in enumerate(truths[0]):
            prompt = self._to_input(first_prompt(small, rng))
            first[k] = point_inputs([[x, y] for x, y, _ in prompt], [lab for _, _, lab in prompt], pixels.device)
        add_object_inputs(session, 0, first)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()
        losses: dict[str, torch.Tensor] = {}
        weight = 1.0 / (len(shots) * len(objects))
        with plain_single_mask(self.model), autocast, recorded_decoder_outputs(tracker) as calls:
            maps = tracker_feature_maps(self.model, pixels)
            neck = self.model.tracker_neck
            positions = [
                neck.position_encoding(m[:1].shape, m.device, m.dtype).flatten(2).permute(2, 0, 1) for m in maps
            ]
            for t in range(len(shots)):
                feats = [m[t : t + 1].flatten(2).permute(2, 0, 1) for m in maps]
                hf.cache_tracker_features(session, t, {"vision_feats": feats, "vision_pos_embeds": positions})
                _track_frame(tracker, inference_session=session, frame_idx=t, frame=pixels[t : t + 1])
                for k, (masks, iou, _tokens, score) in enumerate(calls[-len(objects) :]):
                    truth = torch.from_numpy(truths[t][k])[None].float()
                    present = bool(truths[t][k].any())
                    part: dict[str, torch.Tensor] = {}
                    if present:
                        part = mask_losses(masks[:, 0], iou[:, 0], truth)
                        part["focal"] = FOCAL_WEIGHT * part["focal"]
                    target = torch.full_like(score.float().reshape(1), float(present))
                    part["score"] = F.binary_cross_entropy_with_logits(score.float().reshape(1), target)
                    for key, value in part.items():
                        losses[key] = losses.get(key, 0.0) + weight * value
        total = sum(losses.values())
        total.backward()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["objects"] = len(objects)
        return out

    @torch.no_grad()
    def validate(self, frames: int) -> dict[str, float]:
        """Single-frame click IoU (as the point stage) and J&F of held-out sequences tracked live."""
        summary = super().validate(frames)
        bundle = Sam3Models(self.model, small_tokenizer(DEMO.words), torch.device("cpu"), torch.float32, "training")
        runs = [
            evaluate_clicks(bundle, DemoScene.random(seed), self.args.val_length)
            for seed in VALIDATION_SEEDS[: self.args.val_sequences]
        ]
        summary["val_jf"] = float(np.mean([r["jf"] for r in runs]))
        summary["val_found_under_own_id"] = float(np.mean([r["found_under_own_id"] for r in runs]))
        return summary


# ---------------------------------------------------------------------------------- text stage

# DETR's matching and loss weights (class 2, box L1 5, GIoU 2), as SAM 3's detector is trained.
CLASS_COST, L1_COST, GIOU_COST = 2.0, 5.0, 2.0


def box_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU of ``N x 4`` and ``M x 4`` corner boxes -> ``N x M``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    hull_area = hull.prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=1e-6)


def match_queries(logits: torch.Tensor, boxes: torch.Tensor, truth_boxes: torch.Tensor) -> tuple[list[int], list[int]]:
    """Hungarian matching of ``Q`` queries to ``G`` true boxes; returns (query indices, truth indices)."""
    from scipy.optimize import linear_sum_assignment

    if truth_boxes.shape[0] == 0:
        return [], []
    with torch.no_grad():
        prob = logits.float().sigmoid()
        # Focal-style class cost, as in Deformable DETR.
        pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
        cost = CLASS_COST * (pos - neg)[:, None]
        cost = cost + L1_COST * torch.cdist(boxes.float(), truth_boxes, p=1)
        cost = cost - GIOU_COST * box_giou(boxes.float(), truth_boxes)
    rows, cols = linear_sum_assignment(cost.numpy())
    return rows.tolist(), cols.tolist()


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise sigmoid focal loss (alpha 0.25, gamma 2)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    return (0.25 * target + 0.75 * (1 - target)) * ce * (1 - p_t) ** 2


class TextStage(PointStage):
    """The detector on single frames: a shape word (present or absent), every instance of it to find.

    The ViT is frozen (the tracker is trained on it); the detector's neck, text encoder, DETR
    encoder and decoder, presence, box and mask heads learn.
    """

    def __init__(self, model: Sam3VideoModel, args: argparse.Namespace) -> None:
        super().__init__(model, args)
        self.tokenizer = with_tokenizer(model)

    def trainable(self) -> list[torch.nn.Parameter]:
        frozen = {id(p) for p in self.model.detector_model.vision_encoder.backbone.parameters()}
        return [p for p in self.model.detector_model.parameters() if id(p) not in frozen]

    def detect(self, pixels: torch.Tensor, words: list[str]) -> Any:
        """The detector's outputs for each frame and its word (vision tokens computed without gradients)."""
        detector = self.model.detector_model
        with torch.no_grad():
            tokens = detector.vision_encoder.backbone(pixels).last_hidden_state
        side = int(math.isqrt(tokens.shape[1]))
        spatial = tokens.view(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
        fpn, fpn_pos = detector.vision_encoder.neck(spatial)
        vision = Sam3VisionEncoderOutput(last_hidden_state=tokens, fpn_hidden_states=fpn, fpn_position_encoding=fpn_pos)
        text = self.tokenizer(words, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
        return detector(vision_embeds=vision, input_ids=text.input_ids, attention_mask=text.attention_mask)

    def step(self, step: int) -> dict[str, float]:
        args, size = self.args, LOSS_SIZE
        rng = np.random.default_rng([args.seed, step, 3])
        shots = self.pool.frames(step, args.batch, rng)
        words, targets = [], []
        for _scene, shot in shots:
            present = sorted({inst.kind for inst in shot.instances if inst.area >= 100})
            absent = [k for k in SHAPES if k not in present]
            word = (
                present[int(rng.integers(len(present)))]
                if present and (rng.random() < 0.75 or not absent)
                else (absent[int(rng.integers(len(absent)))])
            )
            words.append(word)
            small = [mask_at(inst.mask, size) for inst in shot.of_kind(word) if inst.area >= 30]
            targets.append([m for m in small if m.any()])  # slivers vanish at the loss grid's size
        pixels = to_pixels([shot.image for _, shot in shots], self.size)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()
        with autocast:
            out = self.detect(pixels, words)
        logits, boxes = out.pred_logits.float(), out.pred_boxes.float()
        masks, presence = out.pred_masks.float(), out.presence_logits.float().reshape(-1)
        num_truths = max(1, sum(len(t) for t in targets))
        losses = {k: torch.zeros(()) for k in ("class", "presence", "l1", "giou", "focal", "dice")}
        for b, truth in enumerate(targets):
            truth_masks = torch.from_numpy(np.stack(truth)).float() if truth else torch.zeros(0, size, size)
            truth_boxes = _boxes_of(truth_masks, size)
            rows, cols = match_queries(logits[b], boxes[b], truth_boxes)
            target = torch.zeros_like(logits[b])
            target[rows] = 1.0
            losses["class"] = losses["class"] + sigmoid_focal(logits[b], target).sum() / num_truths
            losses["presence"] = losses["presence"] + F.binary_cross_entropy_with_logits(
                presence[b], torch.tensor(float(bool(truth)))
            ) / len(targets)
            if rows:
                matched = boxes[b][rows]
                goal = truth_boxes[cols]
                losses["l1"] = losses["l1"] + (matched - goal).abs().sum() / num_truths
                losses["giou"] = losses["giou"] + (1 - torch.diag(box_giou(matched, goal))).sum() / num_truths
                up = F.interpolate(masks[b][rows][:, None], size=(size, size), mode="bilinear")[:, 0]
                goal_masks = truth_masks[cols]
                losses["focal"] = losses["focal"] + focal_loss(up, goal_masks).sum() / num_truths
                losses["dice"] = losses["dice"] + dice_loss(up, goal_masks).sum() / num_truths
        weights = {
            "class": CLASS_COST,
            "presence": 1.0,
            "l1": L1_COST,
            "giou": GIOU_COST,
            "focal": FOCAL_WEIGHT,
            "dice": 1.0,
        }
        total = sum(weights[k] * v for k, v in losses.items())
        total.backward()
        out_losses = {k: float(v.detach()) for k, v in losses.items()}
        out_losses["instances"] = sum(len(t) for t in targets)
        return out_losses

    @torch.no_grad()
    def validate(self, frames: int) -> dict[str, float]:
        """Per word and held-out frame: detections scoring above 0.5 (class x presence, as the video model
        keeps them) matched to the true instances at mask IoU 0.5."""
        counts = InstanceCounts()
        threshold = self.model.config.score_threshold_detection
        for k in range(frames):
            scene = DemoScene.random(VALIDATION_SEEDS[k % len(VALIDATION_SEEDS)])
            shot = scene.frame(37 * k)
            height, width = shot.image.shape[:2]
            pixels = to_pixels([shot.image] * len(SHAPES), self.size)
            out = self.detect(pixels, list(SHAPES))
            probs = out.pred_logits.sigmoid() * out.presence_logits.sigmoid().reshape(-1, 1)
            for w, word in enumerate(SHAPES):
                keep = probs[w] > threshold
                preds = []
                if keep.any():
                    up = F.interpolate(out.pred_masks[w][keep][:, None].float(), size=(height, width), mode="bilinear")
                    preds = list((up[:, 0] > 0).numpy())
                counts.add(match_instances(preds, [inst.mask for inst in shot.of_kind(word)]))
        f1 = 2 * counts.recall * counts.precision / max(counts.recall + counts.precision, 1e-9)
        return {
            "val_recall": counts.recall,
            "val_precision": counts.precision,
            "val_matched_iou": counts.mean_iou,
            "val_f1": f1,
            "val_instances": counts.truths,
        }


def _boxes_of(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``N x S x S`` masks -> ``N x 4`` normalized corner boxes."""
    out = torch.zeros(masks.shape[0], 4)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        out[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() / size
    return out


# ------------------------------------------------------------------------------------ the run


def new_model(seed: int) -> Sam3VideoModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3VideoModel(demo_video_config())
    # transformers' tracker crashes in training mode; nothing here needs it (no BatchNorm; dropout off).
    return model.eval()


def with_tokenizer(model: Sam3VideoModel) -> CLIPTokenizer:
    """The demo tokenizer, its special-token ids written into the model's text config (ids of runs made
    with an older vocabulary may differ; the text encoder is only trained in the text stage)."""
    tokenizer = small_tokenizer(DEMO.words)
    text_encoder = model.detector_model.text_encoder
    for config in {id(c): c for c in (model.config.detector_config.text_config, text_encoder.config)}.values():
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    text_encoder.text_model.eos_token_id = tokenizer.eos_token_id
    return tokenizer


def export(model: Sam3VideoModel, folder: Path) -> None:
    """Write a ``from_pretrained`` folder: config, safetensors weights and the tokenizer."""
    tmp = folder.with_name(folder.name + ".tmp")
    tokenizer = with_tokenizer(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def ship(source: Path, stages: list[str], detector: Path | None = None, folder: Path = DEMO_FOLDER) -> None:
    """Copy trained weights into the package as the ``demo`` model: fp16 safetensors (half the bytes; loaded
    back as fp32 on CPU), config, tokenizer and a card naming the stages trained.

    ``detector``: take the text detector from these weights instead (a text stage trained in parallel on
    the same frozen ViT; refused when their ViTs differ)."""
    model = Sam3VideoModel.from_pretrained(str(source)).eval()
    if detector is not None:
        theirs = Sam3VideoModel.from_pretrained(str(detector)).detector_model.state_dict()
        mine = model.detector_model.state_dict()
        differ = [k for k in mine if k.startswith("vision_encoder.backbone.") and not torch.equal(mine[k], theirs[k])]
        if differ:
            raise SystemExit(f"--detector {detector}: its ViT differs from {source}'s ({differ[0]}, ...)")
        model.detector_model.load_state_dict(theirs)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    tokenizer = with_tokenizer(model)
    model.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / DEMO_CARD).write_text(json.dumps({"stages": stages, "source": str(source)}, indent=2) + "\n")
    print(f"shipped {source} as the demo model in {folder} (stages: {', '.join(stages)})", flush=True)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ship is not None:
        stages = ["point", "clip", "text"] if args.detector else list(STAGES[: STAGES.index(args.stage) + 1])
        ship(args.ship, stages, args.detector)
        return 0
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    model = new_model(args.seed)
    if args.init is not None and not args.resume:
        model = Sam3VideoModel.from_pretrained(str(args.init)).eval()
        if args.reinit_memory:
            reinit_memory(model)
    stage = {"point": PointStage, "clip": ClipStage, "text": TextStage}[args.stage](model, args)
    params = stage.trainable()
    groups = getattr(stage, "groups", [{"params": params, "scale": 1.0}])
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    start, best = 0, -1.0
    if args.resume:
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = state["step"], state["best"]
        print(f"resumed {checkpoint_path} at step {start} (best {best:.4f})", flush=True)

    def save(step: int) -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "best": best,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
            tmp,
        )
        os.replace(tmp, checkpoint_path)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    metrics = (run_dir / "metrics.jsonl").open("a")
    print(
        f"stage {args.stage}: steps {start}..{args.steps}, batch {args.batch}, lr {args.lr}, bf16 {args.bf16}, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters",
        flush=True,
    )
    window: dict[str, list[float]] = {}
    clock = time.time()
    step = start
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step) * group.get("scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        parts = stage.step(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for key, value in parts.items():
            window.setdefault(key, []).append(value)
        done = step + 1
        if done % args.log_every == 0:
            elapsed = time.time() - clock
            line = {k: round(float(np.mean(v)), 4) for k, v in window.items()}
            line.update(
                step=done, lr=round(learning_rate(args, step), 6), s_per_step=round(elapsed / args.log_every, 2)
            )
            print(json.dumps(line), flush=True)
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            window, clock = {}, time.time()
        if done % args.eval_every == 0 or done == args.steps:
            figures = stage.validate(args.val_frames)
            key = {"point": "val_click", "clip": "val_jf", "text": "val_f1"}[args.stage]
            improved = figures.get(key, 0.0) > best
            if improved:
                best = figures[key]
                export(model, run_dir / "best")
            figures.update(step=done, best=round(best, 4), exported=improved)
            print(
                "VALIDATION " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}),
                flush=True,
            )
            metrics.write(json.dumps(figures) + "\n")
            metrics.flush()
            clock = time.time()
        if done % args.save_every == 0 or stopping:
            save(done)
        if stopping:
            print(f"stopped at step {done} (SIGTERM); resume with --resume", flush=True)
            return 0
    save(args.steps)
    print(f"finished {args.steps} steps; best {best:.4f}; weights in {run_dir / 'best'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
