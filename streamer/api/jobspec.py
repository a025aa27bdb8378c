"""Each route's request fields, as the hosted services document them, parsed into one :class:`JobRequest`.

- Oxen.ai (``/api/ai/images/edit``, ``/api/ai/videos/generate``, ``/api/ai/queue``): ``model``,
  ``input_image`` / ``input_video``, ``prompt``, ``apply_mask`` (default true), ``output_format``
  (png | jpeg), ``response_format`` (url | b64_json), ``num_generations`` (queue, 1-4).
- Segmind ``/v1/sam3-video``: ``video``, ``text_prompt``, ``points_input``, ``point_labels_input``,
  ``boxes_input`` (pixel ``[x0, y0, x1, y1]``), ``obj_ids``, ``return_overlay`` (default true).
- Segmind ``/v1/sam-v2-video``: ``input_video``, ``prompt``, ``overlay_mask`` (default true),
  ``coordinates`` (positive clicks), ``remove_coordinates`` (negative clicks); coordinates are
  ignored when a prompt is given, as documented there.

Form fields arrive as strings, so every field also takes its string form (``"true"``,
``"[[100, 200], [150, 250]]"``, ``"[1, 2]"``). Unknown fields are ignored, as the hosted services
pass them through. Every refusal is a 400 naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models import Prompt
from models.prompts import MAX_POINTS, MAX_TEXT_CHARS, PROMPT_FIELDS
from streamer.api.config import MODEL_IMAGE, MODEL_VIDEO
from streamer.api.errors import bad_request
from streamer.api.media import ImageInfo, VideoInfo
from streamer.segment import ObjectPrompt

MAX_OBJECTS = 64
MAX_GENERATIONS = 4  # per queue request, as the hosted queue allows
MAX_COORDINATE = 1e6
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class JobRequest:
    """What one request asks for, before its input is fetched."""

    model: str
    media_type: str  # "image" | "video"
    input_field: str
    input_value: Any
    text: str | None
    objects: tuple[ObjectPrompt, ...] = ()  # pixel clicks and boxes
    apply_mask: bool = True
    output_format: str = "png"  # png | jpeg (images), mp4 (videos)
    masks_rle: bool = False
    response_format: str = "url"
    count: int = 1
    points_field: str = "points"
    boxes_field: str = "boxes"
    params: dict[str, Any] = field(default_factory=dict)

    def prompts(self, width: int, height: int) -> list[dict[str, Any]]:
        """The predictor's ``add_prompt`` fields for a ``width`` x ``height`` input (boxes normalized to
        ``[cx, cy, w, h]``). Raises a 400 naming the field for clicks outside the frame or empty boxes."""
        prompts: list[dict[str, Any]] = [{"text": self.text}] if self.text else []
        for obj in self.objects:
            try:
                prompt = obj.request(width, height)
                Prompt.from_dict(prompt).check_inside(width, height)
            except ValueError as exc:
                raise bad_request(self._renamed(str(exc), obj)) from None
            prompts.append(prompt)
        return prompts

    def _renamed(self, message: str, obj: ObjectPrompt) -> str:
        """A prompt error (``points: ...``, ``bounding_boxes: ...``) named after this route's own field."""
        head, sep, rest = message.partition(": ")
        if not sep or head not in (*PROMPT_FIELDS, "prompt"):
            head, rest = "", message
        is_box = head.startswith("bounding_box") or (head in ("", "prompt") and not obj.points)
        return f"{self.boxes_field if is_box else self.points_field}: {rest}"

    def spec(self, input_name: str, info: ImageInfo | VideoInfo) -> dict[str, Any]:
        """The worker's instructions (stored with the job, so a restarted server can run it)."""
        spec: dict[str, Any] = {
            "input": input_name,
            "prompts": self.prompts(info.width, info.height),
            "apply_mask": self.apply_mask,
            "output_format": self.output_format,
            "masks_rle": self.masks_rle,
            "width": info.width,
            "height": info.height,
        }
        if isinstance(info, VideoInfo):
            spec.update(fps=info.fps, frames=info.frames)
        return spec


# ------------------------------------------------------------------------------------ field readers


