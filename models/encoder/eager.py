"""The ``torch`` backend: the model's own PyTorch ViT, eager, in the loaded dtype (bf16 on CUDA)."""

from __future__ import annotations

import torch

from models.encoder.base import precision_name, vision_backbone
from models.loading import Sam3Models


class TorchImageEncoder:
    """The model's own PyTorch ViT (eager; bf16 on GPU through the loaded dtype)."""

    def __init__(self, models: Sam3Models) -> None:
        self.backbone = vision_backbone(models)
        self.name = f"torch-{precision_name(models.dtype)}"

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels).last_hidden_state
