"""The prompt vocabulary: round trips, and only ValueError for anything a client can send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import Prompt

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    ["text", "points", "point_labels", "bounding_boxes", "bounding_box_labels", "obj_id", "frame_index", "seq", "other"]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(fields, json_values, max_size=5))
def test_from_dict_accepts_or_raises_value_error_naming_a_field(data) -> None:
    try:
        prompt = Prompt.from_dict(data)
    except ValueError as error:
        assert str(error).split(":")[0] in {*data, "prompt"} or str(error).startswith(("points", "bounding_boxes"))
    else:
        assert Prompt.from_dict(prompt.to_dict()) == prompt


def test_round_trip_of_a_full_prompt() -> None:
    prompt = Prompt(
        text="the ox horns",
        points=((1.5, 2.0), (3.0, 4.0)),
        point_labels=(1, 0),
        bounding_boxes=((0.5, 0.5, 0.2, 0.2),),
        bounding_box_labels=(1,),
        obj_id=3,
        frame_index=10,
        seq=12,
    )
    assert Prompt.from_dict(prompt.to_dict()) == prompt


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"points": [[10**400, 1]], "point_labels": [1]}, "points: number too large"),
        ({"points": [[1, 1]], "point_labels": [10**400]}, "point_labels: each label must be 0 or 1"),
        ({"obj_id": 10**30, "points": [[1, 1]], "point_labels": [1]}, "obj_id: must be between"),
        ({"obj_id": 2**63 - 1, "points": [[1, 1]], "point_labels": [1]}, "obj_id: must be between 0 and 2147483647"),
        ({"obj_id": 2**31, "points": [[1, 1]], "point_labels": [1]}, "obj_id: must be between 0 and 2147483647"),
        ({"seq": -1, "points": [[1, 1]], "point_labels": [1]}, "seq: must be between 0 and"),
        ({"seq": "7", "points": [[1, 1]], "point_labels": [1]}, "seq: must be an integer"),
        ({"text": "\ud800"}, "text: not valid Unicode"),
        ({"text": "cat \udfff"}, "text: not valid Unicode"),
        ({"text": "x" * 500}, "text: longer than"),
        ({"text": "person", "obj_id": 2}, "obj_id: a text prompt finds its own objects"),
        ({"bounding_boxes": [[0.5, 0.5, 0.1, 0.1]], "bounding_box_labels": [0]}, "bounding_box_labels: negative boxes"),
        ("person", "prompt: expected an object"),
    ],
)
def test_messages_name_the_field(fields, message) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        Prompt.from_dict(fields)


def test_a_prompt_splits_into_one_prompt_per_object() -> None:
    boxes = Prompt.from_dict(
        {"text": "cup", "bounding_boxes": [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], "bounding_box_labels": [1, 1]}
    )
    assert boxes.object_count == 2
    first, second = boxes.per_object([7, 9])
    assert (first.obj_id, first.bounding_boxes, first.text) == (7, ((0.5, 0.5, 0.2, 0.2),), None)
    assert (second.obj_id, second.bounding_boxes) == (9, ((0.2, 0.2, 0.1, 0.1),))
    clicks = Prompt.from_dict({"points": [[1, 2], [3, 4]], "point_labels": [1, 0]})
    assert clicks.object_count == 1 and clicks.per_object([5]) == [
        Prompt(points=clicks.points, point_labels=(1, 0), obj_id=5)
    ]
    assert Prompt(text="cup").object_count == 0
    with pytest.raises(ValueError, match="^obj_id: 1 ids for 2 objects"):
        boxes.per_object([1])
