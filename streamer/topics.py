"""Topics of the tracker's results socket: the ZeroMQ guide's pub-sub message envelopes.

Every message on the results socket starts with a topic part; a SUB socket takes only the topics it
subscribed to (by prefix), and libzmq filters at the publisher, so what no subscriber asked for is
never sent, and nobody decodes what they do not use:

============================  =====================================================================
topic                         messages
============================  =====================================================================
``status``                    heartbeats; every subscriber takes them (see :func:`subscriptions`)
``event/<stream>\\0``          events of one stream (a prompt failed when applied, ...)
``result/<stream>\\0``         results of one stream: ids, boxes, scores, masks; no pixels (robots)
``result+frame/<stream>\\0``   the same results with the frame they were computed on (the gateway)
============================  =====================================================================

The stream name is UTF-8 and ends with a NUL byte, which stream names may not contain, so a
subscription to one stream never matches another whose name merely starts the same.
"""

from __future__ import annotations

from collections.abc import Sequence

STATUS = b"status"
EVENT = b"event/"
RESULT = b"result/"
RESULT_FRAME = b"result+frame/"
PREFIXES = (EVENT, RESULT, RESULT_FRAME)  # the topics that name a stream
_END = b"\0"
# The longest prefix, a stream name of MAX_NAME_CHARS characters of up to 4 UTF-8 bytes, and the NUL.
MAX_TOPIC_BYTES = len(RESULT_FRAME) + 4 * 256 + 1


def stream_topic(prefix: bytes, stream: str) -> bytes:
    """The topic of ``stream``'s messages of one kind (``prefix``: ``EVENT``, ``RESULT`` or ``RESULT_FRAME``)."""
    if prefix not in PREFIXES:
        raise ValueError(f"topic: unknown prefix {prefix!r}")
    if "\0" in stream:
        raise ValueError("stream: must not contain NUL characters")
    return prefix + stream.encode("utf-8") + _END


def subscriptions(streams: Sequence[str] | None = None, *, frames: bool = False) -> list[bytes]:
    """What a subscriber subscribes to: heartbeats, and the events and results of ``streams`` (``None``:
    every stream), the results with their frames when ``frames`` (the gateway) and without (robots)."""
    prefixes = (EVENT, RESULT_FRAME if frames else RESULT)
    if streams is None:
        return [STATUS, *prefixes]
    return [STATUS, *(stream_topic(prefix, stream) for stream in streams for prefix in prefixes)]


def parse_topic(topic: bytes) -> tuple[bytes, str | None]:
    """``(prefix, stream)`` of a topic (``(STATUS, None)`` for heartbeats); ``ValueError`` naming the problem."""
    if topic == STATUS:
        return STATUS, None
    if len(topic) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic: {len(topic)} bytes, more than {MAX_TOPIC_BYTES}")
    for prefix in PREFIXES:
        if topic.startswith(prefix) and topic.endswith(_END):
            name = topic[len(prefix) : -1]
            if _END in name:
                break
            try:
                return prefix, name.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("topic: the stream name is not UTF-8") from None
    if topic.startswith(b"{"):
        raise ValueError(
            "topic: the message starts with a JSON header, not a topic (a tracker older than protocol 3 "
            "publishes no topics: upgrade it)"
        )
    raise ValueError(f"topic: {topic[:40]!r} is not a results topic (status, event/, result/, result+frame/)")
