"""Eviction that keeps everything SAM 3 reads must not change a single mask bit or score.

The reference is transformers' own unbounded streaming session, on a separately loaded model (the
tracker with its own image encoder; the video model with its own detector pass), fed the same
frames and the same prompts at the same frames. Ours is ``StreamingTracker`` with its rolling
memory, shared encoder pass and pruned bookkeeping, in the setting the README's guarantee names
(exact memory, objects unbatched).

The reference shares no code with the package: prompts go through transformers' own processor
code (built without its torchvision image processors), and what transformers does not offer
(pixels, a correction click on a tracked frame, removing a clicked object or a concept, the
non-overlap rule on text objects) is written here, from SAM 3's rules, using transformers' methods.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Sam3TrackerVideoModel, Sam3VideoModel
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_tracker_video.processing_sam3_tracker_video import Sam3TrackerVideoProcessor
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession
from transformers.models.sam3_video.processing_sam3_video import Sam3VideoProcessor

from models import Prompt, StreamingTracker, TrackerConfig
from models.tiny import TINY_IMAGE_SIZE, moving_shapes

FRAMES = 300
SIZE = TINY_IMAGE_SIZE
EXACT = TrackerConfig(max_conditioning_frames=None, retire_after_frames=None, batch_objects=False)

Reference = dict[int, tuple[np.ndarray, float]]


def _assert_same(frame: int, ours, reference: Reference) -> None:
    got = {o.obj_id: (o.mask, o.score) for o in ours.objects}
    assert sorted(got) == sorted(reference), f"frame {frame}: objects {sorted(got)} != reference {sorted(reference)}"
    for obj_id, (mask, score) in reference.items():
        assert np.array_equal(got[obj_id][0], mask), f"frame {frame}: mask of object {obj_id} differs"
        assert got[obj_id][1] == score, f"frame {frame}: score of object {obj_id}: {got[obj_id][1]} != {score}"


# ----------------------------------------------------------------- the reference's own pieces


def _pixels(frame: np.ndarray) -> torch.Tensor:
    """SAM 3's input: the RGB frame resized to the model's square (bilinear, antialiased), scaled to
    [0, 1], normalized with mean = std = 0.5."""
    image = torch.from_numpy(frame).permute(2, 0, 1)[None].to(torch.float32)
    image = F.interpolate(image, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (image / 255.0 - 0.5) / 0.5


def _frame_masks(low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Low-resolution logits ``N x h x w`` -> boolean masks at frame size (as transformers' post-processing)."""
    return F.interpolate(low_res[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0] > 0


def _box_pixels(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """A normalized ``cx, cy, w, h`` box as the pixel corners ``x0, y0, x1, y1`` the processor takes."""
    cx, cy, w, h = box
    return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]


def _processor(cls: type) -> Any:
    """transformers' processor class without its image/video processors (they need torchvision)."""
    processor = object.__new__(cls)
    processor.target_size = SIZE
    processor.point_pad_value = -10
    return processor


def _click_inputs(prompt: Prompt, width: int, height: int) -> dict[str, torch.Tensor]:
    """One object's clicks in model coordinates, by transformers' processor arithmetic."""
    encoded = _processor(Sam3TrackerVideoProcessor)(
        input_points=[[[list(p) for p in prompt.points]]],
        input_labels=[[list(prompt.point_labels)]],
        original_sizes=[[height, width]],
        return_tensors="pt",
    )
    return {"point_coords": encoded["input_points"], "point_labels": encoded["input_labels"]}


@torch.inference_mode()
def _correct(tracker: Any, session: Any, frame_idx: int, clicks: dict[int, dict], streaming: bool) -> dict[int, Any]:
    """SAM 3's correction of tracked objects with clicks on a frame they were already tracked on: the
    object's step re-run with the clicks from its memory; the frame becomes a conditioning frame (SAM 3
    adds every corrected frame as one) and its memory is re-encoded from the clicked mask.
    Returns ``obj_id -> (low-res logits 1 x h x w, score logit)``."""
    corrected, indices, masks, scores = {}, [], [], []
    for obj_id, inputs in clicks.items():
        obj_idx = session.obj_id_to_idx(obj_id)
        session.point_inputs_per_obj[obj_idx][frame_idx] = inputs
        out = tracker._run_single_frame_inference(
            inference_session=session,
            frame_idx=frame_idx,
            obj_idx=obj_idx,
            batch_size=1,
            is_init_cond_frame=False,
            point_inputs=inputs,
            mask_inputs=None,
            reverse=False,
            streaming=streaming,
        )
        outputs = session.output_dict_per_obj[obj_idx]
        outputs["non_cond_frame_outputs"].pop(frame_idx, None)
        outputs["cond_frame_outputs"][frame_idx] = out
        indices.append(obj_idx)
        masks.append(out["high_res_masks"])
        scores.append(out["object_score_logits"])
        corrected[obj_id] = (out["pred_masks"][:, 0], out["object_score_logits"].reshape(()))
    tracker._batch_encode_memories(
        inference_session=session,
        frame_idx=frame_idx,
        objects_needing_memory_encoding=indices,
        high_res_masks_for_memory=masks,
        object_score_logits_for_memory=scores,
        is_mask_from_pts_per_obj=[True] * len(indices),
    )
    return corrected


# ---------------------------------------------------------------------- clicked and boxed objects

GW, GH = 200, 150  # 112/150 is not a float32 number: clicks scaled any other way land an ulp off


class GeometryReference:
    """Points/boxes on transformers' Sam3TrackerVideoModel, unbounded session, own image encoder."""

    def __init__(self, folder) -> None:
        self.model = Sam3TrackerVideoModel.from_pretrained(str(folder)).eval()
        self.session: Any = None
        self.start = 0
        self.new: list[tuple[int, Prompt]] = []
        self.corrections: dict[int, Prompt] = {}

    def add(self, frame: int, obj_ids: list[int], prompt: Prompt) -> None:
        if self.session is None:
            self.session = Sam3TrackerVideoInferenceSession(dtype=torch.float32)
            self.session.obj_id_to_prompt_id = {}  # lets transformers' remove_object (text sessions) run on it
            self.start = frame
        self.new += [(obj_id, prompt) for obj_id in obj_ids]

    def remove(self, obj_id: int) -> None:
        Sam3VideoInferenceSession.remove_object(self.session, obj_id, strict=True)

    def _prompt_new_objects(self, local: int) -> None:
        """All objects starting on this frame in one call per prompt shape (the processor pads clicks)."""
        processor = _processor(Sam3TrackerVideoProcessor)
        started: list[int] = []
        for obj_id, prompt in self.new:
            processor.add_inputs_to_inference_session(
                self.session,
                frame_idx=local,
                obj_ids=[obj_id],
                input_points=[[[list(p) for p in prompt.points]]] if prompt.points else None,
                input_labels=[[list(prompt.point_labels)]] if prompt.points else None,
                input_boxes=[[_box_pixels(prompt.bounding_boxes[0], GW, GH)]] if prompt.bounding_boxes else None,
                original_size=(GH, GW),
            )
            started.append(obj_id)
        self.session.obj_with_new_inputs = started
        self.new = []

    def step(self, frame: int, pixels: torch.Tensor) -> Reference:
        local = frame - self.start
        if self.new:
            self._prompt_new_objects(local)
        if self.session.get_obj_num() == 0:
            return {}
        out = self.model(inference_session=self.session, frame=pixels, frame_idx=local)
        ids = list(out.object_ids)
        logits = out.pred_masks[:, 0].clone()
        scores = out.object_score_logits.reshape(-1).float().sigmoid()
        if self.corrections:
            clicks = {obj_id: _click_inputs(p, GW, GH) for obj_id, p in self.corrections.items()}
            for obj_id, (mask, score) in _correct(self.model, self.session, local, clicks, streaming=True).items():
                logits[ids.index(obj_id)] = mask[0]
                scores[ids.index(obj_id)] = score.float().sigmoid()  # the corrected pass's score
            self.corrections = {}
        masks = _frame_masks(logits, GH, GW)
        return {i: (masks[k].numpy(), float(scores[k])) for k, i in enumerate(ids) if bool(masks[k].any())}


def test_point_and_box_tracker_matches_unbounded_reference(tiny_models, tiny_folder) -> None:
    ours = StreamingTracker(tiny_models, EXACT)
    ref = GeometryReference(tiny_folder)
    schedule = {
        3: [("add", Prompt(points=((40.3, 61.7),), point_labels=(1,)))],
        10: [("add", Prompt(bounding_boxes=((0.75, 0.2, 0.3, 0.25),), bounding_box_labels=(1,)))],
        40: [("refine", Prompt(points=((70.1, 62.9), (30.7, 20.2)), point_labels=(1, 0), obj_id=0))],
        80: [
            (
                "add",
                Prompt(
                    points=((100.6, 60.4),),
                    point_labels=(1,),
                    bounding_boxes=((0.6, 0.5, 0.4, 0.4),),
                    bounding_box_labels=(1,),
                    obj_id=7,
                ),
            )
        ],
        120: [("remove", 1)],
        150: [("refine", Prompt(points=((90.2, 50.9),), point_labels=(1,), obj_id=7))],
        200: [
            ("add", Prompt(bounding_boxes=((0.25, 0.5, 0.3, 0.4), (0.7, 0.7, 0.2, 0.2)), bounding_box_labels=(1, 1)))
        ],
        # A chosen id (7) does not move the id counter: the two boxes of frame 200 became objects 2 and 3.
        250: [
            ("remove", 0),
            ("refine", Prompt(points=((20.5, 100.3),), point_labels=(0,), obj_id=2)),
            ("refine", Prompt(points=((150.8, 105.1),), point_labels=(1,), obj_id=3)),
        ],
    }
    ours.track(moving_shapes(0, GW, GH))
    for frame in range(1, FRAMES):
        for op, arg in schedule.get(frame, []):
            if op == "add":
                created = ours.add_prompt(arg)
                for obj_id, prompt in zip(created, _one_prompt_per_object(arg), strict=True):
                    ref.add(frame, [obj_id], prompt)
            elif op == "refine":
                ours.add_prompt(arg)
                ref.corrections[arg.obj_id] = arg
            else:
                ours.remove_object(arg)
                ref.remove(arg)
        image = moving_shapes(frame, GW, GH)
        result = ours.track(image)
        expected = ref.step(frame, _pixels(image)) if ref.session is not None else {}
        _assert_same(frame, result, expected)
    assert len(result.objects) >= 2, "the schedule should leave objects to compare"


def _one_prompt_per_object(prompt: Prompt) -> list[Prompt]:
    """Several boxes without clicks make one object each; anything else is one object."""
    if prompt.points or len(prompt.bounding_boxes) <= 1:
        return [prompt]
    return [Prompt(bounding_boxes=(box,), bounding_box_labels=(1,)) for box in prompt.bounding_boxes]


# ------------------------------------------------------------------------------ text concepts

TW, TH = 160, 120


class TextReference:
    """Text prompts on transformers' Sam3VideoModel, unbounded session, its own detector pass."""

    def __init__(self, folder, tokenizer) -> None:
        self.model = Sam3VideoModel.from_pretrained(str(folder)).eval()
        self.processor = _processor(Sam3VideoProcessor)
        self.processor.tokenizer = tokenizer
        self.session: Any = None
        self.start = 0
        self.corrections: dict[int, Prompt] = {}

    def add_text(self, frame: int, text: str) -> None:
        if self.session is None:
            self.session = Sam3VideoInferenceSession(dtype=torch.float32)
            self.start = frame
        self.processor.add_text_prompt(self.session, text)

    def drop_text(self, text: str) -> None:
        """Remove a concept and its objects; the remaining prompts keep dense ids, as transformers numbers them."""
        session = self.session
        prompt_id = next(pid for pid, t in session.prompts.items() if t == text)
        for obj_id in [o for o, pid in session.obj_id_to_prompt_id.items() if pid == prompt_id]:
            session.remove_object(obj_id, strict=True)
        tables = ("prompt_input_ids", "prompt_embeddings", "prompt_attention_masks")
        old = {name: dict(getattr(session, name)) for name in tables}
        kept = [(pid, t) for pid, t in sorted(session.prompts.items()) if pid != prompt_id]
        session.prompts = {}
        for name in tables:
            getattr(session, name).clear()
        renumbered = {}
        for pid, kept_text in kept:
            renumbered[pid] = session.add_prompt(kept_text)
            for name in tables:
                if pid in old[name]:
                    getattr(session, name)[renumbered[pid]] = old[name][pid]
        session.obj_id_to_prompt_id = {o: renumbered[p] for o, p in session.obj_id_to_prompt_id.items()}

    def step(self, frame: int, pixels: torch.Tensor) -> Reference:
        local = frame - self.start
        session = self.session
        out = self.model(inference_session=session, frame=pixels, frame_idx=local)
        hidden = set(out.suppressed_obj_ids or ())
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden and i in session.obj_ids]
        if not ids:
            return {}
        logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0)
        scores = [float(out.obj_id_to_score[i]) for i in ids]
        tracker_scores = torch.tensor([float(out.obj_id_to_tracker_score.get(i, 0.0)) for i in ids])
        if self.corrections:
            clicks = {obj_id: _click_inputs(p, TW, TH) for obj_id, p in self.corrections.items()}
            for obj_id, (mask, score) in _correct(
                self.model.tracker_model, session, local, clicks, streaming=False
            ).items():
                row = ids.index(obj_id)
                logits[row] = mask[0]
                scores[row] = float(score.float().sigmoid())  # the corrected pass's score
                tracker_scores[row] = score.float().sigmoid()
            self.corrections = {}
        masks = _frame_masks(logits, TH, TW)
        # transformers' own non-overlap rule per concept: each pixel to the claiming object of best tracker score
        resolved = self.processor._apply_object_wise_non_overlapping_constraints(
            masks[:, None].float(),
            tracker_scores[:, None],
            background_value=0,
            prompt_ids=[session.obj_id_to_prompt_id[i] for i in ids],
        )[:, 0]
        masks = resolved > 0
        return {ids[k]: (masks[k].numpy(), scores[k]) for k in range(len(ids)) if bool(masks[k].any())}


