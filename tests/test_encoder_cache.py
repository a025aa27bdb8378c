"""The encoder artifact cache: keys, reuse, and stale or corrupt entries rebuilt with a warning.

The cache is generic (an artifact is any files a build writes), so most tests drive it with small
builds of their own; the last ones go through the real ONNX Runtime backend and corrupt its export.
TensorRT engines use the same cache with a key that adds the GPU's name and TensorRT's version.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from models import make_encoder
from models.encoder.cache import RECORD, ArtifactCache, CacheKey, CorruptArtifact, file_sha256, weights_digest
from models.encoder.onnx_runtime import onnx_cache_key
from models.encoder.tensorrt_engine import engine_cache_key
from models.preprocess import frame_to_pixels
from models.tiny import moving_shapes

KEY = CacheKey.of("test", weights="abc", image_size=112)


class Builds:
    """A build writing one file, counting its calls; the matching loader reads the file back."""

    def __init__(self, payload: bytes = b"artifact") -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        (folder / "artifact.bin").write_bytes(self.payload)

    @staticmethod
    def load(folder: Path) -> bytes:
        return (folder / "artifact.bin").read_bytes()


def test_key_digest_is_stable_and_changes_with_every_field() -> None:
    assert CacheKey.of("k", a=1, b="x").digest() == CacheKey.of("k", b="x", a="1").digest()
    base = CacheKey.of("k", a=1, b="x")
    variants = [CacheKey.of("k", a=2, b="x"), CacheKey.of("k", a=1, b="y"), CacheKey.of("j", a=1, b="x")]
    assert len({base.digest(), *(v.digest() for v in variants)}) == 4
    assert base.folder_name.startswith("k-")


def test_engine_key_covers_weights_size_precision_gpu_and_tensorrt_version() -> None:
    fields = {
        "weights": "w",
        "image_size": 1008,
        "precision": "fp16",
        "gpu_name": "NVIDIA H100",
        "tensorrt_version": "10.13.0",
    }
    base = engine_cache_key(**fields)
    assert base.kind == "tensorrt"
    changed = {
        "weights": "w2",
        "image_size": 1024,
        "precision": "bf16",
        "gpu_name": "NVIDIA H200",
        "tensorrt_version": "11.4.0.106",
    }
    digests = {engine_cache_key(**{**fields, name: value}).digest() for name, value in changed.items()}
    assert len(digests) == len(changed) and base.digest() not in digests
    assert {"recipe", "weights", "image_size", "precision", "gpu", "tensorrt"} <= base.as_dict().keys()


def test_weights_digest_follows_every_weight_and_dtype() -> None:
    layer = nn.Linear(4, 3)
    first = weights_digest(layer)
    assert weights_digest(layer) == first
    with torch.no_grad():
        layer.bias[1] += 1e-6
    assert weights_digest(layer) != first
    assert weights_digest(layer.to(torch.bfloat16)) != weights_digest(layer.float())


def test_onnx_key_follows_the_models_weights(tiny_models) -> None:
    key = onnx_cache_key(tiny_models)
    assert key == onnx_cache_key(tiny_models) and key.as_dict()["image_size"] == "112"


def test_builds_once_then_loads_from_disk(tmp_path: Path) -> None:
    cache, build = ArtifactCache(tmp_path), Builds()
    assert cache.get_or_build(KEY, build, Builds.load) == b"artifact"
    assert ArtifactCache(tmp_path).get_or_build(KEY, build, Builds.load) == b"artifact"
    assert build.calls == 1
    entry = cache.entry(KEY)
    assert sorted(p.name for p in entry.iterdir()) == ["artifact.bin", RECORD]
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no scratch folder left behind


def _rebuilt_after(
    tmp_path: Path, damage: Callable[[Path], object], caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    cache, build = ArtifactCache(tmp_path), Builds()
    cache.get_or_build(KEY, build, Builds.load)
    damage(cache.entry(KEY))
    with caplog.at_level(logging.WARNING, logger="models.encoder.cache"):
        assert cache.get_or_build(KEY, build, Builds.load) == b"artifact"
    assert build.calls == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert reason in warning.getMessage() and "rebuilding" in warning.getMessage()
    assert "\n" not in warning.getMessage()
    assert cache.problem(cache.entry(KEY), KEY) is None


def test_a_changed_artifact_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _rebuilt_after(tmp_path, lambda entry: (entry / "artifact.bin").write_bytes(b"artefact"), caplog, "checksum")


def test_a_truncated_artifact_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _rebuilt_after(tmp_path, lambda entry: (entry / "artifact.bin").write_bytes(b"arti"), caplog, "wrong size")


def test_a_garbage_record_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _rebuilt_after(tmp_path, lambda entry: (entry / RECORD).write_text("{not json"), caplog, "corrupt")


def test_a_stale_record_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def stale(entry: Path) -> None:
        record = json.loads((entry / RECORD).read_text())
        record["key"]["weights"] = "other weights"
        (entry / RECORD).write_text(json.dumps(record))

    _rebuilt_after(tmp_path, stale, caplog, "stale")


def test_an_artifact_its_loader_refuses_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, build = ArtifactCache(tmp_path), Builds()
    cache.get_or_build(KEY, build, Builds.load)
    refusals = []

    def picky(folder: Path) -> bytes:
        if not refusals:
            refusals.append(folder)
            raise CorruptArtifact("built by another version")
        return Builds.load(folder)

    with caplog.at_level(logging.WARNING, logger="models.encoder.cache"):
        assert cache.get_or_build(KEY, build, picky) == b"artifact"
    assert build.calls == 2 and "built by another version" in caplog.text


def test_a_failing_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError, match="the build failed"):
        ArtifactCache(tmp_path).get_or_build(KEY, broken, Builds.load)
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_build_its_loader_refuses_raises(tmp_path: Path) -> None:
    def refuse(folder: Path) -> bytes:
        raise CorruptArtifact("never loads")

    with pytest.raises(CorruptArtifact, match="never loads"):
        ArtifactCache(tmp_path).get_or_build(KEY, Builds(), refuse)


@pytest.fixture(scope="module")
def warm_cache(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tiny encoder's ONNX export, made once for this module."""
    folder = tmp_path_factory.mktemp("warm-cache")
    make_encoder("onnxruntime", tiny_models, cache_dir=folder)
    return folder


