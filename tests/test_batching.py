"""The batched tracker step gives the per-object loop's answers (fp32, CPU).

One 300-frame stream, fed to two ``StreamingTracker``s that differ only in ``batch_objects``: text
concepts and clicked/boxed objects, added, corrected and removed mid-stream, several per frame. The
batched step rounds differently in the last bits (batched matrix products, memory keys projected once,
channel norms by formula, OpenCV's upsampling), so a pixel whose logit is within about 1e-5 of zero may
flip: the same ids every frame, every score within 1e-4 every frame, every object's masks within IoU
0.999 of the loop's over the stream, and no frame's mask off by more than a few boundary pixels.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, Sam3VideoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from models import Prompt, StreamingTracker, TrackerConfig
from models import hf_internals as hf
from models.memory_attention import attend, kept_keys
from models.results import MaskAgreement
from models.tiny import moving_shapes, tiny_video_config

FRAMES = 300
W, H = 640, 480  # a camera's size: a flipped boundary pixel weighs what it weighs in use
CLICK_SCALE = W / 128  # the schedule's clicks are written on a 128 x 96 grid
MIN_STREAM_IOU = 0.999  # per object, intersections and unions summed over the stream
MAX_SCORE_GAP = 1e-4
MAX_FLIPPED_PIXELS = 64  # per mask and frame: boundary pixels only (a frame here has 307,200)


def _clicks(*points: tuple[float, float], labels: tuple[int, ...] = (1,), obj_id: int | None = None) -> Prompt:
    scaled = tuple((x * CLICK_SCALE, y * CLICK_SCALE) for x, y in points)
    return Prompt(points=scaled, point_labels=labels, obj_id=obj_id)


def _click(x: float, y: float, obj_id: int | None = None) -> Prompt:
    return _clicks((x, y), obj_id=obj_id)


def test_batched_objects_give_the_per_object_loops_answers(tiny_models) -> None:
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
            tracker.add_prompt(_clicks((60.0, 50.0), (10.0, 10.0), labels=(1, 0), obj_id=clicked[0]))
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
            tracker.add_prompt(_click(95.0, 35.0, obj_id=50))
            tracker.add_prompt(Prompt(text="red circle"))
        elif frame == 260:
            tracker.remove_object(clicked[0])
        elif frame == 280:
            tracker.remove_prompt("red circle")
        return created

    clicked: list[int] = []
    most_objects = 0
    widest_gap = 0.0
    agreement = MaskAgreement()
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
            flipped = int(np.count_nonzero(got[obj_id].mask != obj.mask))
            assert flipped <= MAX_FLIPPED_PIXELS, f"frame {frame}: mask of object {obj_id}: {flipped} pixels differ"
            score_gap = abs(got[obj_id].score - obj.score)
            assert score_gap <= MAX_SCORE_GAP, f"frame {frame}: score of {obj_id}: {got[obj_id].score} != {obj.score}"
            assert got[obj_id].label == obj.label
            widest_gap = max(widest_gap, score_gap)
        agreement.add(ours, reference)
        most_objects = max(most_objects, len(got))
    assert ran == [50, 70], f"the text object's correction (50) and removal (70) should have run, ran: {ran}"
    stream_iou = agreement.per_object()
    print(
        f"{FRAMES} frames in {time.perf_counter() - start:.1f} s, at most {most_objects} objects at once, "
        f"lowest stream IoU {min(stream_iou.values()):.6f}, lowest frame IoU {agreement.worst_frame_iou:.6f}, "
        f"widest score gap {widest_gap:.2e}"
    )
    assert all(iou >= MIN_STREAM_IOU for iou in stream_iou.values()), f"IoU over the stream per object: {stream_iou}"
    assert most_objects >= 6, f"the stream should batch several objects at once (at most {most_objects} seen)"


def _memory_attention_inputs(tracker, objects: int, pointers: int) -> tuple[torch.Tensor, ...]:
    """Random frame features and, per object, two memory frames (a conditioning frame and one 3
    frames back) and ``pointers`` object-pointer tokens: each object's ``ObjectMemory`` and the same
    memory as the model's forward takes it (``L x 1 x 64`` tokens and encodings)."""
    channels = tracker.hidden_dim
    tokens = tracker.backbone_feature_sizes[-1][0] * tracker.backbone_feature_sizes[-1][1]
    gen = torch.Generator().manual_seed(1)
    current = torch.randn(tokens, 1, channels, generator=gen)
    current_pos = torch.randn(tokens, 1, channels, generator=gen)
    temporal = tracker.memory_temporal_positional_encoding  # T x 1 x 1 x 64
    memories, flat = [], []
    for _ in range(objects):
        frames = [
            hf.MemoryFrame(index, torch.randn(tokens, 1, 64, generator=gen), torch.randn(tokens, 1, 64, generator=gen))
            for index in (-1, 2)
        ]
        tokens_p, pos_p = torch.randn(pointers, 1, 64, generator=gen), torch.randn(pointers, 1, 64, generator=gen)
        memories.append(hf.ObjectMemory(frames, tokens_p, pos_p))
        memory = torch.cat([f.features for f in frames] + [tokens_p])
        memory_pos = torch.cat([f.spatial_pos + temporal[f.temporal_index] for f in frames] + [pos_p])
        flat.append((memory, memory_pos))
    return current, current_pos, memories, flat


