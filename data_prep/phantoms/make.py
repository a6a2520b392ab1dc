"""``make_phantom`` (one phantom dataset, written atomically) and the command line."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import get_args

from data_prep.phantoms.layouts import write_ham10000, write_heel, write_tn3k
from data_prep.phantoms.spec import (
    KINDS,
    MARKER,
    HeelAnnotation,
    HeelFormat,
    PhantomKind,
    PhantomSummary,
    Preset,
    resolve_difficulty,
)
from medloc.atomic import atomic_directory
from medloc.logging import console


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
    start = time.perf_counter()
    with atomic_directory(out_dir) as tmp:  # replaces a missing or empty folder, or old_phantom
        tmp = str(tmp)
        if kind == "ham10000":
            truth, n_multi = write_ham10000(
                tmp, n_images, h, w, difficulty, seed, images_per_lesion
            )
        elif kind == "tn3k":
            truth, n_multi = write_tn3k(
                tmp, n_images, h, w, difficulty, seed, multi_target_frac, test_frac
            )
        elif kind == "heel":
            truth, n_multi = write_heel(
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
            console(f"phantoms: {exc}", err=True)
            return 2
        console(
            f"{kind}: {len(summary.images)} images ({args.preset}) in {summary.out_dir} "
            f"[{summary.seconds:.1f} s]"
        )
    return 0
