"""Synthetic "phantom" datasets written in each real dataset's ON-DISK LAYOUT (PAPER.md §7).

The embedded default has no real data, so these phantoms stand in for it; because they use the
real layouts, the real converters (``data_prep.ham10000`` / ``tn3k`` / ``heel``) run end to end.

Layouts (``make_phantom(kind, out_dir, ...)``)
----------------------------------------------
- ``ham10000``: ``ISIC_XXXXXXX.jpg``, ``ISIC_XXXXXXX_segmentation.png`` (0/255) and
  ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization``); several
  photos per lesion (``images_per_lesion``), each a jittered view of the same lesion.
- ``tn3k``: ``trainval-image/NNNN.jpg``, ``trainval-mask/NNNN.jpg`` (JPEG masks: lossy),
  ``test-image/``, ``test-mask/``, ``tn3k-trainval-fold{0..4}.json`` (``{"train", "val"}``
  image numbers, which are also the positions in the sorted trainval list); a fraction
  ``multi_target_frac`` (default 0.12, near the real test set's share of multi-nodule masks;
  ``data_prep.tn3k`` gives that share and how it is counted) of the masks hold two nodules.
- ``heel``: ``images/heel_NNNNN.png`` and ``annotations.jsonl`` (``{"image", "bbox"}``, pixel xyxy)
  or ``annotations.csv`` (``image,x1,y1,x2,y2``); with ``heel_annotation="mask"`` it writes
  ``masks/heel_NNNNN.png`` and rows ``{"image", "mask"}`` instead.
Each folder also gets ``phantom.json`` (generator parameters and counts); converters ignore it.

Appearance
----------
- dermoscopy (ham10000): brown lesion with a darker core and a soft edge on textured skin, dark
  dermatoscope corners;
- ultrasound (tn3k): Rayleigh speckle inside a sector (fan), depth attenuation, a dark
  (hypoechoic) nodule;
- X-ray (heel): dark background, soft-tissue and bone densities with striped trabecular texture,
  a small denser target.

Difficulty (``Difficulty``): ``size_range`` = the target's nominal major diameter as a fraction of
the SHORTER image side; ``contrast`` in [0, 1] scales how far the target's intensity/colour moves
away from the background (1 = the modality's full contrast); ``noise`` = standard deviation of
additive Gaussian noise in [0, 1] intensity units. Two presets per kind: ``"easy"`` (large,
high-contrast targets: the stand-in pretraining data) and ``"hard"`` (small, faint targets drawn by
the SAME renderer, same shapes and colours, so they look like shrunken, fainter easy targets).

Ground truth: a target's mask is ``alpha >= 0.5`` of its soft silhouette; a mask covering columns
``x0..x1`` and rows ``y0..y1`` has box ``[x0, y0, x1 + 1, y1 + 1]`` (``data_prep.common``).

Determinism: every random draw comes from ``numpy.random.default_rng([seed, kind code, ...])``
and files are written by Pillow with fixed settings, so the same arguments give the same bytes.
Images are rendered with vectorised numpy over the pixel grid (no per-pixel Python loop).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

PhantomKind = Literal["ham10000", "tn3k", "heel"]
Preset = Literal["easy", "hard"]
HeelAnnotation = Literal["bbox", "mask"]
HeelFormat = Literal["jsonl", "csv"]
KINDS: tuple[str, ...] = get_args(PhantomKind)
_KIND_CODE = {"ham10000": 1, "tn3k": 2, "heel": 3}
MARKER = "phantom.json"


@dataclass(frozen=True)
class Difficulty:
    """How hard the targets are to find (see the module docstring)."""

    size_range: tuple[float, float]  # nominal major diameter / shorter image side
    contrast: float  # 0 (invisible) .. 1 (the modality's full contrast)
    noise: float  # std of additive Gaussian noise, intensities in [0, 1]

    def __post_init__(self) -> None:
        lo, hi = self.size_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"size_range={self.size_range}: expected 0 < lo <= hi <= 1")
        if not 0.0 <= self.contrast <= 1.0:
            raise ValueError(f"contrast={self.contrast}: expected 0 <= contrast <= 1")
        if self.noise < 0.0:
            raise ValueError(f"noise={self.noise}: expected >= 0")


# Starting points for issue 6's calibration: "easy" = large, high contrast (stand-in pretraining
# data); "hard" = the same renderer with small, faint targets.
PRESETS: dict[str, dict[str, Difficulty]] = {
    "ham10000": {
        "easy": Difficulty(size_range=(0.40, 0.70), contrast=1.0, noise=0.03),
        "hard": Difficulty(size_range=(0.10, 0.20), contrast=0.5, noise=0.06),
    },
    "tn3k": {
        "easy": Difficulty(size_range=(0.28, 0.45), contrast=1.0, noise=0.03),
        "hard": Difficulty(size_range=(0.08, 0.16), contrast=0.5, noise=0.06),
    },
    "heel": {
        "easy": Difficulty(size_range=(0.25, 0.45), contrast=1.0, noise=0.02),
        "hard": Difficulty(size_range=(0.06, 0.12), contrast=0.4, noise=0.05),
    },
}


@dataclass(frozen=True)
class PhantomImage:
    """Ground truth of one written image (paths relative to the phantom folder)."""

    image: str
    mask: str | None
    boxes: list[list[float]]  # one box per drawn target, continuous xyxy
    union_box: list[float]
    part: str  # tn3k: "trainval" | "test"; ham10000: the lesion_id; heel: ""


@dataclass
class PhantomSummary:
    """What ``make_phantom`` wrote."""

    kind: str
    out_dir: str
    preset: str
    difficulty: Difficulty
    image_size: tuple[int, int]
    seed: int
    images: list[PhantomImage] = field(default_factory=list)
    n_multi_target: int = 0
    seconds: float = 0.0


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


def _bbox(mask: np.ndarray) -> list[float]:
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
class _LesionLook:
    """Per-lesion constants (all photos of one lesion share them)."""

    shape: dict[str, Any]
    diameter_frac: float
    lesion_rgb: tuple[float, float, float]
    skin_rgb: tuple[float, float, float]


def _lesion_look(rng: np.random.Generator, difficulty: Difficulty) -> _LesionLook:
    lesion = np.array([0.45, 0.27, 0.17]) * rng.uniform(0.8, 1.15) + rng.uniform(-0.04, 0.04, 3)
    skin = np.array([0.90, 0.70, 0.60]) + rng.uniform(-0.05, 0.05, 3)
    return _LesionLook(
        shape=_random_shape(rng),
        diameter_frac=float(rng.uniform(*difficulty.size_range)),
        lesion_rgb=tuple(float(x) for x in np.clip(lesion, 0, 1)),
        skin_rgb=tuple(float(x) for x in np.clip(skin, 0, 1)),
    )


def render_dermoscopy(
    rng: np.random.Generator, h: int, w: int, look: _LesionLook, difficulty: Difficulty
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


# ----------------------------------------------------------------------------- writers


def _save(array: np.ndarray, path: str, fmt: str, **params: Any) -> None:
    Image.fromarray(array).save(path, format=fmt, **params)


_JPEG = {"quality": 90, "optimize": False, "progressive": False, "subsampling": 2}
_DX = (
    ("nv", 0.67),
    ("mel", 0.11),
    ("bkl", 0.11),
    ("bcc", 0.05),
    ("akiec", 0.03),
    ("vasc", 0.015),
    ("df", 0.015),
)
_DX_TYPE = ("histo", "follow_up", "consensus", "confocal")
_LOCALIZATION = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "scalp",
)


def _write_ham10000(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    images_per_lesion: tuple[int, int],
) -> tuple[list[PhantomImage], int]:
    code = _KIND_CODE["ham10000"]
    plan = np.random.default_rng([seed, code, 0])
    lo, hi = images_per_lesion
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_lesion={images_per_lesion}: expected 1 <= lo <= hi")
    lesion_of_image: list[int] = []
    n_lesions = 0
    while len(lesion_of_image) < n:
        k = int(plan.integers(lo, hi + 1))
        lesion_of_image += [n_lesions] * min(k, n - len(lesion_of_image))
        n_lesions += 1
    dx_names, dx_p = zip(*_DX)
    lesion_rows = []
    looks = []
    for les in range(n_lesions):
        rng = np.random.default_rng([seed, code, 1, les])
        looks.append(_lesion_look(rng, difficulty))
        lesion_rows.append(
            {
                "dx": str(rng.choice(dx_names, p=np.asarray(dx_p) / sum(dx_p))),
                "dx_type": str(rng.choice(_DX_TYPE)),
                "age": f"{5 * int(rng.integers(1, 18))}.0",
                "sex": str(rng.choice(("male", "female"))),
                "localization": str(rng.choice(_LOCALIZATION)),
            }
        )
    truth: list[PhantomImage] = []
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf, lineterminator="\n")
    writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
    for i, les in enumerate(lesion_of_image):
        rng = np.random.default_rng([seed, code, 2, i])
        rgb, mask = render_dermoscopy(rng, h, w, looks[les], difficulty)
        image_id, lesion_id = f"ISIC_{24306 + i:07d}", f"HAM_{les:07d}"
        _save(rgb, os.path.join(out, f"{image_id}.jpg"), "JPEG", **_JPEG)
        _save(
            np.where(mask, 255, 0).astype(np.uint8),
            os.path.join(out, f"{image_id}_segmentation.png"),
            "PNG",
        )
        row = lesion_rows[les]
        writer.writerow(
            [
                lesion_id,
                image_id,
                row["dx"],
                row["dx_type"],
                row["age"],
                row["sex"],
                row["localization"],
            ]
        )
        box = _bbox(mask)
        truth.append(
            PhantomImage(f"{image_id}.jpg", f"{image_id}_segmentation.png", [box], box, lesion_id)
        )
    with open(os.path.join(out, "HAM10000_metadata.csv"), "w", encoding="utf-8", newline="") as fh:
        fh.write(csv_buf.getvalue())
    return truth, 0


def _write_tn3k(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    multi_target_frac: float,
    test_frac: float,
) -> tuple[list[PhantomImage], int]:
    code = _KIND_CODE["tn3k"]
    plan = np.random.default_rng([seed, code, 0])
    n_test = math.floor(n * test_frac + 0.5)
    n_tv = n - n_test
    n_multi = math.floor(n * multi_target_frac + 0.5)
    multi = {int(i) for i in plan.permutation(n)[:n_multi]}  # global index: trainval, then test
    for part in ("trainval-image", "trainval-mask", "test-image", "test-mask"):
        os.makedirs(os.path.join(out, part), exist_ok=True)
    truth: list[PhantomImage] = []
    for g in range(n):
        part, local = ("trainval", g) if g < n_tv else ("test", g - n_tv)
        rng = np.random.default_rng([seed, code, 2, g])
        gray, masks = render_ultrasound(rng, h, w, 2 if g in multi else 1, difficulty)
        name = f"{local:04d}.jpg"
        union = np.logical_or.reduce(masks)
        _save(gray, os.path.join(out, f"{part}-image", name), "JPEG", **_JPEG)
        _save(
            np.where(union, 255, 0).astype(np.uint8),
            os.path.join(out, f"{part}-mask", name),
            "JPEG",
            **_JPEG,
        )
        truth.append(
            PhantomImage(
                f"{part}-image/{name}",
                f"{part}-mask/{name}",
                [_bbox(m) for m in masks],
                _bbox(union),
                part,
            )
        )
    order = plan.permutation(n_tv)
    for k, val in enumerate(np.array_split(order, 5)):
        val_set = {int(i) for i in val}
        fold = {"train": [i for i in range(n_tv) if i not in val_set], "val": sorted(val_set)}
        with open(os.path.join(out, f"tn3k-trainval-fold{k}.json"), "w", encoding="utf-8") as fh:
            json.dump(fold, fh)
    return truth, n_multi


def _write_heel(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    annotation: HeelAnnotation,
    fmt: HeelFormat,
) -> tuple[list[PhantomImage], int]:
    code = _KIND_CODE["heel"]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    if annotation == "mask":
        os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    truth: list[PhantomImage] = []
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, code, 2, i])
        gray, mask = render_xray(rng, h, w, difficulty)
        image = f"images/heel_{i:05d}.png"
        _save(gray, os.path.join(out, image), "PNG")
        box = _bbox(mask)
        mask_rel = None
        if annotation == "mask":
            mask_rel = f"masks/heel_{i:05d}.png"
            _save(np.where(mask, 255, 0).astype(np.uint8), os.path.join(out, mask_rel), "PNG")
            rows.append({"image": image, "mask": mask_rel})
        else:
            rows.append({"image": image, "bbox": box})
        truth.append(PhantomImage(image, mask_rel, [box], box, ""))
    if fmt == "jsonl":
        with open(os.path.join(out, "annotations.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(os.path.join(out, "annotations.csv"), "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if annotation == "mask":
                writer.writerow(["image", "mask"])
                writer.writerows([r["image"], r["mask"]] for r in rows)
            else:
                writer.writerow(["image", "x1", "y1", "x2", "y2"])
                writer.writerows([r["image"], *(f"{v:g}" for v in r["bbox"])] for r in rows)
    return truth, 0


def resolve_difficulty(
    kind: str,
    preset: str,
    *,
    size_range: Sequence[float] | None = None,
    contrast: float | None = None,
    noise: float | None = None,
) -> Difficulty:
    """The preset's ``Difficulty`` with any given field overridden."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {list(KINDS)}")
    if preset not in get_args(Preset):
        raise ValueError(f"preset={preset!r}; expected one of {list(get_args(Preset))}")
    d = PRESETS[kind][preset]
    if size_range is not None:
        d = replace(d, size_range=(float(size_range[0]), float(size_range[1])))
    if contrast is not None:
        d = replace(d, contrast=float(contrast))
    if noise is not None:
        d = replace(d, noise=float(noise))
    return d


