"""The tracker service in a real process (``sam3-stream track``), fed and read over real sockets here.

The test plays the camera (a PUB the tracker connects to), the robot (a SUB on the results) and the
operator (a lazy-pirate client on the control socket). One tiny-model tracker serves the module.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import TRACKER_HEIGHT, TRACKER_WIDTH, Tracker, box_of, running_tracker, wait_for

from models import Prompt
from streamer.config import Endpoints
from streamer.protocol import (
    SourceStatus,
    decode_result,
    decode_status,
    encode_source,
    peek_kind,
)
from streamer.tracker_service import TrackerService
from streamer.tracking import PassThroughTracker, make_tracker
from streamer.tracking import Tracker as TrackerInterface
from streamer.transport import drain, results_subscriber

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """A tiny-model tracker that gives every new stream the text prompt "person"."""
    log_path = tmp_path_factory.mktemp("tracker") / "tracker.log"
    with running_tracker(
        "--model", "tiny-random", "--device", "cpu", "--prompt", "person", log_path=log_path
    ) as tracker:
        yield tracker


def test_heartbeats_arrive_without_frames(tiny: Tracker) -> None:
    results, statuses = tiny.receive(1.6)
    assert not results
    assert len(statuses) >= 2, "a heartbeat every 0.5 s"
    assert statuses[0].tracker.startswith("tiny-random@")
    gaps = np.diff([s.t for s in statuses])
    assert np.all((gaps > 0.3) & (gaps < 0.8)), gaps


def test_prompts_are_answered_and_results_carry_their_frame_and_masks(tiny: Tracker) -> None:
    answer = tiny.request("nocam", "reset_session")
    assert not answer.ok and answer.error.startswith("stream: unknown stream 'nocam'"), answer

    tiny.until_result("cam0", 0)
    click = Prompt.from_dict({"points": [[40, 60]], "point_labels": [1]})
    answer = tiny.request("cam0", "add_prompt", prompt=click)
    assert answer.ok and len(answer.obj_ids) == 1, answer
    clicked = answer.obj_ids[0]
    # Refused by the tracker itself (well-formed on the wire), each naming the field.
    outside = Prompt.from_dict({"points": [[900, 10]], "point_labels": [1]})
    for op, fields, name in [
        ("add_prompt", {"prompt": outside}, "points:"),
        ("remove_object", {"obj_id": 999}, "obj_id:"),
        ("remove_prompt", {"text": "cat"}, "text:"),
    ]:
        answer = tiny.request("cam0", op, **fields)
        assert not answer.ok and answer.error.startswith(name), answer

    results = tiny.stream_results({"cam0": 1}, frames=6)["cam0"]
    assert results, tiny.log_path.read_text()[-3000:]
    message, frame = results[-1]
    assert frame is not None and np.array_equal(frame, tiny.sent[("cam0", message.seq)]), "result on its own frame"
    assert set(message.timestamps) == {"received", "tracked", "published"}
    t = message.timestamps
    assert message.t_capture <= t["received"] <= t["tracked"] <= t["published"]
    assert {"encode", "track"} <= set(message.timings)
    ids = [o.obj_id for o in message.objects]
    assert clicked in ids and any(o.label == "person" for o in message.objects), ids
    for obj in message.objects:
        assert obj.mask is not None and obj.mask.dtype == bool and obj.mask.shape == (TRACKER_HEIGHT, TRACKER_WIDTH)
        assert obj.bbox == box_of(obj.mask)

    answer = tiny.request("cam0", "remove_object", obj_id=clicked)
    assert answer.ok and answer.obj_ids == [clicked]
    results = tiny.stream_results({"cam0": 100}, frames=3)["cam0"]
    assert results and all(clicked not in [o.obj_id for o in m.objects] for m, _ in results)
    assert tiny.request("cam0", "reset_session").ok
    results = tiny.stream_results({"cam0": 200}, frames=3)["cam0"]
    assert results and not results[-1][0].objects, "reset drops the initial text prompt too"


def test_a_click_carrying_its_frames_seq_goes_on_that_frame(tiny: Tracker) -> None:
    """Clicks name the frame they were drawn on by ``seq``; the answer says where they went: that frame while
    the tracker's prompt ring (1 s by capture time) holds it, else the oldest frame it holds."""
    base = time.time() - 100.0  # capture times: seq / 30 s after base, as a 30 fps camera stamps them

    def track(seq: int) -> None:
        for _ in range(100):
            tiny.send("late", seq, t_capture=base + seq / 30)
            if any(m.stream == "late" and m.seq == seq for m, _ in tiny.receive(0.3)[0]):
                return
        pytest.fail(f"frame {seq} was not tracked\n{tiny.log_path.read_text()[-3000:]}")

    for seq in (0, *range(40, 52)):  # frame 0 is 1.7 s older than frame 51: out of the ring
        track(seq)
    click = {"points": [[40, 60]], "point_labels": [1]}
    answer = tiny.request("late", "add_prompt", prompt=Prompt.from_dict({**click, "seq": 46}))
    assert answer.ok and (answer.placed_on, answer.requested) == (46, 46), answer
    answer = tiny.request("late", "add_prompt", prompt=Prompt.from_dict({**click, "seq": 0}))
    assert answer.ok and (answer.placed_on, answer.requested) == (40, 0), answer
    answer = tiny.request("late", "add_prompt", prompt=Prompt.from_dict({"text": "cup", "seq": 46}))
    assert answer.ok and (answer.placed_on, answer.requested) == (None, 46), "text goes on the next frame"
    events_before = len(tiny.events)
    for seq in range(52, 55):  # the prompts are applied before frame 52: the two objects catch up
        track(seq)
    failed = [e for e in tiny.events[events_before:] if e.stream == "late" and e.event == "prompt_failed"]
    assert not failed, failed
    status = tiny.status("late")
    assert status["prompts_queued"] == 0 and status["prompts_failed"] == 0, status


