"""The ``sam3-stream api`` process: its aiohttp application, its lifecycle and its command line.

    sam3-stream api --model facebook/sam3 --http-port 8090 --token SECRET

Startup recovers the jobs a previous server left behind (see ``JobStore.recover``), starts the
worker and a cleanup task that deletes results older than ``--keep-results-hours``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from streamer.api.auth import Auth, check_bind
from streamer.api.body import max_body_bytes
from streamer.api.config import API_HTTP_HOST, API_HTTP_PORT, ApiConfig, default_data_dir
from streamer.api.events import EventHub
from streamer.api.fetch import UrlFetcher
from streamer.api.inputs import InputReceiver
from streamer.api.routes import CONTEXT, ApiContext, add_routes, json_errors
from streamer.api.store import DataDirInUse, JobStore, exclusive_data_dir
from streamer.api.views import Views
from streamer.api.worker import Worker
from streamer.segment_cli import add_model_arguments, predictor_from_args

if TYPE_CHECKING:  # the predictor pulls in torch: loaded when the server starts, not to build the CLI parser
    from models import Sam3VideoPredictor

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a job the server died running twice is failed rather than run a third time
SHUTDOWN_TIMEOUT_S = 5.0


def create_app(config: ApiConfig, predictor: Sam3VideoPredictor) -> web.Application:
    """The API as an aiohttp application, running jobs on ``predictor``; the store, worker and HTTP client
    open on startup."""
    auth = Auth(config.token)
    app = web.Application(
        middlewares=[json_errors, auth.middleware()], client_max_size=max_body_bytes(config.max_upload_bytes)
    )
    add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = JobStore(config.data_dir)
        requeued, failed = store.recover(MAX_ATTEMPTS)
        if requeued or failed:
            log.warning(
                "recovered %d job(s) left running by the previous server: %d queued again, %d failed",
                len(requeued) + len(failed),
                len(requeued),
                len(failed),
            )
        hub = EventHub(config.max_event_clients)
        worker = Worker(store, predictor, hub)
        fetcher = UrlFetcher(
            allow_private=config.allow_private_urls,
            timeout_s=config.download_timeout_s,
            max_bytes=config.max_upload_bytes,
        )
        async with fetcher:
            app[CONTEXT] = ApiContext(
                config=config,
                store=store,
                hub=hub,
                worker=worker,
                inputs=InputReceiver(fetcher, config.max_upload_bytes, config.max_video_seconds),
                auth=auth,
                views=Views(auth),
            )
            worker.start()
            cleanup = asyncio.create_task(_clean_up(store, config), name="sam3-api-cleanup")
            try:
                yield
            finally:
                cleanup.cancel()
                await worker.stop()
                hub.close()
                store.close()

    async def end_streams(app: web.Application) -> None:
        app[CONTEXT].hub.close()  # event streams and synchronous waits end before the server stops

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    return app


async def _clean_up(store: JobStore, config: ApiConfig) -> None:
    while True:
        cutoff = time.time() - config.keep_results_hours * 3600
        deleted = await asyncio.to_thread(store.delete_ended_before, cutoff)
        if deleted:
            log.info("deleted %d job(s) older than %g h", len(deleted), config.keep_results_hours)
        await asyncio.sleep(config.cleanup_interval_s)


async def serve(config: ApiConfig, predictor: Sam3VideoPredictor) -> None:
    """Serve until SIGINT/SIGTERM; prints the URL (with the real port when ``http_port`` is 0)."""
    runner = web.AppRunner(create_app(config, predictor), shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.http_host, config.http_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"sam3-stream api: serving on http://{shown}:{port}/ (data in {config.data_dir})", flush=True)
        await stop.wait()
        log.info("stopping: the running job goes back to the queue")
    finally:
        await runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``api`` command's options."""
    defaults = ApiConfig(data_dir=Path())
    add_model_arguments(parser)
    parser.add_argument("--http-host", default=API_HTTP_HOST, help="listen address (default %(default)s)")
    parser.add_argument(
        "--http-port", type=int, default=API_HTTP_PORT, help="HTTP port; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"jobs database and results (default {default_data_dir()})"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="API key clients must send as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (default: none, "
        "and then only loopback addresses are served)",
    )
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --http-host without --token")
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch input URLs that resolve to loopback, private or link-local addresses (refused by default)",
    )
    parser.add_argument(
        "--max-video-seconds",
        type=float,
        default=defaults.max_video_seconds,
        help="longer input videos are refused with 413 (default %(default)s)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_mb,
        help="larger inputs (uploads, downloads, base64) are refused with 413 (default %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="queued plus running jobs; more are refused with 429 (default %(default)s)",
    )
    parser.add_argument(
        "--keep-results-hours",
        type=float,
        default=defaults.keep_results_hours,
        help="finished jobs and their results are deleted this long after they end (default %(default)s)",
    )
    parser.add_argument(
        "--max-event-clients",
        type=int,
        default=defaults.max_event_clients,
        help="concurrent GET /api/events streams (default %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> ApiConfig:
    """An :class:`ApiConfig` from ``add_arguments``' options; ``ValueError`` names a bad one."""
    for name in ("max_video_seconds", "max_upload_mb", "keep_results_hours"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be > 0")
    for name in ("max_queue", "max_event_clients"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if not 0 <= args.http_port <= 65535:
        raise ValueError("--http-port: must be 0..65535")
    check_bind(args.http_host, args.token, args.insecure)
    return ApiConfig(
        data_dir=(args.data_dir or default_data_dir()).expanduser(),
        http_host=args.http_host,
        http_port=args.http_port,
        token=args.token,
        insecure=args.insecure,
        allow_private_urls=args.allow_private_urls,
        max_video_seconds=args.max_video_seconds,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
        keep_results_hours=args.keep_results_hours,
        max_event_clients=args.max_event_clients,
    )


def check_can_listen(host: str, port: int) -> None:
    """``ValueError`` naming the option when nothing could listen on ``host:port`` now (the port is taken, or
    the address is not this machine's). Port 0 (any free one) always can."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--http-host {host}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            try:
                probe.bind(address)
            except OSError as exc:
                raise ValueError(f"--http-port {port}: cannot listen on {host}: {exc.strerror or exc}") from None


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point for ``sam3-stream api``; returns the exit status (2: refused options or a data directory
    in use; 1: the model cannot load, or the server cannot start). Every failure is one log line."""
    from models import check_encoder_choice

    try:
        config = config_from_args(args)
        check_encoder_choice(args.encoder, args.encoder_precision)
        check_can_listen(config.http_host, config.http_port)  # now, not after minutes of loading the model
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_data_dir(config.data_dir))
        except DataDirInUse as exc:
            log.error("%s", exc)
            return 2
        except OSError as exc:
            log.error("--data-dir %s: %s", config.data_dir, exc.strerror or exc)
            return 2
        try:
            predictor = predictor_from_args(args)
        except (RuntimeError, ValueError, OSError) as exc:  # RuntimeError: ModelLoadError
            log.error("cannot load the model: %s", exc)
            return 1
        try:
            asyncio.run(serve(config, predictor))
        except KeyboardInterrupt:
            pass
        except OSError as exc:  # the port is taken, the address is not this machine's, ...
            log.error("cannot serve on %s:%d: %s", config.http_host, config.http_port, exc.strerror or exc)
            return 1
    return 0
