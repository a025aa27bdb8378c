"""The tracker process: newest frame in, prompts applied, SAM 3 run, result (with its frame) out.

One process per GPU serves any number of cameras: each stream id gets its own tracker, made on the
stream's first frame. Sockets (ZeroMQ guide names, see ``streamer.transport``):

- frames: SUB, connected to the captures' PUBs. Read *latest-value*: after each poll everything
  queued is drained and only the newest frame per stream is kept, so a slow tracker skips frames
  instead of working through a queue that ages.
- control: ROUTER, bound, served by its own thread. Every request is answered within milliseconds
  whatever the model's speed: validated against the stream's prompts as the tracker will find them,
  queued, and answered with the ids it creates and the frame it applies before
  (:mod:`streamer.prompt_queue`); clicks and boxes that carry the ``seq`` of the frame they were drawn
  on go on that frame while the tracker's prompt ring holds it (the answer's ``placed_on``). The
  tracking thread applies the queued prompts in arrival order before each frame of their stream; one
  that fails then is dropped and reported as an ``event``.
- results: PUB, bound, every message under its topic (``streamer.topics``). A ``result`` per tracked
  frame, twice: with that frame (the gateway subscribes to these) and without (robots); ``event`` messages
  (prompt failures, objects re-acquired after a restart, objects left out by the cap); a ``status``
  heartbeat every 0.5 s from its own thread, with this process's ``instance`` id and per stream the
  frames received and tracked and the prompts queued, applied and failed, so subscribers can tell
  "no signal" (no frames reach the tracker) from "tracker offline" (no heartbeats) even while a slow
  model is busy with one frame.

Each stream's active prompts are kept in a :mod:`streamer.prompt_store` (a journal in ``--state-dir``):
a restarted tracker re-applies them on the stream's first frame and says so with an
``objects_reacquired`` event. Streams without frames for ``--stream-idle-s`` expire: their slot (of
``--max-streams``) and their prompts are freed.

    sam3-stream track --model tiny-random --frames-endpoint tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType

import numpy as np
import zmq

from models import ENCODER_NAMES, ENCODER_PRECISIONS, Prompt, check_encoder_choice
from streamer import security
from streamer.assignments import StreamAssignments
from streamer.config import Endpoints
from streamer.healing import CauseLog, HealingSocket, watched
from streamer.keys import KeyFolder
from streamer.prompt_queue import FailedOp, PromptLimits, QueuedOp, StreamPrompts, apply_op, match_failures
from streamer.prompt_store import PromptStore, open_prompt_store
from streamer.protocol import (
    MAX_ERROR_CHARS,
    MAX_OBJECTS,
    EventMessage,
    FrameHeader,
    PromptAnswer,
    PromptRequest,
    ProtocolError,
    ResultMessage,
    SourceStatus,
    StatusMessage,
    decode_source,
    encode_event,
    encode_result,
    encode_status,
    peek_frames_kind,
    result_from_frame_result,
)
from streamer.signals import StopSignals
from streamer.tracking import MAX_MOVING_OBJECTS, PASSTHROUGH, Tracker, TrackerFactory, tracker_factory
from streamer.transport import (
    ControlServer,
    DrainStats,
    drain,
    frames_subscriber,
    latest_per_stream,
    prepare_endpoint,
    publish_result,
    results_publisher,
)

__all__ = ["CannotStart", "TrackerService", "add_arguments", "run_from_args", "run_tracker_service"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
STATS_INTERVAL_S = 10.0  # seconds between per-stream log lines
MAX_STREAMS = 64  # a misconfigured sender must not make us build trackers without end
STREAM_IDLE_S = 300.0  # a stream without frames this long expires, freeing its slot and prompts
_POLL_SLICE_MS = 100  # longest poll, so a stop request is noticed within this
_FPS_WINDOW_S = 2.0
_EXPIRY_CHECK_S = 1.0
_DEFAULTS = Endpoints.tcp_defaults()
_REACQUIRED_NOTE = (
    "clicks and boxes were made on an earlier frame and are re-applied on the current one, so those objects "
    "may differ; objects found by a concept get new ids"
)


class CannotStart(Exception):
    """The tracker refuses to start (bad options, a model it cannot load): restarting cannot help."""


@dataclass
class _Pending:
    header: FrameHeader
    pixels: np.ndarray
    received: float  # unix seconds, when drained from the socket


@dataclass
class _Stream:
    """One camera's tracker, its prompt queue and bookkeeping."""

    tracker: Tracker
    prompts: StreamPrompts
    pending: _Pending | None = None
    frames_received: int = 0
    last_received_t: float | None = None  # unix seconds, when the newest frame arrived
    last_received: float = 0.0  # monotonic, the same (for expiry)
    busy_at_receipt: float = 0.0  # the busy clock's total then (see frames_silent_s)
    captures: deque[tuple[float, int]] = field(default_factory=deque)  # recent frames' (t_capture, seq)
    frames_tracked: int = 0
    last_seq: int | None = None
    last_frame_t: float | None = None  # t_capture of the newest frame tracked
    last_tracked: float = 0.0  # monotonic; picks the stream to serve next (round robin)
    arrivals: deque[float] = field(default_factory=deque)  # monotonic times of recent results
    ages: list[float] = field(default_factory=list)  # received - t_capture, this stats window
    latencies: list[float] = field(default_factory=list)  # published - t_capture, this stats window
    errors: int = 0
    busy_s: float = 0.0  # time spent on this stream's frames and prompts (its share of the frame budget)
    capped: bool = False  # results currently leave objects out (objects_capped said)
    restored: list[QueuedOp] = field(default_factory=list)  # re-applied after a restart, to announce

    def fps(self, now: float) -> float:
        while self.arrivals and now - self.arrivals[0] > _FPS_WINDOW_S:
            self.arrivals.popleft()
        if len(self.arrivals) < 2:
            return 0.0
        return (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-6)

    def source_fps(self) -> float | None:
        """The camera's rate, from the seq and capture times of the frames that reached us (skipped ones
        count: the seq says how many there were)."""
        if len(self.captures) < 2:
            return None
        (t0, seq0), (t1, seq1) = self.captures[0], self.captures[-1]
        return (seq1 - seq0) / (t1 - t0) if t1 > t0 and seq1 > seq0 else None

    def note_capture(self, header: FrameHeader) -> None:
        if self.captures and header.seq < self.captures[-1][1]:
            self.captures.clear()  # a restarted capture counts from 0 again
        self.captures.append((header.t_capture, header.seq))
        while header.t_capture - self.captures[0][0] > _FPS_WINDOW_S:
            self.captures.popleft()

    def status(self, now: float, busy_total: float) -> dict:
        """This stream's fields of the heartbeat (``protocol.STREAM_STATUS_FIELDS``); ``busy_total`` is the
        busy clock's reading now."""
        listened = (now - self.last_received) - (busy_total - self.busy_at_receipt)
        source_fps = self.source_fps()
        return {
            "frames_silent_s": round(max(listened, 0.0), 3) if self.frames_received else None,
            "source_fps": None if source_fps is None else round(source_fps, 2),
            "last_seq": self.last_seq,
            "last_frame_t": self.last_frame_t,
            "fps": round(self.fps(now), 2),
            "frames_received": self.frames_received,
            "last_received_t": self.last_received_t,
            "frames_tracked": self.frames_tracked,
            "frame_errors": self.errors,
            "prompts_queued": self.prompts.queued,
            "prompts_applied": self.prompts.applied,
            "prompts_failed": self.prompts.failed,
        }


