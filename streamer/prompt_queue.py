"""One stream's prompts between the control socket and its tracker: answered at once, applied in order.

The tracker service answers prompts on a control thread while its tracking thread may be busy with a
frame for a long time (a large model on a slow GPU), and a tracker is driven by one thread only. So a
prompt is handled in two halves:

- :meth:`StreamPrompts.submit` (control thread, within milliseconds): validate the request against
  the stream's prompt state *as the tracker will find it* (the state after the last frame tracked,
  plus every prompt accepted since), enforce the stream's :class:`PromptLimits`, ask the tracker for
  what only the model knows (is this text tokenizable; ids for new objects, reserved so the detector
  never hands them out), queue it, and answer with the ids and the frame it applies before.
- :meth:`StreamPrompts.take` / :func:`apply_op` / :meth:`StreamPrompts.settle` (tracking thread,
  between two frames): apply every queued prompt in arrival order, each once, then after the frame
  collect what failed. A prompt that fails when applied is dropped and reported as a ``prompt_failed``
  event naming its request; it is never retried.

Accepted prompts go to the :class:`~streamer.prompt_store.PromptStore` as they are accepted (under the
same lock, so the store sees them in the order they apply), failures and objects the tracker dropped
are taken out of it after each frame.

The ids in an answer are the ids used: a prompt that creates objects is applied as one prompt per
object, each naming its reserved id.

Clicks and boxes may name the frame they were drawn on by its capture ``seq``. The queue remembers which
tracker frame each recently tracked ``seq`` became (:meth:`StreamPrompts.tracked`), asks the tracker where
such a prompt goes (``Tracker.prompt_frame``: that frame while its prompt ring holds it, else the oldest it
holds) and pins the answer in the queued prompt's ``frame_index``; the answer says where
(``placed_on``, ``requested``). A drawn-on frame the tracker skipped counts as the newest frame tracked
before it.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from models import MAX_POINTS, MAX_TEXT_CHARS, Prompt, PromptFailure
from streamer.prompt_store import PromptStore
from streamer.protocol import MAX_OBJECTS, PromptAnswer, PromptRequest
from streamer.tracking import Tracker

log = logging.getLogger(__name__)

_LISTED = 20  # ids or concepts quoted in an error at most
# Tracked frames whose seq a prompt can name; well beyond any prompt ring (which the tracker bounds).
_SEQS_KEPT = 1024


@dataclass(frozen=True)
class PromptLimits:
    """Per-stream caps, each refused with an error naming the field when reached.

    ``max_objects`` counts every tracked object (clicked, boxed and found by a concept); results carry
    at most that many. ``max_queued`` bounds prompts accepted but not yet applied (a stream whose
    frames stopped, or a flood between two frames).
    """

    max_objects: int = 64
    max_concepts: int = 16
    max_text_chars: int = MAX_TEXT_CHARS
    max_points: int = MAX_POINTS
    max_queued: int = 1024

    def __post_init__(self) -> None:
        for name, hi in (
            ("max_objects", MAX_OBJECTS),
            ("max_concepts", 256),
            ("max_text_chars", MAX_TEXT_CHARS),
            ("max_points", MAX_POINTS),
            ("max_queued", 65536),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ValueError(f"{name}: must be an integer between 1 and {hi}, got {value!r}")


@dataclass
class QueuedOp:
    """An accepted prompt waiting to be applied: the request, the ids its answer gave (``new_ids``: the
    objects it creates), whether it adds a new concept, and the frame it applies before."""

    request: PromptRequest
    obj_ids: list[int]
    new_ids: list[int]
    new_text: bool
    frame_index: int
    restored: bool = False  # re-applied from the prompt store after a tracker restart
    placed_on: int | None = None  # seq of the past frame its clicks or box go on (None: the next frame)

    @property
    def texts(self) -> list[str]:
        """Concepts this prompt adds or removes."""
        text = self.request.prompt.text if self.request.prompt is not None else self.request.text
        return [text] if text is not None else []


@dataclass
class PromptState:
    """A stream's objects (id -> concept that found it, ``None`` when made by clicks or boxes) and concepts."""

    objects: dict[int, str | None] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)

    def copy(self) -> PromptState:
        return PromptState(dict(self.objects), list(self.texts))

    def apply(self, op: QueuedOp) -> None:
        """What ``op`` will have changed once applied."""
        req = op.request
        if req.op == "add_prompt":
            if op.new_text:
                self.texts.extend(op.texts)
            self.objects.update(dict.fromkeys(op.new_ids))
        elif req.op == "remove_object":
            self.objects.pop(req.obj_id, None)  # type: ignore[arg-type]
        elif req.op == "remove_prompt":
            self.texts = [t for t in self.texts if t != req.text]
            self.objects = {i: label for i, label in self.objects.items() if label != req.text}
        elif req.op == "reset_session":
            self.objects.clear()
            self.texts.clear()


@dataclass
class FailedOp:
    """An accepted prompt that failed when applied (``op`` is ``None`` when a tracker's failure could not
    be traced to one prompt)."""

    op: QueuedOp | None
    error: str
    obj_ids: tuple[int, ...] = ()
    texts: tuple[str, ...] = ()