def _present(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def read_bool(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field: JSON ``true``/``false``, 0/1, or their string forms."""
    if not _present(fields, name):
        return default
    value = fields[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise bad_request(f"{name}: expected true or false, got {_brief(value)}")


def read_text(fields: Mapping[str, Any], name: str, *, required: bool, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """A string field, stripped; ``None`` when absent or blank and not ``required``."""
    if not _present(fields, name):
        if required:
            raise bad_request(f"{name}: required")
        return None
    value = fields[name]
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected a string, got {_brief(value)}")
    if len(value) > max_chars:
        raise bad_request(f"{name}: longer than {max_chars} characters")
    return value.strip()


def read_choice(fields: Mapping[str, Any], name: str, choices: Mapping[str, str], default: str) -> str:
    """A string field from ``choices`` (accepted spelling -> canonical value)."""
    value = read_text(fields, name, required=False, max_chars=32)
    if value is None:
        return default
    if value.lower() not in choices:
        raise bad_request(f"{name}: expected one of {', '.join(choices)}, got {_brief(value)}")
    return choices[value.lower()]


def read_int(fields: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    if not _present(fields, name):
        return default
    value = _structured(fields, name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_request(f"{name}: expected an integer from {lo} to {hi}, got {_brief(fields[name])}")
    return value


def _structured(fields: Mapping[str, Any], name: str) -> Any:
    """A field that may come as JSON or as its string form (``"[[100, 200]]"``, ``"1"``)."""
    value = fields[name]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise bad_request(f"{name}: not valid JSON: {_brief(value)}") from None
    return value


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name}: expected numbers, got {_brief(value)}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_COORDINATE:
        raise bad_request(f"{name}: {_brief(value)} is not a usable pixel coordinate")
    return number


def _vector(name: str, value: object, size: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != size:
        raise bad_request(f"{name}: each entry must be a list of {size} numbers, got {_brief(value)}")
    return tuple(_number(name, v) for v in value)


def _is_vector(value: object) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], list)


def read_vectors(fields: Mapping[str, Any], name: str, size: int) -> list[list[tuple[float, ...]]]:
    """Pixel vectors grouped per object: ``[x, y]`` (one), ``[[x, y], ...]`` (one object's) or
    ``[[[x, y], ...], ...]`` (one list per object); same for boxes, except that a list of boxes is one
    object per box."""
    if not _present(fields, name):
        return []
    value = _structured(fields, name)
    if _is_vector(value):
        return [[_vector(name, value, size)]]
    if not isinstance(value, list) or not value:
        example = "[[100, 200], [150, 250]]" if size == 2 else "[[50, 50, 200, 200]]"
        raise bad_request(f"{name}: expected a list like {example}")
    if all(_is_vector(v) for v in value):
        vectors = [_vector(name, v, size) for v in value]
        return [[v] for v in vectors] if size == 4 else [vectors]
    if size == 2 and all(isinstance(g, list) and g and all(_is_vector(v) for v in g) for g in value):
        return [[_vector(name, v, size) for v in group] for group in value]
    raise bad_request(f"{name}: mixes points and lists of points; use one form")


def read_labels(fields: Mapping[str, Any], name: str) -> list[list[int]] | None:
    """Point labels: ``[1, 0]`` (one object) or ``[[1, 0], [1]]`` (per object); ``None`` when absent."""
    if not _present(fields, name):
        return None
    value = _structured(fields, name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request(f"{name}: expected a list of 0/1 labels like [1, 0] or [[1, 0]]")
    groups = value if all(isinstance(g, list) for g in value) else [value]
    for group in groups:
        if not group or any(isinstance(v, bool) or v not in (0, 1) for v in group):
            raise bad_request(f"{name}: each label must be 1 (foreground) or 0 (background), got {_brief(group)}")
    return [[int(v) for v in group] for group in groups]


def read_obj_ids(fields: Mapping[str, Any], name: str) -> list[int] | None:
    if not _present(fields, name):
        return None
    value = _structured(fields, name)
    ids = value if isinstance(value, list) else [value]
    if not ids or len(ids) > MAX_OBJECTS:
        raise bad_request(f"{name}: expected an id or a list of 1 to {MAX_OBJECTS} ids")
    for obj_id in ids:
        if isinstance(obj_id, bool) or not isinstance(obj_id, int) or not 0 <= obj_id < 2**31:
            raise bad_request(f"{name}: each id must be an integer from 0 to {2**31 - 1}, got {_brief(obj_id)}")
    if len(set(ids)) != len(ids):
        raise bad_request(f"{name}: ids must be distinct")
    return ids


def masks_requested(fields: Mapping[str, Any], query: Mapping[str, str]) -> bool:
    """``?masks=rle`` or a ``masks: "rle"`` field asks for every frame's masks as COCO RLE JSON."""
    choices = {"rle": "rle", "none": "none"}
    in_query = read_choice(query, "masks", choices, "none")
    return in_query == "rle" or read_choice(fields, "masks", choices, "none") == "rle"


# ------------------------------------------------------------------------------------ the routes


def _model(fields: Mapping[str, Any], expected: tuple[str, ...]) -> str:
    model = read_text(fields, "model", required=True, max_chars=200)
    if model not in expected:
        raise bad_request(f"model: {_brief(model)} is not served here; use {' or '.join(expected)}")
    return model


def oxen_request(fields: Mapping[str, Any], query: Mapping[str, str], models: tuple[str, ...]) -> JobRequest:
    """``/api/ai/images/edit`` (``models`` = sam-3-image), ``/api/ai/videos/generate`` (sam-3-video) and
    ``/api/ai/queue`` (either)."""
    model = _model(fields, models)
    image = model == MODEL_IMAGE
    input_field = "input_image" if image else "input_video"
    if not _present(fields, input_field):
        raise bad_request(f"{input_field}: required (an http(s) URL, a data: URI or a file upload)")
    prompt = read_text(fields, "prompt", required=True)
    apply_mask = read_bool(fields, "apply_mask", True)
    output_format = (
        read_choice(fields, "output_format", {"png": "png", "jpeg": "jpeg", "jpg": "jpeg"}, "png") if image else "mp4"
    )
    params = {"prompt": prompt, "apply_mask": apply_mask}
    if image:
        params["output_format"] = output_format
    return JobRequest(
        model=model,
        media_type="image" if image else "video",
        input_field=input_field,
        input_value=fields[input_field],
        text=prompt,
        apply_mask=apply_mask,
        output_format=output_format,
        masks_rle=masks_requested(fields, query),
        response_format=read_choice(fields, "response_format", {"url": "url", "b64_json": "b64_json"}, "url"),
        count=read_int(fields, "num_generations", 1, 1, MAX_GENERATIONS),
        params=params,
    )


def segmind_sam3_request(fields: Mapping[str, Any], query: Mapping[str, str]) -> JobRequest:
    """``/v1/sam3-video``."""
    if not _present(fields, "video"):
        raise bad_request("video: required (an http(s) URL, a data: URI, base64 content or a file upload)")
    text = read_text(fields, "text_prompt", required=False)
    obj_ids = read_obj_ids(fields, "obj_ids")
    boxes = [group[0] for group in read_vectors(fields, "boxes_input", 4)]
    point_groups, label_groups = _group_points(
        read_vectors(fields, "points_input", 2), read_labels(fields, "point_labels_input"), obj_ids
    )
    if boxes and point_groups and len(boxes) != len(point_groups):
        raise bad_request(
            f"boxes_input: {len(boxes)} boxes for {len(point_groups)} objects given by points_input; "
            "give one box per object (or boxes alone)"
        )
    count = max(len(point_groups), len(boxes))
    if count > MAX_OBJECTS:
        raise bad_request(f"points_input: at most {MAX_OBJECTS} objects")
    if obj_ids is not None and count and len(obj_ids) != count:
        raise bad_request(f"obj_ids: {len(obj_ids)} ids for {count} objects; give one id per object")
    objects = tuple(
        ObjectPrompt(
            points=tuple(point_groups[i]) if point_groups else (),  # type: ignore[arg-type]
            point_labels=tuple(label_groups[i]) if point_groups else (),
            box=boxes[i] if boxes else None,  # type: ignore[arg-type]
            obj_id=obj_ids[i] if obj_ids is not None and count else None,
        )
        for i in range(count)
    )
    if not text and not objects:
        raise bad_request("text_prompt: give text_prompt, points_input or boxes_input")
    overlay = read_bool(fields, "return_overlay", True)
    return _video_request(
        fields,
        query,
        "video",
        text,
        objects,
        overlay,
        ("points_input", "boxes_input"),
        {"text_prompt": text, "return_overlay": overlay},
    )


def _video_request(
    fields: Mapping[str, Any],
    query: Mapping[str, str],
    input_field: str,
    text: str | None,
    objects: tuple[ObjectPrompt, ...],
    overlay: bool,
    geometry_fields: tuple[str, str],
    params: dict[str, Any],
) -> JobRequest:
    """A Segmind-style video job: an mp4 back, the overlay or the binary mask."""
    return JobRequest(
        model=MODEL_VIDEO,
        media_type="video",
        input_field=input_field,
        input_value=fields[input_field],
        text=text or None,
        objects=objects,
        apply_mask=overlay,
        output_format="mp4",
        masks_rle=masks_requested(fields, query),
        points_field=geometry_fields[0],
        boxes_field=geometry_fields[1],
        params=params,
    )


def _group_points(
    groups: list[list[tuple[float, ...]]], labels: list[list[int]] | None, obj_ids: list[int] | None
) -> tuple[list[list[tuple[float, ...]]], list[list[int]]]:
    """Split clicks into objects. Points already grouped per object stay so; a flat list of points is
    split by the label groups (``[[1, 0]]``: one object of two clicks), else one object per point when
    ``obj_ids`` names one id per point, else one object. Missing labels are 1 (foreground)."""
    if not groups:
        if labels is not None:
            raise bad_request("point_labels_input: given without points_input")
        return [], []
    if len(groups) == 1 and labels is not None and len(labels) > 1:
        flat = groups[0]
        if sum(len(g) for g in labels) != len(flat):
            raise bad_request(
                f"point_labels_input: {sum(len(g) for g in labels)} labels for {len(flat)} points in points_input"
            )
        starts = [sum(len(g) for g in labels[:i]) for i in range(len(labels))]
        groups = [flat[s : s + len(g)] for s, g in zip(starts, labels, strict=True)]
    elif len(groups) == 1 and labels is None and obj_ids is not None and len(obj_ids) == len(groups[0]) > 1:
        groups = [[p] for p in groups[0]]
    if labels is None:
        labels = [[1] * len(g) for g in groups]
    if len(labels) == 1 and len(groups) > 1 and len(labels[0]) == sum(len(g) for g in groups):
        flat_labels = labels[0]
        starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
        labels = [flat_labels[s : s + len(g)] for s, g in zip(starts, groups, strict=True)]
    if [len(g) for g in labels] != [len(g) for g in groups]:
        raise bad_request(
            f"point_labels_input: labels {labels} do not match the points' grouping "
            f"({[len(g) for g in groups]} points per object)"
        )
    for group in groups:
        if len(group) > MAX_POINTS:
            raise bad_request(f"points_input: at most {MAX_POINTS} points per object")
    return groups, labels


def segmind_sam2_request(fields: Mapping[str, Any], query: Mapping[str, str]) -> JobRequest:
    """``/v1/sam-v2-video``: one object from the clicks, or every instance of the prompt."""
    if not _present(fields, "input_video"):
        raise bad_request("input_video: required (an http(s) URL, a data: URI, base64 content or a file upload)")
    text = read_text(fields, "prompt", required=False)
    objects: tuple[ObjectPrompt, ...] = ()
    if not text:  # coordinates count only without a prompt, as documented by the hosted service
        positive = [p for g in read_vectors(fields, "coordinates", 2) for p in g]
        negative = [p for g in read_vectors(fields, "remove_coordinates", 2) for p in g]
        if not positive:
            raise bad_request("prompt: give prompt or coordinates")
        if len(positive) + len(negative) > MAX_POINTS:
            raise bad_request(f"coordinates: at most {MAX_POINTS} points with remove_coordinates")
        clicks = tuple(positive + negative)
        objects = (ObjectPrompt(points=clicks, point_labels=(1,) * len(positive) + (0,) * len(negative)),)  # type: ignore[arg-type]
    overlay = read_bool(fields, "overlay_mask", True)
    return _video_request(
        fields,
        query,
        "input_video",
        text,
        objects,
        overlay,
        ("coordinates", "coordinates"),
        {"prompt": text, "overlay_mask": overlay},
    )
