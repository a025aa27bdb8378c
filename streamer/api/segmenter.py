"""The one seam between the API and the model: SAM 3's video predictor, driven by its public requests.

A job is one predictor session: ``start_session`` on the input file, one ``add_prompt`` per prompt on
frame 0, ``propagate_in_video`` forward (an image is a one-frame session), ``close_session``. Nothing
here knows the model's insides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models import ObjectResult


class Predictor(Protocol):
    """What the API needs of ``models.Sam3VideoPredictor``: SAM 3's request/response API."""

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def handle_stream_request(self, request: dict[str, Any]) -> Any: ...


class Stopped(Exception):
    """Raised out of :meth:`Segmenter.run` when ``should_stop`` said so (a cancel, or shutdown)."""


class RequestRefused(Exception):
    """The predictor refused a request: by its contract a plain ``RuntimeError`` saying what is wrong
    with the request (subclasses, such as torch's out-of-memory error, are the server's trouble)."""


class Segmenter:
    """Runs whole files through a :class:`Predictor`, one at a time, frame results to a callback."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @classmethod
    def load(cls, model: str, device: str | None) -> Segmenter:
        """Load ``models.Sam3VideoPredictor`` (``model``: hub id, local folder or ``tiny-random``)."""
        from models import Sam3VideoPredictor

        return cls(Sam3VideoPredictor(model=model, device=device))

    def run(
        self,
        path: Path,
        prompts: Sequence[Mapping[str, Any]],
        on_frame: Callable[[int, list[ObjectResult]], None],
        should_stop: Callable[[], bool],
        label: str | None = None,
    ) -> None:
        """Segment the file at ``path`` with ``prompts`` (``add_prompt`` fields) given on frame 0.

        ``on_frame(frame_index, objects)`` is called for every frame in order; ``label`` tags the objects
        (the text prompt). Raises :class:`Stopped` when ``should_stop()`` turns true between frames, and
        :class:`RequestRefused` when the predictor refuses a request.
        """
        try:
            self._run(path, prompts, on_frame, should_stop, label)
        except RuntimeError as exc:
            if type(exc) is RuntimeError:
                raise RequestRefused(str(exc)) from exc
            raise

    def _run(
        self,
        path: Path,
        prompts: Sequence[Mapping[str, Any]],
        on_frame: Callable[[int, list[ObjectResult]], None],
        should_stop: Callable[[], bool],
        label: str | None,
    ) -> None:
        session = self.predictor.handle_request({"type": "start_session", "resource_path": str(path)})["session_id"]
        try:
            for prompt in prompts:
                if should_stop():
                    raise Stopped
                self.predictor.handle_request({"type": "add_prompt", "session_id": session, "frame_index": 0, **prompt})
            frames = self.predictor.handle_stream_request(
                {
                    "type": "propagate_in_video",
                    "session_id": session,
                    "propagation_direction": "forward",
                    "start_frame_index": 0,
                }
            )
            try:
                for response in frames:
                    if should_stop():
                        raise Stopped
                    on_frame(int(response["frame_index"]), objects_of(response["outputs"], label))
            finally:
                close = getattr(frames, "close", None)
                if close is not None:
                    close()
        finally:
            self.predictor.handle_request({"type": "close_session", "session_id": session})


def objects_of(outputs: Mapping[int, Mapping[str, Any]], label: str | None = None) -> list[ObjectResult]:
    """The predictor's ``outputs`` (obj_id -> ``{mask, score, bbox}``) as :class:`ObjectResult` s, by id."""
    objects = []
    for obj_id, output in sorted(outputs.items()):
        x0, y0, x1, y1 = (int(round(float(v))) for v in output["bbox"])
        mask = np.asarray(output["mask"], dtype=bool)
        objects.append(ObjectResult(int(obj_id), float(output["score"]), (x0, y0, x1, y1), mask, label))
    return objects
