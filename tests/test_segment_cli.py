"""``sam3-stream segment-video`` / ``segment-image`` end to end on files, with the tiny model from disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import CLIP_FRAMES

from streamer.cli import main
from streamer.protocol import rle_to_mask

W, H = 160, 120


def _decode(path: Path) -> tuple[str, list[np.ndarray]]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        return codec, [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _union(frame: dict) -> np.ndarray:
    union = np.zeros((H, W), bool)
    for obj in frame["objects"]:
        union |= rle_to_mask(obj["mask"], (H, W))
    return union


def test_segment_video_writes_the_drawn_video_and_every_frames_masks(
    clip: Path, tiny_folder: Path, tmp_path: Path, capsys
) -> None:
    out, masks = tmp_path / "out.mp4", tmp_path / "masks.json"
    argv = ["segment-video", str(clip), "--prompt", "person", "--points", "40,50", "--box", "100,20,150,60"]
    argv += ["--frame", "5", "-o", str(out), "--masks", str(masks), "--model", str(tiny_folder), "--device", "cpu"]
    assert main(argv) == 0
    assert f"wrote {out} ({CLIP_FRAMES} frame(s), 160x120" in capsys.readouterr().out

    codec, frames = _decode(out)
    assert codec == "h264" and len(frames) == CLIP_FRAMES and frames[0].shape == (H, W, 3)
    data = json.loads(masks.read_text())
    assert (data["width"], data["height"], data["fps"], data["num_frames"]) == (W, H, 10.0, CLIP_FRAMES)
    assert data["prompts"][0] == {"text": "person"} and data["prompts"][2]["bounding_box_labels"] == [1]
    assert [f["frame_index"] for f in data["frames"]] == list(range(CLIP_FRAMES))
    _, source = _decode(clip)
    for drawn, original, frame in zip(frames, source, data["frames"], strict=True):
        clicked_and_boxed = [o for o in frame["objects"] if o["label"] is None]
        assert len(clicked_and_boxed) == 2, "the clicked and the boxed object are on every frame"
        union = _union(frame)
        tinted = np.abs(drawn.astype(int) - original.astype(int)).sum(axis=2) > 40
        assert tinted[union].mean() > 0.5, "drawn where the masks are"


def test_no_overlay_writes_the_masks_themselves(clip: Path, tiny_folder: Path, tmp_path: Path) -> None:
    out, masks = tmp_path / "mask.mp4", tmp_path / "masks.json"
    argv = ["segment-video", str(clip), "--points", "40,50", "120,30", "--negative-points", "80,90"]
    argv += ["--no-overlay", "-o", str(out), "--masks", str(masks), "--model", str(tiny_folder), "--device", "cpu"]
    assert main(argv) == 0
    _, frames = _decode(out)
    data = json.loads(masks.read_text())
    assert data["prompts"] == [{"points": [[40.0, 50.0], [120.0, 30.0], [80.0, 90.0]], "point_labels": [1, 1, 0]}]
    for frame, entry in zip(frames, data["frames"], strict=True):
        white = frame.mean(axis=2) > 127
        assert (white == _union(entry)).mean() > 0.97  # H.264 blurs the edges a little


def test_segment_image(tiny_folder: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), np.full((H, W, 3), 90, np.uint8))
    drawn, mask, masks = tmp_path / "drawn.png", tmp_path / "mask.png", tmp_path / "masks.json"
    common = [str(photo), "--points", "40,50", "--model", str(tiny_folder), "--device", "cpu"]
    assert main(["segment-image", *common, "-o", str(drawn)]) == 0
    assert main(["segment-image", *common, "-o", str(mask), "--masks", str(masks), "--no-overlay"]) == 0
    assert cv2.imread(str(drawn)).shape == (H, W, 3)
    entry = json.loads(masks.read_text())["frames"][0]
    assert [o["obj_id"] for o in entry["objects"]] == [0]
    assert np.array_equal(cv2.imread(str(mask))[:, :, 0] == 255, _union(entry))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["segment-video", "/no/such/clip.mp4", "--prompt", "dog"], "resource_path: /no/such/clip.mp4: no such file"),
        (["segment-video", "CLIP", "--points", "500,20"], r"points: \(500, 20\) lies outside the 160x120 frame"),
        (["segment-video", "CLIP"], "prompt: give --prompt TEXT, --points or --box"),
        (["segment-video", "CLIP", "--prompt", "dog", "--frame", "99"], "frame_index: frame 99 is out of range"),
        (["segment-image", "CLIP", "--prompt", "dog"], "source: .* is a video \\(24 frames\\); use segment-video"),
    ],
)
def test_bad_inputs_fail_with_one_line(
    argv: list[str], message: str, clip: Path, tiny_folder: Path, tmp_path: Path, capsys
) -> None:
    argv = [str(clip) if a == "CLIP" else a for a in argv]
    out = tmp_path / ("out.png" if argv[0] == "segment-image" else "out.mp4")
    assert main([*argv, "-o", str(out), "--model", str(tiny_folder), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"sam3-stream {argv[0]}: error: ")
    assert re.search(message, error), error


def test_errors_exit_without_a_traceback(clip: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "streamer.cli", "segment-video", str(clip), "--prompt", "dog"]
    bad_output = subprocess.run(
        [*command, "-o", str(tmp_path / "out.avi"), "--model", "tiny-random"], capture_output=True, text=True, env=env
    )
    assert bad_output.returncode == 1
    assert bad_output.stderr.strip().splitlines()[-1] == (
        f"sam3-stream segment-video: error: output: {tmp_path / 'out.avi'} must end in .mp4, .mov, .mkv"
    )
    assert "Traceback" not in bad_output.stderr
    bad_points = subprocess.run([*command, "--points", "1;2", "-o", "x.mp4"], capture_output=True, text=True, env=env)
    assert bad_points.returncode == 2 and "expected X,Y in pixels, got '1;2'" in bad_points.stderr


def test_a_progress_callback_can_stop_a_job(predictor, clip: Path, tmp_path: Path) -> None:
    from streamer.segment import FilePrompt, ObjectPrompt, segment_video

    class Cancelled(Exception):
        pass

    def progress(done: int, total: int) -> None:
        assert total == CLIP_FRAMES
        if done == 3:
            raise Cancelled

    prompt = FilePrompt(objects=(ObjectPrompt(points=((40, 50),), point_labels=(1,)),))
    open_before = set(predictor.session_ids)
    with pytest.raises(Cancelled):
        segment_video(predictor, clip, tmp_path / "out.mp4", prompt, progress=progress)
    assert set(predictor.session_ids) == open_before  # the job's session was closed
