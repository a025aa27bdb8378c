"""Measure a model on generated scenes through the streaming tracker, as a live user would run it.

- :func:`evaluate_single_frames`: one click or box per object on single frames: mask IoU.
- :func:`evaluate_clicks`: one click per object on the first frame it is clearly visible, then
  DAVIS-style J&F over the rest of the sequence, and whether each object keeps its id (frames it is
  found under its own id, swaps onto another object, returns after short and long absences).
- :func:`evaluate_text`: one text prompt (a shape word) from the first frame, then per-frame instance
  recall and precision at mask IoU 0.5 and the mean IoU of the matched instances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.demo_metrics import MIN_INSTANCE_AREA, InstanceCounts, match_instances, track_scores
from models.demo_scenes import DemoScene, Instance, SceneFrame
from models.loading import Sam3Models
from models.prompts import Prompt
from models.results import mask_iou
from models.streaming_tracker import StreamingTracker, TrackerConfig

# An object is clicked on the first frame where this much of it shows (pixels at 640 x 480, scaled).
CLICK_AREA = 600
# After an absence, the object counts as regained if its own id covers it within this many frames.
REGAIN_FRAMES = 5


def min_area(width: int, height: int, area_640x480: int = MIN_INSTANCE_AREA) -> int:
    """An area threshold given at 640 x 480, scaled to a frame of ``width`` x ``height``."""
    return max(4, round(area_640x480 * width * height / (640 * 480)))


def object_at(shot: SceneFrame, x: float, y: float) -> Instance | None:
    """The ground-truth object whose visible mask holds pixel ``(x, y)``, if any."""
    for inst in shot.instances:
        if inst.mask[int(y), int(x)]:
            return inst
    return None


def evaluate_single_frames(
    models: Sam3Models, scene: DemoScene, indices: list[int], prompt: str = "click"
) -> dict[str, Any]:
    """One click (``prompt="click"``, at the object's interior point) or one box (``"box"``, its true
    box) per object on single frames, each frame a fresh tracker: IoU of every object whose visible
    area is at least :data:`~models.demo_metrics.MIN_INSTANCE_AREA` (scaled), overall and by size."""
    width, height = scene.width, scene.height
    ious, sizes = [], []
    for index in indices:
        shot = scene.frame(index)
        tracker = StreamingTracker(models)
        targets = [inst for inst in shot.instances if inst.area >= min_area(width, height)]
        for inst in targets:
            if prompt == "click":
                tracker.add_prompt(
                    Prompt(points=(inst.interior_point(),), point_labels=(1,), obj_id=inst.obj_id),
                    frame_size=(width, height),
                )
            else:
                x0, y0, x1, y1 = inst.bbox()
                box = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)
                tracker.add_prompt(
                    Prompt(bounding_boxes=(box,), bounding_box_labels=(1,), obj_id=inst.obj_id),
                    frame_size=(width, height),
                )
        if not targets:
            continue
        predicted = {o.obj_id: o.mask for o in tracker.track(shot.image).objects}
        for inst in targets:
            ious.append(mask_iou(predicted.get(inst.obj_id, np.zeros_like(inst.mask)), inst.mask))
            sizes.append(scene.object_spec(inst.obj_id).size * 640 / width)
    by_size = {
        name: [iou for iou, size in zip(ious, sizes, strict=True) if lo <= size < hi]
        for name, (lo, hi) in {"under_45px": (0, 45), "45_to_75px": (45, 75), "over_75px": (75, 1e9)}.items()
    }
    return {
        "objects": len(ious),
        "iou": float(np.mean(ious)) if ious else float("nan"),
        "iou_median": float(np.median(ious)) if ious else float("nan"),
        "iou_by_size": {k: (float(np.mean(v)) if v else None) for k, v in by_size.items()},
        "ious": ious,
    }


@dataclass
class _Track:
    """What was measured for one clicked object."""

    obj_id: int
    first: int
    preds: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    swaps: int = 0


def evaluate_clicks(
    models: Sam3Models, scene: DemoScene, frames: int, config: TrackerConfig | None = None
) -> dict[str, Any]:
    """Click every object once (on its first clearly visible frame) and track it to the end.

    Returns J, F and J&F (means over objects of per-frame means, frames after the click), identity
    figures and the tracker's median time per frame.
    """
    tracker = StreamingTracker(models, config or TrackerConfig())
    width, height = scene.width, scene.height
    click_area = min_area(width, height, CLICK_AREA)
    visible_area = min_area(width, height)
    tracks: dict[int, _Track] = {}
    times = []
    empty = np.zeros((height, width), bool)
    for index in range(frames):
        shot = scene.frame(index)
        for inst in shot.instances:
            if inst.obj_id not in tracks and inst.area >= click_area:
                x, y = inst.interior_point()
                prompt = Prompt(points=((x, y),), point_labels=(1,), obj_id=inst.obj_id)
                tracker.add_prompt(prompt, frame_size=(width, height))
                tracks[inst.obj_id] = _Track(inst.obj_id, index)
        start = time.perf_counter()
        result = tracker.track(shot.image)
        times.append(time.perf_counter() - start)
        predicted = {o.obj_id: o.mask for o in result.objects}
        truth = shot.by_id()
        for track in tracks.values():
            if index == track.first:
                continue
            pred = predicted.get(track.obj_id, empty)
            track.preds.append(pred)
            track.truths.append(truth[track.obj_id].mask if track.obj_id in truth else empty)
            others = [t.mask for oid, t in truth.items() if oid != track.obj_id and t.area >= visible_area]
            if pred.any() and any(mask_iou(pred, other) > 0.5 for other in others):
                track.swaps += 1
    return _click_summary(list(tracks.values()), visible_area, scene.fps, times)


def _click_summary(tracks: list[_Track], visible_area: int, fps: float, times: list[float]) -> dict[str, Any]:
    per_object = []
    found = seen = 0
    short = {"absences": 0, "regained": 0}
    long = {"absences": 0, "regained": 0}
    for track in tracks:
        if not track.preds:
            continue
        scores = track_scores(track.preds, track.truths)
        per_object.append(
            {
                "obj_id": track.obj_id,
                "j": float(np.mean(scores.j)),
                "f": float(np.mean(scores.f)),
                "jf": scores.jf,
                "swaps": track.swaps,
            }
        )
        visible = [t.sum() >= visible_area for t in track.truths]
        ious = scores.j
        for k, shows in enumerate(visible):
            if shows:
                seen += 1
                found += ious[k] >= 0.5
        # Absences: runs of frames where it does not show, followed by a frame where it shows again.
        k = 0
        while k < len(visible):
            if visible[k]:
                k += 1
                continue
            end = k
            while end < len(visible) and not visible[end]:
                end += 1
            if end < len(visible) and k > 0:
                bucket = short if (end - k) <= fps else long
                bucket["absences"] += 1
                window = range(end, min(end + REGAIN_FRAMES, len(visible)))
                bucket["regained"] += any(visible[w] and ious[w] >= 0.5 for w in window)
            k = end
    jf = [o["jf"] for o in per_object]
    return {
        "objects": len(per_object),
        "j": float(np.mean([o["j"] for o in per_object])) if per_object else float("nan"),
        "f": float(np.mean([o["f"] for o in per_object])) if per_object else float("nan"),
        "jf": float(np.mean(jf)) if jf else float("nan"),
        "found_under_own_id": found / seen if seen else 1.0,
        "swaps": sum(o["swaps"] for o in per_object),
        "absences_up_to_1s": short,
        "absences_over_1s": long,
        "ms_per_frame_median": 1000 * float(np.median(times)) if times else float("nan"),
        "per_object": per_object,
    }


def evaluate_text(
    models: Sam3Models, scene: DemoScene, frames: int, word: str, config: TrackerConfig | None = None
) -> dict[str, Any]:
    """Prompt ``word`` from the first frame; per-frame instance recall, precision and matched mask IoU."""
    tracker = StreamingTracker(models, config or TrackerConfig())
    tracker.add_prompt(Prompt(text=word))
    scale = min_area(scene.width, scene.height) / MIN_INSTANCE_AREA
    counts = InstanceCounts()
    times = []
    for index in range(frames):
        shot = scene.frame(index)
        start = time.perf_counter()
        result = tracker.track(shot.image)
        times.append(time.perf_counter() - start)
        preds = [o.mask for o in result.objects if o.label == word]
        truths = [inst.mask for inst in shot.of_kind(word)]
        counts.add(match_instances(preds, truths, min_area=round(MIN_INSTANCE_AREA * scale)))
    return {
        "word": word,
        "recall": counts.recall,
        "precision": counts.precision,
        "matched_iou": counts.mean_iou,
        "instances": counts.truths,
        "predictions": counts.preds,
        "matched": counts.matched,
        "matched_iou_sum": counts.matched_iou,
        "ms_per_frame_median": 1000 * float(np.median(times)) if times else float("nan"),
    }
