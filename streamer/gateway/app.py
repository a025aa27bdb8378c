"""The gateway's aiohttp application: signaling, the operator page, health and metrics, the CLI.

    sam3-stream serve --results-endpoint tcp://127.0.0.1:5556 --control-endpoint tcp://127.0.0.1:5557

Routes: ``GET /`` (operator page), ``/static/*``, ``POST /offer`` (WebRTC offer JSON ``{sdp, type}``
-> answer), ``GET /health`` (JSON), ``GET /metrics`` (Prometheus text format), ``GET``/``POST /login``
(the token form). Who may call them: ``streamer.gateway.access``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCSessionDescription

from streamer import security
from streamer.compositor import CompositeStyle
from streamer.gateway.access import (
    AUTHORIZED,
    TOKEN_ENV,
    AccessLogger,
    AccessPolicy,
    access_middleware,
    add_security_headers,
    check_exposure,
    check_token,
    is_loopback,
    login_routes,
)
from streamer.gateway.camera import CameraFeed, SmoothTrack, held_objects_message
from streamer.gateway.config import DEFAULT_CONTROL_ENDPOINT, DEFAULT_RESULTS_ENDPOINT, GatewayConfig
from streamer.gateway.encoding import SharedVideo
from streamer.gateway.feed import FeedState, ResultFeed
from streamer.gateway.follow import follow_map
from streamer.gateway.ice import AUTO, check_hosts
from streamer.gateway.memory import resident_bytes
from streamer.gateway.prompts import PromptForwarder
from streamer.gateway.webrtc import Broadcaster, ObjectsText, TooManyViewers, View
from streamer.keys import KeyFolder
from streamer.prometheus import PrometheusText
from streamer.transport import AsyncPromptClient

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
CONFIG = web.AppKey("config", GatewayConfig)
ACCESS = web.AppKey("access", AccessPolicy)
FEED = web.AppKey("feed", ResultFeed)
PROMPTS = web.AppKey("prompts", PromptForwarder)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)


def create_app(config: GatewayConfig = GatewayConfig()) -> web.Application:
    """The gateway as an aiohttp application; sockets open on startup and close on cleanup.

    ``ValueError`` naming the problem for a bad config (an exposed address without a token among them).
    """
    check_hosts(config.ice_hosts)
    check_token(config.token)
    check_exposure(config.http_host, config.token, config.insecure)
    policy = AccessPolicy(config.http_host, config.allowed_hosts, config.token)
    app = web.Application(middlewares=[access_middleware(policy)], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[ACCESS] = policy
    app.router.add_get("/", _index)
    app.router.add_post("/offer", _offer)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_routes(login_routes(policy))
    app.router.add_static("/static/", STATIC_DIR)
    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    curve = security.CurveClient(config.keys) if config.keys else None
    feed = ResultFeed(
        config.results_endpoint,
        config.stream_id,
        no_signal_after_s=config.no_signal_after_s,
        offline_after_s=config.offline_after_s,
        security=curve,
    )
    await feed.start()
    client = AsyncPromptClient(
        config.control_endpoint, timeout_s=config.prompt_timeout_s, retries=config.prompt_tries, security=curve
    )

    def frame_size() -> tuple[int, int] | None:
        return (feed.latest.message.width, feed.latest.message.height) if feed.latest else None

    app[FEED] = feed
    following = (
        asyncio.create_task(follow_map(config.map_url, config.stream_id, feed, client)) if config.map_url else None
    )
    app[PROMPTS] = PromptForwarder(client, stream=lambda: feed.stream, frame_size=frame_size)
    camera = smooth = None
    if config.frames_endpoint is not None:  # the smooth view reads the camera itself, while someone watches it
        camera = CameraFeed(config.frames_endpoint, lambda: feed.stream, security=curve)
        smooth_track = SmoothTrack(feed, camera, config.style, config.banner_fps)
        smooth = View(SharedVideo(smooth_track, config.video_bitrate), ObjectsText(feed, held_objects_message))
    app[BROADCASTER] = Broadcaster(
        feed,
        app[PROMPTS],
        style=config.style,
        banner_fps=config.banner_fps,
        ice_hosts=config.ice_hosts,
        ice_servers=config.ice_servers,
        max_viewers=config.max_viewers,
        connect_timeout_s=config.connect_timeout_s,
        video_bitrate=config.video_bitrate,
        smooth=smooth,
    )
    log.info(
        "gateway: results %s, control %s, stream %s",
        config.results_endpoint,
        config.control_endpoint,
        config.stream_id or "(any)",
    )
    try:
        yield
    finally:
        if following is not None:
            following.cancel()
        await app[BROADCASTER].close()
        if camera is not None:
            await camera.close()
        client.close()
        await feed.close()


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _offer(request: web.Request) -> web.Response:
    # application/json only: a cross-site page cannot send it without a CORS preflight, which fails here.
    if request.content_type != "application/json":
        return _error(415, f"content-type: /offer takes application/json, got {request.content_type!r}")
    limit = request.app[CONFIG].max_body_bytes
    too_large = f"offer: the body is larger than {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        return _error(413, too_large)
    try:
        body = await request.read()  # aiohttp stops reading past client_max_size (the same limit)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, too_large)
    try:
        params = json.loads(body)
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str) or params.get("type") != "offer":
            raise ValueError('expected JSON {"sdp": "...", "type": "offer"}')
        offer = RTCSessionDescription(sdp=params["sdp"], type="offer")
    except RecursionError:
        return _error(400, "offer: JSON nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _error(400, f"offer: {str(exc)[:200]}")
    try:
        answer = await request.app[BROADCASTER].answer(offer)
    except ValueError as exc:  # the offer's own checks, or aiortc's: SDP it cannot parse or negotiate
        message = str(exc)
        return _error(400, message if message.startswith("sdp:") else f"sdp: {message[:200]}")
    except TooManyViewers as exc:
        return _error(503, f"viewers: {exc}")
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


def _snapshot(app: web.Application) -> dict[str, Any]:
    feed, broadcaster = app[FEED], app[BROADCASTER]
    latency = feed.latency_s
    return {
        **feed.status.to_json(),  # state, its cause (detail), stream, source, model, camera_fps
        "stream": feed.stream,
        "fps": round(feed.fps, 2),
        "latency_ms": None if latency is None else round(latency * 1000.0, 1),
        "viewers": len(broadcaster.sessions),
        "results_received": feed.results_received,
        "frames_composited": broadcaster.track.frames_composited,
        "frames_sent": broadcaster.frames_sent,
        "video": broadcaster.video.stats(),  # per codec in use: viewers, frames encoded, keyframes
        "prompts": dict(app[PROMPTS].outcomes),
        "tracker_restarts": feed.tracker_restarts,
        "stream_moves": feed.stream_moves,
        "results_endpoint": feed.endpoint,
        "tracker_stream": feed.stream_status,  # the tracker's own view of the stream (its heartbeat)
        "viewers_expired": broadcaster.expired,
        "peer_connections": len(broadcaster.peer_connections),
        "tasks": len(asyncio.all_tasks()),
        "resident_bytes": resident_bytes(),
        "refused": dict(app[ACCESS].refused),
    }


async def _health(request: web.Request) -> web.Response:
    if not request[AUTHORIZED]:  # open without the token, so it tells only whether the feed is up
        return web.json_response({"state": request.app[FEED].state.value})
    return web.json_response(_snapshot(request.app))


async def _metrics(request: web.Request) -> web.Response:
    snap = _snapshot(request.app)
    metric = (out := PrometheusText("sam3_gateway")).metric

    metric("frames_sent_total", "counter", "Video frames handed to viewers' encoders.", [({}, snap["frames_sent"])])
    metric("frames_composited_total", "counter", "Results drawn onto their frames.", [({}, snap["frames_composited"])])
    metric("results_received_total", "counter", "Results received from the tracker.", [({}, snap["results_received"])])
    video = snap["video"]
    for name, key, kind, help_text in (
        ("video_frames_encoded_total", "frames_encoded", "counter", "Frames encoded (once for all viewers), by codec."),
        ("video_keyframes_total", "keyframes", "counter", "Keyframes encoded, by codec."),
        ("video_keyframe_requests_total", "keyframe_requests", "counter", "Keyframes asked for (PLI, FIR, joins)."),
        ("video_viewers", "viewers", "gauge", "Viewers of each codec's stream."),
    ):
        metric(name, kind, help_text, [({"codec": codec}, float(v[key])) for codec, v in sorted(video.items())])
    metric("viewers", "gauge", "Viewers holding a slot (connected or connecting).", [({}, snap["viewers"])])
    metric(
        "viewers_expired_total",
        "counter",
        "Viewers closed for not connecting in time.",
        [({}, snap["viewers_expired"])],
    )
    metric(
        "peer_connections",
        "gauge",
        "Peer connections in memory (open, or closed and not yet freed).",
        [({}, snap["peer_connections"])],
    )
    metric("asyncio_tasks", "gauge", "Tasks on the gateway's event loop.", [({}, snap["tasks"])])
    if snap["resident_bytes"] is not None:
        metric("resident_memory_bytes", "gauge", "Resident memory of the gateway.", [({}, snap["resident_bytes"])])
    metric(
        "requests_refused_total",
        "counter",
        "HTTP requests refused, by the field at fault.",
        [({"field": k}, float(snap["refused"].get(k, 0))) for k in ("host", "origin", "token")],
    )
    metric("results_fps", "gauge", "Results received per second.", [({}, snap["fps"])])
    metric(
        "stream_moves_total",
        "counter",
        "Times the stream moved to another tracker (sam3-stream cluster).",
        [({}, snap["stream_moves"])],
    )
    if snap["latency_ms"] is not None:
        metric(
            "latency_seconds",
            "gauge",
            "Capture to gateway latency of the newest result.",
            [({}, snap["latency_ms"] / 1000.0)],
        )
    metric(
        "state",
        "gauge",
        "1 for the feed's current state.",
        [({"state": s.value}, float(s.value == snap["state"])) for s in FeedState],
    )
    metric(
        "prompts_total",
        "counter",
        "Prompt messages by outcome.",
        [({"outcome": k}, float(v)) for k, v in sorted(snap["prompts"].items())],
    )
    return web.Response(
        text=out.text(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's options."""
    defaults = GatewayConfig()
    parser.add_argument(
        "--results-endpoint",
        default=DEFAULT_RESULTS_ENDPOINT,
        help="tracker results PUB to follow (default %(default)s)",
    )
    parser.add_argument(
        "--control-endpoint",
        default=DEFAULT_CONTROL_ENDPOINT,
        help="tracker control ROUTER for prompts (default %(default)s)",
    )
    parser.add_argument(
        "--frames-endpoint",
        default=None,
        help="the capture's frames PUB: lets the page show the smooth view (video at the camera's rate, the "
        "newest masks drawn on newer frames, marked as held) besides the exact one (default: exact only)",
    )
    parser.add_argument(
        "--stream-id", default=None, help="stream to show and prompt (default: the first one results come for)"
    )
    parser.add_argument(
        "--map-url",
        default=None,
        help="follow --stream-id wherever a cluster's map places it (GET /map of 'sam3-stream cluster'); "
        "the results and control endpoints then come from the map",
    )
    parser.add_argument("--http-host", default=defaults.http_host, help="HTTP listen address (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=defaults.http_port, help="HTTP port (default %(default)s)")
    add_access_arguments(parser)
    parser.add_argument(
        "--ice-host",
        action="append",
        dest="ice_hosts",
        metavar="ADDR",
        help=f"address to offer as an ICE host candidate; repeatable; {AUTO!r} adds the machine's "
        "interfaces (default 127.0.0.1)",
    )
    parser.add_argument(
        "--ice-server",
        action="append",
        dest="ice_servers",
        metavar="URL",
        default=[],
        help="STUN/TURN server URL; repeatable (default none)",
    )
    parser.add_argument(
        "--max-viewers",
        type=int,
        default=defaults.max_viewers,
        help="viewers served at once (the video is encoded once for all of them) (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout_s,
        help="seconds a viewer may take to connect before its slot is freed (default %(default)s)",
    )
    parser.add_argument(
        "--prompt-timeout",
        type=float,
        default=defaults.prompt_timeout_s,
        help="seconds to wait for the tracker's answer, per try (default %(default)s)",
    )
    parser.add_argument("--alpha", type=float, default=defaults.style.alpha, help="mask opacity (default %(default)s)")
    parser.add_argument("--show-boxes", action="store_true", help="draw bounding boxes too")
    parser.add_argument(
        "--video-bitrate",
        type=int,
        default=None,
        metavar="KBPS",
        help="bit rate of the video, encoded once for all viewers (default: by frame size, ~1400 at 720p)",
    )
    security.add_arguments(parser, binds=False)


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may use the page: ``--token``, ``--allowed-host``, ``--insecure`` (``serve`` and ``run``)."""
    parser.add_argument(
        "--token",
        default=None,
        help=f"token the page, /offer and /metrics require (login form, ?token=, or 'Authorization: Bearer'); "
        f"prefer the {TOKEN_ENV} environment variable, which other users cannot read in the process list",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        default=[],
        metavar="NAME",
        help="a host name the page is reached by (besides --http-host, localhost and loopback addresses); "
        "requests naming any other host are refused; repeatable",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve an address other machines can reach without a token (anyone there can watch and prompt)",
    )


def token_from_args(args: argparse.Namespace) -> str | None:
    """The token of ``--token``, else of the environment; ``ValueError`` if it is too weak."""
    return check_token(args.token or os.environ.get(TOKEN_ENV))


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """A ``GatewayConfig`` from ``add_arguments``' options (``ValueError`` naming a bad one)."""
    token = token_from_args(args)
    check_exposure(args.http_host, token, args.insecure)  # before the sockets: one clear line and exit
    if args.connect_timeout <= 0:
        raise ValueError(f"connect_timeout: must be positive, got {args.connect_timeout}")
    if args.map_url and not args.stream_id:
        raise ValueError("map_url: name the stream to follow with --stream-id")
    if args.map_url and not args.map_url.startswith(("http://", "https://")):
        raise ValueError(f"map_url: expected an http:// or https:// URL, got {args.map_url[:80]!r}")
    if args.video_bitrate is not None and not 100 <= args.video_bitrate <= 100_000:
        raise ValueError(f"video_bitrate: must be between 100 and 100000 kb/s, got {args.video_bitrate}")
    return GatewayConfig(
        results_endpoint=args.results_endpoint,
        control_endpoint=args.control_endpoint,
        frames_endpoint=args.frames_endpoint,
        stream_id=args.stream_id,
        http_host=args.http_host,
        http_port=args.http_port,
        ice_hosts=check_hosts(args.ice_hosts or ["127.0.0.1"]),
        ice_servers=tuple(args.ice_servers),
        max_viewers=args.max_viewers,
        connect_timeout_s=args.connect_timeout,
        token=token,
        insecure=args.insecure,
        allowed_hosts=tuple(args.allowed_hosts),
        prompt_timeout_s=args.prompt_timeout,
        style=CompositeStyle(alpha=args.alpha, show_boxes=args.show_boxes),
        video_bitrate=None if args.video_bitrate is None else args.video_bitrate * 1000,
        keys=_checked_keys(args),
        map_url=args.map_url,
    )


def _checked_keys(args: argparse.Namespace) -> KeyFolder | None:
    """``--keys``, with its client files read once now so that a missing one stops ``serve`` at start."""
    endpoints = [
        args.results_endpoint,
        args.control_endpoint,
        *([args.frames_endpoint] if args.frames_endpoint else []),
    ]
    keys = security.key_folder_from_args(args, endpoints)
    if keys is not None:
        security.CurveClient(keys)
    return keys


def run_gateway(config: GatewayConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM close every peer connection)."""
    if config.token is None and not is_loopback(config.http_host):
        log.warning("gateway: serving %s without a token (--insecure): anyone there may prompt", config.http_host)
    web.run_app(
        create_app(config),
        host=config.http_host,
        port=config.http_port,
        access_log_class=AccessLogger,
        print=lambda _: log.info("gateway: http://%s:%d/", config.http_host, config.http_port),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point for ``sam3-stream serve``; returns the exit status."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    run_gateway(config)
    return 0
