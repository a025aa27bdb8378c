"""The ``compiled`` backend: the ViT through ``torch.compile``, replayed as a CUDA graph at the fixed size.

The input is always one ``S x S`` frame, so one static graph serves every call: Inductor fuses the
elementwise work around the matmuls and CUDA graphs remove the launch cost of several hundred
kernels per frame. With ``fp8`` the transformer layers' linears run as FP8 matmuls (see
:mod:`models.encoder.fp8`) where the GPU has FP8 tensor cores; elsewhere it warns and keeps the
model's dtype. Compilation happens at construction (a warm-up on a blank frame), so the first live
frame is not the one that waits, and a compiler failure falls back before the stream starts.
"""

from __future__ import annotations

import logging

import torch

from models.encoder.base import EncoderUnavailable, TokensOnly, pixels_shape, precision_name, vision_backbone
from models.encoder.fp8 import fp8_problem, with_fp8_linears
from models.loading import Sam3Models

log = logging.getLogger(__name__)

COMPILE_MODE = "reduce-overhead"  # Inductor plus CUDA graphs
WARMUP_CALLS = 3  # the first call compiles, the next ones record and replay the CUDA graph


class CompiledImageEncoder:
    """``torch.compile`` of the model's ViT with CUDA graphs; optionally FP8 linears."""

    def __init__(self, models: Sam3Models, *, fp8: bool = False, mode: str = COMPILE_MODE) -> None:
        if models.device.type != "cuda":
            raise EncoderUnavailable(f"compiled needs a CUDA GPU (CUDA graphs); the model is on {models.device}")
        self.mode = mode
        backbone = vision_backbone(models)
        label = precision_name(models.dtype)
        blank = torch.zeros(pixels_shape(models), dtype=models.dtype, device=models.device)
        if fp8:
            problem = fp8_problem(models.device)
            if problem is None:
                try:
                    self._compile(with_fp8_linears(backbone), "fp8", blank)
                    return
                except EncoderUnavailable as why:
                    problem = f"FP8 {why}"
            log.warning("encoder: %s; compiled runs in %s", problem, label)
        self._compile(backbone, label, blank)

    def _compile(self, backbone: torch.nn.Module, label: str, blank: torch.Tensor) -> None:
        """Compile and warm up (compile, record, replay) on a blank frame; a failure is EncoderUnavailable."""
        self.name = f"compiled-{label}"
        self._forward = torch.compile(TokensOnly(backbone).eval(), mode=self.mode, fullgraph=True, dynamic=False)
        try:
            for _ in range(WARMUP_CALLS):
                self.encode(blank)
        except Exception as error:  # Inductor and Triton raise many types; any of them means "not compiled"
            raise EncoderUnavailable.failed("torch.compile", error) from error

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # A new step: the graph may overwrite its previous output, which is why the result is cloned.
        torch.compiler.cudagraph_mark_step_begin()
        return self._forward(pixels).clone()
