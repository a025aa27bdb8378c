"""Wire protocol: ZeroMQ multipart messages between capture, tracker, gateway and robots.

Every message is a UTF-8 JSON header ``{"v": 3, "kind": ..., ...}``; kinds with pixels carry them
raw in the next part (C-contiguous uint8 RGB, H x W x 3), sent without a copy. On the results socket
(``result``, ``event``, ``status``) a topic part comes first (``streamer.topics``), so subscribers
choose by ZeroMQ prefix what they receive: results with or without pixels, of one stream or all. The
kinds and their fields are listed in ``docs/interfaces.md``.

Every decoder raises :class:`ProtocolError` (a ``ValueError``) and nothing else for anything
malformed: its message starts with the offending field's path (``result.objects[2].mask.size: ...``).
Unknown header fields are ignored, so a sender can add fields without a version bump; a change in
meaning bumps ``PROTOCOL_VERSION``. Every encoder checks its output with the decoder's own rules, so
what one process sends the other accepts.

Versions: 2 added the ``event`` kind, the answer's ``frame_index``, the heartbeat's ``instance`` and
per-stream counters, and bounds object ids to ``0 .. 2**31 - 1``. 3 puts a topic part before every
message on the results socket and forbids NUL in stream names (it ends a stream's topic). Senders write
3; readers take headers of 1 to 3 (the fields 2 added are optional), so a capture of a previous release
still feeds this tracker; results-socket messages must carry their topic.

Masks are COCO RLE of the whole frame, computed from and decoded into each mask's bounding box only
(``streamer.masks``): the cost is the box's, not the frame's.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from pycocotools import mask as coco_mask

from models import MAX_OBJ_ID, FrameResult, ObjectResult, Prompt
from streamer import topics
from streamer.masks import BoxMask, box_from_runs, box_runs

PROTOCOL_VERSION = 3
READ_VERSIONS = (1, 2, 3)
KINDS = ("frame", "source", "prompt", "answer", "result", "status", "event")
# What a tracker's heartbeat says it is doing: loading its model (no frames taken yet), or serving.
TRACKER_STATES = ("loading", "serving")
PROMPT_OPS = ("add_prompt", "remove_object", "remove_prompt", "reset_session")
# prompt_failed: an accepted prompt failed when applied (dropped, never retried); objects_reacquired: a
# restarted tracker re-applied a stream's prompts; objects_capped: objects left out of results (cap).
EVENT_TYPES = ("prompt_failed", "objects_reacquired", "objects_capped")

# A result header carries one COCO RLE per object. Measured: a smooth 1080p object is ~2.5 KB of RLE,
# a speckled one (0.1% flipped pixels) ~13 KB, so MAX_OBJECTS of those is ~3.3 MB; 8 MiB leaves
# headroom for 4K while bounding what one header may make a receiver parse (tens of ms at worst).
MAX_HEADER_BYTES = 8 * 1024 * 1024
# Prompts and answers are a few KB at most (64 points, 64 boxes, 200 characters of text); the control
# socket faces any client, so it gets a much tighter bound.
MAX_CONTROL_HEADER_BYTES = 64 * 1024
MAX_PIXELS = 4096 * 4096  # per frame: 48 MiB of RGB
MAX_OBJECTS = 256  # per result and per answer's obj_ids
# Decoded masks cost one byte per pixel each; bound their sum so a tiny header cannot demand gigabytes.
MAX_MASK_PIXELS_TOTAL = 1 << 30
MAX_NAME_CHARS = 256  # stream, tracker and request ids, labels
MAX_ERROR_CHARS = 4096
MAX_INT = 2**63 - 1  # every JSON integer must fit int64 (numpy, C callers)
_RLE_MAX_GROUP = 6  # pycocotools decodes at most 6 chars per count safely (30 bits + sign)
# Messages too big or too deeply nested to parse are scanned for their id up to this many characters.
MAX_PEEK_CHARS = 1 << 20


class ProtocolError(ValueError):
    """A message that does not follow the wire protocol; the message names the field and the problem."""


# --------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class FrameHeader:
    """Stamp of one captured frame: which stream, its sequence number and capture time (unix seconds)."""

    stream: str
    seq: int
    t_capture: float
    width: int
    height: int


@dataclass
class PromptRequest:
    """A control request to the tracker: ``add_prompt`` (with ``prompt``), ``remove_object`` (with
    ``obj_id``), ``remove_prompt`` (drop a text concept and its objects: with ``text``) or
    ``reset_session``, for one stream. ``request_id`` must be unique per request
    (see :func:`new_request_id`): the tracker uses it to recognize a lazy-pirate retry."""

    request_id: str
    stream: str
    op: str
    prompt: Prompt | None = None
    obj_id: int | None = None
    text: str | None = None


@dataclass
class PromptAnswer:
    """The tracker's answer to one :class:`PromptRequest`: accepted (``ok``: validated and queued, with
    the object ids the prompt creates or refines and ``frame_index``, the stream's frame it applies
    before) or rejected with ``error`` naming the field and the problem. ``request_id`` is ``""`` when
    the request was too malformed to carry one.

    A prompt that named the frame it was drawn on (its ``seq``) echoes it in ``requested``; ``placed_on``
    is the seq of the past frame its clicks or box went on (the newest frame tracked at or before
    ``requested``, or the oldest of the tracker's prompt ring when that is older), ``None`` when it goes on
    the next frame tracked."""

    request_id: str
    ok: bool
    error: str | None = None
    obj_ids: list[int] = field(default_factory=list)
    frame_index: int | None = None
    placed_on: int | None = None
    requested: int | None = None


@dataclass
class WireObject:
    """One tracked object as it travels: pixel ``bbox`` ``(x0, y0, x1, y1)`` (exclusive right/bottom
    edges), a boolean ``H x W`` ``mask``, or the mask by its bounding box (``BoxMask``: what
    ``decode_result(..., box_masks=True)`` gives), or ``None`` when the sender left masks out."""

    obj_id: int
    score: float
    bbox: tuple[int, int, int, int]
    mask: np.ndarray | BoxMask | None
    label: str | None = None


@dataclass
class ResultMessage:
    """Everything the tracker found on one frame. ``timestamps`` (unix seconds) hold ``received``,
    ``tracked`` and ``published``; ``timings`` the tracker's stage durations (seconds)."""

    stream: str
    seq: int
    frame_index: int
    t_capture: float
    width: int
    height: int
    timestamps: dict[str, float]
    timings: dict[str, float]
    objects: list[WireObject]


@dataclass(frozen=True)
class SourceStatus:
    """A capture's word on its source, on the frames socket beside the frames: ``source`` describes it
    (``camera 0``, a file's name), ``error`` says why it delivers no frames (``None``: it delivers), ``fps``
    is its rate when known."""

    stream: str
    t: float
    source: str
    error: str | None = None
    fps: float | None = None


@dataclass
class StatusMessage:
    """The tracker's heartbeat: its name, the time (unix seconds), ``instance`` (new at every start of
    the process: a change means the tracker restarted), ``state`` (``TRACKER_STATES``: loading its model,
    or serving), ``model`` (what it loaded or loads) and per stream the fields of ``STREAM_STATUS_FIELDS``
    (``null`` until known)."""

    tracker: str
    t: float
    streams: dict[str, dict]
    instance: str = ""
    state: str = "serving"
    model: str = ""


@dataclass
class EventMessage:
    """Something on one stream that viewers should hear of, once (see ``EVENT_TYPES``): ``message`` says
    it in words; ``request_id`` / ``op`` name the prompt it concerns, ``obj_ids`` / ``texts`` the objects
    and concepts; ``frame_index`` the frame it happened on."""

    stream: str
    event: str
    message: str
    t: float
    request_id: str | None = None
    op: str | None = None
    obj_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    frame_index: int | None = None


def new_request_id() -> str:
    """A fresh, globally unique request id."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------------
# Field checks (shared by every decoder, and by every encoder on its own output)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: object) -> str:
    """``repr`` cut short: error messages quote values from untrusted headers."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_str(path: str, value: object, *, max_chars: int = MAX_NAME_CHARS, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{path}: expected a string, got {_type_name(value)}")
    if not value and not empty_ok:
        raise ProtocolError(f"{path}: must not be empty")
    if len(value) > max_chars:
        raise ProtocolError(f"{path}: longer than {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes would break every later encode
        raise ProtocolError(f"{path}: not valid Unicode text") from None
    return value


def _check_stream(path: str, value: object) -> str:
    """A stream name: text without NUL (which ends the stream's topic on the results socket)."""
    name = _check_str(path, value)
    if "\0" in name:
        raise ProtocolError(f"{path}: must not contain NUL characters")
    return name


def _check_int(path: str, value: object, *, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{path}: expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        bound = f">= {lo}" if hi == MAX_INT else f"between {lo} and {hi}"
        raise ProtocolError(f"{path}: must be {bound}, got {value}")
    return value


def _check_number(path: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{path}: expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise ProtocolError(f"{path}: must be a finite number, got {value}")
    return float(value)


def _check_object(path: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object, got {_type_name(value)}")
    return value


def _check_list(path: str, value: object, *, max_items: int) -> list:
    if not isinstance(value, list):
        raise ProtocolError(f"{path}: expected a list, got {_type_name(value)}")
    if len(value) > max_items:
        raise ProtocolError(f"{path}: more than {max_items} entries")
    return value


def _check_number_map(path: str, value: object) -> dict[str, float]:
    return {key: _check_number(f"{path}.{key}", v) for key, v in _check_object(path, value).items()}


def _check_size(path: str, width: object, height: object) -> tuple[int, int]:
    w = _check_int(f"{path}.width", width, lo=1, hi=MAX_PIXELS)
    h = _check_int(f"{path}.height", height, lo=1, hi=MAX_PIXELS)
    if w * h > MAX_PIXELS:
        raise ProtocolError(f"{path}: {w}x{h} is more than MAX_PIXELS ({MAX_PIXELS}) pixels")
    return w, h


class _Header:
    """A decoded header dict plus its kind, with field readers that name ``kind.field`` in errors."""

    def __init__(self, kind: str, data: dict) -> None:
        self.kind = kind
        self.data = data

    def path(self, name: str) -> str:
        return f"{self.kind}.{name}"

    def get(self, name: str, optional: bool = False) -> Any:
        if name not in self.data:
            if optional:
                return None
            raise ProtocolError(f"{self.path(name)}: missing")
        return self.data[name]

    def text(self, name: str, **kw: Any) -> str:
        return _check_str(self.path(name), self.get(name), **kw)

    def stream(self) -> str:
        return _check_stream(self.path("stream"), self.get("stream"))

    def integer(self, name: str, **kw: Any) -> int:
        return _check_int(self.path(name), self.get(name), **kw)

    def number(self, name: str) -> float:
        return _check_number(self.path(name), self.get(name))


# --------------------------------------------------------------------------------------------------
# Parts and headers


def _as_bytes_view(part: object, path: str) -> memoryview:
    """A flat byte view of one message part (bytes, bytearray, memoryview, numpy array or zmq.Frame)."""
    if isinstance(part, zmq.Frame):
        part = part.buffer
    try:
        view = memoryview(part)  # type: ignore[arg-type]
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except (TypeError, ValueError):
        raise ProtocolError(f"{path}: expected a bytes-like part, got {_type_name(part)}") from None
    return view


def _parts_list(parts: object) -> list:
    if isinstance(parts, (str, bytes, bytearray, memoryview)) or not isinstance(parts, Sequence):
        raise ProtocolError(f"message: expected a list of parts, got {_type_name(parts)}")
    if not parts:
        raise ProtocolError("message: no parts")
    return list(parts)


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"header: {name} is not a valid number")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ProtocolError(f"header: number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_INT:
        raise ProtocolError(f"header: integer {text[:40]}... does not fit 64 bits")
    return value


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("header: not JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ProtocolError(f"header: not JSON ({str(exc)[:200]})") from None


def _load_header(part: object, limit: int) -> dict:
    view = _as_bytes_view(part, "header")
    if view.nbytes > limit:
        raise ProtocolError(f"header: {view.nbytes} bytes is more than the {limit}-byte limit")
    try:
        text = bytes(view).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"header: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    data = _load_json(text)
    if not isinstance(data, dict):
        raise ProtocolError(f"header: expected a JSON object, got {_type_name(data)}")
    version = data.get("v")
    if type(version) is not int or version not in READ_VERSIONS:  # neither true nor 1.0
        raise ProtocolError(
            f"header.v: unsupported protocol version {_short(version)} "
            f"(this side writes {PROTOCOL_VERSION}, reads {', '.join(map(str, READ_VERSIONS))})"
        )
    kind = data.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"header.kind: unknown kind {_short(kind)} (known: {', '.join(KINDS)})")
    return data


def _header_of(part: object, kind: str, limit: int = MAX_HEADER_BYTES) -> _Header:
    """Parse and version-check a header and check it is of ``kind``."""
    data = _load_header(part, limit)
    if data["kind"] != kind:
        raise ProtocolError(f"header.kind: expected {kind!r}, got {data['kind']!r}")
    return _Header(kind, data)


def _open(
    parts: object, kind: str, part_counts: tuple[int, ...], limit: int = MAX_HEADER_BYTES
) -> tuple[_Header, list]:
    """The checked header of a message of ``kind`` and its parts, checking the part count too."""
    parts = _parts_list(parts)
    header = _header_of(parts[0], kind, limit)
    if len(parts) not in part_counts:
        expected = " or ".join(str(n) for n in part_counts)
        raise ProtocolError(f"{kind}: expected {expected} message parts, got {len(parts)}")
    return header, parts


def _topic(parts: list) -> tuple[bytes, str | None]:
    """``(prefix, stream)`` of a results-socket message's topic part (``streamer.topics``)."""
    view = _as_bytes_view(parts[0], "topic")
    if view.nbytes > topics.MAX_TOPIC_BYTES:
        raise ProtocolError(f"topic: {view.nbytes} bytes, more than {topics.MAX_TOPIC_BYTES}")
    try:
        return topics.parse_topic(bytes(view))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


# The topic prefix each kind of the results socket is published under (results: without and with pixels).
_KIND_TOPICS = {"status": (topics.STATUS,), "event": (topics.EVENT,), "result": (topics.RESULT, topics.RESULT_FRAME)}


def _open_published(parts: object, kind: str, part_counts: tuple[int, ...]) -> tuple[_Header, list, bytes]:
    """:func:`_open` for a results-socket message: its topic part, then the message; the topic must
    match the header's kind and stream. Returns the header, the parts after the topic, the topic prefix."""
    parts = _parts_list(parts)
    prefix, stream = _topic(parts)
    if len(parts) < 2:
        raise ProtocolError(f"{kind}: a topic part and no message after it")
    header, rest = _open(parts[1:], kind, part_counts)
    if prefix not in _KIND_TOPICS[kind]:
        raise ProtocolError(f"topic: {prefix.decode()!r} does not carry {kind} messages")
    if stream is not None and header.stream() != stream:
        raise ProtocolError(f"topic: names stream {stream!r}, the header {header.get('stream')!r}")
    return header, rest, prefix


def _numpy_scalar(value: object) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{_type_name(value)} is not JSON serializable")


def _dump_header(kind: str, fields: dict, limit: int = MAX_HEADER_BYTES) -> bytes:
    try:
        text = json.dumps(
            {"v": PROTOCOL_VERSION, "kind": kind, **fields},
            allow_nan=False,
            separators=(",", ":"),
            default=_numpy_scalar,
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: cannot encode header ({exc})") from None
    data = text.encode("utf-8")
    if len(data) > limit:
        raise ProtocolError(f"{kind}: header of {len(data)} bytes is more than the {limit}-byte limit")
    return data


def peek_kind(parts: Sequence) -> str:
    """The kind of a results-socket message (``result``, ``event`` or ``status``), its topic part checked
    against its header's kind."""
    parts = _parts_list(parts)
    prefix, _ = _topic(parts)
    if len(parts) < 2:
        raise ProtocolError("message: a topic part and no message after it")
    kind = _load_header(parts[1], MAX_HEADER_BYTES)["kind"]
    if prefix not in _KIND_TOPICS.get(kind, ()):
        raise ProtocolError(f"topic: {prefix.decode()!r} does not carry {kind} messages")
    return kind


def peek_request_id(parts: Sequence) -> str | None:
    """The ``request_id`` of a (possibly malformed, oversized or too deeply nested) prompt request, or
    ``None``; never raises."""
    try:
        data = _load_header(_parts_list(parts)[0], MAX_CONTROL_HEADER_BYTES)
        return _check_str("prompt.request_id", data.get("request_id"))
    except ProtocolError:
        pass
    try:
        view = _as_bytes_view(_parts_list(parts)[0], "header")
        text = bytes(view[:MAX_PEEK_CHARS]).decode("utf-8", errors="replace")
        return _check_str("prompt.request_id", peek_json_field(text, "request_id"))
    except ProtocolError:
        return None


def peek_json_field(text: str, key: str) -> str | int | None:
    """The value of ``key`` at the top level of a JSON object, when it is a string or an integer, read
    without parsing the rest (which may be too large or nested too deeply to parse); ``None`` if absent.

    Brackets inside strings are not counted; the last top-level occurrence wins, as with ``json.loads``.
    Never raises; linear in ``len(text)`` (cut at ``MAX_PEEK_CHARS``).
    """
    text = text[:MAX_PEEK_CHARS]
    if not text.lstrip().startswith("{"):
        return None
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    # A quote is escaped when an odd run of backslashes precedes it; unescaped quotes toggle "in a string".
    backslash = codes == 0x5C
    count = np.cumsum(backslash)
    run = count - np.maximum.accumulate(np.where(backslash, 0, count))
    quote = (codes == 0x22) & (np.concatenate(([0], run[:-1])) % 2 == 0)
    parity = np.cumsum(quote) % 2
    outside = (parity == 0) & ~quote
    opens = (codes == 0x5B) | (codes == 0x7B)
    closes = (codes == 0x5D) | (codes == 0x7D)
    depth_after = np.cumsum((opens.astype(np.int32) - closes) * outside)
    value: str | int | None = None
    for match in re.finditer(rf'"{re.escape(key)}"\s*:\s*', text):
        at = match.start()
        if at == 0 or not (quote[at] and parity[at] == 1) or depth_after[at - 1] != 1:
            continue  # not a key of the top-level object
        if match.end() < len(text) and text[match.end()] in '"-0123456789':
            try:
                found, _ = json.JSONDecoder().raw_decode(text, match.end())
            except ValueError:
                continue
            if isinstance(found, (str, int)) and not isinstance(found, bool):
                value = found
    return value


# --------------------------------------------------------------------------------------------------
# Pixels


def _pixels_part(path: str, pixels: object, width: int, height: int) -> np.ndarray:
    """The C-contiguous H x W x 3 uint8 array to send; a copy only when the input is not contiguous."""
    if not isinstance(pixels, np.ndarray):
        raise ProtocolError(f"{path}: expected a numpy array, got {_type_name(pixels)}")
    if pixels.dtype != np.uint8 or pixels.shape != (height, width, 3):
        raise ProtocolError(
            f"{path}: expected uint8 of shape ({height}, {width}, 3) as the header says, "
            f"got {pixels.dtype} {pixels.shape}"
        )
    return np.ascontiguousarray(pixels)


def _pixels_view(path: str, part: object, width: int, height: int) -> np.ndarray:
    view = _as_bytes_view(part, path)
    expected = width * height * 3
    if view.nbytes != expected:
        raise ProtocolError(f"{path}: {view.nbytes} bytes, but {width}x{height}x3 needs {expected}")
    return np.frombuffer(view, dtype=np.uint8).reshape(height, width, 3)


# --------------------------------------------------------------------------------------------------
# frame


def _read_frame_header(h: _Header) -> FrameHeader:
    width, height = _check_size(h.kind, h.get("width"), h.get("height"))
    return FrameHeader(
        stream=h.stream(), seq=h.integer("seq"), t_capture=h.number("t_capture"), width=width, height=height
    )


def encode_frame(header: FrameHeader, pixels: np.ndarray) -> list:
    """``[header bytes, pixels]`` for ``send_multipart(..., copy=False)``.

    A C-contiguous ``pixels`` is sent as it is (no copy), so do not write into it until the send is
    done: hand each frame a fresh array. A non-contiguous one is copied once.
    """
    data = _dump_header(
        "frame",
        {
            "stream": header.stream,
            "seq": header.seq,
            "t_capture": header.t_capture,
            "width": header.width,
            "height": header.height,
        },
    )
    checked = _read_frame_header(_header_of(data, "frame"))
    return [data, _pixels_part("frame.pixels", pixels, checked.width, checked.height)]


def decode_frame(parts: Sequence) -> tuple[FrameHeader, np.ndarray]:
    """The header and an H x W x 3 uint8 view of the pixels (no copy: treat it as read-only)."""
    h, parts = _open(parts, "frame", (2,))
    header = _read_frame_header(h)
    return header, _pixels_view("frame.pixels", parts[1], header.width, header.height)


def peek_frames_kind(parts: Sequence) -> str:
    """The kind of a frames-socket message: ``frame`` or ``source``."""
    kind = _load_header(_parts_list(parts)[0], MAX_HEADER_BYTES)["kind"]
    if kind not in ("frame", "source"):
        raise ProtocolError(f"header.kind: a frames socket carries frame and source messages, got {kind!r}")
    return kind


def encode_source(status: SourceStatus) -> list[bytes]:
    """``[header]``: a capture's word on its source (see :class:`SourceStatus`)."""
    fields = {"stream": status.stream, "t": status.t, "source": status.source, "error": status.error, "fps": status.fps}
    parts = [_dump_header("source", fields)]
    decode_source(parts)
    return parts


def decode_source(parts: Sequence) -> SourceStatus:
    """Parse a capture's :class:`SourceStatus`."""
    h, _ = _open(parts, "source", (1,))
    error, fps = h.get("error", optional=True), h.get("fps", optional=True)
    return SourceStatus(
        stream=h.stream(),
        t=h.number("t"),
        source=h.text("source", empty_ok=True),
        error=None if error is None else _check_str(h.path("error"), error, max_chars=MAX_ERROR_CHARS),
        fps=None if fps is None else _check_number(h.path("fps"), fps),
    )


# --------------------------------------------------------------------------------------------------
# prompt / answer


def _read_prompt_request(h: _Header) -> PromptRequest:
    request_id = h.text("request_id")
    stream = h.stream()
    op = h.get("op")
    if op not in PROMPT_OPS:
        raise ProtocolError(f"{h.path('op')}: unknown op {_short(op)} (known: {', '.join(PROMPT_OPS)})")
    prompt_fields, obj_id = h.get("prompt", optional=True), h.get("obj_id", optional=True)
    text = h.get("text", optional=True)
    if op != "add_prompt" and prompt_fields is not None:
        raise ProtocolError(f"{h.path('prompt')}: only add_prompt takes a prompt")
    if op != "remove_object" and obj_id is not None:
        raise ProtocolError(
            f"{h.path('obj_id')}: only remove_object takes a top-level obj_id "
            "(to refine an object, put obj_id inside prompt)"
        )
    if op != "remove_prompt" and text is not None:
        raise ProtocolError(
            f"{h.path('text')}: only remove_prompt takes a top-level text "
            "(to add a text prompt, put text inside prompt)"
        )
    prompt = None
    if op == "add_prompt":
        if prompt_fields is None:
            raise ProtocolError(f"{h.path('prompt')}: missing (add_prompt needs the prompt fields)")
        try:
            prompt = Prompt.from_dict(_check_object(h.path("prompt"), prompt_fields))
        except ProtocolError:
            raise
        except ValueError as exc:  # Prompt names the field; keep its message as it is
            raise ProtocolError(str(exc)) from None
        except (TypeError, ArithmeticError) as exc:  # not expected from from_dict; never let it escape
            raise ProtocolError(f"prompt: invalid ({exc})") from None
    if op == "remove_object":
        obj_id = _check_int(h.path("obj_id"), h.get("obj_id"), hi=MAX_OBJ_ID)
    if op == "remove_prompt":
        text = h.text("text")  # the tracker says whether such a concept is active
    return PromptRequest(request_id=request_id, stream=stream, op=op, prompt=prompt, obj_id=obj_id, text=text)


def encode_prompt_request(req: PromptRequest) -> list[bytes]:
    """One-part control message for the tracker's ROUTER socket."""
    fields: dict[str, Any] = {"request_id": req.request_id, "stream": req.stream, "op": req.op}
    if req.prompt is not None:
        if not isinstance(req.prompt, Prompt):
            raise ProtocolError(f"prompt.prompt: expected a models.Prompt, got {_type_name(req.prompt)}")
        fields["prompt"] = req.prompt.to_dict()
    if req.obj_id is not None:
        fields["obj_id"] = req.obj_id
    if req.text is not None:
        fields["text"] = req.text
    data = _dump_header("prompt", fields, MAX_CONTROL_HEADER_BYTES)
    decode_prompt_request([data])
    return [data]


def decode_prompt_request(parts: Sequence) -> PromptRequest:
    """Parse a control request; prompt problems raise :class:`ProtocolError` with Prompt's own message."""
    h, _ = _open(parts, "prompt", (1,), MAX_CONTROL_HEADER_BYTES)
    return _read_prompt_request(h)


def _read_answer(h: _Header) -> PromptAnswer:
    ok = h.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError(f"{h.path('ok')}: expected true or false, got {_type_name(ok)}")
    error = h.get("error", optional=True)
    if error is not None:
        error = _check_str(h.path("error"), error, max_chars=MAX_ERROR_CHARS)
    elif not ok:
        raise ProtocolError(f"{h.path('error')}: a rejected answer needs a reason")
    frames = {name: h.get(name, optional=True) for name in ("frame_index", "placed_on", "requested")}
    frames = {name: None if v is None else _check_int(h.path(name), v) for name, v in frames.items()}
    return PromptAnswer(
        request_id=h.text("request_id", empty_ok=True),
        ok=ok,
        error=error,
        obj_ids=_read_obj_ids(h.path("obj_ids"), h.get("obj_ids", optional=True)),
        **frames,
    )


def _read_obj_ids(path: str, value: object) -> list[int]:
    ids = _check_list(path, value or [], max_items=MAX_OBJECTS)
    return [_check_int(f"{path}[{i}]", v, hi=MAX_OBJ_ID) for i, v in enumerate(ids)]


def encode_answer(a: PromptAnswer) -> list[bytes]:
    """One-part answer for the client's REQ socket."""
    data = _dump_header(
        "answer",
        {
            "request_id": a.request_id,
            "ok": a.ok,
            "error": a.error,
            "obj_ids": list(a.obj_ids),
            "frame_index": a.frame_index,
            "placed_on": a.placed_on,
            "requested": a.requested,
        },
        MAX_CONTROL_HEADER_BYTES,
    )
    decode_answer([data])
    return [data]


def decode_answer(parts: Sequence) -> PromptAnswer:
    """Parse the tracker's answer to a prompt request."""
    h, _ = _open(parts, "answer", (1,), MAX_CONTROL_HEADER_BYTES)
    return _read_answer(h)


# --------------------------------------------------------------------------------------------------
# Masks: COCO run-length encoding


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO RLE ``{"size": [h, w], "counts": str}`` of a boolean (or 0/1 uint8) ``H x W`` mask.

    The same string pycocotools' ``encode`` gives, computed from the mask's bounding box only.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8) or mask.size == 0:
        shape = getattr(mask, "shape", None)
        raise ProtocolError(f"mask: expected a non-empty 2-D bool array, got {_type_name(mask)} {shape}")
    height, width = mask.shape
    return box_to_rle(BoxMask.from_full(mask if mask.dtype == np.bool_ else mask != 0), height, width)


def box_to_rle(region: BoxMask | None, height: int, width: int) -> dict:
    """COCO RLE of the ``height x width`` mask that is ``region`` (``None``: empty) in a frame of background.

    About 0.1 ms for an object at 1080p where pycocotools' ``encode`` of the whole frame takes 3 ms.
    """
    try:
        runs = box_runs(region, height, width) if region is not None else np.array([height * width])
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _rle_counts(path: str, counts: str, pixels: int) -> np.ndarray:
    """Parse pycocotools' compressed counts string and check it describes exactly ``pixels`` pixels.

    pycocotools trusts its input (a truncated string makes it read past the end, a short one leaves its
    mask uninitialized), so this reads the same format strictly: characters '0'..'o', at most
    ``_RLE_MAX_GROUP`` per count, no negative run, runs summing to exactly ``pixels``.
    """
    try:
        raw = np.frombuffer(counts.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raise ProtocolError(f"{path}: not an RLE string (non-ASCII characters)") from None
    if raw.size == 0:
        raise ProtocolError(f"{path}: empty")
    if raw.min() < 48 or raw.max() > 111:
        raise ProtocolError(f"{path}: not an RLE string (characters outside '0'..'o')")
    chars = raw.astype(np.int64) - 48
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ProtocolError(f"{path}: truncated (last count unfinished)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _RLE_MAX_GROUP:
        raise ProtocolError(f"{path}: a count longer than {_RLE_MAX_GROUP} characters")
    # Each count is little-endian 5-bit groups; bit 0x10 of its last char is the sign.
    shifts = 5 * (np.arange(raw.size) - np.repeat(starts, lengths))
    values = np.bitwise_or.reduceat((chars & 0x1F) << shifts, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    # From the fourth count on, each is stored as the difference to the count two before it.
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    if values.min() < 0:
        raise ProtocolError(f"{path}: negative run length")
    if int(values.sum()) != pixels:
        raise ProtocolError(f"{path}: runs cover {int(values.sum())} pixels, but size says {pixels}")
    return values


def rle_to_mask(rle: dict, expected_shape: tuple[int, int] | None = None, *, path: str = "mask") -> np.ndarray:
    """Boolean C-ordered ``H x W`` mask from a COCO RLE dict (pixel for pixel what pycocotools decodes).

    The runs are expanded with numpy from the counts :func:`_rle_counts` has already validated: that is
    faster than a second parse by pycocotools, whose ``decode`` also warns under numpy 2.
    """
    rle = _check_object(path, rle)
    height, width = _check_rle_size(path, rle, expected_shape)
    counts = _check_str(f"{path}.counts", rle.get("counts"), max_chars=MAX_HEADER_BYTES)
    runs = _rle_counts(f"{path}.counts", counts, height * width)
    values = np.arange(runs.size) % 2 == 1  # runs alternate background, foreground, ...
    column_major = np.repeat(values, runs).reshape(width, height)
    return np.ascontiguousarray(column_major.T)


def rle_to_box(rle: dict, expected_shape: tuple[int, int] | None = None, *, path: str = "mask") -> BoxMask:
    """The mask of a COCO RLE dict by its tight bounding box (an empty box for an empty mask): the work is
    the box's, however large the frame. Validated as :func:`rle_to_mask` validates."""
    rle = _check_object(path, rle)
    height, width = _check_rle_size(path, rle, expected_shape)
    counts = _check_str(f"{path}.counts", rle.get("counts"), max_chars=MAX_HEADER_BYTES)
    region = box_from_runs(_rle_counts(f"{path}.counts", counts, height * width), height, width)
    return region if region is not None else BoxMask(0, 0, np.zeros((0, 0), dtype=bool))


def _check_rle_size(path: str, rle: dict, expected_shape: tuple[int, int] | None) -> tuple[int, int]:
    size = rle.get("size")
    if not isinstance(size, list) or len(size) != 2:
        raise ProtocolError(f"{path}.size: expected [height, width], got {_type_name(size)}")
    width, height = _check_size(f"{path}.size", size[1], size[0])
    if expected_shape is not None and (height, width) != tuple(expected_shape):
        raise ProtocolError(
            f"{path}.size: [{height}, {width}] does not match the frame's [{expected_shape[0]}, {expected_shape[1]}]"
        )
    return height, width


# --------------------------------------------------------------------------------------------------
# result


def _read_object(path: str, value: object, width: int, height: int, masks: str) -> WireObject:
    obj = _check_object(path, value)
    bbox = obj.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ProtocolError(f"{path}.bbox: expected [x0, y0, x1, y1], got {_type_name(bbox)}")
    x0, y0 = _check_int(f"{path}.bbox[0]", bbox[0], hi=width), _check_int(f"{path}.bbox[1]", bbox[1], hi=height)
    x1 = _check_int(f"{path}.bbox[2]", bbox[2], lo=x0, hi=width)
    y1 = _check_int(f"{path}.bbox[3]", bbox[3], lo=y0, hi=height)
    label = obj.get("label")
    mask = obj.get("mask")
    if mask is not None:
        if masks == "full":
            mask = rle_to_mask(mask, (height, width), path=f"{path}.mask")
        elif masks == "box":
            mask = rle_to_box(mask, (height, width), path=f"{path}.mask")
        else:
            _check_rle_size(f"{path}.mask", _check_object(f"{path}.mask", mask), (height, width))
    return WireObject(
        obj_id=_check_int(f"{path}.obj_id", obj.get("obj_id"), hi=MAX_OBJ_ID),
        score=_check_number(f"{path}.score", obj.get("score")),
        bbox=(x0, y0, x1, y1),
        mask=mask,
        label=None if label is None else _check_str(f"{path}.label", label),
    )


def _read_result(h: _Header, masks: str) -> ResultMessage:
    """The result of header ``h``; ``masks``: ``"full"`` (H x W arrays), ``"box"`` (``BoxMask``) or
    ``"check"`` (RLE dicts left as they are, their size checked)."""
    width, height = _check_size(h.kind, h.get("width"), h.get("height"))
    objects = _check_list(h.path("objects"), h.get("objects"), max_items=MAX_OBJECTS)
    with_masks = sum(1 for o in objects if isinstance(o, dict) and o.get("mask") is not None)
    if with_masks * width * height > MAX_MASK_PIXELS_TOTAL:
        raise ProtocolError(
            f"{h.path('objects')}: {with_masks} masks of {width}x{height} exceed "
            f"MAX_MASK_PIXELS_TOTAL ({MAX_MASK_PIXELS_TOTAL})"
        )
    return ResultMessage(
        stream=h.stream(),
        seq=h.integer("seq"),
        frame_index=h.integer("frame_index"),
        t_capture=h.number("t_capture"),
        width=width,
        height=height,
        timestamps=_check_number_map(h.path("timestamps"), h.get("timestamps")),
        timings=_check_number_map(h.path("timings"), h.get("timings")),
        objects=[_read_object(f"{h.path('objects')}[{i}]", o, width, height, masks) for i, o in enumerate(objects)],
    )


def encode_result(msg: ResultMessage, frame: np.ndarray | None, *, stamp_published: bool = False) -> list:
    """``[topic, header]`` or ``[topic, header, frame]``: masks as COCO RLE in the header, the frame raw
    (no copy); the topic says which (``streamer.topics``). With ``stamp_published``, the ``published``
    timestamp is taken once the masks are encoded, so that it counts their encoding.
    :func:`without_frame` makes the message for subscribers that take no pixels, sharing the header."""
    objects = [
        object_to_json(obj, msg.width, msg.height, path=f"result.objects[{i}]") for i, obj in enumerate(msg.objects)
    ]
    if stamp_published:
        msg.timestamps["published"] = time.time()
    data = _dump_header(
        "result",
        {
            "stream": msg.stream,
            "seq": msg.seq,
            "frame_index": msg.frame_index,
            "t_capture": msg.t_capture,
            "width": msg.width,
            "height": msg.height,
            "timestamps": msg.timestamps,
            "timings": msg.timings,
            "objects": objects,
        },
    )
    checked = _read_result(_header_of(data, "result"), masks="check")  # our own RLE is valid
    if frame is None:
        return [topics.stream_topic(topics.RESULT, checked.stream), data]
    pixels = _pixels_part("result.frame", frame, checked.width, checked.height)
    return [topics.stream_topic(topics.RESULT_FRAME, checked.stream), data, pixels]


def without_frame(parts: list) -> list:
    """The message of :func:`encode_result` ``parts`` (with its frame) for subscribers that take no
    pixels: the same header under the stream's ``result/`` topic."""
    topic = bytes(parts[0])
    if not topic.startswith(topics.RESULT_FRAME):
        raise ProtocolError(f"topic: {topic[:40]!r} is not a result with its frame")
    return [topics.RESULT + topic[len(topics.RESULT_FRAME) :], parts[1]]


def object_to_json(obj: WireObject | ObjectResult, width: int, height: int, path: str = "object") -> dict:
    """An object as the wire (and the masks JSON files) carry it: ``{"obj_id", "score", "bbox", "label",
    "mask"}`` with the mask as COCO RLE (``None`` when the object has none)."""
    mask = None
    if isinstance(obj.mask, BoxMask):
        mask = box_to_rle(obj.mask, height, width)
    elif obj.mask is not None:
        shape = getattr(obj.mask, "shape", None)
        if shape != (height, width):
            raise ProtocolError(f"{path}.mask: shape {shape} does not match the frame's ({height}, {width})")
        mask = mask_to_rle(obj.mask)
    bbox = list(obj.bbox) if isinstance(obj.bbox, (tuple, list, np.ndarray)) else obj.bbox
    return {"obj_id": obj.obj_id, "score": obj.score, "bbox": bbox, "label": obj.label, "mask": mask}


def decode_result(parts: Sequence, *, box_masks: bool = False) -> tuple[ResultMessage, np.ndarray | None]:
    """The result with boolean ``H x W`` masks (each a ``BoxMask``, by its bounding box, with ``box_masks``:
    far cheaper for large frames), and a view of the frame it was computed on (or ``None``)."""
    h, parts, prefix = _open_published(parts, "result", (1, 2))
    if (len(parts) == 2) != (prefix == topics.RESULT_FRAME):
        carries = "a header and a frame" if prefix == topics.RESULT_FRAME else "a header and no frame"
        raise ProtocolError(f"result: a {prefix.decode()!r} topic carries {carries}, got {len(parts)} parts")
    msg = _read_result(h, masks="box" if box_masks else "full")
    frame = _pixels_view("result.frame", parts[1], msg.width, msg.height) if len(parts) == 2 else None
    return msg, frame


def result_from_frame_result(
    stream: str, seq: int, t_capture: float, fr: FrameResult, timestamps: dict
) -> ResultMessage:
    """Wrap the tracker's :class:`models.FrameResult` for the wire (boxes clipped into the frame)."""

    def clip(v: int, hi: int) -> int:
        return min(max(int(v), 0), hi)

    objects = []
    for obj in fr.objects:
        x0, y0, x1, y1 = (int(v) for v in obj.bbox)
        x0, y0 = clip(x0, fr.width), clip(y0, fr.height)
        bbox = (x0, y0, max(clip(x1, fr.width), x0), max(clip(y1, fr.height), y0))
        objects.append(
            WireObject(obj_id=int(obj.obj_id), score=float(obj.score), bbox=bbox, mask=obj.mask, label=obj.label)
        )
    return ResultMessage(
        stream=stream,
        seq=seq,
        frame_index=fr.frame_index,
        t_capture=t_capture,
        width=fr.width,
        height=fr.height,
        timestamps=dict(timestamps),
        timings=dict(fr.timings),
        objects=objects,
    )


# --------------------------------------------------------------------------------------------------
# status


STREAM_STATUS_FIELDS = {
    "last_seq": _check_int,  # seq of the newest frame tracked
    "last_frame_t": _check_number,  # its t_capture
    "fps": _check_number,  # results per second, recently
    "frames_received": _check_int,  # frames that reached the tracker (tracked or skipped for a newer one)
    "last_received_t": _check_number,  # tracker's clock when the newest frame arrived
    "frames_tracked": _check_int,
    "frame_errors": _check_int,  # frames the model failed on (skipped)
    "prompts_queued": _check_int,  # accepted prompts not yet applied
    "prompts_applied": _check_int,  # accepted prompts applied, in all
    "prompts_failed": _check_int,  # accepted prompts that failed when applied, in all
    # Seconds the tracker listened without a frame of this stream arriving; time spent tracking does not
    # count (frames that arrive meanwhile wait in the socket), so a slow model never reads as no signal.
    "frames_silent_s": _check_number,
    "source_fps": _check_number,  # the camera's rate, from the frames' seq and capture times
    "source": lambda path, value: _check_str(path, value, empty_ok=True),  # the capture's description
    "source_error": lambda path, value: _check_str(path, value, max_chars=MAX_ERROR_CHARS),  # why no frames
}


def _read_status(h: _Header) -> StatusMessage:
    streams = {}
    for name, info in _check_object(h.path("streams"), h.get("streams")).items():
        path = f"{h.path('streams')}.{name}"
        _check_stream(path, name)
        info = _check_object(path, info)
        for key, check in STREAM_STATUS_FIELDS.items():
            if info.get(key) is not None:  # null until the stream's first frame
                check(f"{path}.{key}", info[key])
        streams[name] = info
    instance, state, model = (h.get(name, optional=True) for name in ("instance", "state", "model"))
    if state is not None and state not in TRACKER_STATES:
        raise ProtocolError(f"{h.path('state')}: unknown state {_short(state)} (known: {', '.join(TRACKER_STATES)})")
    return StatusMessage(
        tracker=h.text("tracker"),
        t=h.number("t"),
        streams=streams,
        instance="" if instance is None else _check_str(h.path("instance"), instance, empty_ok=True),
        state="serving" if state is None else state,  # a tracker that does not say heartbeats once it serves
        model="" if model is None else _check_str(h.path("model"), model, empty_ok=True),
    )


def encode_status(s: StatusMessage) -> list[bytes]:
    """``[topic, header]``: a heartbeat for the results socket."""
    fields = {"tracker": s.tracker, "t": s.t, "streams": s.streams, "instance": s.instance, "state": s.state}
    data = _dump_header("status", {**fields, "model": s.model})
    parts = [topics.STATUS, data]
    decode_status(parts)
    return parts


def decode_status(parts: Sequence) -> StatusMessage:
    """Parse a tracker heartbeat."""
    h, _, _ = _open_published(parts, "status", (1,))
    return _read_status(h)


# --------------------------------------------------------------------------------------------------
# event


def _read_event(h: _Header) -> EventMessage:
    event = h.get("event")
    if event not in EVENT_TYPES:
        raise ProtocolError(f"{h.path('event')}: unknown event {_short(event)} (known: {', '.join(EVENT_TYPES)})")
    request_id, op, frame_index = (h.get(name, optional=True) for name in ("request_id", "op", "frame_index"))
    if op is not None and op not in PROMPT_OPS:
        raise ProtocolError(f"{h.path('op')}: unknown op {_short(op)}")
    texts = _check_list(h.path("texts"), h.get("texts", optional=True) or [], max_items=MAX_OBJECTS)
    return EventMessage(
        stream=h.stream(),
        event=event,
        message=h.text("message", max_chars=MAX_ERROR_CHARS),
        t=h.number("t"),
        request_id=None if request_id is None else _check_str(h.path("request_id"), request_id),
        op=op,
        obj_ids=_read_obj_ids(h.path("obj_ids"), h.get("obj_ids", optional=True)),
        texts=[_check_str(f"{h.path('texts')}[{i}]", t, max_chars=MAX_ERROR_CHARS) for i, t in enumerate(texts)],
        frame_index=None if frame_index is None else _check_int(h.path("frame_index"), frame_index),
    )


def encode_event(e: EventMessage) -> list[bytes]:
    """``[topic, header]``: an event for the results socket."""
    data = _dump_header(
        "event",
        {
            "stream": e.stream,
            "event": e.event,
            "message": e.message,
            "t": e.t,
            "request_id": e.request_id,
            "op": e.op,
            "obj_ids": list(e.obj_ids),
            "texts": list(e.texts),
            "frame_index": e.frame_index,
        },
    )
    parts = [topics.stream_topic(topics.EVENT, _check_stream("event.stream", e.stream)), data]
    decode_event(parts)
    return parts


def decode_event(parts: Sequence) -> EventMessage:
    """Parse a tracker event."""
    h, _, _ = _open_published(parts, "event", (1,))
    return _read_event(h)
