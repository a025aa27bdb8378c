"""The prompt store keeps each stream's active prompts compacted, and its journal survives a restart."""

from __future__ import annotations

from pathlib import Path

from models import Prompt
from streamer.prompt_queue import QueuedOp
from streamer.prompt_store import MAX_REFINEMENTS, JournalPromptStore, PromptStore
from streamer.protocol import PromptRequest

CLICK = Prompt(points=((10.0, 20.0),), point_labels=(1,))
BOXES = Prompt.from_dict(
    {"bounding_boxes": [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], "bounding_box_labels": [1, 1]}
)


def op(name: str, *, prompt: Prompt | None = None, obj_id: int | None = None, text: str | None = None,
       new_ids: tuple[int, ...] = (), obj_ids: tuple[int, ...] = (), new_text: bool = False) -> QueuedOp:  # fmt: skip
    request = PromptRequest(f"r-{name}-{obj_id}-{new_ids}", "cam0", name, prompt=prompt, obj_id=obj_id, text=text)
    return QueuedOp(request, list(obj_ids or new_ids), list(new_ids), new_text, 0)


def fill(store: PromptStore) -> None:
    store.record("cam0", op("add_prompt", prompt=Prompt(text="cup"), new_text=True))
    store.record("cam0", op("add_prompt", prompt=CLICK, new_ids=(0,)))
    store.record("cam0", op("add_prompt", prompt=BOXES, new_ids=(1, 2)))
    store.record(
        "cam0", op("add_prompt", prompt=Prompt(points=((5.0, 5.0),), point_labels=(0,), obj_id=0), obj_ids=(0,))
    )
    store.record("cam0", op("remove_object", obj_id=1))
    store.record("cam0", op("add_prompt", prompt=Prompt(text="dog"), new_text=True))
    store.record("cam0", op("remove_prompt", text="cup"))
    store.record("cam1", op("add_prompt", prompt=CLICK, new_ids=(0,)))


def test_compaction() -> None:
    store = PromptStore()
    assert store.prompts("cam0") is None
    fill(store)
    prompts = store.prompts("cam0")
    assert prompts is not None
    assert [p.text for p in prompts if p.text] == ["dog"], "the removed concept is gone"
    assert [p.obj_id for p in prompts if p.has_geometry] == [0, 0, 2], "object 1 was removed; 0 was refined"
    assert prompts[-1].bounding_boxes == ((0.2, 0.2, 0.1, 0.1),), "each box keeps its own object"

    store.keep_objects("cam0", {2})  # the tracker retired object 0
    assert [p.obj_id for p in store.prompts("cam0") or [] if p.has_geometry] == [2]
    for _ in range(MAX_REFINEMENTS + 5):
        store.record(
            "cam0", op("add_prompt", prompt=Prompt(points=((1.0, 1.0),), point_labels=(1,), obj_id=2), obj_ids=(2,))
        )
    assert len([p for p in store.prompts("cam0") or [] if p.obj_id == 2]) == 1 + MAX_REFINEMENTS

    store.record("cam0", op("reset_session"))
    assert store.prompts("cam0") == [], "a reset stream is known but has nothing to re-apply"
    failed = op(
        "add_prompt", prompt=Prompt(text="cat", points=((1.0, 1.0),), point_labels=(1,)), new_ids=(7,), new_text=True
    )
    store.record("cam0", failed)
    store.forget_failed("cam0", failed)
    assert store.prompts("cam0") == []
    store.drop_stream("cam1")
    assert store.streams() == ["cam0"]


def test_journal_replays_after_a_restart_and_skips_a_torn_line(tmp_path: Path) -> None:
    store = JournalPromptStore(tmp_path)
    fill(store)
    expected = {name: store.prompts(name) for name in store.streams()}
    store.close()
    with open(tmp_path / "prompts.jsonl", "a") as journal:
        journal.write('{"stream": "cam0", "change": {"add_te')  # killed while writing
    reopened = JournalPromptStore(tmp_path)
    try:
        assert {name: reopened.prompts(name) for name in reopened.streams()} == expected
    finally:
        reopened.close()


def test_journal_stays_small(tmp_path: Path) -> None:
    store = JournalPromptStore(tmp_path)
    try:
        for i in range(3000):  # add and remove, over and over: nothing stays active
            store.record("cam0", op("add_prompt", prompt=CLICK, new_ids=(i,)))
            store.record("cam0", op("remove_object", obj_id=i))
        store.record("cam0", op("add_prompt", prompt=CLICK, new_ids=(5000,)))
        lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
        assert len(lines) < 1100, len(lines)
    finally:
        store.close()
    reopened = JournalPromptStore(tmp_path)
    try:
        assert [p.obj_id for p in reopened.prompts("cam0") or []] == [5000]
    finally:
        reopened.close()
