"""The one tracker interface ``streamer`` calls, and the trackers behind it.

``streamer`` knows nothing of the model's insides: it imports only from the ``models`` package's top
level and calls the methods of :class:`Tracker`. ``models.StreamingTracker`` implements them with
SAM 3; :class:`PassThroughTracker` implements them with no model at all, so a benchmark of the
pipeline (capture, transport, compositing, WebRTC) can subtract the model's share.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from models import FrameResult, ObjectIds, ObjectResult, Prompt, PromptFailure, check_frame
from streamer.moving_objects import moving_objects

PASSTHROUGH = "passthrough"
MAX_MOVING_OBJECTS = 256  # the wire's MAX_OBJECTS


@runtime_checkable
class Tracker(Protocol):
    """What the tracker service needs of a tracker: ``models.StreamingTracker``'s public verbs.

    Prompts take effect on the next :meth:`track`; every prompt method raises ``ValueError`` whose
    message starts with the offending field's name. One thread drives a tracker; only
    :meth:`check_text` and :meth:`new_object_ids` may be called from another thread meanwhile (the
    service's control thread, which answers prompts without waiting for the frame in progress).
    """

    def add_prompt(
        self, prompt: Prompt | Mapping[str, Any], *, frame_size: tuple[int, int] | None = None
    ) -> list[int]: ...

    def remove_object(self, obj_id: int) -> None: ...

    def remove_prompt(self, text: str) -> list[int]: ...

    def reset(self) -> None: ...

    def track(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult: ...

    def state_bytes(self) -> int: ...

    def check_text(self, text: str) -> None:
        """Thread-safe: ``ValueError`` (naming ``text``) if the model cannot take this concept."""
        ...

    def new_object_ids(self, count: int = 1, *, obj_id: int | None = None) -> list[int]:
        """Thread-safe: reserve ``count`` fresh ids (or the chosen ``obj_id``) for new objects; passed
        back as prompts' ``obj_id``, they are the ids the objects get."""
        ...

    def prompt_frame(self, frame_index: int | None, *, refines: int | None = None) -> int | None:
        """Thread-safe: the past frame a click or box drawn on tracker frame ``frame_index`` goes on (the
        oldest its prompt ring holds when older; ``refines``: the object a correction is for), or ``None``:
        the next frame. Given as the prompt's ``frame_index`` before the next frame, it lands there."""
        ...

    def take_prompt_failures(self) -> list[PromptFailure]:
        """Prompts that failed when applied during the last frames (dropped, never retried)."""
        ...

    @property
    def object_labels(self) -> dict[int, str | None]:
        """Tracked objects (as of the prompts given so far) and the concept that found each."""
        ...

    @property
    def text_prompts(self) -> list[str]:
        """Concepts in effect, as of the prompts given so far."""
        ...

    @property
    def frame_index(self) -> int:
        """Index the next tracked frame gets."""
        ...


TrackerFactory = Callable[[], Tracker]
"""Makes one fresh tracker (one per stream) sharing weights loaded once."""


class PassThroughTracker:
    """A :class:`Tracker` with no model, for measuring the pipeline's own overhead.

    Prompts are validated exactly like the real tracker's (same field-naming errors) and get object
    ids, but no object is ever found: :meth:`track` returns no objects, or, with
    ``synthetic_object``, one fixed object (id 0, the centre quarter of the frame), and with
    ``moving_objects`` N ellipses of varied sizes gliding over the frame (``streamer.moving_objects``;
    ids after the synthetic one's), so that masks travel the wire and get composited as a model's
    would. ``delay_s`` makes each :meth:`track` take at least that long, to stand in for a slow model.
    """

    def __init__(self, delay_s: float = 0.0, synthetic_object: bool = False, moving_objects: int = 0) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s: must be >= 0, got {delay_s}")
        if not 0 <= moving_objects <= MAX_MOVING_OBJECTS:
            raise ValueError(f"moving_objects: must be between 0 and {MAX_MOVING_OBJECTS}, got {moving_objects}")
        self.delay_s = delay_s
        self.synthetic_object = synthetic_object
        self.moving_objects = moving_objects
        self._frame_index = 0
        self._first_moving = 1 if synthetic_object else 0  # id 0 is the synthetic object's
        self._ids = ObjectIds(first=self._first_moving + moving_objects)  # prompts' ids come after the made-up ones
        self._objects: set[int] = set()
        self._texts: list[str] = []
        self._mask_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def add_prompt(self, prompt: Prompt | Mapping[str, Any], *, frame_size: tuple[int, int] | None = None) -> list[int]:
        """Validate ``prompt`` and hand out the ids it would create or refine."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt.from_dict(prompt)
        if prompt.points and frame_size is not None:
            prompt.check_inside(*frame_size)
        if prompt.text is not None and prompt.text not in self._texts:
            self._texts.append(prompt.text)
        if not prompt.has_geometry:
            return []
        if prompt.obj_id is not None and prompt.obj_id in self._objects:
            return [prompt.obj_id]
        ids = self.new_object_ids(prompt.object_count, obj_id=prompt.obj_id)
        self._objects.update(ids)
        return ids

    def remove_object(self, obj_id: int) -> None:
        """Forget ``obj_id``; ``ValueError`` for an id never handed out."""
        if obj_id not in self._objects:
            raise ValueError(f"obj_id: no object {obj_id} is tracked (tracked: {sorted(self._objects)})")
        self._objects.discard(obj_id)
        self._ids.release(obj_id)

    def remove_prompt(self, text: str) -> list[int]:
        """Forget a text concept (it never found anything); ``ValueError`` if it is not active."""
        if text not in self._texts:
            raise ValueError(f"text: no such text prompt {text!r} (active: {self._texts})")
        self._texts.remove(text)
        return []

    def reset(self) -> None:
        """Forget every prompt and object id."""
        for obj_id in self._objects:
            self._ids.release(obj_id)
        self._objects.clear()
        self._texts.clear()

    def check_text(self, text: str) -> None:
        """No tokenizer: any text ``models.Prompt`` accepts is fine."""

    def new_object_ids(self, count: int = 1, *, obj_id: int | None = None) -> list[int]:
        """Ids for new objects, as :class:`Tracker` says (thread-safe)."""
        if obj_id is not None:
            self._ids.claim(obj_id)
            return [obj_id]
        return self._ids.take(count)

    def prompt_frame(self, frame_index: int | None, *, refines: int | None = None) -> int | None:
        """No prompt ring: every prompt goes on the next frame."""
        return None

    def take_prompt_failures(self) -> list[PromptFailure]:
        """Nothing is applied later than :meth:`add_prompt`, so nothing fails then."""
        return []

    @property
    def object_labels(self) -> dict[int, str | None]:
        """The objects prompted (never found: the synthetic one is not listed)."""
        return dict.fromkeys(sorted(self._objects))

    @property
    def text_prompts(self) -> list[str]:
        """Concepts given (they never find anything)."""
        return list(self._texts)

    @property
    def frame_index(self) -> int:
        """Index the next tracked frame gets."""
        return self._frame_index

    def track(self, frame: np.ndarray, timestamp: float | None = None) -> FrameResult:
        """Return the frame's (empty or synthetic) result, after ``delay_s``."""
        start = time.perf_counter()
        check_frame(frame)
        height, width = frame.shape[:2]
        objects = [self._synthetic(width, height)] if self.synthetic_object else []
        for obj in moving_objects(self.moving_objects, self._frame_index, width, height):
            obj.obj_id += self._first_moving
            objects.append(obj)
        left = self.delay_s - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        result = FrameResult(
            self._frame_index, timestamp, width, height, objects, {"track": time.perf_counter() - start}
        )
        self._frame_index += 1
        return result

    def state_bytes(self) -> int:
        """No per-stream tensors: nothing to report."""
        return 0

    def _synthetic(self, width: int, height: int) -> ObjectResult:
        if self._mask_cache is None or self._mask_cache[0] != (width, height):
            mask = np.zeros((height, width), dtype=bool)
            mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
            self._mask_cache = ((width, height), mask)
        bbox = (width // 4, height // 4, width - width // 4, height - height // 4)
        return ObjectResult(obj_id=0, score=1.0, bbox=bbox, mask=self._mask_cache[1], label="synthetic")


def tracker_factory(
    model: str,
    device: str | None = None,
    *,
    encoder: str = "torch",
    encoder_precision: str | None = None,
    passthrough_delay_s: float = 0.0,
    passthrough_object: bool = False,
    passthrough_objects: int = 0,
) -> TrackerFactory:
    """Load ``model`` once and return a function making one tracker per stream.

    ``"passthrough"`` needs no model (see :class:`PassThroughTracker`; the ``passthrough_*`` options
    apply to it only). Anything else is handed to ``models.load_models`` (hub id, local folder,
    ``tiny-random``, ...) and each call makes a ``models.StreamingTracker`` over the shared weights
    and one shared image encoder, named by ``encoder`` (``models.make_encoder``: ``torch``,
    ``compiled``, ``onnxruntime``, ``tensorrt``; one that cannot run here falls back to torch with a
    warning). ``device`` ``None`` or ``"auto"`` lets the model layer pick (CUDA when there is one).
    """
    if model == PASSTHROUGH:
        return lambda: PassThroughTracker(passthrough_delay_s, passthrough_object, passthrough_objects)
    from models import StreamingTracker, TrackerConfig, load_models, make_encoder  # lazy: torch loads only when needed

    bundle = load_models(model, device=None if device in (None, "auto") else device)
    image_encoder = make_encoder(encoder, bundle, precision=encoder_precision)
    return lambda: StreamingTracker(bundle, TrackerConfig(), encoder=image_encoder)


def make_tracker(model: str, device: str | None = None) -> Tracker:
    """One tracker for ``model`` (``"passthrough"`` or anything ``models.load_models`` takes)."""
    return tracker_factory(model, device)()
