"""Which torch device a ``--device`` name means, refused at once (one line) when it cannot be used here."""

from __future__ import annotations

import torch

from models.model_names import ModelLoadError

__all__ = ["default_device", "resolve_device"]

_CPU_BUILD_HINT = (
    "this PyTorch is a CPU-only build; install the CUDA build (see the README: 'Installing PyTorch') "
    "or use device 'cpu'"
)


def default_device() -> torch.device:
    """CUDA when there is a usable GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device ``device`` names (``None`` or ``"auto"``: :func:`default_device`).

    Raises :class:`ModelLoadError` whose message starts with ``device`` for a name torch does not know,
    CUDA asked for where there is none (a CPU build, or no GPU or driver), a GPU index past the last one,
    or a backend (``mps``, ``xpu``) not available here. Without this, ``--device cuda`` on a CPU-only
    machine surfaced as a raw traceback deep inside the model load.
    """
    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"device {device!r}: not a torch device (use auto, cpu, cuda, cuda:N or mps)") from error
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ModelLoadError(f"device {device!r}: CUDA is not available: {_CPU_BUILD_HINT}")
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r}: CUDA is not available (no NVIDIA GPU or driver found; "
                "check nvidia-smi and CUDA_VISIBLE_DEVICES) or use device 'cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ModelLoadError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    elif resolved.type != "cpu":
        backend = getattr(torch, resolved.type, None) or getattr(torch.backends, resolved.type, None)
        is_available = getattr(backend, "is_available", None)
        if is_available is None or not is_available():
            raise ModelLoadError(f"device {device!r}: the {resolved.type} backend is not available on this machine")
    return resolved
