"""The compositor: masks tinted in their object's colour, contours, tags and the status banner."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
import pytest
from helpers import box_of, disc

from streamer.compositor import (
    BANNER_BACKGROUND,
    CompositeStyle,
    banner_frame,
    color_for,
    color_hex,
    composite,
    contour_step,
    layout_tags,
)
from streamer.moving_objects import moving_object_masks, moving_objects


@dataclass
class Obj:
    obj_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray | None
    label: str | None = None


def grey(height: int = 240, width: int = 320, level: int = 100) -> np.ndarray:
    return np.full((height, width, 3), level, dtype=np.uint8)


def test_mask_colour_inside_not_outside() -> None:
    frame = grey()
    mask = disc(160, 140, 40, (240, 320))
    style = CompositeStyle(alpha=0.5, contour_thickness=0, show_labels=False, show_scores=False)
    out = composite(frame, [Obj(3, 0.9, box_of(mask), mask)], style)

    expected = (0.5 * np.array(color_for(3)) + 0.5 * 100).round()
    assert np.abs(out[140, 160].astype(int) - expected).max() <= 2
    # Everything away from the disc (and its tag above it) is untouched.
    far = ~disc(160, 140, 44, (240, 320))
    far[:100] = False
    assert (out[far] == 100).all()
    assert (frame == 100).all(), "composite must not modify its input"


def test_distinct_objects_get_distinct_stable_colours() -> None:
    assert color_for(1) != color_for(2)
    assert color_for(7) == color_for(7)
    assert color_hex(1) == "#{:02x}{:02x}{:02x}".format(*color_for(1))
    frame = grey()
    left, right = disc(80, 150, 30, (240, 320)), disc(240, 150, 30, (240, 320))
    style = CompositeStyle(contour_thickness=0, show_labels=False, show_scores=False)
    out = composite(frame, [Obj(1, 0.8, box_of(left), left), Obj(2, 0.7, box_of(right), right)], style)
    assert not np.array_equal(out[150, 80], out[150, 240])


def test_contour_drawn_on_mask_edge() -> None:
    frame = grey(level=0)
    mask = np.zeros((240, 320), bool)
    mask[60:180, 100:220] = True
    style = CompositeStyle(alpha=0.0, contour_thickness=2, show_labels=False, show_scores=False)
    out = composite(frame, [Obj(0, 1.0, (100, 60, 220, 180), mask)], style)
    colour = np.array(color_for(0))
    assert (out[120, 100] == colour).all()  # left edge
    assert (out[60, 160] == colour).all()  # top edge
    assert (out[120, 160] == 0).all()  # alpha 0: interior untouched


def test_tag_and_box_drawn_without_mask() -> None:
    frame = grey(level=0)
    out = composite(frame, [Obj(4, 0.5, (100, 100, 200, 200), None, "cup")], CompositeStyle())
    assert (out[150, 100] == color_for(4)).all()  # the box stands in for the missing mask
    assert out[80:100, 100:200].any()  # the tag sits above the box


def test_mask_at_other_resolution_is_scaled_into_place() -> None:
    frame = grey(240, 320)
    small = np.zeros((120, 160), bool)
    small[30:90, 40:120] = True
    out = composite(frame, [Obj(1, 0.9, (80, 60, 240, 180), small)], CompositeStyle(contour_thickness=0))
    assert (out[120, 160] != 100).any() and (out[230, 10] == 100).all()


def test_empty_mask_and_no_objects() -> None:
    frame = grey()
    assert np.array_equal(composite(frame, []), frame)
    out = composite(frame, [Obj(1, 0.9, (0, 0, 0, 0), np.zeros((240, 320), bool))])
    assert np.array_equal(out, frame)


def test_banner_is_dark_frame_with_text() -> None:
    frame = banner_frame(640, 360, "tracker offline", "no heartbeat for 2 s")
    assert frame.shape == (360, 640, 3) and frame.dtype == np.uint8
    assert (frame[0, 0] == BANNER_BACKGROUND).all()
    centre = frame[140:220]
    assert (centre.max(axis=2) > 200).sum() > 200, "title text should be drawn in the middle"


def reference_composite(frame: np.ndarray, objects: list[Obj], style: CompositeStyle) -> np.ndarray:
    """The compositor's definition, object by object over whole frames (no tags): each mask blended from the
    original frame (later objects on top), then each outline traced on the grid of the frame's pixels whose
    coordinates are multiples of the contour step."""
    out = frame.copy()
    height, width = frame.shape[:2]
    keep = np.rint(np.arange(256, dtype=np.float32) * np.float32(1 - style.alpha)).astype(np.int32)
    for obj in objects:
        share = np.array([round(c * style.alpha) for c in color_for(obj.obj_id)])
        out[obj.mask] = np.minimum(255, keep[frame[obj.mask]] + share)
    step = contour_step(height, width)
    for obj in objects:
        low = np.pad(obj.mask[::step, ::step].astype(np.uint8), 1)
        contours, _ = cv2.findContours(low, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours = [(c - 1) * step + step // 2 for c in contours]
        cv2.drawContours(out, contours, -1, color_for(obj.obj_id), style.contour_thickness, cv2.LINE_8)
    return out


@pytest.mark.parametrize(
    ("width", "height", "alpha", "frame_index"),
    [(320, 240, 0.45, 0), (641, 359, 0.3, 17), (1280, 720, 0.45, 40), (1920, 1080, 0.77, 95)],
)
def test_one_pass_pixels_equal_the_per_object_reference(
    width: int, height: int, alpha: float, frame_index: int
) -> None:
    """Ten overlapping objects of varied sizes, some cut by the frame's edge, as full-frame masks and as
    masks by their boxes: the same pixels as drawing them one by one from the definition."""
    rng = np.random.default_rng(frame_index)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    regions = moving_object_masks(10, frame_index, width, height)
    full = [Obj(i, 0.9, r.box, r.full(height, width)) for i, r in regions]
    assert sum(o.mask.sum() for o in full) > 0.1 * width * height, "the objects should cover a good part"
    style = CompositeStyle(alpha=alpha, show_tags=False)
    expected = reference_composite(frame, full, style)
    assert np.array_equal(composite(frame, full, style), expected)
    boxed = [replace(o, mask=region) for o, (_, region) in zip(full, regions, strict=True)]
    assert np.array_equal(composite(frame, boxed, style), expected)


def test_tags_sit_at_their_objects_and_never_overlap() -> None:
    width, height = 1920, 1080
    objects = moving_objects(10, 60, width, height)
    # Crowd them: ten more boxes on top of one another in a corner, where every tag wants the same spot.
    crowd = [(5, 5, 60, 40)] * 10
    boxes = [o.bbox for o in objects] + crowd
    sizes = [(90 + 7 * i, 22) for i in range(len(boxes))]
    spots = layout_tags(boxes, sizes, width, height)
    placed = [s for s in spots if s is not None]
    assert len(placed) >= 15, "most tags find room"
    for i, a in enumerate(placed):
        assert a[0] >= 0 and a[2] <= width and a[1] >= 0 and a[3] <= height
        for b in placed[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a} overlaps {b}"
    for (x0, y0, _, y1), spot, (w, h) in zip(boxes, spots, sizes, strict=True):
        if spot is not None:  # next to its box: within a tag width and a few tag heights of it
            assert spot[2] - spot[0] == w and spot[3] - spot[1] == h
            assert x0 - w <= spot[0] <= max(x0, 0) + w and y0 - 8 * h <= spot[1] <= y1 + 8 * h
    # Drawn: each tag's background is its object's colour.
    frame = np.zeros((height, width, 3), np.uint8)
    out = composite(frame, objects, CompositeStyle(alpha=0.0, contour_thickness=0))
    tag_spots = layout_tags([o.bbox for o in objects], _tag_sizes(objects), width, height)
    for obj, spot in zip(objects, tag_spots, strict=True):
        assert spot is not None
        assert (out[spot[1] + 1, spot[0] + 1] == color_for(obj.obj_id)).all()


def _tag_sizes(objects: list) -> list[tuple[int, int]]:
    """The sizes ``composite`` gives the tags of ``objects`` at 1080p with the default style."""
    from streamer.compositor import TAG_REFERENCE_HEIGHT, tag_text

    style = CompositeStyle()
    scale = style.font_scale * 1080 / TAG_REFERENCE_HEIGHT
    sizes = []
    for obj in objects:
        (w, h), base = cv2.getTextSize(tag_text(obj, style), cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        sizes.append((w + 4, h + base + 3))
    return sizes


def test_composite_speed_1080p() -> None:
    """Report (not assert: scripts/bench_compositor.py measures) the cost at 1080p with ten objects."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    objects = moving_objects(10, 30, 1920, 1080)
    composite(frame, objects)
    runs = 10
    start = time.perf_counter()
    for _ in range(runs):
        composite(frame, objects)
    per_frame = (time.perf_counter() - start) / runs
    print(f"\ncomposite 1920x1080, 10 objects: {per_frame * 1e3:.2f} ms/frame")
