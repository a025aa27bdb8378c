"""``sam3-stream api`` refusals: every 4xx with its field named, size and duration limits, the API key,
private URLs, bounded queue and event streams, and a fuzz of malformed bodies. Real server processes."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import API_MAX_UPLOAD_MB
from helpers import ApiServer, EventListener, wait_for_generation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKEN = "s3cret-key"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, tiny_folder):
    """A server with an API key, a queue of one, one event stream, and no fetching from private addresses."""
    args = ("--token", TOKEN, "--max-queue", "1", "--max-event-clients", "1")
    with ApiServer(tmp_path_factory.mktemp("api-token"), *args, model=str(tiny_folder)) as server:
        yield server


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body["error"]) == {"code", "message"}, body
    return body["error"]


def image_body(media: str, **fields) -> dict:
    return {"model": "sam-3-image", "input_image": f"{media}/still.png", "prompt": "shape", **fields}


def video_body(media: str, **fields) -> dict:
    return {"video": f"{media}/clip.mp4", "points_input": [[20, 20]], **fields}


# -- 400: each missing or malformed field, named --------------------------------------------------


@pytest.mark.parametrize(
    "path, fields, drop, field",
    [
        ("/api/ai/images/edit", {}, "model", "model"),
        ("/api/ai/images/edit", {}, "input_image", "input_image"),
        ("/api/ai/images/edit", {}, "prompt", "prompt"),
        ("/api/ai/images/edit", {"prompt": 5}, None, "prompt"),
        ("/api/ai/images/edit", {"model": "sam-3-video"}, None, "model"),
        ("/api/ai/images/edit", {"apply_mask": "maybe"}, None, "apply_mask"),
        ("/api/ai/images/edit", {"output_format": "tiff"}, None, "output_format"),
        ("/api/ai/images/edit", {"response_format": "xml"}, None, "response_format"),
        ("/api/ai/images/edit", {"masks": "png"}, None, "masks"),
        ("/api/ai/images/edit", {"input_image": 123}, None, "input_image"),
        ("/api/ai/images/edit", {"input_image": "data:image/png;base64"}, None, "input_image"),
        ("/api/ai/images/edit", {"input_image": "data:image/png;base64,@@@@not base64@@@@"}, None, "input_image"),
        ("/api/ai/images/edit", {"input_image": "file:///etc/passwd"}, None, "input_image"),
        ("/api/ai/images/edit", {"input_image": "ftp://example.com/a.png"}, None, "input_image"),
        ("/api/ai/queue", {"num_generations": 9}, None, "num_generations"),
        ("/api/ai/images/edit", {"num_generations": 2}, None, "num_generations"),
        ("/api/ai/queue", {"model": "dall-e"}, None, "model"),
        ("/v1/sam3-video", {}, "video", "video"),
        ("/v1/sam3-video", {}, "points_input", "text_prompt"),
        ("/v1/sam3-video", {"points_input": "[[1, 2"}, None, "points_input"),
        ("/v1/sam3-video", {"points_input": [[1, 2, 3]]}, None, "points_input"),
        ("/v1/sam3-video", {"points_input": "[[1e309, 2]]"}, None, "points_input"),
        ("/v1/sam3-video", {"point_labels_input": [[1, 2]]}, None, "point_labels_input"),
        ("/v1/sam3-video", {"point_labels_input": [1, 0, 1]}, None, "point_labels_input"),
        ("/v1/sam3-video", {"boxes_input": "[[1, 2, 3]]"}, None, "boxes_input"),
        ("/v1/sam3-video", {"obj_ids": "x"}, None, "obj_ids"),
        ("/v1/sam3-video", {"obj_ids": [1, 2]}, None, "obj_ids"),
        ("/v1/sam3-video", {"return_overlay": [True]}, None, "return_overlay"),
        ("/v1/sam3-video", {"points_input": [[500, 500]]}, None, "points_input"),  # outside the 64x48 clip
        ("/v1/sam3-video", {"boxes_input": [[100, 100, 200, 200]]}, None, "boxes_input"),
        ("/v1/sam-v2-video", {"input_video": None}, None, "input_video"),
        ("/v1/sam-v2-video", {"prompt": ""}, None, "prompt"),
    ],
)
def test_missing_or_malformed_field_is_a_400_naming_it(api_server, api_media, path, fields, drop, field):
    _, media = api_media
    if path.startswith("/v1/sam-v2"):
        body = {"input_video": f"{media}/clip.mp4", **fields}
    elif path.startswith("/v1/"):
        body = video_body(media, **fields)
    else:
        body = image_body(media, **fields)
    body.pop(drop, None)
    error = error_of(requests.post(api_server.url + path, json=body, timeout=60), 400)
    assert error["message"].startswith(f"{field}:"), error


@pytest.mark.parametrize(
    "raw, content_type",
    [
        (b"not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"", "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
        (b'{"a": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", "application/json"),
        (b"\xff\xfe garbage", "application/json"),
        (b"<xml/>", "application/xml"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
    ],
)
def test_malformed_bodies_are_400(api_server, raw, content_type):
    response = requests.post(
        f"{api_server.url}/api/ai/queue", data=raw, headers={"Content-Type": content_type}, timeout=30
    )
    assert error_of(response, 400)["message"].startswith("body:")


@pytest.mark.parametrize(
    "path, name, field, named",
    [
        ("/api/ai/images/edit", "notes.txt", "input_image", "unrecognized"),
        ("/api/ai/images/edit", "clip.mp4", "input_image", "mp4"),
        ("/v1/sam3-video", "still-named.mp4", "video", "png"),  # the content counts, not the name
    ],
)
def test_unsupported_format_is_a_400_naming_it(api_server, api_media, path, name, field, named):
    _, media = api_media
    body = (
        image_body(media, input_image=f"{media}/{name}")
        if "images" in path
        else video_body(media, video=f"{media}/{name}")
    )
    error = error_of(requests.post(api_server.url + path, json=body, timeout=60), 400)
    assert error["code"] == "unsupported_format" and error["message"].startswith(f"{field}:")
    assert named in error["message"]


def test_unreachable_urls_are_400_not_500(api_server, api_media):
    _, media = api_media
    for url, reason in [
        (f"{media}/missing.png", "HTTP 404"),
        ("http://127.0.0.1:9/x.png", "connect"),
        ("http://no-such-host.invalid/x.png", ""),
    ]:
        error = error_of(
            requests.post(f"{api_server.url}/api/ai/images/edit", json=image_body(media, input_image=url), timeout=60),
            400,
        )
        assert (
            error["code"] == "input_unreachable"
            and error["message"].startswith("input_image:")
            and reason in error["message"]
        )


def test_a_path_on_the_server_is_never_read(api_server, api_media):
    _, media = api_media
    for value in ("/etc/passwd", "../../jobs.sqlite3", "file:///etc/hostname"):
        error = error_of(
            requests.post(
                f"{api_server.url}/api/ai/images/edit", json=image_body(media, input_image=value), timeout=30
            ),
            400,
        )
        assert "root:" not in error["message"]


# -- 413: size and duration -------------------------------------------------------------------------


def test_inputs_over_the_upload_limit_are_413(api_server, api_media):
    folder, media = api_media
    big = (folder / "big.bin").read_bytes()
    assert len(big) > API_MAX_UPLOAD_MB * 2**20
    by_url = requests.post(
        f"{api_server.url}/api/ai/images/edit", json=image_body(media, input_image=f"{media}/big.bin"), timeout=60
    )
    assert error_of(by_url, 413)["message"].startswith("input_image:")
    upload = requests.post(
        f"{api_server.url}/api/ai/images/edit",
        data={"model": "sam-3-image", "prompt": "shape"},
        files={"input_image": ("big.png", big)},
        timeout=60,
    )
    assert error_of(upload, 413)["message"].startswith("input_image:")
    inline = image_body(media, input_image="data:image/png;base64," + base64.b64encode(big).decode())
    assert error_of(requests.post(f"{api_server.url}/api/ai/images/edit", json=inline, timeout=60), 413)
    huge_body = requests.post(
        f"{api_server.url}/api/ai/queue",
        data=b"{" + b" " * (4 * 2**20) + b"}",
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert error_of(huge_body, 413)["message"].startswith("body:")


def test_video_over_the_duration_limit_is_413(api_server, api_media):
    _, media = api_media
    response = requests.post(
        f"{api_server.url}/v1/sam3-video", json=video_body(media, video=f"{media}/overlong.mp4"), timeout=60
    )
    assert "longer than" in error_of(response, 413)["message"]


# -- 404 --------------------------------------------------------------------------------------------


def test_unknown_ids_and_routes_are_404(api_server):
    base = api_server.url
    for response in (
        requests.get(f"{base}/api/ai/queue/{uuid.uuid4()}", timeout=10),
        requests.delete(f"{base}/api/ai/queue/{uuid.uuid4()}", timeout=10),
        requests.get(f"{base}/api/ai/queue/not-an-id", timeout=10),
        requests.get(f"{base}/api/ai/queue/..%2F..%2Fjobs.sqlite3", timeout=10),
        requests.get(f"{base}/results/{uuid.uuid4()}/result.png", timeout=10),
        requests.get(f"{base}/no/such/route", timeout=10),
    ):
        assert error_of(response, 404)["code"] == "not_found"


def test_result_names_other_than_the_jobs_own_are_404(api_server, api_media):
    _, media = api_media
    data = requests.post(f"{api_server.url}/api/ai/images/edit", json=image_body(media), timeout=60).json()
    job = data["generation_id"]
    for name in ("input.png", "..%2F..%2Fjobs.sqlite3", "masks.json"):
        assert error_of(requests.get(f"{api_server.url}/results/{job}/{name}", timeout=10), 404)


# -- the API key, signed results, private URLs, bounded queue and streams ---------------------------


def test_api_key_is_required_and_results_are_signed(token_server, api_media):
    folder, _ = api_media
    base = token_server.url
    png = base64.b64encode((folder / "still.png").read_bytes()).decode()
    body = {"model": "sam-3-image", "input_image": png, "prompt": "shape"}
    assert error_of(requests.post(f"{base}/api/ai/images/edit", json=body, timeout=30), 401)["code"] == "unauthorized"
    wrong = {"Authorization": "Bearer nope"}
    assert error_of(requests.post(f"{base}/api/ai/images/edit", json=body, headers=wrong, timeout=30), 401)
    assert error_of(requests.get(f"{base}/api/ai/queue", headers={"x-api-key": "nope"}, timeout=10), 401)
    assert error_of(requests.get(f"{base}/api/events", timeout=10), 401)
    response = requests.post(
        f"{base}/api/ai/images/edit", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    url = response.json()["result_url"]
    assert "?sig=" in url and requests.get(url, timeout=10).status_code == 200  # no header needed, like presigned
    unsigned = url.split("?")[0]
    assert error_of(requests.get(unsigned, timeout=10), 401)
    assert error_of(requests.get(unsigned + "?sig=" + "0" * 32, timeout=10), 401)
    assert requests.get(unsigned, headers={"x-api-key": TOKEN}, timeout=10).status_code == 200
    view = requests.get(
        f"{base}/api/ai/queue/{response.json()['generation_id']}", headers={"x-api-key": TOKEN}, timeout=10
    )
    assert view.json()["status"] == "succeeded"
    assert requests.get(f"{base}/openapi.json", timeout=10).status_code == 200  # the document is public


def test_private_addresses_are_refused_without_allow_private_urls(token_server, api_media):
    _, media = api_media
    port = media.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "10.1.2.3", "169.254.169.254"):
        body = {"model": "sam-3-image", "input_image": f"http://{host}:{port}/still.png", "prompt": "shape"}
        response = requests.post(
            f"{token_server.url}/api/ai/images/edit", json=body, headers={"x-api-key": TOKEN}, timeout=60
        )
        error = error_of(response, 400)
        assert error["code"] == "input_unreachable" and error["message"].startswith("input_image:"), error


def test_full_queue_is_429_and_event_streams_are_bounded(token_server, api_media):
    folder, _ = api_media
    auth = {"x-api-key": TOKEN}
    clip = base64.b64encode((folder / "long.mp4").read_bytes()).decode()
    body = {"model": "sam-3-video", "input_video": clip, "prompt": "shape"}
    first = requests.post(f"{token_server.url}/api/ai/queue", json=body, headers=auth, timeout=60)
    job = first.json()["generations"][0]["generation_id"]
    try:
        full = requests.post(f"{token_server.url}/api/ai/queue", json=body, headers=auth, timeout=60)
        assert error_of(full, 429)["code"] == "queue_full"
        events = EventListener(token_server.url, headers=auth)
        try:
            assert error_of(requests.get(f"{token_server.url}/api/events", headers=auth, timeout=10), 429)
        finally:
            events.close()
    finally:
        requests.delete(f"{token_server.url}/api/ai/queue/{job}", headers=auth, timeout=10)
        wait_for_generation(token_server.url, job, {"cancelled", "succeeded", "failed"}, headers=auth)


def test_refused_options_exit_with_one_line_before_loading_the_model(tmp_path):
    def api(*args: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "streamer.cli", "api", "--model", "tiny-random", "--data-dir", str(tmp_path)]
        return subprocess.Popen([*argv, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = {  # at once: each only imports and refuses
            "--token": api("--http-host", "0.0.0.0"),  # serving beyond loopback without a key
            f"--http-port {port}: cannot listen": api("--http-port", str(port)),
            "encoder_precision:": api("--encoder", "onnxruntime", "--encoder-precision", "fp8"),
        }
        results = {expected: (proc.communicate(timeout=120)[1], proc.returncode) for expected, proc in running.items()}
    for expected, (stderr, code) in results.items():
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in stderr, stderr


# -- fuzz --------------------------------------------------------------------------------------------

_FIELDS = (
    "model",
    "input_image",
    "input_video",
    "video",
    "prompt",
    "text_prompt",
    "apply_mask",
    "output_format",
    "points_input",
    "point_labels_input",
    "boxes_input",
    "obj_ids",
    "return_overlay",
    "coordinates",
    "remove_coordinates",
    "overlay_mask",
    "num_generations",
    "response_format",
    "masks",
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        ["/api/ai/images/edit", "/api/ai/videos/generate", "/api/ai/queue", "/v1/sam3-video", "/v1/sam-v2-video"]
    ),
    body=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8) | _JSON,
)
def test_fuzzed_bodies_get_a_4xx_never_a_crash(api_server, path, body):
    response = requests.post(
        api_server.url + path,
        data=json.dumps(body, allow_nan=True),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert set(response.json()["error"]) == {"code", "message"}
    assert requests.get(f"{api_server.url}/health", timeout=10).status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    geometry=st.dictionaries(
        st.sampled_from(("points_input", "point_labels_input", "boxes_input", "obj_ids")),
        _JSON | _JSON.map(json.dumps),
        min_size=1,
        max_size=4,
    )
)
def test_fuzzed_prompts_on_a_real_video_are_answered_never_crash(api_server, api_media, geometry):
    """With a valid video, malformed clicks, labels, boxes and ids get a 400; well-formed ones run."""
    _, media = api_media
    response = requests.post(  # NaN and infinities too: requests' json= would refuse them before sending
        f"{api_server.url}/v1/sam3-video",
        data=json.dumps({"video": f"{media}/clip.mp4", **geometry}, allow_nan=True),
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    if response.status_code == 200:
        assert response.headers["Content-Type"] == "video/mp4"
    else:
        error = error_of(response, 400)
        assert error["message"].split(":")[0] in (
            "points_input",
            "point_labels_input",
            "boxes_input",
            "obj_ids",
            "text_prompt",
        ), error
