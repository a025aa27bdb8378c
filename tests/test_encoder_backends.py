"""Choosing an encoder backend: names, precisions, the fallback to torch with one warning, and the rule
that only the backend modules import onnx, onnxruntime and tensorrt. FP8 numerics run on CPU too."""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO
from torch import nn

from models import ENCODER_NAMES, check_encoder_choice, make_encoder
from models.encoder.base import TokensOnly, vision_backbone
from models.encoder.fp8 import Fp8Linear, with_fp8_linears
from models.preprocess import frame_to_pixels
from models.tiny import moving_shapes

BACKEND_LIBRARIES = {"onnx", "onnxruntime", "onnxscript", "tensorrt"}
BACKEND_MODULES = {
    "models/encoder/onnx_export.py",
    "models/encoder/onnx_runtime.py",
    "models/encoder/tensorrt_engine.py",
}


def _fallback(tiny_models, caplog: pytest.LogCaptureFixture, name: str, **options: str):  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="models.encoder"):
        encoder = make_encoder(name, tiny_models, **options)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return encoder, warnings


def test_torch_is_the_model_itself(tiny_models) -> None:
    encoder = make_encoder("torch", tiny_models)
    pixels = frame_to_pixels(moving_shapes(0), 112, torch.device("cpu"), torch.float32)
    assert encoder.name == "torch-fp32"
    assert torch.equal(encoder.encode(pixels), vision_backbone(tiny_models)(pixels).last_hidden_state)


@pytest.mark.parametrize(
    "name, options, why",
    [
        ("tensorrt", {}, "TensorRT"),
        ("tensorrt", {"precision": "bf16"}, "TensorRT"),
        ("compiled", {}, "CUDA"),
        ("compiled", {"precision": "fp8"}, "CUDA"),
    ],
)
def test_gpu_backends_fall_back_to_torch_with_one_line_saying_why(
    tiny_models, caplog: pytest.LogCaptureFixture, name: str, options: dict, why: str
) -> None:
    encoder, warnings = _fallback(tiny_models, caplog, name, **options)
    assert encoder.name == "torch-fp32"
    (warning,) = warnings
    assert warning.startswith(f"encoder: {name} cannot run here, using torch: ") and why in warning
    assert "\n" not in warning


def test_onnxruntime_missing_falls_back_with_the_install_hint(
    tiny_models, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    encoder, warnings = _fallback(tiny_models, caplog, "onnxruntime", cache_dir=str(tmp_path))
    assert encoder.name == "torch-fp32"
    (warning,) = warnings
    assert "onnxruntime is not installed" in warning and "sam3-stream[onnx]" in warning
    assert list(tmp_path.iterdir()) == []  # nothing exported for a runtime that is not there


@pytest.mark.parametrize(
    "name, precision, field",
    [
        ("tensorrt-fp16", None, "encoder"),
        ("tensorrt", "fp8", "encoder_precision"),
        ("torch", "bf16", "encoder_precision"),
    ],
)
def test_bad_choices_raise_naming_the_field(tiny_models, name: str, precision: str | None, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        check_encoder_choice(name, precision)
    with pytest.raises(ValueError, match=f"^{field}:"):
        make_encoder(name, tiny_models, precision=precision)


def test_every_name_is_accepted() -> None:
    for name in ENCODER_NAMES:
        check_encoder_choice(name)


def test_only_the_backend_modules_import_onnx_onnxruntime_or_tensorrt() -> None:
    offenders = []
    for path in sorted([*REPO.glob("models/**/*.py"), *REPO.glob("streamer/**/*.py"), *REPO.glob("scripts/*.py")]):
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(name.split(".")[0] in BACKEND_LIBRARIES for name in names) and relative not in BACKEND_MODULES:
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


needs_scaled_mm = pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="this torch has no F.scaled_mm")


@needs_scaled_mm
def test_fp8_linear_stays_within_fp8_rounding_of_the_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    hidden = torch.randn(2, 10, 64)
    hidden[0, 3] *= 50  # an outlier token must not crush the others' precision (per-token scales)
    with torch.inference_mode():
        exact, fp8 = linear(hidden), Fp8Linear(linear)(hidden)
    assert fp8.shape == exact.shape and fp8.dtype == exact.dtype
    per_token = (fp8 - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(per_token.max()) < 0.08  # e4m3 keeps 3 mantissa bits: a few percent per product


@needs_scaled_mm
def test_fp8_vit_keeps_the_tokens_direction_and_leaves_the_model_alone(tiny_models) -> None:
    backbone = vision_backbone(tiny_models)
    fp8 = with_fp8_linears(backbone)
    assert not any(isinstance(m, Fp8Linear) for m in backbone.modules())
    assert sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 2 * 6  # q, k, v, o, fc1, fc2 per layer
    pixels = frame_to_pixels(moving_shapes(4), 112, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        exact, approx = TokensOnly(backbone)(pixels), TokensOnly(fp8)(pixels)
    assert float(F.cosine_similarity(approx.flatten(1), exact.flatten(1)).min()) > 0.99


def test_tracker_factory_shares_one_named_encoder_across_streams(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamer side passes only a name; the models layer builds the backend once for every stream."""
    from streamer.tracking import tracker_factory

    monkeypatch.setenv("SAM3_STREAM_CACHE", str(tmp_path))
    make_tracker = tracker_factory(str(tiny_folder), "cpu", encoder="onnxruntime")
    first, second = make_tracker(), make_tracker()
    assert first.encoder is second.encoder and first.encoder.name == "onnxruntime-fp32"
    assert any(p.name.startswith("onnx-") for p in tmp_path.iterdir())
    result = first.track(moving_shapes(0))
    assert result.frame_index == 0


class CountingEncoder:
    """An ImageEncoder that counts its calls and computes with ONNX Runtime (a real backend)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.name, self.calls = inner, inner.name, 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.encode(pixels)


def test_the_file_predictor_computes_click_sessions_with_the_given_encoder(tiny_models, tmp_path: Path) -> None:
    import cv2

    from models import Sam3VideoPredictor

    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(4):
        cv2.imwrite(str(frames / f"{index:05d}.jpg"), moving_shapes(index)[:, :, ::-1])
    encoder = CountingEncoder(make_encoder("onnxruntime", tiny_models, cache_dir=tmp_path / "cache"))
    outputs = {}
    for name, predictor in (
        ("torch", Sam3VideoPredictor(models=tiny_models)),
        ("onnxruntime", Sam3VideoPredictor(models=tiny_models, encoder=encoder)),
    ):
        session = predictor.handle_request({"type": "start_session", "resource_path": str(frames)})["session_id"]
        predictor.handle_request(
            {"type": "add_prompt", "session_id": session, "frame_index": 0, "points": [[40, 60]], "point_labels": [1]}
        )
        request = {"type": "propagate_in_video", "session_id": session, "propagation_direction": "forward"}
        outputs[name] = {r["frame_index"]: r["outputs"] for r in predictor.handle_stream_request(request)}
    assert encoder.calls >= 4  # every frame's features came from the given backend
    assert sorted(outputs["torch"]) == sorted(outputs["onnxruntime"]) == [0, 1, 2, 3]
    for index, reference in outputs["torch"].items():
        assert sorted(reference) == sorted(outputs["onnxruntime"][index])
        for obj_id, obj in reference.items():
            ours = outputs["onnxruntime"][index][obj_id]["mask"]
            assert np.count_nonzero(ours & obj["mask"]) >= 0.99 * np.count_nonzero(ours | obj["mask"])