class _BusyClock:
    """Seconds the tracking thread spent tracking rather than listening for frames; the heartbeat thread
    reads it (one tuple, swapped whole, so a reader never sees half an update)."""

    def __init__(self) -> None:
        self._reading: tuple[float, float | None] = (0.0, None)  # (total of finished steps, current start)

    def __enter__(self) -> None:
        self._reading = (self._reading[0], time.monotonic())

    def __exit__(self, *exc: object) -> None:
        total, since = self._reading
        self._reading = (total + time.monotonic() - (since or time.monotonic()), None)

    def total(self, now: float) -> float:
        total, since = self._reading
        return total + (now - since if since is not None else 0.0)


class TrackerService:
    """The tracker loop over its three sockets.

    Construction binds the results and control sockets (so a busy endpoint fails at once, before a
    long model load); :meth:`serve` starts the control thread, connects to the frames and runs until
    told to stop; :meth:`close` closes everything. ``prompts`` are text prompts given to every new
    stream (one the prompt store does not know); ``store`` keeps streams' active prompts across restarts.
    With ``assignments`` (a cluster's registry decides), it serves only the streams assigned to it and
    connects to their captures' endpoints as they are assigned.
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
        limits: PromptLimits = PromptLimits(),
        max_streams: int = MAX_STREAMS,
        stream_idle_s: float = STREAM_IDLE_S,
        store: PromptStore | None = None,
        keys: KeyFolder | None = None,
        assignments: StreamAssignments | None = None,
    ) -> None:
        self._prompts = [Prompt(text=text) for text in prompts]  # ValueError now, not on the first frame
        if max_streams < 1 or not stream_idle_s > 0:
            raise ValueError(f"max_streams, stream_idle_s: must be > 0, got {max_streams}, {stream_idle_s}")
        self.name = name or f"tracker@{socket.gethostname()}"
        self.instance = uuid.uuid4().hex  # heartbeats carry it: a new one means the tracker restarted
        self.limits = limits
        self._max_streams = max_streams
        self._stream_idle_s = stream_idle_s
        self._store = store if store is not None else PromptStore()
        self.assignments = assignments  # None: serve every stream whose frames arrive
        self._heartbeat_s = heartbeat_s
        self._stats_interval_s = stats_interval_s
        self._make_tracker: TrackerFactory | None = None  # set by serve(): until then the model loads
        self.model = ""  # what start_loading() named, for the heartbeats
        self._busy = _BusyClock()
        self._sources: dict[str, SourceStatus] = {}  # each capture's newest word on its source
        self._streams: dict[str, _Stream] = {}
        self._stored_deadline: dict[str, float] = {}  # stored streams not seen since start: expire by then
        self._drain_stats = DrainStats()
        self._ignored_streams = 0
        self._failures = CauseLog("prompts")  # failed prompts: the first of each kind logged, then counts
        self._lock = threading.Lock()  # the PUB socket and self._streams, shared with the other threads
        self._stopping = threading.Event()
        self._context = zmq.Context()  # our own, so that term() cannot wait on anyone else's sockets
        self._frames: HealingSocket | None = None
        self._control_errors = CauseLog("control")  # the control thread's alone
        self._curve_server: security.CurveServer | None = None
        try:
            # With keys, tcp:// sockets use CURVE: clients on the allow-list only; frames from keyed captures.
            self._curve_client = security.CurveClient(keys) if keys else None
            self._curve_server = security.CurveServer(keys, self._context) if keys else None
            # Bound sockets keep listening whatever a peer does: their watches only count and log.
            self._results, results_watch = watched(
                lambda hook: results_publisher(
                    results_endpoint, context=self._context, security=self._curve_server, on_created=hook
                ),
                f"results {results_endpoint}",
                connecting=False,
            )
            self._control, control_watch = watched(
                lambda hook: ControlServer(
                    control_endpoint, context=self._context, security=self._curve_server, on_created=hook
                ),
                f"control {control_endpoint}",
                connecting=False,
            )
        except BaseException:
            if self._curve_server is not None:
                self._curve_server.close()
            self._context.destroy(linger=0)  # closes every socket of it, a watch's reader too
            raise
        self._watches = [results_watch, control_watch]
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._control_thread = threading.Thread(target=self._serve_control, name="control", daemon=True)

    # ---------------------------------------------------------------------------------- lifecycle

    def start_loading(self, model: str) -> None:
        """Heartbeat from now on, saying the tracker loads ``model`` (until :meth:`serve`), so a viewer sees
        "loading" rather than an offline tracker during a long model load."""
        self.model = model
        if not self._heartbeat.is_alive():
            self._heartbeat.start()

    def serve(
        self,
        make_tracker: TrackerFactory,
        frames_endpoints: str | Sequence[str],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Connect to the captures and serve until ``should_stop()`` (checked at least every 100 ms
        between frames). ``make_tracker`` makes one tracker per stream."""
        self._make_tracker = make_tracker
        fixed = [frames_endpoints] if isinstance(frames_endpoints, str) else list(frames_endpoints)

        def endpoints() -> list[str]:
            return fixed + (self.assignments.endpoints() if self.assignments is not None else [])

        # Connected only now: frames sent during a model load would only pile up to the high-water mark.
        self._frames = HealingSocket(
            lambda watch: frames_subscriber(
                endpoints(), context=self._context, security=self._curve_client, on_created=watch
            ),
            f"frames {', '.join(fixed) or 'of the assigned streams'}",
        )
        poller = zmq.Poller()
        poller.register(self._frames.socket, zmq.POLLIN)  # the control socket is the control thread's
        deadline = time.monotonic() + self._stream_idle_s
        self._stored_deadline = dict.fromkeys(self._store.streams(), deadline)
        if not self._heartbeat.is_alive():
            self._heartbeat.start()
        if not self._control_thread.is_alive():
            self._control_thread.start()
        next_stats = time.monotonic() + self._stats_interval_s
        next_expiry = time.monotonic() + _EXPIRY_CHECK_S
        while not should_stop():
            busy = any(s.pending is not None for s in self._streams.values())
            poller.poll(0 if busy else _POLL_SLICE_MS)
            self._check_sockets(poller)
            self._follow_assignments(poller)
            self._receive_frames()
            stream = self._next_stream()
            if stream is not None:
                with self._busy:
                    self._track(*stream)
            now = time.monotonic()
            if now >= next_expiry:
                self._expire_idle(now)
                next_expiry = now + _EXPIRY_CHECK_S
            if now >= next_stats:
                self._log_stats()
                next_stats = time.monotonic() + self._stats_interval_s

    def close(self) -> None:
        """Stop the threads and close every socket."""
        self._stopping.set()
        for thread in (self._heartbeat, self._control_thread):
            if thread.is_alive():
                thread.join(2 * self._heartbeat_s + 1.0)
        for watch in self._watches:
            watch.close()
        self._control.close()  # not its context (ours): closes the socket only
        if self._frames is not None:
            self._frames.close()
        self._results.close(linger=0)
        if self._curve_server is not None:
            self._curve_server.close()
        self._context.term()
        self._store.close()

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
        self._failures.flush()  # the control thread flushes its own control_errors
        assert self._frames is not None
        old = self._frames.socket
        if self._frames.check():
            poller.unregister(old)
            poller.register(self._frames.socket, zmq.POLLIN)

    def _follow_assignments(self, poller: zmq.Poller) -> None:
        """Connect to the captures of newly assigned streams, let go of released ones (this thread's sockets)."""
        change = self.assignments.take_change() if self.assignments is not None else None
        if change is None:
            return
        assert self._frames is not None
        if change.disconnect:
            # Re-created rather than disconnected: libzmq 4.3 aborts (fq.cpp "!_more") when a pipe is
            # disconnected while a multipart frame from it is being read. Other captures reconnect in ms.
            old = self._frames.socket
            try:
                self._frames.renew()
            except (zmq.ZMQError, ValueError) as exc:  # the old socket stays: released frames are ignored
                self._failures.count("frames socket not re-created", detail=str(exc))
                return
            poller.unregister(old)
            poller.register(self._frames.socket, zmq.POLLIN)
        else:
            for endpoint in change.connect:
                try:
                    self._frames.socket.connect(prepare_endpoint(endpoint))
                except zmq.ZMQError as exc:  # a malformed endpoint: never stop the other streams for it
                    self._failures.count("frames endpoints not connected", detail=f"{endpoint}: {exc}")
        for name in change.released:
            if self.assignments is not None and self.assignments.holds(name):
                continue  # assigned again since
            with self._lock:
                stream = self._streams.pop(name, None)
            self._store.drop_stream(name)  # the new holder carries its prompts now
            if stream is not None:
                log.info("stream %s: released (moved to another tracker)", name)

    def _receive_frames(self) -> None:
        received, now = time.time(), time.monotonic()
        assert self._frames is not None
        frames = self._take_source_statuses(drain(self._frames.socket, 0))
        for name, (header, pixels) in latest_per_stream(frames, self._drain_stats).items():
            if self.assignments is not None and not self.assignments.holds(name):
                continue  # another tracker's stream from a shared capture, or one released a moment ago
            stream = self._streams.get(name) or self._new_stream(name, (header.width, header.height))
            if stream is None:
                continue
            if stream.pending is not None:
                self._drain_stats.superseded += 1  # an older frame of this stream that never got tracked
            stream.pending = _Pending(header, pixels, received)
            stream.prompts.frame_size = (header.width, header.height)
            stream.frames_received += 1
            stream.last_received_t, stream.last_received = received, now
            stream.busy_at_receipt = self._busy.total(now)
            stream.note_capture(header)
            source = self._sources.get(name)
            if source is not None and source.error is not None and header.t_capture > source.t:
                self._sources[name] = replace(source, error=None)  # frames again: the source recovered

    def _take_source_statuses(self, messages: list) -> list:
        """Keep the captures' source statuses (for the heartbeat); return the other messages (frames)."""
        frames = []
        for parts in messages:
            try:
                kind = peek_frames_kind(parts)
            except ProtocolError:
                kind = "frame"  # latest_per_stream counts and logs it as malformed
            if kind != "source":
                frames.append(parts)
                continue
            try:
                status = decode_source(parts)
            except ProtocolError as exc:
                self._failures.count("malformed source statuses dropped", detail=str(exc))
                continue
            if status.stream in self._sources or len(self._sources) < self._max_streams:
                with self._lock:
                    self._sources[status.stream] = status
        return frames

    def _new_stream(self, name: str, frame_size: tuple[int, int]) -> _Stream | None:
        if len(self._streams) >= self._max_streams:
            if self._ignored_streams % 100 == 0:
                log.warning("stream %s: ignored, already serving %d streams", name, self._max_streams)
            self._ignored_streams += 1
            return None
        assert self._make_tracker is not None
        try:
            tracker = self._make_tracker()
        except Exception:  # out of memory, say: the other streams go on
            log.exception("stream %s: cannot make a tracker; its frames are ignored", name)
            return None
        stream = _Stream(tracker, StreamPrompts(tracker, self.limits, store=self._store, stream=name))
        stream.prompts.frame_size = frame_size
        stored = self._store.prompts(name)
        self._stored_deadline.pop(name, None)
        if stored is None:
            for i, prompt in enumerate(self._prompts):
                self._submit_own(stream, name, f"initial-{i}", prompt, restored=False)
            what = ", ".join(f"prompt {p.text!r}" for p in self._prompts) or "no prompt"
        else:
            stream.restored = [
                op
                for i, prompt in enumerate(stored)
                if (op := self._submit_own(stream, name, f"restore-{i}", prompt, restored=True)) is not None
            ]
            what = f"{len(stream.restored)} prompts re-applied from the prompt store"
        with self._lock:
            self._streams[name] = stream
        log.info("stream %s: new (%s)", name, what)
        return stream

    def _submit_own(
        self, stream: _Stream, name: str, request_id: str, prompt: Prompt, *, restored: bool
    ) -> QueuedOp | None:
        """Queue a prompt of the tracker's own (initial, or re-applied from the store) like any other."""
        request = PromptRequest(f"{request_id}-{uuid.uuid4().hex[:8]}", name, "add_prompt", prompt=prompt)
        try:
            return stream.prompts.queue(request, restored=restored)
        except ValueError as exc:
            log.warning("stream %s: prompt %s not applied: %s", name, prompt.to_dict(), exc)
            return None

    def _next_stream(self) -> tuple[str, _Stream] | None:
        waiting = [(name, s) for name, s in self._streams.items() if s.pending is not None]
        return min(waiting, key=lambda item: item[1].last_tracked) if waiting else None

    def _track(self, name: str, stream: _Stream) -> None:
        started = time.perf_counter()
        try:
            self._track_pending(name, stream)
        finally:
            stream.busy_s += time.perf_counter() - started

    def _track_pending(self, name: str, stream: _Stream) -> None:
        pending, stream.pending = stream.pending, None
        assert pending is not None
        header, tracker = pending.header, stream.tracker
        ops = stream.prompts.take()
        failed = [f for op in ops if (f := self._apply(name, stream, op)) is not None]
        message: ResultMessage | None = None
        parts: list | None = None
        try:
            result = tracker.track(pending.pixels, timestamp=header.t_capture)
            stream.prompts.tracked(header.seq, result.frame_index)  # a prompt drawn on this seq can go here
            tracked = time.time()
            message = result_from_frame_result(
                name, header.seq, header.t_capture, result, {"received": pending.received, "tracked": tracked}
            )
            self._cap_objects(name, stream, message)
            # Masks are encoded by their boxes (a fraction of a millisecond each at 1080p); "published" is
            # stamped once they are, so latency figures count their encoding.
            parts = encode_result(message, pending.pixels, stamp_published=True)
        except Exception:  # one bad frame must not take the camera (or the others) down
            stream.errors += 1
            if stream.errors % 100 == 1:
                log.exception(
                    "stream %s: frame %d failed (%d failures so far); skipped", name, header.seq, stream.errors
                )
        finally:
            failed += match_failures(ops, tracker.take_prompt_failures())
            stream.prompts.settle(failed)
        if parts is not None and message is not None:
            with self._lock:
                publish_result(self._results, parts)  # with the frame (the gateway) and without (robots)
                now = time.monotonic()
                stream.last_seq, stream.last_frame_t, stream.last_tracked = header.seq, header.t_capture, now
                stream.arrivals.append(now)
                stream.frames_tracked += 1
            stream.ages.append(pending.received - header.t_capture)
            stream.latencies.append(message.timestamps["published"] - header.t_capture)
        else:
            stream.last_tracked = time.monotonic()
        for failure in failed:
            self._report_failure(name, failure, tracker.frame_index)
        if stream.restored and parts is not None:
            self._announce_reacquired(name, stream, tracker.frame_index - 1)

    def _apply(self, name: str, stream: _Stream, op: QueuedOp) -> FailedOp | None:
        try:
            apply_op(stream.tracker, op, stream.prompts.frame_size)
        except ValueError as exc:  # it no longer fits (an object retired since...): the tracker names the field
            return FailedOp(op, str(exc), tuple(op.obj_ids), tuple(op.texts))
        except Exception as exc:
            log.exception("stream %s: applying %s %s failed", name, op.request.op, op.request.request_id)
            return FailedOp(op, f"tracker: internal error ({exc!r})", tuple(op.obj_ids), tuple(op.texts))
        return None

    def _cap_objects(self, name: str, stream: _Stream, message: ResultMessage) -> None:
        """Keep at most ``limits.max_objects`` objects (the highest scores), so a result always encodes."""
        cap, count = self.limits.max_objects, len(message.objects)
        if count > cap:
            kept = sorted(message.objects, key=lambda o: o.score, reverse=True)[:cap]
            left_out = sorted({o.obj_id for o in message.objects} - {o.obj_id for o in kept})
            message.objects = sorted(kept, key=lambda o: o.obj_id)
            if not stream.capped:
                self._publish_event(
                    EventMessage(
                        name,
                        "objects_capped",
                        f"{count} objects found, results carry the {cap} with the highest scores "
                        f"(--max-objects); remove objects or concepts to see the others",
                        time.time(),
                        obj_ids=left_out[:cap],
                        frame_index=message.frame_index,
                    )
                )
        stream.capped = count > cap

    def _report_failure(self, name: str, failure: FailedOp, frame_index: int) -> None:
        op = failure.op
        request_id, op_name = (op.request.request_id, op.request.op) if op is not None else (None, None)
        what = f"{'re-applying ' if op is not None and op.restored else ''}prompt {request_id or '?'} ({op_name})"
        message = f"{what} failed when applied and was dropped: {failure.error}"
        self._failures.count(f"stream {name}: prompts failed when applied ({_field_of(failure.error)})", detail=message)
        self._publish_event(
            EventMessage(
                name,
                "prompt_failed",
                message,
                time.time(),
                request_id=request_id,
                op=op_name,
                obj_ids=list(failure.obj_ids),
                texts=list(failure.texts),
                frame_index=frame_index,
            )
        )

    def _announce_reacquired(self, name: str, stream: _Stream, frame_index: int) -> None:
        restored, stream.restored = stream.restored, []
        state = stream.prompts.state
        obj_ids = sorted({i for op in restored for i in op.obj_ids} & set(state.objects))
        texts = [t for t in state.texts if any(t in op.texts for op in restored)]
        message = (
            f"the tracker restarted and re-applied this stream's prompts: objects {obj_ids or 'none'} "
            f"(same ids), concepts {texts or 'none'}; {_REACQUIRED_NOTE}"
        )
        log.info("stream %s: %s", name, message)
        self._publish_event(
            EventMessage(
                name, "objects_reacquired", message, time.time(), obj_ids=obj_ids, texts=texts, frame_index=frame_index
            )
        )

    def _publish_event(self, event: EventMessage) -> None:
        """Publish ``event`` cut to the wire's bounds (an event is news, never a reason to stop tracking)."""
        event.message = event.message[:MAX_ERROR_CHARS]
        event.obj_ids, event.texts = event.obj_ids[:MAX_OBJECTS], event.texts[:MAX_OBJECTS]
        try:
            parts = encode_event(event)
        except ProtocolError as exc:
            self._failures.count("events not published", detail=str(exc))
            return
        with self._lock:
            self._results.send_multipart(parts)

    def _expire_idle(self, now: float) -> None:
        for name, stream in list(self._streams.items()):
            if now - stream.last_received > self._stream_idle_s:
                with self._lock:
                    del self._streams[name]
                dropped = stream.prompts.drop_queued()
                self._store.drop_stream(name)
                log.info(
                    "stream %s: no frame for %.0f s; expired (slot and prompts freed, %d queued prompts dropped)",
                    name,
                    self._stream_idle_s,
                    len(dropped),
                )
                for op in dropped:
                    self._report_failure(
                        name,
                        FailedOp(op, "stream: expired before the prompt could be applied", tuple(op.obj_ids)),
                        stream.tracker.frame_index,
                    )
        for name, deadline in list(self._stored_deadline.items()):
            if now > deadline:
                del self._stored_deadline[name]
                self._store.drop_stream(name)
                log.info("stream %s: stored prompts dropped (no frame since the tracker started)", name)

    # ------------------------------------------------------------------------------------ control

    def _serve_control(self) -> None:
        """The control thread: answers every request at once, never waiting for the frame in progress."""
        while not self._stopping.is_set():
            try:
                for envelope, request, _request_id in self._control.requests(_POLL_SLICE_MS):
                    if isinstance(request, ProtocolError):  # already answered; one log line per field, with counts
                        cause = f"rejected malformed requests ({_field_of(request)})"
                        self._control_errors.count(cause, logging.INFO, detail=str(request))
                        continue
                    self._control.reply(envelope, self._answer(request))
                self._control_errors.flush()
            except Exception:  # never lose the control thread: every later prompt would go unanswered
                log.exception("control: failed serving requests")
                self._stopping.wait(0.1)

    def _answer(self, req: PromptRequest) -> PromptAnswer:
        with self._lock:
            stream = self._streams.get(req.stream)
            known = sorted(self._streams)
        if stream is None:
            shown = ", ".join(repr(n) for n in known[:20]) or "none yet"
            error = f"stream: unknown stream {req.stream!r} (no frame received from it; known: {shown})"
            return PromptAnswer(req.request_id, False, error)
        try:
            answer = stream.prompts.submit(req)
        except Exception as exc:
            log.exception("stream %s: %s failed", req.stream, req.op)
            return PromptAnswer(req.request_id, False, f"tracker: internal error ({exc!r})")
        log.debug("stream %s: %s %s -> %s", req.stream, req.op, req.request_id, answer)
        return answer

    # ------------------------------------------------------------------------------ heartbeat, stats

    def _beat(self) -> None:
        while True:  # the first at once: subscribers learn of a (re)started tracker before its first frame
            try:
                self._send_status()
            except Exception:  # keep beating: the next one may go through
                log.exception("heartbeat failed")
            if self._stopping.wait(self._heartbeat_s):
                return

    def stream_stats(self) -> dict[str, dict]:
        """Per stream: the heartbeat's fields plus ``busy_s``, the seconds spent tracking it so far (thread-safe)."""
        now = time.monotonic()
        busy_total = self._busy.total(now)
        with self._lock:
            return {name: {**s.status(now, busy_total), "busy_s": s.busy_s} for name, s in self._streams.items()}

    @property
    def store(self) -> PromptStore:
        """The streams' active prompts."""
        return self._store

    def _send_status(self) -> None:
        now = time.monotonic()
        busy_total = self._busy.total(now)
        with self._lock:
            streams: dict[str, dict] = {name: s.status(now, busy_total) for name, s in self._streams.items()}
            for name, source in self._sources.items():  # a camera failing before its first frame is listed too
                info = streams.setdefault(name, {})
                info.update(source=source.source, source_error=source.error)
                if info.get("source_fps") is None:  # measured from the frames when they come; else the capture's
                    info["source_fps"] = source.fps
            state = "serving" if self._make_tracker is not None else "loading"
            status = StatusMessage(self.name, time.time(), streams, self.instance, state, self.model)
            self._results.send_multipart(encode_status(status))

    def _log_stats(self) -> None:
        now = time.monotonic()
        for name, s in list(self._streams.items()):
            prompts = f"prompts {s.prompts.applied} applied, {s.prompts.failed} failed, {s.prompts.queued} queued"
            if not s.ages:
                log.info("stream %s: no frames in the last %.0f s; %s", name, self._stats_interval_s, prompts)
                continue
            age = np.percentile(np.array(s.ages) * 1000.0, [50, 95])
            latency = np.percentile(np.array(s.latencies) * 1000.0, [50, 95])
            with self._lock:
                fps = s.fps(now)
            log.info(
                "stream %s: %.1f fps; frame age at the tracker p50 %.0f ms p95 %.0f ms; capture to published "
                "p50 %.0f ms p95 %.0f ms; %d failures; %s",
                name,
                fps,
                *age,
                *latency,
                s.errors,
                prompts,
            )
            s.ages.clear()
            s.latencies.clear()
        if self._drain_stats.superseded:
            log.info("frames skipped for a newer one: %d in all", self._drain_stats.superseded)
        self._failures.flush()


