"""Segment a whole file with the video predictor: the rendered video or image, and the masks as JSON.

Shared by ``sam3-stream segment-video`` / ``segment-image`` and the HTTP API's jobs. A video is
decoded, tracked and encoded frame by frame (nothing holds the whole video), drawn with the live
compositor, written as H.264 mp4; the masks file holds every frame's objects with COCO RLE masks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from models import FrameOutputs, ObjectResult, Sam3VideoPredictor
from streamer.compositor import CompositeStyle, composite
from streamer.protocol import object_to_json
from streamer.video_writer import DEFAULT_FPS, Mp4Writer

IMAGE_OUTPUTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_OUTPUTS = (".mp4", ".mov", ".mkv")

# (frames tracked, total) after each tracked frame; raising from it stops the job (the session is closed).
Progress = Callable[[int, int], None]


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


@dataclass(frozen=True)
class FilePrompt:
    """What to segment in a file: text concepts (every instance) and objects given by clicks or boxes."""

    texts: tuple[str, ...] = ()
    objects: tuple[ObjectPrompt, ...] = ()

    def requests(self, width: int, height: int) -> list[dict[str, Any]]:
        """``add_prompt`` fields: one per text, one per object (boxes normalized for a ``width`` x ``height`` frame)."""
        requests: list[dict[str, Any]] = [{"text": text} for text in self.texts]
        for obj in self.objects:
            fields: dict[str, Any] = {}
            if obj.points:
                fields["points"] = [list(p) for p in obj.points]
                fields["point_labels"] = list(obj.point_labels)
            if obj.box is not None:
                x0, y0, x1, y1 = obj.box
                fields["bounding_boxes"] = [
                    [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
                ]
                fields["bounding_box_labels"] = [1]
            if obj.obj_id is not None:
                fields["obj_id"] = obj.obj_id
            requests.append(fields)
        if not requests:
            raise ValueError("prompt: give a text prompt, points or a box")
        return requests


def render(frame: np.ndarray, outputs: FrameOutputs, overlay: bool, style: CompositeStyle) -> np.ndarray:
    """The frame with its objects drawn on it, or (``overlay=False``) the binary mask: white where any object is."""
    if overlay:
        return composite(frame, outputs.objects, style)
    mask = np.zeros(frame.shape[:2], dtype=bool)
    for obj in outputs.objects:
        mask |= obj.mask
    return np.repeat((mask * np.uint8(255))[:, :, None], 3, axis=2)


class MasksWriter:
    """Writes ``{"source", "width", "height", "fps", "num_frames", "prompts", "frames": [...]}`` to a JSON
    file one frame at a time; each frame is ``{"frame_index", "objects": [{obj_id, score, bbox, label,
    mask: COCO RLE}]}`` (the objects of the wire protocol's results)."""

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self._file: IO[str] | None = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        head = json.dumps({**header, "frames": []})
        self._file.write(head[:-2])  # everything up to the frames list's closing "]}"
        self._first = True

    def write(self, frame_index: int, outputs: FrameOutputs) -> None:
        assert self._file is not None, "write after close"
        objects = [object_to_json(o, outputs.width, outputs.height) for o in outputs.objects]
        self._file.write(("" if self._first else ",") + json.dumps({"frame_index": frame_index, "objects": objects}))
        self._first = False

    def close(self) -> None:
        if self._file is not None:
            self._file.write("]}")
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
    prompt: FilePrompt,
    *,
    frame_index: int = 0,
    masks_path: str | os.PathLike | None = None,
    overlay: bool = True,
    fps: float | None = None,
    style: CompositeStyle = CompositeStyle(),
    progress: Progress | None = None,
) -> SegmentSummary:
    """Track ``prompt``, given on ``frame_index``, through the video ``source``; write every frame to the
    H.264 ``output``, drawn (or as the binary mask), and the masks JSON to ``masks_path``.

    Frames before the prompted one are tracked backwards first and their masks held, packed to bits,
    until written, so the output is in order without holding decoded frames. Errors: ``PredictorError``
    (bad input or prompt, naming the field), ``ValueError`` (bad output path), ``OSError`` (cannot write).
    """
    check_output(output, VIDEO_OUTPUTS)
    with _Session(predictor, source) as session:
        info = session.info
        rate = fps or info["fps"] or DEFAULT_FPS
        prompts = session.prompt(prompt, frame_index)[1]
        frames = predictor.frames(session.id)
        summary = SegmentSummary(0, info["width"], info["height"], rate)
        header = {"source": os.fspath(source), **_size(info, rate), "prompts": list(prompts)}
        with (
            Mp4Writer(output, info["width"], info["height"], rate) as writer,
            _maybe_masks(masks_path, header) as masks,
        ):
            seen: set[int] = set()
            for index, outputs in session.in_order(frame_index, progress):
                writer.write(render(frames[index], outputs, overlay, style))
                if masks is not None:
                    masks.write(index, outputs)
                summary.frames += 1
                seen.update(outputs)
        summary.object_ids = sorted(seen)
        return summary


