"""Who may use the gateway: Host and Origin checks, the token, the login form, and refusing to serve
another machine without a token. Real HTTP against the gateway; real ``sam3-stream`` processes for the CLI."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    FakeTracker,
    Viewer,
    child_env,
    children_of,
    fetch_json,
    free_port,
    gateway,
    launched,
    run,
    run_cli,
    stop_process,
    wait_json,
)

from streamer.gateway.access import SESSION_COOKIE, TOKEN_ENV

TOKEN = "correct-horse-battery-staple-42"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def test_host_and_origin_must_name_this_gateway() -> None:
    async def body() -> None:
        async with (
            FakeTracker() as tracker,
            gateway(tracker, allowed_hosts=("robot.lan",)) as url,
            aiohttp.ClientSession() as http,
        ):
            port = url.rsplit(":", 1)[1]
            # DNS rebinding: a page of evil.example whose name now points here still says evil.example.
            for path in ("/", "/health", "/metrics", "/static/app.js"):
                async with http.get(f"{url}{path}", headers={"Host": f"evil.example:{port}"}) as response:
                    assert response.status == 403, path
                    assert (await response.json())["error"].startswith("host: 'evil.example'")
            for host in (f"localhost:{port}", f"robot.lan:{port}", f"127.0.0.1:{port}", "[::1]"):
                async with http.get(f"{url}/health", headers={"Host": host}) as response:
                    assert response.status == 200, host

            # Another site's page (even one on this machine) may not post offers: 403 before anything is read.
            offer = {"sdp": "v=0", "type": "offer"}
            for headers in (
                {"Origin": "http://evil.example"},
                {"Origin": "http://127.0.0.1:1"},  # another port of this machine is another site
                {"Origin": "null"},  # sandboxed frames, file:// pages
                {"Sec-Fetch-Site": "cross-site"},
            ):
                async with http.post(f"{url}/offer", json=offer, headers=headers) as response:
                    assert response.status == 403, headers
                    assert (await response.json())["error"].startswith("origin:"), headers

            # The gateway's own page passes (the bad SDP is then what gets refused), and so does a real viewer.
            same_site = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
            async with http.post(f"{url}/offer", json=offer, headers=same_site) as response:
                assert response.status == 400 and (await response.json())["error"].startswith("sdp:")
            viewer = Viewer()
            try:
                await viewer.connect(url, headers=same_site)
                await viewer.frame()
            finally:
                await viewer.close()

            async with http.get(f"{url}/") as response:
                assert response.headers["X-Frame-Options"] == "DENY"
                assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
            async with http.get(f"{url}/metrics") as response:
                metrics = await response.text()
            assert 'sam3_gateway_requests_refused_total{field="host"} 4' in metrics
            assert 'sam3_gateway_requests_refused_total{field="origin"} 4' in metrics

    run(body())


def test_token_guards_page_offer_and_metrics() -> None:
    async def body() -> None:
        async with FakeTracker() as tracker, gateway(tracker, token=TOKEN) as url:
            jar = aiohttp.CookieJar(unsafe=True)  # cookies for a bare IP address
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                async with http.get(f"{url}/") as response:  # the login form instead of the page
                    page = await response.text()
                    assert response.status == 401 and 'name="token"' in page and "<video" not in page
                async with http.get(f"{url}/?token=not-the-token") as response:
                    assert response.status == 401 and "wrong token" in await response.text()
                for path in ("/metrics", "/offer"):
                    async with http.request("POST" if path == "/offer" else "GET", f"{url}{path}") as response:
                        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
                        assert (await response.json())["error"].startswith("token:")
                async with http.get(f"{url}/static/app.js") as response:  # the page's code is no secret
                    assert response.status == 200
                assert not jar.filter_cookies(url)

                # /health stays open for probes but tells only the state.
                status, health = await fetch_json(f"{url}/health")
                assert status == 200 and set(health) == {"state"}
                status, health = await fetch_json(f"{url}/health", BEARER)
                assert status == 200 and "viewers" in health

                # ?token= serves the page and sets the session cookie (not the token itself).
                async with http.get(f"{url}/?token={TOKEN}") as response:
                    assert response.status == 200 and "<video" in await response.text()
                    cookie = response.cookies[SESSION_COOKIE]
                assert cookie["httponly"] and cookie["samesite"] == "Strict" and TOKEN not in cookie.value
                async with http.get(f"{url}/metrics") as response:
                    assert response.status == 200 and "sam3_gateway_viewers" in await response.text()

            # The login form: a wrong token is told so; the right one sets the cookie and goes to the page.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.post(f"{url}/login", data={"token": "nope"}) as response:
                    assert response.status == 401 and "wrong token" in await response.text()
                async with http.post(f"{url}/login", data={"token": TOKEN}, allow_redirects=False) as response:
                    assert response.status == 303 and response.headers["Location"] == "/"
                    assert response.cookies[SESSION_COOKIE].value == cookie.value
                async with http.get(f"{url}/") as response:
                    assert response.status == 200 and "<video" in await response.text()
                async with http.post(
                    f"{url}/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}
                ) as response:
                    assert response.status == 403  # login CSRF

            # Viewers: with the cookie (the page) or the Bearer header (scripts); without either, refused.
            with_cookie, with_bearer, without = Viewer(), Viewer(), Viewer()
            try:
                await with_cookie.connect(url, headers={"Cookie": f"{SESSION_COOKIE}={cookie.value}"})
                await with_bearer.connect(url, headers=BEARER)
                await with_cookie.frame()
                await with_bearer.frame()
                status, answer = await without.offer(url, headers={"Authorization": "Bearer wrong"})
                assert status == 401 and answer["error"].startswith("token:")
                status, answer = await without.offer(url, headers={"Cookie": f"{SESSION_COOKIE}={TOKEN}"})
                assert status == 401
                health = await wait_json(f"{url}/health", lambda h: "viewers" in h, 2, BEARER)
                assert health["viewers"] == 2 and health["refused"]["token"] >= 6, health
            finally:
                for viewer in (with_cookie, with_bearer, without):
                    await viewer.close()

    run(body())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_serving_other_machines_needs_a_token_or_insecure() -> None:
    env = {k: v for k, v in child_env().items() if k != TOKEN_ENV}
    for command in (["serve"], ["run", "--model", "passthrough", "--source", "synthetic"]):
        out = run_cli(*command, "--http-host", "0.0.0.0", "--http-port", str(free_port()), env=env)
        (line,) = error_lines(out.stderr)  # one clear line, and nothing started
        assert out.returncode == 2, out.stderr
        assert "http_host: all interfaces is reachable from other machines" in line and "--insecure" in line
        assert "started" not in out.stderr
    out = run_cli("serve", "--token", "short", env=env)
    assert out.returncode == 2 and "token: at least 16 characters" in error_lines(out.stderr)[0]


def test_insecure_serves_other_machines_and_env_token_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    log_path = tmp_path / "insecure.log"
    with launched(["serve", "--http-host", "0.0.0.0", "--http-port", str(port), "--insecure"], log_path) as proc:
        health = run(wait_json(f"http://127.0.0.1:{port}/health", lambda h: "viewers" in h, 30))
        assert health["state"] == "tracker_offline"
        assert stop_process(proc, signal.SIGTERM) == 0
    assert "without a token (--insecure)" in log_path.read_text()

    # The token from the environment; the access log never shows it.
    port = free_port()
    log_path = tmp_path / "token.log"
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # launched() hands the environment to the child
    args = ["serve", "--log-level", "DEBUG", "--http-host", "0.0.0.0", "--http-port", str(port)]
    with launched(args, log_path) as proc:
        url = f"http://127.0.0.1:{port}"
        run(wait_json(f"{url}/health", lambda h: h == {"state": "tracker_offline"}, 30))

        async def probe() -> list[int]:
            statuses = []
            async with aiohttp.ClientSession() as http:
                for path, headers in [("/metrics", None)] * 3 + [("/metrics", BEARER), (f"/?token={TOKEN}", None)]:
                    async with http.get(f"{url}{path}", headers=headers) as response:
                        statuses.append(response.status)
            return statuses

        assert run(probe()) == [401, 401, 401, 200, 200]
        assert stop_process(proc, signal.SIGTERM) == 0
    log = log_path.read_text()
    assert '"GET /" 200' in log and TOKEN not in log, log[-2000:]  # the access log, without the query
    (refusal,) = [line for line in log.splitlines() if "refused a request" in line]  # one line, not one each
    assert "token: missing or wrong on /metrics" in refusal


@pytest.mark.timeout(120)
def test_run_hands_the_token_to_the_gateway_off_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "run.log"
    args = ["run", "--model", "passthrough", "--source", "synthetic:160x120@10", "--http-port", str(port)]
    with launched([*args, "--token", TOKEN], log_path) as proc:
        url = f"http://127.0.0.1:{port}"
        assert run(wait_json(f"{url}/health", lambda h: h.get("state") == "live", 60)) == {"state": "live"}
        health = run(wait_json(f"{url}/health", lambda h: "viewers" in h, 5, BEARER))
        assert health["stream"] == "cam0"
        children = children_of(proc.pid)
        assert len(children) == 3 and not any(TOKEN in cmd for cmd in children.values()), children
        assert stop_process(proc) == 0