def test_each_stream_has_its_own_tracker(tiny: Tracker) -> None:
    tiny.until_result("left", 0)
    tiny.until_result("right", 0)
    answer = tiny.request("right", "add_prompt", prompt=Prompt.from_dict({"points": [[30, 50]], "point_labels": [1]}))
    assert answer.ok, answer
    clicked = answer.obj_ids[0]
    answer = tiny.request("left", "remove_prompt", text="person")
    assert answer.ok, answer

    out = tiny.stream_results({"left": 1, "right": 1}, frames=6)
    left, right = out["left"][-1][0], out["right"][-1][0]
    assert not left.objects, "left dropped its text prompt and was never clicked"
    labels = {o.obj_id: o.label for o in right.objects}
    assert labels.get(clicked, "missing") is None and "person" in labels.values(), labels
    for name in ("left", "right"):  # each counts its own frames: no gaps from the other stream's
        indices = [m.frame_index for m, _ in out[name]]
        assert np.all(np.diff(indices) == 1), (name, indices)


def test_a_frame_the_tracker_cannot_take_is_skipped(tiny: Tracker) -> None:
    tiny.until_result("odd", 0)
    tiny.send("odd", 1, np.zeros((1, 9000, 3), np.uint8))  # fine on the wire, too wide for the model
    results, _ = tiny.receive(1.0)
    assert not [m for m, _ in results if m.stream == "odd" and m.seq == 1]
    tiny.until_result("odd", 2)
    assert "frame 1 failed" in tiny.log_path.read_text()


def test_a_slow_tracker_always_takes_the_newest_frame(tmp_path: Path) -> None:
    """Camera at 60 fps, tracker at 50 ms per frame: frames must be skipped, never queued."""
    fps, delay_s, seconds = 60.0, 0.05, 3.0
    with running_tracker(
        "--model", "passthrough", "--passthrough-delay-ms", str(delay_s * 1000), log_path=tmp_path / "tracker.log"
    ) as tracker:
        stop = threading.Event()
        sent = [0]

        def camera() -> None:  # a paced camera on its own thread, like the capture process
            start = time.monotonic()
            while not stop.is_set():
                tracker.send("fast", sent[0], np.full((240, 320, 3), sent[0] % 256, np.uint8))
                sent[0] += 1
                time.sleep(max(0.0, start + sent[0] / fps - time.monotonic()))

        thread = threading.Thread(target=camera, daemon=True)
        thread.start()
        try:
            results, _ = tracker.receive(seconds)
        finally:
            stop.set()
            thread.join(5)
    results = [m for m, _ in results][5:]  # past the start-up
    assert len(results) >= 20, len(results)
    age = np.array([m.timestamps["received"] - m.t_capture for m in results])
    interval = 1.0 / fps
    print(
        f"\nframe age at the tracker: median {np.median(age) * 1000:.1f} ms, p95 "
        f"{np.percentile(age, 95) * 1000:.1f} ms; {len(results)} results for {sent[0]} frames"
    )
    assert np.median(age) < 3 * interval and np.percentile(age, 95) < 3 * interval
    assert len(results) < 0.6 * sent[0], "a 50 ms tracker cannot have taken most of 60 fps"
    seqs = [m.seq for m in results]
    assert seqs == sorted(seqs) and min(np.diff(seqs)) >= 1


