"""Draw tracker results onto the frame they were computed for.

Pure numpy/OpenCV, RGB in and RGB out. The cost grows with the area the objects cover, never with
objects times frame size:

- the tint: the frame's share of every pixel in the box holding all the objects is computed in one
  pass; each mask then stamps its colour's share over its own box (one masked add, the work of
  stamping a label image), later objects on top of earlier ones;
- the outlines: traced on each mask sampled on a coarse grid (every ``contour_step`` pixels: the
  mask's low-resolution form), so finding a contour costs little whatever the frame size;
- the tags: placed at their objects, never overlapping one another (``layout_tags``).

A blended channel is ``min(255, keep[v] + tint[c])`` of the frame's value ``v`` and the colour's ``c``:
``keep[v] = rint(float32(v) * float32(1 - alpha))``, ``tint[c] = round(c * alpha)``. It depends on those
two values alone, so drawing objects one by one gives the very same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from streamer.masks import BoxMask

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
# Outlines are traced on a grid this many pixels apart per 360 pixels of the frame's shorter side: 1 up to
# 480p, 2 at 720p, 3 at 1080p. A mask at 1080p comes from the model's 288x288 logits anyway.
CONTOUR_GRID_PER_PIXELS = 360
# A tag that collides with another moves by its own height, up to this many times each way, then is left out.
TAG_SHIFTS = 6
# Tags are sized for 720p; taller frames get proportionally larger text.
TAG_REFERENCE_HEIGHT = 720


class Overlay(Protocol):
    """What the compositor reads from an object: ``WireObject`` and ``ObjectResult`` both fit."""

    obj_id: int
    score: float
    bbox: Sequence[int]
    mask: np.ndarray | BoxMask | None  # full frame, or the region of its box
    label: str | None


@dataclass(frozen=True)
class CompositeStyle:
    """How objects are drawn: mask opacity, contour width, and which annotations to show (``show_tags``
    off: no tags at all; else each says ``#id``, and the label and score as asked)."""

    alpha: float = 0.45
    contour_thickness: int = 2
    show_boxes: bool = False
    show_tags: bool = True
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
    """Return a new frame with each object's mask blended in, outlined and tagged (later objects on top)."""
    out = np.array(frame_rgb, dtype=np.uint8, copy=True, order="C")
    height, width = out.shape[:2]
    drawn: list[tuple[Overlay, BoxMask | None, tuple[int, int, int, int] | None]] = []
    for obj in objects:
        region = _region(obj.mask, height, width)
        box = _clip_box(obj.bbox, width, height) or (region.box if region is not None else None)
        drawn.append((obj, region, box))
    masked = [(region, color_for(obj.obj_id)) for obj, region, _ in drawn if region is not None]
    if masked and style.alpha > 0:
        _tint(out, masked, style.alpha)
    if style.contour_thickness > 0:
        step = contour_step(height, width)
        for obj, region, _ in drawn:
            if region is not None:
                outline = mask_outline(region, step)
                # Aliased lines: anti-aliased ones cost ~15x more, and the outline is traced on a grid anyway.
                cv2.drawContours(out, outline, -1, color_for(obj.obj_id), style.contour_thickness, cv2.LINE_8)
    for obj, region, box in drawn:
        if box is not None and (style.show_boxes or region is None):
            thickness = max(1, style.contour_thickness)
            cv2.rectangle(out, box[:2], (box[2] - 1, box[3] - 1), color_for(obj.obj_id), thickness)
    if style.show_tags:
        _draw_tags(out, [(obj, box) for obj, _, box in drawn if box is not None], style)
    return out


def contour_step(height: int, width: int) -> int:
    """The grid, in pixels, outlines are traced on for a ``height x width`` frame (see ``mask_outline``)."""
    return max(1, min(height, width) // CONTOUR_GRID_PER_PIXELS)


def mask_outline(region: BoxMask, step: int) -> list[np.ndarray]:
    """The outer contours of a mask traced on the frame's pixels whose coordinates are multiples of ``step``,
    as OpenCV point arrays in frame coordinates (each grid point stands for the ``step``-pixel cell it starts)."""
    rows, cols = (-region.y0) % step, (-region.x0) % step  # the first grid row and column inside the box
    low = region.mask[rows::step, cols::step]
    if low.size == 0:
        return []
    # A zero border keeps a contour touching the box's edge closed, as it is on the whole frame.
    padded = cv2.copyMakeBorder(low.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    origin = np.array([region.x0 + cols - step + step // 2, region.y0 + rows - step + step // 2], dtype=np.int32)
    return [contour * step + origin for contour in contours]


def tag_text(obj: Overlay, style: CompositeStyle) -> str:
    """What an object's tag says: ``#id``, its label and score as the style asks."""
    parts = [f"#{obj.obj_id}"]
    if style.show_labels and obj.label:
        parts.append(obj.label)
    if style.show_scores:
        parts.append(f"{obj.score:.2f}")
    return " ".join(parts)


def layout_tags(
    boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[tuple[int, int]], width: int, height: int
) -> list[tuple[int, int, int, int] | None]:
    """Where each tag goes: ``(x0, y0, x1, y1)`` next to its object's box, or ``None`` when there is no room.

    A tag of ``sizes[i]`` (width, height) sits above its box's top-left corner, else inside it, else below
    the box; one that would overlap a tag placed before it moves up or down by its own height (up to
    ``TAG_SHIFTS`` times each way), then does the same one tag's width to the right, then to the left, and
    is left out rather than drawn over another.
    """
    placed: list[tuple[int, int, int, int]] = []
    out: list[tuple[int, int, int, int] | None] = []
    for (bx0, by0, _, by1), (tw, th) in zip(boxes, sizes, strict=True):
        rows = [by0 - th, by0, by1]
        rows += [by0 - th + sign * k * th for k in range(1, TAG_SHIFTS + 1) for sign in (-1, 1)]
        spot = None
        for dx in (0, tw, -tw):  # beside the box's left edge first, then one tag's width right, then left
            x = min(max(bx0 + dx, 0), max(0, width - tw))
            for y in rows:
                rect = (x, y, x + tw, y + th)
                if y >= 0 and y + th <= height and not any(_overlap(rect, other) for other in placed):
                    spot = rect
                    break
            if spot is not None:
                break
        if spot is not None:
            placed.append(spot)
        out.append(spot)
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


def _region(mask: np.ndarray | BoxMask | None, height: int, width: int) -> BoxMask | None:
    """The part of an object's mask inside the frame, by its tight box (``None``: nothing to draw)."""
    if mask is None:
        return None
    if isinstance(mask, BoxMask):
        x0, y0, x1, y1 = mask.box
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        return BoxMask(cx0, cy0, mask.mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0])
    if mask.shape != (height, width):
        # A result at another resolution than its frame is a producer bug; still draw it in place.
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    # The box is found from the mask itself (two cheap reductions) so a stale or rounded bbox never clips it.
    return BoxMask.from_full(mask)


def tint_of(colour: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    """A colour's share of a blended pixel at opacity ``alpha`` (see the module's docstring)."""
    a = min(max(alpha, 0.0), 1.0)
    return tuple(int(round(c * a)) for c in colour)  # type: ignore[return-value]


def _tint(out: np.ndarray, masked: Sequence[tuple[BoxMask, tuple[int, int, int]]], alpha: float) -> None:
    """Blend every mask into ``out`` in its colour; where masks overlap, the later one's colour wins.

    The frame's share of every pixel in the box holding all the masks is computed in one pass; then each
    mask, over its own box only, adds its colour's share where it is set.
    """
    boxes = np.array([region.box for region, _ in masked])
    ux0, uy0 = boxes[:, :2].min(axis=0)
    ux1, uy1 = boxes[:, 2:].max(axis=0)
    # keep[v] = rint(float32(v) * float32(1 - alpha)): OpenCV scales 8-bit images in float32, and a product
    # with no addend rounds the same in its vector and scalar code, so the result depends on v alone.
    kept = cv2.convertScaleAbs(out[uy0:uy1, ux0:ux1], alpha=1.0 - min(max(alpha, 0.0), 1.0))
    for region, colour in masked:
        x0, y0, x1, y1 = region.box
        share = (*tint_of(colour, alpha), 0)
        # Saturating add of the colour's share, written into the output where this mask is set.
        source = kept[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
        cv2.add(source, share, dst=out[y0:y1, x0:x1], mask=region.mask.view(np.uint8))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_tags(
    out: np.ndarray, tagged: Sequence[tuple[Overlay, tuple[int, int, int, int]]], style: CompositeStyle
) -> None:
    height, width = out.shape[:2]
    scale = style.font_scale * max(1.0, height / TAG_REFERENCE_HEIGHT)
    texts = [tag_text(obj, style) for obj, _ in tagged]
    metrics = [cv2.getTextSize(text, _FONT, scale, 1) for text in texts]
    sizes = [(w + 4, h + base + 3) for (w, h), base in metrics]
    spots = layout_tags([box for _, box in tagged], sizes, width, height)
    for (obj, _), text, ((_, h), _), spot in zip(tagged, texts, metrics, spots, strict=True):
        if spot is None:
            continue
        colour = color_for(obj.obj_id)
        x0, y0, x1, y1 = spot
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, cv2.FILLED)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        cv2.putText(out, text, (x0 + 2, y0 + h + 2), _FONT, scale, ink, 1, cv2.LINE_AA)
