"""Prompts from the operator page's data channel, forwarded to the tracker's control socket.

Ops: ``add_prompt`` (``prompt``), ``remove_object`` (``obj_id``), ``remove_prompt`` (``text``),
``reset_session``. Every message gets exactly one answer, ``{"type": "answer", "id", "ok", "error",
"obj_ids", "frame_index", "placed_on", "requested"}``: the tracker's own (``ok``: accepted and queued;
``frame_index``: the frame it applies before; for clicks and boxes sent with the ``seq`` of the frame they
were drawn on, ``requested`` echoes it and ``placed_on`` is the seq of the tracked frame they went on: the
newest tracked at or before it, or the oldest of the tracker's prompt ring when that is older), or a
rejection made here when the message is malformed (the error starts with the offending field's name, as
``models.Prompt`` does). A message too large or nested too deeply to parse
is still answered with its ``id`` when the id can be read. Nothing a viewer sends closes its connection.

Order: messages are forwarded one at a time, in the order they arrived (over all viewers), each after
the previous one's answer, so the tracker applies them in the order they were sent (one REQ socket
per request would let a later one overtake: add-then-reset arriving as reset-then-add). The tracker
answers within milliseconds, so this costs nothing; when it does not answer, messages beyond
``max_waiting`` are refused at once instead of queueing without end.

A prompt that the tracker accepted and then failed to apply comes back as an ``event`` on the results;
:meth:`PromptForwarder.event_message` turns it into the data channel's ``event`` message, naming the
page's own ``id`` for it when this gateway forwarded it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from models import MAX_OBJ_ID, Prompt
from streamer.protocol import (
    PROMPT_OPS,
    EventMessage,
    PromptRequest,
    ProtocolError,
    encode_prompt_request,
    new_request_id,
    peek_json_field,
)
from streamer.transport import AsyncPromptClient

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 64 * 1024
MAX_ID_CHARS = 256
MAX_WAITING = 256  # messages waiting for their turn to be forwarded; more are refused at once
REMEMBERED_IDS = 4096  # tracker request id -> the page's id, to name the page's id in events


def answer_message(
    request_id: Any,
    ok: bool,
    error: str | None = None,
    obj_ids: list[int] | None = None,
    frame_index: int | None = None,
    placed_on: int | None = None,
    requested: int | None = None,
) -> dict[str, Any]:
    """The data channel's ``answer`` message."""
    return {
        "type": "answer",
        "id": request_id,
        "ok": ok,
        "error": error,
        "obj_ids": list(obj_ids or []),
        "frame_index": frame_index,
        "placed_on": placed_on,
        "requested": requested,
    }


class PromptForwarder:
    """Parses data-channel prompt messages, forwards them in order as ``PromptRequest``s, returns answers.

    ``stream`` gives the stream to prompt (the configured one, or the one the results come from);
    ``frame_size`` the last frame's ``(width, height)``, so clicks outside it are refused here.
    """

    def __init__(
        self,
        client: AsyncPromptClient,
        stream: Callable[[], str | None],
        frame_size: Callable[[], tuple[int, int] | None] = lambda: None,
        *,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._client = client
        self._stream = stream
        self._frame_size = frame_size
        self._max_waiting = max_waiting
        self._turn = asyncio.Lock()  # FIFO: waiters get it in the order they asked
        self._waiting = 0
        self._page_ids: OrderedDict[str, Any] = OrderedDict()
        self.outcomes: Counter[str] = Counter()  # accepted / rejected / invalid / unanswered / busy

    async def handle(self, message: str | bytes) -> dict[str, Any]:
        """Answer one data-channel message (the answer echoes the message's ``id``)."""
        page_id: Any = None
        try:
            fields = _parse(message)
            page_id = fields.get("id")
            if page_id is not None and not _is_page_id(page_id):
                page_id = None
                raise ValueError(f"id: must be a string of at most {MAX_ID_CHARS} characters or an integer")
            request = self._request(fields)
        except ValueError as exc:
            self.outcomes["invalid"] += 1
            return answer_message(page_id if page_id is not None else _peek_id(message), False, str(exc))
        if self._waiting >= self._max_waiting:
            self.outcomes["busy"] += 1
            return answer_message(page_id, False, f"gateway: {self._waiting} prompts are waiting for the tracker")
        self._waiting += 1
        try:
            async with self._turn:
                reply = await self._client.request(request)
        except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:  # never a reason to drop the viewer
            self.outcomes["unanswered"] += 1
            log.warning("prompt %s not answered: %s", request.op, exc)
            return answer_message(page_id, False, f"tracker: {exc}")
        finally:
            self._waiting -= 1
        self.outcomes["accepted" if reply.ok else "rejected"] += 1
        if reply.ok and page_id is not None:
            self._remember(request.request_id, page_id)
        return answer_message(
            page_id,
            reply.ok,
            reply.error,
            list(reply.obj_ids or []),
            reply.frame_index,
            placed_on=reply.placed_on,
            requested=reply.requested,
        )

    def event_message(self, event: EventMessage) -> dict[str, Any]:
        """The data channel's ``event`` message for a tracker (or gateway) event."""
        return {
            "type": "event",
            "event": event.event,
            "message": event.message,
            "stream": event.stream,
            "id": self._page_ids.get(event.request_id) if event.request_id is not None else None,
            "op": event.op,
            "obj_ids": list(event.obj_ids),
            "texts": list(event.texts),
            "frame_index": event.frame_index,
        }

    def _remember(self, request_id: str, page_id: Any) -> None:
        self._page_ids[request_id] = page_id
        while len(self._page_ids) > REMEMBERED_IDS:
            self._page_ids.popitem(last=False)

    def _request(self, fields: dict[str, Any]) -> PromptRequest:
        op = fields.get("op")
        if op not in PROMPT_OPS:
            raise ValueError(f"op: must be one of {', '.join(PROMPT_OPS)}, got {_brief(op)}")
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
            if isinstance(obj_id, bool) or not isinstance(obj_id, int) or not 0 <= obj_id <= MAX_OBJ_ID:
                raise ValueError(
                    f"obj_id: remove_object needs an integer between 0 and {MAX_OBJ_ID}, got {_brief(obj_id)}"
                )
        elif op == "remove_prompt":
            text = fields.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text: remove_prompt needs the text prompt to drop, got {_brief(text)}")
        # Browser ids ("r1") repeat across viewers; the tracker needs unique ones to spot lazy-pirate retries.
        request = PromptRequest(
            request_id=new_request_id(), stream=stream, op=op, prompt=prompt, obj_id=obj_id, text=text
        )
        encode_prompt_request(request)  # the wire's own checks (ProtocolError is a ValueError naming the field)
        return request


def _is_page_id(value: object) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS and _encodable(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53  # exact in JavaScript


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _peek_id(message: str | bytes) -> Any:
    """The ``id`` of a message that did not parse (too large, too deep), when it can be read; else ``None``."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    found = peek_json_field(message, "id")
    return found if found is not None and _is_page_id(found) else None


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse(message: str | bytes) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"message: longer than {MAX_MESSAGE_CHARS} characters")
    try:
        fields = json.loads(message)
    except RecursionError:
        raise ValueError("message: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"message: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(fields, dict):
        raise ValueError("message: expected a JSON object with an op field")
    return fields
