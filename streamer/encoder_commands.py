"""``sam3-stream export-encoder`` and ``sam3-stream build-engine``: the image encoder, ahead of time.

    sam3-stream export-encoder --model facebook/sam3 --out exported/          # prints exported/encoder.onnx
    sam3-stream build-engine --model facebook/sam3 --precision fp16          # prints the cached engine's path

Both load the model, hand it to the model layer (``models.export_encoder`` / ``models.build_engine``)
and print one line on stdout: the path of what they wrote. The tracker (``--encoder tensorrt``)
finds an engine built here in the same cache, so its first frame does not wait for a build.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models import ENCODER_PRECISIONS, EXPORT_PRECISIONS

log = logging.getLogger(__name__)

USAGE_ERROR = 2
FAILED = 1


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="facebook/sam3",
        help="hub id, local folder, 'tiny-random' or 'full-random' (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if any)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sam3-stream export-encoder``."""
    _add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write encoder.onnx into")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=EXPORT_PRECISIONS,
        help="fp32 (ONNX Runtime), or fp16/bf16 with LayerNorm and the patch embedding in fp32 "
        "(what TensorRT engines are built from) (default %(default)s)",
    )
    parser.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weights in encoder.onnx.data beside the graph (default: only for large models, e.g. the full one)",
    )


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sam3-stream build-engine``."""
    _add_model_arguments(parser)
    parser.add_argument(
        "--precision",
        default="fp16",
        choices=ENCODER_PRECISIONS["tensorrt"],
        help="engine precision; LayerNorm and the patch embedding stay fp32 (default %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="engine cache (default $SAM3_STREAM_CACHE, else ~/.cache/sam3-stream)",
    )


def run_export(args: argparse.Namespace) -> int:
    """``export-encoder``: write the ONNX export, print its path; returns the exit status."""
    import models

    def export(bundle: Any) -> Path:
        return models.export_encoder(bundle, args.out, precision=args.precision, external_data=args.external_data)

    return _run(args, export)


def run_build(args: argparse.Namespace) -> int:
    """``build-engine``: build (or find in the cache) the TensorRT engine, print its path; returns the exit status."""
    import models

    problem = models.tensorrt_problem()
    if problem is not None:  # before loading a model for nothing
        log.error("build-engine: %s", problem)
        return FAILED
    return _run(args, lambda bundle: models.build_engine(bundle, args.precision, cache_dir=args.cache_dir))


def _run(args: argparse.Namespace, make: Callable[[Any], Path]) -> int:
    """Load the model, run ``make`` on it and print the path it returns; errors become one log line."""
    import models

    try:
        bundle = models.load_models(args.model, device=None if args.device == "auto" else args.device)
        path = make(bundle)
    except models.ModelLoadError as error:
        log.error("cannot load the model: %s", error)
        return USAGE_ERROR
    except models.EncoderUnavailable as error:
        log.error("%s: %s", args.command, error)
        return FAILED
    except (ValueError, OSError) as error:
        log.error("%s: %s", args.command, error)
        return USAGE_ERROR if isinstance(error, ValueError) else FAILED
    print(path, flush=True)
    return 0
