"""Object ids handed out from two threads (the prompt path and the detector) never collide."""

from __future__ import annotations

import threading

import pytest

from models import MAX_OBJ_ID, ObjectIds


def test_take_claim_and_release() -> None:
    ids = ObjectIds()
    assert ids.take(2) == [0, 1]
    ids.claim(5)  # a caller-chosen id ahead of the counter: skipped, and the counter does not jump
    assert ids.take(4) == [2, 3, 4, 6]
    ids.claim(3)  # below the counter: never handed out again anyway
    ids.claim(MAX_OBJ_ID)  # the largest id does not exhaust the stream
    assert ids.take(1) == [7]
    for bad in (-1, MAX_OBJ_ID + 1, 2**63 - 1, True, "3"):
        with pytest.raises(ValueError, match="^obj_id: must be an integer between 0 and 2147483647"):
            ids.claim(bad)  # type: ignore[arg-type]
    ids.release(20)  # harmless for an id never claimed


def test_detector_block_gives_back_unused_ids_and_skips_claims() -> None:
    ids = ObjectIds()
    ids.claim(3)
    with ids.holding(8) as block:
        assert block.start == 4, "the detector numbers consecutively, so its block starts past the claim"
        with pytest.raises(ValueError, match="^obj_id: 6 is being given to newly detected objects"):
            ids.claim(6)
        block.next_free = 6  # it found two objects: 4 and 5
    assert ids.next_id == 6 and ids.take(1) == [6]

    with ids.holding(8) as block:
        assert block.start == 7
        taken = ids.take(2)  # a prompt answered while the frame is tracked
        block.next_free = 9
    assert taken == [15, 16] and ids.next_id == 17, "the rest of a block is skipped once ids were taken after it"


def test_ids_run_out_with_a_clear_error() -> None:
    ids = ObjectIds(first=MAX_OBJ_ID)
    assert ids.take(1) == [MAX_OBJ_ID]
    with pytest.raises(ValueError, match="^obj_id: every object id up to 2147483647"):
        ids.take(1)


def test_two_threads_never_get_the_same_id() -> None:
    ids = ObjectIds()
    got: list[list[int]] = [[], []]

    def prompts() -> None:
        for _ in range(2000):
            got[0].extend(ids.take(1))

    def detector() -> None:
        for _ in range(500):
            with ids.holding(8) as block:
                block.next_free = block.start + 3
                got[1].extend(range(block.start, block.start + 3))

    threads = [threading.Thread(target=prompts), threading.Thread(target=detector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = got[0] + got[1]
    assert len(all_ids) == len(set(all_ids)) == 2000 + 1500
