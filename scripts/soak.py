#!/usr/bin/env python
"""Soak: the whole pipeline for ``--minutes`` under viewers that come and go and a steady stream of valid
and hostile prompts, watching every process's memory.

It runs ``sam3-stream run`` (capture, tracker and gateway over ipc:// in a private folder; HTTP and WebRTC
on 127.0.0.1 only) with a synthetic source and ``--model tiny-random`` (or ``passthrough``, no model), then:

- viewers: ``--viewers`` aiortc clients connect, watch for most of each ``--viewer-cycle`` seconds, and
  leave; then the next cycle starts;
- prompts on the data channel, ``--prompt-rate`` a second in all, half valid (clicks that add an object,
  removals of those objects, a reset now and then) and half hostile (malformed JSON, 100 KB messages,
  ids of 2^63-1, deep nesting, a lone surrogate, unknown ops, coordinates of 1e308);
- prompts on the control socket at the same rate, again half valid and half hostile (malformed headers,
  parts over the socket's size limit, huge ids, unknown ops and versions).

Every ``--sample`` seconds it prints one JSON line: the RSS of each process (supervisor, capture, tracker,
gateway, and this script), viewers connected, frames delivered per second per viewer, the gateway's results
fps, and the answers so far. The last line is the summary: RSS per process in the first and last fifth of
the run (medians) and the growth between them, delivered fps, answer latencies (p50/p95/p99/max) per
channel, unanswered messages, restarts, and a verdict: ``pass`` unless a process grew more than
``--max-growth-mb`` and ``--max-growth-pct`` both, restarted, or a message that should be answered was not.

Bounded in time (``--minutes``, at most a day), in messages (``--max-messages``) and in viewers (at most 8);
everything it starts is stopped when it ends, also on Ctrl-C or SIGTERM (the summary is still printed).

    python scripts/soak.py --minutes 3
    python scripts/soak.py --minutes 30 --model passthrough --viewers 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import zmq
import zmq.asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streamer.gateway.ice import gather_on
from streamer.protocol import PromptRequest, decode_answer, new_request_id
from streamer.transport import MAX_CONTROL_PART_BYTES, AsyncPromptClient, control_requester

REPO = Path(__file__).resolve().parents[1]
ROLES = {"capture": "capture", "track": "tracker", "serve": "gateway"}  # CLI command -> role
MAX_VIEWERS = 8
MAX_MINUTES = 24 * 60
ANSWER_TIMEOUT_S = 10.0  # a message still unanswered after this is counted as unanswered
QUIET_BEFORE_LEAVING_S = 2.0  # a viewer stops prompting this long before it leaves, so answers can land
HUGE = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass
class Channel:
    """Messages sent on one channel (data channel or control socket) and the answers they got."""

    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    unanswered_by_kind: Counter[str] = field(default_factory=Counter)
    cut_off: int = 0  # parts over the size limit: the socket drops the peer, no answer is due
    unmatched: int = 0  # answers whose id matches nothing sent (e.g. id null for a message whose id was readable)
    ok: int = 0
    refused: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def answer(self, latency_s: float, ok: bool) -> None:
        self.answered += 1
        self.latencies_ms.append(latency_s * 1000.0)
        if ok:
            self.ok += 1
        else:
            self.refused += 1

    def missed(self, kind: str) -> None:
        self.unanswered += 1
        self.unanswered_by_kind[kind] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "unanswered": self.unanswered,
            "unanswered_by_kind": dict(sorted(self.unanswered_by_kind.items())),
            "cut_off": self.cut_off,
            "unmatched_answers": self.unmatched,
            "ok": self.ok,
            "refused": self.refused,
            "latency_ms": percentiles(self.latencies_ms),
            "by_kind": dict(sorted(self.kinds.items())),
        }


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    array = np.array(values)
    p50, p95, p99 = (round(float(v), 1) for v in np.percentile(array, [50, 95, 99]))
    return {"n": len(values), "p50": p50, "p95": p95, "p99": p99, "max": round(float(array.max()), 1)}


@dataclass
class Soak:
    """Everything measured, shared by the tasks."""

    data_channel: Channel = field(default_factory=Channel)
    control: Channel = field(default_factory=Channel)
    frames_delivered: int = 0
    viewer_fps: list[float] = field(default_factory=list)  # per viewer visit
    viewer_failures: list[str] = field(default_factory=list)
    viewers_connected: int = 0
    visits: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    pids: dict[str, set[int]] = field(default_factory=dict)  # role -> every pid seen
    budget: int = 0  # messages left to send (both channels)
    task_failures: list[str] = field(default_factory=list)
    pipeline_exited: int | None = None  # the supervisor's exit status, if it stopped before the end

    def spend(self) -> bool:
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


# --------------------------------------------------------------------------------------------------
# Processes


def children_of(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` -> their command line (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return None


def role_pids(run_pid: int) -> dict[str, int]:
    """The supervisor and its capture, tracker and gateway children: role -> pid."""
    pids = {"supervisor": run_pid, "soak": os.getpid()}
    for pid, command in children_of(run_pid).items():
        match = re.search(r"streamer\.cli (\w+)", command)
        if match and match[1] in ROLES:
            pids[ROLES[match[1]]] = pid
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url}health", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def stop(proc: subprocess.Popen, pids_seen: dict[str, set[int]]) -> None:
    """SIGINT the supervisor (it stops its children), then make sure nothing it started is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for role, pids in pids_seen.items():
        if role in ("supervisor", "soak"):
            continue
        for pid in pids:  # children the supervisor failed to stop: ours by pid, never by name
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Hostile and valid messages


