"""Turn one input field (an http(s) URL, a ``data:`` URI, base64 content or a file upload) into a checked
file: its format sniffed from its bytes, its size bounded, a video's length probed.

Nothing a client sends names a path on the server: ``file://`` and other schemes and bare paths are
refused, and every file lands in the request's own staging folder under a name chosen here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from streamer.api.body import Upload
from streamer.api.errors import bad_request, too_large, unsupported_format
from streamer.api.fetch import UrlFetcher
from streamer.api.media import (
    IMAGE_FORMATS,
    SNIFF_BYTES,
    VIDEO_FORMATS,
    ImageInfo,
    MediaError,
    VideoInfo,
    describe,
    probe_image,
    probe_video,
    sniff,
)

_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,15}):")
_WHITESPACE = re.compile(r"\s+")
_EXTENSIONS = {"jpeg": "jpg"}


@dataclass(frozen=True)
class ReceivedInput:
    """An input file in a staging folder, of a served format, with what probing it found."""

    path: Path
    info: ImageInfo | VideoInfo


class InputReceiver:
    """Receives image and video inputs within the server's limits."""

    def __init__(self, fetcher: UrlFetcher, max_upload_bytes: int, max_video_seconds: float) -> None:
        self.fetcher = fetcher
        self.max_bytes = max_upload_bytes
        self.max_video_seconds = max_video_seconds

    async def receive(self, field: str, value: Any, kind: str, folder: Path) -> ReceivedInput:
        """Bring ``value`` into ``folder`` as ``input.<ext>``. ``kind`` is ``"image"`` or ``"video"``.

        Raises :class:`~streamer.api.errors.ApiError`: 400 for a malformed, unreachable or unsupported
        input (the message names ``field``), 413 for one over the size or duration limit.
        """
        incoming = folder / "incoming"
        await self._bring(field, value, incoming)
        with incoming.open("rb") as f:
            head = f.read(512)
        fmt = sniff(head[:SNIFF_BYTES])
        formats = IMAGE_FORMATS if kind == "image" else VIDEO_FORMATS
        if fmt not in formats:
            got = fmt or describe(head)
            raise unsupported_format(
                f"{field}: unsupported format ({got}); expected {'an' if kind == 'image' else 'a'} {kind}: "
                + ", ".join(formats)
            )
        path = folder / f"input.{_EXTENSIONS.get(fmt, fmt)}"
        incoming.rename(path)
        try:
            if kind == "image":
                info: ImageInfo | VideoInfo = await asyncio.to_thread(probe_image, path, fmt)
            else:
                info = await asyncio.to_thread(probe_video, path, fmt, self.max_video_seconds)
        except MediaError as exc:
            raise bad_request(f"{field}: {exc}") from None
        if isinstance(info, VideoInfo) and info.duration_s > self.max_video_seconds:
            raise too_large(f"{field}: the video is longer than the {self.max_video_seconds:g} s limit")
        return ReceivedInput(path, info)

    async def _bring(self, field: str, value: Any, destination: Path) -> None:
        if isinstance(value, Upload):
            shutil.move(value.path, destination)
            return
        if not isinstance(value, str):
            raise bad_request(
                f"{field}: expected an http(s) URL, a data: URI or base64 content (or a file upload in a "
                f"multipart form), got {type(value).__name__ if value is not None else 'null'}"
            )
        text = value.strip()
        if not text:
            raise bad_request(f"{field}: empty")
        scheme = _SCHEME.match(text)
        if scheme and scheme.group(1).lower() in ("http", "https"):
            await self.fetcher.fetch(field, text, destination)
        elif scheme and scheme.group(1).lower() == "data":
            destination.write_bytes(self._data_uri(field, text))
        elif scheme and len(text) > len(scheme.group(0)) and not _BASE64.match(text):
            raise bad_request(
                f"{field}: {scheme.group(1).lower()}: URLs are not accepted; send an http(s) URL, a data: URI, "
                "base64 content or a file upload"
            )
        else:
            destination.write_bytes(self._base64(field, text))

    def _check_encoded_size(self, field: str, encoded_chars: int) -> None:
        if encoded_chars * 3 // 4 > self.max_bytes:
            raise too_large(f"{field}: content is over the {self.max_bytes / 2**20:g} MB limit")

    def _data_uri(self, field: str, text: str) -> bytes:
        header, comma, payload = text.partition(",")
        if not comma:
            raise bad_request(f"{field}: malformed data: URI (no comma before the content)")
        self._check_encoded_size(field, len(payload))
        if header.lower().endswith(";base64"):
            return self._base64(field, payload)
        data = unquote_to_bytes(payload)
        if not data:
            raise bad_request(f"{field}: the data: URI holds no content")
        return data

    def _base64(self, field: str, text: str) -> bytes:
        compact = _WHITESPACE.sub("", text)
        if not _BASE64.match(compact) or len(compact) < 8:
            raise bad_request(
                f"{field}: expected an http(s) URL, a data: URI or base64 content (or a file upload); "
                "paths on the server are never read"
            )
        self._check_encoded_size(field, len(compact))
        try:
            if "-" in compact or "_" in compact:
                return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
            return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{field}: malformed base64 content") from None
