"""Pre/post-processing without torchvision: any frame size in, masks and boxes out at frame size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import box_of

from models import Prompt
from models.preprocess import (
    boxes_from_masks,
    frame_to_pixels,
    masks_to_frame,
    prompt_to_model_points,
    resolve_overlaps,
)
from models.readback import packed_masks, read_back


@pytest.mark.parametrize("size", [(120, 160), (77, 333), (112, 112), (1080, 1920)])
def test_frame_to_pixels_is_square_and_normalized(size) -> None:
    frame = np.zeros((*size, 3), np.uint8)
    frame[..., 0] = 255
    pixels = frame_to_pixels(frame, 112, torch.device("cpu"), torch.float32)
    assert pixels.shape == (1, 3, 112, 112)
    assert torch.allclose(pixels[0, 0], torch.ones(112, 112)) and torch.allclose(pixels[0, 1], -torch.ones(112, 112))


def test_boxes_match_the_masks_pixels() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 50, 70), bool)
    masks[0, 10:20, 5:9] = True
    masks[1, 0, 0] = True
    masks[2] = rng.random((50, 70)) > 0.97
    boxes, visible = boxes_from_masks(torch.from_numpy(masks))
    assert visible.tolist() == [True, True, True, False]
    for mask, box in zip(masks[:3], boxes[:3].tolist(), strict=True):
        assert box == list(box_of(mask))
    assert boxes[3].tolist() == [0, 0, 0, 0]


def test_read_back_packs_each_mask_by_its_box_and_reports_only_visible_objects() -> None:
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 50, 70), bool)
    masks[0, 10:20, 5:9] = rng.random((10, 4)) > 0.3
    masks[1, 49, 69] = True  # a single pixel in the corner
    masks[3] = rng.random((50, 70)) > 0.9  # spread over the whole frame; object 2 is empty
    tensor = torch.from_numpy(masks)
    boxes, visible = boxes_from_masks(tensor)
    scores = torch.tensor([0.25, 0.5, 0.75, 0.875], dtype=torch.bfloat16)
    objects = read_back([7, 8, 9, 10], tensor, boxes, visible, scores, ["a", None, "b", "c"])
    assert [(o.obj_id, o.score, o.label) for o in objects] == [(7, 0.25, "a"), (8, 0.5, None), (10, 0.875, "c")]
    for obj, mask in zip(objects, masks[[0, 1, 3]], strict=True):
        np.testing.assert_array_equal(obj.mask, mask)
    # What CUDA does, on CPU tensors: the boxes' pixels packed into one flat buffer, moved, pasted back.
    moved: list[int] = []

    def to_host(flat: torch.Tensor) -> np.ndarray:
        moved.append(flat.numel())
        return flat.numpy().copy()

    boxes_np = boxes.numpy()
    packed = packed_masks(tensor, boxes_np, [0, 1, 3], to_host)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes_np[[0, 1, 3]]]
    assert moved == [sum(areas)], "one transfer of the boxes' pixels only"
    for got, mask in zip(packed, masks[[0, 1, 3]], strict=True):
        assert got.shape == (50, 70) and got.dtype == bool
        np.testing.assert_array_equal(got, mask)
    assert packed_masks(tensor, boxes_np, [], to_host) == [] and len(moved) == 1


def test_masks_come_back_at_frame_resolution() -> None:
    logits = torch.full((2, 32, 32), -5.0)
    logits[0, 8:16, 8:16] = 5.0
    masks = masks_to_frame(logits, 120, 160)
    assert masks.shape == (2, 120, 160) and masks.dtype == torch.bool
    assert masks[0, 45, 60] and not masks[0, 5, 5] and not masks[1].any()


def test_opencv_upsampling_differs_from_pytorchs_only_where_the_logit_is_all_but_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 32, 32, generator=gen) * 4
    exact = masks_to_frame(logits, 480, 640)
    fast = masks_to_frame(logits, 480, 640, exact=False)
    assert fast.shape == exact.shape and fast.dtype == torch.bool
    flipped = fast != exact
    upsampled = F.interpolate(logits[:, None], size=(480, 640), mode="bilinear", align_corners=False)[:, 0]
    assert int(flipped.sum()) <= 10, f"{int(flipped.sum())} of {flipped.numel()} pixels differ"
    if flipped.any():
        assert float(upsampled[flipped].abs().max()) < 1e-4
    strided = logits.transpose(1, 2)  # not contiguous; bfloat16 logits (a bf16 model on CPU) below
    assert torch.equal(
        masks_to_frame(strided, 48, 64, exact=False), masks_to_frame(strided.contiguous(), 48, 64, exact=False)
    )
    assert masks_to_frame(logits.bfloat16(), 48, 64, exact=False).shape == (6, 48, 64)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the one-call path GPUs take, without a GPU
def test_no_objects_give_no_masks_on_any_device(device) -> None:
    masks = masks_to_frame(torch.zeros(0, 32, 32, device=device), 48, 64)
    assert masks.shape == (0, 48, 64) and masks.dtype == torch.bool


def test_resolve_overlaps_equals_the_argmax_rule() -> None:
    torch.manual_seed(0)
    masks = torch.rand(5, 40, 60) > 0.4
    scores = torch.tensor([0.3, 0.7, 0.3, 0.9, 0.1])
    ranked = torch.where(masks, scores.view(-1, 1, 1), torch.tensor(float("-inf")))
    expected = masks & (torch.arange(5).view(-1, 1, 1) == ranked.argmax(dim=0, keepdim=True))
    assert torch.equal(resolve_overlaps(masks, scores), expected)


def test_prompt_geometry_in_model_coordinates() -> None:
    prompt = Prompt(
        points=((80.0, 60.0),), point_labels=(0,), bounding_boxes=((0.5, 0.5, 0.5, 0.25),), bounding_box_labels=(1,)
    )
    [(coords, labels)] = prompt_to_model_points(prompt, 160, 120, 112)
    assert labels == [2, 3, 0]
    assert coords.tolist() == [[28.0, 42.0], [84.0, 70.0], [56.0, 56.0]]
    two_boxes = Prompt(bounding_boxes=((0.25, 0.25, 0.5, 0.5), (0.75, 0.75, 0.5, 0.5)), bounding_box_labels=(1, 1))
    assert [labels for _, labels in prompt_to_model_points(two_boxes, 160, 120, 112)] == [[2, 3], [2, 3]]


def test_clicks_and_boxes_are_scaled_exactly_as_transformers_processor_scales_them() -> None:
    """At 1280x720 most clicks land one float32 ulp apart unless scaled as the processor does (float32)."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    from models.hf_internals import points_processor

    width, height, size = 1280, 720, 1008
    rng = np.random.default_rng(0)
    clicks = [(float(x), float(y)) for x, y in zip(rng.uniform(0, width, 50), rng.uniform(0, height, 50), strict=True)]
    box_pixels = [137.3, 91.7, 1011.9, 655.1]  # x0, y0, x1, y1
    box = ((box_pixels[0] + box_pixels[2]) / 2 / width, (box_pixels[1] + box_pixels[3]) / 2 / height)
    box += ((box_pixels[2] - box_pixels[0]) / width, (box_pixels[3] - box_pixels[1]) / height)
    prompt = Prompt(
        points=tuple(clicks), point_labels=(1,) * len(clicks), bounding_boxes=(box,), bounding_box_labels=(1,)
    )
    [(ours, labels)] = prompt_to_model_points(prompt, width, height, size)

    session = Sam3TrackerVideoInferenceSession(dtype=torch.float32)
    points_processor(size).add_inputs_to_inference_session(
        session,
        frame_idx=0,
        obj_ids=[0],
        input_points=[[[list(c) for c in clicks]]],
        input_labels=[[[1] * len(clicks)]],
        input_boxes=[[box_pixels]],
        original_size=(height, width),
    )
    theirs = session.point_inputs_per_obj[0][0]
    assert torch.equal(ours[2:], theirs["point_coords"][0, 0, 2:]), "clicks differ"
    assert labels == theirs["point_labels"].flatten().tolist()
    # The box arrives normalized, so its pixel corners are rounded once more than the processor's input.
    assert torch.allclose(ours[:2], theirs["point_coords"][0, 0, :2], rtol=0, atol=1e-3)
