"""The one room for transformers' SAM 3 internals.

Live tracking needs more of transformers' SAM 3 than its public API gives: private methods of
``Sam3TrackerVideoModel`` (one object's step, batched memory encoding, memory and pointer selection)
and the undocumented state of its inference sessions (per-object outputs and inputs, the text
model's bookkeeping). Every such access in this package goes through this module, and each is
listed in ``RELIED_ON`` with what it is used for. On import the list is checked against the
installed transformers, so an upgrade that renames or drops one fails loudly, naming it, instead
of silently changing results. ``check_model`` does the same for attributes that only exist on a
built model.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import transformers
from transformers import Sam3TrackerVideoModel, Sam3VideoModel
from transformers.models.sam3_tracker_video import modeling_sam3_tracker_video
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_tracker_video.processing_sam3_tracker_video import Sam3TrackerVideoProcessor
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

# The transformers versions these internals were read from (pyproject.toml pins the same range).
PINNED_TRANSFORMERS = ">=5.23,<5.24"


@dataclass(frozen=True)
class Reliance:
    """One internal of transformers this package relies on, and what for."""

    owner: str
    name: str
    why: str


_TRACKER = "Sam3TrackerVideoModel"
_VIDEO = "Sam3VideoModel"
_TRACKER_SESSION = "Sam3TrackerVideoInferenceSession"
_VIDEO_SESSION = "Sam3VideoInferenceSession"
_PROCESSOR = "Sam3TrackerVideoProcessor"
_TRACKER_MODULE = "modeling_sam3_tracker_video"
_MEMORY_ATTENTION = "Sam3TrackerVideoMemoryAttention"
_MEMORY_LAYER = "Sam3TrackerVideoMemoryAttentionLayer"
_ROPE_ATTENTION = "Sam3TrackerVideoRoPEAttention"
_LAYER_NORM = "Sam3TrackerVideoLayerNorm"
# Attributes of both session types.
_SESSION_STATE = {
    "_obj_id_to_idx": "object id -> positional index; renumbered when an object is removed",
    "_obj_idx_to_id": "positional index -> object id; renumbered when an object is removed",
    "obj_ids": "the session's object ids in index order",
    "obj_with_new_inputs": "objects whose clicks/masks the next forward consumes",
    "point_inputs_per_obj": "per object, per frame: clicks (read by the step, evicted by the memory window)",
    "mask_inputs_per_obj": "per object, per frame: mask prompts (text model's new detections)",
    "output_dict_per_obj": "per object: cond/non-cond frame outputs, the memory bank the model reads",
    "frames_tracked_per_obj": "per object, per frame: whether the frame was tracked (not an initial prompt)",
    "processed_frames": "frame pixels; the text model's tracker reads len() as frames seen so far",
    "cache": "vision-feature cache: cache_vision_features / get_vision_features per frame",
}
RELIED_ON: tuple[Reliance, ...] = (
    Reliance(_TRACKER, "_run_single_frame_inference", "one object's memory attention + mask decoder on one frame"),
    Reliance(_TRACKER, "_batch_encode_memories", "memory encoder for a frame's objects, stored in their outputs"),
    Reliance(_TRACKER, "_prepare_vision_features", "the frame's tracker features from the session cache"),
    Reliance(_TRACKER, "_gather_memory_frame_outputs", "SAM 3's choice of memory frames for one object"),
    Reliance(_TRACKER, "_get_object_pointers", "SAM 3's choice of object pointers for one object"),
    Reliance(_TRACKER, "_process_object_pointers", "object-pointer tokens with their temporal encodings"),
    Reliance(_TRACKER, "_use_multimask", "whether the mask decoder returns 3 masks for these inputs"),
    Reliance(_TRACKER, "get_image_wide_positional_embeddings", "a constant, replaced by a cached copy"),
    Reliance(_TRACKER_MODULE, "NO_OBJ_SCORE", "mask logit of an object judged absent (batched decoder)"),
    Reliance(_TRACKER_MODULE, "rotate_pairwise", "RoPE's pair rotation, for memory keys rotated once"),
    Reliance(_TRACKER_MODULE, "Sam3TrackerVideoLayerNorm", "its channels-first instances, normalized by formula"),
    Reliance(_TRACKER_MODULE, "ALL_ATTENTION_FUNCTIONS", "the attention kernels a config can select"),
    Reliance(_TRACKER_MODULE, "eager_attention_forward", "the kernel when the config selects none"),
    *(Reliance(_TRACKER_SESSION, name, why) for name, why in _SESSION_STATE.items()),
    # The text model sets obj_with_new_inputs itself before it first reads it.
    *(Reliance(_VIDEO_SESSION, name, why) for name, why in _SESSION_STATE.items() if name != "obj_with_new_inputs"),
    Reliance(_VIDEO_SESSION, "prompts", "prompt id -> text; ids are dense (a new prompt takes len())"),
    Reliance(_VIDEO_SESSION, "prompt_input_ids", "prompt id -> tokens (what the processor would store)"),
    Reliance(_VIDEO_SESSION, "prompt_attention_masks", "prompt id -> token mask"),
    Reliance(_VIDEO_SESSION, "prompt_embeddings", "prompt id -> cached text embeddings"),
    Reliance(_VIDEO_SESSION, "obj_id_to_prompt_id", "which concept found each object"),
    Reliance(_VIDEO_SESSION, "max_obj_id", "highest id given out; new detections count up from it"),
    Reliance(_VIDEO_SESSION, "obj_id_to_tracker_score_frame_wise", "per-frame tracker scores (trimmed)"),
    Reliance(_VIDEO_SESSION, "suppressed_obj_ids", "per-frame suppressed ids (trimmed)"),
    Reliance(_VIDEO_SESSION, "unmatched_frame_inds", "hotstart lists; only their length matters when streaming"),
    Reliance(_VIDEO_SESSION, "overlap_pair_to_frame_inds", "hotstart overlap lists (trimmed)"),
    Reliance(_VIDEO_SESSION, "trk_keep_alive", "per-object keep-alive counters (trimmed)"),
    Reliance(_VIDEO_SESSION, "obj_first_frame_idx", "per-object first frame (trimmed)"),
    Reliance(_VIDEO_SESSION, "obj_id_to_score", "per-object detection score (trimmed)"),
    Reliance(_VIDEO_SESSION, "obj_id_to_last_occluded", "per-object last occlusion (trimmed)"),
    Reliance(_VIDEO_SESSION, "hotstart_removed_obj_ids", "objects hot-start removed as spurious (files)"),
    Reliance(_PROCESSOR, "target_size", "the only state the point/box path reads besides point_pad_value"),
    Reliance(_PROCESSOR, "point_pad_value", "padding value the point path leaves unscaled"),
)
# Attributes that exist only on a built model (set in __init__), checked by ``check_model``.
MODEL_RELIED_ON: tuple[Reliance, ...] = (
    Reliance(_TRACKER, "memory_attention", "run once per frame for a batch of objects"),
    Reliance(_TRACKER, "no_memory_embedding", "added to the features of an object's first frame"),
    Reliance(_TRACKER, "backbone_feature_sizes", "shapes of the tracker's feature maps"),
    Reliance(_TRACKER, "hidden_dim", "channels of the tracker's feature maps"),
    Reliance(_TRACKER, "num_maskmem", "memory frames the model reads (0: no memory)"),
    Reliance(_TRACKER, "prompt_encoder", "embeds a batch of objects' clicks"),
    Reliance(_TRACKER, "mask_decoder", "decodes a batch of objects' masks"),
    Reliance(_TRACKER, "object_pointer_proj", "turns a batch of mask tokens into object pointers"),
    Reliance(_TRACKER, "no_object_pointer", "the pointer of an object judged absent"),
    Reliance(_TRACKER, "image_size", "side of the high-resolution masks the memory encoder takes"),
    Reliance(_TRACKER, "memory_temporal_positional_encoding", "memory frames' temporal encodings, by offset"),
    Reliance(_LAYER_NORM, "data_format", "which norms normalize over channels first"),
    Reliance(_LAYER_NORM, "eps", "a norm's epsilon, for the formula"),
    *(
        Reliance(_MEMORY_ATTENTION, name, "memory attention's forward, restated (models.memory_attention)")
        for name in ("layers", "rotary_emb", "position_ids", "layer_norm")
    ),
    *(
        Reliance(_ROPE_ATTENTION, name, "cross-attention restated with memory keys projected once")
        for name in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "num_attention_heads",
            "head_dim",
            "scaling",
            "is_causal",
            "config",
        )
    ),
    *(
        Reliance(_MEMORY_LAYER, name, "a memory-attention layer's forward, restated (models.memory_attention)")
        for name in (
            "layer_norm1",
            "self_attn",
            "dropout1",
            "layer_norm2",
            "cross_attn_image",
            "dropout2",
            "layer_norm3",
            "linear1",
            "activation",
            "dropout",
            "linear2",
            "dropout3",
        )
    ),
    Reliance(_VIDEO, "tracker_model", "the tracker the text model calls as tracker_model(...)"),
    Reliance(_VIDEO, "detector_model", "the detector whose get_vision_features the text model calls per frame"),
)


def _owner_class(owner: str) -> Any:
    return {
        _TRACKER: Sam3TrackerVideoModel,
        _VIDEO: Sam3VideoModel,
        _TRACKER_SESSION: Sam3TrackerVideoInferenceSession,
        _VIDEO_SESSION: Sam3VideoInferenceSession,
        _PROCESSOR: Sam3TrackerVideoProcessor,
        _TRACKER_MODULE: modeling_sam3_tracker_video,
    }[owner]


def _instances() -> dict[str, Any]:
    """Objects to look instance attributes up on (sessions are cheap to build; the processor's state
    is set in ``__init__``, which needs torchvision, so its attributes are read from its source)."""
    return {
        _TRACKER_SESSION: Sam3TrackerVideoInferenceSession(),
        _VIDEO_SESSION: Sam3VideoInferenceSession(),
        _PROCESSOR: _processor_attribute_names(),
    }


def _processor_attribute_names() -> set[str]:
    import inspect

    source = inspect.getsource(Sam3TrackerVideoProcessor.__init__)
    return {name for name in ("target_size", "point_pad_value") if f"self.{name} =" in source}


def missing(reliances: tuple[Reliance, ...] = RELIED_ON, instances: dict[str, Any] | None = None) -> list[Reliance]:
    """The relied-on internals the installed transformers lacks."""
    instances = _instances() if instances is None else instances
    gone = []
    for item in reliances:
        holder = instances[item.owner] if item.owner in instances else _owner_class(item.owner)
        present = item.name in holder if isinstance(holder, set) else hasattr(holder, item.name)
        if not present:
            gone.append(item)
    return gone


class TransformersInternalsError(ImportError):
    """The installed transformers lacks an internal this package relies on."""


def _explain(gone: list[Reliance]) -> str:
    names = "; ".join(f"{g.owner}.{g.name} (used for: {g.why})" for g in gone)
    return (
        f"transformers {transformers.__version__} lacks SAM 3 internals sam3-stream relies on: {names}. "
        f"sam3-stream was verified with transformers{PINNED_TRANSFORMERS}; install that version"
    )


def check_installed(reliances: tuple[Reliance, ...] = RELIED_ON) -> None:
    """Raise ``TransformersInternalsError`` naming every relied-on internal that is missing."""
    gone = missing(reliances)
    if gone:
        raise TransformersInternalsError(_explain(gone))


def check_model(video_model: Sam3VideoModel) -> None:
    """The same check for attributes that only a built model has (called once per loaded model)."""
    tracker = video_model.tracker_model
    first_layer = next(iter(getattr(getattr(tracker, "memory_attention", None), "layers", [])), None)
    instances = {
        _TRACKER: tracker,
        _VIDEO: video_model,
        _MEMORY_ATTENTION: getattr(tracker, "memory_attention", None),
        _MEMORY_LAYER: first_layer,
        _ROPE_ATTENTION: getattr(first_layer, "cross_attn_image", None),
        _LAYER_NORM: getattr(getattr(tracker, "mask_decoder", None), "upscale_layer_norm", None),
    }
    gone = missing(MODEL_RELIED_ON, instances)
    if gone:
        raise TransformersInternalsError(_explain(gone))


check_installed()

NO_OBJECT_SCORE: float = modeling_sam3_tracker_video.NO_OBJ_SCORE
rotate_pairwise: Callable[[torch.Tensor], torch.Tensor] = modeling_sam3_tracker_video.rotate_pairwise
_LAYER_NORM_CLASS: type = modeling_sam3_tracker_video.Sam3TrackerVideoLayerNorm


def attention_kernel(attention: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention kernel (sdpa, eager, flash...) the module's config selects, picked as transformers' own
    attention forward picks it, so a restated forward honours ``attn_implementation`` too. Called as
    ``kernel(attention, q, k, v, attention_mask=None, scaling=..., is_causal=...)`` with ``B x heads x L x d``
    inputs; returns ``(B x L x heads x d, weights or None)``."""
    return modeling_sam3_tracker_video.ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, modeling_sam3_tracker_video.eager_attention_forward
    )


