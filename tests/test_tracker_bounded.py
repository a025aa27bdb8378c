"""Over a long stream with re-prompts and detection churn, state and per-frame time stay flat."""

from __future__ import annotations

import statistics
import time

from models import Prompt, StreamingTracker, TrackerConfig
from models import hf_internals as hf
from models.tiny import moving_shapes

FRAMES = 3000
W, H = 96, 72


def test_state_and_frame_time_stay_flat_over_3000_frames(tiny_models) -> None:
    tracker = StreamingTracker(tiny_models, TrackerConfig(max_conditioning_frames=4, retire_after_frames=30))
    tracker.track(moving_shapes(0, W, H))
    tracker.add_prompt(Prompt(points=((30.0, 36.0),), point_labels=(1,)))
    tracker.add_prompt(Prompt(text="person"))
    state_at: dict[int, int] = {}
    frame_times: list[float] = []
    ids_seen: set[int] = set()
    # Everything repeats every 900 frames (prompt schedule 300, frame content 36), so frames 300 and
    # 3000 hold the same objects in the same situation: any difference is growth with stream length.
    for frame in range(1, FRAMES + 1):
        geometry_ids = [i for i in tracker.object_ids if tracker.geometry.owns(i)]
        if frame % 50 == 0 and geometry_ids:  # a correction click: one more conditioning frame each time
            tracker.add_prompt(Prompt(points=((40.0, 30.0),), point_labels=(1,), obj_id=geometry_ids[0]))
        if frame % 300 == 150:  # re-prompt the concept: its objects go, new ones are detected with new ids
            tracker.remove_prompt("person")
            tracker.add_prompt(Prompt(text="person"))
        if frame % 150 == 100 and geometry_ids:  # replace the clicked object
            tracker.remove_object(geometry_ids[0])
            tracker.add_prompt(Prompt(bounding_boxes=((0.5, 0.5, 0.4, 0.4),), bounding_box_labels=(1,)))
        start = time.perf_counter()
        result = tracker.track(moving_shapes(frame, W, H), timestamp=frame / 30)  # a 30 fps camera: a steady ring
        frame_times.append(time.perf_counter() - start)
        ids_seen.update(o.obj_id for o in result.objects)
        if frame in (300, FRAMES):
            state_at[frame] = tracker.state_bytes()

    assert len(ids_seen) > 10, "the stream should have churned through many object ids"
    for engine in (tracker.geometry, tracker.text):
        for outputs in hf.all_object_outputs(engine.session):
            assert len(outputs["cond_frame_outputs"]) <= 4
            assert len(outputs["non_cond_frame_outputs"]) <= 15 + len(tracker.ring)  # + the prompt ring's history
        assert hf.frame_window(engine.session).stored() == 1
    assert abs(state_at[FRAMES] - state_at[300]) <= 0.05 * state_at[300], state_at
    early = statistics.median(frame_times[300:800])
    late = statistics.median(frame_times[-500:])
    assert late < 1.5 * early, f"per-frame time grew: median {early * 1e3:.1f} ms early, {late * 1e3:.1f} ms late"
