"""Load SAM 3 once: the text-prompted video model and its point/box tracker share one set of weights.

``Sam3VideoModel`` holds the detector (with the ViT image encoder and the text encoder), a
``Sam3TrackerVideoModel`` without its own image encoder, and the tracker's neck. Points and boxes
are served by that same tracker module, fed from the shared encoder, so one frame costs one
encoder pass however many objects and prompt kinds there are.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Sam3TrackerVideoModel, Sam3VideoModel

from models import hf_internals
from models.devices import default_device, resolve_device
from models.model_names import (
    DEFAULT_MODEL,
    DEMO,
    DEMO_FOLDER,
    FULL_RANDOM,
    TINY_RANDOM,
    ModelLoadError,
    ModelName,
    check_model_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DEMO",
    "FULL_RANDOM",
    "TINY_RANDOM",
    "ModelLoadError",
    "Sam3Models",
    "as_dtype",
    "default_device",
    "default_dtype",
    "load_models",
]

# Which training stages the shipped demo weights went through ({"stages": ["point", "clip", "text"]}).
DEMO_CARD = "demo_card.json"


@dataclass
class Sam3Models:
    """The loaded SAM 3 weights, their tokenizer, and where they run."""

    video_model: Sam3VideoModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    source: str
    # False for weights whose text detector was never trained (an early demo model): text prompts are refused.
    text_detector: bool = True

    @property
    def tracker_model(self) -> Sam3TrackerVideoModel:
        """The point/box tracker: the video model's own tracker module (same weights, no second encoder)."""
        return self.video_model.tracker_model

    @property
    def image_size(self) -> int:
        return int(self.video_model.config.detector_config.vision_config.image_size)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (SAM 3's own inference precision), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_models(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Sam3Models:
    """Load SAM 3 from a hub id (default ``facebook/sam3``), a local folder, ``demo``, ``tiny-random`` or
    ``full-random``.

    ``demo`` is the small model trained on generated shape scenes that ships with the package (no
    download; a demonstration of the pipeline, not SAM 3).

    ``tiny-random`` builds the seeded tiny test model in code, saves it to a temporary folder and
    loads it back through the same path as real weights. ``full-random`` is the full-size default
    config with random weights (realistic cost for benchmarks; use a GPU).
    """
    checked = check_model_name(model)  # first: a typo is refused in milliseconds, before anything loads
    device = resolve_device(device)
    dtype = as_dtype(dtype) if dtype is not None else default_dtype(device)
    if model == TINY_RANDOM:
        from models.tiny import save_tiny_random

        with tempfile.TemporaryDirectory(prefix="sam3-tiny-random-") as folder:
            save_tiny_random(folder)
            return _from_pretrained(ModelName(folder, "folder"), device, dtype, source_name=TINY_RANDOM)
    if model == FULL_RANDOM:
        return _full_random(device, dtype)
    if model == DEMO:
        bundle = _from_pretrained(ModelName(str(DEMO_FOLDER), "folder"), device, dtype, source_name=DEMO)
        card = DEMO_FOLDER / DEMO_CARD
        stages = json.loads(card.read_text()).get("stages", []) if card.is_file() else []
        bundle.text_detector = "text" in stages
        return bundle
    return _from_pretrained(checked, device, dtype, source_name=model)


def _from_pretrained(checked: ModelName, device: torch.device, dtype: torch.dtype, source_name: str) -> Sam3Models:
    location = str(Path(checked.name).expanduser()) if checked.kind == "folder" else checked.name
    if checked.offline:
        log.warning("the hub did not answer; loading %s from the local cache", checked.name)
    try:
        video_model = Sam3VideoModel.from_pretrained(location, dtype=dtype, local_files_only=checked.offline)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=checked.offline)
    except Exception as error:  # the hub client raises many types; all become one actionable message
        raise ModelLoadError(_explain_load_failure(checked.name, error)) from error
    video_model.to(device).eval()
    _prepare(video_model)
    log.info("loaded SAM 3 from %s on %s (%s)", source_name, device, dtype)
    return Sam3Models(video_model=video_model, tokenizer=tokenizer, device=device, dtype=dtype, source=source_name)


def _full_random(device: torch.device, dtype: torch.dtype) -> Sam3Models:
    from transformers import Sam3VideoConfig

    from models.tiny import tiny_tokenizer

    with torch.device(device):
        video_model = Sam3VideoModel(Sam3VideoConfig())
    video_model.to(dtype).eval()
    _prepare(video_model)
    # The tiny tokenizer's ids fit the full text encoder's vocabulary; the weights are random anyway.
    return Sam3Models(
        video_model=video_model, tokenizer=tiny_tokenizer(), device=device, dtype=dtype, source=FULL_RANDOM
    )


def _prepare(video_model: Sam3VideoModel) -> None:
    """Check the internals the tracker relies on and cache the tracker's constant positional embedding."""
    hf_internals.check_model(video_model)
    hf_internals.cache_constant_embeddings(video_model)


def _explain_load_failure(source: str, error: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    text = " ".join(str(e) for e in chain)
    access = (
        f"{source} is gated: accept its license at https://huggingface.co/{source}, then log in with "
        "`hf auth login` (or set HF_TOKEN), or pass a local folder holding the weights"
    )
    if any(isinstance(e, GatedRepoError) for e in chain) or "gated" in text.lower():
        return f"cannot load {source!r}: {access}"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        return (
            f"cannot load {source!r}: no such model on the hub (or it is private/gated). If it is {DEFAULT_MODEL}: "
            f"{access}. Otherwise check the id or pass a local folder"
        )
    if (
        any(isinstance(e, LocalEntryNotFoundError) for e in chain)
        or "offline" in text.lower()
        or "connect" in text.lower()
    ):
        return (
            f"cannot load {source!r}: the hub could not be reached and no cached copy was found. Connect and log in "
            f"(`hf auth login`; {DEFAULT_MODEL} also needs its license accepted on the hub), or pass a local folder"
        )
    return f"cannot load {source!r}: {error}"


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name (``bf16``, ``fp16``, ``fp32`` or the long forms)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in names:
        raise ValueError(f"dtype: unknown {dtype!r} (use one of {', '.join(names)})")
    return names[dtype]
