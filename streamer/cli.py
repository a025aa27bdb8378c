"""``sam3-stream``: run the whole pipeline on one machine, or each part on its own.

    sam3-stream run --model facebook/sam3 --source 0 --prompt person      # all three, ipc://, one machine
    sam3-stream keys ~/keys                  # CURVE keys: every part across hosts takes --keys (a copy of) it
    sam3-stream capture --source rtsp://robot/cam --frames-endpoint tcp://0.0.0.0:5555 --keys ~/keys
    sam3-stream track --model facebook/sam3 --frames-endpoint tcp://robot:5555 --keys ~/keys
    sam3-stream serve --http-port 8080
    sam3-stream export-encoder --model facebook/sam3 --out exported/     # the image encoder as ONNX
    sam3-stream build-engine --model facebook/sam3 --precision fp16     # its TensorRT engine, cached
    sam3-stream segment-video clip.mp4 --prompt person -o out.mp4 --masks masks.json   # one-off files
    sam3-stream segment-image photo.jpg --prompt dog -o dog.png
    sam3-stream api --model facebook/sam3 --http-port 8090                # files over HTTP (hosted-API fields)

``run`` starts ``capture``, ``track`` and ``serve`` as child processes over ipc:// sockets in a private
temporary folder, prints the page's URL, restarts a child that dies (with back-off) while the others
keep running, and stops them all on Ctrl-C or SIGTERM. The tracker keeps each stream's active prompts
in that folder, so a tracker that crashed re-applies them when it comes back.

Before starting anything ``run`` checks what no restart can heal (:mod:`streamer.preflight`: the source,
the model name, the device) and refuses with one line naming it, so the URL it prints is for a pipeline
that can run. A child that still *refuses* to start (a model that exists but cannot be loaded) says so in
a file the supervisor names in ``SAM3_STREAM_REFUSAL_FILE``, and ``run`` stops with its reason; one that
*finished* (a file played once, without ``--loop``) says so in ``SAM3_STREAM_FINISHED_FILE`` and is not
restarted (:mod:`streamer.exit_notes`). Every other exit is a crash, restarted: exit statuses are not
interpreted, since a crash can produce any of them (an uncaught ``ValueError`` once made the tracker exit
2, read as "bad arguments").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from streamer import tracker_service
from streamer.capture import Backoff, positive
from streamer.config import GATEWAY_HTTP_HOST, GATEWAY_HTTP_PORT, Endpoints
from streamer.exit_notes import FINISHED_ENV, REFUSAL_ENV, read_note, report_refusal
from streamer.log_setup import setup_logging
from streamer.preflight import check_run_arguments
from streamer.signals import StopSignals

__all__ = ["REFUSAL_ENV", "USAGE_ERROR", "Child", "Supervisor", "build_parser", "main", "report_refusal"]

log = logging.getLogger("sam3-stream")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STOP_TIMEOUT_S = 10.0  # a child still running this long after SIGTERM is killed
STABLE_AFTER_S = 30.0  # a child that ran this long before dying restarts after the shortest back-off
USAGE_ERROR = 2  # exit status when refusing arguments (the supervisor reads the refusal file, not this)
_TICK_S = 0.2


@dataclass
class Child:
    """One supervised process: its name, its command line, and its restart bookkeeping."""

    name: str
    argv: list[str]
    refusal_file: Path | None = None  # where the child says it refuses to start (None: never stop for it)
    finished_file: Path | None = None  # where the child says it is done (None: always restart it)
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, cap=30.0))
    proc: subprocess.Popen | None = None
    started: float = 0.0  # monotonic
    restart_at: float | None = None  # monotonic; set while waiting to restart
    restarts: int = 0


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by SIGKILL), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG (Linux)


class Supervisor:
    """Runs child processes, restarts those that die (exponential back-off), stops them all on request.

    Children get their own session, so a terminal's Ctrl-C reaches the supervisor only and the
    shutdown is the supervisor's to order: SIGTERM to all, wait, SIGKILL what is left.
    """

    def __init__(self, children: Sequence[Child]) -> None:
        self.children = list(children)

    def start(self, child: Child) -> None:
        env = dict(os.environ)
        for variable, note in ((REFUSAL_ENV, child.refusal_file), (FINISHED_ENV, child.finished_file)):
            if note is not None:
                note.unlink(missing_ok=True)
                env[variable] = str(note)
        child.proc = subprocess.Popen(
            child.argv,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child.started, child.restart_at = time.monotonic(), None
        log.info("%s started (pid %d)", child.name, child.proc.pid)

    def check(self) -> int | None:
        """Restart what died and is due (not what finished); returns an exit status when a child refused to start."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and (code := child.proc.poll()) is not None:
                uptime = now - child.started
                child.proc = None
                reason = read_note(child.refusal_file)
                if reason is not None:
                    log.error("%s refused to start: %s; stopping", child.name, reason)
                    return USAGE_ERROR
                done = read_note(child.finished_file)
                if done is not None:
                    log.info("%s finished: %s", child.name, done)
                    continue
                if uptime >= STABLE_AFTER_S:
                    child.backoff.reset()
                delay = child.backoff.next_delay()
                child.restart_at = now + delay
                log.warning(
                    "%s exited with status %d after %.1f s; restarting in %.1f s", child.name, code, uptime, delay
                )
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self.start(child)
        return None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every child, wait up to ``timeout_s`` for all, then SIGKILL the rest; reaps them all."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
                child.proc.kill()
                child.proc.wait()
        for child in self.children:
            child.proc, child.restart_at = None, None

    def kill(self) -> None:
        """SIGKILL every child now and reap it (a second Ctrl-C during :meth:`stop`)."""
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait()
                child.proc = None


