"""The rolling memory bank: after each frame, keep exactly what SAM 3 reads for the next one.

transformers' streaming sessions keep every frame's pixels and outputs. The tracker reads only:
the conditioning frames (memory of the ``max_cond_frame_num`` closest, object pointers of all),
the memories of the last ``num_maskmem - 1`` frames, and the object pointers of the last
``max_object_pointers_in_encoder - 1`` frames. ``prune_session`` drops the rest, slims outputs
that are only still read for their pointer, and trims the video model's per-frame bookkeeping,
so memory and per-frame time stay flat over a stream of any length.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from models import hf_internals as hf

# Longer than any hotstart threshold SAM 3 ships with (8); only lengths up to the threshold are compared.
_HOTSTART_KEEP = 32


@dataclass(frozen=True)
class MemoryWindow:
    """How much history the tracker keeps per object.

    ``memory_frames`` and ``pointer_frames`` come from the model config (what it reads);
    ``max_conditioning_frames`` caps the prompted/reconditioned frames kept (``None``: all of them,
    which is exactly what the model reads; any bound trades old object pointers for flat memory).
    """

    memory_frames: int
    pointer_frames: int
    max_conditioning_frames: int | None

    @classmethod
    def for_tracker(cls, tracker_config: Any, max_conditioning_frames: int | None) -> MemoryWindow:
        if max_conditioning_frames is not None and max_conditioning_frames < 1:
            raise ValueError("max_conditioning_frames: must be >= 1 (or None to keep all)")
        return cls(
            memory_frames=max(tracker_config.num_maskmem - 1, 0),
            pointer_frames=max(tracker_config.max_object_pointers_in_encoder - 1, 0),
            max_conditioning_frames=max_conditioning_frames,
        )


def prune_session(session: Any, frame_idx: int, window: MemoryWindow, history: int = 0) -> None:
    """Evict from ``session`` everything the model will not read when processing ``frame_idx + 1``, or,
    with ``history`` > 0, any frame from ``frame_idx + 1 - history`` on (a prompt placed on a past frame
    re-runs its object from there, reading what that frame read, clicks included).

    Works on both ``Sam3TrackerVideoInferenceSession`` and ``Sam3VideoInferenceSession``.
    """
    next_frame = frame_idx + 1 - history
    oldest_memory = next_frame - window.memory_frames
    oldest_pointer = next_frame - window.pointer_frames
    for outputs in hf.all_object_outputs(session):
        cond = outputs["cond_frame_outputs"]
        if window.max_conditioning_frames is not None and len(cond) > window.max_conditioning_frames:
            for old in sorted(cond)[: len(cond) - window.max_conditioning_frames]:
                del cond[old]
        non_cond = outputs["non_cond_frame_outputs"]
        for t in [t for t in non_cond if t < oldest_pointer]:
            del non_cond[t]
        for t, out in non_cond.items():
            if t < oldest_memory:
                for key in [k for k in out if k not in hf.POINTER_KEYS]:
                    del out[key]
        for out in list(cond.values()) + list(non_cond.values()):
            for key in hf.TRANSIENT_KEYS:
                out.pop(key, None)
    for per_frame in hf.per_frame_object_records(session):
        for t in [t for t in per_frame if t < frame_idx - history]:
            del per_frame[t]
    if hf.is_text_session(session):
        trim_video_bookkeeping(session, frame_idx, set(hf.object_ids(session)))


def trim_video_bookkeeping(session: Any, frame_idx: int, live_ids: set[int]) -> None:
    """The text model's per-frame and per-object metadata, which it deep-copies every frame.

    Only ``frame_idx``'s entries of the per-frame tables are read again, whichever way frames are walked.
    """
    books = hf.text_bookkeeping(session)
    for per_frame in books.per_frame:
        for t in [t for t in per_frame if t != frame_idx]:
            del per_frame[t]
    # In streaming mode only the length of these lists matters (hotstart removal is off), and only up
    # to the hotstart thresholds; keep that many of the most recent entries.
    for per_key in books.hotstart_lists:
        for frames in per_key.values():
            del frames[: max(len(frames) - _HOTSTART_KEEP, 0)]
    for per_obj in books.per_object:
        for obj_id in [k for k in per_obj if k not in live_ids]:
            del per_obj[obj_id]
    for pair in [p for p in books.overlap_pairs if not set(p) <= live_ids]:
        del books.overlap_pairs[pair]


def state_bytes(*roots: Any) -> int:
    """Bytes held by the objects reachable from ``roots``: tensor storages (each counted once) plus
    the Python containers and scalars around them (so per-frame bookkeeping shows up too).
    Modules (the model weights) are not state and are skipped."""
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    total = 0
    stack: list[Any] = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, torch.nn.Module):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.append(vars(obj))
    return total
