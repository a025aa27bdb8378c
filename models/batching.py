"""One tracker step for all objects of a frame: memory attention and mask decoder run as batches.

transformers' ``Sam3TrackerVideoModel.forward`` loops over objects in Python, running memory
attention and the mask decoder once per object (only the memory encoder is batched), so each
object adds its own passes. ``track_objects`` is a drop-in for that forward with the same inputs,
outputs and session updates, that runs the per-object work as batches:

- **What each object reads is chosen per object, by SAM 3's own rules**: transformers' methods
  pick the memory frames (conditioning frames closest in time, the last ``num_maskmem - 1``
  frames) and the object pointers, and build their temporal encodings (once for all objects whose
  pointers sit at the same frame offsets). Nothing about the choice changes.
- **Memory attention is grouped by memory layout** (``models.memory_attention``). Objects whose
  memory has the same number of frames and of object-pointer tokens (the usual case: objects
  prompted together and tracked since) are stacked along the batch dimension and attend in one
  call. Grouping, rather than padding the shorter memories with an attention mask, keeps the
  model's own attention (it takes no mask). Each memory frame's keys and values are projected
  and rotated once, when first read, not on each of the up to seven frames that read it, and the
  first layer's self-attention, which reads only the frame, runs once per frame for all objects.
  Objects starting on this frame read no memory: their features are shared.
- **The mask decoder is grouped by prompt shape**: objects with the same number of clicks (or
  none, while tracking) and the same multimask choice decode in one call, small heads included;
  only the kept one of a multimask output's three masks is upsampled for the memory encoder.
- **The memory encoder** stays transformers' batched call, over the same objects in the same
  order (including its rule that clicks on any object binarize every object's memory mask).
- On CPU, the channels-first layer norms of the decoder and memory encoder normalize by formula
  (``hf_internals.channel_norms_by_formula``: PyTorch's kernel is 9x slower on their 4 channels).
- Objects prompted with a mask (the text model's new detections) take transformers' own
  one-object step: the mask path is rare and its shape differs.

Not bit for bit. A batched matrix product rounds differently from one object's, and so do the
split key projection and the norm formula: outputs differ from the per-object loop's in the last
bits (about 1e-6 on scores), and a mask pixel whose logit is that close to zero may flip; where
clicks binarize a memory mask, such a flip persists in the memory (scores then drift by up to
6.5e-5 in the test's stream).
``tests/test_batching.py`` holds a 300-frame stream of adds, corrections and removals to the
loop: the same ids every frame, scores within 1e-4, each object's masks within IoU 0.999 over
the stream. ``TrackerConfig(batch_objects=False)`` runs transformers' own loop, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Sam3TrackerVideoModel
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoSegmentationOutput

from models import hf_internals as hf
from models.memory_attention import attend


@dataclass
class ObjectStep:
    """One object's work on the current frame."""

    obj_idx: int
    is_init_cond_frame: bool  # the object starts on this frame: no memory is read
    point_inputs: dict[str, torch.Tensor] | None
    mask_inputs: torch.Tensor | None
    reverse: bool


@torch.inference_mode()
def track_objects(
    tracker: Sam3TrackerVideoModel,
    inference_session: Any,
    frame_idx: int | None = None,
    frame: torch.Tensor | None = None,
    reverse: bool = False,
    run_mem_encoder: bool = True,
    **_: Any,
) -> Sam3TrackerVideoSegmentationOutput:
    """``Sam3TrackerVideoModel.forward`` with the objects batched; same arguments, results and session updates."""
    session = inference_session
    if frame is not None:
        frame_idx = session.add_new_frame(frame, frame_idx)
    if frame is not None and session.get_obj_num() == 0:
        raise ValueError("No objects are provided for tracking; please add inputs first.")
    num_objects = session.get_obj_num()
    pred_masks: list[torch.Tensor | None] = [None] * num_objects
    score_logits: list[torch.Tensor | None] = [None] * num_objects

    steps: list[ObjectStep] = []
    new_inputs = hf.objects_with_new_inputs(session)
    for obj_idx in range(num_objects):
        obj_id = session.obj_idx_to_id(obj_idx)
        has_new_inputs = obj_id in new_inputs
        if not has_new_inputs and frame_idx in hf.object_outputs(session, obj_idx)["cond_frame_outputs"]:
            # A prompted frame already computed: reuse it, as transformers does.
            pred_masks[obj_idx] = session.get_output(obj_idx, frame_idx, "pred_masks", is_conditioning_frame=True)
            score_logits[obj_idx] = session.get_output(
                obj_idx, frame_idx, "object_score_logits", is_conditioning_frame=True
            ).squeeze(-1)
            continue
        is_init, points, mask = False, None, None
        if has_new_inputs:
            is_init = not hf.was_tracked(session, obj_idx, frame_idx)
            if is_init:
                reverse = False  # transformers' loop keeps this for the objects after it
            points = hf.point_inputs_at(session, obj_idx, frame_idx)
            mask = hf.mask_inputs_at(session, obj_idx, frame_idx)
            if points is not None or mask is not None:
                new_inputs.remove(obj_id)
        steps.append(ObjectStep(obj_idx, is_init, points, mask, reverse))

    outputs = step_and_store(tracker, session, frame_idx, steps, streaming=frame is not None, encode=run_mem_encoder)
    for step in steps:
        pred_masks[step.obj_idx] = outputs[step.obj_idx]["pred_masks"]
        score_logits[step.obj_idx] = outputs[step.obj_idx]["object_score_logits"].squeeze(-1)

    return Sam3TrackerVideoSegmentationOutput(
        object_ids=hf.object_ids(session),
        pred_masks=torch.cat(pred_masks, dim=0) if num_objects > 1 else pred_masks[0],
        object_score_logits=torch.cat(score_logits, dim=0) if num_objects > 1 else score_logits[0],
        frame_idx=frame_idx,
    )


