"""Masks by their bounding box: a boolean array covering only the box an object occupies.

A full-frame mask of one object at 1080p is 2 MB, nearly all of it background; what the compositor
draws and what the wire carries is the box's region. :class:`BoxMask` is that region and where it sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxMask:
    """A boolean ``mask`` whose top-left pixel is at ``(x0, y0)`` of a frame; ``True`` marks the object.

    The box is ``(x0, y0, x0 + w, y0 + h)`` for a mask of shape ``(h, w)`` (right/bottom edges exclusive).
    """

    x0: int
    y0: int
    mask: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the region the mask covers."""
        height, width = self.mask.shape
        return self.x0, self.y0, self.x0 + width, self.y0 + height

    @classmethod
    def from_full(cls, mask: np.ndarray) -> BoxMask | None:
        """The tight box of a full-frame boolean mask (a view, not a copy), or ``None`` when it is empty."""
        box = tight_box(mask)
        if box is None:
            return None
        x0, y0, x1, y1 = box
        return cls(x0, y0, mask[y0:y1, x0:x1])

    def full(self, height: int, width: int) -> np.ndarray:
        """The ``height x width`` boolean mask this region belongs to (the part outside the frame is dropped)."""
        out = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = self.box
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0:cy1, cx0:cx1] = self.mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        return out


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the ``True`` pixels of a 2-D mask, or ``None`` when there are none.

    Two reductions: rows first (one pass over the mask), then columns over the band of rows found.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
