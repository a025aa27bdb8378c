"""``sam3-stream api`` end to end: a real server process with the tiny model on CPU, inputs served by
another HTTP server on loopback, requests written the way the hosted services' docs write them."""

from __future__ import annotations

import base64
import json
import time

import cv2
import numpy as np
import pytest
import requests
from conftest import API_CLIP_FRAMES
from helpers import EventListener, decode_video, wait_for_generation

from streamer.protocol import rle_to_mask

JSON = {"Content-Type": "application/json"}


def decode_image(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, data[:40]
    return image


def post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=120, **kw)


# -- synchronous: images ------------------------------------------------------------------------


def test_image_edit_answers_with_a_result_url_serving_the_overlay(api_server, api_media):
    _, media = api_media
    body = {"model": "sam-3-image", "input_image": f"{media}/still.png", "prompt": "red shape"}
    response = post(api_server, "/api/ai/images/edit", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "sam-3-image" and isinstance(data["created"], int)
    assert data["images"][0]["url"] == data["result_url"] and data["result_url"].startswith(api_server.url)
    png = requests.get(data["result_url"], timeout=10)  # a plain GET, as the docs' clients do
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert png.content.startswith(b"\x89PNG") and decode_image(png.content).shape[:2] == (48, 64)
    view = requests.get(f"{api_server.url}/api/ai/queue/{data['generation_id']}", timeout=10).json()
    assert view["status"] == "succeeded" and view["result_url"] == data["result_url"] and view["progress"] == 1


def test_image_mask_output_is_black_and_white_and_jpeg_is_honoured(api_server, api_media):
    _, media = api_media
    body = {"model": "sam-3-image", "input_image": f"{media}/still.jpg", "prompt": "red shape", "apply_mask": False}
    mask = decode_image(requests.get(post(api_server, "/api/ai/images/edit", body).json()["result_url"]).content)
    assert set(np.unique(mask)) <= {0, 255}
    body.update(apply_mask="true", output_format="jpeg")
    result = requests.get(post(api_server, "/api/ai/images/edit", body).json()["result_url"], timeout=10)
    assert result.headers["Content-Type"] == "image/jpeg" and result.content.startswith(b"\xff\xd8\xff")


@pytest.mark.parametrize("name", ["still.gif", "still.webp"])
def test_gif_and_webp_images_are_accepted(api_server, api_media, name):
    _, media = api_media
    response = post(
        api_server, "/api/ai/images/edit", {"model": "sam-3-image", "input_image": f"{media}/{name}", "prompt": "shape"}
    )
    assert response.status_code == 200, response.text


def test_image_as_data_uri_upload_and_b64_response(api_server, api_media):
    folder, _ = api_media
    png = (folder / "still.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "sam-3-image", "input_image": uri, "prompt": "shape", "response_format": "b64_json"}
    data = post(api_server, "/api/ai/images/edit", body).json()
    assert decode_image(base64.b64decode(data["images"][0]["b64_json"])).shape[:2] == (48, 64)
    form = {"model": "sam-3-image", "prompt": "shape", "apply_mask": "false"}
    files = {"input_image": ("photo.bin", png, "application/octet-stream")}  # the name says nothing: sniffed
    upload = requests.post(f"{api_server.url}/api/ai/images/edit", data=form, files=files, timeout=60)
    assert upload.status_code == 200, upload.text


# -- synchronous: videos ------------------------------------------------------------------------


def test_video_generate_gives_h264_and_rle_masks_per_frame(api_server, api_media, tmp_path):
    _, media = api_media
    body = {"model": "sam-3-video", "input_video": f"{media}/clip.mp4", "prompt": "red shape"}
    response = post(api_server, "/api/ai/videos/generate?masks=rle", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["videos"][0]["url"] == data["result_url"]
    codec, frames = decode_video(requests.get(data["result_url"], timeout=10).content, tmp_path / "out.mp4")
    assert codec == "h264" and len(frames) == API_CLIP_FRAMES and frames[0].shape == (48, 64, 3)
    masks = requests.get(data["masks_url"], timeout=10).json()
    assert (masks["width"], masks["height"]) == (64, 48) and masks["fps"] == pytest.approx(10)
    assert [f["frame_index"] for f in masks["frames"]] == list(range(API_CLIP_FRAMES))
    # Shorter than SAM 3's hot-start hold-back (15 frames), the clip still gets the objects the tiny model finds.
    assert all(frame["objects"] for frame in masks["frames"])
    for frame in masks["frames"]:
        for obj in frame["objects"]:
            assert rle_to_mask(obj["mask"], (48, 64)).any() and len(obj["bbox"]) == 4
            assert obj["label"] == "red shape"


def test_segmind_sam3_video_answers_with_the_mask_video_from_string_fields(api_server, api_media, tmp_path):
    _, media = api_media
    body = {
        "video": f"{media}/clip.mp4",
        "points_input": "[[20, 20], [30, 24]]",
        "point_labels_input": "[[1, 0]]",
        "obj_ids": 7,
        "return_overlay": False,
    }
    response = requests.post(
        f"{api_server.url}/v1/sam3-video?masks=rle", json=body, headers={"x-api-key": "unused"}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "video/mp4"
    codec, frames = decode_video(response.content, tmp_path / "mask.mp4")
    assert codec == "h264" and len(frames) == API_CLIP_FRAMES
    assert requests.get(response.headers["X-Result-Url"], timeout=10).content == response.content
    masks = requests.get(response.headers["X-Masks-Url"], timeout=10).json()
    assert {obj["obj_id"] for f in masks["frames"] for obj in f["objects"]} <= {7}


def test_segmind_sam3_video_boxes_and_objects(api_server, api_media):
    _, media = api_media
    body = {"video": f"{media}/clip.mp4", "boxes_input": [[4, 4, 30, 30], [34, 10, 60, 40]], "obj_ids": [1, 2]}
    response = requests.post(f"{api_server.url}/v1/sam3-video?masks=rle", json=body, timeout=120)
    assert response.status_code == 200, response.text
    masks = requests.get(response.headers["X-Masks-Url"], timeout=10).json()
    assert {obj["obj_id"] for f in masks["frames"] for obj in f["objects"]} <= {1, 2}


def test_segmind_sam_v2_video_with_coordinates(api_server, api_media, tmp_path):
    _, media = api_media
    body = {
        "input_video": f"{media}/clip.mp4",
        "prompt": "",
        "overlay_mask": True,
        "coordinates": "[[20,20],[25,22]]",
        "remove_coordinates": "[50,40]",
    }
    response = requests.post(f"{api_server.url}/v1/sam-v2-video", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert decode_video(response.content, tmp_path / "v2.mp4")[1][0].shape == (48, 64, 3)


# -- queue, polling, events, cancel -------------------------------------------------------------


def test_queue_poll_download_and_completion_event(api_server, api_media):
    _, media = api_media
    events = EventListener(api_server.url)
    try:
        body = {"model": "sam-3-video", "input_video": f"{media}/clip.mp4", "prompt": "shape", "apply_mask": True}
        enqueue = post(api_server, "/api/ai/queue", body)
        assert enqueue.status_code == 200, enqueue.text
        (generation,) = enqueue.json()["generations"]
        assert generation["status"] == "queued"
        view = wait_for_generation(api_server.url, generation["generation_id"], {"succeeded", "failed", "cancelled"})
        assert view["status"] == "succeeded", view
        assert view["prompt"] == "shape" and view["media_type"] == "video" and view["error_message"] is None
        assert view["completed_at"] >= view["started_at"] >= view["enqueued_at"]
        event = events.event_for(generation["generation_id"])
        assert event["status"] == "succeeded" and event["url"] == event["result_url"] == view["result_url"]
        assert requests.get(view["result_url"], timeout=10).content[4:8] == b"ftyp"
        listed = requests.get(f"{api_server.url}/api/ai/queue", params={"status": "succeeded"}, timeout=10).json()
        assert generation["generation_id"] in [g["generation_id"] for g in listed["generations"]]
        assert listed["count"] == len(listed["generations"])
    finally:
        events.close()


def test_queue_reports_progress_and_cancels_queued_and_running_jobs(api_server, api_media):
    _, media = api_media
    events = EventListener(api_server.url)
    try:
        body = {"model": "sam-3-video", "input_video": f"{media}/long.mp4", "prompt": "shape"}
        running, queued = (
            post(api_server, "/api/ai/queue", body).json()["generations"][0]["generation_id"] for _ in range(2)
        )
        wait_for_generation(api_server.url, running, {"running"})
        progress = wait_for_generation_progress(api_server.url, running)
        assert 0 < progress < 1
        assert requests.delete(f"{api_server.url}/api/ai/queue/{queued}", timeout=10).json() == {
            "status": "success",
            "generation_id": queued,
        }
        assert requests.get(f"{api_server.url}/api/ai/queue/{queued}", timeout=10).json()["status"] == "cancelled"
        assert requests.delete(f"{api_server.url}/api/ai/queue/{running}", timeout=10).status_code == 200
        view = wait_for_generation(api_server.url, running, {"cancelled", "succeeded", "failed"}, timeout=30)
        assert view["status"] == "cancelled" and view["result_url"] is None
        assert {events.event_for(i)["status"] for i in (queued, running)} == {"cancelled"}
        again = requests.delete(f"{api_server.url}/api/ai/queue/{running}", timeout=10)
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_cancellable"
        # The worker goes on with the next job.
        small = {"model": "sam-3-image", "input_image": f"{media}/still.png", "prompt": "shape"}
        assert post(api_server, "/api/ai/images/edit", small).status_code == 200
    finally:
        events.close()


def wait_for_generation_progress(base: str, generation_id: str, timeout: float = 30.0) -> float:
    """The progress of a running generation, once it has moved off 0."""
    deadline = time.monotonic() + timeout
    while True:
        view = requests.get(f"{base}/api/ai/queue/{generation_id}", timeout=10).json()
        if view["status"] != "running" or view["progress"] > 0 or time.monotonic() > deadline:
            return view["progress"]
        time.sleep(0.05)


def test_queue_makes_num_generations_jobs(api_server, api_media):
    _, media = api_media
    body = {"model": "sam-3-image", "input_image": f"{media}/still.webp", "prompt": "shape", "num_generations": 2}
    generations = post(api_server, "/api/ai/queue", body).json()["generations"]
    assert len({g["generation_id"] for g in generations}) == 2
    for generation in generations:
        view = wait_for_generation(api_server.url, generation["generation_id"], {"succeeded", "failed", "cancelled"})
        assert view["status"] == "succeeded" and view["media_type"] == "image" and view["output_format"] == "png"


def test_openapi_document_lists_every_route(api_server):
    document = requests.get(f"{api_server.url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert {
        "/api/ai/images/edit",
        "/api/ai/videos/generate",
        "/api/ai/queue",
        "/api/ai/queue/{generation_id}",
        "/api/events",
        "/v1/sam3-video",
        "/v1/sam-v2-video",
    } <= set(document["paths"])
    json.dumps(document)
