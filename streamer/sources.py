"""Frame sources: cameras, video files, network streams, image folders and a synthetic test scene.

Every source hands out RGB ``uint8`` ``H x W x 3`` C-contiguous frames, one per :meth:`FrameSource.read`,
and knows its nominal frame rate. :func:`open_source` turns the user's ``--source`` string into one.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

from models.demo_scenes import DemoScene, SceneFrame, random_spec

__all__ = [
    "SourceError",
    "FrameSource",
    "CameraSource",
    "VideoSource",
    "ImageFolderSource",
    "SyntheticSource",
    "network_scheme",
    "open_source",
    "probe_source",
    "IMAGE_EXTENSIONS",
    "NETWORK_SCHEMES",
]

DEFAULT_FPS = 30.0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
# (open, read) seconds: a dead camera on the network must not hang the capture loop forever.
NETWORK_TIMEOUT = (10.0, 5.0)


class SourceError(RuntimeError):
    """A source that exists but cannot be opened or read (unreadable file, camera gone, stream dropped)."""


class FrameSource(ABC):
    """An open source of RGB frames.

    :meth:`read` returns the next frame, or ``None`` when the source has ended (a file played to its
    end without ``loop``); it raises :class:`SourceError` when the source fails. ``live`` sources
    (cameras, network streams) deliver frames at their own pace, so a reader must not add its own.
    Frames are resized to ``size`` (width, height) when one was asked for.
    """

    live: bool = False

    def __init__(self, description: str, size: tuple[int, int] | None = None) -> None:
        self.description = description
        self._size = size

    @property
    @abstractmethod
    def fps(self) -> float:
        """Nominal frames per second."""

    @abstractmethod
    def _read_frame(self) -> np.ndarray | None:
        """The next frame at the source's own size, or ``None`` at the end."""

    def read(self) -> np.ndarray | None:
        """The next RGB frame (a fresh array), ``None`` at the end; ``SourceError`` when reading fails."""
        frame = self._read_frame()
        if frame is None:
            return None
        if self._size is not None and (frame.shape[1], frame.shape[0]) != self._size:
            frame = cv2.resize(frame, self._size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def close(self) -> None:  # noqa: B027 - optional hook: sources holding nothing need not override it
        """Release the device or file; reading afterwards is an error."""

    def __iter__(self) -> Iterator[np.ndarray]:
        while (frame := self.read()) is not None:
            yield frame

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def _fit_size(native: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int] | None:
    """The (width, height) asked for; a missing side keeps the native aspect ratio. None: no resize."""
    if width is None and height is None:
        return None
    nw, nh = native
    if width is None:
        width = max(1, round(nw * height / nh))
    if height is None:
        height = max(1, round(nh * width / nw))
    return int(width), int(height)


class CameraSource(FrameSource):
    """A local camera through OpenCV (``index`` 0, 1, ... or a device path such as ``/dev/video0``)."""

    live = True

    def __init__(
        self,
        device: int | str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            raise SourceError(f"cannot open camera {device!r} (not present or busy)")
        # Cameras pick the nearest mode they support; whatever they return is resized below.
        if width is not None:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height is not None:
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps is not None:
            self._cap.set(cv2.CAP_PROP_FPS, fps)
        native = (int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        super().__init__(f"camera {device}", _fit_size(native, width, height))
        self._fps = float(fps or self._cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS)
        self._device = device

    @property
    def fps(self) -> float:
        return self._fps

    def _read_frame(self) -> np.ndarray:
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise SourceError(f"camera {self._device!r} returned no frame (unplugged?)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._cap.release()


class VideoSource(FrameSource):
    """A video file or a network stream (RTSP, RTMP, HTTP, ...) decoded with PyAV.

    ``loop`` restarts a file at its end by reopening it (so a file replaced on disk is picked up).
    ``live=True`` streams are opened with low-latency options; ``live=None`` decides after opening:
    a stream of unknown duration is live (an HTTP camera feed), one with a duration is a file to pace
    (an mp4 served over HTTP). Every open and read has a timeout, so a dead peer cannot hang a reader.
    """

    def __init__(
        self,
        target: str,
        *,
        loop: bool = False,
        live: bool | None = False,
        fps: float | None = None,
        width: int | None = None,
        height: int | None = None,
        timeout: tuple[float, float] = NETWORK_TIMEOUT,
    ) -> None:
        self._target = target
        self._loop = loop
        self._live_hint = live
        self._timeout = timeout
        self._container: av.container.InputContainer | None = None
        self._open()
        stream = self._container.streams.video[0]
        native = (stream.codec_context.width, stream.codec_context.height)
        super().__init__(("stream " if self.live else "video ") + target, _fit_size(native, width, height))
        rate = stream.average_rate or stream.guessed_rate
        self._fps = float(fps or rate or DEFAULT_FPS)

    def _options(self) -> dict[str, str]:
        if not self._live_hint:
            return {}
        options = {"fflags": "nobuffer", "flags": "low_delay"}
        if self._target.startswith("rtsp"):
            options["rtsp_transport"] = "tcp"  # UDP loses packets (smeared frames) on busy networks
        return options

    def _open(self) -> None:
        try:
            container = av.open(self._target, options=self._options(), timeout=self._timeout)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self._target}: {exc}") from exc
        if not container.streams.video:
            container.close()
            raise SourceError(f"{self._target} has no video stream")
        self.live = self._live_hint if self._live_hint is not None else container.duration is None
        stream = container.streams.video[0]
        # Frame threading buffers several frames: fine for files, added latency for live streams.
        stream.thread_type = "SLICE" if self.live else "AUTO"
        self._container = container
        self._frames = container.decode(stream)

    @property
    def fps(self) -> float:
        return self._fps

    def _read_frame(self) -> np.ndarray | None:
        # Two tries: the second one after reopening a looping file; a file with no frames ends.
        for attempt in range(2):
            try:
                return next(self._frames).to_ndarray(format="rgb24")
            except StopIteration:
                if not self._loop or self.live or attempt:
                    return None
                self.close()
                self._open()
            except (av.FFmpegError, OSError) as exc:
                raise SourceError(f"cannot read {self._target}: {exc}") from exc
        return None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def _natural_key(path: Path) -> list[object]:
    """Sort key so that frame2.png comes before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class ImageFolderSource(FrameSource):
    """The images of a folder (jpg, png, bmp), in natural name order, at a fixed rate.

    All frames come out at the size of the first image unless a size is asked for.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        fps: float | None = None,
        loop: bool = False,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        self._folder = Path(folder)
        paths = [p for p in self._folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {self._folder}")
        self._paths = sorted(paths, key=_natural_key)
        self._fps = float(fps or DEFAULT_FPS)
        self._loop = loop
        self._index = 0
        self._requested = (width, height)
        super().__init__(f"folder {self._folder} ({len(self._paths)} images)")

    @property
    def fps(self) -> float:
        return self._fps

    def _read_frame(self) -> np.ndarray | None:
        if self._index >= len(self._paths):
            if not self._loop:
                return None
            self._index = 0
        path = self._paths[self._index]
        self._index += 1
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceError(f"cannot read image {path} (deleted or not an image)")
        if self._size is None:
            self._size = _fit_size((bgr.shape[1], bgr.shape[0]), *self._requested) or (bgr.shape[1], bgr.shape[0])
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# The shapes of the synthetic scene: every kind once, plus a second circle crossing the first.
SYNTHETIC_KINDS = ("circle", "circle", "square", "triangle", "star", "ring")
SYNTHETIC_SEED = 10


class SyntheticSource(FrameSource):
    """A deterministic test scene: the generated shapes the ``demo`` model knows (circle, square,
    triangle, star, ring) moving, spinning, crossing, passing behind panels and leaving and
    re-entering the frame over a drifting textured background, with changing light and camera
    shake; the frame number is printed top left.

    :meth:`frame` is a pure function of the frame index, and :meth:`scene_frame` also gives every
    object's mask, id and words, so tests can predict every pixel and measure a tracker. Shapes move
    at the same speed in seconds whatever the rate (their positions depend on ``i / fps``).
    """

    def __init__(self, width: int = 640, height: int = 480, fps: float = DEFAULT_FPS) -> None:
        if width < 16 or height < 16 or fps <= 0:
            raise ValueError(f"synthetic source needs width, height >= 16 and fps > 0, got {width}x{height}@{fps}")
        super().__init__(f"synthetic {width}x{height}@{fps:g}")
        self.width, self.height = int(width), int(height)
        self._fps = float(fps)
        self._index = 0
        spec = random_spec(SYNTHETIC_SEED, self.width, self.height, kinds=SYNTHETIC_KINDS)
        self.scene = DemoScene(spec, self._fps)

    @property
    def fps(self) -> float:
        return self._fps

    def scene_frame(self, i: int, with_masks: bool = True) -> SceneFrame:
        """Frame ``i`` with its ground truth (the masks leave out the frame counter's box)."""
        shot = self.scene.frame(i, with_masks=with_masks)
        x1, y1 = self._draw_counter(shot.image, i)
        for instance in shot.instances:
            instance.mask[:y1, :x1] = False
        shot.instances = [inst for inst in shot.instances if inst.mask.any()]
        return shot

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of the scene (a new array each call)."""
        return self.scene_frame(i, with_masks=False).image

    def _draw_counter(self, img: np.ndarray, i: int) -> tuple[int, int]:
        """Print ``#000123`` top left on a black box; returns the box's right and bottom edges."""
        scale = max(0.3, self.height / 480)
        label = f"#{i:06d}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(img, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), thickness=-1)
        cv2.putText(img, label, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_8)
        return tw + 9, th + base + 9

    def _read_frame(self) -> np.ndarray:
        img = self.frame(self._index)
        self._index += 1
        return img


_SYNTHETIC_RE = re.compile(r"synthetic(?::(\d+)x(\d+))?(?:@(\d+(?:\.\d+)?))?")


def _open_synthetic(spec: str, width: int | None, height: int | None, fps: float | None) -> SyntheticSource:
    match = _SYNTHETIC_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"cannot parse synthetic source {spec!r}: expected synthetic[:WxH][@FPS], e.g. synthetic:640x480@30"
        )
    w, h, rate = match.groups()
    native = (int(w), int(h)) if w else (640, 480)
    # Explicit width/height/fps arguments win over the spec; render at that size rather than resize.
    size = _fit_size(native, width, height) or native
    return SyntheticSource(*size, fps=fps or (float(rate) if rate else DEFAULT_FPS))


def open_source(
    spec: str,
    *,
    loop: bool = False,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
) -> FrameSource:
    """Open the source named by ``spec``.

    - ``"0"``, ``"1"``, ``/dev/video0``: a camera (OpenCV);
    - ``rtsp://``, ``rtmp://``, ``http(s)://``, ... URL: a network stream (PyAV, with timeouts; an
      http(s) URL of a file with a known duration is paced and looped like a local file);
    - a folder: its images in name order at ``fps`` (default 30);
    - any other existing file: a video file (PyAV); ``loop`` restarts files and folders at the end;
    - ``synthetic`` or ``synthetic:WxH@FPS``: the generated shapes scene (with ground truth).

    ``width``/``height`` set the output size (one alone keeps the aspect ratio); ``fps`` sets the
    nominal rate (asked of a camera). Raises ``ValueError`` for a spec that names nothing usable
    (unparseable, missing file, empty folder) and :class:`SourceError` when the source is there but
    cannot be opened.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty source spec")
    if re.match(r"synthetic(?:$|[:@])", spec, re.IGNORECASE):
        return _open_synthetic(spec.lower(), width, height, fps)
    if spec.isdigit() or spec.startswith("/dev/video"):
        return CameraSource(int(spec) if spec.isdigit() else spec, width=width, height=height, fps=fps)
    if (scheme := network_scheme(spec)) is not None:
        # Servers of rtsp:// and the like pace their streams; an http(s):// URL may also be a plain file.
        live = None if scheme in ("http", "https") else True
        return VideoSource(spec, loop=loop, live=live, fps=fps, width=width, height=height)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, fps=fps, loop=loop, width=width, height=height)
    if path.is_file():
        return VideoSource(str(path), loop=loop, fps=fps, width=width, height=height)
    raise ValueError(f"no such file or folder: {spec!r}")


def network_scheme(spec: str) -> str | None:
    """The URL scheme of a network source, ``None`` for anything else; ``ValueError`` for one not supported."""
    spec = spec.strip()
    if "://" not in spec:
        return None
    scheme = spec.split("://", 1)[0].lower()
    if scheme not in NETWORK_SCHEMES:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {spec!r} (supported: {', '.join(NETWORK_SCHEMES)})")
    return scheme


def probe_source(spec: str, *, width: int | None = None, height: int | None = None, fps: float | None = None) -> str:
    """Prove that ``spec`` gives frames: open it as :func:`open_source` does, read one frame, close it.

    Returns the source's description. Raises what opening raises (``ValueError``, :class:`SourceError`),
    and :class:`SourceError` for a source with no frame to give. A network URL is checked for its scheme
    only: a camera on the network may come up later, and reaching a dead one takes ``NETWORK_TIMEOUT``.
    """
    if network_scheme(spec) is not None:
        return f"stream {spec.strip()}"
    with open_source(spec, width=width, height=height, fps=fps) as source:
        if source.read() is None:
            raise SourceError(f"{source.description} has no frames")
        return source.description