# ------------------------------------------------------------------------------- session state


def object_ids(session: Any) -> list[int]:
    """The session's object ids, in index order."""
    return list(session.obj_ids)


def objects_with_new_inputs(session: Any) -> list[int]:
    """The live list of objects whose new inputs the next step consumes (the step removes from it)."""
    return session.obj_with_new_inputs


def set_objects_with_new_inputs(session: Any, obj_ids: list[int]) -> None:
    """Name the objects whose inputs the next step consumes (transformers replaces the whole set)."""
    session.obj_with_new_inputs = list(obj_ids)


def object_outputs(session: Any, obj_idx: int) -> dict[str, dict[int, dict[str, Any]]]:
    """One object's stored outputs: ``{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}``."""
    return session.output_dict_per_obj[obj_idx]


def all_object_outputs(session: Any) -> list[dict[str, dict[int, dict[str, Any]]]]:
    """Every object's stored outputs (the live dicts the memory window prunes)."""
    return list(session.output_dict_per_obj.values())


def per_frame_object_records(session: Any) -> list[dict[int, Any]]:
    """Every object's per-frame records besides outputs (tracked marks, clicks, mask prompts)."""
    return [
        per_frame
        for per_obj in (session.frames_tracked_per_obj, session.point_inputs_per_obj, session.mask_inputs_per_obj)
        for per_frame in per_obj.values()
    ]


