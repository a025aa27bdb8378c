"""Draw tracker results onto the frame they were computed for.

Pure numpy/OpenCV, RGB in and RGB out. The work per object is confined to the bounding box of
its mask, so the cost grows with the area the objects cover, not with the frame size: a 720p
frame with a handful of objects composites in a few milliseconds on one core.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

# Colour-blind friendly, high-contrast RGB colours (Okabe-Ito + Tableau picks); the id picks one,
# so an object keeps its colour for its whole life and in every viewer.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (255, 99, 132),
    (148, 103, 189),
    (23, 190, 207),
    (188, 189, 34),
    (255, 255, 255),
)

BANNER_BACKGROUND = (24, 26, 32)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class Overlay(Protocol):
    """What the compositor reads from an object: ``WireObject`` and ``ObjectResult`` both fit."""

    obj_id: int
    score: float
    bbox: Sequence[int]
    mask: np.ndarray | None
    label: str | None


@dataclass(frozen=True)
class CompositeStyle:
    """How objects are drawn: mask opacity, contour width, and which annotations to show."""

    alpha: float = 0.45
    contour_thickness: int = 2
    show_boxes: bool = False
    show_labels: bool = True
    show_scores: bool = True
    font_scale: float = 0.5


def color_for(obj_id: int) -> tuple[int, int, int]:
    """The RGB colour of an object id (stable: the same id always gets the same colour)."""
    return PALETTE[obj_id % len(PALETTE)]


def color_hex(obj_id: int) -> str:
    """``color_for`` as a CSS ``#rrggbb`` string, for the operator page's swatches."""
    return "#{:02x}{:02x}{:02x}".format(*color_for(obj_id))


def composite(
    frame_rgb: np.ndarray, objects: Iterable[Overlay], style: CompositeStyle = CompositeStyle()
) -> np.ndarray:
    """Return a new frame with each object's mask blended in, outlined and tagged."""
    out = np.array(frame_rgb, dtype=np.uint8, copy=True, order="C")
    height, width = out.shape[:2]
    for obj in objects:
        colour = color_for(obj.obj_id)
        box = _clip_box(obj.bbox, width, height)
        if obj.mask is not None:
            mask = obj.mask
            if mask.shape != (height, width):
                # A result at another resolution than its frame is a producer bug; still draw it in place.
                mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
            mask_box = _mask_box(mask)
            if mask_box is not None:
                _blend(out, mask, mask_box, colour, style)
                box = box or mask_box
        if box is None:
            continue
        if style.show_boxes or obj.mask is None:
            cv2.rectangle(out, box[:2], (box[2] - 1, box[3] - 1), colour, max(1, style.contour_thickness))
        _tag(out, obj, box, colour, style)
    return out


def banner_frame(width: int, height: int, title: str, detail: str | None = None) -> np.ndarray:
    """A dark ``height x width`` RGB frame with ``title`` (and a smaller ``detail`` line) centred."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = BANNER_BACKGROUND
    scale = max(0.5, width / 640)
    lines = [(title, scale * 1.2, (235, 235, 235), max(1, round(2 * scale)))]
    if detail:
        lines.append((detail, scale * 0.6, (160, 160, 170), max(1, round(scale))))
    sizes = [cv2.getTextSize(text, _FONT, s, t) for text, s, _, t in lines]
    gap = int(12 * scale)
    total = sum(h + base for (_, h), base in sizes) + gap * (len(lines) - 1)
    y = (height - total) // 2
    for (text, s, colour, thickness), ((w, h), base) in zip(lines, sizes, strict=True):
        y += h
        cv2.putText(frame, text, ((width - w) // 2, y), _FONT, s, colour, thickness, cv2.LINE_AA)
        y += base + gap
    return frame


def _clip_box(bbox: Sequence[int] | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    if bbox is None or len(bbox) != 4:
        return None
    x0, y0, x1, y1 = (int(round(v)) for v in bbox)
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    # Computed from the mask itself (two cheap reductions) so a stale or rounded bbox never clips it.
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _blend(
    out: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    colour: tuple[int, int, int],
    style: CompositeStyle,
) -> None:
    x0, y0, x1, y1 = box
    region = out[y0:y1, x0:x1]
    inside = mask[y0:y1, x0:x1]
    # Fixed-point blend (weights out of 256) on the masked pixels only.
    a = int(round(np.clip(style.alpha, 0.0, 1.0) * 256))
    tint = np.array(colour, dtype=np.uint16) * a
    pixels = region[inside].astype(np.uint16)
    region[inside] = ((pixels * (256 - a) + tint) >> 8).astype(np.uint8)
    if style.contour_thickness > 0:
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(region, contours, -1, colour, style.contour_thickness, cv2.LINE_AA)


def _tag(
    out: np.ndarray, obj: Overlay, box: tuple[int, int, int, int], colour: tuple[int, int, int], style: CompositeStyle
) -> None:
    parts = [f"#{obj.obj_id}"]
    if style.show_labels and obj.label:
        parts.append(obj.label)
    if style.show_scores:
        parts.append(f"{obj.score:.2f}")
    text = " ".join(parts)
    (w, h), base = cv2.getTextSize(text, _FONT, style.font_scale, 1)
    x = min(box[0], max(0, out.shape[1] - w - 4))
    # Above the box when there is room, else just inside its top edge.
    y = box[1] - 4 if box[1] - h - base - 4 >= 0 else box[1] + h + 4
    cv2.rectangle(out, (x, y - h - 3), (x + w + 4, y + base - 1), colour, cv2.FILLED)
    ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
    cv2.putText(out, text, (x + 2, y - 1), _FONT, style.font_scale, ink, 1, cv2.LINE_AA)
