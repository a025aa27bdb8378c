"""``Sam3VideoPredictor``: SAM 3's video predictor request API on transformers' SAM 3 classes.

Requests and responses follow Meta's ``sam3.model.sam3_video_predictor.Sam3VideoPredictor``, so a
script written for it runs by changing its import (and how the predictor is built)::

    from models import Sam3VideoPredictor

    predictor = Sam3VideoPredictor()  # facebook/sam3; or model="tiny-random", a local folder; device="cuda"
    session_id = predictor.handle_request({"type": "start_session", "resource_path": "clip.mp4"})["session_id"]
    predictor.handle_request({"type": "add_prompt", "session_id": session_id, "frame_index": 0, "text": "person"})
    for response in predictor.handle_stream_request({"type": "propagate_in_video", "session_id": session_id}):
        for obj_id, obj in response["outputs"].items():
            obj["mask"], obj["score"], obj["bbox"]
    predictor.handle_request({"type": "close_session", "session_id": session_id})

Where this project's contract differs from Meta's predictor (see the class docstring), it is deliberate.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from models.encoder import ImageEncoder, TorchImageEncoder
from models.loading import DEFAULT_MODEL, Sam3Models, load_models
from models.prompts import PROMPT_FIELDS, Prompt
from models.results import ObjectResult
from models.video_frames import DEFAULT_CACHE_FRAMES, VideoFrames, VideoReadError, open_frames
from models.video_session import BOTH, SessionChanged, VideoSession

MAX_SESSION_ID_CHARS = 128
PROMPT_COORDINATES = ("pixels", "meta")
# Points all within [0, 1] on a frame with sides above this look like Meta's normalized points.
_WARN_ABOVE_SIDE = 4
_PROMPT_ARRAYS = ("points", "point_labels", "bounding_boxes", "bounding_box_labels")
_REQUEST_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # type -> (required, optional)
    "start_session": (("resource_path",), ("session_id",)),
    "add_prompt": (("session_id", "frame_index"), tuple(f for f in PROMPT_FIELDS if f != "frame_index")),
    "remove_object": (("session_id", "obj_id"), ("is_user_action",)),
    "reset_session": (("session_id",), ()),
    "close_session": (("session_id",), ()),
    "propagate_in_video": (("session_id",), ("propagation_direction", "start_frame_index", "max_frame_num_to_track")),
}
_STREAM_REQUESTS = ("propagate_in_video",)


class PredictorError(RuntimeError):
    """A request the predictor cannot serve; the message names the field and the problem."""


class UnknownSessionError(PredictorError):
    """The request names a session that is not open (never started, or closed)."""


class PromptCoordinatesWarning(UserWarning):
    """Pixel points that all lie within [0, 1]: probably Meta's normalized points sent to a predictor reading
    pixels (every click would land in the top-left pixel). ``prompt_coordinates="meta"`` reads them as meant."""


class FrameOutputs(dict):
    """One frame's results: ``obj_id -> {"mask": bool (H, W), "score": float, "bbox": [x0, y0, x1, y1]}``.

    Masks are at the video's own resolution; ``bbox`` is in pixels with exclusive right/bottom edges.
    ``objects`` holds the same results as :class:`~models.results.ObjectResult` (with the text prompt
    that found each object as ``label``). Meta's array keys also answer, for code written against
    Meta's predictor: ``out_obj_ids``, ``out_probs``, ``out_boxes_xywh`` (normalized ``[x, y, w, h]``),
    ``out_binary_masks`` (``N x H x W``) and ``frame_stats`` (``None``); they are not among the keys
    that iterating yields.
    """

    def __init__(self, objects: list[ObjectResult], width: int, height: int) -> None:
        super().__init__(
            (o.obj_id, {"mask": o.mask, "score": o.score, "bbox": [int(v) for v in o.bbox]}) for o in objects
        )
        self.objects = objects
        self.width = width
        self.height = height

    def __missing__(self, key: object) -> Any:
        objects, w, h = self.objects, self.width, self.height
        if key == "out_obj_ids":
            return np.array([o.obj_id for o in objects], dtype=np.int64)
        if key == "out_probs":
            return np.array([o.score for o in objects], dtype=np.float32)
        if key == "out_boxes_xywh":
            boxes = [[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h] for x0, y0, x1, y1 in (o.bbox for o in objects)]
            return np.array(boxes, dtype=np.float32).reshape(-1, 4)
        if key == "out_binary_masks":
            return np.stack([o.mask for o in objects]) if objects else np.zeros((0, h, w), dtype=bool)
        if key == "frame_stats":
            return None
        raise KeyError(key)


class Sam3VideoPredictor:
    """SAM 3's video predictor: sessions over videos, images and JPEG folders, prompted and propagated.

    ``handle_request(request)`` serves ``start_session``, ``add_prompt``, ``remove_object``,
    ``reset_session`` and ``close_session``; ``handle_stream_request(request)`` serves
    ``propagate_in_video``, yielding ``{"frame_index", "outputs"}`` per frame. Every problem raises
    :class:`PredictorError` (a ``RuntimeError``) whose message names the field and what is wrong.
    Requests are served one at a time (a lock), so one predictor may be shared by threads.

    **Prompt coordinates differ from Meta's predictor by default.** This predictor reads this project's
    one prompt vocabulary: ``points`` in *pixels* and ``bounding_boxes`` normalized ``[cx, cy, w, h]``
    (box centre). Meta's reads points normalized to 0..1 (``rel_points = [[x / width, y / height]]`` in
    its examples) and boxes normalized ``[x, y, w, h]`` (top-left corner). A script written for Meta's
    predictor must build it with ``Sam3VideoPredictor(prompt_coordinates="meta")``; otherwise its clicks
    all land in the top-left pixel. Points that all lie within [0, 1] on a frame larger than a few pixels
    raise a :class:`PromptCoordinatesWarning` (once per session) saying so.

    Other differences from Meta's predictor, all deliberate:

    - ``outputs`` maps each object id to ``{"mask", "score", "bbox"}`` (pixels); Meta's
      ``out_obj_ids`` / ``out_probs`` / ``out_boxes_xywh`` / ``out_binary_masks`` keys still answer.
    - ``obj_id`` may be omitted with points (a new id is given), text may be combined with clicks,
      and several text prompts may be active at once (Meta keeps one and resets on a new one).
    - A box given with text and negative boxes are SAM 3's visual exemplars; transformers'
      ``Sam3VideoModel`` runs its detector on text only, so they are refused with a message saying so.
    - ``max_frame_num_to_track`` counts frames: ``both`` from 50 with 100 covers 50..149, then 49..0
      (Meta also yields frame ``start + max``). ``backward`` alone starts at the start frame itself.
    - Unknown request fields, an already open ``session_id``, ``is_user_action`` other than a bool
      are refused; ``close_session`` of a session that is not open answers ``{"is_success": False}``.
    - Frames are decoded on demand with a small cache, never the whole video at once.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        models: Sam3Models | None = None,
        cache_frames: int = DEFAULT_CACHE_FRAMES,
        encoder: ImageEncoder | None = None,
        prompt_coordinates: str = "pixels",
    ) -> None:
        """Load ``model`` (hub id, local folder, ``tiny-random`` or ``full-random``; ``ModelLoadError``
        says what to do when it cannot), or use already loaded ``models``. ``cache_frames`` decoded
        frames are kept per session. ``encoder`` (``models.make_encoder``; default torch) computes the
        image features of click/box sessions; text concepts still run the detector's own ViT.
        ``prompt_coordinates="meta"`` reads ``points`` and ``bounding_boxes`` as Meta's predictor does
        (points normalized to 0..1, boxes normalized ``[x, y, w, h]``) instead of this project's pixel
        points and normalized ``[cx, cy, w, h]`` boxes."""
        if prompt_coordinates not in PROMPT_COORDINATES:
            raise ValueError(f"prompt_coordinates: must be one of {', '.join(PROMPT_COORDINATES)}")
        self.models = models if models is not None else load_models(model, device=device, dtype=dtype)
        self.encoder = encoder if encoder is not None else TorchImageEncoder(self.models)
        self.cache_frames = cache_frames
        self.prompt_coordinates = prompt_coordinates
        self._sessions: dict[str, VideoSession] = {}
        self._warned: set[str] = set()  # sessions told about their [0, 1] points
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------ request API

    def handle_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Serve one request (all but ``propagate_in_video``) and return its response."""
        kind, fields = _parse_request(request, stream=False)
        handlers: dict[str, Callable[..., dict[str, Any]]] = {
            "start_session": self.start_session,
            "add_prompt": self.add_prompt,
            "remove_object": self.remove_object,
            "reset_session": self.reset_session,
            "close_session": self.close_session,
        }
        if kind == "add_prompt":
            fields["frame_idx"] = fields.pop("frame_index")
        return handlers[kind](**fields)

    def handle_stream_request(self, request: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Serve ``propagate_in_video``: checks the request now, then yields one response per frame."""
        _kind, fields = _parse_request(request, stream=True)
        return self.propagate_in_video(
            session_id=fields["session_id"],
            propagation_direction=fields.get("propagation_direction", BOTH),
            start_frame_idx=fields.get("start_frame_index"),
            max_frame_num_to_track=fields.get("max_frame_num_to_track"),
        )

    # ------------------------------------------------------------------- the requests as methods

    def start_session(self, resource_path: str | os.PathLike, session_id: str | None = None) -> dict[str, Any]:
        """Open a video file, a folder of JPEG frames or an image; returns ``{"session_id"}``."""
        if not isinstance(resource_path, (str, os.PathLike)) or not os.fspath(resource_path):
            raise PredictorError(
                f"resource_path: must be a path to a video, image or JPEG folder, got {resource_path!r}"
            )
        if session_id is not None:
            _check_session_id(session_id)
        with self._lock:
            if session_id is not None and session_id in self._sessions:
                raise PredictorError(
                    f"session_id: a session {session_id!r} is already open; close it or pick another id"
                )
            try:
                frames = open_frames(resource_path, cache_frames=self.cache_frames)
            except VideoReadError as exc:
                raise PredictorError(f"resource_path: {exc}") from exc
            session_id = session_id or str(uuid.uuid4())
            self._sessions[session_id] = VideoSession(self.models, frames, self.encoder)
        return {"session_id": session_id}

    def add_prompt(
        self,
        session_id: str,
        frame_idx: int,
        text: str | None = None,
        points: Any = None,
        point_labels: Any = None,
        bounding_boxes: Any = None,
        bounding_box_labels: Any = None,
        obj_id: int | None = None,
    ) -> dict[str, Any]:
        """Add text, clicks and/or boxes on frame ``frame_idx``; returns ``{"frame_index", "outputs"}``
        with every object on that frame."""
        fields = {
            "text": text,
            "points": points,
            "point_labels": point_labels,
            "bounding_boxes": bounding_boxes,
            "bounding_box_labels": bounding_box_labels,
            "obj_id": obj_id,
            "frame_index": frame_idx,
        }
        fields = {k: _plain(v) for k, v in fields.items() if v is not None}
        if "frame_index" not in fields:
            raise PredictorError("frame_index: required (the frame the prompt is on)")
        with self._lock:
            session = self._session(session_id)
            if self.prompt_coordinates == "meta":
                fields = _from_meta_coordinates(fields, session.width, session.height)
            prompt = self._call(Prompt.from_dict, fields)
            if self.prompt_coordinates == "pixels":
                self._warn_if_normalized(session_id, prompt, session.width, session.height)
            objects = self._call(session.add_prompt, prompt, prompt.frame_index)
            return {"frame_index": prompt.frame_index, "outputs": FrameOutputs(objects, session.width, session.height)}

    def remove_object(self, session_id: str, obj_id: int, is_user_action: bool = True) -> dict[str, Any]:
        """Stop tracking ``obj_id`` on every frame; returns ``{"is_success": True}``."""
        obj_id = _plain(obj_id)
        if isinstance(obj_id, bool) or not isinstance(obj_id, int):
            raise PredictorError(f"obj_id: must be an integer, got {obj_id!r}")
        if not isinstance(is_user_action, bool):
            raise PredictorError(f"is_user_action: must be true or false, got {is_user_action!r}")
        with self._lock:
            self._call(self._session(session_id).remove_object, obj_id)
        return {"is_success": True}

    def propagate_in_video(
        self,
        session_id: str,
        propagation_direction: str = BOTH,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Track the prompts through the video; yields ``{"frame_index", "outputs"}`` per frame.

        ``propagation_direction`` is ``forward``, ``backward`` or ``both`` (the default, forward first);
        the start defaults to the first prompted frame; ``max_frame_num_to_track`` caps each direction.
        The request is checked when called; a change to the session while iterating ends it with an error.
        """
        start_frame_idx = _optional_int("start_frame_index", start_frame_idx, minimum=0)
        max_frame_num_to_track = _optional_int("max_frame_num_to_track", max_frame_num_to_track, minimum=1)
        with self._lock:
            session = self._session(session_id)
            legs = self._call(session.propagation_plan, propagation_direction, start_frame_idx, max_frame_num_to_track)
        return self._locked_stream(session, session.propagate(legs))

    def reset_session(self, session_id: str) -> dict[str, Any]:
        """Drop every prompt, object and result of the session; returns ``{"is_success": True}``."""
        with self._lock:
            self._session(session_id).reset()
        return {"is_success": True}

    def close_session(self, session_id: str) -> dict[str, Any]:
        """Close the session and free its memory. Idempotent, as Meta's: closing a session that is not
        open answers ``{"is_success": False}`` instead of raising."""
        with self._lock:
            session = self._sessions.pop(session_id, None) if isinstance(session_id, str) else None
            if session is None:
                return {"is_success": False}
            self._warned.discard(session_id)
            session.close()  # drops the sessions' tensors and the decoded frames now, not at the next gc
        if self.models.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"is_success": True}

    def shutdown(self) -> None:
        """Close every session."""
        for session_id in list(self._sessions):
            self.close_session(session_id)

    # ----------------------------------------------------------------------- beyond Meta's API

    def session_info(self, session_id: str) -> dict[str, Any]:
        """``{"num_frames", "width", "height", "fps", "objects", "text_prompts"}`` of an open session
        (``fps`` is 0.0 for JPEG folders and images)."""
        with self._lock:
            session = self._session(session_id)
            return {
                "num_frames": session.num_frames,
                "width": session.width,
                "height": session.height,
                "fps": session.frames.fps,
                "objects": session.object_ids,
                "text_prompts": session.text_prompts,
            }

    def frames(self, session_id: str) -> VideoFrames:
        """The session's frames (RGB ``H x W x 3`` uint8 by index, decoded on demand, shared cache),
        e.g. to draw the outputs on them."""
        with self._lock:
            return self._session(session_id).frames

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    # ---------------------------------------------------------------------------------- internals

    def _session(self, session_id: object) -> VideoSession:
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise UnknownSessionError(
                f"session_id: no open session {session_id!r} (never started, or closed); start_session first"
            )
        return session

    def _warn_if_normalized(self, session_id: str, prompt: Prompt, width: int, height: int) -> None:
        """Warn (once per session) when pixel points all lie within [0, 1]: Meta's normalized points, most likely."""
        if session_id in self._warned or not prompt.points or min(width, height) <= _WARN_ABOVE_SIDE:
            return
        if all(0 <= v <= 1 for point in prompt.points for v in point):
            self._warned.add(session_id)
            warnings.warn(
                f"session {session_id}: every point of this add_prompt lies within [0, 1], but this predictor reads "
                f"points in pixels of the {width}x{height} frame (and boxes as normalized [cx, cy, w, h]), so they "
                "all fall in its top-left corner. For points normalized as Meta's SAM 3 predictor takes them (and "
                'its [x, y, w, h] boxes), build it with Sam3VideoPredictor(prompt_coordinates="meta").',
                PromptCoordinatesWarning,
                stacklevel=_caller_outside_this_module(),
            )

    @staticmethod
    def _call(function: Callable[..., Any], *args: Any) -> Any:
        """Run a session operation; its ``ValueError`` (message names the field) becomes a ``PredictorError``."""
        try:
            return function(*args)
        except ValueError as exc:
            raise PredictorError(str(exc)) from exc

    def _locked_stream(self, session: VideoSession, frames: Iterator[tuple[int, list[ObjectResult]]]):
        while True:
            with self._lock:
                try:
                    frame_index, objects = next(frames)
                except StopIteration:
                    return
                except (SessionChanged, ValueError) as exc:
                    raise PredictorError(f"propagate_in_video: {exc}") from exc
                except VideoReadError as exc:
                    raise PredictorError(f"resource_path: {exc}") from exc
            yield {"frame_index": frame_index, "outputs": FrameOutputs(objects, session.width, session.height)}


def _caller_outside_this_module() -> int:
    """The ``stacklevel`` of the first caller outside this module (``warnings.warn`` points at the user's line)."""
    level, frame = 2, sys._getframe(2)  # 1: this function's caller (the one warning), 2: its caller
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _parse_request(request: object, stream: bool) -> tuple[str, dict[str, Any]]:
    """Check a request's type and fields; returns the type and the fields other than ``type``."""
    if not isinstance(request, Mapping):
        raise PredictorError(f"request: must be a dict with a 'type', got {type(request).__name__}")
    kind = request.get("type")
    allowed = _STREAM_REQUESTS if stream else tuple(k for k in _REQUEST_FIELDS if k not in _STREAM_REQUESTS)
    if kind not in allowed:
        where = "handle_stream_request" if stream else "handle_request"
        hint = ""
        if kind in _REQUEST_FIELDS:
            hint = f"; send {kind!r} through {'handle_request' if stream else 'handle_stream_request'}"
        raise PredictorError(f"type: {where} does not take request type {kind!r} (it takes {', '.join(allowed)}){hint}")
    required, optional = _REQUEST_FIELDS[kind]
    fields = {k: v for k, v in request.items() if k != "type"}
    for name in fields:
        if name not in required and name not in optional:
            known = ", ".join(required + optional)
            raise PredictorError(f"{name}: unknown field for {kind} (fields: {known})")
    for name in required:
        if fields.get(name) is None:
            raise PredictorError(f"{name}: required by {kind}")
    return kind, {k: v for k, v in fields.items() if v is not None}


def _check_session_id(session_id: object) -> None:
    if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
        raise PredictorError(f"session_id: must be a non-empty string of at most {MAX_SESSION_ID_CHARS} characters")


def _optional_int(field: str, value: object, minimum: int) -> int | None:
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PredictorError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return value


def _from_meta_coordinates(fields: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """Meta's normalized ``[x, y]`` points and ``[x, y, w, h]`` boxes as pixel points and ``[cx, cy, w, h]``
    boxes. Malformed values pass through unchanged for the prompt validator to name."""
    fields = dict(fields)
    points, boxes = fields.get("points"), fields.get("bounding_boxes")
    if _numbers_of(points, 2):
        if not all(0 <= v <= 1 for point in points for v in point):
            raise PredictorError("points: with prompt_coordinates='meta', points are normalized [x, y] in 0..1")
        # a normalized 1.0 is the right/bottom edge: keep it inside the last pixel
        fields["points"] = [[min(x * width, width - 1e-3), min(y * height, height - 1e-3)] for x, y in points]
    if _numbers_of(boxes, 4):
        fields["bounding_boxes"] = [[x + w / 2, y + h / 2, w, h] for x, y, w, h in boxes]
    return fields


def _numbers_of(value: object, size: int) -> bool:
    """Whether ``value`` is a list of ``size``-number lists."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(item, (list, tuple))
        and len(item) == size
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
        for item in value
    )


def _plain(value: Any) -> Any:
    """Tensors and numpy arrays/scalars (as Meta's examples pass them) as plain Python values."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return value