class _LastError(logging.Handler):
    """Remembers the last ERROR logged: the reason a command gives for refusing to start."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.message = record.getMessage()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are reported as refusals (see :func:`report_refusal`)."""

    def error(self, message: str) -> NoReturn:
        """One line naming the problem (argparse's usage block buried it), and the usage-error status."""
        report_refusal(f"{self.prog}: {message}")
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def child_argv(command: str, log_level: str, *args: str) -> list[str]:
    """The command line running ``sam3-stream COMMAND`` with this Python (a supervised child)."""
    return [sys.executable, "-m", "streamer.cli", command, "--log-level", log_level, *args]


def pipeline_children(args: argparse.Namespace, endpoints: Endpoints, folder: Path) -> list[Child]:
    """The capture, tracker and gateway command lines of ``sam3-stream run``, meeting on ``endpoints``;
    ``folder`` (private) holds the tracker's prompt store and the children's refusal files."""
    capture_args = ["--source", args.source, "--frames-endpoint", endpoints.frames, "--stream-id", args.stream_id]
    if args.loop:
        capture_args.append("--loop")
    for option in ("fps", "width", "height"):
        if getattr(args, option) is not None:
            capture_args += [f"--{option}", str(getattr(args, option))]
    track_args = [
        "--model",
        args.model,
        "--device",
        args.device,
        "--frames-endpoint",
        endpoints.frames,
        "--results-endpoint",
        endpoints.results,
        "--control-endpoint",
        endpoints.control,
        "--encoder",
        args.encoder,
        "--state-dir",
        str(folder / "state"),
    ]
    if args.encoder_precision is not None:
        track_args += ["--encoder-precision", args.encoder_precision]
    for text in args.prompts:
        track_args += ["--prompt", text]
    if args.passthrough_objects:
        track_args += ["--passthrough-objects", str(args.passthrough_objects)]
    serve_args = [
        "--frames-endpoint",  # the page's smooth view reads the camera itself
        endpoints.frames,
        "--results-endpoint",
        endpoints.results,
        "--control-endpoint",
        endpoints.control,
        "--stream-id",
        args.stream_id,
        "--http-host",
        args.http_host,
        "--http-port",
        str(args.http_port),
    ]
    for host in args.ice_hosts or []:
        serve_args += ["--ice-host", host]
    for name in args.allowed_hosts:
        serve_args += ["--allowed-host", name]
    if args.insecure:
        serve_args.append("--insecure")
    return [
        Child(
            name,
            child_argv(command, args.log_level, *argv),
            refusal_file=folder / f"refused-{name}",
            finished_file=folder / f"finished-{name}",
        )
        for name, command, argv in (
            ("capture", "capture", capture_args),
            ("tracker", "track", track_args),
            ("gateway", "serve", serve_args),
        )
    ]


