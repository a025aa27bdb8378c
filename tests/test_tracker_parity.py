"""Eviction that keeps everything SAM 3 reads must not change a single mask bit or score.

The reference is transformers' own unbounded streaming session, on a separately loaded model (the
tracker with its own image encoder; the video model with its own detector pass), fed the same
frames and the same prompts at the same frames. Ours is ``StreamingTracker`` with its rolling
memory, shared encoder pass and pruned bookkeeping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Sam3TrackerVideoModel, Sam3VideoModel
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from models import Prompt, StreamingTracker, TrackerConfig
from models.preprocess import frame_to_pixels, masks_to_frame, prompt_to_model_points, resolve_overlaps
from models.sessions import (
    add_object_inputs,
    add_text_prompt,
    drop_text_prompt,
    point_inputs,
    refine_objects,
    remove_tracker_object,
)
from models.tiny import moving_shapes

FRAMES = 300
W, H = 160, 120
KEEP_ALL = TrackerConfig(max_conditioning_frames=None, retire_after_frames=None)

Reference = dict[int, tuple[np.ndarray, float]]


def _assert_same(frame: int, ours, reference: Reference) -> None:
    got = {o.obj_id: (o.mask, o.score) for o in ours.objects}
    assert sorted(got) == sorted(reference), f"frame {frame}: objects {sorted(got)} != reference {sorted(reference)}"
    for obj_id, (mask, score) in reference.items():
        assert np.array_equal(got[obj_id][0], mask), f"frame {frame}: mask of object {obj_id} differs"
        assert got[obj_id][1] == score, f"frame {frame}: score of object {obj_id} differs"


def _visible(
    obj_ids: list[int], logits: torch.Tensor, scores: list[float]
) -> tuple[list[int], torch.Tensor, list[float]]:
    masks = masks_to_frame(logits, H, W)
    keep = [i for i in range(len(obj_ids)) if bool(masks[i].any())]
    return [obj_ids[i] for i in keep], masks[keep], [scores[i] for i in keep]


def _geometry_inputs(prompt: Prompt) -> list[dict[str, torch.Tensor]]:
    return [
        point_inputs(coords, labels, torch.device("cpu"))
        for coords, labels in prompt_to_model_points(prompt, W, H, 112)
    ]


class GeometryReference:
    """Points/boxes on transformers' Sam3TrackerVideoModel, unbounded session, own image encoder."""

    def __init__(self, folder) -> None:
        self.model = Sam3TrackerVideoModel.from_pretrained(str(folder)).eval()
        self.session: Any = None
        self.start = 0
        self.new: dict[int, dict] = {}
        self.refine: dict[int, dict] = {}

    def add(self, frame: int, obj_id: int, inputs: dict[str, torch.Tensor]) -> None:
        if self.session is None:
            self.session = Sam3TrackerVideoInferenceSession(dtype=torch.float32)
            self.start = frame
        self.new[obj_id] = inputs

    def step(self, frame: int, pixels: torch.Tensor) -> Reference:
        local = frame - self.start
        if self.new:
            add_object_inputs(self.session, local, self.new)
            self.new = {}
        out = self.model(inference_session=self.session, frame=pixels, frame_idx=local)
        logits = out.pred_masks[:, 0].clone()
        ids = list(out.object_ids)
        if self.refine:
            for obj_id, (mask, _) in refine_objects(
                self.model, self.session, local, self.refine, streaming=True
            ).items():
                logits[ids.index(obj_id)] = mask[0]
            self.refine = {}
        scores = out.object_score_logits.reshape(-1).float().sigmoid().tolist()
        ids, masks, scores = _visible(ids, logits, scores)
        return {i: (m.numpy(), s) for i, m, s in zip(ids, masks, scores, strict=True)}


