"""Object ids of one stream, handed out from two threads without ever giving one id to two objects.

Ids come from two places: the prompt path (a click or a box makes a new object, and its id goes back in
the answer at once, before the frame it applies on) and the text detector (new instances found while a
frame is tracked). The prompt path runs on a control thread while the detector runs on the tracking
thread, so :class:`ObjectIds` is the only shared piece of state, guarded by one lock held for
microseconds, never across model work.

The detector numbers new objects consecutively from a start it is given and only says afterwards how
many it used, so it *holds* a block of ids as large as it can ever use in one frame (its number of
queries) and *settles* it afterwards: ids it did not use go back unless the prompt path took ids in
the meantime (then the unused rest of the block is skipped, never reused).

A caller may choose the id of a new object (``obj_id`` in a prompt). Such ids are *claimed*: the
counter skips them when it reaches them, and they do not move the counter, so one prompt with
``obj_id`` 2147483647 cannot exhaust the ids of a stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from models.prompts import MAX_OBJ_ID

# Claimed ids ahead of the counter that are remembered; a live stream holds a few dozen objects at most.
MAX_CLAIMED = 4096


@dataclass
class HeldBlock:
    """Ids ``start .. start + size - 1`` reserved for one detector step; set ``next_free`` after it."""

    start: int
    size: int
    next_free: int | None = None


class ObjectIds:
    """Thread-safe hand-out of object ids ``0 .. MAX_OBJ_ID``; an id is never handed out twice."""

    def __init__(self, first: int = 0) -> None:
        self._lock = threading.Lock()
        self._next = first
        self._claimed: set[int] = set()  # caller-chosen ids at or past the counter
        self._held: HeldBlock | None = None

    @property
    def next_id(self) -> int:
        """The lowest id the counter may hand out next."""
        return self._next

    def take(self, count: int = 1) -> list[int]:
        """``count`` fresh ids for new objects; ``ValueError`` naming ``obj_id`` once ids run out."""
        with self._lock:
            ids, candidate = [], self._next
            while len(ids) < count:
                if candidate > MAX_OBJ_ID:
                    raise ValueError(f"obj_id: every object id up to {MAX_OBJ_ID} has been handed out on this stream")
                if candidate not in self._claimed:
                    ids.append(candidate)
                candidate += 1
            self._advance(candidate)
            return ids

    def claim(self, obj_id: int) -> None:
        """Reserve a caller-chosen id for a new object (idempotent); ``ValueError`` when it cannot be had."""
        if isinstance(obj_id, bool) or not isinstance(obj_id, int) or not 0 <= obj_id <= MAX_OBJ_ID:
            raise ValueError(f"obj_id: must be an integer between 0 and {MAX_OBJ_ID}, got {obj_id!r}")
        with self._lock:
            held = self._held
            if held is not None and held.start <= obj_id < held.start + held.size:
                raise ValueError(
                    f"obj_id: {obj_id} is being given to newly detected objects right now; "
                    "choose another id or leave obj_id out"
                )
            if obj_id < self._next or obj_id in self._claimed:
                return  # below the counter: never handed out again
            if len(self._claimed) >= MAX_CLAIMED:
                raise ValueError(f"obj_id: {MAX_CLAIMED} chosen ids are already reserved; leave obj_id out")
            self._claimed.add(obj_id)

    def release(self, obj_id: int) -> None:
        """Forget a claim (its object is gone); harmless for ids never claimed."""
        with self._lock:
            self._claimed.discard(obj_id)

    @contextmanager
    def holding(self, size: int) -> Iterator[HeldBlock]:
        """Hold ``size`` consecutive free ids for one detector step; set ``block.next_free`` to the first
        id it did not use. Unused ids go back unless others were taken meanwhile."""
        with self._lock:
            start = self._next
            for claimed in sorted(c for c in self._claimed if c >= start):
                if claimed >= start + size:
                    break
                start = claimed + 1  # the detector numbers consecutively: start past any claimed id
            if start + size - 1 > MAX_OBJ_ID:
                raise ValueError(f"obj_id: every object id up to {MAX_OBJ_ID} has been handed out on this stream")
            block = self._held = HeldBlock(start, size)
            self._advance(start + size)
        try:
            yield block
        finally:
            with self._lock:
                self._held = None
                used_to = block.start + block.size if block.next_free is None else block.next_free
                if self._next == block.start + block.size:
                    self._next = max(used_to, block.start)  # nobody took ids meanwhile: give back the rest
                else:
                    self._advance(used_to)

    def _advance(self, to: int) -> None:
        if to > self._next:
            self._next = to
            self._claimed = {c for c in self._claimed if c >= to}
