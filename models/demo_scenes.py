"""Generated shape scenes with ground truth: what the ``demo`` model is trained and measured on.

A scene is a pure function of time: moving, rotating shapes (circle, square, triangle, star, ring, in
several colours and sizes) over a textured, drifting background, with shapes passing over each other
and behind sweeping panels, objects leaving the frame and coming back, same-kind shapes crossing,
lighting that changes and a shaking camera. Every frame comes with each visible instance's mask, id,
shape word and colour word. numpy and OpenCV only (no torch), so the capture process can draw it.

>>> scene = DemoScene.random(seed=7)          # 640 x 480 at 30 fps
>>> frame = scene.frame(42)                    # frame.image, frame.instances[k].mask / .obj_id / .kind
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 180, 70),
    "blue": (45, 95, 230),
    "yellow": (235, 205, 45),
    "purple": (150, 70, 205),
    "orange": (245, 135, 35),
    "white": (235, 235, 235),
}
# Every word a scene can name, for tokenizers and prompts.
SCENE_WORDS = SHAPES + tuple(COLOURS)

_SUBPIXEL_BITS = 4  # OpenCV draws with coordinates in 1/16 pixel
_SUBPIXEL = 1 << _SUBPIXEL_BITS


@dataclass(frozen=True)
class Path1D:
    """A coordinate bouncing between ``low`` and ``high`` at constant speed (px/s), plus a slow sway.

    Bounds beyond the frame edge make an object leave the frame and come back.
    """

    start: float
    speed: float
    low: float
    high: float
    sway: float = 0.0  # amplitude in px
    sway_hz: float = 0.0
    sway_phase: float = 0.0

    def at(self, t: float) -> float:
        span = self.high - self.low
        if span <= 0:
            base = self.low
        else:
            # A triangle wave: unfold the bounce into a 2*span period.
            u = (self.start - self.low + self.speed * t) % (2 * span)
            base = self.low + (u if u <= span else 2 * span - u)
        return base + self.sway * math.sin(2 * math.pi * self.sway_hz * t + self.sway_phase)


@dataclass(frozen=True)
class ObjectSpec:
    """One shape of a scene: what it is, how big (diameter in px), how it moves and spins, its depth.

    Objects with a higher ``depth`` are drawn over those with a lower one.
    """

    obj_id: int
    kind: str
    colour: str
    size: float
    x: Path1D
    y: Path1D
    spin: float = 0.0  # radians per second
    angle: float = 0.0
    depth: int = 0
    pulse: float = 0.0  # relative size change amplitude (approaching/receding)
    pulse_hz: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"kind: {self.kind!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour: {self.colour!r} is not one of {tuple(COLOURS)}")
        if self.size <= 0:
            raise ValueError(f"size: must be positive, got {self.size}")


@dataclass(frozen=True)
class PanelSpec:
    """An opaque bar sweeping across the frame (a pole, a passer-by): it hides whatever is behind it."""

    vertical: bool
    width: float
    position: Path1D
    shade: int = 70


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines a scene; :meth:`DemoScene.random` draws one from a seed."""

    width: int
    height: int
    objects: tuple[ObjectSpec, ...]
    panels: tuple[PanelSpec, ...] = ()
    seed: int = 0  # background texture and sensor noise
    shake_px: float = 0.0
    light_swing: float = 0.0  # relative brightness swing over time
    pan_px: float = 0.0  # background drift amplitude


@dataclass
class Instance:
    """One visible object on one frame: its id, words and visible mask (``H x W`` bool)."""

    obj_id: int
    kind: str
    colour: str
    mask: np.ndarray

    @property
    def words(self) -> str:
        """The noun phrase naming it, e.g. ``"red circle"``."""
        return f"{self.colour} {self.kind}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def bbox(self) -> tuple[int, int, int, int]:
        """Pixel ``(x0, y0, x1, y1)``, right/bottom exclusive."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    def interior_point(self) -> tuple[int, int]:
        """The visible pixel farthest from the mask's edge: where a person would click."""
        padded = np.pad(self.mask.astype(np.uint8), 1)
        distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        return int(x), int(y)


