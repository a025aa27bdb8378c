"""Frames decoded on demand: exact random access in every container, a bounded cache, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import frame_index_of, index_frames, write_video

from models.video_frames import VideoReadError, open_frames

COUNT = 60


@pytest.mark.parametrize(
    ("name", "codec"), [("a.mp4", "libx264"), ("a.mkv", "libx264"), ("a.mov", "libx264"), ("a.webm", "libvpx")]
)
def test_any_access_order_gives_the_frame_asked_for(tmp_path: Path, name: str, codec: str) -> None:
    path = write_video(tmp_path / name, index_frames(COUNT), codec=codec, gop=12)
    frames = open_frames(path, cache_frames=8)
    assert (len(frames), frames.width, frames.height, frames.fps) == (COUNT, 64, 48, 10.0)
    assert [frame_index_of(f) for f in frames] == list(range(COUNT))
    assert [frame_index_of(frames[i]) for i in reversed(range(COUNT))] == list(reversed(range(COUNT)))
    jumps = np.random.default_rng(0).integers(0, COUNT, 40).tolist()
    assert [frame_index_of(frames[i]) for i in jumps] == jumps
    assert frames.cached_count <= 8


def test_memory_and_work_stay_bounded_on_a_long_video(tmp_path: Path) -> None:
    count, gop, cache = 144, 24, 16
    frames = open_frames(write_video(tmp_path / "long.mp4", index_frames(count), gop=gop), cache_frames=cache)
    for i in range(count):  # forward: every frame decoded exactly once
        frames[i]
        assert frames.cached_count <= cache
    assert frames.decoded_count == count
    before = frames.decoded_count
    for i in reversed(range(count)):  # backward: one seek and at most a GOP of decoding per cache-full
        assert frame_index_of(frames[i]) == i
        assert frames.cached_count <= cache
    assert frames.decoded_count - before <= count * (1 + gop / cache)
    frames.close()


def test_jpeg_folder_is_ordered_by_frame_number(tmp_path: Path) -> None:
    for k, frame in enumerate(index_frames(12)):
        cv2.imwrite(str(tmp_path / f"{k}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = open_frames(tmp_path)
    assert len(frames) == 12  # 10.jpg after 9.jpg, not after 1.jpg
    assert [frame_index_of(frames[i]) for i in range(12)] == list(range(12))


def test_single_image_is_a_one_frame_video(tmp_path: Path) -> None:
    image = index_frames(6)[5]
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    frames = open_frames(tmp_path / "still.png")
    assert (len(frames), frames.width, frames.height) == (1, 64, 48)
    assert np.array_equal(frames[0], image)
    with pytest.raises(IndexError, match="out of range"):
        frames[1]


def test_unreadable_resources_say_why(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "junk.png").write_bytes(b"\x00not an image")
    (tmp_path / "clip.xyz").write_bytes(b"data")
    (tmp_path / "empty").mkdir()
    cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((2, 8193, 3), np.uint8))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "0.jpg"), np.zeros((10, 20, 3), np.uint8))
    cv2.imwrite(str(mixed / "1.jpg"), np.zeros((12, 20, 3), np.uint8))
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path / "junk.mp4": "cannot open as a video",
        tmp_path / "junk.png": "not a readable image",
        tmp_path / "clip.xyz": "unsupported file type '.xyz'",
        tmp_path / "empty": "no JPEG frames",
        tmp_path / "huge.png": "frames of 8193x2 are outside 1..8192 pixels a side",
    }
    for path, message in cases.items():
        with pytest.raises(VideoReadError, match=message):
            open_frames(path)
    frames = open_frames(mixed)
    with pytest.raises(VideoReadError, match="frame 1 is 20x12, the first frame is 20x10"):
        frames[1]
