"""The predictor's bounded sessions give transformers' own results, bit for bit.

The reference is transformers' documented offline flow: the whole video preprocessed into an
unbounded inference session (every frame's pixels and outputs kept), prompts added, then
``propagate_in_video_iterator`` forward and backward from the prompted frame. Ours decodes frames
on demand, keeps only what the next frame reads (and, for ``both``, what the backward leg will read),
and shares one encoder pass. The video is longer than the tracker's reach (15 frames), so pruning
happens on both legs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from helpers import write_video
from transformers import Sam3TrackerVideoModel
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from models import Prompt
from models.preprocess import frame_to_pixels, prompt_to_model_points
from models.sessions import add_object_inputs, add_text_prompt, point_inputs
from models.tiny import moving_shapes
from models.video_session import objects_from_logits, text_objects

FRAMES, START = 40, 20
W, H = 160, 120
Frame = dict[int, tuple[np.ndarray, float]]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("parity") / "long.mp4", (moving_shapes(i, W, H) for i in range(FRAMES)))


def _video_tensor(path: Path, size: int) -> torch.Tensor:
    """The clip decoded front to back by PyAV (not by the predictor's decoder), preprocessed alike."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.cat([frame_to_pixels(f, size, torch.device("cpu"), torch.float32) for f in frames])


def _shown(objects) -> Frame:
    return {o.obj_id: (o.mask, o.score) for o in objects}


def _text_reference(models, video: torch.Tensor, text: str, start: int = START) -> list[tuple[int, Frame]]:
    model = models.video_model
    session = Sam3VideoInferenceSession(video=video, video_height=H, video_width=W, dtype=torch.float32)
    add_text_prompt(session, models.tokenizer, text)
    frames = []
    for reverse in (False, True):
        for out in model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
            # shown as transformers' video processor shows them, at the moment the iterator yields
            frames.append((out.frame_idx, _shown(text_objects(out, session, H, W))))
    return frames


def _geometry_reference(folder: Path, video: torch.Tensor, prompt: Prompt) -> list[tuple[int, Frame]]:
    tracker = Sam3TrackerVideoModel.from_pretrained(str(folder)).eval()
    session = Sam3TrackerVideoInferenceSession(video=video, video_height=H, video_width=W, dtype=torch.float32)
    per_object = prompt_to_model_points(prompt, W, H, 112)
    inputs = {i: point_inputs(coords, labels, torch.device("cpu")) for i, (coords, labels) in enumerate(per_object)}
    add_object_inputs(session, START, inputs)
    tracker(inference_session=session, frame_idx=START)
    legs = [
        tracker.propagate_in_video_iterator(session, start_frame_idx=START),
        tracker.propagate_in_video_iterator(session, start_frame_idx=START - 1, reverse=True),
    ]
    frames = []
    for leg in legs:
        for out in leg:
            scores = out.object_score_logits.reshape(-1).float().sigmoid()
            objects = objects_from_logits(list(out.object_ids), out.pred_masks[:, 0], scores, H, W)
            frames.append((out.frame_idx, _shown(objects)))
    return frames


@pytest.mark.parametrize("kind", ["text", "geometry"])
def test_bounded_propagation_equals_transformers_own_session(
    kind: str, predictor, tiny_models, tiny_folder: Path, long_clip: Path
) -> None:
    boxes = ((0.3, 0.5, 0.3, 0.4), (0.7, 0.3, 0.3, 0.4))  # two objects
    prompt = Prompt(text="person") if kind == "text" else Prompt(bounding_boxes=boxes, bounding_box_labels=(1, 1))
    video = _video_tensor(long_clip, tiny_models.image_size)
    with torch.inference_mode():
        if kind == "text":
            reference = _text_reference(tiny_models, video, "person")
        else:
            reference = _geometry_reference(tiny_folder, video, prompt)

    session_id = predictor.start_session(long_clip)["session_id"]
    predictor.add_prompt(session_id, START, **prompt.to_dict())
    ours = [(r["frame_index"], r["outputs"]) for r in predictor.propagate_in_video(session_id, "both")]
    session = predictor._sessions[session_id]
    sessions = [s for s in (session.text, session.geometry) if s is not None]
    held = [len(out["non_cond_frame_outputs"]) for s in sessions for out in s.output_dict_per_obj.values()]
    predictor.close_session(session_id)

    assert (
        [i for i, _ in ours] == [i for i, _ in reference] == list(range(START, FRAMES)) + list(range(START - 1, -1, -1))
    )
    assert held and max(held) <= session.window.pointer_frames  # bounded, yet nothing the model read was lost
    _assert_same(ours, reference)


def test_text_prompt_on_a_clip_shorter_than_the_hot_start_hold_back(predictor, tiny_models, tmp_path: Path) -> None:
    """SAM 3 holds text-found objects back ``hotstart_delay`` (15) frames and flushes the held frames when the
    propagation ends: a 6-frame clip still gets every frame, each with the objects the model found there.
    ``add_prompt`` answers with the prompted frame's detections at once (as Meta's predictor does)."""
    count = 6
    assert count < tiny_models.video_model.hotstart_delay
    path = write_video(tmp_path / "short.mp4", (moving_shapes(i, W, H) for i in range(count)))
    with torch.inference_mode():
        reference = _text_reference(tiny_models, _video_tensor(path, tiny_models.image_size), "person", start=0)

    session_id = predictor.start_session(path)["session_id"]
    prompted = predictor.add_prompt(session_id, 0, text="person")["outputs"]
    ours = [(r["frame_index"], r["outputs"]) for r in predictor.propagate_in_video(session_id, "forward")]
    predictor.close_session(session_id)

    assert prompted, "the prompted frame's detections, before any propagation"
    assert set(ours[0][1]) <= set(prompted)  # propagation may hide some (SAM 3's hot-start heuristics)
    assert [i for i, _ in ours] == [i for i, _ in reference] == list(range(count))
    assert all(expected for _, expected in reference), "the tiny model finds an object on every frame of this clip"
    _assert_same(ours, reference)


def _assert_same(ours: list[tuple[int, Any]], reference: list[tuple[int, Frame]]) -> None:
    """Frame by frame, the same objects with the same masks and scores."""
    for (frame, got), (_, expected) in zip(ours, reference, strict=True):
        assert sorted(got) == sorted(expected), f"frame {frame}: objects {sorted(got)} != {sorted(expected)}"
        for obj_id, (mask, score) in expected.items():
            assert np.array_equal(got[obj_id]["mask"], mask), f"frame {frame}: mask of {obj_id} differs"
            assert got[obj_id]["score"] == pytest.approx(score, abs=1e-6), f"frame {frame}: score of {obj_id}"
