"""GPU checks: bf16 streaming on CUDA, and how often a frame makes the host wait on the GPU. Skipped cleanly
on machines without a GPU."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

from models import Prompt, StreamingTracker, load_models
from models.tiny import click_prompts, moving_shapes

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


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[str]]:
    """Where the host waited on the GPU inside the block: CUDA's sync debug mode warns at every
    synchronizing call (stream and device synchronizations, copies to pageable memory, ``.item()``...)."""
    syncs: list[str] = []
    torch.cuda.synchronize()  # what came before is not the block's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def test_a_steady_frame_with_five_objects_waits_on_the_gpu_at_most_twice() -> None:
    models = load_models("tiny-random", device="cuda")
    tracker = StreamingTracker(models)  # stage timings from CUDA events (TrackerConfig.sync_timings off)
    tracker.track(moving_shapes(0))
    for prompt in click_prompts(5, 160, 120):
        tracker.add_prompt(prompt)
    for index in range(1, 10):  # past the prompted frame, into the steady state
        tracker.track(moving_shapes(index))
    for index in range(10, 15):
        with counting_syncs() as syncs:
            result = tracker.track(moving_shapes(index))
        assert result.objects, "the clicked objects are tracked"
        # One wait for every box and score, one for the masks cropped to their boxes (models.readback).
        assert len(syncs) <= 2, f"frame {index}: the host waited on the GPU {len(syncs)} times: {syncs}"
        assert set(result.timings) == {"preprocess", "encode", "track", "postprocess"}
        assert all(t >= 0 for t in result.timings.values())