def point_inputs_at(session: Any, obj_idx: int, frame_idx: int) -> dict[str, torch.Tensor] | None:
    """An object's clicks on a frame, if any."""
    return session.point_inputs_per_obj[obj_idx].get(frame_idx)


def set_point_inputs(session: Any, obj_idx: int, frame_idx: int, inputs: dict[str, torch.Tensor]) -> None:
    """Give an object clicks on a frame (the text model's session has no ``add_point_inputs``)."""
    session.point_inputs_per_obj[obj_idx][frame_idx] = inputs


def mask_inputs_at(session: Any, obj_idx: int, frame_idx: int) -> torch.Tensor | None:
    """An object's mask prompt on a frame, if any (the text model starts new detections from masks)."""
    return session.mask_inputs_per_obj[obj_idx].get(frame_idx)


def rewind_object(session: Any, obj_idx: int, frame_idx: int) -> dict[int, dict[str, torch.Tensor]]:
    """Forget what one object did after ``frame_idx`` (outputs, tracked marks, clicks), as if the stream had
    just reached that frame for it; returns the clicks it had been corrected with on later frames, by frame."""
    outputs = session.output_dict_per_obj[obj_idx]
    for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
        for t in [t for t in outputs[kind] if t > frame_idx]:
            del outputs[kind][t]
    tracked = session.frames_tracked_per_obj[obj_idx]
    for t in [t for t in tracked if t > frame_idx]:
        del tracked[t]
    clicks = session.point_inputs_per_obj[obj_idx]
    return {t: clicks.pop(t) for t in sorted(clicks) if t > frame_idx}