def run_pipeline(args: argparse.Namespace) -> int:
    """``sam3-stream run``: start the three parts, print the URL, supervise until a signal; exit status."""
    from streamer.gateway import TOKEN_ENV, check_exposure, token_from_args

    try:
        token = token_from_args(args)
        check_exposure(args.http_host, token, args.insecure)
        check_run_arguments(args)  # the source, the model name, the device: restarts cannot heal them
    except ValueError as exc:  # the gateway would refuse the same, after the tracker had loaded
        log.error("%s", exc)  # one line, naming the option
        return USAGE_ERROR
    if token:
        os.environ[TOKEN_ENV] = token  # inherited by the gateway; an argument would show in every process list
    browse_host = "127.0.0.1" if args.http_host in ("0.0.0.0", "::", "") else args.http_host
    if _listening(browse_host, args.http_port):  # else the gateway would fail and be restarted forever
        log.error("--http-port %d: already in use on %s; pass another", args.http_port, browse_host)
        return USAGE_ERROR
    folder = tempfile.mkdtemp(prefix="sam3-stream-")  # short: ipc:// paths are limited to ~100 bytes
    endpoints = Endpoints.ipc_in(folder)
    supervisor = Supervisor(pipeline_children(args, endpoints, Path(folder)))
    url = f"http://{browse_host}:{args.http_port}/"
    status = 0
    try:
        with StopSignals(log) as stop:
            for child in supervisor.children:
                supervisor.start(child)
            announced = False
            while not stop.requested:
                code = supervisor.check()
                if code is not None:
                    status = code
                    break
                if not announced and _listening(browse_host, args.http_port):
                    print(f"sam3-stream: open {url} (Ctrl-C to stop)", flush=True)
                    print(
                        f"sam3-stream: robots can subscribe to results at {endpoints.results} "
                        "(see examples/robot_consumer.py)",
                        flush=True,
                    )
                    announced = True
                time.sleep(_TICK_S)
            log.info("stopping capture, tracker and gateway")
            supervisor.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        supervisor.kill()
        status = 130
    finally:
        supervisor.kill()  # reaps anything left if we got here by an exception
        shutil.rmtree(folder, ignore_errors=True)
    return status


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="facebook/sam3",
        help="hub id, local folder, 'demo' (small trained model, shapes only), 'tiny-random' (tests) or 'passthrough' "
        "(no model) (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="torch device for the tracker (default: cuda if any)")
    parser.add_argument(
        "--passthrough-objects",
        type=int,
        default=0,
        metavar="N",
        help="with --model passthrough: report N moving objects of varied sizes per frame (demos, benchmarks)",
    )
    tracker_service.add_encoder_arguments(parser)
    parser.add_argument(
        "--source",
        required=True,
        help="camera index (0), video file, rtsp:// or http(s):// URL, image folder, or synthetic[:WxH][@FPS]",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        default=[],
        metavar="TEXT",
        help="text prompt to track from the start; repeatable",
    )
    parser.add_argument(
        "--loop", action="store_true", help="play video files and image folders again at their end (default: once)"
    )
    parser.add_argument("--stream-id", default="cam0", help="name of the stream (default %(default)s)")
    parser.add_argument("--fps", type=positive(float), default=None, help="capture rate (default: the source's own)")
    parser.add_argument("--width", type=positive(int), default=None, help="capture width (alone: keep aspect ratio)")
    parser.add_argument("--height", type=positive(int), default=None, help="capture height (alone: keep aspect ratio)")
    parser.add_argument(
        "--http-host", default=GATEWAY_HTTP_HOST, help="address the page is served on (default %(default)s)"
    )
    parser.add_argument("--http-port", type=int, default=GATEWAY_HTTP_PORT, help="HTTP port (default %(default)s)")
    parser.add_argument(
        "--ice-host",
        action="append",
        dest="ice_hosts",
        metavar="ADDR",
        help="address offered to viewers for WebRTC; 'auto' adds this machine's interfaces "
        "(needed for viewers on other machines); repeatable (default 127.0.0.1)",
    )


@dataclass(frozen=True)
class Command:
    """One ``sam3-stream`` command: its module adds the options (``add``) and runs it (``run``: exit status).

    Modules are imported only when the parser is built, so a command's heavy imports (torch, aiortc)
    stay out of the others' way where a module keeps them lazy.
    """

    name: str
    module: str
    add: str
    run: str
    help: str
    description: str


