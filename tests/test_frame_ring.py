"""The prompt ring: which past frames a prompt can be placed on, what it costs, and that it stays bounded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models import Prompt, StreamingTracker, TrackerConfig
from models import hf_internals as hf
from models.frame_ring import FrameRing
from models.tiny import moving_shapes

W, H = 96, 72
BOX = Prompt(bounding_boxes=((0.5, 0.5, 0.4, 0.4),), bounding_box_labels=(1,))


def _tokens() -> torch.Tensor:
    return torch.zeros(1, 4, 8)


def test_ring_promises_its_budget_and_holds_one_frame_more() -> None:
    ring = FrameRing(seconds=None, max_frames=4)
    for index in range(10):
        ring.add(index, float(index), _tokens())
    assert ring.oldest_promised() == 6  # frames 6..9: the budget
    assert ring.oldest_held == 5 and len(ring) == 5  # and the frame a prompt answered a frame ago may need
    assert ring.place(2) == 5 and ring.place(7) == 7
    with pytest.raises(ValueError, match="frame_index"):
        ring.place(10)


def test_ring_budget_in_seconds_follows_the_timestamps() -> None:
    ring = FrameRing(seconds=0.35, max_frames=100)
    for index in range(10):
        ring.add(index, 100.0 + 0.1 * index, _tokens())
    assert ring.oldest_promised() == 6  # 100.6 .. 100.9: within 0.35 s of the newest
    assert ring.oldest_held == 5


@pytest.mark.parametrize(
    ("seconds", "frames", "field"),
    [(-1.0, 4, "prompt_ring_seconds"), (float("nan"), 4, "prompt_ring_seconds"), (1.0, -1, "prompt_ring_frames")],
)
def test_ring_settings_are_checked(seconds, frames, field) -> None:
    with pytest.raises(ValueError, match=field):
        FrameRing(seconds, frames)


def _run(tracker: StreamingTracker, frames: range) -> list:
    return [tracker.track(moving_shapes(i, W, H), timestamp=i / 30) for i in frames]


def test_prompt_older_than_the_ring_goes_on_the_oldest_frame_promised(tiny_models) -> None:
    config = TrackerConfig(prompt_ring_seconds=None, prompt_ring_frames=8)
    too_old, on_oldest = StreamingTracker(tiny_models, config), StreamingTracker(tiny_models, config)
    for tracker in (too_old, on_oldest):
        _run(tracker, range(30))
    assert too_old.prompt_frame(2) == 22, "frames 22..29 are the 8 promised"
    too_old.add_prompt(replace(BOX, frame_index=2))
    on_oldest.add_prompt(replace(BOX, frame_index=22))
    for a, b in zip(_run(too_old, range(30, 36)), _run(on_oldest, range(30, 36)), strict=True):
        assert [o.obj_id for o in a.objects] == [o.obj_id for o in b.objects] == [0]
        assert np.array_equal(a.objects[0].mask, b.objects[0].mask) and a.objects[0].score == b.objects[0].score


def test_prompts_not_placed_in_the_past(tiny_models) -> None:
    tracker = StreamingTracker(tiny_models, TrackerConfig(prompt_ring_seconds=None, prompt_ring_frames=8))
    assert tracker.prompt_frame(0) is None, "nothing tracked yet: the next frame"
    _run(tracker, range(5))
    assert tracker.prompt_frame(5) is None and tracker.prompt_frame(None) is None
    assert tracker.prompt_frame(3, refines=0) is None, "no such object: the next frame"
    tracker.add_prompt(replace(BOX, frame_index=3))
    _run(tracker, range(5, 7))
    assert tracker.prompt_frame(2, refines=0) == 4, "a correction lands after the frame its object started on"
    tracker.add_prompt(Prompt(text="person", frame_index=2))  # text is applied from the next frame
    assert tracker.track(moving_shapes(7, W, H)).frame_index == 7
    off = StreamingTracker(tiny_models, TrackerConfig(prompt_ring_frames=0))
    _run(off, range(3))
    assert off.prompt_frame(1) is None and off.ring.state_bytes() == off.state_bytes() == 0


def test_ring_bytes_are_counted_in_state_bytes(tiny_models) -> None:
    with_ring = StreamingTracker(tiny_models, TrackerConfig(prompt_ring_seconds=None, prompt_ring_frames=6))
    _run(with_ring, range(10))
    tokens = with_ring.ring.tokens(9)
    held = len(with_ring.ring)
    assert held == 7
    assert with_ring.state_bytes() == with_ring.ring.state_bytes() >= held * tokens.numel() * tokens.element_size()


def test_ring_and_history_stay_bounded_over_a_long_stream(tiny_models) -> None:
    ring_frames = 10
    tracker = StreamingTracker(tiny_models, TrackerConfig(prompt_ring_seconds=None, prompt_ring_frames=ring_frames))
    _run(tracker, range(2))
    tracker.add_prompt(BOX)
    state_at = {}
    for frame in range(2, 400):
        if frame % 40 == 0:  # corrections placed in the past, again and again
            tracker.add_prompt(replace(BOX, obj_id=0, frame_index=frame - 7))
        tracker.track(moving_shapes(frame, W, H), timestamp=frame / 30)
        if frame in (150, 399):
            state_at[frame] = tracker.state_bytes()
        assert len(tracker.ring) <= ring_frames + 1
    pointer_frames = tracker.geometry.window.pointer_frames
    for outputs in hf.all_object_outputs(tracker.geometry.session):
        assert len(outputs["non_cond_frame_outputs"]) <= pointer_frames + ring_frames + 1
    assert abs(state_at[399] - state_at[150]) <= 0.05 * state_at[150], state_at


def test_a_frame_answered_a_frame_ago_is_still_honoured(tiny_models) -> None:
    """The service answers while the next frame is tracked and applies before the one after: the frame it
    answered has left the budget by then, but the ring's spare frame still holds it."""
    tracker = StreamingTracker(tiny_models, TrackerConfig(prompt_ring_seconds=None, prompt_ring_frames=8))
    _run(tracker, range(30))
    answered = tracker.prompt_frame(2)
    assert answered == 22
    _run(tracker, range(30, 31))  # the frame in flight when the answer was given
    assert tracker.prompt_frame(2) == 23 and tracker.ring.oldest_held == 22
    [obj_id] = tracker.add_prompt(replace(BOX, frame_index=answered))
    _run(tracker, range(31, 32))
    assert tracker._first_frame[obj_id] == answered  # placed where the answer said
