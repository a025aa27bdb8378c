"""Masks by their box, and COCO run lengths computed from and into the box region only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from streamer.masks import BoxMask, box_from_runs, box_runs, tight_box
from streamer.moving_objects import moving_object_masks

# pycocotools' decode warns under numpy 2 (its __array__ lacks the copy keyword); it decodes right.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def coco_counts(full: np.ndarray) -> bytes:
    """pycocotools' compressed counts of a full-frame mask (the reference)."""
    return coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))["counts"]


def compressed(runs: np.ndarray, height: int, width: int) -> bytes:
    """pycocotools' compressed counts of run lengths ``runs``."""
    return coco_mask.frPyObjects({"size": [height, width], "counts": [int(r) for r in runs]}, height, width)["counts"]


def from_runs(runs: np.ndarray, height: int, width: int) -> np.ndarray:
    """The full-frame mask pycocotools decodes from ``runs``."""
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": [int(r) for r in runs]}, height, width)
    return coco_mask.decode(rle).astype(bool)


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """Small frames with a few rectangles and speckles, often touching the frame's edges."""
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    full = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(0, 4))):
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        y1, x1 = draw(st.integers(y0 + 1, height)), draw(st.integers(x0 + 1, width))
        full[y0:y1, x0:x1] = draw(st.booleans())
    for _ in range(draw(st.integers(0, 6))):
        full[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] ^= True
    return full


@settings(max_examples=300, deadline=None)
@given(masks())
def test_box_region_runs_are_cocos_and_decode_back(full: np.ndarray) -> None:
    height, width = full.shape
    region = BoxMask.from_full(full)
    assert (region is None) == (not full.any())
    runs = box_runs(region, height, width) if region is not None else np.array([height * width])
    assert compressed(runs, height, width) == coco_counts(full), "the runs pycocotools finds in the whole frame"
    assert np.array_equal(from_runs(runs, height, width), full), "pycocotools decodes them to the same mask"
    decoded = box_from_runs(runs, height, width)
    if region is None:
        assert decoded is None
    else:
        assert decoded is not None and decoded.box == region.box == tight_box(full)
        assert np.array_equal(decoded.mask, region.mask) and np.array_equal(decoded.full(height, width), full)


def test_box_region_runs_at_1080p_and_a_box_as_tall_as_the_frame() -> None:
    height, width = 1080, 1920
    regions = [region for _, region in moving_object_masks(10, 45, width, height)]
    tall = np.zeros((height, width), bool)
    tall[:, 700:760] = True  # runs go from one column into the next
    tall[500:540, 760] = True
    regions.append(BoxMask.from_full(tall))
    for region in regions:
        full = region.full(height, width)
        runs = box_runs(region, height, width)
        assert np.array_equal(from_runs(runs, height, width), full)
        decoded = box_from_runs(runs, height, width)
        assert decoded is not None and decoded.box == region.box and np.array_equal(decoded.mask, region.mask)


def test_a_box_outside_the_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="^mask: box"):
        box_runs(BoxMask(5, 0, np.ones((2, 2), bool)), 4, 6)
