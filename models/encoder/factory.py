"""Pick an image-encoder backend by name; where it cannot run, fall back to ``torch`` with one warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from models.encoder import check_encoder_choice
from models.encoder.base import EncoderUnavailable, ImageEncoder
from models.encoder.cache import ArtifactCache
from models.encoder.eager import TorchImageEncoder
from models.loading import Sam3Models

log = logging.getLogger(__name__)


def make_encoder(
    name: str, models: Sam3Models, *, precision: str | None = None, cache_dir: str | Path | None = None
) -> ImageEncoder:
    """The image encoder ``name`` (``torch``, ``compiled``, ``onnxruntime``, ``tensorrt``) for ``models``.

    ``precision``: ``fp8`` for ``compiled`` (FP8 matmuls where the GPU has them); ``fp16`` (default)
    or ``bf16`` for ``tensorrt``; the others run in the models' dtype (ONNX Runtime in fp32).
    ``cache_dir`` holds ONNX exports and TensorRT engines (default: ``$SAM3_STREAM_CACHE`` or
    ``~/.cache/sam3-stream``). Where the backend cannot run (library missing, no GPU, the build
    failed) this logs one warning saying why and returns the ``torch`` encoder. Raises
    ``ValueError`` naming the field for an unknown name or a precision the backend does not take.
    The result's ``name`` says what actually runs.
    """
    check_encoder_choice(name, precision)
    encoder: ImageEncoder
    if name == "torch":
        encoder = TorchImageEncoder(models)
    else:
        try:
            encoder = _BACKENDS[name](models, precision, ArtifactCache(cache_dir))
        except EncoderUnavailable as why:
            log.warning("encoder: %s cannot run here, using torch: %s", name, why)
            encoder = TorchImageEncoder(models)
    log.info("image encoder: %s", encoder.name)
    return encoder


def _compiled(models: Sam3Models, precision: str | None, cache: ArtifactCache) -> ImageEncoder:
    from models.encoder.compiled import CompiledImageEncoder

    return CompiledImageEncoder(models, fp8=precision == "fp8")


def _onnxruntime(models: Sam3Models, precision: str | None, cache: ArtifactCache) -> ImageEncoder:
    from models.encoder.onnx_runtime import load_onnxruntime_encoder

    return load_onnxruntime_encoder(models, cache)


def _tensorrt(models: Sam3Models, precision: str | None, cache: ArtifactCache) -> ImageEncoder:
    from models.encoder.tensorrt_engine import DEFAULT_ENGINE_PRECISION, load_tensorrt_encoder

    return load_tensorrt_encoder(models, precision or DEFAULT_ENGINE_PRECISION, cache)


_BACKENDS: dict[str, Callable[[Sam3Models, str | None, ArtifactCache], ImageEncoder]] = {
    "compiled": _compiled,
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
}
