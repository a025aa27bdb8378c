"""The whole pipeline: ``sam3-stream run`` (capture -> tracker -> gateway, three real processes over
ipc://) watched by a real aiortc client that prompts over the data channel, and a capture killed
mid-stream that ``run`` brings back."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import pytest
from helpers import (
    PIPELINE_HEIGHT,
    PIPELINE_WIDTH,
    RESULTS_FLOWING,
    Pipeline,
    Viewer,
    free_port,
    object_ids,
    run,
    running_pipeline,
    watch,
)

pytestmark = pytest.mark.timeout(180)

FPS = 15


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    log_path = tmp_path_factory.mktemp("pipeline") / "run.log"
    args = [
        "run",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--source",
        f"synthetic:{PIPELINE_WIDTH}x{PIPELINE_HEIGHT}@{FPS}",
    ]
    with running_pipeline([*args, "--http-port", str(free_port())], log_path) as pipeline:
        yield pipeline
        assert pipeline.proc.poll() is None, "sam3-stream run stopped on its own"


def test_viewer_prompts_and_sees_objects(pipeline: Pipeline) -> None:
    async def body() -> None:
        viewer = Viewer()
        try:
            await viewer.connect(pipeline.url)
            image = await viewer.frame()
            assert image.shape == (PIPELINE_HEIGHT, PIPELINE_WIDTH, 3)
            await watch(viewer, lambda v: v.objects is not None and v.statuses[-1] in RESULTS_FLOWING, 10, "metadata")
            assert viewer.objects["width"] == PIPELINE_WIDTH and not viewer.objects["objects"]

            answer = await viewer.request({"op": "add_prompt", "prompt": {"points": [[40, 60]], "point_labels": [1]}})
            assert answer["ok"] and len(answer["obj_ids"]) == 1, answer
            clicked = answer["obj_ids"][0]
            await watch(viewer, lambda v: clicked in object_ids(v), 15, f"object {clicked}")
            (obj,) = [o for o in viewer.objects["objects"] if o["obj_id"] == clicked]
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= PIPELINE_WIDTH and 0 <= y0 < y1 <= PIPELINE_HEIGHT and obj["label"] is None

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
