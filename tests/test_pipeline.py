"""The whole pipeline: ``sam3-stream run`` (capture -> tracker -> gateway, three real processes over
ipc://) watched by a real aiortc client that prompts over the data channel, and a capture killed
mid-stream that ``run`` brings back."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest
from helpers import RESULTS_FLOWING, Viewer, children_of, free_port, get_json, launched, run, wait_for

pytestmark = pytest.mark.timeout(180)

WIDTH, HEIGHT, FPS = 160, 120, 15


@dataclass
class Pipeline:
    """A running ``sam3-stream run`` and where its page is."""

    proc: Popen
    url: str
    log_path: Path

    def child(self, command: str) -> int:
        """Pid of the child running ``sam3-stream COMMAND``."""
        pids = [pid for pid, cmd in children_of(self.proc.pid).items() if f"streamer.cli {command} " in cmd]
        assert len(pids) == 1, children_of(self.proc.pid)
        return pids[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    log_path = tmp_path_factory.mktemp("pipeline") / "run.log"
    port = free_port()
    args = [
        "run",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--source",
        f"synthetic:{WIDTH}x{HEIGHT}@{FPS}",
        "--http-port",
        str(port),
    ]
    with launched(args, log_path) as proc:
        url = wait_for(
            lambda: (m := re.search(r"open (http://\S+/)", log_path.read_text())) and m[1], 60, "the page URL", log_path
        )
        wait_for(lambda: (h := get_json(f"{url}health")) and h["state"] in RESULTS_FLOWING, 60, "a live feed", log_path)
        yield Pipeline(proc, url.rstrip("/"), log_path)
        assert proc.poll() is None, "sam3-stream run stopped on its own"


async def watch(viewer: Viewer, until: Callable[[Viewer], object], timeout: float, what: str) -> None:
    """Keep receiving video frames until ``until(viewer)`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not until(viewer):
        assert time.monotonic() < deadline, (
            f"{what}: not seen in {timeout} s (statuses {viewer.statuses}, objects {viewer.objects})"
        )
        await viewer.frame()


def object_ids(viewer: Viewer) -> set[int]:
    return {o["obj_id"] for o in (viewer.objects or {}).get("objects", [])}


def test_viewer_prompts_and_sees_objects(pipeline: Pipeline) -> None:
    async def body() -> None:
        viewer = Viewer()
        try:
            await viewer.connect(pipeline.url)
            image = await viewer.frame()
            assert image.shape == (HEIGHT, WIDTH, 3)
            await watch(viewer, lambda v: v.objects is not None and v.statuses[-1] in RESULTS_FLOWING, 10, "metadata")
            assert viewer.objects["width"] == WIDTH and not viewer.objects["objects"]

            answer = await viewer.request({"op": "add_prompt", "prompt": {"points": [[40, 60]], "point_labels": [1]}})
            assert answer["ok"] and len(answer["obj_ids"]) == 1, answer
            clicked = answer["obj_ids"][0]
            await watch(viewer, lambda v: clicked in object_ids(v), 15, f"object {clicked}")
            (obj,) = [o for o in viewer.objects["objects"] if o["obj_id"] == clicked]
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT and obj["label"] is None

            answer = await viewer.request({"op": "add_prompt", "prompt": {"text": "person"}})
            assert answer["ok"], answer
            await watch(
                viewer,
                lambda v: any(o["label"] == "person" for o in v.objects["objects"]),
                15,
                "objects found by the text prompt",
            )

            # Refused by the gateway (malformed) and by the tracker (well-formed, wrong): both name the field.
            answer = await viewer.request({"op": "add_prompt", "prompt": {"points": [[5, 5]], "point_labels": [7]}})
            assert not answer["ok"] and answer["error"].startswith("point_labels:"), answer
            answer = await viewer.request({"op": "remove_object", "obj_id": 999})
            assert not answer["ok"] and answer["error"].startswith("obj_id:"), answer

            answer = await viewer.request({"op": "remove_prompt", "text": "person"})
            assert answer["ok"], answer
            await watch(
                viewer,
                lambda v: v.objects["objects"] and all(o["label"] is None for o in v.objects["objects"]),
                15,
                "the clicked object without the text prompt's",
            )
            answer = await viewer.request({"op": "remove_prompt", "text": "person"})
            assert not answer["ok"] and answer["error"].startswith("text:"), answer

            answer = await viewer.request({"op": "reset_session"})
            assert answer["ok"], answer
            await watch(viewer, lambda v: not object_ids(v), 15, "no objects after the reset")
        finally:
            await viewer.close()

    run(body(), timeout=120)


def test_a_killed_capture_shows_no_signal_then_comes_back(pipeline: Pipeline) -> None:
    async def body() -> None:
        viewer = Viewer()
        try:
            await viewer.connect(pipeline.url)
            await watch(viewer, lambda v: v.objects is not None and v.statuses[-1] in RESULTS_FLOWING, 10, "live")
            capture = pipeline.child("capture")

            last_seq = viewer.objects["seq"]
            os.kill(capture, signal.SIGKILL)
            seen = len(viewer.statuses)
            await watch(viewer, lambda v: "no_signal" in v.statuses[seen:], 10, "no_signal after the kill")
            seen = len(viewer.statuses)
            await watch(
                viewer, lambda v: set(RESULTS_FLOWING) & set(v.statuses[seen:]), 30, "live again after the restart"
            )
            await watch(viewer, lambda v: v.objects["seq"] < last_seq, 10, "frames of the new capture")
            assert pipeline.child("capture") != capture
            assert pipeline.child("track") and pipeline.child("serve"), "the others kept running"
            assert re.search(r"capture exited with status -9 .* restarting", pipeline.log_path.read_text())
        finally:
            await viewer.close()

    run(body(), timeout=90)
