"""The capture process: read one source, pace it, stamp each frame and publish it over ZeroMQ.

One process per camera. A source that fails (or a network stream that ends) is reopened with exponential
back-off. A video file or image folder plays once (unless ``loop``), then the process ends, telling a
supervising ``sam3-stream run`` it finished rather than crashed. Otherwise it stops on SIGINT/SIGTERM, a
stop event, or the end of ``duration``.

    python -m streamer.capture --source synthetic:640x480@30 --frames-endpoint tcp://127.0.0.1:5555 --stream-id cam0
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import zmq

from streamer import security
from streamer.config import Endpoints
from streamer.exit_notes import report_finished
from streamer.healing import SocketWatch, watched
from streamer.keys import KeyFolder
from streamer.protocol import MAX_ERROR_CHARS, FrameHeader, SourceStatus, encode_frame, encode_source
from streamer.signals import StopSignals
from streamer.sources import FrameSource, SourceError, network_scheme, open_source
from streamer.transport import frames_publisher

__all__ = [
    "Backoff",
    "Pacer",
    "positive",
    "run_capture",
    "add_arguments",
    "build_arg_parser",
    "run_from_args",
    "main",
    "DEFAULT_FRAMES_ENDPOINT",
]

log = logging.getLogger(__name__)

DEFAULT_FRAMES_ENDPOINT = Endpoints.tcp_defaults().frames
STATS_INTERVAL = 30.0  # seconds between "published N frames" log lines
# Seconds between the source's status messages: often enough that a tracker connecting late (after its
# model load) soon hears why no frames come, and that the page can name the source.
SOURCE_STATUS_S = 1.0
_SLEEP_SLICE = 0.05  # longest uninterrupted sleep, so a stop is noticed within this
_TICK_TOLERANCE = 1e-6  # seconds; float rounding on the tick grid must not turn "due" into "not yet"


class StopEventLike(Protocol):
    """Anything with ``is_set()``: ``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


class Backoff:
    """Exponential back-off delays: ``initial``, doubling, capped at ``cap``; :meth:`reset` after a success."""

    def __init__(self, initial: float = 0.5, factor: float = 2.0, cap: float = 10.0) -> None:
        self.initial, self.factor, self.cap = initial, factor, cap
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Pacer:
    """Ticks on a fixed grid ``start + k / fps`` of the monotonic clock.

    The grid is anchored at the first tick, so sleep jitter never accumulates into drift. When the
    caller is late, the missed ticks are dropped rather than served in a burst.
    """

    def __init__(self, fps: float, clock: Callable[[], float] = time.monotonic) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self._clock = clock
        self._start: float | None = None
        self._tick = 0  # index of the next tick to serve

    def _now(self) -> float:
        now = self._clock()
        if self._start is None:
            self._start = now
        return now

    def delay(self) -> float:
        """Seconds until the next tick (0 when it is due)."""
        now = self._now()  # first: it sets the grid's start
        left = self._start + self._tick * self.period - now
        return left if left > _TICK_TOLERANCE else 0.0

    def take(self) -> int:
        """Serve the latest due tick (or the next one, if called a hair early); return how many were skipped."""
        now = self._now()
        latest = max(self._tick, math.floor((now - self._start + _TICK_TOLERANCE) / self.period))
        skipped = latest - self._tick
        self._tick = latest + 1
        return skipped

    def wait(self, sleep: Callable[[float], None] = time.sleep) -> int:
        """Sleep until the next tick and serve it; return the number of ticks dropped because we were late."""
        sleep(self.delay())
        return self.take()

    def ready(self) -> bool:
        """Without sleeping: is a tick due? If so it is served. (Throttles a source that paces itself.)"""
        if self.delay() > 0:
            return False
        self.take()
        return True


class _Stopper:
    """Why the loop should stop: a signal, the caller's event, or the end of the run's duration."""

    def __init__(self, event: StopEventLike | None, duration: float | None) -> None:
        self.event = event
        self.deadline = None if duration is None else time.monotonic() + duration
        self.signals: StopSignals | None = None

    @property
    def stopped(self) -> bool:
        return (
            (self.signals is not None and self.signals.requested)
            or (self.event is not None and self.event.is_set())
            or (self.deadline is not None and time.monotonic() >= self.deadline)
        )

    def sleep(self, seconds: float) -> None:
        """Sleep, in slices so that a stop request cuts it short."""
        end = time.monotonic() + seconds
        while not self.stopped:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _SLEEP_SLICE))


