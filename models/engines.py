"""The two SAM 3 sessions a live stream needs, each behind a small engine with a rolling memory.

- ``GeometryEngine``: objects made from clicks and boxes, on ``Sam3TrackerVideoModel``'s session.
- ``TextEngine``: concepts ("person") detected and tracked by ``Sam3VideoModel``.

Both are fed the image features of one shared encoder pass. Each session numbers its frames from
its own start (transformers assumes a session begins at frame 0), and is dropped when it holds
nothing, so an idle engine costs nothing. With ``batch_objects`` (the default) the tracker's
per-object work runs batched (``models.batching``); without, it is transformers' own per-object loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from models import hf_internals as hf
from models.batching import ObjectStep, step_and_store, track_objects
from models.encoder import FrameFeatures
from models.frame_ring import FrameRing
from models.loading import Sam3Models
from models.memory import MemoryWindow, prune_session, state_bytes
from models.sessions import add_object_inputs, add_text_prompt, concat_inputs, drop_text_prompt, refine_objects


@dataclass
class EngineOutput:
    """Low-resolution results of one engine on one frame (all on the model's device)."""

    obj_ids: list[int]
    mask_logits: torch.Tensor  # N x h x w
    scores: torch.Tensor  # N, probabilities
    labels: list[str | None]
    overlap_scores: torch.Tensor | None = None  # N, used to settle overlapping pixels (text objects)

    @classmethod
    def empty(cls, device: torch.device) -> EngineOutput:
        return cls([], torch.zeros(0, 1, 1, device=device), torch.zeros(0, device=device), [])


class _Engine:
    """Session lifecycle, local frame numbering, refinement and eviction shared by both engines."""

    # Whether transformers runs this session's tracker in streaming mode (object-pointer lookback rule).
    streaming_tracker_calls = True

    def __init__(self, models: Sam3Models, window: MemoryWindow, batch_objects: bool = True) -> None:
        self.models = models
        self.window = window
        self.batch_objects = batch_objects
        self.session: Any = None
        self.start = 0

    def _new_session(self) -> Any:
        raise NotImplementedError

    def _open(self, frame_index: int) -> None:
        if self.session is None:
            self.session = self._new_session()
            hf.install_frame_window(self.session)
            self.start = frame_index

    def local(self, frame_index: int) -> int:
        return frame_index - self.start

    @property
    def obj_ids(self) -> list[int]:
        return hf.object_ids(self.session) if self.session is not None else []

    def refine(
        self, frame_index: int, inputs_by_obj: dict[int, dict[str, torch.Tensor]]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return refine_objects(
            self.models.tracker_model,
            self.session,
            self.local(frame_index),
            inputs_by_obj,
            streaming=self.streaming_tracker_calls,
            batched=self.batch_objects,
        )

    def prune(self, frame_index: int) -> None:
        if self.session is not None:
            prune_session(self.session, self.local(frame_index), self.window)

    def state_bytes(self) -> int:
        return state_bytes(self.session) if self.session is not None else 0

    def _session_kwargs(self) -> dict[str, Any]:
        device = self.models.device
        return {
            "inference_device": device,
            "inference_state_device": device,
            "video_storage_device": device,
            "dtype": self.models.dtype,
        }


class GeometryEngine(_Engine):
    """Objects prompted with clicks and boxes; with a :class:`FrameRing`, also on recent past frames."""

    def __init__(
        self, models: Sam3Models, window: MemoryWindow, batch_objects: bool = True, ring: FrameRing | None = None
    ) -> None:
        super().__init__(models, window, batch_objects)
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.ring = ring

    def _open(self, frame_index: int) -> None:
        # The session starts at the oldest frame held, so a later prompt placed on any held frame has a
        # non-negative local index (transformers stops its pointer lookback at index 0); offsets between
        # frames, all the model reads, are the same whatever the start.
        oldest = self.ring.oldest_held if self.ring is not None else None
        super()._open(frame_index if oldest is None else min(frame_index, oldest))

    def prune(self, frame_index: int) -> None:
        """Keep what the next frame reads and, with a ring, what a prompt placed on any held frame re-reads."""
        oldest = self.ring.oldest_held if self.ring is not None else None
        if self.session is not None:
            history = frame_index + 1 - max(oldest, self.start) if oldest is not None else 0
            prune_session(self.session, self.local(frame_index), self.window, history=max(history, 0))

    def place_on_past_frame(
        self, frame_index: int, next_frame: int, obj_id: int, inputs: dict[str, torch.Tensor]
    ) -> None:
        """Start ``obj_id`` with these clicks on the held past frame ``frame_index`` (or correct it there when
        it is tracked already), then track that object alone through the held frames up to ``next_frame - 1``,
        so its state is what it would be had the prompt been given on that frame. Other objects are untouched.
        """
        assert self.ring is not None
        new = not self.owns(obj_id)
        if new:
            self._open(frame_index)
        if frame_index < self.start:
            raise ValueError(f"frame_index: frame {frame_index} is older than this object's session")
        session, tracker = self.session, self.models.tracker_model
        obj_idx = session.obj_id_to_idx(obj_id)
        later_clicks = {} if new else hf.rewind_object(session, obj_idx, self.local(frame_index))
        for index in range(frame_index, next_frame):
            local = self.local(index)
            tracker_features = FrameFeatures(self.models, self.ring.tokens(index)).tracker()
            hf.cache_tracker_features(session, local, tracker_features)
            if index == frame_index and new:
                session.add_point_inputs(obj_idx, local, inputs)
                start = ObjectStep(obj_idx, True, point_inputs=inputs, mask_inputs=None, reverse=False)
                step_and_store(tracker, session, local, [start], streaming=True, batched=self.batch_objects)
                continue
            if index > frame_index:
                track = ObjectStep(obj_idx, False, point_inputs=None, mask_inputs=None, reverse=False)
                step_and_store(tracker, session, local, [track], streaming=True, batched=self.batch_objects)
            clicks = inputs if index == frame_index else later_clicks.get(local)
            if clicks is not None:  # the correction on its frame, and the ones made since on theirs
                self.refine(index, {obj_id: clicks})

    def _new_session(self) -> Sam3TrackerVideoInferenceSession:
        return Sam3TrackerVideoInferenceSession(**self._session_kwargs())

    def has_work(self) -> bool:
        return bool(self.pending) or bool(self.obj_ids)

    def owns(self, obj_id: int) -> bool:
        return obj_id in self.pending or obj_id in self.obj_ids

    def add_object(self, frame_index: int, obj_id: int, inputs: dict[str, torch.Tensor]) -> None:
        """Start an object on this frame; more clicks for it on the same frame join its first prompt."""
        self._open(frame_index)
        if obj_id in self.pending:
            self.pending[obj_id] = concat_inputs(self.pending[obj_id], inputs)
        else:
            self.pending[obj_id] = inputs

    def remove(self, obj_id: int) -> None:
        self.pending.pop(obj_id, None)
        if self.session is not None and obj_id in self.obj_ids:
            hf.remove_tracker_object(self.session, obj_id)
        if not self.has_work():
            self.session = None

    def step(self, frame_index: int, pixels: torch.Tensor, tracker_features: dict[str, Any]) -> EngineOutput:
        if not self.has_work():
            return EngineOutput.empty(self.models.device)
        local = self.local(frame_index)
        if self.pending:
            add_object_inputs(self.session, local, self.pending)
            self.pending = {}
        hf.cache_tracker_features(self.session, local, tracker_features)
        tracker = self.models.tracker_model
        step = partial(track_objects, tracker) if self.batch_objects else tracker
        out = step(inference_session=self.session, frame=pixels, frame_idx=local)
        return EngineOutput(
            obj_ids=list(out.object_ids),
            mask_logits=out.pred_masks[:, 0],
            scores=out.object_score_logits.reshape(-1).float().sigmoid(),
            labels=[None] * len(out.object_ids),
        )


class TextEngine(_Engine):
    """Concepts named by text: every instance is detected, tracked, and picked up as it enters."""

    # Sam3VideoModel calls its tracker without ``frame=``, i.e. in transformers' non-streaming mode.
    streaming_tracker_calls = False

    def _new_session(self) -> Sam3VideoInferenceSession:
        return Sam3VideoInferenceSession(**self._session_kwargs())

    @property
    def prompts(self) -> list[str]:
        return list(hf.text_prompts(self.session).values()) if self.session is not None else []

    def owns(self, obj_id: int) -> bool:
        return obj_id in self.obj_ids

    def add_text(self, frame_index: int, text: str) -> None:
        self._open(frame_index)
        add_text_prompt(self.session, self.models.tokenizer, text)

    def drop_text(self, text: str) -> list[int]:
        removed = drop_text_prompt(self.session, text)
        if not hf.text_prompts(self.session):
            self.session = None
        return removed

    def remove(self, obj_id: int) -> None:
        self.session.remove_object(obj_id, strict=True)

    def label_of(self, obj_id: int) -> str | None:
        prompt_id = hf.prompt_of_object(self.session, obj_id)
        return hf.text_prompts(self.session).get(prompt_id) if prompt_id is not None else None

    def step(
        self, frame_index: int, pixels: torch.Tensor, vision_embeds: Any, next_obj_id: int
    ) -> tuple[EngineOutput, int]:
        """Detect and track on this frame; new objects take ids from ``next_obj_id`` on.

        Returns the output and the next free object id.
        """
        if self.session is None:
            return EngineOutput.empty(self.models.device), next_obj_id
        session = self.session
        hf.reserve_object_ids(session, next_obj_id)
        video = self.models.video_model
        batched = partial(track_objects, video.tracker_model) if self.batch_objects else None
        with hf.precomputed_vision_features(video, vision_embeds), hf.tracker_forward(video, batched):
            out = video(inference_session=session, frame=pixels, frame_idx=self.local(frame_index))
        hidden = set(out.suppressed_obj_ids or ())
        live = set(hf.object_ids(session))
        obj_ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden and i in live]
        device = self.models.device
        if not obj_ids:
            return EngineOutput.empty(device), hf.next_object_id(session)
        tracker_scores = out.obj_id_to_tracker_score or {}
        return (
            EngineOutput(
                obj_ids=obj_ids,
                mask_logits=torch.cat([out.obj_id_to_mask[i] for i in obj_ids], dim=0),
                scores=torch.tensor([float(out.obj_id_to_score[i]) for i in obj_ids], device=device),
                labels=[self.label_of(i) for i in obj_ids],
                overlap_scores=torch.tensor([float(tracker_scores.get(i, 0.0)) for i in obj_ids], device=device),
            ),
            hf.next_object_id(session),
        )

    def tracker_features(self, frame_index: int) -> dict[str, Any] | None:
        """The tracker-side features the video model computed for this frame, for the geometry engine."""
        if self.session is None:
            return None
        return hf.cached_tracker_features(self.session, self.local(frame_index))
