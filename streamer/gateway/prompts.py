"""Prompts from the operator page's data channel, forwarded to the tracker's control socket.

Ops: ``add_prompt`` (``prompt``), ``remove_object`` (``obj_id``), ``remove_prompt`` (``text``),
``reset_session``. Every message gets exactly one answer, ``{"type": "answer", "id", "ok", "error", "obj_ids"}``:
the tracker's own, or a rejection made here when the message is malformed (the error starts
with the offending field's name, as ``models.Prompt`` does). Nothing a viewer sends closes its
connection.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from models import Prompt
from streamer.protocol import PROMPT_OPS, PromptRequest, ProtocolError, encode_prompt_request, new_request_id
from streamer.transport import AsyncPromptClient

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 64 * 1024


def answer_message(
    request_id: Any, ok: bool, error: str | None = None, obj_ids: list[int] | None = None
) -> dict[str, Any]:
    """The data channel's ``answer`` message."""
    return {"type": "answer", "id": request_id, "ok": ok, "error": error, "obj_ids": list(obj_ids or [])}


class PromptForwarder:
    """Parses data-channel prompt messages, forwards them as ``PromptRequest``s, returns answers.

    ``stream`` gives the stream to prompt (the configured one, or the one the results come from);
    ``frame_size`` the last frame's ``(width, height)``, so clicks outside it are refused here.
    """

    def __init__(
        self,
        client: AsyncPromptClient,
        stream: Callable[[], str | None],
        frame_size: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._frame_size = frame_size
        self.outcomes: Counter[str] = Counter()  # accepted / rejected / invalid / unanswered

    async def handle(self, message: str | bytes) -> dict[str, Any]:
        """Answer one data-channel message (the answer echoes the message's ``id``)."""
        request_id: Any = None
        try:
            fields = _parse(message)
            request_id = fields.get("id")
            if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
                request_id = None
                raise ValueError("id: must be a string or an integer")
            request = self._request(fields)
        except ValueError as exc:
            self.outcomes["invalid"] += 1
            return answer_message(request_id, False, str(exc))
        try:
            reply = await self._client.request(request)
        except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:  # never a reason to drop the viewer
            self.outcomes["unanswered"] += 1
            log.warning("prompt %s not answered: %s", request.op, exc)
            return answer_message(request_id, False, f"tracker: {exc}")
        self.outcomes["accepted" if reply.ok else "rejected"] += 1
        return answer_message(request_id, reply.ok, reply.error, list(reply.obj_ids or []))

    def _request(self, fields: dict[str, Any]) -> PromptRequest:
        op = fields.get("op")
        if op not in PROMPT_OPS:
            raise ValueError(f"op: must be one of {', '.join(PROMPT_OPS)}, got {op!r}")
        stream = self._stream()
        if stream is None:
            raise ValueError("stream: no stream to prompt yet (no results received; set the gateway's stream id)")
        prompt = obj_id = text = None
        if op == "add_prompt":
            if "prompt" not in fields:
                raise ValueError("prompt: add_prompt needs a prompt object")
            prompt = Prompt.from_dict(fields["prompt"])
            size = self._frame_size()
            if size is not None:
                prompt.check_inside(*size)
        elif op == "remove_object":
            obj_id = fields.get("obj_id")
            if isinstance(obj_id, bool) or not isinstance(obj_id, int) or obj_id < 0:
                raise ValueError(f"obj_id: remove_object needs a non-negative integer obj_id, got {obj_id!r}")
        elif op == "remove_prompt":
            text = fields.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text: remove_prompt needs the text prompt to drop, got {text!r}")
        # Browser ids ("r1") repeat across viewers; the tracker needs unique ones to spot lazy-pirate retries.
        request = PromptRequest(
            request_id=new_request_id(), stream=stream, op=op, prompt=prompt, obj_id=obj_id, text=text
        )
        encode_prompt_request(request)  # the wire's own checks (ProtocolError is a ValueError naming the field)
        return request


def _parse(message: str | bytes) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"message: longer than {MAX_MESSAGE_CHARS} characters")
    try:
        fields = json.loads(message)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"message: not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("message: expected a JSON object with an op field")
    return fields
