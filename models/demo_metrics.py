"""Accuracy measures for the generated scenes: mask IoU, DAVIS-style J&F, per-frame instance recall/precision.

numpy and OpenCV only. J is the mask IoU; F the boundary F-measure with DAVIS's tolerance (0.8 % of
the image diagonal); an empty prediction of an absent object scores 1 on both, as in DAVIS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.results import mask_iou

BOUNDARY_TOLERANCE = 0.008  # of the image diagonal (DAVIS)
# Ground-truth instances with fewer visible pixels (a sliver entering the frame, an object almost
# fully hidden) are not required to be found, and finding them is not a false positive.
MIN_INSTANCE_AREA = 200


def error_click(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """Where a person would click to correct ``pred``: the centre of its largest error (the pixel
    farthest inside a missed or spurious region). Returns ``(x, y, label)`` with label 1 on a missed
    part, 0 on a spurious one; ``None`` when the masks agree."""
    best: tuple[float, int, int, int] | None = None
    for region, label in ((truth & ~pred, 1), (pred & ~truth, 0)):
        if region.any():
            distance = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
            if best is None or distance[y, x] > best[0]:
                best = (float(distance[y, x]), int(x), int(y), label)
    return None if best is None else best[1:]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a boolean mask (pixels of the mask with a neighbour outside it)."""
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT)).astype(bool)


def boundary_f(pred: np.ndarray, truth: np.ndarray) -> float:
    """DAVIS boundary F-measure; 1.0 when both masks are empty, 0.0 when only one is."""
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    height, width = truth.shape
    radius = max(1, math.ceil(BOUNDARY_TOLERANCE * math.hypot(height, width)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    pb, tb = _boundary(pred), _boundary(truth)
    near_truth = cv2.dilate(tb.astype(np.uint8), disk).astype(bool)
    near_pred = cv2.dilate(pb.astype(np.uint8), disk).astype(bool)
    precision = (pb & near_truth).sum() / max(pb.sum(), 1)
    recall = (tb & near_pred).sum() / max(tb.sum(), 1)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


@dataclass
class TrackScores:
    """J and F of one object over the frames it was tracked on."""

    j: list[float]
    f: list[float]

    @property
    def jf(self) -> float:
        return (float(np.mean(self.j)) + float(np.mean(self.f))) / 2 if self.j else float("nan")


def track_scores(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> TrackScores:
    """J and F per frame for one object (``None``-free boolean masks, absent = all false)."""
    return TrackScores(
        [mask_iou(p, t) for p, t in zip(preds, truths, strict=True)],
        [boundary_f(p, t) for p, t in zip(preds, truths, strict=True)],
    )


@dataclass
class InstanceCounts:
    """Per-frame instance matching at IoU 0.5, summed over frames."""

    truths: int = 0
    preds: int = 0
    matched: int = 0
    matched_iou: float = 0.0

    def add(self, other: InstanceCounts) -> None:
        self.truths += other.truths
        self.preds += other.preds
        self.matched += other.matched
        self.matched_iou += other.matched_iou

    @property
    def recall(self) -> float:
        return self.matched / self.truths if self.truths else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.preds if self.preds else 1.0

    @property
    def mean_iou(self) -> float:
        return self.matched_iou / self.matched if self.matched else 0.0


def match_instances(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], min_area: int = MIN_INSTANCE_AREA
) -> InstanceCounts:
    """Match predicted to true instance masks of one frame (IoU > 0.5 makes every match unique).

    Truths under ``min_area`` pixels are optional: matching one is neither a hit nor a false positive.
    """
    counts = InstanceCounts()
    required = [bool(t.sum() >= min_area) for t in truths]
    counts.truths = int(sum(required))
    for pred in preds:
        ious = [mask_iou(pred, t) for t in truths]
        best = int(np.argmax(ious)) if ious else -1
        if best >= 0 and ious[best] > 0.5:
            if required[best]:
                counts.preds += 1
                counts.matched += 1
                counts.matched_iou += ious[best]
        else:
            counts.preds += 1
    return counts
