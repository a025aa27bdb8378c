"""StreamingTracker's prompt queue: each step runs once; a failing one is dropped and reported, never
retried; reset clears what is queued; ids reserved from another thread are the ids used."""

from __future__ import annotations

import threading

import pytest

from models import Prompt, StreamingTracker

W, H = 160, 120


def test_a_step_that_fails_is_dropped_reported_and_never_retried(tiny_models, frames) -> None:
    tracker = StreamingTracker(tiny_models)
    tracker.track(frames(0, W, H))
    calls = []

    def broken_add_text(frame_index: int, text: str) -> None:  # as the tokenizer did with a lone surrogate
        calls.append(text)
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    tracker.text.add_text = broken_add_text  # type: ignore[method-assign]
    tracker.add_prompt(Prompt(text="cat"))
    clicked = tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    result = tracker.track(frames(1, W, H))  # the frame goes on, with the click
    assert [o.obj_id for o in result.objects] == clicked
    (failure,) = tracker.take_prompt_failures()
    assert failure.text == "cat" and failure.error.startswith("text: failed when applied (TypeError")
    assert tracker.text_prompts == [], "its bookkeeping is undone"
    for index in range(2, 5):
        assert tracker.track(frames(index, W, H)).objects
    assert calls == ["cat"], "never retried"
    assert tracker.take_prompt_failures() == []


def test_reset_clears_what_is_queued(tiny_models, frames) -> None:
    tracker = StreamingTracker(tiny_models)
    tracker.track(frames(0, W, H))
    tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    tracker.add_prompt(Prompt(text="person"))
    tracker.reset()
    assert tracker.object_ids == [] and tracker.text_prompts == []
    assert tracker.track(frames(1, W, H)).objects == []
    assert tracker.take_prompt_failures() == []


def test_text_the_tokenizer_cannot_take_is_refused(tiny_models) -> None:
    tracker = StreamingTracker(tiny_models)
    with pytest.raises(ValueError, match="^text: the tokenizer cannot take this text"):
        tracker.check_text("\ud800")
    tracker.check_text("a red cup")


def test_ids_reserved_from_another_thread_are_used_and_never_collide_with_detections(tiny_models, frames) -> None:
    tracker = StreamingTracker(tiny_models)
    tracker.track(frames(0, W, H))
    tracker.add_prompt(Prompt(text="person"))  # the detector hands out ids on every frame
    reserved: list[int] = []
    stop = threading.Event()

    def control_thread() -> None:  # reserves while frames are tracked, as the tracker service's does
        while not stop.is_set() and len(reserved) < 40:
            reserved.extend(tracker.new_object_ids(1))
            tracker.check_text("person")

    thread = threading.Thread(target=control_thread)
    thread.start()
    try:
        for index in range(1, 6):
            tracker.track(frames(index, W, H))
    finally:
        stop.set()
        thread.join()
    found_by_text = {i for i, label in tracker.object_labels.items() if label == "person"}
    assert found_by_text and reserved, (found_by_text, reserved)
    assert not found_by_text & set(reserved), "the detector never used a reserved id"
    chosen = reserved[-1]
    assert tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,), obj_id=chosen)) == [chosen]
    result = tracker.track(frames(6, W, H))
    ids = [o.obj_id for o in result.objects]
    assert chosen in ids and len(ids) == len(set(ids))
    assert tracker.object_labels[chosen] is None
