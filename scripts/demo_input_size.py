#!/usr/bin/env python
"""Why the demo model sees 224 px: the best IoU a mask at each input size can reach, per shape and size.

SAM 3 predicts masks at 4 x (input / 14) cells a side (32 at 112 px, 64 at 224 px) and upsamples them to
the frame. Even a perfect low-resolution prediction (each cell's logit from the true fraction of the
cell the object covers) loses the parts of a shape finer than a cell once upsampled. This prints, for
shapes 40, 60 and 100 px across in a 640 x 480 frame, that ceiling at several input sizes, as JSON
(last line). The trained model's own IoU by object size is in the trainer's validation lines.

    python scripts/demo_input_size.py --sizes 112,168,224,280,336
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from models.demo_scenes import SHAPES, DemoScene, ObjectSpec, Path1D, SceneSpec
from models.results import mask_iou


def ceiling(mask: np.ndarray, image_size: int, patch: int = 14) -> float:
    """IoU of the best mask a ``4 * image_size / patch`` square logit grid can give once upsampled."""
    cells = 4 * image_size // patch
    truth = torch.from_numpy(mask).float()[None, None]
    fraction = F.interpolate(truth, size=(cells, cells), mode="area")
    logits = torch.logit(fraction.clamp(1e-3, 1 - 1e-3))
    height, width = mask.shape
    up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0, 0] > 0
    return mask_iou(up.numpy(), mask)


def shape_mask(kind: str, diameter: float, angle: float = 0.3) -> np.ndarray:
    """The mask of one shape ``diameter`` px across, centred in a plain 640 x 480 frame."""
    spec = ObjectSpec(0, kind, "red", diameter, Path1D(320, 0, 0, 640), Path1D(240, 0, 0, 480), angle=angle)
    return DemoScene(SceneSpec(640, 480, (spec,))).frame(0).instances[0].mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="112,168,224,280,336", help="input sizes (multiples of 14)")
    parser.add_argument("--diameters", default="40,60,100", help="object sizes in px of a 640 x 480 frame")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    diameters = [int(d) for d in args.diameters.split(",")]
    table = {}
    for size in sizes:
        row = {}
        for diameter in diameters:
            per_shape = {kind: round(ceiling(shape_mask(kind, diameter), size), 3) for kind in SHAPES}
            row[f"{diameter}px"] = {**per_shape, "mean": round(float(np.mean(list(per_shape.values()))), 3)}
        table[str(size)] = row
    print(json.dumps({"ceiling_iou_by_input_size": table}))


if __name__ == "__main__":
    main()
