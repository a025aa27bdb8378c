"""The operator page tells the truth, in a real headless Chromium against the gateway.

A tracker taking 2 s per frame: the page's lists follow its results, not its answers (a remove shows as
pending until a result no longer has the object; a refused one says why). Each feed state shows on the
page with its cause, and ``/health`` says the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    BROWSER_MARKS,
    FakeTracker,
    chromium_page,
    fetch_json,
    first_object_tinted,
    gateway,
    geometry_of,
    page_of,
    run,
    to_page,
    wait_playing,
    wait_until,
)

pytestmark = BROWSER_MARKS
playwright_api = pytest.importorskip("playwright.async_api")

SLOW_FPS = 0.5  # a result every 2 s
RESULT_WAIT_MS = 10_000  # a few of its results, on a loaded machine


def test_lists_follow_the_results_of_a_tracker_taking_two_seconds_per_frame(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeTracker(fps=SLOW_FPS) as tracker, page_of(tracker, tmp_path / "profile") as (page, _):
            # Frames keep reaching the tracker while the test holds its results back (a slow model, not no signal).
            tracker.receiving = True
            await page.wait_for_selector('#objects li[data-obj-id="1"]:not(.pending)', timeout=RESULT_WAIT_MS)
            await page.wait_for_selector('#concepts .chip.found[data-text="thing"]', timeout=RESULT_WAIT_MS)

            # A click is answered at once but applied on a later frame: pending until a result shows it.
            tracker.publishing = False  # hold the next result, so the pending state can be seen for sure
            await page.mouse.click(*to_page(await geometry_of(page), 250, 60))
            await page.wait_for_selector('#objects li[data-obj-id="2"].pending.adding', timeout=RESULT_WAIT_MS)
            tracker.publishing = True
            await page.wait_for_selector('#objects li[data-obj-id="2"]:not(.pending)', timeout=RESULT_WAIT_MS)

            # A remove: the object stays listed, marked, until a result no longer has it.
            tracker.publishing = False
            await page.click('#objects li[data-obj-id="2"] button')
            await page.wait_for_selector('#objects li[data-obj-id="2"].pending.removing', timeout=RESULT_WAIT_MS)
            await page.wait_for_function(
                "() => document.getElementById('answers').textContent.includes('Remove object #2: accepted')",
                timeout=RESULT_WAIT_MS,
            )
            await page.wait_for_timeout(500)
            assert await page.is_visible('#objects li[data-obj-id="2"]'), "removed before the results said so"
            tracker.publishing = True
            await page.wait_for_selector('#objects li[data-obj-id="2"]', state="detached", timeout=RESULT_WAIT_MS)

            # A concept's removal: its chip and its object are marked until the results drop them.
            tracker.publishing = False
            await page.click('#concepts .chip[data-text="thing"] button')
            await page.wait_for_selector('#concepts .chip.removing[data-text="thing"]', timeout=RESULT_WAIT_MS)
            await page.wait_for_selector('#objects li[data-obj-id="1"].removing', timeout=RESULT_WAIT_MS)
            tracker.publishing = True
            await page.wait_for_selector("#concepts .chip", state="detached", timeout=RESULT_WAIT_MS)
            await page.wait_for_selector('#objects li[data-obj-id="1"]', state="detached", timeout=RESULT_WAIT_MS)

            # A refused prompt ends pending with the tracker's reason, in words.
            await page.evaluate("send({op: 'remove_object', obj_id: 99}, 'Remove object #99')")
            await page.wait_for_selector(
                "#answers li.error:has-text('Remove object #99: refused — obj_id: unknown object 99')",
                timeout=RESULT_WAIT_MS,
            )

            # A reset: pending (every object marked) until a result is empty.
            await page.mouse.click(*to_page(await geometry_of(page), 60, 60))
            await page.wait_for_selector("#objects li:not(.pending)", timeout=RESULT_WAIT_MS)
            tracker.publishing = False
            await page.click("#reset")
            await page.wait_for_selector("#objects li.removing", timeout=RESULT_WAIT_MS)
            tracker.publishing = True
            await page.wait_for_selector("#objects li", state="detached", timeout=RESULT_WAIT_MS)

    run(body(), timeout=90)


def test_each_status_with_its_cause_on_the_page_and_in_health(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            FakeTracker() as tracker,
            gateway(tracker) as url,
            playwright_api.async_playwright() as pw,
            chromium_page(pw, tmp_path / "profile") as page,
        ):

            async def shows(state: str, detail: str) -> None:
                await page.wait_for_selector(f"#state.{state}", timeout=6000)
                await page.wait_for_selector(f"#detail:has-text('{detail}')", timeout=2000)
                status, health = await fetch_json(f"{url}/health")
                assert status == 200 and health["state"] == state and detail in health["detail"], health

            tracker.state = "loading"
            await page.goto(url)
            await shows("loading", "the tracker is loading fake-model")
            assert await page.text_content("#state") == "loading model"
            tracker.state = "serving"
            await wait_playing(page)
            # Stream, source and model, named.
            assert await page.text_content("#stream") == tracker.stream
            assert await page.text_content("#source") == tracker.source
            assert await page.text_content("#model") == "fake-model"

            # Slower than the camera: both rates shown, never 0 while results come.
            tracker.camera_fps = 100.0
            await shows("slow", "the tracker is slower than the camera")
            await page.wait_for_function("() => document.getElementById('camera-fps').textContent === '100'")
            tracker_fps = float(await page.text_content("#fps") or "0")
            assert 10 <= tracker_fps <= 40, tracker_fps
            tracker.camera_fps = 30.0
            await shows("live", "keep up")

            # The capture says why its source fails; no frames reach the tracker.
            tracker.source_error = "source failed: camera 7 not present"
            tracker.receiving = tracker.publishing = False
            await shows("source_failing", "camera 7 not present")
            tracker.source_error = None
            await shows("no_signal", f"gets no frames of {tracker.stream}")
            tracker.receiving, tracker.publishing = None, True
            await shows("live", "keep up")

            tracker.heartbeats = tracker.publishing = False
            await shows("tracker_offline", "no heartbeat from the tracker")

    run(body(), timeout=90)


# How many different frames the page shows in ``ms`` milliseconds (the seq of each, sampled every 10 ms).
FRAMES_SHOWN = """async (ms) => {
  const sleep = (t) => new Promise((resolve) => setTimeout(resolve, t));
  const seen = new Set();
  for (const end = Date.now() + ms; Date.now() < end; await sleep(10)) if (frame) seen.add(frame.seq);
  return seen.size;
}"""


def test_exact_or_smooth_video_with_a_tracker_slower_than_the_camera(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            FakeTracker(fps=SLOW_FPS, camera_fps=10.0, camera=True) as tracker,
            page_of(tracker, tmp_path / "profile", frames_endpoint=tracker.frames_endpoint) as (page, _),
        ):
            # Exact by default: the results' own frames, at the tracker's rate; nothing held.
            assert await page.input_value("#view") == "exact"
            await page.wait_for_selector("#state.slow", timeout=RESULT_WAIT_MS)
            assert await page.evaluate(FRAMES_SHOWN, 2500) <= 3  # a result every 2 s
            assert await page.is_hidden("#held")

            # Smooth: every camera frame, the newest masks drawn on it and marked as held.
            await page.select_option("#view", "smooth")
            await page.wait_for_selector("#held:has-text('masks held from')", timeout=RESULT_WAIT_MS)
            assert await page.evaluate(FRAMES_SHOWN, 1500) >= 8, "smooth video is not at the camera's rate (10 fps)"
            held = await page.evaluate("() => ({held: frame.held, seq: frame.seq, masks: frame.masks_seq})")
            assert held["held"] and held["masks"] < held["seq"], held
            # The masks are on the picture (the object has not moved: its tint is where it was).
            geometry = await geometry_of(page)
            await first_object_tinted(page, geometry)
            # A click names the camera frame on screen.
            await page.mouse.click(*to_page(geometry, 250, 60))
            await wait_until(lambda: tracker.requests, 5, "the click at the tracker")
            click = tracker.requests[-1].prompt
            assert click is not None and click.seq is not None and click.seq > held["masks"], click

            # Back to exact.
            await page.select_option("#view", "exact")
            await page.wait_for_function("() => frame && !frame.held", timeout=RESULT_WAIT_MS)
            assert await page.evaluate(FRAMES_SHOWN, 2500) <= 3

    run(body(), timeout=90)


def test_a_gateway_without_the_camera_offers_the_exact_view_only(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, page_of(tracker, tmp_path / "profile") as (page, _):
            assert await page.is_disabled('#view option[value="smooth"]')
            # Asked anyway (an old page, a script): refused, naming the field, the view unchanged.
            await page.evaluate("viewChannel.send('smooth')")
            await page.wait_for_selector("#answers li.error:has-text('view: this gateway offers exact')", timeout=5000)
            assert await page.input_value("#view") == "exact"

    run(body(), timeout=60)
