"""Load SAM 3 once: the text-prompted video model and its point/box tracker share one set of weights.

``Sam3VideoModel`` holds the detector (with the ViT image encoder and the text encoder), a
``Sam3TrackerVideoModel`` without its own image encoder, and the tracker's neck. Points and boxes
are served by that same tracker module, fed from the shared encoder, so one frame costs one
encoder pass however many objects and prompt kinds there are.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Sam3TrackerVideoModel, Sam3VideoModel

from models import hf_internals

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/sam3"
TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"
DEMO = "demo"
# The small trained demo model ships inside the package (scripts/train_demo.py makes it).
DEMO_FOLDER = Path(__file__).parent / "weights" / "demo"
# Which training stages the shipped demo weights went through ({"stages": ["point", "clip", "text"]}).
DEMO_CARD = "demo_card.json"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do about it."""


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


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
    device = torch.device(device) if device is not None else default_device()
    dtype = as_dtype(dtype) if dtype is not None else default_dtype(device)
    if model == TINY_RANDOM:
        from models.tiny import save_tiny_random

        with tempfile.TemporaryDirectory(prefix="sam3-tiny-random-") as folder:
            save_tiny_random(folder)
            return _from_pretrained(folder, device, dtype, source_name=TINY_RANDOM)
    if model == FULL_RANDOM:
        return _full_random(device, dtype)
    if model == DEMO:
        if not (DEMO_FOLDER / "config.json").is_file():
            raise ModelLoadError(
                f"the demo model is missing from this install ({DEMO_FOLDER}); reinstall sam3-stream, "
                "or train it with scripts/train_demo.py"
            )
        bundle = _from_pretrained(str(DEMO_FOLDER), device, dtype, source_name=DEMO)
        card = DEMO_FOLDER / DEMO_CARD
        stages = json.loads(card.read_text()).get("stages", []) if card.is_file() else []
        bundle.text_detector = "text" in stages
        return bundle
    return _from_pretrained(model, device, dtype, source_name=model)


def _from_pretrained(source: str, device: torch.device, dtype: torch.dtype, source_name: str) -> Sam3Models:
    path = Path(source).expanduser()
    # Hub ids look like "org/name"; anything else path-like is meant as a local folder.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
    if looks_local and not path.exists():
        raise ModelLoadError(
            f"model folder {source!r} does not exist; pass a folder holding config.json and model weights"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {source!r} has no config.json; it does not look like a SAM 3 checkpoint")
    location = str(path) if path.exists() else source
    try:
        video_model = Sam3VideoModel.from_pretrained(location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as error:  # the hub client raises many types; all become one actionable message
        raise ModelLoadError(_explain_load_failure(source, error)) from error
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