@dataclass
class SceneFrame:
    """One rendered frame: the RGB image and its visible instances (empty masks left out)."""

    index: int
    image: np.ndarray
    instances: list[Instance] = field(default_factory=list)

    def by_id(self) -> dict[int, Instance]:
        return {inst.obj_id: inst for inst in self.instances}

    def of_kind(self, kind: str) -> list[Instance]:
        return [inst for inst in self.instances if inst.kind == kind]


class DemoScene:
    """Render a :class:`SceneSpec` at any frame index (``t = index / fps``), with ground truth."""

    def __init__(self, spec: SceneSpec, fps: float = 30.0) -> None:
        if spec.width < 16 or spec.height < 16:
            raise ValueError(f"width, height: must be >= 16, got {spec.width}x{spec.height}")
        if fps <= 0:
            raise ValueError(f"fps: must be positive, got {fps}")
        self.spec = spec
        self.fps = float(fps)
        margin = int(math.ceil(spec.pan_px + spec.shake_px)) + 2
        self._margin = margin
        rng = np.random.default_rng([spec.seed, 1])
        size = (spec.height + 2 * margin, spec.width + 2 * margin)
        self._textures = (_texture(rng, size), _texture(rng, size))
        self._fade_hz = float(rng.uniform(0.02, 0.08))
        self._pan_hz = (float(rng.uniform(0.02, 0.06)), float(rng.uniform(0.02, 0.06)))
        self._shake = [(float(rng.uniform(1.5, 6.0)), float(rng.uniform(0, 2 * math.pi))) for _ in range(6)]
        self._light = (float(rng.uniform(0.05, 0.2)), float(rng.uniform(0, 2 * math.pi)))
        self._spot = (float(rng.uniform(0.03, 0.1)), float(rng.uniform(0, 2 * math.pi)))
        # A few noise frames reused in turn: sensor grain without drawing random numbers per frame.
        self._noise = [_grain(rng, spec.height, spec.width) for _ in range(4)]
        self._objects = sorted(spec.objects, key=lambda o: o.depth)

    @classmethod
    def random(cls, seed: int, width: int = 640, height: int = 480, fps: float = 30.0, **kwargs: int) -> DemoScene:
        """A scene drawn from ``seed`` (see :func:`random_spec` for ``min_objects`` / ``max_objects``)."""
        return cls(random_spec(seed, width, height, **kwargs), fps)

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def height(self) -> int:
        return self.spec.height

    def frame(self, index: int, with_masks: bool = True) -> SceneFrame:
        """Frame ``index``: the image and, unless ``with_masks`` is false, every visible instance."""
        spec = self.spec
        t = index / self.fps
        shake_x, shake_y = self._camera_shake(t)
        image = self._background(t, shake_x, shake_y)
        full_masks: list[tuple[ObjectSpec, np.ndarray]] = []
        for obj in self._objects:
            mask = np.zeros((spec.height, spec.width), np.uint8)
            window = _draw_shape(mask, obj, t, shake_x, shake_y, 1)
            if window is None or not mask[window].any():
                continue
            _paint(image, mask, window, obj, t)
            full_masks.append((obj, mask))
        cover = np.zeros((spec.height, spec.width), np.uint8)
        for panel in spec.panels:
            _draw_panel(image, cover, panel, t, shake_x, shake_y)
        image = self._lighting(image, t, index)
        instances: list[Instance] = []
        if with_masks:
            # From the top down: each object keeps the pixels nothing above it covers.
            for obj, mask in reversed(full_masks):
                visible = (mask > 0) & (cover == 0)
                cover |= mask
                if visible.any():
                    instances.append(Instance(obj.obj_id, obj.kind, obj.colour, visible))
            instances.sort(key=lambda inst: inst.obj_id)
        return SceneFrame(index, image, instances)

    def object_spec(self, obj_id: int) -> ObjectSpec:
        for obj in self.spec.objects:
            if obj.obj_id == obj_id:
                return obj
        raise KeyError(obj_id)

    # ------------------------------------------------------------------------------------ internals

    def _camera_shake(self, t: float) -> tuple[float, float]:
        amp = self.spec.shake_px
        if amp <= 0:
            return 0.0, 0.0
        (fx1, px1), (fx2, px2), (fx3, px3), (fy1, py1), (fy2, py2), (fy3, py3) = self._shake
        sx = 0.5 * math.sin(fx1 * t + px1) + 0.3 * math.sin(2.3 * fx2 * t + px2) + 0.2 * math.sin(4.1 * fx3 * t + px3)
        sy = 0.5 * math.sin(fy1 * t + py1) + 0.3 * math.sin(2.3 * fy2 * t + py2) + 0.2 * math.sin(4.1 * fy3 * t + py3)
        return amp * sx, amp * sy

    def _background(self, t: float, shake_x: float, shake_y: float) -> np.ndarray:
        spec, m = self.spec, self._margin
        ox = m + spec.pan_px * math.sin(2 * math.pi * self._pan_hz[0] * t) - shake_x
        oy = m + spec.pan_px * math.sin(2 * math.pi * self._pan_hz[1] * t + 1.0) - shake_y
        x0, y0 = int(round(ox)), int(round(oy))
        a, b = (tex[y0 : y0 + spec.height, x0 : x0 + spec.width] for tex in self._textures)
        fade = 0.5 + 0.5 * math.sin(2 * math.pi * self._fade_hz * t)
        return cv2.addWeighted(a, 1.0 - fade, b, fade, 0.0)

    def _lighting(self, image: np.ndarray, t: float, index: int) -> np.ndarray:
        spec = self.spec
        swing = spec.light_swing
        hz, phase = self._light
        gain = 1.0 + swing * math.sin(2 * math.pi * hz * t + phase)
        # A broad light spot drifting across the scene, on a coarse grid (cheap), then smoothly resized.
        sx, sphase = self._spot
        cx = 0.5 + 0.4 * math.sin(2 * math.pi * sx * t + sphase)
        cy = 0.5 + 0.3 * math.cos(2 * math.pi * sx * 0.7 * t + sphase)
        gy, gx = np.mgrid[0:12, 0:16].astype(np.float32)
        spot = np.exp(-(((gx / 15 - cx) / 0.45) ** 2 + ((gy / 11 - cy) / 0.45) ** 2))
        coarse = gain * (1.0 - 0.5 * swing + swing * spot)
        light = cv2.resize(coarse.astype(np.float32), (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
        # Saturating uint8 arithmetic (gain in 1/64 steps, then grain): several times faster than floats.
        gain_u8 = cv2.merge([np.clip(light * 64, 0, 255).astype(np.uint8)] * 3)
        out = cv2.multiply(image, gain_u8, scale=1 / 64)
        up, down = self._noise[index % len(self._noise)]
        return cv2.subtract(cv2.add(out, up), down)


def object_pose(obj: ObjectSpec, t: float) -> tuple[float, float, float, float]:
    """Centre ``(x, y)``, diameter and angle of ``obj`` at time ``t`` (before camera shake)."""
    scale = 1.0 + obj.pulse * math.sin(2 * math.pi * obj.pulse_hz * t)
    return obj.x.at(t), obj.y.at(t), obj.size * scale, obj.angle + obj.spin * t


def _outline(kind: str, cx: float, cy: float, diameter: float, angle: float) -> list[np.ndarray]:
    """Polygons (in 1/16 px) of a square, triangle or star; ``[]`` for round shapes."""
    r = diameter / 2
    if kind == "square":
        corner = 0.85 * r * math.sqrt(2)  # side 0.85 * diameter
        pts = [
            (
                cx + corner * math.cos(angle + math.pi / 4 + k * math.pi / 2),
                cy + corner * math.sin(angle + math.pi / 4 + k * math.pi / 2),
            )
            for k in range(4)
        ]
    elif kind == "triangle":
        pts = [
            (
                cx + r * math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3),
                cy + r * math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3),
            )
            for k in range(3)
        ]
    elif kind == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.48
            a = angle - math.pi / 2 + k * math.pi / 5
            pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    else:
        return []
    return [np.round(np.array(pts) * _SUBPIXEL).astype(np.int32)]