def was_tracked(session: Any, obj_idx: int, frame_idx: int) -> bool:
    """Whether the object was already tracked on this frame (new inputs then correct, not start, it)."""
    return frame_idx in session.frames_tracked_per_obj[obj_idx]


def mark_tracked(session: Any, obj_idx: int, frame_idx: int, reverse: bool) -> None:
    """Record that the object was tracked on this frame, as transformers' step does."""
    session.frames_tracked_per_obj[obj_idx][frame_idx] = {"reverse": reverse}


def cache_tracker_features(session: Any, frame_idx: int, features: dict[str, Any]) -> None:
    """Hand the session a frame's tracker features so it does not compute them itself."""
    session.cache.cache_vision_features(frame_idx, features)


def cached_tracker_features(session: Any, frame_idx: int) -> dict[str, Any] | None:
    """The tracker features the session holds for a frame (the text model computes them per frame)."""
    return session.cache.get_vision_features(frame_idx)


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


class FrameWindow(dict):
    """Stand-in for a session's ``processed_frames``: holds the newest frames, counts them all.

    transformers reads ``len(processed_frames)`` as "frames seen so far" (the text model's tracker
    bounds its object-pointer lookback by it), so the count must keep growing while the pixels go.
    """

    def __init__(self, keep: int = 1) -> None:
        super().__init__()
        self._keep = keep
        self._seen = 0

    def __setitem__(self, frame_idx: int, pixels: torch.Tensor) -> None:
        super().__setitem__(frame_idx, pixels)
        self._seen = max(self._seen, frame_idx + 1)
        while dict.__len__(self) > self._keep:
            del self[min(self.keys())]

    def __len__(self) -> int:
        return self._seen

    def stored(self) -> int:
        """How many frames' pixels are actually held."""
        return dict.__len__(self)


