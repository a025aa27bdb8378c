"""``StreamingTracker``: SAM 3 on a live feed, forward-only, one frame at a time, with bounded state.

Prompts (text, clicks, boxes) are validated when they are given and take effect on the next frame,
without restarting the stream. Each frame costs one image-encoder pass shared by the text model
and the point/box tracker; after each frame the rolling memory bank keeps only what SAM 3 reads
for the next one.

The prompt queue: each prompt method validates, updates the bookkeeping (ids, concepts) and queues
the model-side steps it needs; :meth:`StreamingTracker.track` runs the queued steps once each, in
order, before the frame. A step that raises is dropped (its bookkeeping undone) and reported by
:meth:`StreamingTracker.take_prompt_failures`: it is never retried, and it never fails the frame.
``reset()`` drops whatever is still queued.

Threads: the tracker is driven by one thread. Only :meth:`StreamingTracker.check_text` and
:meth:`StreamingTracker.new_object_ids` may be called from another thread while ``track()`` runs
(a control thread answering prompts at once while a slow frame is tracked).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.encoder import FrameFeatures, ImageEncoder, TorchImageEncoder
from models.engines import EngineOutput, GeometryEngine, TextEngine
from models.frame_ring import FrameRing
from models.frames import check_frame
from models.loading import Sam3Models
from models.memory import MemoryWindow
from models.object_ids import ObjectIds
from models.preprocess import frame_to_pixels, prompt_to_model_points
from models.prompts import Prompt, PromptFailure
from models.readback import frame_masks, objects_from_masks
from models.results import FrameResult, ObjectResult
from models.sessions import TEXT_TOKENS, concat_inputs, point_inputs

# New objects the text detector may add in one frame when its config does not say (its query count).
_DEFAULT_DETECTIONS_PER_FRAME = 256


@dataclass(frozen=True)
class TrackerConfig:
    """Knobs of the streaming tracker.

    - ``max_conditioning_frames``: prompted/reconditioned frames kept per object (``None``: all,
      which is what the model reads; the text model adds one every 16 frames, so bound it live).
    - ``retire_after_frames``: an object unseen for this many frames is dropped (``None``: never).
      Short occlusions keep their id; objects that left for good stop costing compute.
    - ``sync_timings``: synchronize CUDA at stage boundaries (host wall times per stage, at the cost of
      making the host wait on the GPU at each one). Off, stage timings on CUDA come from CUDA events and
      the host waits only to read the frame's results back (``models.readback``: twice per frame).
    - ``batch_objects``: run the tracker's per-object work (memory attention, mask decoder) once per
      frame for all objects as a batch (``models.batching``), and on CPU upsample masks to the frame
      with OpenCV; answers match the per-object loop's to rounding (scores within 1e-4, masks but for
      near-zero pixels). ``False`` runs transformers' own per-object loop and PyTorch's upsampling:
      with ``max_conditioning_frames=None, retire_after_frames=None`` too, masks and scores equal
      transformers' unbounded session bit for bit.
    - ``prompt_ring_seconds`` / ``prompt_ring_frames``: how far back a click, box or correction can be
      placed (``Prompt.frame_index``, see :meth:`StreamingTracker.prompt_frame`): frames tracked within
      this many seconds of the newest (by ``track``'s timestamps; ``None``: no time limit), at most this
      many frames. Their encoder output is held (``models.frame_ring``), so every frame is encoded even
      with nothing tracked; ``prompt_ring_frames=0`` turns placing on past frames off.
    """

    max_conditioning_frames: int | None = 4
    retire_after_frames: int | None = 150
    sync_timings: bool = False
    batch_objects: bool = True
    prompt_ring_seconds: float | None = 1.0
    prompt_ring_frames: int = 60  # 1 s of a 60 fps camera


class StreamingTracker:
    """Track text concepts, clicked and boxed objects through a live stream of frames.

    >>> tracker = StreamingTracker(load_models("tiny-random"))
    >>> tracker.add_prompt(Prompt(text="person"))
    >>> result = tracker.track(frame_rgb, timestamp=time.time())
    """

    def __init__(
        self, models: Sam3Models, config: TrackerConfig | None = None, encoder: ImageEncoder | None = None
    ) -> None:
        self.models = models
        self.config = config or TrackerConfig()
        if self.config.retire_after_frames is not None and self.config.retire_after_frames < 1:
            raise ValueError("retire_after_frames: must be >= 1 (or None to never retire)")
        window = MemoryWindow.for_tracker(models.tracker_model.config, self.config.max_conditioning_frames)
        self.encoder = encoder or TorchImageEncoder(models)
        self.ring = FrameRing(self.config.prompt_ring_seconds, self.config.prompt_ring_frames)
        self.geometry = GeometryEngine(models, window, self.config.batch_objects, self.ring)
        self.text = TextEngine(models, window, self.config.batch_objects)
        self._frame_index = 0
        self._frame_size: tuple[int, int] | None = None  # (width, height) of the last frame
        self._pending: list[_Step] = []
        self._failures: list[PromptFailure] = []
        self._refinements: dict[int, dict[str, torch.Tensor]] = {}
        self._ids = ObjectIds()
        self._detections_per_frame = _detector_queries(models)
        self._known: dict[int, str] = {}  # obj_id -> "geometry" | "text", as of the prompts given so far
        self._texts: list[str] = []
        self._unseen: dict[int, int] = {}
        self._first_frame: dict[int, int] = {}  # geometry obj_id -> the frame it was started on

    # ----------------------------------------------------------------- prompts (take effect next frame)

    def add_prompt(self, prompt: Prompt | Mapping[str, Any], *, frame_size: tuple[int, int] | None = None) -> list[int]:
        """Queue a prompt for the next frame; returns the ids of objects it creates or refines.

        ``frame_size`` (width, height) places pixel points before any frame was tracked; otherwise the
        last frame's size is used. Raises ``ValueError`` naming the bad field; nothing is queued then.

        Clicks and boxes with a ``frame_index`` of a frame already tracked go on the frame
        :meth:`prompt_frame` names (the one the operator drew on, while the prompt ring holds it) and
        their object catches up to the newest frame; text is always applied from the next frame.
        """
        prompt = prompt if isinstance(prompt, Prompt) else Prompt.from_dict(prompt)
        if prompt.text is not None and not self.models.text_detector:
            raise ValueError(f"text: the {self.models.source} model has no trained text detector; click or draw a box")
        if prompt.has_geometry:
            size = frame_size or self._frame_size
            if size is None:
                raise ValueError(
                    "points: no frame tracked yet, so pixel positions cannot be placed; pass frame_size=(w, h)"
                )
            prompt.check_inside(*size)
            if prompt.obj_id is not None and self._known.get(prompt.obj_id) == "text" and prompt.text is not None:
                raise ValueError("obj_id: refining a text-found object takes points or a box, not text")
        ids = self._queue_geometry(prompt, *size) if prompt.has_geometry else []
        if prompt.text is not None and prompt.text not in self._texts:
            text = prompt.text
            self._texts.append(text)
            self._queue(
                lambda: self.text.add_text(self._frame_index, text),
                text=text,
                undo=lambda: text in self._texts and self._texts.remove(text),
            )
        return ids

    def remove_prompt(self, text: str) -> list[int]:
        """Drop a text concept and the objects it found (from the next frame). Returns their ids."""
        if text not in self._texts:
            raise ValueError(f"text: no such text prompt {text!r} (active: {self._texts})")
        self._texts.remove(text)
        gone = [obj_id for obj_id, kind in self._known.items() if kind == "text" and self._label(obj_id) == text]
        for obj_id in gone:
            self._forget(obj_id)
        self._queue(lambda: self._drop_text(text), text=text)
        return gone

    def remove_object(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` from the next frame. Raises ``ValueError`` for an unknown id."""
        if isinstance(obj_id, bool) or not isinstance(obj_id, int):
            raise ValueError(f"obj_id: must be an integer, got {obj_id!r}")
        if obj_id not in self._known:
            raise ValueError(f"obj_id: no object {obj_id} is tracked (tracked: {sorted(self._known)})")
        self._forget(obj_id)
        self._queue(lambda: self._remove_now(obj_id), obj_ids=(obj_id,))

    def reset(self) -> None:
        """Forget every object and text prompt, and every prompt still queued; the stream goes on and
        frame numbering continues (object ids too: an id is never given to two objects)."""
        for obj_id in list(self._known):
            self._forget(obj_id)
        self._first_frame.clear()
        self._texts.clear()
        self._unseen.clear()
        self._refinements.clear()
        self._pending.clear()  # what they would have done is wiped anyway

        def reset_now() -> None:
            self.geometry = GeometryEngine(self.models, self.geometry.window, self.config.batch_objects, self.ring)
            self.text = TextEngine(self.models, self.text.window, self.config.batch_objects)
            self._refinements.clear()

        self._queue(reset_now)

    # --------------------------------------------- thread-safe: callable while another thread tracks

    def prompt_frame(self, frame_index: int | None, *, refines: int | None = None) -> int | None:
        """The frame a click or box drawn on ``frame_index`` is placed on, if it goes on a past frame.

        ``None``: on the next frame tracked (no ``frame_index``, a frame not tracked yet, the ring off or
        empty, ``refines`` naming an object found by text or not started yet). Otherwise ``frame_index``
        itself, or the oldest frame the prompt ring holds when it is older, and for a correction
        (``refines``: the object's id) never before the frame after the object started. A prompt given
        with the returned ``frame_index`` before the next frame is tracked lands exactly there.
        """
        return self._past_frame(frame_index, refines, self.ring.oldest_promised())

    def _past_frame(self, frame_index: int | None, refines: int | None, oldest: int | None) -> int | None:
        """``prompt_frame`` with ``oldest`` as the oldest frame a prompt may go on."""
        next_frame = self._frame_index
        if frame_index is None or frame_index >= next_frame or oldest is None:
            return None
        placed = max(frame_index, oldest)
        if refines is not None:
            started = self._first_frame.get(refines)
            if started is None:
                return None
            placed = max(placed, started + 1)
        return placed if placed < next_frame else None

    def check_text(self, text: str) -> None:
        """Raise ``ValueError`` (naming ``text``) if the tokenizer cannot take ``text``."""
        _check_tokenizable(self.models.tokenizer, text)

    def new_object_ids(self, count: int = 1, *, obj_id: int | None = None) -> list[int]:
        """Reserve ids for new objects ahead of :meth:`add_prompt`: ``count`` fresh ones, or the
        caller-chosen ``obj_id``. Give them back as the prompt's ``obj_id`` and they are the ids used.
        ``ValueError`` (naming ``obj_id``) when the id cannot be had."""
        if obj_id is not None:
            self._ids.claim(obj_id)
            return [obj_id]
        return self._ids.take(count)

    # ----------------------------------------------------------------------------------- tracking

    @torch.inference_mode()
    def track(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult:
        """Apply queued prompts, run SAM 3 on ``frame`` (uint8 RGB ``H x W x 3``) and return every object."""
        check_frame(frame)
        height, width = frame.shape[:2]
        timings: dict[str, float] = {}
        clock = _StageClock(timings, self.models.device, self.config.sync_timings)

        pixels = frame_to_pixels(frame, self.models.image_size, self.models.device, self.models.dtype)
        clock.lap("preprocess")
        wanted = self.ring.enabled or self._has_work_after_pending()
        features = FrameFeatures(self.models, self.encoder.encode(pixels)) if wanted else None
        clock.lap("encode")

        self._run_pending_steps()
        outputs = self._run_engines(pixels, features)
        clock.lap("track")

        objects = self._postprocess(outputs, width, height)
        self._retire_lost(objects)
        if features is not None:
            self.ring.add(self._frame_index, time.time() if timestamp is None else timestamp, features.tokens)
        self.geometry.prune(self._frame_index)
        self.text.prune(self._frame_index)
        clock.finish("postprocess")

        result = FrameResult(self._frame_index, timestamp, width, height, objects, timings)
        self._frame_index += 1
        self._frame_size = (width, height)
        return result

    def state_bytes(self) -> int:
        """Bytes of per-stream state held (both sessions' tensors and bookkeeping, the prompt ring's
        encoder output; not the weights)."""
        return self.geometry.state_bytes() + self.text.state_bytes() + self.ring.state_bytes()

    @property
    def frame_index(self) -> int:
        """Index the next tracked frame will get."""
        return self._frame_index

    @property
    def object_ids(self) -> list[int]:
        """Ids of the objects tracked, as of the prompts given so far."""
        return sorted(self._known)

    @property
    def object_labels(self) -> dict[int, str | None]:
        """Each tracked object's concept (``None`` for objects made by clicks and boxes)."""
        return {obj_id: self._label(obj_id) if kind == "text" else None for obj_id, kind in self._known.items()}

    @property
    def text_prompts(self) -> list[str]:
        """Concepts in effect, as of the prompts given so far."""
        return list(self._texts)

    def take_prompt_failures(self) -> list[PromptFailure]:
        """Prompts that failed when applied since the last call (each dropped, never retried)."""
        failures, self._failures = self._failures, []
        return failures

    # ----------------------------------------------------------------------------------- internals

    def _queue_geometry(self, prompt: Prompt, width: int, height: int) -> list[int]:
        per_object = prompt_to_model_points(prompt, width, height, self.models.image_size)
        device = self.models.device
        if prompt.obj_id is not None and prompt.obj_id in self._known:
            obj_id = prompt.obj_id
            coords, labels = per_object[0]
            past = self._past_frame(prompt.frame_index, obj_id, self._oldest_for(prompt.frame_index))
            if past is not None and self._known[obj_id] == "geometry":
                self._queue(
                    lambda: self._place_on_past_frame(past, obj_id, point_inputs(coords, labels, device)),
                    obj_ids=(obj_id,),
                )
            else:
                self._queue(lambda: self._refine_later(obj_id, point_inputs(coords, labels, device)), obj_ids=(obj_id,))
            return [obj_id]
        if prompt.obj_id is not None:
            ids = self.new_object_ids(obj_id=prompt.obj_id)
        else:
            ids = self.new_object_ids(len(per_object))
        past = self._past_frame(prompt.frame_index, None, self._oldest_for(prompt.frame_index))
        for obj_id, (coords, labels) in zip(ids, per_object, strict=True):
            self._known[obj_id] = "geometry"
            # Tensors are made when the step runs, on the tracking thread.
            self._queue(
                lambda obj_id=obj_id, coords=coords, labels=labels: self._start_object(
                    past, obj_id, point_inputs(coords, labels, device)
                ),
                obj_ids=(obj_id,),
                undo=lambda obj_id=obj_id: self._forget(obj_id),
            )
        return ids

    def _oldest_for(self, frame_index: int | None) -> int | None:
        """The oldest frame a prompt drawn on ``frame_index`` may go on: a frame still held is taken as it is
        (what ``prompt_frame`` answered a frame ago may have left the budget since, never the ring)."""
        held = self.ring.oldest_held
        if frame_index is not None and held is not None and frame_index >= held:
            return held
        return self.ring.oldest_promised()

    def _start_object(self, past: int | None, obj_id: int, inputs: dict[str, torch.Tensor]) -> None:
        if past is None:
            self.geometry.add_object(self._frame_index, obj_id, inputs)
            self._first_frame[obj_id] = self._frame_index
        else:
            self._place_on_past_frame(past, obj_id, inputs)

    def _place_on_past_frame(self, frame_index: int, obj_id: int, inputs: dict[str, torch.Tensor]) -> None:
        """Start or correct a clicked object on a held past frame and catch it up (before this frame)."""
        placed = self.ring.place(frame_index)  # the frame answered is held: the ring keeps one frame spare
        self._first_frame.setdefault(obj_id, placed)
        self.geometry.place_on_past_frame(placed, self._frame_index, obj_id, inputs)

    def _queue(
        self, run: Callable[[], None], *, obj_ids: tuple[int, ...] = (), text: str | None = None, undo: Any = None
    ) -> None:
        self._pending.append(_Step(run, obj_ids, text, undo))

    def _run_pending_steps(self) -> None:
        """Each queued step once, in order; one that raises is undone, reported and dropped."""
        steps, self._pending = self._pending, []
        for step in steps:
            try:
                step.run()
            except Exception as exc:  # a prompt must never fail every later frame
                if step.undo is not None:
                    step.undo()
                field = "text" if step.text is not None else "obj_id"
                error = f"{field}: failed when applied ({type(exc).__name__}: {exc})"
                self._failures.append(PromptFailure(error, step.obj_ids, step.text))

    def _refine_later(self, obj_id: int, inputs: dict[str, torch.Tensor]) -> None:
        if obj_id in self.geometry.pending:  # created on this very frame: the clicks join its first prompt
            self.geometry.add_object(self._frame_index, obj_id, inputs)
        elif obj_id in self._refinements:
            self._refinements[obj_id] = concat_inputs(self._refinements[obj_id], inputs)
        else:
            self._refinements[obj_id] = inputs

    def _remove_now(self, obj_id: int) -> None:
        self._refinements.pop(obj_id, None)
        if self.geometry.owns(obj_id):
            self.geometry.remove(obj_id)
        elif self.text.owns(obj_id):
            self.text.remove(obj_id)

    def _drop_text(self, text: str) -> None:
        if self.text.session is not None and text in self.text.prompts:
            for obj_id in self.text.drop_text(text):
                self._refinements.pop(obj_id, None)

    def _forget(self, obj_id: int) -> None:
        self._known.pop(obj_id, None)
        self._first_frame.pop(obj_id, None)
        self._unseen.pop(obj_id, None)
        self._ids.release(obj_id)

    def _label(self, obj_id: int) -> str | None:
        return self.text.label_of(obj_id) if self.text.session is not None and self.text.owns(obj_id) else None

    def _has_work_after_pending(self) -> bool:
        return bool(self._pending) or self.geometry.has_work() or self.text.session is not None

    def _run_engines(self, pixels: torch.Tensor, features: FrameFeatures | None) -> list[EngineOutput]:
        index = self._frame_index
        text_out = EngineOutput.empty(self.models.device)
        if self.text.session is not None and features is not None:
            # New detections are numbered from a block of ids held for this step (see models.object_ids).
            with self._ids.holding(self._detections_per_frame) as block:
                text_out, block.next_free = self.text.step(index, pixels, features.detector(), block.start)
        for obj_id in text_out.obj_ids:
            self._known.setdefault(obj_id, "text")
        geometry_out = EngineOutput.empty(self.models.device)
        if self.geometry.has_work() and features is not None:
            # The text model already ran the tracker's neck on this frame when it is active.
            tracker_features = self.text.tracker_features(index) or features.tracker()
            geometry_out = self.geometry.step(index, pixels, tracker_features)
        if self._refinements:
            self._apply_refinements(index, [text_out, geometry_out])
        return [text_out, geometry_out]

    def _apply_refinements(self, index: int, outputs: list[EngineOutput]) -> None:
        for engine, out in ((self.text, outputs[0]), (self.geometry, outputs[1])):
            mine = {obj_id: inputs for obj_id, inputs in self._refinements.items() if engine.owns(obj_id)}
            if not mine:
                continue
            refined = engine.refine(index, mine)
            for obj_id, (logits, score_logit) in refined.items():
                if obj_id in out.obj_ids:
                    # The frame reports the corrected pass: its mask and its score.
                    row = out.obj_ids.index(obj_id)
                    out.mask_logits[row] = logits[0].to(out.mask_logits.dtype)
                    score = score_logit.float().sigmoid().to(out.scores.dtype)
                    out.scores[row] = score[0]
                    if out.overlap_scores is not None:
                        out.overlap_scores[row] = score[0].to(out.overlap_scores.dtype)
        self._refinements.clear()

    def _postprocess(self, outputs: list[EngineOutput], width: int, height: int) -> list[ObjectResult]:
        """Both engines' objects, read back to the host together (``models.readback``: two waits on CUDA)."""
        outputs = [out for out in outputs if out.obj_ids]
        if not outputs:
            return []
        exact = not self.config.batch_objects
        masks = [frame_masks(o.mask_logits, height, width, o.labels, o.overlap_scores, exact) for o in outputs]
        objects = objects_from_masks(
            [obj_id for out in outputs for obj_id in out.obj_ids],
            masks[0] if len(masks) == 1 else torch.cat(masks),
            torch.cat([out.scores.float() for out in outputs]),
            [label for out in outputs for label in out.labels],
        )
        objects.sort(key=lambda o: o.obj_id)
        return objects

    def _retire_lost(self, objects: list[ObjectResult]) -> None:
        limit = self.config.retire_after_frames
        seen = {o.obj_id for o in objects}
        for obj_id in self.geometry.obj_ids + self.text.obj_ids:
            self._known.setdefault(obj_id, "geometry" if self.geometry.owns(obj_id) else "text")
            self._unseen[obj_id] = 0 if obj_id in seen else self._unseen.get(obj_id, 0) + 1
            if limit is not None and self._unseen[obj_id] > limit:
                self._forget(obj_id)
                self._remove_now(obj_id)


@dataclass
class _Step:
    """A queued model-side step of one prompt call, with what it concerns and how to undo its bookkeeping."""

    run: Callable[[], None]
    obj_ids: tuple[int, ...] = ()
    text: str | None = None
    undo: Callable[[], object] | None = None


def _detector_queries(models: Sam3Models) -> int:
    """The most objects the text detector can add on one frame (its DETR query count)."""
    detector = getattr(getattr(models.video_model.config, "detector_config", None), "detr_decoder_config", None)
    return int(getattr(detector, "num_queries", _DEFAULT_DETECTIONS_PER_FRAME))


# The tokenizer is used by the tracking thread; text is checked from the control thread on a private
# copy (fast tokenizers refuse concurrent use: "Already borrowed"), one per tokenizer, under a lock.
_CHECKERS: dict[int, tuple[Any, Any, threading.Lock]] = {}
_CHECKERS_LOCK = threading.Lock()


def _check_tokenizable(tokenizer: Any, text: str) -> None:
    with _CHECKERS_LOCK:
        entry = _CHECKERS.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _CHECKERS[id(tokenizer)] = (tokenizer, copy.deepcopy(tokenizer), threading.Lock())
    _, checker, lock = entry
    try:
        with lock:
            checker(text, max_length=TEXT_TOKENS, truncation=True)
    except Exception as exc:  # the tokenizer raises TypeError, ValueError, ...: all mean "cannot take it"
        raise ValueError(f"text: the tokenizer cannot take this text ({type(exc).__name__})") from None


class _StageClock:
    """Time per stage of one frame.

    On CPU, and on CUDA with ``sync``: host wall time, synchronizing CUDA first at each boundary so that
    asynchronous kernels are charged to their stage. On CUDA without ``sync``: CUDA events mark the
    boundaries on the stream (the host never waits for them); they are read in :meth:`finish`, after the
    frame's results were copied back (a wait the frame makes anyway), and the last stage is the frame's
    wall time less the others, so that the stages still add up to the frame's time.
    """

    def __init__(self, timings: dict[str, float], device: torch.device, sync: bool) -> None:
        self.timings = timings
        self.sync = sync and device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.events: list[tuple[str, torch.cuda.Event]] | None = None
        if device.type == "cuda" and not sync:
            self.events = [("", self._record())]

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, stage: str) -> None:
        """Close ``stage`` (and open the next)."""
        if self.events is not None:
            self.events.append((stage, self._record()))
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = now - self.last
        self.last = now

    def finish(self, stage: str) -> None:
        """Close the last stage, ``stage``, once the frame's results are on the host."""
        if self.events is None:
            self.lap(stage)
            return
        last = self.events[-1][1]
        if not last.query():  # no results were read back (no objects): nothing waited for the GPU yet
            last.synchronize()
        for (_, begin), (name, end) in zip(self.events, self.events[1:], strict=False):
            self.timings[name] = begin.elapsed_time(end) / 1000.0
        self.timings[stage] = max(0.0, time.perf_counter() - self.start - sum(self.timings.values()))