def test_text_prompted_model_matches_unbounded_reference(tiny_models, tiny_folder) -> None:
    ours = StreamingTracker(tiny_models, EXACT)
    ref = TextReference(tiny_folder, tiny_models.tokenizer)
    ours.track(moving_shapes(0, TW, TH))
    last: dict[int, Any] = {}
    ran: list[str] = []
    for frame in range(1, FRAMES):
        text_ids = sorted(last)
        if frame == 2:
            ours.add_prompt(Prompt(text="person"))
            ref.add_text(frame, "person")
        elif frame in (30, 170) and text_ids:
            target = text_ids[0]
            click = Prompt(points=((60.3, 60.7), (10.1, 10.9)), point_labels=(1, 0), obj_id=target)
            ours.add_prompt(click)
            ref.corrections[target] = click
            ran.append(f"correct {frame}")
        elif frame == 60:
            ours.add_prompt(Prompt(text="red circle"))
            ref.add_text(frame, "red circle")
        elif frame == 100 and len(text_ids) > 1:
            ours.remove_object(text_ids[-1])
            ref.session.remove_object(text_ids[-1], strict=True)
            ran.append("remove 100")
        elif frame == 150:
            ours.remove_prompt("person")
            ref.drop_text("person")
        elif frame == 200:
            ours.add_prompt(Prompt(text="dog"))
            ref.add_text(frame, "dog")
        image = moving_shapes(frame, TW, TH)
        result = ours.track(image)
        expected = ref.step(frame, _pixels(image)) if ref.session is not None else {}
        _assert_same(frame, result, expected)
        last = result.by_id()
    assert ran == ["correct 30", "remove 100", "correct 170"], f"schedule steps that did not run: {ran}"
    assert ref.session.get_obj_num() > 0, "the schedule should leave text objects to compare"


