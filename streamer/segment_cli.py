"""``sam3-stream segment-video`` and ``segment-image``: segment one file and write the result.

    sam3-stream segment-video clip.mp4 --prompt person -o out.mp4 --masks masks.json
    sam3-stream segment-video clip.mp4 --points 320,200 --negative-points 300,260 --frame 40 -o out.mp4
    sam3-stream segment-image photo.jpg --prompt dog -o dog.png

Problems (unreadable input, bad prompt, unwritable output, model that cannot load) end the command
with one line on stderr and exit status 1; bad arguments exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models import Sam3VideoPredictor

log = logging.getLogger("sam3-stream")

FAILED = 1
INTERRUPTED = 130
DEFAULT_MODEL = "facebook/sam3"  # models.DEFAULT_MODEL, without importing torch to build the parser


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``segment-video``."""
    parser.add_argument("input", metavar="IN", help="video file (mp4, mov, webm, mkv) or a folder of JPEG frames")
    _add_prompt_arguments(parser)
    parser.add_argument("--frame", type=int, default=0, help="frame the prompts are given on (default %(default)s)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="H.264 video to write")
    parser.add_argument("--fps", type=float, default=None, help="output rate (default: the input's, else 30)")
    _add_common_arguments(parser, "write the masks as a black-and-white video instead of drawing them on the input")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``segment-image``."""
    parser.add_argument("input", metavar="IN", help="image file (jpg, png, webp, bmp, gif)")
    _add_prompt_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT.png", help="image to write (png, jpg, webp)")
    _add_common_arguments(parser, "write the mask (white on black) instead of drawing it on the input")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--encoder`` and ``--encoder-precision``: the predictor to load
    (``segment-video``, ``segment-image`` and ``api``; see :func:`streamer.segment.load_predictor`)."""
    from streamer.tracker_service import add_encoder_arguments

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id, local folder or 'tiny-random' (tests) (default %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="torch device, e.g. cuda, cpu (default: cuda if any)")
    add_encoder_arguments(parser)


def predictor_from_args(args: argparse.Namespace) -> Sam3VideoPredictor:
    """The predictor :func:`add_model_arguments`' options name; ``ModelLoadError`` or ``ValueError`` says why not."""
    from streamer.segment import load_predictor

    device = None if args.device in (None, "auto") else args.device
    return load_predictor(args.model, device, args.encoder, args.encoder_precision)


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``segment-video`` or ``segment-image`` (by ``args.command``); returns the exit status."""
    try:
        return _run(args)
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: PredictorError, ModelLoadError
        print(f"sam3-stream {args.command}: error: {error}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"sam3-stream {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from streamer.segment import (
        IMAGE_OUTPUTS,
        VIDEO_OUTPUTS,
        FilePrompt,
        ObjectPrompt,
        check_output,
        segment_image,
        segment_video,
    )

    check_output(args.output, IMAGE_OUTPUTS if args.command == "segment-image" else VIDEO_OUTPUTS)

    objects = [ObjectPrompt(box=box) for box in args.boxes]
    if args.points or args.negative_points:
        labels = (1,) * len(args.points) + (0,) * len(args.negative_points)
        objects.insert(0, ObjectPrompt(points=(*args.points, *args.negative_points), point_labels=labels))
    prompt = FilePrompt(texts=tuple(args.prompts), objects=tuple(objects))
    if not (prompt.texts or prompt.objects):
        raise ValueError("prompt: give --prompt TEXT, --points or --box")
    predictor = predictor_from_args(args)
    overlay = not args.no_overlay
    if args.command == "segment-image":
        summary = segment_image(predictor, args.input, args.output, prompt, masks_path=args.masks, overlay=overlay)
    else:
        with _progress_bar() as bar:
            summary = segment_video(
                predictor,
                args.input,
                args.output,
                prompt,
                frame_index=args.frame,
                masks_path=args.masks,
                overlay=overlay,
                fps=args.fps,
                progress=bar,
            )
    found = ", ".join(str(i) for i in summary.object_ids) or "none"
    print(f"wrote {args.output} ({summary.frames} frame(s), {summary.width}x{summary.height}; objects: {found})")
    if args.masks:
        print(f"wrote {args.masks}")
    return 0


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr (hidden when stderr is not a terminal), fed ``(done, total)``."""
    from tqdm import tqdm

    with tqdm(unit="frame", desc="segmenting", disable=None, file=sys.stderr) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, got {text!r}") from None
    return x, y


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 in pixels, got {text!r}") from None
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"box {text!r}: X1 must exceed X0 and Y1 must exceed Y0")
    return x0, y0, x1, y1


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt", action="append", dest="prompts", default=[], metavar="TEXT", help="text to segment; repeatable"
    )
    parser.add_argument(
        "--points", nargs="+", type=_point, default=[], metavar="X,Y", help="clicks on the object (pixels)"
    )
    parser.add_argument(
        "--negative-points", nargs="+", type=_point, default=[], metavar="X,Y", help="clicks off the object (pixels)"
    )
    parser.add_argument(
        "--box",
        action="append",
        dest="boxes",
        type=_box,
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="box around an object (pixels); repeatable, one object each",
    )


def _add_common_arguments(parser: argparse.ArgumentParser, no_overlay_help: str) -> None:
    parser.add_argument("--masks", metavar="OUT.json", help="also write every frame's masks (COCO RLE) as JSON")
    parser.add_argument("--no-overlay", action="store_true", help=no_overlay_help)
    add_model_arguments(parser)
