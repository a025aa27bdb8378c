"""Export the ViT image encoder to ONNX: fp32 for ONNX Runtime, mixed precision for TensorRT.

The graph takes ``pixels`` (float32, ``1 x 3 x S x S``, the fixed input size) and returns ``tokens``
(``1 x (S/14)^2 x C``). torch's dynamo exporter gives a static, compact graph (every shape known,
attention as MatMul-Softmax-MatMul with Q and K pre-scaled: the pattern TensorRT fuses).

A half-precision export (``fp16`` / ``bf16``) is what a TensorRT engine is built from: TensorRT 11
builds strongly typed networks only (each layer runs in the type its ONNX inputs have), so the
precision plan lives in the graph. Everything runs in the half type except these fp32 islands:

- every LayerNorm: its variance squares activations, which overflows fp16 after attention (the
  failure public SAM / ViT TensorRT ports report; NVIDIA's advice is to keep LayerNorm in fp32);
- the patch embedding (its input is the fp32 pixels; about 0.1 % of the FLOPs);
- the rotary position embedding, which transformers already computes in fp32.

Softmax stays inside the attention pattern, in the half type of its inputs, so TensorRT fuses
MatMul-Softmax-MatMul into one flash-style kernel, which keeps the softmax's running max and sum in
fp32 itself; an explicit fp32 Softmax would split the fusion and materialize each global layer's
5184 x 5184 attention matrix per head.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from models.encoder import EXPORT_PRECISIONS
from models.encoder.base import EncoderUnavailable, TokensOnly, pixels_shape, replace_modules, vision_backbone
from models.loading import Sam3Models, as_dtype

log = logging.getLogger(__name__)

OPSET = 18
EXPORT_RECIPE = "1"  # bump when the exported graph changes, so cached exports and engines are rebuilt
ONNX_FILE = "encoder.onnx"
INSTALL_HINT = "pip install 'sam3-stream[onnx]'"
EXTERNAL_DATA_ABOVE_BYTES = 512 << 20  # protobuf caps a file at 2 GiB; the full ViT is 1.8 GB in fp32


class Float32Island(nn.Module):
    """Runs ``inner`` in fp32 inside a half-precision model and hands its output back in ``dtype``."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.float()
        self.dtype = dtype

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden.float()).to(self.dtype)


def export_recipe() -> str:
    """What the exported graph depends on besides the weights (part of every cache key)."""
    return f"recipe {EXPORT_RECIPE}, torch {torch.__version__}, opset {OPSET}"


def export_encoder(
    models: Sam3Models, out_dir: str | Path, *, precision: str = "fp32", external_data: bool | None = None
) -> Path:
    """Write the encoder as ``out_dir/encoder.onnx`` and return that path.

    ``precision``: ``fp32`` (ONNX Runtime), or ``fp16`` / ``bf16`` with fp32 islands (TensorRT).
    ``external_data``: weights in ``encoder.onnx.data`` beside the graph; by default only when they
    are large (the full model), so a small model is one self-contained file.
    """
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise EncoderUnavailable(f"the ONNX export needs {' and '.join(missing)} ({INSTALL_HINT})")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / ONNX_FILE
    module = TokensOnly(export_copy(models, precision)).eval()
    if external_data is None:
        external_data = _weight_bytes(module) > EXTERNAL_DATA_ABOVE_BYTES
    pixels = torch.zeros(pixels_shape(models), dtype=torch.float32, device=models.device)
    log.info("exporting the %s image encoder (%s) to %s", models.source, precision, path)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # tracer chatter about constant shapes: the input size is fixed on purpose
        try:
            torch.onnx.export(
                module,
                (pixels,),
                str(path),
                dynamo=True,
                opset_version=OPSET,
                input_names=["pixels"],
                output_names=["tokens"],
                external_data=external_data,
                verbose=False,
            )
        except Exception as error:  # torch.export and onnxscript raise many types; all mean "no export"
            raise EncoderUnavailable.failed("the ONNX export", error) from error
    return path


def export_copy(models: Sam3Models, precision: str) -> nn.Module:
    """The ViT as it is exported in ``precision``; never the live model when anything must change."""
    backbone = vision_backbone(models)
    dtype = as_dtype(precision)
    if dtype == torch.float32:
        return backbone if models.dtype == torch.float32 else copy.deepcopy(backbone).float()
    half = copy.deepcopy(backbone)
    replace_modules(half, nn.LayerNorm, lambda norm: Float32Island(norm, dtype))
    half.embeddings.patch_embeddings = Float32Island(half.embeddings.patch_embeddings, dtype)
    _parameters_to(half, dtype)
    return half


def _parameters_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters outside the fp32 islands. Buffers keep their type: the rotary embedding's
    frequencies and positions feed fp32 arithmetic, and rounding them would move every position."""
    if isinstance(module, Float32Island):
        return
    for param in module.parameters(recurse=False):
        param.data = param.data.to(dtype)
    for child in module.children():
        _parameters_to(child, dtype)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _quiet_exporter:
    """Keep the exporter's progress lines and its notes about unrelated torchvision ops out of the logs."""

    _names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")

    def __enter__(self) -> None:
        self._levels = {name: logging.getLogger(name).level for name in self._names}
        for name in self._names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
