"""The registry actor: which tracker holds which stream, failure detection, moves.

One Ray actor (restarted by Ray if it dies) polls every tracker actor every ``poll_s`` for its
report (instance id, assigned streams, seconds spent on each, active prompts). From those it keeps:

- the stream -> tracker map (:meth:`Registry.route_map`), versioned, which clients follow;
- each stream's cost (share of a frame budget, :mod:`streamer.cluster.placement`) and a copy of its
  active prompts, taken from the holder's reports and at every release;
- a log of moves (:meth:`Registry.health`).

A tracker whose report fails (its process died: Ray says so at once) or that answers with a new
``instance`` (it restarted between two polls) is *lost*: its streams go to the trackers with the most
spare budget, with their prompts. A tracker that answers again rejoins, and the cluster is rebalanced,
as when a tracker is added. Removing one drains it first (each stream released, then assigned).

The registry's own state is rebuilt from the trackers when Ray restarts it: they are named actors
(``TRACKER_PREFIX`` + name) and report their streams and prompts. Streams declared but not assigned
at that moment are not in any report: the ``cluster`` command declares its streams again.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from streamer.cluster.placement import Move, TrackerLoad, drain_moves, estimate_cost, place, rebalance
from streamer.protocol import MAX_NAME_CHARS

__all__ = ["REGISTRY_NAME", "TRACKER_PREFIX", "Registry", "check_stream"]

log = logging.getLogger(__name__)

TRACKER_PREFIX = "sam3-tracker-"
REGISTRY_NAME = "sam3-registry"
POLL_S = 0.25
CALL_TIMEOUT_S = 2.0  # a tracker call (assign, release) answered later than this failed
COST_WINDOW_S = 2.0  # a stream's cost is measured over at least this long
REBALANCE_S = 5.0  # how often the loads are evened out when costs change (a camera's objects, its rate)
REBALANCE_MARGIN = 0.1  # ... moving a stream only when it narrows the gap by this share of a frame budget
MOVES_KEPT = 200


@dataclass
class _Tracker:
    name: str
    handle: Any
    state: str = "starting"  # starting -> up -> (lost -> up)* -> draining
    info: dict = field(default_factory=dict)
    instance: str | None = None
    last_ok: float = 0.0  # monotonic, last good report
    failures: int = 0
    rebuilt: bool = False  # found when the registry restarted: its streams are adopted, nothing rebalanced


@dataclass(frozen=True)
class _Sample:
    busy_s: float  # seconds the holder spent on the stream so far
    tracked: int  # frames it tracked
    seq: int  # the newest tracked frame's capture sequence number
    t: float  # monotonic


@dataclass
class _Stream:
    name: str
    frames_endpoint: str
    tracker: str | None = None
    prompts: list[dict] | None = None  # the holder's prompt store export (journal records)
    cost: float | None = None  # share of a frame budget, measured
    sample: _Sample | None = None  # the holder's counters at the start of the cost window
    lost_from: str | None = None  # the tracker it was on when that tracker was lost


_ENDPOINT_RE = re.compile(r"tcp://[A-Za-z0-9.\-]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}|ipc://[^\x00]{1,100}")


def check_stream(name: object, frames_endpoint: object) -> None:
    """``ValueError`` naming the field unless ``name`` is a stream id the wire takes and ``frames_endpoint`` a
    tcp://HOST:PORT (or ipc:// on one host) endpoint to connect to."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"stream: expected 1 to {MAX_NAME_CHARS} printable characters, got {str(name)[:80]!r}")
    if not isinstance(frames_endpoint, str) or not _ENDPOINT_RE.fullmatch(frames_endpoint):
        raise ValueError(f"frames_endpoint: expected tcp://HOST:PORT or ipc://PATH, got {str(frames_endpoint)[:120]!r}")
    if frames_endpoint.startswith("tcp://") and not 0 < int(frames_endpoint.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"frames_endpoint: port out of range in {frames_endpoint!r}")