def _three_layer_tracker(attn_implementation: str = "sdpa"):
    config = tiny_video_config()
    config.tracker_config.memory_attention_num_layers = 3  # the tiny model has one; SAM 3 has four
    config.tracker_config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Sam3VideoModel(config).tracker_model.eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_memory_attention_with_keys_made_once_gives_the_models_forward(attn_implementation: str) -> None:
    """The restated memory attention (memory keys and values projected once, their temporal term added
    from a table, the first layer's start shared) gives the model's own forward for each object alone,
    within float32 rounding, past the first layer too, with either attention kernel."""
    tracker = _three_layer_tracker(attn_implementation)
    attention = tracker.memory_attention
    objects, pointers = 5, 4
    current, current_pos, memories, flat = _memory_attention_inputs(tracker, objects, pointers)
    with torch.inference_mode():
        ours = attend(attention, tracker.memory_temporal_positional_encoding, current, current_pos, memories, False)
        for i, (memory, memory_pos) in enumerate(flat):
            alone = attention(
                current_vision_features=current,
                current_vision_position_embeddings=current_pos,
                memory=memory,
                memory_posision_embeddings=memory_pos,
                num_object_pointer_tokens=pointers,
            )[0, 0]
            torch.testing.assert_close(ours[i], alone, atol=2e-5, rtol=1e-5)
            assert not torch.equal(ours[i], ours[(i + 1) % objects]), "objects with different memories must differ"


def test_memory_attention_runs_the_kernel_the_config_selects() -> None:
    """The restated cross-attention picks its kernel as transformers' forward does: a kernel registered
    under a new name and selected in the config is what runs, once per layer, for all objects at once."""
    calls: list[tuple[nn.Module, int]] = []

    def counting(module: nn.Module, query: torch.Tensor, *args, **kwargs):
        calls.append((module, query.shape[0]))
        return sdpa_attention_forward(module, query, *args, **kwargs)

    AttentionInterface.register("sam3_stream_counting", counting)
    tracker = _three_layer_tracker("sam3_stream_counting")
    attention = tracker.memory_attention
    current, current_pos, memories, _ = _memory_attention_inputs(tracker, objects=4, pointers=2)
    with torch.inference_mode():
        attend(attention, tracker.memory_temporal_positional_encoding, current, current_pos, memories, False)
    cross_attentions = {layer.cross_attn_image for layer in attention.layers}
    batches = [batch for module, batch in calls if module in cross_attentions]
    assert batches == [4, 4, 4], "one cross-attention call per layer, every object in it"


def test_kept_memory_keys_are_reused_and_released_with_their_frames() -> None:
    tracker = _three_layer_tracker()
    attention = tracker.memory_attention
    current, current_pos, memories, _ = _memory_attention_inputs(tracker, objects=3, pointers=2)
    store = kept_keys(attention)
    with torch.inference_mode():
        fresh = attend(attention, tracker.memory_temporal_positional_encoding, current, current_pos, memories, False)
        assert len(store) == 0, "keep=False keeps nothing"
        first = attend(attention, tracker.memory_temporal_positional_encoding, current, current_pos, memories, True)
        assert len(store) == 6  # 3 objects x 2 memory frames
        projections = store.get(memories[0].frames[0].features)
        again = attend(attention, tracker.memory_temporal_positional_encoding, current, current_pos, memories, True)
    assert torch.equal(first, fresh) and torch.equal(again, first)
    assert store.get(memories[0].frames[0].features) is projections, "a kept frame is not projected again"
    del memories, projections
    gc.collect()
    assert len(store) == 0, "projections must go with their memory frames"


def test_channel_norms_by_formula_only_inside_the_block_and_only_on_its_thread(tiny_models) -> None:
    tracker = tiny_models.video_model.tracker_model
    norm = tracker.mask_decoder.upscale_layer_norm  # channels-first
    features = torch.randn(3, norm.normalized_shape[0], 16, 16, generator=torch.Generator().manual_seed(2))
    channels_last = features.permute(0, 2, 3, 1)
    kernel = F.layer_norm(channels_last, norm.normalized_shape, norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    elsewhere: list[torch.Tensor] = []
    with torch.inference_mode():
        with hf.channel_norms_by_formula(tracker):
            inside = norm(features)
            other = threading.Thread(target=lambda: elsewhere.append(norm(features).detach()))
            other.start()
            other.join()
        after = norm(features)
    torch.testing.assert_close(inside, kernel, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, kernel), "outside the block the model's own kernel runs"
    assert torch.equal(elsewhere[0], kernel), "another thread's step is not switched"


def test_pointer_encodings_made_once_per_group_equal_each_objects_own(tiny_models) -> None:
    """The one exact piece of the batched step: reading several objects' memories at once (pointer
    encodings made in one call for objects whose pointers sit at the same offsets) gives each object
    bit for bit what reading it alone gives."""
    tracker = StreamingTracker(tiny_models, TrackerConfig())
    for x in (20.0, 60.0, 100.0):
        tracker.add_prompt(_click(x, 40.0), frame_size=(W, H))
    for frame in range(12):
        tracker.track(moving_shapes(frame, W, H))
    engine, model = tracker.geometry, tiny_models.video_model.tracker_model
    session, frame_idx = engine.session, engine.local(12)
    indices = list(range(len(engine.obj_ids)))
    with torch.inference_mode():
        together = hf.object_memories(model, session, indices, frame_idx, False, True)
        alone = [hf.object_memories(model, session, [i], frame_idx, False, True)[0] for i in indices]
    assert len(together) == 3 and together[0].layout[1] > 0, "objects tracked 12 frames read pointers"
    for group, single in zip(together, alone, strict=True):
        assert group.layout == single.layout
        assert all(
            a.features is b.features and a.temporal_index == b.temporal_index
            for a, b in zip(group.frames, single.frames, strict=True)
        )
        assert torch.equal(group.pointers, single.pointers) and torch.equal(group.pointer_pos, single.pointer_pos)
