"""Shared fixtures: one tiny random SAM 3 saved to disk per test session, the shipped demo model, and
synthetic frames."""

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


@pytest.fixture(scope="session")
def demo_models():
    """The trained demo model shipped in the package, loaded through the same path as real weights."""
    from models import load_models

    return load_models("demo", device="cpu")


@pytest.fixture
def frames() -> Callable[[int], np.ndarray]:
    from models.tiny import moving_shapes

    return moving_shapes
