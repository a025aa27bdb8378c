"""The tracker process: newest frame in, prompts applied, SAM 3 run, result (with its frame) out.

One process per GPU serves any number of cameras: each stream id gets its own tracker, made on the
stream's first frame. Sockets (ZeroMQ guide names, see ``streamer.transport``):

- frames: SUB, connected to the captures' PUBs. Read *latest-value*: after each poll everything
  queued is drained and only the newest frame per stream is kept, so a slow tracker skips frames
  instead of working through a queue that ages.
- control: ROUTER, bound. Every request gets an answer; all requests waiting are applied, in arrival
  order, before each frame is tracked.
- results: PUB, bound. A ``result`` per tracked frame, carrying that frame; a ``status`` heartbeat
  every 0.5 s from its own thread, so subscribers can tell "no signal" from "tracker offline" even
  while a slow model is busy with one frame.

    sam3-stream track --model tiny-random --frames-endpoint tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
import zmq

from models import ENCODER_NAMES, ENCODER_PRECISIONS, Prompt, check_encoder_choice
from streamer import security
from streamer.config import Endpoints
from streamer.healing import CauseLog, HealingSocket, SocketWatch
from streamer.keys import KeyFolder
from streamer.protocol import (
    FrameHeader,
    PromptAnswer,
    PromptRequest,
    ProtocolError,
    StatusMessage,
    encode_result,
    encode_status,
    result_from_frame_result,
)
from streamer.signals import StopSignals
from streamer.tracking import PASSTHROUGH, Tracker, TrackerFactory, tracker_factory
from streamer.transport import ControlServer, DrainStats, drain, frames_subscriber, latest_per_stream, results_publisher

__all__ = ["TrackerService", "add_arguments", "run_from_args", "run_tracker_service"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
STATS_INTERVAL_S = 10.0  # seconds between per-stream log lines
MAX_STREAMS = 64  # a misconfigured sender must not make us build trackers without end
_POLL_SLICE_MS = 100  # longest poll, so a stop request is noticed within this
_FPS_WINDOW_S = 2.0
_DEFAULTS = Endpoints.tcp_defaults()


@dataclass
class _Pending:
    header: FrameHeader
    pixels: np.ndarray
    received: float  # unix seconds, when drained from the socket


@dataclass
class _Stream:
    """One camera's tracker and bookkeeping."""

    tracker: Tracker
    pending: _Pending | None = None
    frame_size: tuple[int, int] | None = None  # (width, height) of the newest frame received
    last_seq: int | None = None
    last_frame_t: float | None = None  # t_capture of the newest frame tracked
    last_tracked: float = 0.0  # monotonic; picks the stream to serve next (round robin)
    arrivals: deque[float] = field(default_factory=deque)  # monotonic times of recent results
    ages: list[float] = field(default_factory=list)  # received - t_capture, this stats window
    latencies: list[float] = field(default_factory=list)  # published - t_capture, this stats window
    errors: int = 0

    def fps(self, now: float) -> float:
        while self.arrivals and now - self.arrivals[0] > _FPS_WINDOW_S:
            self.arrivals.popleft()
        if len(self.arrivals) < 2:
            return 0.0
        return (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-6)


