"""Pre- and post-processing without torchvision, on the model's device.

SAM 3 sees a square ``S x S`` image (1008 for the real model): resized from any frame size and
aspect, scaled to [0, 1], then normalized with mean = std = 0.5. Masks come back at a low
resolution and are upsampled to the frame's own size; boxes are read off the final masks.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.prompts import Prompt


def frame_to_pixels(frame: np.ndarray, image_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> ``1 x 3 x S x S`` normalized pixels on ``device``.

    The uint8 frame crosses to the device first (4x fewer bytes than float), then everything runs there.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(frame)).to(device, non_blocking=True)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).float()
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    pixels = (pixels / 255.0 - 0.5) / 0.5
    return pixels.to(dtype)


# On CPU masks are upsampled a few at a time so the float intermediate stays cache-sized: 32 masks at
# 640x480 in one call take 20 ms on this project's 2-core box, in groups of about 4 MB 12 ms. Each mask is
# interpolated on its own either way, so the result is the same bit for bit.
_CPU_CHUNK_BYTES = 4 << 20


def masks_to_frame(low_res_logits: torch.Tensor, height: int, width: int, exact: bool = True) -> torch.Tensor:
    """``N x h x w`` mask logits -> ``N x H x W`` boolean masks at the frame's resolution.

    ``exact`` upsamples with PyTorch's bilinear kernel, as transformers' processors do, so masks equal
    theirs bit for bit. ``exact=False`` upsamples CPU logits with OpenCV instead (see ``_masks_to_frame_opencv``).
    """
    count = low_res_logits.shape[0]
    out = torch.empty(count, height, width, dtype=torch.bool, device=low_res_logits.device)
    if count == 0:
        return out
    if not exact and out.device.type == "cpu":
        _masks_to_frame_opencv(low_res_logits, out)
        return out
    chunk = count if out.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // (4 * height * width))
    for start in range(0, count, chunk):
        logits = low_res_logits[start : start + chunk].unsqueeze(1).float()
        upsampled = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        torch.gt(upsampled.squeeze(1), 0, out=out[start : start + chunk])
    return out


def _masks_to_frame_opencv(low_res_logits: torch.Tensor, out: torch.Tensor) -> None:
    """Fill the CPU tensor ``out`` with ``low_res_logits`` upsampled by OpenCV and thresholded at 0.

    OpenCV's bilinear resize samples at pixel centres as PyTorch's ``align_corners=False`` does and is
    about 7x faster on one-channel maps (32x32 -> 640x480: 0.11 ms against 0.8 ms on one core of this
    project's box), which at 8 objects is a fifth of a tiny model's frame. It rounds differently in
    the last bits (at most ~1e-5 apart on unit-scale logits), so a pixel whose logit is that close to
    zero may fall on the other side: 2 of 2.4 million pixels on random logits.
    """
    height, width = out.shape[1:]
    source = np.ascontiguousarray(low_res_logits.detach().float().numpy())
    target = out.numpy()
    for i in range(source.shape[0]):
        np.greater(cv2.resize(source[i], (width, height), interpolation=cv2.INTER_LINEAR), 0, out=target[i])


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``N x H x W`` boolean masks -> (``N x 4`` integer pixel boxes ``(x0, y0, x1, y1)`` with
    right/bottom exclusive, ``N`` booleans "mask not empty"). Empty masks get an all-zero box.

    Row and column profiles come from ``amax`` over a uint8 view: many times faster than ``any``
    on bool tensors on CPU, and the rest works on those short profiles.
    """
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device), torch.zeros(
            0, dtype=torch.bool, device=masks.device
        )
    as_bytes = masks.view(torch.uint8)
    rows = as_bytes.amax(dim=2).bool()
    cols = as_bytes.amax(dim=1).bool()
    visible = rows.any(dim=1)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    big = max(height, width) + 1
    y0 = torch.where(rows, ys, big).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x0 = torch.where(cols, xs, big).min(dim=1).values
    x1 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(visible.unsqueeze(1), boxes, torch.zeros_like(boxes)), visible


def resolve_overlaps(masks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Give each pixel claimed by several masks to the highest-scoring one (SAM 3's non-overlap rule;
    ties go to the earlier object).

    Walks the objects from best to worst, each keeping only pixels no better object took: N passes
    of boolean ops instead of an argmax across objects, which is slow on CPU.
    """
    if masks.shape[0] < 2:
        return masks
    order = sorted(range(masks.shape[0]), key=lambda i: (-float(scores[i]), i))
    out = torch.empty_like(masks)
    claimed = torch.zeros_like(masks[0])
    for i in order:
        out[i] = masks[i] & ~claimed
        claimed |= masks[i]
    return out


def resolve_overlaps_per_label(masks: torch.Tensor, scores: torch.Tensor, labels: list[str | None]) -> torch.Tensor:
    """Settle overlapping pixels among the objects of the same concept (SAM 3 does so per prompt)."""
    out = masks.clone()
    for label in set(labels):
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab == label], device=masks.device)
        out[idx] = resolve_overlaps(masks[idx], scores[idx])
    return out


def prompt_to_model_points(
    prompt: Prompt, width: int, height: int, image_size: int
) -> list[tuple[torch.Tensor, list[int]]]:
    """Prompt geometry -> one ``(coords n x 2, labels)`` per object, in model input coordinates.

    Pixels are scaled to the model's square input exactly as transformers' SAM 3 processor scales
    them: float32 coordinates times ``image_size / side``, in float32. A box becomes its two pixel
    corners, scaled the same way, with labels 2 and 3 placed before the clicks, as SAM's prompt
    encoder expects. Several boxes without clicks make one object each.
    """

    def to_model(pixel_xy: list[tuple[float, float]]) -> torch.Tensor:
        coords = torch.tensor(pixel_xy, dtype=torch.float32).reshape(-1, 2)
        coords[:, 0] = coords[:, 0] * (image_size / width)
        coords[:, 1] = coords[:, 1] * (image_size / height)
        return coords

    def corners(box: tuple[float, float, float, float]) -> torch.Tensor:
        cx, cy, w, h = box
        return to_model([((cx - w / 2) * width, (cy - h / 2) * height), ((cx + w / 2) * width, (cy + h / 2) * height)])

    if prompt.points:
        clicks = to_model(list(prompt.points))
        if not prompt.bounding_boxes:
            return [(clicks, list(prompt.point_labels))]
        return [(torch.cat([corners(prompt.bounding_boxes[0]), clicks]), [2, 3, *prompt.point_labels])]
    return [(corners(box), [2, 3]) for box in prompt.bounding_boxes]
