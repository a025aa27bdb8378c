"""Run one job's spec through ``streamer.segment`` (the same code as ``sam3-stream segment-video``/``-image``):
one predictor session, the prompts on frame 0, drawn, encoded, written to the job's folder.

Called in the worker's thread. Frames are drawn and encoded as the predictor yields them, so a job
holds one frame at a time whatever the video's length.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamer.segment import segment_image, segment_video

if TYPE_CHECKING:  # the predictor pulls in torch: imported when a server loads it, not to build the CLI parser
    from models import Sam3VideoPredictor

MASKS_FILE = "masks.json"
# Result files by suffix, with the type they are served as.
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".mp4": "video/mp4", ".json": "application/json"}
_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "mp4": ".mp4"}


class InputFailure(Exception):
    """The job failed because of its input or prompts (the client's to fix), not because of the server."""


class Stopped(Exception):
    """Raised out of :func:`run_job` when ``should_stop`` said so (a cancel, or shutdown)."""


def result_name(spec: dict[str, Any]) -> str:
    """File name of a job's main result."""
    return "result" + _SUFFIXES[spec["output_format"]]


def run_job(
    predictor: Sam3VideoPredictor,
    job_dir: Path,
    spec: dict[str, Any],
    progress: Callable[[float], None],
    should_stop: Callable[[], bool],
) -> tuple[str, str | None]:
    """Segment ``job_dir/spec["input"]`` with ``spec["prompts"]`` (``add_prompt`` fields, on frame 0) and
    write the result (and ``masks.json`` when asked for).

    Returns the names of the result file and of the masks file (or ``None``). Raises
    :class:`InputFailure` when the predictor refuses the input or a prompt, :class:`Stopped` when
    ``should_stop()`` turned true (checked once the prompts are applied and after every frame).
    """
    from models import PredictorError

    masks_name = MASKS_FILE if spec["masks_rle"] else None
    masks_path = job_dir / MASKS_FILE if masks_name else None
    source, result = job_dir / spec["input"], job_dir / result_name(spec)
    common: dict[str, Any] = {"masks_path": masks_path, "source_name": spec["input"], "overlay": spec["apply_mask"]}

    def on_progress(done: int, total: int) -> None:
        if should_stop():
            raise Stopped
        progress(min(done / max(total, 1), 1.0))

    if should_stop():
        raise Stopped
    try:
        if "frames" in spec:  # a video
            segment_video(predictor, source, result, spec["prompts"], fps=spec["fps"], progress=on_progress, **common)
        else:
            segment_image(predictor, source, result, spec["prompts"], **common)
    except PredictorError as exc:
        raise InputFailure(str(exc)) from exc
    return result.name, masks_name
