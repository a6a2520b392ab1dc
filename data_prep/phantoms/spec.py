"""What a phantom dataset is: kinds, difficulty presets and the ground truth ``make_phantom``
returns (see ``data_prep.phantoms`` for the layouts and the appearance)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

PhantomKind = Literal["ham10000", "tn3k", "heel"]
Preset = Literal["easy", "hard"]
HeelAnnotation = Literal["bbox", "mask"]
HeelFormat = Literal["jsonl", "csv"]
KINDS: tuple[str, ...] = get_args(PhantomKind)
KIND_CODE = {"ham10000": 1, "tn3k": 2, "heel": 3}
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
