"""What the tracker hands back for each frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ObjectResult:
    """One tracked object on one frame.

    ``bbox`` is pixel ``(x0, y0, x1, y1)`` with exclusive right/bottom edges, ``mask`` a boolean
    ``H x W`` array at the frame's own resolution, ``label`` the text prompt that found the object
    (``None`` for objects made from clicks or boxes).
    """

    obj_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    label: str | None = None


@dataclass
class FrameResult:
    """All objects on one frame, with the caller's timestamp passed through and stage timings (seconds)."""

    frame_index: int
    timestamp: float | None
    width: int
    height: int
    objects: list[ObjectResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def by_id(self) -> dict[int, ObjectResult]:
        return {obj.obj_id: obj for obj in self.objects}
