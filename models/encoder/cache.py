"""Artifacts built from the weights (ONNX exports, TensorRT engines), cached on disk under a key.

An entry is a folder named after its key's digest. It holds the artifact's files and
``entry.json``: the key's fields and each file's size and SHA-256. An entry whose record is missing
or unreadable, whose key differs (stale), whose files changed on disk (corrupt), or that its loader
refuses, is rebuilt after one warning: never a crash. Builds write into a temporary folder that is
renamed into place, so a crash mid-build or a second process building the same key never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_ENV = "SAM3_STREAM_CACHE"
RECORD = "entry.json"
RECORD_FORMAT = 1
_CHUNK = 1 << 22


class CorruptArtifact(Exception):
    """A loader's verdict on files it cannot use (truncated, garbage, built by another version)."""


def default_cache_dir() -> Path:
    """``$SAM3_STREAM_CACHE``, else ``$XDG_CACHE_HOME/sam3-stream``, else ``~/.cache/sam3-stream``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sam3-stream"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's weights and buffers: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.numel():
            digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an artifact depends on: its kind and named fields (weights digest, input size, ...)."""

    kind: str
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, kind: str, **fields: object) -> CacheKey:
        return cls(kind, tuple(sorted((name, str(value)) for name, value in fields.items())))

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, **dict(self.fields)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"{self.kind}-{self.digest()[:24]}"


class ArtifactCache:
    """A folder of cache entries (see the module docstring); ``root`` defaults to :func:`default_cache_dir`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def entry(self, key: CacheKey) -> Path:
        """The folder that holds (or will hold) ``key``'s artifact."""
        return self.root / key.folder_name

    def get_or_build(self, key: CacheKey, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
        """Load ``key``'s entry, building it first when it is absent, stale or corrupt.

        ``build(folder)`` writes the artifact's files into an empty folder; ``load(folder)`` opens
        them and raises :class:`CorruptArtifact` for files it cannot use. A fresh build that its own
        loader refuses raises: rebuilding again would not help.
        """
        folder = self.entry(key)
        if folder.exists():
            problem = self.problem(folder, key)
            if problem is None:
                try:
                    return load(folder)
                except CorruptArtifact as error:
                    problem = f"unusable ({error})"
            log.warning("encoder cache: %s is %s; rebuilding it", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        self._build(folder, key, build)
        return load(folder)

    def problem(self, folder: Path, key: CacheKey) -> str | None:
        """Why the entry in ``folder`` cannot be used for ``key``, or ``None`` when it is intact."""
        try:
            record = json.loads((folder / RECORD).read_text())
            recorded_key, files = record["key"], record["files"]
            fresh = record.get("format") == RECORD_FORMAT and recorded_key == key.as_dict()
        except (OSError, ValueError, KeyError, TypeError):
            return f"corrupt (no readable {RECORD})"
        if not fresh:
            return "stale (built for another key or cache format)"
        for name, expected in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != expected.get("size"):
                return f"corrupt ({name} is missing or has the wrong size)"
            if file_sha256(path) != expected.get("sha256"):
                return f"corrupt ({name} does not match its checksum)"
        return None

    def _build(self, folder: Path, key: CacheKey, build: Callable[[Path], None]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key.folder_name}-", dir=self.root))
        try:
            build(scratch)
            files = {
                path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
                for path in sorted(scratch.iterdir())
                if path.is_file()
            }
            record: dict[str, Any] = {"format": RECORD_FORMAT, "key": key.as_dict(), "files": files}
            (scratch / RECORD).write_text(json.dumps(record, indent=2))
            try:
                scratch.rename(folder)
            except OSError:  # another process finished the same key first: keep theirs
                if self.problem(folder, key) is not None:
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
