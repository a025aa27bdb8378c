"""Where each stream's active prompts are kept, so that a restarted tracker can re-apply them.

A stream's active prompts are its concepts and, per object made by clicks or boxes, the prompt that
made it (with its id) and the clicks that refined it since. The store is *compacted* as prompts come:
removing an object drops its prompts, removing a concept drops it, ``reset_session`` clears the
stream, and objects the tracker dropped on its own (retired after being lost) are dropped too. Objects
a concept found are not kept: the concept finds them again, under new ids.

:class:`PromptStore` keeps this in memory (the interface); :class:`JournalPromptStore` also appends
every change to a file (``prompts.jsonl`` in a state folder: ``sam3-stream run`` gives the tracker its
private run folder), which it replays when it opens. A tracker killed with SIGKILL loses nothing it
answered; a power cut may lose what the OS had not written yet (no fsync per prompt). The journal is
rewritten as a snapshot when it grows past a few times the live state, so it stays small.

A stream moved to another tracker (``sam3-stream cluster``) takes its prompts along: the old holder's
:meth:`PromptStore.export_stream` records, handed to the new holder's :meth:`PromptStore.import_stream`.

Re-applying clicks is an approximation: they are pixel positions on a frame that is gone, applied to
the first frame the new tracker sees. Viewers are told so (an ``objects_reacquired`` event).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import Prompt

if TYPE_CHECKING:
    from streamer.prompt_queue import QueuedOp

log = logging.getLogger(__name__)

MAX_REFINEMENTS = 8  # clicks kept per object besides the prompt that made it (the newest ones)
JOURNAL_NAME = "prompts.jsonl"
_COMPACT_MIN_LINES = 1000
_CHANGE_KEYS = {"drop", "reset", "add_text", "remove_text", "add_objects", "refine", "prompt", "remove_objects"}


@dataclass
class StoredStream:
    """One stream's active prompts: its concepts, and per clicked object its prompts, oldest first."""

    texts: list[str] = field(default_factory=list)
    objects: dict[int, list[Prompt]] = field(default_factory=dict)

    def prompts(self) -> list[Prompt]:
        """Everything to re-apply, in order: concepts, then each object's prompts (each naming its id)."""
        return [Prompt(text=t) for t in self.texts] + [p for prompts in self.objects.values() for p in prompts]

    def size(self) -> int:
        return len(self.texts) + sum(len(p) for p in self.objects.values())


class PromptStore:
    """Compacted active prompts per stream, in memory. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, StoredStream] = {}

    def record(self, stream: str, op: QueuedOp) -> None:
        """An accepted prompt (in the order accepted)."""
        req = op.request
        if req.op == "add_prompt":
            prompt = req.prompt
            assert prompt is not None
            if op.new_text:
                self._change(stream, {"add_text": prompt.text})
            if op.new_ids:
                parts = prompt.per_object(op.new_ids)
                self._change(stream, {"add_objects": [[p.obj_id, p.to_dict()] for p in parts]})
            elif prompt.has_geometry:
                self._change(stream, {"refine": op.obj_ids[0], "prompt": replace(prompt, text=None).to_dict()})
        elif req.op == "remove_object":
            self._change(stream, {"remove_objects": [req.obj_id]})
        elif req.op == "remove_prompt":
            self._change(stream, {"remove_text": req.text})
        elif req.op == "reset_session":
            self._change(stream, {"reset": True})

    def forget_failed(self, stream: str, op: QueuedOp) -> None:
        """An accepted prompt failed when applied: what it added is not active."""
        if op.new_ids:
            self._change(stream, {"remove_objects": list(op.new_ids)})
        if op.new_text and op.texts:
            self._change(stream, {"remove_text": op.texts[0]})

    def keep_objects(self, stream: str, obj_ids: Collection[int]) -> None:
        """The tracker holds only ``obj_ids`` now (plus prompts still queued): drop the others."""
        with self._lock:
            entry = self._streams.get(stream)
            gone = [i for i in entry.objects if i not in obj_ids] if entry is not None else []
        if gone:
            self._change(stream, {"remove_objects": gone})

    def drop_stream(self, stream: str) -> None:
        """Forget a stream (it expired)."""
        if stream in self._streams:
            self._change(stream, {"drop": True})

    def prompts(self, stream: str) -> list[Prompt] | None:
        """The stream's active prompts to re-apply, or ``None`` for a stream never seen."""
        with self._lock:
            entry = self._streams.get(stream)
            return None if entry is None else entry.prompts()

    def streams(self) -> list[str]:
        """Streams with an entry."""
        with self._lock:
            return list(self._streams)

    def export_stream(self, stream: str) -> list[dict[str, Any]] | None:
        """The stream's active prompts as journal records (JSON-able; :meth:`import_stream` takes them),
        or ``None`` for a stream never seen. A stream moved to another tracker carries them there."""
        with self._lock:
            entry = self._streams.get(stream)
            return None if entry is None else _snapshot_changes(entry)

    def import_stream(self, stream: str, changes: Sequence[dict[str, Any]]) -> None:
        """Replace the stream's prompts by ``changes`` (from :meth:`export_stream`, maybe another host's).

        Raises ``ValueError`` naming the record for a malformed one; the stream is then left without prompts.
        """
        self._change(stream, {"drop": True})
        for i, change in enumerate(changes):
            try:
                if not isinstance(change, dict) or not change.keys() <= _CHANGE_KEYS:
                    shown = sorted(change) if isinstance(change, dict) else repr(change)[:80]
                    raise ValueError(f"not a change record ({shown})")
                if any(not isinstance(change.get(k, ""), str) for k in ("add_text", "remove_text")):
                    raise ValueError("add_text, remove_text: must be strings")
                self._change(stream, dict(change))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self._change(stream, {"drop": True})
                raise ValueError(f"prompts[{i}]: {exc}") from exc

    def close(self) -> None:
        """Release what the store holds open."""

    # ---------------------------------------------------------------------------------- internals

    def _change(self, stream: str, change: dict[str, Any]) -> None:
        with self._lock:
            _apply(self._streams, stream, change)
            self._journal(stream, change)

    def _journal(self, stream: str, change: dict[str, Any]) -> None:
        """Persist one change (called under the lock); the in-memory store keeps nothing."""


