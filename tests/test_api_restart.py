"""Jobs survive the server: killed in the middle of a queue, a new server on the same data directory runs
the job that was running again and the queued ones after it; nothing is lost or left ``running``."""

from __future__ import annotations

import base64
import signal
import sqlite3
import subprocess
import time

import requests
from helpers import ApiServer, wait_for_generation

from streamer.api.store import QUEUED, RUNNING, SUCCEEDED, Job, JobStore, new_job_id

ENDED = {"succeeded", "failed", "cancelled"}


def test_killed_server_runs_the_interrupted_and_queued_jobs_after_a_restart(tmp_path, api_media, tiny_folder):
    folder, media = api_media
    data_dir = tmp_path / "data"
    model = str(tiny_folder)  # loads faster than building tiny-random in each server
    server = ApiServer(data_dir, "--allow-private-urls", model=model).start()
    try:
        first_job = {"model": "sam-3-video", "input_video": f"{media}/clip.mp4", "prompt": "shape"}
        running = requests.post(f"{server.url}/api/ai/queue", json=first_job, timeout=60).json()
        running_id = running["generations"][0]["generation_id"]
        queued_ids = [
            requests.post(f"{server.url}/api/ai/queue", json=body, timeout=60).json()["generations"][0]["generation_id"]
            for body in (
                {"model": "sam-3-video", "input_video": f"{media}/clip.mp4", "prompt": "shape"},
                {
                    "model": "sam-3-image",
                    "prompt": "shape",
                    "input_image": base64.b64encode((folder / "still.png").read_bytes()).decode(),
                },
            )
        ]
        wait_for_generation(server.url, running_id, {"running"})
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash: no chance to tidy up
    finally:
        server.stop()

    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:  # what the dead server left behind
        left = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert left[running_id] == RUNNING and {left[i] for i in queued_ids} == {QUEUED}

    with ApiServer(data_dir, "--allow-private-urls", model=model) as again:
        assert any("1 queued again" in line for line in again.output)
        second = subprocess.run(again.argv, capture_output=True, text=True, timeout=120)  # same data directory
        assert second.returncode == 2 and "another sam3-stream api server" in second.stderr
        views = [wait_for_generation(again.url, i, ENDED, timeout=180) for i in (running_id, *queued_ids)]
        assert [v["status"] for v in views] == [SUCCEEDED] * 3, views
        for view in views:
            assert requests.get(view["result_url"], timeout=10).status_code == 200
        listed = requests.get(f"{again.url}/api/ai/queue", timeout=10).json()
        assert listed == {"count": 0, "generations": []}  # nothing left queued or running


def test_a_job_that_keeps_dying_fails_with_a_reason_instead_of_running_forever(tmp_path):
    store = JobStore(tmp_path)
    job = Job(id=new_job_id(), model="sam-3-video", media_type="video", spec={"input": "input.mp4"})
    store.add([job], max_queue=4)
    for attempt in (1, 2):
        assert store.claim_next().id == job.id  # the server starts it ... and dies
        requeued, failed = store.recover(max_attempts=2)
        assert (requeued, failed) == (([job.id], []) if attempt == 1 else ([], [job.id]))
    ended = store.get(job.id)
    assert ended.status == "failed" and "stopped while running this job, 2 times" in ended.error
    assert store.claim_next() is None


def test_orderly_stop_puts_the_running_job_back_and_cancel_beats_a_late_finish(tmp_path):
    store = JobStore(tmp_path)
    first, second = (Job(id=new_job_id(), model="sam-3-image", media_type="image", spec={}) for _ in range(2))
    store.add([first, second], max_queue=2)
    assert store.count_active() == 2
    claimed = store.claim_next()
    assert claimed.id == first.id and claimed.attempts == 1
    assert store.requeue(first.id) and store.get(first.id).status == QUEUED and store.get(first.id).attempts == 0
    assert store.claim_next().id == first.id  # still first in line
    assert store.cancel(first.id) == RUNNING
    assert not store.succeed(first.id, "result.png", None)  # the worker finishing late does not undo the cancel
    assert store.get(first.id).status == "cancelled"
    assert store.cancel(first.id) == "cancelled"  # no change once ended


def test_results_older_than_the_keep_time_are_deleted_with_their_files(tmp_path):
    store = JobStore(tmp_path)
    job = Job(id=new_job_id(), model="sam-3-image", media_type="image", spec={})
    store.add([job], max_queue=1)
    store.job_dir(job.id).mkdir()
    (store.job_dir(job.id) / "result.png").write_bytes(b"png")
    store.claim_next()
    store.succeed(job.id, "result.png", None)
    assert store.delete_ended_before(time.time() - 3600) == []  # ended just now: kept
    assert store.delete_ended_before(time.time() + 1) == [job.id]
    assert store.get(job.id) is None and not store.job_dir(job.id).exists()


def test_malformed_ids_never_reach_the_file_system(tmp_path):
    store = JobStore(tmp_path)
    for bad in ("../../etc", "..", "a/b", new_job_id() + "/..", ""):
        assert store.get(bad) is None
        try:
            store.job_dir(bad)
        except ValueError as exc:
            assert "generation_id" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")
