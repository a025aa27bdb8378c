"""The capture process, run for real (``python -m streamer.capture``), publishing to a SUB socket here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from helpers import REPO, free_tcp_endpoint

from streamer.capture import Backoff, Pacer, build_arg_parser, run_capture, run_from_args
from streamer.exit_notes import FINISHED_ENV
from streamer.protocol import FrameHeader, SourceStatus, decode_frame, decode_source, peek_frames_kind
from streamer.sources import SyntheticSource

pytestmark = pytest.mark.timeout(60)


@dataclass
class Received:
    header: FrameHeader
    pixels: np.ndarray
    t_received: float


@pytest.fixture
def ipc_endpoint() -> Iterator[str]:
    # Not tmp_path: ipc:// paths must stay under ~100 characters.
    folder = tempfile.mkdtemp(prefix="cap-")
    yield f"ipc://{folder}/frames"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def subscriber() -> Iterator[Callable[[str], zmq.Socket]]:
    ctx = zmq.Context()
    socks = []

    def connect(endpoint: str) -> zmq.Socket:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close()
    ctx.term()


@pytest.fixture
def start_capture(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``python -m streamer.capture ARGS``; every process started is stopped at teardown."""
    procs: list[subprocess.Popen] = []
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = tmp_path / f"capture{len(procs)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer.capture", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**base_env, **(env or {})},
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def receive(sock: zmq.Socket, until: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
    """Frames received until ``until(frames)`` holds; fails the test after ``timeout`` seconds."""
    frames: list[Received] = []
    deadline = time.monotonic() + timeout
    while not until(frames):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out after {len(frames)} frames"
        if sock.poll(int(min(left, 0.2) * 1000)):
            parts = sock.recv_multipart()
            if peek_frames_kind(parts) == "source":  # the capture's word on its source, beside the frames
                continue
            header, pixels = decode_frame(parts)
            frames.append(Received(header, pixels, time.time()))
    return frames


def source_statuses(sock: zmq.Socket, until: Callable[[SourceStatus], bool], timeout: float) -> SourceStatus:
    """The first source status from the capture for which ``until`` holds (frames are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching source status"
        if sock.poll(int(min(left, 0.2) * 1000)):
            parts = sock.recv_multipart()
            if peek_frames_kind(parts) == "source" and until(status := decode_source(parts)):
                return status


def drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


def write_folder(folder: Path, levels: list[int], size: tuple[int, int]) -> None:
    """Images of flat grey ``levels`` appear in ``folder`` at once (written aside, then renamed in)."""
    staging = folder.with_name(folder.name + ".staging")
    staging.mkdir()
    for k, level in enumerate(levels):
        cv2.imwrite(str(staging / f"{k:03d}.png"), np.full((size[1], size[0], 3), level, np.uint8))
    staging.rename(folder)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, within: float = 2.0) -> int:
    proc.send_signal(sig)
    return proc.wait(within)


# -- the process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_publishes_paced_stamped_synthetic_frames(transport, start_capture, subscriber, ipc_endpoint):
    endpoint = free_tcp_endpoint() if transport == "tcp" else ipc_endpoint
    proc = start_capture("--source", "synthetic:160x120@20", "--frames-endpoint", endpoint, "--stream-id", "camA")
    sub = subscriber(endpoint)
    frames = receive(sub, lambda fs: len(fs) >= 2 and fs[-1].t_received - fs[0].t_received >= 1.5, timeout=15)

    reference = SyntheticSource(160, 120, fps=20)
    for f in frames:
        assert (f.header.stream, f.header.width, f.header.height) == ("camA", 160, 120)
        assert np.array_equal(f.pixels, reference.frame(f.header.seq))  # seq == the pattern's frame index
        assert 0 <= f.t_received - f.header.t_capture < 0.5
    seqs = [f.header.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    span = frames[-1].header.t_capture - frames[0].header.t_capture
    assert 12 <= (len(frames) - 1) / span <= 25
    assert stop(proc) == 0


def test_exits_cleanly_on_sigterm_within_two_seconds(start_capture, subscriber):
    endpoint = free_tcp_endpoint()
    proc = start_capture("--source", "synthetic:64x48@5", "--frames-endpoint", endpoint)
    receive(subscriber(endpoint), lambda fs: len(fs) >= 1, timeout=15)
    assert stop(proc, signal.SIGTERM) == 0
    assert "received, stopping" in proc.log_path.read_text()


def test_folder_that_disappears_is_reopened_and_publishing_resumes(tmp_path, start_capture, subscriber):
    folder = tmp_path / "frames"
    write_folder(folder, [200, 210, 220], size=(32, 24))
    endpoint = free_tcp_endpoint()
    proc = start_capture("--source", str(folder), "--loop", "--fps", "20", "--frames-endpoint", endpoint)
    sub = subscriber(endpoint)
    before = receive(sub, lambda fs: len(fs) >= 5, timeout=15)

    shutil.rmtree(folder)
    # While it fails, the capture says why on the frames socket (the tracker passes it on to viewers).
    failing = source_statuses(sub, lambda s: s.error is not None, timeout=3)
    assert failing.source.startswith("folder") or str(folder.name) in failing.source, failing
    assert "source failed" in failing.error or "cannot open source" in failing.error, failing.error
    assert proc.poll() is None
    drain(sub)
    write_folder(folder, [30, 40], size=(48, 36))
    after = receive(sub, lambda fs: any(f.header.width == 48 for f in fs), timeout=10)

    resumed = next(f for f in after if f.header.width == 48)
    assert resumed.header.seq > before[-1].header.seq
    assert resumed.pixels.shape == (36, 48, 3) and int(resumed.pixels[0, 0, 0]) in (30, 40)
    assert proc.poll() is None
    log = proc.log_path.read_text()
    assert "cannot read image" in log and "reopening in" in log
    assert stop(proc) == 0


def test_looped_source_is_replayed_with_sequence_numbers_continuing(tmp_path, start_capture, subscriber):
    folder = tmp_path / "frames"
    levels = [0, 50, 100, 150]
    write_folder(folder, levels, size=(16, 16))
    endpoint = free_tcp_endpoint()
    proc = start_capture("--source", str(folder), "--loop", "--fps", "25", "--frames-endpoint", endpoint)
    frames = receive(subscriber(endpoint), lambda fs: len(fs) >= 10, timeout=15)
    seqs = [f.header.seq for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # Every pass over the folder continues the count: frame seq shows image seq % 4.
    assert [int(f.pixels[0, 0, 0]) for f in frames] == [levels[s % 4] for s in seqs]
    assert stop(proc, signal.SIGINT) == 0  # Ctrl-C stops as cleanly as SIGTERM


def test_source_without_loop_plays_once_and_says_it_finished(tmp_path, start_capture, subscriber):
    """Regression: a file without --loop was replayed forever (reopened as if it had failed)."""
    folder = tmp_path / "frames"
    write_folder(folder, [0, 50, 100], size=(16, 16))
    endpoint = free_tcp_endpoint()
    finished = tmp_path / "finished"
    sub = subscriber(endpoint)
    proc = start_capture(
        "--source", str(folder), "--fps", "5", "--frames-endpoint", endpoint, env={FINISHED_ENV: str(finished)}
    )
    assert proc.wait(15) == 0
    log = proc.log_path.read_text()
    assert "played to its end; pass --loop to repeat it" in log and "reopening" not in log
    assert "played to its end (3 frames)" in finished.read_text()
    levels = []
    while sub.poll(500):
        parts = sub.recv_multipart()
        if peek_frames_kind(parts) == "frame":
            levels.append(int(decode_frame(parts)[1][0, 0, 0]))
    assert levels == [0, 50, 100][3 - len(levels) :]  # each image once (the first may come before we joined)


def test_bad_source_spec_exits_at_once_naming_the_problem(start_capture):
    proc = start_capture("--source", "synthetic:huge", "--frames-endpoint", free_tcp_endpoint())
    assert proc.wait(15) == 2
    assert "cannot parse synthetic source 'synthetic:huge'" in proc.log_path.read_text()


# -- in process -----------------------------------------------------------------------------------


def test_run_capture_in_a_thread_stops_on_its_event(subscriber):
    endpoint = free_tcp_endpoint()
    stop_event = threading.Event()
    counts: list[int] = []
    worker = threading.Thread(
        target=lambda: counts.append(run_capture("synthetic:32x32@50", endpoint, "t", stop_event=stop_event))
    )
    worker.start()
    try:
        frames = receive(subscriber(endpoint), lambda fs: len(fs) >= 3, timeout=10)
    finally:
        stop_event.set()
        worker.join(2)
    assert not worker.is_alive()
    assert counts[0] >= frames[-1].header.seq + 1


def test_run_capture_duration_bounds_the_run():
    t0 = time.monotonic()
    count = run_capture("synthetic:32x32@40", free_tcp_endpoint(), "t", duration=0.5)
    assert time.monotonic() - t0 < 1.5
    assert 12 <= count <= 22


def test_run_capture_refuses_a_bad_stream_id_or_endpoint():
    with pytest.raises(ValueError, match="stream"):
        run_capture("synthetic", free_tcp_endpoint(), "", duration=1)
    with pytest.raises(ValueError, match="udp://"):
        run_capture("synthetic", "udp://127.0.0.1:1", "t", duration=1)
    endpoint = free_tcp_endpoint()
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as taken:
        taken.bind(endpoint)
        with pytest.raises(zmq.ZMQError):
            run_capture("synthetic", endpoint, "t", duration=1)


def test_cli_arguments_run_the_loop_and_report_bad_input(capsys):
    parser = build_arg_parser()
    args = parser.parse_args(
        [
            "--source",
            "synthetic:32x32@20",
            "--frames-endpoint",
            free_tcp_endpoint(),
            "--stream-id",
            "cli",
            "--duration",
            "0.3",
        ]
    )
    assert (args.stream_id, args.fps, args.loop) == ("cli", None, False)
    assert run_from_args(args) == 0
    args.source = "/no/such/video.mp4"
    assert run_from_args(args) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "0", "--fps", "0"])
    assert "--fps: must be > 0" in capsys.readouterr().err


# -- pacing and back-off --------------------------------------------------------------------------


class ManualClock:
    """A clock that only moves when slept on, by the requested time plus a fixed oversleep."""

    def __init__(self, oversleep: float = 0.0) -> None:
        self.now, self.oversleep = 100.0, oversleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.oversleep


def test_pacer_does_not_drift_when_sleeps_overshoot():
    clock = ManualClock(oversleep=0.004)
    pacer = Pacer(10, clock=clock)
    for _ in range(100):
        assert pacer.wait(clock.sleep) == 0
    # 100 ticks at 10 fps from t=100: the last served tick is the one at 109.9, not 109.9 + 100 * 4 ms.
    assert clock.now == pytest.approx(109.9 + 0.004, abs=1e-6)


def test_pacer_drops_missed_ticks_instead_of_bursting():
    clock = ManualClock()
    pacer = Pacer(10, clock=clock)
    assert pacer.wait(clock.sleep) == 0  # tick 0 at 100.0
    clock.now += 0.35  # stalled: ticks at 100.1, 100.2, 100.3 are past
    assert pacer.wait(clock.sleep) == 2  # serve 100.3 now, drop 100.1 and 100.2
    assert pacer.delay() == pytest.approx(0.05)  # the next is 100.4, on the original grid
    assert not pacer.ready()
    clock.now += 0.05
    assert pacer.ready()


def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff(0.5, 2.0, 10.0)
    assert [backoff.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    backoff.reset()
    assert backoff.next_delay() == 0.5
