"""The one prompt vocabulary: SAM 3's ``add_prompt`` fields, validated.

The same fields arrive from the Python API, the control socket, the WebRTC data channel and the HTTP
API, so parsing and validation live here once. Every problem raises ``ValueError`` whose message
starts with the offending field's name, so a caller can show it to the operator as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

PROMPT_FIELDS = (
    "text",
    "points",
    "point_labels",
    "bounding_boxes",
    "bounding_box_labels",
    "obj_id",
    "frame_index",
    "seq",
)
MAX_TEXT_CHARS = 200
MAX_POINTS = 64
MAX_BOXES = 64
# Object ids fit a signed 32-bit integer, so every id derived from one (the next free id) still fits the
# 64-bit integers of the wire, numpy and C callers.
MAX_OBJ_ID = 2**31 - 1
MAX_FRAME_INDEX = 2**63 - 1


@dataclass(frozen=True)
class Prompt:
    """One ``add_prompt`` request.

    - ``text``: a noun phrase; every instance is detected and tracked.
    - ``points`` / ``point_labels``: pixel ``(x, y)`` clicks, label 1 foreground, 0 background. All
      points of one prompt (and at most one box) describe a single object.
    - ``bounding_boxes`` / ``bounding_box_labels``: normalized ``(cx, cy, w, h)`` boxes, label 1.
      Several boxes without points create one object each.
    - ``obj_id``: refine this object, or create it with this id.
    - ``frame_index``: the frame the prompt refers to (files), or the frame the operator saw (live).
    - ``seq``: live, the capture sequence number of the frame the operator drew on (results carry it); the
      tracker service turns it into the tracker's ``frame_index`` and places the prompt there.
    """

    text: str | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    bounding_boxes: tuple[tuple[float, float, float, float], ...] = ()
    bounding_box_labels: tuple[int, ...] = ()
    obj_id: int | None = None
    frame_index: int | None = None
    seq: int | None = None

    def __post_init__(self) -> None:
        _check_text(self.text)
        _check_points(self.points, self.point_labels)
        _check_boxes(self.bounding_boxes, self.bounding_box_labels)
        _check_optional_int("obj_id", self.obj_id, MAX_OBJ_ID)
        _check_optional_int("frame_index", self.frame_index, MAX_FRAME_INDEX)
        _check_optional_int("seq", self.seq, MAX_FRAME_INDEX)
        if self.text is None and not self.points and not self.bounding_boxes:
            raise ValueError("prompt: give at least one of text, points or bounding_boxes")
        if self.points and len(self.bounding_boxes) > 1:
            raise ValueError("bounding_boxes: with points, give at most one box (points and box describe one object)")
        if self.obj_id is not None and len(self.bounding_boxes) > 1 and not self.points:
            raise ValueError(
                "bounding_boxes: one obj_id takes at most one box; omit obj_id to create one object per box"
            )
        if self.text is not None and self.obj_id is not None and not self.has_geometry:
            raise ValueError("obj_id: a text prompt finds its own objects; obj_id goes with points or bounding_boxes")

    @property
    def has_geometry(self) -> bool:
        """True when the prompt carries clicks or boxes (an object to create or refine)."""
        return bool(self.points or self.bounding_boxes)

    @property
    def object_count(self) -> int:
        """How many objects the clicks and boxes describe: all points (plus at most one box) make one;
        several boxes without points make one each; no geometry makes none."""
        if self.points:
            return 1
        return len(self.bounding_boxes)

    def per_object(self, obj_ids: Sequence[int]) -> list[Prompt]:
        """The geometry split into one prompt per object, each naming its id (``obj_ids``, one per
        :attr:`object_count`); the text, if any, is left out (see :meth:`text_only`)."""
        if len(obj_ids) != self.object_count:
            raise ValueError(f"obj_id: {len(obj_ids)} ids for {self.object_count} objects")
        if self.points or len(obj_ids) <= 1:
            return [replace(self, text=None, obj_id=obj_id) for obj_id in obj_ids]
        return [
            replace(self, text=None, obj_id=obj_id, bounding_boxes=(box,), bounding_box_labels=(label,))
            for obj_id, box, label in zip(obj_ids, self.bounding_boxes, self.bounding_box_labels, strict=True)
        ]

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Prompt:
        """Parse JSON-like fields (lists, numbers, strings), rejecting unknown or mistyped ones."""
        if not isinstance(fields, Mapping):
            raise ValueError(f"prompt: expected an object with fields {', '.join(PROMPT_FIELDS)}")
        unknown = sorted(set(fields) - set(PROMPT_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown prompt field (known: {', '.join(PROMPT_FIELDS)})")
        text = fields.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError("text: must be a string")
        return cls(
            text=text,
            points=_tuple_of_vectors("points", fields.get("points"), 2),
            point_labels=_tuple_of_labels("point_labels", fields.get("point_labels")),
            bounding_boxes=_tuple_of_vectors("bounding_boxes", fields.get("bounding_boxes"), 4),
            bounding_box_labels=_tuple_of_labels("bounding_box_labels", fields.get("bounding_box_labels")),
            obj_id=fields.get("obj_id"),
            frame_index=fields.get("frame_index"),
            seq=fields.get("seq"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; empty and unset ones are left out."""
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
        if self.points:
            out["points"] = [list(p) for p in self.points]
            out["point_labels"] = list(self.point_labels)
        if self.bounding_boxes:
            out["bounding_boxes"] = [list(b) for b in self.bounding_boxes]
            out["bounding_box_labels"] = list(self.bounding_box_labels)
        if self.obj_id is not None:
            out["obj_id"] = self.obj_id
        if self.frame_index is not None:
            out["frame_index"] = self.frame_index
        if self.seq is not None:
            out["seq"] = self.seq
        return out

    def check_inside(self, width: int, height: int) -> None:
        """Reject pixel points that fall outside a ``width`` x ``height`` frame."""
        for x, y in self.points:
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(f"points: ({x:g}, {y:g}) lies outside the {width}x{height} frame")


