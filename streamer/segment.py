"""Segment a whole file with the video predictor: the rendered video or image, and the masks as JSON.

The one way files go through the model outside Python scripts: ``sam3-stream segment-video`` /
``segment-image`` and the HTTP API's jobs (``streamer/api/runner.py``) both call
:func:`segment_video` / :func:`segment_image`. A video is decoded, tracked and encoded frame by frame
(nothing holds the whole video), drawn with the live compositor (or as a black and white mask),
written as H.264 mp4; the masks file holds every frame's objects with COCO RLE masks.

Importing this module does not import torch (the CLI builds its parser without it); the predictor
is loaded by :func:`load_predictor`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from models.results import ObjectResult
from streamer.compositor import CompositeStyle, composite
from streamer.protocol import object_to_json
from streamer.video_writer import DEFAULT_FPS, Mp4Writer

if TYPE_CHECKING:
    from models import Sam3VideoPredictor

IMAGE_OUTPUTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_OUTPUTS = (".mp4", ".mov", ".mkv")
JPEG_QUALITY = 95

# (frames tracked, total) once the prompts are applied (0) and after each tracked frame; raising from it
# stops the job (its session is closed).
Progress = Callable[[int, int], None]


def load_predictor(
    model: str, device: str | None = None, encoder: str = "torch", encoder_precision: str | None = None
) -> Sam3VideoPredictor:
    """Load ``model`` (hub id, local folder, ``tiny-random``) on ``device`` (``None``: cuda if any) with the
    image-encoder backend ``encoder`` (``models.make_encoder``: one that cannot run here falls back to torch
    with a warning). Raises ``ModelLoadError`` (a ``RuntimeError``) or ``ValueError`` naming a bad choice."""
    from models import Sam3VideoPredictor, check_encoder_choice, load_models, make_encoder

    check_encoder_choice(encoder, encoder_precision)  # before minutes of loading
    models = load_models(model, device=device)
    return Sam3VideoPredictor(models=models, encoder=make_encoder(encoder, models, precision=encoder_precision))


@dataclass
class SegmentSummary:
    """What a segmentation produced: frame count and size, rate, and every object id seen."""

    frames: int
    width: int
    height: int
    fps: float
    object_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to track: clicks (pixels; label 1 on it, 0 off it) and/or a pixel box ``(x0, y0, x1, y1)``."""

    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    obj_id: int | None = None

    def request(self, width: int, height: int) -> dict[str, Any]:
        """The ``add_prompt`` fields for a ``width`` x ``height`` frame: the box normalized to ``[cx, cy, w, h]``.

        A box drawn a little past the frame's edge is meant to reach it: it is clipped to the frame, and
        ``ValueError`` (``bounding_boxes: ...``) says so when nothing of it is left.
        """
        fields: dict[str, Any] = {}
        if self.points:
            fields["points"] = [list(p) for p in self.points]
            fields["point_labels"] = list(self.point_labels)
        if self.box is not None:
            x0, y0 = max(0.0, min(self.box[0], width)), max(0.0, min(self.box[1], height))
            x1, y1 = max(0.0, min(self.box[2], width)), max(0.0, min(self.box[3], height))
            if x1 <= x0 or y1 <= y0:
                raise ValueError(
                    f"bounding_boxes: box {list(self.box)} covers no part of the {width}x{height} frame "
                    "(pixel [x0, y0, x1, y1] with x0 < x1, y0 < y1)"
                )
            fields["bounding_boxes"] = [
                [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
            ]
            fields["bounding_box_labels"] = [1]
        if self.obj_id is not None:
            fields["obj_id"] = self.obj_id
        return fields


@dataclass(frozen=True)
class FilePrompt:
    """What to segment in a file: text concepts (every instance) and objects given by clicks or boxes in pixels."""

    texts: tuple[str, ...] = ()
    objects: tuple[ObjectPrompt, ...] = ()

    def requests(self, width: int, height: int) -> list[dict[str, Any]]:
        """``add_prompt`` fields: one per text, one per object (see :meth:`ObjectPrompt.request`)."""
        requests: list[dict[str, Any]] = [{"text": text} for text in self.texts]
        requests += [obj.request(width, height) for obj in self.objects]
        return requests


# What segment_video/segment_image take: a FilePrompt (pixel boxes, normalized once the frame size is
# known), or ``add_prompt`` fields as they are (``text``, ``points``, ``bounding_boxes`` [cx, cy, w, h], ...).
Prompts = FilePrompt | Sequence[Mapping[str, Any]]


def render(
    frame: np.ndarray, objects: Sequence[ObjectResult], overlay: bool, style: CompositeStyle = CompositeStyle()
) -> np.ndarray:
    """The frame with its objects drawn on it, or (``overlay=False``) the union of their masks as a white
    on black RGB image."""
    if overlay:
        return composite(frame, objects, style)
    union = np.zeros(frame.shape[:2], dtype=bool)
    for obj in objects:
        union |= obj.mask
    return np.repeat((union * np.uint8(255))[:, :, None], 3, axis=2)


def encode_image(rgb: np.ndarray, suffix: str) -> bytes:
    """An RGB image as the bytes of a ``suffix`` file (one of :data:`IMAGE_OUTPUTS`; JPEG at quality 95)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"output: cannot encode a {suffix} image")
    return data.tobytes()


class MasksWriter:
    """Writes ``{"source", "width", "height", "fps", "num_frames", "prompts", "frames": [...]}`` (the
    ``header``'s fields, then the frames) to a JSON file one frame at a time; each frame is
    ``{"frame_index", "objects": [{obj_id, score, bbox, label, mask: COCO RLE}]}`` (the objects of the
    wire protocol's results)."""

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self.width, self.height = int(header["width"]), int(header["height"])
        self._file: IO[str] | None = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        head = json.dumps({**header, "frames": []})
        self._file.write(head[:-2])  # everything up to the frames list's closing "]}"
        self._first = True

    def write(self, frame_index: int, objects: Sequence[ObjectResult]) -> None:
        assert self._file is not None, "write after close"
        entry = {"frame_index": frame_index, "objects": [object_to_json(o, self.width, self.height) for o in objects]}
        self._file.write(("" if self._first else ",\n") + json.dumps(entry, separators=(",", ":")))
        self._first = False

    def close(self) -> None:
        if self._file is not None:
            self._file.write("]}\n")
            self._file.close()
            self._file = None

    def __enter__(self) -> MasksWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def segment_video(
    predictor: Sam3VideoPredictor,
    source: str | os.PathLike,
    output: str | os.PathLike,
    prompt: Prompts,
    *,
    frame_index: int = 0,
    masks_path: str | os.PathLike | None = None,
    source_name: str | None = None,
    overlay: bool = True,
    fps: float | None = None,
    style: CompositeStyle = CompositeStyle(),
    progress: Progress | None = None,
) -> SegmentSummary:
    """Track ``prompt``, given on ``frame_index``, through the video ``source``; write every frame to the
    H.264 ``output``, drawn (or as the binary mask), and the masks JSON to ``masks_path`` (its ``source``
    field is ``source_name``, default the path).

    Frames before the prompted one are tracked backwards first and their masks held, packed to bits,
    until written, so the output is in order without holding decoded frames. Errors: ``PredictorError``
    (bad input or prompt, naming the field), ``ValueError`` (bad output path or prompt), ``OSError``
    (cannot write); whatever ``progress`` raises.
    """
    check_output(output, VIDEO_OUTPUTS)
    with _Session(predictor, source) as session:
        info = session.info
        rate = fps or info["fps"] or DEFAULT_FPS
        requests = session.prompt(prompt, frame_index)[1]
        frames = predictor.frames(session.id)
        summary = SegmentSummary(0, info["width"], info["height"], rate)
        header = _header(source_name or os.fspath(source), info, rate, requests)
        with (
            Mp4Writer(output, info["width"], info["height"], rate) as writer,
            _maybe_masks(masks_path, header) as masks,
        ):
            seen: set[int] = set()
            for index, objects in session.in_order(frame_index, progress):
                writer.write(render(frames[index], objects, overlay, style))
                if masks is not None:
                    masks.write(index, objects)
                summary.frames += 1
                seen.update(o.obj_id for o in objects)
        summary.object_ids = sorted(seen)
        return summary


def segment_image(
    predictor: Sam3VideoPredictor,
    source: str | os.PathLike,
    output: str | os.PathLike,
    prompt: Prompts,
    *,
    masks_path: str | os.PathLike | None = None,
    source_name: str | None = None,
    overlay: bool = True,
    style: CompositeStyle = CompositeStyle(),
) -> SegmentSummary:
    """Segment one image with ``prompt``; write it drawn (or the binary mask) to ``output``, and the masks JSON."""
    suffix = check_output(output, IMAGE_OUTPUTS)
    with _Session(predictor, source) as session:
        info = session.info
        if info["num_frames"] != 1:
            raise ValueError(f"source: {os.fspath(source)} is a video ({info['num_frames']} frames); use segment-video")
        objects, requests = session.prompt(prompt, 0)
        image = render(predictor.frames(session.id)[0], objects, overlay, style)
        Path(output).write_bytes(encode_image(image, suffix))
        if masks_path is not None:
            with MasksWriter(masks_path, _header(source_name or os.fspath(source), info, 0.0, requests)) as masks:
                masks.write(0, objects)
        return SegmentSummary(1, info["width"], info["height"], 0.0, sorted(o.obj_id for o in objects))


class _Session:
    """A predictor session for one job: opened on entry, closed on exit whatever happens."""

    def __init__(self, predictor: Sam3VideoPredictor, source: str | os.PathLike) -> None:
        self.predictor = predictor
        self.id = predictor.start_session(source)["session_id"]
        self.info = predictor.session_info(self.id)

    def prompt(self, prompt: Prompts, frame_index: int) -> tuple[list[ObjectResult], list[dict[str, Any]]]:
        """Apply the prompt on ``frame_index``; returns the frame's objects and the ``add_prompt`` fields sent."""
        if isinstance(prompt, FilePrompt):
            requests = prompt.requests(self.info["width"], self.info["height"])
        else:
            requests = [dict(fields) for fields in prompt]
        if not requests:
            raise ValueError("prompt: give a text prompt, points or a box")
        objects: list[ObjectResult] = []
        for fields in requests:
            if "frame_index" in fields or "session_id" in fields:
                raise ValueError("prompt: the frame is segment_video's frame_index; leave frame_index out")
            request = {"type": "add_prompt", "session_id": self.id, "frame_index": frame_index, **fields}
            objects = self.predictor.handle_request(request)["outputs"].objects
        return objects, requests

    def in_order(self, start: int, progress: Progress | None) -> Iterator[tuple[int, list[ObjectResult]]]:
        """Every frame's objects in frame order: backwards from ``start`` to 0 first (their masks held
        packed until written), then forwards from ``start + 1``. ``progress`` hears of each tracked frame."""
        total, tracked = self.info["num_frames"], 0
        if progress is not None:
            progress(0, total)

        def track(direction: str, first: int) -> Iterator[tuple[int, list[ObjectResult]]]:
            nonlocal tracked
            for response in self.predictor.propagate_in_video(self.id, direction, first):
                tracked += 1
                if progress is not None:
                    progress(tracked, total)
                yield response["frame_index"], response["outputs"].objects

        if start > 0:
            held = [(index, _packed(objects)) for index, objects in track("backward", start)]
            while held:
                index, packed = held.pop()
                yield index, _unpacked(packed, self.info["width"], self.info["height"])
        first = start + 1 if start > 0 else 0
        if first < total:
            yield from track("forward", first)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.predictor.close_session(self.id)


def _packed(objects: list[ObjectResult]) -> list[tuple[ObjectResult, np.ndarray]]:
    """Objects with each mask packed to bits (8x smaller), to hold while earlier frames are written."""
    return [(replace(o, mask=None), np.packbits(o.mask)) for o in objects]


def _unpacked(packed: list[tuple[ObjectResult, np.ndarray]], width: int, height: int) -> list[ObjectResult]:
    return [
        replace(o, mask=np.unpackbits(bits, count=width * height).reshape(height, width).astype(bool))
        for o, bits in packed
    ]


def _header(source: str, info: Mapping[str, Any], fps: float, requests: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "source": source,
        "width": info["width"],
        "height": info["height"],
        "fps": fps,
        "num_frames": info["num_frames"],
        "prompts": requests,
    }


def check_output(output: str | os.PathLike, allowed: tuple[str, ...]) -> str:
    """``ValueError`` unless ``output`` ends in one of ``allowed`` and its folder exists; returns the suffix."""
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"output: {path} must end in {', '.join(allowed)}")
    if not path.parent.is_dir():
        raise ValueError(f"output: folder {path.parent} does not exist")
    return suffix


def _maybe_masks(path: str | os.PathLike | None, header: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    return MasksWriter(path, header) if path is not None else contextlib.nullcontext()
