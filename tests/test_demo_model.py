"""The shipped ``demo`` model really tracks the generated scenes (accuracy, identity, corrections).

The issue's bars are measured by ``scripts/eval_demo.py`` on 300-frame sequences at 640 x 480.
These tests run short sequences in seconds, with thresholds the shipped model reaches here (each
names the full bar it stands for); seeds 0-99 are the tests', held out from training and validation.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import Prompt, StreamingTracker
from models.demo_eval import evaluate_single_frames
from models.demo_metrics import error_click
from models.demo_scenes import SCENE_WORDS, SHAPES, DemoScene
from models.loading import DEMO_FOLDER
from models.results import mask_iou

# Thresholds reached by the shipped weights on these short runs (full bars in parentheses).
SINGLE_FRAME_IOU = 0.75  # measured 0.80 here (bar: single-frame IoU >= 0.8; 0.80 on eval seeds 1000-1004)
CORRECTION_GAIN = 0.05  # mean IoU gain of a correction click on masks below 0.85 (measured 0.13)


def test_the_demo_model_ships_in_the_package_and_loads_like_real_weights(demo_models):
    assert (DEMO_FOLDER / "config.json").is_file() and (DEMO_FOLDER / "model.safetensors").is_file()
    size = sum(f.stat().st_size for f in DEMO_FOLDER.iterdir())
    assert size < 40 * 2**20, f"{size / 2**20:.1f} MiB is too big to keep in the repository"
    assert demo_models.source == "demo" and demo_models.image_size == 224
    tokenizer = demo_models.tokenizer
    for word in SCENE_WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, f"{word!r} is not one token: {tokenizer.convert_ids_to_tokens(ids)}"


def test_one_click_segments_an_object_on_its_frame(demo_models):
    ious = []
    for seed in range(4):
        ious += evaluate_single_frames(demo_models, DemoScene.random(seed), [0, 150])["ious"]
    print(f"single-frame click IoU {np.mean(ious):.3f} over {len(ious)} objects")
    assert len(ious) >= 12
    assert np.mean(ious) >= SINGLE_FRAME_IOU, ious


def test_a_correction_click_improves_the_mask(demo_models):
    """On the objects one click segments worst, a second click on the centre of the error (SAM's
    interactive refinement: both clicks given on the frame) gives a better mask."""
    gains = []
    for seed in range(20, 24):
        shot = DemoScene.random(seed).frame(30)
        for inst in shot.instances:
            if inst.area < 1500:
                continue
            first = (*inst.interior_point(), 1)
            alone = _segment(demo_models, shot.image, [first])
            before = mask_iou(alone, inst.mask)
            correction = error_click(alone, inst.mask)
            if before > 0.85 or correction is None:
                continue
            after = mask_iou(_segment(demo_models, shot.image, [first, correction]), inst.mask)
            gains.append(after - before)
    print(f"correction gains {np.round(gains, 3)}")
    assert len(gains) >= 3, "enough imperfect first masks to correct"
    assert np.mean(gains) >= CORRECTION_GAIN and sum(g > 0 for g in gains) > len(gains) / 2, gains


def _segment(models, image: np.ndarray, clicks: list[tuple[int, int, int]]) -> np.ndarray:
    """The mask of one object prompted with ``clicks`` ``(x, y, label)`` on a single frame."""
    tracker = StreamingTracker(models)
    points = tuple((x, y) for x, y, _ in clicks)
    labels = tuple(label for _, _, label in clicks)
    height, width = image.shape[:2]
    tracker.add_prompt(Prompt(points=points, point_labels=labels, obj_id=1), frame_size=(width, height))
    found = tracker.track(image).by_id()
    return found[1].mask if 1 in found else np.zeros((height, width), bool)


def test_text_prompts_are_refused_while_the_detector_is_untrained(demo_models):
    if demo_models.text_detector:
        pytest.skip("this demo model's text detector is trained; its accuracy is tested instead")
    tracker = StreamingTracker(demo_models)
    with pytest.raises(ValueError, match="^text: the demo model has no trained text detector"):
        tracker.add_prompt(Prompt(text=SHAPES[0]))
    assert tracker.text_prompts == []
