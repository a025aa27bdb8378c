"""Image-encoder backends. The encoder is about three quarters of a frame's work, so it is replaceable.

A backend turns normalized pixels into the detector's vision output (ViT features plus the
detector's FPN); ``tracker_features`` derives the tracker's FPN from the same ViT pass. Whatever
computes the features, the same tracker consumes them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from models.loading import Sam3Models


class ImageEncoder(Protocol):
    """What the streaming tracker needs from an image-encoder backend."""

    def encode(self, pixels: torch.Tensor) -> Any:
        """``1 x 3 x S x S`` pixels -> the detector's vision output (``Sam3VisionEncoderOutput``)."""

    def tracker_features(self, vision_embeds: Any) -> dict[str, Any]:
        """The tracker's ``vision_feats`` / ``vision_pos_embeds`` from the same encoder output."""


class TorchImageEncoder:
    """The model's own PyTorch encoder (eager; bf16 on GPU through the loaded dtype)."""

    def __init__(self, models: Sam3Models) -> None:
        self.models = models

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Any:
        return self.models.video_model.detector_model.get_vision_features(pixel_values=pixels)

    @torch.inference_mode()
    def tracker_features(self, vision_embeds: Any) -> dict[str, Any]:
        feats, pos = self.models.video_model.get_vision_features_for_tracker(vision_embeds)
        return {"vision_feats": feats, "vision_pos_embeds": pos}