def test_point_and_box_tracker_matches_unbounded_reference(tiny_models, tiny_folder) -> None:
    ours = StreamingTracker(tiny_models, KEEP_ALL)
    ref = GeometryReference(tiny_folder)
    schedule = {
        3: [("add", Prompt(points=((40.0, 60.0),), point_labels=(1,)))],
        10: [("add", Prompt(bounding_boxes=((0.75, 0.2, 0.3, 0.25),), bounding_box_labels=(1,)))],
        40: [("refine", Prompt(points=((70.0, 62.0), (30.0, 20.0)), point_labels=(1, 0), obj_id=0))],
        80: [
            (
                "add",
                Prompt(
                    points=((100.0, 60.0),),
                    point_labels=(1,),
                    bounding_boxes=((0.6, 0.5, 0.4, 0.4),),
                    bounding_box_labels=(1,),
                    obj_id=7,
                ),
            )
        ],
        120: [("remove", 1)],
        150: [("refine", Prompt(points=((90.0, 50.0),), point_labels=(1,), obj_id=7))],
        200: [
            ("add", Prompt(bounding_boxes=((0.25, 0.5, 0.3, 0.4), (0.7, 0.7, 0.2, 0.2)), bounding_box_labels=(1, 1)))
        ],
        # A chosen id (7) does not move the id counter: the two boxes of frame 200 became objects 2 and 3.
        250: [("remove", 0), ("refine", Prompt(points=((20.0, 100.0),), point_labels=(0,), obj_id=2))],
    }
    ours.track(moving_shapes(0))
    for frame in range(1, FRAMES):
        for op, arg in schedule.get(frame, []):
            if op == "add":
                created = ours.add_prompt(arg)
                for obj_id, inputs in zip(created, _geometry_inputs(arg), strict=True):
                    ref.add(frame, obj_id, inputs)
            elif op == "refine":
                ours.add_prompt(arg)
                ref.refine[arg.obj_id] = _geometry_inputs(arg)[0]
            else:
                ours.remove_object(arg)
                remove_tracker_object(ref.session, arg)
        result = ours.track(moving_shapes(frame))
        pixels = frame_to_pixels(moving_shapes(frame), 112, torch.device("cpu"), torch.float32)
        expected = ref.step(frame, pixels) if ref.session is not None else {}
        _assert_same(frame, result, expected)
    assert len(result.objects) >= 2, "the schedule should leave objects to compare"


class TextReference:
    """Text prompts on transformers' Sam3VideoModel, unbounded session, its own detector pass."""

    def __init__(self, folder, tokenizer) -> None:
        self.model = Sam3VideoModel.from_pretrained(str(folder)).eval()
        self.tokenizer = tokenizer
        self.session: Any = None
        self.start = 0
        self.refine: dict[int, dict] = {}

    def add_text(self, frame: int, text: str) -> None:
        if self.session is None:
            self.session = Sam3VideoInferenceSession(dtype=torch.float32)
            self.start = frame
        add_text_prompt(self.session, self.tokenizer, text)

    def step(self, frame: int, pixels: torch.Tensor) -> Reference:
        local = frame - self.start
        out = self.model(inference_session=self.session, frame=pixels, frame_idx=local)
        hidden = set(out.suppressed_obj_ids or ())
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden and i in self.session.obj_ids]
        if not ids:
            return {}
        logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0)
        if self.refine:
            for obj_id, (mask, _) in refine_objects(
                self.model.tracker_model, self.session, local, self.refine, streaming=False
            ).items():
                logits[ids.index(obj_id)] = mask[0]
            self.refine = {}
        scores = [float(out.obj_id_to_score[i]) for i in ids]
        tracker_scores = torch.tensor([float(out.obj_id_to_tracker_score.get(i, 0.0)) for i in ids])
        labels = [self.session.prompts[self.session.obj_id_to_prompt_id[i]] for i in ids]
        masks = masks_to_frame(logits, H, W)
        for label in set(labels):
            idx = torch.tensor([k for k, lab in enumerate(labels) if lab == label])
            masks[idx] = resolve_overlaps(masks[idx], tracker_scores[idx])
        return {ids[k]: (masks[k].numpy(), scores[k]) for k in range(len(ids)) if bool(masks[k].any())}


def test_text_prompted_model_matches_unbounded_reference(tiny_models, tiny_folder) -> None:
    ours = StreamingTracker(tiny_models, KEEP_ALL)
    ref = TextReference(tiny_folder, tiny_models.tokenizer)
    ours.track(moving_shapes(0))
    last: dict[int, Any] = {}
    for frame in range(1, FRAMES):
        text_ids = sorted(last)
        if frame == 2:
            ours.add_prompt(Prompt(text="person"))
            ref.add_text(frame, "person")
        elif frame in (30, 170) and text_ids:
            target = text_ids[0]
            click = Prompt(points=((60.0, 60.0), (10.0, 10.0)), point_labels=(1, 0), obj_id=target)
            ours.add_prompt(click)
            ref.refine[target] = _geometry_inputs(click)[0]
        elif frame == 60:
            ours.add_prompt(Prompt(text="red circle"))
            ref.add_text(frame, "red circle")
        elif frame == 100 and len(text_ids) > 1:
            ours.remove_object(text_ids[-1])
            ref.session.remove_object(text_ids[-1], strict=True)
        elif frame == 150:
            ours.remove_prompt("person")
            drop_text_prompt(ref.session, "person")
        elif frame == 200:
            ours.add_prompt(Prompt(text="dog"))
            ref.add_text(frame, "dog")
        result = ours.track(moving_shapes(frame))
        pixels = frame_to_pixels(moving_shapes(frame), 112, torch.device("cpu"), torch.float32)
        expected = ref.step(frame, pixels) if ref.session is not None else {}
        _assert_same(frame, result, expected)
        last = result.by_id()
    assert ref.session.get_obj_num() > 0, "the schedule should leave text objects to compare"
