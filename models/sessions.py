"""Operations on transformers' SAM 3 inference sessions that the library does not offer for live use.

Each works on both session types (the point/box tracker's and the text model's). What they touch
of transformers' internals goes through ``models.hf_internals``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Sam3TrackerVideoModel

from models import hf_internals as hf
from models.batching import ObjectStep, run_steps

TEXT_TOKENS = 32  # SAM 3's text encoder context length


def point_inputs(coords: torch.Tensor, labels: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """One object's clicks (and box corners) in model coordinates (``n x 2``), shaped as the tracker stores them."""
    return {
        "point_coords": torch.as_tensor(coords, dtype=torch.float32).reshape(1, 1, -1, 2).to(device),
        "point_labels": torch.tensor([[labels]], dtype=torch.int32, device=device),
    }


def concat_inputs(first: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One object's clicks followed by more clicks on the same frame (points are dimension 2)."""
    return {key: torch.cat([first[key], more[key]], dim=2) for key in first}


def add_object_inputs(session: Any, frame_idx: int, inputs_by_obj: dict[int, dict[str, torch.Tensor]]) -> None:
    """Register new objects' first clicks/boxes on ``frame_idx``; the next forward initialises them.

    All objects of one frame go in one call: transformers replaces the set of objects with new inputs.
    """
    for obj_id, inputs in inputs_by_obj.items():
        obj_idx = session.obj_id_to_idx(obj_id)
        session.add_point_inputs(obj_idx, frame_idx, inputs)
        session.remove_mask_inputs(obj_idx, frame_idx)
    hf.set_objects_with_new_inputs(session, list(inputs_by_obj))


@torch.inference_mode()
def refine_objects(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    inputs_by_obj: dict[int, dict[str, torch.Tensor]],
    streaming: bool,
    batched: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Correct already-tracked objects on ``frame_idx`` with clicks, as SAM's interactive refinement does.

    The object's mask is recomputed from its memory plus the clicks; the result replaces the frame's
    tracked output and becomes a conditioning frame (SAM 3 adds every corrected frame as one).
    Only the named objects are touched; ``batched`` runs them as one batch (``models.batching``).
    Returns ``obj_id -> (low-res mask logits 1 x h x w, object score logit 1)``.
    """
    steps = []
    for obj_id, inputs in inputs_by_obj.items():
        obj_idx = session.obj_id_to_idx(obj_id)
        hf.set_point_inputs(session, obj_idx, frame_idx, inputs)
        steps.append(ObjectStep(obj_idx, False, point_inputs=inputs, mask_inputs=None, reverse=False))
    outputs = run_steps(tracker, session, frame_idx, steps, streaming=streaming, batched=batched)
    refined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for obj_id, step in zip(inputs_by_obj, steps, strict=True):
        out = outputs[step.obj_idx]
        hf.object_outputs(session, step.obj_idx)["non_cond_frame_outputs"].pop(frame_idx, None)
        session.store_output(step.obj_idx, frame_idx, output_value=out, is_conditioning_frame=True)
        refined[obj_id] = (out["pred_masks"][:, 0], out["object_score_logits"].reshape(1))
    hf.encode_memories(
        tracker,
        session,
        frame_idx,
        [s.obj_idx for s in steps],
        [outputs[s.obj_idx]["high_res_masks"] for s in steps],
        [outputs[s.obj_idx]["object_score_logits"] for s in steps],
        [True] * len(steps),
    )
    return refined


def add_text_prompt(session: Any, tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Add a concept to a text-model session (what transformers' processor does, without torchvision)."""
    prompt_id = session.add_prompt(text)
    encoded = tokenizer(text, return_tensors="pt", padding="max_length", max_length=TEXT_TOKENS, truncation=True)
    hf.set_prompt_tokens(session, prompt_id, encoded.input_ids, encoded.attention_mask)
    return prompt_id


def drop_text_prompt(session: Any, text: str) -> list[int]:
    """Remove a concept and every object it found; returns the removed object ids."""
    prompt_id = next((pid for pid, t in hf.text_prompts(session).items() if t == text), None)
    if prompt_id is None:
        raise KeyError(text)
    removed = hf.objects_of_prompt(session, prompt_id)
    for obj_id in removed:
        session.remove_object(obj_id)
    hf.drop_prompt_tables(session, prompt_id)
    return removed
