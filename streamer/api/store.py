"""Jobs and their files: an embedded SQLite database and one folder per job under the data directory.

Every state change is one conditional ``UPDATE`` (``... WHERE status = 'running'``), so a cancel and
the worker finishing the same job cannot both win. The database survives a restart:
:meth:`JobStore.recover` runs at startup and turns every job left ``running`` by a dead server back
into ``queued`` (or ``failed`` with the reason once it has been tried ``max_attempts`` times), so no
job is lost or left ``running``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    media_type TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    spec TEXT NOT NULL,
    params TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    client_error INTEGER NOT NULL DEFAULT 0,
    result_file TEXT,
    masks_file TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""


class QueueFull(Exception):
    """The queue already holds ``max_queue`` active jobs."""


class DataDirInUse(Exception):
    """Another server holds the data directory (two would run and recover each other's jobs)."""


@contextlib.contextmanager
def exclusive_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process (an advisory lock the kernel drops when the process dies, even
    by SIGKILL); raises :class:`DataDirInUse` when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "server.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(f"--data-dir {data_dir}: another sam3-stream api server is using it") from None
        yield


def new_job_id() -> str:
    """A fresh job (generation) id: a random UUID, unguessable, safe as a folder name."""
    return str(uuid.uuid4())


def is_job_id(value: str) -> bool:
    """True for a well-formed job id; anything else never reaches the file system."""
    return bool(_ID.match(value))


@dataclass
class Job:
    """One job as stored. ``spec`` is what the worker runs (input, prompts, outputs); ``params`` the
    client's own fields echoed back by the queue API (prompt, apply_mask, ...)."""

    id: str
    model: str
    media_type: str
    spec: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    status: str = QUEUED
    progress: float = 0.0
    enqueued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    error: str | None = None
    client_error: bool = False
    result_file: str | None = None
    masks_file: str | None = None


class JobStore:
    """The jobs database (``jobs.sqlite3``) and the job folders (``jobs/<id>/``) under ``data_dir``.

    Safe to call from the event loop and the worker thread alike: one connection behind a lock, and
    every call is a short statement.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.staging_dir = self.data_dir / "staging"
        for folder in (self.jobs_dir, self.staging_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        # Leftovers of requests that died half-way through receiving their input.
        for leftover in self.staging_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------- files

    def job_dir(self, job_id: str) -> Path:
        """The folder of one job (not created). Raises ``ValueError`` for a malformed id."""
        if not is_job_id(job_id):
            raise ValueError(f"generation_id: malformed id {job_id[:60]!r}")
        return self.jobs_dir / job_id

    def staging_area(self) -> Path:
        """A fresh private folder for a request's incoming files; the caller moves or removes it."""
        folder = self.staging_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    # --------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> Job | None:
        if not is_job_id(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(
        self,
        statuses: Iterable[str] = ACTIVE,
        model: str | None = None,
        media_type: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs in ``statuses`` (newest first), optionally of one model or media type."""
        statuses = tuple(statuses)
        query = f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(statuses))})"
        args: list[Any] = list(statuses)
        if model is not None:
            query, args = query + " AND model = ?", [*args, model]
        if media_type is not None:
            query, args = query + " AND media_type = ?", [*args, media_type]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job(row) for row in rows]

    def count_active(self) -> int:
        with self._lock:
            return self._count_active()

    def _count_active(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE).fetchone()[0]

    # --------------------------------------------------------------------------------- changes

    def add(self, jobs: list[Job], max_queue: int) -> None:
        """Queue ``jobs`` together, or none of them (:class:`QueueFull` when they would not fit)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._count_active() + len(jobs) > max_queue:
                    raise QueueFull(f"the queue holds {max_queue} jobs at most; try again when some are done")
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
                for offset, job in enumerate(jobs, start=1):
                    self._db.execute(
                        "INSERT INTO jobs (id, seq, model, media_type, status, spec, params, enqueued_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job.id,
                            seq + offset,
                            job.model,
                            job.media_type,
                            QUEUED,
                            json.dumps(job.spec),
                            json.dumps(job.params),
                            job.enqueued_at,
                        ),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claim_next(self) -> Job | None:
        """Mark the oldest queued job running (one more attempt) and return it; ``None`` when none waits."""
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1, progress = 0 "
                "WHERE id = (SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1) RETURNING *",
                (RUNNING, time.time(), QUEUED),
            ).fetchone()
        return _job(row) if row else None

    def set_progress(self, job_id: str, progress: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = ?", (round(progress, 4), job_id, RUNNING)
            )

    def succeed(self, job_id: str, result_file: str, masks_file: str | None) -> bool:
        """running -> succeeded; ``False`` if the job was cancelled meanwhile."""
        return self._end(job_id, SUCCEEDED, result_file=result_file, masks_file=masks_file, progress=1.0)

    def fail(self, job_id: str, error: str, client_error: bool) -> bool:
        """running -> failed with ``error``; ``client_error`` marks failures the input caused."""
        return self._end(job_id, FAILED, error=error, client_error=int(client_error))

    def _end(self, job_id: str, status: str, **values: Any) -> bool:
        values = {**values, "status": status, "completed_at": time.time()}
        names = ", ".join(f"{name} = ?" for name in values)
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET {names} WHERE id = ? AND status = ?", (*values.values(), job_id, RUNNING)
            )
        return cursor.rowcount == 1

    def cancel(self, job_id: str) -> str | None:
        """queued/running -> cancelled. Returns the status it had (``None``: no such job); a job already
        ended keeps its status."""
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            # Every writer holds the lock, so the status read above is the one this update sees.
            self._db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, error = ? WHERE id = ? AND status IN (?, ?)",
                (CANCELLED, time.time(), "cancelled by request", job_id, *ACTIVE),
            )
        return row["status"]

    def requeue(self, job_id: str) -> bool:
        """running -> queued, the attempt not counted (the server is stopping in an orderly way)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, started_at = NULL, progress = 0, attempts = MAX(attempts - 1, 0) "
                "WHERE id = ? AND status = ?",
                (QUEUED, job_id, RUNNING),
            )
        return cursor.rowcount == 1

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At startup: jobs a dead server left ``running`` run again, or fail once tried ``max_attempts``
        times (a job that keeps killing the server must not kill it forever). Returns (requeued, failed)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
            requeued, failed = [], []
            for row in rows:
                if row["attempts"] < max_attempts:
                    self._db.execute(
                        "UPDATE jobs SET status = ?, started_at = NULL, progress = 0 WHERE id = ?", (QUEUED, row["id"])
                    )
                    requeued.append(row["id"])
                else:
                    self._db.execute(
                        "UPDATE jobs SET status = ?, completed_at = ?, error = ? WHERE id = ?",
                        (
                            FAILED,
                            time.time(),
                            f"the server stopped while running this job, {row['attempts']} times; not retried",
                            row["id"],
                        ),
                    )
                    failed.append(row["id"])
            self._db.execute("COMMIT")
        return requeued, failed

    def delete_ended_before(self, cutoff: float) -> list[str]:
        """Forget jobs that ended before ``cutoff`` (unix seconds) and delete their folders."""
        with self._lock:
            rows = self._db.execute(
                "DELETE FROM jobs WHERE completed_at IS NOT NULL AND completed_at < ? AND status IN (?, ?, ?) "
                "RETURNING id",
                (cutoff, *TERMINAL),
            ).fetchall()
        ids = [row["id"] for row in rows]
        for job_id in ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return ids


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        model=row["model"],
        media_type=row["media_type"],
        spec=json.loads(row["spec"]),
        params=json.loads(row["params"]),
        status=row["status"],
        progress=row["progress"],
        enqueued_at=row["enqueued_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        attempts=row["attempts"],
        error=row["error"],
        client_error=bool(row["client_error"]),
        result_file=row["result_file"],
        masks_file=row["masks_file"],
    )