DATA_CHANNEL_HOSTILE = (
    "malformed_json",
    "oversized",
    "huge_obj_id",
    "nested",
    "lone_surrogate",
    "unknown_op",
    "huge_coordinates",
    "outside_frame",
    "negative_obj_id",
)
CONTROL_HOSTILE = ("malformed_header", "oversized_part", "huge_obj_id", "unknown_op", "wrong_version", "extra_parts")


def hostile_data_message(kind: str, n: int, width: int) -> tuple[str, str | None]:
    """A hostile data-channel message: (text, the id its answer should carry, or None when unreadable)."""
    rid = f"{kind[0]}{n}"
    click = {"points": [[4, 4]], "point_labels": [1]}
    if kind == "malformed_json":
        return '{"op": "add_prompt", "id": ', None
    if kind == "nested":
        return "[" * 20000 + "]" * 20000, None
    fields: dict[str, Any] = {
        "oversized": {"op": "add_prompt", "pad": "x" * 100_000},
        "huge_obj_id": {"op": "add_prompt", "prompt": {**click, "obj_id": HUGE}},
        "lone_surrogate": {"op": "add_prompt", "prompt": {"text": "\ud800"}},  # json.dumps escapes it as \\ud800
        "unknown_op": {"op": "fly"},
        "huge_coordinates": {"op": "add_prompt", "prompt": {"points": [[1e308, 4]], "point_labels": [1]}},
        "outside_frame": {"op": "add_prompt", "prompt": {"points": [[width * 3, 4]], "point_labels": [1]}},
        "negative_obj_id": {"op": "remove_object", "obj_id": -1},
    }[kind]
    return json.dumps({**fields, "id": rid}), rid


def hostile_control_request(kind: str, stream: str) -> tuple[list[bytes], bool]:
    """A hostile control request: (parts, whether an answer is due; a part over the limit is cut off)."""
    header = {"v": 1, "kind": "prompt", "stream": stream, "request_id": new_request_id()}
    if kind == "malformed_header":
        return [b"\xff{not json"], True
    if kind == "oversized_part":
        return [b"x" * (MAX_CONTROL_PART_BYTES + 1)], False
    if kind == "extra_parts":
        return [b"{}", b"x", b"y"], True
    fields = {
        "huge_obj_id": {"op": "remove_object", "obj_id": HUGE},
        "unknown_op": {"op": "fly"},
        "wrong_version": {"v": 99},
    }[kind]
    return [json.dumps({**header, **fields}).encode()], True


# --------------------------------------------------------------------------------------------------
# Viewers


