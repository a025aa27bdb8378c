"""What the tracker hands back for each frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ObjectResult:
    """One tracked object on one frame.

    ``bbox`` is pixel ``(x0, y0, x1, y1)`` with exclusive right/bottom edges, ``mask`` a boolean
    ``H x W`` array at the frame's own resolution, ``label`` the text prompt that found the object
    (``None`` for objects made from clicks or boxes).
    """

    obj_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    label: str | None = None


@dataclass
class FrameResult:
    """All objects on one frame, with the caller's timestamp passed through and stage timings (seconds)."""

    frame_index: int
    timestamp: float | None
    width: int
    height: int
    objects: list[ObjectResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def by_id(self) -> dict[int, ObjectResult]:
        return {obj.obj_id: obj for obj in self.objects}

    def mask_ious(self, reference: FrameResult) -> dict[int, float]:
        """Per object id (of either result), the IoU of this result's mask with ``reference``'s.

        An object present in only one of them scores 0. Compares two runs of the same stream, e.g.
        one encoder backend against another.
        """
        ours, theirs = self.by_id(), reference.by_id()
        return {
            obj_id: mask_iou(ours[obj_id].mask, theirs[obj_id].mask) if obj_id in ours and obj_id in theirs else 0.0
            for obj_id in sorted(ours.keys() | theirs.keys())
        }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


class MaskAgreement:
    """How closely one run of a stream follows another (e.g. an encoder backend against torch fp32).

    Per object: IoU over the whole stream (intersections and unions summed over frames, so a pixel
    flipping on a small object in one frame weighs what it weighs), plus the worst single frame and
    the frames whose object ids differ.
    """

    def __init__(self) -> None:
        self._counts: dict[int, list[int]] = {}  # obj_id -> [intersection, union] pixels
        self.frames = 0
        self.id_mismatches = 0
        self.worst_frame_iou = 1.0

    def add(self, ours: FrameResult, reference: FrameResult) -> dict[int, float]:
        """Compare one frame's results; returns that frame's IoU per object."""
        self.frames += 1
        ious = ours.mask_ious(reference)
        self.id_mismatches += sorted(ours.by_id()) != sorted(reference.by_id())
        self.worst_frame_iou = min(self.worst_frame_iou, *ious.values(), 1.0)
        mine, theirs = ours.by_id(), reference.by_id()
        for obj_id in ious:
            a, b = mine.get(obj_id), theirs.get(obj_id)
            counts = self._counts.setdefault(obj_id, [0, 0])
            if a is not None and b is not None:
                counts[0] += int(np.count_nonzero(a.mask & b.mask))
                counts[1] += int(np.count_nonzero(a.mask | b.mask))
            else:  # in one run only: all of its pixels are disagreement
                counts[1] += int(np.count_nonzero((a if a is not None else b).mask))  # type: ignore[union-attr]
        return ious

    def per_object(self) -> dict[int, float]:
        """IoU over the stream per object id (1.0 for an object that was empty in both runs)."""
        return {obj_id: inter / union if union else 1.0 for obj_id, (inter, union) in sorted(self._counts.items())}