def use_frames(session: Any, frames: Any) -> None:
    """Give ``session`` a frame store of our own in place of its ``processed_frames`` dict (any mapping
    from frame index to pixels whose ``len`` is the frame count the model should see)."""
    session.processed_frames = frames


def install_frame_window(session: Any) -> FrameWindow:
    """Make ``session`` keep only its newest frame's pixels (it otherwise keeps every frame)."""
    window = FrameWindow()
    use_frames(session, window)
    return window


def frame_window(session: Any) -> FrameWindow:
    """The session's frame store, once ``install_frame_window`` replaced it."""
    return session.processed_frames


# ------------------------------------------------------------------------------ text sessions

_PROMPT_TABLES = ("prompts", "prompt_input_ids", "prompt_embeddings", "prompt_attention_masks")


def is_text_session(session: Any) -> bool:
    """Whether this is the text model's session (with its detection bookkeeping)."""
    return isinstance(session, Sam3VideoInferenceSession)


def text_prompts(session: Any) -> dict[int, str]:
    """Prompt id -> text."""
    return session.prompts


def set_prompt_tokens(session: Any, prompt_id: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Store a prompt's tokens where the text model reads them (what transformers' processor does)."""
    if prompt_id not in session.prompt_input_ids:
        session.prompt_input_ids[prompt_id] = input_ids.to(session.inference_device)
        session.prompt_attention_masks[prompt_id] = attention_mask.to(session.inference_device)


def prompt_of_object(session: Any, obj_id: int) -> int | None:
    """The prompt id of the concept that found the object."""
    return session.obj_id_to_prompt_id.get(obj_id)


def objects_of_prompt(session: Any, prompt_id: int) -> list[int]:
    """The objects a concept found."""
    return [obj_id for obj_id, pid in session.obj_id_to_prompt_id.items() if pid == prompt_id]


def drop_prompt_tables(session: Any, prompt_id: int) -> None:
    """Forget a prompt id; the others are renumbered densely (transformers numbers a new prompt by count)."""
    kept = [pid for pid in sorted(session.prompts) if pid != prompt_id]
    renumber = {old: new for new, old in enumerate(kept)}
    for attr in _PROMPT_TABLES:
        table = getattr(session, attr)
        setattr(session, attr, type(table)((renumber[pid], v) for pid, v in table.items() if pid in renumber))
    session.obj_id_to_prompt_id = {o: renumber[p] for o, p in session.obj_id_to_prompt_id.items() if p in renumber}


def hotstart_removed(session: Any) -> set[int]:
    """The live set of objects the text model's hot-start removed as spurious (hidden from outputs)."""
    return session.hotstart_removed_obj_ids


