"""Read a request body into fields: a JSON object, or a multipart / url-encoded form with file uploads.

Everything is bounded: the body's size, JSON nesting, the number of fields, each uploaded file
(streamed to disk, never held whole in memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from streamer.api.errors import bad_request, too_large

MAX_JSON_DEPTH = 16
MAX_FIELDS = 64
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart form, already written to ``path``."""

    path: Path
    filename: str | None
    size: int


def max_body_bytes(max_upload_bytes: int) -> int:
    """Largest body accepted: an upload as base64 inside JSON is 4/3 of its size, plus room for the fields."""
    return max_upload_bytes * 4 // 3 + 1024 * 1024


async def read_fields(request: web.Request, staging: Path, max_upload_bytes: int) -> dict[str, Any]:
    """The body's fields. Uploaded files become :class:`Upload` values written under ``staging``.

    Raises :class:`~streamer.api.errors.ApiError` (400 malformed, 413 too large).
    """
    content_type = request.content_type
    if content_type == "multipart/form-data":
        return await _read_multipart(request, staging, max_upload_bytes)
    if content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        return _checked_count(dict(form))
    if content_type in ("application/json", "application/octet-stream") or not request.body_exists:
        # Clients that send JSON without a content type get it read as JSON all the same.
        return parse_json_object(await request.read())
    if content_type.endswith("+json") or content_type == "text/plain":
        return parse_json_object(await request.read())
    raise bad_request(f"body: expected application/json or multipart/form-data, got {content_type[:80]}")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from ``raw``, nested at most :data:`MAX_JSON_DEPTH` deep."""
    if not raw.strip():
        raise bad_request("body: empty; expected a JSON object")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise bad_request(f"body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise bad_request(f"body: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise bad_request(f"body: expected a JSON object, got a JSON {_json_type(value)}")
    _check_depth(value)
    return _checked_count(value)


def _json_type(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _check_depth(value: object) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"body: nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _checked_count(fields: dict[str, Any]) -> dict[str, Any]:
    if len(fields) > MAX_FIELDS:
        raise bad_request(f"body: more than {MAX_FIELDS} fields")
    return fields


async def _read_multipart(request: web.Request, staging: Path, max_upload_bytes: int) -> dict[str, Any]:
    try:
        reader = await request.multipart()
    except (ValueError, HttpProcessingError) as exc:
        raise bad_request(f"body: malformed multipart form ({exc})") from None
    fields: dict[str, Any] = {}
    text_limit = max_body_bytes(max_upload_bytes)
    try:
        while (part := await reader.next()) is not None:
            if len(fields) >= MAX_FIELDS:
                raise bad_request(f"body: more than {MAX_FIELDS} form fields")
            if not isinstance(part, BodyPartReader):
                raise bad_request("body: nested multipart forms are not accepted")
            name = part.name
            if not name:
                raise bad_request("body: a form part has no field name")
            if name in fields:
                raise bad_request(f"{name[:60]}: given twice")
            if part.filename is not None:
                fields[name] = await _save_upload(part, name, staging / f"upload-{len(fields)}", max_upload_bytes)
            else:
                data = await _read_limited(part, name, text_limit)
                try:
                    fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad_request(f"{name[:60]}: form field is not UTF-8 text") from None
    except (ValueError, HttpProcessingError) as exc:  # malformed part headers or boundaries
        raise bad_request(f"body: malformed multipart form ({str(exc)[:120]})") from None
    return fields


async def _read_limited(part: BodyPartReader, name: str, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(f"{name[:60]}: form field is over {limit / 2**20:.0f} MB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _save_upload(part: BodyPartReader, name: str, path: Path, limit: int) -> Upload:
    size = 0
    with path.open("wb") as out:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(f"{name[:60]}: upload is over the {limit / 2**20:g} MB limit")
            out.write(chunk)
    return Upload(path, part.filename, size)