class Registry:
    """The cluster's stream -> tracker map and the decisions that change it. Thread-safe (Ray calls it
    from several threads; its own thread polls the trackers)."""

    def __init__(self, poll_s: float = POLL_S, dead_after_s: float = 1.0) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._poll_s, self._dead_after_s = poll_s, dead_after_s
        self._lock = threading.RLock()
        self._trackers: dict[str, _Tracker] = {}
        self._streams: dict[str, _Stream] = {}
        self._moves: deque[dict] = deque(maxlen=MOVES_KEPT)
        self._counters: Counter[str] = Counter()
        self._version = 0
        self._started = time.time()
        self._next_rebalance = time.monotonic() + REBALANCE_S
        self._stop = threading.Event()
        self._rebuild()
        self._thread = threading.Thread(target=self._monitor, name="registry monitor", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------- the API

    def add_tracker(self, name: str, *, rebuilt: bool = False) -> None:
        """Follow the tracker actor named ``TRACKER_PREFIX + name``; streams rebalance once it reports."""
        handle = ray.get_actor(TRACKER_PREFIX + name)
        with self._lock:
            if name not in self._trackers:
                self._trackers[name] = _Tracker(name, handle, rebuilt=rebuilt)
                log.info("tracker %s %s", name, "found (registry restarted)" if rebuilt else "added")

    def remove_tracker(self, name: str) -> list[dict]:
        """Drain ``name``: move each of its streams to the others; returns the moves. ``ValueError`` if unknown."""
        with self._lock:
            tracker = self._tracker(name)
            if self._streams_of(name) and not [
                t for t in self._trackers.values() if t.state == "up" and t is not tracker
            ]:
                raise ValueError(f"tracker: {name!r} is the last tracker up; its streams would have nowhere to go")
            tracker.state = "draining"
            loads = self._loads(include=("up", "draining"))
            done = [self._move(m, f"tracker {name} removed (drained)") for m in drain_moves(loads, name)]
            del self._trackers[name]
            self._version += 1
            return [m for m in done if m is not None]

    def add_stream(self, name: str, frames_endpoint: str) -> str | None:
        """Declare a stream (idempotent) and place it; returns its tracker (``None``: none is up yet)."""
        check_stream(name, frames_endpoint)
        with self._lock:
            stream = self._streams.get(name)
            if stream is None:
                self._streams[name] = _Stream(name, frames_endpoint)
                self._version += 1
            elif stream.frames_endpoint != frames_endpoint:
                raise ValueError(f"stream: {name!r} is already declared with frames endpoint {stream.frames_endpoint}")
            self._place_unassigned()
            return self._streams[name].tracker

    def remove_stream(self, name: str) -> None:
        """Stop serving a stream. ``ValueError`` if unknown."""
        with self._lock:
            stream = self._streams.pop(name, None)
            if stream is None:
                raise ValueError(f"stream: unknown stream {name!r}")
            if stream.tracker is not None and stream.tracker in self._trackers:
                self._call(self._trackers[stream.tracker].handle.release.remote(name))
            self._version += 1

    def route_map(self) -> dict[str, Any]:
        """What clients follow: ``version`` and per stream its tracker and that tracker's endpoints."""
        with self._lock:
            trackers = {
                t.name: {
                    "state": t.state,
                    "results_endpoint": t.info.get("results_endpoint"),
                    "control_endpoint": t.info.get("control_endpoint"),
                }
                for t in self._trackers.values()
            }
            streams = {
                s.name: {"tracker": s.tracker, **trackers.get(s.tracker or "", {})} for s in self._streams.values()
            }
            for route in streams.values():
                route.pop("state", None)
            return {"version": self._version, "streams": streams, "trackers": trackers}

    def health(self) -> dict[str, Any]:
        """Trackers (state, load, spare budget, streams), streams (tracker, cost, prompts), recent moves, counters."""
        with self._lock:
            loads = {t.name: t for t in self._loads(include=("starting", "up", "lost", "draining"))}
            cost = estimate_cost(list(loads.values()))
            return {
                "version": self._version,
                "started": self._started,
                "pid": os.getpid(),
                "trackers": {
                    t.name: {
                        "state": t.state,
                        "instance": t.instance,
                        "host": t.info.get("host"),
                        "pid": t.info.get("pid"),
                        "failures": t.failures,
                        "load": round(loads[t.name].load(cost), 4),
                        "spare": round(loads[t.name].spare(cost), 4),
                        "streams": sorted(loads[t.name].streams),
                    }
                    for t in self._trackers.values()
                },
                "streams": {
                    s.name: {
                        "tracker": s.tracker,
                        "frames_endpoint": s.frames_endpoint,
                        "cost": None if s.cost is None else round(s.cost, 4),
                        "prompts": len(s.prompts or []) - (1 if s.prompts else 0),  # less the leading reset
                    }
                    for s in self._streams.values()
                },
                "moves": list(self._moves),
                "counters": dict(self._counters),
            }

    def stop(self) -> None:
        """Stop polling (before the cluster shuts down)."""
        self._stop.set()

    # ---------------------------------------------------------------------------------- monitor

    def _monitor(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._poll()
            except Exception:  # never stop watching: the next poll may go through
                log.exception("registry: poll failed")

    def _poll(self) -> None:
        with self._lock:
            trackers = list(self._trackers.values())
        refs = {t.name: t.handle.report.remote() for t in trackers}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self._dead_after_s)
        with self._lock:
            for tracker in trackers:
                if self._trackers.get(tracker.name) is not tracker:
                    continue  # removed meanwhile
                try:
                    report = ray.get(refs[tracker.name], timeout=0)
                except (RayError, GetTimeoutError) as exc:
                    self._on_silence(tracker, exc)
                    continue
                self._on_report(tracker, report)
            self._place_unassigned()
            if time.monotonic() >= self._next_rebalance:
                self._next_rebalance = time.monotonic() + REBALANCE_S
                if all(s.cost is not None for s in self._streams.values() if s.tracker is not None):
                    self._rebalance("loads changed", margin=REBALANCE_MARGIN)

    def _on_silence(self, tracker: _Tracker, exc: Exception) -> None:
        silent_for = time.monotonic() - tracker.last_ok
        if tracker.state == "up" and (not isinstance(exc, GetTimeoutError) or silent_for > self._dead_after_s):
            self._lose(tracker, f"no report ({type(exc).__name__})")

    def _on_report(self, tracker: _Tracker, report: dict) -> None:
        tracker.last_ok = time.monotonic()
        if tracker.instance is not None and report["instance"] != tracker.instance and tracker.state == "up":
            self._lose(tracker, "restarted (new instance)")
        if tracker.state in ("starting", "lost"):
            try:
                tracker.info = self._call(tracker.handle.info.remote())
            except (RayError, GetTimeoutError):
                return
            back = tracker.state == "lost"
            tracker.state, tracker.instance = "up", report["instance"]
            self._version += 1
            log.info("tracker %s %s: %s", tracker.name, "is back" if back else "is up", tracker.info)
            self._adopt(tracker, report)
            if not tracker.rebuilt:
                self._rebalance(f"tracker {tracker.name} {'back' if back else 'added'}")
            tracker.rebuilt = False
            return
        self._adopt(tracker, report)

    def _adopt(self, tracker: _Tracker, report: dict) -> None:
        """Take the report's prompts and costs; adopt streams nobody holds (a rebuilt registry); release
        streams the tracker still serves that are held elsewhere (it was thought lost and came back)."""
        now = time.monotonic()
        for name, entry in report["streams"].items():
            stream = self._streams.get(name)
            if stream is None:
                stream = self._streams[name] = _Stream(name, entry["frames_endpoint"], tracker.name)
                self._version += 1
            if stream.tracker is None:
                stream.tracker = tracker.name
                self._version += 1
            if stream.tracker != tracker.name:
                self._call_quietly(tracker.handle.release.remote(name))
                continue
            if entry["prompts"] is not None:
                stream.prompts = entry["prompts"]
            self._measure(stream, entry["stats"], now)

    @staticmethod
    def _measure(stream: _Stream, stats: dict | None, now: float) -> None:
        """The stream's cost: seconds per tracked frame times the camera's frame rate (from capture sequence
        numbers), so an overloaded tracker that skips frames still sees what the stream needs, not what it got."""
        if not stats or stats.get("last_seq") is None:
            return
        sample = _Sample(stats["busy_s"], stats["frames_tracked"], stats["last_seq"], now)
        last = stream.sample
        if last is None or sample.seq < last.seq or sample.tracked < last.tracked:  # moved, or capture restarted
            stream.sample = sample
        elif now - last.t >= COST_WINDOW_S and sample.tracked > last.tracked:
            per_frame = (sample.busy_s - last.busy_s) / (sample.tracked - last.tracked)
            stream.cost = per_frame * (sample.seq - last.seq) / (now - last.t)
            stream.sample = sample

    def _lose(self, tracker: _Tracker, why: str) -> None:
        tracker.state, tracker.failures = "lost", tracker.failures + 1
        self._counters["tracker_failures"] += 1
        orphans = [s for s in self._streams.values() if s.tracker == tracker.name]
        log.warning("tracker %s lost (%s); moving %d streams", tracker.name, why, len(orphans))
        for stream in orphans:
            stream.tracker, stream.sample, stream.lost_from = None, None, tracker.name
        self._version += 1
        self._place_unassigned(f"tracker {tracker.name} lost: {why}")

    # ------------------------------------------------------------------------------------ moves

    def _place_unassigned(self, reason: str = "placed") -> None:
        for stream in [s for s in self._streams.values() if s.tracker is None]:
            loads = self._loads()
            if not loads:
                return
            self._move(Move(stream.name, stream.lost_from, place(loads)), reason, source_alive=False)

    def _rebalance(self, reason: str, margin: float = 0.0) -> None:
        for move in rebalance(self._loads(), margin=margin):
            self._move(move, f"rebalanced: {reason}")

    def _move(self, move: Move, reason: str, *, source_alive: bool = True) -> dict | None:
        """Release on the source (taking its newest prompts), assign on the target; log the move."""
        stream, started = self._streams[move.stream], time.monotonic()
        source = self._trackers.get(move.source) if move.source is not None and source_alive else None
        if source is not None:
            try:
                exported = self._call(source.handle.release.remote(stream.name))
                stream.prompts = exported if exported is not None else stream.prompts
            except (RayError, GetTimeoutError):
                pass  # unreachable: the registry's copy of its prompts will do
        target = self._trackers[move.target]
        try:
            self._call(target.handle.assign.remote(stream.name, stream.frames_endpoint, stream.prompts))
        except RayTaskError as exc:
            if stream.prompts is None:
                log.warning("stream %s: %s refused it (%s); retrying", stream.name, target.name, exc)
                stream.tracker, stream.lost_from = None, move.source
                return None
            # The tracker refused the prompts (a ValueError naming the record): moved without them.
            log.warning("stream %s: %s refused its prompts (%s); moved without them", stream.name, target.name, exc)
            stream.prompts = None
            return self._move(move, reason, source_alive=False)
        except (RayError, GetTimeoutError) as exc:
            log.warning("stream %s: could not assign it to %s (%s); retrying", stream.name, target.name, exc)
            stream.tracker, stream.lost_from = None, move.source
            return None
        stream.tracker, stream.sample, stream.lost_from = target.name, None, None
        self._version += 1
        record = {
            "t": time.time(),
            "stream": stream.name,
            "from": move.source,
            "to": target.name,
            "reason": reason,
            "prompts": max(0, len(stream.prompts or []) - 1),
            "took_s": round(time.monotonic() - started, 4),
        }
        self._moves.append(record)
        self._counters["moves" if move.source is not None else "placements"] += 1
        log.info("stream %s: %s -> %s (%s)", stream.name, move.source, target.name, reason)
        return record

    # -------------------------------------------------------------------------------- internals

    def _loads(self, include: tuple[str, ...] = ("up",)) -> list[TrackerLoad]:
        loads = {t.name: TrackerLoad(t.name) for t in self._trackers.values() if t.state in include}
        for stream in self._streams.values():
            if stream.tracker in loads:
                loads[stream.tracker].streams[stream.name] = stream.cost
        return list(loads.values())

    def _streams_of(self, tracker: str) -> list[str]:
        return [s.name for s in self._streams.values() if s.tracker == tracker]

    def _tracker(self, name: str) -> _Tracker:
        tracker = self._trackers.get(name)
        if tracker is None:
            raise ValueError(f"tracker: unknown tracker {name!r} (known: {', '.join(sorted(self._trackers))})")
        return tracker

    @staticmethod
    def _call(ref: Any) -> Any:
        return ray.get(ref, timeout=CALL_TIMEOUT_S)

    def _call_quietly(self, ref: Any) -> None:
        try:
            self._call(ref)
        except (RayError, GetTimeoutError) as exc:
            log.info("registry: a tracker call failed: %s", exc)

    def _rebuild(self) -> None:
        """After a restart: follow the named tracker actors; their first reports bring back streams and prompts."""
        for name in ray.util.list_named_actors():
            if name.startswith(TRACKER_PREFIX):
                self.add_tracker(name[len(TRACKER_PREFIX) :], rebuilt=True)
