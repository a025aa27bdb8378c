"""One error type for every refusal the API answers, and its JSON shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a stable ``code`` and a ``message`` that starts with
    the offending field's name (``input_video: ...``) whenever one field is to blame."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message)


def bad_request(message: str) -> ApiError:
    """400: a missing or malformed field (the message names it)."""
    return ApiError(400, "invalid_request", message)


def unsupported_format(message: str) -> ApiError:
    """400: an input whose content is not one of the formats served (the message names it)."""
    return ApiError(400, "unsupported_format", message)


def too_large(message: str) -> ApiError:
    """413: an upload over ``--max-upload-mb`` or a video over ``--max-video-seconds``."""
    return ApiError(413, "payload_too_large", message)


def unreachable(message: str) -> ApiError:
    """400: an input URL that could not be fetched or that points where the server will not go."""
    return ApiError(400, "input_unreachable", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def error_response(status: int, code: str, message: str) -> web.Response:
    # "status": "error" is what the hosted queue API adds to its error bodies; clients may test it.
    return web.json_response({"error": {"code": code, "message": message}, "status": "error"}, status=status)
