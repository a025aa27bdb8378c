"""The accuracy measures behind the demo model's bars: IoU, boundary F, instance matching, correction clicks."""

from __future__ import annotations

import numpy as np
from helpers import disc

from models.demo_metrics import (
    boundary_f,
    error_click,
    match_instances,
    track_scores,
)
from models.results import mask_iou
from models.tiny import DEMO, small_tokenizer, tiny_tokenizer

FRAME = (480, 640)  # height, width of the masks here


def test_iou_and_boundary_f_of_equal_shifted_and_empty_masks():
    a = disc(200, 200, 30, FRAME)
    assert mask_iou(a, a) == 1.0 and boundary_f(a, a) == 1.0
    empty = np.zeros_like(a)
    assert mask_iou(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0, "absent and not predicted: right"
    assert mask_iou(a, empty) == 0.0 and boundary_f(a, empty) == 0.0
    # 3 px off: inside DAVIS's boundary tolerance (0.8 % of the 800 px diagonal = 7 px), IoU drops.
    shifted = disc(203, 200, 30, FRAME)
    assert boundary_f(shifted, a) == 1.0 and 0.85 < mask_iou(shifted, a) < 0.95
    far = disc(230, 200, 30, FRAME)
    assert boundary_f(far, a) < 0.5
    scores = track_scores([a, shifted, empty], [a, a, empty])
    assert scores.j[2] == 1.0 and abs(scores.jf - (np.mean(scores.j) + np.mean(scores.f)) / 2) < 1e-12


def test_instances_match_at_iou_half_and_small_truths_are_optional():
    big1, big2, sliver = disc(100, 100, 30, FRAME), disc(400, 300, 25, FRAME), disc(630, 10, 5, FRAME)
    counts = match_instances([big1, disc(402, 300, 25, FRAME), disc(300, 100, 20, FRAME)], [big1, big2, sliver])
    assert (counts.truths, counts.matched, counts.preds) == (2, 2, 3)
    assert counts.recall == 1.0 and abs(counts.precision - 2 / 3) < 1e-9 and 0.9 < counts.mean_iou <= 1.0
    # Finding the sliver is neither a hit nor a false positive.
    counts = match_instances([sliver], [big1, sliver])
    assert (counts.truths, counts.matched, counts.preds) == (1, 0, 0)


def test_a_correction_click_lands_in_the_middle_of_the_largest_error():
    truth = disc(300, 200, 60, FRAME)
    missing_half = truth & (np.mgrid[:480, :640][1] < 300)
    x, y, label = error_click(missing_half, truth)
    assert label == 1 and truth[y, x] and not missing_half[y, x] and x > 320
    spill = truth | disc(450, 200, 40, FRAME)
    x, y, label = error_click(spill, truth)
    assert label == 0 and not truth[y, x] and x > 400
    assert error_click(truth, truth) is None


def test_each_scene_word_is_one_token_and_the_tiny_tokenizer_is_unchanged():
    demo = small_tokenizer(DEMO.words)
    for word in DEMO.words:
        assert len(demo(word).input_ids) == 3, demo.convert_ids_to_tokens(demo(word).input_ids)
    tiny = tiny_tokenizer()
    assert tiny.convert_ids_to_tokens(tiny("person").input_ids)[1] == "person</w>"
