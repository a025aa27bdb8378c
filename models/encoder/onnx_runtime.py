"""The ``onnxruntime`` backend: the fp32 ONNX export on ONNX Runtime (CPU provider; CUDA provider on a GPU).

The export is cached on disk under the weights' digest (see :mod:`models.encoder.cache`), so only
the first run for given weights pays for it. With the model on CUDA and an onnxruntime build that
has the CUDA provider, pixels and tokens stay on the GPU (bound by address, no host copies).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.encoder.base import EncoderUnavailable, vision_backbone
from models.encoder.cache import ArtifactCache, CacheKey, CorruptArtifact, weights_digest
from models.encoder.onnx_export import INSTALL_HINT, ONNX_FILE, export_encoder, export_recipe
from models.loading import Sam3Models

log = logging.getLogger(__name__)

_CUDA_PROVIDER = "CUDAExecutionProvider"
_QUIET = 3  # onnxruntime log severity: errors only


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` module, or :class:`EncoderUnavailable` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise EncoderUnavailable(f"onnxruntime is not installed ({INSTALL_HINT})") from error
    return onnxruntime


def onnx_cache_key(models: Sam3Models, precision: str = "fp32") -> CacheKey:
    """What an ONNX export depends on: the ViT's weights, the input size, the precision, the exporter."""
    return CacheKey.of(
        "onnx",
        weights=weights_digest(vision_backbone(models)),
        image_size=models.image_size,
        precision=precision,
        recipe=export_recipe(),
    )


class OnnxRuntimeImageEncoder:
    """Runs an fp32 ONNX export of the encoder (from :func:`export_encoder`) with ONNX Runtime."""

    def __init__(self, models: Sam3Models, onnx_path: str | Path) -> None:
        ort = onnxruntime_module()
        self.models = models
        self.device = models.device
        self.on_gpu = models.device.type == "cuda" and _CUDA_PROVIDER in ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.on_gpu:
            providers.insert(0, (_CUDA_PROVIDER, {"device_id": _device_index(models.device)}))
        elif models.device.type == "cuda":
            log.warning("encoder: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); it runs on CPU")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch was given
        options.log_severity_level = _QUIET
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            raise CorruptArtifact(f"onnxruntime cannot load {Path(onnx_path).name}: {error}") from error
        (tokens,) = self.session.get_outputs()
        self.tokens_shape = tuple(tokens.shape)
        self.name = "onnxruntime-fp32" + ("-cuda" if self.on_gpu else "")

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.float().contiguous()
        if self.on_gpu:
            tokens = self._run_on_gpu(pixels)
        else:
            (array,) = self.session.run(["tokens"], {"pixels": pixels.cpu().numpy()})
            tokens = torch.from_numpy(array)
        return tokens.to(self.device, self.models.dtype)

    def _run_on_gpu(self, pixels: torch.Tensor) -> torch.Tensor:
        index = _device_index(self.device)
        tokens = torch.empty(self.tokens_shape, dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input("pixels", "cuda", index, np.float32, list(pixels.shape), pixels.data_ptr())
        binding.bind_output("tokens", "cuda", index, np.float32, list(tokens.shape), tokens.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime reads on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return tokens


def load_onnxruntime_encoder(models: Sam3Models, cache: ArtifactCache) -> OnnxRuntimeImageEncoder:
    """The ONNX Runtime encoder over the cached fp32 export of ``models`` (exported on first use)."""
    onnxruntime_module()  # fail before a long export when the runtime is missing
    return cache.get_or_build(
        onnx_cache_key(models),
        lambda folder: export_encoder(models, folder),
        lambda folder: OnnxRuntimeImageEncoder(models, folder / ONNX_FILE),
    )


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
