"""The OpenAPI 3.1 document served at ``/openapi.json``: every route, its fields, its answers."""

from __future__ import annotations

import functools
from typing import Any

from streamer.api.config import MODEL_IMAGE, MODEL_VIDEO
from streamer.api.store import STATUSES

_INPUT = "an http(s) URL, a data: URI, base64 content, or a file part of a multipart/form-data body"
_BOOL = {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}]}
_VECTORS = {
    "description": "JSON array, or the same array as a string",
    "oneOf": [{"type": "array"}, {"type": "string"}],
}
_MASKS = {"type": "string", "enum": ["rle", "none"], "description": "'rle': also write every frame's COCO RLE masks"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": _ref(schema)},
            "multipart/form-data": {"schema": _ref(schema)},
        },
    }


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "missing or malformed field, unsupported format, or an input URL that cannot be fetched",
        401: "missing or wrong API key",
        404: "unknown generation or route",
        409: "the generation already ended (cancel) or was cancelled (synchronous routes)",
        413: "upload over --max-upload-mb or video over --max-video-seconds",
        429: "queue full, or too many event streams",
        500: "the generation failed on the server",
        503: "the server is shutting down",
        504: "not done within the synchronous wait; the generation goes on",
    }
    error = {"content": {"application/json": {"schema": _ref("Error")}}}
    return {str(s): {"description": reasons[s], **error} for s in statuses}


_SUBMIT_ERRORS = (400, 401, 413, 429)
_SYNC_ERRORS = (*_SUBMIT_ERRORS, 409, 500, 503, 504)


def _schemas() -> dict[str, Any]:
    oxen_common = {
        "prompt": {"type": "string", "minLength": 1, "description": "what to segment (a noun phrase)"},
        "apply_mask": {**_BOOL, "description": "true (default): the input with the masks drawn; false: the mask"},
        "masks": _MASKS,
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "ImageEdit": {
            "type": "object",
            "required": ["model", "input_image", "prompt"],
            "properties": {
                "model": {"type": "string", "enum": [MODEL_IMAGE]},
                "input_image": {"description": f"jpeg, png, gif or webp: {_INPUT}"},
                **oxen_common,
                "output_format": {"type": "string", "enum": ["png", "jpeg", "jpg"]},
                "response_format": {"type": "string", "enum": ["url", "b64_json"]},
            },
        },
        "VideoGenerate": {
            "type": "object",
            "required": ["model", "input_video", "prompt"],
            "properties": {
                "model": {"type": "string", "enum": [MODEL_VIDEO]},
                "input_video": {"description": f"mp4, mov, webm or mkv: {_INPUT}"},
                **oxen_common,
                "response_format": {"type": "string", "enum": ["url", "b64_json"]},
            },
        },
        "QueueRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "description": "the fields of ImageEdit (model sam-3-image) or VideoGenerate (model sam-3-video)",
            "properties": {
                "model": {"type": "string", "enum": [MODEL_IMAGE, MODEL_VIDEO]},
                "input_image": {"description": _INPUT},
                "input_video": {"description": _INPUT},
                **oxen_common,
                "output_format": {"type": "string", "enum": ["png", "jpeg", "jpg"]},
                "num_generations": {"type": "integer", "minimum": 1, "maximum": 4},
            },
        },
        "Sam3Video": {
            "type": "object",
            "required": ["video"],
            "properties": {
                "video": {"description": f"mp4, mov, webm or mkv: {_INPUT}"},
                "text_prompt": {"type": "string"},
                "points_input": {**_VECTORS, "description": "pixel clicks [[x, y], ...] or [[[x, y], ...], ...]"},
                "point_labels_input": {**_VECTORS, "description": "1 foreground, 0 background: [1, 0] or [[1, 0]]"},
                "boxes_input": {**_VECTORS, "description": "pixel boxes [[x0, y0, x1, y1], ...], one object each"},
                "obj_ids": {
                    "description": "an id, or one id per object",
                    "oneOf": [{"type": "integer"}, {"type": "array"}, {"type": "string"}],
                },
                "return_overlay": {**_BOOL, "description": "true (default): overlay video; false: binary mask video"},
                "masks": _MASKS,
            },
        },
        "SamV2Video": {
            "type": "object",
            "required": ["input_video"],
            "properties": {
                "input_video": {"description": f"mp4, mov, webm or mkv: {_INPUT}"},
                "prompt": {"type": "string", "description": "what to segment; when given, coordinates are ignored"},
                "overlay_mask": {**_BOOL, "description": "true (default): overlay video; false: binary mask video"},
                "coordinates": {**_VECTORS, "description": "positive pixel clicks: [x, y] or [[x, y], ...]"},
                "remove_coordinates": {**_VECTORS, "description": "negative pixel clicks, same form"},
                "masks": _MASKS,
            },
        },
        "Generation": {
            "type": "object",
            "required": ["generation_id", "status", "progress", "result_url", "error_message"],
            "properties": {
                "generation_id": {"type": "string", "format": "uuid"},
                "model_name": {"type": "string"},
                "media_type": {"type": "string", "enum": ["image", "video"]},
                "status": {"type": "string", "enum": list(STATUSES)},
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "result_url": {"type": ["string", "null"]},
                "masks_url": {"type": ["string", "null"]},
                "error_message": {"type": ["string", "null"]},
                "enqueued_at": {"type": "integer"},
                "started_at": {"type": ["integer", "null"]},
                "completed_at": {"type": ["integer", "null"]},
            },
        },
        "SyncResult": {
            "type": "object",
            "required": ["model", "created", "generation_id", "result_url"],
            "properties": {
                "model": {"type": "string"},
                "created": {"type": "integer"},
                "images": {"type": "array", "items": {"type": "object"}},
                "videos": {"type": "array", "items": {"type": "object"}},
                "generation_id": {"type": "string"},
                "result_url": {"type": "string"},
                "masks_url": {"type": "string"},
            },
        },
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ID_PARAM = {"name": "generation_id", "in": "path", "required": True, "schema": {"type": "string"}}
_MASKS_QUERY = {"name": "masks", "in": "query", "required": False, "schema": _MASKS}


