"""Sam3VideoPredictor as its users drive it: SAM 3's documented request workflow, directions, errors, inputs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import CLIP_FRAMES
from helpers import index_frames

from models import FrameOutputs, PredictorError, PromptCoordinatesWarning, UnknownSessionError

W, H = 160, 120


def _start(predictor, path: Path) -> str:
    return predictor.handle_request({"type": "start_session", "resource_path": str(path)})["session_id"]


def _propagate(predictor, session_id: str, **fields: Any) -> list[tuple[int, FrameOutputs]]:
    request = {"type": "propagate_in_video", "session_id": session_id, **fields}
    return [(r["frame_index"], r["outputs"]) for r in predictor.handle_stream_request(request)]


def _check_outputs(outputs: FrameOutputs, width: int = W, height: int = H) -> None:
    """Every object: a boolean mask at the video's size, a probability, and the mask's own pixel box."""
    for obj_id, obj in outputs.items():
        assert isinstance(obj_id, int)
        mask = obj["mask"]
        assert mask.dtype == bool and mask.shape == (height, width) and mask.any()
        assert 0.0 <= obj["score"] <= 1.0
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert obj["bbox"] == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_sam3_documented_workflow(predictor, clip: Path) -> None:
    """Meta's README and video notebook, as their users write it (tensors included)."""
    response = predictor.handle_request(request=dict(type="start_session", resource_path=str(clip)))
    session_id = response["session_id"]
    response = predictor.handle_request(
        request=dict(type="add_prompt", session_id=session_id, frame_index=0, text="person")
    )
    assert response["frame_index"] == 0
    _check_outputs(response["outputs"])
    text_ids = set(response["outputs"])
    response = predictor.handle_request(
        request=dict(
            type="add_prompt",
            session_id=session_id,
            frame_index=0,
            points=torch.tensor([[40.0, 50.0]], dtype=torch.float32),
            point_labels=torch.tensor([1], dtype=torch.int32),
            obj_id=100,
        )
    )
    assert 100 in response["outputs"] and set(response["outputs"]) >= text_ids

    outputs_per_frame = {}
    for response in predictor.handle_stream_request(request=dict(type="propagate_in_video", session_id=session_id)):
        outputs_per_frame[response["frame_index"]] = response["outputs"]
    assert sorted(outputs_per_frame) == list(range(CLIP_FRAMES))
    for out in outputs_per_frame.values():
        _check_outputs(out)
        assert 100 in out
        # Meta's prepare_masks_for_visualization reads these keys
        for idx, obj_id in enumerate(out["out_obj_ids"].tolist()):
            assert np.array_equal(out["out_binary_masks"][idx], out[obj_id]["mask"])
            assert out["out_probs"][idx] == pytest.approx(out[obj_id]["score"])
            x0, y0, x1, y1 = out[obj_id]["bbox"]
            assert out["out_boxes_xywh"][idx] == pytest.approx([x0 / W, y0 / H, (x1 - x0) / W, (y1 - y0) / H])

    session, frames = predictor._sessions[session_id], predictor.frames(session_id)
    assert predictor.handle_request(request=dict(type="close_session", session_id=session_id)) == {"is_success": True}
    assert session.text is None and session.geometry is None and frames.cached_count == 0  # memory freed
    with pytest.raises(RuntimeError, match="session_id: no open session"):
        predictor.handle_request(dict(type="add_prompt", session_id=session_id, frame_index=0, text="person"))
    assert predictor.handle_request(dict(type="close_session", session_id=session_id)) == {"is_success": False}


