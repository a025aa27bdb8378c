"""Every transformers internal the package relies on exists in the installed version, or import fails naming it."""

from __future__ import annotations

import re

import pytest
import transformers
from helpers import REPO
from transformers import Sam3TrackerVideoModel

from models import hf_internals as hf


def test_every_relied_on_internal_exists_in_the_installed_transformers(tiny_models) -> None:
    assert hf.missing() == []
    hf.check_model(tiny_models.video_model)
    assert len(hf.RELIED_ON) > 30 and len(hf.MODEL_RELIED_ON) > 10
    assert all(item.why for item in hf.RELIED_ON + hf.MODEL_RELIED_ON), "each reliance says what it is for"


def test_a_missing_internal_fails_naming_it_and_the_pinned_version(monkeypatch) -> None:
    monkeypatch.delattr(Sam3TrackerVideoModel, "_gather_memory_frame_outputs")
    with pytest.raises(hf.TransformersInternalsError) as error:
        hf.check_installed()
    message = str(error.value)
    assert "Sam3TrackerVideoModel._gather_memory_frame_outputs" in message
    assert transformers.__version__ in message and hf.PINNED_TRANSFORMERS in message


def test_a_missing_model_attribute_fails_naming_it(tiny_models, monkeypatch) -> None:
    monkeypatch.delattr(tiny_models.tracker_model.memory_attention.layers[0].cross_attn_image, "k_proj")
    with pytest.raises(hf.TransformersInternalsError, match=r"Sam3TrackerVideoRoPEAttention\.k_proj"):
        hf.check_model(tiny_models.video_model)


def test_the_pinned_range_is_the_one_pyproject_installs() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = re.search(r'"transformers([^"]+)"', pyproject)
    assert pin is not None and pin.group(1) == hf.PINNED_TRANSFORMERS


def test_no_other_module_touches_transformers_internals() -> None:
    """Private methods, and session state transformers does not document, are reached only through
    ``models.hf_internals`` (a source scan of the package and the scripts)."""
    root = REPO
    private = {r.name for r in hf.RELIED_ON if r.name.startswith("_")} | {"_single_frame_forward"}
    state = {r.name for r in hf.RELIED_ON if r.owner.endswith("InferenceSession") and not r.name.startswith("_")}
    private_use = re.compile(r"\.(" + "|".join(sorted(private)) + r")\b")
    state_use = re.compile(r"session\w*\.(" + "|".join(sorted(state)) + r")\b")
    offenders = []
    for path in [*root.glob("models/*.py"), *root.glob("scripts/*.py"), *root.glob("streamer/**/*.py")]:
        if path.name == "hf_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if private_use.search(line) or state_use.search(line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
