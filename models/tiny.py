"""The one place that builds small SAM 3 models: tiny random weights (tests, benchmarks,
``tiny-random``) and the config of the trained ``demo`` model.

Same transformers classes as the real model, a few million parameters, seeded: building it twice
gives identical weights. Small CLIP tokenizers are built offline from the byte-level alphabet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTokenizer, Sam3VideoConfig, Sam3VideoModel

from models.demo_scenes import SCENE_WORDS
from models.prompts import Prompt

TINY_SEED = 0
TINY_TEXT_POSITIONS = 32
TINY_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TINY_WORDS = ("person", "car", "dog", "cat", "ball", "horn", "ox", "red", "blue", "the", "shape", "circle", "square")


@dataclass(frozen=True)
class SmallSam3:
    """The sizes of a small SAM 3 video model (same classes as the real one, far fewer parameters).

    ``hidden`` is shared by the FPN necks, the tracker and the detector's transformers: the tracker
    needs it a multiple of 64 and above its 64-channel memory (64 itself fails in memory attention).
    ``thresholds`` override ``Sam3VideoConfig``'s detection and matching thresholds.
    """

    image_size: int  # a multiple of the patch size 14
    vit_hidden: int
    vit_intermediate: int
    vit_layers: int
    vit_heads: int
    window: int
    global_layers: tuple[int, ...]
    hidden: int = 128
    text_hidden: int = 32
    text_intermediate: int = 64
    text_layers: int = 1
    text_vocab: int = 1000
    queries: int = 8
    detector_layers: int = 1
    words: tuple[str, ...] = TINY_WORDS
    thresholds: dict[str, float] = field(default_factory=dict)


TINY = SmallSam3(
    image_size=112,
    vit_hidden=32,
    vit_intermediate=64,
    vit_layers=2,
    vit_heads=2,
    window=4,
    global_layers=(1,),
    # Random detectors score every query near one value (about 0.15 here); thresholds sit inside
    # that spread so a few instances are detected, matched and reconditioned, as with real weights.
    thresholds={
        "score_threshold_detection": 0.16,
        "new_det_thresh": 0.17,
        "high_conf_thresh": 0.16,
        "high_iou_thresh": 0.5,
    },
)
TINY_IMAGE_SIZE = TINY.image_size

# The trained ``demo`` model: 224 px input (a 60 px object in a 640 x 480 frame spans about 21 x 28
# input pixels and 6 x 8 cells of the 64 x 64 mask; at 112 px it spans 3 x 4 cells and rings or stars
# cannot be drawn even by a perfect low-resolution mask), a wider ViT and 16 queries.
DEMO = SmallSam3(
    image_size=224,
    vit_hidden=64,
    vit_intermediate=256,
    vit_layers=4,
    vit_heads=4,
    window=8,
    global_layers=(1, 3),
    text_hidden=64,
    text_intermediate=128,
    text_layers=2,
    queries=16,
    detector_layers=2,
    words=SCENE_WORDS + ("shape", "object", "a", "the"),
)


def small_video_config(spec: SmallSam3, tokenizer: CLIPTokenizer | None = None) -> Sam3VideoConfig:
    """A ``Sam3VideoConfig`` of ``spec``'s sizes; text ids come from ``tokenizer`` (default: built from the spec)."""
    size, patch = spec.image_size, 14
    grid = size // patch
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": spec.vit_hidden,
            "intermediate_size": spec.vit_intermediate,
            "num_hidden_layers": spec.vit_layers,
            "num_attention_heads": spec.vit_heads,
            "window_size": spec.window,
            "global_attn_indexes": list(spec.global_layers),
            "image_size": size,
            "pretrain_image_size": size,
            "patch_size": patch,
        },
        "fpn_hidden_size": spec.hidden,
        "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
    }
    hidden = spec.hidden
    tokenizer = tokenizer or small_tokenizer(spec.words)
    detr = {"hidden_size": hidden, "num_layers": spec.detector_layers, "intermediate_size": 2 * hidden}
    detector = {
        "model_type": "sam3",
        "vision_config": vision,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": max(spec.text_vocab, len(tokenizer)),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "projection_dim": spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": TINY_TEXT_POSITIONS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "geometry_encoder_config": {"hidden_size": hidden, "num_layers": 1, "intermediate_size": 2 * hidden},
        "detr_encoder_config": dict(detr),
        "detr_decoder_config": {**detr, "num_queries": spec.queries},
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
        detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid, **spec.thresholds
    )


def tiny_video_config() -> Sam3VideoConfig:
    """A SAM 3 video config small enough to run at tens of milliseconds per frame on one CPU thread."""
    return small_video_config(TINY)


def demo_video_config() -> Sam3VideoConfig:
    """The ``demo`` model's config (what ``scripts/train_demo.py`` trains)."""
    return small_video_config(DEMO)


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
    """The tiny test model's tokenizer."""
    return small_tokenizer(TINY.words)


def small_tokenizer(words: tuple[str, ...]) -> CLIPTokenizer:
    """A CLIP tokenizer built offline: byte-level symbols, their ``</w>`` forms and merges for ``words``.

    Each word in ``words`` becomes one token; anything else still tokenizes, byte by byte.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # What the merges so far make of the word (earlier merges win: BPE applies them by rank), then
        # new merges joining those pieces left to right, its last symbol carrying "</w>".
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for special in TINY_SPECIAL_TOKENS:
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_TEXT_POSITIONS)


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair whose merge ranks first."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(rank[p], i) for i, p in enumerate(zip(pieces, pieces[1:], strict=False)) if p in rank]
        if not pairs:
            break
        _, i = min(pairs)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


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
    """Clicks on :func:`moving_shapes`' shapes and spots around them, one object each; beyond those six
    spots, the rest spread on a grid so that no two objects share a click."""
    spots = [(0.3, 0.5), (0.8, 0.17), (0.5, 0.8), (0.15, 0.15), (0.85, 0.85), (0.5, 0.3)]
    extra = count - len(spots)
    if extra > 0:
        columns = math.ceil(math.sqrt(extra))
        rows = math.ceil(extra / columns)
        spots += [((i % columns + 0.25) / columns, (i // columns + 0.4) / rows) for i in range(extra)]
    return [Prompt(points=((x * width, y * height),), point_labels=(1,)) for x, y in spots[:count]]
