"""The generated shape scenes: deterministic, with ground truth that matches the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from models.demo_scenes import COLOURS, SHAPES, DemoScene, ObjectSpec, PanelSpec, Path1D, SceneSpec, random_spec


def test_a_scene_is_a_pure_function_of_seed_and_index():
    a, b = DemoScene.random(3, 320, 240), DemoScene.random(3, 320, 240)
    fa, fb = a.frame(17), b.frame(17)
    assert np.array_equal(fa.image, fb.image)
    assert [(i.obj_id, i.words) for i in fa.instances] == [(i.obj_id, i.words) for i in fb.instances]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(fa.instances, fb.instances, strict=True))
    assert not np.array_equal(DemoScene.random(4, 320, 240).frame(17).image, fa.image)
    assert fa.image.shape == (240, 320, 3) and fa.image.dtype == np.uint8


def test_masks_are_disjoint_visible_parts_with_words():
    for seed in range(6):
        scene = DemoScene.random(seed)
        for index in (0, 45, 200):
            shot = scene.frame(index)
            cover = np.zeros(shot.image.shape[:2], int)
            for inst in shot.instances:
                assert inst.mask.dtype == bool and inst.mask.any()
                assert inst.kind in SHAPES and inst.colour in COLOURS and inst.words == f"{inst.colour} {inst.kind}"
                cover += inst.mask
            assert cover.max() <= 1, "an occluded pixel belongs to the object in front only"


def test_many_scenes_hold_every_shape_same_kind_pairs_visitors_and_panels():
    specs = [random_spec(seed) for seed in range(40)]
    kinds = {o.kind for s in specs for o in s.objects}
    assert kinds == set(SHAPES)
    assert sum(s.objects[0].kind == s.objects[1].kind for s in specs if len(s.objects) >= 3) >= 10
    assert any(o.x.low < 0 for s in specs for o in s.objects), "some objects leave the frame and come back"
    assert sum(bool(s.panels) for s in specs) >= 15
    sizes = [o.size for s in specs for o in s.objects]
    assert min(sizes) < 60 < max(sizes), "sizes around the 60 px that must segment well"


def _scene(objects, panels=(), width=200, height=100) -> DemoScene:
    return DemoScene(SceneSpec(width, height, tuple(objects), tuple(panels), seed=1), fps=10)


def test_a_panel_hides_an_object_and_it_comes_back():
    still = ObjectSpec(0, "circle", "red", 30, Path1D(100, 0, 0, 200), Path1D(50, 0, 0, 100))
    # An 80 px vertical bar sweeping right at 100 px/s hides the whole circle from t=0.55 s to 1.05 s.
    bar = PanelSpec(True, 80, Path1D(20, 100, 20, 1000))
    scene = _scene([still], [bar])
    visible = [bool(scene.frame(i).instances) for i in range(0, 25)]
    assert visible[0] and visible[-1]
    assert not any(visible[6:11]), "fully behind the bar"
    assert visible[4] and visible[12], "partly hidden before and after"


def test_an_object_leaves_the_frame_and_returns():
    visitor = ObjectSpec(0, "star", "blue", 30, Path1D(100, 200, -150, 350), Path1D(50, 0, 0, 100))
    scene = _scene([visitor])  # right edge out at 0.6 s, bounces at x=350 (1.25 s), back in view at 1.9 s
    seen = [bool(scene.frame(i).instances) for i in range(0, 30)]
    assert seen[0] and not any(seen[7:18]) and all(seen[21:26])


def test_the_front_object_covers_the_one_behind():
    back = ObjectSpec(0, "square", "green", 60, Path1D(100, 0, 0, 200), Path1D(50, 0, 0, 100), depth=0)
    front = ObjectSpec(1, "circle", "white", 30, Path1D(100, 0, 0, 200), Path1D(50, 0, 0, 100), depth=1)
    shot = _scene([back, front]).frame(0)
    by_id = shot.by_id()
    assert by_id[1].mask[50, 100] and not by_id[0].mask[50, 100]
    assert by_id[0].area > by_id[1].area


def test_rings_have_holes_and_interior_points_land_on_the_object():
    ring = ObjectSpec(0, "ring", "yellow", 60, Path1D(100, 0, 0, 200), Path1D(50, 0, 0, 100))
    inst = _scene([ring]).frame(0).instances[0]
    assert not inst.mask[50, 100], "the hole is not part of the ring"
    x, y = inst.interior_point()
    assert inst.mask[y, x]


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="kind"):
        ObjectSpec(0, "hexagon", "red", 10, Path1D(0, 0, 0, 1), Path1D(0, 0, 0, 1))
    with pytest.raises(ValueError, match="colour"):
        ObjectSpec(0, "star", "teal", 10, Path1D(0, 0, 0, 1), Path1D(0, 0, 0, 1))
    with pytest.raises(ValueError, match="kinds"):
        random_spec(0, kinds=("circle", "blob"))
    with pytest.raises(ValueError, match="width, height"):
        DemoScene(SceneSpec(8, 8, ()))
