"""Run one job's spec: segment its input through the :class:`Segmenter`, draw, encode, write the results.

Called in the worker's thread. Frames are drawn and encoded as the predictor yields them, so a job
holds one frame at a time whatever the video's length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models import ObjectResult
from streamer.api.outputs import MasksJson, encode_image, render
from streamer.api.segmenter import RequestRefused, Segmenter
from streamer.video_writer import Mp4Writer

MASKS_FILE = "masks.json"


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
    :class:`InputFailure` when the predictor refuses the input or a prompt, ``Stopped`` when
    ``should_stop`` turned true.
    """
    masks_name = MASKS_FILE if spec["masks_rle"] else None
    width, height = spec["width"], spec["height"]
    masks = MasksJson(job_dir / MASKS_FILE, width, height, spec.get("fps")) if masks_name else None
    result = job_dir / result_name(spec)
    is_video = "frames" in spec
    total = max(1, int(spec.get("frames", 1)))
    with contextlib.ExitStack() as stack:
        if masks is not None:
            stack.enter_context(masks)
        video = stack.enter_context(Mp4Writer(result, width, height, spec["fps"])) if is_video else None

        def on_frame(index: int, frame: np.ndarray, objects: list[ObjectResult]) -> None:
            drawn = render(frame, objects, spec["apply_mask"])
            if video is not None:
                video.write(drawn)
                progress(min((index + 1) / total, 1.0))
            else:
                result.write_bytes(encode_image(drawn, spec["output_format"]))
            if masks is not None:
                masks.write(index, objects)

        try:
            segmenter.run(job_dir / spec["input"], spec["prompts"], on_frame, should_stop)
        except RequestRefused as exc:
            raise InputFailure(str(exc)) from exc
    return result.name, masks_name
