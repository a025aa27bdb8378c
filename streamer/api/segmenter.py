"""The one seam between the API and the model: ``models.Sam3VideoPredictor``, driven by its public requests.

A job is one predictor session: ``start_session`` on the input file, one ``add_prompt`` per prompt on
frame 0, ``propagate_in_video`` forward from frame 0 (an image is a one-frame session),
``close_session``. The frames drawn on are the predictor's own (``frames(session_id)``, decoded on
demand), so every video is decoded once. Nothing here knows the model's insides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import ObjectResult

if TYPE_CHECKING:  # the predictor pulls in torch: imported when a server loads it, not to build the CLI parser
    from models import Sam3VideoPredictor

FrameCallback = Callable[[int, np.ndarray, list[ObjectResult]], None]


class Stopped(Exception):
    """Raised out of :meth:`Segmenter.run` when ``should_stop`` said so (a cancel, or shutdown)."""


class RequestRefused(Exception):
    """The predictor refused a request (its ``PredictorError``: the input or a prompt is at fault)."""


class Segmenter:
    """Runs whole files through a predictor, frame results (with their frames) to a callback."""

    def __init__(self, predictor: Sam3VideoPredictor) -> None:
        self.predictor = predictor

    @classmethod
    def load(cls, model: str, device: str | None) -> Segmenter:
        """Load the predictor (``model``: hub id, local folder or ``tiny-random``); raises ``ModelLoadError``."""
        from models import Sam3VideoPredictor

        return cls(Sam3VideoPredictor(model=model, device=device))

    def run(
        self,
        path: Path,
        prompts: Sequence[Mapping[str, Any]],
        on_frame: FrameCallback,
        should_stop: Callable[[], bool],
    ) -> int:
        """Segment the file at ``path`` with ``prompts`` (``add_prompt`` fields) given on frame 0.

        ``on_frame(frame_index, frame_rgb, objects)`` is called for every frame in order, also for any
        frame the predictor yields nothing for (with no objects). Returns the number of frames. Raises
        :class:`Stopped` when ``should_stop()`` turns true between frames, :class:`RequestRefused` when
        the predictor refuses a request.
        """
        from models import PredictorError

        predictor = self.predictor
        try:
            session = predictor.handle_request({"type": "start_session", "resource_path": str(path)})["session_id"]
            try:
                for prompt in prompts:
                    if should_stop():
                        raise Stopped
                    predictor.handle_request({"type": "add_prompt", "session_id": session, "frame_index": 0, **prompt})
                frames = predictor.frames(session)
                request = {
                    "type": "propagate_in_video",
                    "session_id": session,
                    "propagation_direction": "forward",
                    "start_frame_index": 0,
                }
                done = 0
                for response in predictor.handle_stream_request(request):
                    if should_stop():
                        raise Stopped
                    index = int(response["frame_index"])
                    for skipped in range(done, index):
                        on_frame(skipped, frames[skipped], [])
                    on_frame(index, frames[index], list(response["outputs"].objects))
                    done = index + 1
                for rest in range(done, len(frames)):
                    on_frame(rest, frames[rest], [])
                return len(frames)
            finally:
                predictor.handle_request({"type": "close_session", "session_id": session})
        except PredictorError as exc:
            raise RequestRefused(str(exc)) from exc