def _draw_shape(
    canvas: np.ndarray, obj: ObjectSpec, t: float, dx: float, dy: float, value: int
) -> tuple[slice, slice] | None:
    """Draw ``obj`` into ``canvas``; returns the window (rows, columns) it may cover, ``None`` when off-frame."""
    cx, cy, diameter, angle = object_pose(obj, t)
    cx, cy = cx + dx, cy + dy
    reach = diameter / 2 + 2
    height, width = canvas.shape[:2]
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    if obj.kind in ("circle", "ring"):
        centre = (int(round(cx * _SUBPIXEL)), int(round(cy * _SUBPIXEL)))
        cv2.circle(canvas, centre, int(round(diameter / 2 * _SUBPIXEL)), value, -1, cv2.LINE_8, _SUBPIXEL_BITS)
        if obj.kind == "ring":
            cv2.circle(canvas, centre, int(round(diameter * 0.27 * _SUBPIXEL)), 0, -1, cv2.LINE_8, _SUBPIXEL_BITS)
    else:
        cv2.fillPoly(canvas, _outline(obj.kind, cx, cy, diameter, angle), value, cv2.LINE_8, _SUBPIXEL_BITS)
    return slice(y0, y1), slice(x0, x1)


def _paint(image: np.ndarray, mask: np.ndarray, window: tuple[slice, slice], obj: ObjectSpec, t: float) -> None:
    """Fill the object's pixels with its colour, shaded along its angle so that spinning shows."""
    rows, cols = window
    ys, xs = np.nonzero(mask[window])
    ys, xs = ys + rows.start, xs + cols.start
    cx, cy, diameter, angle = object_pose(obj, t)
    along = ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / max(diameter, 1.0)
    shade = 1.0 + 0.25 * along
    colour = np.array(COLOURS[obj.colour], np.float32)
    image[ys, xs] = np.clip(shade[:, None] * colour, 0, 255).astype(np.uint8)