# ----------------------------------------------------------- prompts placed on a past frame (prompt ring)

RING_EXACT = replace(EXACT, prompt_ring_seconds=None, prompt_ring_frames=24)
CAUGHT_UP_AT = 30  # the frame before which the late prompt arrives
FIRST_CLICK = Prompt(points=((40.3, 61.7),), point_labels=(1,))


LATE_BOX = Prompt(bounding_boxes=((0.75, 0.2, 0.3, 0.25),), bounding_box_labels=(1,))


@pytest.mark.parametrize("back", [5, 20])
def test_object_started_on_a_past_frame_matches_reference_prompted_there(tiny_models, tiny_folder, back) -> None:
    """A new object drawn ``back`` frames ago: from the catch-up on, its masks and scores are transformers'
    unbounded session's given the prompt on that frame."""
    ours = StreamingTracker(tiny_models, RING_EXACT)
    ref = GeometryReference(tiny_folder)
    drawn_on = CAUGHT_UP_AT - back
    ref.add(drawn_on, [0], LATE_BOX)
    for frame in range(CAUGHT_UP_AT + 10):
        if frame == CAUGHT_UP_AT:
            assert ours.prompt_frame(drawn_on) == drawn_on
            assert ours.add_prompt(replace(LATE_BOX, frame_index=drawn_on), frame_size=(GW, GH)) == [0]
        image = moving_shapes(frame, GW, GH)
        result = ours.track(image)
        expected = ref.step(frame, _pixels(image)) if frame >= drawn_on else {}
        if frame >= CAUGHT_UP_AT:
            _assert_same(frame, result, expected)
        else:
            assert not result.objects
    assert result.objects, "the object should be visible to compare"


