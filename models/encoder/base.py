"""What every image-encoder backend is: the ``ImageEncoder`` seam and the few facts they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from models.loading import Sam3Models


class ImageEncoder(Protocol):
    """What the streaming tracker needs from an image-encoder backend.

    ``encode`` takes ``1 x 3 x S x S`` normalized pixels (the models' dtype, on their device) and
    returns the ViT's tokens ``1 x (S/14)^2 x C`` in the same dtype and device, as a tensor of its
    own: a later call never overwrites it.
    """

    name: str
    """The backend and precision that actually run, e.g. ``torch-bf16`` or ``tensorrt-fp16``."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``1 x 3 x S x S`` normalized pixels -> ViT tokens ``1 x (S/14)^2 x C``."""
        ...


class EncoderUnavailable(RuntimeError):
    """A backend cannot run here (library missing, no GPU, build failed); the message says why."""

    @classmethod
    def failed(cls, step: str, error: BaseException) -> EncoderUnavailable:
        """``"<step> failed: <ErrorType>: <first line of its message>"``: one line for a log."""
        lines = str(error).strip().splitlines()
        return cls(f"{step} failed: {type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "))


_PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names the CLI and the cache keys use)."""
    return _PRECISION_NAMES[dtype]


def vision_backbone(models: Sam3Models) -> nn.Module:
    """The ViT shared by the detector and the tracker (``Sam3ViTModel``): what every backend runs."""
    return models.video_model.detector_model.vision_encoder.backbone


def pixels_shape(models: Sam3Models) -> tuple[int, int, int, int]:
    """The one input shape every backend is built for: a single ``S x S`` RGB frame."""
    return (1, 3, models.image_size, models.image_size)


class TokensOnly(nn.Module):
    """The ViT with a plain tensor out (its last hidden state): what exporters and compilers take."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels).last_hidden_state


def replace_modules(root: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace, in place, every submodule of ``root`` that is a ``kind`` with ``make(that_module)``."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
