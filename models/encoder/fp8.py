"""FP8 matmuls for the ViT's linear layers, for the ``compiled`` backend on GPUs that have them.

Weights are quantized once to float8 e4m3 with one scale per output channel; activations are
quantized on the fly with one scale per token (row), so an outlier token does not crush the others.
The product accumulates in fp32 on the tensor cores and comes back in the model's dtype.
Everything outside the transformer layers' ``nn.Linear`` (patch embedding, norms, attention's
softmax, RoPE) keeps the model's dtype.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.encoder.base import replace_modules

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
_SMALLEST_SCALE = 1e-12  # an all-zero row would otherwise divide by zero
_FP8_CAPABILITY = (8, 9)  # Ada and Hopper and later have FP8 tensor cores


def fp8_problem(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on ``device``, or ``None`` when they can."""
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU; the model is on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < _FP8_CAPABILITY:
        return (
            f"FP8 matmuls need compute capability 8.9+ (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
    if not hasattr(F, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    return None


def rowwise_fp8(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M x K`` -> (``M x K`` float8 e4m3, ``M x 1`` fp32 scales) with ``matrix ~= fp8 * scales``."""
    scales = matrix.abs().amax(dim=1, keepdim=True).float().clamp(min=_SMALLEST_SCALE) / FP8_MAX
    return (matrix.float() / scales).to(FP8), scales


class Fp8Linear(nn.Module):
    """``nn.Linear`` as an FP8 matmul: per-output-channel weight scales, per-token activation scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scales = rowwise_fp8(linear.weight.detach())
        self.register_buffer("weight", weight)  # N x K, row-major: its transpose is the column-major K x N it needs
        self.register_buffer("weight_scales", scales.t().contiguous())  # 1 x N
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        quantized, scales = rowwise_fp8(rows)
        rowwise = F.ScalingType.RowWise
        out = F.scaled_mm(
            quantized, self.weight.t(), scales, rowwise, self.weight_scales, rowwise, output_dtype=hidden.dtype
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*hidden.shape[:-1], out.shape[-1])


def with_fp8_linears(backbone: nn.Module) -> nn.Module:
    """A copy of the ViT whose transformer layers' linears run in FP8; the live model is untouched."""
    fp8 = copy.deepcopy(backbone)
    replace_modules(fp8.layers, nn.Linear, Fp8Linear)
    return fp8