class Viewer:
    """An aiortc client of the gateway: counts decoded frames, sends prompts, times their answers."""

    def __init__(self, soak: Soak, width: int, height: int) -> None:
        self.soak, self.width, self.height = soak, width, height
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("prompts")
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames = 0
        self.objects: list[int] = []  # ids our own clicks created
        self._pending: dict[str, tuple[float, str]] = {}  # id -> (sent, monotonic; kind)
        self._pending_anonymous: deque[tuple[float, str]] = deque()  # messages whose id cannot be read back
        self._track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pc.on("track", lambda track: self._track.done() or self._track.set_result(track))
        self.channel.on("message", self._on_message)
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, url: str) -> None:
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.channel.on("open", lambda: opened.done() or opened.set_result(None))
        with gather_on(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
            async with http.post(f"{url}offer", json=offer) as response:
                if response.status != 200:
                    raise RuntimeError(f"/offer answered {response.status}: {(await response.text())[:200]}")
                answer = await response.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(opened, 20)
        track = await asyncio.wait_for(self._track, 20)
        self._reader = asyncio.create_task(self._read(track))

    async def _read(self, track: Any) -> None:
        with contextlib.suppress(Exception):  # the track ends when we close
            while True:
                await track.recv()
                self.frames += 1
                self.soak.frames_delivered += 1

    def send(self, text: str, request_id: str | None, kind: str) -> None:
        channel = self.soak.data_channel
        channel.sent += 1
        channel.kinds[kind] += 1
        if request_id is None:
            self._pending_anonymous.append((time.monotonic(), kind))
        else:
            self._pending[request_id] = (time.monotonic(), kind)
        self.channel.send(text)

    def send_valid(self, number: int) -> None:
        """A click that adds an object, a removal of one of ours, or (every 25th) a reset."""
        request_id = f"v{number}"
        if number % 25 == 24:
            message: dict[str, Any] = {"op": "reset_session"}
            kind = "reset_session"
        elif self.objects and (number // 2) % 2:  # valid messages take every other number
            message, kind = {"op": "remove_object", "obj_id": self.objects.pop(0)}, "remove_object"
        else:
            x, y = (number * 37) % self.width, (number * 53) % self.height
            message, kind = {"op": "add_prompt", "prompt": {"points": [[x, y]], "point_labels": [1]}}, "add_click"
        self.send(json.dumps({**message, "id": request_id}), request_id, kind)

    def _on_message(self, text: str) -> None:
        message = json.loads(text)
        if message.get("type") != "answer":
            return
        request_id = message.get("id")
        if request_id is None and self._pending_anonymous:
            sent, kind = self._pending_anonymous.popleft()  # in order: a close enough match for a latency
        elif request_id in self._pending:
            sent, kind = self._pending.pop(request_id)
        else:
            self.soak.data_channel.unmatched += 1  # late (counted unanswered already), or the id was lost
            return
        self.soak.data_channel.answer(time.monotonic() - sent, bool(message.get("ok")))
        if kind == "add_click" and message.get("ok"):
            self.objects.extend(message.get("obj_ids") or [])
            del self.objects[:-4]  # keep few objects: a soak, not an object-count benchmark

    def expire(self, now: float = math.inf, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        """Count as unanswered what has waited longer than ``timeout_s`` (everything, by default)."""
        for rid, (sent, kind) in list(self._pending.items()):
            if now - sent > timeout_s:
                del self._pending[rid]
                self.soak.data_channel.missed(kind)
        while self._pending_anonymous and now - self._pending_anonymous[0][0] > timeout_s:
            self.soak.data_channel.missed(self._pending_anonymous.popleft()[1])

    async def close(self) -> None:
        self.expire()
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def viewer_cycles(url: str, soak: Soak, args: argparse.Namespace, deadline: float) -> None:
    """Viewers connect, prompt, go quiet, leave; again until the deadline."""
    hostile = itertools.cycle(args.data_kinds)
    counter = itertools.count()
    while (stay := min(args.viewer_cycle * 0.8, deadline - time.monotonic())) >= QUIET_BEFORE_LEAVING_S + 1:
        viewers = [Viewer(soak, args.width, args.height) for _ in range(args.viewers)]
        joined = time.monotonic()
        try:
            outcomes = await asyncio.gather(*(v.connect(url) for v in viewers), return_exceptions=True)
            failed = [f"{type(o).__name__}: {o}"[:200] for o in outcomes if isinstance(o, BaseException)]
            soak.viewer_failures += failed
            connected = [v for v, o in zip(viewers, outcomes, strict=True) if not isinstance(o, BaseException)]
            soak.viewers_connected, soak.visits = len(connected), soak.visits + len(connected)
            while connected and time.monotonic() < joined + stay - QUIET_BEFORE_LEAVING_S:
                if gone := [v for v in connected if v.channel.readyState != "open"]:
                    soak.viewer_failures += ["the gateway closed a viewer's data channel"] * len(gone)
                    connected = [v for v in connected if v not in gone]
                    continue
                n = next(counter)
                viewer = connected[n % len(connected)]
                if soak.spend():
                    if n % 2 and args.data_kinds:
                        kind = next(hostile)
                        viewer.send(*hostile_data_message(kind, n, args.width), kind)
                    else:
                        viewer.send_valid(n)
                for v in connected:
                    v.expire(time.monotonic())
                await asyncio.sleep(1.0 / args.prompt_rate)
            await asyncio.sleep(max(0.0, joined + stay - time.monotonic()))
            soak.viewer_fps += [v.frames / (time.monotonic() - joined) for v in connected]
        finally:
            soak.viewers_connected = 0
            for viewer in viewers:
                await viewer.close()
        await asyncio.sleep(min(args.viewer_cycle * 0.2, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------------------------------
# The control socket


async def control_prompts(endpoint: str, soak: Soak, args: argparse.Namespace, deadline: float) -> None:
    """Valid requests through the lazy pirate client and hostile ones on raw REQ sockets, alternating."""
    context = zmq.asyncio.Context()
    client = AsyncPromptClient(endpoint, timeout_s=3.0, retries=2, context=context)
    hostile = itertools.cycle(args.control_kinds)
    channel = soak.control
    try:
        for n in itertools.count():
            if time.monotonic() >= deadline or not soak.spend():
                return
            start = time.monotonic()
            channel.sent += 1
            if n % 2 == 0 or not args.control_kinds:
                request = _valid_control_request(n, args)
                channel.kinds[request.op] += 1
                try:
                    answer = await client.request(request)
                    channel.answer(time.monotonic() - start, answer.ok)
                except TimeoutError:
                    channel.missed(request.op)
            else:
                kind = next(hostile)
                channel.kinds[kind] += 1
                parts, answer_due = hostile_control_request(kind, args.stream_id)
                sock = control_requester(endpoint, context=context)
                try:
                    await sock.send_multipart(parts)
                    if await sock.poll(int(ANSWER_TIMEOUT_S * 1000) if answer_due else 1000):
                        answer = decode_answer(await sock.recv_multipart())
                        channel.answer(time.monotonic() - start, answer.ok)
                    elif answer_due:
                        channel.missed(kind)
                    else:
                        channel.cut_off += 1
                finally:
                    sock.close(linger=0)
            await asyncio.sleep(max(0.0, start + 1.0 / args.prompt_rate - time.monotonic()))
    finally:
        client.close()
        context.destroy(linger=0)


def _valid_control_request(n: int, args: argparse.Namespace) -> PromptRequest:
    """A robot's prompts: refine (or create) object 1000+k with a click, then remove it."""
    from models import Prompt  # the prompt vocabulary only; no model is loaded here

    obj_id = 1000 + (n // 4) % 4
    if n % 4 == 0:
        x, y = (n * 29) % args.width, (n * 31) % args.height
        prompt = Prompt.from_dict({"points": [[x, y]], "point_labels": [1], "obj_id": obj_id})
        return PromptRequest(new_request_id(), args.stream_id, "add_prompt", prompt)
    return PromptRequest(new_request_id(), args.stream_id, "remove_object", obj_id=obj_id)


# --------------------------------------------------------------------------------------------------
# Sampling and the summary


async def sampler(proc: subprocess.Popen, url: str, soak: Soak, args: argparse.Namespace, deadline: float) -> None:
    """Sample until the deadline, or until the pipeline stops by itself."""
    start = time.monotonic()
    last_frames, last_t = 0, start
    while True:
        now = time.monotonic()
        if proc.poll() is not None:
            soak.pipeline_exited = proc.returncode
            return
        pids = role_pids(proc.pid)
        for role, pid in pids.items():
            soak.pids.setdefault(role, set()).add(pid)
        state = await asyncio.get_running_loop().run_in_executor(None, health, url)
        frames = soak.frames_delivered
        viewers = max(soak.viewers_connected, 1)
        sample = {
            "t_s": round(now - start, 1),
            "rss_mb": {role: rss_mb(pid) for role, pid in sorted(pids.items())},
            "viewers": soak.viewers_connected,
            "delivered_fps_per_viewer": round((frames - last_frames) / max(now - last_t, 1e-6) / viewers, 2),
            "results_fps": state and state.get("fps"),
            "feed": state and state.get("state"),
            "answered": {"data_channel": soak.data_channel.answered, "control": soak.control.answered},
            "unanswered": {"data_channel": soak.data_channel.unanswered, "control": soak.control.unanswered},
        }
        soak.samples.append(sample)
        print(json.dumps(sample), flush=True)
        last_frames, last_t = frames, now
        if now >= deadline:
            return
        await asyncio.sleep(min(args.sample, max(0.0, deadline - time.monotonic())))


def rss_growth(samples: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Per process: median RSS of the first and last fifth of the samples, the growth, and what failed."""
    fifth = max(1, len(samples) // 5)
    report, failures = {}, []
    roles = sorted({role for s in samples for role in s["rss_mb"]})
    for role in roles:
        first = [s["rss_mb"].get(role) for s in samples[:fifth]]
        last = [s["rss_mb"].get(role) for s in samples[-fifth:]]
        first, last = [v for v in first if v is not None], [v for v in last if v is not None]
        if not first or not last:
            continue
        a, b = float(np.median(first)), float(np.median(last))
        growth_pct = 100.0 * (b - a) / a if a else 0.0
        report[role] = {
            "first_fifth_mb": round(a, 1),
            "last_fifth_mb": round(b, 1),
            "growth_mb": round(b - a, 1),
            "growth_pct": round(growth_pct, 1),
            "max_mb": max(v for s in samples if (v := s["rss_mb"].get(role)) is not None),
        }
        if b - a > args.max_growth_mb and growth_pct > args.max_growth_pct:
            failures.append(f"{role}: RSS grew {b - a:.1f} MB ({growth_pct:.0f}%) from the first fifth to the last")
    return report, failures


def summarize(soak: Soak, args: argparse.Namespace, minutes: float) -> dict[str, Any]:
    rss, failures = rss_growth(soak.samples, args)
    restarts = {role: len(pids) - 1 for role, pids in soak.pids.items() if role not in ("soak", "supervisor")}
    for role, count in restarts.items():
        if count:
            failures.append(f"{role}: restarted {count} times")
    for name, channel in (("data channel", soak.data_channel), ("control socket", soak.control)):
        if channel.unanswered:
            failures.append(f"{name}: {channel.unanswered} messages never answered")
    if soak.viewer_failures:
        failures.append(
            f"viewers: {len(soak.viewer_failures)} failed or were cut off (first: {soak.viewer_failures[0]})"
        )
    fifth = max(1, len(soak.samples) // 5)
    if soak.samples and not any(s["results_fps"] for s in soak.samples[-fifth:]):
        failures.append("results: none in the last fifth of the run (the tracker stopped tracking)")
    if soak.pipeline_exited is not None:
        failures.append(f"the pipeline stopped early (sam3-stream run exited with status {soak.pipeline_exited})")
    failures += [f"soak task failed: {failure}" for failure in soak.task_failures]
    fps = soak.viewer_fps
    if not fps or max(fps) == 0:
        failures.append("viewers: no frame delivered")
    return {
        "summary": True,
        "minutes": round(minutes, 2),
        "model": args.model,
        "source": f"synthetic:{args.width}x{args.height}@{args.fps:g}",
        "hostile_kinds": {"data_channel": list(args.data_kinds), "control": list(args.control_kinds)},
        "samples": len(soak.samples),
        "rss_mb": rss,
        "restarts": restarts,
        "viewer_visits": soak.visits,
        "delivered_fps_per_viewer": percentiles(fps) if fps else None,
        "results_fps_median": _median([s["results_fps"] for s in soak.samples if s["results_fps"] is not None]),
        "data_channel": soak.data_channel.summary(),
        "control": soak.control.summary(),
        "verdict": "fail" if failures else "pass",
        "failures": failures,
    }


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 2) if values else None


# --------------------------------------------------------------------------------------------------
# Main


async def soak_pipeline(
    proc: subprocess.Popen, url: str, control: str, args: argparse.Namespace, stopping: asyncio.Event
) -> Soak:
    soak = Soak(budget=args.max_messages)
    deadline = time.monotonic() + args.minutes * 60.0
    tasks = [
        asyncio.create_task(sampler(proc, url, soak, args, deadline)),
        asyncio.create_task(viewer_cycles(url, soak, args, deadline)),
        asyncio.create_task(control_prompts(control, soak, args, deadline)),
    ]
    stopper = asyncio.create_task(stopping.wait())
    await asyncio.wait([tasks[0], stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopper]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            soak.task_failures.append(repr(result))
            traceback.print_exception(result, file=sys.stderr)
    return soak


def start_pipeline(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    """``sam3-stream run``; waits for a live feed. Returns the process, the page URL and the control endpoint."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "streamer.cli", "run", "--model", args.model, "--device", args.device]
    command += ["--source", f"synthetic:{args.width}x{args.height}@{args.fps:g}", "--stream-id", args.stream_id]
    command += ["--http-host", "127.0.0.1", "--http-port", str(port)]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO
        )
    deadline = time.monotonic() + args.startup_timeout
    control = None
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pipeline did not go live; see {log_path}")
        if control is None:
            found = re.search(r"subscribe to results at ipc://(\S+)/results", log_path.read_text(errors="replace"))
            control = found and f"ipc://{found[1]}/control"
        if control and (state := health(url)) and state.get("state") == "live":
            return proc, url, control
        time.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to soak (default %(default)s)")
    parser.add_argument("--model", default="tiny-random", help="tiny-random or passthrough (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="tracker device (default %(default)s)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=float, default=15.0, help="capture rate (default %(default)s)")
    parser.add_argument("--stream-id", default="cam0")
    parser.add_argument("--viewers", type=int, default=2, help=f"viewers per cycle, at most {MAX_VIEWERS}")
    parser.add_argument("--viewer-cycle", type=float, default=20.0, help="seconds per viewer cycle")
    parser.add_argument("--prompt-rate", type=float, default=4.0, help="messages per second per channel")
    parser.add_argument("--max-messages", type=int, default=200_000, help="messages in all, both channels")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--max-growth-mb", type=float, default=30.0)
    parser.add_argument("--max-growth-pct", type=float, default=15.0)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--log", type=Path, default=None, help="keep the pipeline's log here (default: a temp file)")
    parser.add_argument(
        "--skip",
        default="",
        metavar="KINDS",
        help="comma-separated hostile kinds not to send (data channel: "
        f"{', '.join(DATA_CHANNEL_HOSTILE)}; control: {', '.join(CONTROL_HOSTILE)})",
    )
    args = parser.parse_args(argv)
    skip = {kind.strip() for kind in args.skip.split(",") if kind.strip()}
    if unknown := skip - set(DATA_CHANNEL_HOSTILE) - set(CONTROL_HOSTILE):
        parser.error(f"--skip: unknown kinds {sorted(unknown)}")
    args.data_kinds = tuple(k for k in DATA_CHANNEL_HOSTILE if k not in skip)
    args.control_kinds = tuple(k for k in CONTROL_HOSTILE if k not in skip)
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes: between 0 and {MAX_MINUTES}")
    if not 1 <= args.viewers <= MAX_VIEWERS:
        parser.error(f"--viewers: between 1 and {MAX_VIEWERS}")
    if not 0 < args.prompt_rate <= 50:
        parser.error("--prompt-rate: between 0 and 50 a second")
    if args.viewer_cycle < 5 or args.sample <= 0 or args.max_messages < 0:
        parser.error("--viewer-cycle: at least 5 s; --sample and --max-messages: positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log_path = args.log or Path(tmp) / "pipeline.log"
        print(f"soak: starting sam3-stream run --model {args.model} (log: {log_path})", file=sys.stderr, flush=True)
        proc, url, control = start_pipeline(args, log_path)
        pids_seen: dict[str, set[int]] = {}
        started = time.monotonic()
        soak = Soak()
        try:
            loop = asyncio.new_event_loop()
            stopping = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
            try:
                soak = loop.run_until_complete(soak_pipeline(proc, url, control, args, stopping))
            finally:
                loop.close()
            pids_seen = soak.pids
            summary = summarize(soak, args, (time.monotonic() - started) / 60.0)
        finally:
            stop(proc, pids_seen or soak.pids)
        if "Traceback" in log_path.read_text(errors="replace"):
            summary["failures"].append(f"a traceback in the pipeline's log ({log_path})")
            summary["verdict"] = "fail"
        print(json.dumps(summary), flush=True)
    return 0 if summary["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
