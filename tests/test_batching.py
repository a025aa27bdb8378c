"""The batched tracker step gives exactly the per-object loop's answers (fp32, CPU), bit for bit.

One 300-frame stream, fed to two ``StreamingTracker``s that differ only in ``batch_objects``: text
concepts and clicked/boxed objects, added, corrected and removed mid-stream, several per frame.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import Sam3VideoModel

from models import Prompt, StreamingTracker, TrackerConfig
from models import hf_internals as hf
from models.tiny import moving_shapes, tiny_video_config

FRAMES = 300
W, H = 128, 96


def _click(x: float, y: float, obj_id: int | None = None) -> Prompt:
    return Prompt(points=((x, y),), point_labels=(1,), obj_id=obj_id)


def test_batched_objects_equal_the_per_object_loop_bit_for_bit(tiny_models) -> None:
    batched = StreamingTracker(tiny_models, TrackerConfig(batch_objects=True))
    alone = StreamingTracker(tiny_models, TrackerConfig(batch_objects=False))
    ran: list[int] = []

    def text_object() -> int | None:
        found = [i for i in batched.object_ids if batched.text.owns(i)]
        return found[0] if found else None

    def schedule(frame: int, tracker: StreamingTracker, text_target: int | None) -> list[int]:
        """The same operations on both trackers; returns the ids of the objects created."""
        created: list[int] = []
        if frame == 1:
            tracker.add_prompt(Prompt(text="person"))
        elif frame == 3:
            created += tracker.add_prompt(_click(30.0, 40.0))
            created += tracker.add_prompt(Prompt(bounding_boxes=((0.7, 0.3, 0.3, 0.3),), bounding_box_labels=(1,)))
        elif frame == 20:
            created += tracker.add_prompt(
                Prompt(bounding_boxes=((0.25, 0.7, 0.3, 0.3), (0.75, 0.75, 0.2, 0.2)), bounding_box_labels=(1, 1))
            )
        elif frame == 40:
            tracker.add_prompt(Prompt(points=((60.0, 50.0), (10.0, 10.0)), point_labels=(1, 0), obj_id=clicked[0]))
        elif frame == 50 and text_target is not None:
            tracker.add_prompt(_click(64.0, 48.0, obj_id=text_target))
        elif frame == 70 and text_target is not None:
            tracker.remove_object(text_target)
        elif frame == 90:
            tracker.remove_prompt("person")
        elif frame == 100:
            tracker.remove_object(clicked[1])
        elif frame == 120:
            created += tracker.add_prompt(_click(90.0, 30.0, obj_id=50))
        elif frame == 170:  # two corrections on one frame: refined as one batch
            tracker.add_prompt(_click(20.0, 70.0, obj_id=clicked[2]))
            tracker.add_prompt(_click(100.0, 80.0, obj_id=clicked[3]))
        elif frame == 230:  # a new object, a correction of another and a new concept on the same frame
            created += tracker.add_prompt(_click(50.0, 20.0))
            tracker.add_prompt(Prompt(points=((95.0, 35.0),), point_labels=(1,), obj_id=50))
            tracker.add_prompt(Prompt(text="red circle"))
        elif frame == 260:
            tracker.remove_object(clicked[0])
        elif frame == 280:
            tracker.remove_prompt("red circle")
        return created

    clicked: list[int] = []
    most_objects = 0
    start = time.perf_counter()
    for frame in range(FRAMES):
        text_target = text_object() if frame in (50, 70) else None
        if text_target is not None:
            ran.append(frame)
        created = [schedule(frame, tracker, text_target) for tracker in (batched, alone)]
        assert created[0] == created[1]
        clicked += created[0]
        image = moving_shapes(frame, W, H)
        ours, reference = batched.track(image), alone.track(image)
        got, expected = ours.by_id(), reference.by_id()
        assert sorted(got) == sorted(expected), f"frame {frame}: ids {sorted(got)} != {sorted(expected)}"
        for obj_id, obj in expected.items():
            assert np.array_equal(got[obj_id].mask, obj.mask), f"frame {frame}: mask of object {obj_id} differs"
            assert got[obj_id].score == obj.score, (
                f"frame {frame}: score of {obj_id}: {got[obj_id].score} != {obj.score}"
            )
            assert got[obj_id].label == obj.label
        most_objects = max(most_objects, len(got))
    assert ran == [50, 70], f"the text object's correction (50) and removal (70) should have run, ran: {ran}"
    print(f"{FRAMES} frames in {time.perf_counter() - start:.1f} s, at most {most_objects} objects at once")
    assert most_objects >= 6, f"the stream should batch several objects at once (at most {most_objects} seen)"


def test_shared_first_layer_equals_the_models_memory_attention_with_several_layers() -> None:
    """The restated forward (first layer's self-attention run once for all objects) gives the model's
    own memory attention bit for bit, also past the first layer (the tiny model has one; SAM 3 has four)."""
    config = tiny_video_config()
    config.tracker_config.memory_attention_num_layers = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tracker = Sam3VideoModel(config).tracker_model.eval()
    attention = tracker.memory_attention
    channels = tracker.hidden_dim
    height, width = tracker.backbone_feature_sizes[-1]
    gen = torch.Generator().manual_seed(1)
    objects, pointers = 5, 4
    current = torch.randn(height * width, 1, channels, generator=gen)
    current_pos = torch.randn(height * width, 1, channels, generator=gen)
    memory_tokens = 2 * height * width + pointers
    memory = torch.randn(memory_tokens, objects, 64, generator=gen)
    memory_pos = torch.randn(memory_tokens, objects, 64, generator=gen)
    with torch.inference_mode():
        ours = hf.memory_attention_on_one_frame(attention, current, current_pos, memory, memory_pos, pointers)
        theirs = attention(
            current_vision_features=current.expand(-1, objects, -1),
            current_vision_position_embeddings=current_pos.expand(-1, objects, -1),
            memory=memory,
            memory_posision_embeddings=memory_pos,
            num_object_pointer_tokens=pointers,
        )
        alone = attention(
            current_vision_features=current,
            current_vision_position_embeddings=current_pos,
            memory=memory[:, 2:3],
            memory_posision_embeddings=memory_pos[:, 2:3],
            num_object_pointer_tokens=pointers,
        )
    assert len(attention.layers) == 3
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:, 2:3], alone)