class StreamPrompts:
    """The prompt queue of one stream (see the module docstring for which thread calls what)."""

    def __init__(
        self,
        tracker: Tracker,
        limits: PromptLimits = PromptLimits(),
        *,
        store: PromptStore | None = None,
        stream: str = "",
    ) -> None:
        self._tracker = tracker
        self._limits = limits
        self._store = store if store is not None else PromptStore()
        self._stream = stream
        self._lock = threading.Lock()
        self._seqs_lock = threading.Lock()
        self._settled = PromptState()  # as of the last frame tracked
        self._view = PromptState()  # as the next prompt will find it: settled + in flight + queued
        self._queued: deque[QueuedOp] = deque()
        self._in_flight: list[QueuedOp] = []
        self._next_frame = tracker.frame_index
        self._seqs: deque[tuple[int, int]] = deque(maxlen=_SEQS_KEPT)  # (seq, tracker frame index), ascending
        self.frame_size: tuple[int, int] | None = None  # (width, height) of the newest frame received
        self.applied = 0
        self.failed = 0

    # ------------------------------------------------------------------------------ control thread

    @property
    def queued(self) -> int:
        """Prompts accepted and not yet applied."""
        return len(self._queued) + len(self._in_flight)

    def submit(self, req: PromptRequest) -> PromptAnswer:
        """Validate and queue ``req``; the answer says what it will do (never waits for a frame)."""
        try:
            op = self.queue(req)
        except ValueError as exc:
            return PromptAnswer(req.request_id, False, str(exc))
        requested = req.prompt.seq if req.prompt is not None else None
        return PromptAnswer(
            req.request_id,
            True,
            obj_ids=op.obj_ids,
            frame_index=op.frame_index,
            placed_on=op.placed_on,
            requested=requested,
        )

    def queue(self, req: PromptRequest, *, restored: bool = False) -> QueuedOp:
        """Validate and queue ``req`` (``restored``: re-applied from the store, so not recorded again);
        ``ValueError`` naming the field when it is refused."""
        with self._lock:
            op = self._plan(req, restored)
            self._queued.append(op)
            self._view.apply(op)
            if not restored:  # a restored prompt is in the store already
                self._store.record(self._stream, op)
        return op

    def _plan(self, req: PromptRequest, restored: bool) -> QueuedOp:
        if len(self._queued) >= self._limits.max_queued:
            raise ValueError(f"stream: {len(self._queued)} prompts are waiting to be applied; retry later")
        frame_index = self._next_frame + (1 if self._in_flight else 0)
        view = self._view
        if req.op == "add_prompt":
            assert req.prompt is not None  # the decoder guarantees it
            ids, new_ids, new_text = self._plan_add(req.prompt)
            # A restored prompt's frames are the previous tracker's: it goes on the next frame.
            refines = ids[0] if ids and not new_ids else None
            placed, placed_on = (None, None) if restored else self._place(req.prompt, refines)
            req = replace(req, prompt=replace(req.prompt, frame_index=placed))
            return QueuedOp(req, ids, new_ids, new_text, frame_index, restored, placed_on)
        if req.op == "remove_object":
            if req.obj_id not in view.objects:
                raise ValueError(f"obj_id: no object {req.obj_id} is tracked (tracked: {_listed(view.objects)})")
            return QueuedOp(req, [req.obj_id], [], False, frame_index, restored)  # type: ignore[list-item]
        if req.op == "remove_prompt":
            if req.text not in view.texts:
                raise ValueError(f"text: no such text prompt {req.text!r} (active: {_listed(view.texts)})")
            found = sorted(i for i, label in view.objects.items() if label == req.text)
            return QueuedOp(req, found, [], False, frame_index, restored)
        if req.op == "reset_session":
            return QueuedOp(req, [], [], False, frame_index, restored)
        raise ValueError(f"op: {req.op!r} is not served by this tracker")

    def _plan_add(self, prompt: Prompt) -> tuple[list[int], list[int], bool]:
        limits, view = self._limits, self._view
        new_text = prompt.text is not None and prompt.text not in view.texts
        if prompt.text is not None:
            if len(prompt.text) > limits.max_text_chars:
                raise ValueError(f"text: longer than {limits.max_text_chars} characters")
            if new_text and len(view.texts) >= limits.max_concepts:
                raise ValueError(
                    f"text: this stream already has {len(view.texts)} concepts, the most allowed; remove one first"
                )
            self._tracker.check_text(prompt.text)
        if not prompt.has_geometry:
            return [], [], new_text
        if len(prompt.points) > limits.max_points:
            raise ValueError(f"points: at most {limits.max_points} points per prompt")
        if prompt.points:
            if self.frame_size is None:
                raise ValueError("points: no frame of this stream received yet, so points cannot be placed")
            prompt.check_inside(*self.frame_size)
        if prompt.obj_id is not None and prompt.obj_id in view.objects:
            if prompt.text is not None and view.objects[prompt.obj_id] is not None:
                raise ValueError("obj_id: refining a text-found object takes points or a box, not text")
            return [prompt.obj_id], [], new_text
        field_name = "points" if prompt.points else "bounding_boxes"
        if len(view.objects) + prompt.object_count > limits.max_objects:
            raise ValueError(
                f"{field_name}: this stream already tracks {len(view.objects)} objects and at most "
                f"{limits.max_objects} are allowed; remove some first"
            )
        new_ids = self._tracker.new_object_ids(prompt.object_count, obj_id=prompt.obj_id)
        return list(new_ids), list(new_ids), new_text

    def _place(self, prompt: Prompt, refines: int | None) -> tuple[int | None, int | None]:
        """The tracker frame the prompt's clicks or box go on and that frame's seq; ``(None, None)``: the next."""
        if not prompt.has_geometry or (prompt.seq is None and prompt.frame_index is None):
            return None, None
        requested = prompt.frame_index if prompt.seq is None else self._frame_of_seq(prompt.seq)
        placed = self._tracker.prompt_frame(requested, refines=refines)
        placed_on = self._seq_of_frame(placed) if placed is not None else None
        return (placed, placed_on) if placed_on is not None else (None, None)

    def _frame_of_seq(self, seq: int) -> int | None:
        """The newest tracked frame at or before capture ``seq`` (the oldest known when older than all)."""
        with self._seqs_lock:
            if not self._seqs:
                return None
            at = bisect.bisect_right(self._seqs, (seq, 2**63))
            return self._seqs[max(at - 1, 0)][1]

    def _seq_of_frame(self, frame_index: int) -> int | None:
        with self._seqs_lock:
            return next((seq for seq, index in self._seqs if index == frame_index), None)

    # ----------------------------------------------------------------------------- tracking thread

    def tracked(self, seq: int, frame_index: int) -> None:
        """Record that capture frame ``seq`` was tracked as the tracker's ``frame_index``."""
        with self._seqs_lock:
            if self._seqs and seq <= self._seqs[-1][0]:  # a capture restarted its numbering: old seqs mean nothing
                self._seqs.clear()
            self._seqs.append((seq, frame_index))

    def take(self) -> list[QueuedOp]:
        """The prompts to apply before the next frame, in arrival order (now in flight)."""
        with self._lock:
            self._in_flight = list(self._queued)
            self._queued.clear()
            return list(self._in_flight)

    def settle(self, failures: list[FailedOp]) -> None:
        """After the frame: the tracker's own state becomes the base again; count what was applied."""
        failed = {id(f.op) for f in failures if f.op is not None}
        state = PromptState(self._tracker.object_labels, self._tracker.text_prompts)
        with self._lock:
            self.failed += len(failed)
            self.applied += len(self._in_flight) - len(failed)
            self._in_flight = []
            self._settled = state
            self._view = state.copy()
            for op in self._queued:
                self._view.apply(op)
            self._next_frame = self._tracker.frame_index
            for failure in failures:
                if failure.op is not None:
                    self._store.forget_failed(self._stream, failure.op)
            still_coming = {i for op in self._queued for i in op.new_ids}
            self._store.keep_objects(self._stream, set(state.objects) | still_coming)

    def drop_queued(self) -> list[QueuedOp]:
        """Take every prompt not yet applied (the stream is going away)."""
        with self._lock:
            dropped = list(self._queued)
            self._queued.clear()
            return dropped

    @property
    def state(self) -> PromptState:
        """The stream's prompt state as of the last frame tracked."""
        return self._settled