class _Publisher:
    """Stamps frames (stream id, sequence number, capture time) and sends them; keeps rate statistics."""

    def __init__(self, sock: zmq.Socket, stream_id: str, watch: SocketWatch) -> None:
        self.sock = sock
        self.watch = watch  # logs peers that fail the handshake (garbage, or keys not on the allow-list)
        self.stream_id = stream_id
        self.seq = 0  # counts across reopens, so subscribers see one stream
        self.dropped = 0
        self.source = ""  # the open source's description, for the status messages
        self.source_fps: float | None = None
        self._window_start, self._window_seq, self._window_dropped = time.monotonic(), 0, 0
        self._announced = -math.inf  # monotonic time of the last status message

    def publish(self, pixels: np.ndarray, t_capture: float) -> None:
        height, width = pixels.shape[:2]
        header = FrameHeader(stream=self.stream_id, seq=self.seq, t_capture=t_capture, width=width, height=height)
        self.sock.send_multipart(encode_frame(header, pixels), copy=False)
        self.seq += 1
        self.watch.check()
        if time.monotonic() - self._announced >= SOURCE_STATUS_S:
            self.announce()
        self._maybe_log_stats()

    def announce(self, error: str | None = None) -> None:
        """Say what the source is and, with ``error``, why it delivers no frames (trackers pass it on)."""
        status = SourceStatus(
            self.stream_id, time.time(), self.source, error and error[:MAX_ERROR_CHARS], self.source_fps
        )
        self.sock.send_multipart(encode_source(status))
        self._announced = time.monotonic()

    def _maybe_log_stats(self) -> None:
        elapsed = time.monotonic() - self._window_start
        if elapsed < STATS_INTERVAL:
            return
        sent, dropped = self.seq - self._window_seq, self.dropped - self._window_dropped
        log.info(
            "stream %s: %d frames in %.0f s (%.1f fps), %d late ticks dropped",
            self.stream_id,
            sent,
            elapsed,
            sent / elapsed,
            dropped,
        )
        self._window_start, self._window_seq, self._window_dropped = time.monotonic(), self.seq, self.dropped


def _pump(
    source: FrameSource, publisher: _Publisher, fps: float | None, stopper: _Stopper, on_frame: Callable[[], None]
) -> None:
    """Publish frames from an open source until it ends or we are asked to stop; SourceError propagates."""
    rate = fps or (None if source.live else source.fps)
    pacer = Pacer(rate) if rate else None
    while not stopper.stopped:
        if pacer is not None and not source.live:
            publisher.dropped += pacer.wait(stopper.sleep)
            if stopper.stopped:
                return
        frame = source.read()
        if frame is None:
            return
        t_capture = time.time()
        on_frame()
        # A live source must still be read at its own rate (or its buffer ages); throttle by skipping.
        if pacer is not None and source.live and not pacer.ready():
            continue
        publisher.publish(frame, t_capture)


