"""Loading: hub id, local folder or tiny-random, all through the same path, with clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from models import ModelLoadError, Prompt, StreamingTracker, load_models
from models.tiny import moving_shapes, tiny_video_model


def _run(models, frames: int = 8):
    tracker = StreamingTracker(models)
    tracker.track(moving_shapes(0))
    tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    tracker.add_prompt(Prompt(text="person"))
    return [tracker.track(moving_shapes(i)) for i in range(1, frames)]


def test_saved_tiny_model_loads_back_with_identical_outputs(tiny_models, tmp_path) -> None:
    tiny_models.video_model.save_pretrained(tmp_path)
    tiny_models.tokenizer.save_pretrained(tmp_path)
    reloaded = load_models(str(tmp_path), device="cpu")
    first, second = _run(tiny_models), _run(reloaded)
    assert any(r.objects for r in first)
    for a, b in zip(first, second, strict=True):
        assert [(o.obj_id, o.score, o.bbox, o.label) for o in a.objects] == [
            (o.obj_id, o.score, o.bbox, o.label) for o in b.objects
        ]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))


def test_tiny_random_is_seeded_and_same_as_a_saved_copy(tiny_models) -> None:
    built = load_models("tiny-random", device="cpu")
    built_state, saved_state = built.video_model.state_dict(), tiny_models.video_model.state_dict()
    assert built_state.keys() == saved_state.keys()
    for name, p in built_state.items():
        assert torch.equal(p, saved_state[name]), name
    assert torch.equal(tiny_video_model().tracker_model.no_memory_embedding, built.tracker_model.no_memory_embedding)
    assert built.tokenizer("the red ball").input_ids == tiny_models.tokenizer("the red ball").input_ids


def test_one_encoder_serves_text_and_tracker(tiny_models) -> None:
    """The point/box tracker is the video model's own tracker module: no second image encoder."""
    assert tiny_models.tracker_model is tiny_models.video_model.tracker_model
    assert tiny_models.tracker_model.vision_encoder is None
    calls = []
    encoder = tiny_models.video_model.detector_model.vision_encoder.backbone
    handle = encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        results = _run(tiny_models, frames=6)
    finally:
        handle.remove()
    # Frame 0 too (before any prompt): the prompt ring holds every frame's encoder output.
    assert len(calls) == len(results) + 1, "one encoder pass per frame with text and click objects both active"


def test_missing_folder_says_so(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_models(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_models(str(tmp_path))


def test_unreachable_hub_model_explains_login_and_local_folder() -> None:
    """Offline (as on this machine), the gated default tells the user how to get access."""
    code = textwrap.dedent(
        """
        from models import load_models, ModelLoadError
        try:
            load_models("facebook/sam3", device="cpu")
        except ModelLoadError as error:
            print("ERROR:", error)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERROR:" in out
    assert "hf auth login" in out and "license" in out and "local folder" in out
