"""What a ``--model`` name refers to, decided in well under a second and without torch.

A name is one of the built-in models (``demo``, ``tiny-random``, ``full-random``), a local folder, or a
hub id (``org/name``). :func:`check_model_name` says which, or raises :class:`ModelLoadError` with one
actionable line (and, for a near miss, the name that was probably meant) *before* anything is loaded:
without it a typo in a hub id cost half a minute of the hub client's retries before the same failure.
The hub is asked once, with a short timeout and no retries; with no answer a cached copy is used offline.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "DEMO",
    "DEMO_FOLDER",
    "FULL_RANDOM",
    "HUB_CHECK_TIMEOUT_S",
    "ModelLoadError",
    "ModelName",
    "TINY_RANDOM",
    "check_model_name",
]

DEFAULT_MODEL = "facebook/sam3"
TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"
DEMO = "demo"
BUILTIN_MODELS = (DEMO, TINY_RANDOM, FULL_RANDOM)
# The small trained demo model ships inside the package (scripts/train_demo.py makes it).
DEMO_FOLDER = Path(__file__).parent / "weights" / "demo"
HUB_CHECK_TIMEOUT_S = 3.0  # one question to the hub; a dead network must not hold up a refusal
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_SUGGEST_CUTOFF = 0.7  # difflib ratio: "dmeo" -> "demo" is 0.75, "tiny-randm" -> "tiny-random" 0.95
_HOW_TO_GET_IT = (
    f"log in with `hf auth login` ({DEFAULT_MODEL} also needs its license accepted at "
    f"https://huggingface.co/{DEFAULT_MODEL}), or pass a local folder holding the weights"
)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class ModelName:
    """What a model name refers to. ``kind``: ``builtin``, ``folder`` or ``hub``; ``offline``: load a hub
    model from the local cache only (the hub did not answer, or ``HF_HUB_OFFLINE`` is set)."""

    name: str
    kind: str
    offline: bool = False


def check_model_name(
    model: str, extra_names: tuple[str, ...] = (), hub_timeout_s: float = HUB_CHECK_TIMEOUT_S
) -> ModelName:
    """Say what ``model`` refers to, or raise :class:`ModelLoadError` naming the problem.

    ``extra_names`` are other names the caller accepts (they only feed the suggestions; the caller
    handles them itself). Hub ids are checked with one request of at most ``hub_timeout_s`` seconds;
    nothing is downloaded.
    """
    if model in BUILTIN_MODELS:
        if model == DEMO and not (DEMO_FOLDER / "config.json").is_file():
            raise ModelLoadError(
                f"the demo model is missing from this install ({DEMO_FOLDER}); reinstall sam3-stream, "
                "or train it with scripts/train_demo.py"
            )
        return ModelName(model, "builtin")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {model!r} has no config.json; it does not look like a SAM 3 checkpoint")
        return ModelName(model, "folder")
    if path.exists():
        raise ModelLoadError(f"model {model!r} is a file; pass the folder holding config.json and the weights")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)
    if looks_local:
        raise ModelLoadError(
            f"model folder {model!r} does not exist; pass a folder holding config.json and model weights"
            + _suggestion(model, extra_names)
        )
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"unknown model {model!r}: not a built-in model ({', '.join((*BUILTIN_MODELS, *extra_names))}), "
            f"a local folder or a hub id (org/name){_suggestion(model, extra_names)}"
        )
    return _check_hub_id(model, extra_names, hub_timeout_s)


def _check_hub_id(model: str, extra_names: tuple[str, ...], timeout_s: float) -> ModelName:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    if is_offline_mode():
        if cached:
            return ModelName(model, "hub", offline=True)
        raise ModelLoadError(
            f"model {model!r} is not in the local hub cache and HF_HUB_OFFLINE is set; to download it unset "
            f"HF_HUB_OFFLINE and {_HOW_TO_GET_IT}{_suggestion(model, extra_names)}"
        )
    try:
        HfApi().model_info(model, timeout=timeout_s)
    except GatedRepoError:  # it exists; whether this user may read it, the load says (with what to do)
        return ModelName(model, "hub")
    except RepositoryNotFoundError as error:
        if cached:  # private and no token now: the copy already here still loads
            return ModelName(model, "hub", offline=True)
        login = " (or it is private: log in with `hf auth login`)" if "401" in str(error) else ""
        raise ModelLoadError(f"no model {model!r} on the hub{login}{_suggestion(model, extra_names)}") from error
    except Exception as error:  # no network, DNS, timeout, proxy: the hub client raises many types
        if cached:
            return ModelName(model, "hub", offline=True)
        raise ModelLoadError(
            f"the hub did not answer about {model!r} within {timeout_s:g} s ({type(error).__name__}) and no copy is "
            f"cached here; connect and {_HOW_TO_GET_IT}{_suggestion(model, extra_names)}"
        ) from error
    return ModelName(model, "hub")


def _suggestion(model: str, extra_names: tuple[str, ...]) -> str:
    """``"; did you mean 'demo'?"`` for a near miss of a known name, a local folder or a cached hub id."""
    others = [name for name in _candidates(model, extra_names) if name != model]
    close = difflib.get_close_matches(model, others, n=1, cutoff=_SUGGEST_CUTOFF)
    return f"; did you mean {close[0]!r}?" if close else ""


def _candidates(model: str, extra_names: tuple[str, ...]) -> list[str]:
    names = [*BUILTIN_MODELS, DEFAULT_MODEL, *extra_names, *_cached_hub_ids()]
    # Folders beside the one named (or in the current folder), written the way the user wrote the name.
    parent_text, _, _ = model.rstrip("/").rpartition("/")
    parent = Path(parent_text or ".").expanduser()
    prefix = f"{parent_text}/" if parent_text else ""
    with contextlib.suppress(OSError):
        names += [prefix + entry.name for entry in parent.iterdir() if (entry / "config.json").is_file()]
    return names


def _cached_hub_ids() -> list[str]:
    """Models in the hub cache (its folders are named ``models--org--name``); reading a folder, no network."""
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        entries = list(Path(HF_HUB_CACHE).iterdir())
    except OSError:
        return []
    return [e.name[len("models--") :].replace("--", "/", 1) for e in entries if e.name.startswith("models--")]
