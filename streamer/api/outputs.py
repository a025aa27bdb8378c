"""What a job hands back: the input with its masks drawn (``apply_mask``) or the masks themselves, as a
PNG/JPEG image (videos: ``streamer.video_writer.Mp4Writer``, H.264), and optionally every frame's masks
as COCO RLE JSON, written frame by frame.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from models import ObjectResult
from streamer.compositor import composite
from streamer.protocol import mask_to_rle

IMAGE_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
VIDEO_CONTENT_TYPE = "video/mp4"
JSON_CONTENT_TYPE = "application/json"
JPEG_QUALITY = 95


def render(frame_rgb: np.ndarray, objects: Sequence[ObjectResult], apply_mask: bool) -> np.ndarray:
    """The frame with its objects drawn on it (``apply_mask``), or the union of their masks as a white on
    black RGB image."""
    if apply_mask:
        return composite(frame_rgb, objects)
    union = np.zeros(frame_rgb.shape[:2], dtype=bool)
    for obj in objects:
        if obj.mask.shape == union.shape:
            union |= obj.mask
    return np.repeat((union.astype(np.uint8) * 255)[:, :, None], 3, axis=2)


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG bytes of an RGB image."""
    ext, params = (".png", []) if fmt == "png" else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return data.tobytes()


class MasksJson:
    """Every frame's objects as JSON, written frame by frame:
    ``{"width", "height", "fps", "frames": [{"frame_index", "objects": [{"obj_id", "score", "bbox",
    "mask": {"size": [h, w], "counts"}}]}]}`` (masks in COCO RLE)."""

    def __init__(self, path: Path, width: int, height: int, fps: float | None) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8")
        header = json.dumps({"width": width, "height": height, "fps": fps})
        self._file.write(header[:-1] + ', "frames": [')
        self._first = True

    def write(self, frame_index: int, objects: Sequence[ObjectResult]) -> None:
        entry = {
            "frame_index": frame_index,
            "objects": [
                {"obj_id": o.obj_id, "score": round(o.score, 4), "bbox": list(o.bbox), "mask": mask_to_rle(o.mask)}
                for o in objects
            ],
        }
        self._file.write(("" if self._first else ",\n") + json.dumps(entry, separators=(",", ":")))
        self._first = False

    def close(self) -> None:
        self._file.write("]}\n")
        self._file.close()

    def __enter__(self) -> MasksJson:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