def reserve_object_ids(session: Any, next_obj_id: int) -> None:
    """New detections take ids above ``next_obj_id - 1`` (ids are shared with clicked objects)."""
    session.max_obj_id = max(session.max_obj_id, next_obj_id - 1)


def next_object_id(session: Any) -> int:
    """The id the text model would give its next new detection."""
    return session.max_obj_id + 1


@dataclass
class TextBookkeeping:
    """The text model's per-frame and per-object metadata (live containers of the session)."""

    per_frame: list[dict[int, Any]]  # frame -> ...
    per_object: list[dict[int, Any]]  # obj_id -> ...
    hotstart_lists: list[dict[Any, list[int]]]  # key -> frame indices; only the length is read when streaming
    overlap_pairs: dict[tuple[int, int], list[int]]  # (obj_id, obj_id) -> frame indices


def text_bookkeeping(session: Any) -> TextBookkeeping:
    """The text model's metadata containers, grouped by how they are keyed."""
    return TextBookkeeping(
        per_frame=[session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids],
        per_object=[
            session.unmatched_frame_inds,
            session.trk_keep_alive,
            session.obj_first_frame_idx,
            session.obj_id_to_score,
            session.obj_id_to_last_occluded,
            session.obj_id_to_prompt_id,
        ],
        hotstart_lists=[session.unmatched_frame_inds, session.overlap_pair_to_frame_inds],
        overlap_pairs=session.overlap_pair_to_frame_inds,
    )


# ------------------------------------------------------------------------- model internals

# Keys of a stored frame output that are still read once the frame has left the memory window
# but is within the object-pointer window.
POINTER_KEYS = ("object_pointer", "object_score_logits")
# Written for the memory encoder of the same frame, never read afterwards.
TRANSIENT_KEYS = ("high_res_masks",)


def run_single_object(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    obj_idx: int,
    *,
    is_init_cond_frame: bool,
    point_inputs: dict[str, torch.Tensor] | None,
    mask_inputs: torch.Tensor | None,
    reverse: bool,
    streaming: bool,
) -> dict[str, torch.Tensor]:
    """transformers' own step for one object on one frame (memory attention, mask decoder, pointer)."""
    return tracker._run_single_frame_inference(
        inference_session=session,
        frame_idx=frame_idx,
        obj_idx=obj_idx,
        batch_size=1,
        is_init_cond_frame=is_init_cond_frame,
        point_inputs=point_inputs,
        mask_inputs=mask_inputs,
        reverse=reverse,
        streaming=streaming,
    )


def encode_memories(
    tracker: Sam3TrackerVideoModel,
    session: Any,
    frame_idx: int,
    obj_indices: list[int],
    high_res_masks: list[torch.Tensor],
    score_logits: list[torch.Tensor],
    from_points: list[bool],
) -> None:
    """transformers' batched memory encoder; stores each object's memory in its output for ``frame_idx``.

    Note transformers binarizes every object's mask when any of them came from clicks.
    """
    tracker._batch_encode_memories(
        inference_session=session,
        frame_idx=frame_idx,
        objects_needing_memory_encoding=obj_indices,
        high_res_masks_for_memory=high_res_masks,
        object_score_logits_for_memory=score_logits,
        is_mask_from_pts_per_obj=from_points,
    )


