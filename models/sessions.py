"""Operations on transformers' SAM 3 inference sessions that the library does not offer for live use.

Each works on both session types (the point/box tracker's and the text model's), so the streaming
tracker and the parity tests' unbounded reference share one implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Sam3TrackerVideoModel

TEXT_TOKENS = 32  # SAM 3's text encoder context length


def point_inputs(coords: list[list[float]], labels: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """One object's clicks (and box corners) in model coordinates, shaped as the tracker stores them."""
    return {
        "point_coords": torch.tensor([[coords]], dtype=torch.float32, device=device),
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
        session.point_inputs_per_obj[obj_idx][frame_idx] = inputs
        session.mask_inputs_per_obj[obj_idx].pop(frame_idx, None)
    session.obj_with_new_inputs = list(inputs_by_obj)


@torch.inference_mode()
def refine_objects(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    inputs_by_obj: dict[int, dict[str, torch.Tensor]],
    streaming: bool,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Correct already-tracked objects on ``frame_idx`` with clicks, as SAM's interactive refinement does.

    The object's mask is recomputed from its memory plus the clicks; the result replaces the frame's
    tracked output and becomes a conditioning frame (frames with user input anchor the memory).
    Only the named objects are touched. Returns ``obj_id -> (low-res mask logits, score logits)``.
    """
    refined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    obj_indices, high_res, score_logits = [], [], []
    for obj_id, inputs in inputs_by_obj.items():
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
        session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"].pop(frame_idx, None)
        session.store_output(obj_idx, frame_idx, output_value=out, is_conditioning_frame=True)
        obj_indices.append(obj_idx)
        high_res.append(out["high_res_masks"])
        score_logits.append(out["object_score_logits"])
        refined[obj_id] = (out["pred_masks"][:, 0], out["object_score_logits"].reshape(1))
    tracker._batch_encode_memories(
        inference_session=session,
        frame_idx=frame_idx,
        objects_needing_memory_encoding=obj_indices,
        high_res_masks_for_memory=high_res,
        object_score_logits_for_memory=score_logits,
        is_mask_from_pts_per_obj=[True] * len(obj_indices),
    )
    return refined


def remove_tracker_object(session: Any, obj_id: int) -> None:
    """Remove one object from a point/box tracker session (it has no ``remove_object`` of its own).

    Object indices are positional, so the remaining objects are renumbered in order.
    """
    old_ids = list(session.obj_ids)
    if obj_id not in old_ids:
        raise KeyError(obj_id)
    remaining = [i for i in old_ids if i != obj_id]
    old_idx = {i: session._obj_id_to_idx[i] for i in remaining}
    for attr in ("point_inputs_per_obj", "mask_inputs_per_obj", "output_dict_per_obj", "frames_tracked_per_obj"):
        per_obj = getattr(session, attr)
        setattr(session, attr, {new: per_obj[old_idx[i]] for new, i in enumerate(remaining)})
    session._obj_id_to_idx.clear()
    session._obj_idx_to_id.clear()
    for new, i in enumerate(remaining):
        session._obj_id_to_idx[i] = new
        session._obj_idx_to_id[new] = i
    session.obj_ids = remaining
    session.obj_with_new_inputs = [i for i in session.obj_with_new_inputs if i != obj_id]


def add_text_prompt(session: Any, tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Add a concept to a text-model session (what transformers' processor does, without torchvision)."""
    prompt_id = session.add_prompt(text)
    if prompt_id not in session.prompt_input_ids:
        encoded = tokenizer(text, return_tensors="pt", padding="max_length", max_length=TEXT_TOKENS, truncation=True)
        session.prompt_input_ids[prompt_id] = encoded.input_ids.to(session.inference_device)
        session.prompt_attention_masks[prompt_id] = encoded.attention_mask.to(session.inference_device)
    return prompt_id


def drop_text_prompt(session: Any, text: str) -> list[int]:
    """Remove a concept and every object it found; returns the removed object ids.

    transformers numbers prompts by count, so the remaining prompts are renumbered densely.
    """
    prompt_id = next((pid for pid, t in session.prompts.items() if t == text), None)
    if prompt_id is None:
        raise KeyError(text)
    removed = [obj_id for obj_id, pid in session.obj_id_to_prompt_id.items() if pid == prompt_id]
    for obj_id in removed:
        session.remove_object(obj_id)
    kept = [pid for pid in sorted(session.prompts) if pid != prompt_id]
    renumber = {old: new for new, old in enumerate(kept)}
    for attr in ("prompts", "prompt_input_ids", "prompt_embeddings", "prompt_attention_masks"):
        table = getattr(session, attr)
        setattr(session, attr, type(table)((renumber[pid], v) for pid, v in table.items() if pid in renumber))
    session.obj_id_to_prompt_id = {o: renumber[p] for o, p in session.obj_id_to_prompt_id.items() if p in renumber}
    return removed
