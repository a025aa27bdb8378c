"""Made-up tracked objects: ellipses of varied sizes gliding over the frame, for the pass-through tracker.

They stand in for a model's output when measuring the pipeline (``--passthrough-objects N``): masks
travel the wire, get composited and encoded as a real model's would, with no model cost. Object ``k``
is the same ellipse on every run (a pure function of the frame index), and objects overlap now and then.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from models import ObjectResult
from streamer.masks import BoxMask

# Golden-ratio steps spread the objects' sizes, speeds and phases evenly without repeating.
_GOLDEN = (math.sqrt(5) - 1) / 2
LABEL = "object"


def moving_object_masks(count: int, frame_index: int, width: int, height: int) -> list[tuple[int, BoxMask]]:
    """``(obj_id, mask by its box)`` of ``count`` ellipses on frame ``frame_index`` of a ``width x height`` feed.

    Radii run from about 3% to 18% of the frame's shorter side; each object glides on its own Lissajous
    path (periods of 4 to 12 s at 30 fps) and may leave the frame partly, never wholly.
    """
    unit = min(width, height)
    t = frame_index / 30.0
    out = []
    for k in range(count):
        spread = (k * _GOLDEN) % 1.0
        radius_x = max(2, round(unit * (0.03 + 0.15 * spread)))
        radius_y = max(2, round(radius_x * (0.6 + 0.8 * ((k * _GOLDEN * 2) % 1.0))))
        period_x, period_y = 4.0 + 8.0 * spread, 5.0 + 7.0 * ((spread + 0.37) % 1.0)
        cx = round(width * (0.5 + 0.45 * math.sin(2 * math.pi * t / period_x + 2.1 * k)))
        cy = round(height * (0.5 + 0.45 * math.sin(2 * math.pi * t / period_y + 1.3 * k)))
        x0, y0 = max(cx - radius_x, 0), max(cy - radius_y, 0)
        x1, y1 = min(cx + radius_x + 1, width), min(cy + radius_y + 1, height)
        crop = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        angle = 30.0 * k + 20.0 * t
        cv2.ellipse(crop, (cx - x0, cy - y0), (radius_x, radius_y), angle, 0, 360, 1, thickness=-1)
        tight = BoxMask.from_full(crop.view(bool))
        if tight is not None:
            out.append((k, BoxMask(x0 + tight.x0, y0 + tight.y0, tight.mask)))
    return out


def moving_objects(count: int, frame_index: int, width: int, height: int) -> list[ObjectResult]:
    """:func:`moving_object_masks` as a tracker reports them: full-frame masks, tight boxes, label ``object``."""
    return [
        ObjectResult(
            obj_id=obj_id,
            score=round(0.6 + 0.39 * ((obj_id * _GOLDEN) % 1.0), 2),
            bbox=region.box,
            mask=region.full(height, width),
            label=LABEL,
        )
        for obj_id, region in moving_object_masks(count, frame_index, width, height)
    ]
