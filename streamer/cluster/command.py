"""``sam3-stream cluster``: trackers on Ray, streams placed by a registry, an HTTP control API.

    sam3-stream cluster --trackers 3 --model passthrough --source cam0=synthetic --source cam1=synthetic
    sam3-stream cluster --address ray-head:6379 --model facebook/sam3 --stream dock=tcp://robot1:5555 --keys ~/keys

Streams come from ``--stream NAME=ENDPOINT`` (a capture already publishing, e.g. on a robot),
``--source NAME=SPEC`` (a capture started and supervised here, as ``sam3-stream run`` does, publishing on
``--capture-host``:``--capture-base-port`` + i), a ``--config`` JSON file with the same two maps, or at run
time over HTTP. The HTTP API listens on 127.0.0.1 only (``--http-port``):

- ``GET /map``: the stream -> tracker map robots and gateways follow (``streamer.cluster.route``);
- ``GET /health``: trackers (state, load, spare budget, streams), streams, the last moves, counters;
- ``GET /metrics``: the same as Prometheus text (``sam3_cluster_*``);
- ``POST /streams`` ``{"name", "frames_endpoint"}``, ``DELETE /streams/NAME``;
- ``POST /trackers`` ``{}`` (or ``{"name"}``) adds a tracker, ``DELETE /trackers/NAME`` drains and removes one.

Errors are JSON ``{"error": "<field>: <problem>"}`` (400, 404, 409: the last tracker cannot be removed while it
holds streams, 413, 415).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from streamer import security
from streamer.cli import Child, Supervisor, child_argv
from streamer.cluster.tracker_actor import TrackerOptions
from streamer.prometheus import PrometheusText
from streamer.signals import StopSignals

__all__ = ["add_arguments", "make_app", "run_from_args"]

log = logging.getLogger(__name__)

HTTP_PORT = 8470
MAX_BODY_BYTES = 16 * 1024
REDECLARE_S = 2.0  # streams are declared again this often: a registry restarted by Ray learns them back
_TRACKER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TICK_S = 0.2


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``cluster`` command's options."""
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument(
        "--trackers", type=int, default=None, help="tracker actors (default: one per GPU in the cluster, else 1)"
    )
    parser.add_argument("--model", default="facebook/sam3", help="what each tracker runs (see 'track --model')")
    parser.add_argument("--device", default="auto", help="torch device of each tracker (default: cuda if any)")
    parser.add_argument("--prompt", action="append", dest="prompts", default=[], metavar="TEXT", help="text prompt")
    parser.add_argument(
        "--passthrough-delay-ms", type=float, default=0.0, help="with --model passthrough: time spent per frame"
    )
    parser.add_argument("--stream", action="append", type=_pair, default=[], metavar="NAME=ENDPOINT")
    parser.add_argument("--source", action="append", type=_pair, default=[], metavar="NAME=SPEC")
    parser.add_argument("--config", default=None, help='JSON: {"streams": {NAME: ENDPOINT}, "sources": {NAME: SPEC}}')
    parser.add_argument("--fps", type=float, default=None, help="capture rate of --source captures")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help="control API on 127.0.0.1 (%(default)s)")
    parser.add_argument(
        "--tracker-host",
        default="127.0.0.1",
        help="address trackers bind on; 'node' binds each on its Ray node's address (needs --keys or --insecure)",
    )
    parser.add_argument("--base-port", type=int, default=5600, help="tracker i binds base+2i, base+2i+1")
    parser.add_argument("--capture-host", default="127.0.0.1", help="address --source captures bind on")
    parser.add_argument("--capture-base-port", type=int, default=5700, help="--source capture i binds base+i")
    security.add_arguments(parser, binds=True)


def _declared(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """Streams (name -> endpoint) and sources (name -> spec) from the options and the config file."""
    streams, sources = dict(args.stream), dict(args.source)
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--config {args.config}: {exc}") from exc
        for key, target in (("streams", streams), ("sources", sources)):
            entries = data.get(key, {}) if isinstance(data, dict) else None
            if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
                raise ValueError(f"--config {args.config}: {key}: expected an object of NAME: string")
            target.update(entries)
    both = set(streams) & set(sources)
    if both:
        raise ValueError(f"--stream, --source: {sorted(both)[0]!r} named twice")
    return streams, sources


# ------------------------------------------------------------------------------------------- HTTP


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": "content-type: expected application/json"}), content_type="application/json"
        )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, len(raw))
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"body: not JSON ({str(exc)[:80]})"}), content_type="application/json"
        ) from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body: expected an object"}), content_type="application/json"
        )
    return data


