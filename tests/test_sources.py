"""Frame sources read back real files (written with PyAV and OpenCV) and the synthetic scene."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import serve_folder, write_video

from models.demo_scenes import COLOURS
from streamer.sources import (
    ImageFolderSource,
    SourceError,
    SyntheticSource,
    VideoSource,
    open_source,
)


def write_greys(path: Path, n: int, width: int = 64, height: int = 48, fps: int = 10) -> None:
    """An mp4 whose frame k is a flat grey of level 20 * k (well apart after H.264 rounding)."""
    write_video(path, (np.full((height, width, 3), 20 * k, np.uint8) for k in range(n)), fps)


def grey_level(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / 20)


def write_images(folder: Path, levels: list[int], size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, level in enumerate(levels):
        # Names sort differently by plain string order (img10 < img2) and by natural order.
        cv2.imwrite(str(folder / f"img{k}.png"), np.full((size[1], size[0], 3), level, np.uint8))


# -- synthetic pattern ----------------------------------------------------------------------------


def test_synthetic_is_a_pure_function_of_the_index():
    a, b = SyntheticSource(160, 120, fps=30), SyntheticSource(160, 120, fps=30)
    frames = [a.read() for _ in range(5)]
    assert all(np.array_equal(frames[i], b.frame(i)) for i in range(5))
    assert np.array_equal(b.frame(3), b.frame(3))
    assert frames[0].shape == (120, 160, 3) and frames[0].dtype == np.uint8 and frames[0].flags.c_contiguous


def test_synthetic_shapes_move_and_are_drawn_where_the_ground_truth_says():
    src = SyntheticSource(320, 240, fps=30)
    first, later = src.scene_frame(0), src.scene_frame(15)
    assert len(first.instances) >= 4 and {i.kind for i in first.instances} >= {"circle", "square", "triangle"}
    assert not np.array_equal(src.frame(0), src.frame(15))
    moved = [
        np.abs(np.subtract(a.centroid(), b.centroid())).max() > 1
        for a, b in zip(first.instances, later.instances, strict=False)
        if a.obj_id == b.obj_id
    ]
    assert moved and all(moved)
    # Under each mask the pixels are the object's colour (up to lighting): nearest palette colour wins.
    palette = {name: np.array(rgb, float) for name, rgb in COLOURS.items()}
    checked = 0
    for i in (0, 7, 40, 300):
        shot = src.scene_frame(i)
        assert np.array_equal(shot.image, src.frame(i))
        for inst in shot.instances:
            if inst.area < 30:
                continue
            mean = shot.image[inst.mask].astype(float).mean(axis=0)
            hue = mean / max(mean.max(), 1)
            nearest = min(palette, key=lambda n: np.abs(hue - palette[n] / palette[n].max()).sum())
            assert nearest == inst.colour, (i, inst.obj_id, mean)
            checked += 1
    assert checked >= 12


def test_synthetic_motion_is_in_seconds_not_frames():
    slow, fast = SyntheticSource(160, 120, fps=10), SyntheticSource(160, 120, fps=40)
    a, b = slow.scene_frame(5), fast.scene_frame(20)
    assert [i.obj_id for i in a.instances] == [i.obj_id for i in b.instances]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.instances, b.instances, strict=True))


@pytest.mark.parametrize(
    "spec, size, fps",
    [
        ("synthetic", (640, 480), 30.0),
        ("synthetic:320x200", (320, 200), 30.0),
        ("synthetic:64x48@12.5", (64, 48), 12.5),
        ("Synthetic@15", (640, 480), 15.0),
    ],
)
def test_synthetic_spec_parsing(spec, size, fps):
    src = open_source(spec)
    assert isinstance(src, SyntheticSource) and (src.width, src.height) == size and src.fps == fps


def test_explicit_size_and_fps_override_the_synthetic_spec():
    src = open_source("synthetic:640x480@30", width=320, fps=5)
    assert src.read().shape == (240, 320, 3) and src.fps == 5


# -- video files ----------------------------------------------------------------------------------


def test_video_file_is_read_with_its_count_size_and_rate(tmp_path):
    path = tmp_path / "clip.mp4"
    write_greys(path, 7)
    with open_source(str(path)) as src:
        assert isinstance(src, VideoSource) and not src.live
        frames = list(src)
        assert src.fps == pytest.approx(10)
    assert [grey_level(f) for f in frames] == list(range(7))
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)


def test_video_file_loops(tmp_path):
    path = tmp_path / "clip.mp4"
    write_greys(path, 4)
    with open_source(str(path), loop=True) as src:
        levels = [grey_level(src.read()) for _ in range(10)]
    assert levels == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_video_file_resized_on_request(tmp_path):
    path = tmp_path / "clip.mp4"
    write_greys(path, 2)
    with open_source(str(path), width=32) as src:
        assert src.read().shape == (24, 32, 3)


def test_garbage_video_raises_source_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match="broken.mp4"):
        open_source(str(path))


def test_looping_video_deleted_on_disk_raises_source_error_at_restart(tmp_path):
    path = tmp_path / "clip.mp4"
    write_greys(path, 2)
    src = open_source(str(path), loop=True)
    src.read(), src.read()
    path.unlink()
    with pytest.raises(SourceError):
        src.read()


@pytest.fixture
def http_folder(tmp_path):
    """``tmp_path`` served over HTTP on loopback; yields (folder, base URL)."""
    with serve_folder(tmp_path) as url:
        yield tmp_path, url


def test_video_file_over_http_is_paced_and_looped_like_a_local_file(http_folder):
    folder, url = http_folder
    write_greys(folder / "clip.mp4", 3)
    with open_source(f"{url}/clip.mp4", loop=True) as src:
        assert isinstance(src, VideoSource) and not src.live and src.fps == pytest.approx(10)
        assert [grey_level(src.read()) for _ in range(5)] == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("path", ["/missing.mp4", "/junk.mp4"])
def test_unusable_url_raises_source_error(http_folder, path):
    folder, url = http_folder
    (folder / "junk.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(SourceError, match=path):
        open_source(url + path)


def test_refused_rtsp_connection_raises_source_error():
    with pytest.raises(SourceError, match="rtsp://127.0.0.1:9/"):
        open_source("rtsp://127.0.0.1:9/cam")


# -- image folders --------------------------------------------------------------------------------


def test_image_folder_in_natural_order_then_ends(tmp_path):
    levels = [10 * k for k in range(12)]
    write_images(tmp_path, levels)
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path), fps=12)
    assert isinstance(src, ImageFolderSource) and src.fps == 12
    assert [int(f[0, 0, 0]) for f in src] == levels
    assert src.read() is None


def test_image_folder_loops_and_defaults_to_30_fps(tmp_path):
    write_images(tmp_path, [10, 20, 30])
    src = open_source(str(tmp_path), loop=True)
    assert src.fps == 30
    assert [int(src.read()[0, 0, 0]) for _ in range(7)] == [10, 20, 30, 10, 20, 30, 10]


def test_image_folder_frames_share_the_first_image_size(tmp_path):
    write_images(tmp_path, [10], size=(40, 30))
    cv2.imwrite(str(tmp_path / "img1.png"), np.zeros((60, 80, 3), np.uint8))
    assert [f.shape for f in open_source(str(tmp_path))] == [(30, 40, 3), (30, 40, 3)]


def test_image_deleted_mid_stream_raises_source_error(tmp_path):
    write_images(tmp_path, [10, 20])
    src = open_source(str(tmp_path))
    src.read()
    (tmp_path / "img1.png").unlink()
    with pytest.raises(SourceError, match="img1.png"):
        src.read()


# -- bad specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("synthetic:big", "synthetic"),
        ("synthetic:640x", "synthetic"),
        ("synthetic:8x8", "16"),
        ("ftp://example.com/a.mp4", "scheme 'ftp'"),
        ("/definitely/not/here.mp4", "no such file"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        open_source(spec)


def test_empty_folder_is_a_value_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        open_source(str(tmp_path))


def test_missing_camera_raises_source_error():
    with pytest.raises(SourceError, match="camera"):
        open_source("97")