def _field_of(error: ProtocolError | str) -> str:
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
    passthrough_objects: int = 0,
    limits: PromptLimits = PromptLimits(),
    max_streams: int = MAX_STREAMS,
    stream_idle_s: float = STREAM_IDLE_S,
    state_dir: str | None = None,
    keys: KeyFolder | None = None,
    insecure: bool = False,
    encoder: str = "torch",
    encoder_precision: str | None = None,
) -> None:
    """Bind, load the model, and serve until SIGINT/SIGTERM (from the main thread).

    Raises :class:`CannotStart` for what restarting cannot fix (an endpoint or option that is wrong, a
    non-loopback endpoint exposed without ``keys`` unless ``insecure``, a model that cannot be loaded),
    before anything is bound where it can; anything raised while serving is a crash.
    """
    try:
        security.check_exposure(
            [results_endpoint, control_endpoint], keys, insecure, "read the results and drive the tracker"
        )
        store = open_prompt_store(state_dir)
    except (ValueError, OSError) as exc:
        raise CannotStart(str(exc) if isinstance(exc, ValueError) else f"--state-dir {state_dir}: {exc}") from exc
    with StopSignals() as stop:
        try:
            service = TrackerService(
                results_endpoint,
                control_endpoint,
                prompts=prompts,
                name=name or f"{model}@{socket.gethostname()}",
                limits=limits,
                max_streams=max_streams,
                stream_idle_s=stream_idle_s,
                store=store,
                keys=keys,
            )
        except ValueError as exc:  # an endpoint or a --prompt; the message names it
            store.close()
            raise CannotStart(str(exc)) from exc
        with service:
            log.info("loading %s ...", model)
            service.start_loading(model)
            start = time.monotonic()
            try:
                with stop.interruptible():  # SIGTERM while loading stops us now, not after the load
                    make_tracker = tracker_factory(
                        model,
                        device,
                        encoder=encoder,
                        encoder_precision=encoder_precision,
                        passthrough_delay_s=passthrough_delay_s,
                        passthrough_object=passthrough_object,
                        passthrough_objects=passthrough_objects,
                    )
            except RuntimeError as exc:
                import models  # loaded by now unless the model was passthrough

                if isinstance(exc, models.ModelLoadError):  # says what to do (log in, fix the path)
                    raise CannotStart(f"cannot load the model: {exc}") from exc
                raise
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
        help="hub id, local folder, 'demo' (small trained model), 'tiny-random' (tests), or 'passthrough' (no model: "
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
    parser.add_argument(
        "--passthrough-objects",
        type=int,
        default=0,
        metavar="N",
        help="with --model passthrough: report N moving objects of varied sizes per frame (benchmarks)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="folder keeping each stream's active prompts, re-applied when the tracker restarts "
        "(default: none, prompts are lost on a restart; 'sam3-stream run' passes its own)",
    )
    limits = PromptLimits()
    parser.add_argument(
        "--max-objects", type=int, default=limits.max_objects, help="objects per stream (default %(default)s)"
    )
    parser.add_argument(
        "--max-concepts", type=int, default=limits.max_concepts, help="text concepts per stream (default %(default)s)"
    )
    parser.add_argument(
        "--max-text-chars",
        type=int,
        default=limits.max_text_chars,
        help="characters per text prompt (default %(default)s)",
    )
    parser.add_argument(
        "--max-points", type=int, default=limits.max_points, help="points per prompt (default %(default)s)"
    )
    parser.add_argument(
        "--max-streams", type=int, default=MAX_STREAMS, help="cameras served at once (default %(default)s)"
    )
    parser.add_argument(
        "--stream-idle-s",
        type=float,
        default=STREAM_IDLE_S,
        help="a stream without frames this long expires, freeing its slot and prompts (default %(default)s)",
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
    """Run the tracker service from parsed arguments; returns a process exit status (0 after a clean stop,
    2 when it refuses to start). A crash while serving raises."""
    if args.passthrough_delay_ms < 0:
        log.error("--passthrough-delay-ms: must be >= 0")
        return 2
    if not 0 <= args.passthrough_objects <= MAX_MOVING_OBJECTS:
        log.error("--passthrough-objects: must be between 0 and %d", MAX_MOVING_OBJECTS)
        return 2
    if args.model != PASSTHROUGH and (args.passthrough_delay_ms or args.passthrough_object or args.passthrough_objects):
        log.warning("--passthrough-* options apply to --model passthrough only; ignored")
    if args.model == PASSTHROUGH and (args.encoder != "torch" or args.encoder_precision):
        log.warning("--encoder options apply to real models only; ignored with --model passthrough")
    try:
        check_encoder_choice(args.encoder, args.encoder_precision)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        limits = PromptLimits(args.max_objects, args.max_concepts, args.max_text_chars, args.max_points)
    except ValueError as exc:
        log.error("--%s", str(exc).replace("_", "-"))
        return 2
    # Frames arrive as read-only views of the socket's buffers; the model only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    frames_endpoints = args.frames_endpoints or [_DEFAULTS.frames]
    try:
        keys = security.key_folder_from_args(args, [*frames_endpoints, args.results_endpoint, args.control_endpoint])
    except ValueError as exc:  # --keys: the message names the problem
        log.error("cannot start the tracker: %s", exc)
        return 2
    try:
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
            passthrough_objects=args.passthrough_objects,
            limits=limits,
            max_streams=args.max_streams,
            stream_idle_s=args.stream_idle_s,
            state_dir=args.state_dir,
            keys=keys,
            insecure=args.insecure,
            encoder=args.encoder,
            encoder_precision=args.encoder_precision,
        )
    except CannotStart as exc:
        log.error("cannot start the tracker: %s", exc)
        return 2
    except zmq.ZMQError as exc:  # a busy endpoint may free itself: worth a restart
        log.error("cannot open the tracker's sockets: %s", exc)
        return 1
    except KeyboardInterrupt:  # a signal during the model load, or a second one while stopping
        log.info("tracker stopped")
        return 130
    return 0