def _brief(value: object, limit: int = 60) -> str:
    """A value's repr, cut short: messages go back to operators and must stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(text: str | None) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError("text: must be a string")
    if not text.strip():
        raise ValueError("text: must be a non-empty noun phrase")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text: longer than {MAX_TEXT_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
        raise ValueError("text: not valid Unicode (it holds a lone surrogate)") from None


def _check_points(points: Sequence[Sequence[float]], labels: Sequence[int]) -> None:
    if len(points) > MAX_POINTS:
        raise ValueError(f"points: at most {MAX_POINTS} points per prompt")
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"points: coordinates must be finite numbers, got ({x}, {y})")
    if len(labels) != len(points):
        raise ValueError(f"point_labels: {len(labels)} labels for {len(points)} points (need one label per point)")
    for label in labels:
        if label not in (0, 1):
            raise ValueError(f"point_labels: each label must be 1 (foreground) or 0 (background), got {label}")


def _check_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int]) -> None:
    if len(boxes) > MAX_BOXES:
        raise ValueError(f"bounding_boxes: at most {MAX_BOXES} boxes per prompt")
    for cx, cy, w, h in boxes:
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            raise ValueError(f"bounding_boxes: values must be finite numbers, got {[cx, cy, w, h]}")
        if w <= 0 or h <= 0:
            raise ValueError(f"bounding_boxes: width and height must be > 0, got w={w:g}, h={h:g}")
        eps = 1e-6
        if cx - w / 2 < -eps or cy - h / 2 < -eps or cx + w / 2 > 1 + eps or cy + h / 2 > 1 + eps:
            raise ValueError(
                f"bounding_boxes: box (cx={cx:g}, cy={cy:g}, w={w:g}, h={h:g}) must lie inside [0, 1] "
                "(normalized cx, cy, w, h)"
            )
    if len(labels) != len(boxes):
        raise ValueError(f"bounding_box_labels: {len(labels)} labels for {len(boxes)} boxes (need one per box)")
    for label in labels:
        if label not in (0, 1):
            raise ValueError(f"bounding_box_labels: each label must be 1 (positive) or 0 (negative), got {label}")
        if label == 0:
            raise ValueError(
                "bounding_box_labels: negative boxes (0) are detector exemplars, which the tracker does not take; "
                "use background points (point_labels 0) to exclude a region"
            )


def _check_optional_int(field: str, value: object, limit: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {_brief(value)}")
    if not 0 <= value <= limit:
        raise ValueError(f"{field}: must be between 0 and {limit}, got {_brief(value)}")


def _tuple_of_vectors(field: str, value: object, size: int) -> tuple[tuple[float, ...], ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{field}: must be a list of [{size} numbers] entries")
    vectors = []
    for item in value:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != size:
            raise ValueError(f"{field}: each entry must be a list of {size} numbers, got {_brief(item)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item):
            raise ValueError(f"{field}: each entry must be a list of {size} numbers, got {_brief(item)}")
        try:
            vectors.append(tuple(float(v) for v in item))
        except OverflowError:
            raise ValueError(f"{field}: number too large in {_brief(item)}") from None
    return tuple(vectors)


def _tuple_of_labels(field: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{field}: must be a list of 0/1 labels")
    labels = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or item not in (0, 1):
            raise ValueError(f"{field}: each label must be 0 or 1, got {_brief(item)}")
        labels.append(int(item))
    return tuple(labels)


@dataclass(frozen=True)
class PromptFailure:
    """A prompt that was accepted but failed when a tracker applied it: dropped, never retried.

    ``obj_ids`` / ``text`` say which objects or concept it concerned; ``error`` starts with the field.
    """

    error: str
    obj_ids: tuple[int, ...] = ()
    text: str | None = None