def make_phantom(
    kind: PhantomKind,
    out_dir: str,
    *,
    n_images: int,
    image_size: tuple[int, int] = (112, 112),
    preset: Preset = "easy",
    size_range: Sequence[float] | None = None,
    contrast: float | None = None,
    noise: float | None = None,
    seed: int = 0,
    images_per_lesion: tuple[int, int] = (1, 4),
    multi_target_frac: float = 0.12,
    test_frac: float = 0.2,
    heel_annotation: HeelAnnotation = "bbox",
    heel_format: HeelFormat = "jsonl",
    overwrite: bool = False,
) -> PhantomSummary:
    """Write a phantom dataset of ``kind`` in its real on-disk layout into ``out_dir``.

    Args:
        kind: ``"ham10000"`` | ``"tn3k"`` | ``"heel"``.
        out_dir: must not exist or be empty; with ``overwrite`` an earlier phantom (a folder
            holding ``phantom.json``) is replaced. Written into a temp folder, then renamed.
        n_images: number of images (ham10000: photos; tn3k: trainval + test).
        image_size: ``(width, height)``; 112x112 suits the tiny model, the real HAM10000 is
            600x450.
        preset: ``"easy"`` | ``"hard"``; ``size_range``/``contrast``/``noise`` override its fields.
        seed: everything is a function of the arguments and this seed.
        images_per_lesion: ham10000 only: photos per lesion drawn uniformly from [lo, hi].
        multi_target_frac: tn3k only: fraction of images with two nodules (rounded to a count).
        test_frac: tn3k only: fraction of images in ``test-*`` (rounded to a count); the real
            set has 614 / 3493 = 0.176.
        heel_annotation / heel_format: heel only: boxes or masks; JSONL or CSV.
    """
    difficulty = resolve_difficulty(
        kind, preset, size_range=size_range, contrast=contrast, noise=noise
    )
    w, h = int(image_size[0]), int(image_size[1])
    if w < 16 or h < 16:
        raise ValueError(f"image_size={image_size}: expected at least 16x16")
    if n_images < 1:
        raise ValueError(f"n_images={n_images}: expected >= 1")
    if heel_annotation not in get_args(HeelAnnotation):
        raise ValueError(
            f"heel_annotation={heel_annotation!r}; expected one of {list(get_args(HeelAnnotation))}"
        )
    if heel_format not in get_args(HeelFormat):
        raise ValueError(
            f"heel_format={heel_format!r}; expected one of {list(get_args(HeelFormat))}"
        )
    if not 0.0 <= multi_target_frac <= 1.0 or not 0.0 <= test_frac < 1.0:
        raise ValueError(
            f"multi_target_frac={multi_target_frac}, test_frac={test_frac}: expected fractions"
        )

    out_dir = os.path.abspath(out_dir)
    old_phantom = False
    if os.path.exists(out_dir) and os.listdir(out_dir):
        old_phantom = os.path.isfile(os.path.join(out_dir, MARKER))
        if not (overwrite and old_phantom):
            raise FileExistsError(
                f"{out_dir} is not empty; "
                + (
                    "pass overwrite=True (--overwrite) to replace this phantom"
                    if old_phantom
                    else "refusing to write a phantom over a folder that is not one"
                )
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    start = time.perf_counter()
    try:
        if kind == "ham10000":
            truth, n_multi = _write_ham10000(
                tmp, n_images, h, w, difficulty, seed, images_per_lesion
            )
        elif kind == "tn3k":
            truth, n_multi = _write_tn3k(
                tmp, n_images, h, w, difficulty, seed, multi_target_frac, test_frac
            )
        elif kind == "heel":
            truth, n_multi = _write_heel(
                tmp, n_images, h, w, difficulty, seed, heel_annotation, heel_format
            )
        else:  # resolve_difficulty already rejected other kinds
            raise AssertionError(kind)
        params = {
            "kind": kind,
            "preset": preset,
            "difficulty": asdict(difficulty),
            "image_size": [w, h],
            "n_images": n_images,
            "seed": seed,
            "n_multi_target": n_multi,
            "images_per_lesion": list(images_per_lesion),
            "multi_target_frac": multi_target_frac,
            "test_frac": test_frac,
            "heel_annotation": heel_annotation,
            "heel_format": heel_format,
        }
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
            json.dump(params, fh, indent=2)
            fh.write("\n")
        for folder, _dirs, files in os.walk(tmp):
            os.chmod(folder, 0o755)  # mkdtemp makes 0700
        if old_phantom:
            trash = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out_dir)}-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "old"))
            os.replace(tmp, out_dir)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out_dir)  # replaces a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PhantomSummary(
        kind=kind,
        out_dir=out_dir,
        preset=preset,
        difficulty=difficulty,
        image_size=(w, h),
        seed=seed,
        images=truth,
        n_multi_target=n_multi,
        seconds=time.perf_counter() - start,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write phantom datasets in the real on-disk layouts."
    )
    parser.add_argument(
        "--kind",
        required=True,
        choices=[*KINDS, "all"],
        help="dataset layout; 'all' writes OUT/<kind> for each",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-images", type=int, required=True)
    parser.add_argument("--preset", default="easy", choices=list(get_args(Preset)))
    parser.add_argument("--image-size", type=int, nargs=2, default=[112, 112], metavar=("W", "H"))
    parser.add_argument(
        "--size-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="target diameter / shorter image side (overrides the preset)",
    )
    parser.add_argument("--contrast", type=float, default=None, help="0..1 (overrides the preset)")
    parser.add_argument(
        "--noise", type=float, default=None, help="noise std (overrides the preset)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--images-per-lesion", type=int, nargs=2, default=[1, 4], metavar=("LO", "HI")
    )
    parser.add_argument("--multi-target-frac", type=float, default=0.12)
    parser.add_argument("--test-frac", type=float, default=0.2)
    parser.add_argument("--heel-annotation", default="bbox", choices=list(get_args(HeelAnnotation)))
    parser.add_argument("--heel-format", default="jsonl", choices=list(get_args(HeelFormat)))
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier phantom in OUT"
    )
    args = parser.parse_args(argv)
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    for kind in kinds:
        out = os.path.join(args.out, kind) if args.kind == "all" else args.out
        try:
            summary = make_phantom(
                kind,
                out,
                n_images=args.n_images,
                image_size=tuple(args.image_size),
                preset=args.preset,
                size_range=args.size_range,
                contrast=args.contrast,
                noise=args.noise,
                seed=args.seed,
                images_per_lesion=tuple(args.images_per_lesion),
                multi_target_frac=args.multi_target_frac,
                test_frac=args.test_frac,
                heel_annotation=args.heel_annotation,
                heel_format=args.heel_format,
                overwrite=args.overwrite,
            )
        except (FileExistsError, ValueError) as exc:
            print(f"phantoms: {exc}", file=sys.stderr)
            return 2
        print(
            f"{kind}: {len(summary.images)} images ({args.preset}) in {summary.out_dir} "
            f"[{summary.seconds:.1f} s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