def step_and_store(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    steps: list[ObjectStep],
    streaming: bool,
    batched: bool = True,
    encode: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the objects' steps on one frame and record them as transformers' forward does: each output
    stored (a conditioning frame when the object starts there), the frame marked tracked, and the
    objects' memories encoded in one batch. Returns ``obj_idx -> output``."""
    by_formula = batched and tracker.no_memory_embedding.device.type == "cpu"  # decoder and memory encoder
    with hf.channel_norms_by_formula(tracker) if by_formula else contextlib.nullcontext():
        outputs = run_steps(tracker, session, frame_idx, steps, streaming=streaming, batched=batched)
        memory_objects, memory_masks, memory_scores, from_points = [], [], [], []
        for step in steps:
            out = outputs[step.obj_idx]
            session.store_output(
                step.obj_idx, frame_idx, output_value=out, is_conditioning_frame=step.is_init_cond_frame
            )
            if encode and tracker.num_maskmem > 0:
                memory_objects.append(step.obj_idx)
                memory_masks.append(out["high_res_masks"])
                memory_scores.append(out["object_score_logits"])
                from_points.append(step.point_inputs is not None or step.mask_inputs is not None)
            if not step.is_init_cond_frame:
                hf.mark_tracked(session, step.obj_idx, frame_idx, step.reverse)
        hf.encode_memories(tracker, session, frame_idx, memory_objects, memory_masks, memory_scores, from_points)
    return outputs


def run_steps(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    steps: list[ObjectStep],
    streaming: bool,
    batched: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """Run the objects' steps on one frame; returns ``obj_idx -> output`` as transformers stores it.

    ``batched=False`` runs every object alone through transformers' own one-object step.
    """
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    for step in steps:
        if not batched or step.mask_inputs is not None or tracker.num_maskmem == 0:
            outputs[step.obj_idx] = hf.run_single_object(
                tracker,
                session,
                frame_idx,
                step.obj_idx,
                is_init_cond_frame=step.is_init_cond_frame,
                point_inputs=step.point_inputs,
                mask_inputs=step.mask_inputs,
                reverse=step.reverse,
                streaming=streaming,
            )
    together = [s for s in steps if s.obj_idx not in outputs]
    if not together:
        return outputs
    feats, positions = hf.frame_features(tracker, session, frame_idx)
    conditioned = _memory_conditioned_features(tracker, session, frame_idx, together, feats, positions, streaming)
    high_res = [
        x.permute(1, 2, 0).view(x.size(1), x.size(2), *size)
        for x, size in zip(feats[:-1], tracker.backbone_feature_sizes[:-1], strict=True)
    ]
    outputs.update(_decode(tracker, together, conditioned, high_res))
    return outputs


def _memory_conditioned_features(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    steps: list[ObjectStep],
    feats: list[torch.Tensor],
    positions: list[torch.Tensor],
    streaming: bool,
) -> dict[int, torch.Tensor]:
    """Each object's frame features fused with its memory, ``1 x C x H x W`` per ``obj_idx``."""
    current, current_pos = feats[-1], positions[-1]  # HW x 1 x C
    channels, (height, width) = tracker.hidden_dim, tracker.backbone_feature_sizes[-1]
    out: dict[int, torch.Tensor] = {}
    starting = [s.obj_idx for s in steps if s.is_init_cond_frame]
    if starting:
        no_memory = (current + tracker.no_memory_embedding).permute(1, 2, 0).view(1, channels, height, width)
        out.update(dict.fromkeys(starting, no_memory))

    groups: dict[tuple[int, int], list[tuple[int, hf.ObjectMemory]]] = defaultdict(list)
    by_direction: dict[bool, list[int]] = defaultdict(list)
    for step in steps:
        if not step.is_init_cond_frame:
            by_direction[step.reverse].append(step.obj_idx)
    for reverse, obj_indices in by_direction.items():
        memories = hf.object_memories(tracker, session, obj_indices, frame_idx, reverse, streaming)
        for obj_idx, memory in zip(obj_indices, memories, strict=True):
            groups[memory.layout].append((obj_idx, memory))

    keep = current.device.type == "cpu"  # see models.memory_attention: on a GPU nothing is kept
    for members in groups.values():
        fused = attend(
            tracker.memory_attention,
            tracker.memory_temporal_positional_encoding,
            current,
            current_pos,
            [memory for _, memory in members],
            keep,
        )  # N x HW x C
        maps = fused.transpose(1, 2).reshape(len(members), channels, height, width)
        for i, (obj_idx, _) in enumerate(members):
            out[obj_idx] = maps[i : i + 1]
    return out


def _decode(
    tracker: Sam3TrackerVideoModel,
    steps: list[ObjectStep],
    conditioned: dict[int, torch.Tensor],
    high_res: list[torch.Tensor],
) -> dict[int, dict[str, torch.Tensor]]:
    """Mask decoder, one call per group of objects with the same prompt shape."""
    groups: dict[tuple[int, bool], list[ObjectStep]] = defaultdict(list)
    for step in steps:
        clicks = step.point_inputs["point_labels"].shape[-1] if step.point_inputs is not None else -1
        groups[(clicks, hf.uses_multimask(tracker, step.is_init_cond_frame, step.point_inputs))].append(step)

    outputs: dict[int, dict[str, torch.Tensor]] = {}
    for (clicks, multimask), members in groups.items():
        size = len(members)
        embeddings = [h.expand(size, -1, -1, -1) for h in high_res]
        embeddings.append(torch.cat([conditioned[s.obj_idx] for s in members], dim=0))
        coords = labels = None
        if clicks >= 0:
            coords = torch.cat([s.point_inputs["point_coords"] for s in members], dim=0)  # type: ignore[index]
            labels = torch.cat([s.point_inputs["point_labels"] for s in members], dim=0)  # type: ignore[index]
        decoded = decode_batch(tracker, embeddings, coords, labels, multimask)
        for i, step in enumerate(members):
            outputs[step.obj_idx] = {key: value[i : i + 1] for key, value in decoded.items()}
    return outputs


def decode_batch(
    tracker: Sam3TrackerVideoModel,
    image_embeddings: list[torch.Tensor],
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    multimask_output: bool,
) -> dict[str, torch.Tensor]:
    """Prompt encoder, mask decoder and object pointer for ``N`` objects (batch dimension 0).

    The same computation as transformers' ``_single_frame_forward`` for one object, whose choice of
    the best of several masks indexes correctly only for a batch of one.
    """
    size = image_embeddings[-1].shape[0]
    device, dtype = image_embeddings[-1].device, image_embeddings[-1].dtype
    if point_coords is None:  # tracking without clicks: one "not a point" token, as transformers pads
        sparse, dense = tracker.prompt_encoder(
            input_points=torch.zeros(size, 1, 1, 2, dtype=dtype, device=device),
            input_labels=-torch.ones(size, 1, 1, dtype=torch.int32, device=device),
            input_boxes=None,
            input_masks=None,
        )
    else:
        sparse, dense = tracker.prompt_encoder(
            input_points=point_coords, input_labels=point_labels, input_boxes=None, input_masks=None
        )
    low_res, iou_scores, tokens, score_logits = tracker.mask_decoder(
        image_embeddings=image_embeddings[-1],
        image_positional_embeddings=tracker.get_image_wide_positional_embeddings().repeat(size, 1, 1, 1),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        high_resolution_features=image_embeddings[:-1],
    )
    appearing = score_logits > 0  # N x 1 x 1
    # Masks of objects judged absent are a hard "nothing", also for the memory built from them.
    low_res = torch.where(appearing[:, None, None], low_res, hf.NO_OBJECT_SCORE)
    token = tokens[:, :, 0]
    if multimask_output:  # keep the mask (and token) with the highest predicted IoU, per object
        rows = torch.arange(size, device=device)
        best = torch.argmax(iou_scores, dim=-1)[:, 0]
        low_res = low_res[rows, 0, best].unsqueeze(1)
        if tokens.size(2) > 1:
            token = tokens[rows, 0, best].unsqueeze(1)
    else:
        low_res = low_res[:, :, 0]
    # Only the kept mask is upsampled (transformers upsamples all three, then picks one).
    side = tracker.image_size
    high_res = F.interpolate(low_res.float(), size=(side, side), mode="bilinear", align_corners=False)
    high_res = high_res.to(low_res.dtype)
    pointer = tracker.object_pointer_proj(token)
    weight = appearing.to(pointer.dtype)
    pointer = weight * pointer + (1 - weight) * tracker.no_object_pointer
    return {
        "pred_masks": low_res,
        "object_pointer": pointer,
        "high_res_masks": high_res,
        "object_score_logits": score_logits,
    }
