"""ZeroMQ plumbing, named after the ZeroMQ guide's patterns (https://zguide.zeromq.org).

- frames: capture PUB binds, tracker SUB connects; the tracker reads them *latest-value*: poll, then
  :func:`drain` everything queued and keep the newest per stream (:func:`latest_per_stream`).
- results: tracker PUB binds (``result``, ``event`` and ``status`` heartbeats, each under its topic:
  ``streamer.topics``); gateway and robots SUB connect, subscribing to what they use: results with the
  frame (the gateway) or without (robots), of one stream or all, and always the heartbeats.
- control: tracker ROUTER binds (:class:`ControlServer`); clients REQ with the *lazy pirate* pattern
  (:class:`PromptClient`, :class:`AsyncPromptClient`): wait for an answer with a timeout, else close
  the socket, open a new one and retry, and give up after a few tries.

Every socket has linger 0 (unsent frames and answers are stale once their socket closes) and a
``MAXMSGSIZE`` fitted to its role, so a peer sending a larger part is disconnected before anything is
allocated for it. Endpoints are ``tcp://host:port`` (port ``*`` binds a free one; read it back with
:func:`bound_endpoint`) or ``ipc:///path`` (a missing folder is created private, 0700).

Every factory takes ``security`` (:mod:`streamer.security`): CURVE for sockets on tcp://, ignored on ipc://.
Connecting sockets that must outlive hostile peers are wrapped in :class:`streamer.healing.HealingSocket`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from streamer import protocol, topics
from streamer.protocol import FrameHeader, PromptAnswer, PromptRequest, ProtocolError
from streamer.security import SocketSecurity

# Run on a new socket before it binds or connects, so a monitor attached there
# (:func:`streamer.healing.watched`) sees the first peer's handshake too. Every factory here takes one.
OnCreated = Callable[[zmq.Socket], None]

log = logging.getLogger(__name__)

# Latest-value needs room: a high-water mark smaller than what arrives between two drains makes the
# publisher drop the *newest* frames and the subscriber read stale ones (FACTS.md: HWM=1 lags by
# hundreds of ms). 128 messages cover ~4 s of a 30 fps camera between two tracker steps; the price is
# memory when the tracker stalls: up to 128 frames per side (~350 MB at 720p).
FRAMES_HWM = 128
RESULTS_HWM = 128
# A drain takes at most this many messages per call, so a flood cannot pin the caller in a loop.
DRAIN_MAX_MESSAGES = 1024
# Each socket disconnects a peer whose single message part is larger than the largest its role allows
# (libzmq's MAXMSGSIZE), before the decoder would refuse it anyway.
MAX_FRAME_PART_BYTES = max(protocol.MAX_PIXELS * 3, protocol.MAX_HEADER_BYTES)  # pixels, or a frame header
MAX_RESULT_PART_BYTES = max(protocol.MAX_PIXELS * 3, protocol.MAX_HEADER_BYTES)  # the frame, or a result header
MAX_PART_BYTES = max(MAX_FRAME_PART_BYTES, MAX_RESULT_PART_BYTES)
# Control requests a bit over the header limit still get an error answer; far larger ones are cut off.
MAX_CONTROL_PART_BYTES = 16 * protocol.MAX_CONTROL_HEADER_BYTES
# A PUB only ever receives its subscribers' subscriptions (ours: the empty prefix, one byte on the wire)
# and, with CURVE, handshake commands: those count against MAXMSGSIZE too, and 256 bytes broke CURVE's
# INITIATE (measured); 8 KiB leaves room for its metadata.
MAX_SUBSCRIPTION_PART_BYTES = 8 * 1024
IPC_PATH_MAX = 107  # sun_path on Linux, less its terminating NUL
# A lazy-pirate client retries for timeout x tries (a few seconds); answers are remembered far longer so a
# retry is answered again, never applied twice. Each costs ~250 bytes: 65536 of them ~16 MB at most.
RETRY_WINDOW_S = 120.0
MAX_REMEMBERED_ANSWERS = 65536
_MAX_RETRY_ENVELOPES = 64  # copies of one waiting request answered; more are dropped (a flood, not a retry)

Envelope = tuple[bytes, ...]
"""ROUTER routing frames of one request (the peer's identity, up to its empty delimiter)."""


# --------------------------------------------------------------------------------------------------
# Endpoints and sockets


def prepare_endpoint(endpoint: str) -> str:
    """Check ``endpoint`` is tcp:// or ipc://, and make an ipc:// socket's folder."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if len(path.encode()) > IPC_PATH_MAX:
            raise ValueError(f"{endpoint}: ipc path longer than {IPC_PATH_MAX} bytes (use a shorter folder)")
        if path and not path.startswith("@"):  # "@name" is Linux's abstract namespace: no file
            folder = Path(path).parent
            for missing in reversed([f for f in (folder, *folder.parents) if not f.exists()]):
                missing.mkdir(mode=0o700, exist_ok=True)  # private: no one else can reach the sockets in it
    elif not endpoint.startswith(("tcp://", "inproc://")):
        raise ValueError(f"{endpoint}: expected a tcp:// or ipc:// endpoint")
    return endpoint


def bound_endpoint(socket: zmq.Socket) -> str:
    """The endpoint a socket last bound or connected to, with a ``*`` port resolved."""
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _wants_security(endpoints: Sequence[str]) -> bool:
    """True when every endpoint is tcp:// (CURVE applies), false when none is; mixing both is refused."""
    tcp = [endpoint.startswith("tcp://") for endpoint in endpoints]
    if any(tcp) and not all(tcp):
        raise ValueError(
            f"{', '.join(endpoints)}: with --keys, one socket's endpoints must all be tcp:// or all ipc://"
        )
    return all(tcp)


def _socket(
    context: zmq.Context | None,
    kind: int,
    endpoints: str | Sequence[str],
    *,
    bind: bool,
    max_part_bytes: int,
    hwm: int = 1000,
    security: SocketSecurity | None = None,
    subscribe: Sequence[bytes] = (b"",),
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    context = context if context is not None else zmq.Context.instance()
    endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    sock = context.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max_part_bytes)
        if kind == zmq.SUB:
            for prefix in subscribe:
                sock.setsockopt(zmq.SUBSCRIBE, prefix)
        if security is not None and _wants_security(endpoints):
            security.apply(sock)
        if on_created is not None:
            on_created(sock)
        for endpoint in endpoints:
            if bind:
                sock.bind(prepare_endpoint(endpoint))
            else:
                sock.connect(prepare_endpoint(endpoint))
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _publisher(
    endpoint: str,
    context: zmq.Context | None,
    hwm: int,
    security: SocketSecurity | None,
    on_created: OnCreated | None,
) -> zmq.Socket:
    """A bound PUB: its peers only ever send subscriptions."""
    return _socket(
        context,
        zmq.PUB,
        endpoint,
        bind=True,
        hwm=hwm,
        max_part_bytes=MAX_SUBSCRIPTION_PART_BYTES,
        security=security,
        on_created=on_created,
    )


def frames_publisher(
    endpoint: str,
    *,
    context: zmq.Context | None = None,
    hwm: int = FRAMES_HWM,
    security: SocketSecurity | None = None,
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    """Capture side of the frames socket: PUB, bound."""
    return _publisher(endpoint, context, hwm, security, on_created)


def frames_subscriber(
    endpoints: str | Sequence[str],
    *,
    context: zmq.Context | None = None,
    hwm: int = FRAMES_HWM,
    security: SocketSecurity | None = None,
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    """Tracker side of the frames socket: SUB to everything, connected to one capture or several."""
    return _socket(
        context,
        zmq.SUB,
        endpoints,
        bind=False,
        hwm=hwm,
        max_part_bytes=MAX_FRAME_PART_BYTES,
        security=security,
        on_created=on_created,
    )


def results_publisher(
    endpoint: str,
    *,
    context: zmq.Context | None = None,
    hwm: int = RESULTS_HWM,
    security: SocketSecurity | None = None,
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    """Tracker side of the results socket (results and status heartbeats): PUB, bound."""
    return _publisher(endpoint, context, hwm, security, on_created)


def publish_result(socket: zmq.Socket, parts: list) -> None:
    """Publish an encoded result (``protocol.encode_result`` with its frame) under both of its topics: with
    the frame for the gateway, and the same header without it for robots. libzmq's PUB filters by topic
    before sending, so a message nobody subscribed to costs nothing on the wire."""
    socket.send_multipart(parts, copy=False)
    socket.send_multipart(protocol.without_frame(parts), copy=False)


def results_subscriber(
    endpoints: str | Sequence[str],
    *,
    frames: bool = False,
    streams: Sequence[str] | None = None,
    context: zmq.Context | None = None,
    hwm: int = RESULTS_HWM,
    security: SocketSecurity | None = None,
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    """Gateway or robot side of the results socket: SUB, connected, to the heartbeats and to the events
    and results of ``streams`` (``None``: all), with their frames when ``frames`` (else no pixels ever
    arrive). See :func:`resubscribe` to follow other streams later.

    Pass a ``zmq.asyncio.Context`` for an asyncio socket (then read it with :func:`drain_async`).
    """
    return _socket(
        context,
        zmq.SUB,
        endpoints,
        bind=False,
        hwm=hwm,
        max_part_bytes=MAX_RESULT_PART_BYTES,
        security=security,
        subscribe=topics.subscriptions(streams, frames=frames),
        on_created=on_created,
    )


def resubscribe(socket: zmq.Socket, old: Sequence[bytes], new: Sequence[bytes]) -> None:
    """Change a SUB socket's subscriptions from topics ``old`` to ``new`` (``streamer.topics.subscriptions``)."""
    for prefix in new:
        if prefix not in old:
            socket.setsockopt(zmq.SUBSCRIBE, prefix)
    for prefix in old:
        if prefix not in new:
            socket.setsockopt(zmq.UNSUBSCRIBE, prefix)


def control_router(
    endpoint: str,
    *,
    context: zmq.Context | None = None,
    security: SocketSecurity | None = None,
    on_created: OnCreated | None = None,
) -> zmq.Socket:
    """Tracker side of the control socket: ROUTER, bound (see :class:`ControlServer`)."""
    return _socket(
        context,
        zmq.ROUTER,
        endpoint,
        bind=True,
        max_part_bytes=MAX_CONTROL_PART_BYTES,
        security=security,
        on_created=on_created,
    )


def control_requester(
    endpoint: str, *, context: zmq.Context | None = None, security: SocketSecurity | None = None
) -> zmq.Socket:
    """Client side of the control socket: REQ, connected.

    ``REQ_CORRELATE`` makes libzmq drop any reply that is not to this socket's latest request, so a
    late or duplicate answer can never be taken for the next one.
    """
    sock = _socket(context, zmq.REQ, endpoint, bind=False, max_part_bytes=MAX_CONTROL_PART_BYTES, security=security)
    sock.setsockopt(zmq.REQ_CORRELATE, 1)
    sock.setsockopt(zmq.REQ_RELAXED, 1)
    return sock


# --------------------------------------------------------------------------------------------------
# Latest-value receive


def drain(
    socket: zmq.Socket, timeout_ms: int | None = 0, max_messages: int = DRAIN_MAX_MESSAGES
) -> list[list[zmq.Frame]]:
    """Latest-value receive: poll once (up to ``timeout_ms``; ``None`` waits forever), then take every
    message already queued without blocking, at most ``max_messages``, in arrival order.

    Parts come as ``zmq.Frame`` (no copy); decode them with :mod:`streamer.protocol`.
    """
    if not socket.poll(timeout_ms, zmq.POLLIN):
        return []
    messages = []
    while len(messages) < max_messages:
        try:
            messages.append(socket.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return messages


async def drain_async(
    socket: zmq.asyncio.Socket, timeout_ms: int | None = 0, max_messages: int = DRAIN_MAX_MESSAGES
) -> list[list[zmq.Frame]]:
    """:func:`drain` for an asyncio socket: awaits the poll, then takes what is queued."""
    if not await socket.poll(timeout_ms, zmq.POLLIN):
        return []
    messages = []
    while len(messages) < max_messages:
        try:
            messages.append(await socket.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return messages


@dataclass
class DrainStats:
    """Running counts for :func:`latest_per_stream`: frames used, frames skipped for a newer one of the
    same stream, and messages dropped because they did not decode."""

    used: int = 0
    superseded: int = 0
    malformed: int = 0


def latest_per_stream(
    messages: Sequence[Sequence], stats: DrainStats | None = None
) -> dict[str, tuple[FrameHeader, np.ndarray]]:
    """The newest decoded frame of each stream among ``messages`` (arrival order: the last one wins,
    which stays right when a restarted capture starts its ``seq`` over).

    Messages that do not decode as frames are dropped with a warning (the 1st, then every 100th, so a
    broken sender cannot flood the log) and counted in ``stats``.
    """
    stats = stats if stats is not None else DrainStats()
    latest: dict[str, tuple[FrameHeader, np.ndarray]] = {}
    for parts in messages:
        try:
            header, pixels = protocol.decode_frame(parts)
        except ProtocolError as exc:
            stats.malformed += 1
            if stats.malformed % 100 == 1:
                log.warning("dropped a malformed frame message (%d so far): %s", stats.malformed, exc)
            continue
        if header.stream in latest:
            stats.superseded += 1
        latest[header.stream] = (header, pixels)
    stats.used += len(latest)
    return latest


# --------------------------------------------------------------------------------------------------
# Lazy pirate clients


def _answer_for(req: PromptRequest, parts: Sequence, endpoint: str) -> PromptAnswer:
    answer = protocol.decode_answer(parts)
    if answer.request_id not in (req.request_id, ""):  # "" : the tracker could not read our request id
        raise ProtocolError(f"answer.request_id: {endpoint} answered {answer.request_id!r} to {req.request_id!r}")
    return answer


def _no_answer(endpoint: str, timeout_s: float, retries: int) -> TimeoutError:
    return TimeoutError(f"no answer from the tracker at {endpoint} ({retries} tries of {timeout_s:g} s)")


def _check_retry_settings(timeout_s: float, retries: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
    if retries < 1:
        raise ValueError(f"retries: must be >= 1, got {retries}")


class PromptClient:
    """Lazy pirate client for the tracker's control socket (blocking; one thread at a time).

    :meth:`request` sends, waits ``timeout_s`` for the answer, and on silence closes the REQ socket,
    opens a fresh one and sends again, ``retries`` tries in all, then raises ``TimeoutError`` naming
    the endpoint. A retry carries the same ``request_id``, so the tracker answers it without applying
    the prompt twice (see :class:`ControlServer`).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        retries: int = 3,
        *,
        context: zmq.Context | None = None,
        security: SocketSecurity | None = None,
    ) -> None:
        _check_retry_settings(timeout_s, retries)
        self.endpoint, self.timeout_s, self.retries = endpoint, timeout_s, retries
        self._security = security
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket: zmq.Socket | None = None

    def request(self, req: PromptRequest) -> PromptAnswer:
        """Send ``req`` and return the tracker's answer (``ProtocolError`` if ``req`` is malformed)."""
        payload = protocol.encode_prompt_request(req)
        for _ in range(self.retries):
            if self._socket is None:
                self._socket = control_requester(self.endpoint, context=self._context, security=self._security)
            self._socket.send_multipart(payload)
            if self._socket.poll(int(self.timeout_s * 1000), zmq.POLLIN):
                return _answer_for(req, self._socket.recv_multipart(), self.endpoint)
            self._socket.close(linger=0)  # a REQ that got no reply cannot send again: start afresh
            self._socket = None
        raise _no_answer(self.endpoint, self.timeout_s, self.retries)

    def close(self) -> None:
        """Close the socket (and the context, when this client made it)."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context:
            self._context.term()

    def __enter__(self) -> PromptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPromptClient:
    """Lazy pirate client for asyncio (the gateway); same semantics as :class:`PromptClient`.

    Each try uses its own REQ socket, so concurrent requests never wait on each other, and may reach the
    tracker in any order: when order matters, await each answer before sending the next request (the
    gateway's ``PromptForwarder`` does; the tracker answers within milliseconds).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 2.0,
        retries: int = 3,
        *,
        context: zmq.asyncio.Context | None = None,
        security: SocketSecurity | None = None,
    ) -> None:
        _check_retry_settings(timeout_s, retries)
        self.endpoint, self.timeout_s, self.retries = endpoint, timeout_s, retries
        self._security = security
        self._own_context = context is None
        self._context = zmq.asyncio.Context() if context is None else context

    async def request(self, req: PromptRequest) -> PromptAnswer:
        """Send ``req`` and return the tracker's answer (``ProtocolError`` if ``req`` is malformed)."""
        payload = protocol.encode_prompt_request(req)
        for _ in range(self.retries):
            sock = control_requester(self.endpoint, context=self._context, security=self._security)
            try:
                await sock.send_multipart(payload)
                if await sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
                    return _answer_for(req, await sock.recv_multipart(), self.endpoint)
            finally:
                sock.close(linger=0)
        raise _no_answer(self.endpoint, self.timeout_s, self.retries)

    def close(self) -> None:
        """Close the context when this client made it (sockets of requests in flight included)."""
        if self._own_context:
            self._context.destroy(linger=0)

    async def __aenter__(self) -> AsyncPromptClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Control server


def _split_envelope(frames: list[bytes]) -> tuple[Envelope, list[bytes]]:
    """ROUTER message -> (routing frames up to and including the empty delimiter, body)."""
    for i, frame in enumerate(frames[1:], start=1):
        if not frame:
            return tuple(frames[: i + 1]), frames[i + 1 :]
    return (frames[0],), frames[1:]  # a DEALER peer without delimiter


@dataclass
class _Answered:
    digest: bytes  # of the request's bytes: a retry is byte for byte the same request
    answer: list[bytes]  # encoded, to send again as it is
    t: float  # monotonic, when answered


def _encode_bounded(answer: PromptAnswer) -> list[bytes]:
    """The answer within the wire's bounds (a long error cut short, at most MAX_OBJECTS ids), so that every
    request gets one whatever went into it."""
    error = answer.error[: protocol.MAX_ERROR_CHARS] if answer.error else answer.error
    bounded = replace(answer, error=error, obj_ids=list(answer.obj_ids)[: protocol.MAX_OBJECTS])
    try:
        return protocol.encode_answer(bounded)
    except ProtocolError as exc:
        return protocol.encode_answer(
            PromptAnswer(answer.request_id, False, f"tracker: cannot encode the answer ({exc})"[:1000])
        )


def _digest(body: list[bytes]) -> bytes:
    return hashlib.blake2b(b"\0".join(body), digest_size=16).digest()


class ControlServer:
    """Tracker side of the control socket: a ROUTER that reads :class:`PromptRequest`\\ s and sends
    :class:`PromptAnswer`\\ s (the guide's reliable request-reply, server half of lazy pirate).

    - A malformed request is answered here at once (``ok=False``, the error naming the field, with the
      request's id when it can be read, even from a message too large or too nested to parse) and also
      returned, as a ``ProtocolError``, so the caller can log or count it: do not reply to it.
    - A lazy-pirate retry (same ``request_id``, same bytes) of a request that is still waiting is not
      returned again: the answer goes to the retrying socket too (a dead one drops it). A retry of an
      answered request gets the same answer again, for ``retry_window_s`` after the answer; so a prompt
      is never applied twice, and each copy sent gets one answer.
      A request id reused for a different request is refused.
    - Memory is bounded: at most ``max_remembered`` answers are kept; when that many were given within
      the window, new requests are refused ("retry later") rather than forgetting answers a client may
      still ask for again.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        security: SocketSecurity | None = None,
        retry_window_s: float = RETRY_WINDOW_S,
        max_remembered: int = MAX_REMEMBERED_ANSWERS,
        on_created: OnCreated | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self.socket = control_router(endpoint, context=self._context, security=security, on_created=on_created)
        self.endpoint = bound_endpoint(self.socket)
        self.retry_window_s = retry_window_s
        self.max_remembered = max_remembered
        # Requests handed out and not yet answered: every envelope that sent one (the original and its
        # retries; a dead lazy-pirate socket's answer is dropped by the ROUTER) and the request's digest.
        self._waiting: dict[str, tuple[list[Envelope], bytes]] = {}
        self._answered: OrderedDict[str, _Answered] = OrderedDict()

    def poll_requests(
        self, timeout_ms: int | None = 0
    ) -> list[tuple[Envelope, PromptRequest | ProtocolError, str | None]]:
        """Requests received within ``timeout_ms``, in arrival order: ``(envelope, request or error,
        request id if known)``. Answer each :class:`PromptRequest` with :meth:`reply`."""
        return list(self.requests(timeout_ms))

    def requests(
        self, timeout_ms: int | None = 0
    ) -> Iterator[tuple[Envelope, PromptRequest | ProtocolError, str | None]]:
        """:meth:`poll_requests`, one request at a time: reply to each before taking the next, and the
        answers leave in the order the requests arrived (a pipelining client can match them by order)."""
        for frames in drain(self.socket, timeout_ms):
            envelope, body = _split_envelope([f.bytes for f in frames])
            request_id = protocol.peek_request_id(body) if body else None
            try:
                req = protocol.decode_prompt_request(body)
                digest = _digest(body)
                if self._handled_as_retry(envelope, req.request_id, digest):
                    continue
                self._check_room()
            except ProtocolError as exc:
                self._send(envelope, PromptAnswer(request_id or "", ok=False, error=str(exc)))
                yield envelope, exc, request_id
                continue
            self._waiting[req.request_id] = ([envelope], digest)
            yield envelope, req, req.request_id

    def _handled_as_retry(self, envelope: Envelope, request_id: str, digest: bytes) -> bool:
        """True for a retry of a request seen before (now handled); ``ProtocolError`` for a reused id."""
        if request_id in self._waiting:
            envelopes, first = self._waiting[request_id]
            if first == digest:
                if len(envelopes) < _MAX_RETRY_ENVELOPES:  # each copy gets the answer once it is known
                    envelopes.append(envelope)
                return True
        elif request_id in self._answered:
            answered = self._answered[request_id]
            if answered.digest == digest:
                self.socket.send_multipart([*envelope, *answered.answer])
                return True
        else:
            return False
        raise ProtocolError(f"prompt.request_id: {request_id!r} was already used for a different request")

    def _check_room(self) -> None:
        """Forget answers past the retry window; refuse a request when too many are still in it."""
        expired_before = time.monotonic() - self.retry_window_s
        while self._answered and next(iter(self._answered.values())).t < expired_before:
            self._answered.popitem(last=False)
        if len(self._answered) + len(self._waiting) >= self.max_remembered:
            raise ProtocolError(
                f"control: {self.max_remembered} requests within {self.retry_window_s:g} s, the most this tracker "
                "remembers for retries; retry later"
            )

    def reply(self, identity: Envelope, answer: PromptAnswer) -> None:
        """Send ``answer`` to the request it answers (``identity``) and to every retry of it meanwhile."""
        waiting = self._waiting.pop(answer.request_id, None)
        encoded = _encode_bounded(answer)
        envelopes = [identity]
        if waiting is not None:
            envelopes = waiting[0]
            self._answered[answer.request_id] = _Answered(waiting[1], encoded, time.monotonic())
        for envelope in envelopes:
            self.socket.send_multipart([*envelope, *encoded])

    def _send(self, envelope: Envelope, answer: PromptAnswer) -> None:
        # A peer gone since is silently dropped by the ROUTER: its client has given up on this answer.
        self.socket.send_multipart([*envelope, *_encode_bounded(answer)])

    def close(self) -> None:
        """Close the socket (and the context, when this server made it)."""
        self.socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
