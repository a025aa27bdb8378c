"""Write RGB frames to an H.264 mp4 with PyAV (``cv2.VideoWriter`` has no H.264 encoder in the wheels we use).

Browsers and players expect H.264 in yuv420p, which needs even sides: a frame with an odd width or
height is padded by one edge pixel on that side.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

DEFAULT_FPS = 30.0


class Mp4Writer:
    """``writer.write(frame_rgb)`` per frame, then ``close()`` (or use it as a context manager).

    ``fps`` may be fractional (29.97); ``crf`` is x264's quality (lower is better; 23 is its default).
    """

    def __init__(
        self, path: str | os.PathLike, width: int, height: int, fps: float = DEFAULT_FPS, crf: int = 20
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"frame size: must be positive, got {width}x{height}")
        if not fps or fps <= 0:
            fps = DEFAULT_FPS
        self.width, self.height = width, height
        self._container = av.open(os.fspath(path), "w")
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width = width + width % 2
        self._stream.height = height + height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf)}
        self._stream.codec_context.time_base = 1 / rate
        self._time_base = 1 / rate
        self.frames_written = 0

    def write(self, frame_rgb: np.ndarray) -> None:
        """Encode one ``H x W x 3`` uint8 RGB frame of the size given at construction."""
        if frame_rgb.shape != (self.height, self.width, 3) or frame_rgb.dtype != np.uint8:
            raise ValueError(
                f"frame: expected {self.width}x{self.height} uint8 RGB, got shape {frame_rgb.shape} {frame_rgb.dtype}"
            )
        pad = ((0, self.height % 2), (0, self.width % 2), (0, 0))
        if any(p[1] for p in pad):
            frame_rgb = np.pad(frame_rgb, pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = self._time_base
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode())
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
