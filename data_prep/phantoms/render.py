"""The three phantom renderers (dermoscopy, ultrasound, X-ray) and their shared drawing helpers:
numpy over the pixel grid, every random draw from the ``rng`` passed in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_prep.phantoms.spec import Difficulty

# ----------------------------------------------------------------------------- rendering helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise ``[h, w]``: a ``cells`` grid of N(0,1) values, bicubic-upsampled."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64
    )


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable ``[1, w]`` and ``[h, 1]`` arrays."""
    return (np.arange(w, dtype=np.float64) + 0.5)[None, :], (np.arange(h, dtype=np.float64) + 0.5)[
        :, None
    ]


@dataclass(frozen=True)
class Blob:
    """An irregular ellipse: ``rho <= 1 + sum_k amp_k cos(k*theta + phase_k)`` in the frame of an
    ellipse with semi-axes (a, a*aspect) rotated by ``angle``; harmonics k = 2, 3, 5."""

    cx: float
    cy: float
    a: float  # semi-major axis, px
    aspect: float  # minor / major
    angle: float  # radians
    amps: tuple[float, float, float]
    phases: tuple[float, float, float]

    @property
    def radius(self) -> float:
        """Radius of a circle around (cx, cy) that contains the whole blob."""
        return self.a * (1.0 + sum(abs(x) for x in self.amps))

    def signed_depth(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """``boundary(theta) - rho`` on the grid ``[h, w]``: > 0 inside, 0 on the edge."""
        dx, dy = xx - self.cx, yy - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.a
        v = (-dx * s + dy * c) / (self.a * self.aspect)
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        boundary = 1.0
        for k, amp, phase in zip((2, 3, 5), self.amps, self.phases):
            boundary = boundary + amp * np.cos(k * theta + phase)
        return boundary - rho


def _alpha(depth: np.ndarray, softness: float) -> np.ndarray:
    """Soft silhouette in [0, 1]; ``alpha >= 0.5`` exactly where ``depth >= 0`` (the mask)."""
    return np.clip(0.5 + depth / softness, 0.0, 1.0)


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _random_shape(rng: np.random.Generator) -> dict[str, Any]:
    """Shape parameters shared by all views of one target (aspect, harmonics)."""
    return {
        "aspect": float(rng.uniform(0.65, 1.0)),
        "amps": tuple(float(x) for x in rng.uniform(0.0, 0.06, size=3)),
        "phases": tuple(float(x) for x in rng.uniform(0.0, 2 * math.pi, size=3)),
        "angle": float(rng.uniform(0.0, math.pi)),
    }


def _semi_major(
    diameter_frac: float, h: int, w: int, max_radius: float, amps: Sequence[float]
) -> float:
    """Semi-major axis in px from a diameter fraction, shrunk so the blob fits ``max_radius``."""
    a = 0.5 * diameter_frac * min(h, w)
    a = min(a, max_radius / (1.0 + sum(abs(x) for x in amps)))
    return max(a, 1.5)


def _place_in_box(
    rng: np.random.Generator, radius: float, h: int, w: int, margin: float
) -> tuple[float, float]:
    """A centre such that a circle of ``radius`` stays ``margin`` px inside the image."""
    lo_x, hi_x = radius + margin, w - radius - margin
    lo_y, hi_y = radius + margin, h - radius - margin
    cx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else w / 2
    cy = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else h / 2
    return cx, cy


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- dermoscopy


@dataclass(frozen=True)
class LesionLook:
    """Per-lesion constants (all photos of one lesion share them)."""

    shape: dict[str, Any]
    diameter_frac: float
    lesion_rgb: tuple[float, float, float]
    skin_rgb: tuple[float, float, float]


def lesion_look(rng: np.random.Generator, difficulty: Difficulty) -> LesionLook:
    lesion = np.array([0.45, 0.27, 0.17]) * rng.uniform(0.8, 1.15) + rng.uniform(-0.04, 0.04, 3)
    skin = np.array([0.90, 0.70, 0.60]) + rng.uniform(-0.05, 0.05, 3)
    return LesionLook(
        shape=_random_shape(rng),
        diameter_frac=float(rng.uniform(*difficulty.size_range)),
        lesion_rgb=tuple(float(x) for x in np.clip(lesion, 0, 1)),
        skin_rgb=tuple(float(x) for x in np.clip(skin, 0, 1)),
    )


def render_dermoscopy(
    rng: np.random.Generator, h: int, w: int, look: LesionLook, difficulty: Difficulty
) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like photo of ``look``: ``(rgb uint8 [h, w, 3], mask bool [h, w])``."""
    xx, yy = _pixel_grid(h, w)
    margin = 0.04 * min(h, w)
    shape = look.shape
    amps = shape["amps"]
    scale = float(rng.uniform(0.9, 1.1))  # another photo of the same lesion: zoom jitter
    a = _semi_major(look.diameter_frac * scale, h, w, 0.5 * min(h, w) - margin, amps)
    radius = a * (1.0 + sum(abs(x) for x in amps))
    cx, cy = _place_in_box(rng, radius, h, w, margin)
    blob = Blob(
        cx,
        cy,
        a,
        shape["aspect"],
        shape["angle"] + float(rng.normal(0, 0.3)),
        amps,
        shape["phases"],
    )
    depth = blob.signed_depth(xx, yy)  # [h, w]
    alpha = _alpha(depth, softness=0.25)

    skin_tex = (
        1.0 + 0.05 * _smooth_noise(rng, h, w, (5, 5)) + 0.025 * _smooth_noise(rng, h, w, (24, 24))
    )
    skin = np.asarray(look.skin_rgb)[None, None, :] * skin_tex[:, :, None]  # [h, w, 3]
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))  # 1 at the middle of each side
    skin = skin * (1.0 - 0.75 * np.clip((r - 1.05) / 0.35, 0.0, 1.0))[:, :, None]  # dark corners

    core = np.clip(depth, 0.0, 1.0)  # 0 at the edge, up to 1 in the middle
    blotch = 1.0 + 0.12 * _smooth_noise(rng, h, w, (8, 8))
    lesion = np.asarray(look.lesion_rgb)[None, None, :] * ((1.0 - 0.4 * core) * blotch)[:, :, None]

    weight = (difficulty.contrast * alpha)[:, :, None]
    img = skin * (1.0 - weight) + lesion * weight
    img = img + difficulty.noise * rng.standard_normal(img.shape)
    return _to_uint8(img), depth >= 0.0


# ----------------------------------------------------------------------------- ultrasound


@dataclass(frozen=True)
class _Fan:
    """Ultrasound sector: apex above the image, half opening angle, depth range (px)."""

    ax: float
    ay: float
    half_angle: float
    r_min: float
    r_max: float

    @classmethod
    def for_image(cls, h: int, w: int) -> _Fan:
        return cls(ax=w / 2, ay=-0.1 * h, half_angle=0.75, r_min=0.2 * h, r_max=1.15 * h)

    def contains_circle(
        self, cx: float, cy: float, radius: float, h: int, w: int, margin: float
    ) -> bool:
        """True if the circle lies inside the sector and inside the image (with ``margin``)."""
        dx, dy = cx - self.ax, cy - self.ay
        r = math.hypot(dx, dy)
        if r - radius < self.r_min + margin or r + radius > self.r_max - margin:
            return False
        if cy + radius > h - margin or cx - radius < margin or cx + radius > w - margin:
            return False
        # distance from the centre to each edge line through the apex (angle +-half from vertical)
        for sign in (-1.0, 1.0):
            ex, ey = math.sin(sign * self.half_angle), math.cos(self.half_angle)
            cross = dx * ey - dy * ex  # > 0 on one side of the line
            if sign * cross > -(radius + margin):  # must be on the inner side by radius + margin
                return False
        return True

    def mask(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(inside bool [h, w], depth fraction [h, w] in [0, 1])``."""
        dx, dy = xx - self.ax, yy - self.ay
        r = np.hypot(dx, dy)
        ang = np.arctan2(dx, dy)  # 0 straight down
        inside = (np.abs(ang) <= self.half_angle) & (r >= self.r_min) & (r <= self.r_max)
        return inside, np.clip((r - self.r_min) / (self.r_max - self.r_min), 0.0, 1.0)


def _place_nodules(
    rng: np.random.Generator,
    h: int,
    w: int,
    fan: _Fan,
    diameters: Sequence[float],
    shapes: Sequence[dict[str, Any]],
) -> list[Blob]:
    """Place ``len(diameters)`` nodules inside the fan, apart by a gap (rejection sampling)."""
    margin = 0.02 * min(h, w)
    gap = max(4.0, 0.04 * min(h, w))  # keeps two nodules separate even after JPEG
    blobs: list[Blob] = []
    for diameter, shape in zip(diameters, shapes):
        a = _semi_major(diameter, h, w, 0.45 * min(h, w), shape["amps"])
        for attempt in range(400):
            if attempt and attempt % 100 == 0:
                a = max(1.5, 0.85 * a)  # cannot fit: shrink and keep trying
            radius = a * (1.0 + sum(abs(x) for x in shape["amps"]))
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            if not fan.contains_circle(cx, cy, radius, h, w, margin):
                continue
            if any(math.hypot(cx - b.cx, cy - b.cy) < radius + b.radius + gap for b in blobs):
                continue
            blobs.append(
                Blob(cx, cy, a, shape["aspect"], shape["angle"], shape["amps"], shape["phases"])
            )
            break
        else:
            raise RuntimeError(f"could not place a nodule of diameter {diameter} in a {w}x{h} fan")
    return blobs


def render_ultrasound(
    rng: np.random.Generator, h: int, w: int, n_targets: int, difficulty: Difficulty
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One ultrasound-like frame: ``(gray uint8 [h, w], [mask bool [h, w] per nodule])``."""
    xx, yy = _pixel_grid(h, w)
    fan = _Fan.for_image(h, w)
    inside, depth_frac = fan.mask(xx, yy)
    shrink = 0.75 if n_targets > 1 else 1.0  # two nodules in one frame are smaller
    diameters = [float(rng.uniform(*difficulty.size_range)) * shrink for _ in range(n_targets)]
    shapes = [_random_shape(rng) for _ in range(n_targets)]
    blobs = _place_nodules(rng, h, w, fan, diameters, shapes)

    layers = 0.5 + 0.08 * _smooth_noise(rng, h, w, (6, 3))  # tissue layers, wider than tall
    hs, ws = max(2, h // 2), max(2, w // 2)
    # Rayleigh-distributed echo amplitude, square-root compressed (B-mode displays compress the
    # dynamic range), normalised to mean 1; drawn at half resolution for a ~2 px grain.
    envelope = np.hypot(rng.standard_normal((hs, ws)), rng.standard_normal((hs, ws)))
    compressed = np.sqrt(envelope) / 1.0779  # E[sqrt(Rayleigh(1))] = 2**0.25 * Gamma(1.25) = 1.0779
    speckle = np.asarray(
        Image.fromarray(compressed.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR),
        dtype=np.float64,
    )
    img = layers * speckle * (1.0 - 0.35 * depth_frac)
    masks: list[np.ndarray] = []
    for blob in blobs:
        depth = blob.signed_depth(xx, yy)
        img = img * (1.0 - 0.75 * difficulty.contrast * _alpha(depth, softness=0.2))  # hypoechoic
        masks.append(depth >= 0.0)
    img = img + difficulty.noise * rng.standard_normal(img.shape)
    img = np.where(inside, img, 0.0)
    return _to_uint8(img), masks


# ----------------------------------------------------------------------------- X-ray


def render_xray(
    rng: np.random.Generator, h: int, w: int, difficulty: Difficulty
) -> tuple[np.ndarray, np.ndarray]:
    """One lateral-foot-X-ray-like image: ``(gray uint8 [h, w], mask bool [h, w])``."""
    xx, yy = _pixel_grid(h, w)
    side = float(min(h, w))
    tissue = Blob(
        0.5 * w,
        0.62 * h,
        0.62 * max(h, w),
        0.55,
        float(rng.normal(-0.25, 0.08)),
        (0.03, 0.02, 0.01),
        tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 3)),
    )
    bone = Blob(
        0.45 * w + rng.normal(0, 0.03 * w),
        0.62 * h + rng.normal(0, 0.03 * h),
        0.36 * side,
        0.55,
        float(rng.normal(-0.2, 0.1)),
        (0.05, 0.03, 0.02),
        tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 3)),
    )
    tissue_a = _alpha(tissue.signed_depth(xx, yy), softness=0.15)
    bone_a = _alpha(bone.signed_depth(xx, yy), softness=0.1)
    theta = float(rng.uniform(0.0, math.pi))
    freq = float(rng.uniform(10.0, 16.0)) / side  # stripes per pixel
    warp = 2.0 * _smooth_noise(rng, h, w, (4, 4))
    stripes = 0.5 + 0.5 * np.sin(
        2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + warp
    )
    img = 0.07 + 0.25 * tissue_a + bone_a * (0.22 + 0.12 * stripes) + 0.04 * stripes * tissue_a

    margin = 0.05 * side
    shape = _random_shape(rng)
    a = _semi_major(
        float(rng.uniform(*difficulty.size_range)), h, w, 0.5 * side - margin, shape["amps"]
    )
    cx, cy = _place_in_box(rng, a * (1.0 + sum(shape["amps"])), h, w, margin)
    target = Blob(cx, cy, a, shape["aspect"], shape["angle"], shape["amps"], shape["phases"])
    depth = target.signed_depth(xx, yy)
    img = img + 0.3 * difficulty.contrast * _alpha(depth, softness=0.25) * (
        0.8 + 0.2 * stripes
    )  # denser
    img = img + difficulty.noise * rng.standard_normal(img.shape)
    return _to_uint8(img), depth >= 0.0
