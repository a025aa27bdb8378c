"""The encoder's ONNX export and the ONNX Runtime backend on CPU, against the torch encoder.

ONNX Runtime tokens must match torch's within 1e-4 relative; a streaming tracker fed them must keep
the same objects with the same masks (IoU >= 0.999) over 100 frames of text and click prompts. The
half-precision exports TensorRT builds from must keep LayerNorm and the patch embedding in fp32.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from models import Prompt, StreamingTracker, export_encoder, make_encoder
from models.encoder.onnx_runtime import OnnxRuntimeImageEncoder
from models.preprocess import frame_to_pixels
from models.results import MaskAgreement
from models.tiny import TINY_IMAGE_SIZE, moving_shapes

GRID = TINY_IMAGE_SIZE // 14
HIDDEN = 32  # the tiny ViT's width
FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def pixels_of(index: int) -> torch.Tensor:
    return frame_to_pixels(moving_shapes(index), TINY_IMAGE_SIZE, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny encoder's export in a precision, made once per module (an export takes seconds)."""
    made: dict[str, Path] = {}

    def export(precision: str) -> Path:
        if precision not in made:
            made[precision] = export_encoder(tiny_models, tmp_path_factory.mktemp(precision), precision=precision)
        return made[precision]

    return export


@pytest.fixture(scope="module")
def fp32_export(exports: Callable[[str], Path]) -> Path:
    return exports("fp32")


def test_export_is_one_checked_onnx_file_with_fixed_input_and_output(fp32_export: Path) -> None:
    assert fp32_export.name == "encoder.onnx" and sorted(p.name for p in fp32_export.parent.iterdir()) == [
        "encoder.onnx"
    ]
    model = onnx.load(str(fp32_export))
    onnx.checker.check_model(model, full_check=True)
    (pixels,), (tokens,) = model.graph.input, model.graph.output
    assert (pixels.name, tokens.name) == ("pixels", "tokens")
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (pixels, tokens)]
    assert dims == [[1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [1, GRID * GRID, HIDDEN]]


def test_onnxruntime_tokens_match_torch_within_1e_4_relative(tiny_models, fp32_export: Path) -> None:
    ort_encoder = OnnxRuntimeImageEncoder(tiny_models, fp32_export)
    torch_encoder = make_encoder("torch", tiny_models)
    for index in (0, 7, 31):
        pixels = pixels_of(index)
        ours, reference = ort_encoder.encode(pixels), torch_encoder.encode(pixels)
        assert ours.shape == reference.shape and ours.dtype == reference.dtype
        assert relative_error(ours, reference) <= 1e-4


def test_external_data_export_loads_in_onnxruntime(tiny_models, tmp_path: Path) -> None:
    path = export_encoder(tiny_models, tmp_path, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "encoder.onnx.data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    pixels = pixels_of(3)
    ours = OnnxRuntimeImageEncoder(tiny_models, path).encode(pixels)
    assert relative_error(ours, make_encoder("torch", tiny_models).encode(pixels)) <= 1e-4


def _input_types(model: onnx.ModelProto) -> Counter:
    """(op type, element type of its first input) for every node, after shape inference."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return Counter((node.op_type, types.get(node.input[0])) for node in graph.node)


@pytest.mark.parametrize("precision, half", [("fp16", FLOAT16), ("bf16", BFLOAT16)], ids=["fp16", "bf16"])
def test_half_export_keeps_layernorm_and_patch_embedding_in_fp32(
    exports: Callable[[str], Path], precision: str, half: int
) -> None:
    model = onnx.load(str(exports(precision)))
    onnx.checker.check_model(model, full_check=True)
    ops = _input_types(model)
    norms = sum(n for (op, _), n in ops.items() if op == "LayerNormalization")
    assert norms == 5 and ops[("LayerNormalization", FLOAT)] == norms  # the ViT's first norm and 2 per layer
    assert ops[("Conv", FLOAT)] == 1  # the patch embedding
    matmuls = sum(n for (op, _), n in ops.items() if op == "MatMul")
    assert matmuls and ops[("MatMul", half)] == matmuls  # every projection and attention product
    assert model.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == half


def test_fp16_export_stays_close_to_fp32_on_onnxruntime(tiny_models, exports: Callable[[str], Path]) -> None:
    """What a TensorRT fp16 engine computes, run here by ONNX Runtime: within fp16's rounding of torch fp32."""
    session = onnxruntime.InferenceSession(str(exports("fp16")), providers=["CPUExecutionProvider"])
    pixels = pixels_of(5)
    (tokens,) = session.run(["tokens"], {"pixels": pixels.numpy()})
    assert tokens.dtype == np.float16
    assert relative_error(torch.from_numpy(tokens), make_encoder("torch", tiny_models).encode(pixels)) <= 1e-2


def test_tracker_on_onnxruntime_tokens_keeps_ids_and_masks_over_100_frames(tiny_models, tmp_path: Path) -> None:
    """Same ids on every frame; per object, IoU >= 0.999 over the 100 frames (intersections over unions,
    summed) and on every single frame >= 0.99 or at most 2 pixels off. Tokens differ by ~1e-6, which can
    flip a pixel whose logit sits at zero: one pixel of a 250-pixel object is already IoU 0.996 on that
    frame, of a 20-pixel one 0.95."""
    ort_encoder = make_encoder("onnxruntime", tiny_models, cache_dir=tmp_path)
    assert ort_encoder.name == "onnxruntime-fp32"
    trackers = [StreamingTracker(tiny_models), StreamingTracker(tiny_models, encoder=ort_encoder)]
    prompts = {
        0: Prompt(text="person"),
        1: Prompt(points=((40.0, 60.0),), point_labels=(1,)),
        2: Prompt(points=((120.0, 20.0), (110.0, 30.0)), point_labels=(1, 0)),
        40: Prompt(points=((50.0, 62.0),), point_labels=(1,), obj_id=0),  # a refining click mid-stream
    }
    agreement = MaskAgreement()
    labels: set[str | None] = set()
    for index in range(100):
        if index in prompts:
            for tracker in trackers:
                tracker.add_prompt(prompts[index], frame_size=(160, 120))
        reference, ours = (tracker.track(moving_shapes(index)) for tracker in trackers)
        assert [o.obj_id for o in ours.objects] == [o.obj_id for o in reference.objects], f"frame {index}"
        ious = agreement.add(ours, reference)
        mine, theirs = ours.by_id(), reference.by_id()
        flipped = {i: int(np.count_nonzero(mine[i].mask != theirs[i].mask)) for i in theirs}
        assert all(iou >= 0.99 or flipped[i] <= 2 for i, iou in ious.items()), f"frame {index}: {ious}, {flipped}"
        labels.update(o.label for o in reference.objects)
    per_object = agreement.per_object()
    assert len(per_object) >= 3 and "person" in labels and None in labels  # text and click objects compared
    assert all(iou >= 0.999 for iou in per_object.values()), per_object
