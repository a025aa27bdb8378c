"""Sockets that heal: watch a ZeroMQ socket's monitor events, count what went wrong by cause (one throttled
log line per cause, never one per bad message), and re-create a connecting socket that libzmq gave up on.

Why it is needed (measured with libzmq 4.3.5): a connecting socket reconnects after an ordinary disconnect,
but not after some protocol errors. A peer on the endpoint that opens a ZMTP greeting and then breaks the
handshake, or declares a message part longer than ``MAXMSGSIZE``, ends that connection for good: the monitor
shows ``DISCONNECTED`` with no ``CONNECT_RETRIED`` after it, nothing is logged, and a capture (or tracker)
that binds the endpoint later is never heard. :class:`HealingSocket` notices exactly that silence and makes
a fresh socket. Bound sockets (PUB, ROUTER) keep listening whatever one peer does; :class:`SocketWatch`
only reports on them.

Whoever owns the socket calls :meth:`HealingSocket.check` (or :meth:`SocketWatch.check`) from the thread that
uses the socket, every few hundred milliseconds: ZeroMQ sockets are not thread-safe, so nothing here runs on
its own thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from streamer.transport import OnCreated

log = logging.getLogger(__name__)

BROKEN_AFTER_S = 0.5  # libzmq schedules its reconnect right after a disconnect; silence this long means never
HEAL_INTERVAL_S = 1.0  # at most one re-creation per second per socket, however often a peer breaks it
REPORT_INTERVAL_S = 30.0  # a cause seen again is reported at most this often, with its count
CHECK_INTERVAL_S = 0.25  # how often owners that would otherwise block should call check()
DETAIL_CHARS = 200  # of a hostile peer's error message quoted in a log line

_DOWN = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_ALIVE = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
_WATCHED = _DOWN | _FAILED | _ALIVE | zmq.EVENT_ACCEPT_FAILED
_PROTOCOL_ERRORS = {getattr(zmq, name): name for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_")}
_CURVE_ERRORS = (zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE)
_monitor_ids = itertools.count()

S = TypeVar("S", bound=zmq.Socket)
T = TypeVar("T")


class CauseLog:
    """Counts events by cause and logs them without flooding: the first of each cause at once, then at most
    one line per cause every ``interval_s`` carrying how many came since and in all.

    Owners call :meth:`flush` now and then so a count still pending is reported even when no event follows.
    """

    def __init__(
        self,
        subject: str,
        logger: logging.Logger = log,
        interval_s: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.subject, self._log, self._interval, self._clock = subject, logger, interval_s, clock
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._reported_at: dict[str, float] = {}
        self._levels: dict[str, int] = {}
        self._details: dict[str, str] = {}

    def count(self, cause: str, level: int = logging.WARNING, detail: str = "") -> None:
        """One more event of ``cause`` (a short phrase naming what happened and, where known, why). ``detail``
        (say, the full error) goes into the next line logged for this cause, cut to ``DETAIL_CHARS``."""
        self.totals[cause] += 1
        self._levels[cause] = level
        if detail:
            self._details[cause] = detail if len(detail) <= DETAIL_CHARS else detail[:DETAIL_CHARS] + "..."
        if cause not in self._reported_at:
            self._reported_at[cause] = self._clock()
            self._log.log(
                level,
                "%s: %s%s (further ones are counted, reported every %.0f s)",
                self.subject,
                cause,
                self._last_detail(cause),
                self._interval,
            )
            return
        self._pending[cause] += 1
        self.flush()

    def flush(self) -> None:
        """Report every cause with events pending whose last report is ``interval_s`` old."""
        now = self._clock()
        for cause, pending in list(self._pending.items()):
            if now - self._reported_at[cause] >= self._interval:
                self._log.log(
                    self._levels[cause],
                    "%s: %s: %d more in the last %.0f s (%d in all)%s",
                    self.subject,
                    cause,
                    pending,
                    now - self._reported_at[cause],
                    self.totals[cause],
                    self._last_detail(cause),
                )
                self._reported_at[cause] = now
                del self._pending[cause]

    def _last_detail(self, cause: str) -> str:
        detail = self._details.pop(cause, "")
        return f"; last: {detail}" if detail else ""


def describe_failure(event: int, value: int, connecting: bool) -> str:
    """What a handshake-failure monitor event means, in the words an operator needs."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if connecting:
            return f"the server refused this client's key (not on its allow-list; ZAP status {value})"
        return f"refused a client whose key is not on the allow-list (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "security mismatch: one side uses CURVE keys and the other does not (see --keys)"
        if value in _CURVE_ERRORS:
            return "CURVE handshake failed (the peer holds another server key?)"
        return f"handshake failed: {_PROTOCOL_ERRORS.get(value, hex(value))} (a broken or hostile ZeroMQ peer)"
    return "handshake failed: not a ZeroMQ peer, security settings unlike ours (--keys), or a hang-up"


