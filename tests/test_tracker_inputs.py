"""Bad prompts and frames raise ValueError naming the field, and the tracker keeps working."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import box_of

from models import Prompt, StreamingTracker

W, H = 160, 120

BAD_PROMPTS = [
    ({"text": ""}, "text"),
    ({"text": "   "}, "text"),
    ({"points": [[float("nan"), 10]], "point_labels": [1]}, "points"),
    ({"points": [[W + 5, 10]], "point_labels": [1]}, "points"),
    ({"points": [[-1, 10]], "point_labels": [1]}, "points"),
    ({"points": [[10, 10], [20, 20]], "point_labels": [1]}, "point_labels"),
    ({"points": [[10, 10]], "point_labels": [2]}, "point_labels"),
    ({"points": [[10, 10]], "point_labels": ["yes"]}, "point_labels"),
    ({"bounding_boxes": [[0.5, 0.5, 0.0, 0.2]], "bounding_box_labels": [1]}, "bounding_boxes"),
    ({"bounding_boxes": [[0.5, 0.5, 0.2, -0.1]], "bounding_box_labels": [1]}, "bounding_boxes"),
    ({"bounding_boxes": [[0.9, 0.5, 0.4, 0.2]], "bounding_box_labels": [1]}, "bounding_boxes"),
    ({"bounding_boxes": [[1.2, 0.5, 0.1, 0.1]], "bounding_box_labels": [1]}, "bounding_boxes"),
    ({"bounding_boxes": [[0.5, 0.5, 0.1]], "bounding_box_labels": [1]}, "bounding_boxes"),
    ({"bounding_boxes": [[0.5, 0.5, 0.1, 0.1]], "bounding_box_labels": []}, "bounding_box_labels"),
    ({"obj_id": -3, "points": [[10, 10]], "point_labels": [1]}, "obj_id"),
    ({"points": "10,10", "point_labels": [1]}, "points"),
    ({"colour": "red", "text": "person"}, "colour"),
    ({}, "prompt"),
]


@pytest.fixture
def live_tracker(tiny_models, frames) -> StreamingTracker:
    tracker = StreamingTracker(tiny_models)
    tracker.track(frames(0, W, H))
    tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    tracker.track(frames(1, W, H))
    return tracker


@pytest.mark.parametrize(("fields", "field"), BAD_PROMPTS)
def test_bad_prompt_names_the_field_and_tracking_goes_on(live_tracker, frames, fields, field) -> None:
    before = live_tracker.object_ids
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        live_tracker.add_prompt(fields)
    assert live_tracker.object_ids == before
    result = live_tracker.track(frames(2, W, H))
    assert [o.obj_id for o in result.objects] == before


def test_remove_of_unknown_id_names_obj_id(live_tracker, frames) -> None:
    with pytest.raises(ValueError, match=r"^obj_id: no object 42"):
        live_tracker.remove_object(42)
    with pytest.raises(ValueError, match=r"^text: no such text prompt"):
        live_tracker.remove_prompt("zebra")
    assert live_tracker.track(frames(2, W, H)).objects


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((H, W, 3), np.float32), "dtype"),
        (np.zeros((H, W), np.uint8), "shape"),
        (np.zeros((H, W, 4), np.uint8), "shape"),
        (np.zeros((0, W, 3), np.uint8), "size"),
        ([[0, 0, 0]], "numpy"),
    ],
)
def test_bad_frame_is_rejected_and_tracking_goes_on(live_tracker, frames, frame, message) -> None:
    with pytest.raises(ValueError, match=rf"^frame: .*{message}"):
        live_tracker.track(frame)
    result = live_tracker.track(frames(2, W, H))
    assert result.frame_index == 2 and result.objects


def test_points_before_first_frame_need_a_frame_size(tiny_models) -> None:
    tracker = StreamingTracker(tiny_models)
    with pytest.raises(ValueError, match=r"^points: no frame tracked yet"):
        tracker.add_prompt(Prompt(points=((1.0, 1.0),), point_labels=(1,)))
    assert tracker.add_prompt(Prompt(points=((1.0, 1.0),), point_labels=(1,)), frame_size=(W, H)) == [0]


def test_any_frame_size_and_aspect_gives_results_at_frame_resolution(tiny_models, frames) -> None:
    tracker = StreamingTracker(tiny_models)
    for width, height in ((160, 120), (64, 200), (333, 77)):
        tracker.reset()
        tracker.track(frames(0, width, height))
        tracker.add_prompt(
            Prompt(
                points=((width / 4, height / 2),),
                point_labels=(1,),
                bounding_boxes=((0.3, 0.5, 0.5, 0.5),),
                bounding_box_labels=(1,),
            )
        )
        result = tracker.track(frames(1, width, height), timestamp=123.5)
        assert (result.width, result.height, result.timestamp) == (width, height, 123.5)
        assert result.objects, "the boxed object should be visible"
        for obj in result.objects:
            assert obj.mask.shape == (height, width) and obj.mask.dtype == bool
            assert tuple(obj.bbox) == box_of(obj.mask)
        assert set(result.timings) == {"preprocess", "encode", "track", "postprocess"}


def test_prompt_lifecycle_mid_stream(tiny_models, frames) -> None:
    """Add, refine, remove, replace a concept and reset, each from the next frame on."""
    tracker = StreamingTracker(tiny_models)
    tracker.track(frames(0))
    [a] = tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    assert [o.obj_id for o in tracker.track(frames(1)).objects] == [a]
    b, c = tracker.add_prompt(
        Prompt(bounding_boxes=((0.2, 0.2, 0.2, 0.2), (0.7, 0.7, 0.3, 0.3)), bounding_box_labels=(1, 1))
    )
    assert tracker.add_prompt(Prompt(points=((45.0, 60.0),), point_labels=(0,), obj_id=a)) == [a]
    assert {a, b, c} <= {o.obj_id for o in tracker.track(frames(2)).objects}
    tracker.remove_object(b)
    tracker.add_prompt(Prompt(text="person"))
    ids = {o.obj_id for o in tracker.track(frames(3)).objects}
    assert b not in ids and {a, c} <= ids
    text_ids = {o.obj_id for o in tracker.track(frames(4)).objects if o.label == "person"}
    assert text_ids and not text_ids & {a, b, c}, "text objects get fresh ids"
    tracker.remove_prompt("person")
    tracker.add_prompt(Prompt(text="car"))
    labels = {o.label for o in tracker.track(frames(5)).objects}
    assert "person" not in labels
    [seven] = tracker.add_prompt(Prompt(points=((100.0, 20.0),), point_labels=(1,), obj_id=70))
    assert seven == 70 and 70 in {o.obj_id for o in tracker.track(frames(6)).objects}
    tracker.reset()
    assert tracker.track(frames(7)).objects == [] and tracker.object_ids == []
    assert tracker.state_bytes() == tracker.ring.state_bytes(), "only the recent frames are held after a reset"


def test_lost_objects_retire_after_the_configured_frames(tiny_models, frames) -> None:
    from models import TrackerConfig

    limit = 5
    tracker = StreamingTracker(tiny_models, TrackerConfig(retire_after_frames=limit))
    tracker.track(frames(0))
    tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
    tracker.add_prompt(Prompt(text="person"))
    white = np.full((120, 160, 3), 255, np.uint8)  # the scene changes: some objects vanish, others appear
    last_seen: dict[int, int] = {}
    for index in range(1, 40):
        result = tracker.track(frames(index) if index < 5 or index > 25 else white)
        last_seen.update({o.obj_id: index for o in result.objects})
        for obj_id in tracker.object_ids:
            assert index - last_seen.get(obj_id, index) <= limit, f"object {obj_id} unseen for too long but kept"
    retired = set(last_seen) - set(tracker.object_ids)
    assert retired, "some objects should have been lost and retired"
