"""Placement by measured frame budget, rebalancing and draining (pure functions), and the pieces of a
tracker in a cluster that need no Ray: assignments, prompts carried between trackers, the map's parser."""

from __future__ import annotations

import json

import pytest

from models import Prompt
from streamer.assignments import StreamAssignments
from streamer.cluster.placement import Move, TrackerLoad, drain, estimate_cost, place, rebalance
from streamer.cluster.route import parse_map
from streamer.prompt_queue import QueuedOp
from streamer.prompt_store import PromptStore
from streamer.protocol import PromptRequest


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


def test_rebalance_evens_out_costs() -> None:
    moves = rebalance(loads(t0={"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}, t1={}))
    after = {"t0": 1.0, "t1": 0.0}
    cost = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    for move in moves:
        after[move.source] -= cost[move.stream]  # type: ignore[index]
        after[move.target] += cost[move.stream]
    assert abs(after["t0"] - after["t1"]) <= 0.2 + 1e-9


def test_drain_moves_every_stream_to_the_most_spare() -> None:
    moves = drain(loads(t0={"a": 0.5, "b": 0.1}, t1={"c": 0.5}, t2={}), "t0")
    assert moves == [Move("a", "t0", "t2"), Move("b", "t0", "t1")]
    assert drain(loads(t0={}, t1={}), "t0") == []


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
