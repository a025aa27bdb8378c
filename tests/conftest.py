"""Shared fixtures: one tiny random SAM 3 saved to disk per test session, and synthetic frames."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.fixture
def frames() -> Callable[[int], np.ndarray]:
    from models.tiny import moving_shapes

    return moving_shapes


CLIP_FRAMES = 24


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame 160x120 H.264 clip of moving shapes at 10 fps, written with the project's Mp4Writer."""
    from models.tiny import moving_shapes
    from streamer.video_writer import Mp4Writer

    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    with Mp4Writer(path, 160, 120, fps=10) as writer:
        for i in range(CLIP_FRAMES):
            writer.write(moving_shapes(i))
    return path


@pytest.fixture(scope="session")
def predictor(tiny_models):
    """One tiny-model predictor for the whole run (tests close the sessions they open)."""
    from models import Sam3VideoPredictor

    return Sam3VideoPredictor(models=tiny_models)