def segment_image(
    predictor: Sam3VideoPredictor,
    source: str | os.PathLike,
    output: str | os.PathLike,
    prompt: FilePrompt,
    *,
    masks_path: str | os.PathLike | None = None,
    overlay: bool = True,
    style: CompositeStyle = CompositeStyle(),
) -> SegmentSummary:
    """Segment one image with ``prompt``; write it drawn (or the binary mask) to ``output``, and the masks JSON."""
    suffix = check_output(output, IMAGE_OUTPUTS)
    with _Session(predictor, source) as session:
        info = session.info
        if info["num_frames"] != 1:
            raise ValueError(f"source: {os.fspath(source)} is a video ({info['num_frames']} frames); use segment-video")
        outputs, prompts = session.prompt(prompt, 0)
        image = render(predictor.frames(session.id)[0], outputs, overlay, style)
        ok, encoded = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"output: cannot encode a {suffix} image")
        Path(output).write_bytes(encoded.tobytes())
        if masks_path is not None:
            header = {"source": os.fspath(source), **_size(info, 0.0), "prompts": list(prompts)}
            with MasksWriter(masks_path, header) as masks:
                masks.write(0, outputs)
        return SegmentSummary(1, info["width"], info["height"], 0.0, sorted(outputs))


class _Session:
    """A predictor session for one job: opened on entry, closed on exit whatever happens."""

    def __init__(self, predictor: Sam3VideoPredictor, source: str | os.PathLike) -> None:
        self.predictor = predictor
        self.id = predictor.start_session(source)["session_id"]
        self.info = predictor.session_info(self.id)

    def prompt(self, prompt: FilePrompt, frame_index: int) -> tuple[FrameOutputs, list[dict[str, Any]]]:
        """Apply the prompt on ``frame_index``; returns the frame's outputs and the requests sent."""
        requests = prompt.requests(self.info["width"], self.info["height"])
        outputs = None
        for fields in requests:
            outputs = self.predictor.add_prompt(self.id, frame_index, **fields)["outputs"]
        assert outputs is not None  # requests() never returns an empty list
        return outputs, requests

    def in_order(self, start: int, progress: Progress | None) -> Iterator[tuple[int, FrameOutputs]]:
        """Every frame's outputs in frame order: backwards from ``start`` to 0 first (their masks held
        packed until written), then forwards from ``start + 1``. ``progress`` hears of each tracked frame."""
        total, tracked = self.info["num_frames"], 0

        def track(direction: str, first: int) -> Iterator[tuple[int, FrameOutputs]]:
            nonlocal tracked
            for response in self.predictor.propagate_in_video(self.id, direction, first):
                tracked += 1
                if progress is not None:
                    progress(tracked, total)
                yield response["frame_index"], response["outputs"]

        if start > 0:
            held = [(index, _packed(outputs)) for index, outputs in track("backward", start)]
            while held:
                index, packed = held.pop()
                yield index, _unpacked(*packed)
        first = start + 1 if start > 0 else 0
        if first < total:
            yield from track("forward", first)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.predictor.close_session(self.id)


def _packed(outputs: FrameOutputs) -> tuple[list[tuple[ObjectResult, np.ndarray]], int, int]:
    """Outputs with each mask packed to bits (8x smaller), to hold while earlier frames are written."""
    packed = [(replace(o, mask=None), np.packbits(o.mask)) for o in outputs.objects]
    return packed, outputs.width, outputs.height


def _unpacked(packed: list[tuple[ObjectResult, np.ndarray]], width: int, height: int) -> FrameOutputs:
    objects = [
        replace(o, mask=np.unpackbits(bits, count=width * height).reshape(height, width).astype(bool))
        for o, bits in packed
    ]
    return FrameOutputs(objects, width, height)


def _size(info: Mapping[str, Any], fps: float) -> dict[str, Any]:
    return {"width": info["width"], "height": info["height"], "fps": fps, "num_frames": info["num_frames"]}


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