def make_app(cluster: Any, declared: dict[str, str]) -> web.Application:
    """The control API over ``cluster`` (a :class:`streamer.cluster.cluster.Cluster`); ``declared`` (name ->
    frames endpoint) is kept in step so that the streams can be declared again to a restarted registry."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def call(function: Any, *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    async def route_map(_request: web.Request) -> web.Response:
        return web.json_response(await call(cluster.route_map))

    async def health(_request: web.Request) -> web.Response:
        return web.json_response(await call(cluster.health))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text=metrics_text(await call(cluster.health)), content_type="text/plain")

    async def add_stream(request: web.Request) -> web.Response:
        body = await _body(request)
        name, endpoint = body.get("name"), body.get("frames_endpoint")
        try:
            tracker = await call(cluster.add_stream, name, endpoint)
        except ValueError as exc:  # the registry names the field (Ray wraps it: its message ends with ours)
            return _error(400, _registry_message(exc))
        declared[name] = endpoint
        return web.json_response({"name": name, "tracker": tracker}, status=201)

    async def remove_stream(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in declared:
            return _error(404, f"stream: unknown stream {name[:80]!r}")
        del declared[name]
        await call(cluster.remove_stream, name)
        return web.json_response({"name": name, "removed": True})

    async def add_tracker(request: web.Request) -> web.Response:
        name = (await _body(request)).get("name")
        if name is not None and (not isinstance(name, str) or not _TRACKER_NAME.fullmatch(name)):
            return _error(400, "name: expected 1 to 64 letters, digits, '-' or '_'")
        try:
            added = await call(cluster.add_tracker, name)
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response({"name": added}, status=201)

    async def remove_tracker(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in cluster.trackers:
            return _error(404, f"tracker: unknown tracker {name[:80]!r}")
        try:
            moves = await call(cluster.remove_tracker, name)
        except ValueError as exc:  # the last tracker up, with streams
            return _error(409, _registry_message(exc))
        return web.json_response({"name": name, "removed": True, "moves": moves})

    app.add_routes(
        [
            web.get("/map", route_map),
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.post("/streams", add_stream),
            web.delete("/streams/{name}", remove_stream),
            web.post("/trackers", add_tracker),
            web.delete("/trackers/{name}", remove_tracker),
        ]
    )
    return app


def _registry_message(exc: Exception) -> str:
    """The registry's own ``field: problem`` line out of an error Ray re-raised here (with its traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    return last.split("ValueError: ", 1)[-1]


def metrics_text(health: dict[str, Any]) -> str:
    """``GET /metrics``: the registry's health as Prometheus text."""
    out = PrometheusText("sam3_cluster")
    trackers, streams, counters = health["trackers"], health["streams"], health["counters"]
    states = ("starting", "up", "lost", "draining")
    out.metric(
        "trackers",
        "gauge",
        "Tracker actors by state.",
        [({"state": s}, sum(t["state"] == s for t in trackers.values())) for s in states],
    )
    out.metric("streams", "gauge", "Streams declared.", [({}, len(streams))])
    out.metric(
        "streams_unplaced",
        "gauge",
        "Streams no tracker holds now.",
        [({}, sum(s["tracker"] is None for s in streams.values()))],
    )
    for name, help_text in (
        ("moves", "Streams moved from one tracker to another (failures, rebalancing, draining)."),
        ("placements", "Streams placed on a tracker for the first time."),
        ("tracker_failures", "Trackers lost (process died, restarted, or silent)."),
    ):
        out.metric(f"{name}_total", "counter", help_text, [({}, counters.get(name, 0))])
    for key, help_text in (
        ("load", "Share of the tracker's frame budget its streams use (measured)."),
        ("spare", "Share of the tracker's frame budget left."),
    ):
        out.metric(f"tracker_{key}", "gauge", help_text, [({"tracker": n}, t[key]) for n, t in trackers.items()])
    out.metric(
        "tracker_streams",
        "gauge",
        "Streams each tracker holds.",
        [({"tracker": n}, len(t["streams"])) for n, t in trackers.items()],
    )
    if health["moves"]:
        last = health["moves"][-1]
        out.metric(
            "last_move_timestamp_seconds", "gauge", "When the last move happened (unix time).", [({}, last["t"])]
        )
    return out.text()