def test_meta_coordinates_read_prompts_as_metas_predictor_does(predictor, tiny_models, clip: Path) -> None:
    from models import Sam3VideoPredictor

    meta = Sam3VideoPredictor(models=tiny_models, prompt_coordinates="meta")
    results = []
    for which, points, boxes in [
        (predictor, [[40.0, 60.0]], [[0.75, 0.25, 0.3, 0.3]]),  # pixels; [cx, cy, w, h]
        (meta, torch.tensor([[0.25, 0.5]]), torch.tensor([[0.6, 0.1, 0.3, 0.3]])),  # Meta: 0..1; [x, y, w, h]
    ]:
        session_id = _start(which, clip)
        which.add_prompt(session_id, 0, points=points, point_labels=torch.tensor([1]))
        out = which.add_prompt(session_id, 0, bounding_boxes=boxes, bounding_box_labels=[1])["outputs"]
        results.append({i: o["mask"] for i, o in out.items()})
        which.close_session(session_id)
    assert sorted(results[0]) == sorted(results[1]) == [0, 1]
    assert all(np.array_equal(results[0][i], results[1][i]) for i in (0, 1))
    with pytest.raises(PredictorError, match="points: with prompt_coordinates='meta', points are normalized"):
        session_id = _start(meta, clip)
        try:
            meta.add_prompt(session_id, 0, points=[[40, 60]], point_labels=[1])
        finally:
            meta.close_session(session_id)