def _draw_panel(
    image: np.ndarray, cover: np.ndarray, panel: PanelSpec, t: float, shake_x: float, shake_y: float
) -> None:
    height, width = cover.shape
    centre = panel.position.at(t) + (shake_x if panel.vertical else shake_y)
    lo, hi = int(round(centre - panel.width / 2)), int(round(centre + panel.width / 2))
    extent = width if panel.vertical else height
    lo, hi = max(lo, 0), min(hi, extent)
    if hi <= lo:
        return
    region = (slice(None), slice(lo, hi)) if panel.vertical else (slice(lo, hi), slice(None))
    cover[region] = 1
    # Dark stripes across the bar: a textured occluder, not a flat shape.
    stripes = (np.arange(height if panel.vertical else width) // 6) % 2
    line = (panel.shade + 25 * stripes).astype(np.uint8)
    if panel.vertical:
        image[:, lo:hi] = line[:, None, None]
    else:
        image[lo:hi, :] = line[None, :, None]


def _grain(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sensor noise (sigma 3, grey) as the uint8 pair (added, subtracted) for saturating arithmetic."""
    noise = np.repeat(np.round(rng.normal(0.0, 3.0, (height, width, 1))), 3, axis=2)
    return np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted, textured background: blended noise at two scales, stripes or a checker, soft colour blobs."""
    height, width = size
    palette = rng.uniform(60, 170, (3, 3)).astype(np.float32)
    grey = palette.mean(axis=1, keepdims=True)
    palette = grey + 0.45 * (palette - grey)  # low saturation: shapes stand out by shape and colour
    weights = []
    for cells in (rng.integers(3, 7), rng.integers(10, 30)):
        small = rng.random((int(cells), int(cells * width / height) + 1, 3)).astype(np.float32)
        weights.append(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))
    mix = np.clip(0.65 * weights[0] + 0.35 * weights[1], 0, 1)
    mix = mix / mix.sum(axis=2, keepdims=True).clip(1e-3)
    image = mix @ palette
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = int(rng.integers(3))
    if pattern == 0:
        a = rng.uniform(0, math.pi)
        period = rng.uniform(12, 40)
        image += (12 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period))[..., None]
    elif pattern == 1:
        cell = int(rng.integers(16, 48))
        image += (14 * (((xx // cell) + (yy // cell)) % 2) - 7)[..., None]
    else:
        image += rng.normal(0, 9, (height, width, 1)).astype(np.float32)
    # Blurry saturated blobs: colour alone must not mean "object".
    for _ in range(int(rng.integers(0, 4))):
        blob = np.zeros((height, width), np.float32)
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), 15)[..., None]
        colour = np.array(list(COLOURS.values())[int(rng.integers(len(COLOURS)))], np.float32)
        image = image * (1 - 0.6 * blob) + 0.6 * blob * colour
    return np.clip(image, 0, 255).astype(np.uint8)


def random_spec(
    seed: int,
    width: int = 640,
    height: int = 480,
    min_objects: int = 2,
    max_objects: int = 6,
    kinds: tuple[str, ...] | None = None,
) -> SceneSpec:
    """Draw a scene: ``min_objects``..``max_objects`` shapes (or exactly ``kinds``), some staying in
    view, some visiting (leaving the frame and coming back), the first two of the same kind crossing
    paths (forced when there are three or more random shapes), up to two sweeping panels, camera
    shake and changing light.
    """
    if kinds is None and not 1 <= min_objects <= max_objects:
        raise ValueError(f"min_objects, max_objects: need 1 <= min <= max, got {min_objects}, {max_objects}")
    if kinds is not None and (not kinds or any(k not in SHAPES for k in kinds)):
        raise ValueError(f"kinds: give one or more of {SHAPES}, got {kinds!r}")
    rng = np.random.default_rng([seed, 0])
    unit = min(width, height)
    if kinds is None:
        count = int(rng.integers(min_objects, max_objects + 1))
        drawn = [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=count)]
        if count >= 3:
            drawn[1] = drawn[0]
        kinds = tuple(drawn)
    count = len(kinds)
    crossing = count >= 2 and kinds[1] == kinds[0]
    colours = list(COLOURS)
    depths = rng.permutation(count)
    objects = []
    for i, kind in enumerate(kinds):
        size = float(rng.uniform(0.09, 0.3) * unit)
        r = size / 2
        visiting = rng.random() < 0.3
        out = float(rng.uniform(0.3, 1.2) * unit) if visiting else 0.0
        speed = rng.uniform(0.08, 0.45) * unit
        heading = rng.uniform(0, 2 * math.pi)
        sway = float(rng.uniform(0, 0.04) * unit)
        x = Path1D(
            float(rng.uniform(r, width - r)),
            float(speed * math.cos(heading)),
            r - out,
            width - r + out,
            sway,
            float(rng.uniform(0.1, 0.5)),
            float(rng.uniform(0, 2 * math.pi)),
        )
        y = Path1D(
            float(rng.uniform(r, height - r)),
            float(speed * math.sin(heading)),
            r,
            height - r,
            sway,
            float(rng.uniform(0.1, 0.5)),
            float(rng.uniform(0, 2 * math.pi)),
        )
        if i == 1 and crossing:
            # Same kind as object 0, on the same horizontal band, heading the other way: they cross.
            x = Path1D(width - objects[0].x.start, -objects[0].x.speed or speed, r, width - r)
            y = Path1D(objects[0].y.start, 0.0, r, height - r, sway, 0.2)
        objects.append(
            ObjectSpec(
                obj_id=i,
                kind=kind,
                colour=colours[int(rng.integers(len(colours)))],
                size=size,
                x=x,
                y=y,
                spin=float(rng.uniform(-1.5, 1.5)),
                angle=float(rng.uniform(0, 2 * math.pi)),
                depth=int(depths[i]),
                pulse=float(rng.uniform(0, 0.15)),
                pulse_hz=float(rng.uniform(0.05, 0.3)),
            )
        )
    panels = []
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        vertical = bool(rng.random() < 0.7)
        extent = width if vertical else height
        bar = float(rng.uniform(0.06, 0.16) * unit)
        speed = float(rng.uniform(0.25, 0.6) * unit) * (1 if rng.random() < 0.5 else -1)
        far = float(rng.uniform(0.2, 1.0) * extent)  # time out of view between sweeps
        position = Path1D(float(rng.uniform(-far, extent + far)), speed, -far - bar, extent + far + bar)
        panels.append(PanelSpec(vertical, bar, position, shade=int(rng.integers(40, 110))))
    return SceneSpec(
        width=width,
        height=height,
        objects=tuple(objects),
        panels=tuple(panels),
        seed=seed,
        shake_px=float(rng.uniform(0, 0.012) * unit),
        light_swing=float(rng.uniform(0.05, 0.3)),
        pan_px=float(rng.uniform(0, 0.08) * unit),
    )
