"""Wire protocol: round trips of every kind, zero-copy pixels, RLE masks, and fuzzed decoders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from models import FrameResult, ObjectResult, Prompt
from streamer import protocol
from streamer.protocol import (
    FrameHeader,
    PromptAnswer,
    PromptRequest,
    ProtocolError,
    ResultMessage,
    StatusMessage,
    WireObject,
    decode_answer,
    decode_frame,
    decode_prompt_request,
    decode_result,
    decode_status,
    encode_answer,
    encode_frame,
    encode_prompt_request,
    encode_result,
    encode_status,
    mask_to_rle,
    peek_kind,
    peek_request_id,
    rle_to_mask,
    without_frame,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODERS = [decode_frame, decode_prompt_request, decode_answer, decode_result, decode_status, peek_kind]


def _pixels(h: int = 30, w: int = 41, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _blob(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 3) ** 2
    return mask ^ (rng.random((h, w)) < 0.02)  # speckle: many short runs


def _result(h: int = 30, w: int = 41) -> ResultMessage:
    objects = [
        WireObject(obj_id=1, score=0.75, bbox=(3, 4, 20, 25), mask=_blob(h, w), label="person"),
        WireObject(obj_id=7, score=0.5, bbox=(0, 0, 0, 0), mask=np.zeros((h, w), bool)),
        WireObject(obj_id=9, score=0.25, bbox=(0, 0, w, h), mask=None),
    ]
    return ResultMessage(
        stream="cam0",
        seq=12,
        frame_index=3,
        t_capture=1700000000.25,
        width=w,
        height=h,
        timestamps={"received": 1.0, "tracked": 2.0, "published": 3.0},
        timings={"encode": 0.01},
        objects=objects,
    )


def _valid_messages() -> dict[str, list]:
    """One encoded message of every kind (and both result shapes), as sent."""
    frame = _pixels()
    return {
        "frame": encode_frame(FrameHeader("cam0", 5, 1700000000.5, 41, 30), frame),
        "prompt": encode_prompt_request(
            PromptRequest(
                "r1", "cam0", "add_prompt", Prompt.from_dict({"points": [[3, 4]], "point_labels": [1], "obj_id": 2})
            )
        ),
        "remove": encode_prompt_request(PromptRequest("r2", "cam0", "remove_object", obj_id=2)),
        "answer": encode_answer(PromptAnswer("r1", True, obj_ids=[2])),
        "result": encode_result(_result(), frame),
        "result_no_frame": encode_result(_result(), None),
        "status": encode_status(
            StatusMessage("gpu0", 5.0, {"cam0": {"last_seq": 5, "last_frame_t": 4.5, "fps": 29.9}})
        ),
    }


def _decode_any(parts: list) -> None:
    """Every decoder on the message: each must return or raise ProtocolError, nothing else."""
    for decode in DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(parts)
    assert peek_request_id(parts) is None or isinstance(peek_request_id(parts), str)


# ------------------------------------------------------------------------------------------------
# Round trips


def test_frame_round_trip_and_zero_copy() -> None:
    pixels = _pixels()
    header = FrameHeader("cam0", 42, 1700000000.125, 41, 30)
    parts = encode_frame(header, pixels)
    assert np.shares_memory(np.asarray(parts[1]), pixels), "a contiguous frame must be sent without a copy"
    for carrier in (bytes, memoryview, zmq.Frame):
        got_header, got = decode_frame([carrier(parts[0]), carrier(np.asarray(parts[1]).tobytes())])
        assert got_header == header
        assert got.dtype == np.uint8 and got.shape == (30, 41, 3)
        np.testing.assert_array_equal(got, pixels)


def test_frame_decode_is_a_view_of_the_received_buffer() -> None:
    parts = encode_frame(FrameHeader("cam0", 0, 1.0, 41, 30), _pixels())
    buffer = bytearray(np.asarray(parts[1]).tobytes())
    _, got = decode_frame([parts[0], buffer])
    assert np.shares_memory(got, np.frombuffer(buffer, np.uint8))


def test_frame_non_contiguous_is_copied_once_and_equal() -> None:
    big = _pixels(60, 82)
    view = big[::2, ::2]
    parts = encode_frame(FrameHeader("cam0", 0, 1.0, 41, 30), view)
    assert parts[1].flags.c_contiguous
    np.testing.assert_array_equal(decode_frame(parts)[1], view)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((30, 41, 3), np.float32),
        np.zeros((30, 41), np.uint8),
        np.zeros((41, 30, 3), np.uint8),
        "pixels",
    ],
)
def test_encode_frame_rejects_pixels_that_disagree_with_the_header(pixels: object) -> None:
    with pytest.raises(ProtocolError, match="frame.pixels"):
        encode_frame(FrameHeader("cam0", 0, 1.0, 41, 30), pixels)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "header, field",
    [
        (FrameHeader("", 0, 1.0, 41, 30), "frame.stream"),
        (FrameHeader("cam0", -1, 1.0, 41, 30), "frame.seq"),
        (FrameHeader("cam0", 0, 1.0, 0, 30), "frame.width"),
        (FrameHeader("cam0", 0, 1.0, 41, -30), "frame.height"),
        (FrameHeader("cam0", 0, 1.0, 4097, 4097), "MAX_PIXELS"),
        (FrameHeader("cam0", 0, math.nan, 41, 30), "frame"),
    ],
)
def test_encode_frame_rejects_bad_headers(header: FrameHeader, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        encode_frame(header, _pixels())


def test_prompt_round_trips() -> None:
    requests = [
        PromptRequest("a", "cam0", "add_prompt", Prompt.from_dict({"text": "person"})),
        PromptRequest(
            "b",
            "cam0",
            "add_prompt",
            Prompt.from_dict({"bounding_boxes": [[0.5, 0.5, 0.2, 0.2]], "bounding_box_labels": [1], "frame_index": 4}),
        ),
        PromptRequest("c", "cam1", "remove_object", obj_id=3),
        PromptRequest("d", "cam1", "reset_session"),
        PromptRequest("e", "cam1", "remove_prompt", text="person"),
    ]
    for req in requests:
        assert decode_prompt_request(encode_prompt_request(req)) == req


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"op": "add_prompt"}, "prompt.prompt: missing"),
        ({"op": "add_prompt", "prompt": {"text": 3}}, "text: must be a string"),
        ({"op": "add_prompt", "prompt": {"points": [[1, 2]], "point_labels": [1], "colour": 1}}, "colour: unknown"),
        ({"op": "add_prompt", "prompt": {"point_labels": [10**30]}}, "integer"),
        ({"op": "add_prompt", "prompt": [1]}, "prompt.prompt: expected an object"),
        ({"op": "remove_object"}, "prompt.obj_id: missing"),
        ({"op": "remove_object", "obj_id": -2}, "prompt.obj_id: must be between 0 and 2147483647"),
        ({"op": "remove_object", "obj_id": 2**63 - 1}, "prompt.obj_id: must be between 0 and 2147483647"),
        ({"op": "remove_object", "obj_id": True}, "prompt.obj_id: expected an integer"),
        ({"op": "reset_session", "obj_id": 3}, "prompt.obj_id: only remove_object"),
        ({"op": "remove_prompt"}, "prompt.text: missing"),
        ({"op": "remove_prompt", "text": 3}, "prompt.text: expected a string"),
        ({"op": "remove_prompt", "text": ""}, "prompt.text: must not be empty"),
        ({"op": "add_prompt", "prompt": {"text": "cat"}, "text": "cat"}, "prompt.text: only remove_prompt"),
        ({"op": "explode"}, "prompt.op: unknown op"),
        ({"op": "reset_session", "request_id": 5}, "prompt.request_id: expected a string"),
        ({"op": "reset_session", "stream": None}, "prompt.stream"),
    ],
)
def test_bad_prompt_requests_name_the_field(fields: dict, message: str) -> None:
    header = {"v": 1, "kind": "prompt", "request_id": "r", "stream": "cam0", **fields}
    with pytest.raises(ProtocolError, match=message):
        decode_prompt_request([json.dumps(header).encode()])


def test_prompt_field_error_keeps_prompts_own_message() -> None:
    header = {
        "v": 1,
        "kind": "prompt",
        "request_id": "r",
        "stream": "s",
        "op": "add_prompt",
        "prompt": {"points": [[1, 2]], "point_labels": [5]},
    }
    with pytest.raises(ProtocolError) as info:
        decode_prompt_request([json.dumps(header).encode()])
    with pytest.raises(ValueError) as direct:
        Prompt.from_dict(header["prompt"])
    assert str(info.value) == str(direct.value)


def test_answer_round_trips() -> None:
    for answer in (
        PromptAnswer("r1", True, obj_ids=[0, 5]),
        PromptAnswer("r2", False, "text: too long"),
        PromptAnswer("", False, "header: not JSON"),
    ):
        assert decode_answer(encode_answer(answer)) == answer
    with pytest.raises(ProtocolError, match="answer.error: a rejected answer needs a reason"):
        encode_answer(PromptAnswer("r", False))


def test_result_round_trip_with_and_without_frame() -> None:
    msg, frame = _result(), _pixels()
    parts = encode_result(msg, frame)
    assert parts[0] == b"result+frame/cam0\0" and len(parts) == 3 and np.shares_memory(np.asarray(parts[2]), frame)
    got, got_frame = decode_result([zmq.Frame(bytes(p)) for p in parts])
    np.testing.assert_array_equal(got_frame, frame)
    fields = ("stream", "seq", "frame_index", "t_capture", "width", "height", "timestamps", "timings")
    assert [getattr(got, f) for f in fields] == [getattr(msg, f) for f in fields]
    for sent, received in zip(msg.objects, got.objects, strict=True):
        assert (received.obj_id, received.score, received.bbox, received.label) == (
            sent.obj_id,
            sent.score,
            sent.bbox,
            sent.label,
        )
        if sent.mask is None:
            assert received.mask is None
        else:
            assert received.mask.dtype == bool and received.mask.flags.c_contiguous
            np.testing.assert_array_equal(received.mask, sent.mask)
    for pixel_free in (encode_result(msg, None), without_frame(parts)):
        assert pixel_free[0] == b"result/cam0\0" and len(pixel_free) == 2
        got, got_frame = decode_result(pixel_free)
        assert got_frame is None and len(got.objects) == 3


def test_results_socket_topics_must_match_their_message() -> None:
    msg, frame = _result(), _pixels()
    topic, header, pixels = encode_result(msg, frame)
    with pytest.raises(ProtocolError, match="result: a 'result/' topic carries a header and no frame, got 2 parts"):
        decode_result([b"result/cam0\0", header, pixels])
    with pytest.raises(
        ProtocolError, match="result: a 'result\\+frame/' topic carries a header and a frame, got 1 parts"
    ):
        decode_result([topic, header])
    with pytest.raises(ProtocolError, match="topic: names stream 'cam1'"):
        decode_result([b"result+frame/cam1\0", header, pixels])
    with pytest.raises(ProtocolError, match="topic: 'status' does not carry result messages"):
        decode_result([b"status", header])
    with pytest.raises(ProtocolError, match="a tracker older than protocol 3"):
        decode_result([header])
    with pytest.raises(ProtocolError, match="topic: .* is not a results topic"):
        peek_kind([b"frames/cam0\0", header])
    with pytest.raises(ProtocolError, match="stream: must not contain NUL"):
        encode_result(dataclasses.replace(msg, stream="cam\0"), None)
    with pytest.raises(ProtocolError, match="is not a result with its frame"):
        without_frame(encode_result(msg, None))
    with pytest.raises(ProtocolError, match="topic: the stream name is not UTF-8"):
        decode_result([b"result/\xff\0", header])
    with pytest.raises(ProtocolError, match="topic: 2000 bytes, more than"):
        peek_kind([b"result/" + b"a" * 1992 + b"\0", header])
    with pytest.raises(ProtocolError, match="a topic part and no message after it"):
        peek_kind([b"status"])


def test_result_accepts_numpy_scalars() -> None:
    msg = _result()
    msg.objects[0] = WireObject(np.int64(1), np.float32(0.5), tuple(np.array([1, 2, 3, 4])), None, "cup")
    msg.seq, msg.t_capture = np.int64(8), np.float64(2.5)
    got, _ = decode_result(encode_result(msg, None))
    assert got.objects[0].bbox == (1, 2, 3, 4) and got.seq == 8 and got.objects[0].score == 0.5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: setattr(m.objects[0], "mask", np.zeros((5, 5), bool)), r"objects\[0\].mask: shape"),
        (lambda m: setattr(m.objects[0], "bbox", (5, 5, 2, 9)), r"objects\[0\].bbox\[2\]"),
        (lambda m: setattr(m.objects[0], "bbox", (0, 0, 42, 9)), r"objects\[0\].bbox\[2\]"),
        (lambda m: setattr(m.objects[0], "score", math.inf), "result"),
        (lambda m: m.timestamps.update(tracked="soon"), "result.timestamps.tracked"),
    ],
)
def test_encode_result_rejects_bad_fields(change, message: str) -> None:
    msg = _result()
    change(msg)
    with pytest.raises(ProtocolError, match=message):
        encode_result(msg, None)


def test_result_from_frame_result_clips_boxes() -> None:
    mask = _blob(30, 41)
    fr = FrameResult(
        frame_index=7,
        timestamp=3.0,
        width=41,
        height=30,
        objects=[ObjectResult(4, np.float32(0.9), (-3, 2, 50, 31), mask, "dog")],
        timings={"track": 0.02},
    )
    msg = protocol.result_from_frame_result("cam0", 11, 3.0, fr, {"received": 3.1})
    assert msg.objects[0].bbox == (0, 2, 41, 30)
    got, _ = decode_result(encode_result(msg, None))
    assert got.frame_index == 7 and got.seq == 11 and got.timings == {"track": 0.02}
    np.testing.assert_array_equal(got.objects[0].mask, mask)


def test_status_round_trip_and_peek_kind() -> None:
    status = StatusMessage(
        "gpu0",
        10.5,
        {
            "cam0": {"last_seq": 3, "last_frame_t": 10.0, "fps": 30.0},
            "cam1": {"last_seq": None, "last_frame_t": None, "fps": 0.0},
        },
    )
    assert decode_status(encode_status(status)) == status
    messages = _valid_messages()
    kinds = {name: peek_kind(messages[name]) for name in ("result", "result_no_frame", "status")}
    assert kinds == {"result": "result", "result_no_frame": "result", "status": "status"}
    for name in ("frame", "prompt", "answer"):  # not results-socket messages: they carry no topic
        with pytest.raises(ProtocolError, match="topic: the message starts with a JSON header"):
            peek_kind(messages[name])


def test_decoders_refuse_other_kinds_versions_and_part_counts() -> None:
    messages = _valid_messages()
    with pytest.raises(ProtocolError, match="header.kind: expected 'frame', got 'status'"):
        decode_frame(messages["status"][1:])
    with pytest.raises(ProtocolError, match="frame: expected 2 message parts, got 1"):
        decode_frame(messages["frame"][:1])
    with pytest.raises(ProtocolError, match="status: expected 1 message parts, got 2"):
        decode_status(messages["status"] + [b""])
    header = json.loads(messages["status"][1])
    for version in (0, 4, "1", 1.0, None, True):
        with pytest.raises(ProtocolError, match="header.v: unsupported protocol version"):
            decode_status([b"status", json.dumps({**header, "v": version}).encode()])
    with pytest.raises(ProtocolError, match="header.kind: unknown kind 'video'"):
        peek_kind([b"status", json.dumps({**header, "kind": "video"}).encode()])


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{nope", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"v": 1, "kind": "status", "tracker": "t", "t": NaN, "streams": {}}', "NaN"),
        (b'{"v": 1, "kind": "status", "tracker": "t", "t": -Infinity, "streams": {}}', "Infinity"),
        (b'{"v": 1, "kind": "status", "tracker": "t", "t": 1e400, "streams": {}}', "out of range"),
        (b'{"v": 1, "kind": "status", "tracker": "t", "t": 1, "streams": {"a": {"fps": "fast"}}}', "streams.a.fps"),
        (
            b'{"v": 1, "kind": "status", "tracker": "\\ud800", "t": 1, "streams": {}}',
            "status.tracker: not valid Unicode",
        ),
        (b"[" * 100_000, "not JSON"),
        (b" " * (protocol.MAX_HEADER_BYTES + 1), "limit"),
    ],
)
def test_malformed_headers_are_protocol_errors(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_status([b"status", header])


def test_pixel_payload_must_match_the_header() -> None:
    parts = encode_frame(FrameHeader("cam0", 0, 1.0, 41, 30), _pixels())
    with pytest.raises(ProtocolError, match="frame.pixels: 3689 bytes, but 41x30x3 needs 3690"):
        decode_frame([parts[0], bytes(np.asarray(parts[1]).tobytes()[:-1])])
    with pytest.raises(ProtocolError, match="frame.pixels: expected a bytes-like part, got str"):
        decode_frame([parts[0], "pixels"])
    header = json.loads(parts[0])
    huge = json.dumps({**header, "width": 100_000, "height": 100_000}).encode()
    with pytest.raises(ProtocolError, match="MAX_PIXELS"):
        decode_frame([huge, b""])


def test_result_rejects_masks_that_disagree_with_the_frame() -> None:
    topic, data = encode_result(_result(), None)
    header = json.loads(data)
    header["objects"][0]["mask"]["size"] = [31, 41]
    with pytest.raises(ProtocolError, match=r"result.objects\[0\].mask.size: \[31, 41\] does not match"):
        decode_result([topic, json.dumps(header).encode()])
    header = json.loads(data)
    header["objects"][0]["mask"] = mask_to_rle(np.ones((30, 40), bool))
    with pytest.raises(ProtocolError, match="does not match"):
        decode_result([topic, json.dumps(header).encode()])


def test_result_bounds_total_mask_memory() -> None:
    h = w = 4096
    empty = {"size": [h, w], "counts": "0"}  # a few bytes of header asking for 16 MiB of mask each
    objects = [{"obj_id": i, "score": 1.0, "bbox": [0, 0, 0, 0], "mask": empty} for i in range(200)]
    header = {
        "v": 1,
        "kind": "result",
        "stream": "s",
        "seq": 0,
        "frame_index": 0,
        "t_capture": 0.0,
        "width": w,
        "height": h,
        "timestamps": {},
        "timings": {},
        "objects": objects,
    }
    with pytest.raises(ProtocolError, match="MAX_MASK_PIXELS_TOTAL"):
        decode_result([b"result/s\0", json.dumps(header).encode()])


# ------------------------------------------------------------------------------------------------
# RLE masks


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools.decode
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 5), (17, 13), (30, 41), (480, 641)])
@pytest.mark.parametrize("fill", ["empty", "full", "blob", "checker"])
def test_rle_round_trip(shape: tuple[int, int], fill: str) -> None:
    h, w = shape
    mask = {
        "empty": np.zeros(shape, bool),
        "full": np.ones(shape, bool),
        "blob": _blob(h, w),
        "checker": (np.indices(shape).sum(0) % 2).astype(bool),
    }[fill]
    rle = mask_to_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    json.dumps(rle)  # goes into a JSON header as it is
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    # pycocotools reads our RLE as its own
    np.testing.assert_array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()


def test_rle_of_uint8_and_non_contiguous_masks() -> None:
    mask = _blob(40, 50)
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask.astype(np.uint8))), mask)
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask[::2, 1::3])), mask[::2, 1::3])
    with pytest.raises(ProtocolError, match="mask: expected a non-empty 2-D bool array"):
        mask_to_rle(mask.astype(np.float32))
    with pytest.raises(ProtocolError, match="mask"):
        mask_to_rle(np.zeros((0, 4), bool))


@pytest.mark.parametrize(
    "counts, message",
    [
        ("", "empty"),
        ("0" * 3 + "\x7f", "outside"),
        ("é", "non-ASCII"),
        ("1k", "truncated"),  # 'k' has the continuation bit: pycocotools would read past the end
        ("1kkkkkk0", "longer than 6"),
        ("9", "runs cover 9 pixels"),
        ("<", "runs cover 12 pixels"),
        ("4O", "negative run length"),
    ],
)
def test_rle_counts_that_pycocotools_would_misread_are_refused(counts: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        rle_to_mask({"size": [2, 5], "counts": counts})


@FUZZ
@given(h=st.integers(1, 40), w=st.integers(1, 40), data=st.data())
def test_rle_parser_agrees_with_pycocotools(h: int, w: int, data: st.DataObject) -> None:
    """Any runs pycocotools compresses, we parse back to the same runs."""
    total = h * w
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=30)))
    runs = np.diff([0, *cuts, total])
    compressed = coco_mask.frPyObjects({"size": [h, w], "counts": [int(r) for r in runs]}, h, w)
    counts = compressed["counts"].decode("ascii")
    np.testing.assert_array_equal(protocol._rle_counts("counts", counts, total), runs)
    expected = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(w, h).T
    np.testing.assert_array_equal(rle_to_mask({"size": [h, w], "counts": counts}), expected)


@FUZZ
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    counts=st.text(st.characters(min_codepoint=40, max_codepoint=120), max_size=40),
)
def test_random_rle_strings_decode_or_raise_protocol_error(h: int, w: int, counts: str) -> None:
    try:
        mask = rle_to_mask({"size": [h, w], "counts": counts})
    except ProtocolError:
        return
    runs = protocol._rle_counts("counts", counts, h * w)
    np.testing.assert_array_equal(mask, np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(w, h).T)


# ------------------------------------------------------------------------------------------------
# Fuzzing: every decoder raises ProtocolError and nothing else

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(
    [
        "v",
        "kind",
        "stream",
        "seq",
        "t_capture",
        "width",
        "height",
        "request_id",
        "op",
        "prompt",
        "obj_id",
        "ok",
        "text",
        "error",
        "obj_ids",
        "frame_index",
        "timestamps",
        "timings",
        "objects",
        "tracker",
        "t",
        "streams",
    ]
)


def _dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # deliberately emits NaN/Infinity too


@FUZZ
@given(parts=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_bytes(parts: list[bytes]) -> None:
    _decode_any(parts)


@FUZZ
@given(
    kind=st.sampled_from([*protocol.KINDS, "other"]),
    fields=st.dictionaries(_field_names, _json_values),
    extra=st.lists(st.binary(max_size=16), max_size=2),
    top=_json_values,
)
def test_fuzz_random_json(kind: str, fields: dict, extra: list[bytes], top: object) -> None:
    _decode_any([_dumps({"v": 1, "kind": kind, **fields}), *extra])
    _decode_any([_dumps(top)])


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, (*prefix, i))
    return out


@FUZZ
@given(name=st.sampled_from(sorted(_valid_messages())), data=st.data())
def test_fuzz_mutated_valid_messages(name: str, data: st.DataObject) -> None:
    parts = [bytes(np.asarray(p).tobytes()) if not isinstance(p, bytes) else p for p in _valid_messages()[name]]
    at = 0 if parts[0].startswith(b"{") else 1  # results-socket messages: a topic, then the header
    header = json.loads(parts[at])
    mutation = data.draw(st.sampled_from(["replace", "delete", "bytes", "parts", "rle", "topic"]))
    if mutation in ("replace", "delete"):
        path = data.draw(st.sampled_from(_paths(header)))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        if mutation == "replace":
            parent[path[-1]] = data.draw(_json_values)
        else:
            del parent[path[-1]]
        parts[at] = _dumps(header)
    elif mutation == "bytes":
        raw = bytearray(parts[at])
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        parts[at] = bytes(raw)
    elif mutation == "parts":
        index = data.draw(st.integers(0, len(parts)))
        parts = parts[:index] + data.draw(st.lists(st.binary(max_size=8), max_size=2)) + parts[index + 1 :]
    elif mutation == "topic":
        parts[0] = data.draw(st.sampled_from([b"status", b"event/", b"result/cam0\0", b"result+frame/cam0\0", b""]))
        parts[0] += data.draw(st.binary(max_size=6))
    elif "objects" in header:
        rle = header["objects"][0]["mask"]
        rle["counts"] = data.draw(st.text(st.characters(min_codepoint=48, max_codepoint=111), max_size=30))
        parts[at] = _dumps(header)
    _decode_any(parts)


def test_fuzz_strange_part_types() -> None:
    for parts in (
        None,
        b"bytes",
        "text",
        3,
        [None],
        [3],
        [["nested"]],
        [np.zeros(3, np.float64)],
        [],
        (b'{"v":1}',),
        [np.zeros((2, 2), np.uint8)[:, :1]],
    ):
        _decode_any(parts)  # type: ignore[arg-type]