def _paths() -> dict[str, Any]:
    video_file = {"description": "the result video (H.264 mp4)", "content": {"video/mp4": {}}}
    return {
        "/api/ai/images/edit": {
            "post": {
                "summary": "Segment an image (synchronous)",
                "parameters": [_MASKS_QUERY],
                "requestBody": _body("ImageEdit"),
                "responses": {"200": _json("SyncResult", "the result's URL"), **_errors(*_SYNC_ERRORS)},
            }
        },
        "/api/ai/videos/generate": {
            "post": {
                "summary": "Segment a video (synchronous)",
                "parameters": [_MASKS_QUERY],
                "requestBody": _body("VideoGenerate"),
                "responses": {"200": _json("SyncResult", "the result's URL"), **_errors(*_SYNC_ERRORS)},
            }
        },
        "/api/ai/queue": {
            "post": {
                "summary": "Queue image or video segmentations",
                "parameters": [_MASKS_QUERY],
                "requestBody": _body("QueueRequest"),
                "responses": {
                    "200": {"description": "{generations: [{generation_id, status}]}"},
                    **_errors(*_SUBMIT_ERRORS),
                },
            },
            "get": {
                "summary": "List generations (active ones unless a status is given)",
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("status", "model", "media_type", "limit")
                ],
                "responses": {"200": {"description": "{count, generations: [Generation]}"}, **_errors(400, 401)},
            },
        },
        "/api/ai/queue/{generation_id}": {
            "get": {
                "summary": "A generation's status, progress and result URL",
                "parameters": [_ID_PARAM],
                "responses": {"200": _json("Generation", "the generation"), **_errors(401, 404)},
            },
            "delete": {
                "summary": "Cancel a queued or running generation",
                "parameters": [_ID_PARAM],
                "responses": {"200": {"description": "{status: success, generation_id}"}, **_errors(401, 404, 409)},
            },
        },
        "/api/events": {
            "get": {
                "summary": "Server-sent events: media_generation_completed when each generation ends",
                "responses": {
                    "200": {"description": "text/event-stream", "content": {"text/event-stream": {}}},
                    **_errors(401, 429),
                },
            }
        },
        "/v1/sam3-video": {
            "post": {
                "summary": "Segment a video with text, clicks or boxes; answers with the video",
                "parameters": [_MASKS_QUERY],
                "requestBody": _body("Sam3Video"),
                "responses": {"200": video_file, **_errors(*_SYNC_ERRORS)},
            }
        },
        "/v1/sam-v2-video": {
            "post": {
                "summary": "Segment a video with a prompt or clicks; answers with the video",
                "parameters": [_MASKS_QUERY],
                "requestBody": _body("SamV2Video"),
                "responses": {"200": video_file, **_errors(*_SYNC_ERRORS)},
            }
        },
        "/results/{generation_id}/{name}": {
            "get": {
                "summary": "Download a result (the result_url / masks_url as given; signed when a token is set)",
                "security": [],
                "parameters": [
                    _ID_PARAM,
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "the file"}, **_errors(401, 404)},
            }
        },
        "/health": {
            "get": {"summary": "Liveness and queue size", "security": [], "responses": {"200": {"description": "ok"}}}
        },
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sam3-stream api",
            "version": "1",
            "description": "SAM 3 image and video segmentation with the request fields of the hosted SAM 3 "
            "services (Oxen.ai, Segmind): their clients work by changing the base URL and key.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": _paths(),
    }
