"""A click on the operator page lands on the object the operator meant.

``sam3-stream run --model demo`` on the synthetic scene (whose every frame has ground truth), the page
in a real headless Chromium: a click on an object's pixels, on the frame the page shows, reaches the
tracker naming that frame's seq, is placed on that frame, and makes one new object whose boxes should
follow that object, frame after frame, in the metadata the page receives.

The shipped demo weights do not follow yet (their memory path is untrained: J&F 0.10 in the README's
model card), so the following part is an expected failure, with the measured box IoUs, until weights
that track ship; everything before it must pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import BROWSER_MARKS, GEOMETRY, free_port, operator_page, run, running_pipeline, to_page

from models.demo_eval import object_at
from streamer.sources import SyntheticSource

pytestmark = [*BROWSER_MARKS, pytest.mark.timeout(180)]
playwright_api = pytest.importorskip("playwright.async_api")

WIDTH, HEIGHT, FPS = 320, 240, 10
NEWEST = "() => frame && {seq: frame.seq, objects: frame.objects}"
# Keep a copy of what the page sends on its data channel (the test reads the seq a click carried).
RECORD_SENT = """() => {
  window.sent = [];
  const send = channel.send.bind(channel);
  channel.send = (text) => { window.sent.push(JSON.parse(text)); send(text); };
}"""
FOLLOWED_FRAMES = 6  # of 8: box IoU >= 0.5 with the clicked object


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def test_a_click_on_the_page_lands_on_the_object(tmp_path: Path) -> None:
    log_path = tmp_path / "run.log"
    port = free_port()
    source = SyntheticSource(WIDTH, HEIGHT, FPS)
    args = ["run", "--model", "demo", "--device", "cpu", "--source", f"synthetic:{WIDTH}x{HEIGHT}@{FPS}"]
    with running_pipeline([*args, "--http-port", str(port)], log_path) as pipeline:

        async def body() -> None:
            async with (
                playwright_api.async_playwright() as pw,
                operator_page(pw, pipeline.url, tmp_path / "profile") as page,
            ):
                geometry = await page.evaluate(GEOMETRY)
                await page.evaluate(RECORD_SENT)
                # The video can play a moment before the first frame's results reach the page.
                await page.wait_for_function("() => !!frame", timeout=20000)
                shown = await page.evaluate(NEWEST)
                assert shown is not None and not shown["objects"]
                # The biggest object on the frame the page shows, clicked where a person would.
                shot = source.scene_frame(shown["seq"])
                target = max(shot.instances, key=lambda inst: inst.area)
                x, y = target.interior_point()
                assert object_at(shot, x, y).obj_id == target.obj_id
                await page.mouse.click(*to_page(geometry, x, y))
                (sent,) = await page.evaluate("() => window.sent")
                clicked_seq = sent["prompt"]["seq"]
                assert clicked_seq >= shown["seq"], sent  # the frame on screen when the click was made
                clicked_shot = source.scene_frame(clicked_seq)
                assert (hit := object_at(clicked_shot, x, y)) is not None, "the click missed every object"
                # Accepted and placed on the frame it was drawn on (the answer would say if not).
                await page.wait_for_selector("#answers li:has-text('accepted (object #')", timeout=20000)
                assert "older than the tracker keeps" not in (await page.text_content("#answers") or "")

                boxes: dict[int, float] = {}  # seq -> box IoU of the new object with the clicked one
                deadline = time.monotonic() + 40
                while len(boxes) < 8:
                    assert time.monotonic() < deadline, f"the clicked object was not followed: {boxes}"
                    newest = await page.evaluate(NEWEST)
                    if newest and newest["objects"]:
                        (obj,) = newest["objects"]
                        truth = source.scene_frame(newest["seq"]).by_id().get(hit.obj_id)
                        boxes[newest["seq"]] = box_iou(obj["bbox"], truth.bbox()) if truth else 0.0
                    await page.wait_for_timeout(50)
                followed = [iou for iou in boxes.values() if iou >= 0.5]
                if len(followed) < FOLLOWED_FRAMES:
                    pytest.xfail(f"the demo weights do not follow object {hit.obj_id} yet; box IoU per frame: {boxes}")

        run(body(), timeout=120)
