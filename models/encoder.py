"""Image-encoder backends. The ViT encoder is about three quarters of a frame's work, so it is replaceable.

A backend turns normalized pixels into the ViT's output tokens; ``FrameFeatures`` derives from
those tokens, on demand, the detector's FPN (text prompts) and the tracker's FPN (every object),
so one encoder pass serves both and nothing is computed that the active prompts do not need.
Whatever backend computes the tokens (torch, ONNX Runtime, TensorRT), the same tracker consumes them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Protocol

import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from models.loading import Sam3Models


class ImageEncoder(Protocol):
    """What the streaming tracker needs from an image-encoder backend."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``1 x 3 x S x S`` normalized pixels -> ViT tokens ``1 x (S/14)^2 x C``."""


class TorchImageEncoder:
    """The model's own PyTorch ViT (eager; bf16 on GPU through the loaded dtype)."""

    def __init__(self, models: Sam3Models) -> None:
        self.backbone = models.video_model.detector_model.vision_encoder.backbone

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels).last_hidden_state


class FrameFeatures:
    """One frame's encoder tokens, and the necks derived from them the first time they are asked for."""

    def __init__(self, models: Sam3Models, tokens: torch.Tensor) -> None:
        self.models = models
        self.tokens = tokens
        self._detector: Sam3VisionEncoderOutput | None = None
        self._tracker: dict[str, Any] | None = None

    @torch.inference_mode()
    def detector(self) -> Sam3VisionEncoderOutput:
        """What ``Sam3Model.get_vision_features`` returns: the tokens plus the detector's FPN."""
        if self._detector is None:
            vision = self.models.video_model.detector_model.vision_encoder
            side = self.models.image_size // vision.config.backbone_config.patch_size
            spatial = self.tokens.view(self.tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
            fpn, fpn_pos = vision.neck(spatial)
            self._detector = Sam3VisionEncoderOutput(last_hidden_state=self.tokens, fpn_hidden_states=fpn, fpn_position_encoding=fpn_pos)
        return self._detector

    @torch.inference_mode()
    def tracker(self) -> dict[str, Any]:
        """The tracker's ``vision_feats`` / ``vision_pos_embeds`` (its own FPN over the same tokens)."""
        if self._tracker is None:
            feats, pos = self.models.video_model.get_vision_features_for_tracker(SimpleNamespace(last_hidden_state=self.tokens))
            self._tracker = {"vision_feats": feats, "vision_pos_embeds": pos}
        return self._tracker