def test_catch_up_leaves_the_other_objects_untouched(tiny_models, tiny_folder) -> None:
    """With another object tracked, the late object's first caught-up frame equals its reference's and the
    other object's equals a reference that never saw the late prompt: the catch-up spent steps on the late
    object only. (From the next frame on the two objects share the memory encoder's batch, whose rounding
    depends on the batch; transformers' own session, prompted on the past frame, would moreover binarize the
    other object's memory there. Neither is what a prompt on that frame means, so later frames are not
    compared bit for bit.)"""
    ours = StreamingTracker(tiny_models, RING_EXACT)
    drawn_on = CAUGHT_UP_AT - 20
    tracked_all_along, started_late = GeometryReference(tiny_folder), GeometryReference(tiny_folder)
    tracked_all_along.add(2, [0], FIRST_CLICK)
    started_late.add(drawn_on, [1], LATE_BOX)
    for frame in range(CAUGHT_UP_AT + 1):
        if frame == 2:
            assert ours.add_prompt(FIRST_CLICK, frame_size=(GW, GH)) == [0]
        if frame == CAUGHT_UP_AT:
            assert ours.add_prompt(replace(LATE_BOX, frame_index=drawn_on)) == [1]
        image = moving_shapes(frame, GW, GH)
        result = ours.track(image)
        expected = tracked_all_along.step(frame, _pixels(image)) if frame >= 2 else {}
        late_expected = started_late.step(frame, _pixels(image)) if frame >= drawn_on else {}
        _assert_same(frame, result, expected | late_expected if frame == CAUGHT_UP_AT else expected)
    assert {o.obj_id for o in result.objects} == {0, 1}, "both objects should be visible to compare"


