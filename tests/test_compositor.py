"""The compositor: masks tinted in their object's colour, contours, tags and the status banner."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from streamer.compositor import BANNER_BACKGROUND, CompositeStyle, banner_frame, color_for, color_hex, composite


@dataclass
class Obj:
    obj_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray | None
    label: str | None = None


def disc(height: int, width: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def grey(height: int = 240, width: int = 320, level: int = 100) -> np.ndarray:
    return np.full((height, width, 3), level, dtype=np.uint8)


def test_mask_colour_inside_not_outside() -> None:
    frame = grey()
    mask = disc(240, 320, 160, 140, 40)
    style = CompositeStyle(alpha=0.5, contour_thickness=0, show_labels=False, show_scores=False)
    out = composite(frame, [Obj(3, 0.9, box_of(mask), mask)], style)

    expected = (0.5 * np.array(color_for(3)) + 0.5 * 100).round()
    assert np.abs(out[140, 160].astype(int) - expected).max() <= 2
    # Everything away from the disc (and its tag above it) is untouched.
    far = ~disc(240, 320, 160, 140, 44)
    far[:100] = False
    assert (out[far] == 100).all()
    assert (frame == 100).all(), "composite must not modify its input"


def test_distinct_objects_get_distinct_stable_colours() -> None:
    assert color_for(1) != color_for(2)
    assert color_for(7) == color_for(7)
    assert color_hex(1) == "#{:02x}{:02x}{:02x}".format(*color_for(1))
    frame = grey()
    left, right = disc(240, 320, 80, 150, 30), disc(240, 320, 240, 150, 30)
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


def test_composite_speed_720p() -> None:
    """Report (not assert) the cost at 720p with four objects; a budget of 33 ms is one 30 fps frame."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    objects = []
    for i, (cx, cy, r) in enumerate([(300, 300, 150), (800, 400, 200), (1100, 200, 80), (600, 600, 100)]):
        mask = disc(720, 1280, cx, cy, r)
        objects.append(Obj(i, 0.9, box_of(mask), mask, "thing"))
    composite(frame, objects)
    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        composite(frame, objects)
    per_frame = (time.perf_counter() - start) / runs
    print(f"\ncomposite 1280x720, 4 objects: {per_frame * 1e3:.2f} ms/frame ({1 / per_frame:.0f} fps on one core)")