def test_a_robot_subscribed_to_one_stream_gets_its_masks_and_never_pixels(tmp_path: Path) -> None:
    """The tracker publishes each result with its frame (the test's gateway socket) and without it: a
    robot's subscriber asking for one stream without frames gets that, and nothing else."""
    with running_tracker(
        "--model", "passthrough", "--passthrough-objects", "3", log_path=tmp_path / "t.log"
    ) as tracker:
        robot = results_subscriber(tracker.endpoints.results, streams=["cam0"], context=tracker.pub.context)
        try:
            wait_for(lambda: drain(robot, 100), 10, "a heartbeat at the robot", tracker.log_path)
            robot_parts: list = []
            for seq in range(40):
                for stream in ("cam0", "cam1"):
                    tracker.send(stream, seq)
                time.sleep(0.02)
                robot_parts += drain(robot, 0)
            gateway = [m for m, frame in tracker.receive(0.5)[0] if frame is not None]
            robot_parts += drain(robot, 300)
        finally:
            robot.close()
    assert {m.stream for m in gateway} == {"cam0", "cam1"}, "the gateway's socket takes every stream with frames"
    assert all(len(parts) == 2 for parts in robot_parts), "a topic and a header: never a frame"
    robot_results = [decode_result(parts) for parts in robot_parts if peek_kind(parts) == "result"]
    assert len(robot_results) >= 10
    assert all(message.stream == "cam0" and frame is None for message, frame in robot_results)
    first, _ = robot_results[-1]
    assert len(first.objects) == 3 and all(o.mask is not None and o.mask.any() for o in first.objects)
    assert all(m.timestamps["tracked"] <= m.timestamps["published"] for m, _ in robot_results)


# ------------------------------------------------------------------------------------------------
# The tracker interface itself (no processes)


def test_streaming_tracker_implements_the_tracker_interface() -> None:
    from models import StreamingTracker  # the class only: no model is loaded

    for name in ("add_prompt", "remove_object", "remove_prompt", "reset", "track", "state_bytes"):
        wanted = inspect.signature(getattr(TrackerInterface, name)).parameters
        actual = inspect.signature(getattr(StreamingTracker, name)).parameters
        assert list(wanted) == list(actual)[: len(wanted)], (name, list(actual))
        assert all(actual[p].kind == wanted[p].kind for p in wanted), name