def run_capture(
    spec: str,
    endpoint: str,
    stream_id: str,
    *,
    loop: bool = False,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
    stop_event: StopEventLike | None = None,
    duration: float | None = None,
    backoff: Backoff | None = None,
    keys: KeyFolder | None = None,
    insecure: bool = False,
) -> int:
    """Capture ``spec`` and publish its frames on a PUB socket bound to ``endpoint``; return the frame count.

    Runs until SIGINT/SIGTERM (when called from the main thread), ``stop_event`` is set, or ``duration``
    seconds have passed. Files, folders and the synthetic pattern are paced to ``fps`` (default: the
    source's rate); cameras and streams are published as they arrive, throttled to ``fps`` if given.
    A spec that names nothing usable (``ValueError`` from :func:`open_source`), and a camera or file that
    cannot be opened the first time (:class:`SourceError`), fail at once: no wait heals them. A network
    stream that cannot be opened yet, every later failure, and the end of a network stream lead to a reopen
    after a back-off delay. A file or folder played to its end without ``loop`` ends the run. An endpoint
    that is not tcp:// or ipc:// is a ``ValueError`` too; one that cannot be bound raises ``zmq.ZMQError``.

    With ``keys`` a tcp:// endpoint uses CURVE (only allow-listed trackers may subscribe); without them a
    non-loopback endpoint is refused (``ValueError``) unless ``insecure``.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    # Let the protocol judge the stream id now (empty, too long): later, every frame would fail.
    encode_frame(FrameHeader(stream_id, 0, 0.0, 1, 1), np.zeros((1, 1, 3), np.uint8))
    security.check_exposure([endpoint], keys, insecure, "watch this camera")
    stopper = _Stopper(stop_event, duration)
    backoff = backoff or Backoff()
    ctx = zmq.Context()  # our own, so that term() at the end cannot wait on anyone else's sockets
    curve = None
    try:
        curve = security.CurveServer(keys, ctx) if keys else None
        sock, watch = watched(
            lambda hook: frames_publisher(endpoint, context=ctx, security=curve, on_created=hook),
            f"frames {endpoint}",
            connecting=False,
        )
    except BaseException:
        if curve is not None:
            curve.close()
        ctx.term()
        raise
    publisher = _Publisher(sock, stream_id, watch)
    ever_opened = False
    try:
        with StopSignals(log) as stopper.signals:
            while not stopper.stopped:
                try:
                    source = open_source(spec, loop=loop, width=width, height=height, fps=fps)
                except (SourceError, ValueError) as exc:
                    if not ever_opened and (not isinstance(exc, SourceError) or network_scheme(spec) is None):
                        raise  # a typo, a missing camera or a broken file: say so now rather than retry forever
                    _retry_later(f"cannot open source {spec!r}: {exc}", backoff, stopper, publisher)
                    continue
                ever_opened = True
                publisher.source, publisher.source_fps = source.description, source.fps
                publisher.announce()
                log.info("stream %s: opened %s (%.1f fps) -> %s", stream_id, source.description, source.fps, endpoint)
                played_out = False
                try:
                    _pump(source, publisher, fps, stopper, on_frame=backoff.reset)
                    reason = f"source {source.description} ended"
                    played_out = not source.live and not loop and not stopper.stopped
                except SourceError as exc:
                    reason = f"source failed: {exc}"
                except Exception as exc:  # a flaky driver must not kill the camera's process
                    log.exception("stream %s: unexpected error capturing from %s", stream_id, source.description)
                    reason = f"source failed: {exc!r}"
                finally:
                    source.close()
                if played_out:  # a file plays once unless looped: replaying it unasked looked like a glitch
                    log.info("stream %s: %s played to its end; pass --loop to repeat it", stream_id, source.description)
                    report_finished(f"{source.description} played to its end ({publisher.seq} frames)")
                    break
                if not stopper.stopped:
                    _retry_later(reason, backoff, stopper, publisher)
    finally:
        publisher.watch.close()
        sock.close()
        if curve is not None:
            curve.close()
        ctx.term()
    log.info("stream %s: stopped after %d frames", stream_id, publisher.seq)
    return publisher.seq


def _retry_later(reason: str, backoff: Backoff, stopper: _Stopper, publisher: _Publisher) -> None:
    """Wait out the back-off, telling subscribers every ``SOURCE_STATUS_S`` why no frames come."""
    delay = backoff.next_delay()
    log.warning("%s; reopening in %.1f s", reason, delay)
    end = time.monotonic() + delay
    while not stopper.stopped and (left := end - time.monotonic()) > 0:
        publisher.announce(reason)
        stopper.sleep(min(left, SOURCE_STATUS_S))


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse ``type`` that parses with ``kind`` (``int``, ``float``) and refuses values <= 0."""

    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the capture options to ``parser`` (shared by ``sam3-stream capture`` and ``python -m streamer.capture``)."""
    parser.add_argument(
        "--source",
        required=True,
        help="camera index (0), video file, rtsp:// or http(s):// URL, image folder, or synthetic[:WxH][@FPS]",
    )
    parser.add_argument(
        "--frames-endpoint",
        default=DEFAULT_FRAMES_ENDPOINT,
        help=f"ZeroMQ endpoint to bind and publish frames on (default {DEFAULT_FRAMES_ENDPOINT})",
    )
    parser.add_argument("--stream-id", default="cam0", help="name of this stream in every frame header (default cam0)")
    parser.add_argument("--loop", action="store_true", help="restart video files and image folders at their end")
    parser.add_argument(
        "--fps",
        type=positive(float),
        default=None,
        help="publishing rate (default: the source's own; image folders 30)",
    )
    parser.add_argument("--width", type=positive(int), default=None, help="output width (alone: keep aspect ratio)")
    parser.add_argument("--height", type=positive(int), default=None, help="output height (alone: keep aspect ratio)")
    parser.add_argument(
        "--duration",
        type=positive(float),
        default=None,
        help="stop after this many seconds (default: run until stopped)",
    )
    security.add_arguments(parser, binds=True)


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m streamer.capture``: :func:`add_arguments` plus ``--log-level``."""
    parser = argparse.ArgumentParser(
        prog="sam3-stream capture", description="Capture a source and publish its frames over ZeroMQ."
    )
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the capture loop from parsed arguments; returns a process exit status (0 after a clean stop)."""
    try:
        run_capture(
            args.source,
            args.frames_endpoint,
            args.stream_id,
            loop=args.loop,
            fps=args.fps,
            width=args.width,
            height=args.height,
            duration=args.duration,
            keys=security.key_folder_from_args(args, [args.frames_endpoint]),
            insecure=args.insecure,
        )
    except (ValueError, SourceError) as exc:  # the source, the endpoint, --keys, an exposed address: named in it
        log.error("cannot start capture: %s", exc)
        return 2
    except zmq.ZMQError as exc:
        log.error("cannot publish on %s: %s", args.frames_endpoint, exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m streamer.capture``: parse, set up logging, run; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
