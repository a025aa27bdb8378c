"""What a frame is: a uint8 RGB ``H x W x 3`` array. Checked the same way by every tracker.

No torch here, so a tracker without a model (the pipeline's pass-through) shares the check.
"""

from __future__ import annotations

import numpy as np

MAX_FRAME_SIDE = 8192


def check_frame(frame: object) -> np.ndarray:
    """Validate a frame: a uint8 ``H x W x 3`` RGB array. Raises ``ValueError`` naming the problem."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame: expected a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame: expected dtype uint8 (RGB 0-255), got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame: expected shape (H, W, 3), got {tuple(frame.shape)}")
    height, width = frame.shape[:2]
    if not (0 < height <= MAX_FRAME_SIDE and 0 < width <= MAX_FRAME_SIDE):
        raise ValueError(f"frame: size {width}x{height} is outside 1..{MAX_FRAME_SIDE} pixels a side")
    return frame