COMMANDS = (
    Command(
        "cluster",
        "streamer.cluster.command",
        "add_arguments",
        "run_from_args",
        "trackers on a Ray cluster: streams placed, moved and rebalanced",
        "Start or join a Ray cluster, run tracker actors (one per GPU, or --trackers N) and a registry placing "
        "each stream on the tracker with the most spare frame budget, moving streams off a tracker that dies "
        "and rebalancing when one is added. Needs the 'ray' extra (pip install 'sam3-stream[ray]').",
    ),
    Command(
        "capture",
        "streamer.capture",
        "add_arguments",
        "run_from_args",
        "read one camera or file and publish its frames",
        "Capture a source, pace it, stamp each frame and publish it over ZeroMQ (PUB, bound).",
    ),
    Command(
        "track",
        "streamer.tracker_service",
        "add_arguments",
        "run_from_args",
        "run SAM 3 on the newest frames and publish results",
        "The tracker: subscribes to frames (newest only), answers prompts on its control socket, publishes a "
        "result with its frame per tracked frame, and a status heartbeat every 0.5 s.",
    ),
    Command(
        "serve",
        "streamer.gateway",
        "add_arguments",
        "run_from_args",
        "serve the operator page: WebRTC video and prompts",
        "The gateway: composites the tracker's results onto their frames as WebRTC video, forwards prompts "
        "from the page's data channel, serves /health and /metrics.",
    ),
    Command(
        "segment-video",
        "streamer.segment_cli",
        "add_video_arguments",
        "run_from_args",
        "segment a video file: write it with the masks drawn, and the masks as JSON",
        "Track text prompts, clicks or boxes through a video file with SAM 3's video predictor and write an "
        "H.264 mp4 with the objects drawn (or the masks alone), optionally every frame's masks as COCO RLE "
        "JSON. The video is decoded, tracked and encoded frame by frame.",
    ),
    Command(
        "segment-image",
        "streamer.segment_cli",
        "add_image_arguments",
        "run_from_args",
        "segment an image: write it with the masks drawn",
        "Segment text prompts, clicks or boxes in one image and write it with the objects drawn (or the mask "
        "alone), optionally the masks as COCO RLE JSON.",
    ),
    Command(
        "api",
        "streamer.api",
        "add_arguments",
        "run_from_args",
        "serve SAM 3 on images and videos over HTTP (hosted SAM 3 services' requests)",
        "An HTTP service with the request fields of the hosted SAM 3 services (Oxen.ai, Segmind): synchronous "
        "and queued jobs kept in SQLite under --data-dir, results by URL, server-sent events.",
    ),
    Command(
        "keys",
        "streamer.keys",
        "add_arguments",
        "run_from_args",
        "make CURVE key pairs that secure tcp:// sockets",
        "Make (or add to) a key folder: the servers' key pair, this host's client pair, and an allow-list of "
        "client public keys. Pass the folder as --keys to capture, track and serve.",
    ),
    Command(
        "export-encoder",
        "streamer.encoder_commands",
        "add_export_arguments",
        "run_export",
        "write the image encoder as ONNX",
        "Export the model's ViT image encoder to DIR/encoder.onnx (fixed input size; external data for large "
        "models) and print its path.",
    ),
    Command(
        "build-engine",
        "streamer.encoder_commands",
        "add_build_arguments",
        "run_build",
        "build the image encoder's TensorRT engine",
        "Build the TensorRT engine of the image encoder from its ONNX export (needs TensorRT and an NVIDIA GPU), "
        "cache it on disk and print its path; 'track --encoder tensorrt' then uses it.",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``sam3-stream`` parser: ``run`` and every command of :data:`COMMANDS`."""
    from streamer import gateway  # aiohttp and aiortc: loaded only to build the parser

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="(default %(default)s)")
    parser = _Parser(
        prog="sam3-stream",
        description="Real-time SAM 3 tracking of live camera feeds, composited into a WebRTC stream that "
        "an operator can re-prompt while it plays. Robots subscribe to the tracker's results.",
        epilog="Run 'sam3-stream COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        parents=[common],
        help="capture, tracker and web page together on this machine",
        description="Start capture, tracker and gateway as child processes talking over ipc:// in a private "
        "temporary folder, print the page's URL, restart a part that dies, stop all on Ctrl-C.",
    )
    _add_run_arguments(run)
    gateway.add_access_arguments(run)
    for command in COMMANDS:
        add = getattr(importlib.import_module(command.module), command.add)
        add(commands.add_parser(command.name, parents=[common], help=command.help, description=command.description))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam3-stream`` (and ``python -m streamer.cli``); returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    last_error = _LastError()
    logging.getLogger().addHandler(last_error)
    if args.command == "run":
        return run_pipeline(args)
    command = next(c for c in COMMANDS if c.name == args.command)
    status = getattr(importlib.import_module(command.module), command.run)(args)
    if status == USAGE_ERROR:  # each command returns it only when refusing to start, never after a crash
        report_refusal(last_error.message or f"{args.command}: refused its arguments")
    return status


if __name__ == "__main__":
    sys.exit(main())
