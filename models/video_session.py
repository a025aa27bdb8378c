"""One video in the predictor: SAM 3's two inference sessions over frames decoded on demand.

- Text concepts run on ``Sam3VideoModel``'s session (detector + tracker), clicks and boxes on
  ``Sam3TrackerVideoModel``'s session (the same tracker weights), as in the live tracker. Each frame
  costs one image-encoder pass: the text model's tracker features feed the point/box session.
- Both sessions read their pixels from :class:`ProcessedFrames`, a lazy stand-in for transformers'
  ``processed_frames`` dict: frame ``i`` is decoded and preprocessed when the model asks for it.
- After each propagated frame, per-frame outputs the model will not read again are dropped (see
  :func:`prune_for_next_frame`), so a session's memory does not grow with the video's length.
- A propagation runs frame by frame like transformers' ``propagate_in_video_iterator``: text-found
  objects go through SAM 3's hot-start buffer (outputs held back ``hotstart_delay`` frames so that
  objects removed as spurious are hidden on the frames before their removal too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
from transformers.models.sam3_video.modeling_sam3_video import (
    Sam3VideoInferenceSession,
    Sam3VideoSegmentationOutput,
)

from models import hf_internals as hf
from models.encoder import FrameFeatures, ImageEncoder, TorchImageEncoder
from models.loading import Sam3Models
from models.memory import MemoryWindow, trim_video_bookkeeping
from models.preprocess import frame_to_pixels, prompt_to_model_points
from models.prompts import Prompt
from models.readback import objects_from_logits
from models.results import ObjectResult
from models.sessions import add_object_inputs, add_text_prompt, point_inputs, refine_objects
from models.video_frames import VideoFrames

FORWARD, BACKWARD, BOTH = "forward", "backward", "both"
DIRECTIONS = (FORWARD, BACKWARD, BOTH)


class ProcessedFrames(Mapping):
    """transformers' ``processed_frames`` for a whole video, filled lazily.

    ``frames[i]`` is frame ``i`` resized to the model's square input, normalized, on the model's
    device; the last ``keep`` are kept (the text model and the point/box session read the same frame).
    ``len`` is the video's frame count, which transformers reads as the number of frames.
    """

    def __init__(self, frames: VideoFrames, models: Sam3Models, keep: int = 2) -> None:
        self.frames = frames
        self.models = models
        self.keep = keep
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = self._recent.get(index)
        if pixels is None:
            m = self.models
            pixels = frame_to_pixels(self.frames[index], m.image_size, m.device, m.dtype)[0]
            self._recent[index] = pixels
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return pixels

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.frames)))


@dataclass
class RawFrame:
    """Low-resolution model outputs of one frame, before upsampling and hiding."""

    frame_index: int
    text: Sam3VideoSegmentationOutput | None = None
    geometry_ids: tuple[int, ...] = ()
    geometry_logits: torch.Tensor | None = None  # N x h x w mask logits
    geometry_scores: torch.Tensor | None = None  # N probabilities


class SessionChanged(RuntimeError):
    """The session was changed (prompted, reset, closed) while a propagation over it was running."""


class VideoSession:
    """Prompts and propagation over one video; the predictor's per-session state.

    Problems with a request raise ``ValueError`` whose message starts with the field's name.
    """

    def __init__(self, models: Sam3Models, frames: VideoFrames, encoder: ImageEncoder | None = None) -> None:
        self.models = models
        self.frames = frames
        self.pixels = ProcessedFrames(frames, models)
        self.encoder = encoder if encoder is not None else TorchImageEncoder(models)
        self.window = MemoryWindow.for_tracker(models.tracker_model.config, max_conditioning_frames=None)
        self.version = 0
        self._clear()

    # --------------------------------------------------------------------------------- properties

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def width(self) -> int:
        return self.frames.width

    @property
    def height(self) -> int:
        return self.frames.height

    @property
    def object_ids(self) -> list[int]:
        """Objects currently tracked (and not removed by the user)."""
        text = [i for i in hf.object_ids(self.text) if i not in self.hidden] if self.text is not None else []
        geometry = hf.object_ids(self.geometry) if self.geometry is not None else []
        return sorted(text + geometry)

    @property
    def text_prompts(self) -> list[str]:
        return list(hf.text_prompts(self.text).values()) if self.text is not None else []

    @property
    def first_prompted_frame(self) -> int | None:
        return min(self.prompted_frames) if self.prompted_frames else None

    # ------------------------------------------------------------------------------------ prompts

    def add_prompt(self, prompt: Prompt, frame_index: int) -> list[ObjectResult]:
        """Apply ``prompt`` on ``frame_index`` and return every object's result on that frame."""
        self._check_frame_index("frame_index", frame_index)
        if prompt.has_geometry:
            prompt.check_inside(self.width, self.height)
            if prompt.text is not None and prompt.bounding_boxes:
                raise ValueError(
                    "bounding_boxes: a box given with text is a visual exemplar of the concept, which transformers' "
                    "Sam3VideoModel does not take (its detector runs on text only); send the box in its own "
                    "add_prompt to track the boxed object"
                )
        refinements: dict[int, dict[str, torch.Tensor]] = {}
        if prompt.has_geometry:
            refinements = self._register_geometry(prompt, frame_index)
        if prompt.text is not None:
            if self.text is None:
                self.text = self._new_session(Sam3VideoInferenceSession)
            add_text_prompt(self.text, self.models.tokenizer, prompt.text)
        self.prompted_frames.add(frame_index)
        self.version += 1
        raw = self._run_frame(frame_index, reverse=False, refinements=refinements)
        self._fresh = (self.version, raw)
        return self._postprocess(raw)

    def remove_object(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` on every frame. ``ValueError`` if there is no such object.

        A text-found object stays in SAM 3's tracker, hidden, so that the detector matches it there
        instead of finding the same thing again as a new object.
        """
        if self.geometry is not None and obj_id in hf.object_ids(self.geometry):
            hf.remove_tracker_object(self.geometry, obj_id)
            if not hf.object_ids(self.geometry):
                self.geometry = None
        elif self.text is not None and obj_id in hf.object_ids(self.text) and obj_id not in self.hidden:
            self.hidden.add(obj_id)
        else:
            raise ValueError(f"obj_id: no object {obj_id} in this session (objects: {self.object_ids})")
        self.version += 1

    def reset(self) -> None:
        """Forget every prompt, object and result; the video stays open."""
        self._clear()
        self.version += 1

    def close(self) -> None:
        """Free the sessions' tensors and the decoder; the session is unusable afterwards."""
        self._clear()
        self.version += 1
        self.frames.close()

    # -------------------------------------------------------------------------------- propagation

    def propagation_plan(
        self, direction: str, start_frame_index: int | None, max_frame_num_to_track: int | None
    ) -> list[tuple[range, bool]]:
        """The legs ``(frames in order, reverse)`` of a propagation, checked against the session.

        ``forward`` covers ``start .. start + max - 1``; ``backward`` covers ``start`` down to
        ``start - max + 1``; ``both`` runs the forward leg, then ``start - 1`` down to ``start - max``.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"propagation_direction: must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if start_frame_index is not None:
            self._check_frame_index("start_frame_index", start_frame_index)
        if not self.prompted_frames:
            raise ValueError("session: no prompt added yet; add_prompt before propagate_in_video")
        start = min(self.prompted_frames) if start_frame_index is None else start_frame_index
        count = self.num_frames if max_frame_num_to_track is None else max_frame_num_to_track
        legs: list[tuple[range, bool]] = []
        if direction in (FORWARD, BOTH):
            legs.append((range(start, min(start + count, self.num_frames)), False))
        if direction == BACKWARD:
            legs.append((range(start, max(start - count, -1), -1), True))
        if direction == BOTH:
            legs.append((range(start - 1, max(start - 1 - count, -1), -1), True))
        return [(frames, reverse) for frames, reverse in legs if len(frames)]

    def propagate(self, legs: list[tuple[range, bool]]) -> Iterator[tuple[int, list[ObjectResult]]]:
        """Run the legs of :meth:`propagation_plan`, yielding ``(frame_index, objects)`` per frame.

        Raises :class:`SessionChanged` if the session is prompted, reset or closed meanwhile.
        """
        version = self.version
        for leg_number, (frames, reverse) in enumerate(legs):
            # The backward leg of ``both`` starts next to the forward leg's first frames: keep them for it.
            keep = range(0)
            if leg_number + 1 < len(legs):
                first = frames[0]
                keep = range(first, first + self.window.pointer_frames)
            yield from self._leg(frames, reverse, keep, version)

    def _leg(self, frames: range, reverse: bool, keep: range, version: int) -> Iterator[tuple[int, list[ObjectResult]]]:
        delay = int(self.models.video_model.hotstart_delay) if self.text is not None else 0
        buffer: list[RawFrame] = []
        last = frames[-1]
        for frame_index in frames:
            self._check_unchanged(version)
            raw = self._take_fresh(frame_index)
            if raw is None:
                raw = self._run_frame(frame_index, reverse)
            self._prune(frame_index, reverse, keep)
            buffer.append(raw)
            if frame_index == last:
                ready, buffer = buffer, []
            elif len(buffer) >= max(delay, 1):
                ready, buffer = buffer[:1], buffer[1:]
            else:
                continue
            for held in ready:
                self._check_unchanged(version)
                yield held.frame_index, self._postprocess(held)

    def _check_unchanged(self, version: int) -> None:
        if self.version != version:
            raise SessionChanged("the session was changed during propagate_in_video; propagate again")

    # ---------------------------------------------------------------------------------- internals

    def _clear(self) -> None:
        self.text: Sam3VideoInferenceSession | None = None
        self.geometry: Sam3TrackerVideoInferenceSession | None = None
        self.prompted_frames: set[int] = set()
        self.hidden: set[int] = set()  # text-found objects the user removed
        self.next_obj_id = 0
        self._fresh: tuple[int, RawFrame] | None = None

    def _check_frame_index(self, field: str, value: int) -> None:
        if not 0 <= value < self.num_frames:
            raise ValueError(
                f"{field}: frame {value} is out of range (the video has {self.num_frames} frames, "
                f"0..{self.num_frames - 1})"
            )

    def _new_session(self, kind: type) -> Any:
        device = self.models.device
        session = kind(
            video_height=self.height,
            video_width=self.width,
            inference_device=device,
            inference_state_device=device,
            video_storage_device=device,
            dtype=self.models.dtype,
        )
        hf.use_frames(session, self.pixels)
        return session

    def _register_geometry(self, prompt: Prompt, frame_index: int) -> dict[int, dict[str, torch.Tensor]]:
        """Queue the clicks/boxes: new objects start on this frame, known ones get refined on it.

        As in SAM 3, clicks given again for an object on the same frame replace its earlier clicks there.
        Returns the refinements to apply once the frame has run.
        """
        device = self.models.device
        per_object = prompt_to_model_points(prompt, self.width, self.height, self.models.image_size)
        obj_id = prompt.obj_id
        if obj_id is not None and self.text is not None and obj_id in hf.object_ids(self.text):
            self.hidden.discard(obj_id)  # clicking a removed text-found object brings it back
            return {obj_id: point_inputs(*per_object[0], device)}
        if obj_id is not None and self.geometry is not None and obj_id in hf.object_ids(self.geometry):
            # A tracked frame: correct the mask with the memory (SAM's refinement).
            if hf.was_tracked(self.geometry, self.geometry.obj_id_to_idx(obj_id), frame_index):
                return {obj_id: point_inputs(*per_object[0], device)}
            new = {obj_id: point_inputs(*per_object[0], device)}  # its first prompted frame, prompted afresh
        else:
            new = {}
            for coords, labels in per_object:
                new_id = obj_id if obj_id is not None else self.next_obj_id
                self.next_obj_id = max(self.next_obj_id, new_id + 1)
                new[new_id] = point_inputs(coords, labels, device)
        if self.geometry is None:
            self.geometry = self._new_session(Sam3TrackerVideoInferenceSession)
        add_object_inputs(self.geometry, frame_index, new)
        return {}

    def _take_fresh(self, frame_index: int) -> RawFrame | None:
        """The frame ``add_prompt`` just ran, when nothing changed since: it is not run twice."""
        fresh, self._fresh = self._fresh, None
        if fresh is not None and fresh[0] == self.version and fresh[1].frame_index == frame_index:
            return fresh[1]
        return None

    @torch.inference_mode()
    def _run_frame(
        self, frame_index: int, reverse: bool, refinements: Mapping[int, dict[str, torch.Tensor]] | None = None
    ) -> RawFrame:
        raw = RawFrame(frame_index)
        models = self.models
        if self.text is not None:
            # New detections take ids after every id given so far (the two sessions share one id space).
            hf.reserve_object_ids(self.text, self.next_obj_id)
            raw.text = models.video_model(inference_session=self.text, frame_idx=frame_index, reverse=reverse)
            hf.hotstart_removed(self.text).update(raw.text.removed_obj_ids or ())
            self.next_obj_id = max(self.next_obj_id, hf.next_object_id(self.text))
        if self.geometry is not None:
            features = hf.cached_tracker_features(self.text, frame_index) if self.text is not None else None
            if features is None:
                tokens = self.encoder.encode(self.pixels[frame_index].unsqueeze(0))
                features = FrameFeatures(models, tokens).tracker()
            hf.cache_tracker_features(self.geometry, frame_index, features)
            out = models.tracker_model(inference_session=self.geometry, frame_idx=frame_index, reverse=reverse)
            raw.geometry_ids = tuple(out.object_ids)
            raw.geometry_logits = out.pred_masks[:, 0]
            raw.geometry_scores = out.object_score_logits.reshape(-1).float().sigmoid()
        if refinements:
            self._refine(raw, refinements)
        return raw

    def _refine(self, raw: RawFrame, refinements: Mapping[int, dict[str, torch.Tensor]]) -> None:
        """Correct objects with clicks on this frame; the corrected masks replace the frame's outputs."""
        tracker = self.models.tracker_model
        for obj_id, inputs in refinements.items():
            if raw.text is not None and obj_id in raw.text.obj_id_to_mask:
                refined = refine_objects(tracker, self.text, raw.frame_index, {obj_id: inputs}, streaming=False)
                raw.text.obj_id_to_mask[obj_id] = refined[obj_id][0]
            elif obj_id in raw.geometry_ids:
                refined = refine_objects(tracker, self.geometry, raw.frame_index, {obj_id: inputs}, streaming=False)
                logits, score_logits = refined[obj_id]
                row = raw.geometry_ids.index(obj_id)
                raw.geometry_logits[row] = logits[0].to(raw.geometry_logits.dtype)
                raw.geometry_scores[row] = score_logits.float().sigmoid()[0]

    def _prune(self, frame_index: int, reverse: bool, keep: range) -> None:
        for session in (self.text, self.geometry):
            if session is not None:
                prune_for_next_frame(session, frame_index, reverse, self.window, keep)

    def _postprocess(self, raw: RawFrame) -> list[ObjectResult]:
        objects = []
        if raw.text is not None:
            objects += text_objects(raw.text, self.text, self.height, self.width, hidden=self.hidden)
        if raw.geometry_ids:
            objects += objects_from_logits(
                list(raw.geometry_ids), raw.geometry_logits, raw.geometry_scores, self.height, self.width
            )
        return sorted(objects, key=lambda o: o.obj_id)


def text_objects(
    out: Sam3VideoSegmentationOutput,
    session: Sam3VideoInferenceSession,
    height: int,
    width: int,
    hidden: set[int] | frozenset[int] = frozenset(),
) -> list[ObjectResult]:
    """The objects ``Sam3VideoModel`` shows on a frame, as transformers' video processor post-processes
    them: suppressed and hot-start-removed objects hidden (and ``hidden`` ones), masks at ``height`` x
    ``width``, overlaps settled per prompt by tracker score, empty masks left out; ``score`` is the
    detection score."""
    hide = set(out.suppressed_obj_ids or ()) | hf.hotstart_removed(session) | set(hidden)
    ids = [i for i in sorted(out.obj_id_to_mask) if i not in hide]
    if not ids:
        return []
    device = out.obj_id_to_mask[ids[0]].device
    logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0)
    scores = torch.tensor([float(out.obj_id_to_score[i]) for i in ids], device=device)
    tracker_scores = out.obj_id_to_tracker_score or {}
    overlap = torch.tensor([float(tracker_scores.get(i, 0.0)) for i in ids], device=device)
    labels = [hf.text_prompts(session).get(hf.prompt_of_object(session, i)) for i in ids]
    return objects_from_logits(ids, logits, scores, height, width, labels, overlap)


def prune_for_next_frame(session: Any, frame_idx: int, reverse: bool, window: MemoryWindow, keep: range) -> None:
    """Drop the per-frame outputs that the next frame of a propagation (``frame_idx`` +1, or -1 when
    ``reverse``) will not read, besides the frames in ``keep``.

    SAM 3's tracker reads every conditioning (prompted) frame, and, of the other frames, the last
    ``max_object_pointers_in_encoder - 1`` in the direction of travel (their memories for the last
    ``num_maskmem - 1``). Those stay whole; every other frame's output goes. Without this a session
    keeps every frame's output for the rest of its life: at full size (bf16) about 1.5 MB per frame
    per object (memory features and their positional encoding, 648 KiB each; the 288 x 288 mask,
    162 KiB), plus a 2 MB high-resolution mask that is only read to encode that frame's memory.
    Conditioning frames all stay, as the model reads their object pointers: the text model turns every
    16th frame of a well-detected object into one (about 1.5 MB per object per 16 frames).
    """
    step = -1 if reverse else 1
    reach = {frame_idx - step * back for back in range(window.pointer_frames)}
    for outputs in hf.all_object_outputs(session):
        non_cond = outputs["non_cond_frame_outputs"]
        for t in [t for t in non_cond if t not in reach and t not in keep]:
            del non_cond[t]
        for out in list(outputs["cond_frame_outputs"].values()) + list(non_cond.values()):
            for key in hf.TRANSIENT_KEYS:
                out.pop(key, None)
    if hf.is_text_session(session):
        trim_video_bookkeeping(session, frame_idx, set(hf.object_ids(session)))
