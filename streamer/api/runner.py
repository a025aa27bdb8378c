"""Run one job's spec: segment its input through the :class:`Segmenter`, draw, encode, write the results.

Called in the worker's thread. A video is decoded frame by frame in step with the predictor's
results, so memory holds one frame, whatever the video's length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import ObjectResult
from streamer.api.media import read_image
from streamer.api.outputs import MasksJson, Mp4Writer, encode_image, render
from streamer.api.segmenter import RequestRefused, Segmenter
from streamer.sources import SourceError, VideoSource

MASKS_FILE = "masks.json"
PREDICTOR_IMAGE = "frame.png"


class InputFailure(Exception):
    """The job failed because of its input or prompts (the client's to fix), not because of the server."""


def result_name(spec: dict[str, Any]) -> str:
    """File name of a job's main result."""
    return "result." + {"png": "png", "jpeg": "jpg", "mp4": "mp4"}[spec["output_format"]]


def run_job(
    segmenter: Segmenter,
    job_dir: Path,
    spec: dict[str, Any],
    progress: Callable[[float], None],
    should_stop: Callable[[], bool],
) -> tuple[str, str | None]:
    """Segment ``job_dir/spec["input"]`` and write the result (and ``masks.json`` when asked for).

    Returns the names of the result file and of the masks file (or ``None``). Raises
    :class:`InputFailure` for problems of the input, ``Stopped`` when ``should_stop`` turned true.
    """
    masks_name = MASKS_FILE if spec["masks_rle"] else None
    masks = MasksJson(job_dir / MASKS_FILE, spec["width"], spec["height"], spec.get("fps")) if masks_name else None
    with masks if masks is not None else contextlib.nullcontext():
        try:
            if "frames" in spec:
                _run_video(segmenter, job_dir, spec, masks, progress, should_stop)
            else:
                _run_image(segmenter, job_dir, spec, masks, should_stop)
        except RequestRefused as exc:
            raise InputFailure(str(exc)) from exc
    return result_name(spec), masks_name


def _run_image(
    segmenter: Segmenter,
    job_dir: Path,
    spec: dict[str, Any],
    masks: MasksJson | None,
    should_stop: Callable[[], bool],
) -> None:
    frame = read_image(job_dir / spec["input"])
    if frame is None:
        raise InputFailure("input_image: cannot decode the image")
    # The predictor gets exactly the pixels drawn on (a GIF's first frame, a WebP decoded), as PNG.
    predictor_input = job_dir / PREDICTOR_IMAGE
    cv2.imwrite(str(predictor_input), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    found: list[list[ObjectResult]] = []
    segmenter.run(
        predictor_input, spec["prompts"], lambda _, objects: found.append(objects), should_stop, spec["label"]
    )
    objects = found[0] if found else []
    if masks is not None:
        masks.write(0, objects)
    image = render(frame, objects, spec["apply_mask"])
    (job_dir / result_name(spec)).write_bytes(encode_image(image, spec["output_format"]))
    predictor_input.unlink()


def _run_video(
    segmenter: Segmenter,
    job_dir: Path,
    spec: dict[str, Any],
    masks: MasksJson | None,
    progress: Callable[[float], None],
    should_stop: Callable[[], bool],
) -> None:
    total = max(1, int(spec["frames"]))
    apply_mask = spec["apply_mask"]
    try:
        source = VideoSource(str(job_dir / spec["input"]))
    except SourceError as exc:
        raise InputFailure(f"input video: {exc}") from exc
    written = 0

    def next_frame() -> np.ndarray:
        try:
            frame = source.read()
        except SourceError as exc:
            raise InputFailure(f"input video: frame {written}: {exc}") from exc
        if frame is None:
            raise InputFailure(f"input video: ends after {written} frames, before the predictor's frame {written}")
        return frame

    with source, Mp4Writer(job_dir / result_name(spec), spec["width"], spec["height"], spec["fps"]) as video:

        def on_frame(index: int, objects: list[ObjectResult]) -> None:
            nonlocal written
            while written < index:  # a frame the predictor skipped: shown as it is
                video.write(render(next_frame(), [], apply_mask))
                written += 1
            if index == written:
                video.write(render(next_frame(), objects, apply_mask))
                written += 1
                if masks is not None:
                    masks.write(index, objects)
                progress(min(written / total, 1.0))

        segmenter.run(job_dir / spec["input"], spec["prompts"], on_frame, should_stop, spec["label"])
        while (frame := source.read()) is not None:  # frames after the predictor's last
            video.write(render(frame, [], apply_mask))
