"""``sam3-stream run`` fails fast and clearly on what no restart can heal, stops promptly while a model
loads, and plays a file once. Every case is the real command in a real process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    StalledHub,
    child_env,
    children_of,
    free_port,
    get_json,
    index_frames,
    launched,
    run_cli,
    stop_process,
    wait_for,
    write_video,
)

from streamer.cli import USAGE_ERROR

pytestmark = pytest.mark.timeout(120)

FAIL_WITHIN_S = 5.0  # none of these loads a model


def _fails_fast(args: list[str], tmp_path: Path, expected: str, **env: str) -> None:
    """``run ARGS`` exits with USAGE_ERROR within FAIL_WITHIN_S, printing one line (stderr) that says
    ``expected``, no traceback, no URL, and starting no child."""
    start = time.monotonic()
    out = run_cli(
        "run", "--http-port", str(free_port()), *args, env={**child_env(), "HF_HOME": str(tmp_path / "hf"), **env}
    )
    elapsed = time.monotonic() - start
    lines = out.stderr.strip().splitlines()
    assert out.returncode == USAGE_ERROR, out.stderr
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert out.stdout == "", "no URL for a pipeline that cannot run"
    assert elapsed < FAIL_WITHIN_S, f"took {elapsed:.1f} s to refuse"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "passthrough"], "the following arguments are required: --source"),
        (["--source", "synthetic", "--fps", "0"], "argument --fps: must be > 0"),
        (["--source", "synthetic", "--model", "/no/such/model"], "--model: model folder '/no/such/model' does not"),
        (["--source", "synthetic", "--model", "tiny-randm"], "unknown model 'tiny-randm'"),
        (["--source", "synthetic", "--model", "dmeo"], "did you mean 'demo'?"),
        (["--source", "synthetic", "--model", "tiny-random", "--device", "gpu"], "--device 'gpu': not a torch device"),
        (["--source", "/no/such/clip.mp4", "--model", "passthrough"], "--source: no such file or folder"),
        (["--source", "63", "--model", "passthrough"], "--source: cannot open camera 63 (not present or busy)"),
        (
            ["--source", "synthetic", "--model", "tiny-random", "--encoder", "tensorrt", "--encoder-precision", "fp8"],
            "--encoder-precision: tensorrt takes fp16, bf16; got 'fp8'",
        ),
    ],
)
def test_run_refuses_in_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    _fails_fast(args, tmp_path, expected)


def test_near_miss_model_gets_a_suggestion(tmp_path: Path) -> None:
    _fails_fast(["--source", "synthetic", "--model", "tiny-randm"], tmp_path, "did you mean 'tiny-random'?")


def test_near_miss_hub_id_gets_a_suggestion_and_no_retries(tmp_path: Path) -> None:
    """Regression: a typo in a hub id cost 35 s of the hub client's retries (here the hub is offline)."""
    args = ["--source", "synthetic", "--model", "facebook/sam33"]
    _fails_fast(args, tmp_path, "did you mean 'facebook/sam3'?", HF_HUB_OFFLINE="1")


def test_a_local_folder_typo_gets_a_suggestion(tmp_path: Path, tiny_folder: Path) -> None:
    typo = str(tiny_folder)[:-1]
    _fails_fast(["--source", "synthetic", "--model", typo], tmp_path, f"did you mean {str(tiny_folder)!r}?")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_not_a_traceback_loop(tmp_path: Path) -> None:
    args = ["--source", "synthetic", "--model", "tiny-random", "--device", "cuda"]
    _fails_fast(args, tmp_path, "--device 'cuda': CUDA is not available")


def test_a_file_that_is_not_a_video_is_refused(tmp_path: Path) -> None:
    clip = tmp_path / "notes.mp4"
    clip.write_text("not a video")
    _fails_fast(["--source", str(clip), "--model", "passthrough"], tmp_path, f"--source: cannot open {clip}")


def test_sigterm_while_the_model_loads_stops_run_promptly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: SIGTERM was ignored while the tracker loaded its model, so stopping `run` then waited out
    the supervisor's 10 s kill timeout. Here the load hangs in a download from a hub that never answers."""
    log_path = tmp_path / "run.log"
    with StalledHub("acme/slow-sam3") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        args = ["run", "--model", "acme/slow-sam3", "--device", "cpu", "--source", "synthetic:64x48@5"]
        with launched([*args, "--http-port", str(free_port())], log_path) as proc:
            wait_for(lambda: hub.file_requests > 0, 60, "the tracker to start downloading", log_path)
            children = children_of(proc.pid)
            start = time.monotonic()
            assert stop_process(proc, signal.SIGTERM, timeout=20) == 0
            stopped_in = time.monotonic() - start
    text = log_path.read_text()
    assert stopped_in < 4.0, f"took {stopped_in:.1f} s to stop\n{text[-3000:]}"
    assert "did not stop within" not in text and "Traceback" not in text, text[-3000:]
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a child outlived run"


def test_a_file_plays_once_and_the_page_stays_up(tmp_path: Path) -> None:
    """Without --loop the capture plays the file once and is not restarted; the rest of the pipeline runs on."""
    clip = write_video(tmp_path / "clip.mp4", index_frames(10), fps=10)
    log_path = tmp_path / "run.log"
    args = ["run", "--model", "passthrough", "--source", str(clip), "--http-port", str(free_port())]
    with launched(args, log_path) as proc:
        url = wait_for(lambda: (m := re.search(r"open (http://\S+/)", log_path.read_text())) and m[1], 30, "the URL")
        wait_for(lambda: "capture finished: video" in log_path.read_text(), 30, "the file's end", log_path)
        time.sleep(1.5)  # the first restart would have come after 1 s
        text = log_path.read_text()
        assert text.count("capture started") == 1 and "restarting" not in text, text
        assert f"{clip} played to its end (10 frames)" in text
        assert proc.poll() is None and get_json(f"{url}health") is not None


def test_logs_are_quiet_and_hub_warnings_come_once() -> None:
    """Regression: each hub warning was printed twice (its own handler and ours), every hub request was
    logged, and probing a missing camera printed OpenCV warnings."""
    code = (
        "import logging, cv2\n"
        "from streamer.log_setup import setup_logging\n"
        "setup_logging('INFO')\n"
        "from huggingface_hub.utils import logging as hub_logging\n"
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('retrying the hub')\n"
        "logging.getLogger('httpx2').info('HTTP Request: GET https://huggingface.co/api/models/x')\n"
        "assert not cv2.VideoCapture(63).isOpened()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"WARNING huggingface_hub\.utils\._http: retrying the hub$", lines[0]), lines