@pytest.mark.parametrize("back", [5, 20])
def test_correction_on_a_past_frame_matches_reference_corrected_there(tiny_models, tiny_folder, back) -> None:
    """A correction of a tracked object drawn ``back`` frames ago: from the catch-up on, its masks are
    transformers' unbounded session's given the correction on that frame."""
    ours = StreamingTracker(tiny_models, RING_EXACT)
    ref = GeometryReference(tiny_folder)
    ref.add(2, [0], FIRST_CLICK)
    drawn_on = CAUGHT_UP_AT - back
    correction = Prompt(points=((70.1, 62.9), (30.7, 20.2)), point_labels=(1, 0), obj_id=0)
    for frame in range(CAUGHT_UP_AT + 8):
        if frame == 2:
            ours.add_prompt(FIRST_CLICK, frame_size=(GW, GH))
        if frame == drawn_on:
            ref.corrections[0] = correction
        if frame == CAUGHT_UP_AT:
            assert ours.prompt_frame(drawn_on, refines=0) == drawn_on
            assert ours.add_prompt(replace(correction, frame_index=drawn_on)) == [0]
        image = moving_shapes(frame, GW, GH)
        result = ours.track(image)
        expected = ref.step(frame, _pixels(image)) if frame >= 2 else {}
        if not drawn_on <= frame < CAUGHT_UP_AT:  # those frames were published before the correction came
            _assert_same(frame, result, expected)
    assert result.objects, "the object should be visible to compare"
