"""What ``sam3-stream run`` checks before it starts anything: the mistakes no restart can heal.

A missing file, a camera that is not there, a misspelt model, ``--device cuda`` on a machine without
CUDA: caught here, they stop ``run`` with one line naming the option, in a few seconds and before the
page's URL is printed. Caught by the children instead, they cost a model load, printed a URL for a
page that never worked, and (for a device) a traceback on every restart.

Each check raises ``ValueError`` whose message starts with the option it is about.
"""

from __future__ import annotations

import argparse

from streamer.tracking import PASSTHROUGH

__all__ = ["check_model", "check_run_arguments", "check_source"]


def check_run_arguments(args: argparse.Namespace) -> None:
    """Check ``run``'s source, model, encoder and device (``ValueError``: the first problem found)."""
    check_source(args.source, width=args.width, height=args.height, fps=args.fps)
    if args.model != PASSTHROUGH:
        check_model(args.model, args.device, args.encoder, args.encoder_precision)


def check_source(spec: str, *, width: int | None = None, height: int | None = None, fps: float | None = None) -> None:
    """The source gives a frame: a file decodes, a camera opens (network URLs: their scheme only)."""
    from streamer.sources import SourceError, probe_source  # PyAV and OpenCV: only for the commands that read

    try:
        probe_source(spec, width=width, height=height, fps=fps)
    except (ValueError, SourceError) as exc:
        raise ValueError(f"--source: {exc}") from exc


def check_model(model: str, device: str, encoder: str = "torch", encoder_precision: str | None = None) -> None:
    """The model name refers to something loadable, the encoder options agree, and the device is usable
    here. Nothing is loaded; torch is imported only when a device other than ``auto`` is named."""
    import models

    try:
        models.check_encoder_choice(encoder, encoder_precision)
    except ValueError as exc:  # "encoder_precision: tensorrt takes fp16, bf16; got 'fp8'"
        field, _, problem = str(exc).partition(":")
        raise ValueError(f"--{field.replace('_', '-')}:{problem}") from exc
    try:
        models.check_model_name(model, extra_names=(PASSTHROUGH,))
    except models.ModelLoadError as exc:
        raise ValueError(f"--model: {exc}") from exc
    if device in (None, "auto"):  # always usable: CUDA when there is a GPU, else the CPU
        return
    try:
        models.resolve_device(device)
    except models.ModelLoadError as exc:
        raise ValueError(f"--{exc}") from exc  # its message starts with "device 'cuda': ..."