def test_passthrough_tracker_validates_prompts_and_reports_its_synthetic_object() -> None:
    tracker = make_tracker("passthrough")
    assert isinstance(tracker, TrackerInterface)
    assert tracker.track(np.zeros((TRACKER_HEIGHT, TRACKER_WIDTH, 3), np.uint8), timestamp=1.5).objects == []
    with pytest.raises(ValueError, match="^point_labels:"):
        tracker.add_prompt({"points": [[1, 2]], "point_labels": [3]})
    with pytest.raises(ValueError, match="^points:"):
        tracker.add_prompt({"points": [[500, 2]], "point_labels": [1]}, frame_size=(TRACKER_WIDTH, TRACKER_HEIGHT))
    assert tracker.add_prompt(
        {"bounding_boxes": [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]], "bounding_box_labels": [1, 1]}
    ) == [0, 1]
    assert tracker.add_prompt({"text": "cat"}) == []
    tracker.remove_object(1)
    with pytest.raises(ValueError, match="^obj_id:"):
        tracker.remove_object(1)
    assert tracker.remove_prompt("cat") == []
    with pytest.raises(ValueError, match="^text:"):
        tracker.remove_prompt("cat")

    synthetic = PassThroughTracker(synthetic_object=True)
    result = synthetic.track(np.zeros((TRACKER_HEIGHT, TRACKER_WIDTH, 3), np.uint8), timestamp=2.0)
    (obj,) = result.objects
    assert result.timestamp == 2.0 and result.frame_index == 0 and obj.obj_id == 0
    assert obj.mask.shape == (TRACKER_HEIGHT, TRACKER_WIDTH)
    assert obj.mask.sum() == (TRACKER_WIDTH // 2) * (TRACKER_HEIGHT // 2)
    assert synthetic.add_prompt({"points": [[3, 4]], "point_labels": [1]}) == [1], "id 0 is the synthetic object's"

    moving = PassThroughTracker(synthetic_object=True, moving_objects=4)
    frames = [moving.track(np.zeros((TRACKER_HEIGHT, TRACKER_WIDTH, 3), np.uint8)).objects for _ in range(2)]
    assert [o.obj_id for o in frames[0]] == [0, 1, 2, 3, 4]
    assert not np.array_equal(frames[0][1].mask, frames[1][1].mask), "the made-up objects move"
    for obj in frames[1][1:]:
        assert obj.bbox == box_of(obj.mask), "tight boxes, as a model reports"
    assert moving.add_prompt({"points": [[3, 4]], "point_labels": [1]}) == [5], "prompts' ids follow the made-up ones"
    with pytest.raises(ValueError, match="^moving_objects: must be between 0 and 256"):
        PassThroughTracker(moving_objects=-1)


def test_a_slow_tracker_never_reads_as_no_signal_and_says_the_cameras_rate_and_its_sources_error(
    tmp_path: Path,
) -> None:
    """Regression: with 1.5 s per frame the heartbeats said no frame for over a second while the camera
    delivered 20 fps (the page showed "no signal"). Time spent tracking is not silence; a camera that
    stops is, and a capture's word on its failing source reaches the heartbeat."""
    fps = 20.0
    with running_tracker(
        "--model", "passthrough", "--passthrough-delay-ms", "1500", log_path=tmp_path / "tracker.log"
    ) as tracker:
        stop = threading.Event()

        def camera() -> None:
            seq, start = 0, time.monotonic()
            while not stop.is_set():
                tracker.send(
                    "slow", seq, np.zeros((TRACKER_HEIGHT, TRACKER_WIDTH, 3), np.uint8), t_capture=start + seq / fps
                )
                seq += 1
                time.sleep(max(0.0, start + seq / fps - time.monotonic()))

        thread = threading.Thread(target=camera, daemon=True)
        thread.start()
        try:
            tracker.receive(1.0)  # the first frame: the stream is made
            _, statuses = tracker.receive(4.5)  # three tracker steps of 1.5 s
        finally:
            stop.set()
            thread.join(5)
        infos = [s.streams["slow"] for s in statuses if "slow" in s.streams]
        assert len(infos) >= 6 and all(s.state == "serving" for s in statuses)
        silences = [info["frames_silent_s"] for info in infos]
        assert max(silences) < 0.5, silences  # frames kept arriving: never silent, however slow the model
        assert all(15 <= info["source_fps"] <= 25 for info in infos[1:]), [i["source_fps"] for i in infos]
        assert infos[-1]["fps"] < 1.5

        # The camera stopped: once the step in progress ends, the tracker listens and hears nothing.
        deadline = time.monotonic() + 5
        while tracker.status("slow")["frames_silent_s"] <= 1.0:
            assert time.monotonic() < deadline, "silence not reported"

        # The capture says why its source delivers nothing; the heartbeat carries its words.
        failing = SourceStatus("slow", time.time(), "camera 7", "camera 7 not present", None)
        deadline = time.monotonic() + 5
        while (info := tracker.status("slow")).get("source_error") is None:
            tracker.pub.send_multipart(encode_source(failing))
            assert time.monotonic() < deadline, "the source's error did not reach the heartbeat"
        assert info["source_error"] == "camera 7 not present" and info["source"] == "camera 7"
        tracker.send("slow", 10_000)  # frames again: the source recovered
        deadline = time.monotonic() + 5
        while tracker.status("slow").get("source_error") is not None:
            assert time.monotonic() < deadline, "the error outlived the source's recovery"


def test_heartbeats_say_loading_while_the_model_loads() -> None:
    """Before the model is loaded the tracker heartbeats "loading" with the model's name, so a viewer sees
    a loading tracker rather than an offline one."""
    folder = tempfile.mkdtemp(prefix="trk-")  # ipc:// paths must stay short
    endpoints = Endpoints.ipc_in(folder)
    with TrackerService(endpoints.results, endpoints.control, name="t") as service:
        sub = results_subscriber(endpoints.results, frames=True)
        try:
            service.start_loading("facebook/sam3")
            assert sub.poll(3000), "no heartbeat while loading"
            status = decode_status(sub.recv_multipart())
            assert (status.state, status.model) == ("loading", "facebook/sam3")
        finally:
            sub.close(linger=0)
    shutil.rmtree(folder, ignore_errors=True)
