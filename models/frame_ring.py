"""``FrameRing``: the encoder output of the last frames tracked, so a prompt can land on the frame it was drawn on.

An operator clicks on the frame shown on their screen, which by the time the click reaches the tracker
is a few hundred milliseconds old; a moving object has moved on. The ring keeps each recent frame's
ViT tokens (the one encoder output both necks derive from), so the tracker can place the prompt on that
frame and catch the object up to the newest frame without encoding anything again.

The ring's *budget* is what prompts are promised: frames tracked within ``seconds`` of the newest
(by the timestamps given to ``track``), at most ``max_frames`` of them. It physically holds one frame
more than that budget: a prompt is answered (placed) while the next frame may already be tracked,
and applied just before the frame after it, so the frame it was answered with must outlive one more
frame. Memory is therefore bounded by ``max_frames + 1`` frames' tokens whatever the stream's length.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from models.memory import state_bytes


@dataclass(frozen=True)
class _Held:
    frame_index: int
    timestamp: float
    tokens: torch.Tensor


class FrameRing:
    """Recent frames' encoder tokens, by tracker frame index (thread-safe: the budget is read by a
    control thread while the tracking thread adds frames)."""

    def __init__(self, seconds: float | None, max_frames: int) -> None:
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"prompt_ring_seconds: must be >= 0 (or None for no time limit), got {seconds!r}")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 0:
            raise ValueError(f"prompt_ring_frames: must be an integer >= 0, got {max_frames!r}")
        self.seconds = seconds
        self.max_frames = max_frames
        self._held: deque[_Held] = deque()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether prompts can be placed on past frames at all."""
        return self.max_frames > 0 and self.seconds != 0

    def add(self, frame_index: int, timestamp: float, tokens: torch.Tensor) -> None:
        """Hold a newly tracked frame's tokens; frames beyond the budget plus one are dropped."""
        if not self.enabled:
            return
        with self._lock:
            self._held.append(_Held(frame_index, timestamp, tokens))
            keep_from = self._budget_start(len(self._held) - 2)  # the budget as of the previous frame
            while self._held and self._held[0].frame_index < keep_from:
                self._held.popleft()

    def oldest_promised(self) -> int | None:
        """The oldest frame a prompt answered now may be placed on (``None``: the ring is empty)."""
        with self._lock:
            return self._budget_start(len(self._held) - 1) if self._held else None

    def place(self, frame_index: int) -> int:
        """The held frame a prompt drawn on ``frame_index`` goes on: itself, or the oldest frame held when
        it is older than the ring. ``ValueError`` when the ring holds no frame at or after it."""
        with self._lock:
            if not self._held or frame_index > self._held[-1].frame_index:
                raise ValueError(f"frame_index: frame {frame_index} is not in the prompt ring")
            return max(frame_index, self._held[0].frame_index)

    def tokens(self, frame_index: int) -> torch.Tensor:
        """The encoder tokens of a held frame (``KeyError`` if it is not held)."""
        with self._lock:
            for held in self._held:
                if held.frame_index == frame_index:
                    return held.tokens
        raise KeyError(frame_index)

    @property
    def oldest_held(self) -> int | None:
        """The oldest frame physically held (one beyond the budget at most)."""
        with self._lock:
            return self._held[0].frame_index if self._held else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def state_bytes(self) -> int:
        """Bytes of the tokens held (and the ring's bookkeeping)."""
        with self._lock:
            return state_bytes(list(self._held)) if self._held else 0

    def _budget_start(self, newest: int) -> int:
        """The oldest frame index within the budget when ``self._held[newest]`` is the newest frame."""
        if newest < 0:
            return self._held[-1].frame_index
        first = max(newest - self.max_frames + 1, 0)
        if self.seconds is not None:
            limit = self._held[newest].timestamp - self.seconds
            while first < newest and self._held[first].timestamp < limit:
                first += 1
        return self._held[first].frame_index
