"""Shared fixtures: one tiny random SAM 3 saved to disk per test session, the shipped demo model,
synthetic frames, a ZeroMQ context per test, and the ``sam3-stream api`` server with its inputs.

Plain helpers (no fixtures) live in ``helpers.py``; test modules import from there, never from each other."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

# Tiny models on a 2-core machine run far faster on one thread (FACTS.md).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import save_tiny_random

    return save_tiny_random(tmp_path_factory.mktemp("tiny-sam3"))


@pytest.fixture(scope="session")
def tiny_models(tiny_folder: Path):
    from models import load_models

    return load_models(str(tiny_folder), device="cpu")


@pytest.fixture(scope="session")
def demo_models():
    """The trained demo model shipped in the package, loaded through the same path as real weights."""
    from models import load_models

    return load_models("demo", device="cpu")


@pytest.fixture
def frames() -> Callable[[int], np.ndarray]:
    from models.tiny import moving_shapes

    return moving_shapes


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    """A ZeroMQ context for one test, terminated at teardown: a test that leaves a socket open hangs there
    (and times out) instead of passing."""
    ctx = zmq.Context()
    yield ctx
    ctx.term()  # every socket of the test (monitors included) must be closed by now


CLIP_FRAMES = 24


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame 160x120 H.264 clip of moving shapes at 10 fps."""
    from helpers import write_video

    from models.tiny import moving_shapes

    return write_video(tmp_path_factory.mktemp("clip") / "shapes.mp4", (moving_shapes(i) for i in range(CLIP_FRAMES)))


@pytest.fixture(scope="session")
def predictor(tiny_models):
    """One tiny-model predictor for the whole run (tests close the sessions they open)."""
    from models import Sam3VideoPredictor

    return Sam3VideoPredictor(models=tiny_models)


# -- sam3-stream api: inputs served over HTTP on loopback, and one server process for the session --

API_CLIP_FRAMES = 6  # the short clip: frames of 64x48 at 10 fps
API_LONG_FRAMES = 40  # long enough (seconds of tiny-model work) to be seen running, cancelled, killed
API_MAX_VIDEO_S = 10  # the session server's --max-video-seconds; overlong.mp4 lasts 12 s
API_MAX_UPLOAD_MB = 1  # the session server's --max-upload-mb; big.bin is 1.2 MB


@pytest.fixture(scope="session")
def api_media(tmp_path_factory: pytest.TempPathFactory):
    """A folder of test inputs served over HTTP on loopback; yields (folder, base URL)."""
    import cv2
    from helpers import serve_folder, write_video

    from models.tiny import moving_shapes

    folder = tmp_path_factory.mktemp("api-media")
    write_video(folder / "clip.mp4", (moving_shapes(i, 64, 48) for i in range(API_CLIP_FRAMES)))
    write_video(folder / "long.mp4", (moving_shapes(i, 64, 48) for i in range(API_LONG_FRAMES)))
    write_video(folder / "overlong.mp4", (moving_shapes(i, 32, 32) for i in range(10 * (API_MAX_VIDEO_S + 2))))
    still = cv2.cvtColor(moving_shapes(0, 64, 48), cv2.COLOR_RGB2BGR)
    for ext in ("png", "jpg", "gif", "webp"):
        cv2.imwrite(str(folder / f"still.{ext}"), still)
    (folder / "still.png").rename(folder / "still-named.mp4")  # a PNG under a video's name
    cv2.imwrite(str(folder / "still.png"), still)
    (folder / "notes.txt").write_text("not an image")
    (folder / "big.bin").write_bytes(np.random.default_rng(0).bytes(int(1.2 * 2**20)))
    with serve_folder(folder) as url:
        yield folder, url


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory, api_media):
    """``sam3-stream api --model tiny-random`` on loopback, allowed to fetch from the loopback media server."""
    from helpers import ApiServer

    data_dir = tmp_path_factory.mktemp("api-data")
    limits = ("--max-video-seconds", str(API_MAX_VIDEO_S), "--max-upload-mb", str(API_MAX_UPLOAD_MB))
    with ApiServer(data_dir, "--allow-private-urls", *limits) as server:
        yield server
