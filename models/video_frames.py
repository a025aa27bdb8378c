"""Random access to the frames of a video file, a folder of JPEG frames or a single image, decoded on demand.

A long video is never decoded whole: frames are decoded when asked for and kept in a small
least-recently-used cache, so a five-minute 1080p video costs the memory of ``cache_frames`` frames.
Video files are indexed once at open by reading their packets (no decoding), which gives the exact
frame count and each frame's timestamp; a request far from the decoder's position seeks to the
keyframe before it and decodes forward from there, caching what it decodes on the way, so walking a
video backwards costs one seek per ``cache_frames`` frames rather than one per frame.
"""

from __future__ import annotations

import bisect
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

from models.frames import MAX_FRAME_SIDE

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
FOLDER_EXTENSIONS = (".jpg", ".jpeg")
DEFAULT_CACHE_FRAMES = 32
# Decoding forward this many frames beats a seek (which restarts at a keyframe anyway).
_MAX_SKIP_WITHOUT_SEEK = 48


class VideoReadError(RuntimeError):
    """A resource that cannot be opened or read as frames; the message names it and the problem."""


class VideoFrames(ABC):
    """Frames of one video as RGB ``uint8`` ``H x W x 3`` arrays, by index, decoded on demand.

    ``frames[i]`` decodes frame ``i`` (or takes it from the cache); ``len(frames)`` is the frame count.
    ``decoded_count`` counts frames decoded so far (also those decoded only on the way to another one)
    and ``cached_count`` those held now.
    """

    def __init__(self, description: str, num_frames: int, width: int, height: int, fps: float, cache_frames: int):
        if cache_frames < 1:
            raise ValueError("cache_frames: must be >= 1")
        self.description = description
        self.num_frames = num_frames
        self.width = width
        self.height = height
        self.fps = fps
        self.cache_frames = cache_frames
        self.decoded_count = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int) -> np.ndarray:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"frame index must be an integer, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame index {index} is out of range: {self.description} has {self.num_frames} frames")
        frame = self._cache.get(index)
        if frame is None:
            self._load(index)
            frame = self._cache.get(index)
            if frame is None:
                raise VideoReadError(f"{self.description}: frame {index} could not be decoded")
        self._cache.move_to_end(index)
        return frame

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.num_frames):
            yield self[index]

    @property
    def cached_count(self) -> int:
        return len(self._cache)

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0

    def close(self) -> None:
        """Release the decoder and the cache (the object is unusable afterwards)."""
        self._cache.clear()

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _load(self, index: int) -> None:
        """Decode frame ``index`` (and possibly its neighbours) into the cache with :meth:`_remember`."""

    def _remember(self, index: int, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3):
            raise VideoReadError(
                f"{self.description}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, "
                f"the first frame is {self.width}x{self.height} (all frames must have one size)"
            )
        self._cache[index] = frame
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)


def open_frames(resource_path: str | os.PathLike, cache_frames: int = DEFAULT_CACHE_FRAMES) -> VideoFrames:
    """Open a video file (mp4, mov, webm, mkv, ...), a folder of JPEG frames, or a single image.

    Raises :class:`VideoReadError` naming the path and the problem (missing, unsupported, unreadable).
    """
    path = Path(os.fspath(resource_path)).expanduser()
    if not path.exists():
        raise VideoReadError(f"{path}: no such file or folder")
    if path.is_dir():
        return JpegFolderFrames(path, cache_frames)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return ImageFrames(path)
    if suffix in VIDEO_EXTENSIONS:
        return VideoFileFrames(path, cache_frames)
    raise VideoReadError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r} "
        f"(videos: {', '.join(VIDEO_EXTENSIONS)}; images: {', '.join(IMAGE_EXTENSIONS)}; or a folder of JPEG frames)"
    )


