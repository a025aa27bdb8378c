"""GPU encoder backends: compiled (CUDA graphs, FP8), ONNX Runtime's CUDA provider, TensorRT engines.

Skipped cleanly without a CUDA device; the TensorRT tests also without the ``tensorrt`` package.
Tokens are compared with the model's own fp32 ViT, masks with a torch-encoder tracker.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import Prompt, StreamingTracker, load_models, make_encoder
from models.encoder.fp8 import fp8_problem
from models.preprocess import frame_to_pixels
from models.results import MaskAgreement
from models.tiny import moving_shapes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")

CUDA = torch.device("cuda")
HALF_TOLERANCE = 5e-2  # max error relative to the largest token: bf16 weights and half-precision products


@pytest.fixture(scope="module")
def gpu_models():
    return load_models("tiny-random", device="cuda")  # bf16


@pytest.fixture(scope="module")
def fp32_tokens(gpu_models):
    """The reference: the same weights' ViT in fp32, on the same frames."""
    fp32 = load_models("tiny-random", device="cuda", dtype="fp32")
    encoder = make_encoder("torch", fp32)
    return {i: encoder.encode(frame_to_pixels(moving_shapes(i), 112, CUDA, torch.float32)) for i in (0, 9)}


def _relative_errors(encoder, fp32_tokens) -> list[float]:  # type: ignore[no-untyped-def]
    errors = []
    for index, reference in fp32_tokens.items():
        tokens = encoder.encode(frame_to_pixels(moving_shapes(index), 112, CUDA, torch.bfloat16))
        assert tokens.shape == reference.shape and tokens.dtype == torch.bfloat16 and tokens.is_cuda
        errors.append(float((tokens.float() - reference).abs().max() / reference.abs().max()))
    return errors


def _same_masks(gpu_models, encoder, frames: int = 40) -> None:  # type: ignore[no-untyped-def]
    """A tracker on ``encoder``'s tokens follows a torch-encoder tracker: same ids, IoU >= 0.99 per object."""
    trackers = [StreamingTracker(gpu_models), StreamingTracker(gpu_models, encoder=encoder)]
    for tracker in trackers:
        tracker.track(moving_shapes(0))
        tracker.add_prompt(Prompt(points=((40.0, 60.0),), point_labels=(1,)))
        tracker.add_prompt(Prompt(text="person"))
    agreement = MaskAgreement()
    for index in range(1, frames):
        reference, ours = (tracker.track(moving_shapes(index)) for tracker in trackers)
        agreement.add(ours, reference)
    assert agreement.id_mismatches == 0 and agreement.per_object()
    assert min(agreement.per_object().values()) >= 0.99, agreement.per_object()


def test_compiled_matches_eager_and_keeps_masks(gpu_models, fp32_tokens) -> None:
    encoder = make_encoder("compiled", gpu_models)
    assert encoder.name == "compiled-bf16"
    assert max(_relative_errors(encoder, fp32_tokens)) < HALF_TOLERANCE
    first = encoder.encode(frame_to_pixels(moving_shapes(0), 112, CUDA, torch.bfloat16))
    kept = first.clone()
    encoder.encode(frame_to_pixels(moving_shapes(5), 112, CUDA, torch.bfloat16))
    assert torch.equal(first, kept)  # a later call (CUDA graph replay) does not overwrite earlier tokens
    _same_masks(gpu_models, encoder)


@pytest.mark.skipif(
    not torch.cuda.is_available() or fp8_problem(CUDA) is not None, reason="needs FP8 tensor cores (Ada/Hopper)"
)
def test_compiled_fp8_stays_close(gpu_models, fp32_tokens) -> None:
    encoder = make_encoder("compiled", gpu_models, precision="fp8")
    assert encoder.name == "compiled-fp8"
    for index, reference in fp32_tokens.items():
        tokens = encoder.encode(frame_to_pixels(moving_shapes(index), 112, CUDA, torch.bfloat16))
        assert float(F.cosine_similarity(tokens.float().flatten(1), reference.flatten(1)).min()) > 0.98


def test_onnxruntime_on_gpu_models(gpu_models, fp32_tokens, tmp_path: Path) -> None:
    encoder = make_encoder("onnxruntime", gpu_models, cache_dir=tmp_path)
    assert encoder.name.startswith("onnxruntime-fp32")
    assert max(_relative_errors(encoder, fp32_tokens)) < HALF_TOLERANCE  # bf16 weights, fp32 inside


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_engine_matches_fp32_and_keeps_masks(gpu_models, fp32_tokens, tmp_path: Path, precision: str) -> None:
    encoder = make_encoder("tensorrt", gpu_models, precision=precision, cache_dir=tmp_path)
    assert encoder.name == f"tensorrt-{precision}"
    assert max(_relative_errors(encoder, fp32_tokens)) < HALF_TOLERANCE
    _same_masks(gpu_models, encoder)


@needs_tensorrt
def test_a_corrupted_engine_is_rebuilt_with_a_warning(
    gpu_models, fp32_tokens, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from models import build_engine

    plan = build_engine(gpu_models, "fp16", cache_dir=tmp_path)
    assert plan.name == "encoder.plan" and plan.stat().st_size > 0
    assert build_engine(gpu_models, "fp16", cache_dir=tmp_path) == plan  # found in the cache
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        encoder = make_encoder("tensorrt", gpu_models, cache_dir=tmp_path)
    assert encoder.name == "tensorrt-fp16" and "rebuilding" in caplog.text
    assert max(_relative_errors(encoder, fp32_tokens)) < HALF_TOLERANCE