def _export_in(cache_dir: Path) -> Path:
    (entry,) = [p for p in cache_dir.iterdir() if p.name.startswith("onnx-")]
    return entry / "encoder.onnx"


def test_a_warm_cache_is_used_without_exporting_again(
    tiny_models, warm_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(warm_cache, tmp_path, dirs_exist_ok=True)
    with caplog.at_level(logging.INFO, logger="models.encoder"):
        assert make_encoder("onnxruntime", tiny_models, cache_dir=tmp_path).name == "onnxruntime-fp32"
    assert "exporting" not in caplog.text and "rebuilding" not in caplog.text


@pytest.mark.parametrize("keep_checksums", [False, True], ids=["checksum-mismatch", "loader-refuses"])
def test_a_corrupted_onnx_export_is_rebuilt_and_the_encoder_still_works(
    tiny_models, warm_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, keep_checksums: bool
) -> None:
    """Garbage in place of the cached export: caught by its checksum, or (with a record that matches
    the garbage) by ONNX Runtime refusing it. Either way: one warning, a new export, right tokens."""
    shutil.copytree(warm_cache, tmp_path, dirs_exist_ok=True)
    export = _export_in(tmp_path)
    export.write_bytes(b"\x00garbage" * 100)
    if keep_checksums:
        record = json.loads((export.parent / RECORD).read_text())
        record["files"]["encoder.onnx"] = {"size": export.stat().st_size, "sha256": file_sha256(export)}
        (export.parent / RECORD).write_text(json.dumps(record))
        assert ArtifactCache(tmp_path).problem(export.parent, onnx_cache_key(tiny_models)) is None
    with caplog.at_level(logging.WARNING):
        encoder = make_encoder("onnxruntime", tiny_models, cache_dir=tmp_path)
    assert encoder.name == "onnxruntime-fp32"
    assert "rebuilding" in caplog.text and "using torch" not in caplog.text
    pixels = frame_to_pixels(moving_shapes(2), 112, torch.device("cpu"), torch.float32)
    reference = make_encoder("torch", tiny_models).encode(pixels)
    assert torch.allclose(encoder.encode(pixels), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))