def apply_op(tracker: Tracker, op: QueuedOp, frame_size: tuple[int, int] | None) -> None:
    """Hand one accepted prompt to the tracker (tracking thread); ``ValueError`` if it no longer fits
    (an object retired since, a frame of another size)."""
    req = op.request
    if req.op == "add_prompt":
        prompt = req.prompt
        assert prompt is not None
        if prompt.text is not None:
            tracker.add_prompt(Prompt(text=prompt.text))
        if not prompt.has_geometry:
            return
        parts = prompt.per_object(op.new_ids) if op.new_ids else [replace(prompt, text=None)]
        for part in parts:
            tracker.add_prompt(part, frame_size=frame_size)
    elif req.op == "remove_object":
        assert req.obj_id is not None
        tracker.remove_object(req.obj_id)
    elif req.op == "remove_prompt":
        assert req.text is not None
        tracker.remove_prompt(req.text)
    elif req.op == "reset_session":
        tracker.reset()


def match_failures(ops: list[QueuedOp], failures: list[PromptFailure]) -> list[FailedOp]:
    """The prompts that a tracker's step failures belong to (the latest one concerning the same objects
    or concept)."""
    out = []
    for failure in failures:
        owner = next(
            (
                op
                for op in reversed(ops)
                if set(failure.obj_ids) & set(op.obj_ids) or (failure.text is not None and failure.text in op.texts)
            ),
            None,
        )
        texts = (failure.text,) if failure.text is not None else ()
        out.append(FailedOp(owner, failure.error, failure.obj_ids, texts))
    return out


def _listed(values: Iterable[object]) -> str:
    items = sorted(values, key=str)
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in items[:_LISTED])
    return f"[{shown}{', ...' if len(items) > _LISTED else ''}]" if items else "none"