class SocketWatch:
    """Reads one socket's monitor events without blocking and counts failures by cause in :attr:`causes`.

    For a connecting socket it also tracks each endpoint's connection: :meth:`check` returns the endpoints
    whose connection went down and that libzmq has not tried to bring back within ``BROKEN_AFTER_S``.
    Works for asyncio sockets too (the monitor is read through a blocking socket on the same context).
    """

    def __init__(
        self,
        socket: zmq.Socket,
        name: str,
        *,
        connecting: bool,
        causes: CauseLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.connecting, self._clock = name, connecting, clock
        self.causes = causes if causes is not None else CauseLog(name)
        self._socket = socket
        address = f"inproc://sam3-stream-monitor-{next(_monitor_ids)}"
        # A blocking socket on the same libzmq context, so inproc reaches the monitor of an asyncio socket too.
        # Connected before the monitor binds (inproc allows it): libzmq drops the events it emits while no
        # reader is connected, and the first handshake's may come at once.
        self._events = zmq.Context.shadow(socket.context.underlying).socket(zmq.PAIR)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.connect(address)
        socket.monitor(address, _WATCHED)
        self._down_since: dict[bytes, float] = {}  # endpoint -> when its connection went down (no retry yet)

    def check(self) -> list[str]:
        """Read the events queued so far; the endpoints whose connection is broken for good (connecting only)."""
        now = self._clock()
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_event(parse_monitor_message(frames), now)
        self.causes.flush()
        return [ep.decode(errors="replace") for ep, t in self._down_since.items() if now - t >= BROKEN_AFTER_S]

    def _on_event(self, message: dict, now: float) -> None:
        event, value, endpoint = int(message["event"]), int(message["value"]), message["endpoint"]
        if event & _FAILED:
            self.causes.count(describe_failure(event, value, self.connecting))
        elif event == zmq.EVENT_ACCEPT_FAILED:
            self.causes.count(f"accepting a connection failed (errno {value})")
        elif event == zmq.EVENT_DISCONNECTED and self.connecting:
            # Also what a message over MAXMSGSIZE or a malformed one looks like; a stopped peer is the usual cause.
            self.causes.count("disconnected (the peer stopped, or sent a malformed or oversized message)", logging.INFO)
        if not self.connecting:
            return
        if event & (_DOWN | _FAILED):
            self._down_since.setdefault(endpoint, now)
        elif event & _ALIVE:
            self._down_since.pop(endpoint, None)

    def close(self) -> None:
        """Stop monitoring (before the socket itself is closed)."""
        if not self._socket.closed:
            self._socket.disable_monitor()
        self._events.close(linger=0)


def watched(
    make: Callable[[OnCreated], T],
    name: str,
    *,
    connecting: bool,
    causes: CauseLog | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[T, SocketWatch]:
    """``make(on_created)``, a factory of :mod:`streamer.transport` given ``on_created=on_created``, and a
    :class:`SocketWatch` on its socket attached before it binds or connects.

    Attached after, the watch can miss a handshake that fails at once (a peer with other security settings,
    a hostile one): a bound socket then logs nothing of that peer, and a connecting one is never healed,
    since libzmq does not retry such a connection; the socket stays deaf for good with nothing logged.
    """
    watches: list[SocketWatch] = []

    def on_created(sock: zmq.Socket) -> None:
        watches.append(SocketWatch(sock, name, connecting=connecting, causes=causes, clock=clock))

    try:
        made = make(on_created)
    except BaseException:
        for watch in watches:  # the factory closed its socket; the monitor's reader is ours to close
            watch.close()
        raise
    if len(watches) != 1:
        for watch in watches:
            watch.close()
        made.close()  # type: ignore[attr-defined]  # every transport socket and server has one
        raise TypeError(f"{name}: make must hand its argument to the socket factory as on_created")
    return made, watches[0]


class HealingSocket(Generic[S]):
    """A connecting socket that is re-created when libzmq has given up on one of its connections.

    ``make(on_created)`` builds the socket: a factory of :mod:`streamer.transport` given
    ``on_created=on_created``, so options, subscriptions and security come out the same each time, and the
    monitor is attached before the first connection is tried (see :func:`watched`). Use :attr:`socket` for
    I/O, and call :meth:`check` regularly from the same thread: when it returns ``True`` the old socket is
    closed and :attr:`socket` is a new one (register that one with your poller). Messages queued in the old
    socket are lost, which suits the latest-value sockets this is for.
    """

    def __init__(
        self,
        make: Callable[[OnCreated], S],
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self._make, self._clock = name, make, clock
        self.causes = CauseLog(name)
        self.socket, self._watch = self._open()
        self.heals = 0
        self._last_heal = -math.inf

    def _open(self) -> tuple[S, SocketWatch]:
        """A fresh socket from ``make``, watched from before its first connection."""
        return watched(self._make, self.name, connecting=True, causes=self.causes, clock=self._clock)

    def check(self) -> bool:
        """Read the monitor; re-create the socket if a connection is broken for good. True when re-created."""
        broken = self._watch.check()
        if not broken or self._clock() - self._last_heal < HEAL_INTERVAL_S:
            return False
        self.renew()  # makes the new socket first: if that fails, the old socket is still there
        self.heals += 1
        self._last_heal = self._clock()
        self.causes.count(
            f"connection to {', '.join(broken)} broken for good (libzmq gave up on it); socket re-created"
        )
        return True

    def renew(self) -> None:
        """Re-create the socket now (``make`` then sees the current endpoints); register the new one."""
        fresh, watch = self._open()
        self._watch.close()
        self.socket.close(linger=0)
        self.socket, self._watch = fresh, watch

    def close(self) -> None:
        """Stop monitoring and close the socket."""
        self._watch.close()
        self.socket.close(linger=0)
