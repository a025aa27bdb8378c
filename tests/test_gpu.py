"""GPU checks: bf16 streaming on CUDA. Skipped cleanly on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from models import Prompt, StreamingTracker, load_models
from models.tiny import moving_shapes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_model_streams_in_bf16_on_cuda_with_flat_state() -> None:
    models = load_models("tiny-random", device="cuda")
    assert models.dtype == torch.bfloat16 and next(models.video_model.parameters()).is_cuda
    tracker = StreamingTracker(models)
    tracker.track(moving_shapes(0))
    tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    tracker.add_prompt(Prompt(text="person"))
    states = []
    for index in range(1, 200):
        result = tracker.track(moving_shapes(index))
        if index in (50, 199):
            states.append(tracker.state_bytes())
    assert result.objects and all(o.mask.shape == (120, 160) for o in result.objects)
    assert set(result.timings) == {"preprocess", "encode", "track", "postprocess"}
    assert states[1] <= states[0] * 1.05
