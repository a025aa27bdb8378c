"""Hypothesis-driven fuzz of the two ways in: the tracker's control socket and the page's data channel.

10,000 messages in all (5,000 each) against a real tracker process (the pass-through model, fed frames
by the test) and, for the data channel, the real gateway with a real aiortc viewer. Messages are
well-formed prompts of every op, prompts with wild fields, arbitrary JSON, arbitrary bytes, truncated
JSON, deeply nested JSON, oversized messages, lazy-pirate retries and reused request ids. Checked:
no process crashes (nor logs a traceback), every message is answered exactly once, and the tracker
applies each accepted prompt exactly once (counted on its side, from its heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import zmq
from helpers import Tracker, Viewer, camera, gateway, running_tracker, settled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.protocol import PromptAnswer, ProtocolError, decode_answer, decode_prompt_request
from streamer.transport import RETRY_WINDOW_S

pytestmark = [
    pytest.mark.timeout(600),
    # aiortc draws from the global `random` on the gateway's loop thread while Hypothesis generates on
    # this one; Hypothesis takes that for a strategy using `random` and warns.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

BATCHES, BATCH = int(os.environ.get("FUZZ_BATCHES", "100")), 50  # per way in: 5,000 messages each
FUZZ = settings(
    max_examples=BATCHES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
WORDS = [f"thing {i}" for i in range(24)] + ["person", "cup", "\ud800", "", "   ", "x" * 250]
REUSED = "reused"

# ------------------------------------------------------------------------------------------------
# What clients send

# Values that break parsers, picked from a list (a recursive JSON strategy generated ~20x slower).
JUNK = [
    None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2**63, -(2**70), 10**400, "", "x", "\ud800",
    [], {}, [1, 2], [[1, 2]], [[1, 2, 3]], {"a": 1}, [[0.5, 0.5, 0.2, 0.2]], ["1"], [None], "[[1,2]]",
    [[1e308, 1]], [[-1, -1]], [[1, 1]] * 70, list(range(70)), [[0.5, 0.5, 0.0, 0.2]], {"text": "cup"},
]  # fmt: skip
junk = st.sampled_from(JUNK)
json_values = junk | st.integers(-5, 200) | st.text(max_size=8) | st.lists(junk, max_size=3)
ids = st.integers(0, 70) | st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, -1, True, "3", None, 1.5])
click = st.fixed_dictionaries(
    {
        "points": st.lists(st.tuples(st.integers(0, 159), st.integers(0, 119)).map(list), min_size=1, max_size=3),
    },
    optional={"obj_id": st.integers(0, 70), "text": st.sampled_from(WORDS[:6])},
).map(lambda p: {**p, "point_labels": [1] * len(p["points"])})
box = st.tuples(st.floats(0.3, 0.7), st.floats(0.3, 0.7), st.floats(0.05, 0.5), st.floats(0.05, 0.5)).map(
    lambda b: {"bounding_boxes": [list(b)], "bounding_box_labels": [1]}
)
wild_prompt = st.dictionaries(
    st.sampled_from(["text", "points", "point_labels", "bounding_boxes", "bounding_box_labels", "obj_id", "x"]),
    json_values,
    max_size=4,
)
prompt = click | box | st.sampled_from(WORDS).map(lambda t: {"text": t}) | wild_prompt
request_fields = st.one_of(
    st.fixed_dictionaries({"op": st.just("add_prompt"), "prompt": prompt}),
    st.fixed_dictionaries({"op": st.just("remove_object"), "obj_id": ids}),
    st.fixed_dictionaries({"op": st.just("remove_prompt"), "text": st.sampled_from(WORDS) | json_values}),
    st.just({"op": "reset_session"}),
    st.dictionaries(st.sampled_from(["op", "prompt", "obj_id", "text", "stream", "v", "kind"]), json_values),
)
valid_words = st.sampled_from(WORDS[:26])
valid_prompt = click | box | valid_words.map(lambda t: {"text": t})
valid_fields = st.one_of(  # well-formed requests, most of which the tracker accepts
    st.fixed_dictionaries({"op": st.just("add_prompt"), "prompt": valid_prompt}),
    st.fixed_dictionaries({"op": st.just("remove_object"), "obj_id": st.integers(0, 300)}),
    st.fixed_dictionaries({"op": st.just("remove_prompt"), "text": valid_words}),
)
streams = st.sampled_from(["cam0"] * 8 + ["cam9", "", "\ud800", "x" * 300])
# (how, fields): "fresh" JSON, "retry" of an earlier message's exact bytes, "reuse" of an earlier id
# for other content, or hostile bytes.
fresh = st.tuples(st.just("fresh"), request_fields, streams)
valid = st.tuples(st.just("fresh"), valid_fields, st.just("cam0"))
actions = st.one_of(
    valid,
    valid,
    valid,
    valid,
    fresh,
    fresh,
    st.tuples(st.just("retry"), st.integers(0, 10**6), st.just(None)),
    st.tuples(st.just("reuse"), st.integers(0, 10**6), st.just(None)),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.just(None)),
    st.tuples(st.just("json"), json_values, st.just(None)),
    st.tuples(st.just("truncated"), request_fields, st.integers(1, 40)),
    st.tuples(st.just("nested"), st.integers(1000, 20_000), st.just(None)),
    st.tuples(st.just("big"), st.integers(70_000, 120_000), st.just(None)),
)


def dumps(value: Any) -> str:
    """JSON as a careless client writes it (NaN, huge integers and lone surrogates included)."""
    return json.dumps(value)


# ------------------------------------------------------------------------------------------------
# The control socket


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    log_path = tmp_path_factory.mktemp("fuzz") / "tracker.log"
    with running_tracker("--model", "passthrough", log_path=log_path) as running, camera(running, fps=50):
        running.until_result("cam0", 0)
        yield running
    assert "Traceback" not in log_path.read_text()


class ControlLedger:
    """What the fuzzer sent and was answered, to check answers and count what should be applied."""

    def __init__(self) -> None:
        self.count = 0
        self.history: list[tuple[bytes, PromptAnswer, float]] = []  # decodable requests, first answers, when
        self.accepted: set[str] = set()
        self.refusals = Counter[str]()  # of well-formed requests, by the field named

    def body(self, action: tuple) -> tuple[bytes, str | None, PromptAnswer | str | None]:
        """The bytes to send, the request id the answer must carry, and what the answer must be: the
        earlier answer (a retry), ``REUSED`` (an id reused for other content), or ``None`` (not known)."""
        how, value, extra = action
        self.count += 1
        request_id = f"fz-{self.count}"
        # Retries within the server's retry window only (past it, a request id is free again).
        recent = [h for h in self.history[-2000:] if h[2] > time.monotonic() - RETRY_WINDOW_S / 2]
        if how in ("retry", "reuse") and not recent:
            how, value, extra = "fresh", {"op": "reset_session"}, None
        if how == "retry":
            earlier, answer, _ = recent[value % len(recent)]
            return earlier, answer.request_id, answer
        if how == "reuse":
            _, answer, _ = recent[value % len(recent)]
            header = {"v": 2, "kind": "prompt", "request_id": answer.request_id, "stream": "cam0"}
            return dumps({**header, "op": "reset_session", "pad": self.count}).encode(), answer.request_id, REUSED
        if how in ("fresh", "truncated"):
            text = dumps({"v": 2, "kind": "prompt", "request_id": request_id, "stream": "cam0", **value})
            if how == "fresh" and extra is not None:
                text = dumps({**json.loads(text), "stream": extra})
            if how == "truncated":
                text = text[: max(1, len(text) - extra)]
            return text.encode(), request_id, None
        if how == "bytes":
            return value, None, None
        if how == "json":
            return dumps(value).encode(), None, None
        if how == "nested":
            return (
                (f'{{"request_id": "{request_id}", "x": ' + "[" * value + "]" * value + "}").encode(),
                request_id,
                None,
            )
        pad = "x" * value  # "big": over the 64 KB header limit, under the socket's cut-off
        return f'{{"v": 2, "kind": "prompt", "pad": "{pad}", "request_id": "{request_id}"}}'.encode(), request_id, None


def test_control_socket_fuzz(tracker: Tracker) -> None:
    before = tracker.status("cam0")
    instance = tracker.receive(0.6)[1][-1].instance
    ledger = ControlLedger()
    dealer = tracker.pub.context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(tracker.endpoints.control)

    @FUZZ
    @given(st.lists(actions, min_size=BATCH, max_size=BATCH))
    def batch(batch_actions: list[tuple]) -> None:
        sent = [ledger.body(action) for action in batch_actions]
        for body, _, _ in sent:  # pipelined: all of the batch before the first answer is read
            dealer.send_multipart([b"", body])
        answers = []
        while len(answers) < len(sent):
            assert dealer.poll(10_000), f"{len(answers)} answers for {len(sent)} messages"
            answers.append(decode_answer(dealer.recv_multipart()[1:]))
        assert not dealer.poll(50), "an extra answer"
        for (body, request_id, expected), answer in zip(sent, answers, strict=True):  # answered in order
            assert answer.request_id in (request_id, ""), (body[:200], answer)
            assert answer.request_id == request_id or not answer.ok
            if expected is REUSED:
                assert not answer.ok and "already used for a different request" in (answer.error or ""), answer
                continue
            if expected is not None:
                assert answer == expected, "a retry gets the first answer again"
                continue
            try:
                decode_prompt_request([body])
            except ProtocolError:
                assert not answer.ok
                continue
            if answer.ok:
                ledger.accepted.add(answer.request_id)
            else:
                ledger.refusals[(answer.error or "").split(":")[0]] += 1
            ledger.history.append((body, answer, time.monotonic()))

    try:
        batch()
    finally:
        dealer.close()
    assert ledger.count == BATCHES * BATCH
    after = settled(tracker)
    applied = after["prompts_applied"] + after["prompts_failed"] - before["prompts_applied"] - before["prompts_failed"]
    print(f"\ncontrol fuzz: {ledger.count} messages, {len(ledger.accepted)} accepted, {applied} applied")
    print(f"well-formed requests refused, by field: {dict(ledger.refusals.most_common(8))}")
    assert applied == len(ledger.accepted), "each accepted prompt applied exactly once"
    assert tracker.receive(0.6)[1][-1].instance == instance, "the tracker never restarted"


# ------------------------------------------------------------------------------------------------
# The data channel

channel_json = request_fields.map(lambda f: ("json", f))
channel_valid = valid_fields.map(lambda f: ("json", f))
channel_messages = st.one_of(
    channel_valid,
    channel_valid,
    channel_valid,
    channel_json,
    channel_json,
    st.tuples(st.just("text"), st.text(st.characters(exclude_categories=["Cs"]), max_size=40)),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(st.just("truncated"), request_fields),
    st.tuples(st.just("nested"), st.integers(1000, 20_000)),
    st.tuples(st.just("big"), st.integers(70_000, 120_000)),
)


class LoopThread:
    """An asyncio loop in a thread, for the gateway and the viewer while Hypothesis drives the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is still running (as asyncio.run does), then stop the loop."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_data_channel_fuzz(tracker: Tracker) -> None:
    before = tracker.status("cam0")
    endpoints = types.SimpleNamespace(
        results_endpoint=tracker.endpoints.results, control_endpoint=tracker.endpoints.control, stream="cam0"
    )
    loop = LoopThread()
    stack = contextlib.AsyncExitStack()
    viewer_box: list[Viewer] = []
    base_url: list[str] = []
    received: list[dict] = []

    async def start() -> None:
        url = await stack.enter_async_context(gateway(endpoints, prompt_timeout_s=5.0))
        base_url.append(url)
        viewer = Viewer()
        stack.push_async_callback(viewer.close)
        await viewer.connect(url)

        def collect(text: str) -> None:
            message = json.loads(text)
            if message["type"] == "answer":
                received.append(message)

        viewer.channel.on("message", collect)
        viewer_box.append(viewer)
        await viewer.wait_status("live", timeout=20)

    counts = Counter[str]()

    async def send_batch(messages: list[str | bytes]) -> list[dict]:
        viewer = viewer_box[0]
        first = len(received)
        for message in messages:
            viewer.channel.send(message)
        deadline = time.monotonic() + 60
        while len(received) - first < len(messages):
            assert time.monotonic() < deadline, f"{len(received) - first} answers for {len(messages)} messages"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return received[first:]

    @FUZZ
    @given(st.lists(channel_messages, min_size=BATCH, max_size=BATCH))
    def batch(drawn: list[tuple[str, Any]]) -> None:
        messages: list[str | bytes] = []
        own_ids: list[str] = []
        for how, value in drawn:
            counts["messages"] += 1
            page_id = f"d{counts['messages']}"
            if how == "json" or how == "truncated":
                text = dumps({**value, "id": page_id}) if isinstance(value, dict) else dumps(value)
                own_ids.append(page_id)
                messages.append(text if how == "json" else text[: max(1, len(text) // 2)])
            elif how == "nested":
                messages.append(f'{{"id": "{page_id}", "op": ' + "[" * value + "]" * value + "}")
                own_ids.append(page_id)
            elif how == "big":
                messages.append(f'{{"op": "add_prompt", "prompt": {{"text": "{"x" * value}"}}, "id": "{page_id}"}}')
                own_ids.append(page_id)
            else:
                messages.append(value)
        answers = loop.run(send_batch(messages))
        assert len(answers) == len(messages), "one answer per message"
        seen = Counter(a["id"] for a in answers if isinstance(a["id"], str) and a["id"].startswith("d"))
        assert all(n == 1 for n in seen.values()), "an id answered twice"
        assert set(seen) <= set(own_ids)
        counts["accepted"] += sum(1 for a in answers if a["ok"])

    outcomes: dict = {}
    try:
        loop.run(start())
        batch()
        outcomes = loop.run(_outcomes(base_url[0]))
    finally:
        loop.run(stack.aclose())
        loop.close()
    assert counts["messages"] == BATCHES * BATCH
    after = settled(tracker)
    applied = after["prompts_applied"] + after["prompts_failed"] - before["prompts_applied"] - before["prompts_failed"]
    print(f"\ndata channel fuzz: {counts['messages']} messages, {counts['accepted']} accepted, {applied} applied")
    print(f"gateway outcomes: {outcomes}")
    assert outcomes.get("accepted") == counts["accepted"] and not outcomes.get("unanswered"), outcomes
    assert applied == counts["accepted"], "each accepted prompt applied exactly once"


async def _outcomes(url: str) -> dict:
    """The gateway's prompt outcomes (accepted, rejected, invalid, unanswered, busy) from /health."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as response:
        return (await response.json())["prompts"]