class VideoFileFrames(VideoFrames):
    """A video file decoded with PyAV, seeking by the packet timestamps indexed at open."""

    def __init__(self, path: Path, cache_frames: int = DEFAULT_CACHE_FRAMES) -> None:
        self.path = path
        self._container = self._open_container()
        stream = self._container.streams.video[0]
        timestamps, keyframes = self._index_packets(stream)
        if not timestamps:
            self._container.close()
            raise VideoReadError(f"{path}: the video stream holds no frames")
        rate = stream.average_rate or stream.guessed_rate
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        _check_size(path, width, height)
        super().__init__(str(path), len(timestamps), width, height, float(rate) if rate else 0.0, cache_frames)
        # Presentation order: frame i is the i-th smallest timestamp (B-frames arrive out of order).
        self._timestamps = sorted(timestamps)
        self._index_of = {pts: i for i, pts in enumerate(self._timestamps)}
        self._keyframes = sorted(keyframes)
        self._restart()

    def _open_container(self) -> av.container.InputContainer:
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise VideoReadError(f"{self.path}: cannot open as a video ({exc})") from exc
        if not container.streams.video:
            container.close()
            raise VideoReadError(f"{self.path}: the file has no video stream")
        return container

    def _index_packets(self, stream: av.video.stream.VideoStream) -> tuple[list[int], list[int]]:
        timestamps, keyframes = [], []
        try:
            for packet in self._container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    raise VideoReadError(f"{self.path}: video packets carry no timestamps; re-encode the file")
                timestamps.append(int(pts))
                if packet.is_keyframe:
                    keyframes.append(int(pts))
        except av.FFmpegError as exc:
            self._container.close()
            raise VideoReadError(f"{self.path}: cannot read the video ({exc})") from exc
        if len(set(timestamps)) != len(timestamps):
            self._container.close()
            raise VideoReadError(f"{self.path}: video packets repeat timestamps; re-encode the file")
        return timestamps, keyframes or timestamps[:1]

    def _restart(self) -> None:
        """Reopen the container: the decoder starts at frame 0."""
        self._container.close()
        self._container = self._open_container()
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._stream = stream
        self._decoder = self._container.decode(stream)
        self._next = 0  # index of the frame the decoder yields next (when known)

    def _seek_before(self, index: int) -> None:
        """Position the decoder at the keyframe at or before frame ``index``."""
        target = self._timestamps[index]
        at = bisect.bisect_right(self._keyframes, target) - 1
        if at <= 0:
            self._restart()
            return
        keyframe = self._keyframes[at]
        self._container.seek(keyframe, stream=self._stream, backward=True, any_frame=False)
        self._decoder = self._container.decode(self._stream)
        self._next = self._index_of[keyframe]

    def _load(self, index: int) -> None:
        ahead = index - self._next
        if not 0 <= ahead <= max(_MAX_SKIP_WITHOUT_SEEK, self.cache_frames):
            self._seek_before(index)
        self._decode_until(index, retry=True)

    def _decode_until(self, index: int, retry: bool) -> None:
        # Frames decoded on the way to ``index`` are cached too: a backward walk then finds them.
        keep_from = index - self.cache_frames + 1
        try:
            for frame in self._decoder:
                self.decoded_count += 1
                position = self._index_of.get(frame.pts) if frame.pts is not None else self._next
                if position is None:
                    continue  # a frame outside the index (e.g. a discarded leading B-frame)
                self._next = position + 1
                if position >= keep_from:
                    self._remember(position, frame.to_ndarray(format="rgb24"))
                if position >= index:
                    return
        except av.FFmpegError as exc:
            raise VideoReadError(f"{self.path}: cannot decode frame {index} ({exc})") from exc
        if retry:  # the stream ended early after a seek: decode from the start instead
            self._restart()
            self._decode_until(index, retry=False)

    def close(self) -> None:
        super().close()
        self._container.close()


class JpegFolderFrames(VideoFrames):
    """A folder of JPEG frames, ordered as SAM 3's loader orders them: by the integer file names
    (``0.jpg``, ``1.jpg``, ... ``10.jpg``) when they all are integers, else by name."""

    def __init__(self, folder: Path, cache_frames: int = DEFAULT_CACHE_FRAMES) -> None:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS]
        if not files:
            raise VideoReadError(f"{folder}: the folder holds no JPEG frames (*.jpg, *.jpeg)")
        try:
            files.sort(key=lambda p: int(p.stem))
        except ValueError:
            files.sort(key=lambda p: p.name)
        self.files = files
        first = _read_image(files[0])
        super().__init__(str(folder), len(files), first.shape[1], first.shape[0], 0.0, cache_frames)
        self.decoded_count = 1
        self._remember(0, first)

    def _load(self, index: int) -> None:
        self.decoded_count += 1
        self._remember(index, _read_image(self.files[index]))


class ImageFrames(VideoFrames):
    """A single image as a one-frame video."""

    def __init__(self, path: Path) -> None:
        image = _read_image(path)
        super().__init__(str(path), 1, image.shape[1], image.shape[0], 0.0, 1)
        self.decoded_count = 1
        self._remember(0, image)

    def _load(self, index: int) -> None:  # the only frame never leaves the cache
        raise AssertionError("unreachable")


def _read_image(path: Path) -> np.ndarray:
    """RGB ``uint8`` pixels of an image file (GIF: its first frame)."""
    if path.suffix.lower() == ".gif":
        try:
            with av.open(str(path)) as container:
                context = container.streams.video[0].codec_context
                _check_size(path, context.width, context.height)
                return next(container.decode(video=0)).to_ndarray(format="rgb24")
        except (av.FFmpegError, OSError, IndexError, StopIteration) as exc:
            raise VideoReadError(f"{path}: cannot read the GIF ({exc or 'no frames'})") from exc
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise VideoReadError(f"{path}: cannot read the file ({exc.strerror})") from exc
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise VideoReadError(f"{path}: not a readable image")
    _check_size(path, bgr.shape[1], bgr.shape[0])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_size(path: Path, width: int, height: int) -> None:
    if not (0 < width <= MAX_FRAME_SIDE and 0 < height <= MAX_FRAME_SIDE):
        raise VideoReadError(f"{path}: frames of {width}x{height} are outside 1..{MAX_FRAME_SIDE} pixels a side")
