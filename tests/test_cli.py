"""``sam3-stream``: help texts, and ``run`` starting and stopping the three real processes.

The process helpers here (``launched``, ``children_of``, ``free_port``, ``wait_for``) are shared with
``test_tracker_service.py`` and ``test_pipeline.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from helpers import RESULTS_FLOWING

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


def child_env() -> dict[str, str]:
    """Children import this checkout and run torch on one thread (FACTS.md: ~20x faster on 2 cores)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
    """Ask ``proc`` to stop with ``sig``, kill it if it has not within ``timeout``; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def launched(args: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """``python -m streamer.cli ARGS`` with output to ``log_path``; stopped (and any child of it killed)
    when the block ends, whatever happens in it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=child_env(),
        )
    try:
        yield proc
    finally:
        children = children_of(proc.pid)
        stop_process(proc)
        for pid in children:  # only if the supervisor failed to: these are our grandchildren by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def children_of(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` (pid -> command line), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if ppid == pid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, log_path: Path | None = None) -> T:
    """Call ``probe`` until it returns something truthy; fail (with the log's tail) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n--- log ---\n{tail}")
        time.sleep(0.1)


def get_json(url: str) -> dict | None:
    """GET ``url`` as JSON, or ``None`` while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def run_help(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "streamer.cli", *args, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_level_help_lists_every_command() -> None:
    text = run_help()
    for command in (
        "run",
        "capture",
        "track",
        "serve",
        "keys",
        "export-encoder",
        "build-engine",
        "segment-video",
        "segment-image",
        "api",
        "cluster",
    ):
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), f"{command} missing from:\n{text}"


@pytest.mark.parametrize(
    "command, options",
    [
        ("run", ["--model", "--source", "--prompt", "--http-port", "--loop", "--log-level", "--encoder"]),
        ("capture", ["--source", "--frames-endpoint", "--stream-id", "--loop", "--log-level", "--keys", "--insecure"]),
        (
            "track",
            [
                "--model",
                "--device",
                "--frames-endpoint",
                "--results-endpoint",
                "--control-endpoint",
                "--prompt",
                "--passthrough-delay-ms",
                "--keys",
                "--insecure",
                "--encoder",
                "--encoder-precision",
            ],
        ),
        ("serve", ["--results-endpoint", "--control-endpoint", "--http-port", "--keys"]),
        ("keys", ["DIR", "--client"]),
        ("export-encoder", ["--model", "--out", "--precision", "--external-data"]),
        ("build-engine", ["--model", "--precision", "--cache-dir"]),
        (
            "segment-video",
            ["IN", "--prompt", "--points", "--negative-points", "--box", "--frame", "-o", "--masks", "--encoder"],
        ),
        ("segment-image", ["IN", "--prompt", "--points", "--box", "-o", "--masks", "--no-overlay", "--model"]),
        ("api", ["--model", "--device", "--encoder", "--http-port", "--data-dir", "--token", "--max-video-seconds"]),
        ("cluster", ["--address", "--trackers", "--model", "--stream", "--source", "--config", "--keys"]),
    ],
)
def test_each_command_has_help(command: str, options: list[str]) -> None:
    text = run_help(command)
    assert text.startswith(f"usage: sam3-stream {command}")
    for option in options:
        assert option in text, f"{option} missing from sam3-stream {command} --help"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("sam3-stream")
    if not script.exists():
        pytest.skip("the package is not installed in this interpreter (pip install -e .)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 0 and "usage: sam3-stream" in out.stdout


@pytest.mark.parametrize(
    "options, says",
    [
        (["--trackers", "0"], "--trackers"),
        (["--config", "/nonexistent/cluster.json"], "--config"),
        (["--stream", "a=tcp://127.0.0.1:1", "--source", "a=synthetic"], "named twice"),
        (["--tracker-host", "0.0.0.0"], "no --keys"),
    ],
)
def test_cluster_refuses_bad_options_before_starting_ray(
    options: list[str], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    from streamer.cli import main

    assert main(["cluster", "--model", "passthrough", *options]) == 2
    assert says in caplog.text


def test_bad_arguments_exit_with_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "run", "--model", "tiny-random"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=60,
    )
    assert out.returncode == 2 and "--source" in out.stderr


def test_run_prints_url_serves_health_and_stops_everything_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "run.log"
    args = [
        "run",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--source",
        "synthetic:160x120@10",
        "--http-port",
        str(port),
    ]
    with launched(args, log_path) as run:
        url = wait_for(
            lambda: (m := re.search(r"open (http://127\.0\.0\.1:\d+/)", log_path.read_text())) and m[1],
            60,
            "the URL",
            log_path,
        )
        assert url == f"http://127.0.0.1:{port}/"
        children = children_of(run.pid)
        assert sorted(cmd.split("streamer.cli ")[1].split()[0] for cmd in children.values()) == [
            "capture",
            "serve",
            "track",
        ]
        health = wait_for(
            lambda: (h := get_json(f"{url}health")) and h["state"] in RESULTS_FLOWING and h, 60, "a live feed", log_path
        )
        assert health["stream"] == "cam0" and health["results_received"] > 0

        assert stop_process(run, signal.SIGINT) == 0
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not left, f"children {left} outlived sam3-stream run"
    assert get_json(f"{url}health") is None
    assert "Traceback" not in log_path.read_text()


def test_run_refuses_a_busy_http_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "streamer.cli",
                "run",
                "--model",
                "passthrough",
                "--source",
                "synthetic",
                "--http-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_env(),
            timeout=60,
        )
    assert out.returncode == 2 and "already in use" in out.stderr


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamer.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=timeout,
    )


def test_export_encoder_writes_onnx_and_prints_its_path(tmp_path: Path) -> None:
    out = run_cli("export-encoder", "--model", "tiny-random", "--out", str(tmp_path / "exported"))
    assert out.returncode == 0, out.stderr[-2000:]
    (printed,) = out.stdout.splitlines()
    assert Path(printed) == tmp_path / "exported" / "encoder.onnx" and Path(printed).stat().st_size > 0


def test_build_engine_without_tensorrt_fails_saying_why() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the GPU tests build engines")
    out = run_cli("build-engine", "--model", "tiny-random", "--device", "cpu")
    assert out.returncode == 1 and out.stdout == ""
    assert "build-engine: TensorRT is not installed" in out.stderr and "sam3-stream[trt]" in out.stderr


def test_track_refuses_a_precision_its_encoder_does_not_take() -> None:
    out = run_cli("track", "--model", "tiny-random", "--encoder", "onnxruntime", "--encoder-precision", "fp8")
    assert out.returncode == 2 and "encoder_precision: onnxruntime takes none" in out.stderr


def test_run_hands_the_encoder_choice_to_its_tracker(tmp_path: Path) -> None:
    from streamer.cli import build_parser, pipeline_children
    from streamer.config import Endpoints

    def tracker_argv(*extra: str) -> list[str]:
        args = build_parser().parse_args(["run", "--model", "tiny-random", "--source", "synthetic", *extra])
        (tracker,) = [
            c for c in pipeline_children(args, Endpoints.ipc_in(str(tmp_path)), tmp_path) if c.name == "tracker"
        ]
        return tracker.argv

    argv = tracker_argv("--encoder", "tensorrt", "--encoder-precision", "bf16")
    assert argv[argv.index("--encoder") + 1] == "tensorrt" and argv[argv.index("--encoder-precision") + 1] == "bf16"
    default = tracker_argv()
    assert default[default.index("--encoder") + 1] == "torch" and "--encoder-precision" not in default
