"""The job worker: takes queued jobs oldest first and runs them, one at a time, on the loaded model.

The model runs in one dedicated thread (its calls block); the event loop keeps serving requests. A
cancel marks the job ``cancelled`` in the store at once and stops the running job at its next frame.
An orderly shutdown puts the running job back in the queue; a crash leaves it ``running``, which
:meth:`JobStore.recover` handles at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.api.events import EventHub
from streamer.api.runner import InputFailure, Stopped, run_job
from streamer.api.store import ACTIVE, Job, JobStore

if TYPE_CHECKING:
    from models import Sam3VideoPredictor

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.25  # at most this often a running job's progress is written to the store
IDLE_POLL_S = 5.0  # the worker also looks for queued jobs this often without being woken


class Worker:
    """Runs the store's queued jobs through ``predictor``; tells ``hub`` when each ends."""

    def __init__(self, store: JobStore, predictor: Sam3VideoPredictor, hub: EventHub) -> None:
        self.store, self.predictor, self.hub = store, predictor, hub
        self.current: str | None = None  # id of the running job
        self._wake = asyncio.Event()
        self._cancel = threading.Event()  # the running job was cancelled
        self._stopping = threading.Event()  # the server is shutting down
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3-api-model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sam3-api-worker")

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at its next frame if it is the one running (the store already says cancelled)."""
        if self.current == job_id:
            self._cancel.set()

    async def stop(self) -> None:
        """Stop taking jobs; the running one stops at its next frame and goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                continue
            self.current = job.id
            self._cancel.clear()
            try:
                await loop.run_in_executor(self._executor, self._run, job)
            except Exception:  # _run reports its own failures; this guards the loop itself
                log.exception("job %s: the worker failed", job.id)
                self.store.fail(job.id, "internal error in the job worker", client_error=False)
            finally:
                self.current = None
            ended = self.store.get(job.id)
            if ended is not None and ended.status not in ACTIVE:
                self.hub.job_ended(ended)

    def _run(self, job: Job) -> None:
        """In the model thread: run one job and record how it ended."""
        job_dir = self.store.job_dir(job.id)
        started = time.monotonic()
        last_progress = 0.0

        def progress(fraction: float) -> None:
            nonlocal last_progress
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                self.store.set_progress(job.id, fraction)

        def should_stop() -> bool:
            return self._cancel.is_set() or self._stopping.is_set()

        log.info("job %s: running (%s, attempt %d)", job.id, job.media_type, job.attempts)
        try:
            result, masks = run_job(self.predictor, job_dir, job.spec, progress, should_stop)
        except Stopped:
            if self._cancel.is_set():
                log.info("job %s: cancelled", job.id)
                _remove_files(job_dir)
            elif self.store.requeue(job.id):
                log.info("job %s: back in the queue (server stopping)", job.id)
            return
        except InputFailure as exc:
            log.info("job %s: failed: %s", job.id, exc)
            self.store.fail(job.id, str(exc), client_error=True)
        except Exception as exc:
            log.exception("job %s: failed", job.id)
            self.store.fail(job.id, f"internal error: {type(exc).__name__}: {exc}", client_error=False)
        else:
            if self.store.succeed(job.id, result, masks):
                log.info("job %s: succeeded in %.1f s", job.id, time.monotonic() - started)
            else:  # cancelled just as it finished: the cancel stands, its files go
                _remove_files(job_dir)
        (job_dir / job.spec["input"]).unlink(missing_ok=True)  # the input is no longer needed


def _remove_files(job_dir: Path) -> None:
    for path in job_dir.iterdir():
        path.unlink(missing_ok=True)
