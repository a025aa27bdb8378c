"""``sam3-stream``: help texts, and ``run`` starting and stopping the three real processes."""

from __future__ import annotations

import importlib.util
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    RESULTS_FLOWING,
    child_env,
    children_of,
    free_port,
    get_json,
    launched,
    run_cli,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def run_help(*args: str) -> str:
    out = run_cli(*args, "--help")
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
    out = run_cli("run", "--model", "tiny-random")
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
        out = run_cli("run", "--model", "passthrough", "--source", "synthetic", "--http-port", str(port))
    assert out.returncode == 2 and "already in use" in out.stderr


def test_export_encoder_writes_onnx_and_prints_its_path(tmp_path: Path) -> None:
    out = run_cli("export-encoder", "--model", "tiny-random", "--out", str(tmp_path / "exported"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (printed,) = out.stdout.splitlines()
    assert Path(printed) == tmp_path / "exported" / "encoder.onnx" and Path(printed).stat().st_size > 0


def test_build_engine_without_tensorrt_fails_saying_why() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the GPU tests build engines")
    out = run_cli("build-engine", "--model", "tiny-random", "--device", "cpu", timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert "build-engine: TensorRT is not installed" in out.stderr and "sam3-stream[trt]" in out.stderr


def test_track_refuses_a_precision_its_encoder_does_not_take() -> None:
    out = run_cli(
        "track", "--model", "tiny-random", "--encoder", "onnxruntime", "--encoder-precision", "fp8", timeout=120
    )
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
