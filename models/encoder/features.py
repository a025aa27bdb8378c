"""``FrameFeatures``: one frame's encoder tokens, and the necks SAM 3 derives from them.

A backend turns normalized pixels into the ViT's output tokens; ``FrameFeatures`` derives from
those tokens, on demand, the detector's FPN (text prompts) and the tracker's FPN (every object),
so one encoder pass serves both and nothing is computed that the active prompts do not need.
Whatever backend computes the tokens (torch, ONNX Runtime, TensorRT), the same tracker consumes them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from models.loading import Sam3Models


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
            fpn, fpn_pos = self.models.video_model.detector_model.vision_encoder.neck(self._spatial_tokens())
            self._detector = Sam3VisionEncoderOutput(
                last_hidden_state=self.tokens, fpn_hidden_states=fpn, fpn_position_encoding=fpn_pos
            )
        return self._detector

    @torch.inference_mode()
    def tracker(self) -> dict[str, Any]:
        """The tracker's ``vision_feats`` / ``vision_pos_embeds`` (its own FPN over the same tokens).

        Equal to ``Sam3VideoModel.get_vision_features_for_tracker``, minus the coarsest FPN level,
        which that method computes and then drops.
        """
        if self._tracker is None:
            video = self.models.video_model
            neck, decoder = video.tracker_neck, video.tracker_model.mask_decoder
            spatial = self._spatial_tokens()
            maps = [layer(spatial) for layer in neck.fpn_layers[:-1]]
            positions = [neck.position_encoding(m.shape, m.device, m.dtype) for m in maps]
            maps[0], maps[1] = decoder.conv_s0(maps[0]), decoder.conv_s1(maps[1])
            # N x C x H x W -> HW x N x C, the layout the tracker's memory attention takes
            self._tracker = {
                "vision_feats": [m.flatten(2).permute(2, 0, 1) for m in maps],
                "vision_pos_embeds": [p.flatten(2).permute(2, 0, 1) for p in positions],
            }
        return self._tracker

    def _spatial_tokens(self) -> torch.Tensor:
        """ViT tokens ``N x HW x C`` as the feature map ``N x C x H x W`` the necks take."""
        side = (
            self.models.image_size
            // self.models.video_model.detector_model.vision_encoder.config.backbone_config.patch_size
        )
        return self.tokens.view(self.tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