# -------------------------------------------------------------------------------------------- run


def _capture_children(args: argparse.Namespace, sources: dict[str, str], folder: Path) -> tuple[list[Child], dict]:
    children, endpoints = [], {}
    for i, (name, spec) in enumerate(sorted(sources.items())):
        endpoint = f"tcp://{args.capture_host}:{args.capture_base_port + i}"
        argv = ["--source", spec, "--frames-endpoint", endpoint, "--stream-id", name, "--loop"]
        if args.fps is not None:
            argv += ["--fps", str(args.fps)]
        if args.keys:
            argv += ["--keys", args.keys]
        if args.insecure:
            argv.append("--insecure")
        children.append(
            Child(f"capture {name}", child_argv("capture", args.log_level, *argv), folder / f"refused-{name}")
        )
        endpoints[name] = endpoint
    return children, endpoints


async def _serve(args: argparse.Namespace, cluster: Any, declared: dict[str, str], supervisor: Supervisor) -> int:
    runner = web.AppRunner(make_app(cluster, declared), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
    print(f"sam3-stream cluster: control API on http://127.0.0.1:{args.http_port}/ (map at /map)", flush=True)
    next_declare = 0.0
    try:
        with StopSignals(log) as stop:
            while not stop.requested:
                status = supervisor.check()
                if status is not None:
                    return status
                if time.monotonic() >= next_declare:
                    for name, endpoint in list(declared.items()):
                        await asyncio.to_thread(cluster.add_stream, name, endpoint)
                    next_declare = time.monotonic() + REDECLARE_S
                await asyncio.sleep(_TICK_S)
    finally:
        await runner.cleanup()
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Run the cluster until SIGINT/SIGTERM; exit status (2 when refusing the options)."""
    try:
        streams, sources = _declared(args)
        keys = security.key_folder_from_args(args, [f"tcp://{args.tracker_host}:0"])
        if args.tracker_host != "node":
            security.check_exposure([f"tcp://{args.tracker_host}:0"], keys, args.insecure, "drive the trackers")
        if args.trackers is not None and not 0 < args.trackers <= 256:
            raise ValueError("--trackers: expected 1 to 256")
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        from streamer.cluster.cluster import Cluster  # Ray is loaded only here: the extra is optional
    except ImportError as exc:
        log.error("cluster: Ray is not installed (pip install 'sam3-stream[ray]'): %s", exc)
        return 2
    import tempfile

    options = TrackerOptions(
        model=args.model,
        device=args.device,
        prompts=tuple(args.prompts),
        passthrough_delay_s=args.passthrough_delay_ms / 1000.0,
        keys_path=str(keys.path) if keys else None,
        insecure=args.insecure,
        log_level=args.log_level,
    )
    folder = Path(tempfile.mkdtemp(prefix="sam3-cluster-"))
    children, capture_endpoints = _capture_children(args, sources, folder)
    supervisor = Supervisor(children)
    host = "{node_ip}" if args.tracker_host == "node" else args.tracker_host
    cluster = Cluster(options, address=args.address, host=host, base_port=args.base_port)
    try:
        gpus = int(cluster.gpus())
        if gpus and args.trackers is None:
            cluster.num_gpus = 1.0  # one tracker per GPU
        for _ in range(args.trackers or gpus or 1):
            cluster.add_tracker()
        cluster.wait_until_up()
        for child in supervisor.children:
            supervisor.start(child)
        declared = {**streams, **capture_endpoints}
        for name, endpoint in declared.items():
            cluster.add_stream(name, endpoint)
        return asyncio.run(_serve(args, cluster, declared, supervisor))
    except ValueError as exc:
        log.error("%s", _registry_message(exc))
        return 2
    finally:
        supervisor.stop()
        cluster.close()
