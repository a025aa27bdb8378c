"""The JSON the API answers with, in the hosted services' shapes (plus ``progress``, ``masks_url``)."""

from __future__ import annotations

from typing import Any

from streamer.api.auth import Auth
from streamer.api.store import CANCELLED, FAILED, SUCCEEDED, Job


def _stamp(value: float | None) -> int | None:
    return None if value is None else int(value)


class Views:
    """Turns jobs into response bodies; URLs are absolute, on ``base`` (the address the client used)."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    def result_url(self, job: Job, base: str) -> str | None:
        return (
            base + self.auth.result_path(job.id, job.result_file)
            if job.status == SUCCEEDED and job.result_file
            else None
        )

    def masks_url(self, job: Job, base: str) -> str | None:
        return (
            base + self.auth.result_path(job.id, job.masks_file) if job.status == SUCCEEDED and job.masks_file else None
        )

    def generation(self, job: Job, base: str) -> dict[str, Any]:
        """``GET /api/ai/queue/{id}``: the job's state, its result's URL once it succeeded."""
        view = {
            **job.params,
            "generation_id": job.id,
            "model_name": job.model,
            "model": job.model,
            "media_type": job.media_type,
            "status": job.status,
            "progress": round(job.progress, 3),
            "result_url": self.result_url(job, base),
            "error_message": job.error if job.status in (FAILED, CANCELLED) else None,
            "enqueued_at": _stamp(job.enqueued_at),
            "started_at": _stamp(job.started_at),
            "completed_at": _stamp(job.completed_at),
        }
        if job.spec.get("masks_rle"):
            view["masks_url"] = self.masks_url(job, base)
        return view

    def completion_event(self, job: Job, base: str) -> dict[str, Any]:
        """The ``data:`` of a ``media_generation_completed`` event: ``url`` (as the hosted service names
        it) and ``result_url`` on success, ``error`` and ``error_message`` otherwise."""
        event: dict[str, Any] = {
            "generation_id": job.id,
            "status": job.status,
            "media_type": job.media_type,
            "model": job.model,
        }
        if job.status == SUCCEEDED:
            event["url"] = event["result_url"] = self.result_url(job, base)
            if job.masks_file:
                event["masks_url"] = self.masks_url(job, base)
        else:
            event["error"] = event["error_message"] = job.error
        return event

    def sync_result(self, job: Job, base: str, b64: str | None) -> dict[str, Any]:
        """``/api/ai/images/edit`` and ``/api/ai/videos/generate``: ``{model, created, images|videos:
        [{url} or {b64_json}]}``, plus the job's ``generation_id``, ``result_url`` and ``masks_url``."""
        item = {"b64_json": b64} if b64 is not None else {"url": self.result_url(job, base)}
        body: dict[str, Any] = {
            "model": job.model,
            "created": _stamp(job.completed_at),
            "images" if job.media_type == "image" else "videos": [item],
            "generation_id": job.id,
            "result_url": self.result_url(job, base),
        }
        if job.masks_file:
            body["masks_url"] = self.masks_url(job, base)
        return body
