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

# Keys of a stored frame output that are still read once the frame has left the memory window
# but is within the object-pointer window.
POINTER_KEYS = ("object_pointer", "object_score_logits")
# Written for the memory encoder of the same frame, never read afterwards.
TRANSIENT_KEYS = ("high_res_masks",)
# Longer than any hotstart threshold SAM 3 ships with (8); only lengths up to the threshold are compared.
_HOTSTART_KEEP = 32


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


def prune_session(session: Any, frame_idx: int, window: MemoryWindow) -> None:
    """Evict from ``session`` everything the model will not read when processing ``frame_idx + 1``.

    Works on both ``Sam3TrackerVideoInferenceSession`` and ``Sam3VideoInferenceSession``.
    """
    next_frame = frame_idx + 1
    oldest_memory = next_frame - window.memory_frames
    oldest_pointer = next_frame - window.pointer_frames
    for outputs in session.output_dict_per_obj.values():
        cond = outputs["cond_frame_outputs"]
        if window.max_conditioning_frames is not None and len(cond) > window.max_conditioning_frames:
            for old in sorted(cond)[: len(cond) - window.max_conditioning_frames]:
                del cond[old]
        non_cond = outputs["non_cond_frame_outputs"]
        for t in [t for t in non_cond if t < oldest_pointer]:
            del non_cond[t]
        for t, out in non_cond.items():
            if t < oldest_memory:
                for key in [k for k in out if k not in POINTER_KEYS]:
                    del out[key]
        for out in list(cond.values()) + list(non_cond.values()):
            for key in TRANSIENT_KEYS:
                out.pop(key, None)
    for per_obj in (session.frames_tracked_per_obj, session.point_inputs_per_obj, session.mask_inputs_per_obj):
        for per_frame in per_obj.values():
            for t in [t for t in per_frame if t < frame_idx]:
                del per_frame[t]
    if hasattr(session, "obj_id_to_tracker_score_frame_wise"):
        trim_video_bookkeeping(session, frame_idx, set(session.obj_ids))


def trim_video_bookkeeping(session: Any, frame_idx: int, live_ids: set[int]) -> None:
    """The text model's per-frame and per-object metadata, which it deep-copies every frame.

    Only ``frame_idx``'s entries of the per-frame tables are read again, whichever way frames are walked.
    """
    for per_frame in (session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids):
        for t in [t for t in per_frame if t != frame_idx]:
            del per_frame[t]
    # In streaming mode only the length of these lists matters (hotstart removal is off), and only up
    # to the hotstart thresholds; keep that many of the most recent entries.
    for per_key in (session.unmatched_frame_inds, session.overlap_pair_to_frame_inds):
        for frames in per_key.values():
            del frames[: max(len(frames) - _HOTSTART_KEEP, 0)]
    for per_obj in (
        session.unmatched_frame_inds,
        session.trk_keep_alive,
        session.obj_first_frame_idx,
        session.obj_id_to_score,
        session.obj_id_to_last_occluded,
        session.obj_id_to_prompt_id,
    ):
        for obj_id in [k for k in per_obj if k not in live_ids]:
            del per_obj[obj_id]
    for pair in [p for p in session.overlap_pair_to_frame_inds if not set(p) <= live_ids]:
        del session.overlap_pair_to_frame_inds[pair]


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
