"""Job endings, told to whoever waits: server-sent event streams (``GET /api/events``) and synchronous
requests waiting for their own job.

Like the hosted queue's stream, events go to the subscribers connected when a job ends, with no
replay. Each subscriber has a bounded queue; one that falls that far behind is dropped rather than
buffered without end.
"""

from __future__ import annotations

import asyncio
import logging

from streamer.api.store import Job

log = logging.getLogger(__name__)

SUBSCRIBER_BACKLOG = 256
CLOSED = None  # put on a subscriber's queue: the server is shutting down


class ServerStopping(Exception):
    """Set on the waits of synchronous requests when the server shuts down."""


class TooManySubscribers(Exception):
    """Already ``max_subscribers`` event streams are open."""


class EventHub:
    """Fan-out of ended jobs to event streams, and futures for synchronous requests. Loop-thread only."""

    def __init__(self, max_subscribers: int) -> None:
        self.max_subscribers = max_subscribers
        self._subscribers: set[asyncio.Queue[Job | None]] = set()
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> asyncio.Queue[Job | None]:
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"{self.max_subscribers} event streams are open already; close one first")
        queue: asyncio.Queue[Job | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Job | None]) -> None:
        self._subscribers.discard(queue)

    def job_ended(self, job: Job) -> None:
        """Tell every subscriber and every waiter of ``job`` that it ended (any terminal status)."""
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(job)
            except asyncio.QueueFull:
                log.warning("an event stream fell %d events behind; closing it", SUBSCRIBER_BACKLOG)
                self._subscribers.discard(queue)
                queue.get_nowait()  # make room for the close marker
                queue.put_nowait(CLOSED)
        for future in self._waiters.pop(job.id, []):
            if not future.done():
                future.set_result(job)

    def waiter(self, job_id: str) -> asyncio.Future[Job]:
        """A future resolved with the job when it ends. Register it before the job can end."""
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[Job]) -> None:
        waiters = self._waiters.get(job_id, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self._waiters.pop(job_id, None)

    def close(self) -> None:
        """End every event stream and wait (server shutdown)."""
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(CLOSED)
        self._subscribers.clear()
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ServerStopping())
        self._waiters.clear()
