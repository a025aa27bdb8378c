"""ZeroMQ transport over real loopback sockets: latest-value drain, lazy pirate clients, control server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from helpers import encoded_frame, free_tcp_endpoint

from models import Prompt
from streamer import protocol, topics, transport
from streamer.config import Endpoints
from streamer.protocol import PromptAnswer, PromptRequest, ProtocolError, StatusMessage
from streamer.transport import (
    AsyncPromptClient,
    ControlServer,
    DrainStats,
    PromptClient,
    bound_endpoint,
    drain,
    latest_per_stream,
)

# A socket left open makes Context.term() wait forever: fail fast instead of hanging the suite.
pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A bindable endpoint: a free loopback port, or a socket file in a folder that does not exist yet."""
    return "tcp://127.0.0.1:*" if request.param == "tcp" else f"ipc://{tmp_path}/sockets/s"


def connect_pub_sub(pub: zmq.Socket, sub: zmq.Socket, probe: Callable[[], list]) -> None:
    """Wait out the slow joiner: publish probes until the subscriber sees one, then empty it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pub.send_multipart(probe(), copy=False)
        if drain(sub, 20):
            time.sleep(0.05)
            drain(sub, 0)
            return
    raise AssertionError("subscriber never connected")


def add_prompt(request_id: str = "r1", text: str = "person") -> PromptRequest:
    return PromptRequest(request_id, "cam0", "add_prompt", Prompt.from_dict({"text": text}))


@contextmanager
def serving(
    context: zmq.Context,
    endpoint: str = "tcp://127.0.0.1:*",
    answer: Callable[[PromptRequest], PromptAnswer] | None = None,
) -> Iterator[ControlServer]:
    """A ControlServer answering every request from its own thread, as the tracker service would."""
    answer = answer or (lambda req: PromptAnswer(req.request_id, True, obj_ids=[1]))
    server = ControlServer(endpoint, context=context)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for envelope, req, _ in server.poll_requests(20):
                if isinstance(req, PromptRequest):
                    server.reply(envelope, answer(req))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()


# ------------------------------------------------------------------------------------------------
# Latest-value


def test_drain_returns_the_newest_frame_of_each_stream_after_a_burst(context: zmq.Context, endpoint: str) -> None:
    pub = transport.frames_publisher(endpoint, context=context)
    sub = transport.frames_subscriber(bound_endpoint(pub), context=context)
    try:
        connect_pub_sub(pub, sub, lambda: encoded_frame("probe", 0))
        for seq in range(60):
            pub.send_multipart(encoded_frame("a", seq), copy=False)
            if seq % 3 == 0:
                pub.send_multipart(encoded_frame("b", seq), copy=False)
        time.sleep(0.2)  # let the burst land in the subscriber's queue
        messages = drain(sub, 1000)
        deadline = time.monotonic() + 5
        while len(messages) < 80 and time.monotonic() < deadline:
            messages += drain(sub, 100)
        assert len(messages) == 80
        seqs = [protocol.decode_frame(m)[0].seq for m in messages if protocol.decode_frame(m)[0].stream == "a"]
        assert seqs == list(range(60)), "drain keeps arrival order"
        stats = DrainStats()
        latest = latest_per_stream(messages, stats)
        assert {s: h.seq for s, (h, _) in latest.items()} == {"a": 59, "b": 57}
        assert int(latest["a"][1][0, 0, 0]) == 59
        assert (stats.used, stats.superseded, stats.malformed) == (2, 78, 0)
        assert drain(sub, 0) == []
    finally:
        sub.close()
        pub.close()


def test_drain_is_bounded_and_times_out(context: zmq.Context) -> None:
    pub = transport.frames_publisher("tcp://127.0.0.1:*", context=context)
    sub = transport.frames_subscriber([bound_endpoint(pub)], context=context)
    try:
        connect_pub_sub(pub, sub, lambda: encoded_frame("probe", 0))
        start = time.monotonic()
        assert drain(sub, 50) == []
        assert 0.04 <= time.monotonic() - start < 2
        for seq in range(12):
            pub.send_multipart(encoded_frame("a", seq), copy=False)
        time.sleep(0.2)
        first = drain(sub, 1000, max_messages=5)
        rest = drain(sub, 1000)
        assert len(first) == 5 and len(rest) == 7
        assert latest_per_stream(rest)["a"][0].seq == 11
        assert all(isinstance(part, zmq.Frame) for part in first[0]), "parts arrive without a copy"
    finally:
        sub.close()
        pub.close()


def test_latest_per_stream_drops_and_counts_malformed(caplog: pytest.LogCaptureFixture) -> None:
    status = protocol.encode_status(StatusMessage("t", 1.0, {}))
    messages = [encoded_frame("a", 1), [b"garbage"], status, encoded_frame("a", 0), [encoded_frame("a", 2)[0]]]
    stats = DrainStats()
    with caplog.at_level(logging.WARNING, logger="streamer.transport"):
        latest = latest_per_stream(messages, stats)
    assert latest["a"][0].seq == 0, "the last to arrive wins (a restarted capture counts from 0 again)"
    assert (stats.used, stats.superseded, stats.malformed) == (1, 1, 3)
    assert len(caplog.records) == 1 and "malformed" in caplog.text, "one warning, not one per message"


def test_results_socket_carries_results_and_heartbeats(context: zmq.Context, endpoint: str) -> None:
    pub = transport.results_publisher(endpoint, context=context)
    sub = transport.results_subscriber(bound_endpoint(pub), frames=True, context=context)
    beat = protocol.encode_status(StatusMessage("gpu0", 1.0, {}))
    try:
        connect_pub_sub(pub, sub, lambda: beat)
        pixels = np.zeros((6, 8, 3), np.uint8)
        msg = protocol.ResultMessage(
            "cam0",
            3,
            0,
            1.0,
            8,
            6,
            {"published": 2.0},
            {},
            [protocol.WireObject(1, 0.9, (1, 1, 4, 4), np.eye(6, 8, dtype=bool), "cup")],
        )
        pub.send_multipart(protocol.encode_result(msg, pixels), copy=False)
        pub.send_multipart(beat)
        received: list = []
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            received += drain(sub, 100)
        assert [protocol.peek_kind(m) for m in received] == ["result", "status"]
        result, got = protocol.decode_result(received[0])
        np.testing.assert_array_equal(result.objects[0].mask, np.eye(6, 8, dtype=bool))
        np.testing.assert_array_equal(got, pixels)
    finally:
        sub.close()
        pub.close()


def _result_parts(stream: str, seq: int) -> list:
    """An encoded result of ``stream`` with an 8x6 frame, as the tracker encodes it before publishing."""
    message = protocol.ResultMessage(stream, seq, seq, 1.0, 8, 6, {}, {}, [])
    return protocol.encode_result(message, np.full((6, 8, 3), 7, np.uint8))


def test_subscribers_choose_by_topic_and_robots_never_receive_pixels(context: zmq.Context, endpoint: str) -> None:
    pub = transport.results_publisher(endpoint, context=context)
    at = bound_endpoint(pub)
    subscribers = {
        "robot": transport.results_subscriber(at, context=context),
        "robot_cam": transport.results_subscriber(at, streams=["cam"], context=context),
        "gateway_cam0": transport.results_subscriber(at, frames=True, streams=["cam0"], context=context),
        "gateway": transport.results_subscriber(at, frames=True, context=context),
    }
    beat = protocol.encode_status(StatusMessage("gpu0", 1.0, {}))
    event = protocol.encode_event(protocol.EventMessage("cam0", "prompt_failed", "no", 1.0))
    try:
        for sub in subscribers.values():
            connect_pub_sub(pub, sub, lambda: beat)
        time.sleep(0.05)
        for sub in subscribers.values():  # the probes sent while connecting the others
            drain(sub, 0)
        for seq in range(3):
            for stream in ("cam0", "cam", "cam01"):  # "cam" starts the others' names: its topic must not match them
                transport.publish_result(pub, _result_parts(stream, seq))
        pub.send_multipart(event)
        pub.send_multipart(beat)
        got: dict[str, list] = {name: [] for name in subscribers}
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < 9 + 3 + 3 + 9 + 2 * 4 + 2 and time.monotonic() < deadline:
            for name, sub in subscribers.items():
                got[name] += drain(sub, 20)
        time.sleep(0.1)  # anything extra would have arrived by now
        for name, sub in subscribers.items():
            got[name] += drain(sub, 0)

        def seen(name: str) -> list[tuple[str, str | None, bool]]:
            out = []
            for parts in got[name]:
                kind = protocol.peek_kind(parts)
                if kind == "result":
                    message, pixels = protocol.decode_result(parts)
                    out.append((kind, message.stream, pixels is not None))
                else:
                    out.append((kind, None, False))
            return out

        def results(streams: tuple[str, ...], pixels: bool) -> list[tuple[str, str, bool]]:
            return [("result", stream, pixels) for _ in range(3) for stream in streams]

        tail = [("event", None, False), ("status", None, False)]
        assert seen("robot") == results(("cam0", "cam", "cam01"), False) + tail
        assert seen("robot_cam") == results(("cam",), False) + [("status", None, False)]
        assert seen("gateway_cam0") == results(("cam0",), True) + tail
        assert seen("gateway") == results(("cam0", "cam", "cam01"), True) + tail
        for name in ("robot", "robot_cam"):  # two parts at most: a topic and a header, never a frame
            assert all(len(parts) == 2 for parts in got[name]), name
            assert all(len(parts[1]) < 4096 for parts in got[name]), name

        # A subscriber can follow another stream later (the gateway narrows to the stream it shows).
        gateway = subscribers["gateway"]
        transport.resubscribe(gateway, topics.subscriptions(frames=True), topics.subscriptions(["cam01"], frames=True))
        time.sleep(0.2)  # the new subscription travels to the publisher
        for stream in ("cam0", "cam01"):
            transport.publish_result(pub, _result_parts(stream, 9))
        received: list = []
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            received += drain(gateway, 50)
        time.sleep(0.1)
        received += drain(gateway, 0)
        assert [protocol.decode_result(parts)[0].stream for parts in received] == ["cam01"]
    finally:
        for sub in subscribers.values():
            sub.close()
        pub.close()


def test_drain_async(context: zmq.Context) -> None:
    async def main() -> int:
        actx = zmq.asyncio.Context()
        pub = transport.results_publisher("tcp://127.0.0.1:*", context=context)
        sub = transport.results_subscriber(bound_endpoint(pub), context=actx)
        beat = protocol.encode_status(StatusMessage("gpu0", 1.0, {}))
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pub.send_multipart(beat)
                got = await transport.drain_async(sub, 20)
                if got:
                    return protocol.decode_status(got[-1]).t
            return -1
        finally:
            sub.close()
            pub.close()
            actx.term()

    assert asyncio.run(main()) == 1.0


# ------------------------------------------------------------------------------------------------
# Endpoints


def test_ipc_folder_is_created_and_long_paths_are_refused(context: zmq.Context, tmp_path: Path) -> None:
    pub = transport.frames_publisher(f"ipc://{tmp_path}/a/b/frames", context=context)
    pub.close()
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(ValueError, match="ipc path longer"):
        transport.frames_publisher(f"ipc://{tmp_path}/{'x' * 120}", context=context)
    with pytest.raises(ValueError, match="tcp:// or ipc://"):
        transport.results_subscriber("udp://127.0.0.1:5", context=context)


def test_endpoint_defaults(tmp_path: Path) -> None:
    tcp = Endpoints.tcp_defaults()
    assert (tcp.frames, tcp.results, tcp.control) == (
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:5556",
        "tcp://127.0.0.1:5557",
    )
    assert Endpoints.tcp_defaults("::1").control == "tcp://[::1]:5557"
    ipc = Endpoints.ipc_in(tmp_path)
    assert ipc.frames == f"ipc://{tmp_path}/frames" and ipc.control.endswith("/control")


# ------------------------------------------------------------------------------------------------
# Lazy pirate and the control server


def test_prompt_client_times_out_cleanly_on_a_dead_endpoint(context: zmq.Context) -> None:
    endpoint = free_tcp_endpoint()
    start = time.monotonic()
    with (
        PromptClient(endpoint, timeout_s=0.1, retries=3, context=context) as client,
        pytest.raises(TimeoutError, match=endpoint),
    ):
        client.request(add_prompt())
    assert 0.3 <= time.monotonic() - start < 3


def test_prompt_client_gets_answers_from_a_control_server(context: zmq.Context, endpoint: str) -> None:
    with serving(context, endpoint) as server, PromptClient(server.endpoint, timeout_s=2, context=context) as client:
        for i in range(3):
            answer = client.request(add_prompt(f"r{i}"))
            assert answer == PromptAnswer(f"r{i}", True, obj_ids=[1])
        remove = client.request(PromptRequest("x", "cam0", "remove_object", obj_id=1))
        assert remove.ok and remove.request_id == "x"


def test_prompt_client_survives_a_tracker_that_starts_late(context: zmq.Context) -> None:
    endpoint = free_tcp_endpoint()
    result: dict = {}
    with PromptClient(endpoint, timeout_s=0.3, retries=10, context=context) as client:
        thread = threading.Thread(target=lambda: result.update(answer=client.request(add_prompt())))
        thread.start()
        time.sleep(0.4)  # the first try is lost
        with serving(context, endpoint):
            thread.join(10)
    assert result["answer"].ok


@pytest.mark.parametrize(
    "body, message",
    [
        ([b"\xff not json"], "header: not UTF-8"),
        (
            [
                b'{"v": 1, "kind": "prompt", "request_id": "r9", "stream": "cam0", "op": "add_prompt",'
                b' "prompt": {"points": [[1, 2]], "point_labels": [7]}}'
            ],
            "point_labels: each label",
        ),
        ([b'{"v": 1, "kind": "prompt", "request_id": "r9", "stream": "cam0", "op": "fly"}'], "prompt.op: unknown op"),
        ([b'{"v": 7, "kind": "prompt"}'], "header.v"),
        ([b"{}", b"extra"], "header.v"),
    ],
)
def test_malformed_requests_get_an_error_answer(context: zmq.Context, body: list[bytes], message: str) -> None:
    server = ControlServer("tcp://127.0.0.1:*", context=context)
    req = transport.control_requester(server.endpoint, context=context)
    try:
        req.send_multipart(body)
        polled = server.poll_requests(2000)
        assert len(polled) == 1 and isinstance(polled[0][1], ProtocolError)
        assert message in str(polled[0][1])
        assert req.poll(2000), "the server must answer a malformed request by itself"
        answer = protocol.decode_answer(req.recv_multipart())
        assert not answer.ok and message in answer.error
        assert answer.request_id == (polled[0][2] or "") == ("r9" if b"r9" in body[0] else "")
    finally:
        req.close()
        server.close()


def _in_thread(call: Callable[[], PromptAnswer]) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(answer=call()))
    thread.start()
    return thread, result


def _pump(server: ControlServer, thread: threading.Thread) -> list:
    """Poll the server (as the tracker loop does) until the client thread is done; what surfaced."""
    surfaced: list = []
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        surfaced += server.poll_requests(20)
    thread.join(1)
    return surfaced


def test_server_answers_a_retry_once_and_never_applies_it_twice(context: zmq.Context) -> None:
    server = ControlServer("tcp://127.0.0.1:*", context=context)
    client = PromptClient(server.endpoint, timeout_s=0.2, retries=10, context=context)
    thread, result = _in_thread(lambda: client.request(add_prompt("dup")))
    try:
        first = server.poll_requests(2000)
        assert [r for _, r, _ in first] == [add_prompt("dup")]
        time.sleep(0.5)  # the client gives up on its first socket and retries from a new one
        assert server.poll_requests(100) == [], "a retry of a waiting request is not surfaced again"
        server.reply(first[0][0], PromptAnswer("dup", True, obj_ids=[4]))  # goes to the newest retry's socket
        # If the client has moved on to yet another socket meanwhile, its next retry gets the cached answer.
        assert _pump(server, thread) == []
        assert result["answer"] == PromptAnswer("dup", True, obj_ids=[4])

        # The same request once more (its answer was lost, say): the cached answer, not a second apply.
        thread, result = _in_thread(lambda: client.request(add_prompt("dup")))
        assert _pump(server, thread) == []
        assert result["answer"] == PromptAnswer("dup", True, obj_ids=[4])

        # The same id for another request is refused, naming the field.
        thread, result = _in_thread(lambda: client.request(add_prompt("dup", "cat")))
        surfaced = _pump(server, thread)
        assert len(surfaced) == 1 and isinstance(surfaced[0][1], ProtocolError)
        assert not result["answer"].ok and "prompt.request_id" in result["answer"].error
    finally:
        thread.join(5)
        client.close()
        server.close()


def test_server_remembers_answers_for_a_time_window_within_a_memory_bound(context: zmq.Context) -> None:
    """Retries are recognised for retry_window_s, not for the last N requests; when more answers than
    max_remembered are in the window, new requests are refused rather than old answers forgotten."""
    server = ControlServer("tcp://127.0.0.1:*", context=context, retry_window_s=1.5, max_remembered=3)
    dealer = context.socket(zmq.DEALER)
    dealer.connect(server.endpoint)

    def ask(request: PromptRequest) -> list[PromptAnswer]:
        """Send twice on one socket (a duplicate in flight): each copy gets its own answer."""
        body = protocol.encode_prompt_request(request)
        for _ in range(2):
            dealer.send_multipart([b"", *body])
        answers: list[PromptAnswer] = []
        deadline = time.monotonic() + 3
        while len(answers) < 2 and time.monotonic() < deadline:
            for envelope, req, _ in server.poll_requests(10):
                if isinstance(req, PromptRequest):
                    server.reply(envelope, PromptAnswer(req.request_id, True, obj_ids=[len(req.request_id)]))
            while dealer.poll(10):
                answers.append(protocol.decode_answer(dealer.recv_multipart()[1:]))
        assert not dealer.poll(100), "one answer per copy, no more"
        return answers

    try:
        for i in range(3):
            assert [a.ok for a in ask(add_prompt(f"r{i}"))] == [True, True]
        full = ask(add_prompt("r3"))
        assert len(full) == 2 and all(not a.ok and a.error.startswith("control: 3 requests within 1.5 s") for a in full)
        assert ask(add_prompt("r0")) == [PromptAnswer("r0", True, obj_ids=[2])] * 2, "a retry: the same answer"
        time.sleep(1.6)
        assert [a.ok for a in ask(add_prompt("r3"))] == [True, True], "answers past the window are forgotten"
    finally:
        dealer.close(linger=0)
        server.close()


def test_an_answer_too_large_for_the_wire_is_cut_to_fit_not_lost(context: zmq.Context) -> None:
    huge = PromptAnswer("r1", False, "stream: unknown stream; known: " + "x" * 10_000, obj_ids=list(range(300)))
    with serving(context, answer=lambda req: huge) as server, PromptClient(server.endpoint, context=context) as client:
        answer = client.request(add_prompt("r1"))
    assert not answer.ok and answer.error.startswith("stream: unknown stream") and len(answer.error) <= 4096
    assert answer.obj_ids == list(range(protocol.MAX_OBJECTS))


def test_async_prompt_client(context: zmq.Context) -> None:
    async def main(endpoint: str) -> list[PromptAnswer]:
        async with AsyncPromptClient(endpoint, timeout_s=2) as client:
            return await asyncio.gather(*(client.request(add_prompt(f"a{i}")) for i in range(4)))

    with serving(context) as server:
        answers = asyncio.run(main(server.endpoint))
    assert [a.request_id for a in answers] == ["a0", "a1", "a2", "a3"] and all(a.ok for a in answers)


def test_async_prompt_client_times_out_on_a_dead_endpoint() -> None:
    endpoint = free_tcp_endpoint()

    async def main() -> None:
        client = AsyncPromptClient(endpoint, timeout_s=0.1, retries=2)
        try:
            await client.request(add_prompt())
        finally:
            client.close()

    with pytest.raises(TimeoutError, match=endpoint):
        asyncio.run(main())


def test_clients_refuse_malformed_requests_before_sending(context: zmq.Context) -> None:
    with (
        PromptClient(free_tcp_endpoint(), timeout_s=0.1, context=context) as client,
        pytest.raises(ProtocolError, match="prompt.obj_id: missing"),
    ):
        client.request(PromptRequest("r", "cam0", "remove_object"))
    with pytest.raises(ValueError, match="retries"):
        PromptClient("tcp://127.0.0.1:1", retries=0, context=context)


def test_answer_for_another_request_is_a_protocol_error() -> None:
    parts = protocol.encode_answer(PromptAnswer("other", True))
    with pytest.raises(ProtocolError, match="answer.request_id"):
        transport._answer_for(add_prompt("mine"), parts, "tcp://x:1")
    assert json.loads(parts[0])["request_id"] == "other"
