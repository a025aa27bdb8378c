"""The one place that builds tiny random-weight SAM 3 models (tests, benchmarks, ``tiny-random``).

Same transformers classes as the real model, a few million parameters, seeded: building it twice
gives identical weights. A tiny CLIP tokenizer is built offline from the byte-level alphabet.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTokenizer, Sam3VideoConfig, Sam3VideoModel

from models.prompts import Prompt

TINY_IMAGE_SIZE = 112  # a multiple of the patch size 14
TINY_SEED = 0
TINY_TEXT_POSITIONS = 32
TINY_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TINY_WORDS = ("person", "car", "dog", "cat", "ball", "horn", "ox", "red", "blue", "the", "shape", "circle", "square")


def tiny_video_config() -> Sam3VideoConfig:
    """A SAM 3 video config small enough to run at tens of milliseconds per frame on one CPU thread."""
    size, patch = TINY_IMAGE_SIZE, 14
    grid = size // patch
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "window_size": 4,
            "global_attn_indexes": [1],
            "image_size": size,
            "pretrain_image_size": size,
            "patch_size": patch,
        },
        "fpn_hidden_size": 128,
        "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
    }
    hidden = 128
    tokenizer = tiny_tokenizer()
    detector = {
        "model_type": "sam3",
        "vision_config": vision,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": TINY_TEXT_POSITIONS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "geometry_encoder_config": {"hidden_size": hidden, "num_layers": 1, "intermediate_size": 256},
        "detr_encoder_config": {"hidden_size": hidden, "num_layers": 1, "intermediate_size": 256},
        "detr_decoder_config": {"hidden_size": hidden, "num_layers": 1, "num_queries": 8, "intermediate_size": 256},
        "mask_decoder_config": {"hidden_size": hidden},
    }
    tracker = {
        "model_type": "sam3_tracker_video",
        "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": size, "patch_size": patch},
        "mask_decoder_config": {"hidden_size": hidden, "mlp_dim": 64, "iou_head_hidden_dim": hidden},
        "memory_attention_hidden_size": hidden,
        "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 128,
        "memory_attention_rope_feat_sizes": [grid, grid],
        "memory_encoder_hidden_size": hidden,
        "memory_encoder_output_channels": 64,  # the memory fuser requires 64
        "mask_downsampler_embed_dim": hidden,
        "memory_fuser_embed_dim": hidden,
        "memory_fuser_intermediate_dim": 64,
        "image_size": size,
    }
    return Sam3VideoConfig(
        detector_config=detector,
        tracker_config=tracker,
        low_res_mask_size=4 * grid,
        # Random detectors score every query near one value (about 0.15 here); thresholds sit inside
        # that spread so a few instances are detected, matched and reconditioned, as with real weights.
        score_threshold_detection=0.16,
        new_det_thresh=0.17,
        high_conf_thresh=0.16,
        high_iou_thresh=0.5,
    )


def tiny_video_model(seed: int = TINY_SEED) -> Sam3VideoModel:
    """A seeded random-weight ``Sam3VideoModel`` (detector, tracker and shared ViT)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3VideoModel(tiny_video_config())
    liven_weights(model, seed)
    return model.eval()


@torch.no_grad()
def liven_weights(model: Sam3VideoModel, seed: int = TINY_SEED) -> None:
    """Re-draw the weights at unit gain so outputs depend on the image.

    With transformers' small default init every logit sits near zero: masks come out empty and
    objects "absent", which would make parity tests compare nothing. Fan-in scaled weights, small
    random biases and an object-score bias that says "present" give masks that move with the frame.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
        elif "norm" not in name.lower():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(0.8)


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer built offline: byte-level symbols, their ``</w>`` forms and a few word merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        # merge the word left to right ("p e", "pe r", ...), its last symbol carrying "</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for special in TINY_SPECIAL_TOKENS:
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_TEXT_POSITIONS)


def save_tiny_random(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny model and tokenizer to ``directory`` the way a hub checkpoint is laid out."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_video_model(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def moving_shapes(index: int, width: int = 160, height: int = 120) -> np.ndarray:
    """A synthetic RGB frame for tests and benchmarks: a fixed textured background, a red box
    sliding right and a green one sliding left (wrapping around), so masks have something to follow."""
    rng = np.random.default_rng(0)
    frame = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    span = max(width - 60, 1)
    x = 20 + (3 * index) % span
    y = height // 3
    frame[y : y + height // 3, x : x + width // 5] = (220, 50, 50)
    gx = width - 40 - (2 * index) % span
    frame[height // 12 : height // 4, gx : gx + width // 5] = (50, 220, 50)
    return frame


def click_prompts(count: int, width: int, height: int) -> list[Prompt]:
    """Clicks on :func:`moving_shapes`' shapes (and spread points for more objects), one object each."""
    spots = [(0.3, 0.5), (0.8, 0.17), (0.5, 0.8), (0.15, 0.15), (0.85, 0.85), (0.5, 0.3)]
    return [
        Prompt(points=((spots[i % len(spots)][0] * width, spots[i % len(spots)][1] * height),), point_labels=(1,))
        for i in range(count)
    ]