def test_points_within_0_1_warn_once_per_session_naming_meta_coordinates(
    predictor, tiny_models, clip: Path, tmp_path: Path
) -> None:
    """A script written for Meta's predictor sends normalized points: said once per session, at the script's line."""
    from models import Sam3VideoPredictor

    first, second = _start(predictor, clip), _start(predictor, clip)
    try:
        with pytest.warns(PromptCoordinatesWarning, match=r'prompt_coordinates="meta"') as caught:
            predictor.handle_request(
                {"type": "add_prompt", "session_id": first, "frame_index": 0, "points": [[0.25, 0.5]]}
                | {"point_labels": [1]}
            )
            predictor.add_prompt(first, 0, points=[[0.5, 0.5], [1, 1]], point_labels=[1, 0], obj_id=5)
            predictor.add_prompt(second, 0, points=[[0.75, 0.25]], point_labels=[1])
        assert [w.message.args[0].split(":")[0] for w in caught] == [f"session {first}", f"session {second}"]
        assert all(w.filename == __file__ for w in caught), "points at the caller's line"
        assert "160x120 frame" in str(caught[0].message)
    finally:
        predictor.close_session(first)
        predictor.close_session(second)

    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((4, 4, 3), 90, np.uint8))
    meta = Sam3VideoPredictor(models=tiny_models, prompt_coordinates="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCoordinatesWarning)
        for which, path, points in [
            (predictor, clip, [[0.5, 0.5], [40, 50]]),  # one point beyond 1: pixels
            (predictor, tmp_path / "tiny.png", [[1, 1]]),  # a 4x4 frame: [0, 1] are real pixels
            (meta, clip, [[0.5, 0.5]]),  # read as normalized, as meant
        ]:
            session_id = _start(which, path)
            which.add_prompt(session_id, 0, points=points, point_labels=[1] * len(points))
            which.close_session(session_id)


def test_prompt_on_a_middle_frame_and_the_directions(predictor, clip: Path) -> None:
    session_id = _start(predictor, clip)
    out = predictor.handle_request(
        {
            "type": "add_prompt",
            "session_id": session_id,
            "frame_index": 10,
            "bounding_boxes": [[0.4, 0.5, 0.3, 0.4]],
            "bounding_box_labels": [1],
        }
    )
    assert out["frame_index"] == 10 and list(out["outputs"]) == [0]

    both = _propagate(predictor, session_id)  # default: both, from the first prompted frame
    assert [i for i, _ in both] == list(range(10, CLIP_FRAMES)) + list(range(9, -1, -1))
    for _, outputs in both:
        _check_outputs(outputs)

    limited = _propagate(predictor, session_id, start_frame_index=10, max_frame_num_to_track=5)
    assert [i for i, _ in limited] == [10, 11, 12, 13, 14, 9, 8, 7, 6, 5]
    backward = _propagate(predictor, session_id, propagation_direction="backward", max_frame_num_to_track=3)
    assert [i for i, _ in backward] == [10, 9, 8]
    clipped = _propagate(predictor, session_id, propagation_direction="forward", start_frame_index=20)
    assert [i for i, _ in clipped] == [20, 21, 22, 23]
    assert [i for i, _ in _propagate(predictor, session_id, propagation_direction="backward", start_frame_index=0)] == [
        0
    ]
    predictor.close_session(session_id)


def test_refine_remove_and_reset(predictor, clip: Path) -> None:
    session_id = _start(predictor, clip)
    request = {"type": "add_prompt", "session_id": session_id, "frame_index": 0}
    created = predictor.handle_request({**request, "points": [[40, 50], [120, 30]], "point_labels": [1, 1]})
    assert list(created["outputs"]) == [0]
    box = predictor.handle_request(
        {**request, "bounding_boxes": [[0.75, 0.25, 0.3, 0.3]], "bounding_box_labels": [1], "obj_id": 7}
    )
    assert sorted(box["outputs"]) == [0, 7]
    _propagate(predictor, session_id, propagation_direction="forward", max_frame_num_to_track=6)

    # a click on a tracked frame corrects the mask there (and becomes one of its prompted frames)
    before = _propagate(predictor, session_id, propagation_direction="forward", start_frame_index=3)[0][1][0]["mask"]
    refined = predictor.handle_request(
        {**request, "frame_index": 3, "points": [[40, 50], [45, 55]], "point_labels": [1, 0], "obj_id": 0}
    )
    assert not np.array_equal(refined["outputs"][0]["mask"], before)
    session = predictor._sessions[session_id]
    assert 3 in session.geometry.output_dict_per_obj[session.geometry.obj_id_to_idx(0)]["cond_frame_outputs"]

    assert predictor.handle_request({"type": "remove_object", "session_id": session_id, "obj_id": 7}) == {
        "is_success": True
    }
    assert all(sorted(out) == [0] for _, out in _propagate(predictor, session_id, propagation_direction="forward"))
    with pytest.raises(PredictorError, match=r"obj_id: no object 7 in this session \(objects: \[0\]\)"):
        predictor.remove_object(session_id, 7)

    assert predictor.handle_request({"type": "reset_session", "session_id": session_id}) == {"is_success": True}
    with pytest.raises(PredictorError, match="no prompt added yet"):
        _propagate(predictor, session_id)
    again = predictor.handle_request({**request, "points": [[40, 50]], "point_labels": [1]})
    assert list(again["outputs"]) == [0]  # ids start over after a reset
    predictor.close_session(session_id)


def test_removed_text_objects_stay_gone(predictor, clip: Path) -> None:
    session_id = _start(predictor, clip)
    found = predictor.handle_request({"type": "add_prompt", "session_id": session_id, "frame_index": 0, "text": "dog"})
    assert found["outputs"], "the tiny model finds a few 'dog's on frame 0"
    gone = min(found["outputs"])
    predictor.remove_object(session_id, gone)
    frames = _propagate(predictor, session_id, propagation_direction="forward")
    assert len(frames) == CLIP_FRAMES and all(gone not in out for _, out in frames)
    assert gone not in predictor.session_info(session_id)["objects"]
    predictor.close_session(session_id)


def test_jpeg_folder_and_image_sessions(predictor, tmp_path: Path) -> None:
    frames = index_frames(5, W, H)
    for k, frame in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"{k:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    session_id = _start(predictor, tmp_path)
    assert predictor.session_info(session_id) == {
        "num_frames": 5,
        "width": W,
        "height": H,
        "fps": 0.0,
        "objects": [],
        "text_prompts": [],
    }
    predictor.add_prompt(session_id, 2, points=[[100, 60]], point_labels=[1])
    assert sorted(i for i, _ in _propagate(predictor, session_id)) == [0, 1, 2, 3, 4]
    predictor.close_session(session_id)

    cv2.imwrite(str(tmp_path / "still.png"), np.zeros((H, W, 3), np.uint8))
    session_id = _start(predictor, tmp_path / "still.png")
    out = predictor.add_prompt(session_id, 0, text="person", points=[[10, 10]], point_labels=[1])
    _check_outputs(out["outputs"])
    assert [i for i, _ in _propagate(predictor, session_id)] == [0]
    predictor.close_session(session_id)


def test_a_change_during_propagation_ends_it(predictor, clip: Path) -> None:
    session_id = _start(predictor, clip)
    predictor.add_prompt(session_id, 0, points=[[40, 50]], point_labels=[1])
    frames = predictor.handle_stream_request({"type": "propagate_in_video", "session_id": session_id})
    next(frames)
    predictor.reset_session(session_id)
    with pytest.raises(PredictorError, match="changed during propagate_in_video"):
        next(frames)
    predictor.close_session(session_id)


BAD_REQUESTS = [
    ({"type": "launch"}, "type: handle_request does not take request type 'launch'"),
    ({"session_id": "s"}, "type: handle_request does not take request type None"),
    ({"type": "propagate_in_video", "session_id": "S"}, "send 'propagate_in_video' through handle_stream_request"),
    ({"type": "add_prompt", "session_id": "S", "frame_idx": 0}, "frame_idx: unknown field for add_prompt"),
    ({"type": "add_prompt", "session_id": "S"}, "frame_index: required by add_prompt"),
    ({"type": "add_prompt", "session_id": "nope", "frame_index": 0, "text": "a"}, "session_id: no open session 'nope'"),
    (
        {"type": "add_prompt", "session_id": "S", "frame_index": 24, "text": "a"},
        "frame_index: frame 24 is out of range",
    ),
    ({"type": "add_prompt", "session_id": "S", "frame_index": -1, "text": "a"}, "frame_index: must be between 0"),
    ({"type": "add_prompt", "session_id": "S", "frame_index": 0}, "prompt: give at least one of text"),
    ({"type": "add_prompt", "session_id": "S", "frame_index": 0, "text": 5}, "text: must be a string"),
    (
        {"type": "add_prompt", "session_id": "S", "frame_index": 0, "points": [[1, 2]], "point_labels": [3]},
        "point_labels: each label must be 0 or 1",
    ),
    (
        {"type": "add_prompt", "session_id": "S", "frame_index": 0, "points": [[500, 2]], "point_labels": [1]},
        r"points: \(500, 2\) lies outside the 160x120 frame",
    ),
    (
        {
            "type": "add_prompt",
            "session_id": "S",
            "frame_index": 0,
            "text": "dog",
            "bounding_boxes": [[0.5, 0.5, 0.2, 0.2]],
            "bounding_box_labels": [1],
        },
        "bounding_boxes: a box given with text is a visual exemplar",
    ),
    (
        {"type": "add_prompt", "session_id": "S", "frame_index": 0, "bounding_boxes": [[0.5, 0.5, 0.2, 0.2]]}
        | {"bounding_box_labels": [0]},
        "bounding_box_labels: negative boxes",
    ),
    ({"type": "remove_object", "session_id": "S", "obj_id": 3}, "obj_id: no object 3 in this session"),
    ({"type": "remove_object", "session_id": "S", "obj_id": "3"}, "obj_id: must be an integer"),
    ({"type": "remove_object", "session_id": "S", "obj_id": 3, "is_user_action": "yes"}, "is_user_action: must be"),
    ({"type": "start_session"}, "resource_path: required by start_session"),
    ({"type": "start_session", "resource_path": "/no/such/clip.mp4"}, "resource_path: /no/such/clip.mp4: no such"),
    ({"type": "start_session", "resource_path": "CLIP", "session_id": "S"}, "session_id: a session 'S' is already"),
    ({"type": "start_session", "resource_path": "CLIP", "session_id": ""}, "session_id: must be a non-empty string"),
]

BAD_STREAMS = [
    ({"type": "add_prompt", "session_id": "S"}, "type: handle_stream_request does not take request type 'add_prompt'"),
    ({"type": "propagate_in_video", "session_id": "S"}, "session: no prompt added yet"),
    ({"type": "propagate_in_video", "session_id": "gone"}, "session_id: no open session 'gone'"),
    ({"type": "propagate_in_video", "session_id": "S", "propagation_direction": "up"}, "propagation_direction: must"),
    ({"type": "propagate_in_video", "session_id": "S", "start_frame_index": 99}, "start_frame_index: frame 99 is out"),
    ({"type": "propagate_in_video", "session_id": "S", "max_frame_num_to_track": 0}, "max_frame_num_to_track: must"),
]


def test_every_bad_request_says_what_is_wrong(predictor, clip: Path) -> None:
    predictor.handle_request({"type": "start_session", "resource_path": str(clip), "session_id": "S"})
    try:
        cases = [(predictor.handle_request, *case) for case in BAD_REQUESTS]
        cases += [(predictor.handle_stream_request, *case) for case in BAD_STREAMS]
        for handle, request, message in cases:
            request = {k: str(clip) if v == "CLIP" else v for k, v in request.items()}
            with pytest.raises(RuntimeError, match=message):
                handle(request)
        with pytest.raises(UnknownSessionError):
            predictor.reset_session("gone")
        with pytest.raises(PredictorError, match="request: must be a dict"):
            predictor.handle_request(["start_session"])  # type: ignore[arg-type]
    finally:
        predictor.close_session("S")


def test_long_video_is_decoded_on_demand_and_state_stays_flat(tiny_models, tmp_path: Path) -> None:
    from helpers import write_video

    from models import Sam3VideoPredictor
    from models.memory import state_bytes
    from models.tiny import moving_shapes

    count, cache = 80, 8
    path = write_video(tmp_path / "long.mp4", (moving_shapes(i, 96, 72) for i in range(count)), gop=24)
    predictor = Sam3VideoPredictor(models=tiny_models, cache_frames=cache)
    session_id = predictor.start_session(path)["session_id"]
    predictor.add_prompt(session_id, 0, points=[[30, 36]], point_labels=[1])
    predictor.add_prompt(session_id, 0, bounding_boxes=[[0.7, 0.3, 0.3, 0.3]], bounding_box_labels=[1])
    session, frames = predictor._sessions[session_id], predictor.frames(session_id)
    state: dict[int, int] = {}
    for response in predictor.propagate_in_video(session_id, "forward"):
        assert frames.cached_count <= cache
        assert sorted(response["outputs"]) == [0, 1]
        if response["frame_index"] in (30, count - 1):
            state[response["frame_index"]] = state_bytes(session.geometry)
    assert frames.decoded_count == count, "forward: every frame decoded once, none kept beyond the cache"
    assert abs(state[count - 1] - state[30]) <= 0.05 * state[30], "per-frame outputs do not pile up"
    for outputs in session.geometry.output_dict_per_obj.values():
        assert len(outputs["non_cond_frame_outputs"]) <= session.window.pointer_frames

    decoded = frames.decoded_count
    backward = list(predictor.propagate_in_video(session_id, "backward", start_frame_idx=count - 1))
    assert [r["frame_index"] for r in backward] == list(range(count - 1, -1, -1))
    assert frames.decoded_count - decoded <= count * (1 + 24 / cache)
    predictor.close_session(session_id)


def test_one_predictor_serves_threads(predictor, clip: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(start: int) -> list[tuple[int, list[int]]]:
        session_id = _start(predictor, clip)
        try:
            predictor.add_prompt(session_id, start, points=[[40, 50]], point_labels=[1])
            return [(i, sorted(out)) for i, out in _propagate(predictor, session_id, propagation_direction="forward")]
        finally:
            predictor.close_session(session_id)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(run, [0, 12])
    assert first == [(i, [0]) for i in range(CLIP_FRAMES)]
    assert second == [(i, [0]) for i in range(12, CLIP_FRAMES)]