def _apply(streams: dict[str, StoredStream], stream: str, change: dict[str, Any]) -> None:
    """Apply one primitive change to ``streams`` (the journal's record format)."""
    if change.get("drop"):
        streams.pop(stream, None)
        return
    entry = streams.setdefault(stream, StoredStream())
    if change.get("reset"):
        entry.texts.clear()
        entry.objects.clear()
    if "add_text" in change and change["add_text"] not in entry.texts:
        entry.texts.append(change["add_text"])
    if "remove_text" in change:
        entry.texts = [t for t in entry.texts if t != change["remove_text"]]
    for obj_id, fields in change.get("add_objects", []):
        entry.objects[obj_id] = [Prompt.from_dict(fields)]
    if "refine" in change and change["refine"] in entry.objects:  # refinements of text-found objects are not kept
        prompts = entry.objects[change["refine"]]
        prompts.append(Prompt.from_dict({**change["prompt"], "obj_id": change["refine"]}))
        del prompts[1 : max(1, len(prompts) - MAX_REFINEMENTS)]
    for obj_id in change.get("remove_objects", []):
        entry.objects.pop(obj_id, None)


def _snapshot_changes(entry: StoredStream) -> list[dict[str, Any]]:
    """The changes (journal records) that rebuild ``entry`` from nothing, starting with a reset."""
    changes: list[dict[str, Any]] = [{"reset": True}]
    changes += [{"add_text": t} for t in entry.texts]
    for obj_id, prompts in entry.objects.items():
        changes.append({"add_objects": [[obj_id, prompts[0].to_dict()]]})
        changes += [{"refine": obj_id, "prompt": p.to_dict()} for p in prompts[1:]]
    return changes


class JournalPromptStore(PromptStore):
    """A :class:`PromptStore` whose changes are appended to ``folder/prompts.jsonl`` and replayed on open."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.path = Path(folder) / JOURNAL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lines = self._replay()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open; closed by close())
        self._compact()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _replay(self) -> int:
        if not self.path.exists():
            return 0
        lines = bad = 0
        with open(self.path, encoding="utf-8", errors="replace") as journal:
            for line in journal:
                lines += 1
                try:
                    record = json.loads(line)
                    _apply(self._streams, record["stream"], record["change"])
                except (ValueError, KeyError, TypeError, AttributeError):  # a torn last line, or damage
                    bad += 1
        if bad:
            log.warning("prompt store %s: skipped %d unreadable lines of %d", self.path, bad, lines)
        log.info("prompt store %s: %d streams", self.path, len(self._streams))
        return lines

    def _journal(self, stream: str, change: dict[str, Any]) -> None:
        self._file.write(json.dumps({"stream": stream, "change": change}, separators=(",", ":")) + "\n")
        self._file.flush()
        self._lines += 1
        if self._lines > max(_COMPACT_MIN_LINES, 4 * sum(s.size() for s in self._streams.values())):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal as the current state (atomically: a new file renamed over the old)."""
        temporary = self.path.with_suffix(".tmp")
        lines = 0
        with open(temporary, "w", encoding="utf-8") as out:
            for stream, entry in self._streams.items():
                changes = _snapshot_changes(entry)
                for change in changes:
                    out.write(json.dumps({"stream": stream, "change": change}, separators=(",", ":")) + "\n")
                lines += len(changes)
        os.replace(temporary, self.path)
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._lines = lines


def open_prompt_store(folder: str | Path | None) -> PromptStore:
    """A journal in ``folder``, or an in-memory store (nothing survives a restart) without one."""
    return PromptStore() if folder is None else JournalPromptStore(folder)
