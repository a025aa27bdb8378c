"""What an input file really is: its format from its first bytes (never its name), its size, its length.

Images are sized from their headers before anything decodes them, so a tiny file claiming a
gigapixel is refused without allocating it; videos are probed with PyAV by demuxing packets (no
decoding), so their length is known before a job is queued.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

IMAGE_FORMATS = ("jpeg", "png", "gif", "webp")
VIDEO_FORMATS = ("mp4", "mov", "webm", "mkv")
MAX_SIDE = 4096  # pixels per side of an input image or video frame
SNIFF_BYTES = 64
_QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Formats people send by mistake, named in the refusal so they know what they sent.
_OTHER_SIGNATURES = (
    (b"%PDF", "pdf"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"FLV", "flv"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"<", "html or xml text"),
    (b"{", "json text"),
)


class MediaError(ValueError):
    """An input that is not a usable image or video; the message says what is wrong with it."""


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes: one of :data:`IMAGE_FORMATS` or :data:`VIDEO_FORMATS`,
    ``None`` when it is none of them."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if head[4:8] in _QUICKTIME_ATOMS:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska or its WebM profile, told apart by DocType
        if b"webm" in head:
            return "webm"
        if b"matroska" in head:
            return "mkv"
    return None


def describe(head: bytes) -> str:
    """A short name for what an unsupported file looks like, for error messages."""
    if head[:4] == b"RIFF":
        return {b"AVI ": "avi", b"WAVE": "wav"}.get(head[8:12], "riff")
    if head[:1] == b"\x47" and len(head) > 188 and head[188:189] == b"\x47":
        return "mpeg-ts"
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    return "unrecognized content"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class VideoInfo:
    format: str
    width: int
    height: int
    fps: float
    frames: int
    duration_s: float


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from an image's header alone. Raises :class:`MediaError` for a broken header."""
    try:
        if fmt == "png":
            width, height = struct.unpack(">II", data[16:24])
        elif fmt == "gif":
            width, height = struct.unpack("<HH", data[6:10])
        elif fmt == "webp":
            width, height = _webp_size(data)
        else:
            width, height = _jpeg_size(data)
    except struct.error:
        raise MediaError(f"truncated {fmt} header") from None
    if width < 1 or height < 1:
        raise MediaError(f"{fmt} header gives an empty {width}x{height} image")
    return width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        b0, b1, b2, b3 = data[21:25]
        return 1 + (b0 | (b1 & 0x3F) << 8), 1 + (b1 >> 6 | b2 << 2 | (b3 & 0x0F) << 10)
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    raise MediaError(f"webp: unknown chunk {chunk!r}")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise MediaError("jpeg: corrupt marker sequence")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    raise MediaError("jpeg: no frame header found")


def check_side(width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise MediaError(f"{width}x{height} is larger than {MAX_SIDE} pixels a side")


def probe_image(path: Path, fmt: str) -> ImageInfo:
    """Size an image from its header and check that it decodes. Raises :class:`MediaError`."""
    data = path.read_bytes()
    width, height = image_size(data, fmt)
    check_side(width, height)
    if read_image(path) is None:
        raise MediaError(f"cannot decode this {fmt} image")
    return ImageInfo(fmt, width, height)


def read_image(path: Path) -> np.ndarray | None:
    """RGB ``H x W x 3`` uint8 pixels of an image file (first frame of a GIF); ``None`` if undecodable.

    Only call on files :func:`probe_image` has sized: OpenCV allocates whatever the header says.
    """
    bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def probe_video(path: Path, fmt: str, max_seconds: float) -> VideoInfo:
    """Size, frame rate, frame count and duration of a video, counting its packets without decoding.

    Container metadata can lie, so frames are counted; once they make more than ``max_seconds``
    counting stops (the caller refuses the video as too long). Raises :class:`MediaError` for
    anything unreadable.
    """
    try:
        with av.open(str(path), "r") as container:
            if not container.streams.video:
                raise MediaError(f"this {fmt} file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width < 1 or height < 1:
                raise MediaError(f"this {fmt} file's video stream has no frame size")
            check_side(width, height)
            rate = stream.average_rate or stream.guessed_rate or Fraction(30)
            fps = float(rate)
            if not 0.1 <= fps <= 1000:
                raise MediaError(f"frame rate {fps:g} is outside 0.1..1000")
            max_frames = math.floor(max_seconds * fps) + 1
            frames = 0
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
                    if frames > max_frames:
                        break
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot read this {fmt} file: {exc}") from None
    if frames == 0:
        raise MediaError(f"this {fmt} file holds no video frames")
    return VideoInfo(fmt, width, height, fps, frames, frames / fps)