def frame_features(
    tracker: Sam3TrackerVideoModel, session: Any, frame_idx: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The frame's tracker features and positional embeddings, per level, ``HW x 1 x C``."""
    return tracker._prepare_vision_features(session, frame_idx, 1)


@dataclass
class MemoryFrame:
    """One frame of an object's memory as memory attention reads it."""

    temporal_index: int  # row of the model's temporal encodings (-1: a conditioning frame)
    features: torch.Tensor  # HW x 1 x C on the model's device: the stored tensor itself when it is there
    # already, which is what keys the frame's kept projections (models.memory_attention)
    spatial_pos: torch.Tensor  # HW x 1 x C


@dataclass
class ObjectMemory:
    """Everything memory attention reads for one object on one frame, chosen by SAM 3's rules."""

    frames: list[MemoryFrame]
    pointers: torch.Tensor | None  # P x 1 x C object-pointer tokens
    pointer_pos: torch.Tensor | None  # P x 1 x C their temporal encodings

    @property
    def layout(self) -> tuple[int, int]:
        """(memory frames, pointer tokens): objects with the same layout attend as one batch."""
        return len(self.frames), 0 if self.pointers is None else self.pointers.shape[0]


def object_memories(
    tracker: Sam3TrackerVideoModel, session: Any, obj_indices: list[int], frame_idx: int, reverse: bool, streaming: bool
) -> list[ObjectMemory]:
    """What memory attention reads for each object, chosen by SAM 3's own rules: the memory frames
    (conditioning frames closest in time, the last ``num_maskmem - 1`` frames) and the object pointers
    with their temporal encodings. Memory frames are read from the outputs transformers stores
    (``maskmem_features``, ``maskmem_pos_enc``), as its ``_build_memory_attention_inputs`` does.

    Objects whose pointers sit at the same frame offsets (objects tracked together) have their pointer
    encodings made in one call, as transformers' batched form of ``_process_object_pointers`` makes them.
    """
    device = tracker.no_memory_embedding.device
    memories, pointer_lists = [], []
    by_offsets: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for row, obj_idx in enumerate(obj_indices):
        frames = [
            MemoryFrame(
                temporal_index=offset - 1,  # transformers' row of its temporal encodings (offset 0: -1, the last)
                features=_on(stored["maskmem_features"], device),
                spatial_pos=_on(stored["maskmem_pos_enc"], device),
            )
            for offset, stored in tracker._gather_memory_frame_outputs(session, obj_idx, frame_idx, reverse)
            if stored is not None
        ]
        memories.append(ObjectMemory(frames, None, None))
        offsets, pointers, max_pointers = tracker._get_object_pointers(
            session, obj_idx, frame_idx, session.num_frames, device, reverse, streaming
        )
        pointer_lists.append(pointers)
        if pointers:
            by_offsets.setdefault((tuple(offsets), max_pointers), []).append(row)
    for (offsets, max_pointers), rows in by_offsets.items():
        per_offset = [torch.cat([pointer_lists[row][k] for row in rows]) for k in range(len(offsets))]  # N x C each
        tokens, encodings = tracker._process_object_pointers(
            list(offsets), per_offset, max_pointers, len(rows), tracker.hidden_dim, device
        )  # P x N x C each
        for column, row in enumerate(rows):
            memories[row].pointers = tokens[:, column : column + 1]
            memories[row].pointer_pos = encodings[:, column : column + 1]
    return memories


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (without a call when it is there: this runs per memory frame and object)."""
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def uses_multimask(tracker: Sam3TrackerVideoModel, is_init_cond_frame: bool, point_inputs: dict | None) -> bool:
    """Whether the mask decoder returns three masks (and keeps the best) for these inputs."""
    return tracker._use_multimask(is_init_cond_frame, point_inputs)


# ---------------------------------------------------------------------------------- overrides


@contextlib.contextmanager
def precomputed_vision_features(video_model: Sam3VideoModel, vision_embeds: Any) -> Iterator[None]:
    """Make the text model's detector return this frame's already computed encoder output.

    Relies on ``Sam3VideoModel`` fetching a frame's features through ``detector_model.get_vision_features``.
    """
    detector = video_model.detector_model
    detector.get_vision_features = lambda *args, **kwargs: vision_embeds
    try:
        yield
    finally:
        del detector.get_vision_features


@contextlib.contextmanager
def tracker_forward(video_model: Sam3VideoModel, forward: Callable[..., Any] | None) -> Iterator[None]:
    """Make the text model's tracker calls (``tracker_model(...)``) run ``forward`` instead (``None``: as is)."""
    if forward is None:
        yield
        return
    tracker = video_model.tracker_model
    tracker.forward = forward
    try:
        yield
    finally:
        del tracker.forward


# Set (per thread) while a batched CPU step runs; read by the switch installed on each channels-first norm.
_NORMS_BY_FORMULA: contextvars.ContextVar[bool] = contextvars.ContextVar("norms_by_formula", default=False)
_SWITCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@contextlib.contextmanager
def channel_norms_by_formula(tracker: Sam3TrackerVideoModel) -> Iterator[None]:
    """Within the block (on this thread), the tracker's channels-first LayerNorms (mask downsampler,
    memory fuser, mask decoder) normalize by formula over the channel dimension instead of through
    PyTorch's kernel on a permuted view.

    On CPU that kernel normalizes each pixel's few channels (4 and 16 in the mask downsampler) as one
    short row at a time, after copying the permuted tensor: 1.9 ms for 8 objects' 4-channel 64x64
    maps on one core of this project's box, against 0.2 ms for the formula. The formula rounds
    differently in the last bits (about 2e-6 on unit-scale input), so the exact path never uses it.
    A context variable, not a patch for the block's duration, so another thread's step is unaffected.
    """
    if tracker not in _SWITCHED:
        for module in tracker.modules():
            if isinstance(module, _LAYER_NORM_CLASS) and module.data_format == "channels_first":
                module.forward = partial(_switched_channel_norm, module)
        _SWITCHED.add(tracker)
    token = _NORMS_BY_FORMULA.set(True)
    try:
        yield
    finally:
        _NORMS_BY_FORMULA.reset(token)


def _switched_channel_norm(norm: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    if not _NORMS_BY_FORMULA.get():
        return type(norm).forward(norm, features)
    mean = features.mean(1, keepdim=True)
    centered = features - mean
    variance = centered.square().mean(1, keepdim=True)
    normalized = centered * torch.rsqrt(variance + norm.eps)
    return torch.addcmul(norm.bias[:, None, None], normalized, norm.weight[:, None, None])


def cache_constant_embeddings(video_model: Sam3VideoModel) -> None:
    """Compute the tracker's image-wide positional embedding once.

    transformers recomputes this constant (it depends only on the weights) for every object on every
    frame, calling it through the instance. Call again after moving the model to another device or dtype.
    """
    tracker = video_model.tracker_model
    tracker.__dict__.pop("get_image_wide_positional_embeddings", None)
    with torch.no_grad():  # a plain tensor, usable inside and outside inference mode
        constant = tracker.get_image_wide_positional_embeddings()
    tracker.get_image_wide_positional_embeddings = lambda: constant


def points_processor(image_size: int) -> Sam3TrackerVideoProcessor:
    """transformers' point/box processor without its image processors (they need torchvision).

    Its point and box path reads only ``target_size`` and ``point_pad_value``.
    """
    processor = object.__new__(Sam3TrackerVideoProcessor)
    processor.target_size = image_size
    processor.point_pad_value = -10
    return processor
