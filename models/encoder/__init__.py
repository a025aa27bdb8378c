"""Image-encoder backends. The ViT encoder is about three quarters of a frame's work, so it is replaceable.

Every backend turns normalized pixels into the ViT's tokens (:class:`ImageEncoder`);
:class:`FrameFeatures` derives the detector's and the tracker's necks from those tokens, so whatever
computed them, the same tracker consumes them. Backends, one module each:

- ``torch`` (:mod:`.eager`): the model's own ViT, eager, bf16 on CUDA;
- ``compiled`` (:mod:`.compiled`): ``torch.compile`` with CUDA graphs at the fixed input size,
  optionally FP8 matmuls on GPUs that have them (:mod:`.fp8`);
- ``onnxruntime`` (:mod:`.onnx_runtime`): the ONNX export (:mod:`.onnx_export`) on ONNX Runtime;
- ``tensorrt`` (:mod:`.tensorrt_engine`): an engine built from a mixed-precision ONNX export.

Exports and engines are cached on disk (:mod:`.cache`). :func:`make_encoder` picks a backend by
name and falls back to ``torch``, with one warning saying why, where the one asked for cannot run.
Only the backend modules import onnx, onnxruntime or tensorrt; this package loads without torch
until one of its classes or functions is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.lazy import lazy_attributes

ENCODER_NAMES = ("torch", "compiled", "onnxruntime", "tensorrt")
"""The backends ``make_encoder`` (and ``--encoder``) take."""

ENCODER_PRECISIONS = {"torch": (), "compiled": ("fp8",), "onnxruntime": (), "tensorrt": ("fp16", "bf16")}
"""Precisions each backend takes besides its default (``tensorrt``: fp16 by default)."""

EXPORT_PRECISIONS = ("fp32", "fp16", "bf16")
"""Precisions of the ONNX export: fp32 for ONNX Runtime, fp16/bf16 (with fp32 islands) for TensorRT."""

_LAZY = {
    "ImageEncoder": "models.encoder.base",
    "EncoderUnavailable": "models.encoder.base",
    "FrameFeatures": "models.encoder.features",
    "TorchImageEncoder": "models.encoder.eager",
    "make_encoder": "models.encoder.factory",
    "export_encoder": "models.encoder.onnx_export",
    "build_engine": "models.encoder.tensorrt_engine",
    "tensorrt_problem": "models.encoder.tensorrt_engine",
}

if TYPE_CHECKING:
    from models.encoder.base import EncoderUnavailable, ImageEncoder
    from models.encoder.eager import TorchImageEncoder
    from models.encoder.factory import make_encoder
    from models.encoder.features import FrameFeatures
    from models.encoder.onnx_export import export_encoder
    from models.encoder.tensorrt_engine import build_engine, tensorrt_problem


def check_encoder_choice(name: str, precision: str | None = None) -> None:
    """Raise ``ValueError`` naming the field when ``name`` / ``precision`` is not a valid pair (no torch needed)."""
    if name not in ENCODER_NAMES:
        raise ValueError(f"encoder: unknown {name!r} (use one of {', '.join(ENCODER_NAMES)})")
    if precision is not None and precision not in ENCODER_PRECISIONS[name]:
        allowed = ", ".join(ENCODER_PRECISIONS[name]) or "none (it runs in the model's dtype)"
        raise ValueError(f"encoder_precision: {name} takes {allowed}; got {precision!r}")


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "ENCODER_NAMES",
    "ENCODER_PRECISIONS",
    "EXPORT_PRECISIONS",
    "EncoderUnavailable",
    "FrameFeatures",
    "ImageEncoder",
    "TorchImageEncoder",
    "build_engine",
    "check_encoder_choice",
    "export_encoder",
    "make_encoder",
    "tensorrt_problem",
]