class TrackerService:
    """The tracker loop over its three sockets.

    Construction binds the results and control sockets (so a busy endpoint fails at once, before a
    long model load); :meth:`serve` connects to the frames and runs until told to stop; :meth:`close`
    closes everything. ``prompts`` are text prompts given to every new stream.
    """

    def __init__(
        self,
        results_endpoint: str,
        control_endpoint: str,
        *,
        prompts: Sequence[str] = (),
        name: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stats_interval_s: float = STATS_INTERVAL_S,
        keys: KeyFolder | None = None,
    ) -> None:
        self._prompts = [Prompt(text=text) for text in prompts]  # ValueError now, not on the first frame
        self.name = name or f"tracker@{socket.gethostname()}"
        self._heartbeat_s = heartbeat_s
        self._stats_interval_s = stats_interval_s
        self._make_tracker: TrackerFactory | None = None
        self._streams: dict[str, _Stream] = {}
        self._drain_stats = DrainStats()
        self._ignored_streams = 0
        self._lock = threading.Lock()  # the PUB socket and self._streams, shared with the heartbeat thread
        self._stopping = threading.Event()
        self._context = zmq.Context()  # our own, so that term() cannot wait on anyone else's sockets
        self._frames: HealingSocket | None = None
        self._control_errors = CauseLog("control")
        self._curve_server: security.CurveServer | None = None
        try:
            # With keys, tcp:// sockets use CURVE: clients on the allow-list only; frames from keyed captures.
            self._curve_client = security.CurveClient(keys) if keys else None
            self._curve_server = security.CurveServer(keys, self._context) if keys else None
            self._results = results_publisher(results_endpoint, context=self._context, security=self._curve_server)
            self._control = ControlServer(control_endpoint, context=self._context, security=self._curve_server)
        except BaseException:
            if self._curve_server is not None:
                self._curve_server.close()
            self._context.destroy(linger=0)
            raise
        self._watches = [  # bound sockets keep listening whatever a peer does: these only count and log
            SocketWatch(self._results, f"results {results_endpoint}", connecting=False),
            SocketWatch(self._control.socket, f"control {control_endpoint}", connecting=False),
        ]
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    # ---------------------------------------------------------------------------------- lifecycle

    def serve(
        self,
        make_tracker: TrackerFactory,
        frames_endpoints: str | Sequence[str],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Connect to the captures and serve until ``should_stop()`` (checked at least every 100 ms
        between frames). ``make_tracker`` makes one tracker per stream."""
        self._make_tracker = make_tracker
        # Connected only now: frames sent during a model load would only pile up to the high-water mark.
        self._frames = HealingSocket(
            lambda: frames_subscriber(frames_endpoints, context=self._context, security=self._curve_client),
            f"frames {frames_endpoints if isinstance(frames_endpoints, str) else ', '.join(frames_endpoints)}",
        )
        poller = zmq.Poller()
        poller.register(self._frames.socket, zmq.POLLIN)
        poller.register(self._control.socket, zmq.POLLIN)
        if not self._heartbeat.is_alive():
            self._heartbeat.start()
        next_stats = time.monotonic() + self._stats_interval_s
        while not should_stop():
            busy = any(s.pending is not None for s in self._streams.values())
            poller.poll(0 if busy else _POLL_SLICE_MS)
            self._check_sockets(poller)
            self._receive_frames()
            self._serve_control()  # prompts waiting are applied before the next frame
            stream = self._next_stream()
            if stream is not None:
                self._track(*stream)
            if time.monotonic() >= next_stats:
                self._log_stats()
                next_stats = time.monotonic() + self._stats_interval_s

    def close(self) -> None:
        """Stop the heartbeat and close every socket."""
        self._stopping.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(2 * self._heartbeat_s + 1.0)
        for watch in self._watches:
            watch.close()
        self._control.close()  # not its context (ours): closes the socket only
        if self._frames is not None:
            self._frames.close()
        self._results.close(linger=0)
        if self._curve_server is not None:
            self._curve_server.close()
        self._context.term()

    def __enter__(self) -> TrackerService:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- frames

    def _check_sockets(self, poller: zmq.Poller) -> None:
        """Log what went wrong on the sockets; re-create the frames socket if libzmq gave up on a capture."""
        for watch in self._watches:
            watch.check()
        self._control_errors.flush()
        assert self._frames is not None
        old = self._frames.socket
        if self._frames.check():
            poller.unregister(old)
            poller.register(self._frames.socket, zmq.POLLIN)

    def _receive_frames(self) -> None:
        received = time.time()
        assert self._frames is not None
        for name, (header, pixels) in latest_per_stream(drain(self._frames.socket, 0), self._drain_stats).items():
            stream = self._streams.get(name) or self._new_stream(name)
            if stream is None:
                continue
            if stream.pending is not None:
                self._drain_stats.superseded += 1  # an older frame of this stream that never got tracked
            stream.pending = _Pending(header, pixels, received)
            stream.frame_size = (header.width, header.height)

    def _new_stream(self, name: str) -> _Stream | None:
        if len(self._streams) >= MAX_STREAMS:
            if self._ignored_streams % 100 == 0:
                log.warning("stream %s: ignored, already serving %d streams", name, MAX_STREAMS)
            self._ignored_streams += 1
            return None
        assert self._make_tracker is not None
        tracker = self._make_tracker()
        for prompt in self._prompts:
            tracker.add_prompt(prompt)
        stream = _Stream(tracker)
        with self._lock:
            self._streams[name] = stream
        log.info("stream %s: new (%s)", name, ", ".join(f"prompt {p.text!r}" for p in self._prompts) or "no prompt")
        return stream

    def _next_stream(self) -> tuple[str, _Stream] | None:
        waiting = [(name, s) for name, s in self._streams.items() if s.pending is not None]
        return min(waiting, key=lambda item: item[1].last_tracked) if waiting else None

    def _track(self, name: str, stream: _Stream) -> None:
        pending, stream.pending = stream.pending, None
        assert pending is not None
        header = pending.header
        try:
            result = stream.tracker.track(pending.pixels, timestamp=header.t_capture)
            tracked = time.time()
            # "published" is stamped as encoding starts: the header carrying it is the encoder's output.
            message = result_from_frame_result(
                name,
                header.seq,
                header.t_capture,
                result,
                {"received": pending.received, "tracked": tracked, "published": time.time()},
            )
            parts = encode_result(message, pending.pixels)
        except Exception:  # one bad frame must not take the camera (or the others) down
            stream.errors += 1
            if stream.errors % 100 == 1:
                log.exception(
                    "stream %s: frame %d failed (%d failures so far); skipped", name, header.seq, stream.errors
                )
            return
        with self._lock:
            self._results.send_multipart(parts, copy=False)
            now = time.monotonic()
            stream.last_seq, stream.last_frame_t, stream.last_tracked = header.seq, header.t_capture, now
            stream.arrivals.append(now)
        stream.ages.append(pending.received - header.t_capture)
        stream.latencies.append(message.timestamps["published"] - header.t_capture)

    # ------------------------------------------------------------------------------------ control

    def _serve_control(self) -> None:
        for envelope, request, _request_id in self._control.poll_requests(0):
            if isinstance(request, ProtocolError):  # already answered; one log line per field, with counts
                self._control_errors.count(f"rejected malformed requests ({_field_of(request)})", detail=str(request))
                continue
            self._control.reply(envelope, self._apply(request))

    def _apply(self, req: PromptRequest) -> PromptAnswer:
        stream = self._streams.get(req.stream)
        if stream is None:
            known = ", ".join(sorted(self._streams)) or "none yet"
            return PromptAnswer(
                req.request_id,
                False,
                f"stream: unknown stream {req.stream!r} (no frame received from it; known: {known})",
            )
        tracker = stream.tracker
        try:
            if req.op == "add_prompt":
                assert req.prompt is not None  # the decoder guarantees it
                obj_ids = tracker.add_prompt(req.prompt, frame_size=stream.frame_size)
            elif req.op == "remove_object":
                assert req.obj_id is not None
                tracker.remove_object(req.obj_id)
                obj_ids = [req.obj_id]
            elif req.op == "remove_prompt":
                assert req.text is not None
                obj_ids = tracker.remove_prompt(req.text)
            elif req.op == "reset_session":
                tracker.reset()
                obj_ids = []
            else:
                return PromptAnswer(req.request_id, False, f"op: {req.op!r} is not served by this tracker")
        except ValueError as exc:  # the tracker names the field
            return PromptAnswer(req.request_id, False, str(exc))
        except Exception as exc:
            log.exception("stream %s: %s failed", req.stream, req.op)
            return PromptAnswer(req.request_id, False, f"tracker: internal error ({exc!r})")
        log.info("stream %s: %s -> objects %s", req.stream, req.op, obj_ids)
        return PromptAnswer(req.request_id, True, obj_ids=[int(i) for i in obj_ids])

    # ------------------------------------------------------------------------------ heartbeat, stats

    def _beat(self) -> None:
        while not self._stopping.wait(self._heartbeat_s):
            try:
                self._send_status()
            except Exception:  # keep beating: the next one may go through
                log.exception("heartbeat failed")

    def _send_status(self) -> None:
        now = time.monotonic()
        with self._lock:
            streams = {
                name: {"last_seq": s.last_seq, "last_frame_t": s.last_frame_t, "fps": round(s.fps(now), 2)}
                for name, s in self._streams.items()
            }
            self._results.send_multipart(encode_status(StatusMessage(self.name, time.time(), streams)))

    def _log_stats(self) -> None:
        now = time.monotonic()
        for name, s in self._streams.items():
            if not s.ages:
                log.info("stream %s: no frames in the last %.0f s", name, self._stats_interval_s)
                continue
            age = np.percentile(np.array(s.ages) * 1000.0, [50, 95])
            latency = np.percentile(np.array(s.latencies) * 1000.0, [50, 95])
            with self._lock:
                fps = s.fps(now)
            log.info(
                "stream %s: %.1f fps; frame age at the tracker p50 %.0f ms p95 %.0f ms; capture to published "
                "p50 %.0f ms p95 %.0f ms; %d failures",
                name,
                fps,
                *age,
                *latency,
                s.errors,
            )
            s.ages.clear()
            s.latencies.clear()
        if self._drain_stats.superseded:
            log.info("frames skipped for a newer one: %d in all", self._drain_stats.superseded)


def _field_of(error: ProtocolError) -> str:
    """The field a protocol error names (its messages start with ``field: problem``)."""
    return str(error).split(":", 1)[0][:80]


def run_tracker_service(
    model: str,
    frames_endpoints: str | Sequence[str],
    results_endpoint: str,
    control_endpoint: str,
    *,
    device: str | None = None,
    prompts: Sequence[str] = (),
    name: str | None = None,
    passthrough_delay_s: float = 0.0,
    passthrough_object: bool = False,
    keys: KeyFolder | None = None,
    insecure: bool = False,
    encoder: str = "torch",
    encoder_precision: str | None = None,
) -> None:
    """Bind, load the model, and serve until SIGINT/SIGTERM (from the main thread).

    ``ValueError`` before anything is bound when a non-loopback endpoint would be exposed without ``keys``
    (unless ``insecure``).
    """
    security.check_exposure(
        [results_endpoint, control_endpoint], keys, insecure, "read the results and drive the tracker"
    )
    with (
        StopSignals() as stop,
        TrackerService(
            results_endpoint,
            control_endpoint,
            prompts=prompts,
            name=name or f"{model}@{socket.gethostname()}",
            keys=keys,
        ) as service,
    ):
        log.info("loading %s ...", model)
        start = time.monotonic()
        make_tracker = tracker_factory(
            model,
            device,
            encoder=encoder,
            encoder_precision=encoder_precision,
            passthrough_delay_s=passthrough_delay_s,
            passthrough_object=passthrough_object,
        )
        log.info(
            "tracker %s ready in %.1f s: frames %s, results %s, control %s",
            service.name,
            time.monotonic() - start,
            frames_endpoints,
            results_endpoint,
            control_endpoint,
        )
        service.serve(make_tracker, frames_endpoints, lambda: stop.requested)
    log.info("tracker stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the tracker options to ``parser`` (``sam3-stream track``)."""
    parser.add_argument(
        "--model",
        default="facebook/sam3",
        help="hub id, local folder, 'tiny-random' (tests), or 'passthrough' (no model: "
        "measures the pipeline alone) (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if any)")
    parser.add_argument(
        "--frames-endpoint",
        action="append",
        dest="frames_endpoints",
        metavar="ENDPOINT",
        help=f"capture PUB to connect to; repeat for several cameras (default {_DEFAULTS.frames})",
    )
    parser.add_argument(
        "--results-endpoint",
        default=_DEFAULTS.results,
        help="endpoint to bind and publish results and heartbeats on (default %(default)s)",
    )
    parser.add_argument(
        "--control-endpoint",
        default=_DEFAULTS.control,
        help="endpoint to bind for prompt requests (default %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        default=[],
        metavar="TEXT",
        help="text prompt given to every new stream; repeatable",
    )
    add_encoder_arguments(parser)
    parser.add_argument("--name", default=None, help="tracker name in heartbeats (default MODEL@HOST)")
    parser.add_argument(
        "--passthrough-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --model passthrough: spend this long per frame (stands in for a slow model)",
    )
    parser.add_argument(
        "--passthrough-object",
        action="store_true",
        help="with --model passthrough: report one fixed object per frame (masks on the wire)",
    )
    security.add_arguments(parser, binds=True)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--encoder`` and ``--encoder-precision`` (``track`` and ``run``)."""
    parser.add_argument(
        "--encoder",
        default="torch",
        choices=ENCODER_NAMES,
        help="image-encoder backend; one that cannot run here falls back to torch with a warning (default %(default)s)",
    )
    parser.add_argument(
        "--encoder-precision",
        default=None,
        choices=sorted({p for precisions in ENCODER_PRECISIONS.values() for p in precisions}),
        help="fp16 (default) or bf16 for tensorrt; fp8 for compiled (FP8 matmuls on Ada/Hopper)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the tracker service from parsed arguments; returns a process exit status (0 after a clean stop)."""
    if args.passthrough_delay_ms < 0:
        log.error("--passthrough-delay-ms: must be >= 0")
        return 2
    if args.model != PASSTHROUGH and (args.passthrough_delay_ms or args.passthrough_object):
        log.warning("--passthrough-* options apply to --model passthrough only; ignored")
    if args.model == PASSTHROUGH and (args.encoder != "torch" or args.encoder_precision):
        log.warning("--encoder options apply to real models only; ignored with --model passthrough")
    try:
        check_encoder_choice(args.encoder, args.encoder_precision)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    # Frames arrive as read-only views of the socket's buffers; the model only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    frames_endpoints = args.frames_endpoints or [_DEFAULTS.frames]
    try:
        keys = security.key_folder_from_args(args, [*frames_endpoints, args.results_endpoint, args.control_endpoint])
        run_tracker_service(
            args.model,
            frames_endpoints,
            args.results_endpoint,
            args.control_endpoint,
            device=args.device,
            prompts=args.prompts,
            name=args.name,
            passthrough_delay_s=args.passthrough_delay_ms / 1000.0,
            passthrough_object=args.passthrough_object,
            keys=keys,
            insecure=args.insecure,
            encoder=args.encoder,
            encoder_precision=args.encoder_precision,
        )
    except ValueError as exc:  # an endpoint, a --prompt, --keys or an exposed address; the message names it
        log.error("cannot start the tracker: %s", exc)
        return 2
    except zmq.ZMQError as exc:
        log.error("cannot open the tracker's sockets: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        import models  # loaded by now unless the model was passthrough

        if isinstance(exc, models.ModelLoadError):  # says what to do (log in, fix the path): no use retrying
            log.error("cannot load the model: %s", exc)
            return 2
        raise
    return 0
