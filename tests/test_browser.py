"""The operator page in a real headless Chromium (Debian's, driven by Playwright) against the gateway.

The page must play the composited video, and a click on it must reach the tracker as an
``add_prompt`` at the frame pixel under the pointer, through the video's letterboxing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from helpers import (
    BROWSER_MARKS,
    HEIGHT,
    PLAYING,
    WIDTH,
    FakeTracker,
    chromium_page,
    first_object_tinted,
    gateway,
    geometry_of,
    operator_page,
    page_of,
    run,
    to_page,
    wait_playing,
    wait_until,
)

from streamer.gateway.access import SESSION_COOKIE

pytestmark = BROWSER_MARKS
playwright_api = pytest.importorskip("playwright.async_api")


def test_page_plays_video_and_click_adds_mapped_point(tmp_path: Path) -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, page_of(tracker, tmp_path / "profile") as (page, _):
            geometry = await geometry_of(page)

            # The screenshot shows the object's tint where the object is.
            shot = await first_object_tinted(page, geometry)
            assert shot.mean() > 20, "the page shows more than black"

            # A click on frame pixel (250, 60) reaches the tracker as that point.
            await page.mouse.click(*to_page(geometry, 250, 60))
            await wait_until(lambda: tracker.requests, 5, "the prompt at the tracker")
            request = tracker.requests[-1]
            assert request.op == "add_prompt" and request.stream == tracker.stream
            assert request.prompt is not None and request.prompt.point_labels == (1,)
            ((x, y),) = request.prompt.points
            assert abs(x - 250) <= 1 and abs(y - 60) <= 1, (x, y)
            assert request.prompt.obj_id is None  # nothing selected: a new object
            # It names the frame it was drawn on (a frame the tracker has sent), for the tracker's prompt ring.
            assert request.prompt.seq is not None and 0 <= request.prompt.seq <= tracker.seq, request.prompt

            # The tracker's new object shows up in the page's list, with its answer.
            await page.wait_for_selector('#objects li[data-obj-id="2"]', timeout=5000)
            await page.wait_for_function(
                "() => document.getElementById('answers').textContent.includes('object #2')", timeout=5000
            )
            await page.screenshot(path=str(tmp_path / "operator_page.png"))

    run(body(), timeout=60)


def test_selection_box_concepts_and_reconnect(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            FakeTracker() as tracker,
            playwright_api.async_playwright() as pw,
            contextlib.AsyncExitStack() as first_gateway,
        ):
            url = await first_gateway.enter_async_context(gateway(tracker))
            async with operator_page(pw, url, tmp_path / "profile") as page:
                geometry = await geometry_of(page)
                # Shift-click with object 1 selected: a background point for object 1.
                await page.click('#objects li[data-obj-id="1"]')
                await page.keyboard.down("Shift")
                await page.mouse.click(*to_page(geometry, 30, 30))
                await page.keyboard.up("Shift")
                await wait_until(lambda: tracker.requests, 5, "the shift-click at the tracker")
                prompt = tracker.requests[-1].prompt
                assert prompt is not None and prompt.obj_id == 1 and prompt.point_labels == (0,)

                # Deselect, then drag a box from frame pixel (20, 150) to (80, 210): a new object.
                await page.click('#objects li[data-obj-id="1"]')
                await page.mouse.move(*to_page(geometry, 20, 150))
                await page.mouse.down()
                await page.mouse.move(*to_page(geometry, 50, 180), steps=3)
                await page.mouse.move(*to_page(geometry, 80, 210), steps=3)
                await page.mouse.up()
                await wait_until(lambda: len(tracker.requests) == 2, 5, "the box at the tracker")
                prompt = tracker.requests[-1].prompt
                assert prompt is not None and prompt.obj_id is None and not prompt.points
                ((bcx, bcy, bw, bh),) = prompt.bounding_boxes
                expected = (50.5 / WIDTH, 180.5 / HEIGHT, 60 / WIDTH, 60 / HEIGHT)  # pixel centres, normalized
                assert np.allclose((bcx, bcy, bw, bh), expected, atol=1.5 / WIDTH), (prompt.bounding_boxes, expected)
                await page.wait_for_selector('#objects li[data-obj-id="2"]', timeout=5000)

                # The chip of the concept that found object 1 drops that concept and its object.
                await page.click('#concepts .chip:has-text("thing") button')
                await wait_until(lambda: len(tracker.requests) == 3, 5, "remove_prompt at the tracker")
                assert (tracker.requests[-1].op, tracker.requests[-1].text) == ("remove_prompt", "thing")
                await page.wait_for_selector('#objects li[data-obj-id="1"]', state="detached", timeout=5000)
                await page.wait_for_selector("#concepts .chip", state="detached", timeout=5000)

                # The gateway restarts on the same port: the page notices and reconnects by itself.
                await first_gateway.aclose()
                port = int(url.rsplit(":", 1)[1])
                async with gateway(tracker, port=port) as url, aiohttp.ClientSession() as http:
                    deadline = time.monotonic() + 15
                    while True:
                        async with http.get(f"{url}/health") as response:
                            if (await response.json())["viewers"] == 1:
                                break
                        assert time.monotonic() < deadline, "the page did not reconnect"
                        await asyncio.sleep(0.2)
                    await page.wait_for_selector("#connection.connected", timeout=10000)
                    await page.wait_for_selector("#state.live, #state.slow", timeout=5000)  # results come
                    await page.wait_for_function(PLAYING, timeout=5000)

    run(body(), timeout=60)


def test_login_form_token_link_and_a_clear_message_when_refused(tmp_path: Path) -> None:
    token = "correct-horse-battery-staple-42"

    async def body() -> None:
        async with (
            FakeTracker() as tracker,
            gateway(tracker, token=token) as url,
            playwright_api.async_playwright() as pw,
            chromium_page(pw, tmp_path / "profile") as page,
        ):
            # The page asks for the token; a wrong one is told so.
            response = await page.goto(url)
            assert response.status == 401
            await page.fill("#token", "not-the-token")
            await page.click("#login button")
            await page.wait_for_selector("#error:has-text('wrong token')", timeout=5000)
            # The right one: the operator page plays, and prompts reach the tracker.
            await page.fill("#token", token)
            await page.click("#login button")
            await wait_playing(page)
            cookies = await page.context.cookies()
            assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [(SESSION_COOKIE, True, "Strict")]
            assert token not in cookies[0]["value"]

            # The session ends (cookie gone, say the gateway's token changed): a clear message, no retry loop.
            await page.context.clear_cookies()
            await page.evaluate("connect()")
            await page.wait_for_selector("#connection.refused", timeout=5000)
            banner = await page.text_content("#auth")
            assert banner is not None and banner.startswith("Not authorised") and await page.is_visible("#auth a")
            await asyncio.sleep(2.5)  # past the first reconnect delays: still refused, not retrying
            assert "refused" in (await page.get_attribute("#connection", "class") or "")

            # A link carrying ?token= logs in too, and the token leaves the address bar.
            await page.goto(f"{url}/?token={token}")
            await wait_playing(page)
            assert page.url == f"{url}/" and await page.is_hidden("#auth")

    run(body(), timeout=60)
