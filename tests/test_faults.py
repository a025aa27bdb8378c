"""Faults under ``sam3-stream run``: each process killed with SIGKILL while prompts are active, and the
supervisor telling a child that refuses to start (stop) from one that crashed (restart)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    PIPELINE_HEIGHT,
    PIPELINE_WIDTH,
    RESULTS_FLOWING,
    Viewer,
    child_env,
    children_of,
    free_port,
    get_json,
    launched,
    object_ids,
    run,
    run_cli,
    running_pipeline,
    wait_for,
    watch,
)

from streamer.cli import REFUSAL_ENV, USAGE_ERROR, Child, Supervisor

pytestmark = pytest.mark.timeout(300)


def _running(pid: int, command: str) -> int | None:
    """Pid of the child of ``pid`` running ``sam3-stream COMMAND``, or ``None`` while there is none."""
    return next((p for p, cmd in children_of(pid).items() if f"streamer.cli {command} " in cmd), None)


def test_supervisor_restarts_a_crash_whatever_its_exit_status(tmp_path: Path) -> None:
    """Regression: a crash that exited with status 2 was taken for "bad arguments" and stopped `run`."""
    crasher = Child("crasher", [sys.executable, "-c", "import sys; sys.exit(2)"], tmp_path / "refused-crasher")
    supervisor = Supervisor([crasher])
    try:
        supervisor.start(crasher)
        deadline = time.monotonic() + 20
        while crasher.restarts < 2:
            assert supervisor.check() is None, "a crash never stops the supervisor"
            assert time.monotonic() < deadline, "not restarted"
            time.sleep(0.1)
    finally:
        supervisor.stop()


def test_supervisor_stops_when_a_child_refuses_to_start(tmp_path: Path) -> None:
    refuse = (
        "import os, pathlib, sys\n"
        f"pathlib.Path(os.environ[{REFUSAL_ENV!r}]).write_text('--max-objects: must be between 1 and 256')\n"
        "sys.exit(1)\n"  # the status does not matter: the refusal file does
    )
    refuser = Child("refuser", [sys.executable, "-c", refuse], tmp_path / "refused-refuser")
    supervisor = Supervisor([refuser])
    try:
        supervisor.start(refuser)
        deadline = time.monotonic() + 20
        while (status := supervisor.check()) is None:
            assert time.monotonic() < deadline, "the refusal was not noticed"
            time.sleep(0.1)
        assert status == USAGE_ERROR and refuser.restarts == 0
    finally:
        supervisor.stop()


def test_commands_report_why_they_refuse_to_start(tmp_path: Path) -> None:
    refusal = tmp_path / "refused"
    for args, reason in [
        (["track", "--model", "passthrough", "--max-objects", "0"], "--max-objects: must be an integer between 1"),
        (["track", "--model", "/no/such/model"], "cannot load the model: model folder '/no/such/model' does not exist"),
        (["track", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ]:
        refusal.unlink(missing_ok=True)
        out = run_cli(*args, env={**child_env(), REFUSAL_ENV: str(refusal)}, timeout=120)
        assert out.returncode == USAGE_ERROR, out.stderr[-2000:]
        assert reason in refusal.read_text(), (args, refusal.read_text())


def test_run_stops_when_the_tracker_cannot_start(tmp_path: Path) -> None:
    """A model folder that passes run's checks (it holds a config.json) but cannot be loaded."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    log_path = tmp_path / "run.log"
    args = ["run", "--model", str(broken), "--source", "synthetic:160x120@5", "--http-port", str(free_port())]
    with launched(args, log_path) as proc:
        assert proc.wait(90) == USAGE_ERROR
    text = log_path.read_text()
    assert re.search(rf"tracker refused to start: .*cannot load the model: cannot load '{broken}'", text), text
    assert "restarting" not in text


def test_each_process_killed_with_prompts_active(tmp_path: Path) -> None:
    """SIGKILL the capture, then the tracker, then the gateway of a running `sam3-stream run` whose stream
    has a clicked object and a concept: each comes back, and so do the prompts. Regression: a killed
    tracker came back with every clicked object silently gone."""
    log_path = tmp_path / "run.log"
    port = free_port()
    source = f"synthetic:{PIPELINE_WIDTH}x{PIPELINE_HEIGHT}@10"
    args = ["run", "--model", "tiny-random", "--device", "cpu", "--source", source, "--http-port", str(port)]
    with running_pipeline(args, log_path, timeout=90) as pipeline:
        proc = pipeline.proc

        async def prompt_then_kill_capture_and_tracker() -> int:
            viewer = Viewer()
            try:
                await viewer.connect(pipeline.url)
                await watch(viewer, lambda v: v.objects is not None, 20, "metadata")
                click = {"op": "add_prompt", "prompt": {"points": [[40, 60]], "point_labels": [1]}}
                answer = await viewer.request(click)
                assert answer["ok"], answer
                clicked = answer["obj_ids"][0]
                assert (await viewer.request({"op": "add_prompt", "prompt": {"text": "person"}}))["ok"]
                await watch(viewer, lambda v: clicked in object_ids(v), 30, f"object {clicked}")

                os.kill(pipeline.child("capture"), signal.SIGKILL)
                seen = len(viewer.statuses)
                await watch(viewer, lambda v: "no_signal" in v.statuses[seen:], 15, "no_signal")
                await watch(viewer, lambda v: v.statuses[-1] in RESULTS_FLOWING, 30, "live again")
                await watch(viewer, lambda v: clicked in object_ids(v), 30, "the clicked object, same tracker")

                tracker = pipeline.child("track")
                os.kill(tracker, signal.SIGKILL)
                seen = len(viewer.statuses)
                await watch(viewer, lambda v: "tracker_offline" in v.statuses[seen:], 15, "tracker_offline")
                event = await viewer.wait_event("objects_reacquired", timeout=90)
                assert event["obj_ids"] == [clicked] and event["texts"] == ["person"], event
                await viewer.wait_event("tracker_restarted")
                viewer.objects = None
                await watch(viewer, lambda v: clicked in object_ids(v), 30, "the clicked object after the restart")
                assert pipeline.child("track") != tracker
                return clicked
            finally:
                await viewer.close()

        clicked = run(prompt_then_kill_capture_and_tracker(), timeout=240)

        gateway = pipeline.child("serve")
        os.kill(gateway, signal.SIGKILL)
        wait_for(lambda: _running(proc.pid, "serve") not in (None, gateway), 60, "a new gateway", log_path)
        wait_for(lambda: get_json(f"{pipeline.url}/health"), 60, "the new gateway's page", log_path)

        async def after_the_gateway() -> None:
            viewer = Viewer()
            try:
                await viewer.connect(pipeline.url)
                await watch(viewer, lambda v: clicked in object_ids(v), 30, "the clicked object via a new gateway")
                assert any(o["label"] == "person" for o in viewer.objects["objects"])
            finally:
                await viewer.close()

        run(after_the_gateway(), timeout=90)
        text = log_path.read_text()
        for name in ("capture", "tracker", "gateway"):
            assert re.search(rf"{name} exited with status -9 .* restarting", text), name
        assert proc.poll() is None, "sam3-stream run stopped on its own"
