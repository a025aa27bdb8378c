"""Placement by measured frame budget, rebalancing and draining (pure functions), and the pieces of a
tracker in a cluster that need no Ray: assignments, prompts carried between trackers, the map's parser,
the tracker actor's class with CURVE keys."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import free_port_block

from models import Prompt
from streamer.assignments import StreamAssignments
from streamer.capture import run_capture
from streamer.cluster.placement import Move, TrackerLoad, drain_moves, estimate_cost, place, rebalance
from streamer.cluster.route import parse_map
from streamer.cluster.tracker_actor import TrackerActor, TrackerOptions
from streamer.keys import KeyFolder, make_keys
from streamer.prompt_queue import QueuedOp
from streamer.prompt_store import PromptStore
from streamer.protocol import PromptRequest, peek_kind
from streamer.security import CurveClient
from streamer.transport import drain, results_subscriber


def loads(**trackers: dict[str, float | None]) -> list[TrackerLoad]:
    return [TrackerLoad(name, dict(streams)) for name, streams in trackers.items()]


def test_place_by_spare_budget_not_stream_count() -> None:
    # One 30 fps camera using 80 % of t0 weighs more than three idle ones on t1.
    assert place(loads(t0={"a": 0.8}, t1={"b": 0.1, "c": 0.1, "d": 0.1})) == "t1"
    assert place(loads(t0={"a": 0.1}, t1={})) == "t1"
    with pytest.raises(ValueError, match="trackers: none"):
        place([])


def test_unmeasured_streams_count_at_the_mean_measured_cost() -> None:
    trackers = loads(t0={"a": 0.3, "b": None}, t1={"c": 0.1, "d": 0.1, "e": 0.1})
    assert estimate_cost(trackers) == pytest.approx(0.15)
    assert place(trackers) == "t1"  # t0: 0.45, t1: 0.3


def test_rebalance_moves_the_fewest_streams_onto_a_new_tracker() -> None:
    trackers = loads(t0={"a": 0.1, "b": 0.1}, t1={"c": 0.1, "d": 0.1}, t2={"e": 0.1, "f": 0.1}, t3={})
    moves = rebalance(trackers)
    assert len(moves) == 1 and moves[0].target == "t3"
    assert rebalance(loads(t0={"a": 0.1, "b": 0.1}, t1={"c": 0.1, "d": 0.1})) == []  # balanced: nothing moves
    uneven = loads(t0={"a": 0.15, "b": 0.15, "c": 0.15}, t1={"d": 0.15, "e": 0.15})  # gap 0.15: noise
    assert rebalance(uneven, margin=0.1) == []
    assert len(rebalance(loads(t0={"a": 0.15, "b": 0.15, "c": 0.15, "d": 0.15}, t1={}), margin=0.1)) == 2


def test_rebalance_evens_out_costs() -> None:
    moves = rebalance(loads(t0={"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}, t1={}))
    after = {"t0": 1.0, "t1": 0.0}
    cost = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    for move in moves:
        after[move.source] -= cost[move.stream]  # type: ignore[index]
        after[move.target] += cost[move.stream]
    assert abs(after["t0"] - after["t1"]) <= 0.2 + 1e-9


def test_drain_moves_every_stream_to_the_most_spare() -> None:
    moves = drain_moves(loads(t0={"a": 0.5, "b": 0.1}, t1={"c": 0.5}, t2={}), "t0")
    assert moves == [Move("a", "t0", "t2"), Move("b", "t0", "t1")]
    assert drain_moves(loads(t0={}, t1={}), "t0") == []


def test_assignments_say_what_to_connect_and_drop() -> None:
    assignments = StreamAssignments()
    assert assignments.take_change() is None
    assignments.assign("a", "tcp://127.0.0.1:1")
    assignments.assign("b", "tcp://127.0.0.1:1")  # two streams from one capture
    change = assignments.take_change()
    assert change is not None and change.connect == {"tcp://127.0.0.1:1"} and not change.disconnect
    assert assignments.release("a") and not assignments.release("a")
    change = assignments.take_change()
    assert change is not None and change.released == {"a"} and not change.disconnect  # b still reads it
    assignments.release("b")
    change = assignments.take_change()
    assert change is not None and change.disconnect == {"tcp://127.0.0.1:1"}
    assert assignments.streams() == {} and not assignments.holds("b")


def _accepted(
    store: PromptStore, stream: str, prompt: Prompt, new_ids: tuple[int, ...] = (), text: bool = False
) -> None:
    request = PromptRequest(f"r{len(new_ids)}", stream, "add_prompt", prompt=prompt)
    store.record(stream, QueuedOp(request, list(new_ids), list(new_ids), text, 0))


def test_a_streams_prompts_travel_to_another_store() -> None:
    old, new = PromptStore(), PromptStore()
    _accepted(old, "cam0", Prompt(text="person"), text=True)
    _accepted(old, "cam0", Prompt(points=[[10, 20]], point_labels=[1]), new_ids=(7,))
    records = old.export_stream("cam0")
    assert old.export_stream("nothing") is None
    new.import_stream("cam0", json.loads(json.dumps(records)))  # as Ray would carry them
    prompts = new.prompts("cam0")
    assert prompts is not None and [p.text for p in prompts] == ["person", None] and prompts[1].obj_id == 7
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        new.import_stream("cam0", [{"reset": True}, {"evil": 1}])
    assert new.prompts("cam0") is None  # a bad import leaves nothing half-applied
    with pytest.raises(ValueError, match="add_text"):
        new.import_stream("cam0", [{"add_text": ["not", "text"]}])


def test_map_is_parsed_as_hostile_input() -> None:
    body = {
        "version": 3,
        "streams": {
            "cam0": {"tracker": "t0", "results_endpoint": "tcp://h:1", "control_endpoint": "tcp://h:2"},
            "cam1": {"tracker": None},
        },
        "trackers": {"t0": {"state": "up", "results_endpoint": "tcp://h:1", "control_endpoint": "tcp://h:2"}},
    }
    parsed = parse_map(json.dumps(body))
    assert parsed.route("cam0").control_endpoint == "tcp://h:2" and parsed.route("cam1") is None
    assert parsed.results_endpoints == ("tcp://h:1",)
    for bad, field in (
        ("[", "map: not JSON"),
        ("[]", "map: expected an object"),
        (json.dumps({**body, "version": -1}), "version"),
        (json.dumps({**body, "streams": {"c": {"tracker": "t0", "results_endpoint": "http://x"}}}), "results_endpoint"),
        ("[" * 100000, "map: not JSON"),
    ):
        with pytest.raises(ValueError, match=field):
            parse_map(bad)


def test_tracker_actor_serves_assigned_streams_over_curve(tmp_path) -> None:
    """The tracker actor's class run in this process (Ray only adds a process around it): with keys, a keyed
    capture's stream is tracked once assigned, a keyed subscriber gets its results, a stranger gets nothing,
    and a release hands the stream's prompts over."""
    make_keys(tmp_path / "keys")
    make_keys(tmp_path / "stranger")
    keys = KeyFolder.open(tmp_path / "keys")
    base = free_port_block(3)
    frames, results, control = (f"tcp://127.0.0.1:{base + i}" for i in range(3))
    stop = threading.Event()
    capture = threading.Thread(
        target=run_capture,
        args=("synthetic:64x48@20", frames, "cam0"),
        kwargs={"stop_event": stop, "keys": keys},
        daemon=True,
    )
    capture.start()
    actor = TrackerActor("t0", results, control, TrackerOptions(model="passthrough", keys_path=str(keys.path)))
    allowed = results_subscriber(results, security=CurveClient(keys))
    stranger = results_subscriber(results, security=CurveClient(KeyFolder.open(tmp_path / "stranger")))
    try:
        assert actor.report()["streams"] == {}
        prompts = [{"reset": True}, {"add_objects": [[5, {"points": [[1, 2]], "point_labels": [1], "obj_id": 5}]]}]
        actor.assign("cam0", frames, prompts)
        deadline, seen = time.monotonic() + 10, None
        while seen is None and time.monotonic() < deadline:
            for parts in drain(allowed, timeout_ms=200):
                if peek_kind(parts) == "result":
                    seen = parts
        assert seen is not None, "no result reached the keyed subscriber"
        assert not [p for p in drain(stranger, timeout_ms=300) if peek_kind(p) == "result"]
        report = actor.report()
        assert report["instance"] == actor.info()["instance"]
        assert report["streams"]["cam0"]["stats"]["frames_tracked"] > 0
        handed = actor.release("cam0")
        assert handed is not None and any("add_objects" in record for record in handed)  # clicked object 5 travels
        time.sleep(0.3)
        assert actor.report()["streams"] == {}
    finally:
        allowed.close(linger=0)
        stranger.close(linger=0)
        actor.stop()
        stop.set()
        capture.join(5)
