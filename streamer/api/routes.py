"""The HTTP routes: the hosted services' request fields in, their response shapes out.

Oxen.ai style (``Authorization: Bearer``): ``POST /api/ai/images/edit`` and ``POST
/api/ai/videos/generate`` (synchronous), ``POST /api/ai/queue``, ``GET /api/ai/queue``, ``GET`` and
``DELETE /api/ai/queue/{id}``, ``GET /api/events`` (server-sent events). Segmind style
(``x-api-key``), answering with the video itself: ``POST /v1/sam3-video``, ``POST /v1/sam-v2-video``.
Every result downloads from ``GET /results/{id}/{file}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from streamer.api.auth import Auth, base_url
from streamer.api.body import read_fields
from streamer.api.config import MODEL_IMAGE, MODEL_VIDEO, ApiConfig
from streamer.api.errors import ApiError, bad_request, error_response, not_found
from streamer.api.events import CLOSED, EventHub, ServerStopping, TooManySubscribers
from streamer.api.inputs import InputReceiver
from streamer.api.jobspec import JobRequest, oxen_request, segmind_sam2_request, segmind_sam3_request
from streamer.api.openapi import openapi_document
from streamer.api.runner import CONTENT_TYPES
from streamer.api.store import ACTIVE, CANCELLED, RUNNING, STATUSES, SUCCEEDED, Job, JobStore, QueueFull, new_job_id
from streamer.api.views import Views
from streamer.api.worker import Worker

log = logging.getLogger(__name__)

MAX_LIST = 1000
MAX_CONCURRENT_INTAKE = 8


@dataclass
class ApiContext:
    """Everything the handlers share."""

    config: ApiConfig
    store: JobStore
    hub: EventHub
    worker: Worker
    inputs: InputReceiver
    auth: Auth
    views: Views
    # Requests receiving their input at once (each may write up to --max-upload-mb to disk); more wait.
    intake: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_INTAKE))

    def base(self, request: web.Request) -> str:
        return base_url(request, f"http://{self.config.http_host}:{self.config.http_port}")


CONTEXT = web.AppKey("context", ApiContext)
Parser = Callable[[Mapping[str, Any], Mapping[str, str]], JobRequest]


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/api/ai/images/edit", _oxen_sync(lambda f, q: oxen_request(f, q, (MODEL_IMAGE,))))
    router.add_post("/api/ai/videos/generate", _oxen_sync(lambda f, q: oxen_request(f, q, (MODEL_VIDEO,))))
    router.add_post("/api/ai/queue", _enqueue)
    router.add_get("/api/ai/queue", _list)
    router.add_get("/api/ai/queue/{generation_id}", _get)
    router.add_delete("/api/ai/queue/{generation_id}", _cancel)
    router.add_get("/api/events", _events)
    router.add_post("/v1/sam3-video", _segmind(segmind_sam3_request))
    router.add_post("/v1/sam-v2-video", _segmind(segmind_sam2_request))
    router.add_get("/results/{generation_id}/{name}", _result)
    router.add_get("/openapi.json", _openapi)
    router.add_get("/health", _health)


# ------------------------------------------------------------------------------------- submitting


async def _submit(request: web.Request, parse: Parser, *, single: bool = False) -> tuple[JobRequest, list[Job]]:
    """Read the body, fetch and check the input, queue the job(s) (one when ``single``). Raises :class:`ApiError`."""
    ctx = request.app[CONTEXT]
    if ctx.store.count_active() >= ctx.config.max_queue:  # before reading a large body for nothing
        raise ApiError(429, "queue_full", f"the queue holds {ctx.config.max_queue} jobs; try again later")
    staging = ctx.store.staging_area()
    try:
        async with ctx.intake:
            fields = await read_fields(request, staging, ctx.config.max_upload_bytes)
            job_request = parse(fields, request.query)
            if single and job_request.count != 1:
                raise bad_request("num_generations: a synchronous route makes one generation; use /api/ai/queue")
            received = await ctx.inputs.receive(
                job_request.input_field, job_request.input_value, job_request.media_type, staging
            )
        spec = job_request.spec(received.path.name, received.info)
        jobs = [
            Job(
                id=new_job_id(),
                model=job_request.model,
                media_type=job_request.media_type,
                spec=spec,
                params=job_request.params,
            )
            for _ in range(job_request.count)
        ]
        for job in jobs:
            job_dir = ctx.store.job_dir(job.id)
            job_dir.mkdir()
            shutil.copyfile(received.path, job_dir / received.path.name)
        try:
            ctx.store.add(jobs, ctx.config.max_queue)
        except QueueFull as exc:
            for job in jobs:
                shutil.rmtree(ctx.store.job_dir(job.id), ignore_errors=True)
            raise ApiError(429, "queue_full", str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ctx.worker.wake()
    log.info("queued %s (%s) from %s", ", ".join(j.id for j in jobs), job_request.model, request.path)
    return job_request, jobs


async def _wait(request: web.Request, job: Job) -> Job:
    """Wait for a synchronous request's job; raise :class:`ApiError` unless it succeeded."""
    ctx = request.app[CONTEXT]
    future = ctx.hub.waiter(job.id)
    try:
        ended = await asyncio.wait_for(asyncio.shield(future), ctx.config.sync_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(
            504,
            "timeout",
            f"not done within {ctx.config.sync_timeout_s:g} s; it goes on as generation {job.id} "
            f"(GET /api/ai/queue/{job.id})",
        ) from None
    except ServerStopping:
        raise ApiError(
            503, "shutting_down", f"the server is stopping; generation {job.id} stays queued and runs after restart"
        ) from None
    finally:
        ctx.hub.forget(job.id, future)
    if ended.status == SUCCEEDED:
        return ended
    if ended.status == CANCELLED:
        raise ApiError(409, "cancelled", f"generation {job.id} was cancelled")
    if ended.client_error:
        raise ApiError(400, "generation_failed", ended.error or "failed")
    raise ApiError(500, "generation_failed", ended.error or "failed")


def _oxen_sync(parse: Parser) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        ctx = request.app[CONTEXT]
        job_request, jobs = await _submit(request, parse, single=True)
        job = await _wait(request, jobs[0])
        b64 = None
        if job_request.response_format == "b64_json":
            data = await asyncio.to_thread((ctx.store.job_dir(job.id) / job.result_file).read_bytes)
            b64 = base64.b64encode(data).decode("ascii")
        return web.json_response(ctx.views.sync_result(job, ctx.base(request), b64))

    return handler


def _segmind(parse: Parser) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        _, jobs = await _submit(request, parse, single=True)
        job = await _wait(request, jobs[0])
        base = ctx.base(request)
        headers = {"X-Generation-Id": job.id, "X-Result-Url": ctx.views.result_url(job, base) or ""}
        if job.masks_file:
            headers["X-Masks-Url"] = ctx.views.masks_url(job, base) or ""
        return _file_response(ctx, job, job.result_file, headers)

    return handler


async def _enqueue(request: web.Request) -> web.Response:
    _, jobs = await _submit(request, lambda f, q: oxen_request(f, q, (MODEL_IMAGE, MODEL_VIDEO)))
    return web.json_response({"generations": [{"generation_id": j.id, "status": j.status} for j in jobs]})


# ------------------------------------------------------------------------------------- the queue


def _job_or_404(request: web.Request) -> Job:
    job_id = request.match_info["generation_id"]
    job = request.app[CONTEXT].store.get(job_id)
    if job is None:
        raise not_found(f"generation_id: no generation {job_id[:60]!r}")
    return job


async def _get(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response(ctx.views.generation(_job_or_404(request), ctx.base(request)))


async def _list(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    query = request.query
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status: expected one of {', '.join(STATUSES)}")
    media_type = query.get("media_type")
    if media_type is not None and media_type not in ("image", "video"):
        raise bad_request("media_type: expected image or video")
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise bad_request("limit: expected an integer") from None
    if not 1 <= limit <= MAX_LIST:
        raise bad_request(f"limit: expected 1 to {MAX_LIST}")
    jobs = ctx.store.list((status,) if status else ACTIVE, model=query.get("model"), media_type=media_type, limit=limit)
    base = ctx.base(request)
    return web.json_response({"count": len(jobs), "generations": [ctx.views.generation(j, base) for j in jobs]})


async def _cancel(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    job = _job_or_404(request)
    before = ctx.store.cancel(job.id)
    if before not in ACTIVE:
        raise ApiError(409, "not_cancellable", f"generation {job.id} already {before}; nothing to cancel")
    if before == RUNNING:
        ctx.worker.cancel(job.id)  # the worker announces the end once the job has stopped
    else:
        shutil.rmtree(ctx.store.job_dir(job.id), ignore_errors=True)
        cancelled = ctx.store.get(job.id)
        if cancelled is not None:
            ctx.hub.job_ended(cancelled)
    return web.json_response({"status": "success", "generation_id": job.id})


async def _events(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    try:
        queue = ctx.hub.subscribe()
    except TooManySubscribers as exc:
        raise ApiError(429, "too_many_streams", f"events: {exc}") from None
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    base = ctx.base(request)
    try:
        await response.prepare(request)
        await response.write(b": connected\n\n")
        quiet_since = time.monotonic()
        while request.transport is not None and not request.transport.is_closing():
            try:
                # Short waits: a client that went away frees its slot within a second, not a keep-alive later.
                job = await asyncio.wait_for(queue.get(), min(1.0, ctx.config.keepalive_s))
            except asyncio.TimeoutError:
                if time.monotonic() - quiet_since >= ctx.config.keepalive_s:
                    await response.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                continue
            if job is CLOSED:
                break
            # Compact JSON: the hosted service's examples match '"generation_id":"<id>"' in the line.
            data = json.dumps(ctx.views.completion_event(job, base), separators=(",", ":"))
            await response.write(f"event: media_generation_completed\ndata: {data}\n\n".encode())
            quiet_since = time.monotonic()
    except ConnectionResetError:
        pass
    finally:
        ctx.hub.unsubscribe(queue)
    return response


# ------------------------------------------------------------------------------------- results


def _file_response(ctx: ApiContext, job: Job, name: str, headers: dict[str, str]) -> web.FileResponse:
    suffix = name[name.rfind(".") :]
    content_type = CONTENT_TYPES.get(suffix, CONTENT_TYPES[".json"])
    return web.FileResponse(
        ctx.store.job_dir(job.id) / name,
        headers={
            **headers,
            "Content-Type": content_type,
            "Content-Disposition": f'inline; filename="{job.id}-{name}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


async def _result(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    job = _job_or_404(request)
    name = request.match_info["name"]
    if not (ctx.auth.signed_ok(job.id, request.query.get("sig")) or ctx.auth.allows(request)):
        raise ApiError(401, "unauthorized", "sig: missing or wrong signature (use the result_url as given)")
    if job.status != SUCCEEDED:
        raise not_found(f"generation_id: generation {job.id} is {job.status}; it has no result")
    if name not in (job.result_file, job.masks_file):
        raise not_found(f"name: generation {job.id} has no file {name[:60]!r}")
    return _file_response(ctx, job, name, {})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _health(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.json_response(
        {
            "status": "ok",
            "active_jobs": ctx.store.count_active(),
            "running": ctx.worker.current is not None,
            "event_streams": ctx.hub.subscribers,
        }
    )


# ------------------------------------------------------------------------------------- errors


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every refusal as ``{"error": {"code", "message"}}``; nothing a client sends becomes a crash."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONTEXT].config.max_upload_mb
        return error_response(
            413, "payload_too_large", f"body: too large (inputs up to {limit:g} MB, 4/3 of that as base64 in JSON)"
        )
    except web.HTTPNotFound:
        return error_response(404, "not_found", f"path: no route {request.path[:100]!r}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(405, "method_not_allowed", f"method: {request.method} not allowed here (use {allowed})")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; the server log has the details")


__all__ = ["CONTEXT", "ApiContext", "add_routes", "json_errors"]
